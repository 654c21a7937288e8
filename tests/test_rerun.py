"""lorakit.rerun: the per-thread rerun flag and the marks of modules whose output a rerun does not read.

The end-to-end behaviour (gradients equal to no checkpointing, fewer matmuls) is in test_recompute.py.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
from torch import nn

from lorakit import rerun


def test_rerun_mode_nests_and_resets_on_error():
    assert not rerun.in_rerun()
    with rerun.rerun_mode():
        with rerun.rerun_mode():
            assert rerun.in_rerun()
        assert rerun.in_rerun()
    assert not rerun.in_rerun()
    with pytest.raises(RuntimeError), rerun.rerun_mode():
        raise RuntimeError("boom")
    assert not rerun.in_rerun()


def test_rerun_mode_is_per_thread():
    seen = []
    with rerun.rerun_mode():
        worker = threading.Thread(target=lambda: seen.append(rerun.in_rerun()))
        worker.start()
        worker.join()
        assert rerun.in_rerun()
    assert seen == [False]


def test_output_unread_needs_both_the_mark_and_the_rerun():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    marked, plain = model[0], model[1]
    rerun.mark_output_unread(marked)
    assert rerun.is_marked(marked) and not rerun.is_marked(plain)
    assert not rerun.output_unread(marked)  # outside a rerun every output is read
    with rerun.rerun_mode():
        assert rerun.output_unread(marked) and not rerun.output_unread(plain)
    keys = list(model.state_dict())
    assert rerun.is_marked(copy.deepcopy(model)[0]) and rerun.is_marked(pickle.loads(pickle.dumps(model))[0])
    rerun.unmark_all(model)
    assert not any(rerun.is_marked(m) for m in model.modules())
    assert list(model.state_dict()) == keys
    with rerun.rerun_mode():
        assert not rerun.output_unread(marked)
