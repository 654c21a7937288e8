"""The adapters a server holds: load (validated against the base), look up, unload when idle.

Names are what clients send as ``model``: the base model's id for no adapter, an
adapter's name for that adapter. Loading goes through :func:`lorakit.load_adapter`,
which checks every saved tensor against the base (module exists, shape fits, rank and
alpha from the adapter's config) and names what does not fit; an adapter that does not
fit is never served, as the base or otherwise. Each running request holds its adapter
(:meth:`AdapterRegistry.acquire` / :meth:`~AdapterRegistry.release`); unloading hides the
adapter from new requests at once and frees its weights when the last request using it
ends (:meth:`~AdapterRegistry.collect`, run by the engine between steps).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import torch

from ..adapters import delete_adapter, get_configs
from ..config import WEIGHTS_NAME
from ..errors import AdapterNotFoundError, ConfigError
from ..io import load_adapter
from ..memory import return_freed_memory
from ..mixed import BASE, forget_stacks
from ..runs import find_adapter_dir

__all__ = ["AdapterInfo", "AdapterRegistry"]


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What ``GET /v1/models`` tells about one adapter.

    Attributes:
        name: the adapter's name (the ``model`` clients send).
        path: the directory it was loaded from.
        r: its rank (the largest, with a ``rank_pattern``).
        lora_alpha: its alpha.
        target_modules: the modules it adapts, as its config names them.
        sha256: hex digest of its weights file.
    """

    name: str
    path: str
    r: int
    lora_alpha: float
    target_modules: list[str] | str | None
    sha256: str


def _sha256(path: Path) -> str:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        weights = path / "adapter_model.bin"
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _return_free_memory() -> None:
    """Hand freed memory back to the system: CUDA's cache, and glibc's heap (small tensors live there)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return_freed_memory()


class AdapterRegistry:
    """The adapters on one base model, with the requests that use each.

    Args:
        model: the base model (adapters are loaded onto it in place).
        base_id: the name clients use for the base model without adapter.
    """

    def __init__(self, model: Any, base_id: str) -> None:
        self.model, self.base_id = model, base_id
        self._lock = threading.Lock()
        self._info: dict[str, AdapterInfo] = {}
        self._users: dict[str, int] = {}
        self._unloading: set[str] = set()

    def names(self) -> list[str]:
        """The names clients may use: the base id, then each adapter being served."""
        with self._lock:
            return [self.base_id, *(n for n in self._info if n not in self._unloading)]

    def adapters(self) -> list[AdapterInfo]:
        """The adapters being served (not those waiting to unload)."""
        with self._lock:
            return [info for n, info in self._info.items() if n not in self._unloading]

    def load(self, name: str, path: str | os.PathLike[str]) -> AdapterInfo:
        """Load the adapter in ``path`` under ``name`` after checking that it fits the base.

        Call it where no forward pass runs at the same time (the engine thread, or before serving).

        Args:
            name: the adapter's name.
            path: its directory (PEFT format), or a run directory (its final adapter).

        Returns:
            Its :class:`AdapterInfo`.

        Raises:
            ConfigError: the name is taken or unusable.
            AdapterFormatError: missing or corrupt files.
            ModelMismatchError: the adapter does not fit this base (names the unmatched keys).
        """
        if not isinstance(name, str) or not name or "." in name or name in (BASE, self.base_id):
            raise ConfigError(
                f"adapter name {name!r} is not usable: give a non-empty name without dots that is not "
                f"{self.base_id!r} or {BASE!r}."
            )
        with self._lock:
            if name in self._info:
                raise ConfigError(
                    f"an adapter named {name!r} is already loaded"
                    f"{' (still unloading)' if name in self._unloading else ''}; pick another name."
                )
        path, _ = find_adapter_dir(path)  # a run directory serves its final adapter
        load_adapter(self.model, path, adapter_name=name)
        config = get_configs(self.model)[name]
        rank = max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r
        info = AdapterInfo(
            name=name,
            path=str(path),
            r=rank,
            lora_alpha=config.lora_alpha,
            target_modules=config.target_modules,
            sha256=_sha256(path),
        )
        with self._lock:
            self._info[name] = info
            self._users[name] = 0
        return info

    def acquire(self, name: str) -> str:
        """Hold adapter ``name`` for one request; the base id maps to ``"__base__"``.

        Returns:
            The adapter name to run (``"__base__"`` for the base model).

        Raises:
            AdapterNotFoundError: no such adapter (or it is unloading); the message lists the available names.
        """
        if name == self.base_id:
            return BASE
        with self._lock:
            if name not in self._info or name in self._unloading:
                available = [self.base_id, *(n for n in self._info if n not in self._unloading)]
                raise AdapterNotFoundError(
                    f"The model `{name}` does not exist. Available models: {', '.join(available)}."
                )
            self._users[name] += 1
        return name

    def release(self, name: str) -> None:
        """A request that held ``name`` (from :meth:`acquire`) has ended."""
        if name == BASE:
            return
        with self._lock:
            if name in self._users:
                self._users[name] -= 1

    def unload(self, name: str) -> int:
        """Stop serving ``name`` now; its weights go when its last running request ends.

        Returns:
            How many requests still use it.

        Raises:
            AdapterNotFoundError: no such adapter (or already unloading).
        """
        with self._lock:
            if name not in self._info or name in self._unloading:
                raise AdapterNotFoundError(
                    f"no adapter named {name!r} is loaded; loaded: "
                    f"{', '.join(n for n in self._info if n not in self._unloading) or 'none'}."
                )
            self._unloading.add(name)
            return self._users[name]

    def collect(self) -> list[str]:
        """Delete the unloading adapters that no request uses any more (no forward may run meanwhile).

        Returns:
            The names deleted.
        """
        with self._lock:
            idle = [n for n in self._unloading if self._users[n] <= 0]
            for name in idle:
                self._unloading.discard(name)
                del self._info[name], self._users[name]
        for name in idle:
            delete_adapter(self.model, name)
        if idle:
            forget_stacks(self.model)  # the decoding path's concatenated copies of the adapters' weights
            gc.collect()
            _return_free_memory()
        return idle
