import math

import numpy as np
import pytest
import torch
from conftest import NEEDS_TORCH_CE

from raysweep.core import cuda_graphs as graphs
from raysweep.core import losses, negatives
from raysweep.core.objectives import Batch


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


BACKENDS = ["raysweep", pytest.param("torch", marks=NEEDS_TORCH_CE)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_ce_equals_plain_in_fp32(backend):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(8, 50, 32, generator=g, requires_grad=True)
    w = torch.randn(3001, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 3001, (8, 50), generator=g)
    real = labels > 0
    chunked = losses.ce(h, labels, w, chunk=97, backend=backend)  # 400 real rows: at least four chunks
    assert real.sum() > 3 * 97
    plain = torch.nn.functional.cross_entropy(h[real] @ w[1:].T, labels[real] - 1)
    # 1e-6 relative: the loss is ~20.7 here, where one fp32 ulp is 1.9e-6 (the summation order
    # of PyTorch's op differs from the plain one by that ulp); the gradients within 1e-6 absolute.
    assert abs(float(chunked.detach()) - float(plain.detach())) <= 1e-6 * abs(float(plain.detach()))
    for a, b in zip(_grads(chunked, h, w), _grads(plain, h, w)):
        assert (a - b).abs().max() < 1e-6


@NEEDS_TORCH_CE
@pytest.mark.parametrize("masked", [False, True], ids=["ce", "masked_ce"])
def test_pytorchs_chunked_ce_runs_in_the_autocast_dtype_like_raysweeps(masked):
    """Under bf16 autocast both chunked CEs multiply in bf16, though the hidden states arrive in
    fp32 (the final LayerNorm's output): PyTorch's op is not an autocast op, so `losses` casts for
    it. Loss and gradients agree with raysweep's within bf16 rounding, and with fp32 within 2 %."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(8, 50, 32, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(3001, 32, generator=g)).requires_grad_()
    labels = torch.randint(0, 3001, (8, 50), generator=g)

    def loss_of(h, backend):
        if masked:
            return graphs.masked_ce(h, labels, w, chunk=97, backend=backend)
        return losses.ce(h, labels, w, chunk=97, backend=backend)

    def run(backend, autocast=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(h, backend)
        return loss, _grads(loss, h, w)

    (theirs, their_grads), (ours, our_grads) = run("torch"), run("raysweep")
    exact, exact_grads = run("raysweep", autocast=False)
    assert theirs.dtype == torch.float32
    assert float(theirs.detach()) == float(loss_of(h.detach().bfloat16(), "torch").detach())
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
    logits = torch.cat(
        [(h * w[labels]).sum(-1, keepdim=True), torch.einsum("btd,bnd->btn", h, w[negatives])], -1
    )
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
    skips, free = negatives.free_ranks(pool_rank, len(pool_items), windows)
    for b in range(len(windows)):
        expected = [i for i in pool_items.tolist() if i not in windows[b].tolist()]
        assert int(free[b]) == len(expected)
        u = torch.arange(len(expected))[None]
        assert negatives.free_items(pool_items, skips[b : b + 1], u)[0].tolist() == expected


@pytest.mark.parametrize("n, items", [(30, 1000), (900, 1000)])  # sparse draws, and dense near the pool size
def test_shared_negatives_are_distinct_pool_items_outside_the_window(n, items):
    g = torch.Generator().manual_seed(0)
    pool, pool_items, pool_rank = _pool(items, 50)  # items 1..49 never occur in training
    windows = torch.randint(1, items + 1, (64, 21), generator=g)  # some never-trained items too
    windows[:, 15:] = 0
    counts = torch.zeros(items + 1)
    for _ in range(20):
        neg = negatives.shared_negatives(pool_rank, pool_items, windows, n, g)
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
    neg = negatives.position_negatives(pool_rank, pool_items, windows, 10, g)
    assert neg.shape == (128, 10) and pool[neg].all()
    assert not (neg[:, :, None] == windows[:, None, :]).any()
    # One window for every row: each of its free items drawn equally often (within 6 sigma).
    windows = torch.tensor([[5, 9, 9, 12, 30, 0]]).expand(64, -1)
    neg = negatives.position_negatives(pool_rank, pool_items, windows, 500, g)
    counts = torch.bincount(neg.flatten(), minlength=31)
    free = [i for i in range(5, 31) if i not in (5, 9, 12, 30)]
    assert counts.nonzero().squeeze(1).tolist() == free
    mean = neg.numel() / len(free)
    assert (counts[free] - mean).abs().max() < 6 * mean**0.5


@pytest.mark.parametrize("count", [1, 3])  # 1: a GPU's (LENGTH_GROUPS)
def test_sampled_ce_by_length_groups_equals_the_whole_batch(count):
    from raysweep.core.losses import length_groups

    g = torch.Generator().manual_seed(5)
    lengths = np.array([2, 9, 4, 1, 7, 3, 9, 5])  # window lengths; labels = length - 1 steps
    labels = torch.zeros(8, 8, dtype=torch.long)
    for b, n in enumerate(lengths):
        labels[b, : n - 1] = torch.randint(1, 41, (n - 1,), generator=g)
    h = torch.randn(8, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(41, 6, generator=g, dtype=torch.float64, requires_grad=True)
    negatives = torch.randint(1, 41, (8, 5), generator=g)
    whole = losses.sampled_ce(h, labels, w, negatives)
    grouped = losses.sampled_ce(
        h, labels, w, negatives, length_groups(lengths, torch.device("cpu"), count=count)
    )
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_losses_over_a_padded_batch_equal_the_index_list_ones(loss, backend):
    """The fixed-shape (CUDA graph) step's losses: padding masked out instead of left out."""
    h, w, labels = _inputs()
    g = torch.Generator().manual_seed(5)
    if loss == "ce":
        reference = losses.ce(h, labels, w, chunk=5, backend=backend)  # 4+ chunks
        masked = graphs.masked_ce(h, labels, w, chunk=5, backend=backend)
    elif loss == "sampled_ce":
        drawn = torch.randint(1, 41, (4, 7), generator=g)
        reference, masked = (
            losses.sampled_ce(h, labels, w, drawn),
            graphs.masked_sampled_ce(h, labels, w, drawn),
        )
    else:
        drawn = torch.randint(1, 41, labels.shape, generator=g)
        reference, masked = losses.bce(h, labels, w, drawn), graphs.masked_bce(h, labels, w, drawn)
    assert abs(float(masked.detach()) - float(reference.detach())) < 1e-12
    for a, b in zip(_grads(masked, h, w), _grads(reference, h, w)):
        assert (a - b).abs().max() < 1e-12


def test_masked_ce_of_a_batch_without_targets_is_zero():
    h, w, labels = _inputs()
    loss = graphs.masked_ce(h, torch.zeros_like(labels), w)
    assert float(loss.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in _grads(loss, h, w))


def _gbce_loop(h, w, labels, negatives, beta):
    """gSASRec's gBCE, one (position, candidate) pair at a time: beta * -log sigma(s+) and
    -log(1 - sigma(s-)), averaged over every pair."""
    hd, wd = h.detach(), w.detach()
    terms = []
    for b, t in _real_positions(labels):
        drawn = negatives[b] if negatives.dim() == 2 else negatives[b, t]
        p = float(hd[b, t] @ wd[labels[b, t]])
        terms.append(-beta * math.log(1 / (1 + math.exp(-p))))
        terms += [-math.log(1 - 1 / (1 + math.exp(-float(hd[b, t] @ wd[n])))) for n in drawn]
    return float(np.mean(terms))


@pytest.mark.parametrize("per_position", [False, True], ids=["shared", "per-position"])
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_gbce_matches_loop(per_position, beta):
    h, w, labels = _inputs()
    g = torch.Generator().manual_seed(7)
    shape = (*labels.shape, 5) if per_position else (labels.shape[0], 5)
    drawn = torch.randint(1, 41, shape, generator=g)
    got = losses.gbce(h, labels, w, drawn, beta)
    assert abs(float(got.detach()) - _gbce_loop(h, w, labels, drawn, beta)) < 1e-10
    # Gradients against autograd through the plain formula.
    real = labels > 0
    neg_rows = w[drawn] if per_position else w[drawn][:, None].expand(-1, labels.shape[1], -1, -1)
    pos = (h * w[labels]).sum(-1)[real]
    neg = torch.einsum("btd,btnd->btn", h, neg_rows)[real]
    sp = torch.nn.functional.softplus
    plain = (beta * sp(-pos).sum() + sp(neg).sum()) / (pos.numel() + neg.numel())
    for a, b in zip(_grads(got, h, w), _grads(plain, h, w)):
        assert torch.allclose(a, b, atol=1e-12)


def test_gbce_with_t_0_and_one_negative_is_bce():
    h, w, labels = _inputs()
    drawn = torch.randint(1, 41, labels.shape, generator=torch.Generator().manual_seed(3))
    beta = negatives.gbce_beta(1, 40, t=0.0)
    assert beta == 1.0
    got, bce = losses.gbce(h, labels, w, drawn[:, :, None], beta), losses.bce(h, labels, w, drawn)
    assert abs(float(got.detach()) - float(bce.detach())) < 1e-12
    for a, b in zip(_grads(got, h, w), _grads(bce, h, w)):
        assert torch.allclose(a, b, atol=1e-12)


def test_gbce_beta_follows_gsasrec():
    # alpha = N / (pool - 1); beta = alpha (t (1 - 1/alpha) + 1/alpha) = 1 - t (1 - alpha)
    assert negatives.gbce_beta(10, 101, 0.75) == pytest.approx(0.1 * (0.75 * (1 - 10) + 10))
    assert negatives.gbce_beta(10, 101, 0.75) == pytest.approx(0.325)
    assert negatives.gbce_beta(10, 101, 1.0) == pytest.approx(0.1)


def _sampled_loop(h, w, labels, drawn, allowed, log_q, log_q_labels):
    hd, wd = h.detach(), w.detach()
    terms = []
    for b, t in _real_positions(labels):
        logits = [float(hd[b, t] @ wd[labels[b, t]]) - float(log_q_labels[b, t])]
        logits += [
            float(hd[b, t] @ wd[n]) - float(log_q[b, j]) for j, n in enumerate(drawn[b]) if allowed[b, j]
        ]
        terms.append(math.log(sum(math.exp(x) for x in logits)) - logits[0])
    return float(np.mean(terms))


def test_sampled_ce_with_masked_negatives_and_logq_matches_loop():
    h, w, labels = _inputs()
    g = torch.Generator().manual_seed(11)
    drawn = torch.randint(1, 41, (4, 6), generator=g)
    allowed = torch.rand(4, 6, generator=g) > 0.3
    log_q = torch.randn(4, 6, generator=g, dtype=torch.float64)
    log_q_labels = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    for groups in (None, _groups(labels)):
        got = losses.sampled_ce(h, labels, w, negatives.Drawn(drawn, allowed, log_q, log_q_labels), groups)
        assert (
            abs(float(got.detach()) - _sampled_loop(h, w, labels, drawn, allowed, log_q, log_q_labels))
            < 1e-10
        )


def _groups(labels):
    from raysweep.core.losses import length_groups

    return length_groups((labels > 0).sum(1).numpy() + 1, torch.device("cpu"), count=2)


def _batch(seed=0, rows=64, width=12, items=200):
    g = torch.Generator().manual_seed(seed)
    _, pool_items, pool_rank = _pool(items, 1)
    windows = torch.randint(1, items + 1, (rows, width), generator=g)
    windows[:, 9:] = 0
    labels = windows[:, 1:]
    positions = torch.nonzero(labels.flatten() > 0).squeeze(1)
    return g, pool_items, pool_rank, windows, labels, positions


def test_logq_with_a_uniform_source_changes_nothing():
    g, pool_items, pool_rank, windows, labels, positions = _batch()
    batch = Batch(windows[:, :-1], labels, positions, windows)
    plain = negatives.from_source(
        "uniform", pool_rank, pool_items, batch, 30, torch.Generator().manual_seed(1), False, 200
    )
    corrected = negatives.from_source(
        "uniform", pool_rank, pool_items, batch, 30, torch.Generator().manual_seed(1), True, 200
    )
    assert torch.equal(plain.items, corrected.items) and plain.allowed is None
    # One weight for every candidate: the same constant comes off every logit of a row.
    assert torch.unique(corrected.log_q).numel() == 1
    assert torch.unique(corrected.log_q_labels[labels > 0]).numel() == 1
    h = torch.randn(*labels.shape, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(201, 8, dtype=torch.float64, generator=g, requires_grad=True)
    a, b = losses.sampled_ce(h, labels, w, plain.items), losses.sampled_ce(h, labels, w, corrected)
    assert abs(float(a.detach()) - float(b.detach())) < 1e-12
    for x, y in zip(_grads(a, h, w), _grads(b, h, w)):
        assert torch.allclose(x, y, atol=1e-12)


def test_in_batch_negatives_follow_the_batch_and_never_hit_the_own_window():
    g, pool_items, pool_rank, windows, labels, positions = _batch(seed=2)
    drawn = negatives.from_source(
        "in_batch",
        pool_rank,
        pool_items,
        Batch(windows[:, :-1], labels, positions, windows),
        400,
        g,
        True,
        200,
    )
    batch_items = labels.flatten()[positions]
    assert torch.isin(drawn.items, batch_items).all()  # the batch's own targets only
    own = (drawn.items[:, :, None] == windows[:, None, :]).any(-1)
    assert torch.equal(drawn.allowed, ~own) and own.any()  # a draw in the own window never counts
    # Each item is drawn about as often as it is a target in the batch (within 6 sigma).
    counts = torch.bincount(drawn.items.flatten(), minlength=201).double()
    expected = torch.bincount(batch_items, minlength=201).double() / len(batch_items) * drawn.items.numel()
    assert ((counts - expected).abs() <= 6 * expected.sqrt() + 3).all()
    # logQ: log of the expected number of draws, for negatives and positives alike.
    assert torch.allclose(drawn.log_q, expected.div(64).log()[drawn.items].float(), atol=1e-5)


def test_mixed_negatives_are_half_uniform_half_in_batch():
    g, pool_items, pool_rank, windows, labels, positions = _batch(seed=3)
    drawn = negatives.from_source(
        "mixed", pool_rank, pool_items, Batch(windows[:, :-1], labels, positions, windows), 21, g, False, 200
    )
    uniform, in_batch = drawn.items[:, :10], drawn.items[:, 10:]
    assert drawn.items.shape == (64, 21) and drawn.allowed[:, :10].all()
    assert not (uniform[:, :, None] == windows[:, None, :]).any()  # loss (3)'s rule
    assert torch.isin(in_batch, labels.flatten()[positions]).all()
