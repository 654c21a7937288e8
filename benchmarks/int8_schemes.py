"""Int8 schemes for the frozen base's matmuls: kernel speed and model quality (issue 13).

Speed: median time of ``x Wᵀ`` at the default model's shapes (batch 8 x 64 = 512 rows;
576->1536 is a gate/up forward and a down_proj input gradient, 1536->576 the reverse,
576->576 attention), each kernel with everything it needs per call (quantizing the
activations, scaling the output), as a fraction of the fp32 sgemm time; plus one
decoding row (N=1, memory-bound).

Quality: SmolLM2-135M-Instruct with every Linear but the head fake-quantized in fp32
(the same rounding the kernels do), KL(fp32 || scheme) of the next-token distribution
per token and top-1 agreement, on 8 x 64 tokens of examples/data/quickstart_train.jsonl;
SmoothQuant's per-channel maxima are calibrated on quickstart_eval.jsonl (or README.md's text).

Decoding head (``--decode-head``): the ``--quantize int8`` model with its output head fp32 or int8 weights
(lorakit.int8_head): quality as above, and the head's time for a few rows (decoding steps).

    python benchmarks/int8_schemes.py [--repeats 20] [--no-quality] [--no-speed] [--no-head] [--rounding]
                                      [--decode-head]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_rev, machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(512, 576, 1536), (512, 1536, 576), (512, 576, 576), (1, 576, 1536), (1, 1536, 576)]


# ----------------------------------------------------------------------------- speed


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _taking_turns(fns):
    """One callable that calls ``fns[0]``, ``fns[1]``, ... in turn, one per call."""
    turns = itertools.cycle(fns)
    return lambda: next(turns)()


def _wq(W):
    scale = W.abs().amax(1) / 127
    return torch.round(W / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def kernels(N: int, K: int, M: int) -> dict:
    """name -> zero-argument callable computing ``x Wᵀ`` (fp32 out) the way that kernel would."""
    from lorakit.int8 import _qlinear, int8_matmul, quantize_rows

    torch.manual_seed(0)
    x, W = torch.randn(N, K), torch.randn(M, K) * 0.05
    Q, scale = _wq(W)
    zp = torch.zeros(M, dtype=torch.int64)
    packed = torch.ops.onednn.qlinear_prepack(Q, None)
    qW = torch.quantize_per_channel(W, scale.double(), zp, 0, torch.qint8)
    fb = torch.ops.quantized.linear_prepack(qW, None)
    xb, Wb = x.bfloat16(), W.bfloat16()
    smooth = torch.rand(K) + 0.5  # SmoothQuant: x / s per column (a pass unless folded into the previous op)
    out = torch.rand(K) < 0.01  # ~1% outlier columns kept in fp32 (LLM.int8-style decomposition)
    Wout = W[:, out].contiguous()

    def fb_rows():  # per-row scales through fbgemm's static fp32-output op: x pre-divided by its row scale
        s = x.abs().amax(1, keepdim=True) / 127
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x / s, 1.0, 128, fb).mul_(s)

    def onednn_tensor():  # one scale per tensor
        s = x.abs().amax() / 127
        q = torch.round(x / s).add_(128).to(torch.uint8)
        return _qlinear(q, packed, scale, zp).mul_(s)

    def outliers():
        xi = x.clone()
        xi[:, out] = 0
        y = int8_matmul(xi, packed, scale, zp)
        return y.addmm_(x[:, out], Wout.t())

    q8, _ = quantize_rows(x)
    xq = (q8.to(torch.int16) - 128).to(torch.int8)
    ks = {
        "fp32 sgemm": lambda: F.linear(x, W),
        "bf16": lambda: F.linear(xb, Wb),
        "fbgemm dynamic, per-tensor (quantize_dynamic)": lambda: torch.ops.quantized.linear_dynamic(x, fb, False),
        "fbgemm static fp32-out, per-row (x pre-scaled)": fb_rows,
        "oneDNN qlinear, per-tensor": onednn_tensor,
        "oneDNN qlinear, per-row (lorakit.int8)": lambda: int8_matmul(x, packed, scale, zp),
        "  of which: quantize rows": lambda: quantize_rows(x),
        "  of which: the int8 GEMM": lambda: _qlinear(q8, packed, scale, zp),
        "oneDNN per-row + SmoothQuant column pass": lambda: int8_matmul(x / smooth, packed, scale, zp),
        "oneDNN per-row + ~1% outlier columns fp32": outliers,
        "torch._int_mm GEMM only (int32 -> fp32; no quantizing, no scales)": lambda: torch._int_mm(xq, Q.t()).float(),
        "torch._weight_int8pack_mm (weight-only int8)": lambda: torch._weight_int8pack_mm(x, Q, scale),
    }
    if N < 17:  # torch._int_mm needs at least 17 rows on the CPU
        del ks["torch._int_mm GEMM only (int32 -> fp32; no quantizing, no scales)"]
    return ks


def speed_table(repeats: int) -> str:
    rows, names = {}, None
    for N, K, M in SHAPES:
        ks = kernels(N, K, M)
        names = names or list(ks)
        base = _time(ks["fp32 sgemm"], repeats)
        for name, fn in ks.items():
            slow = name.startswith("torch._weight_int8pack_mm")  # 30-60x fp32 here: 2 runs are enough
            t = _time(fn, 2 if slow else repeats)
            rows.setdefault(name, {})[(N, K, M)] = (t, t / base)
    head = "| kernel | " + " | ".join(f"{N}x{K}->{M}" for N, K, M in SHAPES) + " |"
    lines = [head, "|" + "---|" * (len(SHAPES) + 1)]
    for name in names or []:
        cells = []
        for shape in SHAPES:
            got = rows[name].get(shape)
            cells.append("-" if got is None else f"{got[1]:.2f}x ({got[0] * 1e3:.3f} ms)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- quality


def _rows_of(path: Path) -> list[str]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tokens(tok, rows, n: int, length: int) -> torch.Tensor:
    ids: list[int] = []
    for row in rows:
        ids += tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        if len(ids) >= n * length:
            break
    return torch.tensor(ids[: n * length]).view(n, length)


def _fq_rows(x, per_tensor=False):
    amax = x.abs().amax() if per_tensor else x.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x / s).clamp(-127, 127) * s


def _fq_weight(W):
    Q, scale = _wq(W)
    return Q.float() * scale[:, None]


def quality_table() -> str:
    from lorakit.models import load_model

    model, tok = load_model()
    model.eval()
    data = ROOT / "examples" / "data"
    ids = _tokens(tok, _rows_of(data / "quickstart_train.jsonl"), 8, 64)
    calib = _tokens(tok, _rows_of(data / "quickstart_eval.jsonl"), 8, 64)
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    with torch.no_grad():
        ref = model(ids).logits.float().log_softmax(-1)
    # Per input channel max |x| on calibration tokens (SmoothQuant) and each layer's original weight.
    # Calibration sets: quickstart_eval (the eval text's domain) and the README's prose (another domain).
    readme = tok((ROOT / "README.md").read_text()[:6000], return_tensors="pt").input_ids[:, : 8 * 64]
    amaxes: dict[str, dict[str, torch.Tensor]] = {"same": {}, "readme": {}}
    for key, tokens in (("same", calib), ("readme", readme.view(-1, 64))):
        amax = amaxes[key]
        hooks = [
            m.register_forward_pre_hook(
                lambda m, a, n=n, amax=amax: amax.__setitem__(
                    n, torch.maximum(amax.get(n, a[0].new_zeros(a[0].shape[-1])), a[0].abs().flatten(0, -2).amax(0))
                )
            )
            for n, m in linears.items()
        ]
        with torch.no_grad():
            model(tokens)
        for h in hooks:
            h.remove()
    orig = {n: m.weight.data.clone() for n, m in linears.items()}

    def scheme(
        act: str | None,
        where=lambda n: True,
        smooth: float | None = None,
        outlier: float | None = None,
        calib: str = "same",
        w_free: bool = False,
    ):
        amax = amaxes[calib]

        def fwd(n, m):
            W = orig[n]
            if not where(n):
                return lambda x: F.linear(x, W, m.bias)
            s = None
            if smooth is not None and w_free:  # from the activations only: siblings reading one x share it
                s = amax[n].clamp_min(1e-5) ** smooth
            elif smooth is not None:
                s = amax[n].clamp_min(1e-5) ** smooth / W.abs().amax(0).clamp_min(1e-5) ** (1 - smooth)
            Wq = _fq_weight(W * s if s is not None else W)

            def f(x):
                xs = x / s if s is not None else x
                if act is None:
                    return F.linear(xs, Wq, m.bias)
                if outlier is not None:
                    big = (x.abs() > outlier).flatten(0, -2).any(0)
                    xi = xs.masked_fill(big, 0.0)
                    y = F.linear(_fq_rows(xi, act == "tensor"), Wq, m.bias)
                    return y + F.linear(x[..., big], W[:, big])
                return F.linear(_fq_rows(xs, act == "tensor"), Wq, m.bias)

            return f

        return fwd

    attn = lambda n: "self_attn" in n  # noqa: E731
    mlp = lambda n: ".mlp." in n  # noqa: E731
    schemes = {
        "int8 weights only (per channel)": scheme(None),
        "w8 + a8 per tensor (quantize_dynamic)": scheme("tensor"),
        "w8 + a8 per row": scheme("row"),
        "w8 + a8 per row, attention only": scheme("row", attn),
        "w8 + a8 per row, MLP only": scheme("row", mlp),
        "w8 + a8 per row, outlier columns (|x|>6) fp32": scheme("row", outlier=6.0),
        "SmoothQuant a=0.5 + a8 per tensor": scheme("tensor", smooth=0.5),
        "SmoothQuant a=0.5 + a8 per row": scheme("row", smooth=0.5),
        "SmoothQuant a=0.8 + a8 per row": scheme("row", smooth=0.8),
        "SmoothQuant a=0.5 + a8 per row, calibrated on README prose": scheme("row", smooth=0.5, calib="readme"),
        "smoothing s=max|x|^0.5 (no W term) + a8 per row": scheme("row", smooth=0.5, w_free=True),
        "smoothing s=max|x|^0.5 (no W term), README calibration": scheme(
            "row", smooth=0.5, w_free=True, calib="readme"
        ),
    }
    lines = ["| scheme | KL per token | top-1 agreement |", "|---|---|---|"]
    for name, make in schemes.items():
        for n, m in linears.items():
            m.forward = make(n, m)
        with torch.no_grad():
            got = model(ids).logits.float().log_softmax(-1)
        for m in linears.values():
            del m.forward
        kl = F.kl_div(got.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="batchmean").item()
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        lines.append(f"| {name} | {kl:.4f} | {top1:.1%} |")
        print(lines[-1], flush=True)
    # What lorakit runs: the real kernels on a quantized copy (SmoothQuant on the built-in calibration text).
    import copy

    from lorakit.int8_model import calibration_ids, quantize_int8

    for name, calib in (
        ("lorakit.int8 as built, no smoothing (oneDNN kernels)", None),
        ("lorakit.int8 as built: SmoothQuant on its built-in text (oneDNN kernels)", calibration_ids(tok)),
    ):
        q = quantize_int8(copy.deepcopy(model), calibration=calib)
        with torch.no_grad():
            got = q(ids).logits.float().log_softmax(-1)
        kl = F.kl_div(got.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="batchmean").item()
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        lines.append(f"| {name} | {kl:.4f} | {top1:.1%} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def head_table(repeats: int) -> str:
    """The output head in int8 (issue 13 keeps it fp32): quality of its logits and input gradient, and its speed.

    Quality: SmolLM2's final hidden states on the same 8 x 64 tokens, the head alone quantized (the rest fp32):
    KL and top-1 of the logits; for the backward, the relative error of ``dL/dh = (softmax - onehot) W``
    with the probabilities quantized per row (weight scales folded in), as :meth:`Int8Linear.grad_input` does.
    Speed: one step's labelled rows of the long train_step workload (434) through the real kernels.
    """
    from lorakit.int8 import Int8Linear, quantize_weight_int8
    from lorakit.models import load_model

    model, tok = load_model()
    model.eval()
    ids = _tokens(tok, _rows_of(ROOT / "examples" / "data" / "quickstart_train.jsonl"), 8, 64)
    with torch.no_grad():
        h = model.model(ids).last_hidden_state.float()
    W = model.lm_head.weight.detach().float()
    ref = (h @ W.t()).log_softmax(-1)
    head = Int8Linear(*quantize_weight_int8(W), None)  # the kernels' codes (7-bit where the CPU saturates)
    lines = ["| head | KL per token | top-1 agreement | rel. error of dL/dh |", "|---|---|---|---|"]
    hh, tgt = h[:, :-1].reshape(-1, h.shape[-1]), ids[:, 1:].reshape(-1)
    dz = (hh @ W.t()).softmax(-1)
    dz[torch.arange(len(tgt)), tgt] -= 1
    g_ref = dz @ W
    for name, logits, g in (
        ("int8 weights only", h @ head.dequantized().t(), dz @ head.dequantized()),
        ("int8 weights + a8 per row (the kernels)", head.output(h.reshape(-1, h.shape[-1])).view_as(ref), None),
    ):
        got = logits.log_softmax(-1)
        kl = F.kl_div(got.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="batchmean").item()
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        g = head.grad_input(dz) if g is None else g
        err = ((g - g_ref).norm() / g_ref.norm()).item()
        lines.append(f"| {name} | {kl:.4f} | {top1:.1%} | {err:.1%} |")
    x, dzr = torch.randn(434, W.shape[1]), torch.randn(434, W.shape[0])
    t = {
        "forward fp32": _time(lambda: x @ W.t(), repeats),
        "forward int8": _time(lambda: head.output(x), repeats),
        "input gradient fp32": _time(lambda: dzr @ W, repeats),
        "input gradient int8": _time(lambda: head.grad_input(dzr), repeats),
    }
    lines += ["", "| head matmul, 434 rows, 576 -> 49152 | ms | x fp32 |", "|---|---:|---:|"]
    for name, v in t.items():
        base = t[name.replace("int8", "fp32")]
        lines.append(f"| {name} | {v * 1e3:.1f} | {v / base:.2f} |")
    return "\n".join(lines)


def decode_head_table(repeats: int) -> str:
    """The output head with int8 weights for inference (``--quantize int8``, :mod:`lorakit.int8_head`).

    Quality: the ``--quantize int8`` model (SmoothQuant and, where weights get 7 bits, GPTQ, calibrated on the
    built-in text, as the CLI does) with the head fp32 or int8, KL(fp32 || it) and top-1 against the fp32 model
    on 8 x 64 tokens of quickstart_train.jsonl. Speed: the head alone for 1-64 rows, fp32 ``F.linear`` against
    :class:`~lorakit.int8_head.Int8Head`; two copies of each take turns, so neither is in cache when called (as in
    a decoding step, where the 30 layers' weights pass through the cache between two head calls).
    """
    import copy

    from lorakit.int8_head import Int8Head
    from lorakit.int8_model import quantize_for_inference
    from lorakit.models import load_model

    model, tok = load_model()
    model.eval()
    ids = _tokens(tok, _rows_of(ROOT / "examples" / "data" / "quickstart_train.jsonl"), 8, 64)
    with torch.no_grad():
        ref = model(ids).logits.float().log_softmax(-1)
    lines = ["| `--quantize int8` model | KL per token | top-1 |", "|---|---:|---:|"]
    for name, head in (("head fp32", False), ("head int8 weights, fp32 activations", True)):
        q = quantize_for_inference(copy.deepcopy(model), "int8", tok, head=head)
        assert isinstance(q.lm_head, Int8Head) == head
        with torch.no_grad():
            got = q(ids).logits.float().log_softmax(-1)
        kl = F.kl_div(got.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="batchmean").item()
        lines.append(f"| {name} | {kl:.4f} | {(got.argmax(-1) == ref.argmax(-1)).float().mean().item():.1%} |")
    W = model.lm_head.weight.detach().float()
    weights = [W, W.clone()]
    heads = [Int8Head.from_linear(model.lm_head) for _ in weights]  # two copies of the codes
    lines += ["", f"| head {W.shape[1]} -> {W.shape[0]}, rows | fp32 ms | int8 ms | x fp32 |", "|---|---:|---:|---:|"]
    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 64):
            x = torch.randn(rows, W.shape[1])
            t32 = _time(_taking_turns([functools.partial(F.linear, x, w) for w in weights]), repeats)
            t8 = _time(_taking_turns([functools.partial(h, x) for h in heads]), repeats)
            lines.append(f"| {rows} | {t32 * 1e3:.2f} | {t8 * 1e3:.2f} | {t8 / t32:.2f} |")
    return "\n".join(lines)


def rounding_table() -> str:
    """Weight rounding for the real kernels: round to nearest against GPTQ (:mod:`lorakit.gptq`).

    The int8 model as :func:`lorakit.int8_model.quantize_int8` builds it (SmoothQuant, alpha 0.5) with each
    ``rounding``, calibrated on lorakit's built-in text (what ``--quantize int8`` uses) or on 8 x 64 tokens of
    quickstart_eval.jsonl (the task's own domain, as ``lorakit train`` calibrates on its training rows); the
    codes are this CPU's (:func:`lorakit.int8.weight_code_max`: 63 a side where the kernel saturates, else 127).
    KL and top-1 against fp32 on the same 8 x 64 tokens as ``quality_table``; seconds: the whole ``quantize_int8``
    call.
    """
    import copy

    from lorakit.int8 import weight_code_max
    from lorakit.int8_model import calibration_ids, quantize_int8
    from lorakit.models import load_model

    model, tok = load_model()
    model.eval()
    data = ROOT / "examples" / "data"
    ids = _tokens(tok, _rows_of(data / "quickstart_train.jsonl"), 8, 64)
    with torch.no_grad():
        ref = model(ids).logits.float().log_softmax(-1)
    code_max = weight_code_max()

    def score(q) -> str:
        with torch.no_grad():
            got = q(ids).logits.float().log_softmax(-1)
        kl = F.kl_div(got.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="batchmean").item()
        return f"{kl:.4f} | {(got.argmax(-1) == ref.argmax(-1)).float().mean().item():.1%}"

    lines = [
        f"| weight rounding ({code_max} codes a side) | calibration | KL per token | top-1 | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    sets = {
        "built-in text": calibration_ids(tok),
        "8 x 64 of quickstart_eval": _tokens(tok, _rows_of(data / "quickstart_eval.jsonl"), 8, 64),
    }
    for cname, calib in sets.items():
        for rounding in ("nearest", "gptq"):
            t = time.perf_counter()
            q = quantize_int8(copy.deepcopy(model), calibration=calib, rounding=rounding)
            took = time.perf_counter() - t
            lines.append(f"| {rounding} | {cname} ({calib.numel()} tokens) | {score(q)} | {took:.0f} |")
            print(lines[-1], flush=True)
            del q
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-head", action="store_true", help="skip the output head's int8 table")
    ap.add_argument("--rounding", action="store_true", help="add the GPTQ weight-rounding table (~1.5 min)")
    ap.add_argument("--decode-head", action="store_true", help="only the int8 decoding head's table (printed)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    if args.decode_head:  # a table of its own, printed: RESULTS.md quotes it in its End-to-end notes
        print(f"{machine()}; {git_rev()}\n\n{decode_head_table(args.repeats)}")
        return
    speed = "" if args.no_speed else speed_table(args.repeats)
    print(speed, flush=True)
    quality = "" if args.no_quality else quality_table()
    head = "" if args.no_head else head_table(max(3, args.repeats // 4))
    print(head, flush=True)
    rounding = rounding_table() if args.rounding else ""
    body = (
        f"{machine()}; {git_rev()}\n\n"
        "Kernel time for `x Wᵀ` as a fraction of fp32 sgemm (median of "
        f"{args.repeats}; each int8 row includes quantizing x and scaling y):\n\n{speed}\n"
    )
    if quality:
        body += (
            "\nQuality on SmolLM2-135M-Instruct (every Linear but the head fake-quantized; "
            f"8 x 64 tokens; KL(fp32 || int8) of next-token distributions):\n\n{quality}\n"
        )
    if head:
        body += (
            f"\nThe output head in int8 (it stays fp32: `head_table`'s docstring says what is measured):\n\n{head}\n"
        )
    if rounding:
        body += f"\nWeight rounding for the real kernels (`rounding_table`'s docstring):\n\n{rounding}\n"
    if not args.no_write:
        write_section("int8_schemes", body)


if __name__ == "__main__":
    main()
