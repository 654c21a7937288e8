"""Checkpoints of a training run, and resuming from them.

A checkpoint is a folder in the run directory, written by rank 0 only::

    checkpoints/step-000050/
        adapter_config.json, adapter_model.safetensors   the adapter after that step (PEFT format)
        trainer_state.pt                                   step, data position, optimizer, scheduler,
                                                           RNG states, config fingerprint, metrics

Each is written to a temporary folder and renamed into place, so a folder with a
``trainer_state.pt`` is complete; the last 2 are kept. Resuming checks the config
fingerprint (every run-config value but ``output.*`` and the keys a resume may change,
plus the model, world size and resolved precision), then restores the adapter weights,
the optimizer and scheduler state and the RNG states. The trainer state holds only
tensors and primitives, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import ConfigError, ModelMismatchError
from lorakit.files import write_dir_atomic
from lorakit.io import adapter_state_dict, read_adapter, save_adapter
from lorakit.train.config import RunConfig

__all__ = ["latest_checkpoint", "check_run_dir", "run_fingerprint", "save_checkpoint", "load_checkpoint"]

_KEEP_CHECKPOINTS = 2
_STATE_FILE = "trainer_state.pt"
# Keys that may change between a run and its resume; any other change breaks the data position.
_RESUMABLE_CHANGES = {"train.steps", "train.epochs", "train.eval_every", "train.save_every", "train.log_every"}


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run (``checkpoints/step-*`` with a trainer state).

    Args:
        run_dir: The run directory.

    Returns:
        The checkpoint directory, or None if there is none.
    """
    found = sorted(_checkpoints(Path(run_dir) / "checkpoints"))
    return found[-1][1] if found else None


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for d in root.glob("step-*"):
        suffix = d.name.removeprefix("step-")
        if suffix.isdigit() and (d / _STATE_FILE).is_file():
            out.append((int(suffix), d))
    return out


def check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """Check that ``run_dir`` suits a new run or a resume; find the checkpoint to resume from.

    Args:
        run_dir: The run directory (``output.dir``).
        resume: Whether the run continues from its latest checkpoint.

    Returns:
        The latest checkpoint, or None if there is none (then ``resume`` is False).

    Raises:
        ConfigError: ``resume`` without a checkpoint; or not ``resume`` and ``run_dir``
            already holds a checkpoint or an adapter.
    """
    existing = latest_checkpoint(run_dir)
    if resume and existing is None:
        raise ConfigError(
            f"cannot resume: {run_dir} has no checkpoint (checkpoints/step-*); start the run without --resume."
        )
    if not resume and (existing is not None or (run_dir / "adapter_model.safetensors").exists()):
        raise ConfigError(
            f"output.dir {run_dir} already holds a run; continue it with --resume, "
            "or choose another output.dir (or delete that folder)."
        )
    return existing


def run_fingerprint(cfg: RunConfig, world_size: int, precision: str) -> str:
    """The values a resume must not change, as JSON with sorted keys.

    Args:
        cfg: The run config; its ``output`` section and the resumable ``train`` keys
            (steps, epochs, eval_every, save_every, log_every) are left out.
        world_size: Number of processes.
        precision: The resolved precision (``"fp32"`` or ``"bf16"``).

    Returns:
        The fingerprint stored in (and compared with) ``trainer_state.pt``.
    """
    flat = {
        f"{s}.{k}": v
        for s, sec in cfg.to_yaml_dict().items()
        if isinstance(sec, dict)
        for k, v in sec.items()
        if s != "output"
    }
    flat = {k: v for k, v in flat.items() if k not in _RESUMABLE_CHANGES}
    flat.update({"model": cfg.model, "world_size": world_size, "precision (resolved)": precision})
    if cfg.method == "sft":  # the DPO keys left out: SFT fingerprints stay as they were, older runs still resume
        flat = {k: v for k, v in flat.items() if not k.startswith("dpo.") and k != "data.max_prompt_len"}
    else:
        flat.update({"method": cfg.method, "adapter": cfg.adapter})
    return json.dumps(flat, sort_keys=True, default=str)


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    step: int,
    batches_per_epoch: int,
    world_size: int,
    fingerprint: str,
    metrics: dict[str, Any],
) -> Path:
    """Write ``checkpoints/step-{step:06d}`` atomically; delete all but the newest 2.

    Args:
        run_dir: The run directory.
        model: The injected model (its adapters are saved in PEFT format).
        optimizer: The optimizer, saved with its state.
        scheduler: The learning-rate scheduler.
        step: Optimizer steps done.
        batches_per_epoch: Global batches per epoch (for the data position).
        world_size: Number of processes.
        fingerprint: From :func:`run_fingerprint`.
        metrics: ``train_loss``, ``eval_loss``, ``tokens`` and ``elapsed_s`` so far.

    Returns:
        The checkpoint directory.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    state = {
        "step": step,
        "epoch": step // batches_per_epoch,
        "batch_index": step % batches_per_epoch,
        "world_size": world_size,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "fingerprint": fingerprint,
        "metrics": metrics,
    }

    def write(tmp: Path) -> None:
        save_adapter(model, tmp)
        torch.save(state, tmp / _STATE_FILE)

    write_dir_atomic(final, write)
    for _, old_dir in sorted(_checkpoints(root))[:-_KEEP_CHECKPOINTS]:
        shutil.rmtree(old_dir, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: str,
) -> tuple[int, dict[str, Any]]:
    """Restore adapter weights, optimizer, scheduler and RNG states from a checkpoint.

    Args:
        path: The checkpoint directory.
        model: The injected model; its adapter tensors are overwritten in place.
        optimizer: Gets the saved optimizer state.
        scheduler: Gets the saved scheduler state.
        fingerprint: This run's :func:`run_fingerprint`; must equal the saved one.

    Returns:
        ``(step, metrics)``: the optimizer steps done, and the saved ``train_loss``,
        ``eval_loss``, ``tokens`` and ``elapsed_s``.

    Raises:
        ConfigError: the config changed in a way a resume does not allow (the message
            lists the changed keys).
        ModelMismatchError: the checkpoint's adapter tensors do not match the model.
    """
    state = torch.load(path / _STATE_FILE, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        old, new = json.loads(state["fingerprint"]), json.loads(fingerprint)
        diff = [
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)
        ]
        raise ConfigError(
            f"cannot resume from {path}: the config changed in ways that change the model or the "
            f"data order ({'; '.join(diff)}); only {', '.join(sorted(_RESUMABLE_CHANGES))} may "
            "change. Restore those values or start a new run."
        )
    _, tensors = read_adapter(path)
    current = adapter_state_dict(model)
    if tensors.keys() != current.keys():
        raise ModelMismatchError(
            f"checkpoint {path} holds adapter tensors that do not match the injected model; "
            "was it written by another config?"
        )
    with torch.no_grad():
        for key, value in current.items():
            value.copy_(tensors[key])  # detached views share storage with the LoRA params
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["metrics"]


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and primitives (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
