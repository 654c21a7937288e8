"""lorakit.ops and lorakit.swiglu against float64 autograd on the plain formula, gradcheck, and stock PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit import branches
from lorakit.errors import ConfigError, ModelMismatchError
from lorakit.ops import LoraSpec, lora_linear, lora_linear_multi
from lorakit.swiglu import lora_swiglu_mlp

f64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalized error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _params(in_f, out_f, r, bias, w_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(w_dtype)
    b = torch.randn(out_f, generator=g).to(w_dtype) if bias != "none" else None
    if b is not None and bias == "grad":
        b.requires_grad_(True)
    A = (torch.randn(r, in_f, generator=g) / math.sqrt(in_f)).requires_grad_(True)
    B = torch.randn(out_f, r, generator=g).requires_grad_(True)  # nonzero B so grad_A is tested
    return W, b, A, B


def _reference(x, W, b, A, B, s, mask=None):
    """The formula in float64 with autograd: returns output and grads for x, b, A, B."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, b, A, B)]
    xr, br, Ar, Br = leaves
    xd = xr if mask is None else xr * mask.double()
    y = xr @ W.double().t() + (s * (xd @ Ar.t())) @ Br.t()
    if br is not None:
        y = y + br
    return y, leaves


def _check_grads(y, yr, inputs, leaves, tol, seed=1):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=f64)
    y.backward(dy.to(y.dtype))
    yr.backward(dy)
    assert _rel(y, yr) < tol
    for t, tr in zip(inputs, leaves):
        if t is not None and t.requires_grad:
            assert t.grad is not None and t.grad.dtype == t.dtype
            assert _rel(t.grad, tr.grad) < tol, _rel(t.grad, tr.grad)
        elif t is not None:
            assert t.grad is None


CASES = [  # (lead shape, in, out, r, bias, x needs grad, noncontiguous, dropout, rslora)
    ((13,), 16, 24, 4, "grad", True, False, False, False),
    ((2, 7), 24, 10, 1, "none", True, False, False, False),
    ((3, 5), 33, 17, 8, "frozen", True, True, False, True),
    ((11,), 19, 40, 3, "grad", False, True, True, False),
    ((2, 9), 16, 16, 5, "grad", True, False, True, True),
    ((4, 6), 10, 21, 2, "none", True, True, True, False),
]


def _make_x(lead, in_f, needs_grad, noncontig, dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # a transposed, sliced view of a bigger buffer
        big = torch.randn(in_f + 3, *reversed(lead), generator=g, dtype=dtype)
        x = big.permute(*range(big.dim() - 1, 0, -1), 0)[..., 1 : in_f + 1]
        assert not x.is_contiguous() and x.shape == (*lead, in_f)
    else:
        x = torch.randn(*lead, in_f, generator=g, dtype=dtype)
    return x.requires_grad_(needs_grad)


def _mask(shape, p, seed=3):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= p).float() / (1 - p)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_linear_matches_fp64_reference(case, precision):
    lead, in_f, out_f, r, bias, x_grad, noncontig, dropout, rslora = case
    w_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    W, b, A, B = _params(in_f, out_f, r, bias, w_dtype)
    x = _make_x(lead, in_f, x_grad, noncontig)
    s = 16 / math.sqrt(r) if rslora else 2.0 / r
    p = 0.25 if dropout else 0.0
    mask = _mask(x.shape, p) if dropout else None
    cd = torch.bfloat16 if precision == "bf16" else None
    y = lora_linear(x, W, b, A, B, s, dropout_p=p, dropout_mask=mask, compute_dtype=cd)
    assert y.shape == (*lead, out_f)
    assert y.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    yr, leaves = _reference(x, W, b, A, B, s, mask)
    _check_grads(y, yr, (x, b, A, B), leaves, 1e-5 if precision == "fp32" else 2e-2)


def test_lora_linear_under_autocast_bf16():
    W, b, A, B = _params(20, 12, 4, "grad")
    x = _make_x((3, 5), 20, True, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, 0.5)
        assert y.dtype == torch.bfloat16
        yr, leaves = _reference(x, W, b, A, B, 0.5)
        _check_grads(y, yr, (x, b, A, B), leaves, 2e-2)  # backward inside autocast too
    assert A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_lora_linear_multi_matches_reference():
    x = _make_x((2, 6), 18, True, True)
    shapes = [(18, 18, 4), (18, 7, 1), (18, 7, 3)]  # q, k, v: ranks and widths differ
    specs = [LoraSpec(*_params(i, o, r, "grad", seed=k), scaling=0.5 + k) for k, (i, o, r) in enumerate(shapes)]
    outs = lora_linear_multi(x, specs)
    dys = [torch.randn(o.shape, dtype=f64) for o in outs]
    sum((o * d.float()).sum() for o, d in zip(outs, dys)).backward()
    xr = x.detach().double().requires_grad_(True)
    total, refs = 0, []
    for (W, b, A, B, s), o, dy in zip(specs, outs, dys):
        br, Ar, Br = (t.detach().double().requires_grad_() for t in (b, A, B))
        yr = xr @ W.double().t() + br + s * (xr @ Ar.t()) @ Br.t()  # [2, 6, out]
        assert _rel(o, yr) < 1e-5
        total, refs = total + (yr * dy).sum(), refs + [br, Ar, Br]
    total.backward()
    assert _rel(x.grad, xr.grad) < 1e-5  # grad_x summed over all three branches
    for t, tr in zip([t for sp in specs for t in (sp.bias, sp.lora_A, sp.lora_B)], refs):
        assert _rel(t.grad, tr.grad) < 1e-5


def _dbl(*shape, grad=True, seed=0):
    t = torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_(grad)


def test_gradcheck_lora_linear_and_multi():
    x, W, b = _dbl(2, 3, 5), _dbl(4, 5, grad=False), _dbl(4, seed=1)
    A, B = _dbl(2, 5, seed=2), _dbl(4, 2, seed=3)
    mask = _mask(x.shape, 0.3).double()
    fn = lambda x, b, A, B: lora_linear(x, W, b, A, B, 0.7, dropout_p=0.3, dropout_mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, A, B))
    W2, A2, B2 = _dbl(3, 5, seed=4), _dbl(1, 5, seed=5), _dbl(3, 1, seed=6)  # W2 trains: its grad is checked too
    multi = lambda x, A, B, W2, A2, B2: lora_linear_multi(  # noqa: E731
        x, [LoraSpec(W, None, A, B, 0.5), LoraSpec(W2, None, A2, B2, 2.0)]
    )
    assert torch.autograd.gradcheck(multi, (x, A, B, W2, A2, B2))


def test_gradcheck_swiglu():  # chunked cross-entropy's gradcheck: tests/test_losses.py
    specs = [(_dbl(6, 5, grad=False, seed=k), _dbl(2, 5, seed=10 + k), _dbl(6, 2, seed=20 + k)) for k in range(2)]
    Wd, Ad, Bd = _dbl(5, 6, grad=False, seed=3), _dbl(3, 6, seed=4), _dbl(5, 3, seed=5)

    def mlp(x, Ag, Bg, Au, Bu, Ad, Bd):
        (Wg, _, _), (Wu, _, _) = specs
        gate, up, down = (
            LoraSpec(Wg, None, Ag, Bg, 0.5),
            LoraSpec(Wu, None, Au, Bu, 2.0),
            LoraSpec(Wd, None, Ad, Bd, 1.0),
        )
        return lora_swiglu_mlp(x, gate, up, down)

    args = (_dbl(2, 3, 5, seed=9), specs[0][1], specs[0][2], specs[1][1], specs[1][2], Ad, Bd)
    assert torch.autograd.gradcheck(mlp, args)


def test_swiglu_matches_stock_autograd_with_dropout():
    H, I, p = 12, 20, 0.2  # noqa: E741 (I: the intermediate size, as in the papers)
    x = _make_x((3, 4), H, True, False)
    dims = [(H, I, 4), (H, I, 2), (I, H, 3)]
    gate, up, down = (LoraSpec(*_params(i, o, r, "none", seed=k), scaling=1.0) for k, (i, o, r) in enumerate(dims))
    torch.manual_seed(7)
    y = lora_swiglu_mlp(x, gate, up, down, dropout_p=p)
    torch.manual_seed(7)  # rebuild the two masks the op drew
    seeds = (branches.draw_seed(), branches.draw_seed())
    mx = branches.keep_mask(torch.Size((12, H)), p, seeds[0], x.device, torch.float32).view(3, 4, H) / (1 - p)
    mh = branches.keep_mask(torch.Size((12, I)), p, seeds[1], x.device, torch.float32).view(3, 4, I) / (1 - p)
    g, _ = _reference(x, *gate, mask=mx)
    u, _ = _reference(x, *up, mask=mx)
    yr, _ = _reference(F.silu(g) * u, *down, mask=mh)
    assert _rel(y, yr) < 1e-5
    dy = torch.randn(y.shape, dtype=f64)
    y.backward(dy.float())
    # reference grads through a float64 graph on copies of the leaves
    xr = x.detach().double().requires_grad_()
    got = [gate.lora_A, gate.lora_B, up.lora_A, up.lora_B, down.lora_A, down.lora_B]
    refs = [t.detach().double().requires_grad_() for t in got]
    gr_ = xr @ gate.weight.double().t() + gate.scaling * ((xr * mx) @ refs[0].t()) @ refs[1].t()
    ur_ = xr @ up.weight.double().t() + up.scaling * ((xr * mx) @ refs[2].t()) @ refs[3].t()
    hr = F.silu(gr_) * ur_
    yr2 = hr @ down.weight.double().t() + down.scaling * ((hr * mh) @ refs[4].t()) @ refs[5].t()
    (yr2 * dy).sum().backward()
    for t, tr in zip(got, refs):
        assert _rel(t.grad, tr.grad) < 1e-5
    assert _rel(x.grad, xr.grad) < 1e-5


def test_dropout_eval_and_keep_fraction_and_backward_consistency():
    W, b, A, B = _params(64, 32, 4, "none")
    x = _make_x((50,), 64, True, False)
    eval_out = lora_linear(x, W, b, A, B, 1.0, dropout_p=0.4, training=False)
    assert torch.equal(eval_out, lora_linear(x, W, b, A, B, 1.0))
    keep = branches.keep_mask(torch.Size((400, 500)), 0.4, 123, x.device, torch.float32)
    assert abs(keep.mean().item() - 0.6) < 0.01
    torch.manual_seed(11)
    y = lora_linear(x, W, b, A, B, 1.0, dropout_p=0.4)
    torch.manual_seed(11)  # the same global RNG state gives the same seed, hence the same mask
    mask = branches.keep_mask(torch.Size((50, 64)), 0.4, branches.draw_seed(), x.device, torch.float32) / 0.6
    assert not torch.equal(y, eval_out)
    yr, leaves = _reference(x, W, b, A, B, 1.0, mask)
    _check_grads(y, yr, (x, b, A, B), leaves, 1e-5)


def test_errors():
    W, b, A, B = _params(8, 4, 2, "none")
    with pytest.raises(ConfigError, match="lora_dropout"):
        lora_linear(torch.randn(3, 8), W, b, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ModelMismatchError, match="lora_A"):
        lora_linear(torch.randn(3, 8), W, b, A.t(), B, 1.0)
    with pytest.raises(ConfigError, match="silu"):
        spec = LoraSpec(W, b, A, B, 1.0)
        lora_swiglu_mlp(torch.randn(3, 8), spec, spec, spec, act="relu")


# ------------------------------------------------------------------------------ memory


def _saved_bytes(fn, params) -> int:
    """Bytes of distinct non-parameter storages saved for backward while running ``fn``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _peft_style(x, W, b, A, B, s, p, training=True):
    """The stock module composition: base(x) + lora_B(lora_A(dropout(x))) * s."""
    return F.linear(x, W, b) + F.linear(F.linear(F.dropout(x, p, training), A), B) * s


@pytest.mark.parametrize("mode", ["fp32", "fp32-dropout", "autocast-bf16", "autocast-bf16-dropout"])
def test_fused_saves_less_than_stock_composition(mode):
    W, b, A, B = _params(96, 64, 8, "none")
    x = torch.randn(4, 32, 96, requires_grad=True)
    p = 0.1 if "dropout" in mode else 0.0
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if "autocast" in mode else torch.autocast("cpu", enabled=False)
    params = [W, A, B, x]  # x is the caller's own tensor, not a saving of either op
    with ctx:
        fused = _saved_bytes(lambda: lora_linear(x, W, b, A, B, 2.0, dropout_p=p), params)
        naive = _saved_bytes(lambda: _peft_style(x, W, b, A, B, 2.0, p), params)
    xa_bytes = 4 * 32 * 8 * (2 if "autocast" in mode else 4)
    x_cast = 0 if mode.startswith("fp32") else x.numel() * 2
    assert fused == x_cast + xa_bytes  # exactly: x once (in the compute dtype) and x·Aᵀ
    assert fused < naive if mode != "fp32" else fused <= naive


def test_multi_and_swiglu_save_less_than_stock():
    x = torch.randn(2, 16, 48, requires_grad=True)
    specs = [LoraSpec(*_params(48, o, 8, "none", seed=k), scaling=2.0) for k, o in enumerate([48, 16, 16])]
    params = [x] + [t for sp in specs for t in (sp.weight, sp.lora_A, sp.lora_B)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _saved_bytes(lambda: lora_linear_multi(x, specs, dropout_p=0.1), params)
        naive = _saved_bytes(lambda: [_peft_style(x, *sp, p=0.1) for sp in specs], params)
    assert fused == x.numel() * 2 + 32 * 24 * 2
    assert fused < naive / 3
    dims = [(48, 128), (48, 128), (128, 48)]
    gate, up, down = (LoraSpec(*_params(i, o, 4, "none", seed=k), scaling=1.0) for k, (i, o) in enumerate(dims))
    params = [x] + [t for sp in (gate, up, down) for t in (sp.weight, sp.lora_A, sp.lora_B)]
    fused = _saved_bytes(lambda: lora_swiglu_mlp(x, gate, up, down), params)
    stock = lambda: _peft_style(F.silu(_peft_style(x, *gate, p=0)) * _peft_style(x, *up, p=0), *down, p=0)  # noqa: E731
    naive = _saved_bytes(stock, params)
    assert fused == 4 * 32 * (128 * 2 + 8 + 4)  # g, u, x·[A_g; A_u]ᵀ, h·A_dᵀ (x itself excluded)
    assert fused < naive * 0.6
