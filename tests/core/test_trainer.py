import contextlib

import pytest
import torch
from conftest import NEEDS_TORCH_CE, load_benchmark

from raysweep.core import cuda_graphs as graphs
from raysweep.core import devices, trainer
from raysweep.core.config import TrialConfig
from raysweep.core.data import load_interactions
from raysweep.core.errors import UserError
from raysweep.core.evaluation import evaluate_split
from raysweep.core.models import build_model
from raysweep.core.split import leave_one_out, sequence_data

dispatched = load_benchmark("speed").dispatched  # every op a run dispatches, with its argument shapes


def _setup(**settings):
    cfg = TrialConfig.from_dict(
        {**dict(dataset="synthetic-chains", loss="ce", hidden=16, val_users=100), **settings}
    )
    data = sequence_data(leave_one_out(load_interactions(cfg.dataset)), cfg.max_len)
    torch.manual_seed(0)
    model = build_model(
        cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len, cfg.dropout
    )
    return cfg, data, model


def test_patience_stops_at_the_right_epoch_and_restores_the_best_weights(monkeypatch):
    # Scripted validation curve: best at epoch 3 (the tie at epoch 5 is not an improvement).
    curve = iter([0.10, 0.20, 0.30, 0.25, 0.30, 0.29, 0.28, 0.50])
    monkeypatch.setattr(trainer, "evaluate_split", lambda *a, **k: {"ndcg@10": next(curve)})
    cfg, data, model = _setup(patience=4, max_epochs=50)
    snapshots, reports = {}, []

    def on_epoch(report, state):
        reports.append(report)
        snapshots[report.epoch] = {k: v.clone() for k, v in state()["model"].items()}

    result = trainer.fit(model, cfg, data, torch.device("cpu"), on_epoch)
    assert (result.best_epoch, result.epochs) == (3, 7)  # 4 epochs without a strict improvement
    assert [r.done for r in reports] == [False] * 6 + [True]
    assert reports[-1].best_ndcg == 0.30
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[3][name]), name
    assert not all(torch.equal(v, snapshots[7][k]) for k, v in model.state_dict().items())


def test_resume_continues_exactly(monkeypatch):
    cfg, data, model = _setup(max_epochs=4, patience=10)
    straight = trainer.fit(model, cfg, data, torch.device("cpu"))

    saved = {}
    cfg2, data2, model2 = _setup(max_epochs=4, patience=10)

    def stop_after_two(report, state):
        if report.epoch == 2:
            saved.update(state())
            raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        trainer.fit(model2, cfg2, data2, torch.device("cpu"), stop_after_two)
    cfg3, data3, model3 = _setup(max_epochs=4, patience=10)
    resumed = trainer.fit(model3, cfg3, data3, torch.device("cpu"), resume=saved)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert resumed.best_epoch == straight.best_epoch


def test_a_resumed_trial_keeps_the_peak_memory_of_its_earlier_attempt():
    from raysweep.core.trial import run_trial

    cfg = TrialConfig.from_dict(
        dict(dataset="synthetic-chains", loss="ce", hidden=16, max_epochs=2, patience=10, val_users=100)
    )
    saved = {}

    def stop_after_one(report, state):
        saved.update(state())
        raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        run_trial(cfg, on_epoch=stop_after_one)
    assert saved["epoch"] == 1 and saved["peak_mb"] >= 0.0
    saved["peak_mb"] = 123_456.0  # the attempt before the resume peaked far above this one
    assert run_trial(cfg, resume=saved).peak_memory_mb == 123_456.0


def _fixed_loss(net, cfg, data, batch, generator, rng):
    host = graphs.fixed_inputs(cfg, data, batch, rng)
    tensors = [None if a is None else torch.as_tensor(a) for a in (host.positions, host.bert_mask)]
    return graphs.fixed_batch_loss(net, cfg, data, torch.as_tensor(host.users), generator, *tensors)


@pytest.mark.parametrize("model", ["sasrec", "gru4rec", "bert4rec"])
def test_the_fixed_shape_loss_equals_the_trimmed_one(model):
    """cuda_graphs' loss (whole windows, positions padded to a bucket) against the eager one
    (windows trimmed), without dropout so both see the same model; BERT4Rec's masks drawn alike."""
    import numpy as np

    cfg, data, net = _setup(model=model)  # full CE (BERT4Rec: on its masked positions)
    net.eval()
    batch = np.arange(128)
    trimmed = trainer.batch_loss(
        net,
        cfg,
        data,
        torch.as_tensor(batch),
        data.train_lengths_host[batch],
        torch.Generator(),
        np.random.default_rng(0),
    )
    fixed = _fixed_loss(net, cfg, data, batch, torch.Generator(), np.random.default_rng(0))
    assert abs(float(fixed.detach()) - float(trimmed.detach())) <= 1e-6 * abs(float(trimmed.detach()))


def test_fixed_positions_are_padded_to_few_bucket_sizes():
    import numpy as np

    assert [graphs.bucket(n) for n in (1, 256, 257, 740, 1025, 25_600)] == [256, 256, 512, 768, 1280, 28_672]
    cfg, data, _ = _setup()
    host = graphs.fixed_inputs(cfg, data, np.arange(128), np.random.default_rng(0))
    real = int(np.maximum(data.train_lengths_host[:128] - 1, 0).sum())
    assert len(host.positions) == graphs.bucket(real)
    assert (host.positions[real:] == 128 * data.max_len).all() and (
        host.positions[:real] < 128 * data.max_len
    ).all()


@pytest.mark.parametrize(
    "model, loss, negatives, epochs",
    [
        ("sasrec", "sampled_ce", 30, 6),
        ("sasrec", "bce", None, 8),
        pytest.param("bert4rec", None, None, 30, marks=pytest.mark.long),
    ],
)
def test_the_fixed_shape_step_learns_the_planted_order(model, loss, negatives, epochs):
    """The step cuda_graphs captures, run eagerly here (negatives drawn on the device)."""
    import numpy as np

    cfg = TrialConfig.from_dict(
        dict(dataset="synthetic-chains", model=model, loss=loss, negatives=negatives, hidden=32, lr=5e-3)
    )
    data = sequence_data(leave_one_out(load_interactions(cfg.dataset)), cfg.max_len)
    torch.manual_seed(0)
    net = build_model(cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len, cfg.dropout)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for _ in range(epochs):
        for batch in trainer.epoch_batches(rng.permutation(data.num_users), cfg.batch_size):
            loss = _fixed_loss(net, cfg, data, batch, generator, rng)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test = evaluate_split(net, cfg, data, "test", torch.arange(data.num_users), contextlib.nullcontext)
    assert test["ndcg@10"] >= 0.8


# Ops that make the host wait for a GPU: they read a value or a data-dependent size back
# (`.item()` is _local_scalar_dense; indexing by a boolean mask runs nonzero inside the kernel).
SYNCING_OPS = {
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "_local_scalar_dense",
    "is_nonzero",
    "equal",
    "repeat_interleave",
    "bincount",
    "histc",
}
INDEXING_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _syncing_ops(run) -> list[str]:
    """The ops of `run()` that would wait for a GPU."""
    found = []
    for name, args in dispatched(run):
        masks = name in INDEXING_OPS and any(i is not None and i[1] == torch.bool for i in args[1])
        if name in SYNCING_OPS or masks:
            found.append(name + (" (boolean mask)" if masks else ""))
    return found


@pytest.mark.parametrize(
    "model, loss, negatives, backend",
    [
        ("sasrec", "ce", None, "raysweep"),
        pytest.param("sasrec", "ce", None, "torch", marks=NEEDS_TORCH_CE),
        ("sasrec", "sampled_ce", 30, "raysweep"),
        ("sasrec", "bce", None, "raysweep"),
        ("bert4rec", None, None, "raysweep"),
        pytest.param("bert4rec", None, None, "torch", marks=NEEDS_TORCH_CE),
        ("gru4rec", "ce", None, "raysweep"),
        pytest.param("gru4rec", "ce", None, "torch", marks=NEEDS_TORCH_CE),
    ],
)  # full CE: raysweep's and PyTorch's
def test_the_training_step_dispatches_nothing_that_waits_for_a_gpu(model, loss, negatives, backend):
    """The CPU's view of the GPU test `test_training_step_has_no_device_to_host_sync`, for every CI
    run: the eager step (loss, backward, fused Adam) and the fixed-shape step that cuda_graphs
    captures dispatch no op that reads the device back. (Host-to-GPU copies are the GPU test's.)"""
    import numpy as np

    cfg, data, net = _setup(model=model, loss=loss, negatives=negatives, ce_backend=backend)
    device, rng, generator = torch.device("cpu"), np.random.default_rng(0), torch.Generator().manual_seed(0)
    step = trainer.make_step(
        net,
        trainer.make_optimizer(net, cfg, device),
        cfg,
        data,
        device,
        generator,
        rng,
        contextlib.nullcontext,
    )
    batch = np.arange(cfg.batch_size)
    step(batch)  # Adam's state is created at the first step
    assert _syncing_ops(lambda: step(batch)) == []
    assert _syncing_ops(lambda: _fixed_loss(net, cfg, data, batch, generator, rng).backward()) == []


def test_the_sync_check_sees_a_boolean_mask_and_an_item():
    values = torch.arange(6.0)
    assert _syncing_ops(lambda: values[values > 2].sum().item()) == [
        "index (boolean mask)",
        "_local_scalar_dense",
    ]


@pytest.mark.parametrize(
    "model, loss, negatives",
    [
        ("sasrec", "ce", None),
        ("sasrec", "sampled_ce", 100),
        ("sasrec", "bce", None),
        ("bert4rec", None, None),
        ("gru4rec", "ce", None),
    ],
)
def test_the_fixed_shape_step_is_one_program_for_every_batch_of_a_bucket(model, loss, negatives):
    """What lets cuda_graphs replay one captured step for other batches: on Beauty's batches of
    unequal lengths, every op of the fixed-shape loss and its backward gets the same shapes and
    the same non-tensor arguments in two batches of the same bucket (while the eager step's differ)."""
    import numpy as np

    cfg, data, net = _setup(dataset="beauty", model=model, loss=loss, negatives=negatives)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    batches = trainer.epoch_batches(rng.permutation(data.num_users), cfg.batch_size)[:8]
    buckets = {}
    for batch in batches:
        positions = graphs.fixed_inputs(cfg, data, batch, np.random.default_rng(0)).positions
        buckets.setdefault(0 if positions is None else len(positions), []).append(batch)
    first, second = max(buckets.values(), key=len)[:2]

    def fixed(batch):
        net.zero_grad(set_to_none=True)  # (else the second backward accumulates: other ops)
        return dispatched(
            lambda: _fixed_loss(net, cfg, data, batch, generator, np.random.default_rng(0)).backward()
        )

    def eager(batch):
        net.zero_grad(set_to_none=True)
        lengths = data.train_lengths_host[batch]
        return dispatched(
            lambda: trainer.batch_loss(
                net, cfg, data, torch.as_tensor(batch), lengths, generator, np.random.default_rng(0)
            ).backward()
        )

    assert fixed(first) == fixed(second)
    assert eager(first) != eager(second)  # trimmed to each batch's own lengths: the check can tell


@pytest.mark.parametrize(
    "bf16_units, amp, expected",
    [
        ((), True, False),
        (("avx512_bf16",), True, True),
        (("amx_tile",), True, True),
        (("avx512_bf16",), False, False),
    ],
)
def test_cpu_autocast_only_where_the_cpu_has_bf16_and_amp_is_on(bf16_units, amp, expected, monkeypatch):
    for unit in ("avx512_bf16", "amx_tile"):
        monkeypatch.setattr(torch.cpu, f"_is_{unit}_supported", lambda unit=unit: unit in bf16_units)
    cfg, _, _ = _setup(amp=amp)
    with devices.autocast_for(cfg.amp, torch.device("cpu"))():
        assert torch.is_autocast_enabled("cpu") == expected
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if expected else torch.float32)


def test_cuda_graphs_on_the_cpu_is_one_line():
    with pytest.raises(UserError, match="cuda_graphs needs a CUDA device, and device is 'cpu'"):
        TrialConfig.from_dict(dict(dataset="synthetic-chains", loss="ce", device="cpu", cuda_graphs=True))
    cfg, data, model = _setup()  # device auto, resolved to the CPU only when the trial starts
    with pytest.raises(UserError, match="cuda_graphs needs a CUDA device, not cpu"):
        trainer.fit(model, cfg.replaced(cuda_graphs=True), data, torch.device("cpu"))


def test_each_step_of_each_epoch_is_reported_within_the_epoch(monkeypatch):
    curve = iter([0.1, 0.2])
    monkeypatch.setattr(trainer, "evaluate_split", lambda *a, **k: {"ndcg@10": next(curve)})
    cfg, data, model = _setup(max_epochs=2, batch_size=1000)
    steps, ends = [], []
    trainer.fit(
        model, cfg, data, torch.device("cpu"), lambda report, _: ends.append(len(steps)),
        on_step=lambda *at: steps.append(at),
    )  # fmt: skip
    per_epoch = -(-data.num_users // 1000)  # 3,000 users in batches of 1,000
    assert steps == [(e, s, per_epoch) for e in (1, 2) for s in range(1, per_epoch + 1)]
    assert ends == [per_epoch, 2 * per_epoch]  # every step of an epoch before its report
