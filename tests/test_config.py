import dataclasses

import pytest

from jaxgpt import config
from jaxgpt.config import Config, ConfigError


def test_toml_round_trip():
    cfg = config.load("shakespeare-char")
    assert config.loads(config.dumps(cfg)) == cfg


def test_presets_keep_nanogpts_values():
    baby = config.load("shakespeare-char")
    assert (baby.model.n_layer, baby.model.n_head, baby.model.n_embd, baby.model.block_size) == (6, 6, 384, 256)
    assert (baby.data.batch_size, baby.model.dropout, baby.model.bias) == (64, 0.2, False)
    assert (baby.optim.learning_rate, baby.optim.min_lr, baby.optim.lr_decay_iters) == (1e-3, 1e-4, 5000)
    assert (baby.optim.warmup_iters, baby.optim.beta2, baby.train.max_iters) == (100, 0.99, 5000)
    cpu = config.load("shakespeare-char-cpu")
    assert (cpu.model.n_layer, cpu.model.n_head, cpu.model.n_embd, cpu.model.block_size) == (4, 4, 128, 64)
    assert (cpu.data.batch_size, cpu.model.dropout, cpu.train.max_iters) == (12, 0.0, 2000)
    for c in (baby, cpu):
        assert (c.optim.weight_decay, c.optim.beta1, c.optim.grad_clip) == (0.1, 0.9, 1.0)


@pytest.mark.parametrize("name", config.preset_names())
def test_every_preset_builds_its_model_and_optimizer(name):
    """Shapes only (jax.eval_shape): a preset whose switches do not fit together fails here."""
    import jax

    from jaxgpt import model, optim

    cfg = config.load(name)
    assert config.loads(config.dumps(cfg)) == cfg
    abstract = model.abstract_params(cfg.model)
    jax.eval_shape(optim.make_optimizer(cfg.optim).init, abstract)
    assert model.count_params(abstract) > 0


def test_speedrun_presets_use_the_modern_recipe():
    for name in ("shakespeare-char-speedrun", "gpt2-speedrun"):
        m, o = config.load(name).model, config.load(name).optim
        assert (m.pos, m.norm, m.qk_norm, m.mlp, m.tie_embeddings, o.optimizer) == ("rope", "rmsnorm", True, "relu2",
                                                                                     False, "muon")
    gpt2 = config.load("gpt2-speedrun")
    assert (gpt2.model.n_layer, gpt2.model.n_embd, gpt2.model.block_size) == (12, 768, 1024)


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layr' \(did you mean 'n_layer'\?\)"):
        config.loads("[model]\nn_layr = 3\n")


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="model.n_layer must be int"):
        config.loads('[model]\nn_layer = "four"\n')
    with pytest.raises(ConfigError, match="model.bias must be bool"):
        config.loads("[model]\nbias = 1\n")


def test_int_is_accepted_for_float():
    cfg = config.loads("[optim]\nlearning_rate = 1\n")
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)


def test_preset_typo_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'shakespeare-char-cpu'"):
        config.load("shakespeare-char-cp")


def test_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nmax_iters = 7\n")
    cfg = config.load(str(path))
    assert cfg == dataclasses.replace(Config(), train=dataclasses.replace(Config().train, max_iters=7))


def test_choice_fields_and_mesh_section():
    cfg = config.loads('[train]\ncompute_dtype = "bfloat16"\nremat = "block"\n[mesh]\nfsdp = 4\ntensor = 2\n')
    assert (cfg.train.compute_dtype, cfg.train.remat, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (
        "bfloat16", "block", -1, 4, 2)
    assert config.loads(config.dumps(cfg)) == cfg
    with pytest.raises(ConfigError, match="train.compute_dtype must be one of 'auto', 'float32', 'bfloat16', got 'fp16'"):
        config.loads('[train]\ncompute_dtype = "fp16"\n')
