"""Seconds per epoch (training + validation) against the paper's code and the targets.

    python benchmarks/speed.py [--device cuda] [--epochs 2] [--steps 0] [--compile [MODE]] [--only beauty-sasrec+ ...]

Each row trains real epochs of the shared trainer on the real data with the paper's settings
and reports the last epoch (the first pays for warm-up). `--steps K` (CPU) times K training
steps and one validation pass instead and scales them to a whole epoch; the table says so.
Reference seconds: the paper's code on an H100 (ANCHORS.md); compare only on that card.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from raysweep.config import TrialConfig
from raysweep.models import build_model
from raysweep.split import sequence_data
from raysweep.train import load_split, resolve_device
from raysweep.trainer import batch_loss, evaluate_split, fit, validation_users

# name: (settings, paper's code s/epoch train + validation on H100, target s/epoch)
ROWS = {
    "ml-1m-sasrec+": (dict(dataset="ml-1m", loss="ce"), 6.49, 0.20),
    "beauty-sasrec+": (dict(dataset="beauty", loss="ce"), 11.86, 0.50),
    "beauty-sasrec+3000": (dict(dataset="beauty", loss="sampled_ce", negatives=3000), 14.59, 0.50),
    "beauty-bert4rec": (dict(dataset="beauty", model="bert4rec"), 10.56, 1.0),
    "beauty-gru4rec": (dict(dataset="beauty", model="gru4rec", loss="ce"), 11.23, 0.50),
    "beauty-sasrec-bce": (dict(dataset="beauty", loss="bce"), 12.20, 0.50),
}


def epoch_seconds(cfg: TrialConfig, device: torch.device, epochs: int, steps: int,
                  compile: str | None = None) -> tuple[float, float, str]:
    """(train seconds, validation seconds) of one epoch, and how they were measured.

    `compile`: a torch.compile mode for the model's forward (dynamic shapes: every batch is
    trimmed to its own longest window; "reduce-overhead" adds CUDA graphs), the losses and
    the evaluator as they are.
    """
    data = sequence_data(load_split(cfg), cfg.max_len, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len, cfg.dropout)
    model = model.to(device)
    if compile:
        model = torch.compile(model, mode=compile, dynamic=True)
    if not steps:
        history = fit(model, cfg, data, device).history  # max_epochs = epochs, patience large
        return history[-1]["train_seconds"], history[-1]["val_seconds"], f"epoch {epochs} of {epochs}"
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.amp)

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=cuda)
    order_rng = np.random.default_rng(0)
    order = order_rng.permutation(data.num_users)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [order[b : b + cfg.batch_size] for b in range(0, len(order), cfg.batch_size)]
    # Warm-up steps: a compiled model recompiles once more for dynamic shapes, a few steps in.
    warm = 20 if compile else 2
    for i, batch in enumerate(batches[: steps + warm]):
        if i == warm:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        with autocast():
            loss = batch_loss(model, cfg, data, torch.as_tensor(batch, device=device),
                              data.train_lengths_host[batch], generator, order_rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    float(loss.detach())  # wait for the device before reading the clock
    train = (time.perf_counter() - started) / steps * len(batches)
    started = time.perf_counter()
    evaluate_split(model, cfg, data, "val", validation_users(data.num_users, cfg.val_users, 0, device), autocast)
    return train, time.perf_counter() - started, f"{steps} steps scaled to {len(batches)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="time this many steps and scale (0: whole epochs)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="the model's forward through torch.compile (mode: default, reduce-overhead, ...)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {card}\n")
    # The paper's-code figures were measured on an H100: a ratio means something only there.
    same_card = "H100" in card
    print("| run | train s | val s | s/epoch | paper's code (H100) | speed-up | target | measured |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.only:
        settings, paper, target = ROWS[name]
        cfg = TrialConfig.from_dict(dict(settings, device=str(device), max_epochs=args.epochs, patience=args.epochs))
        train, val, how = epoch_seconds(cfg, device, args.epochs, args.steps, args.compile)
        total = train + val
        ratio = f"{paper / total:.1f}x" if same_card else "- (other device)"
        label = f"{name} (compiled, {args.compile})" if args.compile else name
        print(f"| {label} | {train:.2f} | {val:.2f} | {total:.2f} | {paper:.2f} "
              f"| {ratio} | <= {target:.2f} {'(met)' if total <= target else ''} | {how} |", flush=True)


if __name__ == "__main__":
    main()
