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
    # the two streams average probabilities: softmax([0, s]) = sigmoid(s) = (sigmoid(c_m) + sigmoid(c_b)) / 2
    p = torch.softmax(out["logits"], 0)[1]
    assert torch.isclose(p, 0.5 * (torch.sigmoid(lm[1]) + torch.sigmoid(lb[1])), atol=1e-6)
    assert not torch.isclose(out["logits"][1], 0.5 * (lm[1] + lb[1]))  # not the mean of the logits
    # query network: Linear-ReLU-Linear(128)-Tanh; attention = softmax of the scaled similarity
    kinds = [type(layer) for layer in net.q]
    assert kinds == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear, torch.nn.Tanh]
    assert net.q[0].out_features == net.q[2].in_features == net.q[2].out_features == 128
    q = net.q(x)
    expected = torch.softmax((q @ q[m]) / math.sqrt(q.shape[1]), 0)
    assert torch.allclose(out["attention"], expected, atol=1e-6)
    assert model_defaults("dsmil")["optimizer"] == "adam" and model_defaults("dsmil")["betas"] == (0.5, 0.9)


def test_dsmil_multiclass_one_bce_per_class():
    from pipeline.mil.tasks import ClassificationTask

    torch.manual_seed(8)
    net = create_model("dsmil", 8, 3).eval().requires_grad_(False)
    assert net.bag_loss == "bce"
    assert create_model("dsmil", 8, 2).bag_loss == "ce" and create_model("dsmil", 8, 3, task="survival").bag_loss == "ce"
    out = net(torch.randn(12, 8))
    (lm, _), (lb, _) = out["loss_logits"]
    p = 0.5 * (torch.sigmoid(lm) + torch.sigmoid(lb))
    assert torch.allclose(torch.sigmoid(out["logits"]), p, atol=1e-6)  # per-class probabilities averaged
    task = ClassificationTask([0, 1, 2], y=torch.tensor([2]).numpy())
    expected = torch.nn.functional.binary_cross_entropy_with_logits(lm[None], torch.tensor([[0.0, 0, 1]]))
    assert float(task.loss(lm[None], [0], bce=True)) == pytest.approx(float(expected), rel=1e-6)
    assert float(task.loss(lm[None], [0], bce=True)) != pytest.approx(float(task.loss(lm[None], [0])))


def test_acmil_masking_and_diversity():
    torch.manual_seed(5)
    net = create_model("acmil", 8, 2, n_masked=3, mask_ratio=0.99)  # all but none of the top 3: floor(2.97) = 2
    x = torch.randn(20, 8)
    net.eval()
    S = net.attn(net.embed(x)).T
    top = torch.topk(S, 3, dim=1).indices
    net.train()
    out = net(x)
    A = out["attention_branches"]
    assert A.shape == (5, 20)
    assert torch.all((A.gather(1, top) == 0).sum(1) == 2)
    assert torch.all((A == 0).sum(1) == 2)  # only top-3 instances are ever masked
    assert float(out["aux_loss"].detach()) <= 1.0 + 1e-6 and len(out["loss_logits"]) == 6
    net.eval()
    assert torch.all(net(x)["attention_branches"] > 0)  # no masking at inference


def test_acmil_paper_masking_hidden_size_and_recipe():
    torch.manual_seed(9)
    net = create_model("acmil", 384, 2).train()
    assert net.hidden_dim == 128 and net.embed[0].bias is None  # no bias, hidden from the feature size
    assert create_model("acmil", 512, 2).hidden_dim == 256 and create_model("acmil", 768, 2).hidden_dim == 384
    assert create_model("acmil", 1024, 2).hidden_dim == 512 and create_model("acmil", 512, 2, hidden_dim=64).hidden_dim == 64
    for n, masked in ((40, 6), (10, 6), (7, 4), (2, 1), (1, 0)):  # exactly floor(0.6 * min(10, N))
        assert net.masked_count(n)[1] == masked
        counts = set()
        for _ in range(5):
            A = net(torch.randn(n, 384))["attention_branches"]
            counts |= set((A == 0).sum(1).tolist())
        assert counts == {masked}, (n, counts)
    d = model_defaults("acmil")
    assert (d["optimizer"], d["lr"], d["weight_decay"], d["epochs"], d["select"]) == ("adamw", 1e-4, 1e-5, 100, "auc_f1")


def test_clam_binary_subtyping_and_smooth_svm():
    from pipeline.mil.clam import smooth_top1_svm

    torch.manual_seed(10)
    x = torch.randn(30, 10)
    plain = create_model("clam_sb", 10, 2, dropout=0.0).train()
    sub = create_model("clam_sb", 10, 2, dropout=0.0, subtyping=True).train()
    sub.load_state_dict(plain.state_dict())
    assert not plain.subtyping and sub.subtyping
    lp = plain(x, label=torch.tensor(1))["instance_loss"]
    ls = sub(x, label=torch.tensor(1))["instance_loss"]
    # binary subtyping adds the out-of-class term (top-k of the attention negative for class 0's classifier)
    h = sub.embed(x)
    a = torch.softmax(sub.attn(h).T, 1)[0]
    out_of_class = torch.nn.functional.cross_entropy(sub.instance_classifiers[0](h[torch.topk(a, 8).indices]),
                                                     torch.zeros(8, dtype=torch.long))
    assert float(ls) == pytest.approx((float(lp) + float(out_of_class)) / 2, rel=1e-5)
    # smooth top-1 SVM (Berrada et al. 2018): tau log sum exp((alpha [j != t] + s_j - s_t) / tau)
    s, t = torch.tensor([[2.0, 0.5], [0.1, 0.3]]), torch.tensor([0, 0])
    manual = torch.stack([torch.logsumexp(torch.tensor([0.0, 1 + 0.5 - 2.0]), 0),
                          torch.logsumexp(torch.tensor([0.0, 1 + 0.3 - 0.1]), 0)]).mean()
    assert float(smooth_top1_svm(s, t)) == pytest.approx(float(manual), rel=1e-6)
    hinge = torch.clamp(1 + s[:, 1] - s[:, 0], min=0).mean()
    assert float(smooth_top1_svm(s, t, tau=1e-3)) == pytest.approx(float(hinge), abs=1e-2)
    svm = create_model("clam_sb", 10, 2, inst_loss="svm").train()
    assert float(svm(x, label=torch.tensor(0))["instance_loss"]) > 0
    with pytest.raises(MILError, match="inst_loss"):
        create_model("clam_sb", 10, 2, inst_loss="hinge")
    d = model_defaults("clam_sb")
    assert (d["optimizer"], d["schedule"], d["epochs"], d["patience"], d["min_epochs"]) == ("adam", "constant", 200, 20, 50)


def test_transmil_class_token_and_recipe():
    torch.manual_seed(11)
    net = create_model("transmil", 8, 2)
    assert 0.8 < float(net.cls_token.std()) < 1.2  # torch.randn, as the authors initialise it
    d = model_defaults("transmil")
    assert (d["optimizer"], d["epochs"], d["patience"], d["batch_size"]) == ("radam_lookahead", 200, 10, 2)


def test_transmil_attention_is_the_one_applied():
    """Beyond the landmarks the class token attends through the Nyström approximation; the returned
    attention is that row (so AEM regularises what the model uses), not the exact softmax."""
    torch.manual_seed(12)
    att = NystromAttention(16, heads=1, num_landmarks=8, residual_conv_kernel=0, dropout=0.0).eval()
    for n in (6, 50):  # exact below the landmarks, Nyström above
        x = torch.randn(n, 16)
        out, row = att(x, cls_attention=True)
        v = att.to_qkv(x).chunk(3, dim=-1)[2]
        assert torch.allclose(att.to_out(row[None] @ v)[0], out[0], atol=1e-4)
    q, k, _ = att.to_qkv(x).chunk(3, dim=-1)
    exact = torch.softmax((q[:1] @ k.T) * att.scale, -1)[0]
    assert not torch.allclose(row, exact, atol=1e-3)
    net = create_model("transmil", 6, 2, dim=32, heads=4, num_landmarks=8)
    a = net(torch.randn(60, 6))["attention"]
    assert torch.all(a >= 0) and float(a.sum()) == pytest.approx(1.0, abs=1e-5)
    (a * a.clamp_min(1e-12).log()).sum().backward()
    assert net.layer2.attn.to_qkv.weight.grad.abs().sum() > 0


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
