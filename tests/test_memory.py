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


@pytest.mark.usefixtures("one_thread")
def test_trainer_returns_freed_memory_after_each_cpu_step(tmp_path, monkeypatch):
    from tiny import make_tiny_model_dir, write_chat_jsonl

    from lorakit.train import loop
    from lorakit.train.config import RunConfig

    calls = []
    monkeypatch.setattr(loop, "return_freed_memory", lambda: calls.append(1) or True)
    cfg = RunConfig.model_validate(
        {
            "model": str(make_tiny_model_dir(tmp_path / "model")),
            "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(write_chat_jsonl(tmp_path / "train.jsonl", n=8))},
            "train": {"steps": 3, "batch_size": 2, "precision": "fp32", "eval_every": 0, "save_every": 0},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    loop.train(cfg, device="cpu")
    assert len(calls) == 3
