"""The GPU paths, on a CUDA device (skipped without one; run by benchmarks/device_run.sh on a lent GPU).

References: float64 math on the CPU for the fused ops, the eager model for CUDA graphs
(same kernels, so equal to float rounding), and a run without graphs for the loop.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import losses, ops, swiglu
from lorakit.fusion import fuse_shared_inputs, fuse_swiglu_mlps
from lorakit.train.config import RunConfig
from lorakit.train.graphs import LayerGraphs, graph_blocker
from lorakit.train.recompute import enable_checkpointing
from lorakit.train.schedule import make_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_llama  # noqa: E402
from tiny import make_tiny_model_dir, write_chat_jsonl  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_linear_on_cuda_matches_fp64(dtype, dropout):
    g = torch.Generator().manual_seed(0)
    N, i, o, r, s = 37, 48, 40, 8, 2.0
    x = torch.randn(N, i, generator=g)
    W, b = torch.randn(o, i, generator=g) / 7, torch.randn(o, generator=g)
    A, B = torch.randn(r, i, generator=g) / 7, torch.randn(o, r, generator=g)
    mask = (torch.rand(N, i, generator=g) > 0.3).float() / 0.7 if dropout else None
    dy = torch.randn(N, o, generator=g)
    # reference: float64 on the CPU
    xr, Ar, Br = (t.double().requires_grad_() for t in (x, A, B))
    yr = xr @ W.double().t() + b.double() + s * ((xr if mask is None else xr * mask.double()) @ Ar.t()) @ Br.t()
    yr.backward(dy.double())
    xc = x.to(CUDA, copy=True).requires_grad_()
    Ac, Bc = A.to(CUDA, copy=True).requires_grad_(), B.to(CUDA, copy=True).requires_grad_()
    y = ops.lora_linear(
        xc,
        W.to(CUDA, dtype),
        b.to(CUDA, dtype),
        Ac,
        Bc,
        s,
        dropout_p=0.3 if dropout else 0.0,
        dropout_mask=None if mask is None else mask.to(CUDA),
        compute_dtype=dtype,
    )
    y.backward(dy.to(CUDA, dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(y, yr) < tol
    for got, exp in ((xc.grad, xr.grad), (Ac.grad, Ar.grad), (Bc.grad, Br.grad)):
        assert _rel(got, exp) < tol


def test_swiglu_and_chunked_ce_on_cuda_match_fp64():
    """The fused SwiGLU MLP (LoRA on gate, up, down) then the chunked head + loss, on CUDA vs float64."""
    g = torch.Generator().manual_seed(1)
    H, I, V, N, r = 32, 64, 97, 29, 4  # noqa: E741 - I: the MLP's inner width, as in the formulas
    x = torch.randn(N, H, generator=g)
    dims = [(I, H), (I, H), (H, I)]
    Ws = [torch.randn(o, i, generator=g) / math.sqrt(i) for o, i in dims]
    As = [torch.randn(r, i, generator=g) / math.sqrt(i) for _, i in dims]
    Bs = [torch.randn(o, r, generator=g) for o, _ in dims]
    head = torch.randn(V, H, generator=g) / 6
    targets = torch.randint(0, V, (N,), generator=g)

    def run(dev, dtype, fused):
        xx = x.to(dev, dtype, copy=True).requires_grad_()
        W = [w.to(dev, dtype) for w in Ws]
        A = [a.to(dev, dtype, copy=True).requires_grad_() for a in As]
        B = [b.to(dev, dtype, copy=True).requires_grad_() for b in Bs]
        if fused:
            specs = [ops.LoraSpec(W[k], None, A[k], B[k], 0.5 * (k + 1)) for k in range(3)]
            hidden = swiglu.lora_swiglu_mlp(xx, *specs)
        else:
            lin = [lambda t, k=k: t @ W[k].t() + 0.5 * (k + 1) * (t @ A[k].t()) @ B[k].t() for k in range(3)]
            hidden = lin[2](torch.nn.functional.silu(lin[0](xx)) * lin[1](xx))
        loss = losses.chunked_cross_entropy(hidden, head.to(dev, dtype), targets.to(dev), chunk_size=8)
        loss.backward()
        return loss, [xx.grad, *(t.grad for t in A + B)]

    loss, grads = run(CUDA, torch.float32, fused=True)
    loss_r, grads_r = run("cpu", torch.float64, fused=False)
    assert abs(loss.item() - loss_r.item()) < 1e-5 * abs(loss_r.item())
    for got, exp in zip(grads, grads_r):
        assert _rel(got, exp) < 1e-5


def _llama_on_cuda(dtype=torch.float32):
    model = make_llama(layers=3)
    lorakit.inject(
        model,
        lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    if dtype != torch.float32:  # as the loop does for bf16: frozen base in bf16, adapters fp32
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    fuse_swiglu_mlps(model)
    assert fuse_shared_inputs(model) == 3  # q/k/v as one op, inside the recorded graphs too
    return model.to(CUDA).train()


def _batches(seed=0, side="left"):
    """Micro-batches of two shapes, with padding in one row: left padding keeps its mask tensor; right
    padding runs mask-free (``causal_lm_loss`` drops a right-padding mask), so graphs record no mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in (12, 20, 12, 20, 12, 20):
        ids = torch.randint(0, 96, (3, T), generator=g)
        mask = torch.ones_like(ids)
        mask[1, : T // 3] = 0
        if side == "right":
            mask[1] = mask[1].flip(0)
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids.to(CUDA), "attention_mask": mask.to(CUDA), "labels": labels.to(CUDA)})
    return out


def _train(model, graphs: bool, bf16: bool, steps=3, accum=2, side="left"):
    from lorakit.train.lm_loss import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-2, 0.0, CUDA)
    lg = LayerGraphs(model) if graphs else None
    batches, losses = _batches(side=side), []
    for step in range(steps):
        for micro in batches[step * accum : (step + 1) * accum]:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                loss_sum, n = causal_lm_loss(model, micro)
            (loss_sum / n).backward()
            losses.append(loss_sum.item() / n)
        opt.step()
        opt.zero_grad(set_to_none=lg is None)
    return losses, {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}, lg


@pytest.mark.parametrize("bf16, side", [(False, "left"), (True, "left"), (False, "right")])
def test_layer_graphs_train_like_eager(bf16, side):
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    eager_model = _llama_on_cuda(dtype)
    torch.manual_seed(0)
    graph_model = _llama_on_cuda(dtype)
    assert graph_blocker(graph_model, CUDA) is None
    loss_e, params_e, _ = _train(eager_model, graphs=False, bf16=bf16, side=side)
    loss_g, params_g, lg = _train(graph_model, graphs=True, bf16=bf16, side=side)
    assert all((key[2] is None) == (side == "right") for key in lg.graphs)  # key[2]: the mask's meta
    assert len(lg.graphs) == 2 and lg.replays == 3 * 6  # two shapes recorded, every layer call replayed
    tol = 1e-5 if not bf16 else 1e-2
    for a, b in zip(loss_g, loss_e):
        assert abs(a - b) <= tol * abs(b), (loss_g, loss_e)
    for name in params_e:
        assert _rel(params_g[name], params_e[name]) < tol, name
    with torch.no_grad():  # eval forward: eager, same output
        graph_model.eval()
        eager_model.eval()
        ids = _batches()[0]["input_ids"]
        assert _rel(graph_model(input_ids=ids).logits, eager_model(input_ids=ids).logits) < tol


def test_train_loop_with_and_without_cuda_graphs(tmp_path, capsys):
    model_dir = make_tiny_model_dir(tmp_path / "model", layers=2)
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=24)
    adapters = {}
    for mode in ("on", "off"):
        cfg = RunConfig.model_validate(
            {
                "model": str(model_dir),
                "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "data": {"train": str(data)},
                "train": {
                    "steps": 4,
                    "batch_size": 4,
                    "grad_accum": 2,
                    "lr": 1e-2,
                    "precision": "fp32",
                    "cuda_graphs": mode,
                    "eval_every": 0,
                    "save_every": 0,
                },
                "output": {"dir": str(tmp_path / mode)},
            }
        )
        lorakit.train(cfg, device="cuda")
        from safetensors.torch import load_file

        adapters[mode] = load_file(str(tmp_path / mode / "adapter_model.safetensors"))
    assert "CUDA graphs: on" in capsys.readouterr().out
    for k in adapters["off"]:
        assert _rel(adapters["on"][k], adapters["off"][k]) < 1e-4, k
    assert math.isfinite(sum(v.sum().item() for v in adapters["on"].values()))


def test_checkpointing_rerun_skip_on_cuda():
    """lorakit's checkpointing (MLP output not rerun) gives the grads of no checkpointing on the GPU."""
    torch.manual_seed(0)
    model = lorakit.inject(
        make_llama(layers=3),
        lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    fuse_swiglu_mlps(model)
    fuse_shared_inputs(model)
    model.to(CUDA).train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            assert enable_checkpointing(model) == 3
        model.zero_grad(set_to_none=True)
        micro = _batches()[1]
        model(**micro).loss.backward()
        grads.append({n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert _rel(grads[1][name], grads[0][name]) < 1e-5, name
