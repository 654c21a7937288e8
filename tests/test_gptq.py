"""GPTQ weight rounding for int8 bases (issue 13's quality on CPUs with 63 codes a side).

Independent references: the paper's unblocked algorithm written out in float64 with the inverse Hessian
downdated column by column (no Cholesky factor, no blocks), round to nearest (GPTQ must lose less of the
layer's output on the inputs it was given), and the fp32 model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_model_dir  # noqa: E402

from lorakit import gptq, int8, int8_model  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated(n=200, k=48, m=40, seed=0):
    """Inputs with correlated channels of very different size (as a model's are) and a weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) * torch.rand(k, generator=g) * 3
    w = torch.randn(m, k, generator=g) * 0.05
    return x, w


def gptq_float64(w, gram, code_max, damp):
    """Frantar et al.'s algorithm as its Eq. 2-3 say: quantize column i, push its error onto the later columns
    by ``H⁻¹[i, j] / H⁻¹[i, i]``, then remove i from ``H⁻¹`` (Schur complement). float64 throughout."""
    w = w.double().clone()
    scale = w.abs().amax(1) / code_max
    h = gram.double() + damp * gram.double().diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros_like(w)
    for i in range(w.shape[1]):
        q = torch.round(w[:, i] / scale).clamp(-code_max, code_max)
        codes[:, i] = q
        err = (w[:, i] - q * scale) / hinv[i, i]
        w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes, scale


def output_error(x, w, codes, scale):
    exact = x.double() @ w.double().t()
    got = x.double() @ (codes.double() * scale.double()[:, None]).t()
    return ((got - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("code_max", [63, 7])
def test_gptq_equals_the_papers_algorithm_in_float64(code_max):
    x, w = correlated()
    gram = x.double().T @ x.double()
    codes, scale = gptq.gptq_quantize(w, gram, code_max, damp=0.01, block=16)
    ref_codes, ref_scale = gptq_float64(w, gram, code_max, 0.01)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    same = (codes.double() == ref_codes).float().mean().item()
    assert same > 0.995, same  # fp32 pushes against float64: a code may differ only at a near-tie
    assert abs(output_error(x, w, codes, scale) - output_error(x, w, ref_codes, ref_scale)) < 1e-3
    assert codes.dtype == torch.int8 and codes.abs().max() <= code_max


def test_gptq_loses_less_of_the_output_than_rounding_to_nearest():
    x, w = correlated(seed=1)
    for code_max in (63, 15):
        nearest = int8.quantize_weight_int8(w, code_max)
        got = gptq.gptq_quantize(w, x.double().T @ x.double(), code_max)
        torch.testing.assert_close(got[1], nearest[1])  # the same scales: only the codes move
        assert output_error(x, w, *got) < 0.8 * output_error(x, w, *nearest)


def test_blocks_do_not_change_the_codes():
    x, w = correlated(k=70, seed=2)
    gram = x.double().T @ x.double()
    runs = [gptq.gptq_quantize(w, gram, 63, block=b)[0] for b in (1, 8, 32, 70, 128)]
    for codes in runs[1:]:
        assert (codes == runs[0]).float().mean().item() > 0.995


def test_a_channel_that_never_fired_rounds_to_nearest_and_pushes_nothing():
    x, w = correlated(seed=3)
    x[:, 5] = 0.0
    gram = x.double().T @ x.double()
    codes, scale = gptq.gptq_quantize(w, gram, 63)
    assert torch.equal(codes[:, 5], int8.quantize_weight_int8(w, 63)[0][:, 5])
    # The other channels are quantized as if channel 5 did not exist (under the same absolute damping:
    # the dead channel counts as a diagonal of 1 in the mean that the damping is a fraction of).
    keep = [i for i in range(w.shape[1]) if i != 5]
    live = gram.diagonal().sum().item()
    damp = gptq.DAMP * (live + 1) / 48 / (live / 47)
    alone, _ = gptq.gptq_quantize(w[:, keep], gram[keep][:, keep], 63, damp=damp, block=5)
    assert (codes[:, keep] == alone).float().mean().item() > 0.995
    assert torch.isfinite(scale).all()


def test_bad_arguments_are_named():
    x, w = correlated()
    with pytest.raises(ValueError, match=r"gram must be \[48, 48\]"):
        gptq.gptq_quantize(w, torch.eye(47), 63)
    with pytest.raises(ValueError, match="damp must be positive"):
        gptq.gptq_quantize(w, torch.eye(48), 63, damp=0.0)


# ----------------------------------------------------------------------------- in quantize_int8


@pytest.fixture
def tiny(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model_dir(tmp_path / "m", hidden=64)
    tok = AutoTokenizer.from_pretrained(path)

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    return load, int8_model.calibration_ids(tok)


needs_int8 = pytest.mark.skipif(int8.int8_support() is not None, reason=f"no int8 kernels: {int8.int8_support()}")


@needs_int8
def test_gptq_codes_stack_siblings_and_match_each_layer_alone(tiny):
    load, ids = tiny
    model = load()
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    smooth = int8_model.smoothing_factors(model, names, ids)
    got = int8_model.gptq_codes(model, names, ids, smooth, code_max=63)
    assert sorted(got) == sorted(names)
    # Each layer alone, from its own input captured by a hook: the same codes as the stacked siblings'.
    inputs = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"):
        x = inputs[name].reshape(-1, inputs[name].shape[-1]).double() / smooth[name].double()
        w = model.get_submodule(name).weight.detach() * smooth[name]
        codes, scale = gptq.gptq_quantize(w, x.T @ x, 63)
        assert (got[name][0] == codes).float().mean().item() > 0.995, name
        torch.testing.assert_close(got[name][1], scale)


@needs_int8
def test_quantize_int8_with_gptq_is_closer_to_fp32(tiny, monkeypatch):
    load, ids = tiny
    monkeypatch.setattr(int8_model, "weight_code_max", lambda: 63)
    monkeypatch.setattr(int8, "weight_code_max", lambda: 63)  # round to nearest's default codes too
    fp32 = load()
    with torch.no_grad():
        ref = fp32(ids).logits.log_softmax(-1)
    kl = {}
    for rounding in ("nearest", "gptq", "auto"):
        model = int8_model.quantize_int8(load(), calibration=ids, rounding=rounding)
        layers = [m for m in model.modules() if isinstance(m, int8.Int8Linear)]
        assert len(layers) == 14 and all(m.qweight.abs().max() <= 63 for m in layers)
        assert {m.rounding for m in layers} == {"nearest" if rounding == "nearest" else "gptq"}
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.input_scale is attn.k_proj.input_scale is attn.v_proj.input_scale
        with torch.no_grad():
            got = model(ids).logits.log_softmax(-1)
        kl[rounding] = torch.nn.functional.kl_div(got[0], ref[0], log_target=True, reduction="batchmean").item()
    assert kl["gptq"] < 0.8 * kl["nearest"], kl
    assert kl["auto"] == kl["gptq"]
    assert "GPTQ rounding on 14" in int8_model.describe_int8(model)
    assert "(gptq)" in repr(model.model.layers[0].mlp.down_proj)


@needs_int8
def test_auto_rounds_to_nearest_with_8_bit_codes_or_no_calibration(tiny, monkeypatch):
    load, ids = tiny
    called = []
    monkeypatch.setattr(int8_model, "gptq_codes", lambda *a, **k: called.append(1) or {})
    monkeypatch.setattr(int8_model, "weight_code_max", lambda: 127)
    int8_model.quantize_int8(load(), calibration=ids)
    monkeypatch.setattr(int8_model, "weight_code_max", lambda: 63)
    model = int8_model.quantize_int8(load())
    assert not called and "GPTQ" not in int8_model.describe_int8(model)
    int8_model.quantize_int8(load(), calibration=ids)
    assert called == [1]


@needs_int8
def test_quantize_int8_rounding_errors(tiny):
    load, ids = tiny
    model = load()
    with pytest.raises(ConfigError, match="unknown int8 weight rounding 'best'; use one of auto, nearest, gptq"):
        int8_model.quantize_int8(model, calibration=ids, rounding="best")
    with pytest.raises(ConfigError, match="GPTQ rounding needs calibration token ids"):
        int8_model.quantize_int8(model, rounding="gptq")
    assert not int8_model.is_int8_model(model)  # nothing changed by a refused call


# ----------------------------------------------------------------------------- calibrated on the run's rows


def test_calibration_from_examples_takes_the_first_rows_and_tops_up_short_data(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(tiny[0]().name_or_path))
    rows = [{"input_ids": list(range(i * 100, i * 100 + 90)), "labels": [-100] * 90} for i in range(10)]
    ids = int8_model.calibration_from_examples(rows, tok, tokens=200)
    assert ids.shape == (1, 200) and ids.dtype == torch.long
    assert ids[0].tolist() == list(range(0, 90)) + list(range(100, 190)) + list(range(200, 220))
    builtin = int8_model.calibration_ids(tok)[0].tolist()
    few = int8_model.calibration_from_examples(rows[:1], tok, tokens=512)  # 90 < 256 tokens: the built-in text too
    assert few[0].tolist() == (list(range(90)) + builtin)[:512]
    assert int8_model.calibration_from_examples([], tok)[0].tolist() == builtin[:512]


@needs_int8
def test_an_int8_run_calibrates_on_its_own_training_rows(tmp_path, monkeypatch):
    from tiny import write_chat_jsonl

    from lorakit.train.config import RunConfig
    from lorakit.train.loop import train

    path = make_tiny_model_dir(tmp_path / "m", hidden=64)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 256  # a context shorter than CALIBRATION_TOKENS: one row that fits it
    (path / "config.json").write_text(json.dumps(config))
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=64)
    seen = []
    real = int8_model.quantize_int8
    monkeypatch.setattr(int8_model, "quantize_int8", lambda m, calibration=None: seen.append(calibration) or real(m))
    cfg = {
        "model": str(path),
        "lora": {"r": 4, "target_modules": "all-linear"},
        "data": {"train": str(data), "eval_fraction": 0.0},
        "train": {"steps": 1, "batch_size": 4, "precision": "int8", "eval_every": 0},
        "output": {"dir": str(tmp_path / "out")},
    }
    train(RunConfig.model_validate(cfg), device="cpu")
    from transformers import AutoTokenizer

    from lorakit.examples import load_examples

    examples, _ = load_examples(data, AutoTokenizer.from_pretrained(path))
    want = [t for e in examples for t in e["input_ids"]][:256]
    assert len(seen) == 1 and seen[0][0].tolist() == want
