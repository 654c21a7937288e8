"""Two processes (torchrun, gloo on CPU) train the same adapter as one process with the same global batch
(also with gradient accumulation and a short last batch)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_model_dir, write_chat_jsonl  # noqa: E402

from lorakit.train.config import RunConfig  # noqa: E402
from lorakit.train.loop import train  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")

WORKER = """
import sys, torch
from lorakit.train.config import RunConfig
from lorakit.train.loop import train
torch.set_num_threads(1)
result = train(RunConfig.model_validate_json(open(sys.argv[1]).read()), device="cpu")
assert result.steps == int(sys.argv[2]), result
"""


def _cfg(model: Path, data: Path, out: Path, batch_size: int, data_kw=None, **train_kw) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": str(model),
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]},
            "data": {"train": str(data), **(data_kw if data_kw is not None else {"eval_fraction": 0.25})},
            "train": {
                "steps": 4,
                "batch_size": batch_size,
                "grad_accum": 1,
                "lr": 2e-2,
                "precision": "fp32",
                "eval_every": 2,
                "save_every": 2,
                "schedule": "cosine",
                "warmup_steps": 1,
                **train_kw,
            },
            "output": {"dir": str(out)},
        }
    )


def _torchrun(tmp_path: Path, cfg: RunConfig, steps: int) -> None:
    """Train ``cfg`` in 2 processes (gloo on CPU); each must end after ``steps`` steps."""
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(cfg.model_dump_json())
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            str(script),
            str(cfg_path),
            str(steps),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _train_one_process(cfg: RunConfig):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg, device="cpu")
    finally:
        torch.set_num_threads(before)


def _max_diff(run_a: Path, run_b: Path) -> float:
    a = load_file(str(run_a / "adapter_model.safetensors"))
    b = load_file(str(run_b / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(b[k].abs().max() > 0 for k in b if "lora_B" in k)  # it did train
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_gloo_processes_equal_one_process(tmp_path):
    model = make_tiny_model_dir(tmp_path / "model")
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=32)

    # 2 processes x 2 rows == 1 process x 4 rows: the same global batches, split across ranks
    _torchrun(tmp_path, _cfg(model, data, tmp_path / "ddp", batch_size=2), steps=4)
    single = _train_one_process(_cfg(model, data, tmp_path / "single", batch_size=4))
    diff = _max_diff(tmp_path / "ddp", tmp_path / "single")
    print(f"2-process vs 1-process adapter: max abs diff {diff:.3g}")
    assert diff < 1e-5, diff
    # rank 0 alone wrote the run: one metrics row per step, evals at 2 and 4, same eval loss
    rows = [line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 + 2
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert abs(single.eval_loss - _last_eval(tmp_path / "ddp")) < 1e-5


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_with_grad_accum_and_a_short_last_batch_equal_one_process(tmp_path):
    model = make_tiny_model_dir(tmp_path / "model")
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=21)
    # 2 processes x 2 grad_accum x 2 rows: global batches of 8 rows, 3 per epoch (8, 8, 5). In the 5-row batch,
    # micro-batches of 2, 2, 1 rows: rank 0 takes 2 and 1 rows, rank 1 takes 2. One process: 8 rows at once.
    common = dict(data_kw={}, steps=None, epochs=2, eval_every=0, save_every=0, warmup_steps=0)
    _torchrun(tmp_path, _cfg(model, data, tmp_path / "ddp", batch_size=2, grad_accum=2, **common), steps=6)
    _train_one_process(_cfg(model, data, tmp_path / "single", batch_size=8, **common))
    diff = _max_diff(tmp_path / "ddp", tmp_path / "single")
    assert diff < 1e-5, diff
    losses = [
        [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
        for d in (tmp_path / "ddp", tmp_path / "single")
    ]
    assert [s for s, _ in losses[0]] == list(range(1, 7))
    for (_, a), (_, b) in zip(*losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def _last_eval(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
