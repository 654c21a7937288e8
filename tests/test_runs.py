"""lorakit.runs, .generation and .evaluation on tiny offline models: open, generate, compare, evaluate, last metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from tiny import make_tiny_model_dir, write_chat_jsonl

import lorakit
from lorakit import evaluation, generation, runs
from lorakit.errors import AdapterFormatError, ConfigError, ModelMismatchError
from lorakit.examples import load_examples
from lorakit.models import load_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


def make_adapter(model_dir: Path, out: Path, config: lorakit.LoraConfig | None = None, seed: int = 1) -> Path:
    model, _ = load_model(model_dir)
    torch.manual_seed(seed)
    config = config or lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lorakit.inject(model, config)
    return lorakit.save_adapter(model, out)


def make_run(model_dir: Path, out: Path) -> Path:
    make_adapter(model_dir, out)
    (out / "lorakit.yaml").write_text(yaml.safe_dump({"model": str(model_dir), "lora": {"r": 4}}))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tiny = make_tiny_model_dir(root / "tiny")
    return {
        "root": root,
        "tiny": tiny,
        "run": make_run(tiny, root / "run"),
        "adapter": make_adapter(tiny, root / "adapter", seed=2),
        "data": write_chat_jsonl(root / "data.jsonl", n=5),
    }


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
    for dtype, expected in ((None, torch.bfloat16), ("auto", torch.bfloat16), ("fp16", torch.float16),
                            (torch.float32, torch.float32)):
        model, _, _ = runs.open_adapter(stored_bf16, dtype=dtype)
        assert _base_and_lora_dtypes(model) == ({expected}, {torch.float32}), dtype


def test_natural_key_orders_numbers_numerically():
    names = ["layers.10.mlp", "layers.2.mlp", "layers.2.attn", "embed"]
    assert sorted(names, key=runs.natural_key) == ["embed", "layers.2.attn", "layers.2.mlp", "layers.10.mlp"]


def test_adapter_for_another_model_says_how_the_base_was_chosen(env, tmp_path):
    wide = make_tiny_model_dir(tmp_path / "wide", hidden=48)
    with pytest.raises(ModelMismatchError, match="--model"):
        runs.open_adapter(env["run"], model=wide)


# --------------------------------------------------------------------------- generate / compare


def _reference_greedy(model, tokenizer, prompt: str, n: int) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_matches_plain_transformers_greedy(opened):
    model, tokenizer, _ = opened
    assert generation.generate(model, tokenizer, "say abc", max_new_tokens=6) == _reference_greedy(
        model, tokenizer, "say abc", 6)


def test_compare_base_uses_base_and_adapter_answers(env, opened):
    model, tokenizer, _ = opened
    rows = generation.compare_base(model, tokenizer, ["say abc", "hi"], max_new_tokens=6)
    base, _ = load_model(env["tiny"])
    for prompt, base_answer, adapter_answer in rows:
        assert base_answer == _reference_greedy(base, tokenizer, prompt, 6)
        assert adapter_answer == _reference_greedy(model, tokenizer, prompt, 6)
    assert rows[0][1] != rows[0][2]
    assert generation.generate(model, tokenizer, "say abc", max_new_tokens=6) == rows[0][2]  # adapter back on


def test_generate_rejects_bad_arguments(opened):
    model, tokenizer, _ = opened
    with pytest.raises(ConfigError):
        generation.generate(model, tokenizer, "x", max_new_tokens=0)


def test_generate_batch_answers_as_one_prompt_at_a_time(opened):
    model, tokenizer, _ = opened
    prompts = ["say abc", "hi", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say ab"}]]
    ids = [generation.prompt_ids(tokenizer, p) for p in prompts]
    assert len({len(i) for i in ids}) == 3  # different lengths: the batch is left-padded
    one_by_one = [generation.generate(model, tokenizer, p, max_new_tokens=5) for p in prompts]
    assert generation.generate_batch(model, tokenizer, ids, max_new_tokens=5, batch_size=3) == one_by_one
    with pytest.raises(ConfigError, match="batch_size"):
        generation.generate_batch(model, tokenizer, ids, batch_size=0)


# --------------------------------------------------------------------------- evaluate


def test_eval_loss_equals_transformers_loss(env, opened):
    model, tokenizer, _ = opened
    result = evaluation.evaluate(model, tokenizer, env["data"], batch_size=2, exact_match=False)
    examples, _ = load_examples(env["data"], tokenizer, max_seq_len=512)
    total = count = 0.0
    for ex in examples:  # one example at a time, no padding; transformers' own shifted loss
        labels = torch.tensor([ex["labels"]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + loss.item() * n, count + n
    assert result["label_tokens"] == count and result["examples"] == len(examples)
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["exact_match"] is None


def test_exact_match_on_known_answers(opened, tmp_path):
    model, tokenizer, _ = opened
    known = generation.generate(model, tokenizer, "say abc", max_new_tokens=5)
    data = tmp_path / "em.jsonl"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say abc"}]
    known_with_system = generation.generate(model, tokenizer, conversation, max_new_tokens=5)
    rows = [
        [{"role": "user", "content": "say abc"}, {"role": "assistant", "content": f"  {known}\n"}],  # stripped
        [{"role": "user", "content": "say abc"}, {"role": "assistant", "content": "something else"}],
        [*conversation, {"role": "assistant", "content": known_with_system}],  # prompt = all but the last turn
    ]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    for batch_size in (1, 2):
        result = evaluation.evaluate(model, tokenizer, data, batch_size=batch_size, max_new_tokens=5)
        assert result["exact_match"] == pytest.approx(2 / 3) and result["exact_match_rows"] == 3


def test_last_metrics_keeps_latest_value_of_each_key(tmp_path):
    assert runs.last_metrics(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "eval_loss": 1.7}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo'
    )
    assert runs.last_metrics(tmp_path) == {"step": 3, "loss": 1.2, "eval_loss": 1.7}
