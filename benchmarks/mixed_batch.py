"""Mixed-adapter batches: tokens/s of one batch spread over 1, 4 and 8 adapters.

SmolLM2-135M-Instruct with 8 LoRA adapters (r=16 on all seven projections, random
non-zero B so every adapter is really computed). One batch of ``--batch`` prompts,
greedy decoding of ``--new-tokens`` tokens with the KV cache (``model.generate``), the
rows spread round-robin over k adapters. Variants, taking turns on each repeat:

* ``lorakit grouped``: ``lorakit.adapter_batch`` (base matmul once, each adapter's LoRA on its rows);
* ``PEFT mixed``: PEFT's ``generate(adapter_names=...)`` on the same adapters;
* ``one at a time``: lorakit, one ``generate`` per adapter on its rows (what a server without
  mixed batches does);
* ``single adapter`` (reference): the whole batch on one adapter, lorakit's usual path (as
  ``lorakit.generate`` runs it: the output head through :mod:`lorakit.few_rows`);
* ``stock head`` (8 adapters): ``lorakit grouped`` with the head as plain ``F.linear``, to pair the
  few-row head route's gain within each repeat.

Measurement: all variants live in one process; after one warm-up call of each, every repeat runs
each variant once, the order rotated by one per repeat (no variant always follows the same
neighbour). Rates are medians over the repeats, with min-max; the ratios to the single adapter and to
PEFT are taken within each repeat (paired: a slow minute of the shared machine slows both sides) and
reported as their median and min-max.

Targets (issue 14): 8 adapters >= 0.8x the tokens/s of a single adapter, and >= 2x PEFT's mixed batch.

    python benchmarks/mixed_batch.py [--batch 8] [--prompt-len 32] [--new-tokens 16] [--repeats 7]
        [--skip-one-at-a-time] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_rev, load_bench_model, machine, median, model_note, section, write_section  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COUNTS = (1, 4, 8)


def _adapters(base, n: int, tmp: Path):
    """lorakit and PEFT models holding the same ``n`` random adapters ``a0`` .. ``a{n-1}``."""
    import peft

    import lorakit

    ours = copy.deepcopy(base)
    for i in range(n):
        torch.manual_seed(i)
        cfg = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        if i:
            lorakit.add_adapter(ours, f"a{i}", cfg)
        else:
            lorakit.inject(ours, cfg, "a0")
        lorakit.save_adapter(ours, tmp, f"a{i}")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "a0"), adapter_name="a0")
    for i in range(1, n):
        theirs.load_adapter(str(tmp / f"a{i}"), adapter_name=f"a{i}")
    return ours.eval(), theirs.eval()


def _generate(model, ids, mask, new_tokens: int, **kwargs) -> None:
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not touch RESULTS.md")
    parser.add_argument(
        "--skip-one-at-a-time", action="store_true", help="leave out the slowest variant (no target; ~half the time)"
    )
    args = parser.parse_args()

    import lorakit
    from lorakit import few_rows
    from lorakit.mixed import adapter_batch

    device = torch.device(args.device)
    base, _ = load_bench_model(device)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = _adapters(base, max(COUNTS), Path(tmp))
    del base
    g = torch.Generator().manual_seed(0)
    vocab = ours.config.vocab_size
    ids = torch.randint(10, min(1000, vocab), (args.batch, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    tokens = args.batch * args.new_tokens

    def spread(k: int) -> list[str]:
        return [f"a{i % k}" for i in range(args.batch)]

    def grouped(k):
        def run():
            with adapter_batch(ours, spread(k)):
                _generate(ours, ids, mask, args.new_tokens)

        return run

    def grouped_stock_head(k):
        def run():
            with adapter_batch(ours, spread(k)):
                few_rows.unroute_head(ours)  # the head as F.linear, as before lorakit.few_rows
                _generate(ours, ids, mask, args.new_tokens)

        return run

    def peft_mixed(k):
        return lambda: _generate(theirs, ids, mask, args.new_tokens, adapter_names=spread(k))

    def one_at_a_time(k):
        def run():
            names = spread(k)
            for name in dict.fromkeys(names):
                rows = [i for i, n in enumerate(names) if n == name]
                lorakit.set_adapter(ours, name)
                _generate(ours, ids[rows], mask[rows], args.new_tokens)

        return run

    def single():
        lorakit.set_adapter(ours, "a0")
        with few_rows.head_routed(ours):  # as lorakit.generate runs it
            _generate(ours, ids, mask, args.new_tokens)

    variants = {"single adapter": single}
    for k in COUNTS:
        variants[f"lorakit grouped/{k}"] = grouped(k)
        variants[f"PEFT mixed/{k}"] = peft_mixed(k)
        if not args.skip_one_at_a_time:
            variants[f"one at a time/{k}"] = one_at_a_time(k)
    variants[f"stock head/{max(COUNTS)}"] = grouped_stock_head(max(COUNTS))
    order = list(variants)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up: stacks built, allocator and caches warm
            fn()
        for rep in range(args.repeats):
            for name in order[rep % len(order) :] + order[: rep % len(order)]:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                variants[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
            print(f"repeat {rep + 1}: " + ", ".join(f"{n} {tokens / times[n][-1]:.1f}" for n in order), flush=True)
    rates = {name: [tokens / t for t in ts] for name, ts in times.items()}
    single_rates = rates["single adapter"]

    def spread_of(xs: list[float], fmt: str = ".1f", unit: str = "") -> str:
        return f"{median(xs):{fmt}}{unit} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    def paired(a: str, b: list[float]) -> list[float]:
        return [x / y for x, y in zip(rates[a], b)]  # within each repeat

    lines = [
        f"{machine()}; lorakit {git_rev()}; {model_note()}; 8 adapters r=16 on all seven projections; "
        f"batch {args.batch} x prompt {args.prompt_len}, {args.new_tokens} new tokens greedy with KV cache; "
        f"{args.repeats} repeats, variants interleaved (order rotated each repeat) after one warm-up each. Command: "
        f"`python benchmarks/mixed_batch.py --batch {args.batch} --prompt-len {args.prompt_len} --new-tokens "
        f"{args.new_tokens} --repeats {args.repeats}{' --skip-one-at-a-time' if args.skip_one_at_a_time else ''}`",
        "",
        f"Single adapter (whole batch on a0, lorakit's usual path): **{spread_of(single_rates)} tokens/s** "
        "(median (min-max) over the repeats; ratios are per repeat, then median (min-max)).",
        "",
        "| adapters in the batch | lorakit grouped (tok/s) | PEFT mixed `adapter_names=` (tok/s) "
        "| one adapter at a time (tok/s) | grouped / single | grouped / PEFT |",
        "|---|---|---|---|---|---|",
    ]
    for k in COUNTS:
        g_, p_ = f"lorakit grouped/{k}", f"PEFT mixed/{k}"
        o_ = spread_of(rates[f"one at a time/{k}"]) if f"one at a time/{k}" in rates else "not run"
        lines.append(
            f"| {k} | {spread_of(rates[g_])} | {spread_of(rates[p_])} | {o_} "
            f"| {spread_of(paired(g_, single_rates), '.2f', 'x')} | {spread_of(paired(g_, rates[p_]), '.2f', 'x')} |"
        )
    g8, p8 = f"lorakit grouped/{max(COUNTS)}", f"PEFT mixed/{max(COUNTS)}"
    vs_single, vs_peft = median(paired(g8, single_rates)), median(paired(g8, rates[p8]))
    lines += [
        "",
        f"Targets (medians of the per-repeat ratios): 8 adapters >= 0.8x single ({vs_single:.2f}x: "
        f"{'met' if vs_single >= 0.8 else 'not met'}); >= 2x PEFT's mixed batch ({vs_peft:.2f}x: "
        f"{'met' if vs_peft >= 2 else 'not met'}).",
        "",
        f"The head's few-row route (lorakit.few_rows), paired: grouped {max(COUNTS)} with the stock `F.linear` head "
        f"{spread_of(rates[f'stock head/{max(COUNTS)}'])} tok/s; with the route / without, per repeat: "
        f"{spread_of(paired(g8, rates[f'stock head/{max(COUNTS)}']), '.3f', 'x')}; stock-head grouped {max(COUNTS)} "
        f"/ PEFT: {spread_of(paired(f'stock head/{max(COUNTS)}', rates[p8]), '.2f', 'x')}.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(section("mixed_batch", device.type), body)


if __name__ == "__main__":
    main()
