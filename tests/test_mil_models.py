"""MIL model zoo: the shared interface of every registered model, and what each model's paper defines."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.mil import MILError, create_model, list_models, model_defaults, resolve_model_kwargs
from pipeline.mil.transmil import NystromAttention, moore_penrose_pinv

MODELS = ["mean", "max", "instance_max", "abmil", "abmil_gated", "clam_sb", "clam_mb", "transmil", "dsmil", "acmil",
          "hopfield", "mhim", "r2t", "mambamil", "scmil", "instance_cls", "otsurv"]
ATTENTION = {"abmil", "abmil_gated", "abmil_plain", "clam_sb", "clam_mb", "transmil", "dsmil", "acmil",
             "hopfield", "mhim", "r2t", "mambamil", "scmil", "otsurv"}
CLASSIFICATION_ONLY = {"scmil", "instance_cls"}
TASKS = [("classification", 2), ("classification", 3), ("survival", 4), ("survival", 1), ("regression", 1)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _call(net, x, label=None):
    return net(x, label=label) if getattr(net, "uses_label", False) else net(x)


def test_registry_lists_the_issue_models():
    assert set(MODELS) | {"abmil_plain"} <= set(list_models())
    for m in list_models():
        d = model_defaults(m)
        assert d["lr"] > 0 and d["weight_decay"] >= 0, m
        resolve_model_kwargs(m)  # every hyper-parameter has a default
    with pytest.raises(MILError, match="not a model hyper-parameter"):
        resolve_model_kwargs("abmil", task="survival")
    with pytest.raises(MILError, match="n_classes must be >= 2"):
        create_model("abmil", 8, 1)
    create_model("abmil", 8, 1, task="regression")


def test_abmil_names():
    plain, gated, alias = (create_model(n, 16, 2) for n in ("abmil", "abmil_gated", "abmil_plain"))
    assert plain.attn_u is None and alias.attn_u is None and gated.attn_u is not None
    assert resolve_model_kwargs("abmil") == {"hidden_dim": 500, "attn_dim": 128, "dropout": 0.0}  # Ilse et al.


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task,n_out", TASKS)
def test_interface(model, task, n_out):
    torch.manual_seed(0)
    if model in CLASSIFICATION_ONLY and task != "classification":
        with pytest.raises(MILError, match="classification"):
            create_model(model, 12, n_out, task=task)
        return
    net = create_model(model, 12, n_out, task=task)
    label = torch.tensor(1) if task == "classification" else None
    for n in (0, 1, 3, 40):
        x = torch.randn(n, 12)
        net.train()
        out = _call(net, x, label)
        assert out["logits"].shape == (n_out,)
        a = out.get("attention")
        a = None if a is None else a.detach()
        assert (a is not None) == (model in ATTENTION)
        if a is not None:
            assert a.shape == (n,)
            if n:
                assert float(a.sum()) == pytest.approx(1.0, abs=1e-4) and float(a.min()) >= 0
        il = out.get("instance_logits")
        if il is not None:
            assert il.shape == (n, n_out)
        assert a is not None or il is not None  # something to draw a heatmap with
        if n:
            loss = out["logits"].float().sum()
            for lg, w in out.get("loss_logits") or []:
                loss = loss + w * lg.sum()
            if out.get("aux_loss") is not None:
                loss = loss + out["aux_loss"]
            loss.backward()
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
            net.zero_grad()
        net.eval()
        with torch.inference_mode():
            o1, o2 = net(x), net(x)
        assert torch.isfinite(o1["logits"]).all()
        assert torch.equal(o1["logits"], o2["logits"])  # no randomness at inference (dropout, masking)
    with pytest.raises(ValueError, match="expects features of shape"):
        net(torch.randn(3, 5))


def test_instance_max_respects_the_standard_mil_assumption():
    """Adding an instance can never lower the positive score; a bag is as positive as its best instance."""
    torch.manual_seed(1)
    net = create_model("instance_max", 6, 2).eval()
    with torch.inference_mode():
        for _ in range(20):
            bag = torch.randn(int(torch.randint(1, 20, ())), 6)
            extra = torch.randn(1, 6) * 5
            s = net(bag)["logits"]
            s2 = net(torch.cat([bag, extra]))["logits"]
            assert s[0] == 0 and s2[0] == 0  # class 0 is the constant "nothing present" reference
            assert s2[1] >= s[1]
            inst = net(bag)["instance_logits"]
            assert torch.isclose(inst[:, 1].max(), s[1])
        # empty bag = negative
        assert net(torch.zeros(0, 6))["logits"][1] < -10
    assert resolve_model_kwargs("instance_max") == {"hidden_dims": (256, 128, 64), "dropout": 0.5}  # mi-Net


def test_pooling_instance_scores_decompose_the_bag_logits():
    torch.manual_seed(2)
    x = torch.randn(9, 7)
    for pool in ("mean", "max"):
        net = create_model(pool, 7, 3).eval()
        out = net(x)
        inst = out["instance_logits"]
        bias = net.classifier.bias
        total = inst.mean(0) if pool == "mean" else inst.sum(0) + bias
        assert torch.allclose(total, out["logits"], atol=1e-5)


def test_clam_instance_clustering_loss():
    torch.manual_seed(3)
    net = create_model("clam_sb", 10, 2).train()
    x = torch.randn(30, 10)
    out = net(x, label=torch.tensor(1))
    assert out["aux_loss"] is not None and float(out["instance_loss"]) > 0
    assert out["loss_logits"][0][1] == pytest.approx(0.7)
    assert float(out["aux_loss"].detach()) == pytest.approx(0.3 * float(out["instance_loss"]), rel=1e-5)
    assert "aux_loss" not in net(x)  # no label, no instance loss
    assert "aux_loss" not in net(torch.randn(1, 10), label=torch.tensor(1))  # k = N // 2 = 0
    mb = create_model("clam_mb", 10, 3)
    assert mb.subtyping and len(mb.classifiers) == 3
    assert mb(x, label=torch.tensor(2))["attention_branches"].shape == (3, 30)
    assert resolve_model_kwargs("clam_sb")["k_sample"] == 8 and resolve_model_kwargs("clam_sb")["bag_weight"] == 0.7
    assert create_model("clam_sb", 10, 2, task="survival")(x, label=torch.tensor(1)).get("aux_loss") is None


def test_dsmil_critical_instance_and_two_streams():
    torch.manual_seed(4)
    net = create_model("dsmil", 8, 2).eval()
    x = torch.randn(15, 8)
    out = net(x)
    c = net.instance_classifier(x)[:, 0]
    m = int(c.argmax())
    (lm, wm), (lb, wb) = out["loss_logits"]
    assert wm == wb == 0.5
    assert torch.isclose(lm[1], c[m]) and lm[0] == 0
    assert torch.allclose(out["logits"], 0.5 * (lm + lb))
    # attention = softmax over instances of the scaled query similarity to the critical instance
    q = net.q(x)
    expected = torch.softmax((q @ q[m]) / math.sqrt(q.shape[1]), 0)
    assert torch.allclose(out["attention"], expected, atol=1e-6)


def test_acmil_masking_and_diversity():
    torch.manual_seed(5)
    net = create_model("acmil", 8, 2, n_masked=3, mask_prob=1.0)
    x = torch.randn(20, 8)
    net.eval()
    S = net.attn(net.embed(x)).T
    top = torch.topk(S, 3, dim=1).indices
    net.train()
    net.embed[2].p = 0.0
    out = net(x)
    A = out["attention_branches"]
    assert A.shape == (5, 20)
    assert torch.all(A.gather(1, top) == 0)  # with mask_prob 1 every branch's top-3 are masked
    assert float(out["aux_loss"].detach()) <= 1.0 + 1e-6 and len(out["loss_logits"]) == 6
    net.eval()
    assert torch.all(net(x)["attention_branches"] > 0)  # no masking at inference


def test_nystrom_attention_approximates_softmax_attention():
    torch.manual_seed(6)
    a = torch.softmax(torch.randn(2, 12, 12), -1)
    assert torch.allclose(moore_penrose_pinv(a, 30), torch.linalg.pinv(a), atol=1e-3)
    att = NystromAttention(32, heads=4, num_landmarks=32, residual_conv_kernel=0, dropout=0.0)
    att = att.eval().requires_grad_(False)
    x = torch.randn(700, 32) * 0.3
    approx = att(x)
    att.m = 10 ** 9  # exact softmax attention
    exact = att(x)
    assert float((approx - exact).norm() / exact.norm()) < 0.05


def test_transmil_square_padding_and_cls_attention():
    torch.manual_seed(7)
    net = create_model("transmil", 6, 2, dim=32, heads=4, num_landmarks=8).eval()
    for n in (1, 2, 5, 17, 50):
        with torch.inference_mode():
            out = net(torch.randn(n, 6))
        assert out["attention"].shape == (n,) and float(out["attention"].sum()) == pytest.approx(1.0, abs=1e-5)


def test_model_kwargs_round_trip_through_json():
    import json

    for m in MODELS:
        kw = json.loads(json.dumps(resolve_model_kwargs(m)))
        a = create_model(m, 5, 2, **kw)
        b = create_model(m, 5, 2)
        assert a.state_dict().keys() == b.state_dict().keys()
