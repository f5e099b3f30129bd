"""jaxgpt as an lm-evaluation-harness model, against lm-eval's own `hf` model (transformers)
on the same random GPT-2 directory: three small tasks written here (multiple choice shaped
like HellaSwag, rolling loglikelihood, short greedy generation), loaded by TaskManager."""

import functools
import json
import textwrap

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.tasks import TaskManager  # noqa: E402

from jaxgpt import cli, lm_eval_model  # noqa: E402
from jaxgpt.tokenizer import gpt2_file  # noqa: E402

TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]
MAX_GEN = 12


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random small GPT-2 saved by transformers with GPT-2's tokenizer. A wide init makes
    its predictions peaked, so that greedy continuations and stop sequences occur."""
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, initializer_range=0.2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    tok = transformers.GPT2TokenizerFast(vocab=str(gpt2_file("encoder.json")), merges=str(gpt2_file("vocab.bpe")))
    tok.save_pretrained(path)
    return path


@functools.cache
def hf_model(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir), transformers.GPT2LMHeadModel.from_pretrained(hf_dir)


def greedy_text(hf_dir, prompt: str, n: int) -> str:
    tok, m = hf_model(hf_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = m.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:])


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, hf_dir, shakespeare_text):
    path = tmp_path_factory.mktemp("tasks")
    paragraphs = [p.strip() for p in shakespeare_text.split("\n\n") if len(p) > 80]
    # Multiple choice: a context and four endings; one of them is the model's own greedy
    # continuation, so that some continuations are greedy.
    mc = []
    for i in range(6):
        ctx = paragraphs[i][:120].rstrip()
        endings = [" " + paragraphs[10 + j + i][:40 + 7 * j] for j in range(3)]
        endings.insert(i % 4, greedy_text(hf_dir, ctx, 1 + i % 3))
        mc.append({"ctx": ctx, "endings": endings, "label": i % 4})
    rolling = [{"text": "\n\n".join(paragraphs[20 + 3 * i: 23 + 3 * i + i])} for i in range(3)]  # to ~600 tokens
    prompts = [paragraphs[40 + i][:60 + 50 * i] for i in range(4)]
    # Stop at a piece of the first prompt's greedy continuation, so stop sequences cut.
    stop = greedy_text(hf_dir, prompts[0], MAX_GEN)[8:11]
    gen = [{"prompt": p, "answer": greedy_text(hf_dir, p, MAX_GEN) if i == 1 else "x"} for i, p in enumerate(prompts)]
    common = f"""
        dataset_path: json
        test_split: test
        dataset_kwargs:
          cache_dir: {path / "cache"}
          data_files:
            test: {path / "{name}.jsonl"}
    """
    specs = {
        "tiny_mc": """
            output_type: multiple_choice
            target_delimiter: ""
            doc_to_text: "{{ctx}}"
            doc_to_target: "{{label}}"
            doc_to_choice: "{{endings}}"
            metric_list:
              - metric: acc
              - metric: acc_norm
        """,
        "tiny_rolling": """
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
              - metric: byte_perplexity
              - metric: bits_per_byte
        """,
        "tiny_gen": f"""
            output_type: generate_until
            doc_to_text: "{{{{prompt}}}}"
            doc_to_target: "{{{{answer}}}}"
            target_delimiter: ""
            generation_kwargs:
              until: [{json.dumps(stop)}]
              max_gen_toks: {MAX_GEN}
              do_sample: false
            metric_list:
              - metric: exact_match
        """,
    }
    for name, docs in (("tiny_mc", mc), ("tiny_rolling", rolling), ("tiny_gen", gen)):
        (path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        yaml = f"task: {name}\n" + textwrap.dedent(common).replace("{name}", name) + textwrap.dedent(specs[name])
        (path / f"{name}.yaml").write_text(yaml)
    return path


def run(lm, task_dir) -> dict:
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)  # lm-eval's own 15,000 take 10 s
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, log_samples=True, bootstrap_iters=0)


def responses(out: dict, task: str) -> list:
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def differences(a, b) -> list[tuple[float, float]]:
    """(ours, reference) for every number in two nested results; other values must be equal."""
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return [d for x, y in zip(a, b) for d in differences(x, y)]
    if isinstance(a, float):
        return [(a, b)]
    assert a == b
    return []


@pytest.fixture(scope="module")
def both(hf_dir, task_dir):
    from lm_eval.models.huggingface import HFLM

    ref = run(HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=1), task_dir)
    ours = run(lm_eval_model.JaxGPTLM(pretrained=str(hf_dir), batch_size=4), task_dir)
    return ref, ours


def test_loglikelihoods_match_lm_evals_hf_model(both):
    ref, ours = both
    for task in ("tiny_mc", "tiny_rolling"):
        pairs = differences(responses(ours, task), responses(ref, task))
        worst = max(pairs, key=lambda p: abs(p[0] - p[1]))
        print(f"{task}: {len(pairs)} loglikelihoods, worst difference {abs(worst[0] - worst[1]):.3g} "
              f"(at {worst[1]:.1f}), worst relative {max(abs(a - b) / abs(b) for a, b in pairs):.3g}")
        # 1e-4, or float32's rounding of long sums: a rolling document's ~600 token log-probs
        # add up to ~-5000, where float32 steps by 5e-4 (the reference rounds as much).
        for a, b in pairs:
            assert abs(a - b) <= max(1e-4, 1e-6 * abs(b)), (a, b)
    greedy = [flag for resps in responses(ref, "tiny_mc") for r in resps for (_, flag) in r]
    assert any(greedy) and not all(greedy)
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_mc", "acc_norm,none")):
        assert ours["results"][task][metric] == ref["results"][task][metric]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_rolling"][metric] == pytest.approx(ref["results"]["tiny_rolling"][metric], rel=1e-5)


def test_greedy_generations_are_the_same_strings(both):
    ref, ours = both
    texts = [r[0] for r in responses(ours, "tiny_gen")]
    assert texts == [r[0] for r in responses(ref, "tiny_gen")]
    assert ours["results"]["tiny_gen"]["exact_match,none"] == ref["results"]["tiny_gen"]["exact_match,none"] > 0
    assert any(0 < len(t) < 8 for t in texts)  # the stop sequence cut one short (it sits at characters 8-11)


def test_model_registered_as_jaxgpt(hf_dir, task_dir, both):
    """By name, at batch 2: the same scores as the in-memory run of `both` (another batch size)."""
    import jaxgpt.lm_eval_model  # noqa: F401 (importing it registers the model)

    out = lm_eval.simple_evaluate(model="jaxgpt", model_args=f"pretrained={hf_dir}", tasks=["tiny_mc"], batch_size=2,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  bootstrap_iters=0)
    for metric in ("acc,none", "acc_norm,none"):
        assert out["results"]["tiny_mc"][metric] == both[1]["results"]["tiny_mc"][metric]


def test_eval_command_prints_the_table_and_json(capsys, hf_dir, task_dir, both):
    """`jaxgpt eval --tasks` prints lm-eval's table and JSON of the results lm-eval's `hf` model
    gets on the same directory."""
    ref = both[0]["results"]
    metrics = {"tiny_mc": ["acc", "acc_norm"], "tiny_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"]}
    args = ["eval", "--init-from", str(hf_dir), "--tasks", "tiny_mc,tiny_rolling", "--include-path", str(task_dir)]
    assert cli.main(args + ["--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for task, names in metrics.items():
        for name in names:
            assert results[task][f"{name},none"] == pytest.approx(ref[task][f"{name},none"], rel=1e-5), (task, name)
    assert cli.main(args) == 0
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("|") and not line.startswith("|-")]
    task = None
    printed = {}
    for row in rows[1:]:  # after the header: Tasks, Version, Filter, n-shot, Metric, ↑/↓, Value, ±, Stderr
        task = row[0] or task
        printed[task, row[4]] = row[6]
    assert printed == {(task, name): f"{results[task][name + ',none']:.4f}" for task, names in metrics.items()
                       for name in names}


def test_sampled_generations_draw_one_stream_per_request_reproducible_from_the_seed(hf_dir):
    """Four sampled requests of one prompt in two batches of two: four different texts (the
    second batch does not redraw the first's streams), the same four again for the same seed."""
    from types import SimpleNamespace

    kwargs = {"until": ["\n\n\n"], "do_sample": True, "temperature": 5.0, "max_gen_toks": 6}
    requests = [SimpleNamespace(args=("ROMEO: what light", kwargs)) for _ in range(4)]
    texts = lm_eval_model.JaxGPTLM(pretrained=str(hf_dir), batch_size=2).generate_until(requests)
    assert len(set(texts)) == 4, texts
    assert lm_eval_model.JaxGPTLM(pretrained=str(hf_dir), batch_size=2, seed=0).generate_until(requests) == texts
    assert set(lm_eval_model.JaxGPTLM(pretrained=str(hf_dir), batch_size=2, seed=1).generate_until(requests)).isdisjoint(texts)


@pytest.mark.parametrize("tasks, expected", [
    ("hellaswag", "cannot load the data of hellaswag"),  # offline, not cached
    ("hellaswg", "did you mean 'hellaswag'?"),
])
def test_task_errors_are_one_line(capsys, hf_dir, task_dir, tasks, expected):
    args = ["eval", "--init-from", str(hf_dir), "--tasks", tasks, "--limit", "1", "--include-path", str(task_dir)]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    print(err)
    assert "\n" not in err and expected in err, err


def test_hf_model_without_gpt2_vocabulary_is_refused(capsys, tmp_path, task_dir):
    """A char-level model exported to HF layout has no tokenizer lm-eval could use."""
    import jax

    from jaxgpt import hf, model
    from jaxgpt.config import GPTConfig

    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=65, dropout=0.0, bias=True)
    hf.save_hf(cfg, model.init_params(cfg, jax.random.key(0)), tmp_path / "hf")
    args = ["eval", "--init-from", str(tmp_path / "hf"), "--tasks", "tiny_mc", "--include-path", str(task_dir)]
    assert cli.main(args) == 1
    assert "vocabulary of 65, not GPT-2's" in capsys.readouterr().err
