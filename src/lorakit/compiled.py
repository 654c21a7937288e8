"""CPU kernels that torch's inductor compiles once, each checked against its eager form before use.

A chain of elementwise passes, or a reduction over a weight read once, costs eager torch a
memory pass and a temporary per op; inductor (``torch.compile``) turns it into one C++ loop.
Two such kernels serve lorakit: the per-row int8 quantizer of activations
(:mod:`lorakit.row_quant`) and the int8 output head's one-row product (:mod:`lorakit.int8_head`).

:func:`checked_kernel` compiles a function (dynamic shapes: one kernel for every size), runs
it on the caller's probe inputs and compares it with the eager function; where inductor cannot
compile (no C++ compiler, an unsupported platform) or the probe disagrees, it returns None
after one warning, and where the caller's switch-off variable is ``0`` it returns None
silently: the caller then runs the eager form.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["inductor_options", "checked_kernel"]


def inductor_options() -> dict[str, int] | None:
    """The vector width inductor generates for, named: on an AVX512-VNNI CPU (AMD Zen 4, torch 2.13) the ISA it
    picks by itself ("avx512_vnni") compiled the int8 quantizer into a kernel that wrote out of bounds; plain
    AVX-512 and AVX2 code is correct (tests/test_row_quant.py runs the widths this CPU has)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"cpp.simdlen": 512} if capability == "AVX512" else {"cpp.simdlen": 256} if capability == "AVX2" else None


def _agree(got: Any, want: Any, check: Callable[[torch.Tensor, torch.Tensor], bool]) -> bool:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    return len(got) == len(want) and all(
        g.shape == w.shape and g.dtype == w.dtype and check(g, w) for g, w in zip(got, want, strict=True)
    )


def checked_kernel(
    fn: Callable,
    probes: Iterable[tuple[torch.Tensor, ...]],
    check: Callable[[torch.Tensor, torch.Tensor], bool],
    fallback: str,
    switch: str,
) -> Callable | None:
    """``fn`` compiled by inductor, or None: run ``fn`` eagerly.

    Callers cache the result (``functools.cache``), so a process compiles and checks each kernel once.

    Args:
        fn: A pure tensor function, its outputs a tensor or a tuple of tensors.
        probes: Argument tuples to compare the compiled and the eager ``fn`` on (under ``torch.no_grad``).
        check: ``check(compiled_output, eager_output)`` for each output tensor: True where they agree.
        fallback: What runs instead, for the warning (e.g. "int8 activations are quantized in eager passes").
        switch: The environment variable that, set to ``0``, skips the attempt (named in the warning).

    Returns:
        The compiled callable, or None.
    """
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        compiled = torch.compile(fn, dynamic=True, options=inductor_options())  # past the recompile limit: eager
        with torch.no_grad():
            for args in probes:
                if not _agree(compiled(*args), fn(*args), check):
                    shapes = ", ".join("x".join(map(str, a.shape)) for a in args)
                    raise RuntimeError(f"the compiled {fn.__name__} disagrees with the eager one on a {shapes} probe")
    except Exception as exc:  # noqa: BLE001 - any compile failure means: run eagerly
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        warnings.warn(
            f"lorakit: {fallback} (slower): torch.compile failed here ({type(exc).__name__}: {detail}); "
            f"set {switch}=0 to skip the attempt",
            stacklevel=3,
        )
        return None
    return compiled
