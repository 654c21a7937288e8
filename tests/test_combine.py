"""add_weighted_adapter: PEFT's combinations give PEFT's outputs; the exact ones are exact."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import make_gpt2, make_llama
from peft.utils import merge_utils

import lorakit
from lorakit.combine import _merge_tasks, add_weighted_adapter
from lorakit.inject import lora_layers

WEIGHTS = [0.7, -0.4]


def _two_adapters(tmp_path, factory=make_llama, r=(4, 4), targets=("q_proj", "v_proj", "embed_tokens"), **extra):
    """Save adapters a and b (random, different) for ``factory()``; return (base, dir_a, dir_b)."""
    base = factory()
    model = copy.deepcopy(base)
    lorakit.inject(
        model,
        lorakit.LoraConfig(r=r[0], lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **extra),
        "a",
    )
    lorakit.add_adapter(
        model,
        "b",
        lorakit.LoraConfig(r=r[1], lora_alpha=4, target_modules=list(targets), init_lora_weights=False, **extra),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    lorakit.save_adapter(model, tmp_path / "ab", "a")
    lorakit.save_adapter(model, tmp_path / "ab", "b")
    return base, tmp_path / "ab" / "a", tmp_path / "ab" / "b"


def _ours(base, dir_a, dir_b):
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, dir_a, "a")
    lorakit.load_adapter(model, dir_b, "b")
    return model


def _peft(base, dir_a, dir_b):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dir_a), adapter_name="a")
    model.load_adapter(str(dir_b), adapter_name="b")
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["linear", "cat", "svd", "ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd"])
def test_matches_peft(kind, tmp_path, input_ids):
    base, dir_a, dir_b = _two_adapters(tmp_path)
    ours, theirs = _ours(base, dir_a, dir_b), _peft(base, dir_a, dir_b)
    kwargs = {"density": 0.5} if kind not in ("linear", "cat", "svd") else {}
    result = add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "ab", combination_type=kind, **kwargs)
    theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "ab", combination_type=kind, **kwargs)
    lorakit.set_adapter(ours, "ab")
    theirs.set_adapter("ab")
    expected = _logits(theirs, input_ids)
    assert not torch.allclose(expected, _logits(base, input_ids), atol=1e-3), "the combination must change the output"
    torch.testing.assert_close(_logits(ours, input_ids), expected, atol=2e-5, rtol=1e-5)
    assert result.combination_type == kind and result.r == theirs.peft_config["ab"].r


@pytest.mark.parametrize("kind", ["cat", "svd", "linear"])
def test_gpt2_conv1d_matches_peft(kind, tmp_path):
    base, dir_a, dir_b = _two_adapters(tmp_path, make_gpt2, targets=("c_attn", "c_proj"), fan_in_fan_out=True)
    ours, theirs = _ours(base, dir_a, dir_b), _peft(base, dir_a, dir_b)
    add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "ab", combination_type=kind)
    theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "ab", combination_type=kind)
    lorakit.set_adapter(ours, "ab")
    theirs.set_adapter("ab")
    ids = torch.arange(12).view(2, 6)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_task_merges_match_peft_merge_utils(kind, sign_method):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = [0.5, -1.2, 0.8]
    reference = {
        "linear": lambda: merge_utils.task_arithmetic(tensors, torch.tensor(weights)),
        "ties": lambda: merge_utils.ties(tensors, torch.tensor(weights), 0.4, sign_method),
        "dare_linear": lambda: merge_utils.dare_linear(tensors, torch.tensor(weights), 0.4),
        "dare_ties": lambda: merge_utils.dare_ties(tensors, torch.tensor(weights), 0.4, sign_method),
        "magnitude_prune": lambda: merge_utils.magnitude_prune(tensors, torch.tensor(weights), 0.4),
    }[kind]
    torch.manual_seed(11)
    expected = reference()
    torch.manual_seed(11)  # the DARE kinds draw their random masks from torch's global generator, as PEFT's
    torch.testing.assert_close(_merge_tasks(kind, tensors, weights, 0.4, sign_method), expected)


def test_exact_combinations_and_residuals(tmp_path, input_ids):
    """cat is Σ wᵢΔWᵢ exactly (any ranks); svd at full rank too; linear's cross terms show in its residual."""
    base, dir_a, dir_b = _two_adapters(tmp_path, r=(4, 2), targets=("q_proj", "v_proj"))
    model = _ours(base, dir_a, dir_b)
    layers = dict(lora_layers(model))
    cat = add_weighted_adapter(model, ["a", "b"], WEIGHTS, "cat", combination_type="cat")
    assert cat.r == 6 and cat.residual < 1e-6
    for layer in layers.values():  # independent check in float64
        target = sum(w * layer.delta_weight(a).double() for a, w in zip("ab", WEIGHTS))
        torch.testing.assert_close(layer.delta_weight("cat").double(), target, atol=1e-6, rtol=1e-6)
    full = add_weighted_adapter(model, ["a", "b"], WEIGHTS, "svd6", combination_type="svd", svd_rank=6)
    assert full.residual < 1e-5
    low = add_weighted_adapter(model, ["a", "b"], WEIGHTS, "svd2", combination_type="svd", svd_rank=2)
    errs, refs = [], []
    for layer in layers.values():
        target = sum(w * layer.delta_weight(a).double() for a, w in zip("ab", WEIGHTS))
        errs.append((layer.delta_weight("svd2").double() - target).norm() ** 2)
        refs.append(target.norm() ** 2)
    assert low.residual == pytest.approx(float((sum(errs) / sum(refs)) ** 0.5), rel=1e-4)
    assert 0.05 < low.residual < 1


def test_linear_cross_terms(tmp_path):
    base, dir_a, dir_b = _two_adapters(tmp_path, targets=("q_proj",))
    model = _ours(base, dir_a, dir_b)
    one = add_weighted_adapter(model, ["a"], [-0.5], "neg", combination_type="linear")
    assert one.residual < 1e-6  # one adapter: exactly w·ΔW, negative weight included
    two = add_weighted_adapter(model, ["a", "b"], WEIGHTS, "lin", combination_type="linear")
    assert two.residual > 0.1  # PEFT's factor-wise linear adds the cross terms Bᵢ·Aⱼ (PEFT issue 3004)


def test_errors(tmp_path):
    base, dir_a, dir_b = _two_adapters(tmp_path, r=(4, 2), targets=("q_proj",))
    model = _ours(base, dir_a, dir_b)
    with pytest.raises(lorakit.ConfigError, match="already exists"):
        add_weighted_adapter(model, ["a", "b"], WEIGHTS, "a", combination_type="cat")
    with pytest.raises(lorakit.ConfigError, match="equal ranks"):
        add_weighted_adapter(model, ["a", "b"], WEIGHTS, "x", combination_type="linear")
    with pytest.raises(lorakit.AdapterNotFoundError, match="'nope'"):
        add_weighted_adapter(model, ["a", "nope"], WEIGHTS, "x", combination_type="cat")
    with pytest.raises(lorakit.ConfigError, match="one per adapter"):
        add_weighted_adapter(model, ["a", "b"], [1.0], "x", combination_type="cat")
    with pytest.raises(lorakit.ConfigError, match="density"):
        add_weighted_adapter(model, ["a", "b"], WEIGHTS, "x", combination_type="ties_svd")
    with pytest.raises(lorakit.ConfigError, match="combination_type"):
        add_weighted_adapter(model, ["a", "b"], WEIGHTS, "x", combination_type="average")
    assert lorakit.list_adapters(model) == ["a", "b"]  # nothing half-added
