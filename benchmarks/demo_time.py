"""How long the README's `make demo` takes: the whole command, wall clock.

    python benchmarks/demo_time.py            # venv and model cache in place (the usual second run)
    python benchmarks/demo_time.py --fresh    # a fresh clone of HEAD, a new .venv, an empty model cache

Warm mode first brings .venv up to date with `scripts/setup.sh` (untimed, so a
changed requirements file does not count as demo time), removes runs/quickstart
and then times `make demo` in this checkout. Fresh mode clones the committed HEAD
into a temporary directory and times `make demo` there with a new ``$LORAKIT_HOME``:
package downloads (pip, from the network), the GGUF-to-safetensors conversion, the
training and the answers. Either way the result goes into the ``## demo_time.py``
(or ``## demo_time.py (fresh)``) section of benchmarks/RESULTS.md, with the
training loop's own time (the last ``elapsed_s`` of metrics.jsonl) beside the
total. Run it alone: other jobs on a 2-core machine slow it down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_rev, machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def time_demo(root: Path, env: dict[str, str]) -> tuple[float, dict, str]:
    """Run `make demo` in ``root``; return (wall seconds, the last metrics.jsonl training row, output tail)."""
    shutil.rmtree(root / "runs" / "quickstart", ignore_errors=True)
    t0 = time.perf_counter()
    out = subprocess.run(["make", "demo"], cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = out.stdout + out.stderr
    if out.returncode != 0:
        sys.exit(f"make demo failed (exit {out.returncode}):\n{log[-4000:]}")
    rows = [
        json.loads(line)
        for line in (root / "runs" / "quickstart" / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    last = next(r for r in reversed(rows) if "loss" in r and "elapsed_s" in r)
    return wall, last, log[-1500:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fresh", action="store_true", help="fresh clone, new .venv, empty model cache (downloads)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    commit = git_rev()
    if args.fresh:
        work = Path(tempfile.mkdtemp(prefix="lorakit-demo-"))
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work / "lorakit")], check=True)
        root, env["LORAKIT_HOME"] = work / "lorakit", str(work / "home")
        commit = commit.split(" ")[0] + " (committed tree only)"
        what = (
            "fresh: `git clone` of HEAD, `make demo` creating .venv (pip downloads), converting the default "
            "model into an empty `$LORAKIT_HOME`, training, answering"
        )
    else:
        root = ROOT
        subprocess.run(["bash", "scripts/setup.sh"], cwd=root, check=True)
        what = "warm: .venv up to date and the converted model in `$LORAKIT_HOME` (setup.sh run first, untimed)"
    try:
        wall, last, tail = time_demo(root, env)
    finally:
        if args.fresh:
            shutil.rmtree(work, ignore_errors=True)
    body = (
        f"Machine: {machine()}; commit {commit}.\n\n"
        f"`make demo` ({what}): **{_mmss(wall)}** wall clock in all; of that the training loop "
        f"({last['step']} steps of examples/quickstart.yaml, its own clock) {_mmss(last['elapsed_s'])}, "
        f"final training loss {last['loss']:.3f}. The rest is "
        + ("the clone, .venv and pip, the model conversion, " if args.fresh else "")
        + "process start-up, model loading, the eval pass and the base-vs-adapter answers."
    )
    print(tail + "\n\n" + body)
    if not args.no_write:
        write_section("demo_time.py" + (" (fresh)" if args.fresh else ""), body)


if __name__ == "__main__":
    main()
