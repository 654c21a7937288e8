"""Train-step speed and memory: lorakit vs PEFT on the embedded default model, each beside its matching baseline.

LoRA r=16, alpha=32 on all seven projections of SmolLM2-135M-Instruct, AdamW
(lr 2e-4, weight decay 0; torch's fused AdamW for every variant on CUDA), the
same batches (same rows, same labels: assistant tokens only) for every variant.
Every run is a fresh subprocess, so its peak RSS (``VmHWM``) is its own; the ``-trim``
variants, like ``lorakit train`` with ``train.return_freed_memory: true``, hand freed heap
back to the OS after each CPU step and 3 times during each forward pass (:mod:`lorakit.memory`;
off by default for these full-precision and int8 bases, as in the trainer). The lorakit
variants run under jemalloc where :mod:`lorakit.allocator` finds it, as ``lorakit train``
does (``-glibc``: without), PEFT's on the process's own malloc. Runs are
repeated (``--repeats``), the variant order rotated on each repeat so that slow
spells of the machine hit all variants alike; the table gives the median and the
spread (min-max) over the repeats, and ratios against the matching PEFT baseline.

    python benchmarks/train_step.py                       # both workloads, all default variants, 3 repeats
    python benchmarks/train_step.py --steps 3 --repeats 1 --workloads short --variants lorakit-fp32 peft-fp32

An AVX2-only CPU (issue 13's kind) can be emulated on a newer x86 one: every kernel library that picks its
instructions at run time is told to stop at AVX2 (workers inherit the environment), and int8 weights drop to
7-bit codes as on a real one (:func:`lorakit.int8.weight_code_max` probes the kernel):

    export FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
    python benchmarks/train_step.py --variants peft-fp32 lorakit-int8 --no-write

Workloads (from examples/data/quickstart_train.jsonl; the header of each result
gives the measured token counts):
    short   8 rows a step, each one chat example as it is (no truncation: the longest row of a
            batch is 70-88 tokens), right-padded to a multiple of 8
    long    4 rows a step, each chat examples concatenated and cut to exactly 256 tokens

Variants (baseline in brackets):
    peft-fp32       PEFT, fp32, transformers' own loss over full logits
    peft-bf16       PEFT as a bf16 user runs it: base loaded in bf16 (torch_dtype=bfloat16), PEFT's adapters
                    in fp32 (its autocast_adapter_dtype default), the step under torch.autocast(bf16), as
                    transformers.Trainer(bf16=True) does
    peft-gc         peft-fp32 with transformers' gradient checkpointing as PEFT users enable it:
                    gradient_checkpointing_enable(use_reentrant=False) + enable_input_require_grads
    lorakit-fp32    [peft-fp32] lorakit as `lorakit train` runs it: fused LoRA ops, fused SwiGLU MLPs,
                    loss only at labelled positions; on a CPU padding-free (the batch's real tokens as one row,
                    attention per example), on CUDA its CUDA graphs
    lorakit-auto    [peft-bf16] lorakit with train.precision=auto (skipped where auto resolves to fp32):
                    base stored in bf16, adapters fp32, autocast; on CUDA its CUDA graphs
    lorakit-eager   [peft-bf16] lorakit-auto without CUDA graphs (CUDA only: on a CPU it is lorakit-auto)
    lorakit-gc      [peft-gc] lorakit-fp32 plus its gradient checkpointing (the rerun skips the MLP output)
    lorakit-gc2     [peft-gc] the same, every 2nd decoder layer only (gradient_checkpointing: 2)
    lorakit-int8    [peft-fp32] lorakit-fp32 with train.precision: int8 (frozen base Linears in int8, both matmuls
                    int8 x int8 on oneDNN, activations per row; head, embeddings, norms and LoRA fp32)
    lorakit-fp32-trim, lorakit-int8-trim
                    [peft-fp32] lorakit-fp32 / lorakit-int8 with train.return_freed_memory: true (freed heap back
                    to the OS during and after each step: lower peak RSS, slower steps); not run by default
    lorakit-fp32-glibc, lorakit-int8-glibc
                    [peft-fp32] lorakit-fp32 / lorakit-int8 on glibc's malloc (LORAKIT_ALLOCATOR=system); the plain
                    lorakit variants run under jemalloc where it is found, as `lorakit train` does; not run by default
    peft-fp32-jemalloc
                    [peft-fp32] peft-fp32 with jemalloc preloaded the same way (what the allocator alone gives PEFT);
                    not run by default
    lorakit-fp32-padded, lorakit-int8-padded
                    [peft-fp32] lorakit-fp32 / lorakit-int8 with train.padding_free: off (the padded batch as it is);
                    the plain lorakit variants run padding-free on a CPU, as `lorakit train` does; not run by default
    lorakit-compile [peft-bf16] experiment, not run by default: lorakit-auto with each decoder layer
                    torch.compile'd

On a CPU without AVX512-BF16/AMX, bf16 matmuls are emulated and very slow: there
peft-bf16 runs only --bf16-steps steps, once (time and memory only, no loss).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    MODEL_ENV,
    git_rev,
    load_bench_model,
    lorakit_train_env,
    machine,
    median,
    model_note,
    rss_kib,
    run_worker,
    section,
    write_section,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASELINE = {  # variant -> the PEFT run it is compared with (None: a baseline itself)
    "peft-fp32": None,
    "peft-bf16": None,
    "peft-gc": None,
    "lorakit-fp32": "peft-fp32",
    "lorakit-auto": "peft-bf16",
    "lorakit-eager": "peft-bf16",
    "lorakit-gc": "peft-gc",
    "lorakit-gc2": "peft-gc",
    "lorakit-int8": "peft-fp32",
    "lorakit-fp32-trim": "peft-fp32",
    "lorakit-int8-trim": "peft-fp32",
    "lorakit-compile": "peft-bf16",
    "lorakit-fp32-glibc": "peft-fp32",
    "lorakit-int8-glibc": "peft-fp32",
    "peft-fp32-jemalloc": "peft-fp32",
    "lorakit-fp32-padded": "peft-fp32",
    "lorakit-int8-padded": "peft-fp32",
}
VARIANTS = list(BASELINE)
DEFAULT_VARIANTS = [
    v for v in VARIANTS if "compile" not in v and not v.endswith(("-trim", "-glibc", "-jemalloc", "-padded"))
]
AUTO = {"lorakit-auto", "lorakit-eager", "lorakit-compile"}  # bf16 where train.precision=auto picks bf16
WORKLOADS = {"short": 8, "long": 4}  # name -> rows a step
LONG_TOKENS = 256
LAST = 10  # the paired loss column: mean over the last LAST steps of loss / baseline's loss on the same batch, - 1
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "quickstart_train.jsonl"


def _rows(tokenizer, workload: str, steps: int) -> list[list[dict]]:
    """Deterministic batches of tokenized chat rows (input_ids, labels) for the workload."""
    from lorakit.examples import load_examples

    batch = WORKLOADS[workload]
    examples, _ = load_examples(DATA, tokenizer, max_seq_len=4096)
    rng = random.Random(0)
    rows = []
    while len(rows) < batch * steps:
        if workload == "short":  # one chat example per row, whole
            rows.append(rng.choice(examples))
        else:  # multi-turn: concatenate examples, cut to exactly LONG_TOKENS
            ids, labels = [], []
            while len(ids) < LONG_TOKENS:
                ex = rng.choice(examples)
                ids += ex["input_ids"]
                labels += ex["labels"]
            rows.append({"input_ids": ids[:LONG_TOKENS], "labels": labels[:LONG_TOKENS]})
    return [rows[i * batch : (i + 1) * batch] for i in range(steps)]


def _uses_bf16(variant: str, fast_bf16: bool) -> bool:
    return variant == "peft-bf16" or (variant in AUTO and fast_bf16)


def build(variant: str, workload: str, steps: int, device: str = "cpu"):
    """Set one variant up: returns ``(step, batches, bf16)``; ``step(batch)`` runs one optimizer step
    and returns the loss tensor."""
    import torch

    import lorakit
    from lorakit.examples import collate
    from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps
    from lorakit.memory import return_freed_memory, return_freed_memory_during
    from lorakit.norms import route_rms_norms
    from lorakit.padding_free import setup_padding_free
    from lorakit.train.device import resolve_precision
    from lorakit.train.graphs import decoder_layers, setup_graphs
    from lorakit.train.lm_loss import causal_lm_loss
    from lorakit.train.loop import GRAPH_PAD
    from lorakit.train.recompute import enable_checkpointing
    from lorakit.train.schedule import make_optimizer

    trim = variant.endswith("-trim")  # train.return_freed_memory: true
    padding_free = "off" if variant.endswith("-padded") else "auto"  # train.padding_free
    variant = variant.removesuffix("-trim").removesuffix("-glibc").removesuffix("-jemalloc").removesuffix("-padded")

    torch.manual_seed(0)
    dev = torch.device(device)
    model, tok = load_bench_model(dev)
    model.config.use_cache = False
    # lorakit pads to GRAPH_PAD when it records CUDA graphs (as `lorakit train` does): more padding, same loss
    graphed = variant in ("lorakit-fp32", "lorakit-auto") and dev.type == "cuda"
    pad = GRAPH_PAD if graphed else 8
    rows = _rows(tok, workload, steps)
    batches = [{k: v.to(dev) for k, v in collate(b, tok.pad_token_id, pad_to_multiple_of=pad).items()} for b in rows]
    bf16 = _uses_bf16(variant, resolve_precision("auto", dev)[0] == "bf16")
    if bf16:  # both libraries' bf16 users: the frozen base stored in bf16
        model = model.to(torch.bfloat16)
    if variant.startswith("peft"):
        import peft

        if variant == "peft-gc":  # as PEFT's docs and prepare_model_for_kbit_training do it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        # autocast_adapter_dtype=True (the default) keeps the adapters of a bf16 base in fp32
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))

        def loss_fn(batch):
            return model(**batch).loss
    else:
        if variant == "lorakit-int8":  # as `lorakit train` with train.precision: int8
            from lorakit.int8_model import calibration_from_examples, quantize_int8

            # calibrated as the run does: on the first 512 tokens of its training rows
            quantize_int8(model, calibration=calibration_from_examples([r for b in rows for r in b], tok))
        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        fuse_swiglu_mlps(model)  # as `lorakit train` does
        fuse_shared_inputs(model)
        route_rms_norms(model)
        if variant in ("lorakit-gc", "lorakit-gc2"):  # as `lorakit train` with gradient_checkpointing: true / 2
            enable_checkpointing(model, every_n_layers=2 if variant == "lorakit-gc2" else 1)
        if variant == "lorakit-compile":  # experiment: regional torch.compile, one decoder layer at a time
            for layer in model.model.layers:
                layer.compile(dynamic=None)

        def loss_fn(batch):
            loss_sum, n = causal_lm_loss(model, batch)
            return loss_sum / max(n, 1)

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 2e-4, 0.0, dev)  # fused AdamW (transformers.Trainer's default), for PEFT too
    graphs = None
    if variant.startswith("peft"):  # as transformers.Trainer(bf16=True) runs it
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    else:  # as `lorakit train` sets it up: no weight cache (the base is bf16 already), graphs where allowed
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
        if graphed:  # "on": a run that cannot use graphs is an error, as with train.cuda_graphs: on
            graphs = setup_graphs(model, "on", dev, say=lambda msg: None)
        setup_padding_free(model, padding_free, dev, graphs=graphs is not None)  # on a CPU, as `lorakit train` does

    trim = dev.type == "cpu" and trim  # PEFT's loop (transformers.Trainer) never does
    if trim:  # as `lorakit train` with return_freed_memory: true on a CPU: during the forward pass too
        return_freed_memory_during(decoder_layers(model))

    def step(batch):
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=graphs is None)
        if trim:  # as `lorakit train` does after each CPU step then: freed heap back to the OS (lorakit.memory)
            return_freed_memory()
        return loss

    return step, batches, bf16


def worker(variant: str, workload: str, steps: int, device: str = "cpu") -> dict:
    """Run one variant in this (fresh) process; return its per-step times, losses, tokens and peak memory."""
    import torch

    from lorakit.allocator import active_allocator

    step, batches, bf16 = build(variant, workload, steps, device)
    rss_before = rss_kib("VmRSS")
    times, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        loss = step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else rss_kib("VmHWM") / 2**20
    return {
        "variant": variant,
        "workload": workload,
        "steps": steps,
        "times": times,
        "losses": losses,
        "bf16": bf16,
        "peak_gib": peak,
        "rss_before_gib": rss_before / 2**20,
        "real_tokens": sum(int(b["attention_mask"].sum()) for b in batches) / len(batches),
        "padded_tokens": sum(b["input_ids"].numel() for b in batches) / len(batches),
        "labelled": sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches),
        "longest_row": [int(b["attention_mask"].sum(1).max()) for b in batches],
        "heap": active_allocator(),
    }


def _run(variant: str, workload: str, steps: int, device: str) -> dict:
    # lorakit variants run as `lorakit train` does: under jemalloc where it is found (lorakit.allocator), except
    # the -glibc ones; PEFT's as its users run it (the process's own malloc), except peft-fp32-jemalloc
    preload = variant.endswith("-jemalloc") or (variant.startswith("lorakit") and not variant.endswith("-glibc"))
    env = lorakit_train_env() if preload and device == "cpu" else None
    return run_worker(__file__, [variant, workload, str(steps), device], f"{variant}/{workload}", env)


def _spread(xs: list[float], fmt: str) -> str:
    med = format(median(xs), fmt)
    return med if len(xs) < 2 else f"{med} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"


def _table(runs: list[dict], skip: int, fast_bf16: bool, device: str) -> list[str]:
    """Median (min-max) over repeats of each variant's s/step (median of its steps after ``skip``) and peak memory."""
    agg: dict[tuple[str, str], dict] = {}
    for r in runs:
        a = agg.setdefault((r["workload"], r["variant"]), {"s": [], "peak": [], "loss": [], "runs": []})
        a["s"].append(median(r["times"][skip:] or r["times"][-1:]))
        a["peak"].append(r["peak_gib"])
        a["loss"].append(r["losses"][-1])
        a["runs"].append(r)
    mem = "peak GPU GiB" if device == "cuda" else "peak RSS GiB"
    lines = [
        f"| workload | variant | vs | s/step | x vs | x peft-fp32 | tokens/s | {mem} | x vs | x peft-fp32 "
        "| loss after N steps | loss vs | last 10 steps vs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (workload, variant), a in sorted(
        agg.items(), key=lambda kv: (list(WORKLOADS).index(kv[0][0]), VARIANTS.index(kv[0][1]))
    ):
        r0 = a["runs"][0]
        base = BASELINE[variant]
        ref, ref32 = agg.get((workload, base)) if base else None, agg.get((workload, "peft-fp32"))

        def ratio(key, other, a=a):
            return f"{median(a[key]) / median(other[key]):.2f}" if other else "n/a"

        slow16 = r0["bf16"] and not fast_bf16  # emulated bf16: too few steps for a loss
        loss = "n/a" if slow16 else f"{median(a['loss']):.4f} (N={r0['steps']})"
        if len(set(round(x, 4) for x in a["loss"])) > 1:
            loss += f", runs differ: {min(a['loss']):.4f}-{max(a['loss']):.4f}"
        paired = ref and not slow16 and ref["runs"][0]["steps"] == r0["steps"]
        loss_vs = f"{(median(a['loss']) / median(ref['loss']) - 1) * 100:+.3f}%" if paired else ""
        if paired:  # the same batches: step by step against the baseline's first run, less noisy than one step
            pairs = list(zip(r0["losses"], ref["runs"][0]["losses"]))[-LAST:]
            last_vs = f"{sum(x / y - 1 for x, y in pairs) / len(pairs) * 100:+.2f}%"
        else:
            last_vs = ""
        lines.append(
            f"| {workload} | {variant} | {base or ''} | {_spread(a['s'], '.3f')} | {ratio('s', ref) if base else ''} "
            f"| {ratio('s', ref32)} | {r0['real_tokens'] / median(a['s']):.0f} | {_spread(a['peak'], '.2f')} "
            f"| {ratio('peak', ref) if base else ''} | {ratio('peak', ref32)} | {loss} | {loss_vs} | {last_vs} |"
        )
    return lines


def _repeats(runs: list[dict]) -> str:
    """How many runs each (workload, variant) has: "3 times", or "1-3 times" where they differ."""
    counts: dict[tuple[str, str], int] = {}
    for r in runs:
        counts[r["workload"], r["variant"]] = counts.get((r["workload"], r["variant"]), 0) + 1
    lo, hi = min(counts.values(), default=0), max(counts.values(), default=0)
    return f"{lo} times" if lo == hi else f"{lo}-{hi} times"


def _heaps(runs: list[dict]) -> str:
    """Which heap allocator each variant's runs had, e.g. "jemalloc: lorakit-int8; glibc: peft-fp32"."""
    by: dict[str, list[str]] = {}
    for r in runs:
        names = by.setdefault(r.get("heap", "not recorded"), [])
        if r["variant"] not in names:
            names.append(r["variant"])
    return "; ".join(f"{heap}: {', '.join(names)}" for heap, names in sorted(by.items()))


def _workload_note(runs: list[dict]) -> str:
    notes = []
    for workload in WORKLOADS:
        r = next((x for x in runs if x["workload"] == workload and x["variant"].startswith("peft")), None)
        r = r or next((x for x in runs if x["workload"] == workload), None)
        if r:
            lo, hi = min(r["longest_row"]), max(r["longest_row"])
            notes.append(
                f"{workload} = {WORKLOADS[workload]} rows a step, longest row {lo if lo == hi else f'{lo}-{hi}'} "
                f"tokens, on average {r['real_tokens']:.0f} real tokens "
                f"({r['labelled']:.0f} labelled) and {r['padded_tokens']:.0f} padded a step"
            )
    return "; ".join(notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the loss is read after the last)")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing (median of the rest)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant, the variant order rotated each time")
    ap.add_argument("--bf16-steps", type=int, default=3, help="steps of the bf16 PEFT run where bf16 is emulated")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: peak memory is the CUDA allocator's peak instead of RSS",
    )
    ap.add_argument(
        "--model",
        help=f"model directory (sets ${MODEL_ENV}); a directory with a config and tokenizer "
        "but no weights gets random weights",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep earlier runs (benchmarks/.train_step.DEVICE.json) of variants not run this time",
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep every earlier run in the store, of the variants run now too: repeats add up over invocations "
        "(where all repeats in one invocation would take too long); implies --keep",
    )
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--worker", nargs=4, metavar=("VARIANT", "WORKLOAD", "STEPS", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model:
        os.environ[MODEL_ENV] = args.model
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3])))
        return
    import torch

    from lorakit.train.device import resolve_precision

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_step.py: --device cuda, but torch sees no CUDA device here.")
    fast_bf16 = resolve_precision("auto", torch.device(args.device))[0] == "bf16"
    variants = []
    for v in args.variants:
        if v in AUTO and not fast_bf16:
            print(f"{v}: train.precision=auto resolves to fp32 here, the same run as lorakit-fp32; skipped")
        elif v == "lorakit-eager" and args.device == "cpu":
            print("lorakit-eager: no CUDA graphs on a CPU, the same run as lorakit-auto; skipped")
        elif "int8" in v and args.device == "cuda":
            print(f"{v}: int8 bases run on the CPU only (benchmarks/int8_cuda.py: not faster than bf16 here); skipped")
        else:
            variants.append(v)
    commit = git_rev()  # at the start: other work may be committed while the runs go on
    store = Path(__file__).with_name(f".train_step.{args.device}.json")
    runs = json.loads(store.read_text()) if (args.keep or args.append) and store.exists() else []
    if not args.append:
        now = {(w, v) for w in args.workloads for v in variants}
        runs = [r for r in runs if (r["workload"], r["variant"]) not in now]
    for workload in args.workloads:
        for rep in range(args.repeats):
            k = rep % len(variants)
            for variant in variants[k:] + variants[:k]:
                slow16 = _uses_bf16(variant, fast_bf16) and not fast_bf16
                if slow16 and rep > 0:
                    continue
                res = _run(variant, workload, args.bf16_steps if slow16 else args.steps, args.device)
                runs.append(res)
                store.write_text(json.dumps(runs, indent=1))
                s = median(res["times"][args.skip :] or res["times"][-1:])
                print(
                    f"[{workload} #{rep + 1}] {variant}: {s:.3f} s/step, peak {res['peak_gib']:.2f} GiB, "
                    f"loss@{res['steps']} {res['losses'][-1]:.4f}",
                    flush=True,
                )
    mem = (
        "peak GPU memory: CUDA allocator peak"
        if args.device == "cuda"
        else "peak RSS: VmHWM of the run's own fresh process, model and data included"
    )
    lines = [
        f"Machine: {machine()}; commit {commit} at the start; device {args.device}; `python benchmarks/train_step.py "
        f"{' '.join(sys.argv[1:]) or f'--steps {args.steps} --repeats {args.repeats}'}`"
        + (" (with the runs of earlier invocations kept in the store)." if args.append or args.keep else "."),
        "",
        f"SmolLM2-135M ({model_note()}), LoRA r=16 alpha=32 on {', '.join(TARGETS)}, AdamW lr 2e-4 weight "
        f"decay 0, same batches for every variant. Workloads: {_workload_note(runs)}. "
        f"Each variant ran {_repeats(runs)} in a fresh process, the variant order rotated on each repeat; "
        f"s/step is the median over the runs of each run's median of steps {args.skip + 1}..N, with the "
        f"spread (min-max) over the runs in brackets; {mem}, same median (min-max). `vs` is the matching "
        "PEFT baseline; `x` columns divide medians. Loss is after the run's last step (N), mean "
        f"cross-entropy over labelled tokens; `last {LAST} steps vs` averages each of the last {LAST} steps' loss "
        "over the baseline's on the same batch (first runs; one step's loss is one batch's, noisier). "
        "Heap allocator (lorakit.allocator: `lorakit train` preloads jemalloc "
        f"where it finds it): {_heaps(runs)}.",
        "",
        *_table(runs, args.skip, fast_bf16, args.device),
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(section("train_step.py", args.device), table)


if __name__ == "__main__":
    main()
