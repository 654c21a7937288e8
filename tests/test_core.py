"""Core behaviour: injection, gradients, merge, adapter lifecycle, and PEFT's accounting."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from conftest import make_gpt2, make_llama
from torch import nn

import lorakit
from lorakit.layers import LoraLinear


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_injection_at_init_is_bit_equal(llama, input_ids):
    before = logits(llama, input_ids)
    lorakit.inject(llama, lorakit.LoraConfig(r=8, target_modules="all-linear"))
    assert isinstance(llama.model.layers[0].self_attn.q_proj, LoraLinear)
    assert torch.equal(logits(llama, input_ids), before)


def _lora_A(init, in_features=2048, r=32, use_peft=False, seed=0):
    """lora_A of one Linear(in_features, 8) after lorakit's (or PEFT's) init, flattened to float64."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(in_features, 8, bias=False))
    if use_peft:
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, target_modules=["0"], init_lora_weights=init))
        layer = model.base_model.model[0]
    else:
        layer = lorakit.inject(base, lorakit.LoraConfig(r=r, target_modules=["0"], init_lora_weights=init))[0]
    assert torch.all(layer.lora_B["default"].weight == 0)
    return layer.lora_A["default"].weight.detach().double().flatten()


def _ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = a.sort().values, b.sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True) / a.numel()
    fb = torch.searchsorted(b, grid, right=True) / b.numel()
    return (fa - fb).abs().max().item()


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_lora_A_init_has_peft_distribution(init):
    # 65536 samples: the std is known to well under 1%, and the two schemes' stds differ by 2.4x
    # (kaiming-uniform bound 1/sqrt(2048): std 0.0128; gaussian 1/r: std 0.03125).
    in_features, r = 2048, 32
    A = _lora_A(init, in_features, r)
    bound = 1 / math.sqrt(in_features)
    if init is True:  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert A.abs().max() <= bound and A.abs().max() > 0.999 * bound
        assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    else:  # N(0, 1/r)
        assert A.std().item() == pytest.approx(1 / r, rel=0.01)
        assert A.abs().max() > 3 * bound
    # Same distribution as PEFT's init (another seed), and clearly not the other scheme's: the KS distance is
    # below its 1e-6 critical value 2.69 * sqrt(2 / n) against PEFT, and far above it against the other scheme.
    critical = 2.69 * math.sqrt(2 / A.numel())
    assert _ks_distance(A, _lora_A(init, in_features, r, use_peft=True, seed=1)) < critical
    other = "gaussian" if init is True else True
    assert _ks_distance(A, _lora_A(other, in_features, r, use_peft=True, seed=1)) > 10 * critical


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_gradients_reach_only_trainable(bias, input_ids):
    model = make_llama(bias=True)
    cfg = lorakit.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], bias=bias, modules_to_save=["lm_head"], init_lora_weights=False
    )
    lorakit.inject(model, cfg)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        expected = (
            ".lora_" in name
            or ".modules_to_save." in name
            or (bias == "all" and name.endswith("bias"))
            or (bias == "lora_only" and name.endswith("base_layer.bias") and (".q_proj." in name or ".v_proj." in name))
        )
        assert p.requires_grad == expected, name
        if expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_print_trainable_parameters_matches_peft(capsys):
    base = make_llama()
    cfg = dict(r=16, lora_alpha=32, target_modules="all-linear")
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg)).print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    lorakit.print_trainable_parameters(lorakit.inject(base, lorakit.LoraConfig(**cfg)))
    ours = capsys.readouterr().out.strip()
    assert ours == theirs
    assert ours.startswith("trainable params: ") and " || all params: " in ours


def test_gradient_checkpointing_generate_and_trainer(tmp_path, input_ids):
    from transformers import Trainer, TrainingArguments

    model = make_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad.abs().sum() > 0
    model.zero_grad()
    model.gradient_checkpointing_disable()

    out = model.generate(input_ids=input_ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)

    data = [{"input_ids": input_ids[0], "labels": input_ids[0]}] * 16
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] * 0.7, losses


def test_merge_unmerge_and_warnings(input_ids):
    model = lorakit.inject(make_gpt2(), lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    unmerged = logits(model, input_ids)
    w0 = model.transformer.h[0].attn.c_attn.base_layer.weight.clone()
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, input_ids), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        lorakit.merge(model)
    lorakit.unmerge(model)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.base_layer.weight, w0, rtol=1e-6, atol=1e-6)


def test_safe_merge_refuses_nan():
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.model.layers[1].self_attn.q_proj
    w0 = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(lorakit.LorakitError, match="NaN/Inf"):
        lorakit.merge(model, safe=True)
    assert torch.equal(layer.base_layer.weight, w0)


def test_bf16_base_merges_in_fp32(input_ids):
    base = make_llama()
    model = lorakit.inject(
        copy.deepcopy(base).to(torch.bfloat16),
        lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    expected = (layer.base_layer.weight.float() + layer.delta_weight("default")).to(torch.bfloat16)
    lorakit.merge(model)
    assert torch.equal(layer.base_layer.weight, expected)


def test_merge_and_unload_gives_plain_model(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    expected = logits(model, input_ids)
    plain = lorakit.merge_and_unload(model)
    assert not any(type(m).__module__.startswith("lorakit") for m in plain.modules())
    plain.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(again, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_unload_returns_base_unchanged(input_ids):
    base = make_llama()
    expected = logits(base, input_ids)
    sd = copy.deepcopy(base.state_dict())
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    lorakit.merge(model)
    plain = lorakit.unload(model)
    assert type(plain.model.layers[0].mlp.up_proj) is nn.Linear
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(plain, input_ids), expected)


def test_adapter_lifecycle_and_disable(input_ids):
    base = make_llama()
    expected_base = logits(base, input_ids)
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    assert lorakit.list_adapters(model) == ["default", "b"]
    assert lorakit.active_adapters(model) == ["default"]
    out_a = logits(model, input_ids)
    lorakit.set_adapter(model, "b")
    out_b = logits(model, input_ids)
    assert not torch.allclose(out_a, out_b)
    # Only the active adapter trains.
    assert all(p.requires_grad == (".b." in n) for n, p in model.named_parameters() if ".lora_" in n)
    lorakit.set_adapter(model, ["default", "b"])
    both = logits(model, input_ids)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, input_ids), expected_base)
    torch.testing.assert_close(logits(model, input_ids), both)
    # Adapters come back after an exception, merged ones too.
    lorakit.merge(model)
    with pytest.raises(RuntimeError):
        with lorakit.disable_adapters(model):
            torch.testing.assert_close(logits(model, input_ids), expected_base, rtol=1e-5, atol=1e-5)
            raise RuntimeError("boom")
    torch.testing.assert_close(logits(model, input_ids), both, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    lorakit.delete_adapter(model, "b")
    assert lorakit.list_adapters(model) == ["default"] and lorakit.active_adapters(model) == ["default"]
    torch.testing.assert_close(logits(model, input_ids), out_a)
    with pytest.raises(lorakit.AdapterNotFoundError, match="no adapter named 'zzz'.*adapters: default"):
        lorakit.set_adapter(model, "zzz")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 3, stride=2)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):  # x: (B, 3, L*L)
        h = self.c1(x)
        side = int(h.shape[-1] ** 0.5)
        h = self.c2(h.view(h.shape[0], 6, side, side))
        return self.fc(h.mean((2, 3)))


def test_conv_layers_match_peft(tmp_path):
    torch.manual_seed(0)
    base = ConvNet()
    x = torch.randn(2, 3, 64)
    cfg = dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "fc"])
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(init_lora_weights=False, **cfg))
    lorakit.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    merged = lorakit.merge_and_unload(copy.deepcopy(ours))
    torch.testing.assert_close(merged(x), ours(x), rtol=1e-5, atol=1e-6)


def test_for_inference_and_back_is_exact(input_ids):
    model = lorakit.inject(
        make_llama().to(torch.bfloat16),
        lorakit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False),
    )
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    unmerged = logits(model, input_ids)
    model.train()
    lorakit.for_inference(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.merged_adapters == ["default"]
    merged = logits(model, input_ids).float()
    assert (merged - unmerged.float()).norm() / unmerged.float().norm() < 0.02  # bf16 merge rounding only
    lorakit.for_training(model)
    assert model.training and layer.merged_adapters == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_for_inference_shortcut_calls_the_base_layer_and_any_state_change_drops_it(llama, input_ids):
    """Merged wrappers hand calls straight to the base layer; every adapter-state change undoes that."""
    import copy

    from lorakit.adapters import disable_adapters, for_inference, for_training
    from lorakit.inject import lora_layers

    model = lorakit.inject(llama, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        want = ref(input_ids).logits
        base_out = copy.deepcopy(ref)
        with disable_adapters(base_out):
            plain = base_out(input_ids).logits
        for_inference(model)
        layers = [layer for _, layer in lora_layers(model)]
        assert all(layer.forward == layer.base_layer.forward for layer in layers)
        calls = []
        hook = layers[0].register_forward_hook(lambda *a: calls.append(1))
        torch.testing.assert_close(model(input_ids).logits, want, rtol=1e-5, atol=1e-5)
        assert calls == [1]  # the wrapper is still the module in the tree: its hooks run, once
        hook.remove()
        with disable_adapters(model):  # state change: shortcut dropped, the base weights are the plain ones
            assert all("forward" not in layer.__dict__ for layer in layers)
            torch.testing.assert_close(model(input_ids).logits, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids).logits, want, rtol=1e-5, atol=1e-5)
        for_training(model)
        assert all("forward" not in layer.__dict__ for layer in layers)
        torch.testing.assert_close(model(input_ids).logits, want, rtol=1e-5, atol=1e-5)
        layers[0].base_layer.register_forward_hook(lambda *a: None)
        for_inference(model)  # a hooked base layer keeps the wrapper's own forward
        assert "forward" not in layers[0].__dict__ and layers[1].forward == layers[1].base_layer.forward
        layers[1].unmerge()
        assert "forward" not in layers[1].__dict__
        torch.testing.assert_close(model(input_ids).logits, want, rtol=1e-5, atol=1e-5)
