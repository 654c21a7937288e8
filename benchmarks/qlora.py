"""QLoRA on the CPU: lorakit fp32 vs lorakit nf4 vs PEFT + bitsandbytes nf4, same batches, one run each.

LoRA r=16, alpha=32 on all seven projections of the embedded default model
(SmolLM2-135M-Instruct), AdamW lr 2e-4, the ``short`` workload of train_step.py
(8 chat rows a step from examples/data/quickstart_train.jsonl, whole, right-padded
to a multiple of 8). Every variant runs in a fresh subprocess, so its peak RSS
(``VmHWM``) is its own; the lorakit nf4 variants, like ``lorakit train`` on a 4-bit base
(``train.return_freed_memory`` unset), hand freed heap back to the OS after each step and 3
times during each forward pass (:mod:`lorakit.memory`); lorakit fp32 (off by default there)
and PEFT's do not. The lorakit variants run under jemalloc where :mod:`lorakit.allocator`
finds it (as ``lorakit train`` does; the returns then purge jemalloc's arenas), PEFT's on the
process's own malloc.

    python benchmarks/qlora.py                     # 30 steps each (the issue's setting)
    python benchmarks/qlora.py --steps 8 --skip 2  # a short run
    python benchmarks/qlora.py --variants lorakit-nf4 --no-write --json nf4.json   # one variant per call ...
    python benchmarks/qlora.py --from-json fp32.json nf4.json peft.json            # ... one table from all

Variants:
    lorakit-fp32    `lorakit train` with train.precision: fp32 on the full-precision base (fused ops)
    lorakit-nf4     `lorakit train` with model: {quantization: nf4, double_quant: true, compute_dtype: auto}
                    and train.precision: auto (bf16 compute on AMX/AVX512-BF16 CPUs, else fp32): the base's
                    Linears in bitsandbytes nf4, dequantized one layer at a time inside lorakit's fused ops
                    (q/k/v as one op, the SwiGLU MLP as one op), as `lorakit train` runs it: the 4-bit
                    matmuls in the compute dtype, their outputs and LoRA terms summed in fp32, embeddings /
                    norms / residual stream fp32, and with bf16 the step under bf16 autocast (attention, head)
    lorakit-nf4-gc  the same with train.gradient_checkpointing: true (lorakit's checkpointing, whose
                    rerun skips the MLP output), the memory recipe PEFT's prepare_model_for_kbit_training picks
    peft-nf4        transformers BitsAndBytesConfig(nf4, double quant, compute dtype as lorakit-nf4's) +
                    PEFT's prepare_model_for_kbit_training (its defaults: fp32 non-4-bit params, gradient
                    checkpointing) + get_peft_model, the step under autocast when the compute dtype is bf16

--compute fp32|bf16 sets the nf4 variants' train.precision (compute_dtype auto follows it), as a run config
does; auto (the default) is what train.precision: auto picks here.

Columns: base bytes = resident bytes of the frozen base (4-bit codes, absmax and quant maps counted; LoRA
excluded); 4-bit Linears vs bf16 = the quantized Linears' bytes over the same weights in bf16; peak RSS =
VmHWM of the worker process (load RSS: its VmHWM once the model is loaded and injected, before the first
step, so the part of the peak that loading alone sets); s/step = median over the steps after --skip; loss =
mean token loss of the last step.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    git_rev,
    lorakit_train_env,
    machine,
    median,
    model_note,
    rss_kib,
    run_worker,
    write_section,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["lorakit-fp32", "lorakit-nf4", "lorakit-nf4-gc", "peft-nf4"]
ROWS = 8
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "quickstart_train.jsonl"


def _batches(tokenizer, steps: int) -> list[dict]:
    from lorakit.examples import collate, load_examples

    examples, _ = load_examples(DATA, tokenizer, max_seq_len=4096)
    rng = random.Random(0)
    rows = [rng.choice(examples) for _ in range(ROWS * steps)]
    return [
        collate(rows[i * ROWS : (i + 1) * ROWS], tokenizer.pad_token_id, pad_to_multiple_of=8) for i in range(steps)
    ]


def _base_bytes(model) -> tuple[int, int, int]:
    """(resident bytes of the frozen base, bytes of its 4-bit Linears, those Linears' weights in bf16)."""
    total = four = four_bf16 = 0
    seen = set()
    for name, p in model.named_parameters():
        if "lora_" in name or id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * p.element_size()
        if p.__class__.__name__ == "Params4bit":
            qs = p.quant_state
            extra = qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
            if qs.nested:
                s2 = qs.state2
                extra += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()
            four += n + extra
            four_bf16 += qs.shape.numel() * 2
            n += extra
        total += n
    for b in model.buffers():
        total += b.numel() * b.element_size()
    return total, four, four_bf16


def worker(variant: str, steps: int, compute: str = "auto") -> dict:
    import torch

    import lorakit
    from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps
    from lorakit.memory import return_freed_memory, return_freed_memory_during
    from lorakit.models import load_model, resolve_model
    from lorakit.quant import resolve_compute_dtype
    from lorakit.train.device import resolve_precision
    from lorakit.train.graphs import decoder_layers
    from lorakit.train.lm_loss import causal_lm_loss
    from lorakit.train.recompute import enable_checkpointing
    from lorakit.train.schedule import make_optimizer

    torch.manual_seed(0)
    dev = torch.device("cpu")
    # The nf4 variants' train.precision (auto: what a run picks here); compute_dtype auto follows it, and the step
    # runs under bf16 autocast exactly when the precision is bf16 (lorakit.train.loop; PEFT under the Trainer's bf16).
    precision = resolve_precision(compute, dev)[0]
    cd = resolve_compute_dtype("auto", dev, precision=precision)[0]
    bf16 = variant != "lorakit-fp32" and precision == "bf16"
    if variant == "peft-nf4":
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from lorakit.models import load_tokenizer

        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=cd
        )
        path = resolve_model(None)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.float32)
        tok = load_tokenizer(None)
        model.config.use_cache = False
        model = peft.prepare_model_for_kbit_training(model)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))

        def loss_fn(batch):
            return model(**batch).loss
    else:
        kw = {"quantization": "nf4", "double_quant": True, "compute_dtype": cd} if "nf4" in variant else {}
        model, tok = load_model(None, dtype=torch.float32, device=dev, **kw)
        model.config.use_cache = False
        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        fuse_swiglu_mlps(model)  # as `lorakit train` does (4-bit layers fuse like the others)
        fuse_shared_inputs(model)
        if variant.endswith("-gc"):
            enable_checkpointing(model)

        def loss_fn(batch):
            loss_sum, n = causal_lm_loss(model, batch)
            return loss_sum / max(n, 1)

    base, four, four_bf16 = _base_bytes(model)
    load_gib = rss_kib("VmHWM") / 2**20
    batches = _batches(tok, steps)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 2e-4, 0.0, dev)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
    # as `lorakit train`: train.return_freed_memory unset is on for a 4-bit base, off otherwise; PEFT's loop never
    trim = variant.startswith("lorakit-nf4")
    if trim:  # on a CPU: freed heap back to the OS during the forward pass too
        return_freed_memory_during(decoder_layers(model))
    times, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if trim:  # as `lorakit train` does after each CPU step: freed heap back to the OS (lorakit.memory)
            return_freed_memory()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {
        "variant": variant,
        "steps": steps,
        "times": times,
        "losses": losses,
        "compute": "bf16" if bf16 else "fp32",
        "base_bytes": base,
        "four_bytes": four,
        "four_bf16": four_bf16,
        "peak_gib": rss_kib("VmHWM") / 2**20,
        "load_gib": load_gib,
    }


def _run(variant: str, steps: int, compute: str) -> dict:
    env = lorakit_train_env() if variant.startswith("lorakit") else None  # the heap `lorakit train` would have
    return run_worker(__file__, [variant, str(steps), "--compute", compute], variant, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument(
        "--compute",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the nf4 variants' train.precision (their compute dtype follows it)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--json", type=Path, help="also write the runs (and the commit) to this file")
    ap.add_argument("--from-json", type=Path, nargs="+", help="no runs: one table from earlier --json files")
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], int(args.worker[1]), args.compute)))
        return
    if args.from_json:  # variants run in separate calls (each call holds the CPU for one variant only)
        saved = [json.loads(f.read_text()) for f in args.from_json]
        runs = {v: r for d in saved for v, r in d["runs"].items()}
        runs = dict(sorted(runs.items(), key=lambda kv: (VARIANTS.index(kv[0].split(" ")[0]), kv[0])))
        revs = sorted({d["rev"] for d in saved})
        rev, host = " / ".join(revs), saved[0]["machine"]
        steps = {r["steps"] for r in runs.values()}
        if len(steps) != 1:
            sys.exit(f"the runs have different step counts: {sorted(steps)}")
        args.steps = steps.pop()
        cmd = " ; ".join(d["command"] for d in saved) + f" ; then `--from-json` of the {len(saved)} files"
    else:
        rev, host = git_rev(), machine()
        label = "" if args.compute == "auto" else f" ({args.compute} compute)"  # keeps both apart in --from-json
        runs = {v + ("" if v == "lorakit-fp32" else label): _run(v, args.steps, args.compute) for v in args.variants}
        cmd = f"python benchmarks/qlora.py --steps {args.steps} --skip {args.skip} --variants {' '.join(args.variants)}"
        cmd += f" --compute {args.compute}" if args.compute != "auto" else ""
        if args.json:
            args.json.write_text(json.dumps({"rev": rev, "machine": host, "command": f"`{cmd}`", "runs": runs}))
        cmd = f"`{cmd}`"
    fp32, peft = runs.get("lorakit-fp32"), runs.get("peft-nf4")
    lines = [
        f"{host}; {model_note()}; commit {rev}; {args.steps} steps of {ROWS} rows, r=16 on all seven "
        f"projections; s/step = median after {args.skip} warm-up steps; one run per variant, each in a fresh "
        f"process. Run: {cmd}.",
        "",
        "| variant | compute | base MiB | 4-bit Linears vs bf16 | load RSS GiB | peak RSS GiB | x lorakit-fp32 "
        "| x peft-nf4 | s/step | x lorakit-fp32 | x peft-nf4 | loss after N | vs lorakit-fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, r in runs.items():
        s = median(r["times"][args.skip :] or r["times"][-1:])

        def x(key, other, r=r, s=s):
            if other is None:
                return "n/a"
            mine = s if key == "s" else r[key]
            theirs = median(other["times"][args.skip :] or other["times"][-1:]) if key == "s" else other[key]
            return f"{mine / theirs:.2f}"

        ratio4 = f"{r['four_bytes'] / r['four_bf16']:.3f}" if r["four_bf16"] else ""
        dloss = f"{(r['losses'][-1] / fp32['losses'][-1] - 1) * 100:+.2f}%" if fp32 else ""
        load = f"{r['load_gib']:.2f}" if "load_gib" in r else ""
        lines.append(
            f"| {v} | {r['compute']} | {r['base_bytes'] / 2**20:.0f} | {ratio4} | {load} | {r['peak_gib']:.2f} "
            f"| {x('peak_gib', fp32)} | {x('peak_gib', peft)} | {s:.3f} | {x('s', fp32)} | {x('s', peft)} "
            f"| {r['losses'][-1]:.4f} (N={r['steps']}) | {dloss} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("qlora", body)


if __name__ == "__main__":
    main()
