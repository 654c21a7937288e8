"""Tests of lorakit.train.loop on a tiny offline model (fp32, CPU).

The independent references: a second run (resume == uninterrupted, accumulation == a
big batch), PEFT (loads the adapter, same logits), and transformers' learning-rate
schedulers.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train_schedule import hf_lr_factors  # noqa: E402
from tiny import make_tiny_model_dir, write_chat_jsonl  # noqa: E402

import lorakit  # noqa: E402
from lorakit.errors import (  # noqa: E402
    ConfigError,
    TrainingError,
    TrainingInterrupted,  # noqa: E402
)
from lorakit.train import loop
from lorakit.train.config import RunConfig  # noqa: E402
from lorakit.train.loop import train  # noqa: E402
from lorakit.train.report import read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_tiny_model_dir(root / "model"), write_chat_jsonl(root / "train.jsonl", n=32)


# lm_head too: the tiny model's final RMSNorm bounds what the inner layers alone can do to the logits.
TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


def make_cfg(assets, out: Path, lora=None, data=None, **train) -> RunConfig:
    model, data_file = assets
    return RunConfig.model_validate(
        {
            "model": str(model),
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **(lora or {})},
            "data": {"train": str(data_file), **(data or {})},
            "train": {
                "steps": 4,
                "batch_size": 4,
                "lr": 1e-2,
                "precision": "fp32",
                "eval_every": 0,
                "save_every": 0,
                **train,
            },
            "output": {"dir": str(out)},
        }
    )


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def test_loss_falls_and_run_dir_is_complete(assets, tmp_path):
    out = tmp_path / "run"
    result = train(
        make_cfg(
            assets,
            out,
            data={"eval_fraction": 0.25},
            steps=30,
            batch_size=8,
            lr=3e-2,
            eval_every=10,
            save_every=10,
            log_every=1,
        ),
        device="cpu",
    )
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert all(set(r) == {"step", "loss", "lr", "tokens", "elapsed_s"} for r in train_rows)
    assert [r["step"] for r in eval_rows] == [10, 20, 30] and all(set(r) == {"step", "eval_loss"} for r in eval_rows)
    first, last = train_rows[0]["loss"], sum(r["loss"] for r in train_rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    assert train_rows[-1]["tokens"] == result.tokens and train_rows[0]["tokens"] > 0
    assert result.steps == 30 and result.eval_loss == eval_rows[-1]["eval_loss"]
    assert result.train_loss == pytest.approx(train_rows[-1]["loss"])
    assert result.trainable_params == lorakit.trainable_parameters(_injected(assets))[0]
    assert result.peak_memory_bytes > 0 and result.precision == "fp32"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("adapter_config.json", "adapter_model.safetensors", "lorakit.yaml", "README.md"):
        assert (out / name).is_file(), name
    assert "fp32" in (out / "README.md").read_text()
    # only the last 2 checkpoints are kept; each holds an adapter and a trainer state
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    state = torch.load(out / "checkpoints/step-000030/trainer_state.pt", weights_only=True)
    assert state["step"] == 30
    assert torch.equal(
        adapter(out / "checkpoints/step-000030")["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
        adapter(out)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    )
    # a second, fresh run into the same folder is refused (it would mix two runs)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make_cfg(assets, out), device="cpu")


def _injected(assets):
    from lorakit.models import load_model

    model, _ = load_model(str(assets[0]), dtype=torch.float32)
    return lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def test_adapter_at_root_loads_in_peft_with_same_logits(assets, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_model

    out = tmp_path / "run"
    train(make_cfg(assets, out, steps=3, lr=5e-2), device="cpu")
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    ours, _ = load_model(str(assets[0]), dtype=torch.float32)
    lorakit.load_adapter(ours, out)
    base = AutoModelForCausalLM.from_pretrained(assets[0], dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        theirs = peft.PeftModel.from_pretrained(base, out).eval()
        ref, got = theirs(ids).logits, ours.eval()(ids).logits
    assert not torch.allclose(ref, plain, atol=1e-4)  # the adapter changes the model
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stop_in_step", [4, 5])
def test_interrupted_and_resumed_run_is_bit_identical(assets, tmp_path, monkeypatch, stop_in_step):
    kw = dict(lora={"lora_dropout": 0.1}, steps=6, save_every=3, schedule="cosine", warmup_steps=2)
    straight = tmp_path / "straight"
    train(make_cfg(assets, straight, **kw), device="cpu")

    resumed = tmp_path / "resumed"
    real, calls = loop._forward_loss, []

    def interrupt(model, batch):
        calls.append(1)
        if len(calls) == stop_in_step:  # one micro-batch per step here: this is step stop_in_step
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(loop, "_forward_loss", interrupt)
    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        train(make_cfg(assets, resumed, **kw), device="cpu")
    assert info.value.step == stop_in_step - 1
    assert info.value.checkpoint == resumed / "checkpoints" / f"step-{stop_in_step - 1:06d}"
    assert isinstance(info.value, TrainingError)
    assert not (resumed / "adapter_model.safetensors").exists()
    monkeypatch.setattr(loop, "_forward_loss", real)

    result = train(make_cfg(assets, resumed, **kw), resume=True, device="cpu")
    assert result.steps == 6
    a, b = adapter(straight), adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics read as one run; losses equal to the uninterrupted run's
    rows_a = [r for r in read_metrics(straight / "metrics.jsonl") if "loss" in r]
    rows_b = [r for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows_b] == list(range(1, 7))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["lr"] for r in rows_a] == [r["lr"] for r in rows_b]


def _rows_seen(monkeypatch):
    """Spy on the loop's loss: the training rows (token tuples, padding dropped) of each micro-batch."""
    seen, real = [], loop._forward_loss

    def spy(model, batch):
        seen.append([tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"])])
        return real(model, batch)

    monkeypatch.setattr(loop, "_forward_loss", spy)
    return seen


def test_epochs_run_ceil_rows_over_batch_steps_and_see_every_row_once_per_epoch(assets, tmp_path, monkeypatch):
    seen = _rows_seen(monkeypatch)
    # 32 rows in batches of 5: 7 steps per epoch, the last one 2 rows
    result = train(make_cfg(assets, tmp_path / "run", steps=None, epochs=3, batch_size=5), device="cpu")
    assert result.steps == 3 * math.ceil(32 / 5) == 21
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == list(range(1, 22))
    assert len(seen) == 21
    lines = [json.loads(line) for line in assets[1].read_text().splitlines()]
    distinct = {json.dumps(r, sort_keys=True) for r in lines}
    epochs = [[row for batch in seen[e * 7 : (e + 1) * 7] for row in batch] for e in range(3)]
    for epoch, batches in zip(epochs, (seen[e * 7 : (e + 1) * 7] for e in range(3))):
        assert sorted(len(b) for b in batches) == [2, 5, 5, 5, 5, 5, 5]
        assert len(epoch) == 32 and len(set(epoch)) == len(distinct)  # every row once
        assert Counter(epoch) == Counter(epochs[0])
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch


@pytest.mark.parametrize("stop_in_step", [8, 10])  # the first step of epoch 1, and one inside it
def test_resume_across_an_epoch_boundary_is_bit_identical(assets, tmp_path, monkeypatch, stop_in_step):
    kw = dict(
        lora={"lora_dropout": 0.1}, steps=None, epochs=2, batch_size=5, save_every=5, schedule="cosine", warmup_steps=2
    )
    straight = tmp_path / "straight"
    straight_rows = _rows_seen(monkeypatch)
    train(make_cfg(assets, straight, **kw), device="cpu")
    monkeypatch.undo()

    resumed = tmp_path / "resumed"
    real, calls = loop._forward_loss, []

    def interrupt(model, batch):
        calls.append(1)
        if len(calls) == stop_in_step:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(loop, "_forward_loss", interrupt)
    with pytest.raises(TrainingInterrupted) as info:
        train(make_cfg(assets, resumed, **kw), device="cpu")
    assert info.value.step == stop_in_step - 1
    monkeypatch.undo()
    resumed_rows = _rows_seen(monkeypatch)
    assert train(make_cfg(assets, resumed, **kw), resume=True, device="cpu").steps == 14
    # the resumed run reads the batches the uninterrupted one read from that step on
    assert resumed_rows == straight_rows[stop_in_step - 1 :]
    a, b = adapter(straight), adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [
        [(r["step"], r["loss"], r["lr"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
        for d in (straight, resumed)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 14


def test_interrupt_before_the_first_step_saves_nothing(assets, tmp_path, monkeypatch):
    def interrupt(model, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_forward_loss", interrupt)
    with pytest.raises(TrainingInterrupted, match="nothing to resume") as info:
        train(make_cfg(assets, tmp_path / "run"), device="cpu")
    assert info.value.step == 0 and info.value.checkpoint is None


def test_resume_refuses_a_changed_config_or_a_missing_checkpoint(assets, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(make_cfg(assets, tmp_path / "none"), resume=True, device="cpu")
    out = tmp_path / "run"
    train(make_cfg(assets, out, steps=2), device="cpu")
    with pytest.raises(ConfigError, match=r"train\.batch_size: 4 -> 2"):
        train(make_cfg(assets, out, steps=4, batch_size=2), resume=True, device="cpu")
    result = train(make_cfg(assets, out, steps=3), resume=True, device="cpu")  # more steps is fine
    assert result.steps == 3


def test_grad_accum_equals_one_big_batch_and_lr_follows_the_schedule(assets, tmp_path):
    kw = dict(steps=3, lr=2e-2, schedule="linear", warmup_steps=1, max_grad_norm=0.5)
    train(make_cfg(assets, tmp_path / "accum", batch_size=4, grad_accum=2, **kw), device="cpu")
    train(make_cfg(assets, tmp_path / "big", batch_size=8, **kw), device="cpu")
    a, b = adapter(tmp_path / "accum"), adapter(tmp_path / "big")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "accum" / "metrics.jsonl")]
    assert lrs == pytest.approx([2e-2 * f for f in hf_lr_factors("linear", 3, 1)])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = loop._forward_loss, []

    def poisoned(model, batch):
        loss_sum, n = real(model, batch)
        calls.append(1)
        return (loss_sum * float("nan") if len(calls) == 4 else loss_sum), n

    monkeypatch.setattr(loop, "_forward_loss", poisoned)
    good = out / "checkpoints" / "step-000002"
    with pytest.raises(
        TrainingError,
        match=rf"loss became nan at step 4; the last good checkpoint is {good}; "
        "lower train.lr",
    ):
        train(make_cfg(assets, out, steps=6, save_every=2), device="cpu")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    state = torch.load(good / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in adapter(good).values())
    assert not (out / "adapter_model.safetensors").exists()
    monkeypatch.setattr(loop, "_forward_loss", real)
    assert train(make_cfg(assets, out, steps=6, save_every=2), resume=True, device="cpu").steps == 6


def test_huge_lr_diverges_with_a_training_error(assets, tmp_path):
    with pytest.raises(TrainingError, match="became (nan|inf)"):
        train(
            make_cfg(assets, tmp_path / "run", steps=8, lr=1e30, max_grad_norm=None, lora={"init_lora_weights": False}),
            device="cpu",
        )


def _first_step(assets, out, monkeypatch, precision):
    """Step 1 of a packed, checkpointed run: dtypes seen, loss, LoRA weights and grads (normalised, not clipped)."""
    seen = {}
    real_forward, real_clip = loop._forward_loss, torch.nn.utils.clip_grad_norm_

    def forward(model, batch):
        seen["base"] = model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype
        seen["lora"] = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype
        seen["packed"] = "position_ids" in batch and "attention_mask" not in batch
        loss_sum, n = real_forward(model, batch)
        seen["loss"] = loss_sum.dtype
        return loss_sum, n

    def clip(params, *args, **kwargs):
        params = list(params)
        grads.append([p.grad.detach().double().clone() for p in params])
        weights.append([p.detach().double().clone() for p in params])
        return real_clip(params, *args, **kwargs)

    grads, weights = [], []
    monkeypatch.setattr(loop, "_forward_loss", forward)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    result = train(
        make_cfg(
            assets,
            out,
            lora={"init_lora_weights": False},
            data={"packing": True, "max_seq_len": 128},
            steps=1,
            precision=precision,
            gradient_checkpointing=True,
        ),
        device="cpu",
    )
    monkeypatch.undo()
    assert result.precision == precision and math.isfinite(result.train_loss)
    return seen, read_metrics(out / "metrics.jsonl")[0]["loss"], weights[0], grads[0]


def test_bf16_step_is_close_to_fp32(assets, tmp_path, monkeypatch):
    seen, loss16, w16, g16 = _first_step(assets, tmp_path / "bf16", monkeypatch, "bf16")
    # bf16 base weights and autocast; LoRA weights, the loss and its sum stay fp32
    assert seen == {"base": torch.bfloat16, "lora": torch.float32, "packed": True, "loss": torch.float32}
    assert "bf16" in (tmp_path / "bf16" / "README.md").read_text()
    _, loss32, w32, g32 = _first_step(assets, tmp_path / "fp32", monkeypatch, "fp32")
    assert all(torch.equal(a, b) for a, b in zip(w16, w32, strict=True))  # the same starting point
    # bf16 keeps 8 mantissa bits (relative rounding 2**-9 ~ 0.2% per value): the loss within 1%,
    # each LoRA gradient within 5% of its fp32 norm (measured: loss 0.01%, worst grad 1.5%)
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(g16, g32, strict=True))
    print(f"bf16 vs fp32: loss {loss16:.5f} vs {loss32:.5f}, worst relative grad error {worst:.3g}")
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    for a, b in zip(g16, g32, strict=True):
        assert b.norm() > 0
        assert (a - b).norm() / b.norm() < 0.05, ((a - b).norm() / b.norm()).item()


def test_yaml_path_with_overrides(assets, tmp_path):
    model, data_file = assets
    path = tmp_path / "run.yaml"
    path.write_text(
        json.dumps(
            {
                "model": str(model),
                "lora": {"r": 2, "target_modules": ["q_proj"]},
                "data": {"train": str(data_file)},
                "train": {"steps": 5, "precision": "fp32", "batch_size": 4},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    result = train(path, overrides=["train.steps=2", "train.eval_every=0"], device="cpu")
    assert result.steps == 2
    assert "steps: 2" in (tmp_path / "out" / "lorakit.yaml").read_text()
    with pytest.raises(ConfigError, match="overrides"):
        train(make_cfg(assets, tmp_path / "x"), overrides=["train.steps=1"])


def test_bad_lora_values_fail_before_the_model_loads(assets, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad config")

    monkeypatch.setattr("lorakit.models.load_model", no_load)
    with pytest.raises(ConfigError, match=r"lora section of the run config: r=0 is too small"):
        train(make_cfg(assets, tmp_path / "run", lora={"r": 0}), device="cpu")


def test_lorakit_train_is_the_loop(assets, tmp_path):
    result = lorakit.train(make_cfg(assets, tmp_path / "run", steps=2), device="cpu")
    assert result.steps == 2 and (tmp_path / "run" / "adapter_model.safetensors").is_file()
    from lorakit.train.loop import train as loop_train

    assert loop_train is train


def test_the_run_routes_its_rms_norms_to_save_their_output(assets, tmp_path, monkeypatch):
    """Every RMSNorm of the tiny Llama (two a layer and the final one) goes through lorakit.norms in a run."""
    from lorakit import norms, routing

    routed = []

    def route(model):
        n = norms.route_rms_norms(model)
        routed.append((n, [routing.forward_owner(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm")]))
        return n

    monkeypatch.setattr(loop, "route_rms_norms", route)
    train(make_cfg(assets, tmp_path / "run", steps=1), device="cpu")
    [(n, owners)] = routed
    assert n == 2 * 2 + 1 and owners == ["lorakit.norms"] * n
