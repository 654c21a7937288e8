"""Load on `lorakit serve`: N concurrent clients x M requests across 4 adapters, on loopback only.

Starts the server as a subprocess on a free 127.0.0.1 port with the base model and an
admin token, loads 4 adapters (r=16 on all seven projections, random) through the admin
API, sends ``--clients`` x ``--requests`` completions (each to a random adapter or the
base, ``--max-tokens`` tokens, greedy, ``ignore_eos``) from threads with the official
openai client, unloads the adapters and stops the server with SIGTERM. Bounded: the
request count is fixed and the whole run stops after ``--deadline`` seconds.

Reports p50/p99 latency, tokens/s, errors (must be 0), and the server's RSS: after the
base is loaded and warm (baseline), with the adapters loaded, peak during the load, and
after unloading (target: within 5% of the baseline).

    python benchmarks/serve_load.py [--clients 8] [--requests 4] [--max-tokens 32] [--deadline 300]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import MODEL_ENV, git_rev, machine, median, model_note, write_section  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKEN = "bench-token"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _write_adapters(tmp: Path, n: int) -> list[Path]:
    from _common import load_bench_model

    import lorakit

    base, _ = load_bench_model("cpu")
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = lorakit.inject(
            base, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False), f"a{i}"
        )
        paths.append(lorakit.save_adapter(model, tmp, f"a{i}"))
        base = lorakit.unload(model)
    return paths


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=300.0, help="stop everything after this many seconds")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import openai

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _write_adapters(Path(tmp), 4)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        model = os.environ.get(MODEL_ENV)
        code = (
            f"from lorakit.serve import serve; serve({model!r}, port={port}, max_batch={args.max_batch}, "
            f"admin_token={TOKEN!r})"
        )
        log = open(Path(tmp) / "server.log", "w+")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        rss: dict[str, float] = {}
        try:
            while True:
                if proc.poll() is not None or time.monotonic() - start > args.deadline:
                    raise SystemExit(f"server did not come up:\n{Path(log.name).read_text()[-2000:]}")
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    time.sleep(0.5)
            base_id = client.models.list().data[0].id
            client.completions.create(model=base_id, prompt="warm up", max_tokens=4, temperature=0)
            rss["baseline (base loaded, warm)"] = _rss_mib(proc.pid)
            for i, path in enumerate(adapters):
                _post(f"{url}/load_lora_adapter", {"lora_name": f"a{i}", "lora_path": str(path)})
            names = [base_id] + [f"a{i}" for i in range(len(adapters))]
            for name in names:  # warm every adapter's path
                client.completions.create(model=name, prompt="warm up", max_tokens=2, temperature=0)
            rss["4 adapters loaded"] = _rss_mib(proc.pid)
            peak, stop = [0.0], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], _rss_mib(proc.pid))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            rng = random.Random(0)
            jobs = [
                (rng.choice(names), f"request {i}: tell me about {rng.choice(['cats', 'rain', 'maps'])}")
                for i in range(args.clients * args.requests)
            ]
            latencies, tokens, errors = [], [0], []

            def one(job):
                name, prompt = job
                if time.monotonic() - start > args.deadline:
                    errors.append("deadline")
                    return
                t0 = time.perf_counter()
                try:
                    resp = client.completions.create(
                        model=name,
                        prompt=prompt,
                        max_tokens=args.max_tokens,
                        temperature=0,
                        extra_body={"ignore_eos": True},
                    )
                except openai.OpenAIError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                latencies.append(time.perf_counter() - t0)
                tokens[0] += resp.usage.completion_tokens

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(one, jobs))
            wall = time.perf_counter() - t0
            stop.set()
            sampler.join()
            rss["peak during the load"] = peak[0]
            for i in range(len(adapters)):
                _post(f"{url}/unload_lora_adapter", {"lora_name": f"a{i}"})
            client.completions.create(model=base_id, prompt="after", max_tokens=2, temperature=0)
            time.sleep(1.0)
            rss["after unloading all 4"] = _rss_mib(proc.pid)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    back = rss["after unloading all 4"] / rss["baseline (base loaded, warm)"] - 1
    lines = [
        f"{machine()}; lorakit {git_rev()}; {model_note()}; 4 adapters r=16 on all seven projections, loaded and "
        f"unloaded through the admin API; {args.clients} clients x {args.requests} requests (random adapter or the "
        f"base), {args.max_tokens} tokens each, greedy, max_batch {args.max_batch}, loopback. Command: `python "
        f"benchmarks/serve_load.py --clients {args.clients} --requests {args.requests} --max-tokens {args.max_tokens}`",
        "",
        "| requests | errors | p50 latency | p99 latency | tokens/s |",
        "|---|---|---|---|---|",
        f"| {len(jobs)} | {len(errors)} | {median(lat):.2f} s | {p99:.2f} s | {tokens[0] / wall:.1f} |",
        "",
        "| server RSS | MiB |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in rss.items()],
        "",
        f"After unloading: {back * 100:+.1f}% of the baseline "
        f"(target within 5%: {'met' if abs(back) <= 0.05 else 'not met'}).",
    ]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors[:5])]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("serve_load", body)


if __name__ == "__main__":
    main()
