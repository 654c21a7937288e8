"""method: dpo through lorakit.train and the CLI on a tiny model: metrics, resume, reference cache, errors, eval."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_model_dir, write_chat_jsonl

import lorakit
from lorakit import cli
from lorakit.errors import TrainingInterrupted
from lorakit.train import dpo as train_dpo
from lorakit.train.config import RunConfig, load_run_config
from lorakit.train.loop import train
from lorakit.train.report import read_metrics

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_pairs(path: Path, n: int, seed: int = 0, **row_overrides) -> Path:
    """'say W' -> chosen 'W W', rejected 'W!': a preference a tiny model can learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5)))
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"say {w}"}],
                "chosen": f"{w} {w}",
                "rejected": f"{w}!",
                **row_overrides,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_run")
    return {
        "root": root,
        "model": make_tiny_model_dir(root / "model"),
        "pairs": write_pairs(root / "pairs.jsonl", 24),
        "eval": write_pairs(root / "eval.jsonl", 8, seed=1),
        "sft": write_chat_jsonl(root / "sft.jsonl", n=16),
    }


def make_cfg(assets, out: Path, dpo=None, data=None, adapter=None, **train_kw) -> RunConfig:
    return RunConfig.model_validate(
        {
            "method": "dpo",
            "model": str(assets["model"]),
            "adapter": None if adapter is None else str(adapter),
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "dpo": {"beta": 0.1, **(dpo or {})},
            "data": {"train": str(assets["pairs"]), "max_seq_len": 64, **(data or {})},
            "train": {
                "steps": 4,
                "batch_size": 4,
                "lr": 1e-2,
                "precision": "fp32",
                "eval_every": 0,
                "save_every": 0,
                **train_kw,
            },
            "output": {"dir": str(out)},
        }
    )


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def test_dpo_run_logs_trl_metrics_and_writes_the_run(assets, tmp_path):
    out = tmp_path / "run"
    result = train(make_cfg(assets, out, data={"eval": str(assets["eval"])}, steps=6, eval_every=3), device="cpu")
    assert result.steps == 6
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert all(set(METRICS) <= set(r) for r in train_rows)
    assert [r["step"] for r in eval_rows] == [3, 6]
    assert all({f"eval_{m}" for m in METRICS} <= set(r) for r in eval_rows)
    # Step 1 runs before any update: B = 0, so the policy is the reference (the base, adapters disabled).
    first = train_rows[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert train_rows[-1]["rewards/margins"] > 0  # the preference is being learnt
    assert (out / "loss.png").is_file() and (out / "adapter_model.safetensors").is_file()
    assert "dpo" in (out / "README.md").read_text()
    saved = load_run_config(out / "lorakit.yaml")
    assert saved.method == "dpo" and saved.dpo.beta == 0.1


def test_interrupted_dpo_run_resumes_bit_identical(assets, tmp_path, monkeypatch):
    kw = dict(steps=5, save_every=2, schedule="cosine")
    straight = tmp_path / "straight"
    train(make_cfg(assets, straight, **kw), device="cpu")
    real, calls = train_dpo.DpoObjective.loss, []

    def interrupt(self, model, batch):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, model, batch)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(train_dpo.DpoObjective, "loss", interrupt)
    with pytest.raises(TrainingInterrupted):
        train(make_cfg(assets, resumed, **kw), device="cpu")
    monkeypatch.setattr(train_dpo.DpoObjective, "loss", real)
    train(make_cfg(assets, resumed, **kw), resume=True, device="cpu")
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_is_cached_and_reused(assets, tmp_path, capsys):
    live, cached = tmp_path / "live", tmp_path / "cached"
    train(make_cfg(assets, live, steps=3), device="cpu")
    train(make_cfg(assets, cached, dpo={"precompute_reference": True}, steps=3, save_every=2), device="cpu")
    assert (cached / train_dpo.REFERENCE_CACHE).is_file()
    assert "reference log-probs: computed" in capsys.readouterr().out
    a, b = adapter_tensors(live), adapter_tensors(cached)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    cfg = make_cfg(assets, cached, dpo={"precompute_reference": True}, steps=4, save_every=2)
    train(cfg, resume=True, device="cpu")
    assert "reference log-probs: read from" in capsys.readouterr().out


def test_dpo_from_an_sft_adapter(assets, tmp_path):
    """adapter: the run starts from it and the reference is its frozen copy: step 1 rewards are 0.

    Not bit-exact here: the policy runs the fused training ops, the reference the per-module path.
    """
    sft = tmp_path / "sft"
    train(
        RunConfig.model_validate(
            {
                "model": str(assets["model"]),
                "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                "data": {"train": str(assets["sft"])},
                "output": {"dir": str(sft)},
                "train": {
                    "steps": 2,
                    "batch_size": 4,
                    "lr": 1e-2,
                    "precision": "fp32",
                    "eval_every": 0,
                    "save_every": 0,
                },
            }
        ),
        device="cpu",
    )
    out = tmp_path / "dpo"
    train(make_cfg(assets, out, adapter=sft, steps=3), device="cpu")
    first = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    moved = adapter_tensors(out)
    start = adapter_tensors(sft)
    assert moved.keys() == start.keys() and any(not torch.equal(moved[k], start[k]) for k in start)


def run_cli(capsys, *args):
    from transformers.utils import logging as hf_logging

    capsys.readouterr()  # what the test printed before
    hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars are not lorakit's output
    try:
        code = cli.main([str(a) for a in args])
    finally:
        hf_logging.enable_progress_bar()
    out, err = capsys.readouterr()
    return code, out, err


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def base_yaml(assets, out, **top):
    cfg = {
        "method": "dpo",
        "model": str(assets["model"]),
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(assets["pairs"]), "max_seq_len": 64},
        "train": {"steps": 1, "batch_size": 4, "precision": "fp32", "eval_every": 0, "save_every": 0},
        "output": {"dir": str(out)},
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def assert_user_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize(
    "case",
    ["sft_data", "pairs_for_sft", "identical", "no_chosen", "long_prompt", "no_adapter", "other_base", "bad_loss"],
)
def test_errors_exit_2_with_one_line(assets, tmp_path, capsys, case):
    root = tmp_path
    out = root / "out"
    if case == "sft_data":
        cfg, fragments = (
            base_yaml(assets, out, data={"train": str(assets["sft"])}),
            [f"{assets['sft']}:1:", "method: sft"],
        )
    elif case == "pairs_for_sft":
        cfg, fragments = base_yaml(assets, out, method="sft"), [f"{assets['pairs']}:1:", "method: dpo"]
    elif case == "identical":
        bad = write_pairs(root / "same.jsonl", 3)
        lines = bad.read_text().splitlines()
        row = json.loads(lines[1])
        row["rejected"] = row["chosen"]
        bad.write_text("\n".join([lines[0], json.dumps(row), lines[2]]) + "\n")
        cfg, fragments = base_yaml(assets, out, data={"train": str(bad)}), [f"{bad}:2:", "identical"]
    elif case == "no_chosen":
        bad = root / "nochosen.jsonl"
        bad.write_text(json.dumps({"prompt": "p", "rejected": "r"}) + "\n")
        cfg, fragments = base_yaml(assets, out, data={"train": str(bad)}), [f"{bad}:1:", "'chosen'"]
    elif case == "long_prompt":
        bad = write_pairs(root / "long.jsonl", 2)
        bad.write_text(bad.read_text() + json.dumps({"prompt": "x" * 300, "chosen": "a", "rejected": "b"}) + "\n")
        cfg, fragments = base_yaml(assets, out, data={"train": str(bad)}), [f"{bad}:3:", "max_seq_len=64"]
    elif case == "no_adapter":
        cfg, fragments = base_yaml(assets, out, adapter=str(root / "nowhere")), ["nowhere", "adapter"]
    elif case == "other_base":
        wide = make_tiny_model_dir(root / "wide", hidden=48)
        other = root / "other"
        lorakit.save_adapter(
            lorakit.inject(lorakit.models.load_model(wide)[0], lorakit.LoraConfig(r=4, target_modules="all-linear")),
            other,
        )
        cfg, fragments = base_yaml(assets, out, adapter=str(other)), ["does not fit the base model"]
    else:
        cfg, fragments = base_yaml(assets, out, dpo={"loss_type": "kto"}), ["dpo.loss_type"]
    code, _, err = run_cli(capsys, "train", write_yaml(root / "cfg.yaml", cfg))
    assert_user_error(code, err, *fragments)


def test_eval_on_pairs_reports_reward_accuracy_against_the_reference(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train(make_cfg(assets, out, steps=2), device="cpu")
    code, text, err = run_cli(capsys, "eval", out, "--data", assets["eval"])
    assert code == 0, err
    from lorakit.preference import evaluate_pairs
    from lorakit.runs import open_adapter

    model, tok, _ = open_adapter(out)
    expected = evaluate_pairs(model, tok, assets["eval"], beta=0.1, max_seq_len=64)
    assert f"rewards/accuracies  {expected['rewards/accuracies']:.3f}" in text
    assert f"rewards/margins     {expected['rewards/margins']:.4f}" in text
    assert "8 pairs" in text


@pytest.mark.slow
def test_a_few_hundred_steps_learn_a_held_out_preference(assets, tmp_path):
    """Synthetic preference ('say W': 'W W' over 'W!'): held-out reward accuracy goes above 0.9."""
    root = tmp_path
    train_pairs, held_out = write_pairs(root / "train.jsonl", 64, seed=2), write_pairs(root / "held.jsonl", 32, seed=3)
    cfg = make_cfg(
        assets,
        root / "run",
        data={"train": str(train_pairs), "eval": str(held_out)},
        steps=300,
        batch_size=8,
        lr=3e-3,
        eval_every=100,
        log_every=50,
    )
    train(cfg, device="cpu")
    evals = [r for r in read_metrics(root / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1]["eval_rewards/accuracies"] > 0.9
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] > 0


def test_two_gloo_processes_equal_one_process(assets, tmp_path):
    """DDP: 2 processes x 2 pairs train the adapter and log the metrics of 1 process x 4 pairs."""
    from test_ddp import TORCHRUN, _max_diff, _torchrun

    if not TORCHRUN.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    kw = dict(data={"eval": str(assets["eval"])}, steps=3, eval_every=3)
    _torchrun(tmp_path, make_cfg(assets, tmp_path / "ddp", batch_size=2, **kw), steps=3)
    train(make_cfg(assets, tmp_path / "single", batch_size=4, **kw), device="cpu")
    assert _max_diff(tmp_path / "ddp", tmp_path / "single") < 1e-5
    ddp, single = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("ddp", "single"))
    assert len(ddp) == len(single) == 4
    for a, b in zip(ddp, single):
        assert a.keys() == b.keys()
        for key in set(a) - {"elapsed_s"}:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_gradient_checkpointing_gives_the_same_dpo_run(assets, tmp_path):
    """The reference forward (no grad, eval mode) and the policy's checkpointed layers go together."""
    train(make_cfg(assets, tmp_path / "plain", steps=2), device="cpu")
    train(make_cfg(assets, tmp_path / "gc", steps=2, gradient_checkpointing=True), device="cpu")
    a, b = adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "gc")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_loss_png_gains_a_reward_margin_panel(tmp_path):
    """A DPO run's loss.png has a second panel with the margin series (green, rising as the margins do);
    an SFT run's has none."""
    import matplotlib.image as mpimg
    import numpy as np

    from lorakit.train.report import plot_loss

    def write(path, rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    sft = write(tmp_path / "sft.jsonl", [{"step": s, "loss": 2.0 / s} for s in range(1, 21)])
    dpo = write(
        tmp_path / "dpo.jsonl",
        [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/margins": 0.05 * s} for s in range(1, 21)]
        + [{"step": 10, "eval_loss": 0.6, "eval_rewards/margins": 0.4}],
    )
    green = np.array([0x2C, 0xA0, 0x2C]) / 255  # tab:green, the train margin line

    def green_pixels(png):
        img = mpimg.imread(plot_loss(png[0], png[1]))[..., :3]
        ys, xs = np.nonzero(np.abs(img - green).max(-1) < 0.02)
        return img.shape, ys, xs

    (h_sft, w_sft, _), ys, _ = green_pixels((sft, tmp_path / "sft.png"))
    assert len(ys) == 0
    (h, w, _), ys, xs = green_pixels((dpo, tmp_path / "dpo.png"))
    assert w == w_sft and h > h_sft  # a taller figure: the panel under the loss plot
    assert len(ys) > 100 and ys.min() > h * 0.45  # the margin line lies in the lower panel only
    left, right = ys[xs < np.percentile(xs, 10)].mean(), ys[xs > np.percentile(xs, 90)].mean()
    assert right < left - 50  # margins rise from 0.05 to 1.0: the line climbs (image rows count down)


def test_progress_bar_shows_trl_metric_names(assets, tmp_path, monkeypatch):
    """The progress bar's postfix carries TRL's reward metrics by name, with the step's values."""
    import io

    from tqdm import tqdm

    from lorakit.train import report

    bars = []

    def visible_bar(total, initial, enabled):
        bars.append(tqdm(total=total, initial=initial, file=io.StringIO(), disable=False, mininterval=0))
        return bars[-1]

    monkeypatch.setattr(report, "progress_bar", visible_bar)
    out = tmp_path / "run"
    train(make_cfg(assets, out, steps=3), device="cpu")
    postfix = bars[0].postfix
    last = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][-1]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert f"{name}={last[name]:.3f}" in postfix, (name, postfix)
    assert f"loss={last['loss']:.4f}" in postfix
    assert "rewards/margins=" in bars[0].fp.getvalue()  # what the terminal shows
