"""MIL package: registry, ABMIL, data loading, grouped CV, training, inference and the CLI (CPU, small)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.mil import MILError, create_model, list_models
from pipeline.mil.__main__ import main
from pipeline.mil.data import load_dataset
from pipeline.mil.predict import load_models, predict_features
from pipeline.mil.train import cv_splits, holdout_split, train, train_dataset
from pipeline.store import read_bag, write_bag

REPO = Path(__file__).resolve().parents[1]
FAST = {"hidden_dim": 64, "attn_dim": 32}


def bag_attrs(slide_id: str, **over) -> dict:
    attrs = dict(slide_id=slide_id, model="toy", weights="random", target_mpp=0.5, patch_size_px=224,
                 level0_mpp=0.25, mpp_source="test", pipeline_version="0.1.0")
    attrs.update(over)
    return attrs


def write_toy_bag(path: Path, features: np.ndarray, **over) -> Path:
    n = features.shape[0]
    coords = np.stack([np.arange(n) * 224 + 7, (np.arange(n)[::-1] % 5) * 224], axis=1).astype(np.int32)
    return write_bag(path, features.astype(np.float16), coords, bag_attrs(path.name[:-len(".zarr")], **over))


def make_synthetic(root: Path, n_bags: int = 40, dim: int = 32, shift: float = 4.0, seed: int = 0,
                   labels=("neg", "pos"), slides_per_patient: int = 2):
    """Bags of 20-60 Gaussian instances; positive bags contain 2-5 instances shifted along one direction."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    bags = root / "bags"
    rows, planted = [], {}
    for i in range(n_bags):
        sid = f"s{i:03d}"
        y = i % 2
        m = int(rng.integers(20, 61))
        feats = rng.normal(size=(m, dim))
        mask = np.zeros(m, dtype=bool)
        if y:
            idx = rng.choice(m, int(rng.integers(2, 6)), replace=False)
            feats[idx] += shift * direction
            mask[idx] = True
        write_toy_bag(bags / f"{sid}.zarr", feats)
        rows.append({"slide_id": sid, "label": labels[y], "patient_id": f"p{i // slides_per_patient}"})
        planted[sid] = mask
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return bags, csv, planted


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 4-fold CV run on the synthetic task, shared by the tests that need a trained model."""
    root = tmp_path_factory.mktemp("mil")
    bags, csv, planted = make_synthetic(root)
    out = root / "run"
    metrics = train([bags], csv, out, model="abmil", folds=4, seed=0, epochs=15, patience=5, lr=1e-3,
                    model_kwargs=FAST)
    return {"root": root, "bags": bags, "labels": csv, "planted": planted, "out": out, "metrics": metrics}


# ------------------------------------------------------------------------------------------ registry / model

def test_registry_and_shapes():
    assert {"abmil", "abmil_plain"} <= set(list_models())
    for name in ("abmil", "abmil_plain"):
        net = create_model(name, in_dim=16, n_classes=3).eval()
        out = net(torch.randn(7, 16))
        assert out["logits"].shape == (3,)
        assert out["attention"].shape == (7,)
        assert torch.isclose(out["attention"].sum(), torch.tensor(1.0))
    assert create_model("abmil_gated", 16, 2).attn_u is not None and create_model("abmil", 16, 2).attn_u is None
    assert create_model("abmil_plain", 16, 2).attn_u is None
    with pytest.raises(MILError, match="available models: .*abmil.*abmil_plain"):
        create_model("no_such_model", in_dim=16, n_classes=2)
    with pytest.raises(MILError, match="accepted options"):
        create_model("abmil", in_dim=16, n_classes=2, bogus=1)


def test_empty_bag_model_no_nan():
    net = create_model("abmil", in_dim=8, n_classes=2).eval()
    with torch.inference_mode():
        out = net(torch.zeros(0, 8))
    assert out["attention"].shape == (0,)
    assert torch.isfinite(out["logits"]).all()


# ------------------------------------------------------------------------------------------ training

def test_abmil_learns_synthetic_task(trained):
    m, out = trained["metrics"], trained["out"]
    assert m["mean"]["auc"] >= 0.9, m["mean"]
    assert len(m["folds"]) == 4 and m["classes"] == ["neg", "pos"] and m["mode"] == "cv"
    assert m["task"] == "classification" and m["model"] == "abmil" and m["provenance"]["stage"] == "mil"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["folds"] == m["folds"]
    for f in m["folds"]:
        assert {"fold", "n_train", "n_val", "n_test", "auc", "balanced_accuracy", "accuracy", "best_epoch"} <= set(f)
        assert f["n_train"] + f["n_val"] + f["n_test"] == 40
        assert (out / f"fold_{f['fold']}" / "model.pt").is_file()
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["slide_id", "label", "prob", "fold"]
    assert sorted(pred["slide_id"]) == sorted(trained["planted"])  # out-of-fold: every bag once
    cfg = json.loads((out / "model_config.json").read_text())
    assert cfg["model"] == "abmil" and cfg["in_dim"] == 32 and cfg["classes"] == ["neg", "pos"]
    assert cfg["feature_attrs"] == {"model": "toy", "weights": "random", "target_mpp": 0.5, "patch_size_px": 224, "feature_dim": 32}
    assert not list(out.rglob(".*tmp*"))  # no temporary leftovers


def test_attention_peaks_on_planted_instances(trained):
    cfg, models = load_models(trained["out"], torch.device("cpu"))
    ratios = []
    for sid, mask in trained["planted"].items():
        if not mask.any():
            continue
        bag = read_bag(trained["bags"] / f"{sid}.zarr")
        _, att = predict_features(models, bag.features)
        assert att.shape == (bag.n,)
        ratios.append(att[mask].mean() / att[~mask].mean())
    assert np.mean(ratios) > 2.0, ratios
    assert np.median(ratios) > 1.0


def test_cv_grouped_by_patient(trained):
    rng = np.random.default_rng(3)
    groups = np.repeat([f"p{i}" for i in range(30)], rng.integers(1, 5, size=30))
    y = np.array([int(g[1:]) % 3 == 0 for g in groups], dtype=int)  # label per patient, imbalanced
    seen = np.zeros(len(y), dtype=int)
    for tr, te in cv_splits(y, groups, n_folds=5, seed=0):
        assert not set(groups[tr]) & set(groups[te])
        seen[te] += 1
        fit_idx, val_idx = holdout_split(tr, y, groups, 0.2, seed=1)
        assert not set(groups[fit_idx]) & set(groups[val_idx])
        assert sorted(np.concatenate([fit_idx, val_idx]).tolist()) == sorted(tr.tolist())
        assert 0 < len(val_idx) < len(tr)
    assert (seen == 1).all()
    # The real run used patient_id (two slides per patient): no patient on both sides of any fold.
    labels = pd.read_csv(trained["labels"]).set_index("slide_id")["patient_id"]
    for k in range(4):
        c = torch.load(trained["out"] / f"fold_{k}" / "model.pt", weights_only=True)["config"]
        train_p = {labels[s] for s in c["train_slides"] + c["val_slides"]}
        assert not train_p & {labels[s] for s in c["test_slides"]}
        assert not {labels[s] for s in c["train_slides"]} & {labels[s] for s in c["val_slides"]}
    with pytest.raises(MILError, match="folds"):
        cv_splits(y[:6], groups[:6], n_folds=10)


def test_determinism(tmp_path):
    bags, csv, _ = make_synthetic(tmp_path, n_bags=16, dim=8, seed=5)
    ds = load_dataset([bags], csv)
    kw = dict(folds=2, seed=7, epochs=3, patience=3, lr=1e-3, model_kwargs=FAST)
    m1 = train_dataset(ds, tmp_path / "a", **kw)
    m2 = train_dataset(ds, tmp_path / "b", **kw)
    assert m1["folds"] == m2["folds"] and m1["mean"] == m2["mean"]
    assert (tmp_path / "a/predictions.csv").read_bytes() == (tmp_path / "b/predictions.csv").read_bytes()
    m3 = train_dataset(ds, tmp_path / "c", **{**kw, "seed": 8})
    assert (tmp_path / "c/predictions.csv").read_bytes() != (tmp_path / "a/predictions.csv").read_bytes()
    assert m3["params"]["seed"] == 8


def test_multiclass_int_labels_and_single_mode(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        y = i % 3
        write_toy_bag(tmp_path / "bags" / f"m{i:02d}.zarr", rng.normal(size=(10, 8)) + y)
        rows.append(f"m{i:02d},{y}")
    rows.append("not_a_bag,1")
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    m = train([tmp_path / "bags"], tmp_path / "labels.csv", tmp_path / "cv", folds=2, epochs=2, lr=1e-3,
              model_kwargs=FAST)
    assert m["classes"] == [0, 1, 2]
    pred = pd.read_csv(tmp_path / "cv/predictions.csv")
    assert list(pred.columns) == ["slide_id", "label", "pred", "prob_0", "prob_1", "prob_2", "fold"]
    assert np.allclose(pred[["prob_0", "prob_1", "prob_2"]].sum(axis=1), 1.0, atol=1e-5)
    # --folds 1: one model; metrics and predictions from its validation split only.
    s = train([tmp_path / "bags"], tmp_path / "labels.csv", tmp_path / "single", folds=1, epochs=2,
              model_kwargs=FAST)
    assert s["mode"] == "single" and "validation" in s["note"] and len(s["folds"]) == 1
    f = s["folds"][0]
    assert f["n_train"] + f["n_val"] == 12 and f["n_test"] == 0
    assert len(pd.read_csv(tmp_path / "single/predictions.csv")) == f["n_val"]
    rc = main(["predict", "--model-dir", str(tmp_path / "single"), "--bags", str(tmp_path / "bags"),
               "--out", str(tmp_path / "p.csv")])
    assert rc == 0
    p = pd.read_csv(tmp_path / "p.csv")
    assert list(p.columns) == ["slide_id", "pred", "prob_0", "prob_1", "prob_2", "in_training",
                               "in_training_fold_0"] and len(p) == 12


# ------------------------------------------------------------------------------------------ data checks

def test_label_bag_mismatch_warns(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for i in range(5):
        write_toy_bag(tmp_path / "bags" / f"b{i}.zarr", rng.normal(size=(4, 8)))
    (tmp_path / "labels.csv").write_text("slide_id,label\nb0,x\nb1,y\nb2,x\nb3,y\nghost,x\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.mil"):
        ds = load_dataset([tmp_path / "bags"], tmp_path / "labels.csv")
    assert ds.slide_ids == ["b0", "b1", "b2", "b3"] and ds.classes == ["x", "y"]
    assert ds.features[0].dtype == np.float16
    assert "ghost" in caplog.text and "b4" in caplog.text
    (tmp_path / "one.csv").write_text("slide_id,label\nb0,x\nb1,x\n")
    with pytest.raises(MILError, match="same label"):
        load_dataset([tmp_path / "bags"], tmp_path / "one.csv")
    (tmp_path / "few.csv").write_text("slide_id,label\nb0,x\nghost,y\n")
    with pytest.raises(MILError, match="at least 2"):
        load_dataset([tmp_path / "bags"], tmp_path / "few.csv")


def test_mixed_target_mpp_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(4):
        write_toy_bag(tmp_path / "bags" / f"b{i}.zarr", rng.normal(size=(5, 8)))
    write_toy_bag(tmp_path / "odd" / "b9.zarr", rng.normal(size=(5, 8)), target_mpp=1.0)
    (tmp_path / "labels.csv").write_text("slide_id,label\nb0,0\nb1,1\nb2,0\nb3,1\nb9,1\n")
    with pytest.raises(MILError, match=r"b9\.zarr.*target_mpp"):
        load_dataset([tmp_path / "bags", tmp_path / "odd" / "b9.zarr"], tmp_path / "labels.csv")
    rc = main(["train", "--bags", str(tmp_path / "bags"), str(tmp_path / "odd"), "--labels",
               str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "b9.zarr" in err and "target_mpp" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_random_and_real_weights_not_mixed(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        write_toy_bag(tmp_path / "bags" / f"b{i}.zarr", rng.normal(size=(5, 8)))
    write_toy_bag(tmp_path / "bags" / "b5.zarr", rng.normal(size=(5, 8)),
                  weights={"source": "file:w.safetensors", "sha256": "ab" * 32})
    (tmp_path / "labels.csv").write_text("slide_id,label\nb0,0\nb1,1\nb2,0\nb3,1\nb5,1\n")
    with pytest.raises(MILError, match=r"b5\.zarr.*weights"):
        load_dataset([tmp_path / "bags"], tmp_path / "labels.csv")


# ------------------------------------------------------------------------------------------ predict / CLI

def test_predict_cli_and_attention(trained, tmp_path, capsys):
    # An extra empty bag (N = 0) predicts without NaN and gets an empty attention CSV.
    extra = tmp_path / "empty.zarr"
    write_toy_bag(extra, np.zeros((0, 32)))
    out_csv, att_dir = tmp_path / "pred.csv", tmp_path / "att"
    rc = main(["predict", "--model-dir", str(trained["out"]), "--bags", str(trained["bags"]), str(extra),
               "--out", str(out_csv), "--attention-dir", str(att_dir)])
    assert rc == 0, capsys.readouterr().err
    pred = pd.read_csv(out_csv)
    assert list(pred.columns) == ["slide_id", "prob", "in_training"] + [f"in_training_fold_{k}" for k in range(4)]
    assert sorted(pred["slide_id"]) == sorted([*trained["planted"], "empty"])
    assert pred["prob"].between(0, 1).all() and pred["prob"].notna().all()
    for sid in [*trained["planted"], "empty"]:
        bag = read_bag(extra if sid == "empty" else trained["bags"] / f"{sid}.zarr")
        att = pd.read_csv(att_dir / f"{sid}.csv")
        assert list(att.columns) == ["x", "y", "attention"] and len(att) == bag.n
        assert (att[["x", "y"]].to_numpy() == bag.coords).all()
        if bag.n:
            assert att["attention"].sum() == pytest.approx(1.0, abs=1e-4)
    # Positive bags score higher than negative ones.
    lab = pd.read_csv(trained["labels"]).merge(pred, on="slide_id")
    assert lab.loc[lab.label == "pos", "prob"].mean() > lab.loc[lab.label == "neg", "prob"].mean()


def test_predict_refuses_incompatible_bag(trained, tmp_path, capsys):
    odd = tmp_path / "odd.zarr"
    write_toy_bag(odd, np.zeros((3, 32)), patch_size_px=512)
    rc = main(["predict", "--model-dir", str(trained["out"]), "--bags", str(odd), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "odd.zarr" in err and "patch_size_px" in err
    assert not (tmp_path / "p.csv").exists()


def test_training_skips_empty_bags(tmp_path, caplog):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(8):
        write_toy_bag(tmp_path / "bags" / f"e{i}.zarr", rng.normal(size=(0 if i == 0 else 6, 8)))
        rows.append(f"e{i},{i % 2}")
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.mil"):
        m = train([tmp_path / "bags"], tmp_path / "labels.csv", tmp_path / "out", folds=2, epochs=2,
                  model_kwargs=FAST)
    assert "empty bag" in caplog.text and "e0" in caplog.text
    assert pd.read_csv(tmp_path / "out/predictions.csv")["prob"].notna().all()
    assert all(np.isfinite(f["accuracy"]) for f in m["folds"])


def test_cli_user_errors(tmp_path, capsys):
    write_toy_bag(tmp_path / "bags" / "a.zarr", np.zeros((2, 4)))
    missing = tmp_path / "nope.csv"
    rc = main(["train", "--bags", str(tmp_path / "bags"), "--labels", str(missing), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and "Traceback" not in err
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,y\na,1\n")
    rc = main(["train", "--bags", str(tmp_path / "bags"), "--labels", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2 and str(bad) in capsys.readouterr().err
    good = tmp_path / "good.csv"
    good.write_text("slide_id,label\na,1\nb,0\n")
    rc = main(["train", "--bags", str(tmp_path / "nobags"), "--labels", str(good), "--out", str(tmp_path / "o")])
    assert rc == 2 and "nobags" in capsys.readouterr().err
    rc = main(["train", "--bags", str(tmp_path / "bags"), "--labels", str(good), "--out", str(tmp_path / "o")])
    assert rc == 2 and str(good) in capsys.readouterr().err  # only 1 slide has both a label and a bag
    rc = main(["predict", "--model-dir", str(tmp_path / "o"), "--bags", str(tmp_path / "bags"),
               "--out", str(tmp_path / "p.csv")])
    assert rc == 2 and str(tmp_path / "o") in capsys.readouterr().err
    rc = main(["train", "--bags", str(tmp_path / "bags"), "--labels", str(bad), "--out", str(tmp_path / "o"),
               "--model", "nonexistent"])
    assert rc == 2 and "abmil" in capsys.readouterr().err
    # The real entry point, in a subprocess.
    r = subprocess.run([sys.executable, "-m", "pipeline.mil", "train", "--bags", str(tmp_path / "bags"),
                        "--labels", str(missing), "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and str(missing) in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_failed_slide_bags_are_left_out_and_named(tmp_path, caplog):
    """Bags written for broken slides (on_slide_error: skip) are skipped by training and prediction."""
    rng = np.random.default_rng(0)
    for i in range(6):
        write_toy_bag(tmp_path / "bags" / f"b{i}.zarr", rng.normal(size=(5, 8)) + (i % 2))
    write_bag(tmp_path / "bags" / "broken.zarr", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int32),
              bag_attrs("broken", status="failed", stage="tissue", error="file is empty (0 bytes)",
                        target_mpp=None, weights=None))
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"b{i},{i % 2}\n" for i in range(6))
                                         + "broken,1\n")
    with caplog.at_level("WARNING", logger="pipeline.mil"):
        ds = load_dataset([tmp_path / "bags"], tmp_path / "labels.csv")
    assert "broken" not in ds.slide_ids and len(ds.slide_ids) == 6
    assert "broken (tissue: file is empty (0 bytes))" in caplog.text
    train([tmp_path / "bags"], tmp_path / "labels.csv", tmp_path / "run", folds=2, epochs=2, patience=2,
          model_kwargs=FAST)
    assert main(["predict", "--model-dir", str(tmp_path / "run"), "--bags", str(tmp_path / "bags"),
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert "broken" not in (tmp_path / "p.csv").read_text()
