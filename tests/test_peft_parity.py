"""PEFT is the oracle: adapters cross between lorakit and PEFT with equal outputs."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import make_gpt2, make_llama
from safetensors.torch import load_file

import lorakit

# (model factory, LoraConfig kwargs) — each runs in both directions.
CASES = {
    "basic": (make_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "regex": (make_llama, dict(r=4, target_modules=r".*\.(k_proj|down_proj)")),
    "patterns": (
        make_llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 6},
            alpha_pattern={"v_proj": 32},
        ),
    ),
    "rslora": (make_llama, dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"])),
    "bias_all": (lambda: make_llama(bias=True), dict(r=4, target_modules=["q_proj"], bias="all")),
    "bias_lora_only": (
        lambda: make_llama(bias=True),
        dict(r=4, target_modules=["q_proj", "gate_proj"], bias="lora_only"),
    ),
    "modules_to_save": (make_llama, dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "layers_to_transform": (
        make_llama,
        dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    "embedding": (make_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    "exclude": (make_llama, dict(r=4, target_modules="all-linear", exclude_modules=["o_proj"])),
    "all_linear": (make_llama, dict(r=4, target_modules="all-linear")),
    "gpt2_conv1d": (
        make_gpt2,
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "gpt2_all_linear": (make_gpt2, dict(r=4, target_modules="all-linear", fan_in_fan_out=True)),
}


def perturb_trainable(model: torch.nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor (LoRA, biases, modules_to_save) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def load_in_peft_without_warnings(base: torch.nn.Module, path) -> peft.PeftModel:
    """PEFT loads the adapter with no complaint (e.g. "Found missing adapter keys"), deprecation notices aside."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(path)).eval()
    complaints = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    assert complaints == []
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_to_peft(case, tmp_path, input_ids):
    factory, kwargs = CASES[case]
    base = factory()
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(init_lora_weights=False, **kwargs))
    perturb_trainable(model)
    ours = logits(model, input_ids)
    assert not torch.allclose(ours, logits(base, input_ids)), "the adapter must change the output"
    lorakit.save_adapter(model, tmp_path / "a")
    theirs_model = load_in_peft_without_warnings(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(theirs_model, input_ids), ours, rtol=1e-5, atol=1e-5)
    # Same trainable-parameter accounting as PEFT for the same config.
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    fresh = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
    assert lorakit.trainable_parameters(fresh) == tuple(peft_model.get_nb_trainable_parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_lorakit(case, tmp_path, input_ids):
    factory, kwargs = CASES[case]
    base = factory()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    perturb_trainable(pm)
    pm.eval()
    theirs = logits(pm, input_ids)
    pm.save_pretrained(str(tmp_path / "p"))
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(logits(model, input_ids), theirs, rtol=1e-5, atol=1e-5)
    assert lorakit.trainable_parameters(model)[0] == 0, "loaded for inference: nothing trainable"


def test_merge_and_unload_equals_peft(tmp_path, input_ids):
    base = make_llama(bias=True)
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    perturb_trainable(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    theirs = pm.merge_and_unload()
    ours = lorakit.merge_and_unload(lorakit.load_adapter(copy.deepcopy(base), tmp_path / "p"))
    assert type(ours.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert sd_t.keys() == sd_o.keys()
    for k in sd_t:
        torch.testing.assert_close(sd_o[k], sd_t[k], rtol=1e-6, atol=1e-6, msg=k)


def test_two_adapters_non_default_name(tmp_path, input_ids):
    base = make_llama()
    model = lorakit.inject(
        copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    lorakit.add_adapter(
        model, "other", lorakit.LoraConfig(r=2, target_modules=["v_proj", "q_proj"], init_lora_weights=False)
    )
    lorakit.set_adapter(model, "other")
    perturb_trainable(model)
    lorakit.save_adapter(model, tmp_path / "out")  # default
    lorakit.save_adapter(model, tmp_path / "out", adapter_name="other")
    assert (tmp_path / "out" / "other" / "adapter_config.json").is_file()
    keys = load_file(str(tmp_path / "out" / "other" / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight" in keys
    assert not any(".other." in k or ".default." in k for k in keys)
    ours_other = logits(model, input_ids)
    lorakit.set_adapter(model, "default")
    ours_default = logits(model, input_ids)
    # PEFT loads both and switches between them with the same results.
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out"))
    pm.load_adapter(str(tmp_path / "out" / "other"), adapter_name="other")
    pm.eval()
    torch.testing.assert_close(logits(pm, input_ids), ours_default, rtol=1e-5, atol=1e-5)
    pm.set_adapter("other")
    torch.testing.assert_close(logits(pm, input_ids), ours_other, rtol=1e-5, atol=1e-5)
    # And PEFT's two-adapter save loads back into lorakit.
    pm.save_pretrained(str(tmp_path / "peft"), selected_adapters=["default", "other"])
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    lorakit.load_adapter(again, tmp_path / "peft" / "other", adapter_name="other")
    assert lorakit.active_adapters(again) == ["default"]
    torch.testing.assert_close(logits(again, input_ids), ours_default, rtol=1e-5, atol=1e-5)
    lorakit.set_adapter(again, "other")
    torch.testing.assert_close(logits(again, input_ids), ours_other, rtol=1e-5, atol=1e-5)


def test_saved_config_is_peft_readable(tmp_path):
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.config._name_or_path = "models/tiny-llama"
    lorakit.save_adapter(model, tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 4
    assert data["base_model_name_or_path"] == "models/tiny-llama"
    assert sorted(data["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "a"))
    assert cfg.r == 4 and cfg.task_type == "CAUSAL_LM"
