# wsipipe: slide folder -> tissue -> patch grid -> Zarr feature bags -> MIL -> predictions.
# Thin entry point; the rules live in workflow/rules/, the work in the `pipeline` Python package.
# Run: snakemake --cores N --config slides_dir=DIR [labels_csv=CSV] results_dir=DIR

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/tissue.smk"
include: "workflow/rules/grid.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/mil.smk"
include: "workflow/rules/heatmap.smk"
include: "workflow/rules/report.smk"


onstart:
    check_cluster_fits()
    lock_results_dir()
    write_cohort_lists()


onsuccess:
    write_failure_summary()


onerror:
    write_failure_summary()


rule all:
    input:
        all_targets(),
    default_target: True
