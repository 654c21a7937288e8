"""Would int8 frozen-base matmuls help on a CUDA GPU? (issue 13: "on CUDA too where it measurably helps")

Times ``x Wᵀ`` for a frozen base Linear the ways a GPU could run it, at the default model's
training shapes (rows = tokens of a batch; 576->1536 is a gate/up forward and a down_proj
input gradient, 1536->576 the reverse, 576->576 attention) and, for scale, one 7B-class MLP
shape (4096->11008):

* fp32 ``F.linear`` (full fp32, TF32 off) and bf16 ``F.linear`` (what ``precision: auto`` picks on a GPU);
* ``torch._int_mm`` alone on operands quantized beforehand (int8 x int8 -> int32; the lower bound
  of any int8 scheme, since it leaves out quantizing the activations and scaling the output);
* the whole int8 linear lorakit's CPU path computes (per-row activation scales, ``_int_mm``,
  both scales applied to the int32 result), eager and compiled by ``torch.compile``.

Median of ``--repeats`` timings of 20 calls each (CUDA events). Writes the "int8_cuda" section of
RESULTS.md.

    python benchmarks/int8_cuda.py [--repeats 15] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_rev, machine, write_section  # noqa: E402

SHAPES = [(4096, 576, 1536), (4096, 1536, 576), (4096, 576, 576), (16384, 576, 1536), (4096, 4096, 11008)]
CALLS = 20


def _ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return sorted(times)[len(times) // 2]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ≈ s · p`` per row: int8 codes ``p`` and fp32 scales ``s [rows, 1]``."""
    s = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x / s).to(torch.int8), s


def int8_linear(x: torch.Tensor, q_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` with ``W ≈ diag(w_scale) Q`` (``q_t`` = Qᵀ, column-major) and x quantized per row."""
    p, s = quantize_rows(x)
    return torch._int_mm(p, q_t).float() * s * w_scale


def _measure(m: int, k: int, n: int, compiled, repeats: int) -> tuple[dict, float]:
    """Each way's median ms for ``rows m, in k, out n``, and the compiled int8 linear's error."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * 0.05
    w_scale = w.abs().amax(1) / 127
    q_t = torch.round(w / w_scale[:, None]).to(torch.int8).t()  # (k, n), column-major
    p, _ = quantize_rows(x)
    xb, wb = x.bfloat16(), w.bfloat16()
    ref = x.double() @ w.double().t()
    err = ((compiled(x, q_t, w_scale).double() - ref).norm() / ref.norm()).item()
    t = {
        "fp32": _ms(lambda: F.linear(x, w), repeats),
        "bf16": _ms(lambda: F.linear(xb, wb), repeats),
        "_int_mm alone": _ms(lambda: torch._int_mm(p, q_t), repeats),
        "int8 eager": _ms(lambda: int8_linear(x, q_t, w_scale), repeats),
        "int8 compiled": _ms(lambda: compiled(x, q_t, w_scale), repeats),
    }
    return t, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("int8_cuda.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    compiled = torch.compile(int8_linear, dynamic=False)
    rows = []
    for m, k, n in SHAPES:
        t, err = _measure(m, k, n, compiled, args.repeats)
        rows.append((m, k, n, t, err))
        print(f"{m}x{k}->{n}: " + ", ".join(f"{a} {b * 1e3:.1f} µs" for a, b in t.items()), flush=True)

    names = ["fp32", "bf16", "_int_mm alone", "int8 eager", "int8 compiled"]
    lines = [
        f"Machine: {machine()}; commit {git_rev()}.",
        "",
        "Median µs per call (20 calls per timing, 15 timings), and the ratio to bf16 (what `precision: auto` runs on a "
        "GPU). Error: the compiled int8 linear's relative Frobenius error against float64 (random data).",
        "",
        "| rows x in -> out | " + " | ".join(names) + " | int8 compiled / bf16 | _int_mm alone / bf16 | error |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for m, k, n, t, err in rows:
        cells = " | ".join(f"{t[a] * 1e3:.1f}" for a in names)
        lines.append(
            f"| {m} x {k} -> {n} | {cells} | {t['int8 compiled'] / t['bf16']:.2f}x "
            f"| {t['_int_mm alone'] / t['bf16']:.2f}x | {err:.1e} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("int8_cuda", body)


if __name__ == "__main__":
    main()
