"""Where a train step's time goes: torch.profiler over a few steps of one train_step.py variant.

    python benchmarks/profile_step.py --variant lorakit-auto --workload short --device cuda

Prints wall time per step, the kernel time and number of kernel launches per step
(CUDA), and the top operators by self time. Nothing is written to RESULTS.md: this
is a tool for deciding what to optimise, not a result.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from _common import MODEL_ENV  # noqa: E402
from train_step import VARIANTS, WORKLOADS, build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="lorakit-auto", choices=VARIANTS)
    ap.add_argument("--workload", default="short", choices=list(WORKLOADS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", help=f"model directory (sets ${MODEL_ENV})")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    if args.model:
        os.environ[MODEL_ENV] = args.model
    step, batches, _ = build(args.variant, args.workload, args.warmup + args.steps, args.device)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for b in batches[: args.warmup]:
        step(b)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for b in batches[args.warmup :]:
            step(b)
        sync()
        wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    print(f"{args.variant} / {args.workload} on {args.device}: {wall * 1e3:.1f} ms/step wall (under the profiler)")
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        k_time = sum(e.device_time for e in kernels) / 1e3 / args.steps
        print(f"  GPU kernel time {k_time:.1f} ms/step, {len(kernels) / args.steps:.0f} kernels/step")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
