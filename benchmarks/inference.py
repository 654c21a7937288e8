"""Greedy generation speed: plain model vs lorakit (unmerged, merged) vs PEFT (unmerged).

SmolLM2-135M-Instruct with a LoRA adapter (r=16 on all seven projections,
random non-zero B so the adapter is really computed), batch 1, greedy, the
same prompt for all; variants take turns on each repeat so machine load hits
them alike. Also times one forward over a 8 x 128 batch (prefill-like).
On the CPU also plain-int8 and lorakit-int8-unmerged: the base's Linears in int8
(`--quantize int8`, lorakit.int8), the adapter unmerged in fp32 on top.

    python benchmarks/inference.py [--new-tokens 48] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import MODEL_ENV, git_rev, load_bench_model, machine, median, model_note, section, write_section  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _variants(base, peft, tok=None):
    import lorakit

    cfg = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    torch.manual_seed(0)
    unmerged = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(init_lora_weights=False, **cfg)).eval()
    merged = lorakit.for_inference(copy.deepcopy(unmerged))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    variants = {"plain": base, "lorakit-unmerged": unmerged, "lorakit-merged": merged, "peft-unmerged": peft_model}
    if next(base.parameters()).device.type == "cpu":  # --quantize int8: int8 base Linears, the adapter fp32 on top
        from lorakit.int8_model import calibration_ids, quantize_int8

        calib = calibration_ids(tok) if tok is not None else None  # SmoothQuant calibrated as the CLI does
        variants["plain-int8"] = quantize_int8(copy.deepcopy(base), calibration=calib).eval()
        torch.manual_seed(0)  # the same adapter as lorakit-unmerged
        variants["lorakit-int8-unmerged"] = lorakit.inject(
            quantize_int8(copy.deepcopy(base), calibration=calib), lorakit.LoraConfig(init_lora_weights=False, **cfg)
        ).eval()
    return variants


def overhead_proxy(device: torch.device, repeats: int) -> list[str]:
    """Decoding-like forwards where per-module overhead dominates, as batch-1 decoding does on a GPU.

    SmolLM2-135M's 30 layers and projections, but hidden size 64: the matmuls cost next to nothing, so
    the time is the Python and dispatch each variant adds per module call.
    """
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    path = os.environ.get(MODEL_ENV)
    big = AutoConfig.from_pretrained(path) if path else LlamaConfig(num_hidden_layers=30)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=big.num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).to(device).eval()
    variants = _variants(base, peft)
    ids = torch.randint(0, 256, (1, 8), device=device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for m in variants.values():
            m(input_ids=ids, use_cache=False)
        for _ in range(repeats):
            for k, m in variants.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(20):
                    m(input_ids=ids, use_cache=False)
                _sync(device)
                times[k].append((time.perf_counter() - t0) / 20)
    lines = [
        "",
        f"Overhead-bound proxy ({cfg.num_hidden_layers} layers of hidden size 64, one forward of 1 x 8 "
        "tokens, median of 20-forward means): what batch-1 decoding on a GPU pays per module call.",
        "",
        "| variant | forward ms | x plain |",
        "|---|---:|---:|",
    ]
    for k in variants:
        lines.append(f"| {k} | {median(times[k]) * 1e3:.2f} | {median(times[k]) / median(times['plain']):.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", help=f"model directory (sets ${MODEL_ENV}); config + tokenizer only -> random weights")
    args = ap.parse_args()
    if args.model:
        os.environ[MODEL_ENV] = args.model
    import peft

    device = torch.device(args.device)
    base, tok = load_bench_model(device)
    base.eval()
    variants = _variants(base, peft, tok)
    merged, unmerged = variants["lorakit-merged"], variants["lorakit-unmerged"]

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Tell me about the sea."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt = {k: v.to(device) for k, v in prompt.items()}
    batch = torch.randint(0, base.config.vocab_size, (8, 128), device=device)
    gen_t: dict[str, list[float]] = {k: [] for k in variants}
    fwd_t: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for m in variants.values():  # warm-up
            m.generate(**prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        for _ in range(args.repeats):
            for k, m in variants.items():
                _sync(device)
                t0 = time.perf_counter()
                m.generate(
                    **prompt,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
                _sync(device)
                gen_t[k].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                m(input_ids=batch, use_cache=False)
                _sync(device)
                fwd_t[k].append(time.perf_counter() - t0)
        same = torch.equal(merged(**prompt).logits, merged(**prompt).logits)
        err = (merged(**prompt).logits - unmerged(**prompt).logits).abs().max().item()
    lines = [
        f"Machine: {machine()}; commit {git_rev()}; device {device.type}; {model_note()}.",
        "",
        f"Greedy generation of {args.new_tokens} tokens (batch 1) and one forward of 8 x 128 tokens; "
        f"median of {args.repeats}. Merged vs unmerged max |logit diff|: {err:.2e} (deterministic: {same}).",
        "",
        "| variant | tokens/s | x plain | forward 8x128 ms | x plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in variants:
        tps = args.new_tokens / median(gen_t[k])
        lines.append(
            f"| {k} | {tps:.1f} | {median(gen_t[k]) / median(gen_t['plain']):.2f} | "
            f"{median(fwd_t[k]) * 1e3:.0f} | {median(fwd_t[k]) / median(fwd_t['plain']):.2f} |"
        )
    lines += overhead_proxy(device, args.repeats)
    table = "\n".join(lines)
    print(table)
    write_section(section("inference.py", device.type), table)


if __name__ == "__main__":
    main()
