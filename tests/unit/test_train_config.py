"""Training config: defaults are valid, every bad value is refused naming its field, TOML round trips."""

import pytest

from outlast.train.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistConfig,
    OptimConfig,
    TrainConfig,
    load_config,
)


def test_defaults_are_valid_and_round_trip():
    cfg = TrainConfig()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: DataConfig(docs_per_step=0), "data.docs_per_step"),
        (lambda: DataConfig(token_budget=1), "data.token_budget"),
        (lambda: DataConfig(packing="best"), "data.packing"),
        (lambda: DataConfig(balance="random"), "data.balance"),
        (lambda: DataConfig(seed=True), "data.seed"),
        (lambda: OptimConfig(lr=0), "optim.lr"),
        (lambda: OptimConfig(beta2=1.5), "optim.beta2"),
        (lambda: OptimConfig(min_lr_ratio=-0.1), "optim.min_lr_ratio"),
        (lambda: OptimConfig(grad_clip=float("nan")), "optim.grad_clip"),
        (lambda: CheckpointConfig(every=0), "checkpoint.every"),
        (lambda: CheckpointConfig(keep_last=0), "checkpoint.keep_last"),
        (lambda: DistConfig(mode="zero3"), "dist.mode"),
        (lambda: DistConfig(backend="mpi"), "dist.backend"),
        (lambda: DistConfig(timeout_s=0), "dist.timeout_s"),
        (lambda: TrainConfig(steps=0), "steps"),
        (lambda: TrainConfig(steps=5, stop_after=6), "stop_after"),
        (lambda: TrainConfig(run_dir=""), "run_dir"),
        (lambda: TrainConfig(data=DataConfig(token_budget=4096)), "data.token_budget"),
    ],
)
def test_bad_values_name_the_field(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value).startswith(field + "=") or f" {field}=" in str(info.value)


def test_model_section_errors_name_the_model_field():
    with pytest.raises(ConfigError, match=r"\[model\].*n_heads"):
        TrainConfig.from_dict({"model": {"preset": "tiny", "n_heads": 3}})
    with pytest.raises(ConfigError, match="preset"):
        TrainConfig.from_dict({"model": {"preset": "huge"}})
    with pytest.raises(ConfigError, match="no field"):
        TrainConfig.from_dict({"model": {"preset": "tiny", "layers": 3}})


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="'stpes'"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ConfigError, match=r"\['lr_max'\] in \[optim\]"):
        TrainConfig.from_dict({"optim": {"lr_max": 1.0}})


def test_lr_schedule_warms_up_then_decays_to_min():
    o = OptimConfig(warmup_steps=4, min_lr_ratio=0.1)
    factors = [o.lr_factor(s, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert o.lr_factor(20, 20) == pytest.approx(0.1)


def test_load_config_reads_toml_and_reports_bad_files(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('run_dir = "r"\nsteps = 7\n[model]\npreset = "tiny"\nn_layers = 2\n[data]\ndocs_per_step = 4\n')
    cfg = load_config(p)
    assert cfg.steps == 7 and cfg.model.build().n_layers == 2 and cfg.data.docs_per_step == 4
    assert cfg.checkpoint_dir == "r/checkpoints"
    p.write_text("steps = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_example_config_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "shakespeare_tiny.toml"
    assert load_config(example).dist.mode == "ddp"
