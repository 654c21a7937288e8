"""lorakit.few_rows: few-row CPU Linears as (W·xᵀ)ᵀ, the route's rule, the head override and its undoing.

References: float64 products (the textbook dot-product error bound), F.linear, greedy decoding with the
route switched off, and routing.forward_owner for who holds the head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit import few_rows, generation, routing

U = torch.finfo(torch.float32).eps / 2  # unit roundoff
NARROW = (32, 48)  # in, out
WIDE = (16, 1024)  # out >= 16 * in: an output head


def _bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """|fl(x·wᵀ + b) - (x·wᵀ + b)| <= γₙ (|x|·|w|ᵀ + |b|), n = in + 1 (Higham, Thm 3.5), per element."""
    n = w.shape[1] + 1
    gamma = n * U / (1 - n * U)
    mag = x.double().abs() @ w.double().abs().T
    return gamma * (mag + (0 if b is None else b.double().abs()))


@pytest.mark.parametrize("shape", [NARROW, WIDE])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 32, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_is_f_linear_within_fp32_bound(shape, rows, with_bias):
    torch.manual_seed(rows)
    n_in, n_out = shape
    w = torch.randn(n_out, n_in)
    b = torch.randn(n_out) if with_bias else None
    x = torch.randn(rows, 1, n_in)  # (batch, positions, features), as in a decoding step
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    with torch.no_grad():
        y = few_rows.linear(x, w, b)
        stock = F.linear(x, w, b)
    assert y.shape == stock.shape and y.dtype == torch.float32 and y.is_contiguous()
    bound = _bound(x, w, b)
    assert ((y.double() - ref).abs() <= bound).all()
    assert ((stock.double() - ref).abs() <= bound).all()  # the bound is one F.linear meets too
    if not few_rows.takes_route(x, w, b):
        assert torch.equal(y, stock)


def test_route_taken_only_for_fp32_cpu_no_grad_few_rows():
    narrow, wide = torch.randn(NARROW[1], NARROW[0]), torch.randn(WIDE[1], WIDE[0])
    takes = few_rows.takes_route
    assert [r for r in range(1, 40) if takes(torch.randn(r, NARROW[0]), narrow)] == [2, 3, 4]
    assert [r for r in range(1, 40) if takes(torch.randn(r, WIDE[0]), wide)] == list(range(2, 33))
    assert takes(torch.randn(2, 2, WIDE[0]), wide)  # rows = every leading dimension together
    assert not takes(torch.randn(17, 2, WIDE[0]), wide)
    x = torch.randn(4, WIDE[0])
    trainable = wide.clone().requires_grad_()
    assert not takes(x, trainable)  # autograd would record: training never takes the route
    assert not takes(x.clone().requires_grad_(), wide)
    assert not takes(x, wide, torch.zeros(WIDE[1], requires_grad=True))
    with torch.no_grad():
        assert takes(x, trainable)
    with torch.inference_mode():
        assert takes(x, wide)
    assert not takes(x.bfloat16(), wide.bfloat16())
    assert not takes(x.double(), wide.double())
    assert not takes(x, wide, torch.zeros(WIDE[1], dtype=torch.float64))
    assert not takes(x, wide.T.contiguous().T)  # a transposed weight: the product is not the streamed one
    assert not takes(x.to("meta"), wide.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not takes(x, wide)


def test_linear_calls_f_linear_exactly_when_not_routed(monkeypatch):
    calls = []
    stock = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(a) or stock(*a))
    w = torch.randn(WIDE[1], WIDE[0])
    with torch.no_grad():
        few_rows.linear(torch.randn(8, WIDE[0]), w)
        assert calls == []
        few_rows.linear(torch.randn(1, WIDE[0]), w)
        assert len(calls) == 1


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    # hidden 16, vocab 259: the head is wide (259 >= 16 * 16), so batches of up to 32 rows take the route
    return make_tiny_model_dir(tmp_path_factory.mktemp("few_rows"), hidden=16)


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_greedy_generation_same_with_and_without_route(wide_model_dir, monkeypatch):
    model, tok = _model(wide_model_dir), AutoTokenizer.from_pretrained(wide_model_dir)
    prompts = [generation.prompt_ids(tok, f"say {w}") for w in ["a", "bb", "abc", "dd", "e", "ffff", "ab", "c"]]
    taken = []
    check = few_rows.takes_route
    monkeypatch.setattr(few_rows, "takes_route", lambda *a: taken.append(check(*a)) or taken[-1])
    routed = generation.generate_batch(model, tok, prompts, max_new_tokens=8, batch_size=8)
    assert any(taken)  # 8 rows through the head at the prefill's last position and at each decoding step
    assert routing.forward_owner(model.get_output_embeddings()) is None  # undone after the call
    monkeypatch.setattr(few_rows, "MAX_ROWS_WIDE", 1)  # switch the route off
    monkeypatch.setattr(few_rows, "MAX_ROWS", 1)
    taken.clear()
    stock = generation.generate_batch(model, tok, prompts, max_new_tokens=8, batch_size=8)
    assert taken and not any(taken)
    assert routed == stock


def test_head_logits_within_bound_of_float64(wide_model_dir):
    model = _model(wide_model_dir)
    head = model.get_output_embeddings()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[:, -1:]  # (3, 1, 16): a decoding step's head input
        assert few_rows.route_head(model)
        routed = model.lm_head(hidden)
        few_rows.unroute_head(model)
        stock = model.lm_head(hidden)
    ref = hidden.double() @ head.weight.double().T
    bound = _bound(hidden, head.weight, None)
    assert ((routed.double() - ref).abs() <= bound).all() and ((stock.double() - ref).abs() <= bound).all()


def test_head_route_installed_and_undone_by_inference_paths(wide_model_dir):
    model = _model(wide_model_dir)
    head = model.get_output_embeddings()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    with lorakit.adapter_batch(model, ["a", "b"]):
        assert routing.forward_owner(head) == few_rows.OWNER
    assert routing.forward_owner(head) is None

    lorakit.for_inference(model, merge_adapter=False)
    assert routing.forward_owner(head) == few_rows.OWNER
    with lorakit.adapter_batch(model, ["a", "b"]):  # works with the route for_inference set, leaves it in place
        assert routing.forward_owner(head) == few_rows.OWNER
    assert routing.forward_owner(head) == few_rows.OWNER
    lorakit.for_training(model)
    assert routing.forward_owner(head) is None  # training sees the stock head

    lorakit.for_inference(model)
    plain = lorakit.unload(model)
    assert routing.forward_owner(plain.get_output_embeddings()) is None


def test_route_head_leaves_other_owners_and_other_heads_alone(wide_model_dir):
    model = _model(wide_model_dir)
    head = model.get_output_embeddings()
    routing.set_forward(head, head.forward, "someone")
    assert not few_rows.route_head(model)
    assert not few_rows.unroute_head(model)
    assert routing.forward_owner(head) == "someone"
    routing.remove_forward(head, "someone")
    assert not few_rows.route_head(model.bfloat16())  # not fp32: nothing to gain
    assert not few_rows.route_head(torch.nn.Linear(4, 4))  # no get_output_embeddings


@pytest.mark.parametrize("n_out", [1024, 1088, 1000, 960])  # blocked copy (>= BLOCKED_MIN, multiple of BLOCK), not
@pytest.mark.parametrize("rows", [2, 8, 32])
def test_wide_output_copied_back_exactly(n_out, rows):
    """The (out, rows) product comes back as (rows, out) unchanged, by the blocked copy or .T.contiguous()."""
    torch.manual_seed(n_out + rows)
    w, x = torch.randn(n_out, 16), torch.randn(rows, 1, 16)
    blocked = n_out >= few_rows.BLOCKED_MIN and n_out % few_rows.BLOCK == 0
    assert blocked == (n_out in (1024, 1088))
    with torch.no_grad():
        y = few_rows.linear(x, w)
    assert few_rows.takes_route(x, w) and y.is_contiguous() and y.shape == (rows, 1, n_out)
    assert torch.equal(y, torch.mm(w, x.view(rows, 16).T).T.reshape(rows, 1, n_out))
