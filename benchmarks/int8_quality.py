"""Exact match of an adapter trained in int8 against the same adapter trained in fp32, both deployed on the fp32 base.

Issue 13's quality bar for ``train.precision: int8``: a fine-tune trained in int8,
then evaluated on the full-precision base as users deploy it, scores within 1 point
of the fp32-trained adapter on an exact-match eval. This script trains one run
config twice, ``train.precision: fp32`` and ``int8`` (same seed: same initial
adapter, same batches), then scores each adapter on the held-out file two ways:

* ``lorakit eval``: :func:`lorakit.runs.open_adapter` (the fp32 base, the adapter
  unmerged on top) and :func:`lorakit.evaluation.evaluate`, the code behind
  ``lorakit eval RUN --data FILE``;
* PEFT, merged: ``PeftModel.from_pretrained`` on a fresh fp32 base, then
  ``merge_and_unload()`` (a plain transformers model), scored by the same ``evaluate``.

The base model alone is scored too: the comparison means something only where the
fp32 adapter is clearly above it.

    python benchmarks/int8_quality.py                     # examples/dates.yaml, writes the RESULTS.md section
    python benchmarks/int8_quality.py --steps 6 --no-write

Exact match: greedy answer == reference after stripping surrounding whitespace.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_rev, machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "dates.yaml"
EVAL_DATA = ROOT / "examples" / "data" / "dates_eval.jsonl"
PRECISIONS = ("fp32", "int8")
HOW = ("lorakit", "peft")  # lorakit eval's unmerged adapter; PEFT, merged
BOUND = 1.0  # points of exact match the int8 adapter may lose (issue 13)


def train_pair(config: Path, out: Path, steps: int | None = None, model: str | None = None) -> dict[str, dict]:
    """Train ``config`` once per precision into ``out/<precision>``.

    Args:
        config: A YAML run config.
        out: Parent of the two run directories.
        steps: Override ``train.steps``.
        model: Override the run's base model.

    Returns:
        ``{precision: {"run_dir", "train_s", "s_per_step", "final_loss", "steps"}}``.
    """
    import lorakit

    runs = {}
    for precision in PRECISIONS:
        overrides = [f"train.precision={precision}", f"output.dir={out / precision}"]
        overrides += [f"train.steps={steps}"] if steps else []
        overrides += [f"model={model}"] if model else []
        result = lorakit.train(config, overrides=overrides, device="cpu")
        runs[precision] = {
            "run_dir": result.run_dir,
            "train_s": result.elapsed_s,
            "s_per_step": result.elapsed_s / max(result.steps, 1),
            "final_loss": result.train_loss,
            "steps": result.steps,
        }
    return runs


def score(run_dir: Path | None, data: Path, how: str = "lorakit", model: str | None = None, **eval_kw: Any) -> dict:
    """Exact match (and eval loss) of a run's adapter on the full-precision base, or of the base alone.

    Args:
        run_dir: A run or adapter directory; None scores the base model.
        data: The held-out JSONL file.
        how: ``"lorakit"`` (open_adapter: fp32 base, adapter unmerged) or ``"peft"`` (PEFT-loaded, merged).
        model: The base model (None: the run's, else the default).
        eval_kw: More keyword arguments of :func:`lorakit.evaluation.evaluate`.

    Returns:
        :func:`lorakit.evaluation.evaluate`'s result plus ``"eval_s"``.
    """
    from lorakit.evaluation import evaluate
    from lorakit.models import load_model
    from lorakit.runs import find_adapter_dir, open_adapter

    t0 = time.perf_counter()
    if run_dir is None:
        net, tokenizer = load_model(model, dtype="fp32")
    elif how == "lorakit":
        net, tokenizer, _ = open_adapter(run_dir, model=model, dtype="fp32")
    elif how == "peft":
        from peft import PeftModel

        base, tokenizer = load_model(model, dtype="fp32")
        net = PeftModel.from_pretrained(base, str(find_adapter_dir(run_dir)[0])).merge_and_unload()
    else:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    net.eval()
    result = evaluate(net, tokenizer, data, **eval_kw)
    return {**result, "eval_s": time.perf_counter() - t0}


def compare(runs: dict[str, dict], data: Path, model: str | None = None, base: bool = True, **eval_kw: Any) -> dict:
    """Score both runs both ways (and the base); the int8 - fp32 difference in points.

    Returns:
        ``{"scores": {(precision, how): result}, "base": result or None, "diff": {how: points}}``.
    """
    scores = {(p, how): score(runs[p]["run_dir"], data, how, model, **eval_kw) for p in PRECISIONS for how in HOW}
    diff = {how: 100 * (scores["int8", how]["exact_match"] - scores["fp32", how]["exact_match"]) for how in HOW}
    return {"scores": scores, "base": score(None, data, model=model, **eval_kw) if base else None, "diff": diff}


def table(runs: dict[str, dict], cmp: dict) -> list[str]:
    """The Markdown table of the two runs (and the base), then the verdict line."""
    lines = [
        "| adapter | train s/step | loss at last step | exact match, `lorakit eval` | exact match, PEFT merged "
        "| eval loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = cmp["base"]
    if base is not None:
        lines.append(
            f"| none (the base model) | | | {100 * base['exact_match']:.1f} | {100 * base['exact_match']:.1f} "
            f"| {base['eval_loss']:.4f} |"
        )
    for p in PRECISIONS:
        s, r = cmp["scores"], runs[p]
        lines.append(
            f"| trained in {p} | {r['s_per_step']:.3f} | {r['final_loss']:.4f} "
            f"| {100 * s[p, 'lorakit']['exact_match']:.1f} | {100 * s[p, 'peft']['exact_match']:.1f} "
            f"| {s[p, 'lorakit']['eval_loss']:.4f} |"
        )
    d = cmp["diff"]
    ok = all(v >= -BOUND for v in d.values())
    lines += [
        "",
        f"int8 - fp32: {d['lorakit']:+.1f} points (`lorakit eval`), {d['peft']:+.1f} points (PEFT merged); "
        f"target: no worse than -{BOUND:.0f} point: {'met' if ok else 'NOT met'}.",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG, help="the run config trained twice")
    ap.add_argument("--data", type=Path, default=EVAL_DATA, help="held-out JSONL rows with exact answers")
    ap.add_argument("--steps", type=int, help="override train.steps")
    ap.add_argument("--model", help="override the base model")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "int8_quality", help="where the two runs go")
    ap.add_argument("--no-base", action="store_true", help="do not score the base model alone")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    commit, t0 = git_rev(), time.perf_counter()
    runs = train_pair(args.config, args.out, args.steps, args.model)
    cmp = compare(runs, args.data, args.model, base=not args.no_base)
    steps = runs["fp32"]["steps"]
    rel = args.config.resolve().relative_to(ROOT) if args.config.resolve().is_relative_to(ROOT) else args.config
    data = args.data.resolve().relative_to(ROOT) if args.data.resolve().is_relative_to(ROOT) else args.data
    n = cmp["scores"]["fp32", "lorakit"]["exact_match_rows"]
    body = "\n".join(
        [
            f"Machine: {machine()}; commit {commit} at the start; `python benchmarks/int8_quality.py"
            + (f" --steps {args.steps}" if args.steps else "")
            + f"` ({time.perf_counter() - t0:.0f} s in all).",
            "",
            f"`{rel}` ({args.model or 'the default model'}) trained {steps} steps twice, `train.precision: fp32` and "
            "`int8` (same seed: same initial adapter, same batches), each adapter then scored on the fp32 base: "
            "`lorakit eval`'s path (open_adapter, adapter unmerged) and PEFT (`PeftModel.from_pretrained` + "
            f"`merge_and_unload`). Exact match of greedy answers on `{data}` ({n} held-out rows: 1 row = "
            f"{100 / max(n, 1):.1f} points).",
            "",
            *table(runs, cmp),
        ]
    )
    print(body)
    if not args.no_write:
        write_section("int8_quality.py", body)


if __name__ == "__main__":
    main()
