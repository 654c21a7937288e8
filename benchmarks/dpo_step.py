"""DPO step speed and memory: lorakit vs TRL's DPOTrainer + PEFT on the embedded default model.

The same pairs (examples/data/dpo_train.jsonl, tokenized once by TRL's DPOTrainer;
lorakit's tokenization is tested equal to it), the same batches of ``--pairs``
pairs a step, the same starting LoRA (PEFT's init, saved and loaded into lorakit),
r=16 alpha=32 on all seven projections, no dropout, AdamW (lr 5e-5, weight decay 0),
β = 0.1, sigmoid loss, reference = the base with adapters disabled, fp32 (and bf16 pairs), no
gradient checkpointing. Every run is a fresh subprocess, so its peak RSS
(``VmHWM``) is its own; runs are repeated with the variant order rotated. The lorakit
variants run under jemalloc where :mod:`lorakit.allocator` finds it, as ``lorakit train``
does; TRL's on the process's own malloc.

Variants:
    trl           TRL 1.16 DPOTrainer's own step computation (``_compute_loss``: policy and
                  reference forwards through its fused LM head) on its PEFT model, then AdamW
    lorakit       the step ``lorakit train`` runs for ``method: dpo``: fused LoRA ops and SwiGLU
                  MLPs, reference under ``reference_mode``, log-probs only at answer tokens, pairs
                  packed with each prompt once (``pack_pairs``; same loss, fewer tokens than TRL's
                  2B padded rows)
    lorakit-sft   lorakit's SFT step on the same 2B sequences (labels on the answers): the
                  yardstick for "no second model" (DPO peak memory vs SFT on the same tokens)
    trl-bf16      trl as a bf16 user runs it (DPOConfig(bf16=True): fp32 weights, the step under
                  accelerate's bf16 autocast)
    lorakit-bf16  lorakit as `lorakit train` runs it with precision bf16 (what auto picks on a CPU with
                  AVX512-BF16 / AMX): base stored in bf16, adapters fp32, autocast

    python benchmarks/dpo_step.py --steps 30 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    git_rev,
    load_bench_model,
    lorakit_train_env,
    machine,
    median,
    model_note,
    rss_kib,
    run_worker,
    write_section,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["trl", "lorakit", "lorakit-sft", "trl-bf16", "lorakit-bf16"]
BASELINE = {"trl": "trl", "lorakit": "trl", "lorakit-sft": "trl", "trl-bf16": "trl-bf16", "lorakit-bf16": "trl-bf16"}
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "dpo_train.jsonl"
LR, BETA = 5e-5, 0.1


def _trainer(model, tok, out: Path, pairs: int, bf16: bool = False):
    """TRL's DPOTrainer on a fresh PEFT LoRA (its tokenized data set and collator come with it)."""
    import warnings

    import peft
    import trl
    from datasets import Dataset

    rows = Dataset.from_list([json.loads(line) for line in DATA.read_text().splitlines()])
    args = trl.DPOConfig(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        bf16=bf16,
        gradient_checkpointing=False,
        max_length=None,
        per_device_train_batch_size=pairs,
        beta=BETA,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.DPOTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            processing_class=tok,
            peft_config=peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0),
        )


def worker(variant: str, steps: int, pairs: int, tmp: str) -> dict:
    """Run one variant in this fresh process: per-step times, losses and peak RSS."""
    import torch

    torch.manual_seed(0)
    model, tok = load_bench_model(torch.device("cpu"))
    model.config.use_cache = False
    bf16 = variant.endswith("-bf16")
    # TRL tokenizes; its PEFT init (same seed, same fp32 model in every variant) is the shared starting LoRA
    trainer = _trainer(model, tok, Path(tmp) / "trl", pairs, bf16=bf16 and variant.startswith("trl"))
    data = trainer.train_dataset
    batches = [[data[(s * pairs + i) % len(data)] for i in range(pairs)] for s in range(steps)]
    if variant.startswith("trl"):
        model = trainer.model
        params = [p for p in model.parameters() if p.requires_grad]
        autocast = trainer.accelerator.autocast  # bf16 autocast with DPOConfig(bf16=True), else a no-op

        def loss_fn(rows):
            with autocast():
                return trainer._compute_loss(model, trainer.data_collator(rows), False)
    else:
        import lorakit
        from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps
        from lorakit.norms import route_rms_norms
        from lorakit.train.dpo import DpoObjective
        from lorakit.train.objective import CausalLmObjective

        trainer.model.save_pretrained(Path(tmp) / "start", selected_adapters=["default"])
        base = trainer.model.unload()  # the same base weights, no PEFT left
        del trainer
        if bf16:  # as `lorakit train` with precision bf16: the frozen base stored in bf16
            base = base.to(torch.bfloat16)
        model = lorakit.load_adapter(base, Path(tmp) / "start", is_trainable=True)
        fuse_swiglu_mlps(model)
        fuse_shared_inputs(model)
        route_rms_norms(model)  # as `lorakit train` does
        params = [p for p in model.parameters() if p.requires_grad]
        to_pairs = [
            [
                {"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
                for r in b
            ]
            for b in batches
        ]
        if variant != "lorakit-sft":
            objective = DpoObjective(tok.pad_token_id, BETA, "sigmoid", 0.0, None)
            batches = [objective.collate(b, 8) for b in to_pairs]
        else:
            objective = CausalLmObjective(tok.pad_token_id)
            batches = [
                objective.collate(
                    [
                        {"input_ids": p["prompt_ids"] + p[k], "labels": [-100] * len(p["prompt_ids"]) + p[k]}
                        for k in ("chosen_ids", "rejected_ids")
                        for p in b
                    ],
                    8,
                )
                for b in to_pairs
            ]

        def loss_fn(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                loss_sum, n, _ = objective.loss(model, batch)
            return loss_sum / max(n, 1)

    model.train()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    times, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"variant": variant, "steps": steps, "times": times, "losses": losses, "peak_gib": rss_kib("VmHWM") / 2**20}


def _run(variant: str, steps: int, pairs: int, tmp: Path) -> dict:
    env = lorakit_train_env() if variant.startswith("lorakit") else None  # the heap `lorakit train` would have
    return run_worker(__file__, [variant, str(steps), str(pairs), str(tmp)], variant, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (loss compared after the last)")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing")
    ap.add_argument("--pairs", type=int, default=4, help="pairs a step (2x as many sequences)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        v, steps, pairs, tmp = args.worker
        print("RESULT " + json.dumps(worker(v, int(steps), int(pairs), tmp)))
        return
    import tempfile

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            k = rep % len(args.variants)
            for variant in args.variants[k:] + args.variants[:k]:
                res = _run(variant, args.steps, args.pairs, Path(tmp) / f"{variant}{rep}")
                runs.append(res)
                print(
                    f"[#{rep + 1}] {variant}: {median(res['times'][args.skip :]):.3f} s/step, "
                    f"peak {res['peak_gib']:.2f} GiB, loss@{res['steps']} {res['losses'][-1]:.4f}",
                    flush=True,
                )
    agg = {v: [r for r in runs if r["variant"] == v] for v in args.variants}

    def med(v, f):
        return median([f(r) for r in agg[v]]) if agg.get(v) else float("nan")

    def step_s(r):
        return median(r["times"][args.skip :])

    lines = [
        f"Machine: {machine()}; commit {git_rev()}; `python benchmarks/dpo_step.py --steps {args.steps} "
        f"--pairs {args.pairs} --repeats {args.repeats}`.",
        "",
        f"SmolLM2-135M ({model_note()}), LoRA r=16 alpha=32 on {', '.join(TARGETS)}, no dropout, AdamW "
        f"lr {LR} wd 0, β {BETA}, sigmoid loss, reference = base (adapters disabled), {args.pairs} pairs a step "
        f"from examples/data/dpo_train.jsonl, same batches and same starting LoRA for every variant. Each "
        "variant in a fresh process; s/step = median of steps after the first "
        f"{args.skip}; peak RSS = VmHWM of that process (model and data included).",
        "",
        "| variant | vs | s/step | x vs | peak RSS GiB | x vs | x lorakit-sft | loss after N steps | loss vs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in args.variants:
        if not agg.get(v):
            continue
        s, peak, loss = med(v, step_s), med(v, lambda r: r["peak_gib"]), med(v, lambda r: r["losses"][-1])
        base = BASELINE[v]
        ratio_t = f"{s / med(base, step_s):.2f}" if base in agg else "n/a"
        ratio_m = f"{peak / med(base, lambda r: r['peak_gib']):.2f}" if base in agg else "n/a"
        ratio_sft = f"{peak / med('lorakit-sft', lambda r: r['peak_gib']):.2f}" if "lorakit-sft" in agg else "n/a"
        base_loss = med(base, lambda r: r["losses"][-1]) if base in agg else None
        loss_vs = f"{(loss / base_loss - 1) * 100:+.2f}%" if base_loss and v != "lorakit-sft" else ""
        lines.append(
            f"| {v} | {base} | {s:.3f} | {ratio_t} | {peak:.2f} | {ratio_m} | {ratio_sft} | {loss:.4f} "
            f"(N={args.steps}) | {loss_vs} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("dpo_step.py", table)


if __name__ == "__main__":
    main()
