"""LM head + cross-entropy, forward+backward: full logits vs lorakit's chunked loss, old and new.

Run:  PYTHONPATH=src python benchmarks/loss.py [--repeats 9] [--no-write]

The same hidden states (8 x 80 tokens, SmolLM2-135M's width 576, ~45% of the
positions labelled, the rest -100) and the same frozen head (vocab 49,152),
three ways:

    full logits     what transformers (and so PEFT) runs: ``lm_head`` on every position, then
                    ``F.cross_entropy`` over the fp32 ``[tokens, vocab]`` logits
    recompute       lorakit's previous chunked loss (a private copy below): labelled rows only,
                    chunk by chunk, the logits recomputed in backward
    fused           ``lorakit.losses.chunked_cross_entropy``: labelled rows only, each chunk's
                    gradients computed in the forward pass, backward only scales them; on a CPU
                    block by block of the vocabulary (``CPU_VOCAB_BLOCK`` rows: a block's logits
                    stay in the cache), and once more with one block of the whole vocabulary
                    (a chunk's logits held whole, as on a GPU)

Times are medians over rounds in which the variants take turns (background
load hits all alike). Peak memory comes from a fresh subprocess per variant:
how far one forward+backward raises the process's peak RSS (``VmHWM``) above
what it held with the inputs and the head weight loaded (Linux only). Writes the ``## loss.py`` section
of benchmarks/RESULTS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.losses import CPU_VOCAB_BLOCK, DEFAULT_CHUNK_SIZE, chunked_cross_entropy
from lorakit.precision import compute_dtype as _compute_dtype
from lorakit.precision import no_autocast as _no_autocast

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, git_rev, machine, median, rss_kib, write_section  # noqa: E402

BATCH, TOKENS, HIDDEN, VOCAB, LABELLED = 8, 80, 576, 49152, 0.45
OLD_CHUNK = 1024  # what train/fast.py passed to the old function


# ------------------------------------------------ the previous version, for comparison only


class _RecomputeCEFn(torch.autograd.Function):
    """lorakit's chunked cross-entropy before losses.py (commit 386f306): logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, chunk, cd):
        with _no_autocast(hidden.device.type):
            acc = torch.promote_types(cd, torch.float32)
            W = weight.to(cd)
            lse = torch.empty(rows.numel(), dtype=acc, device=hidden.device)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            for c0 in range(0, rows.numel(), chunk):
                h = hidden.index_select(0, rows[c0 : c0 + chunk]).to(cd)
                logits = (h @ W.t()).to(acc)
                lse[c0 : c0 + chunk] = torch.logsumexp(logits, 1)
                picked = logits.gather(1, targets[c0 : c0 + chunk, None]).squeeze(1)
                total += (lse[c0 : c0 + chunk] - picked).sum()
            ctx.chunk, ctx.cd = chunk, cd
            ctx.save_for_backward(hidden, weight, rows, targets, lse)
            return total / max(rows.numel(), 1)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, rows, targets, lse = ctx.saved_tensors
        cd, chunk, m = ctx.cd, ctx.chunk, max(rows.numel(), 1)
        need_h, need_w = ctx.needs_input_grad[:2]
        with _no_autocast(hidden.device.type):
            W = weight.to(cd)
            gh = torch.zeros_like(hidden) if need_h else None
            gw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
            for c0 in range(0, rows.numel(), chunk):
                idx = rows[c0 : c0 + chunk]
                h = hidden.index_select(0, idx).to(cd)
                prob = (h @ W.t()).to(lse.dtype).sub_(lse[c0 : c0 + chunk, None]).exp_()
                t = targets[c0 : c0 + chunk, None]
                prob.scatter_add_(1, t, torch.full_like(t, -1, dtype=prob.dtype))
                dlogits = prob.mul_(grad_loss / m).to(cd)
                if need_h:
                    gh.index_copy_(0, idx, (dlogits @ W).to(gh.dtype))
                if need_w:
                    gw += dlogits.t() @ h
        return gh, (gw.to(weight.dtype) if need_w else None), None, None, None, None


def _recompute_ce(hidden, head_weight, labels, chunk_size=OLD_CHUNK, ignore_index=-100):
    h2, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = (lab != ignore_index).nonzero().squeeze(1)
    cd = _compute_dtype(hidden, None)
    return _RecomputeCEFn.apply(h2, head_weight, rows, lab.index_select(0, rows), chunk_size, cd)


# ------------------------------------------------------------------------------- variants


def _full_logits(hidden, head_weight, labels):
    logits = F.linear(hidden, head_weight)  # (B, T, V), every position
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


VARIANTS = {
    "full logits + F.cross_entropy": _full_logits,
    f"recompute (old, chunk {OLD_CHUNK})": _recompute_ce,
    f"fused, one block of the whole vocabulary (chunk {DEFAULT_CHUNK_SIZE})": functools.partial(
        chunked_cross_entropy, vocab_block=VOCAB
    ),
    f"fused (lorakit.losses, chunk {DEFAULT_CHUNK_SIZE}, vocab blocks of {CPU_VOCAB_BLOCK})": chunked_cross_entropy,
}


def _data(batch=BATCH, tokens=TOKENS, vocab=VOCAB):
    """hidden (B, T, H) requiring grad, a frozen head (V, H) and labels with the first 55% of each row -100."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, tokens, HIDDEN, generator=g).requires_grad_()
    head = torch.randn(vocab, HIDDEN, generator=g).div_(HIDDEN**0.5)  # in place: no second 113 MB
    labels = torch.randint(0, vocab, (batch, tokens), generator=g)
    labels[:, : round(tokens * (1 - LABELLED))] = -100  # the prompt
    return hidden, head, labels


def _step(fn, hidden, head, labels):
    hidden.grad = None
    fn(hidden, head, labels).backward()


def _memory_worker(name: str) -> None:
    """Print how much one forward+backward of ``name`` raises this fresh process's peak RSS (MB)."""
    fn = VARIANTS[name]
    _step(fn, *_data(batch=1, tokens=4, vocab=64))  # load kernels and thread pools first
    hidden, head, labels = _data()
    base = rss_kib("VmRSS")
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    _step(fn, hidden, head, labels)
    peak = rss_kib("VmHWM")
    print(json.dumps({"base_mb": base / 1024, "extra_mb": (peak - base) / 1024}))


def _peak_extra_mb(name: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-worker", name], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _times(repeats: int, warmup: int) -> dict[str, float]:
    data = _data()
    for fn in VARIANTS.values():
        for _ in range(warmup):
            _step(fn, *data)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, fn in VARIANTS.items():
            t0 = time.perf_counter()
            _step(fn, *data)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: median(ts) for name, ts in times.items()}


def _agreement() -> str:
    """Largest loss and hidden-gradient differences of the lorakit variants from the full-logits one."""
    hidden, head, labels = _data()
    out = {}
    for name, fn in VARIANTS.items():
        hidden.grad = None
        loss = fn(hidden, head, labels)
        loss.backward()
        out[name] = (loss.item(), hidden.grad.clone())
    ref_loss, ref_grad = out[next(iter(VARIANTS))]
    dl = max(abs(v[0] - ref_loss) for v in out.values())
    dg = max(((v[1] - ref_grad).norm() / ref_grad.norm()).item() for v in out.values())
    return f"loss {ref_loss:.4f}; vs full logits: |loss diff| <= {dl:.1e}, relative hidden-grad diff <= {dg:.1e}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--memory-worker", metavar="VARIANT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        return _memory_worker(args.memory_worker)
    torch.manual_seed(0)
    check = _agreement()
    ms = _times(args.repeats, args.warmup)
    mem = {name: _peak_extra_mb(name) for name in VARIANTS}
    ref = next(iter(VARIANTS))
    n_lab = BATCH * (TOKENS - round(TOKENS * (1 - LABELLED)))
    lines = [
        "| variant | fwd+bwd ms | x full logits | peak memory added MiB | x full logits |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        lines.append(
            f"| {name} | {ms[name]:.0f} | {ms[name] / ms[ref]:.2f} | {mem[name]['extra_mb']:.0f} "
            f"| {mem[name]['extra_mb'] / mem[ref]['extra_mb']:.2f} |"
        )
    header = (
        f"Machine: {machine()}; commit {git_rev()}.\n\n"
        f"LM head + mean cross-entropy, forward+backward, fp32: hidden {BATCH} x {TOKENS} x {HIDDEN} (requires grad), "
        f"frozen head {VOCAB} x {HIDDEN}, {n_lab} of {BATCH * TOKENS} positions labelled. Median of {args.repeats} "
        f"rounds, variants taking turns. Peak memory added: growth of a fresh process's peak RSS during one "
        f"forward+backward, above the inputs and the {VOCAB * HIDDEN * 4 / 2**20:.0f} MiB head weight "
        f"(base RSS {mem[ref]['base_mb']:.0f} MiB). Check: {check}."
    )
    table = "\n".join(lines)
    print(header + "\n\n" + table)
    if not args.no_write:
        write_section("loss.py", header + "\n\n" + table)
        print(f"\nwrote the loss.py section of {RESULTS}")


if __name__ == "__main__":
    main()
