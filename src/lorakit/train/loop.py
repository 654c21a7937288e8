"""lorakit's training loop: ``train(config) -> TrainResult``.

One optimizer step, in order::

    global batch    make_batches(examples, batch_size * grad_accum * world, seed, epoch)[index]
    shard           cut into micro-batches of batch_size rows; rank k takes micro-batches k::world
    forward         per micro-batch: loss_sum, n_tokens = _forward_loss(model, batch); loss_sum.backward()
    all-reduce      one flat buffer per step: [adapter grads..., loss_sum, n_tokens, input tokens] (SUM)
    normalise       grads /= n_tokens of the global batch   (exact under grad_accum and any world size)
    update          NaN check -> clip (max_grad_norm) -> AdamW -> LambdaLR

The data position is a pure function of (seed, step): ``epoch, index = divmod(step,
batches per epoch)``, and the random state of each step (LoRA dropout) is reseeded from
(seed, step, rank), so a resumed run repeats an uninterrupted one bit for bit.

Run directory (``output.dir``), written by rank 0 only::

    adapter_config.json, adapter_model.safetensors   the final adapter (PEFT loads it as is)
    lorakit.yaml                                       the resolved run config
    metrics.jsonl, loss.png, README.md                 see lorakit.train.report
    checkpoints/step-000050/                           adapter + trainer_state.pt; the last 2 kept

Stopping early. A NaN/Inf loss or gradient norm raises :class:`TrainingError` before the
bad update is applied; no checkpoint of it is written. Ctrl-C (``KeyboardInterrupt``)
writes a checkpoint of the last completed step and raises :class:`TrainingInterrupted`
(a ``TrainingError``; the CLI prints its message and exits with 130); ``train(...,
resume=True)`` goes on from there.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, ModelMismatchError, TrainingError, TrainingInterrupted
from lorakit.inject import inject, trainable_parameters
from lorakit.layers import fuse_swiglu_mlps
from lorakit.io import adapter_state_dict, read_adapter, save_adapter, write_dir_atomic
from lorakit.train import report
from lorakit.train.batching import collate, make_batches, pack_examples, split_eval
from lorakit.train.config import RunConfig, dump_run_config, load_run_config
from lorakit.train.data import load_examples
from lorakit.train.fast import causal_lm_loss

__all__ = ["TrainResult", "TrainingInterrupted", "train", "resolve_precision", "lr_factor", "latest_checkpoint"]

_KEEP_CHECKPOINTS = 2
_STATE_FILE = "trainer_state.pt"
_CPUINFO = Path("/proc/cpuinfo")
# Keys that may change between a run and its resume; any other change breaks the data position.
_RESUMABLE_CHANGES = {"train.steps", "train.epochs", "train.eval_every", "train.save_every", "train.log_every"}


@dataclass
class TrainResult:
    """What :func:`train` did.

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


# --------------------------------------------------------------------------- public helpers


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """Choose fp32 or bf16 for ``train.precision``.

    ``auto`` picks bf16 on a CUDA GPU with bf16 support, and on a CPU whose
    ``/proc/cpuinfo`` flags include ``amx_bf16`` or ``avx512_bf16``; else fp32.

    Args:
        requested: ``"auto"``, ``"fp32"`` or ``"bf16"``.
        device: The training device.

    Returns:
        ``(precision, reason)``.

    Raises:
        ConfigError: bf16 asked for on a GPU without bf16 support.
    """
    if requested == "fp32":
        return "fp32", "train.precision is fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        supported = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not supported:
            raise ConfigError(f"train.precision is bf16, but {name} has no bf16 support; set train.precision: fp32.")
        if requested == "bf16":
            return "bf16", "train.precision is bf16"
        return ("bf16", f"auto: {name} supports bf16") if supported else ("fp32", f"auto: {name} has no bf16")
    try:
        flags = set(_CPUINFO.read_text().split())
    except OSError:
        flags = None
    fast = flags is not None and ("amx_bf16" in flags or "avx512_bf16" in flags)
    if requested == "bf16":
        return "bf16", "train.precision is bf16" + ("" if fast else " (this CPU has no AMX/AVX512-BF16: slow)")
    if device.type != "cpu":
        return "fp32", f"auto: bf16 is chosen only on CUDA and on CPUs with AMX/AVX512-BF16, not on {device.type}"
    if flags is None:
        return "fp32", "auto: no /proc/cpuinfo to look for AMX/AVX512-BF16"
    if fast:
        which = "AMX (amx_bf16)" if "amx_bf16" in flags else "AVX512-BF16 (avx512_bf16)"
        return "bf16", f"auto: the CPU has {which}"
    return "fp32", "auto: the CPU has neither AMX nor AVX512-BF16 (no amx_bf16/avx512_bf16 flag)"


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate multiplier of (0-based) optimizer step ``step``.

    Warmup: ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``. After it,
    with ``p = (step - warmup_steps) / max(1, total_steps - warmup_steps)``:
    constant ``1``, linear ``1 - p``, cosine ``(1 + cos(pi * p)) / 2``.

    Args:
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        step: Optimizer steps done before this one.
        total_steps: Steps of the run.
        warmup_steps: Linear warmup steps.

    Returns:
        The multiplier of ``train.lr``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - p
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0


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


# --------------------------------------------------------------------------- the loss


def _forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label tokens, in fp32; and their count.

    The head and the loss run only at labelled positions (see
    :func:`lorakit.train.fast.causal_lm_loss`), equal to the full-logits loss.

    Args:
        model: A causal LM.
        batch: ``input_ids`` / ``labels`` (B, T) plus ``attention_mask`` or ``position_ids``.

    Returns:
        ``(loss_sum, n_tokens)``: a 0-d fp32 tensor (differentiable) and the number of
        label tokens (labels != -100 after the shift) it sums over.
    """
    return causal_lm_loss(model, batch)


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def _setup_distributed(device: str | torch.device | None) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return _Dist(rank, world, dev, owns)


# --------------------------------------------------------------------------- train


def train(
    config: RunConfig | str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter as a run config says; multi-process under torchrun.

    Args:
        config: A :class:`RunConfig`, or the path of a YAML run config.
        overrides: ``section.key=value`` strings applied to a YAML config.
        resume: Continue from the latest checkpoint in ``output.dir``.
        device: Training device; default ``cuda:LOCAL_RANK`` if CUDA is available, else CPU.

    Returns:
        A :class:`TrainResult` (on every rank; only rank 0 writes files).

    Raises:
        ConfigError: bad config; ``output.dir`` already holds a run and ``resume`` is
            False; ``resume`` without a checkpoint, or with a config that changes the
            data order or the model.
        DataError, ModelLoadError: from loading data and model.
        TrainingError: the loss or the gradient norm became NaN/Inf.
        TrainingInterrupted: Ctrl-C; the last completed step was checkpointed.
    """
    if isinstance(config, RunConfig):
        if overrides:
            raise ConfigError("overrides apply to a YAML config path; set the fields on the RunConfig instead.")
        cfg = config
    else:
        cfg = load_run_config(config, overrides)
    ctx = _setup_distributed(device)
    try:
        return _Run(cfg, ctx, resume).run()
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    """One training run: set up in __init__, the loop in run()."""

    def __init__(self, cfg: RunConfig, ctx: _Dist, resume: bool) -> None:
        from lorakit.models import load_model

        self.cfg, self.ctx, t = cfg, ctx, cfg.train
        self.say = print if ctx.main else (lambda *a, **k: None)
        self.run_dir = Path(cfg.output.dir)
        checkpoint = self._check_run_dir(resume)
        self.precision, self.precision_reason = resolve_precision(t.precision, ctx.device)
        bf16 = self.precision == "bf16"
        self.autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16 else nullcontext())

        try:  # bad values fail before the model loads
            lora_config = LoraConfig(**{"task_type": "CAUSAL_LM", **cfg.lora})
        except ConfigError as exc:
            raise ConfigError(f"lora section of the run config: {exc}") from None
        # Model: base weights in the compute dtype first, then LoRA params (fp32) on top.
        torch.manual_seed(t.seed)
        model, tokenizer = load_model(cfg.model, dtype=torch.bfloat16 if bf16 else torch.float32, device=ctx.device)
        model.config.use_cache = False  # with a cache, packed rows get no block-diagonal mask
        self.model = inject(model, lora_config)
        fuse_swiglu_mlps(model)  # Llama-style MLPs: one fused op, activation recomputed in backward
        if t.gradient_checkpointing:  # non-reentrant: no need for enable_input_require_grads
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        self.pad_id = tokenizer.pad_token_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable, self.total_params = trainable_parameters(model)

        self._load_data(tokenizer)
        self.global_batch = t.batch_size * t.grad_accum * ctx.world
        self.batches_per_epoch = math.ceil(len(self.train_rows) / self.global_batch)
        self.total_steps = t.steps if t.epochs is None else t.epochs * self.batches_per_epoch
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(t.schedule, s, self.total_steps, t.warmup_steps))
        self.fingerprint = self._fingerprint()
        self.step, self.elapsed_before, self.tokens = 0, 0.0, 0
        self.train_loss: float | None = None
        self.eval_loss: float | None = None
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ setup helpers

    def _check_run_dir(self, resume: bool) -> Path | None:
        existing = latest_checkpoint(self.run_dir)
        if resume and existing is None:
            raise ConfigError(f"cannot resume: {self.run_dir} has no checkpoint (checkpoints/step-*); "
                              "start the run without --resume.")
        if not resume and (existing is not None or (self.run_dir / "adapter_model.safetensors").exists()):
            raise ConfigError(f"output.dir {self.run_dir} already holds a run; continue it with --resume, "
                              "or choose another output.dir (or delete that folder).")
        return existing

    def _load_data(self, tokenizer: Any) -> None:
        d, seed = self.cfg.data, self.cfg.train.seed
        kw = dict(format=d.format, max_seq_len=d.max_seq_len, train_on_prompt=d.train_on_prompt, on_error=d.on_error)
        train_rows, stats = load_examples(d.train, tokenizer, **kw)
        self.say(f"data: {d.train}: {stats.rows:,d} examples ({stats.skipped} skipped, {stats.truncated} truncated "
                 f"to {d.max_seq_len} tokens), {stats.tokens:,d} tokens, {stats.label_tokens:,d} with loss")
        eval_rows: list[dict[str, Any]] = []
        self.data_card = [("train", str(d.train), 0)]
        if d.eval is not None:
            eval_rows, estats = load_examples(d.eval, tokenizer, **kw)
            self.say(f"data: {d.eval}: {estats.rows:,d} eval examples ({estats.skipped} skipped, "
                     f"{estats.truncated} truncated), {estats.tokens:,d} tokens")
            self.data_card.append(("eval", str(d.eval), len(eval_rows)))
        elif d.eval_fraction > 0:
            train_rows, eval_rows = split_eval(train_rows, d.eval_fraction, seed)
            self.say(f"data: held out {len(eval_rows)} of them for eval (data.eval_fraction={d.eval_fraction})")
            self.data_card.append(("eval", f"{d.train} (held out, fraction {d.eval_fraction})", len(eval_rows)))
        self.data_card[0] = ("train", str(d.train), len(train_rows))
        if d.packing:
            n = len(train_rows)
            train_rows = pack_examples(train_rows, d.max_seq_len)
            eval_rows = pack_examples(eval_rows, d.max_seq_len) if eval_rows else []
            self.say(f"data: packed {n:,d} examples into {len(train_rows):,d} rows of <= {d.max_seq_len} tokens")
        self.train_rows, self.eval_rows = train_rows, eval_rows
        bs = self.cfg.train.batch_size
        self.eval_batches = make_batches(eval_rows, bs, seed, 0, shuffle=False) if eval_rows else []

    def _fingerprint(self) -> str:
        flat = {f"{s}.{k}": v for s, sec in self.cfg.to_yaml_dict().items() if isinstance(sec, dict)
                for k, v in sec.items() if s != "output"}
        flat = {k: v for k, v in flat.items() if k not in _RESUMABLE_CHANGES}
        flat.update({"model": self.cfg.model, "world_size": self.ctx.world, "precision (resolved)": self.precision})
        return json.dumps(flat, sort_keys=True, default=str)

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        ctx, t = self.ctx, self.cfg.train
        logger = bar = None
        if ctx.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_run_config(self.cfg, self.run_dir / "lorakit.yaml")
            logger = report.MetricsLogger(self.run_dir / "metrics.jsonl", self.step if self.step else None)
            self.say(f"training {self.total_steps} steps (global batch {self.global_batch} rows, "
                     f"{ctx.world} process(es), {self.precision}: {self.precision_reason}) on {ctx.device}"
                     + (f", resuming after step {self.step}" if self.step else ""))
            bar = report.progress_bar(self.total_steps, self.step, enabled=True)
        self.saved_step = self.step if self.step else None
        self.start_step = self.step
        consistent = True  # False while params and optimizer state are half-updated
        t0 = time.perf_counter()
        window = [0.0, 0]  # loss sum, label tokens since the last metrics row
        try:
            batches, batches_epoch = None, -1
            while self.step < self.total_steps:
                epoch, index = divmod(self.step, self.batches_per_epoch)
                if epoch != batches_epoch:
                    batches, batches_epoch = make_batches(self.train_rows, self.global_batch, t.seed, epoch), epoch
                torch.manual_seed(_step_seed(t.seed, self.step, ctx.rank))  # dropout: a function of (seed, step)
                loss_sum, n_label, n_tok = self._accumulate(batches[index])
                loss = loss_sum / max(n_label, 1)
                if not math.isfinite(loss):
                    raise self._diverged("loss", loss)
                lr = self.optimizer.param_groups[0]["lr"]
                consistent = False
                if t.max_grad_norm is not None:
                    norm = float(torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm))
                    if not math.isfinite(norm):
                        raise self._diverged("gradient norm", norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                consistent = True
                self.tokens += n_tok
                self.train_loss = loss
                window[0] += loss_sum
                window[1] += n_label
                elapsed = self.elapsed_before + time.perf_counter() - t0
                last = self.step == self.total_steps
                if ctx.main and (self.step % t.log_every == 0 or last):
                    logger.log({"step": self.step, "loss": window[0] / max(window[1], 1), "lr": lr,
                                "tokens": self.tokens, "elapsed_s": round(elapsed, 3)})
                    window = [0.0, 0]
                if bar is not None:
                    rate = self.tokens / max(elapsed, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                    bar.update(1)
                    if bar.disable:  # not a terminal (CI logs, pipes): a plain line every ~10% instead
                        report.log_progress(self.say, self.step, self.total_steps, loss, lr, rate,
                                            elapsed - self.elapsed_before, self.step - self.start_step)
                if self.eval_batches and t.eval_every and (self.step % t.eval_every == 0 or last):
                    self.eval_loss = self._evaluate()
                    if ctx.main:
                        logger.log({"step": self.step, "eval_loss": self.eval_loss})
                if ctx.main and ((t.save_every and self.step % t.save_every == 0) or last):
                    self._save_checkpoint(self.elapsed_before + time.perf_counter() - t0)
        except KeyboardInterrupt:
            raise self._interrupted(consistent, self.elapsed_before + time.perf_counter() - t0) from None
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
        elapsed = self.elapsed_before + time.perf_counter() - t0
        result = TrainResult(self.run_dir, self.step, self.train_loss, self.eval_loss, self.trainable, elapsed,
                             report.peak_memory_bytes(ctx.device.type), self.tokens, self.precision,
                             self.precision_reason)
        if ctx.main:
            self._finish(result)
        if ctx.world > 1:
            dist.barrier()
        return result

    def _accumulate(self, global_batch: list[int]) -> tuple[float, int, int]:
        """Forward + backward this rank's micro-batches; all-reduce; grads /= global label tokens."""
        ctx, bs = self.ctx, self.cfg.train.batch_size
        micro = [global_batch[i : i + bs] for i in range(0, len(global_batch), bs)][ctx.rank :: ctx.world]
        stats = torch.zeros(3, dtype=torch.float32, device=ctx.device)  # loss sum, label tokens, input tokens
        for rows in micro:
            cpu_batch = collate([self.train_rows[i] for i in rows], self.pad_id, pad_to_multiple_of=8)
            with self.autocast:
                loss_sum, n_tokens = _forward_loss(self.model, self._to_device(cpu_batch))
            loss_sum.backward()
            stats[0] += loss_sum.detach().float()
            stats[1:] += stats.new_tensor([n_tokens, _input_tokens(cpu_batch)])
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
                 for p in self.params]
        flat = ctx.all_reduce(torch.cat([*[g.float() for g in grads], stats]))  # one all-reduce per step
        loss_sum, n_label, n_tok = flat[-3:].tolist()
        offset = 0
        for p in self.params:
            p.grad = (flat[offset : offset + p.numel()].view_as(p) / max(n_label, 1)).to(p.dtype)
            offset += p.numel()
        return loss_sum, int(n_label), int(n_tok)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    def _evaluate(self) -> float:
        """Mean token loss over the eval set (sharded across ranks), without grad."""
        ctx = self.ctx
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        with torch.no_grad():
            for rows in self.eval_batches[ctx.rank :: ctx.world]:
                batch = self._to_device(collate([self.eval_rows[i] for i in rows], self.pad_id, pad_to_multiple_of=8))
                with self.autocast:
                    loss_sum, n_tokens = _forward_loss(self.model, batch)
                total += torch.stack([loss_sum.double(), total.new_tensor(n_tokens)])
        self.model.train()
        loss_sum, n = ctx.all_reduce(total).tolist()
        return loss_sum / max(n, 1)

    # ------------------------------------------------------------------ stopping

    def _diverged(self, what: str, value: float) -> TrainingError:
        good = latest_checkpoint(self.run_dir)
        where = str(good) if good else "none (no checkpoint was saved yet)"
        return TrainingError(f"{what} became {value} at step {self.step + 1}; the last good checkpoint is {where}; "
                             "lower train.lr or check the data")

    def _interrupted(self, consistent: bool, elapsed: float) -> TrainingInterrupted:
        path = latest_checkpoint(self.run_dir)
        if consistent and self.step > 0 and self.ctx.main and self.saved_step != self.step:
            self.model.train()
            path = self._save_checkpoint(elapsed)
        how = f"continue with `lorakit train {self.run_dir / 'lorakit.yaml'} --resume`"
        if path is None:
            return TrainingInterrupted(f"training interrupted at step {self.step}; no checkpoint was saved, "
                                       "so there is nothing to resume.", self.step, None)
        return TrainingInterrupted(f"training interrupted after step {self.step}; checkpoint saved in {path}; {how}.",
                                   self.step, path)

    # ------------------------------------------------------------------ checkpoints and outputs

    def _save_checkpoint(self, elapsed: float) -> Path:
        root = self.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        state = {
            "step": self.step, "epoch": self.step // self.batches_per_epoch,
            "batch_index": self.step % self.batches_per_epoch, "world_size": self.ctx.world,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(), "fingerprint": self.fingerprint,
            "metrics": {"train_loss": self.train_loss, "eval_loss": self.eval_loss, "tokens": self.tokens,
                        "elapsed_s": elapsed},
        }

        def write(tmp: Path) -> None:
            save_adapter(self.model, tmp)
            torch.save(state, tmp / _STATE_FILE)

        write_dir_atomic(final, write)
        for _, old_dir in sorted(_checkpoints(root))[:-_KEEP_CHECKPOINTS]:
            shutil.rmtree(old_dir, ignore_errors=True)
        self.saved_step = self.step
        return final

    def _load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / _STATE_FILE, map_location="cpu", weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            old, new = json.loads(state["fingerprint"]), json.loads(self.fingerprint)
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                    if old.get(k) != new.get(k)]
            raise ConfigError(f"cannot resume from {path}: the config changed in ways that change the model or the "
                              f"data order ({'; '.join(diff)}); only {', '.join(sorted(_RESUMABLE_CHANGES))} may "
                              "change. Restore those values or start a new run.")
        _, tensors = read_adapter(path)
        current = adapter_state_dict(self.model)
        if tensors.keys() != current.keys():
            raise ModelMismatchError(f"checkpoint {path} holds adapter tensors that do not match the injected model; "
                                     "was it written by another config?")
        with torch.no_grad():
            for key, value in current.items():
                value.copy_(tensors[key])  # detached views share storage with the LoRA params
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        m = state["metrics"]
        self.step, self.tokens, self.elapsed_before = state["step"], m["tokens"], m["elapsed_s"]
        self.train_loss, self.eval_loss = m["train_loss"], m["eval_loss"]
        if self.step >= self.total_steps:
            self.say(f"checkpoint {path} is at step {self.step}, the run has {self.total_steps} steps: nothing to do")

    def _finish(self, result: TrainResult) -> None:
        """Final adapter at the root, loss plot, model card, summary (rank 0)."""
        report.plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        save_adapter(self.model, self.run_dir)  # replaces only the adapter files, config last
        base = getattr(self.model.config, "_name_or_path", None) or str(self.cfg.model)
        report.write_model_card(
            self.run_dir / "README.md", base_model=base, data=self.data_card, lora=dict(self.cfg.lora),
            train=self.cfg.train.model_dump(mode="json"), precision=self.precision,
            precision_reason=self.precision_reason, steps=result.steps, train_loss=result.train_loss,
            eval_loss=result.eval_loss, trainable_params=self.trainable, total_params=self.total_params)
        self.say(report.format_summary(
            run_dir=self.run_dir, steps=result.steps, elapsed_s=result.elapsed_s, tokens=result.tokens,
            trainable_params=self.trainable, total_params=self.total_params, peak_memory=result.peak_memory_bytes,
            device_type=self.ctx.device.type, precision=self.precision, train_loss=result.train_loss,
            eval_loss=result.eval_loss), flush=True)


# --------------------------------------------------------------------------- small helpers


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank) % 2**63


def _input_tokens(batch: dict[str, torch.Tensor]) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())  # packed rows: padding is not told apart; close enough for tokens/s


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and primitives (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
