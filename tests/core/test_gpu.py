"""GPU-only checks (skipped without CUDA): the training step never waits on the device, a trial whose
steps are replayed CUDA graphs learns, chunked CE holds on CUDA in fp32 and bf16, and the models
learn under bf16 autocast as they do on the CPU."""

import pytest
import torch
from conftest import NEEDS_TORCH_CE

from raysweep.core import losses, trainer
from raysweep.core.config import TrialConfig
from raysweep.core.data import load_interactions
from raysweep.core.devices import autocast_for
from raysweep.core.models import build_model
from raysweep.core.split import leave_one_out, sequence_data

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "model, loss, negatives, graphs",
    [
        ("sasrec", "ce", None, False),
        ("sasrec", "sampled_ce", 30, False),
        ("sasrec", "bce", None, False),
        ("bert4rec", None, None, False),
        ("gru4rec", "ce", None, False),
        ("sasrec", "ce", None, True),
        ("sasrec", "sampled_ce", 30, True),
        ("sasrec", "bce", None, True),
    ],
)
def test_training_step_has_no_device_to_host_sync(model, loss, negatives, graphs):
    """The trainer's own step (host-side inputs copied in, loss, backward, fused Adam) never makes
    the host wait for the device: PyTorch raises on any synchronising call in "error" mode. A
    plain host-to-GPU copy of a pageable array is one (cudaStreamSynchronize)."""
    import numpy as np

    cfg = TrialConfig.from_dict(
        dict(
            dataset="synthetic-chains",
            model=model,
            loss=loss,
            negatives=negatives,
            device="cuda",
            cuda_graphs=graphs,
        )
    )
    device = torch.device("cuda")
    data = sequence_data(leave_one_out(load_interactions(cfg.dataset)), cfg.max_len, device)
    net = build_model(
        cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len, cfg.dropout
    ).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    step = trainer.make_step(
        net,
        trainer.make_optimizer(net, cfg, device),
        cfg,
        data,
        device,
        generator,
        np.random.default_rng(0),
        autocast_for(cfg.amp, device, cfg.cuda_graphs),
    )
    batch = np.arange(cfg.batch_size)  # one batch throughout: one bucket, so one graph
    trainer.train_steps(step, [batch] * 5, device)  # warm-up (and, with graphs, the capture)
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = trainer.train_steps(step, [batch] * 5, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total)


# The CUDA-graph check first: it is what a short GPU session most needs to learn.
@pytest.mark.parametrize(
    "model, loss, negatives, epochs",
    [
        ("sasrec", "ce", None, 6),
        ("sasrec", "sampled_ce", 30, 6),
        ("sasrec", "bce", None, 8),
        ("bert4rec", None, None, 30),
        ("gru4rec", "ce", None, 8),
    ],
)
def test_cuda_graphs_trial_learns_the_planted_order(model, loss, negatives, epochs):
    """Only 3 warm-up steps and each epoch's last, short batch run eagerly: the model learns only
    if the replayed graph really trains it."""
    from raysweep.core.trial import run_trial

    cfg = TrialConfig.from_dict(
        dict(
            dataset="synthetic-chains",
            model=model,
            loss=loss,
            negatives=negatives,
            max_epochs=epochs,
            hidden=32,
            lr=5e-3,
            val_users=500,
            device="cuda",
            cuda_graphs=True,
        )
    )
    assert run_trial(cfg).test["ndcg@10"] >= 0.8


def _on_cuda(**settings) -> TrialConfig:
    return TrialConfig.from_dict(dict(dataset="synthetic-chains", device="cuda", **settings))


def test_cuda_graph_buckets_share_one_memory_pool():
    """Batches of several lengths capture several graphs (one per bucket of position counts);
    sharing one pool, they hold about one step's temporaries, not one per graph: the graphed
    trial's peak stays within twice the eager one's."""
    from raysweep.core.trial import run_trial

    def peak(graphs: bool) -> float:
        cfg = _on_cuda(loss="ce", max_epochs=2, hidden=64, batch_size=64, val_users=200, cuda_graphs=graphs)
        torch.cuda.empty_cache()
        return run_trial(cfg).peak_memory_mb

    eager, graphed = peak(False), peak(True)
    assert graphed <= 2 * eager + 64, (eager, graphed)


def test_a_resumed_cuda_trial_continues_from_its_saved_state():
    """Stopped after epoch 2 and resumed from what it saved: the same number of epochs in all, and
    the same quality within noise (CUDA is not bit-reproducible, the CPU is)."""
    import contextlib

    from raysweep.core.trial import run_trial

    cfg = _on_cuda(loss="ce", max_epochs=5, patience=10, hidden=32, lr=5e-3, val_users=500)
    straight = run_trial(cfg)
    saved = {}

    def stop_after_two(report, state):
        if report.epoch == 2:
            saved.update(state())
            raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        run_trial(cfg, on_epoch=stop_after_two)
    resumed = run_trial(cfg, resume=saved)
    assert resumed.epochs == straight.epochs == 5
    assert abs(resumed.test["ndcg@10"] - straight.test["ndcg@10"]) < 0.05


@pytest.mark.parametrize("backend", ["raysweep", pytest.param("torch", marks=NEEDS_TORCH_CE)])
def test_chunked_ce_on_cuda_equals_plain_in_fp32_and_bf16(backend):
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(16, 50, 64, generator=g, device="cuda", requires_grad=True)
    w = torch.randn(20001, 64, generator=g, device="cuda", requires_grad=True)
    labels = torch.randint(0, 20001, (16, 50), generator=g, device="cuda")
    real = labels > 0

    def grads(loss):
        return torch.autograd.grad(loss, (h, w))

    with torch.autocast("cuda", enabled=False):
        plain = torch.nn.functional.cross_entropy(h[real] @ w[1:].T, labels[real] - 1)
        chunked = losses.ce(h, labels, w, chunk=97, backend=backend)  # 800 real rows: eight chunks
    assert abs(float(chunked.detach()) - float(plain.detach())) <= 1e-5 * abs(float(plain.detach()))
    for a, b in zip(grads(chunked), grads(plain)):
        assert (a - b).abs().max() < 1e-5
    # bf16 autocast: matmuls in bf16, logits summed in fp32; close to the fp32 loss.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = losses.ce(h, labels, w, chunk=97, backend=backend)
    assert low.dtype == torch.float32 and abs(float(low.detach()) - float(plain.detach())) <= 0.02 * abs(
        float(plain.detach())
    )


@pytest.mark.parametrize(
    "model, loss, negatives, epochs",
    [
        ("sasrec", "ce", None, 6),
        ("sasrec", "sampled_ce", 30, 6),
        ("bert4rec", None, None, 30),
        ("gru4rec", "ce", None, 8),
        ("sasrec", "gbce", 5, 6),  # (t = 0.25: with t >= 0.5 it collapses on this small catalogue)
        ("sasrec", "sampled_ce-mixed", 30, 6),
    ],
)
def test_learns_the_planted_order_on_cuda_in_bf16(model, loss, negatives, epochs):
    """bf16 autocast (GRU4Rec's GRU in fp32, and the record says so); gBCE, and sampled CE with
    mixed (uniform and in-batch) negatives."""
    from raysweep.core.trial import run_trial

    loss, _, source = (loss or "").partition("-")

    def ndcg(dataset):
        cfg = TrialConfig.from_dict(
            dict(
                dataset=dataset,
                model=model,
                loss=loss or None,
                negatives=negatives,
                max_epochs=epochs,
                hidden=32,
                lr=5e-3,
                val_users=500,
                device="cuda",
                amp=True,
                **({"negatives_from": source, "logq": True} if source else {}),
                **({"gbce_t": 0.25} if loss == "gbce" else {}),
            )
        )
        result = run_trial(cfg)
        assert result.precision == ("bf16 (GRU in fp32)" if model == "gru4rec" else "bf16")
        return result.test["ndcg@10"]

    assert ndcg("synthetic-chains") >= 0.8
    assert ndcg("synthetic-shuffled") < 0.2
