"""The C heap allocator of CPU training: jemalloc where it is found, glibc's malloc otherwise.

A CPU training step allocates and frees many activation-sized tensors (a few MiB
each). glibc's malloc keeps the holes they leave resident, so a process's peak RSS
grows with heap it does not use (the default model's int8 training peaked at
0.61-0.66x PEFT fp32's with glibc; live data alone is well under 0.5x). Handing the
freed heap back to the OS (:mod:`lorakit.memory`) lowers the peak, but glibc then
faults every page in again when the heap reuses it: about 1 GiB a step, steps 9-17%
slower. jemalloc keeps same-size blocks together and returns pages it has not reused
for a while (``dirty_decay_ms``: 30 s here, :data:`JEMALLOC_CONF`):
in 30-step int8 runs of the default model the peak RSS fell from 2.05 to 1.58 GiB
(short workload) and from 2.44 to 1.80 GiB (long), 0.47x / 0.40x PEFT fp32's
(benchmarks/RESULTS.md, "int8_schemes", "With jemalloc").

One jemalloc 5.3 rule undoes that decay for a training step: a freed block that
merges with free neighbours into 8 MiB or more goes back to the OS at once, whatever
``dirty_decay_ms`` says, unless the decay of dirty or of muzzy pages is switched off
(``extent_may_force_decay`` in its ``extent.c``). A step's activations are such
blocks (a [1024, 1536] fp32 tensor is 6 MiB), so every step faulted and zeroed the
same pages again: about 145,000 page faults (570 MiB) a step on the long int8
workload. ``muzzy_decay_ms:-1`` switches that rule off: pages unused for 30 s still
leave the dirty state, as lazily freed pages (``MADV_FREE``) that the kernel takes
back when it needs memory, so a reused page costs no fault. That cut the faults to
about 21,000 a step and the AVX2 long int8 step by about 10%. The pages stay with the
process instead: the peak RSS rose 3% on the long workload and 0.15 GiB (about 10%) on
the short one, whose tensor sizes change every step (it levels off within about 25
steps). ``MALLOC_CONF=dirty_decay_ms:30000,muzzy_decay_ms:30000`` restores the old trade.

A process picks its allocator when it starts (``LD_PRELOAD``), so ``lorakit train``
starts itself again, once, under jemalloc (:func:`relaunch_under_jemalloc`, called by
the CLI before any work) when it finds the library and the process runs no other
preloaded library. PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``)
preloads jemalloc the same way. ``LORAKIT_ALLOCATOR`` chooses: ``auto`` (the
default), ``jemalloc`` (an error where it is not found) or ``system`` (never
relaunch). Where the library is looked for: ``LORAKIT_JEMALLOC`` (a path), the
virtual environment's ``lib/jemalloc/`` (where scripts/setup.sh puts Debian's
libjemalloc2), then the usual system library folders.

Only Linux: elsewhere nothing is relaunched and the system allocator stays.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "CHOICE_ENV",
    "JEMALLOC_CONF",
    "PATH_ENV",
    "active_allocator",
    "allocator_note",
    "find_jemalloc",
    "purge_jemalloc",
    "relaunch_plan",
    "relaunch_under_jemalloc",
]

CHOICE_ENV = "LORAKIT_ALLOCATOR"  # auto | jemalloc | system
PATH_ENV = "LORAKIT_JEMALLOC"  # an explicit path to libjemalloc.so.2
RELAUNCHED_ENV = "LORAKIT_ALLOCATOR_RELAUNCHED"  # set in the relaunched process: never relaunch twice
# Pages a process has freed leave after ~30 s unused (jemalloc's default: 10 s). On the int8 runs' probes (3 fresh
# processes each) the default gave the same peak and 2.09 s/step against 1.95 (glibc 1.92). Muzzy decay off (-1):
# else jemalloc returns every freed block that merges into >= 8 MiB at once (see the module docstring).
JEMALLOC_CONF = "dirty_decay_ms:30000,muzzy_decay_ms:-1"
_CHOICES = ("auto", "jemalloc", "system")
_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
_SYSTEM_DIRS = (
    "/usr/local/lib",
    "/usr/local/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
)


def find_jemalloc(env: Mapping[str, str] | None = None) -> Path | None:
    """Where jemalloc's shared library is on this machine, or None.

    Args:
        env: The environment to read ``LORAKIT_JEMALLOC`` / ``CONDA_PREFIX`` from; None reads ``os.environ``.

    Returns:
        The library's path: ``LORAKIT_JEMALLOC`` if set, else the first of the virtual environment's
        ``lib/jemalloc/``, ``$CONDA_PREFIX/lib`` and the system library folders that has it.

    Raises:
        ConfigError: ``LORAKIT_JEMALLOC`` names a file that does not exist.
    """
    env = os.environ if env is None else env
    if explicit := env.get(PATH_ENV):
        if not Path(explicit).is_file():
            raise ConfigError(f"{PATH_ENV}={explicit}: no such file; point it at libjemalloc.so.2 or unset it")
        return Path(explicit)
    dirs = [Path(sys.prefix) / "lib" / "jemalloc", Path(sys.prefix) / "lib"]
    if conda := env.get("CONDA_PREFIX"):
        dirs.append(Path(conda) / "lib")
    dirs += [Path(d) for d in _SYSTEM_DIRS]
    return next((d / n for d in dirs for n in _NAMES if (d / n).is_file()), None)


@functools.cache
def active_allocator() -> str:
    """Which allocator this process's ``malloc`` is (read once: a process keeps the allocator it started with).

    Returns:
        ``"jemalloc"`` where jemalloc is loaded (preloaded), ``"glibc"`` on a glibc system otherwise,
        ``"system"`` elsewhere.
    """
    try:
        with open("/proc/self/maps") as f:
            if any("libjemalloc" in line for line in f):
                return "jemalloc"
    except OSError:  # no /proc: not Linux
        pass
    return "glibc" if platform.libc_ver()[0] == "glibc" else "system"


def relaunch_plan(argv: Sequence[str], env: Mapping[str, str], loaded: str) -> tuple[list[str], dict[str, str]] | None:
    """Whether and how to start ``lorakit ARGV`` again under jemalloc (decided here, done by the caller).

    Args:
        argv: The command's arguments after the program name (e.g. ``["train", "run.yaml"]``).
        env: The current environment.
        loaded: :func:`active_allocator` of the current process.

    Returns:
        ``(argv, env)`` for ``os.execve`` (this Python, ``-m lorakit``, jemalloc preloaded with
        :data:`JEMALLOC_CONF` unless ``MALLOC_CONF`` is set), or None: not Linux, ``LORAKIT_ALLOCATOR=system``,
        jemalloc loaded already, another library preloaded (``LD_PRELOAD`` is the user's), relaunched once
        already, or (with ``auto``) no jemalloc found.

    Raises:
        ConfigError: ``LORAKIT_ALLOCATOR`` is not auto/jemalloc/system, or is ``jemalloc`` and none is found
            or it cannot be preloaded here.
    """
    choice = env.get(CHOICE_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ConfigError(f"{CHOICE_ENV}={env[CHOICE_ENV]!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "system" or loaded == "jemalloc" or env.get(RELAUNCHED_ENV):
        return None
    blocked = "LD_PRELOAD is set" if env.get("LD_PRELOAD") else ""
    blocked = "not Linux" if not sys.platform.startswith("linux") else blocked
    lib = None if blocked else find_jemalloc(env)
    if lib is None:
        if choice == "jemalloc":
            why = blocked or "libjemalloc.so.2 not found"
            raise ConfigError(
                f"{CHOICE_ENV}=jemalloc, but jemalloc cannot be preloaded ({why}); install it (Debian/Ubuntu: "
                f"apt install libjemalloc2, or scripts/setup.sh), set {PATH_ENV}=/path/to/libjemalloc.so.2, "
                f"or use {CHOICE_ENV}=system"
            )
        return None
    new_env = {**env, "LD_PRELOAD": str(lib), RELAUNCHED_ENV: "1"}
    new_env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return [sys.executable, "-m", "lorakit", *argv], new_env


def relaunch_under_jemalloc(argv: Sequence[str]) -> None:
    """Replace this process by ``python -m lorakit ARGV`` under jemalloc where :func:`relaunch_plan` says so.

    Returns only where nothing is relaunched (or the relaunch itself fails: then this process goes on, on its
    own allocator, and says so). Call it before any work: the process is replaced.

    Args:
        argv: The command's arguments after the program name.

    Raises:
        ConfigError: as :func:`relaunch_plan`.
    """
    plan = relaunch_plan(argv, os.environ, active_allocator())
    if plan is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(plan[0][0], plan[0], plan[1])
    except OSError as e:  # e.g. no executable to start again: go on as we are
        print(f"lorakit: could not start again under jemalloc ({e}); going on with the system malloc", file=sys.stderr)


def allocator_note() -> str:
    """The heap allocator in a few words, for a run's start line.

    Returns:
        E.g. ``"heap: jemalloc"`` or ``"heap: glibc malloc (jemalloc not found: ...)"``.
    """
    kind = active_allocator()
    if kind == "jemalloc":
        return "heap: jemalloc"
    if kind != "glibc":
        return "heap: system malloc"
    if os.environ.get(CHOICE_ENV, "").strip().lower() == "system":
        return f"heap: glibc malloc ({CHOICE_ENV}=system)"
    return "heap: glibc malloc (jemalloc not found: it lowers peak RSS; apt install libjemalloc2 or scripts/setup.sh)"


@functools.cache
def _mallctl() -> Any:
    """jemalloc's ``mallctl`` through ctypes, or None where jemalloc is not loaded (looked up once per process)."""
    if active_allocator() != "jemalloc":
        return None
    try:
        mallctl = ctypes.CDLL(None).mallctl  # the preloaded library's symbol, in the global namespace
    except AttributeError:  # a build with prefixed symbols (je_mallctl): nothing to call
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


def purge_jemalloc() -> bool:
    """Ask a loaded jemalloc to return every arena's unused pages to the OS now (``arena.<all>.purge``).

    Returns:
        True where jemalloc is loaded and did it; False otherwise.
    """
    mallctl = _mallctl()
    return mallctl is not None and mallctl(b"arena.4096.purge", None, None, None, 0) == 0  # 4096: all arenas
