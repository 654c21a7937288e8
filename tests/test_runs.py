"""lorakit.runs on tiny offline models: open a run or adapter directory, last metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import make_run, make_run_env, make_tiny_model_dir

import lorakit
from lorakit import runs
from lorakit.errors import AdapterFormatError, ModelMismatchError
from lorakit.models import load_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_run_env(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def opened(env):
    return runs.open_adapter(env["run"])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- open_adapter


def test_open_run_dir_uses_lorakit_yaml_model(env, opened):
    model, tokenizer, info = opened
    assert info.model_source == "lorakit.yaml" and info.model == str(env["tiny"])
    assert info.run_dir == env["run"] and info.adapter_dir == env["run"]
    reference, _ = load_model(env["tiny"])
    lorakit.load_adapter(reference, env["run"])
    assert torch.equal(logits(model), logits(reference))
    with lorakit.disable_adapters(model):  # the adapter changes the output (init_lora_weights=False)
        assert not torch.allclose(logits(model), logits(reference))


def test_open_plain_adapter_uses_base_model_name(env):
    _, _, info = runs.open_adapter(env["adapter"])
    assert info.model_source == "adapter_config.json" and info.run_dir is None
    assert Path(info.model) == env["tiny"]


def test_open_explicit_model_wins(env, tmp_path):
    other = make_tiny_model_dir(tmp_path / "other", seed=5)
    model, _, info = runs.open_adapter(env["run"], model=other)
    assert info.model_source == "argument" and info.model == str(other)
    expected, _ = load_model(other)
    lorakit.load_adapter(expected, env["run"])
    assert torch.equal(logits(model), logits(expected))


def test_base_model_that_is_not_local_falls_back_to_default(env, tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    for f in env["adapter"].iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "SomeOrg/some-hub-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert runs._choose_model(None, adapter, None) == (None, "default")
    config["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert runs._choose_model(None, adapter, None) == ("SmolLM2-135M-Instruct", "adapter_config.json")


def test_open_errors_name_the_path_and_the_fix(env, tmp_path):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        runs.open_adapter(tmp_path / "missing")
    run = tmp_path / "unfinished"
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / "lorakit.yaml").write_text("model: null\n")
    for f in env["adapter"].iterdir():
        (run / "checkpoints" / "step-10" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(AdapterFormatError, match="step-10"):
        runs.open_adapter(run)


def _base_and_lora_dtypes(model) -> tuple[set[torch.dtype], set[torch.dtype]]:
    params = list(model.named_parameters())
    return ({p.dtype for n, p in params if "lora_" not in n}, {p.dtype for n, p in params if "lora_" in n})


def test_open_with_dtype_casts_the_base_and_keeps_the_adapter_fp32(env, opened, tmp_path, monkeypatch):
    calls = []
    real_load = runs.models.load_model

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(runs.models, "load_model", spy)
    model, _, _ = runs.open_adapter(env["run"], dtype="bf16", device="cpu")
    assert calls == [{"dtype": "bf16", "device": "cpu"}]
    assert _base_and_lora_dtypes(model) == ({torch.bfloat16}, {torch.float32})
    torch.testing.assert_close(logits(model).float(), logits(opened[0]), rtol=0.05, atol=0.05)
    stored_bf16 = make_run(make_tiny_model_dir(tmp_path / "bf16", dtype=torch.bfloat16), tmp_path / "run")
    for dtype, expected in (
        (None, torch.bfloat16),
        ("auto", torch.bfloat16),
        ("fp16", torch.float16),
        (torch.float32, torch.float32),
    ):
        model, _, _ = runs.open_adapter(stored_bf16, dtype=dtype)
        assert _base_and_lora_dtypes(model) == ({expected}, {torch.float32}), dtype


def test_natural_key_orders_numbers_numerically():
    names = ["layers.10.mlp", "layers.2.mlp", "layers.2.attn", "embed"]
    assert sorted(names, key=runs.natural_key) == ["embed", "layers.2.attn", "layers.2.mlp", "layers.10.mlp"]


def test_adapter_for_another_model_says_how_the_base_was_chosen(env, tmp_path):
    wide = make_tiny_model_dir(tmp_path / "wide", hidden=48)
    with pytest.raises(ModelMismatchError, match="--model"):
        runs.open_adapter(env["run"], model=wide)


# --------------------------------------------------------------------------- last metrics


def test_last_metrics_keeps_latest_value_of_each_key(tmp_path):
    assert runs.last_metrics(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "eval_loss": 1.7}\n{"step": 3, "loss": 1.2}\n'
        '{"step": 4, "lo'
    )
    assert runs.last_metrics(tmp_path) == {"step": 3, "loss": 1.2, "eval_loss": 1.7}
