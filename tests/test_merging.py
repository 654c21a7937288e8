"""lorakit.merging on tiny offline models: merge an adapter into a plain transformers model directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_runs import logits
from tiny import make_adapter, make_run_env, make_tiny_model_dir
from transformers import AutoModelForCausalLM

from lorakit import merging, runs
from lorakit.errors import ConfigError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_run_env(tmp_path_factory.mktemp("export"))


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


# --------------------------------------------------------------------------- streaming over shards (issue 12)


def _sharded_model(root):
    """The tiny model re-saved in several safetensors shards (max_shard_size), as big checkpoints come."""
    from lorakit.models import load_model

    model, tok = load_model(make_tiny_model_dir(root / "one"))
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    tok.save_pretrained(root / "sharded")
    return root / "sharded"


def _all_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_streaming_merge_equals_in_memory_merge_one_shard_at_a_time(tmp_path, monkeypatch):
    import gc
    import weakref

    import safetensors

    import lorakit

    base = _sharded_model(tmp_path)
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) >= 4
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
        init_lora_weights=False,
        modules_to_save=["lm_head"],
    )
    adapter = make_adapter(base, tmp_path / "adapter", config=config, seed=3)

    real_open, alive, peak = safetensors.safe_open, [], [0, 0]  # peak bytes of base tensors alive, open files

    class Counting:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            peak[1] = max(peak[1], 1 + sum(1 for r in alive if r[0]() is not None and r[2] != self))
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def metadata(self):
            return self.inner.metadata()

        def get_tensor(self, name):
            t = self.inner.get_tensor(name)
            gc.collect()
            alive[:] = [r for r in alive if r[0]() is not None]
            alive.append((weakref.ref(t), t.numel() * t.element_size(), self))
            peak[0] = max(peak[0], sum(r[1] for r in alive))
            return t

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    for dtype in ("fp32", "bf16"):
        alive.clear()
        peak[:] = [0, 0]
        out = merging.merge_to_dir(adapter, tmp_path / f"m-{dtype}", dtype=dtype, model=base)
        assert sorted(p.name for p in out.glob("*.safetensors")) == [p.name for p in shards]  # the base's layout
        assert 0 < peak[0] <= max(p.stat().st_size for p in shards)  # one shard's tensors at most
        assert peak[0] < sum(p.stat().st_size for p in shards) / 2
        assert peak[1] == 1  # one shard file open at a time
        # Equal to the in-memory merge: load base + adapter, merge_and_unload, cast, save_pretrained.
        model, _, _ = runs.open_adapter(adapter, model=base, dtype="fp32")
        ref = lorakit.merge_and_unload(model).to(merging.MERGE_DTYPES[dtype])
        ref.save_pretrained(tmp_path / f"ref-{dtype}")
        got, want = _all_tensors(out), _all_tensors(tmp_path / f"ref-{dtype}")
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
