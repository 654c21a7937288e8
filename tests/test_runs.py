"""lorakit.runs on tiny offline models: open, generate, compare, evaluate, merge, inspect."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import make_tiny_model_dir, write_chat_jsonl
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import runs
from lorakit.errors import AdapterFormatError, ConfigError, ModelMismatchError
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


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- open_adapter


def test_open_run_dir_uses_lorakit_yaml_model(env, opened):
    model, tokenizer, info = opened
    assert info.model_source == "lorakit.yaml" and info.model == str(env["tiny"])
    assert info.run_dir == env["run"] and info.adapter_dir == env["run"]
    reference, _ = load_model(env["tiny"])
    lorakit.load_adapter(reference, env["run"])
    assert torch.equal(_logits(model), _logits(reference))
    with lorakit.disable_adapters(model):  # the adapter changes the output (init_lora_weights=False)
        assert not torch.allclose(_logits(model), _logits(reference))


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
    assert torch.equal(_logits(model), _logits(expected))


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
    assert runs.generate(model, tokenizer, "say abc", max_new_tokens=6) == _reference_greedy(
        model, tokenizer, "say abc", 6)


def test_compare_base_uses_base_and_adapter_answers(env, opened):
    model, tokenizer, _ = opened
    rows = runs.compare_base(model, tokenizer, ["say abc", "hi"], max_new_tokens=6)
    base, _ = load_model(env["tiny"])
    for prompt, base_answer, adapter_answer in rows:
        assert base_answer == _reference_greedy(base, tokenizer, prompt, 6)
        assert adapter_answer == _reference_greedy(model, tokenizer, prompt, 6)
    assert rows[0][1] != rows[0][2]
    assert runs.generate(model, tokenizer, "say abc", max_new_tokens=6) == rows[0][2]  # adapter back on


def test_generate_rejects_bad_arguments(opened):
    model, tokenizer, _ = opened
    with pytest.raises(ConfigError):
        runs.generate(model, tokenizer, "x", max_new_tokens=0)


# --------------------------------------------------------------------------- evaluate


def test_eval_loss_equals_transformers_loss(env, opened):
    model, tokenizer, _ = opened
    result = runs.evaluate(model, tokenizer, env["data"], batch_size=2, exact_match=False)
    examples, _ = lorakit.train.data.load_examples(env["data"], tokenizer, max_seq_len=512)
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
    known = runs.generate(model, tokenizer, "say abc", max_new_tokens=5)
    data = tmp_path / "em.jsonl"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say abc"}]
    known_with_system = runs.generate(model, tokenizer, conversation, max_new_tokens=5)
    rows = [
        [{"role": "user", "content": "say abc"}, {"role": "assistant", "content": f"  {known}\n"}],  # stripped
        [{"role": "user", "content": "say abc"}, {"role": "assistant", "content": "something else"}],
        [*conversation, {"role": "assistant", "content": known_with_system}],  # prompt = all but the last turn
    ]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    for batch_size in (1, 2):
        result = runs.evaluate(model, tokenizer, data, batch_size=batch_size, max_new_tokens=5)
        assert result["exact_match"] == pytest.approx(2 / 3) and result["exact_match_rows"] == 3


# --------------------------------------------------------------------------- merge


def test_merge_matches_unmerged_logits(env, opened, tmp_path):
    out = runs.merge_to_dir(env["run"], tmp_path / "merged")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    torch.testing.assert_close(_logits(merged), _logits(opened[0]), rtol=0, atol=1e-5)
    assert not list(tmp_path.glob(".merged.tmp-*"))


def test_merged_model_loads_without_lorakit(env, tmp_path):
    out = runs.merge_to_dir(env["run"], tmp_path / "merged", dtype="bf16")
    script = (
        "import sys; sys.modules['lorakit'] = None\n"  # any import of lorakit fails
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, local_files_only=True)\n"
        f"AutoTokenizer.from_pretrained({str(out)!r}, local_files_only=True)\n"
        "assert m.model.embed_tokens.weight.dtype == torch.bfloat16, m.dtype\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_merge_refuses_bad_dtype_and_existing_dir(env, tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        runs.merge_to_dir(env["run"], tmp_path / "m", dtype="fp16")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        runs.merge_to_dir(env["run"], tmp_path / "busy")
    runs.merge_to_dir(env["run"], tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "config.json").is_file() and not (tmp_path / "busy" / "keep.txt").exists()


# --------------------------------------------------------------------------- inspect


def test_inspect_norms_equal_float64_reference(env, tmp_path):
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False,
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3},
    )
    adapter = make_adapter(env["tiny"], tmp_path / "patterned", config)
    rows = runs.inspect_adapter(adapter)
    tensors = {k.removeprefix("base_model.model."): v.double()
               for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    expected_scaling = {"q_proj": 8 / 2, "v_proj": 3 / 4, "embed_tokens": 8 / 4}
    modules = [r for r in rows if r["kind"] != "total"]
    assert len(modules) == 2 * 2 + 1
    for row in modules:
        short = row["module"].rsplit(".", 1)[-1]
        if row["kind"] == "embedding":
            A, B = tensors[row["module"] + ".lora_embedding_A"], tensors[row["module"] + ".lora_embedding_B"]
            delta = (B @ A).T  # (num_embeddings, dim), as PEFT merges it
        else:
            A, B = tensors[row["module"] + ".lora_A.weight"], tensors[row["module"] + ".lora_B.weight"]
            delta = B @ A  # (out, in)
        scaling = expected_scaling[short]
        assert row["scaling"] == scaling and row["r"] == A.shape[0]
        assert row["params"] == A.numel() + B.numel()
        assert row["norm"] == pytest.approx(torch.linalg.matrix_norm(scaling * delta).item(), rel=1e-12)
    total = rows[-1]
    assert total["module"] == "total" and total["params"] == sum(r["params"] for r in modules)
    assert total["norm"] == pytest.approx(math.sqrt(sum(r["norm"] ** 2 for r in modules)))


def test_inspect_rejects_corrupt_file(env, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((env["adapter"] / "adapter_config.json").read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFormatError, match="corrupt"):
        runs.inspect_adapter(bad)


def test_last_metrics_keeps_latest_value_of_each_key(tmp_path):
    assert runs.last_metrics(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "eval_loss": 1.7}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo'
    )
    assert runs.last_metrics(tmp_path) == {"step": 3, "loss": 1.2, "eval_loss": 1.7}
