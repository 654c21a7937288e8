"""Greedy generation speed: plain model vs lorakit (unmerged, merged) vs PEFT (unmerged).

SmolLM2-135M-Instruct with a LoRA adapter (r=16 on all seven projections,
random non-zero B so the adapter is really computed), batch 1, greedy, the
same prompt for all; variants take turns on each repeat so machine load hits
them alike. Also times one forward over a 8 x 128 batch (prefill-like).
On the CPU also plain-int8 and lorakit-int8-unmerged: the model as `--quantize int8` builds it
(lorakit.int8_model.quantize_for_inference: the Linears int8, the output head int8 weights with
fp32 activations, lorakit.int8_head), the adapter unmerged in fp32 on top; and plain-int8-fp32-head,
the same with the head left fp32 (what `--quantize int8` did before the int8 head).

`--static` times lorakit.graph_decode instead (its own RESULTS section): static-KV-cache
decoding of plain / unmerged / merged, each step one CUDA graph replay on a GPU (recorded
inside every timed call, or once by a kept decoder whose later calls replay step and prefill)
and eager on the CPU, next to `model.generate`, then one replayed step per LoRA route; the
"x plain" column is the ratio issue 14 targets (unmerged <= 1.2x plain on a GPU).

    python benchmarks/inference.py [--new-tokens 48] [--repeats 5] [--static [--batch 1]] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import functools
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


def _variants(base, peft, tok=None, others: bool = True):
    """plain / lorakit-unmerged / lorakit-merged, and (``others``) PEFT's and, on the CPU, the int8 variants."""
    import lorakit

    cfg = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    torch.manual_seed(0)
    unmerged = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(init_lora_weights=False, **cfg)).eval()
    merged = lorakit.for_inference(copy.deepcopy(unmerged))
    variants = {"plain": base, "lorakit-unmerged": unmerged, "lorakit-merged": merged}
    if not others:
        return variants
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    variants["peft-unmerged"] = peft_model
    if next(base.parameters()).device.type == "cpu":  # --quantize int8 as the CLI builds it, the adapter fp32 on top
        from lorakit.int8_model import quantize_for_inference

        variants["plain-int8"] = quantize_for_inference(copy.deepcopy(base), "int8", tok).eval()
        variants["plain-int8-fp32-head"] = quantize_for_inference(copy.deepcopy(base), "int8", tok, head=False).eval()
        torch.manual_seed(0)  # the same adapter as lorakit-unmerged
        variants["lorakit-int8-unmerged"] = lorakit.inject(
            quantize_for_inference(copy.deepcopy(base), "int8", tok), lorakit.LoraConfig(init_lora_weights=False, **cfg)
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


UNFUSED = "static graph, LoRA as 3 ops"
REUSED = "static graph, decoder kept (the default)"
# Kept decoders with other LoRA routes than the default (q/k/v and gate/up each one kernel with their base
# matmuls, o and down a base matmul plus one LoRA kernel): static_decode's options per row.
REUSED_OTHER = {
    "static graph, decoder kept, base matmuls apart": dict(fuse_base="off"),
    "static graph, decoder kept, one LoRA kernel per projection": dict(group_siblings=False, fuse_base="off"),
    "static graph, decoder kept, every projection whole in one kernel": dict(fuse_base="all"),
}
# The replay table's LoRA routes: StaticDecoder's options per row.
ROUTES = {
    "one decode_lora kernel per projection": dict(group_siblings=False, fuse_base="off"),
    "one per q/k/v, gate/up group": dict(fuse_base="off"),
    "groups whole (base matmul in the kernel; the default)": dict(fuse_base="groups"),
    "every projection whole": dict(fuse_base="all"),
    "torch's 3 ops": dict(fuse_lora=False),
}


def static_decode_table(variants, prompt, device: torch.device, new_tokens: int, repeats: int, batch: int) -> str:
    """Tokens/s of lorakit.graph_decode.static_decode (graphed on CUDA) vs model.generate: plain / unmerged / merged.

    Every call decodes ``new_tokens`` (no EOS stop); a graphed call records its graph inside the timed call.
    "x plain" compares each variant with the plain model decoded the same way (issue 14: unmerged <= 1.2x).
    """
    from lorakit.graph_decode import static_decode

    ids, mask = prompt["input_ids"].repeat(batch, 1), prompt["attention_mask"].repeat(batch, 1)
    methods = {"generate": ["plain", "lorakit-unmerged"], "static eager": ["plain", "lorakit-unmerged"]}
    if device.type == "cuda":
        methods["static graph"] = ["plain", "lorakit-unmerged", "lorakit-merged"]
        methods[UNFUSED] = ["lorakit-unmerged"]  # the LoRA terms recorded as torch's three ops (fuse_lora=False)
        methods[REUSED] = ["plain", "lorakit-unmerged"]  # static_decode(reuse=True): recorded once, replayed per call
        for name in REUSED_OTHER:
            methods[name] = ["lorakit-unmerged"]
    else:
        methods["static eager"].append("lorakit-merged")
    # static_decode keeps one decoder per model: each kept unmerged row but the first gets its own copy of the
    # model, or the kept rows would replace each other's decoder (and record its graphs) in every call.
    kept = [REUSED, *REUSED_OTHER]
    copies = {m: copy.deepcopy(variants["lorakit-unmerged"]) for m in REUSED_OTHER if m in methods}
    runs = {}
    for method, names in methods.items():
        for k in names:
            if method == "generate":
                runs[(k, method)] = functools.partial(_hf_decode, variants[k], ids, mask, new_tokens)
            else:
                graph = "off" if method == "static eager" else "on"
                runs[(k, method)] = functools.partial(
                    static_decode,
                    copies[method] if k == "lorakit-unmerged" and method in copies else variants[k],
                    ids,
                    mask,
                    max_new_tokens=new_tokens,
                    graph=graph,
                    fuse_lora=method != UNFUSED,
                    reuse=method in kept,
                    **REUSED_OTHER.get(method, {}),
                )
    for (_, method), run in runs.items():
        if method in kept:  # the steady state: step and prefill graphs recorded, untimed
            run(), run()
    # The same tokens as generate (both stopping at the model's EOS here; the timed calls never stop early); on a GPU
    # from the kept decoder, its prefill and step replayed.
    unmerged, eos = variants["lorakit-unmerged"], variants["lorakit-unmerged"].generation_config.eos_token_id
    last = "static graph" if "static graph" in methods else "static eager"
    same = torch.equal(
        static_decode(
            unmerged,
            ids,
            mask,
            max_new_tokens=new_tokens,
            eos_token_id=eos,
            pad_token_id=0,
            graph="on" if last == "static graph" else "off",
        ),
        _hf_decode(unmerged, ids, mask, new_tokens, stop=True),
    )
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    how = "each step one CUDA graph replay, recorded in every call" if last == "static graph" else "eager steps"
    lines = [
        f"Machine: {machine()}; commit {git_rev()}; device {device.type}; {model_note()}.",
        "",
        f"Greedy decoding of {new_tokens} tokens (batch {batch}, no EOS stop), median of {repeats} calls; "
        f"`static` = lorakit.graph_decode.static_decode on a static KV cache ({how}; the unmerged q/k/v and "
        f"gate/up projections are one decode_lora kernel per group with their base matmuls (up to 16 rows), o and "
        f"down a base matmul plus one LoRA kernel where that fits (rows x rank <= 32: batch 1-2 at r=16), else "
        f"torch's three ops, as every LoRA term in the 'LoRA as 3 ops' row; the 'decoder kept' rows are timed "
        f"after two untimed calls recorded the step and the prefill, so each call replays both); its unmerged "
        f"tokens equal model.generate's: {same}.",
        "",
        "| variant | method | tokens/s | x plain (same method) |",
        "|---|---|---:|---:|",
    ]
    for (k, method), ts in times.items():
        base = "static graph" if method == UNFUSED else REUSED if method in kept else method
        ratio = median(ts) / median(times[("plain", base)])
        lines.append(f"| {k} | {method} | {batch * new_tokens / median(ts):.1f} | {ratio:.2f} |")
    if device.type == "cuda":
        lines += replay_table(variants, ids, mask, new_tokens, repeats)
    return "\n".join(lines)


def replay_table(variants, ids, mask, steps: int, repeats: int) -> list[str]:
    """One decoding step's time as a graph replay (recorded once, outside the timing): the steady state."""
    from lorakit import decode_lora
    from lorakit.graph_decode import StaticDecoder

    rows = [("plain", "-"), *(("lorakit-unmerged", how) for how in ROUTES), ("lorakit-merged", "-")]
    forced = None
    if not decode_lora.fits(ids.shape[0], 16):  # the LoRA kernel's limit, lifted for one row: still right here?
        forced = "groups whole, o and down's LoRA kernel past decode_lora.fits (its limit lifted)"
        rows.insert(-1, ("lorakit-unmerged", forced))
    times: dict[tuple[str, str], list[float]] = {row: [] for row in rows}
    decoders = {}
    for k, how in rows:
        cells = decode_lora.MAX_CELLS
        if how == forced:
            decode_lora.MAX_CELLS = 1 << 30  # the measured limit, lifted while this row's graph is recorded
        try:
            decoder = StaticDecoder(
                variants[k],
                ids.shape[1] + (repeats + 1) * steps + 1,
                graph=True,
                **ROUTES.get(how, {}),  # the forced row: the defaults (groups whole)
            )
            tokens = decoder.prefill(ids, mask).argmax(-1)
            decoder.step(tokens)  # records the graph
        finally:
            decode_lora.MAX_CELLS = cells
        decoders[(k, how)] = (decoder, tokens)
    for _ in range(repeats):
        for row, (decoder, tokens) in decoders.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                decoder.step(tokens)
            torch.cuda.synchronize()
            times[row].append((time.perf_counter() - t0) / steps)
    plain = median(times[("plain", "-")])
    lines = [
        "",
        f"One decoding step as a CUDA graph replay (recorded once, untimed), median of {repeats} x {steps} steps:",
        "",
        "| variant | LoRA term | µs/step | x plain |",
        "|---|---|---:|---:|",
    ]
    for (k, how), ts in times.items():
        lines.append(f"| {k} | {how} | {median(ts) * 1e6:.0f} | {median(ts) / plain:.2f} |")
    return lines


def _hf_decode(model, ids, mask, new_tokens: int, stop: bool = False) -> torch.Tensor:
    """model.generate's new tokens: exactly ``new_tokens`` of them, or up to them, stopping at EOS (``stop``)."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=None if stop else new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", help=f"model directory (sets ${MODEL_ENV}); config + tokenizer only -> random weights")
    ap.add_argument("--static", action="store_true", help="time lorakit.graph_decode (CUDA graphs on a GPU) only")
    ap.add_argument("--batch", type=int, default=1, help="rows per call with --static")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    if args.model:
        os.environ[MODEL_ENV] = args.model
    import peft

    device = torch.device(args.device)
    base, tok = load_bench_model(device)
    base.eval()
    variants = _variants(base, peft, tok, others=not args.static)
    merged, unmerged = variants["lorakit-merged"], variants["lorakit-unmerged"]

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Tell me about the sea."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt = {k: v.to(device) for k, v in prompt.items()}
    if args.static:
        table = static_decode_table(variants, prompt, device, args.new_tokens, args.repeats, args.batch)
        print(table)
        if not args.no_write:
            write_section(section("inference.py --static", device.type), table)
        return
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
    if not args.no_write:
        write_section(section("inference.py", device.type), table)


if __name__ == "__main__":
    main()
