"""lorakit.train.graphs on the CPU: eligibility rules, routing, replay dispatch, the memory guard, remove().

The CPU cannot record a CUDA graph, so each test here checks a piece of plumbing a no-op would fail:
the layers' calls really go through LayerGraphs (counted), a recorded call really replaces the layer
(stand-in recordings on the CPU, counted, same numbers), remove() really restores the layers. The
CUDA side (recording and replaying graphs, gradients equal to eager) is in test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2, make_llama

import lorakit
from lorakit import routing
from lorakit.errors import ConfigError
from lorakit.fusion import fuse_swiglu_mlps
from lorakit.train import graphs as graphs_mod
from lorakit.train.config import RunConfig
from lorakit.train.graphs import LayerGraphs, decoder_layers, graph_blocker, setup_graphs
from lorakit.train.recompute import enable_checkpointing


def _lora(model, dropout=0.0):
    lorakit.inject(
        model,
        lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    return model


def test_blocker_reasons_past_the_device_check(monkeypatch):
    """The rules after "is there a GPU", on the CPU: graph_blocker reads only the model there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda")
    assert graph_blocker(_lora(make_llama()), cuda) is None
    assert "LoRA dropout > 0 at model.layers.0.self_attn.q_proj" in graph_blocker(_lora(make_llama(), 0.1), cuda)
    gc = _lora(make_llama())
    enable_checkpointing(gc)
    assert "gradient checkpointing is on" in graph_blocker(gc, cuda)
    assert "no decoder layer list found in GPT2LMHeadModel" in graph_blocker(make_gpt2(), cuda)
    flash = _lora(make_llama())
    flash.config._attn_implementation = "flash_attention_2"
    assert "attention implementation 'flash_attention_2'" in graph_blocker(flash, cuda)


def test_setup_graphs_modes():
    said = []
    model = _lora(make_llama())
    assert setup_graphs(model, "off", torch.device("cpu"), say=said.append) is None
    assert setup_graphs(model, "auto", torch.device("cpu"), say=said.append) is None
    assert said == []  # a CPU run is not told about CUDA graphs
    with pytest.raises(ConfigError, match="cuda_graphs is on, but CUDA graphs need a CUDA device; set it to auto"):
        setup_graphs(model, "on", torch.device("cpu"), say=said.append)
    assert all(routing.forward_owner(layer) is None for layer in decoder_layers(model))  # nothing patched


def test_blocker_reasons():
    model = _lora(make_llama())
    assert "CUDA device" in graph_blocker(model, torch.device("cpu"))
    if torch.cuda.is_available():
        assert graph_blocker(model, torch.device("cuda")) is None
        assert "dropout" in graph_blocker(_lora(make_llama(), dropout=0.1), torch.device("cuda"))
        gc = _lora(make_llama())
        enable_checkpointing(gc)
        assert "checkpointing" in graph_blocker(gc, torch.device("cuda"))
    assert decoder_layers(make_llama(layers=3)) is not None and len(decoder_layers(make_llama(layers=3))) == 3
    assert decoder_layers(make_gpt2()) is None  # GPT-2 keeps its blocks in transformer.h


def _twins():
    """Two equal LoRA llamas (fused MLPs, non-zero lora_B, training mode): one to patch, one reference."""
    ref = _lora(make_llama())
    model = _lora(make_llama())
    model.load_state_dict(ref.state_dict())
    for m in (ref, model):
        fuse_swiglu_mlps(m)
        m.train()
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model, ref


def _padded(input_ids):
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # padding: the layers get a real mask tensor
    return mask


def _assert_same_step(model, ref, input_ids, mask):
    """Logits, and the grads of a loss on them, bit-equal between ``model`` and ``ref``."""
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=mask).logits
    exp = ref(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(out, exp, rtol=0, atol=0)
    out.square().mean().backward()
    exp.square().mean().backward()
    grads = 0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
            grads += 1
    assert grads > 0


def _count_forward_calls(monkeypatch) -> list[int]:
    """Spy on LayerGraphs._forward (before construction, which binds it): the layer indices it is called with."""
    calls, real = [], LayerGraphs._forward

    def spy(self, i, *args, **kwargs):
        calls.append(i)
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(LayerGraphs, "_forward", spy)
    return calls


def test_layers_are_routed_through_the_graphs_and_run_eagerly_on_cpu(input_ids, monkeypatch):
    model, ref = _twins()
    calls = _count_forward_calls(monkeypatch)
    keys = list(model.state_dict())
    graphs = LayerGraphs(model)
    layers = decoder_layers(model)
    assert list(model.state_dict()) == keys  # names and layout unchanged
    assert [routing.forward_owner(layer) for layer in layers] == ["lorakit.train.graphs"] * len(layers)
    mask = _padded(input_ids)
    _assert_same_step(model, ref, input_ids, mask)
    assert calls == list(range(len(layers)))  # every layer's call went through LayerGraphs, in order
    assert graphs.replays == 0 and not graphs.graphs  # ... and ran eagerly: nothing recorded off CUDA
    hooked = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    assert hooked and all(p._backward_hooks for p in hooked)  # the gradient-copy hooks (see _own_grad)

    graphs.remove()
    assert all(routing.forward_owner(layer) is None for layer in layers)
    assert not any(p._backward_hooks for p in hooked)
    del calls[:]
    _assert_same_step(model, ref, input_ids, mask)
    assert calls == []  # removed: nothing goes through LayerGraphs any more
    LayerGraphs(model).remove()  # the layers can be patched again (no stale override left)


def test_a_recorded_call_replaces_the_layer(input_ids, monkeypatch):
    """Dispatch to recorded graphs, with CPU stand-ins for the recordings: same math, every layer replayed."""
    model, ref = _twins()
    graphs = LayerGraphs(model)
    layers = decoder_layers(model)
    seen = []

    def graph_args(layer, hidden, mask, pe, kwargs):  # the CUDA rules minus "on CUDA"
        assert set(kwargs) <= graphs_mod._IGNORED_KWARGS  # what Llama passes may be dropped
        return (hidden, mask, *pe) if mask is not None else (hidden, *pe)

    class Recorded(torch.nn.Module):  # stands in for make_graphed_callables' output
        def __init__(self, i, with_mask):
            super().__init__()
            self.call = graphs_mod._LayerCall(layers[i], with_mask)
            self.sample_requires_grad = i > 0  # layer 0 reads the frozen embedding's output
            self.i = i

        def forward(self, *args):
            seen.append((self.i, len(args)))
            return self.call(*args)

    def graphs_for(hidden, mask, pe):
        return [Recorded(i, mask is not None) for i in range(len(layers))]

    monkeypatch.setattr(graphs, "_graph_args", graph_args)
    monkeypatch.setattr(graphs, "_graphs_for", graphs_for)
    mask = _padded(input_ids)
    _assert_same_step(model, ref, input_ids, mask)
    assert graphs.replays == len(layers)
    assert seen == [(i, 4) for i in range(len(layers))]  # (hidden, mask, cos, sin) for each layer

    # A recording whose input did not require grad while this one does (or vice versa) is not used.
    monkeypatch.setattr(graphs, "_graphs_for", lambda h, m, pe: [Recorded(0, True)] * len(layers))
    seen.clear()
    _assert_same_step(model, ref, input_ids, mask)
    assert seen == [(0, 4)] and graphs.replays == len(layers) + 1  # only layer 0's flag matches
    graphs.remove()


def test_layer_call_refuses_a_layer_that_returns_a_tuple():
    class TupleLayer(torch.nn.Module):
        def forward(self, hidden, **kwargs):
            return hidden, None

    with pytest.raises(graphs_mod._NotGraphable, match="TupleLayer returns tuple"):
        graphs_mod._LayerCall(TupleLayer(), with_mask=False)(torch.ones(1, 2, 4), torch.ones(2, 4), torch.ones(2, 4))


def test_own_grad_gives_the_parameter_its_own_buffer():
    p = torch.nn.Parameter(torch.zeros(3))
    static = torch.ones(3)
    own = graphs_mod._own_grad(p, static)
    assert torch.equal(own, static) and own.data_ptr() != static.data_ptr()
    p.grad = torch.zeros(3)
    assert graphs_mod._own_grad(p, static) is None  # autograd adds into p.grad in place


def test_cuda_graphs_config_key():
    base = {"data": {"train": "x.jsonl"}}
    assert RunConfig.model_validate(base).train.cuda_graphs == "auto"
    assert RunConfig.model_validate({**base, "train": {"cuda_graphs": "off"}}).train.cuda_graphs == "off"
    with pytest.raises(Exception, match="cuda_graphs"):
        RunConfig.model_validate({**base, "train": {"cuda_graphs": "sometimes"}})


def test_cuda_graphs_on_without_cuda_is_a_config_error(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_tiny_model_dir, write_chat_jsonl

    from lorakit.errors import ConfigError

    cfg = RunConfig.model_validate(
        {
            "model": str(make_tiny_model_dir(tmp_path / "m")),
            "lora": {"r": 2, "target_modules": ["q_proj"]},
            "data": {"train": str(write_chat_jsonl(tmp_path / "t.jsonl", n=8))},
            "train": {"steps": 1, "batch_size": 2, "cuda_graphs": "on", "precision": "fp32"},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    with pytest.raises(ConfigError, match="cuda_graphs is on, but CUDA graphs need a CUDA device"):
        lorakit.train(cfg, device="cpu")


def test_no_room_for_more_shapes():
    """New shapes are recorded only up to max_shapes and while free memory holds twice another pool."""
    graphs = LayerGraphs(_lora(make_llama()), max_shapes=2)
    dev = torch.device("cpu")
    assert graphs._no_room(512, dev) is None  # nothing recorded yet: always try the first
    graphs.graphs["a"] = []
    graphs.bytes_per_token = 1000.0
    graphs.free_bytes = lambda d: 2 * 1000 * 512 + 1
    assert graphs._no_room(512, dev) is None
    graphs.free_bytes = lambda d: 2 * 1000 * 512 - 1
    assert "GiB free" in graphs._no_room(512, dev)
    graphs.graphs["b"] = []
    assert "2 input shapes recorded" in graphs._no_room(8, dev)
    graphs.remove()


def test_graphs_for_a_full_cache_runs_eagerly_and_says_so_once(monkeypatch):
    """Past the memory guard nothing new is captured; known shapes still get their recorded graphs."""
    said = []
    graphs = LayerGraphs(_lora(make_llama()), max_shapes=1, log=said.append)
    monkeypatch.setattr(graphs, "_capture", lambda *a: pytest.fail("captured past the guard"))
    hidden, pe = torch.randn(2, 5, 32), (torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    recorded = ["stand-in"]
    graphs.graphs[graphs._key(hidden, None, pe)] = recorded
    assert graphs._graphs_for(hidden, None, pe) is recorded  # a known shape: no new recording needed
    longer = torch.randn(2, 7, 32)
    assert graphs._graphs_for(longer, None, pe) is None
    assert graphs._graphs_for(longer, None, pe) is None
    assert said == ["CUDA graphs: 1 input shapes recorded (max_shapes); new input shapes run eagerly"]
    graphs.remove()
