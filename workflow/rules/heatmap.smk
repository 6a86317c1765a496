# Heatmaps: per-slide attention / instance scores (written by rule mil_predict) + cached patch coords ->
# a heatmap PNG over the tissue thumbnail and a QuPath GeoJSON of the scored patches. Nothing is
# re-extracted. Include after mil.smk (heatmap_targets() is in common.smk).


rule heatmap:
    """Attention / instance-score heatmap over the thumbnail and GeoJSON of the scored patches of one slide."""
    input:
        attention=rules.mil_predict.output.attention,
        thumbnail=rules.tissue.output.thumbnail,
        tissue=rules.tissue.output.stats,
        grid=rules.grid.output[0],
    output:
        png=LAYOUT.heatmap("{mil_model}", "{slide}", "png"),
        geojson=LAYOUT.heatmap("{mil_model}", "{slide}", "geojson"),
    params:
        settings=settings("heatmap"),
        version=STAGE_VERSIONS["heatmap"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        LAYOUT.log("heatmap", f"{TAG}/{{mil_model}}/{{slide}}"),
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m pipeline heatmap --scores {input.attention:q}/{wildcards.slide:q}.csv "
        "--tissue-dir \"$(dirname {input.tissue:q})\" --grid {input.grid:q} --settings {params.settings:q} "
        "--out-png {output.png:q} --out-geojson {output.geojson:q} > {log:q} 2>&1"
