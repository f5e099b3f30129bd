"""Llama and Qwen3 parity with transformers (torch, CPU): checkpoints transformers made with
random weights read by load_hf, jaxgpt models exported by save_hf and read by transformers,
RMSNorm and RoPE against transformers' own modules, KV-cache generation against full
recomputation and transformers' greedy search, and the combinations no HF architecture runs."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt
from jaxgpt import hf, model
from jaxgpt.config import GPTConfig
from jaxgpt.generate import generate
from jaxgpt.hf import HFError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama  # noqa: E402  (after the importorskip)

forward = jax.jit(jaxgpt.forward, static_argnums=2)

# GQA everywhere (4 query heads, 2 or 1 key/value heads), a rope_theta off the default.
SHAPE = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "default", "rope_theta": 500.0})
HF_MODELS = {  # name -> (config class, fields over SHAPE)
    "llama-untied": (transformers.LlamaConfig, {}),
    "llama-attention-bias-tied": (transformers.LlamaConfig, dict(attention_bias=True, tie_word_embeddings=True)),
    "llama-head_dim-mlp-bias": (transformers.LlamaConfig, dict(head_dim=16, mlp_bias=True)),
    "qwen3-head_dim-untied": (transformers.Qwen3Config, dict(head_dim=16)),
    "qwen3-mqa-tied": (transformers.Qwen3Config, dict(head_dim=8, num_key_value_heads=1, tie_word_embeddings=True)),
}


def _perturbed(m):
    """`m` with every parameter perturbed: fresh norms are ones and biases zeros, which
    would hide a misplaced tensor."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _hf_logits(m, tokens_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(tokens_BT).long()).logits.numpy()


def _tokens(cfg: GPTConfig, seed: int, B: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, cfg.block_size))  # every position


@pytest.fixture(scope="module")
def saved_by_name(tmp_path_factory):
    """name -> (transformers model, directory it saved itself to), each made once."""
    made = {}

    def get(name: str):
        if name not in made:
            config_class, fields = HF_MODELS[name]
            torch.manual_seed(len(name))
            m = _perturbed(transformers.AutoModelForCausalLM.from_config(config_class(**SHAPE | fields)))
            path = tmp_path_factory.mktemp(name)
            m.save_pretrained(path, safe_serialization=True)
            made[name] = m, path
        return made[name]

    return get


@pytest.fixture(params=list(HF_MODELS))
def saved(request, saved_by_name):
    return saved_by_name(request.param)


def test_transformers_checkpoints_load_with_their_logits(saved):
    m, path = saved
    cfg, params = jaxgpt.load_hf(path)
    c = m.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_inner, cfg.rope_base) == (
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, 500.0)
    assert (cfg.qk_norm, cfg.tie_embeddings, cfg.bias) == (
        c.model_type == "qwen3", c.tie_word_embeddings, c.attention_bias or getattr(c, "mlp_bias", False))
    tokens_BT = _tokens(cfg, 0)
    logits_BTV = np.asarray(forward(params, jnp.asarray(tokens_BT), cfg))
    diff = np.abs(logits_BTV - _hf_logits(m, tokens_BT)).max()
    print(f"max |logits diff| {c.model_type} {path.name}: {diff:.2e}")
    assert logits_BTV.dtype == np.float32 and diff <= 1e-4


def test_a_loaded_checkpoint_exports_back_exactly(saved, tmp_path):
    m, path = saved
    cfg, params = jaxgpt.load_hf(path)
    jaxgpt.save_hf(cfg, params, tmp_path)
    m_back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert type(m_back) is type(m)
    tokens_BT = _tokens(cfg, 1)
    np.testing.assert_array_equal(_hf_logits(m_back.eval(), tokens_BT), _hf_logits(m, tokens_BT))
    cfg_back, params_back = jaxgpt.load_hf(tmp_path)
    assert cfg_back == cfg
    jax.tree.map(np.testing.assert_array_equal, params_back, params)


BASE = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=97, pos="rope", rope_base=500.0,
                 norm="rmsnorm", mlp="swiglu", n_inner=40, n_kv_head=2, head_dim=8, bias=False, dropout=0.0)
JAXGPT_MODELS = {  # name -> (switches over BASE, the transformers class it exports as)
    "llama-untied": (dict(tie_embeddings=False), "LlamaForCausalLM"),
    "llama-bias-tied": (dict(bias=True), "LlamaForCausalLM"),
    "qwen3-head_dim-untied": (dict(qk_norm=True, head_dim=16, tie_embeddings=False), "Qwen3ForCausalLM"),
    "qwen3-mqa-tied": (dict(qk_norm=True, n_kv_head=1), "Qwen3ForCausalLM"),
}


def _random_params(cfg: GPTConfig, seed: int = 0) -> dict:
    """init_params with every leaf perturbed (norm scales and biases too), by NumPy: JAX's
    random numbers for each leaf would compile one program apiece."""
    rng = np.random.default_rng(seed)
    params = model.init_params(cfg, jax.random.key(seed))
    return jax.tree.map(lambda x: jnp.asarray(x + 0.3 * rng.normal(size=x.shape), jnp.float32), params)


@pytest.mark.parametrize("name", list(JAXGPT_MODELS))
def test_jaxgpt_models_export_to_transformers_and_back(tmp_path, name):
    switches, architecture = JAXGPT_MODELS[name]
    cfg = dataclasses.replace(BASE, **switches)
    params = _random_params(cfg)
    jaxgpt.save_hf(cfg, params, tmp_path)
    m, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert type(m).__name__ == architecture
    tokens_BT = _tokens(cfg, 2)
    diff = np.abs(np.asarray(forward(params, jnp.asarray(tokens_BT), cfg)) - _hf_logits(m.eval(), tokens_BT)).max()
    print(f"{name}: max |logits diff| after export: {diff:.2e}")
    assert diff <= 1e-4
    cfg_back, params_back = jaxgpt.load_hf(tmp_path)
    assert cfg_back == cfg
    assert jax.tree.structure(params_back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, params_back, params)


@pytest.mark.parametrize("norm_class", [modeling_llama.LlamaRMSNorm, transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm])
def test_rms_norm_matches_transformers(norm_class):
    rng = np.random.default_rng(3)
    x_BTD, scale_D = rng.normal(size=(2, 5, 24)).astype(np.float32), rng.normal(size=24).astype(np.float32)
    norm = norm_class(24, eps=1e-3)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(scale_D))
        want_BTD = norm(torch.from_numpy(x_BTD)).numpy()
    got_BTD = model._rms_norm({"scale": jnp.asarray(scale_D)}, jnp.asarray(x_BTD), 1e-3)
    np.testing.assert_allclose(got_BTD, want_BTD, rtol=1e-5, atol=1e-6)


def test_rope_matches_transformers():
    B, T, H, K = 2, 6, 3, 16
    config = transformers.LlamaConfig(hidden_size=H * K, num_attention_heads=H, head_dim=K,
                                      max_position_embeddings=64, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 500.0})
    rng = np.random.default_rng(4)
    q_BTHK, k_BTHK = (rng.normal(size=(B, T, H, K)).astype(np.float32) for _ in range(2))
    positions_BT = np.stack([np.arange(T), np.arange(T) + 37])  # not only 0..T-1: a cache's later positions
    with torch.no_grad():
        q_BHTK, k_BHTK = (torch.from_numpy(a).transpose(1, 2) for a in (q_BTHK, k_BTHK))
        cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(q_BHTK, torch.from_numpy(positions_BT))
        want = [a.transpose(1, 2).numpy() for a in modeling_llama.apply_rotary_pos_emb(q_BHTK, k_BHTK, cos, sin)]
    for x_BTHK, want_BTHK in zip((q_BTHK, k_BTHK), want):
        got_BTHK = model._rope(jnp.asarray(x_BTHK), jnp.asarray(positions_BT), 500.0)
        np.testing.assert_allclose(got_BTHK, want_BTHK, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-untied", "qwen3-mqa-tied"])
def test_generate_with_cache_as_full_recompute_and_transformers(saved_by_name, name):
    m, path = saved_by_name(name)
    cfg, params = jaxgpt.load_hf(path)
    prompts, n_new = [[1, 2, 3], list(range(10, 19))], 7  # the longer one ends at block_size
    assert len(prompts[1]) + n_new == cfg.block_size
    out = generate(params, cfg, prompts, max_new_tokens=n_new, temperature=0)
    for prompt, row in zip(prompts, out):
        seq = list(prompt)
        for _ in range(n_new):  # greedy on the full model over the growing sequence
            seq_BT = np.zeros((1, cfg.block_size), np.int32)  # right padding (causal, so unseen): one shape
            seq_BT[0, : len(seq)] = seq
            seq.append(int(np.argmax(forward(params, jnp.asarray(seq_BT), cfg)[0, len(seq) - 1])))
        assert row == seq[len(prompt):]
        with torch.no_grad():
            hf_seq = m.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
        assert row == hf_seq[0, len(prompt):].tolist()
    assert len(set(sum(out, []))) > 3  # varied text, not one repeated token


def test_init_from_a_llama_keeps_its_weights_under_a_shorter_block(saved_by_name):
    m, path = saved_by_name("llama-untied")
    data_cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=90, dropout=0.1)
    cfg, params = hf.init_from(path, data_cfg)
    assert (cfg.block_size, cfg.dropout, cfg.pos, "wpe" in params) == (8, 0.1, "rope", False)
    tokens_BT = _tokens(cfg, 5)
    eval_cfg = dataclasses.replace(cfg, dropout=0.0)
    assert np.abs(np.asarray(forward(params, jnp.asarray(tokens_BT), eval_cfg)) - _hf_logits(m, tokens_BT)).max() <= 1e-4
    too_big = dataclasses.replace(data_cfg, vocab_size=102)
    with pytest.raises(HFError, match=r"vocabulary \(102\) is larger .*\(101\): use data of a smaller vocabulary"):
        hf.init_from(path, too_big)


def _one_line_error(match: str, call):
    with pytest.raises(HFError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("switches, named", [
    (dict(norm="layernorm"), "model.norm = 'layernorm' with model.pos = 'rope'"),
    (dict(mlp="relu2"), "model.mlp = 'relu2' with model.pos = 'rope'"),
    (dict(logit_softcap=30.0), "model.logit_softcap = 30.0 with model.pos = 'rope'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "model.scale_attn_by_inverse_layer_idx = True"),
    (dict(qk_norm=True, bias=True), "model.bias = True with model.pos = 'rope'"),
    (dict(pos="learned", norm="layernorm", mlp="gelu", n_kv_head=4, tie_embeddings=False), "model.tie_embeddings = False with model.pos = 'learned'"),
    (dict(pos="learned", norm="layernorm", mlp="gelu"), "model.n_kv_head = 2 with model.pos = 'learned'"),
    (dict(pos="learned", norm="layernorm", mlp="gelu", n_kv_head=4, head_dim=16), "model.head_dim = 16"),
    (dict(pos="learned", n_kv_head=4), "model.norm = 'rmsnorm' with model.pos = 'learned'"),
])
def test_save_hf_refuses_what_no_hf_architecture_computes(tmp_path, switches, named):
    cfg = dataclasses.replace(BASE, **switches)
    _one_line_error(rf"^{named}.* has no Hugging Face architecture here \(GPT2LMHeadModel takes .*LlamaForCausalLM "
                    r"takes .*\); the run stays usable in jaxgpt", lambda: jaxgpt.save_hf(cfg, {}, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_config_from_hf_refuses_what_jaxgpt_computes_differently(saved_by_name):
    _, path = saved_by_name("llama-untied")
    good = json.loads((path / "config.json").read_text())
    assert hf.config_from_hf(good).rope_base == 500.0
    # transformers 4's spelling: rope_theta beside rope_scaling, read as transformers 5 reads it
    v4 = {k: v for k, v in good.items() if k != "rope_parameters"} | {"rope_theta": 250.0, "rope_scaling": None}
    assert hf.config_from_hf(v4).rope_base == transformers.LlamaConfig.from_dict(v4).rope_parameters["rope_theta"] == 250.0
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8}
    _one_line_error(r"sets rope_scaling = \{'rope_type': 'llama3'.*, which jaxgpt's Llama does not support "
                    r"\(supported: rope_type 'default' with rope_theta", lambda: hf.config_from_hf(v4 | {"rope_scaling": llama3}))
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    _one_line_error(r"sets rope_parameters = \{'rope_type': 'linear'", lambda: hf.config_from_hf(good | {"rope_parameters": linear}))
    _one_line_error(r"sets hidden_act = 'gelu', .*\(supported: silu", lambda: hf.config_from_hf(good | {"hidden_act": "gelu"}))
    qwen3 = good | {"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 4}
    _one_line_error(r"sets use_sliding_window = True, which jaxgpt's Qwen3 does not support", lambda: hf.config_from_hf(qwen3))
    no_width = {k: v for k, v in good.items() if k != "hidden_size"}
    _one_line_error(r"model_type 'llama' but no hidden_size; a Llama config.json states its shape",
                    lambda: hf.config_from_hf(no_width))
    _one_line_error(r"model_type 'mistral'; jaxgpt loads GPT-2 \('gpt2'\), Llama \('llama'\), Qwen3 \('qwen3'\)",
                    lambda: hf.config_from_hf(good | {"model_type": "mistral"}))
