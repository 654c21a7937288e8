"""The exact-match comparison of int8- and fp32-trained adapters (benchmarks/int8_quality.py) and its data set.

Not timed and not the real model: the script's pieces on a tiny model, and the dates
data (examples/make_dates_data.py) checked against the standard library's calendar.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_model_dir, write_chat_jsonl  # noqa: E402

from lorakit import int8  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_date(text: str) -> datetime.date:
    """The date a question writes, read back with datetime (independent of the generator's formatting)."""
    m = re.search(r"(\d\d)/(\d\d)/(\d{4}) \((day/month|month/day)/year\)", text)
    if m:
        a, b, y = int(m[1]), int(m[2]), int(m[3])
        return datetime.date(y, b, a) if m[4] == "day/month" else datetime.date(y, a, b)
    m = re.search(r"the (\d+)(?:st|nd|rd|th) of (\w+) (\d{4})", text)
    if m:
        return datetime.datetime.strptime(f"{m[1]} {m[2]} {m[3]}", "%d %B %Y").date()
    for pattern, fmt in (
        (r"(\w+ \d+, \d{4})", "%B %d, %Y"),
        (r"(\d+ \w+ \d{4})", "%d %B %Y"),
        (r"(\w{3} \d+ \d{4})", "%b %d %Y"),
    ):
        for candidate in re.findall(pattern, text):
            try:
                return datetime.datetime.strptime(candidate, fmt).date()
            except ValueError:
                continue
    raise AssertionError(f"no date in {text!r}")


def test_dates_data_is_deterministic_correct_and_held_out(tmp_path, monkeypatch):
    gen = load_script("make_dates_data", ROOT / "examples" / "make_dates_data.py")
    monkeypatch.setattr(gen, "TRAIN_FILE", tmp_path / "train.jsonl")
    monkeypatch.setattr(gen, "EVAL_FILE", tmp_path / "eval.jsonl")
    monkeypatch.setattr(gen, "HERE", tmp_path)
    gen.main()
    for name, shipped in (("train", "dates_train.jsonl"), ("eval", "dates_eval.jsonl")):  # the repo's, byte for byte
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (ROOT / "examples" / "data" / shipped).read_bytes()
    dates = {}
    for name in ("train", "eval"):
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        dates[name] = set()
        for row in rows:
            user, assistant = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            date = parse_date(user["content"])
            assert assistant["content"] == date.isoformat()  # the exact answer
            dates[name].add(date)
        assert len(dates[name]) == len(rows)
    assert (len(dates["train"]), len(dates["eval"])) == (400, 100)
    assert not dates["train"] & dates["eval"]  # held out: no eval date is in the train file


@pytest.mark.skipif(int8.int8_support() is not None, reason=f"no int8 kernels: {int8.int8_support()}")
def test_int8_quality_script_trains_both_and_scores_on_the_fp32_base(tmp_path):
    bench = load_script("int8_quality", ROOT / "benchmarks" / "int8_quality.py")
    model = make_tiny_model_dir(tmp_path / "model", hidden=64)
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=16)
    held_out = write_chat_jsonl(tmp_path / "eval.jsonl", n=6, seed=5)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                "data": {"train": str(data)},
                "train": {"steps": 50, "batch_size": 4, "lr": 2e-2, "eval_every": 0, "save_every": 0, "seed": 0},
            }
        )
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = bench.train_pair(config, tmp_path / "runs", steps=3, model=str(model))
        cmp = bench.compare(runs, held_out, str(model), max_new_tokens=6)
        other = bench.train_pair(config, tmp_path / "runs", steps=3, model=str(model), seed=7)
        cmp7 = bench.compare(other, held_out, str(model), ("lorakit",), max_new_tokens=6, batch_size=4)
        base = bench.score(None, held_out, model=str(model), max_new_tokens=6)
    finally:
        torch.set_num_threads(before)
    assert [runs[p]["steps"] for p in bench.PRECISIONS] == [3, 3]  # the override took
    assert "int8 base: 14 Linear layers" in (runs["int8"]["run_dir"] / "README.md").read_text()
    assert "int8 base" not in (runs["fp32"]["run_dir"] / "README.md").read_text()
    assert (
        other["int8"]["run_dir"].name == "int8-seed7"
        and "seed: 7" in (other["int8"]["run_dir"] / "lorakit.yaml").read_text()
    )
    scores = cmp["scores"]
    for p in bench.PRECISIONS:
        lorakit_way, peft_way = scores[p, "lorakit"], scores[p, "peft"]
        assert lorakit_way["exact_match_rows"] == peft_way["exact_match_rows"] == 6
        # the adapter unmerged on the fp32 base and PEFT's merged model: the same model up to rounding
        assert lorakit_way["eval_loss"] == pytest.approx(peft_way["eval_loss"], rel=1e-4)
        assert lorakit_way["exact_match"] == peft_way["exact_match"]
    # the two adapters differ (int8 numerics in training), another seed another adapter, the base has none
    assert scores["int8", "lorakit"]["eval_loss"] != scores["fp32", "lorakit"]["eval_loss"]
    assert cmp7["scores"]["fp32", "lorakit"]["eval_loss"] != scores["fp32", "lorakit"]["eval_loss"]
    assert set(cmp7["scores"]) == {("fp32", "lorakit"), ("int8", "lorakit")}
    assert base["eval_loss"] != pytest.approx(scores["fp32", "lorakit"]["eval_loss"], rel=1e-3)
    for how in bench.HOW:
        want = 100 * (scores["int8", how]["exact_match"] - scores["fp32", how]["exact_match"])
        assert cmp["diff"][how] == pytest.approx(want)
    lines = bench.table({None: (runs, cmp)}, base)
    assert len(lines) == 2 + 3 + 1 + 2 and lines[-1].startswith("int8 - fp32 (PEFT merged): ")
    assert ("NOT met" in lines[-2]) == (not bench.within_bound(cmp["diff"]["lorakit"]))
    two = bench.table({0: (runs, cmp), 7: (other, cmp7)}, None, ("lorakit",))
    assert len(two) == 2 + 4 + 1 + 1 and "(mean " in two[-1] and "of 2 seeds" in two[-1]


def test_the_verdict_rounds_before_it_compares():
    bench = load_script("int8_quality", ROOT / "benchmarks" / "int8_quality.py")
    assert bench.within_bound(100 * (0.85 - 0.86))  # -1.0000000000000009: one row of 100, at the bound
    assert not bench.within_bound(100 * (0.84 - 0.86)) and bench.within_bound(3.0)
