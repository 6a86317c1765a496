rule report:
    """Cohort QC report (one self-contained HTML file) built from the cached outputs: per-slide thumbnail
    with the tissue contour and patch grid, mpp and its source, tissue area, patches, bag status, recorded
    failures, MIL metrics with ROC curves, links to heatmaps. Include after mil.smk (and heatmap.smk)."""
    input:
        tissue=[LAYOUT.tissue_json(s) for s in SLIDES],
        grids=[LAYOUT.grid(s) for s in SLIDES],
        bags=bag_manifests(SLIDES),
        mil=[LAYOUT.mil_file(m, f) for m in MIL_RUNS for f in ("metrics.json", "predictions.csv")]
        + [LAYOUT.mil_comparison("csv"), LAYOUT.mil_comparison("json")]
        if MIL_SLIDES
        else [],
        # heatmap PNGs (linked from the report) when heatmap.smk is included before this file
        heatmaps=[t for t in heatmap_targets() if t.endswith(".png")],
    output:
        LAYOUT.report_html(),
    params:
        slides_file=LAYOUT.cohort_file("slides.txt"),
        results=lambda wildcards, output: str(Path(output[0]).parent.parent),
        settings=settings("report"),
        version=STAGE_VERSIONS["report"],
    log:
        LAYOUT.log("report", "report"),
    localrule: True
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline report --results {params.results:q} --out {output:q} --settings {params.settings:q} "
        "--slides-file {params.slides_file:q} > {log:q} 2>&1"


rule preflight:
    """Pre-flight estimate (not part of the default target; `snakemake preflight`): patches per slide from
    the grids and the expected extraction time from the measured model throughput."""
    input:
        grids=[LAYOUT.grid(s) for s in SLIDES],
    output:
        LAYOUT.preflight_json(),
    params:
        slides_file=LAYOUT.cohort_file("slides.txt"),
        results=lambda wildcards, output: str(Path(output[0]).parent),
        settings=settings("preflight"),
        version=STAGE_VERSIONS["preflight"],
    log:
        LAYOUT.log("preflight", "preflight"),
    conda:
        "../../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=15,
        gpu=TOP["gpus_per_feature_job"],
    shell:
        "python -m pipeline preflight --results {params.results:q} --settings {params.settings:q} "
        "--threads {threads} --slides-file {params.slides_file:q} --out {output:q} > {log:q} 2>&1 && cat {log:q}"
