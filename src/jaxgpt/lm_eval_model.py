"""jaxgpt as a model of EleutherAI's lm-evaluation-harness (`pip install 'jaxgpt[eval]'`).

    import jaxgpt.lm_eval_model, lm_eval
    lm_eval.simple_evaluate(model="jaxgpt", model_args="pretrained=out/run", tasks=["hellaswag"])

`pretrained` is a jaxgpt run directory or a Hugging Face GPT-2 directory. Requests are
tokenized as lm-eval's own `hf` model does (context and continuation encoded together,
trailing spaces moved to the continuation), sorted by length and scored in batches of
`batch_size` rows padded to a power-of-two length, so each shape compiles once.
Generation is greedy unless a task asks for sampling, through `jaxgpt.generate`; sampled
requests each draw their own stream, all derived from `seed` (model_args seed=N).

lm-eval 0.4 finds models only in its own registry: importing this module registers
"jaxgpt" there (`import jaxgpt` alone does not, so that it never pays for lm-eval's
import), and `jaxgpt lm-eval run --model jaxgpt ...` is lm-eval's own command line with it
registered.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from jaxgpt import load, model
from jaxgpt import tokenizer as tokenizer_lib
from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError
from jaxgpt.decode import pow2_bucket
from jaxgpt.generate import generate


class EvalError(UserError):
    """An evaluation that cannot run as asked (unknown task, data not available offline, ...)."""


@functools.partial(jax.jit, static_argnames="cfg")
def _score(params, x_BT, y_BT, mask_BT, cfg: GPTConfig):
    """Summed log-probability of the masked targets of each row, and whether every masked
    target is the argmax (greedy) token."""
    B, T = x_BT.shape
    logits_NV = model.forward(params, x_BT, cfg).reshape(B * T, -1)
    y_N, mask_N = y_BT.reshape(-1), mask_BT.reshape(-1)
    logp_N = jnp.take_along_axis(logits_NV, y_N[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits_NV, axis=-1)
    greedy_N = (jnp.argmax(logits_NV, axis=-1) == y_N) | (mask_N == 0)
    return (logp_N * mask_N).reshape(B, T).sum(-1), greedy_N.reshape(B, T).all(-1)


def _bucket(n: int, cap: int) -> int:
    return min(pow2_bucket(n, 16), cap)


@register_model("jaxgpt")
class JaxGPTLM(TemplateLM):
    """lm-eval's LM interface over a jaxgpt model: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, pretrained: str | None = None, batch_size: int | str = 16, checkpoint: str = "best",
                 max_batch_size: int | None = None, device: str | None = None, loaded: tuple | None = None,
                 seed: int | str = 0):
        """`loaded` = (GPTConfig, params, tokenizer) evaluates a model in memory (training does).
        `seed` gives sampled generations their keys. `max_batch_size` and `device` are lm-eval's
        generic arguments; JAX picks the device."""
        super().__init__()
        if (pretrained is None) == (loaded is None):
            raise EvalError("give the model as model_args pretrained=RUN_DIR or pretrained=HF_GPT2_DIR")
        self.cfg, self.params, self.tok = loaded or load.load_model(pretrained, checkpoint)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise EvalError(f"batch_size {batch_size!r} is not supported by jaxgpt: give a positive number")
        self._batch_size = int(batch_size)
        if not str(seed).isdigit():
            raise EvalError(f"seed {seed!r} is not supported by jaxgpt: give a non-negative number")
        self.seed = int(seed)
        self.max_gen_toks = 256  # lm-eval's default, as its hf model

    @property
    def eot_token_id(self) -> int:
        """End-of-text, or for a tokenizer without one (char level) a newline. lm-eval's
        prefix_token_id, what empty contexts and rolling windows start from, is this too."""
        if self.tok.eot_token is not None:
            return self.tok.eot_token
        try:
            return self.tok.encode("\n")[0]
        except tokenizer_lib.TokenizerError:
            raise EvalError("this model's vocabulary has neither <|endoftext|> nor a newline to start "
                            "an empty context with") from None

    @property
    def max_length(self) -> int:
        return self.cfg.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is greedy) of (key, context, continuation)
        token requests; contexts longer than block_size lose their left part, as in lm-eval's hf."""
        L = self.max_length
        seqs = [(ctx + cont)[-(L + 1):] for _, ctx, cont in requests]
        n_conts = [len(cont) for _, _, cont in requests]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
        B = self._batch_size
        for start in range(0, len(order), B):
            rows = order[start : start + B]
            T = _bucket(max(len(seqs[i]) - 1 for i in rows), L)
            x_BT, y_BT, mask_BT = (np.zeros((B, T), np.int32) for _ in range(3))
            for r, i in enumerate(rows):
                n = len(seqs[i]) - 1
                x_BT[r, :n], y_BT[r, :n] = seqs[i][:-1], seqs[i][1:]
                mask_BT[r, n - n_conts[i] : n] = 1
            logp_B, greedy_B = jax.device_get(_score(self.params, x_BT, y_BT, mask_BT, self.cfg))
            for r, i in enumerate(rows):
                results[i] = (float(logp_B[r]), bool(greedy_B[r]))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: block_size windows, each token predicted once, every
        window with the most context it can have (lm-eval's get_rolling_token_windows)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded and cut at the first stop sequence (and end-of-text), batched
        per set of generation arguments. Row r of batch b of argument set g samples with the key
        (seed of (self.seed, g, b), r): its own stream, the same for the same seed and batch size."""
        eos = self.tok.decode([self.tok.eot_token]) if self.tok.eot_token is not None else None
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True), []).append(i)
        out = [""] * len(requests)
        stops = [self.tok.eot_token] if self.tok.eot_token is not None else None
        for g, indices in enumerate(groups.values()):
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            max_ctx = self.max_length - max_new
            if max_ctx < 1:
                raise EvalError(f"max_gen_toks {max_new} leaves no room for a context in block_size {self.max_length}")
            sampling = {"temperature": kwargs["temperature"] if kwargs["do_sample"] else 0.0,
                        "top_k": kwargs.get("top_k"), "top_p": kwargs.get("top_p")}
            prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-max_ctx:] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self._batch_size):
                rows = order[start : start + self._batch_size]
                seed = int(np.random.SeedSequence([self.seed, g, start]).generate_state(1)[0])
                new = generate(self.params, self.cfg, [prompts[i] for i in rows], max_new, stop_tokens=stops,
                               seed=seed, **sampling)
                for i, ids in zip(rows, new):  # `until` holds eos: the text is cut at end-of-text
                    out[i] = postprocess_generated_text(self.tok.decode(ids), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


@functools.cache
def _task_manager(include_path: str | None, with_lm_evals_tasks: bool):
    """lm-eval's index of task files, built once: with its own ~15,000 it takes ~10 s."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=with_lm_evals_tasks)


def task_manager(tasks: list[str], include_path: str | None = None):
    """The lm-eval TaskManager that knows `tasks`; an unknown name is an EvalError."""
    import difflib

    manager = _task_manager(include_path, False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = _task_manager(include_path, True)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see lm-eval ls tasks"
            raise EvalError(f"unknown lm-eval task {name!r}: {hint}")
    return manager


def evaluate(lm, tasks: list[str], limit: int | None = None, include_path: str | None = None,
             bootstrap_iters: int = 100_000, log_samples: bool = False) -> dict:
    """lm-eval's results of `tasks` for an LM; unknown tasks and data that cannot be loaded
    (e.g. offline and not cached) are EvalErrors."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)
    try:
        return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                               bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    except OSError as e:  # datasets' offline and not-found errors are OSErrors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"cannot load the data of {', '.join(tasks)} ({reason}): run once online to fill the "
                        "Hugging Face cache, or check the task's dataset") from None
