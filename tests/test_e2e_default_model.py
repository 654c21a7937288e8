"""End to end on the real default model: the demo config trains, PEFT agrees with lorakit, and the
demo adapter answers held-out prompts like a pirate.

A few steps of ``examples/quickstart.yaml`` (the ``make demo`` config, cut down by
overrides) on SmolLM2-135M-Instruct, then the independent reference: PEFT loads the
adapter at the run root onto the same base model and must give the same logits, and
those logits must differ from the base model's and fit the training style better.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.examples import load_examples
from lorakit.models import load_model
from lorakit.train.loop import train
from lorakit.train.report import read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean token loss on the labelled (assistant) tokens, labels unshifted as in training."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    ).item()


@pytest.mark.slow
def test_quickstart_config_trains_default_model_and_peft_agrees(tmp_path, monkeypatch, one_thread):
    peft = pytest.importorskip("peft")
    monkeypatch.delenv("LORAKIT_HOME", raising=False)  # the real cache: convert the default model once
    out = tmp_path / "run"
    result = train(
        EXAMPLES / "quickstart.yaml",
        device="cpu",
        overrides=[
            "train.steps=4",
            "train.batch_size=2",
            "train.warmup_steps=0",
            "train.schedule=constant",
            "train.eval_every=0",
            "train.save_every=0",
            "train.precision=fp32",
            "data.max_seq_len=96",
            f"output.dir={out}",
        ],
    )
    assert result.steps == 4 and result.precision == "fp32"
    losses = [row["loss"] for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    # Two training rows (whole assistant answers) as a fixed probe batch.
    ours, tokenizer = load_model(None, dtype=torch.float32)
    examples, _ = load_examples(EXAMPLES / "data" / "quickstart_train.jsonl", tokenizer, max_seq_len=96)
    probe = examples[:2]
    width = max(len(e["input_ids"]) for e in probe)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in probe])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in probe])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in probe])

    lorakit.load_adapter(ours, out)
    base, _ = load_model(None, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, out).eval()
        ref = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours.eval()(input_ids=ids, attention_mask=mask).logits
        with theirs.disable_adapter():
            plain = theirs(input_ids=ids, attention_mask=mask).logits

    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)  # lorakit == PEFT
    assert (ref[real] - plain[real]).abs().max() > 1e-2  # the adapter changes the model
    before, after = _answer_loss(plain, labels), _answer_loss(ref, labels)
    print(f"probe answer loss: base {before:.3f} -> adapter {after:.3f}; train losses {losses}", file=sys.stderr)
    assert after < before, (before, after)  # ... towards the training style


# Words the quickstart answers are built from (examples/make_quickstart_data.py), matched as whole words.
PIRATE = re.compile(r"\b(arr+|yarr|ahoy|avast|matey|ye|yer|hearty|hearties|landlubber|timbers|yo-ho-ho|hoist)\b")


@pytest.mark.slow
def test_quickstart_adapter_answers_heldout_prompts_like_a_pirate(tmp_path, monkeypatch, one_thread):
    """The README's claim: the demo turns the model into a pirate on prompts it never saw."""
    from lorakit.generation import compare_base
    from lorakit.runs import open_adapter

    monkeypatch.delenv("LORAKIT_HOME", raising=False)
    out = tmp_path / "run"
    # The demo run as `make demo` trains it; only the final eval (which the answers do not need) is left out.
    train(EXAMPLES / "quickstart.yaml", overrides=["train.eval_every=0", f"output.dir={out}"])
    prompts = (EXAMPLES / "heldout_prompts.txt").read_text().splitlines()
    model, tokenizer, _ = open_adapter(out)
    answers = compare_base(model, tokenizer, prompts, max_new_tokens=24)
    for prompt, base, tuned in answers:
        print(f"{prompt!r}\n  base:    {base!r}\n  adapter: {tuned!r}", file=sys.stderr)
    assert len(answers) == 5
    assert all(PIRATE.search(tuned.lower()) for _, _, tuned in answers), answers
    assert not any(PIRATE.search(base.lower()) for _, base, _ in answers), answers
