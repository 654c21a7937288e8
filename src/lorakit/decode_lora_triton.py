"""The Triton kernels of :mod:`lorakit.decode_lora` (imported on first use: Triton is a GPU-side dependency).

Triton resolves a kernel's callees among its module's globals, so they live at module level here;
Triton reads ``TRITON_INTERPRET`` when this module is first imported (the CPU tests' interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["linear_lora_kernel", "lora_add_kernel"]


@triton.jit
def tile(ptr, rows, cols, stride, n_rows, n_cols):
    # ptr[rows, cols] in float32 (row stride `stride`, columns contiguous), 0 outside [n_rows) x [n_cols).
    where = ptr + rows[:, None] * stride + cols[None, :]
    return tl.load(where, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0).to(tl.float32)


@triton.jit
def store_with_lora(y_ptr, rows, outs, stride_ym, M, N, base, xa, b, scale):
    # y[rows, outs] = base + scale·(xa·Bᵀ) in y's dtype, nothing stored outside [M) x [N);
    # base (BLOCK_M, BLOCK_N), xa (BLOCK_M, BLOCK_R) and b (BLOCK_N, BLOCK_R) in float32.
    delta = tl.sum(xa[:, None, :] * b[None, :, :], axis=2)  # (BLOCK_M, BLOCK_N)
    where = y_ptr + rows[:, None] * stride_ym + outs[None, :]
    keep = (rows[:, None] < M) & (outs[None, :] < N)
    tl.store(where, (base + scale * delta).to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def one_block(
    x_ptr, a_ptr, b_ptr, y_ptr,
    M, N, R, scale,
    stride_xm, stride_ak, stride_bn, stride_ym, block,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Output columns [block * BLOCK_N, +BLOCK_N) of one projection: y += scale·(x·Aᵀ)·Bᵀ.
    # x (M, K) row stride stride_xm; A (R, K) row stride stride_ak; B (N, R) row stride stride_bn;
    # y (M, N) row stride stride_ym. Last dimensions contiguous. No tl.dot: at these sizes its
    # operand shuffles through shared memory cost more than the math (16 µs a call with a dot per
    # 64 columns of K), so products are summed in registers, and the K loop is unrolled (K is a
    # compile-time constant) so that its loads can be in flight at once.
    rows = tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    outs = block * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tile(b_ptr, outs, ranks, stride_bn, N, R)  # (BLOCK_N, BLOCK_R), loaded before x·Aᵀ is needed
    y = tile(y_ptr, rows, outs, stride_ym, M, N)
    acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tile(x_ptr, rows, cols, stride_xm, M, K)
        a = tile(a_ptr, ranks, cols, stride_ak, R, K)
        acc += x[:, None, :] * a[None, :, :]
    xa = tl.sum(acc, axis=2).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded as F.linear(x, A) rounds it
    store_with_lora(y_ptr, rows, outs, stride_ym, M, N, y, xa, b, scale)


@triton.jit
def lora_add_kernel(
    x_ptr, a0, b0, y0, a1, b1, y1, a2, b2, y2,
    M, N0, N1, N2, R0, R1, R2, s0, s1, s2,
    stride_xm, sa0, sb0, sy0, sa1, sb1, sy1, sa2, sb2, sy2,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, MEMBERS: tl.constexpr,
):  # fmt: skip
    # 1-3 projections reading one x (q/k/v); the programs cover their outputs one after another.
    pid = tl.program_id(0)
    if MEMBERS == 1:
        one_block(x_ptr, a0, b0, y0, M, N0, R0, s0, stride_xm, sa0, sb0, sy0, pid,
                  K, BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N)  # fmt: skip
    else:
        p0 = tl.cdiv(N0, BLOCK_N)
        p1 = tl.cdiv(N1, BLOCK_N)
        if pid < p0:
            one_block(x_ptr, a0, b0, y0, M, N0, R0, s0, stride_xm, sa0, sb0, sy0, pid,
                      K, BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N)  # fmt: skip
        elif pid < p0 + p1:
            one_block(x_ptr, a1, b1, y1, M, N1, R1, s1, stride_xm, sa1, sb1, sy1, pid - p0,
                      K, BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N)  # fmt: skip
        else:
            one_block(x_ptr, a2, b2, y2, M, N2, R2, s2, stride_xm, sa2, sb2, sy2, pid - p0 - p1,
                      K, BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N)  # fmt: skip


@triton.jit
def linear_block(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr,
    M, N, R, scale,
    stride_xm, stride_wn, stride_ak, stride_bn, stride_ym, block,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    # Output columns [block * BLOCK_N, +BLOCK_N) of one projection: y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ.
    # W (N, K) row stride stride_wn; the rest as one_block. x is read once per K step for both
    # products; the base is rounded to the model's dtype before the LoRA term is added, as
    # F.linear and then addmm_ round it.
    rows = tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    outs = block * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tile(b_ptr, outs, ranks, stride_bn, N, R)  # (BLOCK_N, BLOCK_R)
    acc_w = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tile(x_ptr, rows, cols, stride_xm, M, K)
        w = tile(w_ptr, outs, cols, stride_wn, N, K)
        a = tile(a_ptr, ranks, cols, stride_ak, R, K)
        acc_w += x[:, None, :] * w[None, :, :]
        acc_a += x[:, None, :] * a[None, :, :]
    base = tl.sum(acc_w, axis=2)  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        base += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    base = base.to(y_ptr.dtype.element_ty).to(tl.float32)
    xa = tl.sum(acc_a, axis=2).to(x_ptr.dtype.element_ty).to(tl.float32)  # (BLOCK_M, BLOCK_R)
    store_with_lora(y_ptr, rows, outs, stride_ym, M, N, base, xa, b, scale)


@triton.jit
def linear_lora_kernel(
    x_ptr, w0, c0, a0, b0, y0, w1, c1, a1, b1, y1, w2, c2, a2, b2, y2,
    M, N0, N1, N2, R0, R1, R2, s0, s1, s2,
    stride_xm, sw0, sa0, sb0, sy0, sw1, sa1, sb1, sy1, sw2, sa2, sb2, sy2,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, MEMBERS: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    # 1-3 whole projections (base and LoRA term) reading one x; programs cover their outputs in turn.
    pid = tl.program_id(0)
    p0 = tl.cdiv(N0, BLOCK_N)
    p1 = tl.cdiv(N1, BLOCK_N)
    if MEMBERS == 1 or pid < p0:
        linear_block(x_ptr, w0, c0, a0, b0, y0, M, N0, R0, s0, stride_xm, sw0, sa0, sb0, sy0, pid,
                     K, BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N, HAS_BIAS)  # fmt: skip
    elif pid < p0 + p1:
        linear_block(x_ptr, w1, c1, a1, b1, y1, M, N1, R1, s1, stride_xm, sw1, sa1, sb1, sy1, pid - p0,
                     K, BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N, HAS_BIAS)  # fmt: skip
    else:
        linear_block(x_ptr, w2, c2, a2, b2, y2, M, N2, R2, s2, stride_xm, sw2, sa2, sb2, sy2, pid - p0 - p1,
                     K, BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N, HAS_BIAS)  # fmt: skip
