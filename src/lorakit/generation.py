"""Answers from a model, with or without its adapter: prompts rendered, generated, decoded.

:func:`generate` and :func:`compare_base` are what the ``lorakit generate`` and
``lorakit chat`` verbs run. :func:`prompt_ids` and :func:`generate_batch` are the same
steps for many prompts at once (the exact-match eval in :mod:`lorakit.evaluation`)::

    print(generate(model, tokenizer, "Name three colours."))
    for prompt, base, tuned in compare_base(model, tokenizer, ["Hi!"]): ...
    answers = generate_batch(model, tokenizer, [prompt_ids(tokenizer, "Hi!")], max_new_tokens=32)
    answers = generate_batch(model, tokenizer, prompts, adapter_names=["fr", "de", "__base__"])  # one adapter per row
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from .adapters import disable_adapters
from .errors import ConfigError
from .few_rows import head_routed
from .graph_decode import static_decode
from .mixed import adapter_batch

__all__ = ["prompt_ids", "generate_batch", "generate", "compare_base"]


def prompt_ids(tokenizer: Any, prompt: str | Sequence[dict[str, str]], chat: bool = True) -> list[int]:
    """Token ids of a prompt, ready for the model to answer.

    Args:
        tokenizer: The model's tokenizer.
        prompt: A user message, or a whole conversation as ``[{"role", "content"}, ...]``.
        chat: Render with the tokenizer's chat template and its generation prompt (when
            it has a template); False sends a string as it is (with the tokenizer's
            special tokens) and a conversation as a plain ``role: content`` transcript.

    Returns:
        The token ids.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, str):
        text = prompt
    else:  # no template: a plain transcript the model can continue
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _generation_config(model: Any, tokenizer: Any, max_new_tokens: int, do_sample: bool, temperature: float):
    from transformers import GenerationConfig

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if do_sample and not temperature > 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature!r}.")
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    sampling = {"temperature": temperature, "top_p": 1.0, "top_k": 0} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=eos or None,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )


@torch.inference_mode()
def _generate_ids(
    model: Any, tokenizer: Any, prompts: list[list[int]], gen_config: Any, static_cache: bool = False
) -> list[list[int]]:
    """Greedy / sampled continuation of a batch of token-id prompts (left-padded)."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    with head_routed(model):  # CPU decoding of 2-32 rows: the head as (W·xᵀ)ᵀ (lorakit.few_rows)
        if static_cache:  # lorakit.graph_decode: a static KV cache; on a GPU each step replays one CUDA graph
            new = static_decode(
                model,
                input_ids.to(device),
                attention_mask.to(device),
                max_new_tokens=gen_config.max_new_tokens,
                eos_token_id=gen_config.eos_token_id,
                pad_token_id=gen_config.pad_token_id,
                do_sample=gen_config.do_sample,
                temperature=gen_config.temperature or 1.0,
            )
            return [row.tolist() for row in new.cpu()]
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=gen_config
        )
    return [row[width:].tolist() for row in out.cpu()]


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    batch_size: int = 8,
    adapter_names: Sequence[str] | None = None,
    static_cache: bool = False,
) -> list[str]:
    """Answer many tokenized prompts, ``batch_size`` at a time (left-padded).

    Args:
        model: A causal LM (with or without adapters).
        tokenizer: Its tokenizer (``pad_token_id`` set).
        prompts: Token ids per prompt, e.g. from :func:`prompt_ids`.
        max_new_tokens: Most tokens to generate per answer.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (only with ``do_sample``).
        batch_size: Prompts per ``model.generate`` call.
        adapter_names: One adapter name per prompt (``"__base__"`` for none): each batch runs as a
            mixed-adapter batch (:func:`lorakit.adapter_batch`); None runs the active adapters.
        static_cache: Decode with a static KV cache (:func:`lorakit.graph_decode.static_decode`):
            on a CUDA device each decoding step replays one CUDA graph; elsewhere the same step
            runs eagerly. The same tokens as ``model.generate``; not with ``adapter_names``.

    Returns:
        The answers in the order of ``prompts``, special tokens removed.

    Raises:
        ConfigError: ``max_new_tokens`` or ``batch_size`` < 1, ``temperature`` <= 0 when sampling,
            or ``adapter_names`` not one per prompt (or given with ``static_cache``).
        AdapterNotFoundError: an adapter name is not on the model.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ConfigError(
            f"adapter_names has {len(adapter_names)} name(s) for {len(prompts)} prompt(s); give one "
            f"per prompt ('__base__' for none)."
        )
    if static_cache and adapter_names is not None:
        raise ConfigError(
            "static_cache decoding runs one adapter set for the whole batch; mixed-adapter batches "
            "(adapter_names=) decode with static_cache=False."
        )
    gen_config = _generation_config(model, tokenizer, max_new_tokens, do_sample, temperature)
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        names = None if adapter_names is None else list(adapter_names[i : i + batch_size])
        with contextlib.nullcontext() if names is None else adapter_batch(model, names):
            ids = _generate_ids(model, tokenizer, list(prompts[i : i + batch_size]), gen_config, static_cache)
        answers += [tokenizer.decode(a, skip_special_tokens=True) for a in ids]
    return answers


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[dict[str, str]],
    *,
    max_new_tokens: int = 128,
    chat: bool = True,
    do_sample: bool = False,
    temperature: float = 0.7,
    adapter_name: str | None = None,
    static_cache: bool = False,
) -> str:
    """Answer one prompt.

    Args:
        model: A causal LM (with or without adapters).
        tokenizer: Its tokenizer.
        prompt: A user message, or a whole conversation as ``[{"role", "content"}, ...]``.
        max_new_tokens: Most tokens to generate.
        chat: Render the prompt with the tokenizer's chat template (when it has one)
            and the generation prompt; False sends the text as it is.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (only with ``do_sample``).
        adapter_name: Answer with this adapter (``"__base__"``: none) whatever is active;
            None uses the active adapters.
        static_cache: Decode with a static KV cache, each step one CUDA-graph replay on a GPU
            (as :func:`generate_batch`); not with ``adapter_name``.

    Returns:
        The generated text, special tokens removed.

    Raises:
        ConfigError: ``max_new_tokens`` < 1, or ``temperature`` <= 0 when sampling.
        AdapterNotFoundError: ``adapter_name`` is not on the model.
    """
    return generate_batch(
        model,
        tokenizer,
        [prompt_ids(tokenizer, prompt, chat)],
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        adapter_names=None if adapter_name is None else [adapter_name],
        static_cache=static_cache,
    )[0]


def compare_base(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 128, chat: bool = True
) -> list[tuple[str, str, str]]:
    """Greedy answers of the base model and of the adapter, one model in memory.

    Args:
        model: A model with an active adapter (e.g. from :func:`lorakit.runs.open_adapter`).
        tokenizer: Its tokenizer.
        prompts: User messages.
        max_new_tokens: Most tokens to generate per answer.
        chat: As in :func:`generate`.

    Returns:
        ``[(prompt, base_answer, adapter_answer), ...]`` in the order of ``prompts``.
    """
    tuned = [generate(model, tokenizer, p, max_new_tokens=max_new_tokens, chat=chat) for p in prompts]
    with disable_adapters(model):
        base = [generate(model, tokenizer, p, max_new_tokens=max_new_tokens, chat=chat) for p in prompts]
    return list(zip(prompts, base, tuned))
