"""jaxgpt serve through the official openai client and raw HTTP, against independent
references: `jaxgpt.generate` token for token (greedy, and seeded sampling row for row),
GPT-2's tokenizer for text, and `model.forward` for logprobs."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from jaxgpt import decode, hf, load, model  # noqa: E402
from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.generate import generate  # noqa: E402
from jaxgpt.serve import api  # noqa: E402
from jaxgpt.serve import engine as engine_mod  # noqa: E402
from jaxgpt.serve.engine import Engine, QueueFull, Sequence  # noqa: E402

# A context of 512 gives two ring sizes (256, 512), and prompts past 256 tokens are
# prefilled in two chunks.
CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=512, vocab_size=50257, dropout=0.0, bias=True)
SLOTS = 4
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
PROMPTS = ["Hello, my name is", "The capital of France", " 1 2 3 4", "O Romeo, Romeo! wherefore art thou Romeo?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-2 with random weights far from the init, so greedy text is varied."""
    params = model.init_params(CFG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    path = tmp_path_factory.mktemp("serve") / "tiny-gpt2"
    hf.save_hf(CFG, params, path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load.load_model(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, loaded):
    """The app on a real port, in this process (so tests can read the engine)."""
    cfg, params, tok = loaded
    engine = Engine(params, cfg, slots=SLOTS, max_queue=16)
    engine.start()
    engine.ready.wait()
    port = _free_port()
    app = api.create_app(engine, tok, model_dir.name, api.chat_template(model_dir))
    srv = uvicorn.Server(api.server_config(app, "127.0.0.1", port, max_connections=64))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "app": app, "model": model_dir.name}
    srv.should_exit = True
    thread.join()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def _greedy(loaded, prompts: list[list[int]], n: int) -> list[str]:
    cfg, params, tok = loaded
    out = generate(params, cfg, prompts, n, temperature=0, stop_tokens=[tok.eot_token])
    return [tok.decode([t for t in row if t != tok.eot_token]) for row in out]


def test_completions_equal_generate(server, client, loaded):
    cfg, params, tok = loaded
    long_prompt = tok.encode(" ".join(f"word{i}" for i in range(120)))[:300]  # two prefill chunks
    ids = [tok.encode(p) for p in PROMPTS]
    expected = _greedy(loaded, ids + [long_prompt], 24)
    assert len(set(expected)) == len(expected) and all(expected)

    r = client.completions.create(model=server["model"], prompt=PROMPTS, max_tokens=24, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected[:4]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 4 * 24
    assert {c.finish_reason for c in r.choices} == {"length"}

    r = client.completions.create(model=server["model"], prompt=long_prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == expected[4]

    stream = client.completions.create(model=server["model"], prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                       stream=True, echo=True)
    assert "".join(c.choices[0].text for c in stream) == PROMPTS[0] + expected[0]


def test_short_prompts_are_prefilled_in_shared_calls():
    """The prefill plan covers every prompt once, in a bucket that holds it, in calls of an
    allowed row count within the token cap; prompts of one bucket share calls."""
    buckets = engine_mod.short_buckets(1024)
    assert buckets == [16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert engine_mod.short_buckets(64) == [16, 24, 32, 48, 64]
    rng = np.random.default_rng(0)
    lengths = [0, 1, 16, 17, 255, 256] + rng.integers(1, 257, size=40).tolist()
    calls = engine_mod._prefill_calls(lengths, buckets)
    assert sorted(i for _, idx in calls for i in idx) == list(range(len(lengths)))
    for L, idx in calls:
        assert len(idx) in engine_mod.PREFILL_ROWS and (len(idx) == 1 or len(idx) * L <= engine_mod.PREFILL_TOKENS)
        assert all(engine_mod._bucket(max(lengths[i], 1), buckets) == L for i in idx)
    sixteen = engine_mod._prefill_calls([20] * 16 + [100] * 5, buckets)
    assert [(L, len(idx)) for L, idx in sixteen] == [(128, 4), (128, 1), (24, 16)]


def test_seeded_sampling_alone_equals_mixed_and_generate(server, client, loaded):
    cfg, params, tok = loaded
    kw = dict(model=server["model"], prompt=PROMPTS[3], max_tokens=16, temperature=0.9, top_p=0.9, seed=1234, n=2,
              extra_body={"top_k": 50})  # top_k is no OpenAI parameter: the client sends it as an extra
    alone = client.completions.create(**kw)
    rows = generate(params, cfg, [tok.encode(PROMPTS[3])] * 2, 16, temperature=0.9, top_k=50, top_p=0.9, seed=1234,
                    stop_tokens=[tok.eot_token])
    expected = [tok.decode([t for t in row if t != tok.eot_token]) for row in rows]
    assert [c.text for c in sorted(alone.choices, key=lambda c: c.index)] == expected
    assert expected[0] != expected[1]

    async def mixed():
        async with openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="unused") as aclient:
            others = [aclient.completions.create(model=server["model"], prompt=p, max_tokens=30, temperature=1.0)
                      for p in PROMPTS]
            mine = aclient.completions.create(**kw)
            return (await asyncio.gather(*others, mine))[-1]

    together = asyncio.run(mixed())
    assert [c.text for c in sorted(together.choices, key=lambda c: c.index)] == expected


def test_concurrent_load(server, loaded):
    """64 requests, 16 at a time, on 4 slots: every response is generate's greedy text."""
    cfg, params, tok = loaded
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50000, size=int(rng.integers(1, 40))).tolist() for _ in range(64)]
    expected = _greedy(loaded, prompts, 12)

    async def run():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as http:
            async def one(p):
                async with limit:
                    r = await http.post("/v1/completions", json={"model": server["model"], "prompt": p,
                                                                 "max_tokens": 12, "temperature": 0})
                    return r.json()["choices"][0]["text"]

            return await asyncio.gather(*map(one, prompts))

    assert asyncio.run(run()) == expected


def _sse_events(raw: bytes) -> list:
    assert raw.endswith(b"data: [DONE]\n\n")
    frames = raw.decode().split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: ") and "\n" not in f for f in frames[:-2])
    return [json.loads(f[len("data: "):]) for f in frames[:-2]]


def test_raw_sse_framing_and_usage(server, loaded):
    expected = _greedy(loaded, [loaded[2].encode(PROMPTS[1])], 10)[0]
    body = {"model": server["model"], "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    events = _sse_events(raw)
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10


def test_stop_string_split_across_tokens_never_leaks(server, client, loaded):
    tok = loaded[2]
    rows = generate(loaded[1], loaded[0], [tok.encode(PROMPTS[0])], 30, temperature=0)[0]
    pieces = [tok.decode([t]) for t in rows]
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]  # starts inside token k, ends inside token k + 1
    full = "".join(pieces)
    expected = full[: full.index(stop)]
    kw = dict(model=server["model"], prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop, "\x00never"])
    r = client.completions.create(**kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True)]
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_utf8_never_splits():
    """Characters that GPT-2's BPE spreads over several tokens come out whole, one token at a time."""
    from jaxgpt.tokenizer import get_tokenizer

    tok = get_tokenizer("gpt2")
    text = "naïve café — 世界 🙂🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters take several tokens
    t = api._Text(tok, stops=["🙂 o"])
    deltas = [t.add([i]) for i in ids] + [t.finish()]
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) == text[: text.index("🙂 o")] and t.stopped


def test_chat_completions(server, client, loaded):
    tok = loaded[2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    prompt = "system: Be brief.\nuser: Say hi\nassistant:"
    expected = _greedy(loaded, [tok.encode(prompt)], 12)[0]
    r = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=12,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_chat_without_template_is_a_clear_400(server, loaded):
    cfg, params, tok = loaded
    app = api.create_app(server["engine"], tok, server["model"], template=None)  # never started: no lifespan
    transport = httpx.ASGITransport(app=app)

    async def post():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/v1/chat/completions", json={
                "model": server["model"], "messages": [{"role": "user", "content": "hi"}]})

    r = asyncio.run(post())
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_logprobs_equal_the_model(server, client, loaded):
    cfg, params, tok = loaded
    prompt = tok.encode(PROMPTS[2])
    r = client.completions.create(model=server["model"], prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    new = generate(params, cfg, [prompt], 6, temperature=0)[0]
    logits = model.forward(params, np.array([prompt + new], np.int32), cfg)[0]
    ref = jax.nn.log_softmax(logits, axis=-1)[len(prompt) - 1 : -1]
    assert lp.tokens == [tok.decode([t]) for t in new]
    np.testing.assert_allclose(lp.token_logprobs, [float(ref[i, t]) for i, t in enumerate(new)], atol=1e-4)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert all(max(top.values()) == pytest.approx(v, abs=1e-5) for top, v in zip(lp.top_logprobs, lp.token_logprobs))


@pytest.mark.parametrize("body, status, needle", [
    (b'{"model": "x", "prompt": ', 400, "not valid JSON"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "hi " * 600}, 400, "context is 512"),
    ({"prompt": "hi", "max_tokens": 600}, 400, "at most"),
    ({"prompt": []}, 400, "empty"),
    ({"prompt": [50257]}, 400, "outside"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    (b"{" + b" " * (5 * 2**20) + b"}", 413, "over the limit"),
])
def test_bad_requests_get_one_clear_error(server, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps({"model": server["model"]} | body).encode()
    r = httpx.post(server["url"] + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"]
    assert httpx.get(server["url"] + "/health").status_code == 200  # still serving


def test_queue_full_is_503_and_nothing_else_is_hurt(server, client, loaded):
    engine = server["engine"]
    expected = _greedy(loaded, [loaded[2].encode(PROMPTS[0])], 300)[0]
    stream = client.completions.create(model=server["model"], prompt=PROMPTS[0], max_tokens=300, temperature=0,
                                       stream=True)
    first = next(iter(stream)).choices[0].text
    hogs = []

    def fill():  # until the queue refuses one more
        try:
            while True:
                hogs.append(Sequence([1, 2, 3], 400, lambda kind, payload: None, temperature=0))
                engine.submit(hogs[-1:])
        except QueueFull:
            pass

    try:
        for _ in range(5):  # a slot freed between the last fill and the POST makes room: again
            fill()
            while engine.active < SLOTS:  # the free slots take hogs from the queue ...
                time.sleep(0.01)
            fill()  # ... and it fills again
            r = httpx.post(server["url"] + "/v1/completions", json={"model": server["model"], "prompt": "hi",
                                                                   "max_tokens": 1})
            if r.status_code == 503:
                break
    finally:
        engine.cancel(hogs)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    assert first + "".join(c.choices[0].text for c in stream) == expected
    again = client.completions.create(model=server["model"], prompt=PROMPTS[0], max_tokens=300, temperature=0)
    assert again.choices[0].text == expected


def test_disconnect_frees_the_slot(server):
    engine = server["engine"]
    body = {"model": server["model"], "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_raw())
        assert engine.active == 1
    deadline = time.time() + 5
    while engine.active and time.time() < deadline:
        time.sleep(0.02)
    assert engine.active == 0


@pytest.mark.parametrize("length, module, name", [(5, decode, "insert"), (300, decode, "insert"),
                                                   (300, decode, "init_cache")], ids=["short", "long", "long-start"])
def test_a_failed_insert_fails_its_sequence(server, monkeypatch, length, module, name):
    """A sequence taken from the queue whose insertion into the batch cache (or the start of
    its chunked prefill) raises ends with an error event (its client is told), not silence;
    the engine serves on."""
    import queue

    real = getattr(module, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    events = queue.Queue()
    server["engine"].submit([Sequence(list(range(1, length + 1)), 4, lambda kind, payload: events.put((kind, payload)),
                                      temperature=0)])
    kind, payload = events.get(timeout=60)
    assert kind == "error" and "injected" in payload
    r = httpx.post(server["url"] + "/v1/completions", json={"model": server["model"], "prompt": "hi",
                                                          "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _raw_http(url: str, data: list[bytes], timeout: float = 30) -> bytes:
    """Sends `data` piece by piece on one raw connection, then reads until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            for piece in data:
                sock.sendall(piece)
        except OSError:  # the server answered and closed before the body's end: read the answer
            pass
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_body_limit_is_enforced_while_reading(server):
    """A body past the limit is refused from its Content-Length before any of it arrives,
    and a chunked one as soon as the limit passes: neither is read to its end first."""
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    declared = _raw_http(server["url"], [(head + f"Content-Length: {10**12}\r\n\r\n").encode()])
    chunk = b"%x\r\n%s\r\n" % (2**20, b" " * 2**20)
    chunked = _raw_http(server["url"], [(head + "Transfer-Encoding: chunked\r\n\r\n").encode()] + [chunk] * 5)
    for answer in (declared, chunked):  # neither body ever ends: only a limit enforced while reading answers
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def test_tokenizing_runs_off_the_event_loop(server, loaded, monkeypatch):
    """While a prompt is being tokenized (or a chat template rendered and tokenized), other
    requests are served: the event loop is not the thread that does it."""
    tok = loaded[2]
    encode, entered, release = tok.encode, threading.Event(), threading.Event()

    def slow_encode(self, text, *args, **kwargs):
        if "BLOCK" in text:
            entered.set()
            release.wait(30)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "encode", slow_encode)  # a frozen dataclass: patched on its class
    messages = [{"role": "user", "content": "BLOCK"}]
    for path, body, prompt in [("/v1/completions", {"prompt": "BLOCK me"}, "BLOCK me"),
                               ("/v1/chat/completions", {"messages": messages}, "user: BLOCK\nassistant:")]:
        entered.clear()
        release.clear()
        answer = {}
        body = {"model": server["model"], "max_tokens": 5, "temperature": 0} | body
        thread = threading.Thread(target=lambda: answer.update(r=httpx.post(server["url"] + path, json=body,
                                                                              timeout=60)))
        thread.start()
        try:
            assert entered.wait(30)
            assert httpx.get(server["url"] + "/health", timeout=10).status_code == 200  # while it tokenizes
        finally:
            release.set()
            thread.join()
        r = answer["r"].json()
        text = r["choices"][0]["text"] if "text" in r["choices"][0] else r["choices"][0]["message"]["content"]
        assert text == _greedy(loaded, [encode(prompt)], 5)[0]


def test_non_streaming_disconnect_frees_the_slot(server):
    """A client of a non-streaming request that goes away frees its slot at once: its
    sequence is cancelled long before max_tokens."""
    engine = server["engine"]
    body = json.dumps({"model": server["model"], "prompt": "Once upon a time", "max_tokens": 480,
                       "temperature": 0}).encode()
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 30
        while not (seqs := [s for s in engine.rows if s is not None]) and time.time() < deadline:
            time.sleep(0.001)
    (seq,) = seqs
    deadline = time.time() + 30
    while engine.active and time.time() < deadline:
        time.sleep(0.01)
    assert engine.active == 0 and seq.cancelled and seq.generated < seq.max_tokens


def test_more_sequences_than_the_queue_holds_is_a_400(server):
    """prompts x n past --queue-size could never be queued: 400 saying so, not 503 forever."""
    r = httpx.post(server["url"] + "/v1/completions", json={"model": server["model"], "prompt": ["a", "b"], "n": 9,
                                                           "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences"
    assert "18 sequences" in r.json()["error"]["message"] and "(16)" in r.json()["error"]["message"]


def test_a_startup_failure_ends_serve_with_one_line(model_dir, monkeypatch):
    """A failure while compiling (here injected; out of memory is one) ends `serve` with a
    UserError naming it, which the CLI prints as one line, instead of waiting forever."""
    from jaxgpt import serve
    from jaxgpt.errors import UserError

    def fail(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmany more lines")

    monkeypatch.setattr(decode, "prefill", fail)
    raised = []

    def run():
        try:
            serve.serve(str(model_dir), port=_free_port(), slots=1)
        except UserError as e:
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive() and len(raised) == 1
    assert str(raised[0]) == ("compiling for 1 slots failed (RuntimeError: RESOURCE_EXHAUSTED: out of memory): "
                              "try fewer --slots, or --debug for the whole error")


@pytest.fixture(scope="module")
def guarded(server, loaded):
    """A second server over the same engine, as `jaxgpt serve --api-key KEY --max-connections 2` runs it."""
    app = api.create_app(server["engine"], loaded[2], server["model"], api_key="s3cret")
    config = api.server_config(app, "127.0.0.1", _free_port(), max_connections=2)
    config.lifespan = "off"  # the engine is the other server's
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}"
    srv.should_exit = True
    thread.join()


def test_api_key(guarded, server):
    body = {"model": server["model"], "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.post(guarded + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                      "param": None, "code": "invalid_api_key"}}
    with openai.OpenAI(base_url=guarded + "/v1", api_key="s3cret", max_retries=0) as client:
        assert client.completions.create(**body).usage.completion_tokens == 2
    with openai.OpenAI(base_url=guarded + "/v1", api_key="wrong", max_retries=0) as client, \
            pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert httpx.get(guarded + "/health").status_code == 200  # probes need no key, as vLLM's


def test_connection_limit_and_slow_clients(guarded, monkeypatch):
    """Past --max-connections a new connection gets 503; a client that sends its headers or
    its body too slowly is cut off (timeouts shortened here), and then others get in."""
    host, port = guarded.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        assert httpx.get(guarded + "/health").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    assert httpx.get(guarded + "/health").status_code == 200
    monkeypatch.setattr(api, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(api, "BODY_TIMEOUT_S", 0.5)
    assert _raw_http(guarded, [b"GET /health HTTP/1.1\r\nHost: x\r\n"]) == b""  # closed, no answer
    slow_body = _raw_http(guarded, [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                                    b"Content-Length: 100\r\nConnection: close\r\n\r\n{"])
    assert slow_body.startswith(b"HTTP/1.1 408") and b"request_timeout" in slow_body
    assert httpx.get(guarded + "/health").status_code == 200


def test_health_models_metrics(server, client, loaded):
    """/metrics counts what a request did: its tokens, one first token, and no slot or
    queue entry left; the gauges are the engine's."""
    assert [m.id for m in client.models.list().data] == [server["model"]]

    def scrape():
        text = httpx.get(server["url"] + "/metrics").text
        return {name: _metric(text, name) for name in (
            "jaxgpt_queue_depth", "jaxgpt_active_slots", "jaxgpt_decode_slots", "jaxgpt_tokens_per_second",
            "jaxgpt_generated_tokens_total", "jaxgpt_time_to_first_token_seconds_count")}

    before = scrape()
    ids = loaded[2].encode(PROMPTS[1])
    r = client.completions.create(model=server["model"], prompt=ids, max_tokens=7, temperature=0, n=2)
    after = scrape()
    assert r.usage.completion_tokens == 14 == after["jaxgpt_generated_tokens_total"] - before[
        "jaxgpt_generated_tokens_total"]
    assert after["jaxgpt_time_to_first_token_seconds_count"] - before["jaxgpt_time_to_first_token_seconds_count"] == 1
    assert (after["jaxgpt_active_slots"], after["jaxgpt_queue_depth"], after["jaxgpt_decode_slots"]) == (0, 0, SLOTS)
    assert after["jaxgpt_tokens_per_second"] > 0  # of the last decode chunk, which made tokens
    health = httpx.get(server["url"] + "/health").json()
    assert health == {"status": "ok", "active_slots": 0, "queue_depth": 0}
    assert httpx.get(server["url"] + "/v2/nothing").json()["error"]["code"] == "not_found"


def test_sigterm_drains_in_flight_requests(model_dir, loaded):
    """`jaxgpt serve` in a subprocess: SIGTERM mid-stream, the stream still ends whole."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.cli", "serve", "--init-from", str(model_dir),
                             "--port", str(port), "--slots", str(SLOTS)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        assert any("compiled" in s for s in lines), lines
        expected = _greedy(loaded, [loaded[2].encode(PROMPTS[0])], 480)[0]
        body = {"model": model_dir.name, "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "stream": True}
        url = f"http://127.0.0.1:{port}"
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            chunks = r.iter_raw()
            raw = next(chunks)
            proc.send_signal(signal.SIGTERM)
            refused = False
            for _ in range(100):  # no new connections while it drains
                try:
                    httpx.get(url + "/health")
                except httpx.ConnectError:
                    refused = True
                    break
                except (httpx.ReadError, httpx.RemoteProtocolError):  # accepted just as the listener closed
                    pass
                time.sleep(0.01)
            assert refused
            raw += b"".join(chunks)
        text = "".join(e["choices"][0]["text"] for e in _sse_events(raw))
        assert text == expected
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        proc.kill()


@pytest.mark.parametrize("argv, needle", [
    (["--out-dir", "/nonexistent/run"], "/nonexistent/run"),
    (["--init-from", "/nonexistent/hf", "--port", "PORT"], "cannot listen"),
])
def test_serve_cli_errors(server, argv, needle):
    port = server["url"].rsplit(":", 1)[1]  # taken by the test server
    argv = [port if a == "PORT" else a for a in argv]
    r = subprocess.run([sys.executable, "-m", "jaxgpt.cli", "serve", *argv], capture_output=True, text=True,
                       env=os.environ)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert needle in r.stderr


def test_engine_serves_modern_architectures():
    """Rope, RMSNorm, grouped-query attention (a cache with fewer heads), SwiGLU and an untied
    head go through the engine unchanged: greedy and seeded rows equal generate's."""
    import queue

    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, vocab_size=97, bias=False,
                    pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, logit_softcap=15.0)
    params = model.init_params(cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    engine = Engine(params, cfg, slots=2)
    engine.start()
    engine.ready.wait()
    prompts = [[5, 6, 7], list(range(1, 40)), [9] * 20]
    outs = [queue.Queue() for _ in range(4)]
    seqs = [Sequence(p, 20, lambda k, payload, q=q: q.put((k, payload)), temperature=0)
            for p, q in zip(prompts, outs)]
    seqs.append(Sequence(prompts[0], 20, lambda k, payload: outs[3].put((k, payload)), temperature=1.0, top_k=20,
                         seed=3, row=1))
    try:
        engine.submit(seqs)
        got = []
        for q in outs:
            ids = []
            while (event := q.get(timeout=60))[0] == "tokens":
                ids += event[1][0]
            got.append(ids)
    finally:
        engine.stop()
    assert got[:3] == generate(params, cfg, prompts, 20, temperature=0)
    assert got[3] == generate(params, cfg, [prompts[0]] * 2, 20, temperature=1.0, top_k=20, seed=3)[1]


def test_engine_decodes_bfloat16_weights():
    """serve --dtype bfloat16: a greedy request alone in the engine (one row, decoded with
    `model.matmul_T`) picks the argmax of the bfloat16 full forward at every step."""
    import queue

    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=97)
    leaves, tree = jax.tree.flatten(model.init_params(cfg, jax.random.key(0)))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [(x + 0.3 * jax.random.normal(k, x.shape)).astype("bfloat16")
                                       for x, k in zip(leaves, keys)])
    engine = Engine(params, cfg, slots=1)
    engine.start()
    engine.ready.wait()
    out, prompt = queue.Queue(), [5, 6, 7, 8]
    try:
        engine.submit([Sequence(prompt, 12, lambda k, payload: out.put((k, payload)), temperature=0)])
        new = []
        while (event := out.get(timeout=60))[0] == "tokens":
            new += event[1][0]
    finally:
        engine.stop()
    logits_TV = model.forward(params, np.array([prompt + new], np.int32), cfg)[0]
    assert np.argmax(np.asarray(logits_TV[len(prompt) - 1 : -1]), axis=-1).tolist() == new


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_soak(server, loaded):
    """About 15 s of mixed traffic from 12 clients at once on 4 slots and a queue of 16:
    streaming and not, n up to 2, seeds, stop strings, chat, clients that drop mid-stream,
    malformed and oversize bodies, and a queue that fills (503). Then: no other 5xx, every
    completed choice equals `jaxgpt.generate` for its seed (row i of its request), the
    metrics show no active slot and an empty queue, and this process (the server's) grew
    its resident memory by less than 10%."""
    cfg, params, tok = loaded
    url, name = server["url"], server["model"]
    done, statuses = [], []  # (request, the choices' texts) of each completed request

    def request(rng):
        # Few shapes for generate to compile below: n=2 with filters is compiled by the test above.
        n = int(rng.choice([1, 2]))
        kind = rng.choice(["greedy", "temperature", "filtered"], p=[0.4, 0.4, 0.2])
        n = 2 if kind == "filtered" else n
        body = {"model": name, "prompt": rng.integers(0, 50000, size=int(rng.integers(1, 16))).tolist(),
                "max_tokens": int(rng.integers(4, 17)), "n": n, "stream": bool(rng.integers(2))}
        body |= {"greedy": {"temperature": 0}, "temperature": {"temperature": 0.9, "seed": int(rng.integers(1000))},
                 "filtered": {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": int(rng.integers(1000))}}[kind]
        if rng.random() < 0.3:
            body["stop"] = ["e", "\n"]
        return body

    async def one(http, rng):
        roll = rng.random()
        if roll < 0.05:
            r = await http.post("/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code == 400
            return
        if roll < 0.08:
            r = await http.post("/v1/completions", content=b" " * (api.MAX_BODY_BYTES + 1))
            statuses.append(r.status_code)
            assert r.status_code == 413
            return
        body = request(rng)
        if roll < 0.2:  # drops mid-stream
            body |= {"stream": True, "max_tokens": 400}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                statuses.append(r.status_code)
                if r.status_code == 200:
                    async for _ in r.aiter_raw():
                        break
            return
        if roll < 0.3:  # chat, greedy: the template's prompt
            body |= {"temperature": 0}
            text = tok.decode(body.pop("prompt"))
            body["messages"] = [{"role": "user", "content": text}]
            body["prompt"] = tok.encode(f"user: {text}\nassistant:")
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        wire = {k: v for k, v in body.items() if not (k == "prompt" and path.endswith("chat/completions"))}
        if not body["stream"]:
            r = await http.post(path, json=wire)
            statuses.append(r.status_code)
            if r.status_code == 503:
                await asyncio.sleep(0.1)  # as Retry-After asks, shorter
            if r.status_code == 200:
                choices = sorted(r.json()["choices"], key=lambda c: c["index"])
                done.append((body, [c["text"] if "text" in c else c["message"]["content"] for c in choices]))
            return
        texts = [""] * body["n"]
        async with http.stream("POST", path, json=wire) as r:
            statuses.append(r.status_code)
            if r.status_code != 200:
                await asyncio.sleep(0.1)
                return
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    c = json.loads(line[6:])["choices"][0]
                    texts[c["index"]] += c.get("text") or c.get("delta", {}).get("content") or ""
        done.append((body, texts))

    async def soak(seconds):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            t_end = time.monotonic() + seconds

            async def client(k):
                crng = np.random.default_rng([27, k])
                while time.monotonic() < t_end:
                    await one(http, crng)

            await asyncio.gather(*(client(k) for k in range(12)))

    asyncio.run(soak(3))  # warm-up: what grows once (compiled code, pools) grows here
    rss0 = _rss_bytes()
    done.clear()
    asyncio.run(soak(15))
    rss1 = _rss_bytes()

    assert all(s in (200, 400, 413, 503) for s in statuses), sorted(set(statuses))
    assert statuses.count(503) > 0 and statuses.count(200) > 50  # the queue filled, and most were served
    deadline = time.time() + 30
    while time.time() < deadline:
        metrics = httpx.get(url + "/metrics").text
        if _metric(metrics, "jaxgpt_active_slots") == 0 and _metric(metrics, "jaxgpt_queue_depth") == 0:
            break
        time.sleep(0.1)
    assert _metric(metrics, "jaxgpt_active_slots") == 0 and _metric(metrics, "jaxgpt_queue_depth") == 0
    assert rss1 < 1.1 * rss0, (rss0, rss1)

    # Greedy rows do not depend on seed or row: all in one call, cut to each max_tokens.
    greedy = {tuple(b["prompt"]) for b, _ in done if b["temperature"] == 0}
    greedy = dict(zip(greedy, generate(params, cfg, [list(p) for p in greedy], 16, temperature=0,
                                       stop_tokens=[tok.eot_token])))
    for body, texts in done:
        if body["temperature"] == 0:
            rows = [greedy[tuple(body["prompt"])][: body["max_tokens"]]] * body["n"]
        else:
            rows = generate(params, cfg, [body["prompt"]] * body["n"], body["max_tokens"], body["temperature"],
                            body.get("top_k"), body.get("top_p"), body["seed"], stop_tokens=[tok.eot_token])
        expected = [tok.decode([t for t in row if t != tok.eot_token]) for row in rows]
        for s in body.get("stop", []):
            expected = [e[: e.index(s)] if s in e else e for e in expected]
        assert texts == expected, body
