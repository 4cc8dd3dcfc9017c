"""Full CE over a large catalogue: plain (tokens x items logits at once) vs chunked CE.

    python benchmarks/chunked_ce.py [--device cuda] [--positions-scale 1.0]

Chunked, at the chunk size `full_ce` picks, with each of its back-ends: raysweep's own
`ChunkedCE` ("raysweep", any PyTorch) and PyTorch's `F.linear_cross_entropy` with chunking
options ("torch", PyTorch >= 2.13; "-" where this torch lacks it).

Shapes: ML-20M (26,744 items, hidden 256, L=200, batch 128) and Yelp (148,415 items, hidden
64, L=50, batch 128), every position a target. Reports seconds per step (forward + backward)
and peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS), each
variant in its own process. On a CPU use --positions-scale to keep a step short.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

SHAPES = {"ml-20m": (26_744, 256, 200), "yelp": (148_415, 64, 50)}


def _step(variant: str, items: int, hidden: int, positions: int, device: str, queue) -> None:
    from raysweep.core import losses

    torch.manual_seed(0)
    h = torch.randn(positions, hidden, device=device, requires_grad=True)
    w = torch.randn(items + 1, hidden, device=device, requires_grad=True)
    labels = torch.randint(1, items + 1, (positions,), device=device)

    def run():
        if variant == "plain":
            loss = torch.nn.functional.cross_entropy(h @ w[1:].T, labels - 1)
        else:
            loss = losses.ce(h[None], labels[None], w, backend=variant)
        loss.backward()
        h.grad = w.grad = None

    run()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(((time.perf_counter() - started) / repeats, peak))


def measure(variant, items, hidden, positions, device):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_step, args=(variant, items, hidden, positions, device, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--positions-scale", type=float, default=1.0, help="fraction of batch x L positions")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}\n")
    variants = ["plain", "raysweep"] + (["torch"] if hasattr(torch.nn, "LinearCrossEntropyOptions") else [])
    print(
        "| shape | positions | s/step: plain / raysweep chunked / torch chunked "
        "| peak MB: plain / raysweep / torch | memory ratio plain : raysweep |"
    )
    print("|---|---|---|---|---|")
    for shape, (items, hidden, length) in SHAPES.items():
        positions = max(1, int(128 * length * args.positions_scale))
        seconds, peak = zip(*(measure(v, items, hidden, positions, args.device) for v in variants))
        seconds, peak = list(seconds) + ["-"] * (3 - len(variants)), list(peak) + ["-"] * (3 - len(variants))
        print(
            f"| {shape} | {positions} | {' / '.join(x if x == '-' else f'{x:.3f}' for x in seconds)} | "
            f"{' / '.join(x if x == '-' else f'{x / 2**20:.0f}' for x in peak)} | {peak[0] / peak[1]:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
