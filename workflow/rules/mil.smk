rule mil_train:
    """k-fold cross-validated MIL training on the cached bags of the labelled slides."""
    input:
        bags=[bag(s) for s in MIL_SLIDES],
        labels=LABELS or [],
    output:
        metrics=f"{RESULTS}/mil/{TAG}/{{mil_model}}/metrics.json",
        oof=f"{RESULTS}/mil/{TAG}/{{mil_model}}/predictions.csv",
        model_config=f"{RESULTS}/mil/{TAG}/{{mil_model}}/model_config.json",
    params:
        settings=stage_settings("mil"),
        args=mil_args(),
        labels=LABELS_CONTENT,
        version=STAGE_VERSIONS["mil"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        f"{RESULTS}/logs/mil/{TAG}/{{mil_model}}_train.log",
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
    shell:
        "python -m pipeline.mil train --bags {input.bags:q} --labels {input.labels:q} "
        "--model {wildcards.mil_model} --out \"$(dirname {output.metrics:q})\" {params.args} > {log:q} 2>&1"


rule mil_predict:
    """Fold-ensemble predictions and per-patch attention for every slide with a bag."""
    input:
        model_config=rules.mil_train.output.model_config,
        metrics=rules.mil_train.output.metrics,
        bags=[bag(s) for s in SLIDES],
    output:
        predictions=f"{RESULTS}/mil/{TAG}/{{mil_model}}/predictions_all.csv",
        attention=directory(f"{RESULTS}/mil/{TAG}/{{mil_model}}/attention"),
    params:
        labels=LABELS_CONTENT,
        version=STAGE_VERSIONS["mil"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        f"{RESULTS}/logs/mil/{TAG}/{{mil_model}}_predict.log",
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m pipeline.mil predict --model-dir \"$(dirname {input.model_config:q})\" --bags {input.bags:q} "
        "--out {output.predictions:q} --attention-dir {output.attention:q} > {log:q} 2>&1"
