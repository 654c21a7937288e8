"""Int8 bases at the model level: which Linear layers go int8, ``--quantize``, run-log lines.

:func:`quantize_int8` swaps a loaded model's Linear layers for
:class:`lorakit.int8.Int8Linear` (the same ones a 4-bit base quantizes: not the
output head, embeddings or norms, which stay fp32); the layer, its kernels and
the LoRA interface are :mod:`lorakit.int8`'s. For inference only,
:func:`quantize_for_inference` gives the output head int8 weights too
(:class:`lorakit.int8_head.Int8Head`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import ConfigError, ModelLoadError
from .gptq import DAMP, gptq_quantize
from .int8 import INT8_ALTERNATIVE, Int8Linear, require_int8, weight_code_max
from .int8_head import Int8Head, one_row_kernel_runs
from .memory import return_freed_memory
from .quant_model import release_checkpoint  # shared with 4-bit bases; re-exported here

__all__ = [
    "QUANTIZE_CHOICES",
    "is_int8_model",
    "quantize_int8",
    "input_maxima",
    "smoothing_factors",
    "gptq_codes",
    "ROUNDING_CHOICES",
    "calibration_ids",
    "calibration_from_examples",
    "CALIBRATION_TOKENS",
    "CALIBRATION_TEXT",
    "describe_int8",
    "check_int8_model_spec",
    "quantize_for_inference",
    "quantize_head_int8",
    "release_checkpoint",
]

QUANTIZE_CHOICES = ("none", "int8")  # --quantize for generate / chat / eval
ROUNDING_CHOICES = ("auto", "nearest", "gptq")  # quantize_int8's weight rounding
CALIBRATION_TOKENS = 512  # of a run's training rows (calibration_from_examples)
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength (its paper's default; measured best of 0.5 / 0.8 here)
# The calibration text of --quantize int8 (and the top-up of a run's too-short training rows): ordinary prose, a
# list, numbers and code, as a chat exchange (what fine-tuning data looks like); about 300 tokens.
CALIBRATION_TEXT = (
    "Can you explain how a bicycle stays upright, and give me a short checklist for a safe ride? "
    "Also, what is 17 * 23, and how would I write a Python function that adds two numbers?",
    "Sure! A moving bicycle stays upright mostly because the rider keeps steering the front wheel under "
    "the center of mass; the geometry of the fork (the trail) and the spinning wheels help it self-correct. "
    "Checklist before a ride:\n1. Tyres pumped to the pressure printed on the sidewall.\n2. Brakes grip "
    "firmly.\n3. Chain is clean and oiled.\n4. Lights and a helmet at night.\n\n17 * 23 = 391.\n\n"
    "```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\n"
    "In 1885 John Kemp Starley built the Rover, the first 'safety bicycle', in Coventry, England. "
    "Today more than 1,000,000,000 bicycles are in use worldwide; ask me anything else!",
)


def is_int8_model(model: nn.Module) -> bool:
    """Whether any module of ``model`` is an :class:`Int8Linear`."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def input_maxima(model: nn.Module, names: Sequence[str], ids: Tensor) -> tuple[dict[str, Tensor], list[list[str]]]:
    """Per input channel max ``|x|`` of the named Linear layers over one forward of ``ids``, and who shares an input.

    Args:
        model: The full-precision model.
        names: Module names (Linear layers).
        ids: Token ids ``[B, T]``.

    Returns:
        ``(maxima, groups)``: ``{name: [in] fp32}``, and the names grouped by the input tensor
        they read (q/k/v read one, gate/up one: consecutive calls on the very same tensor
        object, never an address, which a later tensor may reuse), in call order.
    """
    maxima: dict[str, Tensor] = {}
    groups: list[list[str]] = []
    last: list[Tensor] = []  # the input the current group reads, kept alive: siblings get this very tensor

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            m = x.detach().float().abs().flatten(0, -2).amax(0)
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
            if any(name in g for g in groups):
                return
            if last and last[0] is x:
                groups[-1].append(name)
            else:
                groups.append([name])
                last[:] = [x]

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        last.clear()
    return maxima, groups


def smoothing_factors(
    model: nn.Module, names: Sequence[str], ids: Tensor, alpha: float = SMOOTH_ALPHA
) -> dict[str, Tensor]:
    """SmoothQuant's per-input-channel factors ``s = max|x|^α / max|W|^(1-α)``, one tensor per shared input.

    ``max|W|`` is over every layer of the group (q/k/v share one ``s``, so their inputs
    quantize once). A channel that never fired gets ``s = 1``.

    Args:
        model: The full-precision model.
        names: The Linear layers to be quantized.
        ids: Calibration token ids ``[B, T]`` (:func:`calibration_ids`).
        alpha: Migration strength: 0 leaves ``x`` alone, 1 moves all of its range into ``W``.

    Returns:
        ``{name: s}``, siblings mapped to the same tensor.
    """
    maxima, groups = input_maxima(model, names, ids)
    out: dict[str, Tensor] = {}
    for group in groups:
        x_max = torch.stack([maxima[n] for n in group]).amax(0)
        w_max = torch.stack([_weight(model.get_submodule(n)).abs().amax(0) for n in group]).amax(0)
        s = x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
        s = torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))
        out.update({n: s for n in group})
    return out


def gptq_codes(
    model: nn.Module,
    names: Sequence[str],
    ids: Tensor,
    smooth: dict[str, Tensor] | None = None,
    code_max: int | None = None,
    damp: float = DAMP,
) -> dict[str, tuple[Tensor, Tensor]]:
    """GPTQ's int8 codes for the named Linear layers, calibrated on one forward of ``ids``.

    Each layer's codes are chosen (:func:`lorakit.gptq.gptq_quantize`) during the forward, from
    the Gram matrix of its input; siblings reading one input tensor (q/k/v, gate/up) are
    quantized as one stacked matrix (GPTQ treats rows alike), and no Gram matrix outlives its
    layers. With SmoothQuant factors ``s``, the layer quantized is ``W diag(s)`` and its inputs
    ``x diag(1 / s)``, as the kernel sees them.
    The inputs are the full-precision model's (the model is not changed here).

    Args:
        model: The full-precision model.
        names: The Linear layers to be quantized.
        ids: Calibration token ids ``[B, T]``.
        smooth: ``{name: s}`` from :func:`smoothing_factors`; None or a missing name: no smoothing.
        code_max: The largest code; None: :func:`lorakit.int8.weight_code_max`.
        damp: GPTQ's damping (fraction of the Gram matrix's mean diagonal).

    Returns:
        ``{name: (codes int8 [out, in], scale fp32 [out])}``, for :class:`Int8Linear`.
    """
    smooth = smooth or {}
    top = weight_code_max() if code_max is None else code_max
    out: dict[str, tuple[Tensor, Tensor]] = {}
    pending: list = []  # [input tensor, [(name, module), ...]]: siblings reading it, quantized as one matrix

    def flush() -> None:
        if not pending:
            return
        x, group = pending
        pending.clear()
        x2 = x.detach().reshape(-1, x.shape[-1]).double()
        gram = x2.T @ x2
        by_scale: dict[int, list] = {}  # siblings smoothed alike (lorakit's factors: all of them) share H
        for name, module in group:
            by_scale.setdefault(id(smooth.get(name)), []).append((name, module))
        for members in by_scale.values():
            s = smooth.get(members[0][0])
            w = torch.cat([_weight(m) for _, m in members])
            g = gram
            if s is not None:
                inv = s.double().reciprocal()
                g, w = gram * inv[:, None] * inv[None, :], w * s
            codes, scale = gptq_quantize(w, g, top, damp)
            rows = 0
            for name, module in members:
                n = _weight(module).shape[0]
                out[name] = (codes[rows : rows + n].clone(), scale[rows : rows + n].clone())
                rows += n
            bar.update(len(members))

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if name in out or any(name == n for n, _ in (pending[1] if pending else ())):
                return  # a module called twice in one forward: calibrated on its first call
            if pending and pending[0] is not args[0]:
                flush()
            if not pending:
                pending[:] = [args[0], []]
            pending[1].append((name, module))

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    # seconds to minutes (~15 s for a 135M model): a bar on a terminal's stderr, nothing in logs
    bar = tqdm(total=len(names), desc="GPTQ codes", unit="layer", leave=False, disable=None)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        flush()
    finally:
        bar.close()
        for h in handles:
            h.remove()
        pending.clear()
    return out


def calibration_ids(tokenizer) -> Tensor:  # noqa: ANN001 - any transformers tokenizer
    """Token ids of lorakit's built-in calibration text (a chat exchange when the tokenizer has a template).

    Returns:
        ``[1, T]`` int64.
    """
    messages = [{"role": "user", "content": CALIBRATION_TEXT[0]}, {"role": "assistant", "content": CALIBRATION_TEXT[1]}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    else:
        ids = tokenizer(CALIBRATION_TEXT[0] + "\n" + CALIBRATION_TEXT[1])["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def calibration_from_examples(
    examples: Sequence[Mapping],
    tokenizer,  # noqa: ANN001 - any transformers tokenizer
    tokens: int = CALIBRATION_TOKENS,
) -> Tensor:
    """Calibration ids from a run's own tokenized rows: the first rows' ``input_ids`` back to back, cut at ``tokens``.

    What ``lorakit train`` calibrates an int8 base on: the data it is about to train on, rather than
    lorakit's built-in text. On the default model GPTQ's codes lost a quarter less of the logits
    (KL to fp32 0.038 -> 0.029 under emulated AVX2) when calibrated on 512 tokens of the task's own
    domain (benchmarks/RESULTS.md, "int8_schemes"). Rows holding fewer than ``tokens // 2`` tokens
    in all are topped up with :func:`calibration_ids`.

    Args:
        examples: Tokenized rows, each with ``input_ids`` (SFT examples, preference pairs).
        tokenizer: The model's tokenizer (for the top-up).
        tokens: At most this many ids.

    Returns:
        ``[1, T]`` int64, ``0 < T <= tokens``.
    """
    ids: list[int] = []
    for row in examples:
        ids += list(row["input_ids"])[: tokens - len(ids)]
        if len(ids) >= tokens:
            break
    if len(ids) < tokens // 2:
        ids = (ids + calibration_ids(tokenizer)[0].tolist())[: max(tokens, 1)]
    return torch.tensor([ids], dtype=torch.long)


def _weight(module: nn.Module) -> Tensor:
    w = module.weight.detach().float()
    return w.t() if type(module).__name__ == "Conv1D" else w


def quantize_int8(
    model: nn.Module,
    skip_modules: Sequence[str] | None = None,
    calibration: Tensor | None = None,
    alpha: float = SMOOTH_ALPHA,
    rounding: str = "auto",
) -> nn.Module:
    """Replace a loaded model's Linear layers by :class:`Int8Linear` ones, in place.

    The same layers a 4-bit base quantizes (:func:`lorakit.quant_model.modules_to_quantize`):
    every ``nn.Linear`` (and GPT-2 ``Conv1D``) but the output head, weights tied to it and
    ``_keep_in_fp32_modules``; embeddings and norms stay as they are. Each full-precision
    weight is dropped as soon as its layer is quantized, and what stays in full precision
    is copied off the checkpoint file's memory map (:func:`release_checkpoint`), so the
    fp32 weights' pages leave the process's memory; the heap the quantization freed goes
    back to the OS too (:func:`lorakit.memory.return_freed_memory`). With ``calibration`` ids, the
    layers are smoothed first (SmoothQuant, :func:`smoothing_factors`): on the default
    model that cuts the KL divergence of the logits to fp32's about fourfold
    (benchmarks/RESULTS.md, "int8_schemes").

    Args:
        model: A model on the CPU, without LoRA layers (quantize first, then inject or load an adapter).
        skip_modules: More module names (or name suffixes) to keep in full precision.
        calibration: Token ids ``[B, T]`` to calibrate SmoothQuant's factors on
            (:func:`calibration_ids`, :func:`calibration_from_examples`); None: no smoothing.
        alpha: SmoothQuant's migration strength.
        rounding: ``"nearest"``, ``"gptq"`` (needs ``calibration``) or ``"auto"`` (GPTQ with calibration
            ids on a CPU with 63 codes a side, else nearest).

    Returns:
        ``model``.

    Raises:
        ConfigError: no int8 kernel here (the message says what to use instead); a model not
            on the CPU; a model that already has LoRA layers; an unknown ``rounding``, or ``"gptq"``
            without calibration ids.
    """
    from .quant_model import modules_to_quantize

    require_int8("int8 bases")
    if rounding not in ROUNDING_CHOICES:
        raise ConfigError(f"unknown int8 weight rounding {rounding!r}; use one of {', '.join(ROUNDING_CHOICES)}.")
    if rounding == "gptq" and calibration is None:
        raise ConfigError("GPTQ rounding needs calibration token ids (calibration=calibration_ids(tokenizer)).")
    if rounding == "auto":
        rounding = "gptq" if calibration is not None and weight_code_max() < 127 else "nearest"
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise ConfigError(
            f"int8 bases run on the CPU (oneDNN's int8 kernels); the model is on {device}. "
            f"Use {INT8_ALTERNATIVE} on {device.type}."
        )
    if any(".lora_" in n for n, _ in model.named_parameters()):
        raise ConfigError("the model already has LoRA layers; quantize the base to int8 first, then add LoRA.")
    names = modules_to_quantize(model, skip_modules)
    if not names:
        raise ModelLoadError(f"{type(model).__name__} has no nn.Linear layer to quantize to int8 (besides the head).")
    smooth = smoothing_factors(model, names, calibration, alpha) if calibration is not None else {}
    codes = gptq_codes(model, names, calibration, smooth) if rounding == "gptq" else {}
    shared: dict[int, Tensor] = {}  # id(s) -> the one input_scale tensor siblings share
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        s = smooth.get(name)
        if name in codes:
            new = Int8Linear(*codes.pop(name), old.bias, None if s is None else s.float().reciprocal(), "gptq")
        else:
            new = Int8Linear.from_linear(old, s)
        if s is not None:
            new.input_scale = shared.setdefault(id(s), new.input_scale)
        setattr(parent, child, new)
        old.weight = None  # the full-precision copy goes now, not at the end
    for p in model.parameters():
        p.requires_grad_(False)
    release_checkpoint(model)
    return_freed_memory()  # the calibration's activations and the quantizer's temporaries, freed on glibc's heap
    return model


def describe_int8(model: nn.Module) -> str:
    """One line for run logs and summaries (``"int8 base: 14 Linear layers, ..."``), or ``""`` without any."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if not layers:
        return ""
    smoothed = sum(m.input_scale is not None for m in layers)
    gptq = sum(m.rounding == "gptq" for m in layers)
    how = (f", SmoothQuant on {smoothed}" if smoothed else "") + (f", GPTQ rounding on {gptq}" if gptq else "")
    if any(isinstance(m, Int8Head) for m in model.modules()):
        rest = "head int8 weights with fp32 activations; embeddings, norms and LoRA fp32"
    else:
        rest = "head, embeddings, norms and LoRA fp32"
    return (
        f"int8 base: {len(layers)} Linear layers (int8 weights per output channel, int8 activations per row{how}; "
        f"{rest})"
    )


def check_int8_model_spec(model: object) -> None:
    """Refuse ``train.precision: int8`` on a 4-bit base (a run config's ``model`` value, before loading).

    Raises:
        ConfigError: ``model`` is a mapping with a ``quantization`` other than none.
    """
    q = model.get("quantization") if isinstance(model, dict) else None
    if q is not None and str(q).lower() != "none":
        raise ConfigError(
            f"train.precision: int8 quantizes a full-precision base to int8 itself, but model.quantization is {q!r} "
            "(a 4-bit base). Use one of them: model.quantization: none with precision int8, or a 4-bit base with "
            "precision fp32/bf16."
        )


def quantize_head_int8(model: nn.Module) -> bool:
    """Swap a model's output head (a plain ``nn.Linear`` on the CPU) for an :class:`~lorakit.int8_head.Int8Head`.

    Inference only (training keeps the head fp32). Done only where the head's compiled one-row
    loop runs: without it a decoding step's int8 head is slower than fp32's. A head tied to the
    input embeddings leaves the embedding's fp32 weight as it is.

    Args:
        model: A transformers model (``get_output_embeddings``).

    Returns:
        True if the head was swapped.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or head.weight.device.type != "cpu" or not one_row_kernel_runs():
        return False
    name = next(n for n, m in model.named_modules() if m is head)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8Head.from_linear(head))
    return True


def quantize_for_inference(  # noqa: ANN001 - any transformers tokenizer
    model: nn.Module, quantize: str, tokenizer=None, head: bool = True
) -> nn.Module:
    """``--quantize`` of ``generate`` / ``chat`` / ``eval``: the loaded base's Linear layers to int8, in place.

    Decoding on a CPU is memory-bound: int8 weights move a quarter of fp32's bytes.
    Called before the adapter is loaded, so LoRA wraps the int8 layers and stays
    unmerged in fp32 on top. The output head, the widest matmul of a decoding step,
    gets int8 weights too (:func:`quantize_head_int8`; its activations stay fp32).

    Args:
        model: The loaded base model (CPU, no LoRA yet).
        quantize: ``"none"`` or ``"int8"``.
        tokenizer: The model's tokenizer: SmoothQuant (and GPTQ, where weights get 7 bits) calibrated on
            :data:`CALIBRATION_TEXT` (``lorakit train`` calibrates on its training rows instead).
        head: False keeps the output head fp32 (an adapter that adapts or retrains the head).

    Returns:
        ``model``.

    Raises:
        ConfigError: an unknown value; a 4-bit base; no int8 kernels here or a model off the CPU.
    """
    q = str(quantize).lower()
    if q not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown --quantize {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}.")
    if q == "none":
        return model
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise ConfigError("--quantize int8 needs a full-precision base, but this one is 4-bit; drop --quantize.")
    quantize_int8(model, calibration=calibration_ids(tokenizer) if tokenizer is not None else None)
    if head:
        quantize_head_int8(model)
    return model
