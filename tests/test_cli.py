"""The `lorakit` command: each verb's happy path, exit codes, one-line errors.

Verbs run in-process through ``cli.main(argv)`` (the console-script entry, which
returns the exit code); one subprocess test checks ``python -m lorakit``.
"""

from __future__ import annotations

import io
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny import make_adapter, make_run, make_tiny_model_dir, write_chat_jsonl
from transformers import AutoModelForCausalLM

from lorakit import cli, evaluation, generation, inspection, runs
from lorakit.errors import TrainingInterrupted


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny = make_tiny_model_dir(root / "tiny")
    return {
        "root": root,
        "tiny": tiny,
        "run": make_run(tiny, root / "run"),
        "data": write_chat_jsonl(root / "data.jsonl", n=4),
    }


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


# --------------------------------------------------------------------------- happy paths


def test_python_m_lorakit_help():
    proc = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for verb in ("train", "generate", "chat", "eval", "merge", "inspect"):
        assert verb in proc.stdout


def test_train_calls_the_loop(capsys, monkeypatch, tmp_path):
    calls = []

    def fake_train(config, *, overrides=(), resume=False):
        calls.append((config, list(overrides), resume))
        return types.SimpleNamespace(run_dir=tmp_path / "runs" / "x", steps=3, train_loss=1.5, eval_loss=None)

    fake_loop = types.SimpleNamespace(train=fake_train)
    monkeypatch.setitem(sys.modules, "lorakit.train.loop", fake_loop)
    code, out, err = run_cli(
        capsys,
        "train",
        "cfg.yaml",
        "--set",
        "train.lr=1e-4",
        "--set",
        "train.steps=3",
        "--resume",
        "--model",
        "some/dir",
    )
    assert code == 0, err
    assert calls == [(Path("cfg.yaml"), ["train.lr=1e-4", "train.steps=3", "model=some/dir"], True)]
    assert f"lorakit generate {tmp_path / 'runs' / 'x'}" in out


class FakeInterrupted(TrainingInterrupted):
    pass


def test_train_ctrl_c_exits_130_with_resume_note(capsys, monkeypatch):
    def interrupted(config, *, overrides=(), resume=False):
        raise FakeInterrupted("stopped at step 7; checkpoint in runs/x/checkpoints/step-7; rerun with --resume", 7)

    fake_loop = types.SimpleNamespace(train=interrupted)
    monkeypatch.setitem(sys.modules, "lorakit.train.loop", fake_loop)
    code, _, err = run_cli(capsys, "train", "cfg.yaml")
    assert code == 130 and err.strip() == (
        "interrupted: stopped at step 7; checkpoint in runs/x/checkpoints/step-7; rerun with --resume"
    )


def test_train_config_error_is_a_user_error(capsys, tmp_path):
    (tmp_path / "cfg.yaml").write_text("lora: {r: 4}\ntrain: {stepz: 3}\ndata: {train: nope.jsonl}\n")
    code, _, err = run_cli(capsys, "train", tmp_path / "cfg.yaml")
    assert_user_error(code, err)


def test_train_then_use_the_run(capsys, env, tmp_path, monkeypatch):
    """End to end through the real training loop: train, then every verb on the run dir."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(
        f"model: {env['tiny']}\nlora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}}\n"
        f"data: {{train: {env['data']}, max_seq_len: 64}}\ntrain: {{steps: 2, batch_size: 2, lr: 1.0e-2}}\n"
        "output: {dir: runs/t}\n"
    )
    code, _, err = run_cli(capsys, "train", "cfg.yaml", "--set", "train.steps=3")
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    _, _, info = runs.open_adapter(run)
    assert info.model_source == "lorakit.yaml" and Path(info.model) == env["tiny"]
    outputs = {}
    for args in (
        ("generate", run, "-p", "say ab", "--max-new-tokens", 3),
        ("inspect", run),
        ("eval", run, "--data", env["data"], "--max-new-tokens", 3),
        ("merge", run, tmp_path / "m"),
    ):
        code, outputs[args[0]], err = run_cli(capsys, *args)
        assert code == 0, (args, err)
    assert "last metrics: step=3" in outputs["inspect"] and "exact_match" in outputs["eval"]
    assert (tmp_path / "m" / "config.json").is_file()


def test_generate_prints_the_answer(capsys, env):
    model, tokenizer, _ = runs.open_adapter(env["run"])
    expected = generation.generate(model, tokenizer, "say ab", max_new_tokens=4)
    code, out, err = run_cli(capsys, "generate", env["run"], "--prompt", "say ab", "--max-new-tokens", 4)
    assert code == 0, err
    assert out.rstrip("\n") == expected


def test_static_cache_decoding_answers_the_same(capsys, env, monkeypatch):
    from lorakit import graph_decode

    model, tokenizer, _ = runs.open_adapter(env["run"])
    expected = generation.generate(model, tokenizer, "say ab", max_new_tokens=6)
    calls = []
    real = graph_decode.static_decode
    monkeypatch.setattr(generation, "static_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = run_cli(capsys, "generate", env["run"], "-p", "say ab", "--max-new-tokens", 6, "--static-cache")
    assert code == 0, err
    assert out.rstrip("\n") == expected and calls == [1]
    monkeypatch.setattr(sys, "stdin", io.StringIO("say ab\n"))
    code, out, err = run_cli(capsys, "chat", env["run"], "--max-new-tokens", 6, "--static-cache")
    assert code == 0, err
    assert f"assistant> {expected}" in out and calls == [1, 1]


@pytest.mark.parametrize("columns", ["200", "60"])  # a table when wide, labelled blocks when narrow
def test_generate_compare_base_from_prompts_file(capsys, env, tmp_path, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("say ab\n\nsay cd\n")
    code, out, err = run_cli(
        capsys, "generate", env["run"], "--compare-base", "--prompts-file", prompts, "--max-new-tokens", 3
    )
    assert code == 0, err
    assert "say ab" in out and "say cd" in out
    assert "base model" in out and "with adapter" in out
    assert ("┃" in out) == (columns == "200")


def test_generate_with_model_override(capsys, env, tmp_path):
    other = make_tiny_model_dir(tmp_path / "other", seed=7)
    model, tokenizer, _ = runs.open_adapter(env["run"], model=other)
    expected = generation.generate(model, tokenizer, "say ab", max_new_tokens=4)
    code, out, err = run_cli(capsys, "generate", env["run"], "-p", "say ab", "--max-new-tokens", 4, "--model", other)
    assert code == 0, err
    assert out.rstrip("\n") == expected


def test_chat_keeps_history_resets_and_exits_on_eof(capsys, env, monkeypatch):
    seen = []
    real = generation.generate

    def spy(model, tokenizer, prompt, **kwargs):
        seen.append([dict(m) for m in prompt])
        return real(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("say ab\nsay cd\n/reset\n\nsay ef\n"))
    code, out, err = run_cli(capsys, "chat", env["run"], "--max-new-tokens", 3)
    assert code == 0, err
    assert [len(m) for m in seen] == [1, 3, 1]  # second turn sees the first; /reset clears it
    assert seen[1][0]["content"] == "say ab" and seen[1][1]["role"] == "assistant"
    assert out.count("assistant>") == 3 and "history cleared" in out


def test_chat_exit_command(capsys, env, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\nsay ab\n"))
    code, out, err = run_cli(capsys, "chat", env["run"])
    assert code == 0, err
    assert "assistant>" not in out


def test_eval_prints_loss_perplexity_exact_match(capsys, env):
    model, tokenizer, _ = runs.open_adapter(env["run"])
    expected = evaluation.evaluate(model, tokenizer, env["data"], max_new_tokens=4)
    code, out, err = run_cli(capsys, "eval", env["run"], "--data", env["data"], "--max-new-tokens", 4)
    assert code == 0, err
    assert f"eval_loss    {expected['eval_loss']:.4f}" in out
    assert f"perplexity   {expected['perplexity']:.3f}" in out
    assert f"exact_match  {expected['exact_match']:.3f}" in out


@pytest.fixture(scope="module")
def bf16_run(env):
    """A run whose base model's weights are stored in bfloat16 (so auto != fp32)."""
    tiny = make_tiny_model_dir(env["root"] / "tiny-bf16", dtype=torch.bfloat16)
    return make_run(tiny, env["root"] / "run-bf16")


@pytest.fixture
def opened_models(monkeypatch):
    """The models the verbs open, with the open_adapter keyword arguments they passed."""
    seen = []
    real = runs.open_adapter

    def spy(*args, **kwargs):
        model, tokenizer, info = real(*args, **kwargs)
        seen.append((kwargs, model))
        return model, tokenizer, info

    monkeypatch.setattr(runs, "open_adapter", spy)
    return seen


def _verb_args(verb: str, run: Path, data: Path) -> tuple:
    return {
        "generate": ("generate", run, "-p", "say ab", "--max-new-tokens", 2),
        "chat": ("chat", run, "--max-new-tokens", 2),
        "eval": ("eval", run, "--data", data, "--max-new-tokens", 2),
    }[verb]


@pytest.mark.parametrize(
    ("verb", "stored", "flag", "expected"),
    [
        ("generate", "bf16", None, torch.bfloat16),  # no --dtype: auto = as stored
        ("generate", "fp32", "bf16", torch.bfloat16),
        ("generate", "bf16", "fp32", torch.float32),
        ("chat", "fp32", "bf16", torch.bfloat16),
        ("chat", "bf16", "auto", torch.bfloat16),
        ("eval", "fp32", "fp16", torch.float16),
        ("eval", "fp32", None, torch.float32),
    ],
)
def test_dtype_and_device_reach_the_model(
    capsys, env, bf16_run, opened_models, monkeypatch, verb, stored, flag, expected
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("say ab\n"))
    run = bf16_run if stored == "bf16" else env["run"]
    extra = ("--dtype", flag) if flag else ()
    code, out, err = run_cli(capsys, *_verb_args(verb, run, env["data"]), *extra, "--device", "cpu")
    assert code == 0, err
    [(kwargs, model)] = opened_models
    assert kwargs["dtype"] == (flag or "auto") and kwargs["device"] == "cpu"
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert base == {expected}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_and_eval_on_cuda(capsys, env, opened_models):
    code, _, err = run_cli(
        capsys, "generate", env["run"], "-p", "say ab", "--max-new-tokens", 2, "--device", "cuda", "--dtype", "bf16"
    )
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "eval", env["run"], "--data", env["data"], "--max-new-tokens", 2, "--device", "cuda"
    )
    assert code == 0 and "eval_loss" in out, err
    for _, model in opened_models:
        assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert opened_models[0][1].model.embed_tokens.weight.dtype == torch.bfloat16


def test_merge_writes_a_plain_model(capsys, env, tmp_path):
    out_dir = tmp_path / "merged"
    code, out, err = run_cli(capsys, "merge", env["run"], out_dir)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
    model, _, _ = runs.open_adapter(env["run"])
    ids = torch.tensor([[1, 2, 3, 200, 17]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_inspect_prints_table_and_metrics(capsys, env, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # full module names on one line
    (env["run"] / "metrics.jsonl").write_text('{"step": 3, "loss": 1.25}\n')
    code, out, err = run_cli(capsys, "inspect", env["run"])
    assert code == 0, err
    assert "q_proj" in out and "total" in out and "4,096" in out
    assert "last metrics: step=3, loss=1.25" in out


# --------------------------------------------------------------------------- errors and exit codes


def test_missing_run_dir(capsys, tmp_path):
    for verb in ("inspect", "generate"):
        extra = ("--prompt", "x") if verb == "generate" else ()
        code, _, err = run_cli(capsys, verb, tmp_path / "nope", *extra)
        assert_user_error(code, err, "nope", "does not exist")


def test_corrupt_adapter_file(capsys, env, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((env["run"] / "adapter_config.json").read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    for args in (("inspect", bad), ("generate", bad, "-p", "x"), ("merge", bad, tmp_path / "m")):
        code, _, err = run_cli(capsys, *args)
        assert_user_error(code, err, "corrupt")
    assert not (tmp_path / "m").exists()


def test_bad_dtype(capsys, env, tmp_path):
    code, _, err = run_cli(capsys, "merge", env["run"], tmp_path / "m", "--dtype", "fp16")
    assert_user_error(code, err, "fp16", "--dtype")


@pytest.mark.parametrize("verb", ["generate", "chat", "eval"])
def test_bad_dtype_or_device_is_a_usage_error(capsys, env, opened_models, verb):
    args = _verb_args(verb, env["run"], env["data"])
    code, _, err = run_cli(capsys, *args, "--dtype", "fp64")
    assert_user_error(code, err, "fp64", "--dtype", "auto", f"lorakit {verb} --help")
    code, _, err = run_cli(capsys, *args, "--device", "gpu0")
    assert_user_error(code, err, "gpu0", "--device", f"lorakit {verb} --help")
    assert opened_models == []  # rejected while parsing, before any model is loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error(capsys, env):
    code, _, err = run_cli(capsys, "generate", env["run"], "-p", "x", "--device", "cuda")
    assert_user_error(code, err, "cuda")


def test_unknown_option_and_verb(capsys, env):
    code, _, err = run_cli(capsys, "generate", env["run"], "--bogus")
    assert_user_error(code, err, "--bogus", "lorakit generate --help")
    code, _, err = run_cli(capsys, "frobnicate")
    assert_user_error(code, err, "frobnicate")


def test_generate_needs_a_prompt(capsys, env):
    code, _, err = run_cli(capsys, "generate", env["run"])
    assert_user_error(code, err, "--prompt")
    code, _, err = run_cli(capsys, "generate", env["run"], "--prompts-file", "no-such-file.txt")
    assert_user_error(code, err, "no-such-file.txt")


def test_data_error_is_a_user_error(capsys, env, tmp_path):
    code, _, err = run_cli(capsys, "eval", env["run"], "--data", tmp_path / "missing.jsonl")
    assert_user_error(code, err, "missing.jsonl")


def test_model_mismatch_is_a_user_error(capsys, env, tmp_path):
    wide = make_tiny_model_dir(tmp_path / "wide", hidden=48)
    code, _, err = run_cli(capsys, "generate", env["run"], "-p", "x", "--model", wide)
    assert_user_error(code, err, "shape mismatch", "--model")


def test_internal_error_exit_1_and_debug_traceback(capsys, env, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(inspection, "inspect_adapter", boom)
    code, _, err = run_cli(capsys, "inspect", env["run"])
    assert code == 1
    assert "kaboom" in err and "--debug" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "--debug", "inspect", env["run"])
    assert code == 1 and "Traceback" in err and "kaboom" in err


def test_user_error_with_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "inspect", tmp_path / "nope")
    assert code == 2 and "Traceback" in err and "error: " in err


def test_ctrl_c_exits_130(capsys, env, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspection, "inspect_adapter", interrupted)
    code, _, err = run_cli(capsys, "inspect", env["run"])
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def test_subprocess_user_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_adapter_dir_without_run_config(capsys, env, tmp_path):
    adapter = make_adapter(env["tiny"], tmp_path / "plain")
    code, out, err = run_cli(capsys, "inspect", adapter)
    assert code == 0, err
    assert "last metrics" not in out
