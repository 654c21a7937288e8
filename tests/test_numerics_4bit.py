"""The 4-bit base's dtype policy: bf16 matmuls, outputs and LoRA terms summed in x's dtype (fp32).

bitsandbytes' ``Linear4bit`` returns its output in the input's dtype, and PEFT adds the
LoRA term to it there; lorakit's ops over a quantized base do the same, autocast or not,
so with bf16 compute a LoRA term much smaller than the base output is not rounded away
(the cause of lorakit nf4's +6.4% loss after 30 steps, benchmarks/RESULTS.md, qlora).

References: float64 sums over the weights decoded independently (test_quant's NF4 table
decoder) and the float64 LoRA formula under autograd; the trainer's hidden dtypes seen
by forward hooks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).parent))
from test_quant import linear4bit, reference_dequant  # noqa: E402
from tiny import make_tiny_model_dir, swiglu_reference64, write_chat_jsonl  # noqa: E402

from lorakit import ops, swiglu  # noqa: E402
from lorakit.branches import LoraSpec  # noqa: E402
from lorakit.train.config import RunConfig  # noqa: E402
from lorakit.train.loop import train  # noqa: E402

# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3): a matmul of bf16-rounded inputs with fp32
# accumulation is within about that, relative in norm; 1e-2 leaves room for the sums over 64-256 terms.
BF16_TOL = 1e-2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


def bf16_base(out_f: int, in_f: int, seed: int):
    """A 4-bit Linear computing in bf16, and its weight decoded in float64."""
    layer, _ = linear4bit(out_f, in_f, "nf4", True, bias=False, seed=seed, compute="bf16")
    from lorakit import quant

    return quant.quantized_base(layer), reference_dequant(layer.weight.data, layer.weight.quant_state)


def factors(out_f: int, in_f: int, r: int, seed: int, b_scale: float):
    gen = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, in_f, generator=gen) * 0.1).requires_grad_()
    B = (torch.randn(out_f, r, generator=gen) * b_scale).requires_grad_()
    return A, B


def test_multi_op_sums_the_lora_term_in_fp32_under_bf16_autocast():
    """q/k/v over bf16-computing 4-bit bases: fp32 outputs, the small LoRA term kept, grads within bf16 error."""
    sizes = [(64, 0), (32, 1), (32, 2)]
    bases, Ws = zip(*[bf16_base(o, 128, s) for o, s in sizes])
    # B ~ 1e-4: the LoRA term is ~1e-3 of the base output, below a bf16 output's rounding (2^-9 relative).
    pairs = [factors(o, 128, 8, 10 + s, 1e-4) for o, s in sizes]
    torch.manual_seed(0)
    x = (torch.randn(4, 6, 128) * 4).requires_grad_()

    def run(zero_b: bool):
        specs = [LoraSpec(b, None, A, B * 0 if zero_b else B, 2.0) for b, (A, B) in zip(bases, pairs)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.lora_linear_multi(x, specs)

    outs, base_only = run(False), run(True)
    dys = [torch.randn_like(y) for y in outs]
    leaves = [x, *(t for pair in pairs for t in pair)]
    grads = torch.autograd.grad(outs, leaves, dys)

    x64 = x.detach().double().requires_grad_()
    p64 = [(A.detach().double().requires_grad_(), B.detach().double().requires_grad_()) for A, B in pairs]
    terms = [2.0 * (x64 @ A.t()) @ B.t() for A, B in p64]
    ref = [x64 @ W.t() + term for W, term in zip(Ws, terms)]
    want = torch.autograd.grad(ref, [x64, *(t for pair in p64 for t in pair)], [d.double() for d in dys])
    for y, y0, y64, term in zip(outs, base_only, ref, terms):
        assert y.dtype == torch.float32  # x's dtype under autocast, as bitsandbytes' Linear4bit returns it
        assert rel_err(y, y64) < BF16_TOL
        assert rel_err(y - y0, term) < BF16_TOL  # summed in bf16, this was off by ~100%
    for g, w in zip(grads, want):
        assert rel_err(g, w) < BF16_TOL
    assert all(g.dtype == torch.float32 for g in grads)


def test_swiglu_op_over_bf16_bases_keeps_down_lora_term_and_matches_float64():
    (gate, Wg), (up, Wu), (down, Wd) = bf16_base(256, 64, 0), bf16_base(256, 64, 1), bf16_base(64, 256, 2)
    pairs = [factors(256, 64, 4, 5, 0.1), factors(256, 64, 4, 6, 0.1), factors(64, 256, 8, 7, 1e-4)]
    torch.manual_seed(1)
    x = (torch.randn(3, 5, 64) * 4).requires_grad_()

    def run(zero_down_b: bool):
        Bs = [B for _, B in pairs]
        if zero_down_b:
            Bs[2] = Bs[2] * 0
        specs = [LoraSpec(b, None, A, B, 2.0) for b, (A, _), B in zip((gate, up, down), pairs, Bs)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return swiglu.lora_swiglu_mlp(x, *specs)

    y, y0 = run(False), run(True)
    dy = torch.randn_like(y)
    leaves = [x, *(t for pair in pairs for t in pair)]
    grads = torch.autograd.grad(y, leaves, dy)

    x64, p64, h64, y64 = swiglu_reference64(x, (Wg, Wu, Wd), pairs, 2.0)
    term = 2.0 * (h64 @ p64[2][0].t()) @ p64[2][1].t()
    want = torch.autograd.grad(y64, [x64, *(t for pair in p64 for t in pair)], dy.double())
    assert y.dtype == torch.float32
    assert rel_err(y, y64) < BF16_TOL
    assert rel_err(y - y0, term) < BF16_TOL  # down's small LoRA term, summed in fp32
    for g, w in zip(grads, want):
        assert rel_err(g, w) < 2 * BF16_TOL  # two bf16 matmuls deep (h, then down)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("numerics4")
    return make_tiny_model_dir(root / "model"), write_chat_jsonl(root / "train.jsonl", n=16)


def test_bf16_run_on_4bit_base_keeps_fp32_stream_and_says_so(assets, tmp_path, capsys, monkeypatch):
    """train.precision bf16 on a 4-bit base: bf16 compute dtype, fp32 attention/MLP outputs into an fp32
    residual stream (the fused 4-bit ops return x's dtype), the policy stated in the start line and summary."""
    from lorakit import models

    seen: dict[str, set] = {"attn": set(), "mlp": set(), "autocast": set()}
    real_load = models.load_model

    def load_and_hook(*a, **k):
        model, tok = real_load(*a, **k)
        layer = model.model.layers[0]

        def on_mlp(module, inputs, out):
            seen["mlp"].add(out.dtype)
            seen["autocast"].add(torch.is_autocast_enabled("cpu"))

        layer.self_attn.register_forward_hook(lambda m, i, o: seen["attn"].add(o[0].dtype))  # set.add: None
        layer.mlp.register_forward_hook(on_mlp)
        return model, tok

    monkeypatch.setattr(models, "load_model", load_and_hook)
    path, data = assets
    cfg = RunConfig.model_validate(
        {
            "model": {"name": str(path), "quantization": "nf4", "compute_dtype": "auto"},
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "data": {"train": str(data)},
            "train": {"steps": 2, "batch_size": 4, "precision": "bf16", "eval_every": 0, "save_every": 0},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    result = train(cfg, device="cpu")
    out = capsys.readouterr().out
    assert result.precision == "bf16"
    assert seen == {"attn": {torch.float32}, "mlp": {torch.float32}, "autocast": {True}}
    policy = "4-bit base: nf4, double quant, compute dtype bf16, 4-bit matmuls in bf16 with outputs and LoRA terms"
    assert out.count(policy) == 2  # start line and summary
    assert "attention and head under bf16 autocast" in out
    assert "4-bit matmuls" in (tmp_path / "run" / "README.md").read_text()  # the model card too
