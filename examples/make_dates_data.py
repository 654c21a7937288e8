"""Make the dates data set: a task with exact answers, for exact-match evals (``lorakit eval``).

Each row asks for a date, written one of several ways, in ISO form; the answer is
the ISO date and nothing else::

    user:      Write 7 March 2021 as YYYY-MM-DD.
    assistant: 2021-03-07

The default model (SmolLM2-135M-Instruct) answers such questions in a sentence, or
with the wrong date, so it scores close to 0 on exact match; a short LoRA fine-tune
teaches it the form and the month table. The held-out file has dates the train file
does not have (the rule carries over, nothing can be learnt by heart), and both
files mix the same wordings. benchmarks/int8_quality.py uses it to compare an
adapter trained in int8 with one trained in fp32.

Deterministic (seeded ``random.Random``), no downloads, standard library only::

    python examples/make_dates_data.py        # rewrites the two files below

Writes, next to this script:

* ``data/dates_train.jsonl``  400 chat rows ``{"messages": [user, assistant]}``
* ``data/dates_eval.jsonl``   100 rows, other dates
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 2026
HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "data" / "dates_train.jsonl"
EVAL_FILE = HERE / "data" / "dates_eval.jsonl"
N_TRAIN, N_EVAL = 400, 100

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # February: the data set has no 29th


def written(year: int, month: int, day: int, style: int) -> str:
    """The date as a question writes it: one of six styles."""
    name = MONTHS[month - 1]
    return [
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"{name[:3]} {day} {year}",
        f"{day:02d}/{month:02d}/{year} (day/month/year)",
        f"{month:02d}/{day:02d}/{year} (month/day/year)",
        f"the {day}{_suffix(day)} of {name} {year}",
    ][style]


def _suffix(day: int) -> str:
    return "th" if 10 < day < 14 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


QUESTIONS = [
    "Write {date} as YYYY-MM-DD.",
    "Convert {date} to ISO 8601 (YYYY-MM-DD).",
    "What is {date} in ISO format?",
    "Give the ISO date for {date}. Answer with the date only.",
]


def make_rows(rng: random.Random, n: int, taken: set[tuple[int, int, int]]) -> list[dict]:
    """``n`` rows on dates not in ``taken`` (which gets them added)."""
    rows = []
    while len(rows) < n:
        year, month = rng.randint(1950, 2049), rng.randint(1, 12)
        day = rng.randint(1, DAYS_IN[month - 1])
        if (year, month, day) in taken:
            continue
        taken.add((year, month, day))
        question = rng.choice(QUESTIONS).format(date=written(year, month, day, rng.randrange(6)))
        answer = f"{year:04d}-{month:02d}-{day:02d}"
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def main() -> None:
    rng = random.Random(SEED)
    taken: set[tuple[int, int, int]] = set()
    train, held_out = make_rows(rng, N_TRAIN, taken), make_rows(rng, N_EVAL, taken)
    for path, rows in ((TRAIN_FILE, train), (EVAL_FILE, held_out)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
