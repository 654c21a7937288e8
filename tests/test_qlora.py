"""QLoRA end to end on a tiny random Llama: inject on a 4-bit base, train, resume, save, load both ways with
PEFT + bitsandbytes, merge (streamed), and the errors.

Independent references: PEFT's LoRA layers on transformers' own 4-bit model (BitsAndBytesConfig), a second
training run (resume), float32 sums of bitsandbytes' dequantized weights and the adapter factors (merge).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).parent))
from test_quant import KINDS  # noqa: E402
from tiny import make_tiny_model_dir, write_chat_jsonl  # noqa: E402

import lorakit  # noqa: E402
from lorakit import merging, models, quant  # noqa: E402
from lorakit.errors import ConfigError, LorakitError  # noqa: E402
from lorakit.runs import open_adapter  # noqa: E402
from lorakit.train.config import RunConfig  # noqa: E402
from lorakit.train.loop import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    return make_tiny_model_dir(root / "model"), write_chat_jsonl(root / "train.jsonl", n=32)


def bnb_model(path, kind="nf4", dq=True):
    """transformers' own 4-bit model: what PEFT + bitsandbytes users load."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)


def ids(n=3, t=12, seed=0):
    return torch.randint(0, 250, (n, t), generator=torch.Generator().manual_seed(seed))


def cfg_for(assets, out, model=None, **train_kw):
    path, data = assets
    return RunConfig.model_validate(
        {
            "model": model
            if model is not None
            else {"name": str(path), "quantization": "nf4", "compute_dtype": "fp32"},
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "data": {"train": str(data)},
            "train": {
                "steps": 6,
                "batch_size": 4,
                "lr": 2e-2,
                "precision": "fp32",
                "eval_every": 0,
                "save_every": 0,
                **train_kw,
            },
            "output": {"dir": str(out)},
        }
    )


# ----------------------------------------------------------------------------- layers


def test_inject_wraps_4bit_layers_and_refuses_in_memory_merge(assets):
    model, _ = models.load_model(assets[0], quantization="nf4", compute_dtype="fp32")
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer.base_layer).__name__ == "Linear4bit" and layer.quantized is not None
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.lora_A["default"].weight.requires_grad
    with pytest.raises(LorakitError, match="4-bit base"):
        layer.merge()
    with pytest.raises(LorakitError, match="lorakit merge"):
        lorakit.merge_and_unload(model)
    with torch.no_grad():
        before = model(input_ids=ids()).logits
        lorakit.for_inference(model)  # keeps the 4-bit layers unmerged
        after = model(input_ids=ids()).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("kind,dq", KINDS)
def test_lorakit_adapter_loads_in_peft_bitsandbytes(assets, tmp_path, kind, dq):
    from peft import PeftModel

    model, _ = models.load_model(assets[0], quantization=kind, double_quant=dq, compute_dtype="fp32")
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    x = ids(4, 16)
    losses = []
    model.train()
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05  # training on the 4-bit base learns
    lorakit.save_adapter(model, tmp_path / "a")
    peft = PeftModel.from_pretrained(bnb_model(assets[0], kind, dq), tmp_path / "a")
    peft.train()  # train mode: bitsandbytes' CPU inference repacking stays off (dropout is 0)
    with torch.no_grad():
        want = peft(input_ids=ids()).logits
        got = model(input_ids=ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,dq", [("nf4", True), ("fp4", False)])
def test_peft_qlora_adapter_loads_in_lorakit(assets, tmp_path, kind, dq):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    base = prepare_model_for_kbit_training(bnb_model(assets[0], kind, dq), use_gradient_checkpointing=False)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "p")
    peft.train()
    model, _ = models.load_model(assets[0], quantization=kind, double_quant=dq, compute_dtype="fp32")
    lorakit.load_adapter(model, tmp_path / "p")
    with torch.no_grad():
        want = peft(input_ids=ids()).logits
        got = model(input_ids=ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_and_bf16_on_4bit_base(assets):
    """bf16 compute under autocast with checkpointing gives the grads of the plain fp32 path within bf16 error."""
    grads = {}
    for name, cd, ckpt in [("fp32", "fp32", False), ("bf16", "bf16", True)]:
        model, _ = models.load_model(assets[0], quantization="nf4", compute_dtype=cd)
        torch.manual_seed(0)
        lorakit.inject(
            model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
        model.train()
        if ckpt:
            from lorakit.train.recompute import enable_checkpointing

            enable_checkpointing(model, lambda *a, **k: None)
        x = ids(2, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cd == "bf16"):
            model(input_ids=x, labels=x).loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    err = (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert err < 3e-2, err


# ----------------------------------------------------------------------------- the training pipeline


def test_train_resume_and_run_files_on_4bit_base(assets, tmp_path, capsys):
    train(cfg_for(assets, tmp_path / "full", steps=6, save_every=3, log_every=1), device="cpu")
    out = capsys.readouterr().out
    assert "4-bit base: nf4, double quant, compute dtype fp32" in out
    # train.gradient_checkpointing unset: on for a 4-bit base, and the start line and summary say so
    assert out.count("gradient checkpointing on (the 4-bit default") == 2
    assert "gradient checkpointing: 2 of 2 decoder layers" in out
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    # Interrupted after step 3, resumed: the same adapter bit for bit.
    half = cfg_for(assets, tmp_path / "half", steps=3, save_every=3)
    train(half, device="cpu")
    train(cfg_for(assets, tmp_path / "half", steps=6, save_every=3), device="cpu", resume=True)
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / "full" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "half" / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # generate / eval read the model mapping from the run: the base comes back 4-bit.
    model, _, info = open_adapter(tmp_path / "full")
    assert quant_info(model) == {"quantization": "nf4", "double_quant": True, "compute_dtype": "fp32", "layers": 14}
    assert info.spec.quantization == "nf4" and info.model_source == "lorakit.yaml"
    # Loading it on the full-precision base is allowed, with a note.
    with pytest.warns(UserWarning, match=r"trained on a 4-bit base \(nf4\), now loaded on a full-precision one"):
        model, _, _ = open_adapter(tmp_path / "full", model={"name": str(assets[0])})
    assert quant_info(model) is None


def test_bf16_checkpointed_run_says_its_compute_dtype(assets, tmp_path, capsys):
    model = {"name": str(assets[0]), "quantization": "fp4", "double_quant": False}  # compute_dtype: auto
    train(
        cfg_for(assets, tmp_path / "r", model=model, steps=3, precision="bf16", gradient_checkpointing=True),
        device="cpu",
    )
    out = capsys.readouterr().out
    assert "4-bit base: fp4, compute dtype bf16" in out  # auto follows train.precision
    assert "bf16; 4-bit base: fp4, compute dtype bf16" in out  # the end-of-run summary too
    assert "checkpointing on (the 4-bit default" not in out  # set explicitly: no default to report
    assert "freed memory returned to the OS during and after each step (the 4-bit default" in out  # left unset


def test_checkpointing_off_when_asked_and_off_by_default_on_full_precision(assets, tmp_path, capsys):
    train(cfg_for(assets, tmp_path / "q", steps=1, gradient_checkpointing=False), device="cpu")
    out = capsys.readouterr().out
    assert "4-bit base: nf4" in out and "gradient checkpointing" not in out
    train(cfg_for(assets, tmp_path / "f", model=str(assets[0]), steps=1), device="cpu")
    assert "gradient checkpointing" not in capsys.readouterr().out


def test_4bit_load_leaves_no_view_into_the_weights_file(assets):
    """The fp32 parameters left unquantized are copies, so the safetensors file's memory map (every page of
    the full-precision weights) is released once the model is loaded."""
    import gc

    model, _ = models.load_model(assets[0], quantization="nf4", compute_dtype="fp32")
    gc.collect()
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux /proc")
    files = {p.resolve() for p in Path(assets[0]).glob("*.safetensors")}
    rows = [line.split(maxsplit=5) for line in maps.read_text().splitlines()]
    mapped = {Path(r[5].strip()).resolve() for r in rows if len(r) == 6 and r[5].startswith("/")}
    assert files and not files & mapped
    assert model.model.embed_tokens.weight.dtype == torch.float32


def quant_info(model):
    from lorakit.quant_model import quantization_info

    return quantization_info(model)


def test_model_mapping_in_yaml_validated(assets, tmp_path):
    import yaml

    from lorakit.train.config import load_run_config

    def load(model):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({"model": model, "data": {"train": str(assets[1])}}))
        return load_run_config(path)

    with pytest.raises(ConfigError, match=r"'int3' for 'model.quantization': use one of nf4, fp4 or none"):
        load({"name": "x", "quantization": "int3"})
    with pytest.raises(ConfigError, match=r"'fp8' for 'model.compute_dtype': use auto, fp32, bf16, fp16"):
        load({"name": "x", "compute_dtype": "fp8"})
    with pytest.raises(ConfigError, match=r"unknown key 'model.quant'"):
        load({"name": "x", "quant": "nf4"})
    cfg = load({"name": "x", "quantization": "fp4", "double_quant": False})
    assert cfg.to_yaml_dict()["model"] == {
        "name": "x",
        "quantization": "fp4",
        "double_quant": False,
        "compute_dtype": "auto",
    }
    assert load(str(assets[0])).model == str(assets[0])  # a plain name stays a name
    # The model path inside a mapping resolves like a plain one (relative to the YAML file's folder).
    (tmp_path / "m").symlink_to(assets[0])
    assert load({"name": "m", "quantization": "nf4"}).model["name"] == str(tmp_path / "m")


# ----------------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def qrun(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("qrun") / "run"
    train(cfg_for(assets, out, steps=4), device="cpu")
    return out


def test_merge_writes_dequantized_base_plus_delta(assets, qrun, tmp_path):
    from safetensors.torch import load_file

    report = merging.merge_adapter(qrun, tmp_path / "m", dtype="fp32")
    assert report.quantization is not None and report.max_probe_diff is not None
    assert report.max_probe_diff < 1e-4  # merged fp32 vs the 4-bit base + adapter
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    base = load_file(str(assets[0] / "model.safetensors"))
    adapter = load_file(str(qrun / "adapter_model.safetensors"))
    key = "model.layers.1.mlp.up_proj"
    packed, state = quant.quantize_weight_4bit(base[f"{key}.weight"], "nf4", True)
    A, B = adapter[f"base_model.model.{key}.lora_A.weight"], adapter[f"base_model.model.{key}.lora_B.weight"]
    want = quant.dequantize_packed(packed, state, torch.float32) + (B @ A) * 2.0
    assert torch.equal(merged[f"{key}.weight"], want)
    torch.testing.assert_close(merged["model.norm.weight"], base["model.norm.weight"])
    # --base: the original weights + ΔW, and per layer how big the quantization error is next to ΔW.
    report = merging.merge_adapter(qrun, tmp_path / "b", dtype="bf16", base=assets[0], probe=False)
    got = load_file(str(tmp_path / "b" / "model.safetensors"))[f"{key}.weight"]
    assert torch.equal(got, (base[f"{key}.weight"] + (B @ A) * 2.0).to(torch.bfloat16))
    ratios = dict(report.layer_ratios)
    assert len(ratios) == 14 and all(r > 0 for r in ratios.values())


def test_merge_refuses_4bit_output(qrun, tmp_path):
    with pytest.raises(ConfigError, match="does not write a re-quantized 4-bit merged model"):
        merging.merge_adapter(qrun, tmp_path / "m", dtype="nf4")


def test_cli_merge_of_a_4bit_run(assets, qrun, tmp_path, capsys):
    from lorakit import cli

    code = cli.main(["merge", str(qrun), str(tmp_path / "m"), "--dtype", "bf16", "--base", str(assets[0])])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "adapter trained on a 4-bit base (nf4); merged into the original full-precision weights" in out
    assert "model.layers.0.self_attn.q_proj: ||W - dequant(W4)|| / ||ΔW|| = " in out
    assert "largest merged-vs-unmerged logit difference on the probe inputs: " in out
    code = cli.main(["merge", str(qrun), str(tmp_path / "q"), "--dtype", "nf4"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: --dtype nf4") and "re-quantized 4-bit" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


def test_generate_on_a_4bit_base_from_the_cli(assets, qrun, capsys):
    from lorakit import cli

    code = cli.main(["generate", str(qrun), "-p", "say abc", "--max-new-tokens", "3"])  # the run's 4-bit base
    out, err = capsys.readouterr()
    assert code == 0, err
    model, _, _ = open_adapter(qrun, model=str(assets[0]), quantize="fp4")  # a name + 4 bits asked for
    assert quant_info(model)["quantization"] == "fp4"


def test_note_when_an_adapter_meets_the_other_precision(assets, qrun, tmp_path):
    import warnings

    from peft import LoraConfig, get_peft_model

    full, _ = models.load_model(assets[0])
    with pytest.warns(UserWarning, match=r"trained on a 4-bit base \(nf4\), now loaded on a full-precision one"):
        lorakit.load_adapter(full, qrun)  # allowed: a note, and the adapter is on
    assert lorakit.active_adapters(full) == ["default"]
    plain, _ = models.load_model(assets[0])
    lorakit.inject(plain, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    lorakit.save_adapter(plain, tmp_path / "fp")
    four, _ = models.load_model(assets[0], quantization="nf4", compute_dtype="fp32")
    with pytest.warns(UserWarning, match=r"on a full-precision base, now loaded on a 4-bit one \(nf4\)"):
        lorakit.load_adapter(four, tmp_path / "fp")
    peft = get_peft_model(models.load_model(assets[0])[0], LoraConfig(r=4, target_modules="all-linear"))
    peft.save_pretrained(tmp_path / "p")  # PEFT records nothing: no note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(models.load_model(assets[0], quantization="nf4", compute_dtype="fp32")[0], tmp_path / "p")


@pytest.mark.slow
def test_default_model_qlora_trains_loads_in_peft_and_merges(tmp_path, monkeypatch):
    """The demo config on a 4-bit (nf4) default model: the loss falls, PEFT + bitsandbytes agree, merge streams."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    monkeypatch.delenv("LORAKIT_HOME", raising=False)  # the real cache: the default model converted once
    examples = Path(__file__).resolve().parents[1] / "examples"
    out = tmp_path / "run"
    result = train(
        examples / "quickstart.yaml",
        device="cpu",
        overrides=[
            "model={quantization: nf4, compute_dtype: fp32}",
            "train.steps=6",
            "train.batch_size=4",
            "train.warmup_steps=0",
            "train.schedule=constant",
            "train.eval_every=0",
            "train.precision=fp32",
            "train.log_every=1",
            "data.max_seq_len=96",
            f"output.dir={out}",
        ],
    )
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert result.steps == 6 and min(losses[-2:]) < losses[0]
    model, tok, info = open_adapter(out)
    assert info.spec.quantization == "nf4"
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(models.resolve_model(None), quantization_config=qc, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, out)
    peft.train()  # no bitsandbytes CPU repacking; dropout is 0
    x = tok("Ahoy, what is the weather like?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, peft(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    report = merging.merge_adapter(out, tmp_path / "merged", dtype="fp32")  # dequant(W4) + ΔW, streamed
    assert report.quantization is not None and report.max_probe_diff < 1e-3  # the unmerged 4-bit run's logits


def test_two_gloo_processes_on_a_4bit_base_equal_one_process(assets, tmp_path):
    import shutil

    from test_ddp import TORCHRUN, _max_diff, _torchrun, _train_one_process

    if not TORCHRUN.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    # 2 processes x 2 rows == 1 process x 4 rows: the same global batches, the 4-bit base in each process
    _torchrun(tmp_path, cfg_for(assets, tmp_path / "ddp", steps=3, batch_size=2), steps=3)
    _train_one_process(cfg_for(assets, tmp_path / "single", steps=3, batch_size=4))
    assert _max_diff(tmp_path / "ddp", tmp_path / "single") < 1e-5


def test_serve_on_a_4bit_base(assets, qrun):
    from fastapi.testclient import TestClient

    from lorakit.serve import build_app

    app = build_app({"name": str(assets[0]), "quantization": "nf4", "compute_dtype": "fp32"}, {"q": str(qrun)})
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "q", "prompt": "say abc", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] is not None
