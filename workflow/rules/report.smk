

rule report:
    """Cohort QC report (one self-contained HTML file) built from the cached outputs: per-slide thumbnail
    with the tissue contour and patch grid, mpp and its source, tissue area, patches, bag status, recorded
    failures, MIL metrics with ROC curves, links to heatmaps. Include after mil.smk (and heatmap.smk)."""
    input:
        tissue=[f"{RESULTS}/tissue/{s}/tissue.json" for s in SLIDES],
        grids=[f"{RESULTS}/grid/{s}.json" for s in SLIDES],
        bags=[bag(s) for s in SLIDES],
        mil=[f"{RESULTS}/mil/{TAG}/{config['mil']['model']}/{f}" for f in ("metrics.json", "predictions.csv")]
        if MIL_SLIDES
        else [],
        # heatmap PNGs (linked from the report) when heatmap.smk is included before this file
        heatmaps=[t for t in heatmap_targets() if t.endswith(".png")],
    output:
        f"{RESULTS}/report/index.html",
    params:
        results=lambda wildcards, output: str(Path(output[0]).parent.parent),
        tag=TAG,
        mil=f"--mil-model {config['mil']['model']}" if MIL_SLIDES else "",
        slides=sorted(SLIDES),
        version=STAGE_VERSIONS["report"],
    log:
        f"{RESULTS}/logs/report/report.log",
    localrule: True
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.report --results {params.results:q} --out {output:q} --tag {params.tag:q} "
        "{params.mil} --slides {params.slides:q} > {log:q} 2>&1"


rule preflight:
    """Pre-flight estimate (not part of the default target; `snakemake preflight`): patches per slide from
    the grids and the expected extraction time from the measured model throughput."""
    input:
        grids=[f"{RESULTS}/grid/{s}.json" for s in SLIDES],
    output:
        f"{RESULTS}/preflight.json",
    params:
        results=lambda wildcards, output: str(Path(output[0]).parent),
        model=(config.get("features") or {}).get("model", "resnet50_trunc"),
        batch_size=int((config.get("features") or {}).get("batch_size", 64)),
        device=(config.get("features") or {}).get("device", "auto"),
        slides=sorted(SLIDES),
        version=STAGE_VERSIONS["preflight"],
    log:
        f"{RESULTS}/logs/preflight/preflight.log",
    conda:
        "../../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=15,
        gpu=int(config.get("gpus_per_feature_job", 1)),
    shell:
        "python -m pipeline.preflight --results {params.results:q} --model {params.model:q} "
        "--batch-size {params.batch_size} --device {params.device:q} --threads {threads} --slides {params.slides:q} "
        "--out {output:q} > {log:q} 2>&1 && cat {log:q}"
