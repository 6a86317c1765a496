"""Each model's paper training recipe (optimiser, schedule, epoch budget, checkpoint selection) as registry
data, the optimisers themselves (Adam with L2, Lookahead-RAdam), and the trainer honouring the recipe."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipeline.mil import RECIPE_KEYS, TRAIN_DEFAULTS, MILError, create_model, list_models, model_defaults
from pipeline.mil.benchmarks import memory_dataset
from pipeline.mil.optim import Lookahead, build_optimizer, epoch_lr
from pipeline.mil.train import fit, make_task, resolve_recipe, train_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def test_paper_recipes_are_registry_data():
    expected = {  # model: (optimizer, betas, lr, weight_decay, schedule, epochs, patience, min_epochs, select)
        "abmil": ("adam", (0.9, 0.999), 5e-4, 1e-4, "constant", None, None, None, None),
        "abmil_gated": ("adam", (0.9, 0.999), 5e-4, 1e-4, "constant", None, None, None, None),
        "clam_sb": ("adam", None, 2e-4, 1e-5, "constant", 200, 20, 50, None),
        "clam_mb": ("adam", None, 2e-4, 1e-5, "constant", 200, 20, 50, None),
        "dsmil": ("adam", (0.5, 0.9), 2e-4, 5e-3, "cosine", None, None, None, None),
        "transmil": ("radam_lookahead", None, 2e-4, 1e-5, "constant", 200, 10, None, None),
        "acmil": ("adamw", None, 1e-4, 1e-5, "cosine", 100, 0, None, "auc_f1"),
    }
    keys = ("optimizer", "betas", "lr", "weight_decay", "schedule", "epochs", "patience", "min_epochs", "select")
    for model, values in expected.items():
        d = model_defaults(model)
        assert set(d) == set(RECIPE_KEYS)
        assert tuple(d[k] for k in keys) == values, model
    for m in list_models():
        r = resolve_recipe(m)
        assert all(r[k] is not None for k in RECIPE_KEYS if k != "betas"), m
    # the user's value wins, the paper's fills in, the trainer's default where the paper has none
    r = resolve_recipe("clam_sb", lr=1e-3, patience=5)
    assert (r["lr"], r["patience"], r["min_epochs"], r["optimizer"]) == (1e-3, 5, 50, "adam")
    assert r["source"]["lr"] == "user" and r["source"]["min_epochs"] == "paper" and r["source"]["betas"] == "trainer"
    assert resolve_recipe("abmil")["epochs"] == TRAIN_DEFAULTS["epochs"]
    assert resolve_recipe("transmil")["batch_size"] == 2 and resolve_recipe("transmil", cox=True)["batch_size"] == 32


def test_adam_is_l2_and_adamw_decoupled():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    adam = build_optimizer([w], "adam", lr=0.1, weight_decay=0.5, betas=(0.5, 0.9))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.5, 0.9)
    # with a zero loss gradient, Adam's L2 term is the whole gradient: a full-size (lr) step
    w.grad = torch.zeros(1)
    adam.step()
    assert float(w.detach()) == pytest.approx(0.9, abs=1e-4)
    v = torch.nn.Parameter(torch.tensor([1.0]))
    adamw = build_optimizer([v], "adamw", lr=0.1, weight_decay=0.5)
    v.grad = torch.zeros(1)
    adamw.step()
    assert float(v.detach()) == pytest.approx(1 - 0.1 * 0.5, abs=1e-6)  # decoupled: w *= 1 - lr * wd
    with pytest.raises(MILError, match="unknown optimizer"):
        build_optimizer([v], "lion", 0.1, 0.0)


def test_lookahead_radam():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = build_optimizer(lin.parameters(), "radam_lookahead", lr=0.01, weight_decay=0.1)
    assert isinstance(opt, Lookahead) and isinstance(opt.inner, torch.optim.RAdam)
    assert (opt.k, opt.alpha) == (6, 0.5)
    wd = {p.ndim: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd == {2: 0.1, 1: 0.0}  # no decay on the bias
    assert all(g["decoupled_weight_decay"] for g in opt.inner.param_groups)
    # Lookahead arithmetic on plain SGD: after k fast steps the weights land halfway back to the start
    p = torch.nn.Parameter(torch.tensor([0.0]))
    la = Lookahead(torch.optim.SGD([p], lr=1.0), k=3, alpha=0.5)
    for step in range(1, 7):
        p.grad = torch.tensor([-1.0])  # each fast step adds 1
        la.step()
        if step == 2:
            assert float(p.detach()) == 2.0
        if step == 3:
            assert float(p.detach()) == 1.5  # slow 0 + 0.5 * (3 - 0)
    assert float(p.detach()) == pytest.approx(1.5 + 0.5 * 3)


def test_schedules():
    assert epoch_lr("constant", 1e-3, 7, 10) == 1e-3
    assert epoch_lr("cosine", 1e-3, 1, 10) == pytest.approx(1e-3)
    assert epoch_lr("cosine", 1e-3, 11, 10, min_lr=5e-6) == pytest.approx(5e-6)
    assert epoch_lr("cosine", 1e-3, 6, 10) == pytest.approx(5e-4)


def _toy(n=24, d=6, seed=0):
    rng = np.random.default_rng(seed)
    bags, y = [], []
    for i in range(n):
        x = rng.normal(size=(8, d))
        if i % 2:
            x[0] += 3.0
        bags.append(x)
        y.append(i % 2)
    return memory_dataset(bags, y)


def test_fit_honours_min_epochs_patience_zero_and_auc_f1_selection():
    ds = _toy()
    tr, va = np.arange(16), np.arange(16, 24)
    task = make_task(ds, tr)
    torch.manual_seed(0)
    net = create_model("mean", 6, 2, hidden_dim=4)
    info = fit(net, ds, tr, va, epochs=8, lr=1e-9, weight_decay=0.0, patience=1, seed=0, device=CPU, task=task,
               min_epochs=6, optimizer="adam", schedule="constant")
    assert info["epochs_run"] >= 6  # a model that cannot improve is not stopped before min_epochs
    net = create_model("mean", 6, 2, hidden_dim=4)
    info = fit(net, ds, tr, va, epochs=5, lr=1e-9, weight_decay=0.0, patience=0, seed=0, device=CPU, task=task)
    assert info["epochs_run"] == 5  # patience 0: no early stopping
    net = create_model("abmil", 6, 2, hidden_dim=8, attn_dim=4)
    info = fit(net, ds, tr, va, epochs=6, lr=1e-2, weight_decay=0.0, patience=0, seed=0, device=CPU, task=task,
               select="auc_f1")
    keys = [(h["val_auc_f1"], -h["val_loss"]) for h in info["history"]]  # ties go to the lower val loss
    assert info["best_epoch"] == keys.index(max(keys)) + 1 and info["best_val_auc_f1"] == max(keys)[0]


def test_cox_batches_without_an_event_take_no_step(caplog):
    ds = _toy(16)
    ds.task, ds.time = "survival", np.arange(1, 17, dtype=np.float64)
    ds.event = np.array([0] * 12 + [1] * 4)
    tr, va = np.arange(12), np.arange(12, 16)  # no event among the training bags
    task = make_task(ds, tr, survival_loss="cox")
    torch.manual_seed(0)
    net = create_model("abmil", 6, 1, task="survival", hidden_dim=8, attn_dim=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="pipeline.mil"):
        info = fit(net, ds, tr, va, epochs=2, lr=1e-2, weight_decay=0.1, patience=0, seed=0, device=CPU,
                   task=task, batch_size=4)
    assert info["skipped_batches"] == 6 and "without an observed event" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # not even weight decay


def test_run_records_the_recipe(tmp_path):
    ds = _toy()
    m = train_dataset(ds, tmp_path / "a", model="dsmil", folds=2, epochs=2)
    p = m["params"]
    assert (p["optimizer"], p["betas"], p["schedule"], p["min_lr"], p["lr"]) == ("adam", [0.5, 0.9], "cosine", 5e-6, 2e-4)
    assert p["recipe_source"]["epochs"] == "user" and p["recipe_source"]["optimizer"] == "paper"
    m = train_dataset(ds, tmp_path / "b", model="abmil", folds=2, epochs=2, aem=True,
                      model_kwargs={"hidden_dim": 8, "attn_dim": 4})
    assert m["params"]["aem_lambda"] == 0.1  # AEM on: the authors' default weight
    with pytest.raises(MILError, match="--optimizer"):
        train_dataset(ds, tmp_path / "c", optimizer="lion")
