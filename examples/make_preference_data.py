"""Make the DPO example's preference pairs: the quickstart pirate, now with his parrot speaking first.

The second stage of the two-stage recipe (``quickstart.yaml``: SFT teaches the pirate
style; ``dpo.yaml``: DPO on these pairs). Every pair answers one question twice in the
quickstart's pirate style, with the same fact and the same sign-off; the *chosen*
answer opens with the parrot (``Squawk! Polly says:``), the *rejected* one with an
ordinary pirate greeting ("Arr, matey!", ...). The preference is the whole
difference, so a few dozen DPO steps move it visibly: answers to new questions open
with the parrot, and the rest of the answer stays what SFT taught.

Deterministic (seeded ``random.Random``), no downloads, standard library only; reuses
the quickstart's topics, questions and texts::

    python examples/make_preference_data.py        # rewrites the two files below

Writes, next to this script, TRL's conversational preference rows
``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``:

* ``data/dpo_train.jsonl``  pairs on the quickstart's train topics, advice and sums
* ``data/dpo_eval.jsonl``   pairs on topics and advice the train pairs never see
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_quickstart_data import ADVICE, CLOSERS, GREETINGS, OPENERS, TOPIC_QUESTIONS, TOPICS, sums

SEED = 4321
HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "data" / "dpo_train.jsonl"
EVAL_FILE = HERE / "data" / "dpo_eval.jsonl"
PARROT = "Squawk! Polly says:"


def pair(rng: random.Random, question: str, body: str) -> dict:
    body = body[0].upper() + body[1:]
    if body[-1] not in ".!?":
        body += "."
    closer = rng.choice(CLOSERS)
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": f"{PARROT} {body} {closer}"}],
        "rejected": [{"role": "assistant", "content": f"{rng.choice(OPENERS)} {body} {closer}"}],
    }


def build(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train pairs, eval pairs): eval holds whole topics and advice items the train pairs never see."""
    topics, advice = TOPICS[:], ADVICE[:]
    rng.shuffle(topics)
    rng.shuffle(advice)
    eval_topics, train_topics = topics[:6], topics[6:]
    eval_advice, train_advice = advice[:4], advice[4:]
    train = [pair(rng, q.format(t=t), fact) for t, fact in train_topics for q in rng.sample(TOPIC_QUESTIONS, 2)]
    train += [pair(rng, q, a) for q, a in train_advice + GREETINGS + sums(rng, 12)]
    evals = [pair(rng, q.format(t=t), fact) for t, fact in eval_topics for q in rng.sample(TOPIC_QUESTIONS, 2)]
    evals += [pair(rng, q, a) for q, a in eval_advice]
    rng.shuffle(train)
    return train, evals


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    train, evals = build(random.Random(SEED))
    write_jsonl(TRAIN_FILE, train)
    write_jsonl(EVAL_FILE, evals)
    print(
        f"wrote {len(train)} pairs to {TRAIN_FILE.relative_to(HERE.parent)}, "
        f"{len(evals)} pairs to {EVAL_FILE.relative_to(HERE.parent)}"
    )


if __name__ == "__main__":
    main()
