"""Train-step speed and memory: lorakit vs PEFT on the embedded default model.

LoRA r=16, alpha=32 on all seven projections of SmolLM2-135M-Instruct, AdamW,
the same batches (same rows, same labels: assistant tokens only) for every
variant. Each variant runs in its own subprocess so peak RSS is honest.

    python benchmarks/train_step.py                 # both workloads, all variants
    python benchmarks/train_step.py --steps 10 --workloads short

Variants:
    peft-fp32       PEFT, fp32, transformers' own loss over full logits
    peft-bf16       PEFT under torch.autocast(bf16)
    lorakit-fp32    lorakit as `lorakit train` runs it: fused LoRA ops, fused SwiGLU MLPs, on CUDA its graphs,
                    loss only at labelled positions (chunked)
    lorakit-auto    lorakit with train.precision=auto (skipped when auto resolves to fp32); on CUDA
                    with its CUDA graphs (decoder layers recorded per padded shape) and fused AdamW
    lorakit-eager   lorakit-auto without CUDA graphs (what the graphs add)
    lorakit-gc      lorakit-fp32 plus its gradient checkpointing (the memory-lean setting; the rerun skips the MLP output)
    lorakit-gc2     the same, every 2nd decoder layer only (gradient_checkpointing: 2)
    lorakit-compile experiment, not run by default: lorakit-auto with each decoder layer torch.compile'd

On a CPU without AVX512-BF16/AMX, bf16 matmuls are emulated and very slow; the
bf16 variants then run only --bf16-steps steps (time and memory only, no loss).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import MODEL_ENV, git_rev, load_bench_model, machine, median, model_note, section, write_section  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["peft-fp32", "peft-bf16", "lorakit-fp32", "lorakit-auto", "lorakit-eager", "lorakit-gc",
            "lorakit-gc2", "lorakit-compile"]
DEFAULT_VARIANTS = VARIANTS[:7]
WORKLOADS = {"short": (8, 64), "long": (4, 256)}  # name -> (batch size, max tokens per row)
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "quickstart_train.jsonl"


def _rows(tokenizer, workload: str, steps: int) -> list[list[dict]]:
    """Deterministic batches of tokenized chat rows (input_ids, labels) for the workload."""
    from lorakit.examples import load_examples

    batch, max_len = WORKLOADS[workload]
    examples, _ = load_examples(DATA, tokenizer, max_seq_len=4096)
    rng = random.Random(0)
    rows = []
    while len(rows) < batch * steps:
        if workload == "short":
            rows.append(rng.choice(examples))
        else:  # multi-turn: concatenate examples until ~max_len tokens
            ids, labels = [], []
            while len(ids) < max_len:
                ex = rng.choice(examples)
                ids += ex["input_ids"]
                labels += ex["labels"]
            rows.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    return [rows[i * batch:(i + 1) * batch] for i in range(steps)]


def build(variant: str, workload: str, steps: int, device: str = "cpu"):
    """Set one variant up: returns ``(step, batches, bf16)``; ``step(batch)`` runs one optimizer step
    and returns the loss tensor."""
    import torch

    import lorakit
    from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps
    from lorakit.examples import collate
    from lorakit.train.lm_loss import causal_lm_loss
    from lorakit.train.graphs import setup_graphs
    from lorakit.train.recompute import enable_checkpointing
    from lorakit.train.loop import GRAPH_PAD, make_optimizer, resolve_precision

    torch.manual_seed(0)
    dev = torch.device(device)
    model, tok = load_bench_model(dev)
    model.config.use_cache = False
    # lorakit pads to GRAPH_PAD when it records CUDA graphs (as `lorakit train` does): more padding, same loss
    graphed = variant in ("lorakit-fp32", "lorakit-auto") and dev.type == "cuda"
    pad = GRAPH_PAD if graphed else 8
    batches = [{k: v.to(dev) for k, v in collate(b, tok.pad_token_id, pad_to_multiple_of=pad).items()}
               for b in _rows(tok, workload, steps)]
    bf16 = variant == "peft-bf16"
    if variant in ("lorakit-auto", "lorakit-eager", "lorakit-compile"):
        bf16 = resolve_precision("auto", dev)[0] == "bf16"
    if variant.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))

        def loss_fn(batch):
            return model(**batch).loss
    else:
        if bf16:
            model = model.to(torch.bfloat16)
        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        fuse_swiglu_mlps(model)  # as `lorakit train` does
        fuse_shared_inputs(model)
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
    graphs = None
    if variant.startswith("peft"):
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)  # as make_optimizer below
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    else:  # as `lorakit train` sets it up: fused AdamW on CUDA, CUDA graphs where the run allows them
        opt = make_optimizer(params, 2e-4, 0.0, dev)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
        if graphed:  # "on": a run that cannot use graphs is an error, as with train.cuda_graphs: on
            graphs = setup_graphs(model, "on", dev, say=lambda msg: None)

    def step(batch):
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=graphs is None)
        return loss

    return step, batches, bf16


def worker(variant: str, workload: str, steps: int, device: str = "cpu") -> dict:
    import torch

    step, batches, bf16 = build(variant, workload, steps, device)
    times, losses, tokens = [], [], 0
    for batch in batches:
        t0 = time.perf_counter()
        loss = step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        tokens += int(batch["attention_mask"].sum())
    warm = times[1:] or times
    return {"variant": variant, "workload": workload, "steps": steps, "s_per_step": median(warm),
            "tokens_per_s": tokens / len(batches) / median(warm),
            "peak_rss_gb": (torch.cuda.max_memory_allocated() / 1e9 if device == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6),
            "final_loss": losses[-1], "bf16": bf16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--bf16-steps", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: peak memory is the CUDA allocator's peak instead of RSS")
    ap.add_argument("--model", help=f"model directory (sets ${MODEL_ENV}); a directory with a config and tokenizer "
                    "but no weights gets random weights")
    ap.add_argument("--keep", action="store_true",
                    help="keep earlier results (benchmarks/.train_step.json) of variants not run this time in the table")
    ap.add_argument("--worker", nargs=4, metavar=("VARIANT", "WORKLOAD", "STEPS", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model:
        os.environ[MODEL_ENV] = args.model
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3])))
        return
    import torch

    from lorakit.train.loop import resolve_precision

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_step.py: --device cuda, but torch sees no CUDA device here.")
    fast_bf16 = resolve_precision("auto", torch.device(args.device))[0] == "bf16"
    store = Path(__file__).with_name(f".train_step.{args.device}.json")
    results = json.loads(store.read_text()) if args.keep and store.exists() else []
    for workload in args.workloads:
        for variant in args.variants:
            if variant in ("lorakit-auto", "lorakit-eager", "lorakit-compile") and not fast_bf16:
                print(f"[{workload}] {variant}: auto resolves to fp32 on this CPU, same as lorakit-fp32; skipped")
                continue
            bf16 = variant in ("peft-bf16", "lorakit-auto", "lorakit-eager", "lorakit-compile")
            steps = args.steps if (fast_bf16 or not bf16) else args.bf16_steps
            out = subprocess.run([sys.executable, __file__, "--worker", variant, workload, str(steps), args.device],
                                 capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                sys.exit(f"worker {variant}/{workload} failed")
            res = json.loads(line[7:])
            results = [r for r in results if (r["workload"], r["variant"]) != (workload, variant)] + [res]
            store.write_text(json.dumps(results, indent=1))
            print(f"[{workload}] {variant}: {res['s_per_step']:.3f} s/step, {res['tokens_per_s']:.0f} tok/s, "
                  f"RSS {res['peak_rss_gb']:.2f} GB, loss@{res['steps']} {res['final_loss']:.4f}", flush=True)
    lines = [f"Machine: {machine()}; commit {git_rev()}.", "",
             f"SmolLM2-135M ({model_note()}), LoRA r=16 alpha=32 on {', '.join(TARGETS)}, "
             f"AdamW lr 2e-4 weight decay 0, same batches for "
             f"every variant; workloads: " + ", ".join(f"{k} = batch {b} x <= {t} tokens" for k, (b, t) in
                                                       WORKLOADS.items()) + ". Median s/step over steps 2..N.", "",
             f"Device: {args.device}" + (" (peak memory: CUDA allocator peak)" if args.device == "cuda" else "") + ".", "",
             "| workload | variant | steps | s/step | x PEFT fp32 | x PEFT bf16 | tokens/s | peak mem GB | x PEFT fp32 "
             "| loss at last step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    results.sort(key=lambda r: (list(WORKLOADS).index(r["workload"]), VARIANTS.index(r["variant"])))
    for r in results:
        ref = next((x for x in results if x["workload"] == r["workload"] and x["variant"] == "peft-fp32"), None)
        ref16 = next((x for x in results if x["workload"] == r["workload"] and x["variant"] == "peft-bf16"), None)
        t_ratio = r["s_per_step"] / ref["s_per_step"] if ref else float("nan")
        t16 = f"{r['s_per_step'] / ref16['s_per_step']:.2f}" if ref16 else "n/a"
        m_ratio = r["peak_rss_gb"] / ref["peak_rss_gb"] if ref else float("nan")
        loss = f"{r['final_loss']:.4f}" if not r["bf16"] or fast_bf16 else f"n/a ({r['steps']} steps)"
        lines.append(f"| {r['workload']} | {r['variant']} | {r['steps']} | {r['s_per_step']:.3f} | {t_ratio:.2f} | {t16} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | {m_ratio:.2f} | {loss} |")
    table = "\n".join(lines)
    print(table)
    write_section(section("train_step.py", args.device), table)


if __name__ == "__main__":
    main()
