"""lorakit.train.graphs on the CPU: eligibility rules, and that the patched layers run the model's own math.

The CUDA side (recording and replaying graphs, gradients equal to eager) is in test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2, make_llama

import lorakit
from lorakit.fusion import fuse_swiglu_mlps
from lorakit.train.config import RunConfig
from lorakit.train.graphs import LayerGraphs, decoder_layers, graph_blocker
from lorakit.train.recompute import enable_checkpointing


def _lora(model, dropout=0.0):
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    return model


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


def test_patched_layers_on_cpu_run_eagerly_and_equal_the_model(input_ids):
    ref = _lora(make_llama())
    model = _lora(make_llama())
    model.load_state_dict(ref.state_dict())
    for m in (ref, model):
        fuse_swiglu_mlps(m)
        m.train()
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(hash(name) % 1000))
    keys = list(model.state_dict())
    graphs = LayerGraphs(model)
    assert list(model.state_dict()) == keys  # names and layout unchanged
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # padding: the layers get a real mask tensor
    out = model(input_ids=input_ids, attention_mask=mask).logits
    exp = ref(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(out, exp, rtol=0, atol=0)
    out.square().mean().backward()
    exp.square().mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    assert graphs.replays == 0 and not graphs.graphs  # nothing recorded off CUDA
    graphs.remove()
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))


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

    cfg = RunConfig.model_validate({
        "model": str(make_tiny_model_dir(tmp_path / "m")), "lora": {"r": 2, "target_modules": ["q_proj"]},
        "data": {"train": str(write_chat_jsonl(tmp_path / "t.jsonl", n=8))},
        "train": {"steps": 1, "batch_size": 2, "cuda_graphs": "on", "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")}})
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
