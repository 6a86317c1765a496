rule grid:
    """Patch grid at grid.target_mpp µm/px from the tissue mask, with the read plan."""
    input:
        slide=slide_path,
        tissue=rules.tissue.output.stats,
        mask=rules.tissue.output.mask,
    output:
        LAYOUT.grid("{slide}"),
    params:
        settings=settings("grid"),
        slide_args=slide_args,
        version=STAGE_VERSIONS["grid"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        LAYOUT.log("grid", "{slide}"),
    resources:
        mem_mb=2000,
        runtime=15,
    shell:
        "python -m pipeline grid --slide {input.slide:q} --tissue-dir \"$(dirname {input.tissue:q})\" "
        "--out {output:q} {params.slide_args} --settings {params.settings:q} > {log:q} 2>&1"
