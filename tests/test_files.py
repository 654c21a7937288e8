"""lorakit.files: atomic writes with the umask's permissions, and the modes of everything lorakit writes.

The reference is what a plain ``open`` / ``mkdir`` gives under the same umask
(``0o666 & ~umask`` / ``0o777 & ~umask``); every writer is checked on real output:
a tiny training run, ``save_adapter``, ``merge_to_dir`` and the GGUF conversion cache.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_model_dir, write_chat_jsonl  # noqa: E402

import lorakit  # noqa: E402
from lorakit import files  # noqa: E402
from lorakit.files import write_dir_atomic, write_file_atomic  # noqa: E402


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def wrong_modes(root: Path, mask: int) -> list[str]:
    """Every entry under ``root`` (and ``root``) whose mode is not the umask's default."""
    want_dir, want_file = 0o777 & ~mask, 0o666 & ~mask
    wrong = []
    for path in [root, *root.rglob("*")]:
        want = want_dir if path.is_dir() else want_file
        if mode(path) != want:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode(path))}, want {oct(want)}")
    return wrong


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- the helpers


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_file_mode_follows_umask(tmp_path, mask):
    with umask(mask):
        plain = tmp_path / "plain"
        plain.write_text("x")  # the reference: what open() gives
        out = write_file_atomic(tmp_path / "a.json", "{}\n")
        write_file_atomic(tmp_path / "a.json", b"[]\n")  # replacing keeps the umask's mode
    assert out == tmp_path / "a.json" and out.read_text() == "[]\n"
    assert mode(out) == mode(plain) == 0o666 & ~mask
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_dir_modes_follow_umask_inside_too(tmp_path, mask):
    def write(tmp: Path) -> None:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        fd, name = tempfile.mkstemp(dir=tmp)  # a writer that makes 0600 files
        os.close(fd)
        os.rename(name, tmp / "private.txt")

    with umask(mask):
        reference = tmp_path / "reference"
        reference.mkdir()
        out = write_dir_atomic(tmp_path / "deep" / "out", write)
    assert mode(out) == mode(reference) == 0o777 & ~mask
    assert sorted(p.name for p in out.rglob("*")) == ["private.txt", "sub", "w.bin"]
    assert wrong_modes(out, mask) == [] and wrong_modes(tmp_path / "deep", mask) == []


def test_failed_file_write_leaves_old_content(tmp_path, monkeypatch):
    target = tmp_path / "c.yaml"
    target.write_text("old")
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_file_atomic(target, "new")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", ["replace", "update", "keep"])
def test_failed_dir_write_leaves_old_dir(tmp_path, existing):
    final = tmp_path / "d"
    final.mkdir()
    (final / "a").write_text("old")

    def write(tmp: Path) -> None:
        (tmp / "a").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_dir_atomic(final, write, existing=existing)
    assert [p.name for p in final.iterdir()] == ["a"] and (final / "a").read_text() == "old"
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):  # a new directory: nothing appears
        write_dir_atomic(tmp_path / "new", write)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_existing_dir_replace_update_keep(tmp_path, monkeypatch):
    final = tmp_path / "d"
    final.mkdir()
    (final / "extra").write_text("mine")
    (final / "a").write_text("old")

    def write(tmp: Path) -> None:
        (tmp / "a").write_text("new")
        (tmp / "marker").write_text("done")

    write_dir_atomic(final, write, existing="keep")  # another writer finished first: its dir stays
    assert sorted(p.name for p in final.iterdir()) == ["a", "extra"] and (final / "a").read_text() == "old"

    moved = []
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (moved.append(Path(b).name), real_replace(a, b)))
    write_dir_atomic(final, write, existing="update", last="marker")
    assert moved == ["a", "marker"]  # the marker last, whatever its name sorts as
    assert sorted(p.name for p in final.iterdir()) == ["a", "extra", "marker"] and (final / "a").read_text() == "new"
    monkeypatch.undo()

    write_dir_atomic(final, write)  # replace: the old directory goes whole
    assert sorted(p.name for p in final.iterdir()) == ["a", "marker"]
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- what lorakit writes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("files") / "tiny")


def test_training_run_files_are_readable(tiny, tmp_path, one_thread):
    from lorakit.train.config import RunConfig
    from lorakit.train.loop import train

    cfg = RunConfig.model_validate(
        {
            "model": str(tiny),
            "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(write_chat_jsonl(tmp_path / "train.jsonl", n=8)), "eval_fraction": 0.25},
            "train": {
                "steps": 4,
                "batch_size": 2,
                "lr": 1e-2,
                "precision": "fp32",
                "eval_every": 2,
                "save_every": 2,
                "log_every": 1,
            },
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    with umask(0o022):
        train(cfg, device="cpu")
    run = tmp_path / "run"
    written = {str(p.relative_to(run)) for p in run.rglob("*")}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorakit.yaml",
        "metrics.jsonl",
        "loss.png",
        "README.md",
        "checkpoints/step-000002/trainer_state.pt",
        "checkpoints/step-000004/adapter_config.json",
    } <= written, written
    assert wrong_modes(run, 0o022) == []
    assert leftovers(run) == [] and leftovers(run / "checkpoints") == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_adapter_files_follow_umask(tiny, tmp_path, mask):
    from lorakit.models import load_model

    model, _ = load_model(tiny)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=2, target_modules=["v_proj"]))
    with umask(mask):
        out = lorakit.save_adapter(model, tmp_path / "adapter")
        sub = lorakit.save_adapter(model, tmp_path / "adapter", adapter_name="other")
    assert sub == out / "other" and (sub / "adapter_config.json").is_file()
    assert wrong_modes(out, mask) == []


def test_merged_model_files_are_readable(tiny, tmp_path):
    from lorakit.merging import merge_to_dir
    from lorakit.models import load_model

    model, _ = load_model(tiny)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = lorakit.save_adapter(model, tmp_path / "adapter")
    with umask(0o022):
        out = merge_to_dir(adapter, tmp_path / "merged", model=tiny)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert wrong_modes(out, 0o022) == [] and leftovers(tmp_path) == []


def test_model_cache_is_readable(tiny, tmp_path, monkeypatch):
    """The GGUF conversion cache is shared: its folders and files get the umask's modes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import models as lk_models

    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(
        lk_models,
        "_read_gguf",
        lambda gguf: (AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)),
    )
    gguf = tmp_path / "tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF-not-really")
    with umask(0o022):
        out = lk_models.resolve_model(gguf)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert wrong_modes(tmp_path / "home", 0o022) == []
