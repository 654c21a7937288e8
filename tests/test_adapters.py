"""lorakit.adapters: the bookkeeping (configs, active, frozen) and an inject that fails leaving no trace.

The reference is the model before the call, compared with tests/test_io.py's snapshot.
"""

from __future__ import annotations

import pytest
from test_io import assert_unchanged, biased_llama, snapshot

import lorakit
from lorakit.adapters import adapter_config, freeze_adapter, get_configs
from lorakit.errors import AdapterNotFoundError, TargetNotFoundError


@pytest.mark.parametrize("existing", [False, True])
def test_inject_that_fails_part_way_changes_nothing(existing):
    model = biased_llama(seed=0)
    if existing:
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(model)
    # the targets are wrapped before the modules_to_save entry turns out to match nothing
    bad = lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["no_such_module"])
    with pytest.raises(TargetNotFoundError, match="no_such_module"):
        lorakit.inject(model, bad, adapter_name="bad")
    assert_unchanged(model, before)


def test_bookkeeping_is_read_through_public_functions():
    model = biased_llama(seed=0)
    first = lorakit.LoraConfig(r=2, target_modules=["q_proj"])
    lorakit.inject(model, first)
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=2, target_modules=["v_proj"]))
    assert list(get_configs(model)) == ["default", "b"] and adapter_config(model, "default") is first
    get_configs(model).clear()  # a copy: the model's record does not change
    assert lorakit.list_adapters(model) == ["default", "b"]
    with pytest.raises(AdapterNotFoundError, match="'c'"):
        adapter_config(model, "c")

    lorakit.set_adapter(model, ["default", "b"])
    freeze_adapter(model, "b")  # inference-only: stays frozen while active
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    lorakit.delete_adapter(model, "b")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="b")
    lorakit.set_adapter(model, "b")  # a new adapter under the old name is not frozen
    assert any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
