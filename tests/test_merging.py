"""lorakit.merging on tiny offline models: merge an adapter into a plain transformers model directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_runs import logits
from tiny import make_adapter, make_run, make_tiny_model_dir
from transformers import AutoModelForCausalLM

from lorakit import merging, runs
from lorakit.errors import ConfigError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tiny = make_tiny_model_dir(root / "tiny")
    return {"root": root, "tiny": tiny, "run": make_run(tiny, root / "run"),
            "adapter": make_adapter(tiny, root / "adapter", seed=2)}


@pytest.fixture(scope="module")
def opened(env):
    return runs.open_adapter(env["run"])


# --------------------------------------------------------------------------- merge


def test_merge_matches_unmerged_logits(env, opened, tmp_path):
    out = merging.merge_to_dir(env["run"], tmp_path / "merged")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    torch.testing.assert_close(logits(merged), logits(opened[0]), rtol=0, atol=1e-5)
    assert not list(tmp_path.glob(".merged.tmp-*"))


def test_merged_model_loads_without_lorakit(env, tmp_path):
    out = merging.merge_to_dir(env["run"], tmp_path / "merged", dtype="bf16")
    script = (
        "import sys; sys.modules['lorakit'] = None\n"  # any import of lorakit fails
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, local_files_only=True)\n"
        f"AutoTokenizer.from_pretrained({str(out)!r}, local_files_only=True)\n"
        "assert m.model.embed_tokens.weight.dtype == torch.bfloat16, m.dtype\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_merge_refuses_bad_dtype_and_existing_dir(env, tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        merging.merge_to_dir(env["run"], tmp_path / "m", dtype="fp16")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        merging.merge_to_dir(env["run"], tmp_path / "busy")
    merging.merge_to_dir(env["run"], tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "config.json").is_file() and not (tmp_path / "busy" / "keep.txt").exists()
