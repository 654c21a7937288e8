"""lorakit serve: the real server (uvicorn on a free loopback port) talked to with the official openai client."""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import weakref

import openai
import pytest
import torch
import uvicorn
from safetensors.torch import load_file, save_file
from tiny import make_tiny_model_dir

import lorakit
from lorakit.models import load_model
from lorakit.serve import AdapterRegistry, Engine, ServeLimits, create_app

TOKEN = "s3cret"
BASE_ID = "tiny"


def _save_adapter(model_dir, out, seed, r, targets):
    model, _ = load_model(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return lorakit.save_adapter(model, out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = make_tiny_model_dir(root / "tiny")
    return {
        "model": model_dir,
        "a": _save_adapter(model_dir, root / "a", 1, 4, ["q_proj", "v_proj", "down_proj"]),
        "b": _save_adapter(model_dir, root / "b", 2, 2, ["k_proj", "o_proj", "up_proj"]),
        "c": _save_adapter(model_dir, root / "c", 3, 8, ["q_proj", "gate_proj"]),
    }


class Server:
    """uvicorn in a thread on a pre-bound free loopback port; stopped by the test."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()
        self.sock.close()

    def raw(self, path, body, headers=None, method="POST"):
        """(status, parsed JSON) of a raw HTTP request: for bodies the openai client will not send."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def stack(files):
    model, tokenizer = load_model(files["model"])
    registry = AdapterRegistry(model, BASE_ID)
    registry.load("a", files["a"])
    registry.load("b", files["b"])
    engine = Engine(model, tokenizer, registry, max_batch=8)
    server = Server(create_app(engine, admin_token=TOKEN, limits=ServeLimits(max_request_bytes=20_000, max_tokens=400)))
    yield server, engine, registry, model, tokenizer
    server.stop()


@pytest.fixture(scope="module")
def reference(files):
    """Greedy answers from transformers' generate, one prompt at a time, each adapter on its own model copy."""
    cache = {}

    def answer(adapter, ids, max_tokens):
        if adapter not in cache:
            model, tok = load_model(files["model"])
            if adapter != BASE_ID:
                lorakit.load_adapter(model, files[adapter])
            cache[adapter] = (model, tok)
        model, tok = cache[adapter]
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        new = out[0, len(ids) :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        return tok.decode(new, skip_special_tokens=True)

    return answer


PROMPTS = ["hello there", "say abc", "the quick brown fox", "x"]


def test_models(stack, files):
    server, *_ = stack
    models = {m.id: m for m in server.client.models.list().data}
    assert list(models) == [BASE_ID, "a", "b"]
    a = models["a"].model_dump()
    assert a["parent"] == BASE_ID and a["owned_by"] == "lorakit"
    assert a["lora"]["r"] == 4 and a["lora"]["lora_alpha"] == 8
    assert sorted(a["lora"]["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert a["lora"]["sha256"] == hashlib.sha256((files["a"] / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("adapter", [BASE_ID, "a", "b"])
def test_completion_equals_generate(stack, reference, adapter):
    server, _, _, _, tok = stack
    for prompt in PROMPTS[:2]:
        resp = server.client.completions.create(model=adapter, prompt=prompt, max_tokens=12, temperature=0)
        ids = tok(prompt)["input_ids"]
        assert resp.choices[0].text == reference(adapter, ids, 12)
        assert (
            resp.usage.prompt_tokens == len(ids) and resp.usage.total_tokens == len(ids) + resp.usage.completion_tokens
        )
        assert resp.choices[0].finish_reason in ("stop", "length") and resp.model == adapter


def test_adapters_answer_differently(stack):
    server, *_ = stack
    texts = {
        m: server.client.completions.create(model=m, prompt="hello", max_tokens=10, temperature=0).choices[0].text
        for m in (BASE_ID, "a", "b")
    }
    assert len(set(texts.values())) == 3, texts  # an adapter is never silently the base


def test_chat_stream_equals_non_stream(stack):
    server, *_ = stack
    messages = [{"role": "user", "content": "say abc"}]
    whole = server.client.chat.completions.create(model="a", messages=messages, max_tokens=15, temperature=0)
    chunks = list(
        server.client.chat.completions.create(
            model="a",
            messages=messages,
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    stream = list(server.client.completions.create(model="b", prompt="hello", max_tokens=9, temperature=0, stream=True))
    plain = server.client.completions.create(model="b", prompt="hello", max_tokens=9, temperature=0)
    assert "".join(c.choices[0].text for c in stream) == plain.choices[0].text


def test_sse_ends_with_done(stack):
    server, *_ = stack
    req = urllib.request.Request(
        server.url + "/v1/completions",
        method="POST",
        data=json.dumps({"model": "a", "prompt": "hi", "max_tokens": 3, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_concurrent_requests_equal_one_at_a_time(stack):
    server, *_ = stack
    jobs = [
        (m, p, n)
        for m, p, n in zip([BASE_ID, "a", "b", "a", "b", BASE_ID, "a", "b"], PROMPTS * 2, [5, 17, 9, 30, 3, 12, 8, 21])
    ]

    def run(job):
        m, p, n = job
        return server.client.completions.create(model=m, prompt=p, max_tokens=n, temperature=0).choices[0].text

    alone = [run(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone


def test_seeded_sampling_is_per_request(stack):
    server, *_ = stack

    def run(seed, model="a"):
        return (
            server.client.completions.create(
                model=model, prompt="hello", max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    alone = run(7)
    assert run(7) == alone and run(8) != alone
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: run(*s), [(7, "a"), (1, "b"), (7, "a"), (2, BASE_ID)]))
    assert results[0] == results[2] == alone


def test_stop_strings(stack):
    server, *_ = stack
    full = server.client.completions.create(model="a", prompt="hello", max_tokens=20, temperature=0).choices[0]
    stop = full.text[4:6]
    assert len(stop) == 2 and stop in full.text
    cut = server.client.completions.create(model="a", prompt="hello", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(
        model="a", prompt="hello", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_short_request_does_not_wait_for_long_one(stack):
    server, *_ = stack
    done, started = {}, threading.Event()

    def long():
        for _ in server.client.completions.create(
            model="a", prompt="x", max_tokens=400, temperature=0.8, seed=1, stream=True, extra_body={"ignore_eos": True}
        ):
            started.set()
        done["long"] = time.monotonic()

    thread = threading.Thread(target=long)
    thread.start()
    assert started.wait(30)
    server.client.completions.create(model="b", prompt="y", max_tokens=3, temperature=0)
    done["short"] = time.monotonic()
    thread.join(120)
    assert done["short"] < done["long"]


def test_errors(stack, files):
    server, *_ = stack
    client = server.client
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    err = exc.value.body
    assert "nope" in err["message"] and "tiny, a, b" in err["message"] and err["code"] == "model_not_found"
    assert set(err) == {"message", "type", "param", "code"}
    status, body = server.raw("/v1/completions", b'{"model": "a", "prompt": ')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = server.raw("/v1/completions", {"model": "a"})
    assert status == 422 and body["error"]["param"] == "prompt"
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.completions.create(model="a", prompt="hi", temperature=5)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.completions.create(model="a", prompt="hi", n=2)
    assert exc.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="a", prompt="word " * 120, max_tokens=2)  # 600 tokens > 512
    assert exc.value.body["code"] == "context_length_exceeded" and "512" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="a", prompt="hi", max_tokens=401)
    assert exc.value.body["param"] == "max_tokens"
    status, body = server.raw("/v1/completions", {"model": "a", "prompt": "x" * 30_000})
    assert status == 413 and "error" in body
    status, body = server.raw("/v1/nothing", {})
    assert status == 404 and "error" in body
    # the server keeps serving everyone
    assert client.completions.create(model="a", prompt="hi", max_tokens=2, temperature=0).choices[0].text is not None


def _mismatched(files, tmp_path):
    """Adapter a with its keys under another prefix (the vLLM wrong-prefix failure)."""
    out = tmp_path / "wrong"
    out.mkdir()
    tensors = load_file(files["a"] / "adapter_model.safetensors")
    save_file(
        {k.replace(".model.layers.", ".model.decoder.layers."): v for k, v in tensors.items()},
        out / "adapter_model.safetensors",
    )
    (out / "adapter_config.json").write_text((files["a"] / "adapter_config.json").read_text())
    return out


def layer_c_is_inference(model):
    """Weights loaded on the engine thread must be ordinary tensors (usable outside inference mode)."""
    return any(p.is_inference() for n, p in model.named_parameters() if ".c." in n)


def test_admin_load_unload_and_errors(stack, files, tmp_path):
    server, engine, registry, model, _ = stack
    client = server.client
    load = {"lora_name": "c", "lora_path": str(files["c"])}
    status, body = server.raw("/v1/load_lora_adapter", load)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = server.raw("/v1/load_lora_adapter", load, {"Authorization": "Bearer wrong"})
    assert status == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body = server.raw(
        "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(_mismatched(files, tmp_path))}, auth
    )
    assert status == 422 and "model.decoder.layers" in body["error"]["message"], body
    assert "bad" not in [m.id for m in client.models.list().data]
    status, body = server.raw("/v1/load_lora_adapter", load, auth)
    assert status == 200, body
    assert [m.id for m in client.models.list().data] == [BASE_ID, "a", "b", "c"]
    jobs = [("c", 9), ("a", 5), ("b", 7), ("c", 4)]  # the loaded adapter in mixed decoding steps

    def run(job):
        return client.completions.create(model=job[0], prompt="hi", max_tokens=job[1], temperature=0).choices[0].text

    alone = [run(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(run, jobs)) == alone
    assert not layer_c_is_inference(model)
    status, _ = server.raw("/v1/load_lora_adapter", load, auth)
    assert status == 400  # the name is taken

    # unload while a request uses it: the request finishes, new ones get 404, then the weights are freed
    layer = model.model.layers[0].self_attn.q_proj
    weight = weakref.ref(layer.lora_A["c"].weight)
    stream = client.completions.create(model="c", prompt="x", max_tokens=200, temperature=0.7, seed=3, stream=True)
    first = next(iter(stream))
    status, body = server.raw("/v1/unload_lora_adapter", {"lora_name": "c"}, auth)
    assert status == 200 and body["running_requests"] == 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="hi", max_tokens=2)
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason in ("stop", "length") and first.choices
    deadline = time.monotonic() + 10
    while weight() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert weight() is None, "the unloaded adapter's weights must be freed"
    assert "c" not in lorakit.list_adapters(model) and "c" not in layer.lora_A
    status, _ = server.raw("/v1/unload_lora_adapter", {"lora_name": "c"}, auth)
    assert status == 404


def test_mismatched_adapter_refused_at_load(files, tmp_path):
    model, _ = load_model(files["model"])
    registry = AdapterRegistry(model, BASE_ID)
    with pytest.raises(lorakit.ModelMismatchError, match="model.decoder.layers"):
        registry.load("bad", _mismatched(files, tmp_path))
    assert registry.names() == [BASE_ID] and lorakit.list_adapters(model) == []


def test_admin_off_without_token(files):
    model, tokenizer = load_model(files["model"])
    server = Server(create_app(Engine(model, tokenizer, AdapterRegistry(model, BASE_ID))))
    try:
        status, body = server.raw(
            "/v1/load_lora_adapter",
            {"lora_name": "c", "lora_path": str(files["c"])},
            {"Authorization": f"Bearer {TOKEN}"},
        )
        assert status == 404 and "--admin-token" in body["error"]["message"]
    finally:
        server.stop()


def test_log_line_per_request(stack, caplog):
    server, *_ = stack
    with caplog.at_level("INFO", logger="lorakit.serve"):
        server.client.completions.create(
            model="b", prompt="hi", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        deadline = time.monotonic() + 5
        while not any("adapter=b" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.02)
    line = next(r.getMessage() for r in caplog.records if "adapter=b" in r.getMessage())
    assert "completion_tokens=4" in line and "latency=" in line


def test_sigterm_finishes_running_requests(files):
    """`lorakit serve` as a process: SIGTERM mid-stream lets the stream finish, then the process exits cleanly."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = ["-m", "lorakit", "serve", "--model", str(files["model"]), "--adapter", f"a={files['a']}"]
    proc = subprocess.Popen(
        [sys.executable, *command, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.2)
        stream = client.completions.create(
            model="a", prompt="x", max_tokens=300, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(60) == 0
        output = proc.stdout.read()
        assert "adapter=a" in output and "completion_tokens=300" in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "nameonly"], "NAME=PATH"),
        (["--adapter", "a=x", "--adapter", "a=y"], "given twice"),
        (["--port", "70000"], "--port"),
    ],
)
def test_cli_serve_bad_arguments(args, message, capsys):
    from lorakit.cli import main

    assert main(["serve", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_serve_refuses_an_adapter_that_does_not_fit(files, tmp_path, capsys):
    from lorakit.cli import main

    code = main(["serve", "--model", str(files["model"]), "--adapter", f"bad={_mismatched(files, tmp_path)}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.decoder.layers" in err and "match no module" in err


def test_sliding_window_models_are_refused():
    """The engine pads and slices the KV cache by hand: a sliding-window cache would be wrong, so it is refused."""
    from tiny import make_tokenizer
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(
        MistralConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=8,
        )
    )
    with pytest.raises(lorakit.ConfigError, match="DynamicSlidingWindowLayer"):
        Engine(model, make_tokenizer(), AdapterRegistry(model, "m"))


def test_adapter_of_a_wider_base_is_refused_naming_the_tensors(files, tmp_path):
    """Same module names, other shapes (a base with hidden 48): every tensor that does not fit is named."""
    wide = make_tiny_model_dir(tmp_path / "wide", hidden=48)
    adapter = _save_adapter(wide, tmp_path / "wide_adapter", 1, 4, ["q_proj", "v_proj"])
    model, _ = load_model(files["model"])
    with pytest.raises(lorakit.ModelMismatchError, match=r"shape mismatch for .*7 more tensor\(s\) do not fit"):
        AdapterRegistry(model, BASE_ID).load("wide", adapter)
    assert lorakit.list_adapters(model) == []


def test_serve_quantize_int8(files, tmp_path):
    """`lorakit serve --quantize int8`: the base's Linears and head int8, adapters unmerged on top, mixed batches
    decode; an adapter that adapts the int8 head is refused at load with a clear error."""
    from lorakit.int8 import Int8Linear, int8_support
    from lorakit.int8_head import Int8Head
    from lorakit.serve import build_app

    if int8_support() is not None:
        pytest.skip(f"no int8 kernels: {int8_support()}")
    loaded = load_model(files["model"])
    model = loaded[0]
    app = build_app(files["model"], {"a": files["a"], "b": files["b"]}, loaded=loaded, quantize="int8")
    assert isinstance(model.lm_head, Int8Head)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, Int8Linear)  # adapter a wraps it
    server = Server(app)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # one mixed batch: a, b and the base
            futures = [
                pool.submit(server.client.completions.create, model=m, prompt="say abc", max_tokens=6, temperature=0)
                for m in ("a", "b", BASE_ID)
            ]
            outs = [f.result() for f in futures]
        assert all(o.usage.completion_tokens >= 1 for o in outs)
        status, body = server.raw("/v1/models", b"", method="GET")
        assert status == 200 and {m["id"] for m in body["data"]} == {BASE_ID, "a", "b"}
    finally:
        server.stop()
    head_adapter = _save_adapter(files["model"], tmp_path / "h", 4, 2, ["lm_head"])
    registry = AdapterRegistry(model, BASE_ID)
    with pytest.raises(lorakit.ConfigError, match="output head .* int8 weights"):
        registry.load("h", head_adapter)
