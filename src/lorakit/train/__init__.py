"""The training pipeline: run config, data, batching, the loss, the loop, reporting.

``lorakit.train(config, overrides=(), resume=False)`` is the same call as
:func:`lorakit.train.loop.train` (what ``lorakit train`` runs): this package is
callable, so the short name and the submodules (``lorakit.train.loop``,
``lorakit.train.data``, ...) both work. The loop is imported on first call only.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
