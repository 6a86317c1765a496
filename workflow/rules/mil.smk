rule mil_train:
    """k-fold cross-validated MIL training on the cached bags of the labelled slides."""
    input:
        bags=bag_manifests(MIL_SLIDES),
        labels=LABELS or [],
    output:
        metrics=LAYOUT.mil_file("{mil_model}", "metrics.json"),
        oof=LAYOUT.mil_file("{mil_model}", "predictions.csv"),
        model_config=LAYOUT.mil_file("{mil_model}", "model_config.json"),
    params:
        bags_file=LAYOUT.cohort_file("mil_bags.txt"),
        settings=settings("mil"),
        labels=LABELS_CONTENT,
        version=STAGE_VERSIONS["mil"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        LAYOUT.log("mil", f"{TAG}/{{mil_model}}_train"),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
    shell:
        "python -m pipeline mil train --bags-file {params.bags_file:q} --labels {input.labels:q} "
        "--settings {params.settings:q} --model {wildcards.mil_model} --threads {threads} "
        "--out \"$(dirname {output.metrics:q})\" > {log:q} 2>&1"


rule mil_predict:
    """Fold-ensemble predictions and per-patch attention for every slide with a bag."""
    input:
        model_config=rules.mil_train.output.model_config,
        metrics=rules.mil_train.output.metrics,
        bags=bag_manifests(SLIDES),
    output:
        predictions=LAYOUT.mil_file("{mil_model}", "predictions_all.csv"),
        attention=directory(LAYOUT.mil_attention_dir("{mil_model}")),
    params:
        bags_file=LAYOUT.cohort_file("bags.txt"),
        labels=LABELS_CONTENT,
        version=STAGE_VERSIONS["mil"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        LAYOUT.log("mil", f"{TAG}/{{mil_model}}_predict"),
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m pipeline mil predict --model-dir \"$(dirname {input.model_config:q})\" "
        "--bags-file {params.bags_file:q} --out {output.predictions:q} --attention-dir {output.attention:q} "
        "> {log:q} 2>&1"
