"""method: dpo in the training pipeline: objective, model setup, reference cache, pair eval."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import pytest
import torch
from tiny import make_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.errors import AdapterFormatError, ConfigError, ModelMismatchError
from lorakit.pairs import load_pairs
from lorakit.preference import evaluate_pairs
from lorakit.train.dpo import REFERENCE_CACHE, DpoObjective, precomputed_reference, reference_key, setup_dpo_model

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


def write_pairs(path, n=6, seed=0):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5)))
        rows.append({"prompt": f"say {word}", "chosen": f"{word} {word}", "rejected": f"{word[::-1]}!"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_train")
    return make_tiny_model_dir(root / "model"), write_pairs(root / "pairs.jsonl"), root


def _moved_model(model_dir, tmp_path):
    """A model with a trained-looking 'default' adapter and its starting point as the frozen reference."""
    start = lorakit.inject(
        AutoModelForCausalLM.from_pretrained(model_dir), lorakit.LoraConfig(init_lora_weights=False, **LORA)
    )
    lorakit.save_adapter(start, tmp_path / "start")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = setup_dpo_model(model, None, tmp_path / "start")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".default." in n:
                p.add_(0.2 * torch.randn_like(p))
    return model, ref


def test_setup_fresh_and_from_adapter(tiny, tmp_path):
    model_dir, _, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert setup_dpo_model(model, lorakit.LoraConfig(**LORA), None) is None
    assert lorakit.list_adapters(model) == ["default"]
    model, ref = _moved_model(model_dir, tmp_path)
    assert ref == "reference" and lorakit.list_adapters(model) == ["default", "reference"]
    assert lorakit.active_adapters(model) == ["default"]
    assert all(p.requires_grad == (".default." in n) for n, p in model.named_parameters())


def test_setup_errors(tiny, tmp_path):
    model_dir, _, root = tiny
    with pytest.raises(AdapterFormatError, match="does not exist"):
        setup_dpo_model(AutoModelForCausalLM.from_pretrained(model_dir), None, tmp_path / "nowhere")
    other = make_tiny_model_dir(root / "wider", hidden=48)
    lorakit.save_adapter(
        lorakit.inject(AutoModelForCausalLM.from_pretrained(other), lorakit.LoraConfig(**LORA)), tmp_path / "other"
    )
    with pytest.raises(ModelMismatchError, match="does not fit the base model"):
        setup_dpo_model(AutoModelForCausalLM.from_pretrained(model_dir), None, tmp_path / "other")


def test_precomputed_reference_gives_the_same_loss_and_is_reused(tiny, tmp_path):
    model_dir, data, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    model, ref = _moved_model(model_dir, tmp_path)
    objective = DpoObjective(tok.pad_token_id, 0.1, "sigmoid", 0.0, ref)
    pairs, _ = load_pairs(data, tok)
    live = objective.loss(model, objective.collate(pairs))

    calls = []

    def compute(rows):
        calls.append(len(rows))
        return objective.reference_logps(model, rows, 4, lambda b: b, nullcontext())

    key = reference_key(model, [pairs], tmp_path / "start", "fp32")
    run_dir = tmp_path / "run"
    precomputed_reference(run_dir, key, {"train": pairs, "eval": []}, compute, True, lambda *a: None)
    assert calls == [len(pairs)] and (run_dir / REFERENCE_CACHE).is_file()
    cached = objective.loss(model, objective.collate(pairs))
    assert cached[0].item() == pytest.approx(live[0].item(), rel=1e-6)
    assert cached[1] == live[1] and cached[2] == pytest.approx(live[2], rel=1e-5, abs=1e-6)

    again, _ = load_pairs(data, tok)  # a resumed run: same key, read back, not recomputed
    precomputed_reference(run_dir, key, {"train": again}, compute, True, lambda *a: None)
    assert calls == [len(pairs)] and [p["ref_chosen"] for p in again] == [p["ref_chosen"] for p in pairs]
    changed = reference_key(model, [pairs[:-1]], tmp_path / "start", "fp32")  # other data: a new key
    assert changed != key
    precomputed_reference(run_dir, changed, {"train": pairs[:-1]}, compute, True, lambda *a: None)
    assert calls == [len(pairs), len(pairs) - 1]


def test_evaluate_pairs_against_the_reference(tiny, tmp_path):
    model_dir, data, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    fresh = lorakit.inject(AutoModelForCausalLM.from_pretrained(model_dir), lorakit.LoraConfig(**LORA))
    result = evaluate_pairs(fresh, tok, data)
    assert result["pairs"] == 6 and result["rewards/margins"] == 0.0 and result["rewards/accuracies"] == 0.0
    assert result["eval_loss"] == pytest.approx(math.log(2), abs=1e-7)

    model, ref = _moved_model(model_dir, tmp_path)
    model.train()
    result = evaluate_pairs(model, tok, data, reference_adapter=ref, beta=0.5)
    assert model.training  # mode restored
    model.eval()
    objective = DpoObjective(tok.pad_token_id, 0.5, "sigmoid", 0.0, ref)
    pairs, _ = load_pairs(data, tok)
    loss_sum, n, sums = objective.loss(model, objective.collate(pairs))
    assert result["eval_loss"] == pytest.approx(loss_sum.item() / n, rel=1e-5)
    expected = dict(zip(objective.metric_names, (s / n for s in sums)))
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_objective_config_errors():
    with pytest.raises(ConfigError, match="loss_type"):
        DpoObjective(0, 0.1, "kto", 0.0, None)
    with pytest.raises(ConfigError, match="beta"):
        DpoObjective(0, 0.0, "sigmoid", 0.0, None)
    with pytest.raises(ConfigError, match="label_smoothing applies"):
        DpoObjective(0, 0.1, "hinge", 0.1, None)
