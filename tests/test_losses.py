import math

import numpy as np
import pytest
import torch

from conftest import NEEDS_TORCH_CE
from raysweep import losses


def _inputs(seed=0, batch=4, steps=6, items=40, dim=8):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, steps, dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(items + 1, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(1, items + 1, (batch, steps), generator=g)
    labels[0, 4:] = 0  # padding
    labels[2, 1:] = 0
    return h, weight, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def _real_positions(labels):
    return [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1]) if labels[b, t] > 0]


def test_ce_matches_loop():
    h, w, labels = _inputs()
    got = losses.ce(h, labels, w)
    hd, wd = h.detach(), w.detach()  # the reference loop is plain arithmetic
    terms = []
    for b, t in _real_positions(labels):
        logits = [float(hd[b, t] @ wd[i]) for i in range(1, len(w))]
        lse = math.log(sum(math.exp(x) for x in logits))
        terms.append(lse - logits[labels[b, t] - 1])
    assert abs(float(got.detach()) - np.mean(terms)) < 1e-10
    # Gradients against autograd through the plain formula.
    real = labels > 0
    plain = torch.nn.functional.cross_entropy(h[real] @ w[1:].T, labels[real] - 1)
    for a, b in zip(_grads(got, h, w), _grads(plain, h, w)):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("torch_chunked", [False, pytest.param(True, marks=NEEDS_TORCH_CE)], ids=["raysweep", "torch"])
def test_chunked_ce_equals_plain_in_fp32(torch_chunked, monkeypatch):
    monkeypatch.setattr(losses, "TORCH_CHUNKED_CE", torch_chunked)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(8, 50, 32, generator=g, requires_grad=True)
    w = torch.randn(3001, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 3001, (8, 50), generator=g)
    real = labels > 0
    chunked = losses.ce(h, labels, w, chunk=97)  # 400 real rows: at least four chunks
    assert real.sum() > 3 * 97
    plain = torch.nn.functional.cross_entropy(h[real] @ w[1:].T, labels[real] - 1)
    # 1e-6 relative: the loss is ~20.7 here, where one fp32 ulp is 1.9e-6 (the summation order
    # of PyTorch's op differs from the plain one by that ulp); the gradients within 1e-6 absolute.
    assert abs(float(chunked.detach()) - float(plain.detach())) <= 1e-6 * abs(float(plain.detach()))
    for a, b in zip(_grads(chunked, h, w), _grads(plain, h, w)):
        assert (a - b).abs().max() < 1e-6


@NEEDS_TORCH_CE
@pytest.mark.parametrize("masked", [False, True], ids=["ce", "masked_ce"])
def test_pytorchs_chunked_ce_runs_in_the_autocast_dtype_like_raysweeps(masked, monkeypatch):
    """Under bf16 autocast both chunked CEs multiply in bf16, though the hidden states arrive in
    fp32 (the final LayerNorm's output): PyTorch's op is not an autocast op, so `losses` casts for
    it. Loss and gradients agree with raysweep's within bf16 rounding, and with fp32 within 2 %."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(8, 50, 32, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(3001, 32, generator=g)).requires_grad_()
    labels = torch.randint(0, 3001, (8, 50), generator=g)

    def loss_of(h):
        return losses.masked_ce(h, labels, w, chunk=97) if masked else losses.ce(h, labels, w, chunk=97)

    def run(torch_chunked, autocast=True):
        monkeypatch.setattr(losses, "TORCH_CHUNKED_CE", torch_chunked)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(h)
        return loss, _grads(loss, h, w)

    (theirs, their_grads), (ours, our_grads), (exact, exact_grads) = run(True), run(False), run(False, autocast=False)
    monkeypatch.setattr(losses, "TORCH_CHUNKED_CE", True)
    assert theirs.dtype == torch.float32 and float(theirs.detach()) == float(loss_of(h.detach().bfloat16()).detach())
    for loss, grads in ((theirs, their_grads), (ours, our_grads)):
        assert abs(float(loss.detach()) - float(exact.detach())) <= 0.02 * float(exact.detach())
        for a, b in zip(grads, exact_grads):
            assert (a.float() - b).norm() <= 0.02 * b.norm()
    for a, b in zip(their_grads, our_grads):
        assert (a.float() - b.float()).norm() <= 0.02 * b.norm()


def test_sampled_ce_matches_loop():
    h, w, labels = _inputs()
    negatives = torch.tensor([[3, 7, 9], [1, 2, 5], [11, 12, 13], [20, 30, 40]])
    got = losses.sampled_ce(h, labels, w, negatives)
    hd, wd = h.detach(), w.detach()  # the reference loop is plain arithmetic
    terms = []
    for b, t in _real_positions(labels):
        logits = [float(hd[b, t] @ wd[labels[b, t]])] + [float(hd[b, t] @ wd[n]) for n in negatives[b]]
        terms.append(math.log(sum(math.exp(x) for x in logits)) - logits[0])
    assert abs(float(got.detach()) - np.mean(terms)) < 1e-10
    real = labels > 0
    logits = torch.cat([(h * w[labels]).sum(-1, keepdim=True), torch.einsum("btd,bnd->btn", h, w[negatives])], -1)
    plain = torch.nn.functional.cross_entropy(logits[real], torch.zeros(int(real.sum()), dtype=torch.long))
    for a, b in zip(_grads(got, h, w), _grads(plain, h, w)):
        assert torch.allclose(a, b, atol=1e-12)


def test_bce_matches_loop():
    h, w, labels = _inputs()
    negatives = torch.randint(1, 41, labels.shape, generator=torch.Generator().manual_seed(3))
    got = losses.bce(h, labels, w, negatives)
    hd, wd = h.detach(), w.detach()  # the reference loop is plain arithmetic
    pos, neg = [], []
    for b, t in _real_positions(labels):
        p = float(hd[b, t] @ wd[labels[b, t]])
        n = float(hd[b, t] @ wd[negatives[b, t]])
        pos.append(-math.log(1 / (1 + math.exp(-p))))
        neg.append(-math.log(1 - 1 / (1 + math.exp(-n))))
    assert abs(float(got.detach()) - (np.mean(pos) + np.mean(neg)) / 2) < 1e-10
    real = labels > 0
    sp = torch.nn.functional.softplus
    plain = (sp(-(h * w[labels]).sum(-1)[real]).mean() + sp((h * w[negatives]).sum(-1)[real]).mean()) / 2
    for a, b in zip(_grads(got, h, w), _grads(plain, h, w)):
        assert torch.allclose(a, b, atol=1e-12)


def _pool(items: int, never: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pool mask, pool_items, pool_rank) with items 1..never-1 never in training."""
    pool = torch.ones(items + 1, dtype=torch.bool)
    pool[:never] = False
    rank = torch.where(pool, pool.cumsum(0) - 1, -1)
    return pool, pool.nonzero().squeeze(1), rank


def test_free_items_are_the_pool_items_outside_each_window_in_order():
    """The u-th free item, mapped through skips without a [B, items] mask, against a plain list."""
    g = torch.Generator().manual_seed(3)
    pool, pool_items, pool_rank = _pool(60, 8)
    windows = torch.randint(0, 61, (50, 12), generator=g)  # padding, repeats, never-trained items
    windows[::7] = 0
    skips, free = losses._free_ranks(pool_rank, len(pool_items), windows)
    for b in range(len(windows)):
        expected = [i for i in pool_items.tolist() if i not in windows[b].tolist()]
        assert int(free[b]) == len(expected)
        u = torch.arange(len(expected))[None]
        assert losses._free_items(pool_items, skips[b : b + 1], u)[0].tolist() == expected


@pytest.mark.parametrize("n, items", [(30, 1000), (900, 1000)])  # sparse draws, and dense near the pool size
def test_shared_negatives_are_distinct_pool_items_outside_the_window(n, items):
    g = torch.Generator().manual_seed(0)
    pool, pool_items, pool_rank = _pool(items, 50)  # items 1..49 never occur in training
    windows = torch.randint(1, items + 1, (64, 21), generator=g)  # some never-trained items too
    windows[:, 15:] = 0
    counts = torch.zeros(items + 1)
    for _ in range(20):
        neg = losses.shared_negatives(pool_rank, pool_items, windows, n, g)
        assert neg.shape == (64, n)
        assert (neg.sort(1).values.diff(dim=1) > 0).all()  # without replacement
        assert pool[neg].all()
        assert not (neg[:, :, None] == windows[:, None, :]).any()
        counts += torch.bincount(neg.flatten(), minlength=items + 1)
    # Uniform over the pool: per-item counts within 6 sigma of their mean.
    c = counts[50:]
    assert (c - c.mean()).abs().max() < 6 * c.mean().sqrt() + 5


def test_position_negatives_are_uniform_outside_the_window():
    g = torch.Generator().manual_seed(0)
    pool, pool_items, pool_rank = _pool(30, 5)  # items 1..4 never occur in training
    windows = torch.randint(1, 31, (128, 11), generator=g)
    windows[:, 8:] = 0
    neg = losses.position_negatives(pool_rank, pool_items, windows, 10, g)
    assert neg.shape == (128, 10) and pool[neg].all()
    assert not (neg[:, :, None] == windows[:, None, :]).any()
    # One window for every row: each of its free items drawn equally often (within 6 sigma).
    windows = torch.tensor([[5, 9, 9, 12, 30, 0]]).expand(64, -1)
    neg = losses.position_negatives(pool_rank, pool_items, windows, 500, g)
    counts = torch.bincount(neg.flatten(), minlength=31)
    free = [i for i in range(5, 31) if i not in (5, 9, 12, 30)]
    assert counts.nonzero().squeeze(1).tolist() == free
    mean = neg.numel() / len(free)
    assert (counts[free] - mean).abs().max() < 6 * mean ** 0.5


@pytest.mark.parametrize("count", [1, 3])  # 1: a GPU's (LENGTH_GROUPS)
def test_sampled_ce_by_length_groups_equals_the_whole_batch(count):
    from raysweep.trainer import length_groups

    g = torch.Generator().manual_seed(5)
    lengths = np.array([2, 9, 4, 1, 7, 3, 9, 5])  # window lengths; labels = length - 1 steps
    labels = torch.zeros(8, 8, dtype=torch.long)
    for b, n in enumerate(lengths):
        labels[b, : n - 1] = torch.randint(1, 41, (n - 1,), generator=g)
    h = torch.randn(8, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(41, 6, generator=g, dtype=torch.float64, requires_grad=True)
    negatives = torch.randint(1, 41, (8, 5), generator=g)
    whole = losses.sampled_ce(h, labels, w, negatives)
    grouped = losses.sampled_ce(h, labels, w, negatives, length_groups(lengths, torch.device("cpu"), count=count))
    assert abs(float(whole.detach()) - float(grouped.detach())) < 1e-12
    for a, b in zip(_grads(whole, h, w), _grads(grouped, h, w)):
        assert torch.allclose(a, b, atol=1e-12)


def test_host_side_positions_match_the_label_mask():
    lengths = np.array([3, 0, 5, 1])
    labels = torch.zeros(4, 5, dtype=torch.long)
    for b, n in enumerate(lengths):
        labels[b, :n] = 7
    positions = losses.real_positions_host(lengths, 5)
    assert positions.tolist() == torch.nonzero(labels.flatten() > 0).squeeze(1).tolist()


@pytest.mark.parametrize("loss", ["ce", "sampled_ce", "bce"])
@pytest.mark.parametrize("torch_chunked", [False, pytest.param(True, marks=NEEDS_TORCH_CE)], ids=["raysweep", "torch"])
def test_masked_losses_over_a_padded_batch_equal_the_index_list_ones(loss, torch_chunked, monkeypatch):
    """The fixed-shape (CUDA graph) step's losses: padding masked out instead of left out."""
    monkeypatch.setattr(losses, "TORCH_CHUNKED_CE", torch_chunked)
    h, w, labels = _inputs()
    g = torch.Generator().manual_seed(5)
    if loss == "ce":
        reference, masked = losses.ce(h, labels, w, chunk=5), losses.masked_ce(h, labels, w, chunk=5)  # 4+ chunks
    elif loss == "sampled_ce":
        negatives = torch.randint(1, 41, (4, 7), generator=g)
        reference, masked = losses.sampled_ce(h, labels, w, negatives), losses.masked_sampled_ce(h, labels, w, negatives)
    else:
        negatives = torch.randint(1, 41, labels.shape, generator=g)
        reference, masked = losses.bce(h, labels, w, negatives), losses.masked_bce(h, labels, w, negatives)
    assert abs(float(masked.detach()) - float(reference.detach())) < 1e-12
    for a, b in zip(_grads(masked, h, w), _grads(reference, h, w)):
        assert (a - b).abs().max() < 1e-12


def test_masked_ce_of_a_batch_without_targets_is_zero():
    h, w, labels = _inputs()
    loss = losses.masked_ce(h, torch.zeros_like(labels), w)
    assert float(loss.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in _grads(loss, h, w))
