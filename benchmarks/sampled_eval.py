"""The test evaluation's time with and without the popularity sampler (BERT4Rec's protocol: each
target also ranked among 100 negatives drawn by popularity), on one dataset, for an untrained
SASRec (evaluation time does not depend on the weights).

    python benchmarks/sampled_eval.py [--dataset beauty] [--device cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raysweep.core.config import TrialConfig
from raysweep.core.devices import autocast_for, resolve_device
from raysweep.core.evaluation import popularity_sampler, rank_split
from raysweep.core.models import build_model
from raysweep.core.split import sequence_data
from raysweep.core.trial import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="beauty")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = TrialConfig.from_dict(dict(dataset=args.dataset, model="sasrec", loss="ce", device=args.device))
    device = resolve_device(cfg.device)
    split = load_split(cfg)
    data = sequence_data(split, cfg.max_len, device)
    torch.manual_seed(0)
    sizes = (data.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.max_len, cfg.dropout)
    model = build_model(cfg.model, *sizes).to(device)
    users = torch.arange(data.num_users, device=device)
    autocast = autocast_for(cfg.amp, device)
    timings: dict[str, list[float]] = {"full ranking": [], "full + popularity-sampled": []}
    for _ in range(args.repeats):
        for name, sampler in (("full ranking", None), ("full + popularity-sampled", True)):
            if sampler:
                sampler = popularity_sampler(cfg, split, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            rank_split(model, cfg, data, "test", users, autocast, sampler)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - started)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.dataset}: {data.num_users:,} test users x {data.num_items:,} items on {where}")
    for name, seconds in timings.items():
        print(f"  {name:28s} {statistics.median(seconds):7.2f} s (median of {len(seconds)})")
    base, extra = (statistics.median(v) for v in timings.values())
    print(f"  the sampler adds {extra - base:+.2f} s ({100 * (extra / base - 1):+.0f} %)")


if __name__ == "__main__":
    main()
