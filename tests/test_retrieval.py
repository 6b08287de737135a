import numpy as np
import pytest
import torch

from cliplab.eval.retrieval import retrieval_metrics, retrieval_ranks


def brute_force_ranks(img, txt, owner):
    """Reference: sort every row, ties broken against the model (negatives placed first)."""
    s = txt @ img.T  # [Nc, Ni]
    t2i = []
    for c in range(len(txt)):
        pos = s[c, owner[c]]
        order = sorted(range(len(img)), key=lambda j: (-s[c, j], j == owner[c]))
        t2i.append(order.index(owner[c]) + 1)
        assert t2i[-1] == 1 + sum(1 for j in range(len(img)) if j != owner[c] and s[c, j] >= pos)
    i2t = []
    for i in range(len(img)):
        order = sorted(range(len(txt)), key=lambda c: (-s[c, i], owner[c] == i))
        i2t.append(next(r for r, c in enumerate(order, 1) if owner[c] == i))
    return np.array(t2i), np.array(i2t)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantise", [False, True])
def test_ranks_match_brute_force(seed, quantise):
    rng = np.random.default_rng(seed)
    n_img = 23
    counts = rng.integers(1, 6, n_img)  # images with different caption counts
    owner = np.repeat(np.arange(n_img), counts)
    rng.shuffle(owner)
    img = rng.normal(size=(n_img, 8)).astype(np.float32)
    txt = rng.normal(size=(len(owner), 8)).astype(np.float32)
    if quantise:  # many exact ties
        img, txt = np.round(img), np.round(txt)
    ref_t2i, ref_i2t = brute_force_ranks(img, txt, owner)
    for block in (1, 4, 1000):
        t2i, i2t = retrieval_ranks(img, txt, owner, block_size=block)
        np.testing.assert_array_equal(t2i, ref_t2i)
        np.testing.assert_array_equal(i2t, ref_i2t)


def test_metrics_values():
    rng = np.random.default_rng(5)
    owner = np.array([0, 0, 1, 2, 2, 2, 3])
    img = rng.normal(size=(4, 6))
    txt = rng.normal(size=(7, 6))
    res = retrieval_metrics(img, txt, owner, ks=(1, 2))
    t2i, i2t = brute_force_ranks(img, txt, owner)
    m = res.metrics
    assert m["t2i_r1"] == pytest.approx((t2i <= 1).mean() * 100)
    assert m["i2t_r2"] == pytest.approx((i2t <= 2).mean() * 100)
    assert m["t2i_mrr"] == pytest.approx((1 / t2i).mean())
    assert m["i2t_median_rank"] == pytest.approx(np.median(i2t))
    assert m["t2i_mean_rank"] == pytest.approx(t2i.mean())
    assert m["n_images"] == 4 and m["n_captions"] == 7


def test_constant_scores_get_worst_rank():
    img = np.ones((5, 3), np.float32)
    txt = np.ones((10, 3), np.float32)
    owner = np.repeat(np.arange(5), 2)
    t2i, i2t = retrieval_ranks(img, txt, owner)
    assert (t2i == 5).all()  # 4 other images tie with the correct one and are counted above it
    assert (i2t == 9).all()  # 8 negatives tie above the first positive


def test_perfect_embeddings():
    img = torch.eye(6)
    owner = np.array([0, 1, 2, 3, 4, 5, 0, 3])
    txt = img[owner]
    m = retrieval_metrics(img, txt, owner).metrics
    assert m["t2i_r1"] == 100 and m["i2t_r1"] == 100 and m["t2i_mrr"] == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        retrieval_ranks(np.zeros((2, 3)), np.zeros((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="no caption"):
        retrieval_ranks(np.zeros((3, 3)), np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        retrieval_ranks(np.zeros((2, 3)), np.zeros((2, 3)), [0, 2])
