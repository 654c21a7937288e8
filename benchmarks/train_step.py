"""Train-step speed and memory: lorakit vs PEFT on the embedded default model.

LoRA r=16, alpha=32 on all seven projections of SmolLM2-135M-Instruct, AdamW,
the same batches (same rows, same labels: assistant tokens only) for every
variant. Each variant runs in its own subprocess so peak RSS is honest.

    python benchmarks/train_step.py                 # both workloads, all variants
    python benchmarks/train_step.py --steps 10 --workloads short

Variants:
    peft-fp32       PEFT, fp32, transformers' own loss over full logits
    peft-bf16       PEFT under torch.autocast(bf16)
    lorakit-fp32    lorakit as `lorakit train` runs it: fused LoRA ops, fused SwiGLU MLPs,
                    loss only at labelled positions (chunked)
    lorakit-auto    lorakit with train.precision=auto (skipped when auto resolves to fp32)
    lorakit-gc      lorakit-fp32 plus gradient checkpointing (the memory-lean setting)

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
from _common import git_rev, machine, median, write_section  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["peft-fp32", "peft-bf16", "lorakit-fp32", "lorakit-auto", "lorakit-gc"]
WORKLOADS = {"short": (8, 64), "long": (4, 256)}  # name -> (batch size, max tokens per row)
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "quickstart_train.jsonl"


def _rows(tokenizer, workload: str, steps: int) -> list[list[dict]]:
    """Deterministic batches of tokenized chat rows (input_ids, labels) for the workload."""
    from lorakit.train.data import load_examples

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


def worker(variant: str, workload: str, steps: int, device: str = "cpu") -> dict:
    import torch

    import lorakit
    from lorakit.layers import fuse_swiglu_mlps
    from lorakit.models import load_model
    from lorakit.train.batching import collate
    from lorakit.train.fast import causal_lm_loss
    from lorakit.train.loop import resolve_precision

    torch.manual_seed(0)
    dev = torch.device(device)
    model, tok = load_model(None, device=dev)
    model.config.use_cache = False
    batches = [{k: v.to(dev) for k, v in collate(b, tok.pad_token_id, pad_to_multiple_of=8).items()}
               for b in _rows(tok, workload, steps)]
    bf16 = variant == "peft-bf16"
    if variant == "lorakit-auto":
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
        if variant == "lorakit-gc":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def loss_fn(batch):
            loss_sum, n = causal_lm_loss(model, batch)
            return loss_sum / max(n, 1)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    times, losses, tokens = [], [], 0
    for batch in batches:
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        tokens += int(batch["attention_mask"].sum())
    warm = times[1:] or times
    return {"variant": variant, "workload": workload, "steps": steps, "s_per_step": median(warm),
            "tokens_per_s": tokens / len(batches) / median(warm),
            "peak_rss_gb": (torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6),
            "final_loss": losses[-1], "bf16": bf16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--bf16-steps", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: peak memory is the CUDA allocator's peak instead of RSS")
    ap.add_argument("--keep", action="store_true",
                    help="keep earlier results (benchmarks/.train_step.json) of variants not run this time in the table")
    ap.add_argument("--worker", nargs=4, metavar=("VARIANT", "WORKLOAD", "STEPS", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3])))
        return
    import torch

    from lorakit.train.loop import resolve_precision

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_step.py: --device cuda, but torch sees no CUDA device here.")
    fast_bf16 = resolve_precision("auto", torch.device(args.device))[0] == "bf16"
    store = Path(__file__).with_name(".train_step.json")
    results = json.loads(store.read_text()) if args.keep and store.exists() else []
    for workload in args.workloads:
        for variant in args.variants:
            if variant == "lorakit-auto" and not fast_bf16:
                print(f"[{workload}] lorakit-auto: auto resolves to fp32 on this CPU, same as lorakit-fp32; skipped")
                continue
            bf16 = variant == "peft-bf16" or variant == "lorakit-auto"
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
             f"SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on {', '.join(TARGETS)}, AdamW lr 2e-4, same batches for "
             f"every variant; workloads: " + ", ".join(f"{k} = batch {b} x <= {t} tokens" for k, (b, t) in
                                                       WORKLOADS.items()) + ". Median s/step over steps 2..N.", "",
             f"Device: {args.device}" + (" (peak memory: CUDA allocator peak)" if args.device == "cuda" else "") + ".", "",
             "| workload | variant | steps | s/step | x PEFT fp32 | tokens/s | peak RSS GB | x PEFT fp32 | loss at last step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    results.sort(key=lambda r: (list(WORKLOADS).index(r["workload"]), VARIANTS.index(r["variant"])))
    for r in results:
        ref = next((x for x in results if x["workload"] == r["workload"] and x["variant"] == "peft-fp32"), None)
        t_ratio = r["s_per_step"] / ref["s_per_step"] if ref else float("nan")
        m_ratio = r["peak_rss_gb"] / ref["peak_rss_gb"] if ref else float("nan")
        loss = f"{r['final_loss']:.4f}" if not r["bf16"] or fast_bf16 else f"n/a ({r['steps']} steps)"
        lines.append(f"| {r['workload']} | {r['variant']} | {r['steps']} | {r['s_per_step']:.3f} | {t_ratio:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | {m_ratio:.2f} | {loss} |")
    table = "\n".join(lines)
    print(table)
    write_section("train_step.py", table)


if __name__ == "__main__":
    main()
