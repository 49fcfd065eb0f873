"""The heads' names, constructor parameters and hyperparameter ranges, known without the heads.

The heads' registry names and constructor parameters equal pipeline.heads.HEADS and
valid_params (by test); they are written here so that checking params imports neither the
heads nor scikit-learn (seconds to import), since every stage checks its params first.
"""

from __future__ import annotations

from pipeline.config.rules import Range, positive_int

HEAD_PARAMS: dict[str, tuple[str, ...]] = {
    "mlp": (
        "hidden",
        "epochs",
        "lr",
        "weight_decay",
        "batch_size",
        "random_state",
        "device",
        "warm_start_from",
    ),
    "svm": (
        "C",
        "C_grid",
        "n_calibration_folds",
        "tol",
        "max_iter",
        "random_state",
        "warm_start_from",
    ),
    "multitask": (
        "hidden",
        "epochs",
        "lr",
        "weight_decay",
        "batch_size",
        "real_label",
        "family_map",
        "random_state",
        "device",
        "warm_start_from",
    ),
    "tip_adapter": (
        "alpha",
        "beta",
        "finetune",
        "epochs",
        "lr",
        "batch_size",
        "n_shots",
        "class_text_emb",
        "clip_logit_scale",
        "standardize",
        "alpha_grid",
        "beta_grid",
        "random_state",
        "device",
        "warm_start_from",
    ),
    "meta": ("base_heads", "n_folds", "final", "random_state"),
    "ufd_probe": ("weights",),
}
HEAD_NAMES = tuple(HEAD_PARAMS)
# Heads stacked on other heads (train.<head>.base_heads); the others are base heads.
STACKED_HEADS = ("meta",)

# Hyperparameters of the heads (train.<head>.<name>), by name: they are free-form mappings in
# params.yaml, so their types are checked here too ("50" is not an integer).
HEAD_RANGES: dict[str, Range] = {
    "hidden": positive_int("hidden units", example=512),
    "epochs": positive_int("passes over train", example=50),
    "batch_size": positive_int("rows per step", example=64),
    "lr": Range(False, 0, 10, lo_open=True, why="learning rate", example=0.001),
    "weight_decay": Range(False, 0, why="AdamW weight decay", example=0.001),
    "C": Range(False, 0, lo_open=True, why="SVM regularisation", example=1.0),
    "n_calibration_folds": Range(True, 2, why="folds", example=3),
    "max_iter": positive_int("iterations", example=100),
    "tol": Range(False, 0, lo_open=True, why="solver tolerance", example=0.0001),
    "n_folds": Range(True, 2, why="out-of-fold stacking", example=5),
    "alpha": Range(False, 0, why="Tip-Adapter residual ratio", example=1.0),
    "beta": Range(False, 0, why="Tip-Adapter sharpness", example=5.5),
    "n_shots": Range(True, 1, optional=True, why="shots per class", example=16),
    "clip_logit_scale": Range(False, 0, lo_open=True, why="CLIP's logit scale", example=100.0),
    "random_state": Range(True, 0, 2**32 - 1, optional=True, why="seed", example=0),
}
# Hyperparameters that are true or false.
HEAD_BOOLS = ("finetune", "standardize")
# Grid hyperparameters and the hyperparameter whose range each of their values has.
HEAD_GRIDS = {"C_grid": "C", "alpha_grid": "alpha", "beta_grid": "beta"}
