"""wsipipe: whole-slide images -> tissue -> patch grid -> Zarr feature bags -> MIL."""

__version__ = "0.1.0"

# Stage versions: bump one when a code change alters that stage's outputs. The Snakemake rules put
# these in ``params:`` so that a bump reruns exactly that stage and everything downstream of it.
STAGE_VERSIONS = {
    "tissue": 1,
    "grid": 1,
    "features": 1,
    "mil": 3,  # 2: model zoo, abmil = plain attention (abmil_gated = gated), class weighting fixed
    # 3: each model trains with its paper's recipe (Adam/L2, Lookahead-RAdam, AdamW; schedules, epochs,
    #    AUC+F1 selection), ACMIL/DSMIL/TransMIL/CLAM match their papers, survival bins from the training
    #    part only, split column val honoured, seeded group order in CV, predictions.csv gains `fold`,
    #    predictions_all.csv gains in_training marks, metrics.json the fold slide lists
    "heatmap": 1,
    "report": 1,
    "preflight": 1,
}

__all__ = ["__version__", "STAGE_VERSIONS"]
