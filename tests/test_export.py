"""lorakit.merging and lorakit.inspection on tiny offline models: merge to a transformers dir, inspect an adapter."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_runs import IDS, logits, make_adapter, make_run
from tiny import make_tiny_model_dir
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import inspection, merging, runs
from lorakit.errors import AdapterFormatError, ConfigError


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


# --------------------------------------------------------------------------- inspect


def test_inspect_norms_equal_float64_reference(env, tmp_path):
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False,
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3},
    )
    adapter = make_adapter(env["tiny"], tmp_path / "patterned", config)
    rows = inspection.inspect_adapter(adapter)
    tensors = {k.removeprefix("base_model.model."): v.double()
               for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    expected_scaling = {"q_proj": 8 / 2, "v_proj": 3 / 4, "embed_tokens": 8 / 4}
    modules = [r for r in rows if r["kind"] != "total"]
    assert len(modules) == 2 * 2 + 1
    for row in modules:
        short = row["module"].rsplit(".", 1)[-1]
        if row["kind"] == "embedding":
            A, B = tensors[row["module"] + ".lora_embedding_A"], tensors[row["module"] + ".lora_embedding_B"]
            delta = (B @ A).T  # (num_embeddings, dim), as PEFT merges it
        else:
            A, B = tensors[row["module"] + ".lora_A.weight"], tensors[row["module"] + ".lora_B.weight"]
            delta = B @ A  # (out, in)
        scaling = expected_scaling[short]
        assert row["scaling"] == scaling and row["r"] == A.shape[0]
        assert row["params"] == A.numel() + B.numel()
        assert row["norm"] == pytest.approx(torch.linalg.matrix_norm(scaling * delta).item(), rel=1e-12)
    total = rows[-1]
    assert total["module"] == "total" and total["params"] == sum(r["params"] for r in modules)
    assert total["norm"] == pytest.approx(math.sqrt(sum(r["norm"] ** 2 for r in modules)))


def test_inspect_rejects_corrupt_file(env, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((env["adapter"] / "adapter_config.json").read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFormatError, match="corrupt"):
        inspection.inspect_adapter(bad)
