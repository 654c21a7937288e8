"""lorakit.evaluation on a tiny offline model: eval loss equals transformers', exact match."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import make_run_env

from lorakit import evaluation, generation, runs
from lorakit.examples import load_examples


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_run_env(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def opened(env):
    return runs.open_adapter(env["run"])


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
