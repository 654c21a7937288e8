"""Int8 frozen bases (issue 13): the kernel against float64, LoRA over it, training, save/load/merge, errors.

Independent references: float64 sums of the same int8 codes and scales (the kernel's int32 accumulation is
exact, so only the final fp32 scaling rounds), a bound derived from the rounding (half a step per operand),
the fp32 model, PEFT on the full-precision base, and torch's profiler (which kernel ran).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_model_dir, write_chat_jsonl  # noqa: E402

import lorakit  # noqa: E402
from lorakit import int8, int8_model, merging, quant  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402
from lorakit.runs import open_adapter  # noqa: E402
from lorakit.train.config import RunConfig  # noqa: E402
from lorakit.train.loop import train  # noqa: E402

pytestmark = [
    pytest.mark.skipif(int8.int8_support() is not None, reason=f"no int8 kernels: {int8.int8_support()}"),
    pytest.mark.usefixtures("one_thread"),
]


def layer_and_data(n=37, k=96, m=80, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, k, generator=g) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(m, generator=g))
    x = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 4  # rows of very different size
    x[3] = 0.0  # an all-zero row
    x[5, 7] = 40.0  # an outlier
    return lin, x


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("code_max", [None, 127, 63])
def test_quantizers_round_to_nearest_in_float64(code_max):
    lin, x = layer_and_data()
    codes, scale = int8.quantize_weight_int8(lin.weight, code_max)
    top = int8.weight_code_max() if code_max is None else code_max
    w64 = lin.weight.double()
    step = w64.abs().amax(1) / top
    assert torch.allclose(scale.double(), step, rtol=1e-6)
    want = torch.round(w64 / scale.double()[:, None])
    assert (codes.double() - want).abs().max() <= 1 and (codes.double() != want).float().mean() < 1e-3
    assert codes.abs().max() == top and codes.dtype == torch.int8
    q, s = int8.quantize_rows(x)
    assert q.dtype == torch.uint8 and s[3].item() == 1.0 and (q[3] == 128).all()  # zero row: codes 0
    want = torch.round(x.double() / s.double()) + 128
    assert (q.double() - want).abs().max() <= 1 and (q.double() != want).float().mean() < 1e-3


@pytest.mark.parametrize("smoothed", [False, True])
def test_forward_and_grad_input_equal_float64_of_the_same_codes(smoothed):
    lin, x = layer_and_data()
    smooth = torch.rand(lin.in_features, generator=torch.Generator().manual_seed(4)) * 3 + 0.2 if smoothed else None
    layer = int8.Int8Linear.from_linear(lin, smooth)
    Q, w = layer.qweight.double(), layer.weight_scale.double()
    inv = torch.ones(lin.in_features, dtype=torch.float64) if smooth is None else 1 / smooth.double()
    if smoothed:  # W diag(s) is what was quantized; x diag(1/s) is what gets quantized
        assert torch.equal(layer.qweight, int8.quantize_weight_int8(lin.weight * smooth)[0])
        torch.testing.assert_close(layer.input_scale.double(), inv)
    # forward: s_r * w_c * sum_k (q_rk - 128) Q_ck, the sum exact in float64 (as in int32)
    q, s = int8.quantize_rows(x, layer.input_scale)
    want = (q.double() - 128) @ Q.t() * w * s.double()
    got = layer.output(x)
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs() <= 1e-6 * want.abs() + 1e-12).all()  # fp32 scaling only
    # bias and leading dims through forward()
    y = layer(x.view(1, *x.shape))
    torch.testing.assert_close(y[0], got + lin.bias, rtol=0, atol=0)
    # input gradient: dY diag(w) quantized per row, then (r - 128) Q, scaled by t_r and by 1/s per column
    dy = torch.randn(x.shape[0], lin.out_features, generator=torch.Generator().manual_seed(1))
    r, t = int8.quantize_rows(dy * layer.weight_scale)
    want = (r.double() - 128) @ Q * t.double() * inv
    got = layer.grad_input(dy)
    assert ((got.double() - want).abs() <= 1e-6 * want.abs() + 1e-12).all()


def test_a_kernel_that_saturates_gets_7_bit_weights_and_stays_exact():
    """Without VNNI/AMX, u8 x s8 pairs add into a saturating int16; oneDNN told to use AVX2 only behaves so here."""
    code = (
        "import torch\n"
        "from lorakit import int8\n"
        "g = torch.Generator().manual_seed(0)\n"
        "codes, ws = int8.quantize_weight_int8(torch.randn(64, 576, generator=g))\n"
        "q, s = int8.quantize_rows(torch.rand(8, 576, generator=g) * 2 - 1)\n"
        "exact = ((q.double() - 128) @ codes.double().T) * ws.double()\n"
        "zp, pack = torch.zeros(64, dtype=torch.int64), torch.ops.onednn.qlinear_prepack\n"
        "y = int8._qlinear(q, pack(codes, [8, 576]), ws, zp)\n"
        "sat = int8._qlinear(q, pack(torch.full_like(codes, 127), [8, 576]), ws, zp).double()\n"
        "full = ((q.double() - 128) @ torch.full_like(codes, 127).double().T) * ws.double()\n"
        "print(int8.weight_code_max(), float((y.double() - exact).abs().max() / exact.abs().max()),\n"
        "      float((sat - full).abs().max() / full.abs().max()))\n"
    )
    for isa, saturates in (("AVX2", True), ("", None)):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "ONEDNN_MAX_CPU_ISA": isa},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        top, err, sat_err = proc.stdout.split()
        if saturates is None:  # this CPU as it is: whichever it needs, the product is exact
            saturates = float(sat_err) > 1e-3
        assert int(top) == (63 if saturates else 127)
        assert float(err) < 1e-6  # the chosen codes: exact integer math up to the fp32 scaling
        assert (float(sat_err) > 1e-3) == saturates  # full-range codes: wrong exactly where 63 was chosen


def test_int8_against_fp32_within_the_rounding_bound():
    """|x Wᵀ - int8| <= ½ s_r Σ_k |W_ck| + ½ w_c Σ_k |x̂_rk| (+ fp32 slack): half a step per operand."""
    lin, x = layer_and_data()
    layer = int8.Int8Linear.from_linear(lin)
    W = lin.weight.detach()
    exact = x.double() @ W.double().t()
    _, s = int8.quantize_rows(x)
    bound = 0.5 * s.double() * W.double().abs().sum(1) + 0.5 * layer.weight_scale.double() * (
        x.double().abs().sum(1, keepdim=True) + 0.5 * s.double() * W.shape[1]
    )
    err = (layer.output(x).double() - exact).abs()
    assert (err <= bound * 1.0001 + 1e-5).all()
    rel = (err.norm() / exact.norm()).item()
    assert rel < 0.02  # stated bound for Gaussian-like data: 2% relative (measured about 0.6%)
    dy = torch.randn(x.shape[0], W.shape[0], generator=torch.Generator().manual_seed(2))
    exact = dy.double() @ W.double()
    rel = ((layer.grad_input(dy).double() - exact).norm() / exact.norm()).item()
    assert rel < 0.02


def test_one_row_decoding_runs_fbgemm_within_the_same_bound():
    """One row (greedy decoding) goes to fbgemm's dynamic int8 linear; its u8 step over [min, max] of the row is
    at most the symmetric step s_r, so the same half-a-step bound holds."""
    lin, x = layer_and_data()
    layer = int8.Int8Linear.from_linear(lin)
    W = lin.weight.detach()
    for r in (0, 5, 9):  # 5 holds the outlier
        row = x[r : r + 1]
        with torch.profiler.profile() as prof:
            got = layer.output(row)
        names = {e.name for e in prof.events()}
        assert "quantized::linear_dynamic" in names and "onednn::qlinear_pointwise" not in names
        exact = row.double() @ W.double().t()
        _, s = int8.quantize_rows(row)
        bound = 0.5 * s.double() * W.double().abs().sum(1) + 0.5 * layer.weight_scale.double() * (
            row.double().abs().sum(1, keepdim=True) + 0.5 * s.double() * W.shape[1]
        )
        assert ((got.double() - exact).abs() <= bound * 1.0001 + 1e-5).all()
    assert set(layer._packed) == {"row"}  # no oneDNN pack made for one-row calls


def test_smoothing_tames_an_outlier_channel_and_siblings_share_codes(tmp_path, monkeypatch):
    """SmoothQuant against plain per-row quantization on inputs with one huge channel (as LLM activations have)."""
    lin, x = layer_and_data(n=64)
    x[:, 11] *= 60.0  # a systematic outlier channel
    exact = x.double() @ lin.weight.double().t()
    s = (x.abs().amax(0).clamp_min(1e-5) ** 0.5) / (lin.weight.detach().abs().amax(0) ** 0.5)
    errs = []
    for smooth in (None, s):
        layer = int8.Int8Linear.from_linear(lin, smooth)
        errs.append(((layer.output(x).double() - exact).norm() / exact.norm()).item())
        torch.testing.assert_close(layer.dequantized(), lin.weight.detach(), atol=0.05, rtol=0.05)
    assert errs[1] < errs[0] / 2, errs
    # A model: q/k/v (and gate/up) read one input, so they share one smoothing tensor and one quantization.
    from transformers import AutoModelForCausalLM

    path = make_tiny_model_dir(tmp_path / "m", hidden=64)
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = int8_model.calibration_ids(AutoTokenizer.from_pretrained(path))
    assert ids.shape[0] == 1 and ids.shape[1] > 100
    int8_model.quantize_int8(model, calibration=ids)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.input_scale is attn.k_proj.input_scale is attn.v_proj.input_scale
    assert mlp.gate_proj.input_scale is mlp.up_proj.input_scale and mlp.down_proj.input_scale is not None
    # exactly 4 shared inputs per layer (q/k/v, o, gate/up, down), never two layers' tensors at one address
    layers = [m for m in model.modules() if isinstance(m, int8.Int8Linear)]
    assert len({id(m.input_scale) for m in layers}) == 4 * len(model.model.layers)
    _, groups = int8_model.input_maxima(
        AutoModelForCausalLM.from_pretrained(path),
        ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
        ids,
    )
    assert groups == [["model.layers.0.mlp.down_proj"], ["model.layers.1.mlp.down_proj"]]
    assert "SmoothQuant on 14" in int8_model.describe_int8(model)
    quantized = []
    real_quantize = int8.quantize_rows
    monkeypatch.setattr(int8, "quantize_rows", lambda x2, s=None: quantized.append(x2.shape) or real_quantize(x2, s))
    with torch.profiler.profile() as prof, torch.no_grad():
        model(torch.randint(0, 250, (2, 8)))
    gemms = sum(e.name == "onednn::qlinear_pointwise" for e in prof.events())
    assert gemms == 14 and len(quantized) == 8  # per layer: q/k/v once, o once, gate/up once, down once


def mapped_ranges(path):
    """Address ranges this process maps from files under ``path`` (Linux /proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith(str(path)):
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_an_int8_model_keeps_no_view_of_the_checkpoint_file(tmp_path):
    """transformers hands out views of the mmap'd safetensors file: quantized, the model lets go of all of it."""
    import gc

    from lorakit.models import load_model

    path = make_tiny_model_dir(tmp_path / "m", hidden=64)
    model, tokenizer = load_model(path)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in the default model
    ranges = mapped_ranges(path)
    if not ranges:
        pytest.skip("this transformers build copies the checkpoint instead of mapping it")

    def in_file(t):
        return any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges)

    assert any(in_file(p) for p in model.parameters())  # the premise: weights are views of the file
    int8_model.quantize_int8(model, calibration=int8_model.calibration_ids(tokenizer))
    gc.collect()
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and in_file(t)]
    assert mapped_ranges(path) == []  # the mapping is closed: its pages are out of the resident set
    assert model.lm_head.weight is model.model.embed_tokens.weight  # ties hold
    ids = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        int8_model.release_checkpoint(model)  # copies again: same values, same model
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_packed_copies_are_made_once_and_dropped_when_moved():
    lin, x = layer_and_data()
    layer = int8.Int8Linear.from_linear(lin)
    layer.output(x)
    first = layer.packed("forward")[0]
    assert layer.packed("forward")[0] is first and "grad_input" not in layer._packed  # Qᵀ only once needed
    layer.to(torch.float32)
    assert layer._packed == {}
    torch.testing.assert_close(layer.dequantized(), lin.weight.detach(), atol=layer.weight_scale.max().item(), rtol=0)


def test_training_drops_the_codes_once_both_packs_exist_and_nothing_changes():
    lin, x = layer_and_data()
    layer = int8.Int8Linear.from_linear(lin, smooth=torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5)
    codes, W = layer.qweight.clone(), layer.dequantized()
    dy = torch.randn(x.shape[0], 80, generator=torch.Generator().manual_seed(2))
    y, dx = layer.output(x), layer.grad_input(dy)  # a training step's two matmuls: both packs now
    assert layer.qweight is None and set(layer._packed) == {"forward", "grad_input"}
    assert "qweight" not in dict(layer.named_buffers())  # no third copy of the weight alive
    assert torch.equal(layer.codes(), codes)  # rebuilt from the pack of Qᵀ, exactly
    assert torch.equal(layer.dequantized(), W)
    assert torch.equal(layer.output(x), y) and torch.equal(layer.grad_input(dy), dx)
    assert torch.equal(layer.state_dict()["qweight"], codes)  # a state dict still holds the codes
    torch.testing.assert_close(layer(x[:1]), y[:1] + layer.bias, atol=0.05, rtol=0.02)  # one row: fbgemm, same codes
    other = int8.Int8Linear.from_linear(torch.nn.Linear(96, 80), smooth=torch.ones(96))
    other.output(x), other.grad_input(dy)
    other.load_state_dict(layer.state_dict())  # loads into a layer whose codes were dropped: new packs
    assert torch.equal(other.codes(), codes) and torch.equal(other.output(x), y)
    layer.to(torch.float32)  # a move drops the packs and keeps the codes
    assert layer._packed == {} and torch.equal(layer.qweight, codes) and torch.equal(layer.output(x), y)


def test_lora_over_int8_inference_skips_the_autograd_op_and_computes_the_same():
    """Without autograd (generate, eval, serve) a LoraLinear over an int8 base adds its LoRA term to the base's
    own product, as the fused op's forward does: equal outputs, but no autograd node and no argument checks."""
    lin, x = layer_and_data(n=37, k=96, m=80)
    model = torch.nn.Sequential(torch.nn.ModuleDict({"q_proj": int8.Int8Linear.from_linear(lin)}))
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    layer = model[0]["q_proj"]
    for rows in (x, x[5:6], x.view(1, 37, 96)):  # many rows (oneDNN), one row (fbgemm: decoding), 3-D
        want = layer(rows.clone().requires_grad_())  # the fused op: autograd on
        assert want.grad_fn is not None
        with torch.inference_mode(), torch.profiler.profile() as prof:
            got = layer(rows)
        names = {e.name for e in prof.events()}
        assert not any("LoraLinearFn" in n for n in names), sorted(names)
        kernel = "quantized::linear_dynamic" if rows.numel() == 96 else "onednn::qlinear_pointwise"
        assert kernel in names
        assert got.shape == want.shape and torch.equal(got, want.detach())
    with torch.inference_mode():  # and the LoRA term is there: the adapter's delta on the dequantized base
        delta = x @ layer.delta_weight("default").t()
        torch.testing.assert_close(layer(x) - layer.base_layer(x), delta, rtol=1e-4, atol=1e-4)


def test_the_onednn_int8_kernel_runs_and_no_float_matmul_of_the_base():
    lin, x = layer_and_data(n=64, k=96, m=80)
    layer = int8.Int8Linear.from_linear(lin)
    torch.manual_seed(0)
    A = torch.randn(4, 96, requires_grad=True)
    B = torch.randn(80, 4, requires_grad=True)
    xr = x.clone().requires_grad_()
    base = quant.quantized_base(layer)
    assert isinstance(base, int8.Base8bit)
    with torch.profiler.profile(record_shapes=True) as prof:
        y = quant.lora_linear_quantized(xr, base, A, B, 2.0)
        y.square().sum().backward()
    events = [(e.name, e.input_shapes) for e in prof.events()]
    assert sum(name == "onednn::qlinear_pointwise" for name, _ in events) == 2  # forward and grad_x
    # every float matmul left is a LoRA one (rank 4 on one side), never [N, 96] x [96, 80] or its transpose
    for name, shapes in events:
        if name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear"):
            dims = {d for s in shapes if s for d in s}
            assert 4 in dims, (name, shapes)


# ----------------------------------------------------------------------------- LoRA over an int8 base


def test_lora_grads_under_int8_match_fp32(tmp_path):
    """A 2-layer tiny Llama: LoRA grads through int8 bases vs through the fp32 bases, same init and batch."""
    path = make_tiny_model_dir(tmp_path / "m", hidden=64)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for quantize in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if quantize:
            int8_model.quantize_int8(model)
            assert type(model.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"
            assert type(model.lm_head) is torch.nn.Linear  # head stays fp32
        torch.manual_seed(0)
        lorakit.inject(
            model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
        if quantize:
            assert isinstance(model.model.layers[0].self_attn.q_proj.quantized, int8.Base8bit)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    fp, q = grads
    assert fp.keys() == q.keys() and len(fp) == 28
    for n in fp:  # stated tolerance: each LoRA gradient within 5% (relative norm) of fp32's
        rel = ((q[n] - fp[n]).norm() / fp[n].norm()).item()
        assert rel < 0.05, (n, rel)


def test_quantize_int8_errors(monkeypatch, tmp_path):
    path = make_tiny_model_dir(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="quantize the base to int8 first"):
        int8_model.quantize_int8(model)
    with pytest.raises(ConfigError, match="unknown --quantize 'int4'"):
        int8_model.quantize_for_inference(model, "int4")
    with pytest.raises(ConfigError, match="4-bit base"):
        int8_model.check_int8_model_spec({"name": "x", "quantization": "nf4"})
    int8_model.check_int8_model_spec({"name": "x", "quantization": "none"})
    int8_model.check_int8_model_spec("x")


def test_a_machine_without_int8_kernels_gets_a_clear_error(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("could not create a primitive descriptor for an inner product\nmore")

    monkeypatch.setattr(int8, "_qlinear", broken)
    int8.int8_support.cache_clear()
    try:
        assert "does not run on this machine (could not create a primitive descriptor" in int8.int8_support()
        with pytest.raises(ConfigError, match="train.precision: fp32 .*or bf16"):
            int8.require_int8()
        from lorakit.train.device import resolve_precision

        with pytest.raises(ConfigError, match="train.precision: int8 need oneDNN's int8 kernels"):
            resolve_precision("int8", torch.device("cpu"))
        assert math.isnan(int8.measured_speedup.__wrapped__())  # no kernels: nothing to compare
    finally:
        int8.int8_support.cache_clear()
    with pytest.raises(ConfigError, match="runs the frozen base's matmuls on the CPU"):
        resolve_precision("int8", torch.device("meta"))


# ----------------------------------------------------------------------------- training, save, load, merge


def run_cfg(path, data, out, precision, steps=8):
    return RunConfig.model_validate(
        {
            "model": str(path),
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "data": {"train": str(data)},
            "train": {"steps": steps, "batch_size": 4, "lr": 2e-2, "precision": precision, "eval_every": 0},
            "output": {"dir": str(out)},
        }
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    path = make_tiny_model_dir(root / "model", hidden=64)
    data = write_chat_jsonl(root / "train.jsonl", n=32)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp = train(run_cfg(path, data, root / "fp32", "fp32"), device="cpu")
        q = train(run_cfg(path, data, root / "int8", "int8"), device="cpu")
    finally:
        torch.set_num_threads(before)
    return path, data, root, fp, q


def test_training_in_int8_learns_like_fp32(runs):
    path, data, root, fp, q = runs
    assert q.precision == "int8" and "int8 x int8" in q.precision_reason
    if int8.measured_speedup() < 0.9:  # the fp32 run's log and card say what int8 would save here
        assert "train.precision: int8 would run the frozen base's matmuls in" in fp.precision_reason
        assert "train.precision: int8 would run" in (root / "fp32" / "README.md").read_text()
    losses = {}
    for name in ("fp32", "int8"):
        rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert losses["int8"][-1] < losses["int8"][0] - 0.1  # it learns
    for a, b in zip(losses["fp32"], losses["int8"], strict=True):
        assert abs(a - b) <= 0.03 * a  # every step's loss within 3% of fp32's (same init, same batches)
    assert "int8 base: 14 Linear layers" in (root / "int8" / "README.md").read_text()


def test_adapter_trained_in_int8_is_plain_fp32_peft_and_merges(runs, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path, data, root, fp, q = runs
    saved = load_file(str(root / "int8" / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(3))
    # PEFT on the full-precision base, as users deploy it
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), root / "int8").eval()
    with torch.no_grad():
        want = peft_model(ids).logits
    # lorakit merge (full precision, the int8 base plays no part) equals PEFT's unmerged output
    merging.merge_adapter(root / "int8", tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-4, rtol=1e-4)
    # --quantize int8 for inference: the adapter unmerged on the int8 base, close to PEFT's fp32
    model, _, _ = open_adapter(root / "int8", quantize="int8")
    assert type(model.lm_head).__name__ == "Int8Head"  # the head's weights int8 too (lorakit.int8_head)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer.quantized, int8.Base8bit) and not layer.merged_adapters
    with torch.no_grad():
        got = model(ids).logits
    kl = F.kl_div(
        got.log_softmax(-1).flatten(0, 1), want.log_softmax(-1).flatten(0, 1), log_target=True, reduction="batchmean"
    )
    assert kl < 0.02 and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_run_log_says_when_int8_is_faster_here(monkeypatch):
    from lorakit.train.device import int8_note

    monkeypatch.setattr(int8, "measured_speedup", lambda dtype=torch.float32: 0.31)
    note = int8_note("fp32", torch.device("cpu"))
    assert "int8 would run the frozen base's matmuls in 0.31x the fp32 time" in note
    assert int8_note("int8", torch.device("cpu")) == "" and int8_note("fp32", torch.device("meta")) == ""
    monkeypatch.setattr(int8, "measured_speedup", lambda dtype=torch.float32: 1.2)
    assert int8_note("bf16", torch.device("cpu")) == ""  # not faster: nothing said
    monkeypatch.undo()
    ratio = int8.measured_speedup()  # the real measurement: a positive ratio
    assert 0 < ratio < 100


def test_cli_generate_and_eval_take_quantize_int8(runs, capsys, tmp_path):
    from lorakit.cli import main

    path, data, root, fp, q = runs
    run = str(root / "int8")
    assert main(["generate", run, "--prompt", "say hi", "--max-new-tokens", "4", "--quantize", "int8"]) == 0
    assert main(["eval", str(root / "int8"), "--data", str(data), "--no-exact-match", "--quantize", "int8"]) == 0
    assert "eval_loss" in capsys.readouterr().out
    assert main(["generate", str(root / "int8"), "--prompt", "x", "--quantize", "int4"]) == 2
    assert "int4" in capsys.readouterr().err
