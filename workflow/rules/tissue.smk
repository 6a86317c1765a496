rule tissue:
    """Tissue segmentation of one slide: mask, thumbnail with contour, GeoJSON, stats (written last)."""
    input:
        slide=slide_path,
    output:
        mask=LAYOUT.tissue_file("{slide}", "mask"),
        thumbnail=LAYOUT.tissue_file("{slide}", "thumbnail"),
        geojson=LAYOUT.tissue_file("{slide}", "geojson"),
        stats=LAYOUT.tissue_json("{slide}"),
    params:
        settings=settings("tissue"),
        content=lambda wildcards: CONTENT[wildcards.slide],
        slide_args=slide_args,
        version=STAGE_VERSIONS["tissue"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        LAYOUT.log("tissue", "{slide}"),
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m pipeline tissue --slide {input.slide:q} --out-dir \"$(dirname {output.stats:q})\" "
        "{params.slide_args} --settings {params.settings:q} > {log:q} 2>&1"
