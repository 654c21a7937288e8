"""lorakit.generation on a tiny offline model: greedy answers equal transformers', base vs adapter, batches."""

from __future__ import annotations

import pytest
import torch
from tiny import make_run_env

from lorakit import generation, runs
from lorakit.errors import ConfigError
from lorakit.models import load_model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_run_env(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def opened(env):
    return runs.open_adapter(env["run"])


def _reference_greedy(model, tokenizer, prompt: str, n: int) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_matches_plain_transformers_greedy(opened):
    model, tokenizer, _ = opened
    assert generation.generate(model, tokenizer, "say abc", max_new_tokens=6) == _reference_greedy(
        model, tokenizer, "say abc", 6
    )


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
