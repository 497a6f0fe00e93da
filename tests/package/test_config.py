"""Experiment configs: every shipped YAML validates; bad ones give one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchcycle.config import config_from_dict, load_config, parse_schedule
from torchcycle.errors import ConfigError
from torchcycle.models import CNNConfig, KNNConfig, LinearConfig, MLPConfig, SoftmaxConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

BASE = {"name": "m", "data": {"source": "sklearn:iris"}, "model": {"kind": "mlp"}}

EXPECTED = {
    "line_linear",
    "xor_mlp",
    "regression_linear",
    "linear2d_linear",
    "classification_mlp",
    "digits_softmax",
    "digits_mlp",
    "digits_cnn",
    "digits_knn",
    "wine_mlp",
    "diabetes_linear",
    "mnist_cnn",
}


def test_every_seed_system_has_a_valid_config() -> None:
    found = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert found >= EXPECTED
    for name in found:
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.name


def test_overrides_are_typed_and_do_not_touch_the_input() -> None:
    raw = {"name": "m", "data": {"source": "sklearn:iris"}, "model": {"kind": "mlp"}}
    cfg = config_from_dict(raw, ["train.epochs=3", "model.hidden=[4, 2]", "train.lr=0.5"])
    assert cfg.train.epochs == 3 and cfg.model.params["hidden"] == (4, 2) and cfg.train.lr == 0.5
    assert "train" not in raw  # the caller's dict is not mutated


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"data": {"source": "sklearn:nope"}}, "unknown sklearn data set 'nope'"),
        ({"data": {"source": "s3:bucket"}}, "unknown source scheme 's3'"),
        ({"data": {"source": "file:x.csv"}}, "data.target is required"),
        ({"data": {"source": "torchvision:MNIST"}}, "data.root is required"),
        ({"model": {"kind": "transformer"}}, "unknown model kind 'transformer'"),
        ({"model": {"kind": "mlp", "hiden": [3]}}, "unknown key model.hiden"),
        ({"model": {"kind": "mlp", "in_features": 3}}, "derived from the data"),
        ({"model": {"kind": "mlp", "hidden": "wide"}}, "model.hidden"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"optimizer": "lbfgs"}}, "train.optimizer"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"name": "bad name!"}, "name"),
    ],
)
def test_bad_config_names_the_problem(change: dict, needle: str) -> None:
    raw = {**BASE, **change}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: MLPConfig(hidden=(8, 0)), r"hidden: layer sizes must be integers >= 1, got \[8, 0\]"),
        (lambda: MLPConfig(dropout=float("nan")), r"dropout: must be in \[0, 1\), got nan"),
        (lambda: MLPConfig(activation="swish"), "activation: must be one of relu, tanh, gelu"),
        (lambda: MLPConfig(in_features=-1), "in_features: must be an integer >= 0"),
        (lambda: CNNConfig(channels=(16, -1)), "channels: must be integers >= 1"),
        (lambda: CNNConfig(image_shape=(1, 0, 8)), r"image_shape: must be \(C, H, W\)"),
        (lambda: CNNConfig(hidden=0, dropout=1.0), "hidden: must be an integer >= 1, got 0\ndropout: must be in"),
        (lambda: KNNConfig(k=0), "k: must be an integer >= 1, got 0"),
        (lambda: KNNConfig(query_chunk=0), "query_chunk: must be an integer >= 1"),
        (lambda: KNNConfig(weights="cosine"), "weights: must be uniform or distance"),
        (lambda: LinearConfig(out_features=-1), "out_features: must be an integer >= 0"),
        (lambda: SoftmaxConfig(num_classes=-2), "num_classes: must be an integer >= 0"),
    ],
)
def test_model_configs_refuse_bad_values_on_construction(make, needle: str) -> None:
    # library use, no YAML: the dataclass itself names the field (ModelSpec turns each line into model.<field>)
    with pytest.raises(ValueError, match=needle):
        make()


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        config_from_dict(BASE, ["novalue"])
    with pytest.raises(ConfigError, match="cannot parse"):
        config_from_dict(BASE, ["model.hidden=[64"])


def test_config_hash_tracks_content() -> None:
    a = config_from_dict(BASE)
    assert a.config_hash() == config_from_dict(BASE).config_hash()
    assert a.config_hash() != config_from_dict(BASE, ["seed=1"]).config_hash()
    params = a.flat_params()
    assert params["model.kind"] == "mlp" and params["data.source"] == "sklearn:iris" and "train.lr" in params


@pytest.mark.parametrize(
    ("text", "kind", "value", "described"),
    [
        ("0 2 * * *", "cron", "0 2 * * *", "cron '0 2 * * *' UTC"),
        ("  0  2 * * 1-5 ", "cron", "0 2 * * 1-5", "cron '0 2 * * 1-5' UTC"),
        ("90", "interval", "90", "every 90 s"),
        (3600, "interval", "3600", "every 3600 s"),
        ("30s", "interval", "30", "every 30 s"),
        ("15m", "interval", "900", "every 900 s"),
        ("1.5h", "interval", "5400", "every 5400 s"),
        ("1d", "interval", "86400", "every 86400 s"),
        ("off", "off", "", "no schedule"),
        (False, "off", "", "no schedule"),  # YAML reads a bare `off` as false
    ],
)
def test_schedules_parse_cron_intervals_and_off(text, kind: str, value: str, described: str) -> None:
    spec = parse_schedule(text)
    assert (spec.kind, spec.value, spec.describe()) == (kind, value, described)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("every tuesday", "is neither a cron line"),
        ("0 2 * *", "is neither a cron line"),
        ("61 2 * * *", "invalid cron line"),
        ("0s", "at least 1 s"),
        ("0.5s", "at least 1 s"),
        ("\u0663m", "is neither"),  # an Arabic-Indic 3: only ASCII digits
        ("400d", "at most a year"),
        ("-5m", "is neither"),
        ("", "is neither"),
        (True, "schedule 'true' is neither"),  # YAML's on/yes
    ],
)
def test_bad_schedules_name_the_problem(text, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_schedule(text)


def test_deployment_section_is_validated_and_outside_the_config_hash() -> None:
    cfg = config_from_dict(
        {**BASE, "deployment": {"timezone": "Europe/Berlin", "retrain": "0 3 * * *", "score": "off"}}
    )
    assert cfg.deployment.schedule("retrain").describe() == "cron '0 3 * * *' Europe/Berlin"
    assert cfg.deployment.schedule("score").kind == "off"
    assert config_from_dict(BASE).deployment.schedule("retrain") is None  # unset: deploy keeps the server's
    # when it runs is not what it trains: the hash (stage cache, "nothing new" check) ignores it
    assert cfg.config_hash() == config_from_dict(BASE).config_hash()
    assert not any(k.startswith("deployment") for k in cfg.flat_params())
    for bad, needle in (
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"score": "whenever"}, "deployment.score: schedule 'whenever' is neither"),
        ({"retrain": "1d", "score": "0.2s"}, "deployment.score: schedule interval .0.2s. must be at least 1 s"),
        ({"retrain": "0 3 * * *", "every": "1h"}, "deployment.every: unknown key"),
        ({"retrain": False, "score": "on"}, "schedule 'on' is neither"),
    ):
        with pytest.raises(ConfigError, match=needle):
            config_from_dict({**BASE, "deployment": bad})


def test_yaml_dates_are_config_errors_not_tracebacks(tmp_path: Path) -> None:
    path = tmp_path / "dated.yaml"
    path.write_text("name: m\nseed: 2024-01-01\ndata: {source: 'sklearn:iris'}\nmodel: {kind: mlp}\n")
    with pytest.raises(ConfigError, match="seed: Input should be a valid integer"):
        load_config(path)
