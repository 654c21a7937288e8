"""lorakit.decode_lora: a decoding step's LoRA term as one Triton kernel, and graph_decode's route through it.

On a GPU these run the compiled kernel on CUDA tensors; without one, Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py) runs it on CPU tensors. The graphed decoding
through it is tested in tests/test_graph_decode.py. References: float64 math for the kernel,
the unrouted model for the route. The interpreter rounds float32 -> bfloat16 toward zero (a
GPU rounds to nearest), so bfloat16 is held to a whole unit in the last place per rounding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama

import lorakit
from lorakit import decode_lora, graph_decode, routing
from lorakit.errors import ConfigError
from lorakit.graph_decode import StaticDecoder, fused_lora_terms

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(rows, k, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, k, generator=g).to(DEVICE, dtype)
    A = (torch.randn(r, k, generator=g) / k**0.5).to(DEVICE, dtype)
    B = torch.randn(n, r, generator=g).to(DEVICE, dtype)
    y = torch.randn(rows, 1, n, generator=g).to(DEVICE, dtype)
    return y, x, A, B


def _torch_ops(y, x, A, B, scale):
    """The torch ops the kernel stands for (LoraLinear's inference path), on a copy of ``y``."""
    out = y.clone()
    xa = torch.nn.functional.linear(x, A)
    out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), B.T, alpha=scale)
    return out


def _exact(y, x, A, B, scale):
    """float64 of the same math, ``x·Aᵀ`` rounded to the inputs' dtype as the kernel and F.linear do."""
    xa = (x.double().flatten(0, -2) @ A.double().T).to(x.dtype).double()
    return y.double().flatten(0, -2) + scale * xa @ B.double().T


@pytest.mark.parametrize(
    "rows,k,n,r",
    [(1, 576, 1536, 16), (2, 1536, 576, 16), (3, 100, 70, 5), (8, 64, 192, 4), (16, 130, 33, 1), (1, 96, 64, 32)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_float64(rows, k, n, r, dtype):
    y, x, A, B = _operands(rows, k, n, r, dtype)
    out = decode_lora.add_lora_(y.clone(), x, A, B, 1.5)
    exact = _exact(y, x, A, B, 1.5).view_as(out)
    reference = _torch_ops(y, x, A, B, 1.5).double()  # the torch ops it stands for
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    else:  # bfloat16 keeps 8 bits: one rounding of x·Aᵀ (each term off by <= 2^-7 of itself) and one of the sum
        xa = (x.double().flatten(0, -2) @ A.double().T).abs()
        bound = 2**-7 * (exact.abs() + 1.5 * (xa @ B.double().abs().T).view_as(out)) + 1e-6
        assert ((out.double() - exact).abs() <= bound).all()
        assert ((out.double() - reference).abs() <= 2 * bound).all()  # each within the bound of the exact


def test_only_its_rows_are_written_and_strided_inputs_are_read_right():
    y, x, A, B = _operands(5, 96, 80, 4, torch.float32)
    buffer = torch.randn(8, 80, device=DEVICE)
    before = buffer.clone()
    target = buffer[:5]  # rows 5-7 lie right after the output: a stray write lands there
    wide = torch.randn(5, 200, device=DEVICE)
    x_strided = wide[:, 7:103]  # row stride 200, not 96
    decode_lora.add_lora_(target, x_strided, A, B, 2.0)
    torch.testing.assert_close(target.double(), _exact(before[:5], x_strided, A, B, 2.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(buffer[5:], before[5:])


def test_bad_calls_are_clear_errors():
    y, x, A, B = _operands(2, 32, 48, 4, torch.float32)
    with pytest.raises(ConfigError, match="shapes"):
        decode_lora.add_lora_(y, x, A.T, B, 1.0)
    with pytest.raises(ConfigError, match="rows"):
        big = torch.zeros(decode_lora.MAX_ROWS + 1, 32, device=DEVICE)
        decode_lora.add_lora_(torch.zeros(decode_lora.MAX_ROWS + 1, 48, device=DEVICE), big, A, B, 1.0)
    assert decode_lora.fits(2, 16) and decode_lora.fits(16, 2) and not decode_lora.fits(8, 16)
    assert decode_lora.fits(8, 16, whole=True) and decode_lora.fits(16, 64, whole=True)  # whole: rows only
    assert not decode_lora.fits(decode_lora.MAX_ROWS + 1, 1, whole=True) and not decode_lora.fits(0, 1, whole=True)
    with pytest.raises(ConfigError, match="rows"):  # within MAX_ROWS, but too many for this rank
        decode_lora.add_lora_(
            torch.zeros(8, 48, device=DEVICE), torch.zeros(8, 32, device=DEVICE), A.repeat(4, 1), B.repeat(1, 4), 1.0
        )
    with pytest.raises(ConfigError, match="contiguous"):
        decode_lora.add_lora_(torch.zeros(48, 2, device=DEVICE).T, x, A, B, 1.0)
    with pytest.raises(ConfigError, match="dtypes"):
        decode_lora.add_lora_(y, x.double(), A, B, 1.0)


def _lora_model(r=4, targets=("q_proj", "v_proj", "o_proj", "down_proj"), seed=0):
    torch.manual_seed(3 + seed)
    config = lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets))
    model = lorakit.inject(make_llama(seed, layers=2), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.to(DEVICE).eval()


def _decode(model, ids, mask, steps, **route):
    """Prefill plus ``steps`` eager static-cache steps (fed the argmax); the logits of each."""
    decoder = StaticDecoder(model, ids.shape[1] + steps + 1)
    out = [decoder.prefill(ids, mask)]
    for _ in range(steps):
        if route:
            with fused_lora_terms(model, **route):
                out.append(decoder.step(out[-1].argmax(-1)).clone())
        else:
            out.append(decoder.step(out[-1].argmax(-1)).clone())
    return torch.stack(out)


def test_a_routed_decoding_step_equals_the_torch_ops(monkeypatch):
    model = _lora_model()
    assert decode_lora.available(DEVICE) is None  # its trial call done before the kernel is counted
    calls = []
    kernel = decode_lora.add_lora_group_
    monkeypatch.setattr(
        decode_lora, "add_lora_group_", lambda ys, x, As, *a: calls.append(len(As)) or kernel(ys, x, As, *a)
    )
    ids = torch.tensor([[0, 0, 5, 9, 3], [4, 8, 1, 2, 7]], device=DEVICE)
    mask = (ids > 0).long()
    routed = _decode(model, ids, mask, 3, device_types=(DEVICE,))
    assert len(calls) == 3 * 2 * 4  # every step, both layers, the four adapted projections each
    torch.testing.assert_close(routed, _decode(model, ids, mask, 3), rtol=1e-5, atol=1e-5)
    assert all(routing.forward_owner(m) is None for m in model.modules())  # the route ends with the block


def test_calls_the_kernel_does_not_fit_run_the_layers_own_forward(monkeypatch):
    model = _lora_model()
    monkeypatch.setattr(decode_lora, "add_lora_group_", lambda *a: pytest.fail("the kernel ran"))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(decode_lora.MAX_ROWS + 1, 1, layer.in_features, device=DEVICE)  # prefill-sized
    with torch.inference_mode():
        want = layer(x)
        with fused_lora_terms(model, device_types=(DEVICE,)) as routed:
            assert layer in routed
            torch.testing.assert_close(layer(x), want)  # too many rows: the torch ops
            lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
            layer.active_adapters = ["default", "other"]  # two adapters at once: the layer's composition
            torch.testing.assert_close(layer(x[:2]), want[:2])
            layer.active_adapters = ["default"]
            layer.disabled = True  # the base alone
            torch.testing.assert_close(layer(x[:2]), layer.base_layer(x[:2]))
            layer.disabled = False
    with torch.enable_grad(), fused_lora_terms(model, device_types=(DEVICE,)):  # training: the autograd op
        out = layer(x[:2].requires_grad_())
        out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_nothing_is_routed_off_the_named_devices_or_over_another_route():
    model = _lora_model()
    layer = model.model.layers[1].self_attn.o_proj
    layer.forward = layer.forward  # user code owns this one
    with fused_lora_terms(model, device_types=("meta",)) as routed:  # none of the model's layers is on these
        assert routed == []
    with fused_lora_terms(model, device_types=(DEVICE,)) as routed:
        assert layer not in routed and len(routed) == 2 * 4 - 1
        assert routing.forward_owner(layer) == routing.USER


def test_the_kernel_is_tried_once_per_device_and_a_failure_routes_nothing(monkeypatch):
    assert decode_lora.available(DEVICE) is None  # built and run once here (interpreted on a CPU)
    model = _lora_model()
    said: list[str] = []
    monkeypatch.setattr(decode_lora, "available", lambda device=None: "no compiler for this GPU")
    monkeypatch.setattr(graph_decode, "_SAID", set())
    for _ in range(2):
        with fused_lora_terms(model, device_types=(DEVICE,), say=said.append) as routed:
            assert routed == [] and all(routing.forward_owner(m) is None for m in model.modules())
    assert said == ["LoRA terms recorded as torch's ops: no compiler for this GPU"]  # told once, not per call


def test_a_wrong_result_or_an_error_in_the_trial_is_a_reason(monkeypatch):
    decode_lora._trial.cache_clear()
    monkeypatch.setattr(decode_lora, "add_lora_", lambda y, *a: y)  # a kernel that adds nothing
    assert "wrong" in decode_lora._trial(DEVICE)
    decode_lora._trial.cache_clear()

    def broken(*args):
        raise ValueError("PTX too new")

    monkeypatch.setattr(decode_lora, "add_lora_", broken)
    assert decode_lora._trial(DEVICE) == f"the kernel fails on {DEVICE}: ValueError: PTX too new"
    decode_lora._trial.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_group_of_siblings_matches_each_alone_in_float64(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 96, generator=g).to(DEVICE, dtype)
    shapes = [(80, 8), (32, 4), (48, 16)]  # q/k/v-like: different widths and ranks
    ys = [torch.randn(2, 1, n, generator=g).to(DEVICE, dtype) for n, _ in shapes]
    As = [(torch.randn(r, 96, generator=g) / 10).to(DEVICE, dtype) for _, r in shapes]
    Bs = [torch.randn(n, r, generator=g).to(DEVICE, dtype) for n, r in shapes]
    scales = [2.0, 0.5, 1.0]
    for members in (2, 3):
        outs = [y.clone() for y in ys[:members]]
        decode_lora.add_lora_group_(outs, x, As[:members], Bs[:members], scales[:members])
        for out, y, A, B, s in zip(outs, ys, As, Bs, scales):
            exact = _exact(y, x, A, B, s).view_as(out)
            xa = (x.double().flatten(0, -2) @ A.double().T).abs()
            ulp = 2**-7 if dtype == torch.bfloat16 else 2**-20
            bound = ulp * (exact.abs() + 1.5 * (xa @ B.double().abs().T).view_as(out)) + 1e-6
            assert ((out.double() - exact).abs() <= bound).all()
    with pytest.raises(ConfigError, match="1-3"):
        decode_lora.add_lora_group_(ys * 2, x, As * 2, Bs * 2, scales * 2)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_projections_in_one_kernel_match_float64(dtype, bias):
    g = torch.Generator().manual_seed(7)
    shapes = [(80, 8), (32, 4), (48, 16)]
    x = torch.randn(2, 1, 96, generator=g).to(DEVICE, dtype)
    Ws = [(torch.randn(n, 96, generator=g) / 10).to(DEVICE, dtype) for n, _ in shapes]
    cs = [torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None for n, _ in shapes]
    As = [(torch.randn(r, 96, generator=g) / 10).to(DEVICE, dtype) for _, r in shapes]
    Bs = [torch.randn(n, r, generator=g).to(DEVICE, dtype) for n, r in shapes]
    scales = [2.0, 0.5, 1.0]
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-20
    for members in (1, 2, 3):
        outs = decode_lora.linear_lora_group(
            x, Ws[:members], cs[:members], As[:members], Bs[:members], scales[:members]
        )
        assert len(outs) == members
        for out, W, c, A, B, s in zip(outs, Ws, cs, As, Bs, scales):
            assert out.shape == (2, 1, W.shape[0]) and out.dtype == dtype
            x64 = x.double().flatten(0, -2)
            base = x64 @ W.double().T + (c.double() if bias else 0)
            exact = _exact(base.to(dtype).view_as(out), x, A, B, s).view_as(out)  # the base rounded, as F.linear
            torch_ops = _torch_ops(torch.nn.functional.linear(x, W, c), x, A, B, s)  # what it stands for
            xa = (x64 @ A.double().T).abs()
            spread = (x64.abs() @ W.double().abs().T + 1.5 * xa @ B.double().abs().T).view_as(out)
            bound = ulp * (2 * exact.abs() + spread) + 1e-5 * (dtype == torch.float32) * spread + 1e-6
            assert ((out.double() - exact).abs() <= bound).all()
            assert ((out.double() - torch_ops.double()).abs() <= 2 * bound).all()
    with pytest.raises(ConfigError, match="for every projection or for none"):
        mixed = [torch.zeros(80, device=DEVICE, dtype=dtype), None]
        decode_lora.linear_lora_group(x, Ws[:2], mixed, As[:2], Bs[:2], scales[:2])
    with pytest.raises(ConfigError, match="weights or biases"):
        decode_lora.linear_lora_group(x, [Ws[0][:, :50]], [None], As[:1], Bs[:1], scales[:1])
    with pytest.raises(ConfigError, match="dtypes"):
        decode_lora.linear_lora_group(x, [Ws[0].double()], [None], As[:1], Bs[:1], scales[:1])


@pytest.mark.parametrize("fuse_base", ["groups", "all"])
def test_whole_projections_routed_decode_as_the_torch_ops(monkeypatch, fuse_base):
    model = _all_projections_model()
    ids = torch.tensor([[0, 0, 5, 9, 3], [4, 8, 1, 2, 7]], device=DEVICE)
    mask = (ids > 0).long()
    want = _decode(model, ids, mask, 3)
    assert decode_lora.available(DEVICE) is None
    whole, terms = [], []
    linear, group = decode_lora.linear_lora_group, decode_lora.add_lora_group_
    monkeypatch.setattr(decode_lora, "linear_lora_group", lambda x, Ws, *a: whole.append(len(Ws)) or linear(x, Ws, *a))
    monkeypatch.setattr(decode_lora, "add_lora_group_", lambda ys, *a: terms.append(len(ys)) or group(ys, *a))
    got = _decode(model, ids, mask, 3, device_types=(DEVICE,), group_siblings=True, fuse_base=fuse_base)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if fuse_base == "all":  # per layer q/k/v, o, gate/up, down; 2 layers; 3 steps
        assert whole == [3, 1, 2, 1] * 2 * 3 and terms == []
    else:  # the groups whole; o and down as base matmul plus the LoRA kernel
        assert whole == [3, 2] * 2 * 3 and terms == [1, 1] * 2 * 3
    with pytest.raises(ConfigError, match="fuse_base"):
        with fused_lora_terms(model, fuse_base="yes"):
            pass


@pytest.mark.parametrize("fuse_base", ["off", "groups", "all"])
def test_past_the_lora_kernels_limit_only_whole_projections_run_as_kernels(monkeypatch, fuse_base):
    model = _all_projections_model()  # r=4: 12 rows pad to 16 x 4 cells, past MAX_CELLS for the LoRA kernel
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 96, (12, 5), generator=g).to(DEVICE)
    ids[::3, :2] = 0  # some rows left-padded
    mask = (ids > 0).long()
    want = _decode(model, ids, mask, 2)
    assert decode_lora.available(DEVICE) is None
    assert not decode_lora.fits(12, 4) and decode_lora.fits(12, 4, whole=True)
    whole = []
    linear = decode_lora.linear_lora_group
    monkeypatch.setattr(decode_lora, "linear_lora_group", lambda x, Ws, *a: whole.append(len(Ws)) or linear(x, Ws, *a))
    monkeypatch.setattr(decode_lora, "add_lora_group_", lambda *a: pytest.fail("the LoRA kernel ran past its limit"))
    got = _decode(model, ids, mask, 2, device_types=(DEVICE,), group_siblings=True, fuse_base=fuse_base)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # per layer and step: q/k/v, gate/up whole ("groups"), and o, down too ("all"); 2 layers, 2 steps
    assert whole == {"off": [], "groups": [3, 2] * 2 * 2, "all": [3, 1, 2, 1] * 2 * 2}[fuse_base]
    x = torch.randn(8, 1, 32, device=DEVICE)  # the kernel itself takes 8 rows at rank 16 whole
    W, A, B = torch.randn(48, 32, device=DEVICE), torch.randn(16, 32, device=DEVICE), torch.randn(48, 16, device=DEVICE)
    (y,) = linear(x, [W], [None], [A], [B], [0.5])
    exact = x.double() @ W.double().T + 0.5 * (x.double() @ A.double().T) @ B.double().T
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-4)
    with pytest.raises(ConfigError, match="rows"):
        linear(torch.randn(decode_lora.MAX_ROWS + 1, 32, device=DEVICE), [W], [None], [A], [B], [0.5])


def _all_projections_model():
    return _lora_model(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], seed=1)


def test_grouped_siblings_decode_as_the_torch_ops_with_four_kernels_a_layer(monkeypatch):
    model = _all_projections_model()
    ids = torch.tensor([[0, 0, 5, 9, 3], [4, 8, 1, 2, 7]], device=DEVICE)
    mask = (ids > 0).long()
    want = _decode(model, ids, mask, 3)
    assert decode_lora.available(DEVICE) is None
    calls = []
    kernel = decode_lora.add_lora_group_
    monkeypatch.setattr(decode_lora, "add_lora_group_", lambda ys, *a: calls.append(len(ys)) or kernel(ys, *a))
    decoder = StaticDecoder(model, ids.shape[1] + 4)
    got = [decoder.prefill(ids, mask)]
    for _ in range(3):
        with fused_lora_terms(model, device_types=(DEVICE,), group_siblings=True):
            got.append(decoder.step(got[-1].argmax(-1)).clone())
    torch.testing.assert_close(torch.stack(got), want, rtol=1e-5, atol=1e-5)
    assert calls == [3, 1, 2, 1] * 2 * 3  # per layer q/k/v, o, gate/up, down; 2 layers; 3 steps


def test_a_sibling_fed_another_input_computes_alone():
    model = _all_projections_model()
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(2, 1, 32, device=DEVICE), torch.randn(2, 1, 32, device=DEVICE)
    with torch.inference_mode():
        want = attn.q_proj(x), attn.k_proj(other), attn.v_proj(x)
        with fused_lora_terms(model, device_types=(DEVICE,), group_siblings=True):
            got = attn.q_proj(x), attn.k_proj(other), attn.v_proj(x)  # cross-attention-like
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
