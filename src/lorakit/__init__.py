"""lorakit: LoRA adapters for PyTorch models, fast on CPU and GPU, in PEFT's format.

Public API (everything is re-exported here; nothing else lives in this file)::

    model = lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    lorakit.print_trainable_parameters(model)
    lorakit.save_adapter(model, "out/adapter")
    model = lorakit.merge_and_unload(model)
"""

from .adapters import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    for_inference,
    for_training,
    list_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    unload,
    unmerge,
)
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
from .inject import inject, print_trainable_parameters, trainable_parameters
from .io import load_adapter, save_adapter
from . import train  # callable: lorakit.train(config) runs lorakit.train.loop.train

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
    "save_adapter",
    "load_adapter",
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
