"""A decoding step's LoRA terms as Triton kernels on a GPU: ``y += s·(x·Aᵀ)·Bᵀ``, or whole projections.

In a decoding step each adapted projection sees a few rows (the batch), and the
unmerged LoRA term costs three tiny kernels, each 1-3 µs of latency however little it
computes: ``x·Aᵀ``, then ``(x·Aᵀ)·Bᵀ``, which cuBLAS runs as a split-K dot kernel plus a
reduction. :func:`add_lora_` does the same math in one kernel: every program recomputes
the rows' ``x·Aᵀ`` in registers (``r x in`` products, A read from L2; the K loop unrolled so
that its loads are in flight together) and adds its block of ``s·(x·Aᵀ)·Bᵀ`` into ``y``.
:func:`add_lora_group_` does it for 1-3 projections that read one ``x`` (q/k/v, gate/up) in
one launch, the programs covering their outputs one after another (``add_lora_`` is its
one-member case), and :func:`linear_lora_group` computes whole projections, the base
matmul ``x·Wᵀ + bias`` in the same kernel as the LoRA term, so that q/k/v (or gate/up)
cost one launch where plain decoding launches a cuBLAS kernel per projection. The kernels
live in :mod:`lorakit.decode_lora_triton`.

Measured on an H200 (SmolLM2-135M, r=16 on all seven projections, one decoding step as a
CUDA-graph replay, fp32; benchmarks/RESULTS.md, ``inference.py --static (cuda)``): at batch 1
the unmerged step is 1.35x the plain model's with torch's three ops, 1.22x with one LoRA
kernel per projection, 1.13x with one per q/k/v and gate/up group, 1.05x with those groups
whole (base matmuls in the kernel; o and down a base matmul plus a LoRA kernel) and 1.08x
with every projection whole. At batch 8 the
LoRA kernel lost (1.33x against 1.25x: each program's share of ``x·Aᵀ`` grows with the rows).
So :func:`fits` takes it only up to :data:`MAX_CELLS` padded rows x rank (batch 1-2 at
r=16); larger calls keep the three ops. The whole-projection kernel wins at batch 8 too (the
base matmul's weight is read once for all rows, where cuBLAS's fp32 kernels for 8 rows take
twice their batch-1 time), so :func:`fits` takes whole projections up to :data:`MAX_ROWS` rows
at any rank: with q/k/v and gate/up whole and o and down on the three ops, a batch-8 step is
0.76x the plain model's, a batch-16 one 0.78x (the LoRA kernel for o and down too, past its
limit: 0.82x / 0.94x). A
first version of the LoRA kernel with ``tl.dot`` per 64 input columns took 16 µs a call
(operands shuffled through shared memory): slower than the three ops.

The rounding follows the torch ops it replaces: ``x·Aᵀ`` is accumulated in float32 and
rounded to the model's dtype, the product with ``Bᵀ`` accumulated in float32 and added to
``y`` with one rounding (a whole projection's base is rounded first, as ``F.linear`` rounds
it; its sum runs in another order than cuBLAS's, so it equals the torch ops to rounding).
:mod:`lorakit.graph_decode` routes unmerged LoRA Linears through it
while it records a CUDA graph (where the kernel's Python launch cost is paid once). The
kernel is built on first use, from Triton (part of every CUDA build of torch), and runs in
Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how it is tested
without a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["DTYPES", "MAX_CELLS", "MAX_ROWS", "available", "add_lora_", "add_lora_group_", "fits", "linear_lora_group"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernel takes (one dtype for all four tensors)
MAX_ROWS = 16  # rows (batch x new tokens) up to which a step's LoRA term runs as one kernel
MAX_CELLS = 32  # LoRA term alone: padded rows x padded rank; measured faster at 1 x 16, slower at 8 x 16
_ACC = 4096  # padded rows x rank x input columns summed per loop step (32 float32 registers a thread)
_BLOCK_N = 32  # output columns per program: N / 32 programs (18-48 at the default model's shapes)


def available(device: torch.device | str | None = None) -> str | None:
    """Why :func:`add_lora_` cannot run here, or None when it can.

    Args:
        device: Also build and run the kernel once on this device (a tiny call, checked against
            its known result; cached per device): a GPU Triton cannot compile for, or a broken
            install, shows here rather than inside a CUDA graph's capture. None: Triton importable.

    Returns:
        The reason, or None.
    """
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e}); it comes with torch's CUDA builds"
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device: one trial
        device = torch.device("cuda", torch.cuda.current_device())
    return _trial(str(device))


@functools.cache
def _trial(device: str) -> str | None:
    """Tiny calls of both kernels on ``device``: None if they give ``0.5 · 16 = 8`` and ``16 + 8 = 24``
    everywhere, else why not."""
    try:
        ones = torch.ones(1, 16, device=device)
        y = add_lora_(torch.zeros(1, 16, device=device), ones, ones, ones.T.contiguous(), 0.5)
        (whole,) = linear_lora_group(ones, [ones.T @ ones], [None], [ones], [ones.T.contiguous()], [0.5])
        if not (torch.equal(y.cpu(), torch.full((1, 16), 8.0)) and torch.equal(whole.cpu(), torch.full((1, 16), 24.0))):
            return f"the kernel's result on {device} is wrong"
    except Exception as e:  # noqa: BLE001 - whatever Triton raises (no compiler for this GPU, a broken install)
        return f"the kernel fails on {device}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return None


def _check(
    what: str,
    x: torch.Tensor,
    ys: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    more: Sequence[torch.Tensor] = (),
    in_place: bool = False,
) -> tuple[int, int]:
    """``(rows, in)`` of a call of 1-3 projections reading ``x``, after checking what the kernels need.

    ``ys`` are the outputs; ``more`` other tensors that must share the dtype and device (a whole projection's
    base weights and biases: then :func:`fits` is asked with ``whole``); ``in_place``: the ``ys`` are written in
    place (so they must be contiguous).
    """
    why = available()
    if why is not None:
        raise ConfigError(f"decode_lora.{what} cannot run: {why}; use the torch ops (lorakit's LoRA layers)")
    members = len(ys)
    if not 1 <= members <= 3 or not len(As) == len(Bs) == len(scales) == members:
        raise ConfigError(f"decode_lora.{what} takes 1-3 projections, each with its A, B and scale")
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    problems = []
    for y, A, B in zip(ys, As, Bs):
        N, R = y.shape[-1], A.shape[0]
        if A.shape != (R, K) or B.shape != (N, R) or y.shape[:-1] != x.shape[:-1]:
            problems.append(f"shapes x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, y {tuple(y.shape)}")
    tensors = [x, *ys, *As, *Bs, *more]
    r = max(A.shape[0] for A in As)
    if not fits(rows, r, whole=bool(more)):
        limit = "" if more else f", rows x rank <= {MAX_CELLS}"
        problems.append(f"{rows} rows at rank {r} (at most {MAX_ROWS} rows{limit}: a step's)")
    if len({t.dtype for t in tensors}) != 1 or x.dtype not in DTYPES:
        problems.append(f"dtypes {sorted({str(t.dtype) for t in tensors})} (one of {[str(d) for d in DTYPES]})")
    if len({t.device for t in tensors}) != 1:
        problems.append("tensors on different devices")
    if in_place and not all(y.is_contiguous() for y in ys):
        problems.append("an output y that is not contiguous (written in place through a 2-D view)")
    if problems:
        raise ConfigError(f"decode_lora.{what}: " + "; ".join(problems))
    return rows, K


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D with a contiguous last dimension (a view where it can be)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def linear_lora_group(
    x: torch.Tensor,
    Ws: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> list[torch.Tensor]:
    """Whole projections reading one ``x``, in one kernel: ``F.linear(x, W, bias) + s·(x·Aᵀ)·Bᵀ`` each.

    The base matmul runs in the same kernel as the LoRA term (1-3 projections: q/k/v, gate/up),
    so a batch-1 decoding step's adapted projections cost one launch per group instead of a
    cuBLAS kernel per projection plus one for the LoRA terms. Rounding: the base is rounded to
    the model's dtype before the LoRA term is added, as ``F.linear`` then ``addmm_`` do; its
    float32 sum runs in another order than cuBLAS's, so results equal the torch ops to
    rounding, not bit for bit.

    Args:
        x: ``[..., in]``, at most :data:`MAX_ROWS` rows.
        Ws: Each projection's base weight ``[out_i, in]``.
        biases: Each one's bias ``[out_i]``, or None; all or none of them.
        As: Each one's ``[r_i, in]`` A weight.
        Bs: Each one's ``[out_i, r_i]`` B weight.
        scales: Each one's scale.

    Returns:
        The outputs ``[..., out_i]``, new tensors.

    Raises:
        ConfigError: as :func:`add_lora_group_`, or a weight of the wrong shape, or some biases None.
    """
    if len(Ws) != len(As) or len(biases) != len(As):
        raise ConfigError("decode_lora.linear_lora_group takes one W and one bias (or None) per projection")
    has_bias = bool(biases) and biases[0] is not None
    if any((c is not None) != has_bias for c in biases):
        raise ConfigError("decode_lora.linear_lora_group: give a bias for every projection or for none")
    bad = [tuple(W.shape) for W in Ws if W.dim() != 2 or W.shape[1] != x.shape[-1]]
    bad += [tuple(c.shape) for W, c in zip(Ws, biases) if c is not None and c.shape != W.shape[:1]]
    if bad:
        raise ConfigError(f"decode_lora.linear_lora_group: weights or biases of shapes {bad} for x {tuple(x.shape)}")
    ys = [x.new_empty(*x.shape[:-1], W.shape[0]) for W in Ws]
    rows, K = _check("linear_lora_group", x, ys, As, Bs, scales, [*Ws, *(c for c in biases if c is not None)])
    x2, r = _rows_2d(x), max(A.shape[0] for A in As)
    args = []  # per member: W, bias, A, B, y (2-D), N, R, scale, and the four row strides
    for W, c, A, B, y, scale in zip(Ws, biases, As, Bs, ys, scales):
        W, A, B = (t if t.stride(-1) == 1 else t.contiguous() for t in (W, A, B))
        c = (c if c.is_contiguous() else c.contiguous()) if c is not None else W  # W: an unread placeholder
        args.append((W, c, A, B, y.view(rows, y.shape[-1]), W.shape[0], A.shape[0], float(scale)))
    members = len(args)
    args += [args[0]] * (3 - members)
    block_m = _pow2(rows)
    _kernels().linear_lora_kernel[(sum(-(-a[5] // _BLOCK_N) for a in args[:members]),)](
        x2, *(t for a in args for t in a[:5]),
        rows, *(a[5] for a in args), *(a[6] for a in args), *(a[7] for a in args),
        x2.stride(0), *(s for a in args for s in (a[0].stride(0), a[2].stride(0), a[3].stride(0), a[4].stride(0))),
        K=K, BLOCK_M=block_m, BLOCK_R=_pow2(r), BLOCK_K=max(16, min(128, _ACC // (block_m * _BLOCK_N))),
        BLOCK_N=_BLOCK_N, MEMBERS=members, HAS_BIAS=has_bias,
    )  # fmt: skip
    return ys


def _kernels() -> Any:
    """The module of the jitted kernels (imported on first use)."""
    from . import decode_lora_triton

    return decode_lora_triton


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def fits(rows: int, r: int, whole: bool = False) -> bool:
    """Whether a call of ``rows`` rows and rank ``r`` is one the kernels run faster than torch's ops.

    The LoRA term alone (:func:`add_lora_group_`): padded to powers of two, ``rows x r <= 32``,
    measured faster than the three ops at 1 x 16, slower at 8 x 16 (H200). ``whole`` projections,
    base matmul included (:func:`linear_lora_group`): up to :data:`MAX_ROWS` rows at any rank
    (faster than cuBLAS plus the three ops at batch 1, 8 and 16).
    """
    if whole:
        return 0 < rows <= MAX_ROWS
    return 0 < rows <= MAX_ROWS and _pow2(rows) * _pow2(r) <= MAX_CELLS


def add_lora_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Add ``scale·(x·Aᵀ)·Bᵀ`` into ``y`` in place, in one kernel.

    Args:
        y: ``[..., out]``, the base layer's output (written in place).
        x: ``[..., in]``, the layer's input; at most :data:`MAX_ROWS` rows.
        A: ``[r, in]``, the adapter's A weight.
        B: ``[out, r]``, its B weight.
        scale: ``lora_alpha / r`` (or the rsLoRA scale).

    Returns:
        ``y``.

    Raises:
        ConfigError: shapes that do not fit, a call :func:`fits` refuses, dtypes that differ,
            tensors on different devices, or no Triton.
    """
    add_lora_group_([y], x, [A], [B], [scale])
    return y


def add_lora_group_(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> None:
    """:func:`add_lora_` for 1-3 projections that read one ``x`` (q/k/v, gate/up), in one kernel.

    Args:
        ys: Each projection's output ``[..., out_i]`` (written in place).
        x: ``[..., in]``, their common input.
        As: Each one's ``[r_i, in]`` A weight.
        Bs: Each one's ``[out_i, r_i]`` B weight.
        scales: Each one's scale.

    Raises:
        ConfigError: as :func:`add_lora_` (the largest rank counts for :func:`fits`), or not 1-3 members.
    """
    rows, K = _check("add_lora_", x, ys, As, Bs, scales, in_place=True)
    x2, r, members = _rows_2d(x), max(A.shape[0] for A in As), len(ys)
    args = []  # per member: A, B, y (2-D, last dimension contiguous), N, R, scale, and the three row strides
    for y, A, B, scale in zip(ys, As, Bs, scales):
        A, B = (t if t.stride(-1) == 1 else t.contiguous() for t in (A, B))
        args.append((A, B, y.view(rows, y.shape[-1]), y.shape[-1], A.shape[0], float(scale)))
    args += [args[0]] * (3 - members)  # unused slots repeat the first member
    blocks = sum(-(-a[3] // _BLOCK_N) for a in args[:members])
    _kernels().lora_add_kernel[(blocks,)](
        x2, *(t for a in args for t in a[:3]),
        rows, *(a[3] for a in args), *(a[4] for a in args), *(a[5] for a in args),
        x2.stride(0), *(s for a in args for s in (a[0].stride(0), a[1].stride(0), a[2].stride(0))),
        K=K, BLOCK_M=_pow2(rows), BLOCK_R=_pow2(r), BLOCK_K=max(16, _ACC // (_pow2(rows) * _pow2(r))),
        BLOCK_N=_BLOCK_N, MEMBERS=members,
    )  # fmt: skip
