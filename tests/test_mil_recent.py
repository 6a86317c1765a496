"""The recent MIL methods (issue 12): each one's defining mechanism, the trainer hooks they use, the
WeakSTIL-style bounded regression, and the synthetic survival task.

* MambaMIL: the chunked selective scan equals the step-by-step recurrence (values and gradients), and the
  SR-Mamba reordering;
* MHIM-MIL: the teacher's top ``floor(ratio · N)`` instances are masked, exactly; EMA teacher; class-aware
  scores; global recycle network;
* R²T: regions follow the patch coordinates (not the bag order), attention stays within regions;
* OTSurv: the transport plan satisfies its marginal constraints; the transported mass rises with training;
* SC-MIL: the contrastive weight moves step by step as specified; the supervised contrastive loss;
* Hopfield pooling: ``softmax(β ξ Kᵀ)`` with the paper's ``β = 1/√d_k``;
* ``instance_cls``: pseudo-labels, prototypes, queue, the bag = max-instance rule;
* the trainer calls ``set_progress``/``batch_loss``/``after_step`` and passes ``coords``;
* every survival-capable new method reaches a C-index clearly above 0.5 on the synthetic survival task.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.mil import MILError, call_model, create_model, model_defaults
from pipeline.mil.benchmarks import grid_coords, memory_dataset, run_survival, survival_bags
from pipeline.mil.mambamil import SRMamba, reorder_index, selective_scan, selective_scan_reference
from pipeline.mil.otsurv import long_tail_prior, uot_plan
from pipeline.mil.r2t import region_ids
from pipeline.mil.scmil import sc_weight, supcon_loss
from pipeline.mil.train import fit, make_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------ MambaMIL

@pytest.mark.parametrize("L,chunk", [(1, 4), (37, 8), (64, 16), (50, 64)])
def test_selective_scan_equals_the_step_by_step_recurrence(L, chunk):
    torch.manual_seed(L)
    d, n = 5, 3
    u = torch.randn(L, d, dtype=torch.float64, requires_grad=True)
    delta = (torch.rand(L, d, dtype=torch.float64) * 0.8).requires_grad_()
    A = (-torch.rand(d, n, dtype=torch.float64) * 4).requires_grad_()
    B = torch.randn(L, n, dtype=torch.float64, requires_grad=True)
    C = torch.randn(L, n, dtype=torch.float64, requires_grad=True)
    D = torch.randn(d, dtype=torch.float64, requires_grad=True)
    y = selective_scan(u, delta, A, B, C, D, chunk=chunk)
    ref = selective_scan_reference(u, delta, A, B, C, D)
    assert torch.allclose(y, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn(L, d, dtype=torch.float64)
    ins = [u, delta, A, B, C, D]
    ga = torch.autograd.grad((y * g).sum(), ins)
    gb = torch.autograd.grad((ref * g).sum(), ins)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)
    # the recurrence itself, by hand for the first two steps
    with torch.no_grad():
        h = torch.zeros(d, n, dtype=torch.float64)
        for t in range(min(L, 2)):
            h = torch.exp(delta[t, :, None] * A) * h + delta[t, :, None] * u[t, :, None] * B[t][None]
            assert torch.allclose(y[t], h @ C[t] + D * u[t])


def test_selective_scan_float32_long_sequence():
    torch.manual_seed(0)
    L, d, n = 300, 8, 4
    u, delta = torch.randn(L, d), torch.rand(L, d) * 0.2
    A, B, C, D = -torch.rand(d, n) * 8, torch.randn(L, n), torch.randn(L, n), torch.randn(d)
    y = selective_scan(u, delta, A, B, C, D, chunk=16)
    ref = selective_scan_reference(*(t.double() for t in (u, delta, A, B, C, D)))
    assert y.dtype == torch.float32 and torch.allclose(y.double(), ref, atol=1e-4)


def test_sr_mamba_reordering():
    idx = reorder_index(10, 3)
    assert idx.tolist() == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]  # instances R apart become neighbours
    assert sorted(reorder_index(101, 10).tolist()) == list(range(101))
    assert reorder_index(5, 1).tolist() == list(range(5))
    # the block = forward branch + reordered branch put back in place (checked against the reference scan)
    torch.manual_seed(0)
    blk = SRMamba(8, d_state=4, expand=2, rate=3).double()
    h = torch.randn(11, 8, dtype=torch.float64)
    with torch.no_grad():
        x, z = blk.in_proj(h).chunk(2, dim=-1)

        def branch(b, xx):
            L = xx.shape[0]
            xx = torch.nn.functional.silu(b.conv(xx.T[None])[0, :, :L].T)
            dt, Bm, Cm = torch.split(b.x_proj(xx), [b.dt_rank, b.d_state, b.d_state], dim=-1)
            return selective_scan_reference(xx, torch.nn.functional.softplus(b.dt_proj(dt)), -torch.exp(b.A_log),
                                            Bm, Cm, b.D)

        order = reorder_index(11, 3)
        yr = torch.empty(11, blk.d_inner, dtype=torch.float64)
        yr[order] = branch(blk.reordered, x[order])
        expected = blk.out_proj((branch(blk.fwd, x) + yr) * torch.nn.functional.silu(z))
        assert torch.allclose(blk(h), expected, atol=1e-10)
    assert model_defaults("mambamil")["lr"] == 2e-4
    net = create_model("mambamil", 6, 2)
    assert len(net.blocks) == 2 and net.blocks[0].rate == 10 and net.blocks[0].fwd.d_state == 16


# ------------------------------------------------------------------------------------------ MHIM-MIL

def test_mhim_masks_exactly_the_configured_share_of_the_teachers_top_instances():
    torch.manual_seed(0)
    net = create_model("mhim", 6, 2, base="abmil", base_kwargs={"hidden_dim": 16, "attn_dim": 8},
                       mask_ratio_high=0.05, mask_ratio_random=0.3)
    net.train()
    for n in (7, 19, 40, 200):
        x = torch.randn(n, 6)
        with torch.no_grad():
            a_t = net.teacher(x)["attention"]
        out = net(x)
        n_high = math.floor(0.05 * n)
        top = set(torch.argsort(a_t, descending=True)[:n_high].tolist())
        assert set(out["masked_high"].tolist()) == top and len(top) == n_high
        n_rand = math.floor(0.3 * (n - n_high))
        assert len(out["masked_random"]) == n_rand and not (set(out["masked_random"].tolist()) & top)
        kept = n - n_high - n_rand
        a = out["attention"]
        a = a.detach()
        assert a.shape == (n,) and int((a > 0).sum()) == kept and float(a.sum()) == pytest.approx(1.0)
        assert float(a[out["masked_high"]].abs().sum()) == 0.0
        assert out["aux_loss"] is not None and out["consistency_loss"] >= 0
    # low-attention masking takes the bottom of the teacher's ranking
    net2 = create_model("mhim", 6, 2, base="abmil", base_kwargs={"hidden_dim": 16, "attn_dim": 8},
                        mask_ratio_high=0.1, mask_ratio_random=0.0, mask_ratio_low=0.2)
    scores = torch.arange(50, dtype=torch.float32)
    kept, high, low, rand = net2.masks(scores)
    assert sorted(high.tolist()) == list(range(45, 50)) and sorted(low.tolist()) == list(range(0, 10))
    assert len(rand) == 0 and sorted(kept.tolist()) == list(range(10, 45))
    # inference: no masking, the student sees every instance
    net.eval()
    x = torch.randn(30, 6)
    with torch.no_grad():
        assert torch.equal(net(x)["logits"], net.student(x)["logits"])


def test_mhim_ema_teacher_class_aware_and_recycle_network():
    torch.manual_seed(1)
    net = create_model("mhim", 6, 2, base="abmil", base_kwargs={"hidden_dim": 16, "attn_dim": 8}, momentum=0.9)
    assert all(not p.requires_grad for p in net.teacher.parameters())
    t0 = [p.detach().clone() for p in net.teacher.parameters()]
    with torch.no_grad():
        for p in net.student.parameters():
            p.add_(1.0)
    net.after_step()
    for before, pt, ps in zip(t0, net.teacher.parameters(), net.student.parameters()):
        assert torch.allclose(pt, 0.9 * before + 0.1 * ps)
    assert create_model("mhim", 6, 2).momentum == 0.9999  # the paper's EMA momentum
    with pytest.raises(ValueError, match="attention model"):
        create_model("mhim", 6, 2, base="mean")
    with pytest.raises(ValueError, match="instance_logits"):
        create_model("mhim", 6, 2, base="abmil", class_aware=True)
    ca = create_model("mhim", 6, 2, base="clam_sb", base_kwargs={"hidden_dim": 16, "attn_dim": 8},
                      class_aware=True, mask_ratio_high=0.1, mask_ratio_random=0.0)
    assert ca.uses_label
    ca.train()
    x = torch.randn(40, 6)
    with torch.no_grad():
        t = ca.teacher(x)
    expected = t["attention"] * torch.softmax(t["instance_logits"], dim=-1)[:, 1]
    assert torch.allclose(ca.scores(t, 1), expected)
    out = ca(x, label=torch.tensor(1))
    assert set(out["masked_high"].tolist()) == set(torch.argsort(expected, descending=True)[:4].tolist())
    grn = create_model("mhim", 6, 2, base="abmil", base_kwargs={"hidden_dim": 16, "attn_dim": 8},
                       mask_ratio_high=0.1, mask_ratio_random=0.5, recycle_tokens=3)
    grn.train()
    seen = {}
    grn.student.register_forward_hook(lambda m, args, out: seen.update(n=args[0].shape[0]))
    out = grn(torch.randn(40, 6))
    assert seen["n"] == 40 - 4 - 18 + 3  # kept instances + 3 recycled tokens
    out["aux_loss"].backward()
    assert grn.grn.queries.grad is None or torch.isfinite(grn.grn.queries.grad).all()


# ------------------------------------------------------------------------------------------ R²T

def test_r2t_regions_follow_the_coords():
    rng = np.random.default_rng(0)
    step = 224
    cells = [(gx, gy) for gx in range(16) for gy in range(8)]  # a 16 x 8 patch grid
    coords = torch.tensor([(gx * step + 1000, gy * step + 500) for gx, gy in cells], dtype=torch.float32)
    rid = region_ids(coords, len(cells), region_num=2)
    quadrant = torch.tensor([(gx // 8) + 2 * (gy // 4) for gx, gy in cells])
    # same region <=> same quadrant of the grid (8 x 4 cells each)
    assert torch.equal(rid[:, None] == rid[None, :], quadrant[:, None] == quadrant[None, :])
    # the bag order does not matter: regions move with the patches
    perm = torch.as_tensor(rng.permutation(len(cells)))
    rid_p = region_ids(coords[perm], len(cells), region_num=2)
    assert torch.equal(rid_p[:, None] == rid_p[None, :], rid[perm][:, None] == rid[perm][None, :])
    # a missing tissue hole leaves the other patches' regions alone
    keep = torch.tensor([i for i, (gx, gy) in enumerate(cells) if not (gx < 8 and gy < 4)])
    rk = region_ids(coords[keep], len(keep), region_num=2)
    assert torch.equal(rk[:, None] == rk[None, :], quadrant[keep][:, None] == quadrant[keep][None, :])
    # no (or degenerate) coordinates: the paper's square layout of the sequence
    r0 = region_ids(None, 16, region_num=2)
    assert r0.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert torch.equal(region_ids(torch.zeros(16, 2), 16, region_num=2), r0)


def test_r2t_regional_attention_stays_within_regions():
    torch.manual_seed(0)
    net = create_model("r2t", 6, 2, base="abmil", dim=16, heads=2, region_num=2, epeg_k=3, dropout=0.0,
                       base_kwargs={"hidden_dim": 8, "attn_dim": 4}).eval()
    coords = torch.tensor([(x * 100, y * 100) for x in range(4) for y in range(4)], dtype=torch.float32)
    rid = region_ids(coords, 16, 2)
    x = torch.randn(16, 6)
    x2 = x.clone()
    x2[0] += 5.0  # change one instance of region rid[0]
    with torch.no_grad():
        h1, h2 = net.proj(x), net.proj(x2)
        o1, o2 = net.rmsa(net.norm1(h1), rid), net.rmsa(net.norm1(h2), rid)
        other = rid != rid[0]
        assert torch.allclose(o1[other], o2[other]) and not torch.allclose(o1[~other], o2[~other])
        # the cross-region step does mix regions
        c1, c2 = net.crmsa(net.norm2(h1), rid), net.crmsa(net.norm2(h2), rid)
        assert not torch.allclose(c1[other], c2[other])
        # the coordinates are used: the same bag with other coordinates gives another prediction
        out = call_model(net, x, coords=coords)
        shuffled = coords[torch.randperm(16, generator=torch.Generator().manual_seed(3))]
        assert not torch.allclose(out["logits"], call_model(net, x, coords=shuffled)["logits"])
    assert net.uses_coords and out["attention"].shape == (16,)


# ------------------------------------------------------------------------------------------ OTSurv

@pytest.mark.parametrize("rho", [0.3, 0.7, 1.0])
def test_ot_plan_satisfies_the_marginal_constraints(rho):
    torch.manual_seed(0)
    n, k = 50, 6
    cost = torch.rand(n, k) * 2
    b = long_tail_prior(k, 1.0)
    assert torch.allclose(b, (1.0 / torch.arange(1, k + 1)) / (1.0 / torch.arange(1, k + 1)).sum())
    Q = uot_plan(cost, rho, b, epsilon=0.1, lam=math.inf, n_iter=500)
    assert (Q >= 0).all()
    assert torch.allclose(Q.sum(1), torch.full((n,), 1.0 / n), atol=1e-6)  # each patch sends exactly its mass
    assert Q[:, :k].sum(1).max() <= 1.0 / n + 1e-6  # ... of which at most all to the prototypes
    assert float(Q[:, :k].sum()) == pytest.approx(rho, abs=1e-4)  # total transported mass
    assert float(Q[:, k].sum()) == pytest.approx(1 - rho, abs=1e-4)  # the rest stays in the sink
    assert torch.allclose(Q[:, :k].sum(0), rho * b, atol=1e-4)  # long-tail prior (hard)
    # soft prior (KL, lam = 1): masses and the patch marginal still hold; the prior only pulls
    Qs = uot_plan(cost, rho, b, epsilon=0.1, lam=1.0, n_iter=500)
    assert torch.allclose(Qs.sum(1), torch.full((n,), 1.0 / n), atol=1e-6)
    assert float(Qs[:, k].sum()) == pytest.approx(1 - rho, abs=1e-4)
    assert float(Qs[:, :k].sum()) == pytest.approx(rho, abs=1e-4)
    # the stronger the KL weight, the closer the prototype marginal to the long-tail prior
    dist = [float((uot_plan(cost, rho, b, 0.1, lam, 500)[:, :k].sum(0) - rho * b).abs().sum())
            for lam in (0.01, 0.1, 1.0, 10.0, math.inf)]
    assert all(d1 > d2 for d1, d2 in zip(dist, dist[1:])) and dist[-1] < 1e-4


def test_otsurv_transported_mass_rises_over_training():
    torch.manual_seed(0)
    net = create_model("otsurv", 6, 4, task="survival", hidden_dim=16, n_prototypes=4)
    x = torch.randn(30, 6)
    masses = []
    for step in (0, 50, 100):
        net.set_progress(step, 100)
        with torch.no_grad():
            Q = net.plan(net.embed(x))
        masses.append(float(Q[:, :4].sum()))
    assert masses == pytest.approx([0.5, 0.7, 0.9], abs=1e-3)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert float(out["attention"].sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(out["attention"], out["transport_plan"].sum(1) / out["transport_plan"].sum(), atol=1e-6)
    assert "rho" in dict(net.named_buffers())  # inference uses the last training value


# ------------------------------------------------------------------------------------------ SC-MIL

def test_scmil_weight_schedule_moves_as_specified(tmp_path):
    assert [sc_weight(t) for t in (0, 0.5, 1)] == [1.0, 0.75, 0.0]
    assert [sc_weight(t, "linear") for t in (0, 0.25, 1)] == [1.0, 0.75, 0.0]
    assert sc_weight(0.5, "cosine") == pytest.approx(0.5) and sc_weight(0.3, "constant", 0.4) == 0.4
    assert model_defaults("scmil")["batch_size"] == 16
    # through the trainer: one weight per optimiser step, alpha = 1 - (step / total)^2
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(int(rng.integers(5, 15)), 4)).astype(np.float32) for _ in range(12)]
    ds = memory_dataset(bags, [i % 2 for i in range(12)])
    net = create_model("scmil", 4, 2, hidden_dim=8, attn_dim=4, proj_dim=4)
    seen, terms = [], []
    orig_set, orig_batch = net.set_progress, net.batch_loss
    net.set_progress = lambda s, t: (seen.append((s, t)), orig_set(s, t))[1]

    def spy(outs, labels):
        w = net.alpha
        assert all(o["loss_logits"][0][1] == pytest.approx(1 - w) for o in outs)  # CE weight 1 - alpha
        terms.append((w, len(outs), labels.tolist()))
        return orig_batch(outs, labels)

    net.batch_loss = spy
    fit(net, ds, np.arange(10), np.arange(10, 12), epochs=3, lr=1e-3, weight_decay=0.0, patience=5, seed=0,
        device=torch.device("cpu"), task=make_task(ds, np.arange(10)), batch_size=4)
    assert seen == [(s, 9) for s in range(9)]  # 3 epochs x ceil(10 / 4) steps
    assert [w for w, _, _ in terms] == pytest.approx([1 - (s / 9) ** 2 for s in range(9)])
    assert [b for _, b, _ in terms] == [4, 4, 2] * 3


def test_supervised_contrastive_loss_matches_its_formula():
    torch.manual_seed(0)
    p = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    y = torch.tensor([0, 1, 0, 1, 1, 2])
    tau = 0.1
    total, anchors = 0.0, 0
    for i in range(6):
        pos = [j for j in range(6) if j != i and y[j] == y[i]]
        if not pos:
            continue
        den = sum(math.exp(float(p[i] @ p[a]) / tau) for a in range(6) if a != i)
        total += -sum(math.log(math.exp(float(p[i] @ p[j]) / tau) / den) for j in pos) / len(pos)
        anchors += 1
    assert float(supcon_loss(p, y, tau)) == pytest.approx(total / anchors, rel=1e-5)
    assert supcon_loss(p[:1], y[:1]) is None and supcon_loss(p[:2], torch.tensor([0, 1])) is None
    with pytest.raises(MILError, match="classification"):
        create_model("scmil", 4, 1, task="regression")


# ------------------------------------------------------------------------------------------ Hopfield

def test_hopfield_pooling_is_softmax_of_beta_q_k():
    torch.manual_seed(0)
    net = create_model("hopfield", 5, 2, hidden_dim=16, heads=2).eval()
    assert net.beta == pytest.approx(1 / math.sqrt(8))  # the paper's default 1/sqrt(d_k)
    x = torch.randn(9, 5)
    with torch.no_grad():
        out = net(x)
        k = net.w_k(net.norm(net.embed(x))).view(9, 2, 8)
        for h in range(2):
            a = torch.softmax(net.beta * k[:, h] @ net.query[h], dim=0)
            assert torch.allclose(out["attention_branches"][h], a, atol=1e-6)
        big = create_model("hopfield", 5, 2, hidden_dim=16, heads=2, beta=50.0).eval()
        big.load_state_dict(net.state_dict())
        # a large beta retrieves (nearly) a single stored pattern per head
        assert float(big(x)["attention_branches"].max(dim=1).values.min()) > 0.9
        two = create_model("hopfield", 5, 2, hidden_dim=16, heads=2, update_steps=2).eval()
        two.load_state_dict(net.state_dict())
        assert not torch.allclose(two(x)["attention"], out["attention"])


# ------------------------------------------------------------------------------------------ instance_cls

def test_instance_classifier_pseudo_labels_prototypes_and_bag_rule():
    torch.manual_seed(0)
    net = create_model("instance_cls", 4, 2, hidden_dim=16, feat_dim=8, proj_dim=4, queue_size=64, sample=20)
    net.train()
    net.set_progress(0, 100)  # warm-up
    neg = torch.randn(15, 4)
    pos = torch.randn(12, 4)
    pos[:3] += 4
    out = net(neg, label=torch.tensor(0))
    assert out["pseudo_positive_share"] == 0  # a negative bag: all true negatives
    assert bool(net.proto_ready[0]) and int(net.queue_ptr) == 15
    out = net(pos, label=torch.tensor(1))
    assert out["pseudo_positive_share"] == 1  # warm-up: every instance takes the bag label
    net.set_progress(50, 100)
    q = torch.nn.functional.normalize(torch.randn(12, 4), dim=1)
    pl = net.pseudo_labels(q, torch.arange(12.0), 1, warm=False)
    expected = (q @ net.prototypes[1]) > (q @ net.prototypes[0])
    expected[11] = True  # the top-scoring instance of a positive bag is positive
    assert torch.equal(pl == 1, expected)
    assert int(net.queue_ptr) == 27 and int((net.queue_labels >= 0).sum()) == 27
    net.eval()
    with torch.no_grad():
        o = net(pos)
        inst = o["instance_logits"]
        assert torch.isclose(o["logits"][1], (inst[:, 1] - inst[:, 0]).max()) and o["logits"][0] == 0
        more = net(torch.cat([pos, torch.randn(1, 4) * 3]))
        assert more["logits"][1] >= o["logits"][1]  # adding an instance never lowers the bag score
    with pytest.raises(MILError, match="classification"):
        create_model("instance_cls", 4, 4, task="survival")


# ------------------------------------------------------------------------------------------ trainer hooks

class _HookModel(torch.nn.Module):
    uses_coords = True

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.calls = {"progress": [], "batch": [], "after": 0, "coords": []}

    def set_progress(self, step, total):
        self.calls["progress"].append((step, total))

    def batch_loss(self, outs, labels):
        self.calls["batch"].append(labels.tolist())
        return outs[0]["logits"].sum() * 0.0

    def after_step(self):
        self.calls["after"] += 1

    def forward(self, x, coords=None):
        self.calls["coords"].append(None if coords is None else coords.clone())
        return {"logits": self.lin(x).mean(0), "attention": None, "instance_logits": self.lin(x)}


def test_trainer_calls_the_model_hooks_and_passes_coords():
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 3)).astype(np.float32) for n in (5, 9, 7, 6, 8)]
    ds = memory_dataset(bags, [0, 1, 0, 1, 0])
    ds.coords = [grid_coords(len(b), 100) for b in bags]
    net = _HookModel()
    fit(net, ds, [0, 1, 2, 3], [4], epochs=2, lr=1e-2, weight_decay=0.0, patience=5, seed=0,
        device=torch.device("cpu"), task=make_task(ds, [0, 1, 2, 3]), batch_size=3, max_instances=6)
    assert net.calls["progress"] == [(s, 4) for s in range(4)] and net.calls["after"] == 4
    assert [sorted(b) for b in net.calls["batch"][:2]] in ([[0, 0, 1], [1]], [[0, 1, 1], [0]])
    # training forwards: coords of the same (capped) subset; evaluation: all of the bag's coords
    train_c = net.calls["coords"][:3]
    assert all(c is not None and c.shape[1] == 2 and c.shape[0] <= 6 for c in train_c)
    full = {len(b): torch.as_tensor(grid_coords(len(b), 100), dtype=torch.float32) for b in bags}
    assert torch.equal(net.calls["coords"][-1], full[8])  # the validation bag (index 4, 8 patches)
    for c in train_c:  # subsets of the real grid positions
        assert set(map(tuple, c.tolist())) <= set(map(tuple, full[9].tolist()))


# ------------------------------------------------------------------------------------------ regression

def test_bounded_regression_r2_and_threshold_auc(tmp_path):
    from pipeline.mil.__main__ import main
    from pipeline.store import write_bag

    rng = np.random.default_rng(4)
    ids, target = [], []
    for i in range(40):
        n = int(rng.integers(10, 30))
        f = rng.uniform(0, 1)
        x = rng.normal(size=(n, 6))
        x[rng.random(n) < f] += np.eye(6)[0] * 3
        sid = f"s{i:03d}"
        coords = np.stack([np.arange(n) * 100, np.zeros(n)], axis=1).astype(np.int32)
        write_bag(tmp_path / "bags" / f"{sid}.zarr", x.astype(np.float16), coords,
                  dict(slide_id=sid, model="toy", weights="random", target_mpp=0.5, patch_size_px=224,
                       level0_mpp=0.25, mpp_source="test", pipeline_version="0.1.0"))
        ids.append(sid)
        target.append(round(100 * f, 3))  # a percentage, like a TIL score
    pd.DataFrame({"slide_id": ids, "label": target}).to_csv(tmp_path / "labels.csv", index=False)
    base = ["-q", "train", "--bags", str(tmp_path / "bags"), "--labels", str(tmp_path / "labels.csv"),
            "--model", "mean", "--folds", "3", "--epochs", "30", "--patience", "30", "--lr", "3e-3",
            "--model-arg", "hidden_dim=32"]
    assert main(base + ["--out", str(tmp_path / "run"), "--regression-bounds", "0", "100",
                        "--regression-threshold", "50"]) == 0
    m = json.loads((tmp_path / "run/metrics.json").read_text())
    assert m["params"]["regression_bounds"] == [0.0, 100.0] and m["params"]["regression_threshold"] == 50.0
    assert set(m["mean"]) >= {"mse", "mae", "pearson_r", "r2", "auc"}
    assert m["mean"]["r2"] > 0.5 and m["mean"]["auc"] > 0.85, m["folds"]
    oof = pd.read_csv(tmp_path / "run/predictions.csv")
    assert oof["pred"].between(0, 100).all()
    y, p = oof["label"].to_numpy(), oof["pred"].to_numpy()
    r2 = 1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert np.mean([f["r2"] for f in m["folds"]]) == pytest.approx(m["mean"]["r2"]) and r2 > 0.5
    assert main(["-q", "predict", "--model-dir", str(tmp_path / "run"), "--bags", str(tmp_path / "bags"),
                 "--out", str(tmp_path / "p.csv"), "--attention-dir", str(tmp_path / "att")]) == 0
    assert pd.read_csv(tmp_path / "p.csv")["pred"].between(0, 100).all()
    assert pd.read_csv(tmp_path / "att/s000.csv")["score"].between(0, 100).all()  # patch-alone predictions
    # targets outside the bounds are refused, naming them
    pd.DataFrame({"slide_id": ids, "label": [t + 60 for t in target]}).to_csv(tmp_path / "bad.csv", index=False)
    bad = [a if a != str(tmp_path / "labels.csv") else str(tmp_path / "bad.csv") for a in base]
    assert main(bad + ["--out", str(tmp_path / "run2"), "--regression-bounds", "0", "100"]) == 2
    assert main(base + ["--out", str(tmp_path / "run3"), "--regression-bounds", "5", "1"]) == 2


# ------------------------------------------------------------------------------------------ survival

SURVIVAL_SMALL = {
    "hopfield": {"hidden_dim": 32, "heads": 4},
    "mhim": {"base_kwargs": {"hidden_dim": 32, "attn_dim": 16}},
    "r2t": {"dim": 32, "heads": 2, "base_kwargs": {"hidden_dim": 32, "attn_dim": 16}},
    "mambamil": {"hidden_dim": 32, "d_state": 8, "layers": 1},
    "otsurv": {"hidden_dim": 32, "n_prototypes": 8},
}


def test_synthetic_survival_task():
    b, t, e, lh = survival_bags(300, seed=0)
    present = np.array([lh_i >= 2.0 for lh_i in lh])
    assert 0.4 < present.mean() < 0.6 and 0.6 < e.mean() < 0.95
    # the tumour-like instances are what the hazard depends on: bags holding them die sooner
    assert np.median(t[present & (e == 1)]) < 0.5 * np.median(t[~present & (e == 1)])


@pytest.mark.parametrize("model", sorted(SURVIVAL_SMALL))
def test_survival_methods_beat_chance_on_the_synthetic_task(model):
    r = run_survival(model, seed=0, n_train=120, n_test=150, epochs=15, patience=15,
                     model_kwargs=SURVIVAL_SMALL[model], lr=1e-3)
    # chance is 0.5 (s.d. about 0.03 for 150 test bags); the true log-hazard reaches about 0.75
    assert r["c_index"] > 0.62, r
