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

from jaxgpt import hf, load, model  # noqa: E402
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
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
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


@pytest.mark.parametrize("length", [5, 300], ids=["short", "long"])
def test_a_failed_insert_fails_its_sequence(server, monkeypatch, length):
    """A sequence taken from the queue whose insertion into the batch cache raises ends with
    an error event (its client is told), not silence; the engine serves on."""
    import queue

    real = engine_mod._insert
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "_insert", failing)
    events = queue.Queue()
    server["engine"].submit([Sequence(list(range(1, length + 1)), 4, lambda kind, payload: events.put((kind, payload)),
                                      temperature=0)])
    kind, payload = events.get(timeout=60)
    assert kind == "error" and "injected" in payload
    r = httpx.post(server["url"] + "/v1/completions", json={"model": server["model"], "prompt": "hi",
                                                          "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_health_models_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [server["model"]]
    metrics = httpx.get(server["url"] + "/metrics").text
    for name in ("jaxgpt_queue_depth", "jaxgpt_active_slots", "jaxgpt_tokens_per_second",
                 "jaxgpt_time_to_first_token_seconds_bucket"):
        assert name in metrics
    count = next(line for line in metrics.splitlines() if line.startswith("jaxgpt_time_to_first_token_seconds_count"))
    assert float(count.split()[-1]) > 0
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
