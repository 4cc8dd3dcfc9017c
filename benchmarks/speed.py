"""Seconds per epoch (training + validation) against the paper's code and the targets.

    python benchmarks/speed.py [--device cuda] [--epochs 2 | --converge] [--steps 0] [--compile [MODE]]
                               [--cuda-graphs] [--no-amp] [--only beauty-sasrec+ ...]

Each row trains real epochs of the shared trainer on the real data with the paper's settings
and reports the median epoch after the first (which pays for warm-up), with the test NDCG@10
of the same run: after `--epochs` epochs, or, with `--converge`, after training by the
paper's rule, next to the paper's (raysweep.report.paper). `--steps K` (CPU) times K training
steps and one validation pass instead and scales them to a whole epoch; the table says so,
and how many ops one eager step dispatches (`kernel_ops`).
Reference seconds: the paper's code on an H100 (raysweep.report.paper.PAPER_CODE_SECONDS); the
speed-up is printed only on that card.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from raysweep.core.config import TrialConfig
from raysweep.core.devices import autocast_for, precision, resolve_device
from raysweep.core.errors import cli
from raysweep.core.evaluation import evaluate_split, validation_users
from raysweep.core.models import build_model
from raysweep.core.split import sequence_data
from raysweep.core.trainer import epoch_batches, fit, make_optimizer, make_step, train_steps
from raysweep.core.trial import load_split
from raysweep.report.paper import PAPER_CODE_SECONDS, paper_row

# name: (settings, target s/epoch on an H100; the paper's code there: PAPER_CODE_SECONDS)
ROWS = {
    "ml-1m-sasrec+": (dict(dataset="ml-1m", loss="ce"), 0.20),
    "beauty-sasrec+": (dict(dataset="beauty", loss="ce"), 0.50),
    "beauty-sasrec+3000": (dict(dataset="beauty", loss="sampled_ce", negatives=3000), 0.50),
    "beauty-bert4rec": (dict(dataset="beauty", model="bert4rec"), 1.0),
    "beauty-gru4rec": (dict(dataset="beauty", model="gru4rec", loss="ce"), 0.50),
    "beauty-sasrec-bce": (dict(dataset="beauty", loss="bce"), 0.50),
}


# Ops that only make a view of a tensor: they launch no kernel on a GPU.
VIEW_OPS = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "permute",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "alias",
    "as_strided",
    "detach",
    "_reshape_alias",
    "split",
    "unbind",
}


def dispatched(run) -> list[tuple[str, object]]:
    """The ops `run()` dispatches (backward included), each with its arguments: tensors as
    (shape, dtype), anything else as it is. (The tests read it too: which ops would wait for a
    GPU, and whether two batches of a bucket make the same program.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            described = tree_map(
                lambda a: (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a, args
            )
            calls.append((func.overloadpacket.__name__, described))
            return func(*args, **(kwargs or {}))

    with Record():
        run()
    return calls


def kernel_ops(run) -> int:
    """How many ops that compute (views left out) `run()` dispatches on its device: on a GPU about
    the kernels an eager step launches, which bound its speed when the tensors are small."""
    return sum(name not in VIEW_OPS for name, _ in dispatched(run))


def epoch_seconds(
    cfg: TrialConfig, device: torch.device, steps: int, compile: str | None = None
) -> tuple[float, float, float | None, str]:
    """(train seconds, validation seconds) of one epoch, the run's test NDCG@10 (None when
    only `steps` steps ran), and how the seconds were measured (with, for an eager step, the
    ops it dispatches: `kernel_ops`).

    Whole epochs: the trainer's `fit` under the trial's budget (`max_epochs`, `patience`),
    the median epoch after the first (which pays for warm-up), then the test of the best
    epoch's weights, as a trial does. `compile`: a torch.compile mode for the model's
    forward (dynamic shapes: every batch is trimmed to its own longest window;
    "reduce-overhead" adds CUDA graphs), the losses and the evaluator as they are.
    """
    data = sequence_data(load_split(cfg), cfg.max_len, device)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model, data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len, cfg.dropout
    )
    model = model.to(device)
    if compile:
        model = torch.compile(model, mode=compile, dynamic=True)
    autocast = autocast_for(cfg.amp, device, cfg.cuda_graphs)
    if not steps:
        history = fit(model, cfg, data, device).history
        timed = history[1:] or history
        test = evaluate_split(model, cfg, data, "test", torch.arange(data.num_users, device=device), autocast)
        return (
            float(np.median([h["train_seconds"] for h in timed])),
            float(np.median([h["val_seconds"] for h in timed])),
            test["ndcg@10"],
            f"median of epochs 2-{len(history)}"
            if len(history) > 2
            else f"epoch {len(history)} of {len(history)}",
        )
    optimizer = make_optimizer(model, cfg, device)
    order_rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    step = make_step(model, optimizer, cfg, data, device, generator, order_rng, autocast)
    batches = epoch_batches(order_rng.permutation(data.num_users), cfg.batch_size)
    # Warm-up steps: a compiled model recompiles once more for dynamic shapes, a few steps in;
    # a CUDA graph is captured after 3 eager steps.
    warm = 20 if compile else 5 if cfg.cuda_graphs else 2
    train_steps(step, batches[:warm], device)
    ops = "" if cfg.cuda_graphs or compile else f", {kernel_ops(lambda: step(batches[warm]))} ops/step"
    warm += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    total = train_steps(step, batches[warm : warm + steps], device)
    float(total)  # wait for the device before reading the clock
    train = (time.perf_counter() - started) / steps * len(batches)
    started = time.perf_counter()
    evaluate_split(
        model, cfg, data, "val", validation_users(data.num_users, cfg.val_users, cfg.seed, device), autocast
    )
    return train, time.perf_counter() - started, None, f"{steps} steps scaled to {len(batches)}{ops}"


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--device", default="auto")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=2, help="train this many epochs (default 2)")
    budget.add_argument(
        "--converge", action="store_true", help="train by the paper's rule (patience, max epochs)"
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="time this many steps and scale (0: whole epochs)"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="the model's forward through torch.compile (mode: default, reduce-overhead, ...)",
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="each step replayed as a CUDA graph (cuda_graphs)"
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast where the device has native bf16 (--no-amp: fp32)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    card = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"device: {card}\n")
    # The paper's-code figures were measured on an H100: a ratio means something only there.
    same_card = "H100" in card
    print(
        "| run | train s | val s | s/epoch | paper's code (H100) | speed-up | target | test NDCG@10 (paper) "
        "| measured |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.only:
        settings, target = ROWS[name]
        paper = sum(PAPER_CODE_SECONDS[name])
        budget = {} if args.converge else dict(max_epochs=args.epochs, patience=args.epochs)
        cfg = TrialConfig.from_dict(
            dict(settings, device=str(device), cuda_graphs=args.cuda_graphs, amp=args.amp, **budget)
        )
        train, val, ndcg, how = epoch_seconds(cfg, device, args.steps, args.compile)
        how = f"{precision(cfg.amp, device)}, {how}"
        total = train + val
        ratio = f"{paper / total:.1f}x" if same_card else "- (other device)"
        label = (
            name
            + (f" (compiled, {args.compile})" if args.compile else "")
            + (" (CUDA graphs)" if args.cuda_graphs else "")
        )
        published = paper_row(cfg.dataset, cfg.label)
        paper_ndcg = f" ({published.ndcg10})" if published else ""
        quality = (
            "-"
            if ndcg is None
            else f"{ndcg:.4f}{paper_ndcg}" + ("" if args.converge else f" after {args.epochs} epochs")
        )
        print(
            f"| {label} | {train:.2f} | {val:.2f} | {total:.2f} | {paper:.2f} "
            f"| {ratio} | <= {target:.2f} {'(met)' if total <= target else ''} | {quality} | {how} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
