"""A training run's data: its train and eval examples, held out, packed and batched as its config says.

Reading rows is :mod:`lorakit.rows`, tokenizing them :mod:`lorakit.examples`, packing and
batching :mod:`lorakit.train.batching`; :func:`load_run_data` puts the pieces together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from lorakit.examples import load_examples
from lorakit.train.batching import make_batches, pack_examples, split_eval
from lorakit.train.config import DataConfig

__all__ = ["RunData", "load_run_data"]


class RunData(NamedTuple):
    """What a training run trains and evaluates on; see :func:`load_run_data`.

    Attributes:
        train_rows: Training examples (packed rows with ``data.packing``).
        eval_rows: Eval examples (packed likewise); empty without eval data.
        eval_batches: Batches of indices into ``eval_rows``, in order; empty without eval data.
        card: ``(split, source, examples)`` per split, for the model card.
    """

    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    eval_batches: list[list[int]]
    card: list[tuple[str, str, int]]


def load_run_data(data: DataConfig, tokenizer: Any, seed: int, batch_size: int, say: Callable[..., Any]) -> RunData:
    """Loads a run's train and eval examples as its ``data`` section says.

    Eval examples come from ``data.eval``, or are held out of the train file
    (``data.eval_fraction``); with ``data.packing`` both sets are packed into rows of at
    most ``data.max_seq_len`` tokens. What was loaded is told through ``say``.

    Args:
        data: The run config's ``data`` section.
        tokenizer: The base model's tokenizer.
        seed: The run seed (held-out split, eval batches).
        batch_size: Rows per eval batch.
        say: ``print`` on the main process, a no-op on the others.

    Returns:
        A :class:`RunData`.

    Raises:
        DataError, ConfigError: as :func:`load_examples`.
    """
    kw = dict(
        format=data.format, max_seq_len=data.max_seq_len, train_on_prompt=data.train_on_prompt, on_error=data.on_error
    )
    train_rows, stats = load_examples(data.train, tokenizer, **kw)
    say(
        f"data: {data.train}: {stats.rows:,d} examples ({stats.skipped} skipped, {stats.truncated} truncated "
        f"to {data.max_seq_len} tokens), {stats.tokens:,d} tokens, {stats.label_tokens:,d} with loss"
    )
    eval_rows: list[dict[str, Any]] = []
    data_card = [("train", str(data.train), 0)]
    if data.eval is not None:
        eval_rows, estats = load_examples(data.eval, tokenizer, **kw)
        say(
            f"data: {data.eval}: {estats.rows:,d} eval examples ({estats.skipped} skipped, "
            f"{estats.truncated} truncated), {estats.tokens:,d} tokens"
        )
        data_card.append(("eval", str(data.eval), len(eval_rows)))
    elif data.eval_fraction > 0:
        train_rows, eval_rows = split_eval(train_rows, data.eval_fraction, seed)
        say(f"data: held out {len(eval_rows)} of them for eval (data.eval_fraction={data.eval_fraction})")
        data_card.append(("eval", f"{data.train} (held out, fraction {data.eval_fraction})", len(eval_rows)))
    data_card[0] = ("train", str(data.train), len(train_rows))
    if data.packing:
        n = len(train_rows)
        train_rows = pack_examples(train_rows, data.max_seq_len)
        eval_rows = pack_examples(eval_rows, data.max_seq_len) if eval_rows else []
        say(f"data: packed {n:,d} examples into {len(train_rows):,d} rows of <= {data.max_seq_len} tokens")
    eval_batches = make_batches(eval_rows, batch_size, seed, 0, shuffle=False) if eval_rows else []
    return RunData(train_rows, eval_rows, eval_batches, data_card)
