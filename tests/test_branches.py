"""lorakit.branches: k adapted Linears over one input, forward and hand-written backward against autograd."""

from __future__ import annotations

import pytest
import torch

from lorakit import branches
from lorakit.branches import LoraSpec
from lorakit.errors import ConfigError, ModelMismatchError


def _specs(g):
    dt = torch.float64
    return [
        LoraSpec(
            torch.randn(6, 5, dtype=dt, generator=g),
            torch.randn(6, dtype=dt, generator=g),
            torch.randn(3, 5, dtype=dt, generator=g),
            torch.randn(6, 3, dtype=dt, generator=g),
            0.5,
        ),
        LoraSpec(
            torch.randn(4, 5, dtype=dt, generator=g),
            None,
            torch.randn(2, 5, dtype=dt, generator=g),
            torch.randn(4, 2, dtype=dt, generator=g),
            2.0,
        ),
    ]


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_forward_and_backward_match_autograd_float64(p):
    g = torch.Generator().manual_seed(0)
    specs = _specs(g)
    x2 = torch.randn(7, 5, dtype=torch.float64, generator=g)
    mask, seed, scalings, cd, _, params = branches.prepare(x2, specs, p, True, None, None)
    assert (seed is not None) == (p > 0) and mask is None and cd is torch.float64
    scale = 1.0 / (1.0 - p) if seed is not None else 1.0
    drop = branches.dropout_multiplier(x2, None, seed, p)
    outs, xa = branches.branches_forward(x2, drop, scale, params, scalings, cd)
    dys = [torch.randn_like(y) for y in outs]
    needs = [t is not None for t in params]  # as autograd says: no gradient for an absent bias
    gx, grads = branches.branches_backward(x2, xa, drop, scale, params, scalings, cd, dys, needs, True)

    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x2, *params)]
    xr, pr = leaves[0], leaves[1:]
    xd = xr if drop is None else xr * drop * scale
    refs = []
    for (W, b, A, B), s in zip(zip(*[iter(pr)] * 4), scalings):
        refs.append(xr @ W.T + (0 if b is None else b) + s * (xd @ A.T) @ B.T)
    torch.autograd.backward(refs, dys)
    for y, r in zip(outs, refs):
        torch.testing.assert_close(y, r.detach())
    torch.testing.assert_close(gx, xr.grad)
    for i, (got, leaf) in enumerate(zip(grads, pr)):
        if leaf is None:
            assert got is None
        elif i % 4 == 1:  # a bias grad is summed in fp32 (then cast), whatever the dtype
            torch.testing.assert_close(got, leaf.grad, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(got, leaf.grad)
    skipped, xa2 = branches.branches_forward(x2, drop, scale, params, scalings, cd, compute_output=False)
    assert torch.equal(xa2, xa) and [t.shape for t in skipped] == [t.shape for t in outs]


def test_dropout_masks_are_redrawn_from_their_seed():
    a = branches.keep_mask(torch.Size((300, 400)), 0.25, 7, torch.device("cpu"), torch.float32)
    assert torch.equal(a, branches.keep_mask(torch.Size((300, 400)), 0.25, 7, torch.device("cpu"), torch.float32))
    assert set(a.unique().tolist()) == {0.0, 1.0} and abs(a.mean().item() - 0.75) < 0.01
    torch.manual_seed(3)
    s1 = branches.draw_seed()
    torch.manual_seed(3)
    assert branches.draw_seed() == s1  # torch.manual_seed governs the seeds
    x2 = torch.ones(4, 3)
    assert branches.dropout_multiplier(x2, None, None, 0.5) is None
    explicit = torch.full((2, 2, 3), 2.0)
    assert torch.equal(branches.dropout_multiplier(x2, explicit, 9, 0.5), torch.full((4, 3), 2.0))
    assert torch.equal(branches.apply_dropout(x2, torch.zeros(4, 3).fill_(1), 2.0), torch.full((4, 3), 2.0))


def test_prepare_refuses_bad_arguments():
    g = torch.Generator().manual_seed(0)
    specs = _specs(g)
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ConfigError, match="lora_dropout must be in"):
        branches.prepare(x, specs, 1.0, True, None, None)
    with pytest.raises(ValueError, match="at least one LoraSpec"):
        branches.prepare(x, [], 0.0, True, None, None)
    with pytest.raises(ModelMismatchError, match=r"x \[..., 4\], weight \(6, 5\)"):
        branches.prepare(torch.randn(2, 4), specs, 0.0, True, None, None)
    with pytest.raises(ValueError, match="dropout_mask must have x's shape"):
        branches.prepare(x, specs, 0.1, True, torch.ones(3, 5), None)
    mask, seed, *_ = branches.prepare(x, specs, 0.1, False, torch.ones(2, 5), None)
    assert mask is None and seed is None  # not training: no dropout at all
