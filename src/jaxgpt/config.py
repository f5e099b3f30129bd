"""Configuration: nested dataclasses that round-trip through TOML, and the shipped presets.

The section and field names follow nanoGPT's, so a nanoGPT user recognises every knob.
"""

import dataclasses
import difflib
import importlib.resources
import re
import tomllib
import types
import typing
from pathlib import Path

from jaxgpt.errors import UserError


class ConfigError(UserError):
    """A user-fixable problem with a configuration (unknown key, wrong type, bad value)."""


def _in(default, allowed: str):
    """A field whose values must lie in `allowed`: an interval such as "[0, 1)" or "(0, inf)",
    optionally after one more value ("-1 or [1, inf)"). None (unset) is always allowed."""
    return dataclasses.field(default=default, metadata={"allowed": allowed})


_ALLOWED = re.compile(r"(?:(-?\d+) or )?([\[(])([^,]+), ([^\])]+)([\])])")


def _describe(allowed: str) -> str:
    extra, open_, lo, hi, close = _ALLOWED.fullmatch(allowed).groups()
    if hi == "inf":
        text = f"at least {lo}" if open_ == "[" else f"greater than {lo}"
    else:
        text = f"in {open_}{lo}, {hi}{close}"
    return f"{extra} or {text}" if extra else text


def _check_ranges(cfg, section: str) -> None:
    """Every field of `cfg` with an allowed range holds a value in it; else one line naming it."""
    for f in dataclasses.fields(cfg):
        value, allowed = getattr(cfg, f.name), f.metadata.get("allowed")
        if allowed is None or value is None:
            continue
        extra, open_, lo, hi, close = _ALLOWED.fullmatch(allowed).groups()
        above = value >= float(lo) if open_ == "[" else value > float(lo)
        below = value <= float(hi) if close == "]" else value < float(hi)
        if not ((above and below) or (extra is not None and value == int(extra))):
            raise ConfigError(f"{section}.{f.name} must be {_describe(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of the model. `vocab_size` may be larger than the tokenizer's (padding)."""

    n_layer: int = _in(12, "[1, inf)")
    n_head: int = _in(12, "[1, inf)")
    n_embd: int = _in(768, "[1, inf)")
    block_size: int = _in(1024, "[1, inf)")
    vocab_size: int = _in(50257, "[1, inf)")
    dropout: float = _in(0.0, "[0, 1)")
    bias: bool = True
    n_inner: int | None = _in(None, "[1, inf)")
    """Width of the MLP's hidden layer (unset: 4 * n_embd)."""
    activation: typing.Literal["gelu_new", "gelu", "relu"] = "gelu_new"
    """The MLP's activation: gelu_new (GPT-2's tanh approximation), gelu (exact, with erf) or relu."""
    layer_norm_eps: float = _in(1e-5, "[0, inf)")
    """The epsilon added to the variance in every LayerNorm."""
    scale_attn_weights: bool = True
    """Divide attention scores by sqrt(head width)."""
    scale_attn_by_inverse_layer_idx: bool = False
    """Also divide layer i's attention scores by i + 1 (counting from 0), as GPT2Config's option of that name."""
    pos: typing.Literal["learned", "rope"] = "learned"
    """Positions: a learned table added to the token embedding (GPT-2), or rotary embeddings of the queries and keys."""
    rope_base: float = _in(10000.0, "(0, inf)")
    """rope only: the base of the rotary frequencies (HF's rope_theta)."""
    norm: typing.Literal["layernorm", "rmsnorm"] = "layernorm"
    """The block and final norms: LayerNorm (with a bias where `bias`) or RMSNorm (a scale only)."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys (before the rotation), as Qwen3 and modded-nanogpt do."""
    mlp: typing.Literal["gelu", "relu2", "swiglu"] = "gelu"
    """gelu: GPT-2's two-layer MLP with `activation`; relu2: two layers with relu(x)**2; swiglu: silu(x W_gate) * (x W_fc), then the projection (Llama)."""
    n_kv_head: int | None = _in(None, "[1, inf)")
    """Heads of keys and values (unset: n_head). Fewer is grouped-query attention, 1 multi-query; must divide n_head."""
    head_dim: int | None = _in(None, "[1, inf)")
    """Width of a head (unset: n_embd // n_head)."""
    tie_embeddings: bool = True
    """The output layer is the token embedding (GPT-2); false gives it a matrix of its own (lm_head)."""
    logit_softcap: float | None = _in(None, "(0, inf)")
    """Squash the logits to (-c, c) as c * tanh(logits / c) (Gemma 2, modded-nanogpt); unset: none."""
    zero_init_proj: bool = False
    """Start the attention and MLP output projections (and an untied lm_head) at zero (modded-nanogpt)."""

    def __post_init__(self):
        _check_ranges(self, "model")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd {self.n_embd} is not a multiple of model.n_head {self.n_head}: "
                              "change one, or set model.head_dim")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_kv_head {self.n_kv_head} must divide model.n_head {self.n_head}")
        if self.pos == "rope" and (self.head_dim or self.n_embd // self.n_head) % 2:
            raise ConfigError("rope rotates pairs of a head's dims: make the head width (n_embd // n_head or head_dim) even")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dir: str = "data/shakespeare"
    batch_size: int = _in(12, "[1, inf)")

    def __post_init__(self):
        _check_ranges(self, "data")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = _in(6e-4, "(0, inf)")
    min_lr: float = _in(6e-5, "[0, inf)")
    warmup_iters: int = _in(2000, "[0, inf)")
    lr_decay_iters: int = _in(600000, "[0, inf)")
    weight_decay: float = _in(0.1, "[0, inf)")
    beta1: float = _in(0.9, "[0, 1)")
    beta2: float = _in(0.95, "[0, 1)")
    grad_clip: float = _in(1.0, "[0, inf)")
    schedule: typing.Literal["constant", "linear", "cosine", "rsqrt", "wsd"] = "cosine"
    """Learning rate after the linear warmup: constant, linear (to min_lr at lr_decay_iters), cosine
    (to min_lr at lr_decay_iters), rsqrt (learning_rate * sqrt(warmup_iters / step)) or wsd
    (warmup-stable-decay: flat, then linear to min_lr over the last decay_fraction of lr_decay_iters)."""
    decay_fraction: float = _in(0.2, "(0, 1]")
    """wsd only: the share of lr_decay_iters spent decaying."""
    optimizer: typing.Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW on everything. muon: Muon (optax.contrib.muon) on the blocks' matrices, AdamW at
    learning_rate on the embeddings, the output head, norms and biases."""
    muon_learning_rate: float = _in(0.02, "(0, inf)")
    """muon only: the matrices' peak learning rate; it follows the same schedule as learning_rate, scaled."""
    muon_momentum: float = _in(0.95, "[0, 1)")
    """muon only: the momentum of Muon's (Nesterov) gradient average."""

    def __post_init__(self):
        _check_ranges(self, "optim")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    max_iters: int = _in(600000, "[0, inf)")
    eval_interval: int = _in(2000, "[1, inf)")
    eval_iters: int = _in(200, "[1, inf)")
    log_interval: int = _in(10, "[1, inf)")
    grad_accum: int = _in(1, "[1, inf)")
    steps_per_call: int = _in(10, "[1, inf)")
    """Iterations run in one compiled call (a lax.scan over their batches): fewer dispatches;
    on XLA:CPU a block of 10 runs each step ~25% faster than single calls (bench/RESULTS.md).
    Evaluations, the end and hooks that act between steps cut blocks short; signals take
    effect at the end of the block in flight."""
    seed: int = _in(1337, "[0, 4294967296)")
    out_dir: str = "out"
    keep: int = _in(2, "[1, inf)")
    """How many of the latest checkpoints to keep (the best one is kept apart)."""
    max_nonfinite: int = _in(10, "[1, inf)")
    """Steps with non-finite gradients are skipped; this many in a row stop the run."""
    init_from: str | None = None
    """A Hugging Face GPT-2 to start from instead of random weights: a directory or a Hub name (gpt2, gpt2-xl, ...)."""
    compute_dtype: typing.Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the matmuls (params stay float32; LayerNorm statistics, softmax and loss run in
    float32). auto: bfloat16 on GPU/TPU, float32 on CPU."""
    remat: typing.Literal["none", "block"] = "none"
    """block: recompute each block's activations (all but its matmul outputs) in the backward pass, to fit bigger batches."""
    peak_flops: float | None = _in(None, "(0, inf)")
    """Peak FLOP/s of all devices in use, for MFU (default: a table of GPUs/TPUs, or a matmul measured at start)."""
    layer_stats: bool = False
    """At log steps, also log each layer's parameter norm, gradient norm and update/parameter ratio
    (computed inside every step, from the step's own gradients: a few norms over the params)."""
    profile_steps: str | None = None
    """START:END: write a JAX profiler trace (with a Perfetto file) of those steps to RUN_DIR/profile."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (pip install 'jaxgpt[wandb]'; offline without network)."""

    def __post_init__(self):
        _check_ranges(self, "train")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: data × fsdp × tensor must equal the device count; -1 fills one axis.

    data: batch split, params replicated. fsdp: batch split, params and optimizer state
    sharded. tensor: attention heads and MLP hidden units split (Megatron)."""

    data: int = _in(-1, "-1 or [1, inf)")
    fsdp: int = _in(1, "-1 or [1, inf)")
    tensor: int = _in(1, "-1 or [1, inf)")
    cpu_devices: int = _in(1, "[0, inf)")
    """On a CPU, train on this many XLA devices over its cores (0: one per usable core, as many
    as divide the batch), data-parallel by default. XLA runs each small op of a small model on
    one core at a time, so per-core devices keep every core busy; large models gain nothing.
    JAX_NUM_CPU_DEVICES or --xla_force_host_platform_device_count in XLA_FLAGS, where set, win."""
    init_timeout: int = _in(45, "[1, inf)")
    """Several processes: seconds each waits for all of them to join the job before every one stops."""

    def __post_init__(self):
        _check_ranges(self, "mesh")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """lm-evaluation-harness tasks run during training (pip install 'jaxgpt[eval]')."""

    tasks: tuple[str, ...] = ()
    """Task names, e.g. ["hellaswag", "lambada_openai"]; empty: none."""
    limit: int | None = _in(None, "[1, inf)")
    """Examples per task (all when unset)."""
    every: int = _in(0, "[0, inf)")
    """Run them every this many steps and at the end (0: only at the end)."""
    include_path: str | None = None
    """A folder of your own lm-eval task YAMLs."""

    def __post_init__(self):
        _check_ranges(self, "eval")


@dataclasses.dataclass(frozen=True)
class Config:
    model: GPTConfig = GPTConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    eval: EvalConfig = EvalConfig()


PRESETS_DIR = importlib.resources.files("jaxgpt") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in PRESETS_DIR.iterdir() if p.name.endswith(".toml"))


def _check_value(where: str, value, annotation):
    """Returns `value` converted to `annotation`'s type, or raises ConfigError naming `where`."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is annotation:
            return value
        raise ConfigError(f"{where} must be {annotation.__name__}, got {value!r} ({type(value).__name__})")
    if typing.get_origin(annotation) is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        choices = ", ".join(repr(a) for a in typing.get_args(annotation))
        raise ConfigError(f"{where} must be one of {choices}, got {value!r}")
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            if option is not type(None):
                try:
                    return _check_value(where, value, option)
                except ConfigError:
                    pass
        raise ConfigError(f"{where} has the wrong type: {value!r}")
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_check_value(f"{where}[{i}]", v, typing.get_args(annotation)[0]) for i, v in enumerate(value))
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _from_dict(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"[{where}] must be a table, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"unknown config key '{name}'{hint}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _from_dict(hints[key], value, name)
        else:
            kwargs[key] = _check_value(name, value, hints[key])
    return cls(**kwargs)


def from_dict(d: dict) -> Config:
    return _from_dict(Config, d, "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def dumps(cfg: Config) -> str:
    """TOML text of a config: one table per section, None values left out."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def loads(text: str, where: str = "config") -> Config:
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None
    return from_dict(d)


def load(path_or_preset: str) -> Config:
    """A config from a TOML file path or the name of a shipped preset."""
    if path_or_preset.endswith(".toml") or Path(path_or_preset).exists():
        path = Path(path_or_preset)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return loads(path.read_text(), where=str(path))
    names = preset_names()
    if path_or_preset not in names:
        close = difflib.get_close_matches(path_or_preset, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"available: {', '.join(names)}"
        raise ConfigError(f"unknown preset '{path_or_preset}': {hint}")
    return loads((PRESETS_DIR / f"{path_or_preset}.toml").read_text(), where=f"preset {path_or_preset}")
