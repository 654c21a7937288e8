"""Every bad input ends in a lorakit error whose message says what is wrong and what to do."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import make_gpt2, make_llama
from tiny import make_tiny_model_dir, write_chat_jsonl
from torch import nn

import lorakit
from lorakit import (
    AdapterFormatError,
    ConfigError,
    LorakitError,
    ModelMismatchError,
    TargetNotFoundError,
    UnsupportedModuleError,
    cli,
    errors,
)
from lorakit.errors import AdapterNotFoundError, DataError, ForwardConflictError, ModelLoadError, TrainingError
from lorakit.fusion import fuse_swiglu_mlps
from lorakit.models import load_model


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(r=0), r"r=0 is too small; it must be an integer >= 1"),
        (dict(r=2.5), r"r=2.5 must be an integer"),
        (dict(lora_alpha=-1), r"lora_alpha=-1 must be > 0"),
        (dict(lora_dropout=1.0), r"lora_dropout=1.0 is out of range; use a value in \[0, 1\)"),
        (dict(bias="some"), r"bias='some' is not a bias mode; use one of 'none', 'all', 'lora_only'"),
        (dict(target_modules=3), r"target_modules=3 must be a list of module names or one regex string"),
        (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' is not supported"),
        (dict(layers_to_transform="1"), r"layers_to_transform='1' must be a layer index"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0 is too small"),
        (dict(use_rslora="yes"), r"use_rslora='yes' must be true or false"),
    ],
)
def test_config_errors(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        lorakit.LoraConfig(**kwargs)


def test_config_from_newer_peft_warns_and_ignores():
    data = lorakit.LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    data["some_future_option"] = 1
    with pytest.warns(UserWarning, match="some_future_option"):
        cfg = lorakit.LoraConfig.from_dict(data)
    assert cfg.r == 4 and cfg.target_modules == ["q_proj"]
    assert lorakit.LoraConfig.from_dict(cfg.to_dict()) == cfg


def test_config_refuses_dora():
    data = lorakit.LoraConfig(r=4, target_modules=["q_proj"]).to_dict() | {"use_dora": True}
    with pytest.raises(ConfigError, match="use_dora=True is a PEFT feature lorakit does not support"):
        lorakit.LoraConfig.from_dict(data)


def test_target_not_found_suggests_names():
    with pytest.raises(TargetNotFoundError, match=r"'q_prj' \(closest: q_proj"):
        lorakit.inject(make_llama(), lorakit.LoraConfig(target_modules=["q_prj", "v_proj"]))
    with pytest.raises(TargetNotFoundError, match="matches no module"):
        lorakit.inject(make_llama(), lorakit.LoraConfig(target_modules=r"nothing\..*"))
    with pytest.raises(ConfigError, match="target_modules is not set"):
        lorakit.inject(make_llama(), lorakit.LoraConfig())


def test_unsupported_module_lists_supported_kinds():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(UnsupportedModuleError, match=r"LayerNorm.*supported layers are nn.Linear, nn.Embedding"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["1"]))


def test_duplicate_adapter_name():
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="adapter 'default' already exists"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]))


@pytest.fixture
def saved(tmp_path):
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return lorakit.save_adapter(model, tmp_path / "a")


def test_missing_files(tmp_path, saved):
    with pytest.raises(AdapterFormatError, match="does not exist; pass the folder that holds adapter_config.json"):
        lorakit.load_adapter(make_llama(), tmp_path / "nope")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="no adapter_model.safetensors; the adapter was not saved completely"):
        lorakit.load_adapter(make_llama(), saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match="adapter_config.json not found"):
        lorakit.load_adapter(make_llama(), saved)


def test_truncated_safetensors(saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors is truncated or corrupt"):
        lorakit.load_adapter(make_llama(), saved)


def test_corrupt_config_json(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="is not valid JSON"):
        lorakit.load_adapter(make_llama(), saved)


def test_wrong_base_model(saved):
    with pytest.raises(ModelMismatchError, match="weights for module 'model.layers.0.self_attn.q_proj'.*does not have"):
        lorakit.load_adapter(make_gpt2(), saved)


def test_shape_mismatch(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        ModelMismatchError,
        match=r"shape mismatch for '.*lora_A.weight': the model expects \(4, 48\), "
        r"the adapter has \(4, 32\)",
    ):
        lorakit.load_adapter(wide, saved)
    assert cfg["r"] == 4


def test_config_weights_disagree(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]  # weights still hold v_proj
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    model = make_llama()
    with pytest.raises(AdapterFormatError, match="config and weights disagree.*v_proj"):
        lorakit.load_adapter(model, saved)
    # Nothing half-done is left on the model.
    assert lorakit.list_adapters(model) == []
    cfg["target_modules"] = ["q_proj", "v_proj", "k_proj"]  # config asks for more than the weights hold
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match="targets 2 module\\(s\\) with no weights"):
        lorakit.load_adapter(make_llama(), saved)


def test_pickle_is_refused(saved, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (saved / "adapter_model.safetensors").unlink()
    torch.save({"x": Evil()}, saved / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="could not be read safely.*weights_only"):
        lorakit.load_adapter(make_llama(), saved)


def test_bin_with_plain_tensors_loads(saved, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(saved / "adapter_model.safetensors"))
    (saved / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    model = lorakit.load_adapter(make_llama(), saved)
    assert lorakit.list_adapters(model) == ["default"]


def test_save_is_atomic(tmp_path, monkeypatch):
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    first = lorakit.save_adapter(model, tmp_path / "a")
    before = (first / "adapter_model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.io.save_file", broken)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(1.0)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, tmp_path / "a")
    assert (first / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no temp dirs left behind"
    with pytest.raises(OSError):
        lorakit.save_adapter(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_save_into_a_run_dir_keeps_its_other_files(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "adapter_model.bin").write_bytes(b"old")
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.save_adapter(model, run)
    names = sorted(p.name for p in run.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "checkpoints", "metrics.jsonl"]

    monkeypatch.setattr("lorakit.io.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        lorakit.save_adapter(model, run)
    assert sorted(p.name for p in run.iterdir()) == names
    assert (run / "checkpoints" / "step-1").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --------------------------------------------------------------------------- every error class, provoked


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = make_tiny_model_dir(root / "model")
    adapter = lorakit.inject(load_model(model)[0], lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    return {
        "root": root,
        "model": model,
        "data": write_chat_jsonl(root / "train.jsonl", n=8),
        "run": lorakit.save_adapter(adapter, root / "run"),
        "wide": make_tiny_model_dir(root / "wide", hidden=48),
    }


def _run_config(tiny, path, lora=None, data=None, train=None, model=None):
    """A YAML run config for the tiny model, with the given sections merged in."""
    cfg = {
        "model": str(model or tiny["model"]),
        "lora": {"r": 4, "target_modules": ["q_proj"], **(lora or {})},
        "data": {"train": str(tiny["data"]), **(data or {})},
        "train": {"steps": 2, "batch_size": 4, "precision": "fp32", "eval_every": 0, "save_every": 0, **(train or {})},
        "output": {"dir": str(path.parent / (path.stem + "-out"))},
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _user_routed_mlp_then_fuse():
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(target_modules="all-linear"))
    mlp = model.model.layers[0].mlp
    mlp.forward = functools.partial(type(mlp).forward, mlp)  # user code replaced this MLP's forward
    fuse_swiglu_mlps(model)


def _bad_rows(tmp_path):
    (tmp_path / "x.jsonl").write_text("not json\n")
    return str(tmp_path / "x.jsonl")


# name -> (error class, what provokes it through the public API, fragments the message must hold: the bad value
# and the fix). TrainingInterrupted (a TrainingError; exit code 130, not 2) is provoked in test_train_loop.py.
API_CASES = {
    "config": (ConfigError, lambda t, p: lorakit.LoraConfig(r=0), ["r=0", "integer >= 1"]),
    "target": (
        TargetNotFoundError,
        lambda t, p: lorakit.inject(make_llama(), lorakit.LoraConfig(target_modules=["q_prj"])),
        ["'q_prj'", "closest: q_proj"],
    ),
    "unsupported": (
        UnsupportedModuleError,
        lambda t, p: lorakit.inject(
            nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), lorakit.LoraConfig(target_modules=["1"])
        ),
        ["LayerNorm", "supported layers are", "exclude_modules"],
    ),
    "adapter_format": (
        AdapterFormatError,
        lambda t, p: lorakit.load_adapter(make_llama(), p / "nope"),
        ["nope", "does not exist", "pass the folder that holds adapter_config.json"],
    ),
    "adapter_name": (
        AdapterNotFoundError,
        lambda t, p: lorakit.set_adapter(
            lorakit.inject(make_llama(), lorakit.LoraConfig(target_modules=["q_proj"])), "nope"
        ),
        ["'nope'", "adapters: default"],
    ),
    "mismatch": (
        ModelMismatchError,
        lambda t, p: lorakit.load_adapter(load_model(t["wide"])[0], t["run"]),
        ["q_proj.lora_A.weight", "(4, 48)", "(4, 32)", "another base model"],
    ),
    "model_load": (
        ModelLoadError,
        lambda t, p: load_model(str(p / "no-model")),
        ["no-model", "not found", "pass a local model directory"],
    ),
    "data": (
        DataError,
        lambda t, p: lorakit.train(_run_config(t, p / "c.yaml", data={"train": _bad_rows(p)})),
        ["x.jsonl:1", "invalid JSON", "expected one JSON object per line"],
    ),
    "forward_conflict": (
        ForwardConflictError,
        lambda t, p: _user_routed_mlp_then_fuse(),
        ["LlamaMLP", "user code", "undo that first"],
    ),
    "training": (
        TrainingError,
        lambda t, p: lorakit.train(
            _run_config(
                t,
                p / "c.yaml",
                lora={"init_lora_weights": False},
                train={"lr": 1e30, "max_grad_norm": None, "steps": 8},
            )
        ),
        ["became", "lower train.lr"],
    ),
}


def test_every_error_class_has_a_provoking_case():
    raised = {cls for cls, _, _ in API_CASES.values()} | {errors.TrainingInterrupted, LorakitError}
    public = {getattr(errors, name) for name in errors.__all__}
    assert public == raised, f"error classes no test provokes: {public - raised}"


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_error_through_the_api_names_the_value_and_the_fix(case, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cls, provoke, fragments = API_CASES[case]
    with pytest.raises(LorakitError) as info:
        provoke(tiny, tmp_path)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# name -> (argv built from the fixture and tmp_path, fragments of the one `error:` line: the bad value and the fix)
CLI_CASES = {
    "config": (lambda t, p: ["train", _run_config(t, p / "c.yaml", lora={"r": 0})], ["r=0", "integer >= 1"]),
    "target": (
        lambda t, p: ["train", _run_config(t, p / "c.yaml", lora={"target_modules": ["q_prj"]})],
        ["'q_prj'", "closest: q_proj"],
    ),
    "unsupported": (
        lambda t, p: ["train", _run_config(t, p / "c.yaml", lora={"target_modules": ["input_layernorm"]})],
        ["LlamaRMSNorm", "exclude_modules"],
    ),
    "adapter_format": (
        lambda t, p: ["generate", p / "nope", "-p", "x"],
        ["nope", "does not exist", "pass a run directory"],
    ),
    "mismatch": (
        lambda t, p: ["generate", t["run"], "-p", "x", "--model", t["wide"]],
        ["shape mismatch", "(4, 48)", "--model"],
    ),
    "model_load": (
        lambda t, p: ["train", _run_config(t, p / "c.yaml", model=p / "no-model")],
        ["no-model", "not found", "pass a local model directory"],
    ),
    "data": (
        lambda t, p: ["train", _run_config(t, p / "c.yaml", data={"train": _bad_rows(p)})],
        ["x.jsonl:1", "invalid JSON", "expected one JSON object per line"],
    ),
    "training": (
        lambda t, p: [
            "train",
            _run_config(
                t,
                p / "c.yaml",
                lora={"init_lora_weights": False},
                train={"lr": 1e30, "max_grad_norm": None, "steps": 8},
            ),
        ],
        ["became", "lower train.lr"],
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_error_through_the_cli_is_one_line_and_exit_code_2(case, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, fragments = CLI_CASES[case]
    code = cli.main([str(a) for a in argv(tiny, tmp_path)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
