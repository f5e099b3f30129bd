"""Decode speed: jaxgpt.generate, llama.cpp and transformers' generate on the same weights.

GPT-2 124M shape, random weights saved with jaxgpt.save_hf and converted to f32 and f16
GGUF files with llama.cpp's own convert_hf_to_gguf.py; float32 on the CPU, greedy, a
16-token prompt, 256 new tokens. Batch 1: the three engines, and jaxgpt on bfloat16
weights beside llama.cpp on the f16 file, each the best of 3 runs, alternated twice. Batch 8: jaxgpt and transformers (the
llama-cpp-python API decodes one sequence). Also whether llama.cpp's first 32 greedy
tokens equal jaxgpt's.

Builds nothing by itself: it needs llama-cpp-python 0.3.36, compiled into a venv of its
own at low priority (~8 minutes on 2 idle cores), used from the project's venv through
PYTHONPATH (llama-cpp-python brings only numpy, jinja2, diskcache and typing-extensions;
the converter runs with this interpreter's torch and transformers):

    python3 -m venv /work/venv-llama
    CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 19 /work/venv-llama/bin/pip install llama-cpp-python==0.3.36
    PYTHONPATH=src:/work/venv-llama/lib/python3.11/site-packages .venv/bin/python bench/decode_llamacpp.py

The converter comes from llama-cpp-python's source distribution (vendor/llama.cpp),
downloaded with pip into a temporary directory unless --llama-src names an unpacked one.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jaxgpt

LLAMA_CPP_VERSION = "0.3.36"


def cpu_name() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "unknown CPU"


def llama_src(given: str | None, tmp: pathlib.Path) -> pathlib.Path:
    """vendor/llama.cpp of llama-cpp-python's source distribution: given, or downloaded."""
    if given is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(tmp)], check=True)
        with tarfile.open(next(tmp.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(tmp, filter="data")
        given = next(tmp.glob("llama_cpp_python-*/"))
    src = pathlib.Path(given)
    src = src if (src / "convert_hf_to_gguf.py").exists() else src / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").exists():
        sys.exit(f"error: no convert_hf_to_gguf.py under {given}: pass llama-cpp-python's unpacked sdist")
    return src


def save_weights(path: pathlib.Path):
    """Random GPT-2 124M weights as transformers reads them, and as the converter needs them."""
    cfg = jaxgpt.GPTConfig()
    jaxgpt.save_hf(cfg, jaxgpt.init_params(cfg, jax.random.key(0)), path, tokenizer=jaxgpt.get_tokenizer("gpt2"))
    config = json.loads((path / "config.json").read_text())
    config["n_ctx"] = config["n_positions"]  # the converter reads n_ctx; transformers 5 omits it
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def convert(src: pathlib.Path, hf_dir: pathlib.Path, outtype: str) -> pathlib.Path:
    out = hf_dir.parent / f"gpt2-{outtype}.gguf"
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype,
                    "--outfile", str(out)], check=True, capture_output=True)
    return out


def best_of(f, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-src", help="unpacked llama-cpp-python sdist (or its vendor/llama.cpp); default: download it")
    ap.add_argument("--reps", type=int, default=3, help="runs per measurement, the best kept")
    ap.add_argument("--rounds", type=int, default=2, help="times the engines are alternated")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--compare-tokens", type=int, default=32)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit(f"error: bench/decode_llamacpp.py needs llama-cpp-python: "
                 f"pip install llama-cpp-python=={LLAMA_CPP_VERSION} (see this script's docstring)")
    N, P = args.new_tokens, args.prompt_tokens
    cpu, threads = cpu_name(), os.cpu_count()
    print(f"jax {jax.__version__}, llama-cpp-python {llama_cpp.__version__} ({threads} threads), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"GPT-2 124M random weights, greedy, prompt {P}, {N} new tokens; best of {args.reps}, "
          f"alternated {args.rounds}x; CPU: {cpu}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        hf_dir = tmp / "hf"
        save_weights(hf_dir)
        src = llama_src(args.llama_src, tmp / "sdist")
        ggufs = {t: convert(src, hf_dir, t) for t in ("f32", "f16")}
        cfg, params = jaxgpt.load_hf(hf_dir)
        params_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)  # what --dtype bfloat16 loads
        hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # always generate all N tokens
        hf.generation_config.pad_token_id = 0
        llms = {t: llama_cpp.Llama(str(p), n_ctx=cfg.block_size, n_threads=threads, n_threads_batch=threads,
                                   verbose=False) for t, p in ggufs.items()}

        rng = np.random.default_rng(0)
        prompts = {B: rng.integers(0, cfg.vocab_size, (B, P)).tolist() for B in (1, 8)}

        def run_jax(B, n=N, weights=params):
            return jaxgpt.generate(weights, cfg, prompts[B], n, temperature=0)

        def run_hf(B):
            with torch.inference_mode():
                ids = torch.tensor(prompts[B])
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False)

        def run_llama(t, n=N):
            llm = llms[t]
            llm.reset()  # no reuse of the previous run's cache
            out = []
            for token in llm.generate(prompts[1][0], temp=0.0, top_k=1):
                out.append(token)
                if len(out) == n:
                    return out

        engines = {
            1: {"jaxgpt": lambda: run_jax(1), "llama.cpp f32": lambda: run_llama("f32"),
                "transformers": lambda: run_hf(1), "jaxgpt bfloat16 weights": lambda: run_jax(1, weights=params_bf16),
                "llama.cpp f16 (f16 weights)": lambda: run_llama("f16")},
            8: {"jaxgpt": lambda: run_jax(8), "transformers": lambda: run_hf(8)},
        }
        for B in engines:  # compile and warm up
            for f in engines[B].values():
                f()
        K = args.compare_tokens
        ours = run_jax(1, K)[0]
        for t in llms:
            theirs = run_llama(t, K)
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), K)
            print(f"greedy, first {K} tokens, llama.cpp {t} vs jaxgpt: "
                  + ("identical" if same == K else f"differ from token {same}"), flush=True)

        tok_s = {B: {name: [] for name in engines[B]} for B in engines}
        for r in range(args.rounds):
            for B in engines:
                for name, f in engines[B].items():
                    tok_s[B][name].append(B * N / best_of(f, args.reps))
            print(f"round {r + 1}/{args.rounds}: " + "; ".join(
                f"batch {B} {name} {v[-1]:.1f} tok/s" for B in engines for name, v in tok_s[B].items()), flush=True)
        for t, llm in llms.items():  # llama.cpp's own clock: its decode calls, without Python's share
            llama_cpp.llama_perf_context_reset(llm.ctx)
            wall = best_of(lambda: run_llama(t), 1)
            perf = llama_cpp.llama_perf_context(llm.ctx)
            print(f"llama.cpp {t}, its own timings: prompt {perf.t_p_eval_ms:.1f} ms ({perf.n_p_eval} tokens), "
                  f"decode {perf.t_eval_ms / perf.n_eval:.2f} ms/token ({perf.n_eval} tokens); "
                  f"{1e3 * wall / N:.2f} ms/token through llama-cpp-python ({cpu})")
        del llms  # llama.cpp frees its model before the files go

    print(f"\n| batch | engine | tok/s (best of {args.reps}, each round) | vs jaxgpt | ms/step | CPU |")
    print("|---|---|---|---|---|---|")
    for B in engines:
        ref = max(tok_s[B]["jaxgpt"])
        for name, v in tok_s[B].items():
            print(f"| {B} | {name} | {'-'.join(f'{x:.1f}' for x in v)} | {max(v) / ref:.2f}x | "
                  f"{B * 1e3 / max(v):.1f} | {cpu} |")
    best = {B: {name: max(v) for name, v in tok_s[B].items()} for B in tok_s}
    print(f"batch 1: jaxgpt / llama.cpp f32 = {best[1]['jaxgpt'] / best[1]['llama.cpp f32']:.2f}x; "
          f"jaxgpt bfloat16 / llama.cpp f16 = {best[1]['jaxgpt bfloat16 weights'] / best[1]['llama.cpp f16 (f16 weights)']:.2f}x; "
          f"batch 8: jaxgpt / transformers = {best[8]['jaxgpt'] / best[8]['transformers']:.2f}x ({cpu})")


if __name__ == "__main__":
    main()
