"""MIL tasks and training options: survival (discrete-time NLL, Cox; C-index), regression, classification
metrics, the labels CSV deciding the task, a split column, class-balanced sampling, instance caps,
training-fold feature standardisation, AEM, per-model optimiser defaults and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.mil import MILError
from pipeline.mil.__main__ import main
from pipeline.mil.data import load_dataset, read_labels
from pipeline.mil.predict import load_models, predict_features
from pipeline.mil.tasks import (ClassificationTask, RegressionTask, SurvivalTask, compute_metrics,
                                concordance_index, time_bins)
from pipeline.mil.train import fold_feature_stats, train, train_dataset
from pipeline.store import write_bag

FAST = {"hidden_dim": 32, "attn_dim": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _attrs(sid, dim):
    return dict(slide_id=sid, model="toy", weights="random", target_mpp=0.5, patch_size_px=224, level0_mpp=0.25,
                mpp_source="test", pipeline_version="0.1.0")


def write_bags(root: Path, feats: list[np.ndarray], prefix="s") -> list[str]:
    ids = []
    for i, f in enumerate(feats):
        sid = f"{prefix}{i:03d}"
        n = f.shape[0]
        coords = np.stack([np.arange(n) * 100, np.zeros(n)], axis=1).astype(np.int32)
        write_bag(root / f"{sid}.zarr", f.astype(np.float16), coords, _attrs(sid, f.shape[1]))
        ids.append(sid)
    return ids


def toy_risk_bags(n_bags=48, dim=8, seed=0):
    """Bags whose share of 'bad' instances (shifted along one direction) drives the outcome."""
    rng = np.random.default_rng(seed)
    direction = np.eye(dim)[0] * 3.0
    feats, frac = [], []
    for _ in range(n_bags):
        m = int(rng.integers(10, 30))
        f = rng.uniform(0, 1)
        x = rng.normal(size=(m, dim))
        bad = rng.random(m) < f
        x[bad] += direction
        feats.append(x)
        frac.append(bad.mean())
    return feats, np.array(frac)


@pytest.fixture(scope="module")
def survival_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("surv")
    feats, frac = toy_risk_bags(60, seed=1)
    rng = np.random.default_rng(2)
    t_event = 100 * np.exp(-4.0 * frac + 0.3 * rng.normal(size=len(frac)))  # oracle C-index 0.92
    t_cens = rng.uniform(20, 400, size=len(frac))
    time_ = np.minimum(t_event, t_cens)
    event = (t_event <= t_cens).astype(int)
    ids = write_bags(root / "bags", feats)
    pd.DataFrame({"slide_id": ids, "time": np.round(time_, 3), "event": event,
                  "patient_id": [f"p{i // 2}" for i in range(len(ids))]}).to_csv(root / "labels.csv", index=False)
    return root, frac


# ------------------------------------------------------------------------------------------- task maths

def test_concordance_index():
    t = np.array([1, 2, 3, 4.0])
    e = np.array([1, 1, 1, 1])
    assert concordance_index(t, e, -t) == 1.0  # higher risk, shorter life
    assert concordance_index(t, e, t) == 0.0
    assert concordance_index(t, e, np.zeros(4)) == 0.5
    # censored bags only count as the longer-lived member of a pair
    assert concordance_index(np.array([1, 2.0]), np.array([0, 1]), np.array([5.0, 1.0])) is None
    assert concordance_index(np.array([2, 1.0]), np.array([0, 1]), np.array([0.0, 1.0])) == 1.0
    rng = np.random.default_rng(0)
    t, e, r = rng.exponential(size=30), rng.integers(0, 2, 30), rng.normal(size=30)
    conc = tot = 0.0
    for i in range(30):
        for j in range(30):
            if e[i] and t[i] < t[j]:
                tot += 1
                conc += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    assert concordance_index(t, e, r) == pytest.approx(conc / tot)


def test_discrete_time_nll_matches_the_formula():
    time_ = np.array([1.0, 5.0, 9.0, 9.0])
    event = np.array([1, 0, 1, 0])
    task = SurvivalTask("nll", bin_edges=[3.0, 7.0], time=time_, event=event)
    assert task.n_outputs == 3 and task.bins(time_).tolist() == [0, 1, 2, 2]
    logits = torch.tensor([[0.2, -1.0, 0.5], [1.0, 0.0, -0.5], [-0.3, 0.4, 0.1], [0.0, 0.0, 0.0]])
    h = torch.sigmoid(logits).double()
    s = torch.cumprod(1 - h, dim=1)
    expected = [-torch.log(h[0, 0]), -torch.log(s[1, 1]), -torch.log(s[2, 1]) - torch.log(h[2, 2]),
                -torch.log(s[3, 2])]
    assert float(task.loss(logits, [0, 1, 2, 3])) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    risk = task.predict(logits.numpy())[:, 0]
    assert np.allclose(risk, -s.sum(1).numpy())
    assert time_bins(np.arange(1, 101.0), np.ones(100), 4) == pytest.approx([25.75, 50.5, 75.25])


def test_cox_loss_matches_the_partial_likelihood_with_breslow_ties():
    time_ = np.array([5.0, 3.0, 3.0, 8.0, 1.0])
    event = np.array([1, 1, 0, 0, 1])
    task = SurvivalTask("cox", time=time_, event=event)
    r = torch.tensor([[0.3], [-0.2], [1.1], [0.5], [0.0]])
    expected = 0.0
    for i in np.flatnonzero(event):
        at_risk = time_ >= time_[i]
        expected -= float(r[i, 0]) - np.log(np.exp(r[at_risk, 0].numpy()).sum())
    assert float(task.loss(r, [0, 1, 2, 3, 4])) == pytest.approx(expected / event.sum(), rel=1e-5)
    assert float(task.loss(r[[2, 3]], [2, 3])) == 0.0  # no event, no information


def test_classification_metrics_and_weights():
    y = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    m = compute_metrics(y, probs, 2)
    assert m["auc"] == 1.0 and m["accuracy"] == 0.75 and m["f1"] == pytest.approx(2 / 3)
    t = ClassificationTask([0, 1], y, weights=[2 / 3, 2.0])
    logits = torch.zeros(4, 2)
    assert float(t.loss(logits, [0, 1, 2, 3])) == pytest.approx(np.log(2) * (3 * 2 / 3 + 2) / 4, rel=1e-5)
    r = RegressionTask("mae", target=np.array([1.0, 3.0]))
    assert (r.mean, r.std) == (2.0, 1.0)
    assert r.predict(np.array([[1.0]]))[0, 0] == 3.0


def test_labels_csv_decides_the_task(tmp_path):
    (tmp_path / "s.csv").write_text("slide_id,time,event,patient_id\na,3.5,1,p\nb,2,false,q\n")
    df = read_labels(tmp_path / "s.csv")
    assert df.attrs["task"] == "survival" and df["event"].tolist() == [1, 0]
    (tmp_path / "r.csv").write_text("slide_id,label\na,0.5\nb,1.25\n")
    assert read_labels(tmp_path / "r.csv").attrs["task"] == "regression"
    (tmp_path / "c.csv").write_text("slide_id,label\na,0\nb,1\n")
    assert read_labels(tmp_path / "c.csv").attrs["task"] == "classification"
    assert read_labels(tmp_path / "c.csv", "regression")["label"].tolist() == [0.0, 1.0]
    with pytest.raises(MILError, match="--task regression"):
        read_labels(tmp_path / "r.csv", "classification")
    with pytest.raises(MILError, match=r"lacks column\(s\) \['time', 'event'\]"):
        read_labels(tmp_path / "c.csv", "survival")
    (tmp_path / "bad.csv").write_text("slide_id,time,event\na,3,maybe\n")
    with pytest.raises(MILError, match="'event' must be 1/0"):
        read_labels(tmp_path / "bad.csv")
    (tmp_path / "split.csv").write_text("slide_id,label,split\na,0,train\nb,1,TEST\nc,1,val\n")
    assert read_labels(tmp_path / "split.csv")["split"].tolist() == ["train", "test", "val"]  # val honoured


# ------------------------------------------------------------------------------------------- training runs

@pytest.mark.parametrize("loss", ["nll", "cox"])
def test_survival_training_and_predict(survival_data, tmp_path, loss):
    root, frac = survival_data
    m = train([root / "bags"], root / "labels.csv", tmp_path / "run", model="mean", folds=3, epochs=15,
              patience=15, lr=2e-3, model_kwargs={"hidden_dim": 32}, survival_loss=loss, seed=0,
              batch_size=8 if loss == "cox" else None)
    assert m["task"] == "survival" and m["primary_metric"] == "c_index"
    assert m["params"]["loss"] == ("discrete-time NLL" if loss == "nll" else "Cox partial likelihood")
    assert m["params"]["batch_size"] == (8 if loss == "cox" else 1)
    # measured 0.87 (nll) / 0.89 (cox); the oracle (true risk) reaches 0.92, chance is 0.5
    assert m["mean"]["c_index"] > 0.75, m["folds"]
    oof = pd.read_csv(tmp_path / "run/predictions.csv")
    assert list(oof.columns) == ["slide_id", "time", "event", "risk", "fold"] and len(oof) == 60
    rc = main(["predict", "--model-dir", str(tmp_path / "run"), "--bags", str(root / "bags"), "--out",
               str(tmp_path / "p.csv"), "--attention-dir", str(tmp_path / "att")])
    assert rc == 0
    p = pd.read_csv(tmp_path / "p.csv")
    assert list(p.columns)[:3] == ["slide_id", "risk", "in_training"] and len(p) == 60
    # risk follows the share of bad instances
    assert np.corrcoef(p["risk"], frac)[0, 1] > 0.5
    # per-patch scores: each patch's share of the bag risk, higher on the 'bad' (shifted) instances
    from pipeline.store import read_bag

    r = []
    for sid in ("s000", "s001", "s002"):
        att = pd.read_csv(tmp_path / "att" / f"{sid}.csv")
        assert list(att.columns) == ["x", "y", "score"]
        r.append(np.corrcoef(att["score"], read_bag(root / "bags" / f"{sid}.zarr").features[:, 0])[0, 1])
    assert np.mean(r) > 0.5, r
    cfg = torch.load(tmp_path / "run/fold_0/model.pt", weights_only=True)["config"]
    assert cfg["task_config"]["task"] == "survival" and cfg["n_outputs"] == (4 if loss == "nll" else 1)
    if loss == "cox":  # the Cox loss needs several bags per step: default mini-batch 32
        m = train([root / "bags"], root / "labels.csv", tmp_path / "run2", model="mean", folds=2, epochs=1,
                  model_kwargs={"hidden_dim": 8}, survival_loss="cox")
        assert m["params"]["batch_size"] == 32


def test_regression_training_cli(tmp_path):
    feats, frac = toy_risk_bags(48, seed=3)
    ids = write_bags(tmp_path / "bags", feats)
    pd.DataFrame({"slide_id": ids, "label": 10 + 5 * frac + 0.01}).to_csv(tmp_path / "labels.csv", index=False)
    rc = main(["-q", "train", "--bags", str(tmp_path / "bags"), "--labels", str(tmp_path / "labels.csv"),
               "--out", str(tmp_path / "run"), "--model", "mean", "--folds", "3", "--epochs", "20",
               "--patience", "20", "--lr", "2e-3", "--regression-loss", "mae", "--model-arg", "hidden_dim=32",
               "--model-arg", "dropout=0.1"])
    assert rc == 0
    m = json.loads((tmp_path / "run/metrics.json").read_text())
    assert m["task"] == "regression" and set(m["mean"]) >= {"mse", "mae", "pearson_r"}
    assert m["params"]["model_kwargs"] == {"hidden_dim": 32, "dropout": 0.1}
    assert m["mean"]["pearson_r"] > 0.8, m["folds"]  # the target is the share of shifted instances
    oof = pd.read_csv(tmp_path / "run/predictions.csv")
    assert list(oof.columns) == ["slide_id", "label", "pred", "fold"]
    rc = main(["-q", "predict", "--model-dir", str(tmp_path / "run"), "--bags", str(tmp_path / "bags"),
               "--out", str(tmp_path / "p.csv"), "--attention-dir", str(tmp_path / "att")])
    assert rc == 0 and list(pd.read_csv(tmp_path / "p.csv").columns)[:3] == ["slide_id", "pred", "in_training"]
    att = pd.read_csv(tmp_path / "att/s000.csv")
    assert list(att.columns) == ["x", "y", "score"] and len(att) == feats[0].shape[0]  # instance predictions


def _toy_classification(root: Path, n_bags=40, dim=8, seed=0, imbalance=False):
    rng = np.random.default_rng(seed)
    feats, rows = [], []
    for i in range(n_bags):
        y = int(i % 4 == 0) if imbalance else i % 2
        x = rng.normal(size=(int(rng.integers(10, 40)), dim))
        if y:
            x[rng.choice(len(x), 3, replace=False), 0] += 4.0
        feats.append(x)
        rows.append(y)
    ids = write_bags(root / "bags", feats)
    pd.DataFrame({"slide_id": ids, "label": rows}).to_csv(root / "labels.csv", index=False)
    return load_dataset([root / "bags"], root / "labels.csv")


def test_split_column_sampler_cap_and_paper_defaults(tmp_path):
    ds = _toy_classification(tmp_path, imbalance=True)
    split = np.where(np.arange(len(ds)) < 28, "train", "test")
    pd.DataFrame({"slide_id": ds.slide_ids, "label": ds.labels, "split": split}).to_csv(tmp_path / "s.csv",
                                                                                         index=False)
    m = train([tmp_path / "bags"], tmp_path / "s.csv", tmp_path / "run", model="clam_sb", epochs=4,
              balance="sampler", max_instances=8, model_kwargs={"hidden_dim": 32, "attn_dim": 16, "k_sample": 2})
    assert m["mode"] == "split" and len(m["folds"]) == 1 and m["folds"][0]["n_test"] == 12
    assert m["params"]["lr"] == 2e-4 and m["params"]["weight_decay"] == 1e-5  # CLAM's paper values
    assert m["params"]["balance"] == "sampler" and m["params"]["max_instances"] == 8
    assert m["params"]["loss"] == "cross-entropy"
    oof = pd.read_csv(tmp_path / "run/predictions.csv")
    assert sorted(oof["slide_id"]) == sorted(np.array(ds.slide_ids)[split == "test"])
    with pytest.raises(MILError, match="--max-instances"):
        train_dataset(ds, tmp_path / "x", max_instances=0)
    with pytest.raises(MILError, match="--balance"):
        train_dataset(ds, tmp_path / "x", balance="oversample")


def test_standardisation_fitted_on_the_training_fold(tmp_path):
    ds = _toy_classification(tmp_path, n_bags=16)
    for f in ds.features:
        f *= np.float16(3.0)
        f += np.float16(5.0)
    idx = [0, 3, 4, 9]
    mean, std = fold_feature_stats(ds, idx)  # from the bags on disk, out of core
    x = np.concatenate([ds.features[i] for i in idx]).astype(np.float64)
    assert not np.allclose(mean, x.mean(0), atol=0.5)  # the on-disk bags were not scaled in memory
    ds.paths = []  # in-memory fallback uses the (scaled) arrays
    mean2, std2 = fold_feature_stats(ds, idx)
    assert np.allclose(mean2, x.mean(0), atol=1e-3) and np.allclose(std2, x.std(0), atol=1e-3)
    ds2 = _toy_classification(tmp_path / "again", n_bags=16)
    m = train_dataset(ds2, tmp_path / "run", model="mean", folds=2, epochs=2, standardize=True,
                      model_kwargs={"hidden_dim": 16})
    assert m["params"]["standardize"] is True
    ck = torch.load(tmp_path / "run/fold_0/model.pt", weights_only=True)
    tr = [ds2.slide_ids.index(s) for s in ck["config"]["train_slides"]]
    xm = np.concatenate([ds2.features[i] for i in tr]).astype(np.float64)
    assert np.allclose(ck["norm"]["mean"].numpy(), xm.mean(0), atol=1e-3)
    assert np.allclose(ck["norm"]["std"].numpy(), xm.std(0), atol=1e-3)
    # inference applies each fold's statistics
    cfg, models = load_models(tmp_path / "run", torch.device("cpu"))
    assert all(net.mil_norm is not None for net in models)
    prob, _ = predict_features(models, ds2.features[0])
    assert prob.shape == (2,) and np.isfinite(prob).all()


def test_aem_raises_attention_entropy(tmp_path):
    ds = _toy_classification(tmp_path, n_bags=24)

    def entropy(run):
        _, models = load_models(run, torch.device("cpu"))
        ents = []
        for f in ds.features:
            _, a = predict_features(models, f)
            ents.append(-(a * np.log(a + 1e-12)).sum() / np.log(len(a)))
        return float(np.mean(ents))

    kw = dict(model="abmil", folds=2, epochs=20, patience=20, lr=2e-3, model_kwargs=FAST, seed=1)
    train_dataset(ds, tmp_path / "plain", **kw)
    m = train_dataset(ds, tmp_path / "aem", aem_lambda=1.0, **kw)
    assert m["params"]["aem_lambda"] == 1.0
    # normalised attention entropy, measured 0.955 without and 0.998 with the AEM term
    assert entropy(tmp_path / "aem") > entropy(tmp_path / "plain") + 0.02
    with pytest.raises(MILError, match="needs an attention model"):
        train_dataset(ds, tmp_path / "x", model="mean", aem_lambda=0.1, folds=2, epochs=1)


def test_cli_models_and_bad_options(tmp_path, capsys):
    assert main(["models", "-v"]) == 0
    out = capsys.readouterr().out
    for name in ("transmil", "acmil", "dsmil", "clam_mb", "instance_max"):
        assert f"{name}:" in out
    _toy_classification(tmp_path, n_bags=8)
    rc = main(["train", "--bags", str(tmp_path / "bags"), "--labels", str(tmp_path / "labels.csv"), "--out",
               str(tmp_path / "o"), "--model", "dsmil", "--model-arg", "k_sample=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "accepted options" in err and "q_dim" in err
    rc = main(["train", "--bags", str(tmp_path / "bags"), "--labels", str(tmp_path / "labels.csv"), "--out",
               str(tmp_path / "o"), "--task", "survival"])
    assert rc == 2 and "time" in capsys.readouterr().err


def test_compare_runs(tmp_path, capsys):
    ds = _toy_classification(tmp_path, n_bags=12)
    for model in ("mean", "abmil"):
        train_dataset(ds, tmp_path / model, model=model, folds=2, epochs=1, model_kwargs={"hidden_dim": 8})
    assert main(["compare", str(tmp_path / "mean"), str(tmp_path / "abmil")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | model | task | mode | bags | auc | balanced_accuracy | accuracy | f1")
    assert "| mean | classification | cv | 12 |" in out[2] and "| abmil |" in out[3] and "±" in out[2]
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "metrics.json" in capsys.readouterr().err
