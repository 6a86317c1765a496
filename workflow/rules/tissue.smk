rule tissue:
    """Tissue segmentation of one slide: mask, thumbnail with contour, GeoJSON, stats (written last)."""
    input:
        slide=slide_path,
    output:
        mask=f"{RESULTS}/tissue/{{slide}}/mask.png",
        thumbnail=f"{RESULTS}/tissue/{{slide}}/thumbnail.png",
        geojson=f"{RESULTS}/tissue/{{slide}}/tissue.geojson",
        stats=f"{RESULTS}/tissue/{{slide}}/tissue.json",
    params:
        settings=stage_settings("tissue"),
        content=lambda wildcards: CONTENT[wildcards.slide],
        slide_args=slide_args,
        version=STAGE_VERSIONS["tissue"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        f"{RESULTS}/logs/tissue/{{slide}}.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m pipeline tissue --slide {input.slide:q} --out-dir \"$(dirname {output.stats:q})\" "
        "{params.slide_args} --settings {params.settings:q} > {log:q} 2>&1"
