"""Precision and placement on the device, checked on the CPU: a trial given a GPU never falls back
to the CPU in silence, the GRU runs in the fp32 its record names, the chunked CE's loss is fp32
on both back-ends, and the memory check holds a trial to its share of a card."""

import numpy as np
import pytest
import torch

from raysweep.core import full_ce
from raysweep.core.config import TrialConfig
from raysweep.core.devices import resolve_device
from raysweep.core.errors import UserError
from raysweep.core.models.gru4rec import GRU4Rec
from raysweep.core.split import Split
from raysweep.core.trial import check_fits


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a CUDA GPU uses it")
def test_a_trial_given_a_gpu_fails_at_once_naming_why_cuda_is_unusable():
    with pytest.raises(UserError, match="this trial was given a GPU, but ") as error:
        resolve_device("auto", gpu_assigned=True)
    assert "CPU-only build" in str(error.value) or "is_available() is False" in str(error.value)
    assert resolve_device("auto") == torch.device("cpu")  # no GPU given: the CPU, as asked
    assert resolve_device("cpu", gpu_assigned=True) == torch.device("cpu")  # an explicit choice stands


def test_the_gru_runs_in_fp32_whatever_autocast_asks(monkeypatch):
    """PyTorch's autocast sends cuDNN RNNs to fp16 on CUDA; raysweep's GRU4Rec runs its GRU with
    autocast off and fp32 inputs on every device, so its record's precision is the truth."""
    model = GRU4Rec(50, hidden=8)
    seen = []
    forward = model.gru.forward

    def spy(inputs, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), inputs.dtype))
        return forward(inputs, *args, **kwargs)

    monkeypatch.setattr(model.gru, "forward", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(torch.randint(1, 50, (3, 7)))
    assert seen == [(False, torch.float32)] and hidden.dtype == torch.float32


@pytest.mark.parametrize("backend", full_ce.BACKENDS)
def test_the_chunked_ce_loss_is_fp32_under_bf16_autocast(backend):
    if backend == "torch" and full_ce.DEFAULT_BACKEND != "torch":
        pytest.skip("this PyTorch has no F.linear_cross_entropy options (torch < 2.13)")
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(512, 64, generator=generator)
    w = torch.randn(3000, 64, generator=generator) * 0.1
    y = torch.randint(0, 3000, (512,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = full_ce.cross_entropy(h, y, w, backend=backend)
    # The reference: the same bf16 inputs, logits and softmax in fp32.
    reference = torch.nn.functional.cross_entropy(h.bfloat16().float() @ w.bfloat16().float().T, y)
    assert loss.dtype == torch.float32
    assert abs(loss.item() / reference.item() - 1) < 1e-3, (loss.item(), reference.item())
    ignored = y.clone()
    ignored[::2] = -1  # half the rows count for nothing (a fixed-shape batch's padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = full_ce.cross_entropy(h, ignored, w, backend=backend, ignore=True)
    expected = torch.nn.functional.cross_entropy(h[1::2].bfloat16().float() @ w.bfloat16().float().T, y[1::2])
    assert abs(half.item() / expected.item() - 1) < 1e-3


def test_a_trial_must_fit_its_share_of_a_card_not_the_whole_card():
    cfg = TrialConfig.from_dict({"dataset": "beauty", "loss": "ce"})
    users, length = 1000, 10
    split = Split(np.arange(1, users * length + 1) % 500 + 1, np.arange(0, users * length + 1, length), 500)
    device = torch.device("cpu")
    check_fits(cfg, split, device)  # the machine's memory holds it
    with pytest.raises(UserError, match=r"more than the .* GiB of its 1e-06 share of cpu"):
        check_fits(cfg, split, device, share=1e-6)
    graphed = cfg.replaced(cuda_graphs=True)
    from raysweep.core.memory import training_bytes

    sizes = [
        training_bytes(
            c.model,
            c.loss,
            c.negatives,
            c.hidden,
            c.blocks,
            c.heads,
            c.max_len,
            c.batch_size,
            c.factors,
            users,
            500,
            c.cuda_graphs,
        )
        for c in (cfg, graphed)
    ]
    assert sizes[1] > sizes[0]  # the graphs' pool holds a step's activations too


def test_an_index_less_cuda_device_is_left_current_and_an_indexed_one_is_made_current(monkeypatch):
    from raysweep.core import devices

    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    devices.use_device(torch.device("cuda"))  # (PyTorch 2.11's set_device raises on it)
    devices.use_device(torch.device("cuda", 1))
    assert made_current == [torch.device("cuda", 1)]


def test_a_record_from_a_newer_pytorch_loads_and_its_trial_refuses_before_any_work(monkeypatch):
    from raysweep.core import config, trial

    for module in (config, trial):  # as under PyTorch 2.11
        monkeypatch.setattr(module, "default_ce_backend", lambda: "raysweep")
    monkeypatch.setattr(trial, "load_split", lambda cfg: pytest.fail("data loaded before the check"))
    cfg = TrialConfig.from_dict(
        dict(dataset="synthetic-chains", model="sasrec", loss="ce", ce_backend="torch")
    )
    assert cfg.ce_backend == "torch"  # a record written under PyTorch 2.13 reads back as written
    with pytest.raises(UserError, match=r"^setting ce_backend 'torch' needs PyTorch >= 2.13 \(this is "):
        trial.run_trial(cfg)
