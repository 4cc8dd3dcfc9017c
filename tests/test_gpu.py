"""GPU-only checks (skipped without CUDA): the training step never waits on the device."""
import pytest
import torch

from raysweep.config import TrialConfig
from raysweep.models import build_model
from raysweep.split import leave_one_out, sequence_data
from raysweep.data import load_interactions
from raysweep import trainer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model, loss, negatives", [("sasrec", "ce", None), ("sasrec", "sampled_ce", 30),
                                                    ("sasrec", "bce", None), ("bert4rec", None, None)])
def test_training_step_has_no_device_to_host_sync(model, loss, negatives):
    import numpy as np

    cfg = TrialConfig.from_dict(dict(dataset="synthetic-chains", model=model, loss=loss, negatives=negatives))
    device = torch.device("cuda")
    data = sequence_data(leave_one_out(load_interactions(cfg.dataset)), cfg.max_len, device)
    net = build_model(cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len, cfg.dropout).to(device)
    optimizer = torch.optim.Adam(net.parameters(), fused=True)
    rng, generator = np.random.default_rng(0), torch.Generator(device=device).manual_seed(0)
    batch = np.arange(128)
    users = torch.as_tensor(batch, device=device)
    for step in range(3):
        torch.cuda.set_sync_debug_mode("error" if step else "default")  # the first step may warm up
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_value = trainer.batch_loss(net, cfg, data, users, data.train_lengths_host[batch], generator, rng)
        optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        optimizer.step()
    torch.cuda.set_sync_debug_mode("default")
