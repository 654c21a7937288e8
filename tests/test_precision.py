"""lorakit.precision: which dtype the fused ops compute in, and autocast kept out of them."""

from __future__ import annotations

import torch

from lorakit.precision import compute_dtype, no_autocast


def test_compute_dtype_explicit_then_autocast_then_input():
    x = torch.ones(2, 3)
    assert compute_dtype(x, None) is torch.float32
    assert compute_dtype(x.double(), None) is torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x, None) is torch.bfloat16
        assert compute_dtype(x, torch.float64) is torch.float64  # explicit wins
        assert compute_dtype(torch.ones(2, dtype=torch.long), None) is torch.long  # token ids are not cast
    assert compute_dtype(x, torch.float16) is torch.float16


def test_no_autocast_switches_it_off_and_back():
    a, b = torch.ones(2, 2), torch.ones(2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype is torch.bfloat16
        with no_autocast("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ b).dtype is torch.float32
        assert torch.is_autocast_enabled("cpu")
    with no_autocast("meta"):  # a device without autocast: a no-op
        pass
