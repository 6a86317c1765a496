rule prefetch_weights:
    """Download and pin the encoder weights once (on the submitting node, which has network) before the
    feature jobs fan out; the jobs then load the pinned file by path and sha256."""
    output:
        LAYOUT.weights_lock(FEATURES["model"]),
    params:
        model=FEATURES["model"],
        version=STAGE_VERSIONS["features"],
    log:
        LAYOUT.log("weights", safe_name(FEATURES["model"])),
    localrule: True
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline weights prefetch --model {params.model:q} "
        "--cache-dir \"$(dirname {output:q})\" > {log:q} 2>&1"


rule features:
    """Encode the grid patches of a batch of slides into one Zarr v3 bag per slide, with one encoder for
    the batch (features.slides_per_job). Bags already up to date (same slide content, grid, settings and
    weights) are kept untouched; a bag is written to a partial sibling and renamed into place when
    complete, and an interrupted job resumes within the slide it was on. Output: the batch manifest."""
    input:
        slides=lambda wildcards: [str(SLIDES[s]) for s in BATCHES[wildcards.batch]],
        grids=lambda wildcards: [LAYOUT.grid(s) for s in BATCHES[wildcards.batch]],
        weights_lock=weights_lock(),
    output:
        LAYOUT.features_batch("{batch}"),
    params:
        settings=settings("features"),
        batch=batch_spec,
        slide_args=common_slide_args(),
        lock=lambda wildcards, input: f"--weights-lock '{input.weights_lock}'" if input.weights_lock else "",
        version=STAGE_VERSIONS["features"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        LAYOUT.log("features", f"{TAG}/batch_{{batch}}"),
    threads: 2 + FEATURES["num_workers"]
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=TOP["gpus_per_feature_job"],
    shell:
        "python -m pipeline features --batch {params.batch:q} --batch-id {wildcards.batch} --manifest {output:q} "
        "{params.lock} --threads {threads} {params.slide_args} --settings {params.settings:q} > {log:q} 2>&1"
