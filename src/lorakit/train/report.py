"""What a training run tells people: metrics log, loss plot, model card, progress, summary, result.

Everything here is written by rank 0 only; :mod:`lorakit.train.loop` decides when.
The :class:`TrainResult` that ``train()`` returns comes back on every rank.

``metrics.jsonl`` holds one JSON object per line, flushed as it is written:

* train rows: ``{"step", "loss", "lr", "tokens", "elapsed_s"}``: ``loss`` is the mean
  token loss over the steps since the previous row (``log_every``), ``lr`` the learning
  rate of the row's step, ``tokens`` the input tokens (padding excluded) trained on so
  far by all processes, ``elapsed_s`` the training time so far (resumed runs continue it);
* eval rows: ``{"step", "eval_loss"}``: mean token loss over the eval set.

A ``method: dpo`` run's loss is the mean DPO loss per pair, and its rows add TRL's metrics
(means over the pairs since the previous row): ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; its eval
rows add the same with an ``eval_`` prefix. ``loss.png`` then gains a reward-margin panel.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.files import write_file_atomic

__all__ = [
    "TrainResult",
    "MetricsLogger",
    "read_metrics",
    "plot_loss",
    "write_model_card",
    "progress_bar",
    "peak_memory_bytes",
    "format_summary",
]


class MetricsLogger:
    """Appends metric rows to ``metrics.jsonl``, one JSON object per line, flushed each write.

    Args:
        path: The ``metrics.jsonl`` file (created if missing).
        keep_until_step: On resume, the checkpoint's step: rows of later steps (written
            after that checkpoint, before the interruption) are dropped first, so the
            file reads as one uninterrupted run. ``None`` starts a new file.
    """

    def __init__(self, path: str | os.PathLike[str], keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        if keep_until_step is None:
            write_file_atomic(self.path, b"")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_until_step]
            write_file_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to disk."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` rows; a missing file or a torn last line yields what is readable.

    Args:
        path: The ``metrics.jsonl`` file.

    Returns:
        The rows in file order.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
    return rows


def plot_loss(metrics_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> Path:
    """Plot train and eval loss against step into a PNG (matplotlib Agg, written atomically).

    Args:
        metrics_path: A ``metrics.jsonl`` file.
        png_path: The PNG to write.

    Returns:
        ``png_path`` as a Path.
    """
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, thread-safe

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    margins = [(r["step"], r["rewards/margins"]) for r in rows if "rewards/margins" in r]
    eval_margins = [(r["step"], r["eval_rewards/margins"]) for r in rows if "eval_rewards/margins" in r]
    fig = Figure(figsize=(6, 6.5 if margins else 4), dpi=100)
    ax = fig.add_subplot(2, 1, 1) if margins else fig.add_subplot()
    if margins:  # DPO: the reward margin (chosen − rejected) is what the preference looks like
        mx = fig.add_subplot(2, 1, 2, sharex=ax)
        mx.plot(*zip(*margins), label="train reward margin", linewidth=1.2, color="tab:green")
        if eval_margins:
            mx.plot(*zip(*eval_margins), "o-", label="eval reward margin", linewidth=1.2, markersize=4)
        mx.axhline(0.0, color="grey", linewidth=0.8)
        mx.set_xlabel("step")
        mx.set_ylabel("rewards/margins")
        mx.grid(alpha=0.3)
        mx.legend()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per pair)" if margins else "loss (mean per token)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png_path = Path(png_path)
    write_file_atomic(png_path, buf.getvalue())
    return png_path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_model_card(
    path: str | os.PathLike[str],
    *,
    base_model: str,
    data: Iterable[tuple[str, str, int]],
    lora: dict[str, Any],
    train: dict[str, Any],
    precision: str,
    precision_reason: str,
    steps: int,
    train_loss: float | None,
    eval_loss: float | None,
    trainable_params: int,
    total_params: int,
    method: dict[str, Any] | None = None,
) -> Path:
    """Write the run's ``README.md`` model card (atomically).

    Args:
        path: The README.md file.
        base_model: The base model's path or name (as in ``adapter_config.json``).
        data: ``(role, file, rows)`` for each data source (``role`` is "train" / "eval").
        lora: The LoRA hyper-parameters (LoraConfig fields as set in the config).
        train: The ``train`` section of the run config.
        precision: ``"fp32"`` or ``"bf16"``.
        precision_reason: Why that precision was chosen.
        steps: Optimizer steps trained.
        train_loss: Final train loss (mean per token), or None.
        eval_loss: Final eval loss, or None.
        trainable_params: Trainable (adapter) parameter count.
        total_params: All parameters of the injected model.
        method: For a run other than SFT, its method and settings (e.g. ``{"method": "dpo", "beta": 0.1}``).

    Returns:
        The README path.
    """
    path = Path(path)
    method_lines = "".join(f"\n- `{k}`: `{v!r}`" for k, v in (method or {}).items())
    pct = 100 * trainable_params / total_params if total_params else 0.0
    data_lines = "\n".join(f"- {role}: `{file}` ({rows:,d} examples)" for role, file, rows in data)
    lora_lines = "\n".join(f"- `{k}`: `{v!r}`" for k, v in lora.items()) or "- (lorakit defaults)"
    train_lines = "\n".join(f"- `{k}`: `{v!r}`" for k, v in train.items())
    text = f"""# LoRA adapter trained with lorakit

Base model: `{base_model}`

This folder is a PEFT-format LoRA adapter (`adapter_config.json` +
`adapter_model.safetensors`). `lorakit.yaml` is the exact run config,
`metrics.jsonl` / `loss.png` the training curves, `checkpoints/` the resumable state.

## Data
{data_lines}

## LoRA
{lora_lines}
- trainable parameters: {trainable_params:,d} of {total_params:,d} ({pct:.4f}%)

## Training
{train_lines}{method_lines}
- precision: **{precision}** ({precision_reason})
- steps trained: {steps}

## Results
- final train loss: {_fmt(train_loss)}
- final eval loss: {_fmt(eval_loss)}

## Use it

With lorakit:

```python
import lorakit
from lorakit.models import load_model

model, tokenizer = load_model({base_model!r})
lorakit.load_adapter(model, {str(path.parent)!r})
```

With PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({base_model!r})
tokenizer = AutoTokenizer.from_pretrained({base_model!r})
model = PeftModel.from_pretrained(base, {str(path.parent)!r})
```
"""
    write_file_atomic(path, text.encode("utf-8"))
    return path


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar over optimizer steps (on stderr; off when not a TTY, or when not enabled).

    Args:
        total: Steps of the whole run.
        initial: Steps already done (resume).
        enabled: False on ranks other than 0.

    Returns:
        A tqdm instance; set its postfix with loss / lr / tokens/s, ``update(1)`` per step.
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        disable=None if enabled else True,
        file=sys.stderr,
    )


def log_progress(
    say: Any, step: int, total: int, loss: float, lr: float, tokens_per_s: float, elapsed_s: float, steps_done: int
) -> None:
    """Print one progress line about every 10% of the run (used when no progress bar shows).

    Args:
        say: the print function (rank 0's).
        step, total: steps done / of the run.
        loss, lr, tokens_per_s: the latest values.
        elapsed_s, steps_done: time and steps of this process's share, for the ETA.
    """
    every = max(1, total // 10)
    if step % every and step != total:
        return
    eta = elapsed_s / max(steps_done, 1) * (total - step)
    say(
        f"step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
        f"ETA {int(eta // 60)}:{int(eta % 60):02d}"
    )


def peak_memory_bytes(device_type: str) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, else peak RSS.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.

    Returns:
        Bytes.
    """
    if device_type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


@dataclass
class TrainResult:
    """What :func:`lorakit.train.loop.train` did.

    Attributes:
        run_dir: The run directory (final adapter at its root).
        steps: Optimizer steps done in total (including those before a resume).
        train_loss: Mean token loss of the last step.
        eval_loss: Mean token loss on the eval set at the end, or None without eval data.
        trainable_params: Trainable (adapter) parameters.
        elapsed_s: Training time in seconds (model loading excluded; resumed runs add up).
        peak_memory_bytes: Peak RSS on CPU, peak allocated CUDA memory on GPU (rank 0).
        tokens: Input tokens trained on (padding excluded, all processes).
        precision: ``"fp32"`` or ``"bf16"``.
        precision_reason: Why that precision was chosen.
    """

    run_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    trainable_params: int
    elapsed_s: float
    peak_memory_bytes: int
    tokens: int
    precision: str
    precision_reason: str


def format_summary(
    *,
    run_dir: Path,
    steps: int,
    elapsed_s: float,
    tokens: int,
    trainable_params: int,
    total_params: int,
    peak_memory: int,
    device_type: str,
    precision: str,
    train_loss: float | None,
    eval_loss: float | None,
) -> str:
    """The end-of-run summary printed by rank 0.

    Returns:
        A few lines of text (no trailing newline).
    """
    pct = 100 * trainable_params / total_params if total_params else 0.0
    memory = "peak GPU memory" if device_type == "cuda" else "peak RSS"
    rate = tokens / elapsed_s if elapsed_s > 0 else 0.0
    return "\n".join(
        [
            f"trainable params: {trainable_params:,d} || all params: {total_params:,d} || trainable%: {pct:.4f}",
            f"trained {steps} steps in {elapsed_s:.1f} s ({rate:,.0f} tokens/s, {precision}), "
            f"{memory} {peak_memory / 2**20:,.0f} MiB",
            f"final train loss {_fmt(train_loss)}, eval loss {_fmt(eval_loss)}",
            f"wrote {run_dir}: adapter (adapter_config.json, adapter_model.safetensors), README.md, "
            "lorakit.yaml, metrics.jsonl, loss.png, checkpoints/",
        ]
    )
