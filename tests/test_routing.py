"""lorakit.routing: instance-forward overrides with an owner, conflicts refused, pickles and copies intact."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from conftest import make_llama
from torch import nn

import lorakit
from lorakit import routing
from lorakit.errors import ForwardConflictError
from lorakit.fusion import fuse_swiglu_mlps, unfuse_mlps
from lorakit.train.graphs import LayerGraphs


def _doubled(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A module-level override (so a partial of it pickles): twice the class's forward."""
    return 2 * type(module).forward(module, x)


def _routed(module: nn.Module, owner: str = "tests.a") -> nn.Module:
    routing.set_forward(module, functools.partial(_doubled, module), owner)
    return module


def test_set_routes_calls_and_remove_takes_only_its_own():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    plain = lin(x)
    keys = list(lin.state_dict())
    assert routing.forward_owner(lin) is None
    _routed(lin)
    assert routing.forward_owner(lin) == "tests.a"
    assert torch.equal(lin(x), 2 * plain)
    assert list(lin.state_dict()) == keys  # an override is no parameter or buffer
    assert routing.remove_forward(lin, "tests.b") is False  # not b's: nothing changes
    assert routing.forward_owner(lin) == "tests.a" and torch.equal(lin(x), 2 * plain)
    assert routing.remove_forward(lin, "tests.a") is True
    assert routing.forward_owner(lin) is None and torch.equal(lin(x), plain)
    assert "forward" not in vars(lin) and set(vars(lin)) == set(vars(nn.Linear(3, 2)))  # nothing left behind
    assert routing.remove_forward(lin, "tests.a") is False


def test_conflicts_are_errors_and_the_owner_may_replace_its_own():
    lin = _routed(nn.Linear(3, 2))
    with pytest.raises(ForwardConflictError, match="tests.b cannot replace the forward of this Linear: tests.a"):
        routing.set_forward(lin, lin.forward, "tests.b")
    with pytest.raises(ForwardConflictError, match="tests.a cannot replace .* tests.a already has"):
        routing.set_forward(lin, functools.partial(_doubled, lin), "tests.a")  # remove first, then set
    user = nn.Linear(3, 2)
    user.forward = functools.partial(_doubled, user)  # set by hand, outside lorakit.routing
    assert routing.forward_owner(user) == routing.USER
    with pytest.raises(ForwardConflictError, match="user code"):
        routing.set_forward(user, user.forward, "tests.a")
    assert routing.remove_forward(user, routing.USER) is False  # nobody may remove user code's override
    lin.forward = functools.partial(_doubled, lin)  # overwritten by hand: no longer a's
    assert routing.forward_owner(lin) == routing.USER


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_overrides_survive_pickling_and_copies_and_point_at_the_copy(how):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    _routed(model[1])
    x = torch.randn(4, 3)
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    else:
        twin = copy.deepcopy(model)
    assert routing.forward_owner(twin[1]) == "tests.a"
    assert twin[1].forward.args[0] is twin[1]  # bound to the copy, not the original
    with torch.no_grad():
        twin[1].weight.mul_(3)  # the copy's own weights are used
    torch.testing.assert_close(twin(x), 2 * nn.functional.linear(model[0](x), 3 * model[1].weight, model[1].bias))
    assert routing.remove_forward(twin[1], "tests.a") and routing.forward_owner(model[1]) == "tests.a"


def test_lorakit_owners_and_their_precedence():
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    mlp, q = model.model.layers[0].mlp, model.model.layers[0].self_attn.q_proj
    assert fuse_swiglu_mlps(model) == 2 and routing.forward_owner(mlp) == "lorakit.fusion"
    assert fuse_swiglu_mlps(model) == 0  # already routed: left as it is
    graphs = LayerGraphs(model)
    assert {routing.forward_owner(layer) for layer in model.model.layers} == {"lorakit.train.graphs"}
    with pytest.raises(ForwardConflictError, match="lorakit.train.graphs"):
        LayerGraphs(model)  # a second set of graphs on the same layers
    graphs.remove()
    unfuse_mlps(model)
    assert all(routing.forward_owner(m) is None for m in model.modules())
    _routed(mlp, "tests.a")
    with pytest.raises(ForwardConflictError, match="tests.a"):
        fuse_swiglu_mlps(model)
    # The merged-layer shortcut steps aside for another owner, and drops only its own override.
    _routed(q, "tests.a")
    lorakit.for_inference(model)
    assert routing.forward_owner(q) == "tests.a"
    assert routing.forward_owner(model.model.layers[0].self_attn.k_proj) == "lorakit.layers"
    q.disabled = True  # a state change
    assert routing.forward_owner(q) == "tests.a"
    assert routing.forward_owner(model.model.layers[0].self_attn.k_proj) == "lorakit.layers"


def test_merged_shortcut_survives_torch_save_and_deepcopy(input_ids):
    model = lorakit.inject(make_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.for_inference(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        q = twin.model.layers[0].self_attn.q_proj
        assert routing.forward_owner(q) == "lorakit.layers"
        assert q.forward.__self__ is q.base_layer  # the copy's own base layer
        with torch.no_grad():
            assert torch.equal(twin(input_ids=input_ids).logits, expected)
        q.disabled = False  # any state change drops the shortcut on the copy too
        assert routing.forward_owner(q) is None
