"""Per-row int8 quantization (lorakit.row_quant): the compiled kernel against float64 and the eager passes."""

from __future__ import annotations

import pytest
import torch

from lorakit import row_quant


def _reference(x: torch.Tensor, col: torch.Tensor | None):
    """float64: s = max|x c| / 127 per row, q = round(x c / s) + 128."""
    x64 = x.double() * (1.0 if col is None else col.double())
    amax = x64.abs().amax(1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x64 / s) + 128, s


@pytest.fixture
def fresh_quantizer():
    row_quant.fused_quantizer.cache_clear()
    yield
    row_quant.fused_quantizer.cache_clear()


def test_the_compiled_kernel_runs_here_and_matches_float64():
    assert row_quant.fused_quantizer() is not None  # a CPU with a C++ compiler: inductor builds it
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 37, 96, generator=g) * torch.logspace(-3, 2, 96)  # columns of very different sizes
    base[1, 5] = 0.0  # an all-zero row
    col = torch.rand(96, generator=g) + 0.1
    for x, c in [
        (base.view(-1, 96), None),
        (base.view(-1, 96), col),
        (base[0], col),
        (base[:, :7].reshape(-1, 96), col),
    ]:
        q, s = row_quant.quantize_rows(x, c)
        want, s64 = _reference(x, c)
        assert q.dtype == torch.uint8 and q.shape == x.shape and s.shape == (x.shape[0], 1)
        torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=0)
        assert (q.double() - want).abs().max() <= 1 and (q.double() != want).float().mean() < 1e-3
        assert int(q.min()) >= 1  # |x / s| <= 127: codes within [1, 255]
        q0, s0 = row_quant._eager(x, c)  # the eager passes: the same codes up to a rounding tie
        assert (q.int() - q0.int()).abs().max() <= 1 and torch.allclose(s, s0, rtol=1e-6, atol=0)
    zero = row_quant.quantize_rows(base.view(-1, 96))[0][1 * 37 + 5]
    assert (zero == 128).all()


def test_the_compiled_kernel_replaces_the_eager_passes():
    x = torch.randn(64, 128)
    with torch.profiler.profile() as prof:
        row_quant.quantize_rows(x, torch.rand(128) + 0.5)
    names = {e.name for e in prof.events()}
    assert "aten::addcmul" not in names and "aten::amin" not in names  # no eager pass ran
    assert any("Compiled" in n for n in names), sorted(names)


def test_switched_off_by_the_environment(monkeypatch, fresh_quantizer):
    monkeypatch.setenv("LORAKIT_INT8_FUSED", "0")
    assert row_quant.fused_quantizer() is None
    x = torch.randn(8, 16)
    q, s = row_quant.quantize_rows(x)
    want, _ = _reference(x, None)
    assert (q.double() - want).abs().max() <= 1


def test_a_compile_failure_warns_once_and_runs_eagerly(monkeypatch, fresh_quantizer):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(
        UserWarning, match=r"eager passes .* \(RuntimeError: no C\+\+ compiler found\); set LORAKIT_INT8_FUSED=0"
    ):
        assert row_quant.fused_quantizer() is None
    x = torch.randn(8, 16)
    assert torch.equal(row_quant.quantize_rows(x)[0], row_quant._eager(x, None)[0])


@pytest.mark.parametrize("width", [256, 512])
def test_each_vector_width_this_cpu_has_is_correct(width):
    """The kernel at each width inductor may generate here, over widths below and above one vector."""
    if width == 512 and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("no AVX-512 on this CPU")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("not an x86 CPU with AVX2")
    f = torch.compile(row_quant._rows_math, dynamic=True, options={"cpp.simdlen": width})
    g = torch.Generator().manual_seed(width)
    for k in (8, 17, 96, 600):
        for n in (2, 3, 65):
            x, col = torch.randn(n, k, generator=g) * 3, torch.rand(k, generator=g) + 0.5
            with torch.no_grad():
                q, s = f(x, col)
            want, s64 = _reference(x, col)
            torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=0)
            assert (q.double() - want).abs().max() <= 1, (n, k)
