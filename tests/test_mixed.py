"""adapter_batch: every row equals running it alone with its adapter; grouped, not per row."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama

import lorakit
from lorakit import adapter_stacks as stacks
from lorakit import fusion, routing
from lorakit import mixed as mixing
from lorakit.inject import lora_layers
from lorakit.mixed import adapter_batch

ROWS = ["a", "b", "__base__", "a", "b"]


def _model(embed: bool = True, saved: bool = False):
    """Llama with adapter a (r=4) and b (r=2, other targets): different ranks and modules in one batch."""
    model = make_llama()
    targets_a = ["q_proj", "v_proj", "gate_proj", "down_proj"] + (["embed_tokens"] if embed else [])
    lorakit.inject(
        model,
        lorakit.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets_a,
            init_lora_weights=False,
            modules_to_save=["lm_head"] if saved else None,
        ),
        "a",
    )
    lorakit.add_adapter(
        model,
        "b",
        lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"], init_lora_weights=False),
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _alone(model, name, **inputs):
    """Logits of ``inputs`` with only adapter ``name`` (or none) active."""
    with torch.no_grad():
        if name == "__base__":
            with lorakit.disable_adapters(model):
                return model(**inputs).logits
        lorakit.set_adapter(model, name)
        return model(**inputs).logits


@pytest.fixture(params=["gathered", "stacked"])
def path(request, monkeypatch):
    """The inference path adapter_batch takes: rows gathered per adapter, or all adapters stacked."""
    if request.param == "gathered":
        monkeypatch.setattr(mixing, "_STACK_MAX_TOKENS", 0)
    else:
        monkeypatch.setattr(stacks, "STACKS", weakref.WeakKeyDictionary())  # no stack of another test
    return request.param


@pytest.mark.parametrize("saved", [False, True])
@pytest.mark.parametrize("tokens", [9, 1])  # a prompt and a decoding step
def test_rows_equal_alone(saved, tokens, path):
    model = _model(saved=saved)
    ids = torch.randint(0, 96, (len(ROWS), tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), adapter_batch(model, ROWS):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[i], _alone(model, name, input_ids=ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # the adapters differ, so the test can fail
    assert all(routing.forward_owner(layer) is None for _, layer in lora_layers(model))  # routes removed on exit
    built = [stacks.STACKS.get(layer) for _, layer in lora_layers(model)]
    assert any(built) == (path == "stacked")  # the path under test really ran


def test_grouped_not_per_row(monkeypatch):
    """Gathered path: each adapter's A runs once per layer per forward, on all of its rows at once."""
    monkeypatch.setattr(mixing, "_STACK_MAX_TOKENS", 0)
    model = _model()
    calls: dict[str, list[int]] = {"a": [], "b": []}
    for _, layer in lora_layers(model):
        if "a" in layer.r and hasattr(layer, "lora_A"):
            layer.lora_A["a"].register_forward_hook(lambda m, i, o: calls["a"].append(i[0].shape[0]))
        if "b" in layer.r:
            layer.lora_A["b"].register_forward_hook(lambda m, i, o: calls["b"].append(i[0].shape[0]))
    ids = torch.zeros(len(ROWS), 4, dtype=torch.long)
    with torch.no_grad(), adapter_batch(model, ROWS):
        model(input_ids=ids)
    n_a = sum(1 for _, layer in lora_layers(model) if "a" in layer.r and hasattr(layer, "lora_A"))
    n_b = sum(1 for _, layer in lora_layers(model) if "b" in layer.r)
    assert calls["a"] == [2] * n_a and calls["b"] == [2] * n_b


def test_generate_kv_cache_left_padding(path):
    model = _model()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (3, 7, 5, 6, 2)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with adapter_batch(model, ROWS):
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    for i, (name, p) in enumerate(zip(ROWS, prompts)):
        if name == "__base__":
            with lorakit.disable_adapters(model):
                alone = model.generate(input_ids=torch.tensor([p]), **kwargs)
        else:
            lorakit.set_adapter(model, name)
            alone = model.generate(input_ids=torch.tensor([p]), **kwargs)
        assert out.sequences[i, width:].tolist() == alone.sequences[0, len(p) :].tolist()
        for step_mixed, step_alone in zip(out.logits, alone.logits):
            torch.testing.assert_close(step_mixed[i], step_alone[0], atol=1e-5, rtol=1e-5)


def test_gradients_equal_training_alone():
    model = _model().train()
    lorakit.set_adapter(model, ["a", "b"])  # both trainable
    ids = torch.randint(0, 96, (len(ROWS), 8), generator=torch.Generator().manual_seed(4))

    def loss_of(batch_ids):  # summed over rows, so each row's gradient is its own
        logits = model(input_ids=batch_ids).logits
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch_ids[:, 1:].reshape(-1), reduction="sum"
        )

    with adapter_batch(model, ROWS):
        loss_of(ids).backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(".a." in n for n in mixed) and any(".b." in n for n in mixed)
    for name in ("a", "b"):
        model.zero_grad(set_to_none=True)
        lorakit.set_adapter(model, name)
        rows = [i for i, n in enumerate(ROWS) if n == name]
        loss_of(ids[rows]).backward()
        for pname, p in model.named_parameters():
            if f".{name}." in pname or pname.endswith(f".{name}"):
                torch.testing.assert_close(mixed[pname], p.grad, atol=1e-5, rtol=1e-4)


def test_fused_mlps_are_routed_per_row_and_restored():
    model = make_llama()
    cfg = dict(target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    lorakit.inject(model, lorakit.LoraConfig(r=4, **cfg), "a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=2, **cfg))
    assert fusion.fuse_swiglu_mlps(model) == 2
    ids = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), adapter_batch(model, ["b", "a", "__base__"]):
        mixed = model(input_ids=ids).logits
    fused_owners = [routing.forward_owner(m) for m in model.modules() if hasattr(m, "gate_proj")]
    assert fused_owners == ["lorakit.fusion"] * 2  # fused again after the block
    fusion.unfuse_mlps(model)
    for i, name in enumerate(["b", "a", "__base__"]):
        torch.testing.assert_close(mixed[i], _alone(model, name, input_ids=ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)


def test_errors():
    model = _model()
    with pytest.raises(lorakit.AdapterNotFoundError, match="'zzz'.*adapters: a, b"):
        with adapter_batch(model, ["a", "zzz"]):
            pass
    with pytest.raises(lorakit.ConfigError, match="one per row"):
        with torch.no_grad(), adapter_batch(model, ["a", "b"]):
            model(input_ids=torch.zeros(3, 4, dtype=torch.long))
    assert all(routing.forward_owner(layer) is None for _, layer in lora_layers(model))  # undone after the error
    merged = copy.deepcopy(model)
    lorakit.merge(merged, ["a"])
    with pytest.raises(lorakit.ConfigError, match="unmerge"):
        with adapter_batch(merged, ["a"]):
            pass


def test_public_and_generate_batch(tmp_path):
    """lorakit.adapter_batch is public; generate_batch(adapter_names=...) equals each prompt alone with its adapter."""
    from tiny import make_tiny_model_dir

    from lorakit.generation import generate, generate_batch, prompt_ids
    from lorakit.models import load_model

    assert lorakit.adapter_batch is adapter_batch
    model, tok = load_model(make_tiny_model_dir(tmp_path / "tiny"))
    cfg = dict(target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, **cfg), "a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=2, lora_alpha=8, **cfg))
    prompts = ["say abc", "hello", "a longer prompt here", "x"]
    names = ["b", "a", "__base__", "b"]
    mixed = generate_batch(model, tok, [prompt_ids(tok, p) for p in prompts], max_new_tokens=8, adapter_names=names)
    alone = []
    for p, name in zip(prompts, names):
        if name == "__base__":
            with lorakit.disable_adapters(model):
                alone.append(generate(model, tok, p, max_new_tokens=8))
        else:
            lorakit.set_adapter(model, name)
            alone.append(generate(model, tok, p, max_new_tokens=8))
    assert mixed == alone and len(set(alone)) > 1
    lorakit.set_adapter(model, "a")
    assert generate(model, tok, prompts[0], max_new_tokens=8, adapter_name="b") == alone[0]
    with pytest.raises(lorakit.ConfigError, match="one per prompt"):
        generate_batch(model, tok, [prompt_ids(tok, "x")], adapter_names=["a", "b"])


def test_stacked_decoding_sees_weight_changes():
    """The decoding path caches stacked adapter weights; an in-place update (an optimizer step) must show."""
    model = _model(embed=False)
    ids = torch.randint(0, 96, (len(ROWS), 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), adapter_batch(model, ROWS):
        before = model(input_ids=ids).logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B.b." in name:
                p.mul_(-2.0)
    with torch.no_grad(), adapter_batch(model, ROWS):
        after = model(input_ids=ids).logits
    assert not torch.allclose(before[1], after[1], atol=1e-4)
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(after[i], _alone(model, name, input_ids=ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)


def test_stack_reused_while_it_serves(monkeypatch):
    """One stack per layer: reused for any row order and for fewer adapters (requests that left), rebuilt for a
    new adapter or changed weights; every batch's rows still equal running them alone."""
    monkeypatch.setattr(stacks, "STACKS", weakref.WeakKeyDictionary())
    model = make_llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    lorakit.inject(model, lorakit.LoraConfig(**cfg), "a")
    for name in ("b", "c"):
        lorakit.add_adapter(model, name, lorakit.LoraConfig(**cfg))
    layer = next(layer for _, layer in lora_layers(model))
    ids = torch.randint(0, 96, (4, 1), generator=torch.Generator().manual_seed(6))

    def step(rows):
        with torch.no_grad(), adapter_batch(model, rows):
            out = model(input_ids=ids[: len(rows)]).logits
        for i, name in enumerate(rows):
            torch.testing.assert_close(out[i], _alone(model, name, input_ids=ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)
        return stacks.STACKS[layer]

    first = step(["b", "a", "__base__", "b"])
    assert first.names == ["a", "b"]  # the layer's order, not the rows'
    assert step(["a", "b", "b"]) is first
    assert step(["b", "b", "a", "__base__"]) is first
    grown = step(["c", "a", "b"])  # a new adapter: rebuilt
    assert grown is not first and grown.names == ["a", "b", "c"]
    assert step(["b", "c"]) is grown  # 8 of 12 columns in use: within the slack
    assert step(["a", "b", "c"]) is grown
    with torch.no_grad():
        layer.lora_A["c"].weight.mul_(2.0)
    assert step(["a", "c", "b"]) is not grown  # changed weights: rebuilt


def test_decoding_steps_in_one_block(monkeypatch):
    """After a layer's first decoding step in a block the short route runs; it equals the general route, and an
    in-place weight change between two steps of one block shows in the next step."""
    monkeypatch.setattr(stacks, "STACKS", weakref.WeakKeyDictionary())
    model = _model(embed=False)
    ids = torch.randint(0, 96, (len(ROWS), 1), generator=torch.Generator().manual_seed(8))
    short = []
    monkeypatch.setattr(mixing.AdapterRows, "_step", lambda self, *a: short.append(1) or _general_step(self, *a))
    with torch.no_grad(), adapter_batch(model, ROWS):
        first = model(input_ids=ids).logits
        assert not short
        again = model(input_ids=ids).logits
        assert short  # the short route ran ...
        torch.testing.assert_close(again, first, atol=1e-6, rtol=1e-6)  # ... and gave the same answer
        for name, p in model.named_parameters():
            if ".lora_B.b." in name:
                p.mul_(-2.0)
        changed = model(input_ids=ids).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(changed[i], _alone(model, name, input_ids=ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[1], first[1], atol=1e-4)


_general_step = mixing.AdapterRows._step


@pytest.mark.parametrize("tokens", [5, 1])  # a prompt; decoding steps (the second one takes the short route)
def test_one_adapter_batch_takes_single_adapter_kernels(tokens, monkeypatch):
    """Every row on one adapter: no stack, the single-adapter kernels; rows equal running the batch with that
    adapter active, also on the short route, which reads the layer's weights live (an in-place change shows)."""
    monkeypatch.setattr(stacks, "STACKS", weakref.WeakKeyDictionary())
    model = _model(embed=False)
    ids = torch.randint(0, 96, (3, tokens), generator=torch.Generator().manual_seed(9))
    short = []
    monkeypatch.setattr(mixing.AdapterRows, "_step", lambda self, *a: short.append(a[2]) or _general_step(self, *a))
    with torch.no_grad(), adapter_batch(model, ["a"] * 3):
        first = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        for name, p in model.named_parameters():
            if ".lora_B.a." in name:
                p.mul_(-2.0)
        changed = model(input_ids=ids).logits
    assert not any(stacks.STACKS.get(layer) for _, layer in lora_layers(model))  # no stack was built
    assert bool(short) == (tokens == 1) and all(stack is None for stack in short)
    torch.testing.assert_close(again, first, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(changed, _alone(model, "a", input_ids=ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed, first, atol=1e-4)


@pytest.mark.parametrize("tokens", [3, 1])
def test_stacked_row_layouts(tokens, monkeypatch):
    """The batched path's row layouts over one stack of a, b, c: rows already in the stack's order (no gather),
    unequal rows per adapter (padded), the middle adapter unused (a padded slot), base rows; every row equals
    running it alone, on the first call and on the next one in the block (the short route for decoding)."""
    monkeypatch.setattr(stacks, "STACKS", weakref.WeakKeyDictionary())
    model = make_llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    lorakit.inject(model, lorakit.LoraConfig(**cfg), "a")
    for name in ("b", "c"):
        lorakit.add_adapter(model, name, lorakit.LoraConfig(**cfg))
    model.eval()
    layer = next(layer for _, layer in lora_layers(model))
    g = torch.Generator().manual_seed(10)
    cases = [
        (["a", "b", "c"], True),
        (["a", "a", "b", "b", "c", "c"], True),
        (["b", "a", "a", "c", "__base__"], False),
        (["a", "c", "c"], False),  # b's slot of the stack is only padding
    ]
    for rows, in_order in cases:
        ids = torch.randint(0, 96, (len(rows), tokens), generator=g)
        with torch.no_grad(), adapter_batch(model, rows) as batch:
            outs = [model(input_ids=ids).logits, model(input_ids=ids).logits]
            plan = batch._plans[layer][1]
        assert stacks.STACKS[layer].names == ["a", "b", "c"]
        assert (plan.idx is None) == in_order
        for out in outs:
            for i, name in enumerate(rows):
                alone = _alone(model, name, input_ids=ids[i : i + 1])[0]
                torch.testing.assert_close(out[i], alone, atol=1e-5, rtol=1e-5)


def _rows_alone(model, rows, ids, out):
    for i, name in enumerate(rows):
        torch.testing.assert_close(out[i], _alone(model, name, input_ids=ids[i : i + 1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [ROWS, ["a"] * 3])  # stacked decoding; every row on one adapter
def test_next_block_with_same_rows_resumes_the_decoding_records(rows, monkeypatch):
    """A server enters one block per decoding step: a block with the previous block's row names takes its layers'
    decoding records over (no route decided again), unless what they were made from changed in between: an
    in-place weight change, an adapter deleted and added again under its name, a base weight replaced. Every
    step's rows equal running them alone."""
    monkeypatch.setattr(stacks, "STACKS", weakref.WeakKeyDictionary())
    model = _model(embed=False)
    g = torch.Generator().manual_seed(11)
    resumed: list[bool] = []
    real_resume = mixing.AdapterRows._resume
    monkeypatch.setattr(
        mixing.AdapterRows, "_resume", lambda self, layer: resumed.append(bool(r := real_resume(self, layer))) or r
    )
    # layers with a decoding record: two or more of the rows' adapters (stacked), or every row's one adapter
    n_layers = sum(
        1 for _, layer in lora_layers(model) if len(set(layer.r) & set(rows)) >= 2 or set(rows) <= set(layer.r)
    )

    def step():
        ids = torch.randint(0, 96, (len(rows), 1), generator=g)
        resumed.clear()
        with torch.no_grad(), adapter_batch(model, rows):
            out = model(input_ids=ids).logits
        _rows_alone(model, rows, ids, out)
        return resumed.count(True)

    assert step() == 0  # nothing to resume yet
    assert step() == n_layers > 0  # every layer resumed
    assert step() == n_layers
    stacked = len(set(rows)) > 1  # a stack copies the weights; the one-adapter route reads them live
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["a"].weight.mul_(-2.0)  # an optimizer step, say
    assert step() == n_layers - stacked
    cfg = lorakit.adapters.adapter_config(model, "a")
    lorakit.delete_adapter(model, "a")
    torch.manual_seed(12)
    lorakit.add_adapter(model, "a", cfg)  # same name, new weights
    assert step() < n_layers or not stacked
    assert step() == n_layers
    q0 = model.model.layers[0].self_attn.q_proj
    q0.lora_A["a"] = torch.nn.Linear(q0.in_features, q0.r["a"], bias=False)  # a module replaced, names kept
    assert step() == n_layers - stacked
    q = model.model.layers[1].self_attn.q_proj.base_layer
    q.weight = torch.nn.Parameter(q.weight.detach() * 1.5, requires_grad=False)
    assert step() == n_layers - 1
    assert step() == n_layers
    with torch.no_grad(), adapter_batch(model, ["b", "a"]):  # other row names: no resuming ...
        model(input_ids=torch.zeros(2, 1, dtype=torch.long))
    assert step() == 0  # ... and the records of these rows are gone
    mixing.forget_stacks(model)
    assert model not in mixing._PREVIOUS and not any(stacks.STACKS.get(layer) for _, layer in lora_layers(model))


def test_block_walk_skips_only_adapter_containers():
    """adapter_batch's module walk: every module of model.modules() except those inside the LoRA layers' adapter
    containers (lora_A, lora_B, lora_dropout, embedding A/B), each once, in the same order."""
    model = _model(saved=True)
    walked = mixing._modules(model)
    inside = {
        id(m)
        for layer in model.modules()
        if isinstance(layer, mixing.LoraLayer)
        for name, child in layer.named_children()
        if name != "base_layer"
        for m in child.modules()
    }
    assert inside  # the test can fail
    assert [id(m) for m in walked] == [id(m) for m in model.modules() if id(m) not in inside]


def test_stack_fresh_sees_every_change():
    """Stack.fresh (checked when a block resumes a layer's record): False after an in-place change, a new scaling,
    a replaced weight or module, a removed adapter; True otherwise."""
    model = make_llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    lorakit.inject(model, lorakit.LoraConfig(**cfg), "a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(**cfg))
    layer = next(layer for _, layer in lora_layers(model))

    def fresh_after(change) -> bool:
        stack = stacks.Stack(layer, ["a", "b"])
        assert stack.fresh(layer)
        change()
        return stack.fresh(layer)

    assert fresh_after(lambda: None)
    with torch.no_grad():
        assert not fresh_after(lambda: layer.lora_A["b"].weight.add_(1.0))
    scaling = dict(layer.scaling)
    assert not fresh_after(lambda: layer.scaling.update(b=3.0))
    layer.scaling.update(scaling)
    assert not fresh_after(lambda: setattr(layer.lora_B["a"], "weight", torch.nn.Parameter(torch.ones(32, 4))))
    assert not fresh_after(lambda: layer.lora_A.update({"b": torch.nn.Linear(32, 4, bias=False)}))
    assert not fresh_after(lambda: layer.lora_B._modules.pop("a"))
