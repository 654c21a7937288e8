"""lorakit: LoRA adapters for PyTorch models, fast on CPU and GPU, in PEFT's format.

Public API (re-exported from the modules that define it, plus :func:`train`)::

    model = lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    lorakit.print_trainable_parameters(model)
    lorakit.save_adapter(model, "out/adapter")
    model = lorakit.merge_and_unload(model)
    result = lorakit.train("examples/quickstart.yaml")   # lorakit.train.loop.train

``lorakit.train`` is that function, not the ``lorakit/train/`` package: reach the
package's modules with ``from lorakit.train import loop`` or ``from lorakit.train.loop
import train``. The package is imported here, before the function is defined, because
Python sets a package attribute to a subpackage the first time the subpackage is
imported; imported first, it can no longer replace the function. The training loop
itself is imported on the first call, so ``import lorakit`` (and inference code) loads
no training code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import train as _train_package  # the subpackage; must precede `def train` (see above)
from .adapters import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    for_inference,
    for_training,
    inject,
    list_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    unload,
    unmerge,
)
from .combine import CombineResult, add_weighted_adapter
from .config import LoraConfig
from .errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    ConfigError,
    DataError,
    LorakitError,
    ModelLoadError,
    ModelMismatchError,
    TargetNotFoundError,
    TrainingError,
    TrainingInterrupted,
    UnsupportedModuleError,
)
from .inject import print_trainable_parameters, trainable_parameters
from .io import load_adapter, save_adapter
from .mixed import adapter_batch
from .quant_model import quantize

if TYPE_CHECKING:
    import torch

    from .train.config import RunConfig
    from .train.report import TrainResult

del _train_package

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "inject",
    "trainable_parameters",
    "print_trainable_parameters",
    "add_adapter",
    "set_adapter",
    "active_adapters",
    "list_adapters",
    "delete_adapter",
    "disable_adapters",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "for_inference",
    "for_training",
    "adapter_batch",
    "add_weighted_adapter",
    "CombineResult",
    "save_adapter",
    "load_adapter",
    "quantize",
    "train",
    "LorakitError",
    "ConfigError",
    "TargetNotFoundError",
    "UnsupportedModuleError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "ModelMismatchError",
    "ModelLoadError",
    "DataError",
    "TrainingError",
    "TrainingInterrupted",
]


def train(
    config: RunConfig | str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter as a run config says: what ``lorakit train`` runs.

    The same call as :func:`lorakit.train.loop.train`, which documents it in full
    (multi-process under torchrun, checkpoints, Ctrl-C); imported on first call.

    Args:
        config: A :class:`lorakit.train.config.RunConfig`, or the path of a YAML run config.
        overrides: ``section.key=value`` strings applied to a YAML config.
        resume: Continue from the latest checkpoint in ``output.dir``.
        device: Training device; default ``cuda:LOCAL_RANK`` if CUDA is available, else CPU.

    Returns:
        A :class:`lorakit.train.report.TrainResult`.

    Raises:
        ConfigError, DataError, ModelLoadError, TrainingError, TrainingInterrupted: as
            :func:`lorakit.train.loop.train`.
    """
    from .train.loop import train as run_training

    return run_training(config, overrides=overrides, resume=resume, device=device)
