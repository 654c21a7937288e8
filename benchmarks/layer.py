"""One LoRA Linear: plain frozen nn.Linear vs PEFT's LoRA Linear vs lorakit's fused op.

Run:  PYTHONPATH=src python benchmarks/layer.py [--repeats 30] [--device cpu|cuda]

Prints a table of median milliseconds (forward, forward+backward) and ratios vs
PEFT, and writes the same table into the ``## layer.py`` section of
benchmarks/RESULTS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.ops import lora_linear

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, git_rev, machine, section, write_section  # noqa: E402

SHAPES = [(576, 576), (576, 1536), (1536, 576)]  # (in, out), SmolLM2-135M's projections


class _One(nn.Module):
    def __init__(self, in_f: int, out_f: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_f, out_f)


def _peft_layer(in_f: int, out_f: int, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_One(in_f, out_f), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    layer = model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # B = 0 at init would be an unfair shortcut for nobody
    return layer


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fns: dict, repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median ms per callable; the callables take turns so background load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _variants(in_f: int, out_f: int, r: int, bf16: bool, device: str):
    """name -> forward callable taking x, for one shape and precision."""
    peft = _peft_layer(in_f, out_f, r).to(device)
    base = peft.base_layer
    A, B = peft.lora_A["default"].weight, peft.lora_B["default"].weight
    s = peft.scaling["default"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    W, b = base.weight.detach().to(dtype), base.bias.detach().to(dtype)  # frozen, stored in compute dtype
    plain = nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    def run_peft(x):
        with autocast:
            return peft(x)

    return {
        "nn.Linear (frozen)": plain,
        "PEFT lora.Linear": run_peft,
        "lorakit lora_linear": lambda x: lora_linear(x, W, b, A, B, s, compute_dtype=dtype),
    }


def _bench(tokens: int, r: int, repeats: int, warmup: int, device: str) -> list[dict]:
    rows = []
    for bf16 in (False, True):
        for in_f, out_f in SHAPES:
            dtype = torch.bfloat16 if bf16 else torch.float32
            x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(tokens, out_f, device=device, dtype=dtype)
            variants = _variants(in_f, out_f, r, bf16, device)

            def fwd(fn, x=x):
                def run():
                    with torch.no_grad():
                        fn(x)

                return run

            def fwd_bwd(fn, x=x, dy=dy):
                return lambda: fn(x).backward(dy)

            f = _median_ms({n: fwd(fn) for n, fn in variants.items()}, repeats, warmup, device)
            fb = _median_ms({n: fwd_bwd(fn) for n, fn in variants.items()}, repeats, warmup, device)
            prec, shape = ("bf16" if bf16 else "fp32"), f"{tokens}x({in_f}->{out_f})"
            rows += [dict(precision=prec, shape=shape, name=n, fwd=f[n], fwd_bwd=fb[n]) for n in variants]
    return rows


def _table(rows: list[dict]) -> str:
    peft = {(r["precision"], r["shape"]): r for r in rows if r["name"].startswith("PEFT")}
    lines = [
        "| precision | shape | layer | fwd ms | fwd+bwd ms | fwd vs PEFT | fwd+bwd vs PEFT |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = peft[(r["precision"], r["shape"])]
        lines.append(
            f"| {r['precision']} | {r['shape']} | {r['name']} | {r['fwd']:.3f} | {r['fwd_bwd']:.3f} "
            f"| {r['fwd'] / p['fwd']:.2f}x | {r['fwd_bwd'] / p['fwd_bwd']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible to torch here; falling back to CPU.", file=sys.stderr)
        device = "cpu"
    torch.manual_seed(0)
    rows = _bench(args.tokens, args.rank, args.repeats, args.warmup, device)
    table = _table(rows)
    header = (
        f"Machine: {machine()}; commit {git_rev()}; device {device}; r={args.rank}; {args.tokens} tokens; "
        f"median of {args.repeats} runs, the layers taking turns.\n\n"
        "fwd is under no_grad; fwd+bwd computes grads for x, A, B (base frozen). bf16: lorakit and "
        "nn.Linear hold the base weight in bf16 and compute in bf16; PEFT runs under torch.autocast(bf16). "
        "Ratio < 1 means faster than PEFT."
    )
    print(header + "\n\n" + table)
    if not args.no_write:
        write_section(section("layer.py", device), header + "\n\n" + table)
        print(f"\nwrote the {section('layer.py', device)} section of {RESULTS}")


if __name__ == "__main__":
    main()
