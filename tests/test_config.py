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


SECTIONS = {"model": config.GPTConfig, "data": config.DataConfig, "optim": config.OptimConfig,
            "train": config.TrainConfig, "mesh": config.MeshConfig, "eval": config.EvalConfig}


def test_every_number_has_an_allowed_range():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            if {int, float} & {f.type, *getattr(f.type, "__args__", ())}:
                assert "allowed" in f.metadata, f"{cls.__name__}.{f.name} has no allowed range"


@pytest.mark.parametrize("flag, value, expected", [
    ("--train.eval-interval", "0", "train.eval_interval must be at least 1, got 0"),
    ("--train.log-interval", "0", "train.log_interval must be at least 1, got 0"),
    ("--train.eval-iters", "0", "train.eval_iters must be at least 1, got 0"),
    ("--train.grad-accum", "0", "train.grad_accum must be at least 1, got 0"),
    ("--train.keep", "0", "train.keep must be at least 1, got 0"),
    ("--train.seed", "-1", "train.seed must be in [0, 4294967296), got -1"),
    ("--data.batch-size", "0", "data.batch_size must be at least 1, got 0"),
    ("--model.dropout", "1.0", "model.dropout must be in [0, 1), got 1.0"),
    ("--model.n-layer", "0", "model.n_layer must be at least 1, got 0"),
    ("--optim.learning-rate", "0", "optim.learning_rate must be greater than 0, got 0.0"),
    ("--optim.beta2", "1", "optim.beta2 must be in [0, 1), got 1.0"),
    ("--optim.decay-fraction", "0", "optim.decay_fraction must be in (0, 1], got 0.0"),
    ("--optim.weight-decay", "-0.1", "optim.weight_decay must be at least 0, got -0.1"),
    ("--mesh.fsdp", "0", "mesh.fsdp must be -1 or at least 1, got 0"),
    ("--eval.limit", "0", "eval.limit must be at least 1, got 0"),
])
def test_values_that_cannot_work_are_one_line_errors(capsys, flag, value, expected):
    from jaxgpt import cli

    assert cli.main(["train", flag, value]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err


def test_ranges_hold_in_config_files_and_edges_pass():
    with pytest.raises(ConfigError, match=r"^optim.muon_momentum must be in \[0, 1\), got 1.5$"):
        config.loads("[optim]\nmuon_momentum = 1.5\n")
    with pytest.raises(ConfigError, match="^model.layer_norm_eps must be at least 0, got nan$"):
        config.loads("[model]\nlayer_norm_eps = nan\n")
    cfg = config.loads("[model]\ndropout = 0.0\n[optim]\ndecay_fraction = 1.0\n[mesh]\ndata = -1\nfsdp = 2\n"
                       "[train]\nmax_iters = 0\nseed = 4294967295\n")
    assert (cfg.optim.decay_fraction, cfg.mesh.data, cfg.train.max_iters) == (1.0, -1, 0)
