"""lorakit.memory: freed heap goes back to the OS on glibc, and the call is harmless elsewhere."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from lorakit import memory  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not memory.can_return_freed_memory(), reason="needs glibc's malloc_trim (Linux)")
def test_freed_small_chunks_leave_the_resident_set():
    # 128 MiB in 64 KiB chunks (below glibc's mmap threshold: heap, not mmap), every page written. All but the
    # last are freed: the free space sits below a live chunk, so free() alone cannot shrink the heap's top.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 64 << 10, 2048
    before = _rss_mib()
    chunks = [libc.malloc(size) for _ in range(n)]
    assert all(chunks)
    for c in chunks:
        ctypes.memset(c, 1, size)
    grown = _rss_mib()
    assert grown - before > 100  # the chunks are resident
    try:
        for c in chunks[:-1]:
            libc.free(c)
        kept = _rss_mib()
        assert kept - before > 100  # glibc keeps what was freed
        assert memory.return_freed_memory() is True
        assert kept - _rss_mib() > 100  # and hands it back when asked
    finally:
        libc.free(chunks[-1])


def test_no_malloc_trim_is_a_no_op(monkeypatch):
    memory._malloc_trim.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        assert memory.can_return_freed_memory() is False
        assert memory.return_freed_memory() is False
    finally:
        memory._malloc_trim.cache_clear()


@pytest.mark.skipif(not memory.can_return_freed_memory(), reason="needs glibc's malloc_trim (Linux)")
def test_returns_during_a_forward_pass_after_every_nth_layer(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(memory, "return_freed_memory", lambda: calls.append(len(order)) or True)
    order = []
    layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(7))
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: order.append(i))
    handles = memory.return_freed_memory_during(layers, times=3)  # every 3rd: after layers 2 and 5
    x = torch.randn(2, 4)
    for layer in layers:
        x = layer(x)
    assert calls == [3, 6] and len(handles) == 2
    for h in handles:
        h.remove()
    layers[2](x)
    assert calls == [3, 6]  # removed
    assert memory.return_freed_memory_during(layers[:0]) == []


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("setting", "quantization", "returns"),
    [(None, None, False), (True, None, True), (False, None, False), (None, "nf4", True), (False, "nf4", False)],
)
def test_trainer_returns_freed_memory_as_configured(tmp_path, monkeypatch, setting, quantization, returns):
    """return_freed_memory: true returns after each CPU step and 3 times in its forward; unset: 4-bit only."""
    from tiny import make_tiny_model_dir, write_chat_jsonl

    from lorakit.train import loop
    from lorakit.train.config import RunConfig

    if quantization:
        pytest.importorskip("bitsandbytes")
    calls, during = [], []
    monkeypatch.setattr(loop, "return_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(memory, "return_freed_memory", lambda: during.append(1) or True)
    monkeypatch.setattr(memory, "can_return_freed_memory", lambda: True)
    monkeypatch.setattr(loop, "can_return_freed_memory", lambda: True)
    model = str(make_tiny_model_dir(tmp_path / "model", layers=6))
    train = {"steps": 3, "batch_size": 2, "precision": "fp32", "eval_every": 0, "save_every": 0}
    if setting is not None:
        train["return_freed_memory"] = setting
    cfg = RunConfig.model_validate(
        {
            "model": {"name": model, "quantization": quantization} if quantization else model,
            "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(write_chat_jsonl(tmp_path / "train.jsonl", n=8))},
            "train": {**train, "gradient_checkpointing": False},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    result = loop.train(cfg, device="cpu")
    assert len(calls) == (3 if returns else 0)  # after each of the 3 steps
    # 3 times in each forward pass (6 layers: after the 2nd, 4th, 6th); none when off
    assert len(during) >= 3 * 3 if returns else len(during) == 0
    # the model card (as the start line and summary) names the 4-bit default; an explicit setting needs no note
    card = (result.run_dir / "README.md").read_text()
    assert ("freed memory returned to the OS" in card) == (returns and setting is None)
