rule prefetch_weights:
    """Download and pin the encoder weights once (on the submitting node, which has network) before the
    per-slide feature jobs fan out; the jobs then load the pinned file by path and sha256."""
    output:
        f"{RESULTS}/weights/{WEIGHTS_NAME}.lock.json",
    params:
        model=(config.get("features") or {}).get("model", "resnet50_trunc"),
        version=STAGE_VERSIONS["features"],
    log:
        f"{RESULTS}/logs/weights/{WEIGHTS_NAME}.log",
    localrule: True
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.features.weights prefetch --model {params.model:q} "
        "--cache-dir \"$(dirname {output:q})\" > {log:q} 2>&1"


rule features:
    """Encode every grid patch of one slide into a Zarr v3 bag (written to a partial sibling, renamed
    into place when complete; an interrupted job resumes from its last finished chunk)."""
    input:
        slide=slide_path,
        grid=rules.grid.output[0],
        weights_lock=weights_lock(),
    output:
        directory(f"{RESULTS}/features/{TAG}/{{slide}}.zarr"),
    params:
        settings=stage_settings("features"),
        slide_args=slide_args,
        lock=lambda wildcards, input: f"--weights-lock '{input.weights_lock}'" if input.weights_lock else "",
        version=STAGE_VERSIONS["features"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        f"{RESULTS}/logs/features/{TAG}/{{slide}}.log",
    threads: 2 + int((config.get("features") or {}).get("num_workers", 2))
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=int(config.get("gpus_per_feature_job", 1)),
    shell:
        "python -m pipeline features --slide {input.slide:q} --grid {input.grid:q} --out {output:q} {params.lock} "
        "--threads {threads} {params.slide_args} --settings {params.settings:q} > {log:q} 2>&1"
