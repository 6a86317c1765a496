"""Evaluation that cannot leak, and comparing models: survival bins from the training part, the patient_id
warning, the split column, in-training marks on predictions_all.csv, the labels CSV checks, thread count and
device, the too-small-class message, identical folds across models, comparison.csv and curve data, and the
workflow's mil section validated against the registry."""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.mil import MILError
from pipeline.mil.__main__ import main
from pipeline.mil.compare import (comparison_curves, kaplan_meier, km_curve_data, logrank_test, roc_curve_data,
                                  write_comparison_csv)
from pipeline.mil.data import load_dataset, read_labels
from pipeline.mil.tasks import time_bins
from pipeline.mil.train import train, train_dataset
from pipeline.store import write_bag

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"hidden_dim": 8, "attn_dim": 4}


def write_bags(root: Path, n: int, dim: int = 6, seed: int = 0, prefix: str = "s") -> list[str]:
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        sid = f"{prefix}{i:03d}"
        x = rng.normal(size=(int(rng.integers(5, 12)), dim))
        if i % 2:
            x[0] += 3.0
        coords = np.stack([np.arange(len(x)) * 100, np.zeros(len(x))], axis=1).astype(np.int32)
        write_bag(root / f"{sid}.zarr", x.astype(np.float16), coords,
                  dict(slide_id=sid, model="toy", weights="random", target_mpp=0.5, patch_size_px=224,
                       level0_mpp=0.25, mpp_source="test", pipeline_version="0.1.0"))
        ids.append(sid)
    return ids


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcohort")
    ids = write_bags(root / "bags", 24)
    pd.DataFrame({"slide_id": ids, "label": [("neg", "pos")[i % 2] for i in range(24)],
                  "patient_id": [f"p{i // 2}" for i in range(24)]}).to_csv(root / "labels.csv", index=False)
    return root


# ------------------------------------------------------------------------------------ survival time bins

def test_survival_bins_come_from_the_training_part_only(tmp_path):
    ids = write_bags(tmp_path / "bags", 30)
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"slide_id": ids, "time": np.round(rng.uniform(1, 100, 30), 2), "event": [1, 0, 1] * 10})
    df.to_csv(tmp_path / "labels.csv", index=False)
    ds = load_dataset([tmp_path / "bags"], tmp_path / "labels.csv")
    train_dataset(ds, tmp_path / "run", model="mean", folds=3, epochs=1, model_kwargs={"hidden_dim": 4})
    for k in range(3):
        c = torch.load(tmp_path / f"run/fold_{k}/model.pt", weights_only=True)["config"]
        tr = [ds.slide_ids.index(s) for s in c["train_slides"]]
        assert c["task_config"]["bin_edges"] == pytest.approx(time_bins(ds.time[tr], ds.event[tr], 4))


# ------------------------------------------------------------------------------------ patient_id warning

def test_missing_patient_id_warns_once_in_log_and_metrics(tmp_path, caplog):
    ids = write_bags(tmp_path / "bags", 12)
    pd.DataFrame({"slide_id": ids, "label": [i % 2 for i in range(12)]}).to_csv(tmp_path / "l.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.mil"):
        m = train([tmp_path / "bags"], tmp_path / "l.csv", tmp_path / "run", model="mean", folds=3, epochs=1,
                  model_kwargs={"hidden_dim": 4})
    assert caplog.text.count("no patient_id column") == 1
    assert len(m["warnings"]) == 1 and "patient_id" in m["warnings"][0]
    assert json.loads((tmp_path / "run/metrics.json").read_text())["warnings"] == m["warnings"]


def test_no_warning_with_patient_id(cohort, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.mil"):
        m = train([cohort / "bags"], cohort / "labels.csv", tmp_path / "run", model="mean", folds=2, epochs=1,
                  model_kwargs={"hidden_dim": 4})
    assert m["warnings"] == [] and "patient_id" not in caplog.text


# ------------------------------------------------------------------------------------ split column

def test_split_column_honours_train_val_test(cohort, tmp_path):
    ids = [f"s{i:03d}" for i in range(24)]
    split = ["train"] * 14 + ["val"] * 4 + ["test"] * 6
    df = pd.read_csv(cohort / "labels.csv")
    df["split"] = split
    df.to_csv(tmp_path / "l.csv", index=False)
    m = train([cohort / "bags"], tmp_path / "l.csv", tmp_path / "run", model="mean", epochs=1,
              model_kwargs={"hidden_dim": 4})
    f = m["folds"][0]
    assert (m["mode"], f["n_train"], f["n_val"], f["n_test"]) == ("split", 14, 4, 6)
    c = torch.load(tmp_path / "run/fold_0/model.pt", weights_only=True)["config"]
    assert c["val_slides"] == ids[14:18] and c["train_slides"] == ids[:14] and c["test_slides"] == ids[18:]
    assert m["splits"][0]["val"] == ids[14:18]
    # without val rows a validation part is held out of the train rows
    df["split"] = ["train"] * 18 + ["test"] * 6
    df.to_csv(tmp_path / "l2.csv", index=False)
    m = train([cohort / "bags"], tmp_path / "l2.csv", tmp_path / "run2", model="mean", epochs=1,
              model_kwargs={"hidden_dim": 4})
    assert m["folds"][0]["n_train"] + m["folds"][0]["n_val"] == 18
    # unknown values are refused, naming the line
    df["split"] = ["train"] * 17 + ["validation"] + ["test"] * 6
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(MILError, match=r"line 19 \(slide_id 's017'\): split 'validation' is not one of train, val, test"):
        read_labels(tmp_path / "bad.csv")
    # a patient on both sides is refused
    df["split"] = ["train"] * 15 + ["val"] * 3 + ["test"] * 6  # p7 = s014 (train) + s015 (val)
    df.to_csv(tmp_path / "leak.csv", index=False)
    with pytest.raises(MILError, match="patient.*train and the val.*p7"):
        train([cohort / "bags"], tmp_path / "leak.csv", tmp_path / "run3", model="mean", epochs=1)


# ------------------------------------------------------------------------------------ predictions_all marks

def test_predict_marks_slides_the_fold_models_trained_on(cohort, tmp_path):
    train([cohort / "bags"], cohort / "labels.csv", tmp_path / "run", model="mean", folds=3, epochs=1,
          model_kwargs={"hidden_dim": 4})
    write_bags(tmp_path / "new", 3, seed=9, prefix="new")
    out = tmp_path / "predictions_all.csv"
    assert main(["predict", "--model-dir", str(tmp_path / "run"), "--bags", str(cohort / "bags"),
                 str(tmp_path / "new"), "--out", str(out), "--threads", "1"]) == 0
    p = pd.read_csv(out).set_index("slide_id")
    assert list(p.columns) == ["prob", "in_training", "in_training_fold_0", "in_training_fold_1", "in_training_fold_2"]
    splits = json.loads((tmp_path / "run/metrics.json").read_text())["splits"]
    for f in splits:
        for s in f["train"] + f["val"]:
            assert p.loc[s, f"in_training_fold_{f['fold']}"] == 1
        for s in f["test"]:
            assert p.loc[s, f"in_training_fold_{f['fold']}"] == 0
    assert (p.loc[[s for s in p.index if s.startswith("s")], "in_training"] == 1).all()  # 3 folds: seen by 2
    assert (p.loc[["new000", "new001", "new002"], ["in_training", "in_training_fold_0"]] == 0).all().all()


# ------------------------------------------------------------------------------------ labels CSV checks

def test_labels_csv_ids_duplicates_and_bad_values(tmp_path):
    decomposed = unicodedata.normalize("NFD", "café")
    (tmp_path / "nfc.csv").write_text(f"slide_id,label\n{decomposed},1\nb,0\n", encoding="utf-8")
    assert read_labels(tmp_path / "nfc.csv")["slide_id"].tolist() == [unicodedata.normalize("NFC", "café"), "b"]
    (tmp_path / "dup.csv").write_text("slide_id,label\na,1\nb,0\na,1\n")
    with pytest.raises(MILError, match=r"line 4: slide_id 'a' listed twice \(also line 2\)"):
        read_labels(tmp_path / "dup.csv")
    (tmp_path / "dupnfc.csv").write_text(f"slide_id,label\ncafé,1\n{decomposed},1\n", encoding="utf-8")
    with pytest.raises(MILError, match="listed twice"):
        read_labels(tmp_path / "dupnfc.csv")
    (tmp_path / "empty.csv").write_text("slide_id,label\na,1\nb,\nc,0\n")
    with pytest.raises(MILError, match=r"line 3 \(slide_id 'b'\): empty 'label'"):
        read_labels(tmp_path / "empty.csv")
    (tmp_path / "nan.csv").write_text("slide_id,label\na,1\nb,0\nc,NaN\n")
    with pytest.raises(MILError, match=r"line 4 \(slide_id 'c'\): empty 'label'"):
        read_labels(tmp_path / "nan.csv")
    (tmp_path / "mixed.csv").write_text("slide_id,label\na,1\nb,0\nc,tumour\nd,1\n")
    with pytest.raises(MILError, match=r"line 4 \(slide_id 'c'\): label 'tumour' is text while 3 other"):
        read_labels(tmp_path / "mixed.csv")
    (tmp_path / "surv.csv").write_text("slide_id,time,event\na,3,1\nb,,0\n")
    with pytest.raises(MILError, match=r"line 3 \(slide_id 'b'\): empty 'time'"):
        read_labels(tmp_path / "surv.csv")
    (tmp_path / "reg.csv").write_text("slide_id,label\na,0.5\nb,1.5\nc,abc\n")
    with pytest.raises(MILError, match=r"line 4 \(slide_id 'c'\): label 'abc' is text"):
        read_labels(tmp_path / "reg.csv")
    with pytest.raises(MILError, match=r"line 4 \(slide_id 'c'\): column 'label' must be a finite number"):
        read_labels(tmp_path / "reg.csv", "regression")
    (tmp_path / "bom.csv").write_bytes("\ufeffslide_id,label\na,x\nb,y\n".encode("utf-8"))
    assert read_labels(tmp_path / "bom.csv")["label"].tolist() == ["x", "y"]


def test_nfc_labels_match_nfc_bag_ids(tmp_path):
    sid = unicodedata.normalize("NFC", "scan_é")
    ids = write_bags(tmp_path / "bags", 4, prefix="x")
    rows = [f"{unicodedata.normalize('NFD', s)},{i % 2}" for i, s in enumerate(ids)]
    (tmp_path / "l.csv").write_text("slide_id,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert load_dataset([tmp_path / "bags"], tmp_path / "l.csv").slide_ids == ids
    assert sid  # ids with combining characters compare equal once normalised


# ------------------------------------------------------------------------------------ threads, device, classes

def test_training_honours_the_thread_count(cohort, tmp_path, monkeypatch):
    import pipeline.mil.train as T

    seen = []
    real_fit = T.fit

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return real_fit(*a, **kw)

    monkeypatch.setattr(T, "fit", spy)
    torch.set_num_threads(2)
    try:
        m = train([cohort / "bags"], cohort / "labels.csv", tmp_path / "run", model="mean", folds=2, epochs=1,
                  model_kwargs={"hidden_dim": 4}, threads=1)
        assert seen == [1, 1] and torch.get_num_threads() == 2 and m["params"]["threads"] == 1
    finally:
        torch.set_num_threads(1)
    with pytest.raises(MILError, match="--threads"):
        train([cohort / "bags"], cohort / "labels.csv", tmp_path / "x", threads=0)


def test_device_auto_and_missing_cuda(cohort, tmp_path):
    m = train([cohort / "bags"], cohort / "labels.csv", tmp_path / "run", model="mean", folds=2, epochs=1,
              model_kwargs={"hidden_dim": 4}, device="auto")
    assert m["params"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MILError, match="CUDA is not available"):
            train([cohort / "bags"], cohort / "labels.csv", tmp_path / "x", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_and_prediction_on_cuda(cohort, tmp_path):
    m = train([cohort / "bags"], cohort / "labels.csv", tmp_path / "run", model="abmil", folds=2, epochs=2,
              model_kwargs=FAST, device="cuda")
    assert m["params"]["device"].startswith("cuda")
    assert main(["predict", "--model-dir", str(tmp_path / "run"), "--bags", str(cohort / "bags"), "--out",
                 str(tmp_path / "p.csv"), "--device", "cuda"]) == 0
    assert pd.read_csv(tmp_path / "p.csv")["prob"].between(0, 1).all()


def test_a_class_smaller_than_the_folds_is_named(tmp_path, capsys):
    ids = write_bags(tmp_path / "bags", 12)
    labels = ["a"] * 6 + ["b"] * 4 + ["rare"] * 2
    pd.DataFrame({"slide_id": ids, "label": labels}).to_csv(tmp_path / "l.csv", index=False)
    rc = main(["train", "--bags", str(tmp_path / "bags"), "--labels", str(tmp_path / "l.csv"), "--out",
               str(tmp_path / "o"), "--folds", "3", "--model", "mean"])
    err = capsys.readouterr().err
    assert rc == 2 and "class 'rare' has 2 slide(s), fewer than the 3 folds" in err
    assert "--folds 2" in err and "--folds 1" in err and "n_splits" not in err


# ------------------------------------------------------------------------------------ comparing models

def test_models_share_folds_and_compare(cohort, tmp_path, capsys):
    runs = []
    for model in ("mean", "abmil", "clam_sb"):
        kw = {"hidden_dim": 8} if model == "mean" else FAST
        m = train([cohort / "bags"], cohort / "labels.csv", tmp_path / model, model=model, folds=3, epochs=2,
                  model_kwargs=kw)
        runs.append((model, m))
    (_, a), (_, b), (_, c) = runs
    assert a["splits"] == b["splits"] == c["splits"] and a["splits_sha256"] == b["splits_sha256"]
    assert sorted(s for f in a["splits"] for s in f["test"]) == [f"s{i:03d}" for i in range(24)]
    dirs = [str(tmp_path / m) for m, _ in runs]
    assert main(["compare", *dirs, "--out", str(tmp_path / "comparison.csv"),
                 "--curves", str(tmp_path / "curves.json")]) == 0
    table = capsys.readouterr().out
    assert "| mean |" in table and "±" in table
    df = pd.read_csv(tmp_path / "comparison.csv")
    assert df["model"].tolist() == ["mean", "abmil", "clam_sb"] and df["same_folds"].all()
    for key in ("auc", "balanced_accuracy", "accuracy", "f1"):
        vals = [f[key] for f in a["folds"]]
        assert df.loc[0, f"{key}_mean"] == pytest.approx(np.mean(vals))
        assert df.loc[0, f"{key}_sd"] == pytest.approx(np.std(vals, ddof=1))
        assert df.loc[0, f"{key}_n"] == 3
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert curves["kind"] == "roc" and [r["model"] for r in curves["runs"]] == ["mean", "abmil", "clam_sb"]
    roc = roc_curve_data(tmp_path / "abmil")[0]
    oof = pd.read_csv(tmp_path / "abmil/predictions.csv")
    from sklearn.metrics import roc_auc_score

    assert roc["auc"] == pytest.approx(roc_auc_score(oof["label"] == "pos", oof["prob"]))
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and (roc["n_pos"], roc["n_neg"]) == (12, 12)
    # a run on other folds is flagged
    train([cohort / "bags"], cohort / "labels.csv", tmp_path / "other", model="mean", folds=3, seed=5, epochs=1,
          model_kwargs={"hidden_dim": 4})
    rows = write_comparison_csv([dirs[0], str(tmp_path / "other")], tmp_path / "c2.csv")
    assert rows["same_folds"].tolist() == [True, False]


def test_grouped_folds_depend_on_the_seed():
    """scikit-learn's StratifiedGroupKFold(shuffle=True) ignores the seed when every patient has the same
    class mix; our seeded group order does not."""
    from pipeline.mil.train import cv_splits, holdout_split

    y = np.array([i % 2 for i in range(24)])
    g = np.array([f"p{i // 2}" for i in range(24)])
    folds = {s: [te.tolist() for _, te in cv_splits(y, g, 3, s)] for s in (0, 1, 2)}
    assert folds[0] != folds[1] or folds[0] != folds[2]
    assert folds[0] == [te.tolist() for _, te in cv_splits(y, g, 3, 0)]  # deterministic
    vals = {tuple(holdout_split(np.arange(24), y, g, 0.25, s)[1]) for s in range(4)}
    assert len(vals) > 1


def test_kaplan_meier_logrank_and_survival_curves(tmp_path):
    km = kaplan_meier([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    # S(1) = 4/5, S(2) = 4/5 * 3/4, S(3) = 3/5 * 1/2
    assert km["time"] == [0.0, 1.0, 2.0, 3.0] and km["survival"] == pytest.approx([1, 0.8, 0.6, 0.3])
    assert km["censored"] == [2.0, 4.0] and km["at_risk"] == [5, 5, 4, 2]
    t = np.array([1, 2, 3, 4, 5, 6, 7, 8.0])
    e = np.ones(8)
    strong = logrank_test(t, e, [1, 1, 1, 1, 0, 0, 0, 0])
    weak = logrank_test(t, e, [1, 0, 1, 0, 1, 0, 1, 0])
    assert strong["p"] < weak["p"] and 0 < strong["p"] < 0.05 and weak["chi2"] >= 0
    ids = write_bags(tmp_path / "bags", 24)
    rng = np.random.default_rng(3)
    time_ = np.where(np.arange(24) % 2 == 1, rng.uniform(1, 20, 24), rng.uniform(30, 60, 24))
    pd.DataFrame({"slide_id": ids, "time": np.round(time_, 2), "event": [1, 1, 0] * 8}).to_csv(tmp_path / "l.csv",
                                                                                               index=False)
    train([tmp_path / "bags"], tmp_path / "l.csv", tmp_path / "run", model="mean", folds=3, epochs=3,
          model_kwargs={"hidden_dim": 8}, lr=1e-2)
    curves = km_curve_data(tmp_path / "run")
    high, low = curves["groups"]
    assert high["n"] + low["n"] == 24 and curves["split"].startswith("median of each fold")
    assert high["survival"][0] == 1.0 and all(np.diff(high["survival"]) <= 0)
    assert comparison_curves([tmp_path / "run"])["kind"] == "km"
    with pytest.raises(MILError, match="has no ROC curve"):
        roc_curve_data(tmp_path / "run")


# ------------------------------------------------------------------------------------ workflow mil section

def test_resolve_mil_section():
    """The workflow's `mil` section: several models on the same folds, checked without torch
    (pipeline.config, the one configuration path); each run's settings are what its training job gets."""
    from pipeline.config import ConfigError, mil_runs, resolve
    from pipeline.mil.train import resolve_recipe

    section = resolve("mil", {"models": {"abmil": {}, "transmil": {"dropout": 0.2, "lr": 1e-4},
                                         "acmil_small": {"model": "acmil", "hidden_dim": 32}},
                              "folds": 3, "task": "classification", "aem": True, "threads": 2})
    runs = mil_runs(section)
    assert list(runs) == ["abmil", "transmil", "acmil_small"]
    assert [r["model"] for r in runs.values()] == ["abmil", "transmil", "acmil"]
    t = runs["transmil"]
    assert t["model_args"]["dropout"] == 0.2 and t["lr"] == 1e-4 and t["folds"] == 3
    recipe = resolve_recipe("transmil", **{k: t[k] for k in ("lr", "epochs", "optimizer")})
    assert recipe["optimizer"] == "radam_lookahead" and recipe["lr"] == 1e-4
    assert runs["abmil"]["lr"] is None and resolve_recipe("abmil")["lr"] == 5e-4
    assert all(r["aem"] and r["threads"] == 2 for r in runs.values())
    assert runs["acmil_small"]["model_args"]["hidden_dim"] == 32
    legacy = mil_runs(resolve("mil", {"model": "abmil", "hidden_dim": 64, "epochs": 5}))
    assert legacy["abmil"]["model_args"]["hidden_dim"] == 64 and legacy["abmil"]["epochs"] == 5
    assert [r["model"] for r in mil_runs(resolve("mil", {"models": ["mean", {"dsmil": {"q_dim": 64}}]})).values()] \
        == ["mean", "dsmil"]
    bad = [({"models": {"abmil": {"k_sample": 3}}}, "mil.models.abmil.k_sample: MIL model 'abmil' does not take"),
           ({"models": {"nosuch": {}}}, "mil.models.nosuch: unknown MIL model 'nosuch'"),
           ({"models": {"abmil": {"folds": 2}}}, "mil.models.abmil.folds: must be the same for every model"),
           ({"models": ["abmil"], "epoch": 3}, "unknown mil parameter.*'epoch'"),
           ({"models": ["abmil"], "epochs": "10"}, r"mil\.epochs\) must be an integer"),
           ({"models": ["abmil"], "survival_loss": "aft"}, "mil.survival_loss: must be one of nll, cox"),
           ({"models": {"abmil": {"lr": -1}}}, r"mil\.models\.abmil\.lr\) must be > 0"),
           ({"models": ["abmil"], "patience": -2}, r"mil\.patience\) must be >= 0"),
           ({"models": ["abmil"], "hidden_dim": 8}, "mil.hidden_dim: a model hyper-parameter belongs under"),
           ({"models": ["abmil"], "device": "gpu"}, "mil.device"),
           ({"model": "abmil", "models": ["mean"]}, "not both"),
           ({"models": {"a/b": {}}}, "not a usable run name")]
    for sec, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            resolve("mil", sec)
