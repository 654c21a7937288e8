"""lorakit.losses against full-logits F.cross_entropy in float64, gradcheck, and a matmul count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.losses import chunked_cross_entropy

f64 = torch.float64
MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "mv", "dot"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalized error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _data(n=37, hdim=16, vocab=50, seed=0, dtype=f64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=gen, dtype=f64).to(dtype).requires_grad_()
    head = (torch.randn(vocab, hdim, generator=gen, dtype=f64) / 4).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::5] = -100
    return hidden, head, labels


def _reference(hidden, head, labels):
    """float64 copies of hidden and head (leaves) and their full-logits mean cross-entropy."""
    hr, wr = hidden.detach().double().requires_grad_(), head.detach().double().requires_grad_()
    logits = hr.reshape(-1, hr.shape[-1]) @ wr.t()
    return hr, wr, F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ in MATMULS
        return func(*args, **(kwargs or {}))


def test_gradcheck():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=f64, generator=gen).requires_grad_()
    head = torch.randn(11, 5, dtype=f64, generator=gen).requires_grad_()
    labels = torch.tensor([1, -100, 10, 0, 3, -100, 7])
    for block in (None, 4):  # one block of the 11-token vocabulary, or 4 + 4 + 3
        assert torch.autograd.gradcheck(
            lambda h, w, block=block: chunked_cross_entropy(h, w, labels, chunk_size=2, vocab_block=block), (h, head)
        )


@pytest.mark.parametrize("block", [None, 7, 1], ids=["one block", "blocks of 7", "blocks of 1"])
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16])
def test_matches_full_logits(dtype, block):
    hidden, head, labels = _data(dtype=dtype)
    # 8 does not divide the 30 labelled rows, 7 not the 50-token vocabulary
    loss = chunked_cross_entropy(hidden, head, labels, chunk_size=8, vocab_block=block)
    assert loss.dtype == (f64 if dtype == f64 else torch.float32)
    hr, wr, ref = _reference(hidden, head, labels)
    loss.backward()
    ref.backward()
    tol = {f64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert abs(loss.item() - ref.item()) / ref.item() < tol
    assert _rel(hidden.grad, hr.grad) < tol and _rel(head.grad, wr.grad) < tol
    assert hidden.grad.dtype == dtype and head.grad.dtype == dtype
    assert hidden.grad[::5].abs().sum() == 0


def test_3d_frozen_head_and_all_ignored():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 5))
    loss = chunked_cross_entropy(hidden, head, labels, chunk_size=3)
    ref = F.cross_entropy((hidden @ head.t()).view(-1, 11), labels.view(-1))
    assert torch.allclose(loss, ref, rtol=1e-5)
    loss.backward()
    assert hidden.grad.shape == hidden.shape
    empty = chunked_cross_entropy(hidden, head, torch.full((2, 5), -100))
    assert empty.item() == 0.0
    hidden.grad = None
    empty.backward()
    assert hidden.grad.abs().sum() == 0  # zeros, not NaN


def test_trained_head_upstream_scale_and_accumulation():
    """Two calls on one hidden/head, scaled by 3.7 and -0.5, accumulate like float64 autograd."""
    hidden, head, labels = _data(n=24, seed=1, dtype=torch.float32)
    hidden = hidden.detach().view(2, 12, 16).requires_grad_()
    labels2 = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    labels2[0, :7] = -100
    labels = labels.view(2, 12)
    for lab, scale in ((labels, 3.7), (labels2, -0.5)):
        (chunked_cross_entropy(hidden, head, lab, chunk_size=5, vocab_block=16) * scale).backward()
    hr, wr, ref1 = _reference(hidden, head, labels)
    ref2 = F.cross_entropy((hr @ wr.t()).view(-1, 50), labels2.view(-1), ignore_index=-100)
    (ref1 * 3.7 + ref2 * -0.5).backward()
    assert _rel(hidden.grad, hr.grad) < 1e-5 and _rel(head.grad, wr.grad) < 1e-5


def test_backward_twice_with_retain_graph():
    hidden, head, labels = _data(dtype=torch.float32)
    loss = chunked_cross_entropy(hidden, head, labels, chunk_size=8)
    loss.backward(retain_graph=True)
    first = hidden.grad.clone(), head.grad.clone()
    loss.backward()
    assert torch.allclose(hidden.grad, 2 * first[0]) and torch.allclose(head.grad, 2 * first[1])


def test_gradient_work_only_when_needed():
    """Per chunk and vocabulary block, 1 head matmul for the loss, +1 for hidden's grad, +2 for a trained head's
    (its logits again, then dW); none in backward; the loss the same bits whatever is asked."""
    hidden, head, labels = _data(n=20, dtype=torch.float32)  # 16 labelled rows, chunk 5: 4 chunks
    chunks = 4 * 2  # x 2 blocks of the 50-token vocabulary

    def run(h, w, grad=True):
        with _CountMatmuls() as fwd, torch.set_grad_enabled(grad):
            loss = chunked_cross_entropy(h, w, labels, chunk_size=5, vocab_block=25)
        return loss, fwd.n

    no_grad_loss, n_no_grad = run(hidden, head, grad=False)
    plain_loss, n_plain = run(hidden.detach(), head.detach())
    assert not no_grad_loss.requires_grad and not plain_loss.requires_grad
    assert n_no_grad == n_plain == chunks
    for h, w, per_chunk in ((hidden, head.detach(), 2), (hidden, head, 4), (hidden.detach(), head, 3)):
        loss, n = run(h, w)
        assert n == per_chunk * chunks
        assert torch.equal(loss.detach(), no_grad_loss) and torch.equal(plain_loss, no_grad_loss)
        with _CountMatmuls() as bwd:
            (loss * 2).backward()
        assert bwd.n == 0


def test_bf16_autocast_matches_float64():
    hidden, head, labels = _data(n=40, hdim=32, vocab=300, seed=3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, head, labels, chunk_size=16, vocab_block=64)
    assert loss.dtype == torch.float32
    hr, wr, ref = _reference(hidden, head, labels)
    (loss * 3.7).backward()
    (ref * 3.7).backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    assert _rel(hidden.grad, hr.grad) < 2e-2 and _rel(head.grad, wr.grad) < 2e-2
    assert hidden.grad.dtype == head.grad.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(chunked_cross_entropy(hidden, head, labels, chunk_size=16, vocab_block=64), loss.detach())


def test_errors():
    hidden, head, labels = _data(dtype=torch.float32)
    with pytest.raises(ValueError, match="must be"):
        chunked_cross_entropy(hidden, head[:, :8], labels)
    with pytest.raises(ValueError, match="must be"):
        chunked_cross_entropy(hidden, head, labels[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, head, labels, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_block"):
        chunked_cross_entropy(hidden, head, labels, vocab_block=0)
    bad = labels.clone()
    bad[1] = 50
    with pytest.raises(ValueError, match="label 50 is outside"):
        chunked_cross_entropy(hidden, head, bad)
