"""A decoding step's LoRA term as one Triton kernel on a GPU: ``y += s·(x·Aᵀ)·Bᵀ`` in one launch.

In a decoding step each adapted projection sees a few rows (the batch), and the
unmerged LoRA term costs three tiny kernels, each 1-3 µs of latency however little it
computes: ``x·Aᵀ``, then ``(x·Aᵀ)·Bᵀ``, which cuBLAS runs as a split-K dot kernel plus a
reduction. :func:`add_lora_` does the same math in one kernel: every program recomputes
the rows' ``x·Aᵀ`` in registers (``r x in`` products, A read from L2; the K loop unrolled so
that its loads are in flight together) and adds its block of ``s·(x·Aᵀ)·Bᵀ`` into ``y``.

Measured on an H200 (SmolLM2-135M, r=16 on all seven projections, one decoding step as a
CUDA-graph replay, fp32; benchmarks/RESULTS.md, ``inference.py --static (cuda)``): at batch 1
the unmerged step is 1.21x the plain model's with this kernel, 1.35x with the three ops; at
batch 8 the kernel lost (1.33x against 1.25x: each program's share of ``x·Aᵀ`` grows with the
rows). So :func:`fits` takes it only up to :data:`_MAX_CELLS` padded rows x rank (batch 1-2 at
r=16); larger calls keep the three ops. A first version with ``tl.dot`` per 64 input columns
took 16 µs a call (operands shuffled through shared memory): slower than the three ops.

The rounding follows the torch ops it replaces: ``x·Aᵀ`` is accumulated in float32 and
rounded to the model's dtype, the product with ``Bᵀ`` accumulated in float32 and added to
``y`` with one rounding. :mod:`lorakit.graph_decode` routes unmerged LoRA Linears through it
while it records a CUDA graph (where the kernel's Python launch cost is paid once). The
kernel is built on first use, from Triton (part of every CUDA build of torch), and runs in
Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how it is tested
without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["DTYPES", "MAX_ROWS", "available", "add_lora_", "fits", "reference"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernel takes (one dtype for all four tensors)
MAX_ROWS = 16  # rows (batch x new tokens) up to which a step's LoRA term runs as one kernel
_MAX_CELLS = 32  # padded rows x padded rank: measured faster at 1 x 16, slower at 8 x 16 (module docstring)
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
    return None if device is None else _trial(str(torch.device(device)))


@functools.cache
def _trial(device: str) -> str | None:
    """One tiny call on ``device``: None if it gives ``0.5 · 16 = 8`` everywhere, else why not."""
    try:
        ones = torch.ones(1, 16, device=device)
        y = add_lora_(torch.zeros(1, 16, device=device), ones, ones, ones.T.contiguous(), 0.5)
        if not torch.equal(y.cpu(), torch.full((1, 16), 8.0)):
            return f"the kernel's result on {device} is wrong"
    except Exception as e:  # noqa: BLE001 - whatever Triton raises (no compiler for this GPU, a broken install)
        return f"the kernel fails on {device}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return None


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, built on first use (Triton reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def lora_add_kernel(
        x_ptr, a_ptr, b_ptr, y_ptr,
        M, N, R, scale,
        stride_xm, stride_ak, stride_bn, stride_ym,
        K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # x (M, K) row stride stride_xm; A (R, K) row stride stride_ak; B (N, R) row stride stride_bn;
        # y (M, N) row stride stride_ym. Last dimensions contiguous. No tl.dot: at these sizes its
        # operand shuffles through shared memory cost more than the math (16 µs a call with a dot per
        # 64 columns of K), so products are summed in registers, and the K loop is unrolled (K is a
        # compile-time constant) so that its loads can be in flight at once.
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        outs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        b = tl.load(
            b_ptr + outs[:, None] * stride_bn + ranks[None, :],
            mask=(outs[:, None] < N) & (ranks[None, :] < R),
            other=0.0,
        ).to(tl.float32)  # (BLOCK_N, BLOCK_R), loaded before x·Aᵀ is needed
        where = y_ptr + rows[:, None] * stride_ym + outs[None, :]
        keep = (rows[:, None] < M) & (outs[None, :] < N)
        y = tl.load(where, mask=keep, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + cols[None, :],
                mask=(rows[:, None] < M) & (cols[None, :] < K),
                other=0.0,
            ).to(tl.float32)
            a = tl.load(
                a_ptr + ranks[:, None] * stride_ak + cols[None, :],
                mask=(ranks[:, None] < R) & (cols[None, :] < K),
                other=0.0,
            ).to(tl.float32)
            acc += x[:, None, :] * a[None, :, :]
        xa = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_R) in float32
        xa = xa.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to the model's dtype, as F.linear(x, A) is
        delta = tl.sum(xa[:, None, :] * b[None, :, :], axis=2)  # (BLOCK_M, BLOCK_N)
        tl.store(where, (y.to(tl.float32) + scale * delta).to(y_ptr.dtype.element_ty), mask=keep)

    return lora_add_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def fits(rows: int, r: int) -> bool:
    """Whether a call of ``rows`` rows and rank ``r`` is one the kernel runs faster than the three ops.

    Padded to powers of two, ``rows x r <= 32``: measured faster at 1 x 16, slower at 8 x 16 (H200).
    """
    return 0 < rows <= MAX_ROWS and _pow2(rows) * _pow2(r) <= _MAX_CELLS


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
        ConfigError: shapes that do not fit, more than :data:`MAX_ROWS` rows, dtypes that differ,
            tensors on different devices, or no Triton.
    """
    why = available()
    if why is not None:
        raise ConfigError(f"decode_lora.add_lora_ cannot run: {why}; use the torch ops (lorakit's LoRA layers)")
    K, N, R = x.shape[-1], y.shape[-1], A.shape[0]
    rows = x.numel() // K if K else 0
    problems = []
    if A.shape != (R, K) or B.shape != (N, R) or y.shape[:-1] != x.shape[:-1]:
        problems.append(f"shapes x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, y {tuple(y.shape)}")
    if not fits(rows, R):
        problems.append(f"{rows} rows at rank {R} (at most {MAX_ROWS} rows, rows x rank <= {_MAX_CELLS}: a step's)")
    if len({x.dtype, A.dtype, B.dtype, y.dtype}) != 1 or x.dtype not in DTYPES:
        problems.append(f"dtypes {x.dtype}, {A.dtype}, {B.dtype}, {y.dtype} (one of {[str(d) for d in DTYPES]})")
    if len({x.device, A.device, B.device, y.device}) != 1:
        problems.append("tensors on different devices")
    if problems:
        raise ConfigError("decode_lora.add_lora_: " + "; ".join(problems))
    x2, y2 = x.reshape(rows, K), y.view(rows, N)
    A, B = (t if t.stride(-1) == 1 else t.contiguous() for t in (A, B))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    _kernel()[(-(-N // _BLOCK_N),)](
        x2, A, B, y2,
        rows, N, R, float(scale),
        x2.stride(0), A.stride(0), B.stride(0), y2.stride(0),
        K=K, BLOCK_M=_pow2(rows), BLOCK_R=_pow2(R), BLOCK_K=max(16, _ACC // (_pow2(rows) * _pow2(R))),
        BLOCK_N=_BLOCK_N,
    )  # fmt: skip
    return y


def reference(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The torch ops :func:`add_lora_` replaces (lorakit's inference path), on a copy of ``y``."""
    out = y.clone()
    xa = torch.nn.functional.linear(x, A)
    out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), B.T, alpha=scale)
    return out
