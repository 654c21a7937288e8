"""lorakit.train.schedule: the learning-rate multipliers, step by step, against transformers' schedulers."""

from __future__ import annotations

import pytest
import torch

from lorakit.train.schedule import lr_factor

HF_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def hf_lr_factors(schedule: str, total: int, warmup: int) -> list[float]:
    """The multipliers of lorakit's schedule, step by step, from ``transformers.get_scheduler``.

    After warmup they are transformers' own. lorakit's warmup starts one step later than
    transformers' (whose first step has lr 0): step s < warmup gets transformers' factor
    of step s + 1 in a (warmup + 1)-step warmup, that is (s + 1) / (warmup + 1).
    """
    from transformers import get_scheduler

    def factors(num_warmup: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(HF_NAMES[schedule], opt, num_warmup_steps=num_warmup, num_training_steps=total)
        out = []
        for _ in range(total + 1):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    after, during = factors(warmup), factors(warmup + 1)
    return [during[s + 1] if s < warmup else after[s] for s in range(total)]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("total, warmup", [(10, 2), (12, 0), (9, 3), (1, 0)])
def test_lr_factor_follows_transformers_schedules(schedule, total, warmup):
    ours = [lr_factor(schedule, s, total, warmup) for s in range(total)]
    assert ours == pytest.approx(hf_lr_factors(schedule, total, warmup), abs=1e-12)


def test_optimizer_is_torchs_fused_adamw_on_a_cpu_with_the_loops_results():
    """make_optimizer steps the fused kernel on a CPU (as transformers' default adamw_torch_fused), and its
    parameters after 5 steps equal the per-tensor AdamW's (the reference) within float rounding."""
    from lorakit.train.schedule import make_optimizer

    g = torch.Generator().manual_seed(0)
    shapes = [(16, 24), (40, 16), (7,)]
    ours = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    start = [p.detach().clone() for p in ours]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = make_optimizer(ours, 1e-2, 0.1, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b, a0 in zip(ours, ref, start):
        assert (a.detach() - a0).abs().mean() > 3e-3  # they moved (5 steps of up to lr each)
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-7)
