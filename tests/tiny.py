"""Tiny offline model + tokenizer directories for training and CLI tests.

`make_tiny_model_dir(path)` writes a 2-layer random Llama (HF format,
safetensors) with a byte-level tokenizer and a ChatML chat template, the same
shape of thing the embedded default model is, in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (one token per byte) plus ChatML specials; vocab 259.

    Without a chat template its eos token is ``<|endoftext|>`` (there is no ``<|im_end|>`` turn end).
    """
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


def make_tiny_model_dir(
    path: str | Path, seed: int = 0, layers: int = 2, hidden: int = 32, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a tiny random Llama + tokenizer into ``path`` (weights stored in ``dtype``) and return it."""
    path = Path(path)
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_chat_jsonl(path: str | Path, n: int = 32, seed: int = 0) -> Path:
    """A small learnable chat data set: 'say X' -> 'X X' for short random words."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5)))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"say {word}"},
                    {"role": "assistant", "content": f"{word} {word}"},
                ]
            }
        )
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_adapter(model_dir: str | Path, out: Path, config=None, seed: int = 1) -> Path:
    """Save a random (non-zero) LoRA adapter for the model in ``model_dir`` into ``out``; return ``out``."""
    import lorakit
    from lorakit.models import load_model

    model, _ = load_model(model_dir)
    torch.manual_seed(seed)
    config = config or lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lorakit.inject(model, config)
    return lorakit.save_adapter(model, out)


def make_run(model_dir: str | Path, out: Path) -> Path:
    """An adapter plus the ``lorakit.yaml`` of a run that names ``model_dir`` as its base model."""
    import yaml

    make_adapter(model_dir, out)
    (out / "lorakit.yaml").write_text(yaml.safe_dump({"model": str(model_dir), "lora": {"r": 4}}))
    return out


def make_run_env(root: Path) -> dict[str, Path]:
    """The shared fixture of the run-level test modules: a tiny model dir, a run on it, a stand-alone
    adapter and a small chat data file, all under ``root``."""
    tiny = make_tiny_model_dir(root / "tiny")
    return {
        "root": root,
        "tiny": tiny,
        "run": make_run(tiny, root / "run"),
        "adapter": make_adapter(tiny, root / "adapter", seed=2),
        "data": write_chat_jsonl(root / "data.jsonl", n=5),
    }


def count_dequantized(monkeypatch) -> tuple[list[int], list]:  # noqa: ANN001 - pytest's MonkeyPatch
    """Wrap ``lorakit.quant.dequantize_4bit`` to track how many dequantized weights are alive at once.

    Returns:
        ``(peak, alive)``: a one-element list holding the largest number alive at once so far, and the
        weak references to every dequantized weight seen since the last call (both updated on every call).
    """
    import weakref

    from lorakit import quant

    alive: list[weakref.ref] = []
    peak = [0]
    real = quant.dequantize_4bit

    def counting(weight, dtype):  # noqa: ANN001, ANN202
        W = real(weight, dtype)
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(W))
        peak[0] = max(peak[0], len(alive))
        return W

    monkeypatch.setattr(quant, "dequantize_4bit", counting)
    return peak, alive


def swiglu_reference64(x: torch.Tensor, weights, pairs, scale: float):  # noqa: ANN001 - tensors in sequences
    """The LoRA SwiGLU MLP in float64: ``down(silu(gate(x)) * up(x))``, each Linear ``h·Wᵀ + s·(h·Aᵀ)·Bᵀ``.

    Args:
        x: The MLP input; its float64 copy is a leaf that requires grad.
        weights: ``(W_gate, W_up, W_down)``, the (decoded) base weights.
        pairs: ``[(A, B)]`` for gate, up, down; float64 leaf copies are returned.
        scale: The LoRA scaling ``s``.

    Returns:
        ``(x64, p64, h64, y64)``: the leaves, down's input and the output.
    """
    x64 = x.detach().double().requires_grad_()
    p64 = [(A.detach().double().requires_grad_(), B.detach().double().requires_grad_()) for A, B in pairs]

    def lin(h, W, A, B):  # noqa: ANN001, ANN202
        return h @ W.double().t() + scale * (h @ A.t()) @ B.t()

    (wg, wu, wd), (pg, pu, pd) = weights, p64
    h64 = torch.nn.functional.silu(lin(x64, wg, *pg)) * lin(x64, wu, *pu)
    return x64, p64, h64, lin(h64, wd, *pd)
