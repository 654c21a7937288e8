"""lorakit.graph_decode: static-KV-cache decoding equals model.generate; the step is capturable; CUDA graphs.

References: transformers' ``model.generate`` (its dynamic cache, its mask and position code)
for the tokens on the CPU; fake tensors (no values) for "nothing in the step reads a value on
the host", checked to fail when a read is added; on a GPU (skipped here without one; run by
``bash benchmarks/device_run.sh decode``), the eager step for the graphed one.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_llama
from tiny import make_tiny_model_dir

import lorakit
from lorakit import generation
from lorakit.errors import ConfigError
from lorakit.graph_decode import StaticDecoder, capture_blocker, fake_step, static_decode
from lorakit.layers import ModulesToSaveWrapper
from lorakit.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = [5, 9, 3]  # prompts of different lengths: rows 0 and 2 left-padded
NEW = 12


def _plain(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    model = make_llama(seed, layers=layers)
    model.generation_config.eos_token_id = None  # generate's default EOS off: rows run to max_new_tokens unless told
    return model


def _lora(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed + 1)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = lorakit.inject(_plain(seed, layers), config)
    with torch.no_grad():  # non-zero B: the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


MODELS = {"plain": _plain, "unmerged-lora": _lora}


def _batch(lengths=LENGTHS, seed: int = 1, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    rows = [torch.randint(1, 96, (n,), generator=g).tolist() for n in lengths]
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _reference(model, ids, mask, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_greedy_tokens_equal_generate(kind):
    model = MODELS[kind]()
    ids, mask = _batch()
    ref = _reference(model, ids, mask, do_sample=False)
    got = static_decode(model, ids, mask, max_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(got, ref), (got, ref)
    one = static_decode(model, ids[1:2, -LENGTHS[1] :], mask[1:2, -LENGTHS[1] :], max_new_tokens=NEW)
    assert torch.equal(one[0], got[1])  # the unpadded row alone: padding changes nothing


@pytest.mark.parametrize("bucket", [4, 16])
def test_prompts_padded_to_a_bucket_decode_as_generate(bucket):
    model = _lora()
    ids, mask = _batch()
    decoder = StaticDecoder(model, 64, prefill_bucket=bucket)
    assert decoder.padded_width(ids.shape[1]) == bucket * -(-ids.shape[1] // bucket) > ids.shape[1]
    tokens = [decoder.prefill(ids, mask).argmax(-1)]
    assert int(decoder.slot) == decoder.padded_width(ids.shape[1])
    for _ in range(NEW - 1):
        tokens.append(decoder.step(tokens[-1]).argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), _reference(model, ids, mask))
    assert StaticDecoder(model, 10, prefill_bucket=bucket).padded_width(9) == 9  # never past the cache's room
    with pytest.raises(ConfigError, match="prefill_bucket"):
        StaticDecoder(model, 64, prefill_bucket=0)


def test_the_adapter_is_decoded_unmerged():
    plain, lora = _plain(), _lora()
    ids, mask = _batch()
    tuned = static_decode(lora, ids, mask, max_new_tokens=NEW)
    assert not torch.equal(tuned, static_decode(plain, ids, mask, max_new_tokens=NEW))  # the adapter is computed
    assert not any(layer.merged_adapters for layer in lora.modules() if hasattr(layer, "merged_adapters"))
    with lorakit.disable_adapters(lora):
        assert torch.equal(static_decode(lora, ids, mask, max_new_tokens=NEW), _reference(plain, ids, mask))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_eos_stops_rows_and_decoding(kind):
    model = MODELS[kind]()
    ids, mask = _batch()
    free = static_decode(model, ids, mask, max_new_tokens=NEW)
    eos = [int(free[1, 2]), int(free[0, 4])]  # row 1 stops at step 2 at the latest, row 0 at step 4
    ref = _reference(model, ids, mask, do_sample=False, eos_token_id=eos)
    got = static_decode(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, ref), (got, ref)
    first = [int((torch.isin(row, torch.tensor(eos))).nonzero()[0, 0]) for row in got[:2]]
    assert all((got[r, first[r] + 1 :] == 0).all() for r in range(2))  # padded after the row's EOS
    # every row stopping ends decoding early, at the step the last row stopped, as generate does
    last = [int(free[r, 1]) for r in range(3)]
    both = static_decode(model, ids, mask, max_new_tokens=NEW, eos_token_id=last, pad_token_id=0)
    assert both.shape[1] <= 2 and torch.equal(both, _reference(model, ids, mask, eos_token_id=last))


def test_sampling_draws_as_generate_does():
    model = _lora()
    ids, mask = _batch()
    torch.manual_seed(5)
    ref = _reference(model, ids, mask, do_sample=True, temperature=0.7, top_k=0, top_p=1.0)
    torch.manual_seed(5)
    got = static_decode(model, ids, mask, max_new_tokens=NEW, pad_token_id=0, do_sample=True, temperature=0.7)
    assert torch.equal(got, ref)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = static_decode(model, ids, mask, max_new_tokens=NEW, do_sample=True, temperature=2.0, generator=g1)
    b = static_decode(model, ids, mask, max_new_tokens=NEW, do_sample=True, temperature=2.0, generator=g2)
    assert torch.equal(a, b) and not torch.equal(a, static_decode(model, ids, mask, max_new_tokens=NEW))


def test_eager_attention_masks_as_sdpa():
    model = _lora()
    model.set_attn_implementation("eager")
    ids, mask = _batch()
    assert torch.equal(static_decode(model, ids, mask, max_new_tokens=NEW), _reference(model, ids, mask))


def test_step_logits_equal_generate_scores():
    model = _lora()
    ids, mask = _batch()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    decoder = StaticDecoder(model, ids.shape[1] + 6)
    logits = decoder.prefill(ids, mask)
    for t, ref in enumerate(out.logits):
        torch.testing.assert_close(logits, ref.float(), atol=1e-5, rtol=1e-5)
        if t < len(out.logits) - 1:
            logits = decoder.step(out.sequences[:, ids.shape[1] + t])
    decoder.step(out.sequences[:, -1])  # the cache's last position
    with pytest.raises(ConfigError, match="full"):
        decoder.step(out.sequences[:, -1])


# --------------------------------------------------------------------------- capturability proxy


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_the_step_reads_no_value_on_the_host(kind):
    model = MODELS[kind]()
    logits = fake_step(model, batch=3, width=5)
    assert logits.shape == (3, 96)
    assert all(not p.is_meta and p.device.type == "cpu" for p in model.parameters())  # the model is untouched


def _reads(how: str, module, x, *args, **kwargs):
    value = {
        "item": lambda: x.sum().item(),
        "tolist": lambda: x[0, 0, :2].tolist(),
        "bool": lambda: bool((x > 0).any()),
        "nonzero": lambda: torch.nonzero(x[0, 0]),
        "boolean index": lambda: x[x > 0],
    }[how]()
    assert value is not None
    return type(module).forward(module, x, *args, **kwargs)


@pytest.mark.parametrize("how", ["item", "tolist", "bool", "nonzero", "boolean index"])
def test_the_proxy_fails_when_the_step_reads_a_value(how):
    model = _lora()
    o_proj = model.model.layers[1].self_attn.o_proj
    o_proj.forward = functools.partial(_reads, how, o_proj)
    ids, mask = _batch()
    assert static_decode(model, ids, mask, max_new_tokens=3).shape == (3, 3)  # real tensors: it just runs
    with pytest.raises(Exception, match="local_scalar_dense|nonzero|DataDependent|DynamicOutputShape"):
        fake_step(model)


# --------------------------------------------------------------------------- refusals and the generation hook


def test_refusals():
    model = _lora()
    ids, mask = _batch()
    with pytest.raises(ConfigError, match="CUDA"):
        static_decode(model, ids, mask, max_new_tokens=4, graph="on")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        static_decode(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        static_decode(model, ids, mask, max_new_tokens=2, do_sample=True, temperature=0)
    with lorakit.adapter_batch(model, ["default", "__base__", "default"]):
        assert "adapter_batch" in capture_blocker(model)
        with pytest.raises(ConfigError, match="adapter_batch"):
            static_decode(model, ids, mask, max_new_tokens=4)
    assert capture_blocker(model) is None
    model.train()
    with pytest.raises(ConfigError, match="training mode"):
        static_decode(model, ids, mask, max_new_tokens=4)


def test_generate_batch_with_static_cache_answers_the_same(tmp_path):
    model, tok = load_model(make_tiny_model_dir(tmp_path / "m"))
    model = lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prompts = [generation.prompt_ids(tok, p) for p in ["hi", "say cat dog bird", "x", "a b c"]]
    kwargs = dict(max_new_tokens=10, batch_size=3)
    assert generation.generate_batch(model, tok, prompts, static_cache=True, **kwargs) == generation.generate_batch(
        model, tok, prompts, **kwargs
    )
    with pytest.raises(ConfigError, match="static_cache"):
        generation.generate_batch(model, tok, prompts, static_cache=True, adapter_names=["default"] * 4)


# --------------------------------------------------------------------------- CUDA graphs (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def _on_cuda(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    return MODELS[kind]().to("cuda", dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_graphed_step_equals_eager_step(kind, dtype):
    model = _on_cuda(kind, dtype)
    ids, mask = _batch(device="cuda")
    eager = StaticDecoder(model, ids.shape[1] + NEW)
    graphed = StaticDecoder(model, ids.shape[1] + NEW, graph=True)
    a, b = eager.prefill(ids, mask), graphed.prefill(ids, mask)
    torch.testing.assert_close(b, a, **TOL[dtype])
    for _ in range(NEW - 1):
        tokens = a.argmax(-1)  # both fed the eager tokens
        a, b = eager.step(tokens).clone(), graphed.step(tokens).clone()
        torch.testing.assert_close(b, a, **TOL[dtype])
    assert graphed.graph is not None and eager.graph is None


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse_base", ["groups", "all"])
@pytest.mark.parametrize("lengths", [LENGTHS, [5, 9, 3, 7, 1, 8, 6, 2, 9, 4, 7, 5]], ids=["3 rows", "12 rows"])
def test_a_graph_with_whole_projections_in_one_kernel_steps_as_eager(lengths, fuse_base, dtype):
    # 12 rows at r=4: past decode_lora.fits for the LoRA kernel alone, within it for whole projections
    model = _on_cuda("unmerged-lora", dtype)
    ids, mask = _batch(lengths, device="cuda")
    eager = StaticDecoder(model, ids.shape[1] + NEW)
    graphed = StaticDecoder(model, ids.shape[1] + NEW, graph=True, fuse_base=fuse_base)
    a, b = eager.prefill(ids, mask), graphed.prefill(ids, mask)
    for _ in range(NEW - 1):
        tokens = a.argmax(-1)
        a, b = eager.step(tokens).clone(), graphed.step(tokens).clone()
        torch.testing.assert_close(b, a, **TOL[dtype])
    assert graphed.graph is not None
    if dtype == torch.float32:
        assert torch.equal(
            static_decode(model, ids, mask, max_new_tokens=NEW, fuse_base=fuse_base), _reference(model, ids, mask)
        )


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_graphed_decoding_tokens_equal_eager(kind, dtype):
    model = _on_cuda(kind, dtype)
    ids, mask = _batch(device="cuda")
    # bf16 tokens equal the eager ones' where the graph runs the same ops (the base matmuls apart; fused with
    # them, its sums round in another order: test_graphed_step_equals_eager_step holds those to TOL)
    route = {"fuse_base": "off"} if dtype == torch.bfloat16 else {}
    graphed = static_decode(model, ids, mask, max_new_tokens=NEW, graph="on", **route)
    assert torch.equal(graphed, static_decode(model, ids, mask, max_new_tokens=NEW, graph="off"))
    if dtype == torch.float32:
        assert torch.equal(graphed, _reference(model, ids, mask))
    eos = [int(graphed[1, 2]), int(graphed[0, 9])]  # a stop between two of the every-8-steps host checks
    assert torch.equal(
        static_decode(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, graph="on", **route),
        static_decode(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, graph="off"),
    )


@cuda
def test_a_host_read_in_the_step_falls_back_to_eager_with_a_message():
    model = _on_cuda("unmerged-lora", torch.float32)
    o_proj = model.model.layers[1].self_attn.o_proj
    o_proj.forward = functools.partial(_reads, "item", o_proj)
    ids, mask = _batch(device="cuda")
    said: list[str] = []
    got = static_decode(model, ids, mask, max_new_tokens=NEW, say=said.append)
    assert len(said) == 1 and "eagerly" in said[0], said
    assert torch.equal(got, static_decode(model, ids, mask, max_new_tokens=NEW, graph="off"))
    with pytest.raises(ConfigError, match="graph='on'"):
        static_decode(model, ids, mask, max_new_tokens=NEW, graph="on", say=said.append)


def _fresh(model, ids, mask, **kwargs):
    return static_decode(model, ids, mask, max_new_tokens=NEW, reuse=False, **kwargs)


def _kept(model):
    from lorakit import graph_decode

    kept = graph_decode._KEPT.get(model)
    return None if kept is None else kept[1]


def test_a_kept_decoder_answers_later_calls_as_a_fresh_one_with_the_same_buffers():
    model = _lora()
    ids, mask = _batch()
    first = static_decode(model, ids, mask, max_new_tokens=NEW, reuse=True)
    assert torch.equal(first, _fresh(model, ids, mask))
    decoder = _kept(model)
    buffers = [decoder.padding, decoder.ids, decoder.positions, decoder.slot]
    buffers += [t for layer in decoder.cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)]
    addresses = [t.data_ptr() for t in buffers]
    for lengths, new in [([7, 2, 4], NEW), ([9, 9, 1], NEW - 5)]:  # other prompts and lengths, the same bucket
        other_ids, other_mask = _batch(lengths, seed=len(lengths) + new)
        got = static_decode(model, other_ids, other_mask, max_new_tokens=new, reuse=True)
        assert _kept(model) is decoder
        assert torch.equal(got, static_decode(model, other_ids, other_mask, max_new_tokens=new, reuse=False))
    assert [t.data_ptr() for t in buffers] == addresses  # what a recorded graph reads stayed where it was
    assert decoder.padding is buffers[0] and decoder.positions is buffers[2]


def test_a_kept_decoder_is_replaced_when_what_the_step_reads_changes():
    model = _lora()
    ids, mask = _batch()
    static_decode(model, ids, mask, max_new_tokens=NEW, reuse=True)
    decoder = _kept(model)
    lora_b = model.model.layers[0].self_attn.q_proj.lora_B["default"]
    with torch.no_grad():  # in place: the same addresses, so the same decoder, reading the new values
        lora_b.weight.mul_(2)
    got = static_decode(model, ids, mask, max_new_tokens=NEW, reuse=True)
    assert _kept(model) is decoder and torch.equal(got, _fresh(model, ids, mask))
    lora_b.weight = torch.nn.Parameter(lora_b.weight.detach().clone() * -1)  # a new tensor: a new decoder
    got = static_decode(model, ids, mask, max_new_tokens=NEW, reuse=True)
    assert _kept(model) is not decoder and torch.equal(got, _fresh(model, ids, mask))
    decoder = _kept(model)
    with lorakit.disable_adapters(model):  # the adapters' state: a new decoder, answering as the base
        got = static_decode(model, ids, mask, max_new_tokens=NEW, reuse=True)
        assert _kept(model) is not decoder and torch.equal(got, _fresh(model, ids, mask))
    decoder = _kept(model)
    static_decode(model, ids[:2], mask[:2], max_new_tokens=NEW, reuse=True)  # another batch size
    assert _kept(model) is not decoder
    decoder = _kept(model)
    static_decode(model, ids[:2], mask[:2], max_new_tokens=NEW, group_siblings=False, reuse=True)  # another route
    assert _kept(model) is not decoder and not _kept(model).group_siblings


def test_a_kept_decoder_is_replaced_when_another_saved_module_copy_runs():
    model = lorakit.inject(
        _plain(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ).eval()
    ids, mask = _batch()
    static_decode(model, ids, mask, max_new_tokens=NEW, reuse=True)
    decoder = _kept(model)
    (wrapper,) = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    wrapper.disabled = True  # the original head runs instead of the saved copy; the LoRA layers are as they were
    got = static_decode(model, ids, mask, max_new_tokens=NEW, reuse=True)
    assert _kept(model) is not decoder and torch.equal(got, _fresh(model, ids, mask))


def test_decoders_are_kept_by_default_until_forgotten():
    from lorakit import graph_decode

    model = _lora()
    ids, mask = _batch()
    static_decode(model, ids, mask, max_new_tokens=NEW)  # reuse=True is the default, as generate keeps its cache
    decoder = _kept(model)
    assert decoder is not None
    static_decode(model, ids, mask, max_new_tokens=NEW, reuse=False)  # a fresh one, the kept one left alone
    assert _kept(model) is decoder
    graph_decode.forget(model)
    assert _kept(model) is None
    graph_decode.forget(model)  # nothing kept: nothing to do


def test_a_kept_decoder_does_not_keep_its_model_alive():
    import gc
    import weakref

    from lorakit import graph_decode

    model = _lora()
    ids, mask = _batch()
    static_decode(model, ids, mask, max_new_tokens=NEW, reuse=True)
    assert model in graph_decode._KEPT
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the kept decoder holds its model weakly, and its entry went with it


@cuda
@pytest.mark.parametrize(("dtype", "group"), [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_a_kept_graph_replays_later_calls_as_fresh_ones(dtype, group):
    model = _on_cuda("unmerged-lora", dtype)
    ids, mask = _batch(device="cuda")
    first = static_decode(model, ids, mask, max_new_tokens=NEW, graph="on", group_siblings=group, reuse=True)
    decoder = _kept(model)
    graph = decoder.graph
    assert graph is not None and decoder.prefill_bucket > 1
    assert torch.equal(first, static_decode(model, ids, mask, max_new_tokens=NEW, graph="on", reuse=False))
    if dtype == torch.float32:  # bf16: the eager ops round the base matmuls apart (see above)
        assert torch.equal(first, static_decode(model, ids, mask, max_new_tokens=NEW, graph="off", reuse=False))
    padded = decoder.padded_width(ids.shape[1])
    recorded = None
    for lengths, seed in [([7, 2, 4], 3), ([9, 9, 1], 4), ([3, 1, 8], 5)]:  # all in the first prompt's bucket
        other_ids, other_mask = _batch(lengths, seed=seed, device="cuda")
        got = static_decode(
            model, other_ids, other_mask, max_new_tokens=NEW, graph="on", group_siblings=group, reuse=True
        )
        assert _kept(model) is decoder and decoder.padded_width(other_ids.shape[1]) == padded
        assert decoder.graph is graph  # the step replayed, not recorded again
        prefill = decoder._prefills[padded][1]  # recorded in the second call, then replayed
        assert prefill is not None and (recorded is None or prefill is recorded)
        recorded = prefill
        fresh = static_decode(model, other_ids, other_mask, max_new_tokens=NEW, graph="on", reuse=False)
        assert torch.equal(got, fresh)


@cuda
def test_kept_prefill_graphs_of_several_widths_share_a_pool_up_to_the_cap(monkeypatch):
    from lorakit import graph_decode

    monkeypatch.setattr(graph_decode, "PREFILL_GRAPHS", 2)
    model = _on_cuda("unmerged-lora", torch.float32)
    batches = [
        _batch(lengths, seed=i, device="cuda") for i, lengths in enumerate([[5, 2, 4], [20, 9, 17], [33, 1, 30]])
    ]
    for _ in range(3):  # widths 16, 32 and 48 (one cache length bucket); each recorded on its second call
        for ids, mask in batches:
            got = static_decode(model, ids, mask, max_new_tokens=NEW, graph="on")
            assert torch.equal(got, static_decode(model, ids, mask, max_new_tokens=NEW, graph="on", reuse=False))
    decoder = _kept(model)
    assert sorted(w for w, (_, r) in decoder._prefills.items() if r is not None) == [16, 32]  # the cap: 48 eager
    assert decoder._prefill_pool is not None
