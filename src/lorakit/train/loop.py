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
                                                       (see lorakit.train.checkpoint)

Stopping early. A NaN/Inf loss or gradient norm raises :class:`TrainingError` before the
bad update is applied; no checkpoint of it is written. Ctrl-C (``KeyboardInterrupt``)
writes a checkpoint of the last completed step and raises :class:`TrainingInterrupted`
(a ``TrainingError``; the CLI prints its message and exits with 130); ``train(...,
resume=True)`` goes on from there.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from lorakit.allocator import allocator_note
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, TrainingError, TrainingInterrupted
from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps
from lorakit.inject import trainable_parameters
from lorakit.io import save_adapter
from lorakit.memory import can_return_freed_memory, return_freed_memory, return_freed_memory_during
from lorakit.norms import route_rms_norms
from lorakit.padding_free import disable_padding_free, setup_padding_free
from lorakit.train import report
from lorakit.train.batching import make_batches
from lorakit.train.checkpoint import check_run_dir, latest_checkpoint, load_checkpoint, run_fingerprint, save_checkpoint
from lorakit.train.config import RunConfig, dump_run_config, load_run_config
from lorakit.train.device import DistContext, int8_note, quantized_base_note, resolve_precision, setup_distributed
from lorakit.train.graphs import decoder_layers, setup_graphs
from lorakit.train.lm_loss import causal_lm_loss
from lorakit.train.objective import add_adapters, check_method, load_data, make_objective
from lorakit.train.recompute import enable_checkpointing
from lorakit.train.report import TrainResult
from lorakit.train.schedule import lr_factor, make_optimizer

GRAPH_PAD = 64  # sequence-length bucket when CUDA graphs are on

__all__ = ["GRAPH_PAD", "train"]


# --------------------------------------------------------------------------- the loss


def _forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label tokens, in fp32; and their count.

    The head and the loss run only at labelled positions (see
    :func:`lorakit.train.lm_loss.causal_lm_loss`), equal to the full-logits loss.

    Args:
        model: A causal LM.
        batch: ``input_ids`` / ``labels`` (B, T) plus ``attention_mask`` or ``position_ids``.

    Returns:
        ``(loss_sum, n_tokens)``: a 0-d fp32 tensor (differentiable) and the number of
        label tokens (labels != -100 after the shift) it sums over.
    """
    return causal_lm_loss(model, batch)


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
    ctx = setup_distributed(device)
    try:
        return _Run(cfg, ctx, resume).run()
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    """One training run: set up in __init__, the loop in run()."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, resume: bool) -> None:
        from lorakit.models import ModelSpec, load_model
        from lorakit.quant_model import describe_quantization, quantization_info

        self.cfg, self.ctx, t = cfg, ctx, cfg.train
        self.say = print if ctx.main else (lambda *a, **k: None)
        self.run_dir = Path(cfg.output.dir)
        checkpoint = check_run_dir(self.run_dir, resume)
        self.precision, self.precision_reason = resolve_precision(t.precision, ctx.device)
        self.precision_reason += int8_note(self.precision, ctx.device)  # says so when int8 is faster here
        if self.precision == "int8":
            from lorakit.int8_model import check_int8_model_spec

            check_int8_model_spec(cfg.model)
        bf16 = self.precision == "bf16"
        # No autocast weight cache: base weights are stored in bf16 already, and CUDA graphs forbid it.
        self.autocast = (
            torch.autocast(ctx.device.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else nullcontext()
        )

        try:  # bad values fail before the model loads
            lora_config = LoraConfig(**{"task_type": "CAUSAL_LM", **cfg.lora})
        except ConfigError as exc:
            raise ConfigError(f"lora section of the run config: {exc}") from None
        check_method(cfg)  # method-specific values (the dpo section, adapter) as well
        # Model: base weights in the compute dtype first, then LoRA params (fp32) on top.
        torch.manual_seed(t.seed)
        spec = ModelSpec.parse(cfg.model)  # a 4-bit (QLoRA) base computes in the run's precision unless told
        model, tokenizer = load_model(
            spec.name,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            device=ctx.device,
            **spec.load_kwargs(self.precision),
        )
        self.base_note = describe_quantization(model)  # "" for a full-precision base
        if self.base_note:  # what a 4-bit base computes in (the policy is lorakit.branches.prepare's)
            self.base_note += quantized_base_note(self.precision, quantization_info(model)["compute_dtype"])
        self.train_rows, self.eval_rows, self.eval_batches, self.data_card = load_data(
            cfg, tokenizer, t.seed, t.batch_size, self.say
        )
        if self.precision == "int8":  # frozen Linears (not head, embeddings, norms) to int8, before LoRA goes on
            from lorakit.int8_model import CALIBRATION_TOKENS, calibration_from_examples, describe_int8, quantize_int8

            # SmoothQuant (and GPTQ, where weights get 7 bits) calibrated on the run's own training rows, as one
            # row no longer than the model's context
            context = getattr(model.config, "max_position_embeddings", None) or CALIBRATION_TOKENS
            calibration = calibration_from_examples(self.train_rows, tokenizer, min(CALIBRATION_TOKENS, context))
            self.say(f"int8 base: quantizing, calibrated on {calibration.shape[1]} tokens of the training rows ...")
            start = time.perf_counter()
            self.base_note = describe_int8(quantize_int8(model, calibration=calibration))
            self.base_note += f", quantized in {time.perf_counter() - start:.0f} s"
        model.config.use_cache = False  # with a cache, packed rows get no block-diagonal mask
        self.model = model
        reference = add_adapters(cfg, model, lora_config)  # a fresh LoRA; for DPO from `adapter`, with its reference
        fuse_swiglu_mlps(model)  # Llama-style MLPs: one fused op, activation recomputed in backward
        fuse_shared_inputs(model)  # q/k/v read one x: one op, one down-projection matmul, x saved once
        route_rms_norms(model)  # RMSNorms save their output (which q/k/v and gate/up save too), not their input
        four_bit = bool(describe_quantization(model))
        checkpointing = t.gradient_checkpointing
        if checkpointing is None:  # unset: on for a 4-bit base (QLoRA's memory recipe; benchmarks/RESULTS.md, qlora)
            checkpointing = four_bit
            if checkpointing:
                self.base_note += (
                    ", gradient checkpointing on (the 4-bit default; train.gradient_checkpointing: false "
                    "is faster and takes more memory)"
                )
        if checkpointing:  # per layer; the rerun skips the MLP output LoRA does not need
            enable_checkpointing(model, self.say, every_n_layers=int(checkpointing))
        model.train()
        self.graphs = setup_graphs(model, t.cuda_graphs, ctx.device, self.say)
        # "padding-free batches" or "": the start line says it (lorakit.padding_free); the SFT loss flattens its
        # batches, DPO's pairs keep their own layout (pack_pairs: each prompt once)
        blocker = None if cfg.method == "sft" else f"method {cfg.method} keeps its own batch layout (pack_pairs)"
        self.padding_note = setup_padding_free(
            model, t.padding_free, ctx.device, graphs=self.graphs is not None, run_blocker=blocker
        )
        release = four_bit if t.return_freed_memory is None else t.return_freed_memory
        self.release_memory = release and ctx.device.type == "cpu" and can_return_freed_memory()  # glibc, jemalloc
        # the start line says what holds the host heap (lorakit.allocator: `lorakit train` preloads jemalloc if found)
        self.heap_note = allocator_note() if ctx.device.type == "cpu" else ""
        if self.release_memory and t.return_freed_memory is None:
            self.base_note += (
                ", freed memory returned to the OS during and after each step (the 4-bit default; "
                "train.return_freed_memory: false is faster and peaks higher)"
            )
        if self.release_memory and (layers := decoder_layers(model)) is not None:
            return_freed_memory_during(layers)  # a forward's freed temporaries back to the OS, 3 times (lorakit.memory)
        self.pad_id = tokenizer.pad_token_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable, self.total_params = trainable_parameters(model)

        # What a micro-batch's loss is (SFT: token cross-entropy; DPO: pair losses against the reference).
        self.objective = make_objective(cfg, self.pad_id, reference, lambda m, b: _forward_loss(m, b))
        self.objective.prepare(
            model,
            {"train": self.train_rows, "eval": self.eval_rows},
            run_dir=self.run_dir,
            precision=self.precision,
            batch_size=t.batch_size,
            to_device=self._to_device,
            autocast=self.autocast,
            write=ctx.main,
            say=self.say,
        )
        self.global_batch = t.batch_size * t.grad_accum * ctx.world
        self.batches_per_epoch = math.ceil(len(self.train_rows) / self.global_batch)
        self.total_steps = t.steps if t.epochs is None else t.epochs * self.batches_per_epoch
        self.optimizer = make_optimizer(self.params, t.lr, t.weight_decay, ctx.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(t.schedule, s, self.total_steps, t.warmup_steps)
        )
        self.fingerprint = run_fingerprint(cfg, ctx.world, self.precision)
        self.step, self.elapsed_before, self.tokens = 0, 0.0, 0
        self.train_loss: float | None = None
        self.eval_loss: float | None = None
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        ctx, t = self.ctx, self.cfg.train
        logger = bar = None
        if ctx.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_run_config(self.cfg, self.run_dir / "lorakit.yaml")
            logger = report.MetricsLogger(self.run_dir / "metrics.jsonl", self.step if self.step else None)
            self.say(
                f"training {self.total_steps} steps (global batch {self.global_batch} rows, "
                f"{ctx.world} process(es), {self.precision}: {self.precision_reason}) on {ctx.device}"
                + (f", {self.base_note}" if self.base_note else "")
                + (f", {self.padding_note}" if self.padding_note else "")
                + (f", {self.heap_note}" if self.heap_note else "")
                + (f", resuming after step {self.step}" if self.step else "")
            )
            bar = report.progress_bar(self.total_steps, self.step, enabled=True)
        self.saved_step = self.step if self.step else None
        self.start_step = self.step
        consistent = True  # False while params and optimizer state are half-updated
        t0 = time.perf_counter()
        names = self.objective.metric_names
        window = [0.0] * (2 + len(names))  # loss sum, count, metric sums since the last metrics row
        try:
            batches, batches_epoch = None, -1
            while self.step < self.total_steps:
                epoch, index = divmod(self.step, self.batches_per_epoch)
                if epoch != batches_epoch:
                    batches, batches_epoch = make_batches(self.train_rows, self.global_batch, t.seed, epoch), epoch
                torch.manual_seed(_step_seed(t.seed, self.step, ctx.rank))  # dropout: a function of (seed, step)
                loss_sum, n_label, n_tok, metric_sums = self._accumulate(batches[index])
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
                # With graphs, keep .grad allocated: backward then adds into it in place.
                self.optimizer.zero_grad(set_to_none=self.graphs is None)
                if self.release_memory:  # glibc keeps the step's freed activations: return them (lorakit.memory)
                    return_freed_memory()
                self.step += 1
                consistent = True
                self.tokens += n_tok
                self.train_loss = loss
                window = [w + v for w, v in zip(window, [loss_sum, n_label, *metric_sums])]
                elapsed = self.elapsed_before + time.perf_counter() - t0
                last = self.step == self.total_steps
                if ctx.main and (self.step % t.log_every == 0 or last):
                    logger.log(
                        {
                            "step": self.step,
                            "loss": window[0] / max(window[1], 1),
                            "lr": lr,
                            "tokens": self.tokens,
                            "elapsed_s": round(elapsed, 3),
                            **{n: s / max(window[1], 1) for n, s in zip(names, window[2:])},
                        }
                    )
                    window = [0.0] * len(window)
                if bar is not None:
                    rate = self.tokens / max(elapsed, 1e-9)
                    shown = {n: f"{s / max(n_label, 1):.3f}" for n, s in zip(names, metric_sums) if "rewards/" in n}
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", **shown)
                    bar.update(1)
                    if bar.disable:  # not a terminal (CI logs, pipes): a plain line every ~10% instead
                        report.log_progress(
                            self.say,
                            self.step,
                            self.total_steps,
                            loss,
                            lr,
                            rate,
                            elapsed - self.elapsed_before,
                            self.step - self.start_step,
                        )
                if self.eval_batches and t.eval_every and (self.step % t.eval_every == 0 or last):
                    self.eval_loss, eval_metrics = self._evaluate()
                    if ctx.main:
                        logger.log({"step": self.step, "eval_loss": self.eval_loss, **eval_metrics})
                if ctx.main and ((t.save_every and self.step % t.save_every == 0) or last):
                    self._save_checkpoint(self.elapsed_before + time.perf_counter() - t0)
        except KeyboardInterrupt:
            raise self._interrupted(consistent, self.elapsed_before + time.perf_counter() - t0) from None
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
            if self.graphs is not None:  # free the recorded graphs, give the layers their own forward back
                self.graphs.remove()
            disable_padding_free(self.model)  # its attention as loaded (a no-op when not padding-free)
        elapsed = self.elapsed_before + time.perf_counter() - t0
        result = TrainResult(
            self.run_dir,
            self.step,
            self.train_loss,
            self.eval_loss,
            self.trainable,
            elapsed,
            report.peak_memory_bytes(ctx.device.type),
            self.tokens,
            self.precision,
            self.precision_reason,
        )
        if ctx.main:
            self._finish(result)
        if ctx.world > 1:
            dist.barrier()
        return result

    def _accumulate(self, global_batch: list[int]) -> tuple[float, int, int, list[float]]:
        """Forward + backward this rank's micro-batches; all-reduce; grads /= the global count.

        The count is what the objective's loss is a sum over (label tokens for SFT, pairs for DPO).
        Returns ``(loss sum, count, input tokens, metric sums)`` of the global batch.
        """
        ctx, bs = self.ctx, self.cfg.train.batch_size
        micro = [global_batch[i : i + bs] for i in range(0, len(global_batch), bs)][ctx.rank :: ctx.world]
        k = 3 + len(self.objective.metric_names)
        stats = torch.zeros(k, dtype=torch.float32, device=ctx.device)  # loss sum, count, input tokens, metrics
        for rows in micro:
            # Graphs are recorded per shape: pad to coarse buckets so few shapes occur.
            pad = 8 if self.graphs is None else GRAPH_PAD
            cpu_batch = self.objective.collate([self.train_rows[i] for i in rows], pad)
            with self.autocast:
                loss_sum, count, metrics = self.objective.loss(self.model, self._to_device(cpu_batch))
            loss_sum.backward()
            stats[0] += loss_sum.detach().float()
            stats[1:] += stats.new_tensor([count, _input_tokens(cpu_batch), *metrics])
        grads = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
            for p in self.params
        ]
        flat = ctx.all_reduce(torch.cat([*[g.float() for g in grads], stats]))  # one all-reduce per step
        loss_sum, n_label, n_tok, *metric_sums = flat[-k:].tolist()
        flat = flat[:-k].div_(max(n_label, 1))  # one kernel, not one per parameter
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        return loss_sum, int(n_label), int(n_tok), metric_sums

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    def _evaluate(self) -> tuple[float, dict[str, float]]:
        """Mean loss over the eval set (sharded across ranks), without grad; and the objective's eval metrics."""
        ctx, names = self.ctx, self.objective.metric_names
        self.model.eval()
        total = torch.zeros(2 + len(names), dtype=torch.float64, device=ctx.device)  # loss sum, count, metrics
        with torch.no_grad():
            for rows in self.eval_batches[ctx.rank :: ctx.world]:
                batch = self._to_device(self.objective.collate([self.eval_rows[i] for i in rows], 8))
                with self.autocast:
                    loss_sum, count, metrics = self.objective.loss(self.model, batch)
                total += torch.cat([loss_sum.double().reshape(1), total.new_tensor([count, *metrics])])
        self.model.train()
        loss_sum, n, *sums = ctx.all_reduce(total).tolist()
        return loss_sum / max(n, 1), {f"eval_{name}": s / max(n, 1) for name, s in zip(names, sums)}

    # ------------------------------------------------------------------ stopping

    def _diverged(self, what: str, value: float) -> TrainingError:
        good = latest_checkpoint(self.run_dir)
        where = str(good) if good else "none (no checkpoint was saved yet)"
        return TrainingError(
            f"{what} became {value} at step {self.step + 1}; the last good checkpoint is {where}; "
            "lower train.lr or check the data"
        )

    def _interrupted(self, consistent: bool, elapsed: float) -> TrainingInterrupted:
        path = latest_checkpoint(self.run_dir)
        if consistent and self.step > 0 and self.ctx.main and self.saved_step != self.step:
            self.model.train()
            path = self._save_checkpoint(elapsed)
        how = f"continue with `lorakit train {self.run_dir / 'lorakit.yaml'} --resume`"
        if path is None:
            return TrainingInterrupted(
                f"training interrupted at step {self.step}; no checkpoint was saved, so there is nothing to resume.",
                self.step,
                None,
            )
        return TrainingInterrupted(
            f"training interrupted after step {self.step}; checkpoint saved in {path}; {how}.", self.step, path
        )

    # ------------------------------------------------------------------ checkpoints and outputs

    def _save_checkpoint(self, elapsed: float) -> Path:
        metrics = {
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "tokens": self.tokens,
            "elapsed_s": elapsed,
        }
        path = save_checkpoint(
            self.run_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            step=self.step,
            batches_per_epoch=self.batches_per_epoch,
            world_size=self.ctx.world,
            fingerprint=self.fingerprint,
            metrics=metrics,
        )
        self.saved_step = self.step
        return path

    def _load_checkpoint(self, path: Path) -> None:
        self.step, m = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.fingerprint)
        self.tokens, self.elapsed_before = m["tokens"], m["elapsed_s"]
        self.train_loss, self.eval_loss = m["train_loss"], m["eval_loss"]
        if self.step >= self.total_steps:
            self.say(f"checkpoint {path} is at step {self.step}, the run has {self.total_steps} steps: nothing to do")

    def _finish(self, result: TrainResult) -> None:
        """Final adapter at the root, loss plot, model card, summary (rank 0)."""
        report.plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        save_adapter(self.model, self.run_dir)  # replaces only the adapter files, config last
        base = getattr(self.model.config, "_name_or_path", None) or str(self.cfg.model)
        report.write_model_card(
            self.run_dir / "README.md",
            base_model=base,
            data=self.data_card,
            lora=dict(self.cfg.lora),
            train=self.cfg.train.model_dump(mode="json"),
            precision=self.precision,
            precision_reason=self.precision_reason + (f"; {self.base_note}" if self.base_note else ""),
            steps=result.steps,
            train_loss=result.train_loss,
            eval_loss=result.eval_loss,
            trainable_params=self.trainable,
            total_params=self.total_params,
            method=self.objective.card,
        )
        self.say(
            report.format_summary(
                run_dir=self.run_dir,
                steps=result.steps,
                elapsed_s=result.elapsed_s,
                tokens=result.tokens,
                trainable_params=self.trainable,
                total_params=self.total_params,
                peak_memory=result.peak_memory_bytes,
                device_type=self.ctx.device.type,
                precision=self.precision + (f"; {self.base_note}" if self.base_note else ""),
                train_loss=result.train_loss,
                eval_loss=result.eval_loss,
            ),
            flush=True,
        )


# --------------------------------------------------------------------------- small helpers


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank) % 2**63


def _input_tokens(batch: dict[str, torch.Tensor]) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())  # packed rows: padding is not told apart; close enough for tokens/s
