"""The OpenAI-compatible HTTP side: FastAPI routes that turn requests into engine
sequences and engine tokens into OpenAI's JSON and server-sent events.

Nothing here touches JAX: the engine thread does, and talks back through
`loop.call_soon_threadsafe` into one asyncio queue per HTTP request. Text is decoded here,
bytes of a UTF-8 character that BPE spreads over tokens waiting for the rest, and stop
strings are cut here: text that may be the start of a stop string is held back until the
next token decides.
"""

import asyncio
import codecs
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Literal

import prometheus_client
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from jaxgpt.decode import TOP_LOGPROBS
from jaxgpt.serve.engine import Draining, Engine, QueueFull, Sequence

MAX_BODY_BYTES = 4 * 2**20  # a request body past this is refused (413) as soon as it is known to be
BODY_TIMEOUT_S = 30  # a request body must arrive within this (408), headers within HEADER_TIMEOUT_S
HEADER_TIMEOUT_S = 10  # else the connection is closed: slow clients (slowloris) cannot hold connections
KEEP_ALIVE_S = 5  # an idle connection is closed after this
LINGER_S = 2  # what a client still sends after its answer is read and dropped this long (see _LingeringTransport)
MAX_N = 16  # choices per request
RETRY_AFTER_S = 1  # what a client told the queue is full should wait


class ApiError(Exception):
    """An error response: OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = \
            status, message, param, code, kind, headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send extras); known ones must have their JSON type.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({err['msg']}): send a JSON object")
    param = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "str", "int")))
    return ApiError(400, f"{param or 'body'}: {err['msg']}", param=param or None)


def _too_large(declared: int | None) -> ApiError:
    what = f"is {declared:,} bytes, over" if declared is not None else "passes"
    return ApiError(413, f"the request body {what} the limit of {MAX_BODY_BYTES:,} bytes: "
                    "send shorter prompts or fewer of them", code="request_too_large")


async def _body(request: Request) -> bytes:
    """The body, refused as soon as it is known to pass MAX_BODY_BYTES (from Content-Length,
    else while it streams in), so that no large body is ever held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large(int(declared))
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise _too_large(None)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S} s: send it at once",
                       code="request_timeout") from None
    return bytes(body)


async def _parse(request: Request, cls):
    body = await _body(request)
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def chat_template(source: str | Path) -> str | None:
    """The Jinja chat template a run or Hugging Face directory carries: chat_template.jinja,
    or tokenizer_config.json's "chat_template" (transformers' two places); else None."""
    path = Path(source)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    config = path / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


class _Text:
    """One choice's text as its tokens arrive: never splits a UTF-8 character, cuts the
    text before the first stop string and never sends any part of one."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, ids: list[int]) -> str:
        """The text that can be sent now."""
        self.text += self.decoder.decode(self.tokenizer.decode_bytes(ids))
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.text, self.stopped, final = self.text[: min(hits)], True, True
        end = len(self.text)
        if not final:  # hold back a tail that may be the start of a stop string
            rest = self.text[self.sent:]
            end -= next((k for k in range(len(rest), 0, -1) if any(s.startswith(rest[-k:]) for s in self.stops)), 0)
        delta, self.sent = self.text[self.sent:end], end
        return delta


class _Job:
    """The sequences of one HTTP request and the queue their events come back on."""

    def __init__(self, state: "_State", prompts: list[list[int]], max_tokens: int, body, stops: list[str],
                 logprobs: int | None):
        self.state, self.prompts, self.logprobs = state, prompts, logprobs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        top_k = None if body.top_k in (None, -1, 0) else body.top_k
        top_p = None if body.top_p == 1.0 else body.top_p
        self.seqs, self.texts, self.prompt_of = [], [], []
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                i = len(self.seqs)
                emit = (lambda i: lambda kind, payload: loop.call_soon_threadsafe(
                    self.queue.put_nowait, (i, kind, payload)))(i)
                self.seqs.append(Sequence(prompt, max_tokens, emit, temperature=body.temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, row=i, logprobs=logprobs is not None,
                                          stop_token=state.tokenizer.eot_token))
                self.texts.append(_Text(state.tokenizer, stops))
                self.prompt_of.append(p)
        self.tokens = [0] * len(self.seqs)
        self.first_token_seen = False
        if len(self.seqs) > state.engine.max_queue:  # would get 503 forever
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={body.n} are {len(self.seqs)} sequences, more than "
                           f"this server queues ({state.engine.max_queue}): send fewer prompts or a smaller n",
                           param="n", code="too_many_sequences")
        try:
            state.engine.submit(self.seqs)
        except QueueFull:
            raise ApiError(503, f"the server is busy: {state.engine.max_queue} sequences wait already; "
                           f"retry after {RETRY_AFTER_S} s", kind="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except Draining:
            raise ApiError(503, "the server is shutting down: send the request to another instance",
                           kind="server_error", code="shutting_down") from None

    async def events(self, request: Request):
        """(choice, text delta, logprobs, finish reason or None) until every choice ends; a
        client that goes away cancels the rest before the engine's next decode chunk."""
        open_ = set(range(len(self.seqs)))
        watcher = asyncio.create_task(self._watch(request))
        try:
            while open_:
                i, kind, payload = await self.queue.get()
                if kind == "disconnected":
                    return
                if i not in open_:  # cut at a stop string already
                    continue
                text = self.texts[i]
                if kind == "tokens":
                    ids, lps, top_ids, top_lps = payload
                    if not self.first_token_seen:
                        self.first_token_seen = True
                        self.state.ttft.observe(time.perf_counter() - self.t0)
                    self.tokens[i] += len(ids)
                    self.state.tokens.inc(len(ids))
                    delta = text.add(ids)
                    if text.stopped:  # a stop string: the sequence is done whatever the engine does next
                        self.state.engine.cancel([self.seqs[i]])
                        open_.discard(i)
                        yield i, delta, self._logprobs(ids, lps, top_ids, top_lps), "stop"
                    elif delta or lps is not None:
                        yield i, delta, self._logprobs(ids, lps, top_ids, top_lps), None
                else:
                    open_.discard(i)
                    if kind == "error":
                        raise ApiError(500, payload, kind="server_error")
                    yield i, text.finish(), None, "length" if payload == "length" else "stop"
        finally:
            watcher.cancel()
            self.state.engine.cancel(self.seqs)

    async def _watch(self, request: Request) -> None:
        """Tells `events` when the client disconnects: the body is read, so the next ASGI
        message is the disconnect."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.state.engine.cancel(self.seqs)
        self.queue.put_nowait((None, "disconnected", None))

    def _logprobs(self, ids, lps, top_ids, top_lps):
        if lps is None:
            return None
        decode = self.state.tokenizer.decode
        n = self.logprobs
        return [(decode([t]), lp, [(decode([a]), b) for a, b in zip(ti[:n], tl[:n])])
                for t, lp, ti, tl in zip(ids, lps, top_ids, top_lps)]

    def usage(self) -> dict:
        prompt_tokens = sum(len(self.prompts[p]) for p in self.prompt_of)
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


class _State:
    def __init__(self, engine: Engine, tokenizer, model_id: str, template: str | None):
        self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
        self.template = None
        if template is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        self.registry = prometheus_client.CollectorRegistry()
        prometheus_client.Gauge("jaxgpt_queue_depth", "Sequences waiting for a decode slot", registry=self.registry
                                ).set_function(lambda: engine.queue_depth)
        prometheus_client.Gauge("jaxgpt_active_slots", "Decode slots in use", registry=self.registry
                                ).set_function(lambda: engine.active)
        prometheus_client.Gauge("jaxgpt_decode_slots", "Decode slots in all", registry=self.registry
                                ).set(engine.slots)
        prometheus_client.Gauge("jaxgpt_tokens_per_second", "New tokens per second over the last decode chunk",
                                registry=self.registry).set_function(lambda: engine.tokens_per_s)
        self.tokens = prometheus_client.Counter("jaxgpt_generated_tokens", "New tokens sent to clients",
                                                registry=self.registry)
        self.ttft = prometheus_client.Histogram(
            "jaxgpt_time_to_first_token_seconds", "From a request's arrival to its first new token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)


def _authorize(request: Request, api_key: str | None) -> None:
    """Bearer authentication of the /v1 routes, as vLLM's --api-key."""
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>' with the "
                       "key the server was started with", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def _check_model(state: _State, body) -> None:
    if body.model != state.model_id:
        raise ApiError(404, f"model {body.model!r} does not exist here: this server serves {state.model_id!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")
    if body.presence_penalty or body.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported: leave them at 0",
                       param="presence_penalty" if body.presence_penalty else "frequency_penalty")


def _check_length(state: _State, prompt: list[int], max_tokens: int | None, param: str) -> int:
    """max_tokens, or what the context leaves when unset; errors when they do not fit."""
    ctx = state.engine.cfg.block_size
    if not prompt:
        raise ApiError(400, f"{param} is empty: give at least one token", param=param)
    if max(prompt) >= state.engine.cfg.vocab_size or min(prompt) < 0:
        raise ApiError(400, f"{param} has token ids outside [0, {state.engine.cfg.vocab_size})", param=param)
    if len(prompt) >= ctx:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens, and this model's context is {ctx}: "
                       "shorten it so that new tokens fit", param=param, code="context_length_exceeded")
    if max_tokens is None:
        return ctx - len(prompt)
    if len(prompt) + max_tokens > ctx:
        raise ApiError(400, f"the prompt's {len(prompt)} tokens and max_tokens {max_tokens} exceed this model's "
                       f"context of {ctx}: ask for at most {ctx - len(prompt)} tokens", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"stop has {len(stops)} strings: give at most 4", param="stop")
    return stops


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(engine: Engine, tokenizer, model_id: str, template: str | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app over a started engine. Stopping the app (lifespan end) stops the engine.
    With `api_key`, the /v1 routes need it as a Bearer token (401 without)."""
    from contextlib import asynccontextmanager

    state = _State(engine, tokenizer, model_id, template)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="jaxgpt", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(404)
    async def not_found(request, e):
        return ApiError(404, f"no route {request.method} {request.url.path}: see /v1/models, /v1/completions, "
                        "/v1/chat/completions, /health, /metrics", code="not_found").response()

    @app.exception_handler(405)
    async def wrong_method(request, e):
        return ApiError(405, f"{request.url.path} does not take {request.method}").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "active_slots": engine.active, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return Response(prometheus_client.generate_latest(state.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request, api_key)
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "jaxgpt",
                "max_model_len": engine.cfg.block_size}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorize(request, api_key)
        body = await _parse(request, CompletionRequest)
        _check_model(state, body)
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs (the prompt's logprobs) is not supported: drop one of them",
                           param="echo")
        p = body.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
            texts = [p] if isinstance(p, str) else p
            # Off the event loop: a 4 MB prompt takes seconds to encode, and every stream would wait.
            prompts = await asyncio.to_thread(lambda: [tokenizer.encode(t) for t in texts])
        else:
            prompts = [p] if not p or isinstance(p[0], int) else p
        max_tokens = min(_check_length(state, q, body.max_tokens, "prompt") for q in prompts)
        job = _Job(state, prompts, max_tokens, body, _stops(body.stop), body.logprobs)
        echo = [tokenizer.decode(prompts[job.prompt_of[i]]) if body.echo else "" for i in range(len(job.seqs))]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": job.created,
                "model": model_id}
        if body.stream:
            return _stream(request, job, body, head, lambda i, delta, lp, finish: {
                "index": i, "text": delta, "logprobs": _completion_logprobs(lp), "finish_reason": finish}, echo)
        choices = [{"index": i, "text": echo[i], "logprobs": None, "finish_reason": None} for i in range(len(job.seqs))]
        lps = [[] for _ in job.seqs]
        async for i, delta, lp, finish in job.events(request):
            choices[i]["text"] += delta
            lps[i] += lp or []
            choices[i]["finish_reason"] = finish or choices[i]["finish_reason"]
        if body.logprobs is not None:
            for c, lp in zip(choices, lps):
                c["logprobs"] = _completion_logprobs(lp)
        return head | {"choices": choices, "usage": job.usage()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _authorize(request, api_key)
        body = await _parse(request, ChatRequest)
        _check_model(state, body)
        if state.template is None:
            raise ApiError(400, f"model {model_id!r} has no chat template: use /v1/completions, or put a "
                           "chat_template.jinja into the model's directory", param="messages",
                           code="no_chat_template")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content)} for m in body.messages]
        eot = tokenizer.decode([tokenizer.eot_token]) if tokenizer.eot_token is not None else ""
        prompt = await asyncio.to_thread(lambda: tokenizer.encode(state.template.render(
            messages=messages, add_generation_prompt=True, eos_token=eot, bos_token=eot)))  # off the loop, as above
        max_tokens = _check_length(state, prompt, body.max_completion_tokens or body.max_tokens, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = _Job(state, [prompt], max_tokens, body, _stops(body.stop), logprobs)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": job.created, "model": model_id}
        if body.stream:
            started = set()

            def chunk(i, delta, lp, finish):
                d = {} if finish and not delta else {"content": delta}
                if i not in started:
                    started.add(i)
                    d = {"role": "assistant"} | d
                return {"index": i, "delta": d, "logprobs": _chat_logprobs(lp), "finish_reason": finish}

            return _stream(request, job, body, head | {"object": "chat.completion.chunk"}, chunk, None)
        choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(len(job.seqs))]
        lps = [[] for _ in job.seqs]
        async for i, delta, lp, finish in job.events(request):
            choices[i]["message"]["content"] += delta
            lps[i] += lp or []
            choices[i]["finish_reason"] = finish or choices[i]["finish_reason"]
        if body.logprobs:
            for c, lp in zip(choices, lps):
                c["logprobs"] = _chat_logprobs(lp)
        return head | {"object": "chat.completion", "choices": choices, "usage": job.usage()}

    return app


def _completion_logprobs(lp):
    if lp is None:
        return None
    return {"tokens": [t for t, _, _ in lp], "token_logprobs": [v for _, v, _ in lp],
            "top_logprobs": [dict(top) for _, _, top in lp]}


def _chat_logprobs(lp):
    if lp is None:
        return None

    def entry(t, v):
        return {"token": t, "logprob": v, "bytes": list(t.encode())}

    return {"content": [entry(t, v) | {"top_logprobs": [entry(a, b) for a, b in top]} for t, v, top in lp]}


def _stream(request: Request, job: _Job, body, head: dict, choice, echo: list[str] | None) -> StreamingResponse:
    """Server-sent events as OpenAI frames them: one `data: {json}` per chunk, a usage chunk
    with empty choices when stream_options.include_usage, then `data: [DONE]`."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    extra = {"usage": None} if include_usage else {}

    async def sse():
        if echo is not None and any(echo):
            yield _sse(head | {"choices": [choice(i, e, None, None) for i, e in enumerate(echo)]} | extra)
        try:
            async for i, delta, lp, finish in job.events(request):
                yield _sse(head | {"choices": [choice(i, delta, lp, finish)]} | extra)
        except ApiError as e:
            yield _sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
            return
        if include_usage:
            yield _sse(head | {"choices": [], "usage": job.usage()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _LingeringTransport:
    """A transport whose close() sends what was written, then reads and drops what the
    client still sends, for up to LINGER_S, before it closes: a socket closed with unread
    data resets the connection, and the client would lose the answer (a 413 sent before
    its body's end, as nginx's lingering close avoids)."""

    def __init__(self, transport, loop):
        self._transport, self._loop, self.lingering = transport, loop, False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        self.lingering = True
        self._transport.resume_reading()
        self._transport.write_eof()
        self._loop.call_later(LINGER_S, self._transport.close)

    def close_now(self) -> None:
        self._transport.close()


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 with a deadline for each request's line and headers (a client that
    sends them slowly, slowloris, is cut off instead of holding a connection) and a
    lingering close."""

    def connection_made(self, transport) -> None:
        super().connection_made(_LingeringTransport(transport, self.loop))
        self._expect_request(None)

    def data_received(self, data: bytes) -> None:
        if not self.transport.lingering:  # else dropped: the connection is closing
            super().data_received(data)

    def eof_received(self) -> None:
        if self.transport.lingering:
            self.transport.close_now()

    def on_response_complete(self) -> None:
        done = self.cycle
        super().on_response_complete()  # may start a pipelined request already
        self._expect_request(done)

    def _expect_request(self, done) -> None:
        """Closes the connection unless a request after `done` (a cycle, or None) arrives in time."""
        self.loop.call_later(HEADER_TIMEOUT_S, lambda: self.cycle is done and self.transport.close())


def server_config(app: FastAPI, host: str, port: int, max_connections: int) -> uvicorn.Config:
    """uvicorn's settings for `app`: at most `max_connections` open connections (more get
    503), and the slow-client deadlines above."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=_Protocol,
                          limit_concurrency=max_connections + 1,  # uvicorn counts the connection asking
                          timeout_keep_alive=KEEP_ALIVE_S)
