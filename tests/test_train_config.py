"""lorakit.train.config: the YAML run config, its errors, overrides and paths."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import yaml

from lorakit.errors import ConfigError
from lorakit.train.config import RunConfig, dump_run_config, load_run_config

FULL = """\
model: smollm2-135m-instruct
lora: {r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
data: {train: data/train.jsonl, eval: data/eval.jsonl, eval_fraction: 0.0, format: auto, max_seq_len: 512, train_on_prompt: false, packing: false, on_error: raise}
train: {steps: 100, epochs: null, batch_size: 8, grad_accum: 1, lr: 2.0e-4, weight_decay: 0.0, schedule: constant, warmup_steps: 0, max_grad_norm: 1.0, seed: 0, eval_every: 50, save_every: 50, precision: auto, gradient_checkpointing: false, log_every: 1}
output: {dir: runs/quickstart}
"""  # noqa: E501 - one YAML flow mapping per section, as a user writes it


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A config folder with data files, and a different current working directory."""
    cfg_dir = tmp_path / "project"
    (cfg_dir / "data").mkdir(parents=True)
    (cfg_dir / "data" / "train.jsonl").write_text('{"text": "hi"}\n')
    (cfg_dir / "data" / "eval.jsonl").write_text('{"text": "yo"}\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cfg_dir


def write(folder: Path, text: str, name: str = "runs.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_full_config_and_paths(project):
    cfg = load_run_config(write(project, FULL))
    assert cfg.model == "smollm2-135m-instruct"
    assert cfg.lora["target_modules"][-1] == "down_proj" and cfg.lora["r"] == 16
    assert cfg.data.train == project / "data" / "train.jsonl"  # beside the YAML file
    assert cfg.data.eval == project / "data" / "eval.jsonl"
    assert cfg.output.dir == Path.cwd() / "runs" / "quickstart"  # relative to the CWD
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.train.steps == 100 and cfg.train.epochs is None
    assert cfg.train.schedule == "constant" and cfg.data.format == "auto"


def test_defaults_and_minimal(project):
    cfg = load_run_config(write(project, "data: {train: data/train.jsonl}\n", name="mini.yml"))
    assert cfg.model is None
    assert cfg.lora == {}
    assert cfg.train.steps == 100 and cfg.train.batch_size == 8 and cfg.train.precision == "auto"
    assert cfg.data.max_seq_len == 512 and cfg.data.on_error == "raise"
    assert cfg.output.dir == Path.cwd() / "runs" / "mini"


def test_epochs_alone_clears_steps(project):
    cfg = load_run_config(write(project, "data: {train: data/train.jsonl}\ntrain: {epochs: 2}\n"))
    assert cfg.train.epochs == 2 and cfg.train.steps is None


def test_yaml_round_trip(project, tmp_path):
    cfg = load_run_config(write(project, FULL))
    out = tmp_path / "run" / "lorakit.yaml"
    out.parent.mkdir()
    dump_run_config(cfg, out)
    assert [p.name for p in out.parent.iterdir()] == ["lorakit.yaml"]  # no temp file left
    assert yaml.safe_load(out.read_text()) == cfg.to_yaml_dict()
    os.chdir(tmp_path)  # resolved paths are absolute: the copy means the same from anywhere
    again = load_run_config(out)
    assert again == cfg
    assert again.to_yaml_dict()["data"]["train"] == str(project / "data" / "train.jsonl")


def test_dump_is_atomic(project, tmp_path, monkeypatch):
    cfg = load_run_config(write(project, FULL))
    out = tmp_path / "lorakit.yaml"
    out.write_text("old: true\n")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        dump_run_config(cfg, out)
    assert out.read_text() == "old: true\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_data_path_falls_back_to_cwd(project):
    (Path.cwd() / "mine.jsonl").write_text('{"text": "x"}\n')
    cfg = load_run_config(write(project, "data: {train: mine.jsonl}\n"))
    assert cfg.data.train == Path.cwd() / "mine.jsonl"


def test_model_path_relative_to_yaml(project):
    (project / "models" / "tiny").mkdir(parents=True)
    cfg = load_run_config(write(project, "model: models/tiny\ndata: {train: data/train.jsonl}\n"))
    assert cfg.model == str(project / "models" / "tiny")


def test_overrides(project):
    cfg = load_run_config(
        write(project, FULL),
        [
            "train.lr=1e-4",
            "lora.target_modules=[q_proj,v_proj]",
            "model=null",
            "train.steps=null",
            "train.epochs=3",
            "data.packing=true",
            "output.dir=/abs/out",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora["target_modules"] == ["q_proj", "v_proj"]
    assert cfg.model is None
    assert cfg.train.epochs == 3 and cfg.train.steps is None
    assert cfg.data.packing is True
    assert cfg.output.dir == Path("/abs/out")


def test_gradient_checkpointing_every_n(project):
    cfg = load_run_config(write(project, "data: {train: data/train.jsonl}\n"), ["train.gradient_checkpointing=3"])
    assert cfg.train.gradient_checkpointing == 3 and type(cfg.train.gradient_checkpointing) is int
    cfg = load_run_config(write(project, "data: {train: data/train.jsonl}\n"), ["train.gradient_checkpointing=true"])
    assert cfg.train.gradient_checkpointing is True


def test_override_creates_missing_section(project):
    cfg = load_run_config(write(project, "data: {train: data/train.jsonl}\n"), ["lora.r=4"])
    assert cfg.lora == {"r": 4}


@pytest.mark.parametrize("bad", ["train.lr", "lr=1", "train..lr=1", "a.b.c=1", "model.x=1", "=3"])
def test_malformed_override(project, bad):
    with pytest.raises(ConfigError, match=r"bad override .*expected SECTION\.KEY=VALUE"):
        load_run_config(write(project, FULL), [bad])


def test_override_value_not_yaml(project):
    with pytest.raises(ConfigError, match=r"bad override 'train.lr=\[1': the value is not valid YAML"):
        load_run_config(write(project, FULL), ["train.lr=[1"])


def test_override_unknown_key(project):
    with pytest.raises(ConfigError, match=r"unknown key 'train.setps' in overrides; did you mean 'train.steps'\?"):
        load_run_config(write(project, FULL), ["train.setps=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian' in overrides; did you mean 'train'\?"):
        load_run_config(write(project, FULL), ["trian.steps=3"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {setps: 3}", r"^unknown key 'train\.setps' in runs\.yaml; did you mean 'train\.steps'\?$"),
        ("data: {trian: x}", r"unknown key 'data\.trian' in runs\.yaml; did you mean 'data\.train'\?"),
        ("lora: {alpha: 8}", r"unknown key 'lora\.alpha' in runs\.yaml; did you mean 'lora\.lora_alpha'\?"),
        ("modle: x", r"unknown key 'modle' in runs\.yaml; did you mean 'model'\?"),
        ("train: {zzzzzz: 1}", r"unknown key 'train\.zzzzzz' in runs\.yaml; valid keys: train\.steps, "),
    ],
)
def test_unknown_key(project, text, message):
    path = write(project, "data: {train: data/train.jsonl}\n" + text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_run_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {batch_size: eight}", r"invalid value 'eight' for 'train\.batch_size' in runs\.yaml: .*valid integer"),
        ("train: {schedule: step}", r"'step' for 'train\.schedule'.*'constant', 'linear' or 'cosine'"),
        ("train: {precision: fp16}", r"'fp16' for 'train\.precision'.*'auto', 'fp32', 'bf16' or 'int8'"),
        ("train: {lr: 0}", r"0 for 'train\.lr'.*greater than 0"),
        ("data: {train: data/train.jsonl, format: json}", r"'json' for 'data\.format'.*'prompt_completion'"),
        ("data: {train: data/train.jsonl, on_error: ignore}", r"'ignore' for 'data\.on_error'.*'raise' or 'skip'"),
        ("data: {train: data/train.jsonl, max_seq_len: 1.5}", r"1\.5 for 'data\.max_seq_len'"),
        ("train: {steps: 10, epochs: 2}", r"train\.steps \(10\) and train\.epochs \(2\) are both set; keep one"),
        ("train: [1, 2]", r"'train' in runs\.yaml must be a mapping"),
        ("train: {gradient_checkpointing: -2}", r"gradient_checkpointing must be true, false or a layer interval"),
        (
            "train: {gradient_checkpointing: often}",
            r"^invalid value 'often' for 'train\.gradient_checkpointing' in "
            r"runs\.yaml: .*true, false or a layer interval N >= 1",
        ),
    ],
)
def test_wrong_value(project, text, message):
    body = text if text.startswith("data") else "data: {train: data/train.jsonl}\n" + text
    with pytest.raises(ConfigError, match=message) as info:
        load_run_config(write(project, body + "\n"))
    assert "pydantic" not in str(info.value) and "\n" not in str(info.value)


def test_several_problems_listed(project):
    text = "data: {train: data/train.jsonl, max_seq_len: x}\ntrain: {batch_size: 0}\n"
    with pytest.raises(
        ConfigError, match=r"^2 problems in runs\.yaml:\n  - .*data\.max_seq_len.*\n  - .*train\.batch_size"
    ):
        load_run_config(write(project, text))


def test_wrong_value_from_override_names_it(project):
    with pytest.raises(ConfigError, match=r"'train\.grad_accum'.*\(from override 'train\.grad_accum=-2'\)"):
        load_run_config(write(project, FULL), ["train.grad_accum=-2"])


def test_missing_data(project):
    with pytest.raises(ConfigError, match=r"missing section 'data' \(with at least data\.train\)"):
        load_run_config(write(project, "train: {steps: 3}\n"))
    with pytest.raises(ConfigError, match=r"missing key 'data\.train'"):
        load_run_config(write(project, "data: {format: chat}\n"))
    with pytest.raises(ConfigError, match=r"data\.train file 'nope\.jsonl' not found \(looked in "):
        load_run_config(write(project, "data: {train: nope.jsonl}\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(project):
    path = write(project, "data: {train: data/train.jsonl}\ntrain:\n  steps: 3\n   lr: [\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*runs\.yaml at line 4, column \d+"):
        load_run_config(path)


def test_not_a_mapping(project):
    with pytest.raises(ConfigError, match=r"must be a mapping of sections"):
        load_run_config(write(project, "- a\n- b\n"))


def test_lora_keys_checked_in_code_too(project):
    with pytest.raises(Exception, match=r"unknown key 'lora\.rank'"):
        RunConfig.model_validate({"data": {"train": "x"}, "lora": {"rank": 4}})
