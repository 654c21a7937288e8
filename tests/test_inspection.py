"""lorakit.inspection on tiny offline models: per-module norms against a float64 reference, corrupt files."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_adapter, make_run_env

import lorakit
from lorakit import inspection
from lorakit.errors import AdapterFormatError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_run_env(tmp_path_factory.mktemp("inspect"))


def test_inspect_norms_equal_float64_reference(env, tmp_path):
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        init_lora_weights=False,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    adapter = make_adapter(env["tiny"], tmp_path / "patterned", config)
    rows = inspection.inspect_adapter(adapter)
    tensors = {
        k.removeprefix("base_model.model."): v.double()
        for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()
    }
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
