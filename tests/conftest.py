"""Shared fixtures: tiny random models built from a config (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # lorakit.decode_lora's Triton kernel runs on CPU tensors in Triton's interpreter (tests/test_decode_lora.py).
    # Triton reads this when it is first imported (transformers imports it), so it is set before anything else.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402


def make_llama(seed: int = 0, bias: bool = False, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(cfg).eval()
    if bias:  # random non-zero biases so bias handling is visible in outputs
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny matmuls run faster and steadier on a shared 2-core machine,
    where two OpenMP threads of two jobs can thrash (up to 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 96, (2, 10), generator=g)
