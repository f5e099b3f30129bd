"""GPT-2 parity with transformers (torch, CPU): logits and loss of HF-saved models, a
jaxgpt-trained model exported and read back, and the official sizes' parameter counts."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgpt
from jaxgpt import config, decode, hf, model
from jaxgpt.config import GPTConfig
from jaxgpt.generate import generate
from jaxgpt.hf import HFError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Compiled: eager JAX dispatches op by op and would be most of this file's run time.
forward = jax.jit(jaxgpt.forward, static_argnums=2)
loss_fn = jax.jit(model.loss_fn, static_argnums=3)

# Odd vocabularies, n_head != n_layer, non-default n_positions; one explicit n_inner.
SHAPES = {
    "odd-vocab": dict(vocab_size=97, n_positions=24, n_embd=32, n_layer=2, n_head=4),
    "n_inner": dict(vocab_size=251, n_positions=40, n_embd=48, n_layer=3, n_head=6, n_inner=192),
    "gpt2-vocab": dict(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=1),
}


def _hf_model(shape: dict, seed: int):
    """A transformers GPT-2 with every parameter perturbed, biases and LayerNorms included
    (fresh ones are zeros and ones, which would hide a misplaced tensor)."""
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _hf_logits(m, tokens_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(tokens_BT).long()).logits.numpy()


@pytest.fixture(scope="module", params=list(SHAPES))
def saved(request, tmp_path_factory):
    """(shape, transformers model, directory it saved itself to)."""
    shape = SHAPES[request.param]
    m = _hf_model(shape, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(path)
    return shape, m, path


def test_logits_match_transformers(saved):
    shape, m, path = saved
    cfg, params = jaxgpt.load_hf(path)
    assert (cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head) == (
        shape["vocab_size"], shape["n_positions"], shape["n_embd"], shape["n_layer"], shape["n_head"])
    tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.block_size))  # every position
    logits_BTV = np.asarray(forward(params, jnp.asarray(tokens_BT), cfg))
    diff = np.abs(logits_BTV - _hf_logits(m, tokens_BT)).max()
    print(f"max |logits diff| {shape}: {diff:.2e}")
    assert logits_BTV.dtype == np.float32 and diff <= 1e-4


def test_loss_matches_transformers_labels(saved):
    shape, m, path = saved
    cfg, params = jaxgpt.load_hf(path)
    x_BT = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 17))
    labels_BT = x_BT.copy()
    labels_BT[0, 5:9] = -100  # transformers leaves these out of the mean
    with torch.no_grad():
        ref = m(torch.from_numpy(x_BT).long(), labels=torch.from_numpy(labels_BT).long()).loss.item()
    # transformers shifts inside: position t predicts labels[t + 1].
    mask_BT = jnp.asarray(labels_BT[:, 1:] != -100)
    loss = loss_fn(params, jnp.asarray(x_BT[:, :-1]), jnp.asarray(x_BT[:, 1:]), cfg, None, mask_BT)
    print(f"|loss diff| {shape}: {abs(float(loss) - ref):.2e}")
    assert abs(float(loss) - ref) <= 1e-5


def test_bfloat16_checkpoint_reads_as_float32(saved, tmp_path):
    _, m, _ = saved
    m_bf16 = transformers.GPT2LMHeadModel(m.config).to(torch.bfloat16)
    m_bf16.load_state_dict(m.state_dict())
    m_bf16.save_pretrained(tmp_path)
    _, params = jaxgpt.load_hf(tmp_path)
    wte = m_bf16.transformer.wte.weight.detach().float().numpy()
    assert params["wte"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params["wte"]), wte)


def test_bin_and_sharded_checkpoints_read_alike(saved, tmp_path):
    _, m, path = saved
    (tmp_path / "bin").mkdir()
    torch.save(m.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((path / "config.json").read_text())
    m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cfg, params = jaxgpt.load_hf(path)
    for layout in ("bin", "sharded"):
        cfg_other, params_other = jaxgpt.load_hf(tmp_path / layout)
        assert cfg_other == cfg
        jax.tree.map(np.testing.assert_array_equal, params_other, params)


# The GPT2Config fields that change the computation, off their defaults. reorder_and_upcast_attn
# acts only in transformers' eager attention, so that model runs eager.
VARIANTS = {
    "gelu-eps-layer-scaled": dict(vocab_size=101, n_positions=20, n_embd=32, n_layer=2, n_head=4, n_inner=96,
                                  activation_function="gelu", layer_norm_epsilon=1e-3,
                                  scale_attn_by_inverse_layer_idx=True),
    "relu-odd-inner-upcast": dict(vocab_size=89, n_positions=20, n_embd=32, n_layer=2, n_head=2, n_inner=37,
                                  activation_function="relu", layer_norm_epsilon=1e-4, reorder_and_upcast_attn=True,
                                  attn_implementation="eager"),
    "tanh-unscaled": dict(vocab_size=97, n_positions=20, n_embd=32, n_layer=2, n_head=4, n_inner=50,
                          activation_function="gelu_pytorch_tanh", scale_attn_weights=False,
                          scale_attn_by_inverse_layer_idx=True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(transformers model, jaxgpt's (cfg, params) of the directory it saved itself to)."""
    m = _hf_model(VARIANTS[request.param], seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(path, safe_serialization=True)
    return m, jaxgpt.load_hf(path)


def test_config_variants_match_transformers_and_export(variant, tmp_path):
    m, (cfg, params) = variant
    tokens_BT = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, cfg.block_size))
    want_BTV = _hf_logits(m, tokens_BT)
    diff = np.abs(np.asarray(forward(params, jnp.asarray(tokens_BT), cfg)) - want_BTV).max()
    print(f"max |logits diff| {cfg}: {diff:.2e}")
    assert diff <= 1e-4
    jaxgpt.save_hf(cfg, params, tmp_path)
    m_back, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    diff_back = np.abs(_hf_logits(m_back.eval(), tokens_BT) - want_BTV).max()
    print(f"max |logits diff| after save_hf: {diff_back:.2e}")
    assert diff_back <= 1e-4
    assert jaxgpt.load_hf(tmp_path)[0] == cfg
    assert config.loads(config.dumps(config.Config(model=cfg))).model == cfg  # a run dir's config.toml


def test_config_variants_generate_with_cache_as_full_forward(variant):
    _, (cfg, params) = variant
    tokens_BT = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12))
    positions_BT = np.broadcast_to(np.arange(12), (2, 12))
    cache = decode.init_cache(cfg, 2, 16)
    first_BTV, cache = decode.forward(params, tokens_BT[:, :7], positions_BT[:, :7], cache, 0, cfg)
    rest_BTV, _ = decode.forward(params, tokens_BT[:, 7:], positions_BT[:, 7:], cache, 7, cfg)
    want_BTV = forward(params, jnp.asarray(tokens_BT), cfg)
    np.testing.assert_allclose(np.concatenate([first_BTV, rest_BTV], axis=1), want_BTV, atol=1e-5, rtol=1e-5)
    prompts = [[1, 2, 3], list(range(10, 23))]  # the second passes block_size: the sliding window runs too
    out = generate(params, cfg, prompts, max_new_tokens=12, temperature=0)
    for prompt, row in zip(prompts, out):
        seq = list(prompt)
        for _ in range(12):  # nanoGPT's loop: crop to block_size, run the full model, take argmax
            window = seq[-cfg.block_size :]
            window_BT = np.zeros((1, cfg.block_size), np.int32)  # right padding: causal, so unseen
            window_BT[0, : len(window)] = window
            seq.append(int(np.argmax(forward(params, jnp.asarray(window_BT), cfg)[0, len(window) - 1])))
        assert row == seq[len(prompt) :]
    assert len(set(sum(out, []))) > 3  # varied text, not one repeated token


def _train(cfg: GPTConfig, steps: int = 5):
    """A few AdamW steps on random tokens; returns the params and the first and last loss."""
    params = model.init_params(cfg, jax.random.key(0))
    opt = optax.adamw(3e-3, weight_decay=0.1)
    state = opt.init(params)
    x_BT = jax.random.randint(jax.random.key(1), (4, cfg.block_size + 1), 0, cfg.vocab_size)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(model.loss_fn)(params, x_BT[:, :-1], x_BT[:, 1:], cfg)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, losses


@pytest.mark.parametrize("bias", [True, False])
def test_trained_model_exports_to_transformers_and_back(tmp_path, bias):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=67, dropout=0.0, bias=bias)
    params, losses = _train(cfg)
    assert losses[-1] < losses[0]
    jaxgpt.save_hf(cfg, params, tmp_path)
    m, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    tokens_BT = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, cfg.block_size))
    diff = np.abs(np.asarray(forward(params, jnp.asarray(tokens_BT), cfg)) - _hf_logits(m.eval(), tokens_BT)).max()
    print(f"trained (bias={bias}), max |logits diff| after export: {diff:.2e}")
    assert diff <= 1e-4
    cfg_back, params_back = jaxgpt.load_hf(tmp_path)
    assert cfg_back == dataclasses.replace(cfg, bias=True)
    if bias:  # bit-identical; without biases the export adds zero ones
        assert jax.tree.structure(params_back) == jax.tree.structure(params)
        jax.tree.map(np.testing.assert_array_equal, params_back, params)


OFFICIAL = {  # published parameter counts (tied output layer counted once)
    "gpt2": (dict(n_embd=768, n_layer=12, n_head=12), 124_439_808),
    "gpt2-medium": (dict(n_embd=1024, n_layer=24, n_head=16), 354_823_168),
    "gpt2-large": (dict(n_embd=1280, n_layer=36, n_head=20), 774_030_080),
    "gpt2-xl": (dict(n_embd=1600, n_layer=48, n_head=25), 1_557_611_200),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_sizes_without_allocating(name):
    shape, published = OFFICIAL[name]
    hf_config = transformers.GPT2Config(**shape)
    abstract = model.abstract_params(hf.config_from_hf(hf_config.to_dict()))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert model.count_params(abstract) == published
    with torch.device("meta"):  # transformers' own count, also without memory
        assert transformers.GPT2LMHeadModel(hf_config).num_parameters() == published


def _one_line_error(match: str, call):
    with pytest.raises(HFError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_hub_name_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # so that no local directory is named gpt2-medium
    import huggingface_hub.constants

    # huggingface_hub reads the environment once, at import (transformers imported it already).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _one_line_error("no directory 'gpt2-medium', and the Hub is offline.*; pass a local directory", lambda: jaxgpt.load_hf("gpt2-medium"))
    _one_line_error("no directory './gpt2'; pass a local directory", lambda: jaxgpt.load_hf("./gpt2"))


def test_not_gpt2_errors_are_one_line(saved, tmp_path):
    shape, _, path = saved
    good = json.loads((path / "config.json").read_text())

    def write(config: dict | None, weights: bool = True):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if weights:
            (d / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
        return d

    _one_line_error("no config.json", lambda: jaxgpt.load_hf(write(None)))
    _one_line_error("model_type 'llama'", lambda: jaxgpt.load_hf(write(good | {"model_type": "llama"})))
    _one_line_error(r"activation_function = 'silu', .*\(supported: gelu_new, gelu_pytorch_tanh, gelu, relu\)$",
                    lambda: jaxgpt.load_hf(write(good | {"activation_function": "silu"})))
    _one_line_error("n_inner = 0, .*supported: a positive integer", lambda: jaxgpt.load_hf(write(good | {"n_inner": 0})))
    _one_line_error("layer_norm_epsilon = 'small'", lambda: jaxgpt.load_hf(write(good | {"layer_norm_epsilon": "small"})))
    _one_line_error("tie_word_embeddings = False, .*supported: true", lambda: jaxgpt.load_hf(write(good | {"tie_word_embeddings": False})))
    _one_line_error("add_cross_attention = True, .*supported: false", lambda: jaxgpt.load_hf(write(good | {"add_cross_attention": True})))
    _one_line_error("mlp.c_fc.bias has shape .*implies \\(7,\\)", lambda: jaxgpt.load_hf(write(good | {"n_inner": 7})))  # now a shape
    _one_line_error("no model.safetensors or pytorch_model.bin", lambda: jaxgpt.load_hf(write(good, weights=False)))
    _one_line_error(f"lacks 12 of GPT-2's tensors, e.g. h.{shape['n_layer']}.", lambda: jaxgpt.load_hf(write(good | {"n_layer": shape["n_layer"] + 1})))
    _one_line_error("wpe.weight has shape", lambda: jaxgpt.load_hf(write(good | {"n_positions": 8})))
    _one_line_error("is a file", lambda: jaxgpt.load_hf(path / "config.json"))


def test_init_from_keeps_weights_and_crops_positions(tmp_path):
    shape = SHAPES["odd-vocab"]
    m = _hf_model(shape, seed=7)
    m.save_pretrained(tmp_path)
    data_cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=90, dropout=0.0)
    cfg, params = hf.init_from(tmp_path, data_cfg)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (shape["n_layer"], shape["n_head"], shape["n_embd"])
    assert (cfg.block_size, cfg.vocab_size, cfg.dropout) == (8, shape["vocab_size"], 0.0)
    assert params["wpe"].shape == (8, shape["n_embd"])
    tokens_BT = np.random.default_rng(3).integers(0, 90, (2, 8))
    assert np.abs(np.asarray(forward(params, jnp.asarray(tokens_BT), cfg)) - _hf_logits(m, tokens_BT)).max() <= 1e-4
    too_big = dataclasses.replace(data_cfg, vocab_size=shape["vocab_size"] + 1)
    _one_line_error("the data's vocabulary .* --encoding gpt2", lambda: hf.init_from(tmp_path, too_big))
    too_long = dataclasses.replace(data_cfg, block_size=shape["n_positions"] + 1)
    _one_line_error("block_size 25 exceeds", lambda: hf.init_from(tmp_path, too_long))


def test_export_with_gpt2_tokenizer_loads_in_auto_classes(tmp_path):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    tok = jaxgpt.get_tokenizer("gpt2")
    jaxgpt.save_hf(cfg, params, tmp_path, tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, naïve 👨‍👩‍👧 café\r\n  x"
    assert hf_tok.encode(text) == tok.encode(text) and hf_tok.eos_token_id == tok.eot_token
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens_BT = np.asarray([tok.encode(text)])
    assert np.abs(np.asarray(forward(params, jnp.asarray(tokens_BT), cfg)) - _hf_logits(m, tokens_BT)).max() <= 1e-4
