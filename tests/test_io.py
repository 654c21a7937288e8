"""lorakit.io: a load that fails part way leaves the model exactly as it was.

The reference is the model itself before the load: every parameter and buffer
(``state_dict`` with ``torch.equal``), every module object at its place, every
``requires_grad`` flag and the adapter bookkeeping.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.adapters import get_configs
from lorakit.errors import AdapterFormatError, ModelMismatchError
from lorakit.io import read_adapter
from lorakit.layers import ModulesToSaveWrapper

TARGETS = ["q_proj", "v_proj", "down_proj"]


def biased_llama(seed: int) -> LlamaForCausalLM:
    """A tiny Llama whose projections have biases (so bias='all' / 'lora_only' adapters train them)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "tensors": [(k, v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()],
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modules": [(name, id(m)) for name, m in model.named_modules()],
        "flags": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "adapters": (lorakit.list_adapters(model), lorakit.active_adapters(model), get_configs(model)),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    written = [name for name, tensor, old in before["tensors"] if not torch.equal(tensor, old)]
    assert written == []  # checked on the tensor objects themselves, whatever the module tree now is
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in after["state"].items() if not torch.equal(v, before["state"][k])]
    assert changed == []
    assert after["flags"] == before["flags"]
    assert after["adapters"] == before["adapters"]


def saved_adapter(tmp_path, bias: str, modules_to_save: list[str] | None = None):
    """An adapter (LoRA + trained biases) from another model, so every value it holds differs from the target's."""
    source = biased_llama(seed=1)
    lorakit.inject(
        source,
        lorakit.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=TARGETS,
            bias=bias,
            modules_to_save=modules_to_save,
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith("bias"):
                p.add_(1.0)
    return lorakit.save_adapter(source, tmp_path / "adapter")


def break_last(path, how: str) -> str:
    """Make the adapter fail at the tensor the loader reaches last; return that key."""
    tensors = load_file(str(path / "adapter_model.safetensors"))
    order = list(read_adapter(path)[1])
    last = "base_model.model." + order[-1]
    assert any(k.endswith("bias") for k in order[:-1])  # biases are copied (or would be) before it fails
    if how == "shape":
        tensors[last] = torch.zeros(tensors[last].shape[0], tensors[last].shape[-1] + 1)
    else:  # a target module without its LoRA weights: found only after every tensor was seen
        assert ".lora_" in last
        module = last.rsplit(".lora_", 1)[0]
        tensors = {k: v for k, v in tensors.items() if not k.startswith(module + ".lora_")}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return last


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("how", ["shape", "missing"])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_load_leaves_model_unchanged(tmp_path, bias, how, existing):
    adapter = saved_adapter(tmp_path, bias, modules_to_save=["lm_head"])
    break_last(adapter, how)
    model = biased_llama(seed=0)
    if existing:  # shares q_proj with the loaded adapter, so a wrapper it already has gets the new adapter too
        lorakit.inject(
            model,
            lorakit.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], bias="lora_only", init_lora_weights=False),
        )
    before = snapshot(model)
    with pytest.raises(ModelMismatchError if how == "shape" else AdapterFormatError):
        lorakit.load_adapter(model, adapter, adapter_name="new")
    assert_unchanged(model, before)
    assert "new" not in lorakit.list_adapters(model)
    # and the model still takes the adapter once the file is right
    lorakit.load_adapter(model, saved_adapter(tmp_path / "again", bias, modules_to_save=["lm_head"]), "new")
    assert "new" in lorakit.list_adapters(model)


def test_modules_to_save_with_bias_round_trip(tmp_path):
    source = biased_llama(seed=1)
    lorakit.inject(source, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["k_proj"]))
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, ModulesToSaveWrapper):
                m.modules_to_save["default"].bias.add_(1.0)
    path = lorakit.save_adapter(source, tmp_path / "a")
    model = lorakit.load_adapter(biased_llama(seed=1), path)  # the same base, fresh
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=0, atol=0)
