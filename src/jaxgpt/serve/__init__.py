"""`jaxgpt serve`: an OpenAI-compatible HTTP server with continuous batching.

`engine` holds the decode slots and is the only code that touches JAX (on its own thread);
`api` is the FastAPI side. Needs the serve extra: pip install 'jaxgpt[serve]'."""

import os
import socket
from pathlib import Path

from jaxgpt.errors import UserError


def serve(source: str, which: str = "best", host: str = "127.0.0.1", port: int = 8000, slots: int = 16,
          queue_size: int = 64, api_key: str | None = None, max_connections: int = 256, dtype: str = "float32") -> None:
    """Loads `source` (a run directory, an HF directory or a Hub name), compiles, and
    serves it until SIGINT or SIGTERM, which stop new connections and drain the requests
    in flight. `api_key` (else $JAXGPT_API_KEY, if set) guards the /v1 routes; `dtype` is
    the weights' and KV cache's."""
    try:
        import uvicorn

        from jaxgpt.serve import api
    except ImportError as e:
        raise UserError(f"jaxgpt serve needs {e.name}: pip install 'jaxgpt[serve]'") from None
    from jaxgpt import load
    from jaxgpt.serve.engine import Engine

    if slots < 1 or queue_size < 1 or max_connections < 1:
        raise UserError(f"--slots {slots}, --queue-size {queue_size} and --max-connections {max_connections}: "
                        "each must be at least 1")
    api_key = api_key or os.environ.get("JAXGPT_API_KEY") or None
    with socket.socket() as probe:  # before minutes of loading and compiling, as uvicorn binds
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None
    cfg, params, tok = load.load_model(source, which, dtype=dtype)
    model_id = Path(source).name or str(source)
    template = api.chat_template(source)
    print(f"loaded {source}: {cfg.n_layer} layers, width {cfg.n_embd}, context {cfg.block_size}, "
          f"vocabulary {cfg.vocab_size}; chat template: {'yes' if template else 'none'}", flush=True)
    print(f"compiling for {slots} slots ...", flush=True)
    engine = Engine(params, cfg, slots=slots, max_queue=queue_size, log=lambda s: print(s, flush=True))
    engine.start()
    engine.ready.wait()
    if engine.failure is not None:
        first_line = (str(engine.failure).strip().splitlines() or [""])[0]
        raise UserError(f"compiling for {slots} slots failed ({type(engine.failure).__name__}: {first_line}): "
                        "try fewer --slots, or --debug for the whole error") from engine.failure
    app = api.create_app(engine, tok, model_id, template, api_key)
    print(f"listening on http://{host}:{port}/v1 (model {model_id!r}; "
          f"{'API key required' if api_key else 'no API key'})", flush=True)
    uvicorn.Server(api.server_config(app, host, port, max_connections)).run()
