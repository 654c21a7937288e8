"""lorakit.allocator: `lorakit train` starts itself again under jemalloc where it finds it, and says which heap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit import allocator
from lorakit.allocator import CHOICE_ENV, JEMALLOC_CONF, PATH_ENV, RELAUNCHED_ENV, relaunch_plan
from lorakit.errors import ConfigError

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="preloading is Linux-only")
FOUND = allocator.find_jemalloc()
needs_jemalloc = pytest.mark.skipif(
    FOUND is None or not sys.platform.startswith("linux"),
    reason="no libjemalloc.so.2 here (scripts/setup.sh fetches Debian's libjemalloc2 into .venv/lib/jemalloc)",
)


@pytest.fixture
def fake_lib(tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")  # never loaded: the plan only names it
    return lib


@linux
def test_plan_preloads_the_found_library_once(fake_lib):
    argv, env = relaunch_plan(["train", "run.yaml"], {PATH_ENV: str(fake_lib), "HOME": "/h"}, loaded="glibc")
    assert argv == [sys.executable, "-m", "lorakit", "train", "run.yaml"]
    assert env["LD_PRELOAD"] == str(fake_lib) and env["MALLOC_CONF"] == JEMALLOC_CONF
    assert env["HOME"] == "/h" and env[RELAUNCHED_ENV] == "1"
    # the relaunched process, whatever it finds, never starts again
    assert relaunch_plan(["train", "run.yaml"], env, loaded="glibc") is None


@linux
def test_plan_keeps_the_users_malloc_conf(fake_lib):
    _, env = relaunch_plan(["train"], {PATH_ENV: str(fake_lib), "MALLOC_CONF": "narenas:1"}, loaded="glibc")
    assert env["MALLOC_CONF"] == "narenas:1"


@linux
@pytest.mark.parametrize(
    ("extra", "loaded"),
    [
        ({CHOICE_ENV: "system"}, "glibc"),  # the user said so
        ({}, "jemalloc"),  # preloaded already (by the user or a launcher)
        ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "glibc"),  # another allocator the user chose
    ],
)
def test_plan_leaves_the_process_alone(fake_lib, extra, loaded):
    assert relaunch_plan(["train"], {PATH_ENV: str(fake_lib), **extra}, loaded=loaded) is None


def test_nothing_found_is_silent_under_auto_and_an_error_when_asked_for(monkeypatch):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda env=None: None)
    assert relaunch_plan(["train"], {}, loaded="glibc") is None
    with pytest.raises(ConfigError, match=rf"{CHOICE_ENV}=jemalloc.*{PATH_ENV}=.*{CHOICE_ENV}=system"):
        relaunch_plan(["train"], {CHOICE_ENV: "jemalloc"}, loaded="glibc")


def test_bad_choice_and_missing_path_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"LORAKIT_ALLOCATOR='tcmalloc': expected one of auto, jemalloc, system"):
        relaunch_plan(["train"], {CHOICE_ENV: "tcmalloc"}, loaded="glibc")
    with pytest.raises(ConfigError, match=r"LORAKIT_JEMALLOC=.*nope.so: no such file"):
        allocator.find_jemalloc({PATH_ENV: str(tmp_path / "nope.so")})


@linux
def test_a_failed_relaunch_goes_on_and_says_so(fake_lib, monkeypatch, capsys):
    def fail(*args):
        raise OSError("no such file")

    monkeypatch.setattr(os, "execve", fail)
    monkeypatch.setenv(PATH_ENV, str(fake_lib))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(RELAUNCHED_ENV, raising=False)
    monkeypatch.delenv(CHOICE_ENV, raising=False)
    monkeypatch.setattr(allocator, "active_allocator", lambda: "glibc")
    assert allocator.relaunch_under_jemalloc(["train", "x.yaml"]) is None
    assert "could not start again under jemalloc (no such file)" in capsys.readouterr().err


def test_this_process_is_on_the_system_allocator_and_says_so():
    # pytest itself is not relaunched: glibc here (or jemalloc if the user preloaded it)
    kind = allocator.active_allocator()
    note = allocator.allocator_note()
    assert note.startswith({"jemalloc": "heap: jemalloc", "glibc": "heap: glibc malloc"}.get(kind, "heap: system"))
    assert allocator.purge_jemalloc() is (False if kind != "jemalloc" else True)


def _python(code: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@needs_jemalloc
def test_preloaded_jemalloc_is_detected_and_purges_what_it_keeps():
    # 256 MiB in 256 KiB tensors, every page written, then freed: jemalloc keeps part of it as dirty pages (its
    # decay), and the memory module's return hands those back at once (a purge of every arena), as glibc's
    # malloc_trim would; jemalloc's own statistics (dirty pages) and the resident set both show it.
    code = (
        "import ctypes, torch\n"
        "from lorakit import allocator, memory\n"
        "m = ctypes.CDLL(None).mallctl\n"
        "def dirty():\n"
        "    e, v, n = ctypes.c_uint64(1), ctypes.c_size_t(), ctypes.c_size_t(8)\n"
        "    m(b'epoch', None, None, ctypes.byref(e), ctypes.c_size_t(8))\n"
        "    assert m(b'stats.arenas.4096.pdirty', ctypes.byref(v), ctypes.byref(n), None, ctypes.c_size_t(0)) == 0\n"
        "    return v.value * 4096 >> 20\n"
        "def rss():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) >> 10\n"
        "print(allocator.active_allocator(), memory.can_return_freed_memory())\n"
        "xs = [torch.ones(1 << 16) for _ in range(1024)]\n"
        "del xs\n"
        "kept, before = dirty(), rss()\n"
        "print(kept, memory.return_freed_memory(), dirty(), before - rss())\n"
    )
    out = _python(code, LD_PRELOAD=str(FOUND), MALLOC_CONF=JEMALLOC_CONF).split()
    assert out[:2] == ["jemalloc", "True"]
    kept, ok, left, returned = int(out[2]), out[3], int(out[4]), int(out[5])
    assert kept >= 16  # freed but kept resident (dirty), MiB
    assert ok == "True" and left == 0  # the purge empties every arena's dirty pages
    assert returned >= kept // 2  # and the resident set shrinks by (most of) them


@needs_jemalloc
def test_freed_activations_are_reused_without_page_faults():
    # A step's pattern: three 6 MiB tensors live at once, then freed, again and again. Freed neighbours merge into
    # blocks of 8 MiB or more, which jemalloc 5.3 hands back to the OS at once unless a decay is off; the next
    # iteration then faults all their pages in again. Under JEMALLOC_CONF the pages stay and are reused; the
    # contrast (muzzy decay on, as before) shows the test can tell the two apart.
    code = (
        "import ctypes, resource, torch\n"
        "ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)\n"  # PR_SET_THP_DISABLE: count 4 KiB faults even where THP is always
        "a = torch.ones(1024, 1536)\n"
        "def faults():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    xs = [a * 2 for _ in range(3)]; del xs\n"
        "f = faults()\n"
        "for _ in range(20):\n"
        "    xs = [a * 2 for _ in range(3)]; del xs\n"
        "print((faults() - f) // 20)\n"
    )
    page_faults_per_tensor = 1024 * 1536 * 4 // 4096  # 1536
    kept = int(_python(code, LD_PRELOAD=str(FOUND), MALLOC_CONF=JEMALLOC_CONF))
    refaulted = int(_python(code, LD_PRELOAD=str(FOUND), MALLOC_CONF="dirty_decay_ms:30000,muzzy_decay_ms:30000"))
    assert kept < page_faults_per_tensor // 4, kept
    assert refaulted >= page_faults_per_tensor, refaulted  # the old setting refaults at least one tensor a round


@needs_jemalloc
def test_lorakit_train_relaunches_itself_under_jemalloc(tmp_path):
    from tiny import make_tiny_model_dir, write_chat_jsonl

    model = make_tiny_model_dir(tmp_path / "tiny")
    data = write_chat_jsonl(tmp_path / "data.jsonl", n=4)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {model}\nlora: {{r: 2, lora_alpha: 4, target_modules: [q_proj]}}\n"
        f"data: {{train: {data}, max_seq_len: 64}}\ntrain: {{steps: 1, batch_size: 2}}\n"
        f"output: {{dir: {tmp_path / 'run'}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", RELAUNCHED_ENV, CHOICE_ENV)}
    runs = {}
    for c in ("auto", "system"):
        proc = subprocess.run(
            [sys.executable, "-m", "lorakit", "train", str(cfg), "--set", f"output.dir={tmp_path / c}"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, CHOICE_ENV: c, PATH_ENV: str(FOUND), "PYTHONPATH": str(Path(__file__).parent)},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[c] = proc.stdout + proc.stderr
    assert "heap: jemalloc" in runs["auto"]
    assert "heap: glibc malloc (LORAKIT_ALLOCATOR=system)" in runs["system"]
