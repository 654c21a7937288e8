"""Atomic writes: a file or a directory appears complete or not at all.

Every file lorakit writes for people to keep (``adapter_config.json``,
``lorakit.yaml``, ``metrics.jsonl``, model cards, plots, adapter, checkpoint,
merged-model and model-cache directories) goes through this module. Each is
written under a temporary name in the same folder and renamed into place, so a
crash or a concurrent reader never sees a half-written file; on failure the
temporary is removed and the old content stays.

Permissions are the ones a plain ``open`` / ``mkdir`` would give: files
``0o666 & ~umask``, directories ``0o777 & ~umask`` (0644 / 0755 under the usual
umask 022), also for everything inside an atomically written directory.
``tempfile.mkstemp`` / ``mkdtemp`` are not used: they make 0600 / 0700 entries
that other users (a shared model cache, a serving account) cannot read.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

__all__ = ["write_file_atomic", "write_dir_atomic"]


def _temp_name(final: Path) -> Path:
    """A fresh name beside ``final``: ``.<name>.tmp-<pid>-<random>`` (models.py cleans up stale ones by it)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_file_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` via a temp file beside it, fsync and rename.

    The file gets mode ``0o666 & ~umask``; its folder must exist.

    Args:
        path: The file to (re)place.
        data: Its whole content; ``str`` is written as UTF-8.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the write or rename failed; ``path`` is as it was and no temp file is left.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_dir_atomic(
    final: str | os.PathLike[str],
    write: Callable[[Path], None],
    existing: Literal["replace", "update", "keep"] = "replace",
    last: str | None = None,
) -> Path:
    """Fill a temp directory beside ``final`` with ``write(tmp)`` and move it into place by renames.

    Everything inside gets the modes a plain ``mkdir`` / ``open`` gives (dirs
    ``0o777 & ~umask``, files ``0o666 & ~umask``), whatever ``write`` used. On any
    error the temp directory is removed and ``final`` is as it was.

    Args:
        final: The directory to write (its parents are created).
        write: Fills the empty directory it is given.
        existing: What to do when ``final`` already exists. ``"replace"``: swap it out
            whole. ``"update"``: move only the entries ``write`` produced into it, each by
            one rename (a run directory keeps its checkpoints and metrics). ``"keep"``:
            another writer finished first; keep its directory and drop ours.
        last: With ``"update"``, the entry renamed last (the one whose presence marks the
            directory complete, e.g. ``adapter_config.json``).

    Returns:
        ``final`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: a write or rename failed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    tmp.mkdir()  # mode 0o777 & ~umask, unlike mkdtemp's 0700
    try:
        write(tmp)
        _normalise_modes(tmp, tmp.stat().st_mode & 0o7777)
        if not final.exists():
            try:
                os.rename(tmp, final)
            except OSError:
                if existing != "keep" or not final.is_dir():
                    raise
        elif existing == "update":
            for name in sorted(p.name for p in tmp.iterdir()):
                if name != last:
                    os.replace(tmp / name, final / name)
            if last is not None and (tmp / last).exists():
                os.replace(tmp / last, final / last)
        elif existing == "replace":
            _swap(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # on success it was renamed away (or is a dropped duplicate)
    return final


def _swap(tmp: Path, final: Path) -> None:
    """Replace directory ``final`` by ``tmp``; if the second rename fails, put the old one back."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _normalise_modes(root: Path, dir_mode: int) -> None:
    """Give every entry under ``root`` the umask's default mode (``root`` itself was made by mkdir)."""
    file_mode = dir_mode & 0o666
    for folder, dirs, files in os.walk(root):
        for names, mode in ((dirs, dir_mode), (files, file_mode)):
            for name in names:
                entry = os.path.join(folder, name)
                if not os.path.islink(entry):  # a link's mode is its target's business
                    os.chmod(entry, mode)
