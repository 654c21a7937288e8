"""Greedy generation speed: plain model vs lorakit (unmerged, merged) vs PEFT (unmerged).

SmolLM2-135M-Instruct with a LoRA adapter (r=16 on all seven projections,
random non-zero B so the adapter is really computed), batch 1, greedy, the
same prompt for all; variants take turns on each repeat so machine load hits
them alike. Also times one forward over a 8 x 128 batch (prefill-like).

    python benchmarks/inference.py [--new-tokens 48] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_rev, machine, median, write_section  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import peft

    import lorakit
    from lorakit.models import load_model

    device = torch.device(args.device)
    base, tok = load_model(None, device=device)
    base.eval()
    cfg = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    torch.manual_seed(0)
    unmerged = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(init_lora_weights=False, **cfg)).eval()
    merged = lorakit.for_inference(copy.deepcopy(unmerged))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    variants = {"plain": base, "lorakit-unmerged": unmerged, "lorakit-merged": merged, "peft-unmerged": peft_model}

    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = {k: v.to(device) for k, v in prompt.items()}
    batch = torch.randint(0, base.config.vocab_size, (8, 128), device=device)
    gen_t: dict[str, list[float]] = {k: [] for k in variants}
    fwd_t: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for k, m in variants.items():  # warm-up
            m.generate(**prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        for _ in range(args.repeats):
            for k, m in variants.items():
                t0 = time.perf_counter()
                m.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)
                gen_t[k].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                m(input_ids=batch, use_cache=False)
                fwd_t[k].append(time.perf_counter() - t0)
        same = torch.equal(merged(**prompt).logits, merged(**prompt).logits)
        err = (merged(**prompt).logits - unmerged(**prompt).logits).abs().max().item()
    lines = [f"Machine: {machine()}; commit {git_rev()}.", "",
             f"Greedy generation of {args.new_tokens} tokens (batch 1) and one forward of 8 x 128 tokens; "
             f"median of {args.repeats}. Merged vs unmerged max |logit diff|: {err:.2e} (deterministic: {same}).", "",
             "| variant | tokens/s | x plain | forward 8x128 ms | x plain |", "|---|---:|---:|---:|---:|"]
    for k in variants:
        tps = args.new_tokens / median(gen_t[k])
        lines.append(f"| {k} | {tps:.1f} | {median(gen_t[k]) / median(gen_t['plain']):.2f} | "
                     f"{median(fwd_t[k]) * 1e3:.0f} | {median(fwd_t[k]) / median(fwd_t['plain']):.2f} |")
    table = "\n".join(lines)
    print(table)
    write_section("inference.py", table)


if __name__ == "__main__":
    main()
