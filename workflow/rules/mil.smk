rule mil_train:
    """Cross-validated training of one MIL run (mil.models: every run trains on the same folds) on the cached
    bags of the labelled slides."""
    input:
        bags=bag_manifests(MIL_SLIDES),
        labels=LABELS or [],
    output:
        metrics=LAYOUT.mil_file("{mil_model}", "metrics.json"),
        oof=LAYOUT.mil_file("{mil_model}", "predictions.csv"),
        model_config=LAYOUT.mil_file("{mil_model}", "model_config.json"),
    params:
        bags_file=LAYOUT.cohort_file("mil_bags.txt"),
        settings=mil_settings,
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
        gpu=lambda wildcards: int(str(MIL_RUNS[wildcards.mil_model]["device"]).startswith("cuda")),
    shell:
        "python -m pipeline mil train --bags-file {params.bags_file:q} --labels {input.labels:q} "
        "--settings {params.settings:q} --threads {threads} "
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
        device=lambda wildcards: MIL_RUNS[wildcards.mil_model]["device"],
        labels=LABELS_CONTENT,
        version=STAGE_VERSIONS["mil"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        LAYOUT.log("mil", f"{TAG}/{{mil_model}}_predict"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=lambda wildcards: int(str(MIL_RUNS[wildcards.mil_model]["device"]).startswith("cuda")),
    shell:
        "python -m pipeline mil predict --model-dir \"$(dirname {input.model_config:q})\" "
        "--bags-file {params.bags_file:q} --device {params.device:q} --threads {threads} "
        "--out {output.predictions:q} --attention-dir {output.attention:q} > {log:q} 2>&1"


rule mil_compare:
    """The MIL runs side by side: mean ± sd over folds of every metric (comparison.csv) and the ROC or
    Kaplan-Meier curve data (comparison_curves.json), for the report."""
    input:
        metrics=[LAYOUT.mil_file(m, "metrics.json") for m in MIL_RUNS],
        oof=[LAYOUT.mil_file(m, "predictions.csv") for m in MIL_RUNS],
    output:
        csv=LAYOUT.mil_comparison("csv"),
        curves=LAYOUT.mil_comparison("json"),
    params:
        version=STAGE_VERSIONS["mil"],
    conda:
        "../../envs/pipeline.yaml"
    log:
        LAYOUT.log("mil", f"{TAG}/comparison"),
    localrule: True
    shell:
        "python -m pipeline mil compare $(for f in {input.metrics:q}; do dirname \"$f\"; done) "
        "--out {output.csv:q} --curves {output.curves:q} > {log:q} 2>&1"
