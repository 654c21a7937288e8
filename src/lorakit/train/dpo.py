"""``method: dpo``: the training loop's DPO objective, its model setup, pair data and reference cache.

The loop (:mod:`lorakit.train.loop`) is the same as for SFT; it asks an objective
for the loss of each micro-batch (:class:`DpoObjective`: the sum of the pairs' DPO
losses, and the pair count the loop normalises by) plus the sums of TRL's metrics
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``). The math is in
:mod:`lorakit.preference`, the pairs in :mod:`lorakit.pairs`.

The model (:func:`setup_dpo_model`): with no ``adapter`` a fresh LoRA from the
``lora`` section, reference = the base with adapters disabled; with ``adapter`` a
trainable copy of it (``default``) plus the same files loaded frozen as
``reference``, on the same base. Either way there is one base model in memory.

``dpo.precompute_reference: true`` computes every pair's reference log-probs once
before training (:func:`precomputed_reference`) and keeps them in the run dir
(``reference_logps.safetensors``), keyed by hashes of the tokenized data, the base
weights, the reference adapter's files and the precision; a resumed run with the
same key reads them back instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from lorakit.adapters import inject
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, ModelMismatchError
from lorakit.files import write_file_atomic
from lorakit.io import load_adapter
from lorakit.pairs import collate_pairs, load_pairs, pack_pairs
from lorakit.preference import (
    METRIC_NAMES,
    check_dpo_args,
    dpo_loss,
    pair_logps,
    pair_metrics,
    reference_mode,
    shares_prompts,
)
from lorakit.train.batching import make_batches, split_eval
from lorakit.train.data import RunData

__all__ = [
    "REFERENCE_ADAPTER",
    "REFERENCE_CACHE",
    "DpoObjective",
    "setup_dpo_model",
    "load_pair_data",
    "precomputed_reference",
]

REFERENCE_ADAPTER = "reference"
REFERENCE_CACHE = "reference_logps.safetensors"
_REF_KEYS = ("ref_chosen", "ref_rejected")


class DpoObjective:
    """What a DPO step minimises, per micro-batch; the loop's side of ``method: dpo``.

    Args:
        pad_token_id: Token id put in padding positions.
        beta: The KL strength β.
        loss_type: One of :data:`lorakit.preference.LOSS_TYPES`.
        label_smoothing: ε of cDPO / robust DPO.
        reference_adapter: The frozen reference adapter's name, or None (adapters disabled).
        precompute_reference: :meth:`prepare` computes (or reads back) every pair's reference log-probs.
        adapter_dir: The reference adapter's files (part of the cache key), or None.
        packed: Collate pairs with :func:`lorakit.pairs.pack_pairs` (each prompt once, no padding between
            pairs); :meth:`prepare` turns it off for a model that does not
            :func:`~lorakit.preference.shares_prompts`.

    Attributes:
        metric_names: The names of the metric sums :meth:`loss` returns (TRL's).
        unit: What the loss is averaged over (``"pairs"``).
        card: The method's lines for the model card.

    Raises:
        ConfigError: a bad ``beta`` / ``loss_type`` / ``label_smoothing``.
    """

    metric_names = METRIC_NAMES
    unit = "pairs"

    def __init__(
        self,
        pad_token_id: int,
        beta: float,
        loss_type: str,
        label_smoothing: float,
        reference_adapter: str | None,
        precompute_reference: bool = False,
        adapter_dir: str | Path | None = None,
        packed: bool = True,
    ) -> None:
        check_dpo_args(beta, loss_type, label_smoothing)
        self.packed = packed
        self.pad_token_id, self.beta, self.loss_type = pad_token_id, beta, loss_type
        self.label_smoothing, self.reference_adapter = label_smoothing, reference_adapter
        self.precompute_reference, self.adapter_dir = precompute_reference, adapter_dir
        reference = f"the starting adapter {adapter_dir}, frozen" if adapter_dir else "the base (adapters disabled)"
        self.card = {
            "method": "dpo",
            "beta": beta,
            "loss_type": loss_type,
            "label_smoothing": label_smoothing,
            "reference": reference,
            "precompute_reference": precompute_reference,
        }

    def collate(self, rows: list[dict[str, Any]], pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """One batch of pairs (chosen rows first), with precomputed reference log-probs if the rows have them.

        Args:
            rows: Pairs from :func:`load_pair_data`.
            pad_to_multiple_of: Round the padded length up to a multiple of this.

        Returns:
            :func:`lorakit.pairs.pack_pairs`' tensors (:attr:`packed`) or :func:`lorakit.pairs.collate_pairs`',
            plus ``ref_chosen`` / ``ref_rejected`` ``[B]``.
        """
        batch = (pack_pairs if self.packed else collate_pairs)(rows, self.pad_token_id, pad_to_multiple_of)
        if all(_REF_KEYS[0] in r for r in rows):
            for key in _REF_KEYS:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, list[float]]:
        """Summed DPO loss of the batch's pairs, their count and the sums of :attr:`metric_names`.

        Args:
            model: The policy (an injected model in train or eval mode).
            batch: From :meth:`collate`, on the model's device.

        Returns:
            ``(loss_sum, n_pairs, metric_sums)``: ``loss_sum`` differentiable when grad mode is on.
        """
        inputs = {k: v for k, v in batch.items() if k not in _REF_KEYS}
        if _REF_KEYS[0] in batch:
            ref_c, ref_r = batch[_REF_KEYS[0]], batch[_REF_KEYS[1]]
        else:
            with reference_mode(model, self.reference_adapter):
                ref_c, ref_r, _, _ = pair_logps(model, inputs)
        c, r, nc, nr = pair_logps(model, inputs)
        terms = dpo_loss(
            c,
            r,
            ref_c.to(c.dtype),
            ref_r.to(r.dtype),
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_tokens=nc,
            rejected_tokens=nr,
        )
        metrics = pair_metrics(terms, c, r)
        return terms.losses.sum(), len(c), [metrics[name] for name in self.metric_names]

    def prepare(
        self,
        model: torch.nn.Module,
        splits: dict[str, list[dict[str, Any]]],
        *,
        run_dir: Path,
        precision: str,
        batch_size: int,
        to_device: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        autocast: Any,
        write: bool,
        say: Callable[..., Any],
    ) -> None:
        """Before the first step: the batch layout for ``model``; with ``precompute_reference``, every pair's
        reference log-probs, cached.

        Args:
            model: The model, adapters in place.
            splits: ``{"train": pairs, "eval": pairs}``; the pairs get ``ref_chosen`` / ``ref_rejected``.
            run_dir: Where the cache lives (:data:`REFERENCE_CACHE`).
            precision: The resolved precision (part of the cache key).
            batch_size: Pairs per reference forward.
            to_device: Moves a batch to the model's device.
            autocast: The run's autocast context.
            write: Write the cache (the main process).
            say: For what happened.
        """
        self.packed = self.packed and shares_prompts(model)
        if not self.precompute_reference:
            return
        key = reference_key(model, list(splits.values()), self.adapter_dir, precision)
        precomputed_reference(
            run_dir,
            key,
            splits,
            lambda pairs: self.reference_logps(model, pairs, batch_size, to_device, autocast),
            write,
            say,
        )

    def reference_logps(
        self,
        model: torch.nn.Module,
        pairs: list[dict[str, Any]],
        batch_size: int,
        to_device: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        autocast: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of every pair, ``batch_size`` pairs per forward, in order.

        Args:
            model: The model (the reference is computed with :func:`lorakit.preference.reference_mode`).
            pairs: The pairs.
            batch_size: Pairs per forward.
            to_device: Moves a batch to the model's device.
            autocast: The run's autocast context (or a null context).

        Returns:
            ``(chosen [N], rejected [N])`` on the CPU, fp32.
        """
        chosen, rejected = [], []
        with reference_mode(model, self.reference_adapter):
            for i in range(0, len(pairs), batch_size):
                layout = pack_pairs if self.packed else collate_pairs
                batch = to_device(layout(pairs[i : i + batch_size], self.pad_token_id, 8))
                with autocast:
                    c, r, _, _ = pair_logps(model, batch)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        return torch.cat(chosen), torch.cat(rejected)


def setup_dpo_model(model: torch.nn.Module, lora: LoraConfig, adapter: str | Path | None) -> str | None:
    """Puts the trainable adapter and the reference on ``model``, in place.

    Args:
        model: The base model.
        lora: The fresh adapter's config (used when there is no ``adapter``).
        adapter: A starting adapter dir (a run dir works: its adapter is at the root), or None.

    Returns:
        The reference adapter's name, or None when the reference is the base.

    Raises:
        AdapterFormatError: ``adapter`` holds no adapter.
        ModelMismatchError: the adapter was trained on another base.
    """
    if adapter is None:
        inject(model, lora)
        return None
    try:
        load_adapter(model, adapter, is_trainable=True)
    except ModelMismatchError as exc:
        base = getattr(model.config, "_name_or_path", None) or type(model).__name__
        raise ModelMismatchError(
            f"adapter {adapter} does not fit the base model {base}: {exc} Point `adapter` "
            "at an adapter trained on this model, or set `model` to its base."
        ) from None
    load_adapter(model, adapter, adapter_name=REFERENCE_ADAPTER)  # frozen, inactive: a few MB
    return REFERENCE_ADAPTER


def load_pair_data(data: Any, tokenizer: Any, seed: int, batch_size: int, say: Callable[..., Any]) -> RunData:
    """A DPO run's train and eval pairs as its ``data`` section says (the pair twin of ``load_run_data``).

    Args:
        data: The run config's ``data`` section (``train``, ``eval``, ``eval_fraction``,
            ``max_seq_len``, ``max_prompt_len``, ``on_error``, ``packing``).
        tokenizer: The base model's tokenizer.
        seed: The run seed (held-out split, eval batches).
        batch_size: Pairs per eval batch.
        say: ``print`` on the main process, a no-op elsewhere.

    Returns:
        A :class:`~lorakit.train.data.RunData` whose rows are pairs.

    Raises:
        DataError: malformed rows (``file:line``), SFT rows, prompts that leave no answer.
        ConfigError: ``data.packing`` (pairs are not packed).
    """
    if data.packing:
        raise ConfigError(
            "data.packing is not supported with method: dpo (pairs are batched whole); set data.packing to false"
        )
    kw = dict(max_seq_len=data.max_seq_len, max_prompt_len=data.max_prompt_len, on_error=data.on_error)
    train, stats = load_pairs(data.train, tokenizer, **kw)
    say(
        f"data: {data.train}: {stats.rows:,d} pairs ({stats.skipped} skipped, {stats.prompt_truncated} prompts cut "
        f"to max_prompt_len={data.max_prompt_len}, {stats.truncated} sequences cut to {data.max_seq_len} tokens), "
        f"{stats.tokens:,d} tokens, {stats.completion_tokens:,d} scored"
    )
    evals: list[dict[str, Any]] = []
    card = [("train", str(data.train), 0)]
    if data.eval is not None:
        evals, estats = load_pairs(data.eval, tokenizer, **kw)
        say(f"data: {data.eval}: {estats.rows:,d} eval pairs ({estats.skipped} skipped, {estats.truncated} cut)")
        card.append(("eval", str(data.eval), len(evals)))
    elif data.eval_fraction > 0:
        train, evals = split_eval(train, data.eval_fraction, seed)
        say(f"data: held out {len(evals)} pairs for eval (data.eval_fraction={data.eval_fraction})")
        card.append(("eval", f"{data.train} (held out, fraction {data.eval_fraction})", len(evals)))
    card[0] = ("train", str(data.train), len(train))
    eval_batches = make_batches(evals, batch_size, seed, 0, shuffle=False) if evals else []
    return RunData(train, evals, eval_batches, card)


def _hash_tensors(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_key(
    model: torch.nn.Module, pairs: list[list[dict[str, Any]]], adapter: str | Path | None, precision: str
) -> str:
    """The cache key of precomputed reference log-probs: what they are a function of.

    Args:
        model: The model (its base weights are hashed, LoRA weights are not).
        pairs: The tokenized pair sets (train, eval).
        adapter: The reference adapter's dir, or None (the reference is the base).
        precision: ``"fp32"`` or ``"bf16"``.

    Returns:
        A hex digest.
    """
    base = _hash_tensors([p for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n])
    data = hashlib.sha256(
        json.dumps([[(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in split] for split in pairs]).encode()
    ).hexdigest()
    files = sorted(Path(adapter).glob("adapter_*")) if adapter is not None else []
    adapter_hash = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() if files else "base"
    return hashlib.sha256(f"{base}|{data}|{adapter_hash}|{precision}".encode()).hexdigest()


def precomputed_reference(
    run_dir: Path,
    key: str,
    splits: dict[str, list[dict[str, Any]]],
    compute: Callable[[list[dict[str, Any]]], tuple[torch.Tensor, torch.Tensor]],
    write: bool,
    say: Callable[..., Any],
) -> None:
    """Attaches reference log-probs to every pair (``ref_chosen`` / ``ref_rejected``), from the cache or computed.

    Args:
        run_dir: The run directory that holds the cache file.
        key: :func:`reference_key` of this run.
        splits: ``{"train": pairs, "eval": pairs}``; the pairs get the two keys in place.
        compute: Reference log-probs ``([N], [N])`` of a list of pairs.
        write: Write the cache (rank 0).
        say: For the one line that says what happened.
    """
    path = run_dir / REFERENCE_CACHE
    cached = None
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                cached = {name: f.get_tensor(name) for name in f.keys()}
    tensors = {}
    for split, pairs in splits.items():
        if not pairs:
            continue
        names = (f"{split}.chosen", f"{split}.rejected")
        if cached is not None and all(n in cached and cached[n].numel() == len(pairs) for n in names):
            chosen, rejected = cached[names[0]], cached[names[1]]
        else:
            cached = None
            chosen, rejected = compute(pairs)
        tensors.update({names[0]: chosen.float().cpu(), names[1]: rejected.float().cpu()})
        for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
            p[_REF_KEYS[0]], p[_REF_KEYS[1]] = c, r
    if cached is not None:
        say(f"reference log-probs: read from {path}")
        return
    say(
        f"reference log-probs: computed for {sum(len(p) for p in splits.values()):,d} pairs"
        + (f", cached in {path}" if write else "")
    )
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, save(tensors, metadata={"key": key}))
