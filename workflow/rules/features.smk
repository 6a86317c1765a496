rule features:
    """Encode every grid patch of one slide into a Zarr v3 bag (written to a partial sibling, renamed
    into place when complete; an interrupted job resumes from its last finished chunk)."""
    input:
        slide=slide_path,
        labels=labels_input(),
        grid=rules.grid.output[0],
    output:
        directory(f"{RESULTS}/features/{TAG}/{{slide}}.zarr"),
    params:
        settings=stage_settings("features"),
        slide_args=slide_args(),
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
        "python -m pipeline features --slide {input.slide:q} --grid {input.grid:q} --out {output:q} "
        "--threads {threads} {params.slide_args} --settings {params.settings:q} > {log:q} 2>&1"
