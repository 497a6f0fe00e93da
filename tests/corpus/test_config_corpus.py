"""A corpus of bad configs, each refused by `torchcycle train` the way a user meets it: exit 2, one `error:`
line naming the key, no traceback, and nothing written (no MLflow store, no stage cache, no Prefect run).

Rows are classes of mistakes, not single examples: non-finite numbers, values out of range, a device torch
does not know, a model that cannot use the data, a gate metric of the other task, a limit too small for the
splits, and YAML built to exhaust memory or time. Valid edges (dropout 0, limit exactly at the minimum)
load; a property test covers the ranges in between.
"""

from __future__ import annotations

import math
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from torchcycle.cli import app
from torchcycle.config import (
    MAX_CONFIG_BYTES,
    SEED_MAX,
    DataConfig,
    check_against_task,
    config_from_dict,
    load_config,
    min_rows,
    source_facts,
    split_sizes,
)
from torchcycle.errors import ConfigError

BASE = "name: corpus\ndata:\n  source: sklearn:iris\nmodel:\n  kind: mlp\ntrain:\n  epochs: 1\n"
FILE_SOURCE = "name: corpus\ndata: {source: 'file:data/train.csv', target: y}\nmodel: {kind: mlp}\n"


def _config(**sections: str) -> str:
    """A name/data/model config with whole sections given as flow YAML, e.g. _config(model="{kind: cnn}")."""
    lines = {"name": "corpus", "data": "{source: 'sklearn:iris'}", "model": "{kind: mlp}", **sections}
    return "".join(f"{key}: {value}\n" for key, value in lines.items())


def _alias_bomb(levels: int = 9, width: int = 10) -> str:
    """The "billion laughs": each anchor is a list of `width` aliases of the one before, so a few hundred
    bytes stand for width**levels strings."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return BASE + "\n".join(lines) + "\n"


# (id, YAML text, --set overrides, fragment(s) the error must contain)
CORPUS: list[tuple[str, str, list[str], str | tuple[str, ...]]] = [
    # -- every float finite ----------------------------------------------------------------------------
    ("lr-inf", BASE, ["train.lr=.inf"], "train.lr: Input should be a finite number (got inf)"),
    ("lr-nan", BASE, ["train.lr=.nan"], "train.lr: Input should be a finite number (got nan)"),
    ("lr-minus-inf-yaml", _config(train="{lr: -.inf}"), [], "train.lr: Input should be a finite number"),
    ("lr-overflowing-text", BASE, ["train.lr=1e999"], "train.lr: Input should be a finite number"),
    ("weight-decay-nan", BASE, ["train.weight_decay=.NaN"], "train.weight_decay: Input should be a finite number"),
    ("margin-inf", BASE, ["gate.margin=.inf"], "gate.margin: Input should be a finite number"),
    ("test-size-nan", BASE, ["data.test_size=.nan"], "data.test_size: Input should be a finite number"),
    ("dropout-nan", BASE, ["model.dropout=.nan"], "model.dropout: must be in [0, 1), got nan"),
    # -- numeric ranges --------------------------------------------------------------------------------
    ("seed-negative", BASE, ["seed=-1"], "seed: Input should be greater than or equal to 0 (got -1)"),
    ("seed-past-numpy", BASE, [f"seed={SEED_MAX + 1}"], f"seed: Input should be less than or equal to {SEED_MAX}"),
    ("hidden-negative", BASE, ["model.hidden=[-1]"], "model.hidden: layer sizes must be integers >= 1, got [-1]"),
    ("hidden-zero", BASE, ["model.hidden=[64, 0]"], "model.hidden: layer sizes must be integers >= 1, got [64, 0]"),
    ("dropout-above-one", BASE, ["model.dropout=1.5"], "model.dropout: must be in [0, 1), got 1.5"),
    ("dropout-one", BASE, ["model.dropout=1"], "model.dropout: must be in [0, 1), got 1"),
    (
        "momentum-one",
        BASE,
        ["train.optimizer=sgd", "train.momentum=1.0"],
        "train.momentum: Input should be less than 1",
    ),
    ("budget-zero", BASE, ["train.gpu_data_budget=0"], "train.gpu_data_budget: Input should be greater than 0"),
    ("budget-above-one", BASE, ["train.gpu_data_budget=1.5"], "train.gpu_data_budget: Input should be less than or"),
    ("batch-size-zero", BASE, ["train.batch_size=0"], "train.batch_size: must be 'auto' or a whole number >= 1"),
    ("workers-negative", BASE, ["train.num_workers=-1"], "train.num_workers: Input should be greater than or equal"),
    ("test-size-one", BASE, ["data.test_size=1"], "data.test_size: Input should be less than 1"),
    ("knn-k-zero", BASE, ["model.kind=knn", "model.k=0"], "model.k: must be an integer >= 1, got 0"),
    ("knn-chunk-zero", BASE, ["model.kind=knn", "model.query_chunk=0"], "model.query_chunk: must be an integer >= 1"),
    (
        "cnn-channel-zero",
        _config(data="{source: 'sklearn:digits'}", model="{kind: cnn, channels: [8, 0]}"),
        [],
        "model.channels: must be integers >= 1, got [8, 0]",
    ),
    (
        "cnn-hidden-zero",
        _config(data="{source: 'sklearn:digits'}", model="{kind: cnn, hidden: 0}"),
        [],
        "model.hidden: must be an integer >= 1, got 0",
    ),
    # -- device ----------------------------------------------------------------------------------------
    ("device-tpu", BASE, ["train.device=tpu"], "train.device: unknown device 'tpu': use auto, cpu, cuda, cuda:N"),
    ("device-index-word", BASE, ["train.device=cuda:first"], "train.device: unknown device 'cuda:first'"),
    ("device-upper-case", BASE, ["train.device=CUDA"], "train.device: unknown device 'CUDA'"),
    # -- model kind against the data -------------------------------------------------------------------
    ("cnn-on-tabular", BASE, ["model.kind=cnn"], "model.kind: model 'cnn' needs images; sklearn:iris is a table"),
    ("cnn-on-file", FILE_SOURCE, ["model.kind=cnn"], "model 'cnn' needs images; file:data/train.csv is a table"),
    ("linear-on-classes", BASE, ["model.kind=linear"], "model.kind: model 'linear' does regression only"),
    (
        "softmax-on-regression",
        BASE,
        ["data.source=sklearn:diabetes", "model.kind=softmax"],
        "model 'softmax' does classification only; sklearn:diabetes is regression",
    ),
    (
        "softmax-on-declared-regression",
        FILE_SOURCE,
        ["data.task=regression", "model.kind=softmax"],
        "model 'softmax' does classification only; data.task is regression",
    ),
    (
        "cnn-pools-below-a-pixel",
        _config(data="{source: 'sklearn:digits'}", model="{kind: cnn, channels: [8, 8, 8, 8]}"),
        [],
        "model.channels: 4 conv stages halve the (1, 8, 8) images of sklearn:digits below one pixel",
    ),
    ("knn-k-above-rows", BASE, ["model.kind=knn", "model.k=106"], "model.k: k=106 needs at least 106 training rows"),
    # -- gate metric against the task ------------------------------------------------------------------
    ("r2-gate-on-classes", BASE, ["gate.metric=test_r2"], "gate.metric: 'test_r2' does not apply to classification"),
    (
        "accuracy-gate-on-regression",
        BASE,
        ["data.source=synthetic:line", "model.kind=linear", "gate.metric=test_accuracy"],
        "gate.metric: 'test_accuracy' does not apply to regression; synthetic:line is regression",
    ),
    (
        "mae-gate-on-declared-classes",
        FILE_SOURCE,
        ["data.task=classification", "gate.metric=test_mae"],
        "gate.metric: 'test_mae' does not apply to classification",
    ),
    # -- data.limit against the splits -----------------------------------------------------------------
    ("limit-two", BASE, ["data.limit=2"], ("data.limit: 2 rows are too few", "the smallest limit that works is 4")),
    ("limit-below-min", BASE, ["data.limit=3"], "the smallest limit that works is 4"),
    (
        "limit-big-held-out",
        BASE,
        ["data.test_size=0.5", "data.val_size=0.4", "data.limit=12"],
        "the smallest limit that works is 20",
    ),
    (
        "small-set-big-test",
        BASE,
        ["data.source=synthetic:xor", "data.test_size=0.5"],
        "data.test_size: synthetic:xor has only 4 rows",
    ),
    # -- YAML built to exhaust memory or time ----------------------------------------------------------
    ("alias-bomb", _alias_bomb(), [], "expands to more than 100000 values through its aliases"),
    (
        "merge-key-bomb",
        BASE
        + "b0: &b0 {k: 1}\n"
        + "".join(f"b{i}: &b{i} {{<<: [{', '.join([f'*b{i - 1}'] * 10)}]}}\n" for i in range(1, 9)),
        [],
        "expands to more than 100000 values",
    ),
    ("recursive-alias", BASE + "loop: &loop [*loop]\n", [], "has an alias inside its own anchor"),
    ("deep-nesting", BASE + "deep: " + "[" * 100_000 + "\n", [], "nests deeper than 32 levels"),
    ("too-large", BASE + "# " + "x" * MAX_CONFIG_BYTES + "\n", [], f"is larger than {MAX_CONFIG_BYTES} bytes"),
    ("huge-integer", BASE + "seed: " + "9" * 5000 + "\n", [], "is not valid YAML"),
    (
        "alias-bomb-in-set",
        BASE,
        [
            "model.hidden=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
            "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
            "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]"
        ],
        "--set model.hidden: the value expands to more than 100000 values",
    ),
    ("deep-set", BASE, ["data.limit=" + "[" * 50 + "]" * 50], "--set data.limit: the value nests deeper than 32"),
    # -- drift monitoring thresholds -------------------------------------------------------------------
    ("drift-bins-one", BASE, ["drift.bins=1"], "drift.bins: Input should be greater than or equal to 2 (got 1)"),
    ("drift-threshold-inf", BASE, ["drift.threshold=.inf"], "drift.threshold: Input should be a finite number"),
    (
        "drift-warn-above-threshold",
        _config(drift="{warn: 0.3, threshold: 0.2}"),
        [],
        "drift.warn: must be below drift.threshold (0.2), got 0.3",
    ),
    # -- every problem at once, each under its dotted key ----------------------------------------------
    (
        "all-at-once",
        BASE,
        ["seed=-1", "train.lr=.nan", "model.dropout=1.5", "model.hidden=[0]", "train.device=tpu"],
        ("seed:", "train.lr:", "model.dropout:", "model.hidden:", "train.device:"),
    ),
]


@pytest.mark.parametrize(("text", "sets", "fragments"), [row[1:] for row in CORPUS], ids=[row[0] for row in CORPUS])
def test_cli_refuses_a_bad_config_in_one_line_and_writes_nothing(
    text: str, sets: list[str], fragments: str | tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # anything written relative to the working directory lands here
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
        "TORCHCYCLE_CACHE_DIR": str(tmp_path / "cache"),
    }
    args = ["train", "--config", str(config)]
    for item in sets:
        args += ["--set", item]

    started = time.perf_counter()
    result = CliRunner().invoke(app, args, env=env)
    seconds = time.perf_counter() - started

    assert result.exit_code == 2, result.output
    for fragment in (fragments,) if isinstance(fragments, str) else fragments:
        assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        result.output.splitlines()[0]
    ], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "work"]  # no store, no cache
    assert list(work.iterdir()) == []
    assert seconds < 10, f"refused after {seconds:.1f}s"  # at the edge: no Prefect, no data read


def test_corpus_covers_every_class() -> None:
    assert len(CORPUS) >= 30
    assert len({row[0] for row in CORPUS}) == len(CORPUS)


def test_alias_bomb_is_refused_in_milliseconds_and_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(levels=9, width=10))  # 10**9 strings once expanded
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_config(path)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 0.5 and peak < 10 * 2**20, (seconds, peak)


# ---- valid edges load -----------------------------------------------------------------------------
EDGES: list[tuple[str, str, list[str]]] = [
    ("dropout-zero", BASE, ["model.dropout=0.0"]),
    ("dropout-just-below-one", BASE, ["model.dropout=0.999"]),
    ("limit-at-minimum", BASE, ["data.limit=4"]),
    ("limit-at-minimum-big-held-out", BASE, ["data.test_size=0.5", "data.val_size=0.4", "data.limit=20"]),
    ("seed-bounds", BASE, [f"seed={SEED_MAX}"]),
    ("momentum-below-one", BASE, ["train.optimizer=sgd", "train.momentum=0.99"]),
    ("whole-gpu-budget", BASE, ["train.gpu_data_budget=1"]),
    ("device-cuda-index", BASE, ["train.device=cuda:1"]),
    ("device-mps", BASE, ["train.device=mps"]),
    ("knn-k-equal-to-rows", BASE, ["model.kind=knn", "model.k=105"]),  # iris: 150 - 30 test - 15 val
    ("xor-no-held-out", BASE, ["data.source=synthetic:xor", "data.test_size=0", "data.val_size=0"]),
    (
        "cnn-three-stages-on-digits",
        _config(data="{source: 'sklearn:digits'}", model="{kind: cnn, channels: [4, 4, 4]}"),
        [],
    ),
    (
        "cnn-four-stages-on-mnist",
        _config(data="{source: 'torchvision:MNIST', root: data}", model="{kind: cnn, channels: [4, 4, 4, 4]}"),
        [],
    ),
    ("file-task-unknown", FILE_SOURCE, ["model.kind=linear", "gate.metric=test_r2"]),  # checked after ingest
    ("mse-gate-on-regression", BASE, ["data.source=sklearn:diabetes", "model.kind=linear", "gate.metric=test_mse"]),
    ("drift-bounds", BASE, ["drift.bins=100", "drift.warn=0.001", "drift.threshold=50"]),
]


@pytest.mark.parametrize(("text", "sets"), [row[1:] for row in EDGES], ids=[row[0] for row in EDGES])
def test_valid_edges_load(text: str, sets: list[str], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    load_config(config, sets)


def test_anchors_aliases_and_merge_keys_in_moderation_load(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "name: a\ndata: {source: 'sklearn:iris'}\nmodel: {kind: mlp, hidden: [&width 8, *width]}\n"
        "train: {<<: &base {epochs: 2, lr: 0.01}, batch_size: 8}\n"
    )
    cfg = load_config(config)
    assert cfg.model.params["hidden"] == (8, 8) and cfg.train.epochs == 2 and cfg.train.batch_size == 8


# ---- the task check both the edge and the post-ingest check call ---------------------------------------
def test_check_against_task_names_the_keys() -> None:
    cfg = config_from_dict(
        {
            "name": "m",
            "data": {"source": "file:x.csv", "target": "y"},
            "model": {"kind": "softmax"},
            "gate": {"metric": "test_accuracy"},
        }
    )
    check_against_task(cfg, "classification")
    with pytest.raises(ConfigError) as err:
        check_against_task(cfg, "regression")
    text = str(err.value)
    assert "model.kind: model 'softmax' does classification only; the data is regression" in text
    assert "gate.metric: 'test_accuracy' does not apply to regression" in text


# ---- the edge's facts agree with what ingest and preprocess do ----------------------------------------
@pytest.mark.parametrize(
    "source",
    [f"sklearn:{n}" for n in ("digits", "iris", "wine", "breast_cancer", "diabetes")]
    + [f"synthetic:{n}" for n in ("line", "xor", "regression", "linear2d", "classification")],
)
def test_source_facts_match_ingest(source: str) -> None:
    from torchcycle.tasks.ingest import ingest

    raw = ingest(DataConfig(source=source, test_size=0, val_size=0))
    facts = source_facts(source)
    assert (facts.task, facts.rows, facts.image_shape) == (raw.task, len(raw.frame), raw.image_shape)


@pytest.mark.parametrize(("test_size", "val_size"), [(0.2, 0.1), (0.5, 0.4), (0.3, 0.0), (0.0, 0.25), (0.15, 0.15)])
def test_split_sizes_match_preprocess(test_size: float, val_size: float) -> None:
    from torchcycle.tasks.ingest import RawData, frame_digest
    from torchcycle.tasks.preprocess import preprocess

    n = min_rows(test_size, val_size)
    frame = pd.DataFrame({"x": range(n), "y": [float(i) for i in range(n)]})
    raw = RawData(frame=frame, target="y", task="regression", source="file:x", digest=frame_digest(frame))
    splits = preprocess(raw, DataConfig(source="file:x", target="y", test_size=test_size, val_size=val_size), 0)
    train, val, test = split_sizes(n, test_size, val_size)
    assert len(splits.train) == train >= 2
    # a size of 0 holds nothing out: validation reuses the training rows, the test all rows
    assert (len(splits.val), len(splits.test)) == (val or train, test or n)


# ---- properties ----------------------------------------------------------------------------------
FLOAT_KEYS = [
    ("train", "lr"),
    ("train", "momentum"),
    ("train", "weight_decay"),
    ("train", "min_delta"),
    ("train", "gpu_data_budget"),
    ("gate", "margin"),
    ("data", "test_size"),
    ("data", "val_size"),
    ("model", "dropout"),
    ("drift", "warn"),
    ("drift", "threshold"),
]


def _raw(section: str, key: str, value: float) -> dict:
    raw = {"name": "m", "data": {"source": "sklearn:iris"}, "model": {"kind": "mlp"}}
    raw.setdefault(section, {})[key] = value
    return raw


@settings(max_examples=200, deadline=None)
@given(
    lr=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False),
    dropout=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    momentum=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    budget=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    seed=st.integers(min_value=0, max_value=SEED_MAX),
)
def test_any_finite_in_range_value_loads(lr: float, dropout: float, momentum: float, budget: float, seed: int) -> None:
    raw = {
        "name": "m",
        "seed": seed,
        "data": {"source": "sklearn:iris"},
        "model": {"kind": "mlp", "dropout": dropout},
        "train": {"lr": lr, "momentum": momentum, "gpu_data_budget": budget},
    }
    cfg = config_from_dict(raw)
    assert cfg.train.lr == lr and cfg.model.params["dropout"] == dropout


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(FLOAT_KEYS), value=st.sampled_from([math.inf, -math.inf, math.nan]))
def test_any_non_finite_value_is_refused_by_name(key: tuple[str, str], value: float) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(*key, value))
    assert f"{key[0]}.{key[1]}:" in str(err.value)


@settings(max_examples=200, deadline=None)
@given(
    test_size=st.floats(min_value=0.0, max_value=0.9),
    val_size=st.floats(min_value=0.0, max_value=0.9),
    limit=st.integers(min_value=1, max_value=400),
)
def test_limit_is_refused_exactly_below_the_minimum_it_names(test_size: float, val_size: float, limit: int) -> None:
    assume(test_size + val_size < 1.0)

    def load(rows: int) -> None:
        data = {"source": "file:x.csv", "target": "y", "test_size": test_size, "val_size": val_size, "limit": rows}
        config_from_dict({"name": "m", "data": data, "model": {"kind": "mlp"}})

    smallest = min_rows(test_size, val_size)
    load(smallest)  # the named minimum works ...
    train, val, test = split_sizes(smallest, test_size, val_size)
    assert train >= 2 and (val >= 1 or not val_size) and (test >= 1 or not test_size)
    if limit >= smallest:  # ... and so does anything above it
        load(limit)
    else:  # ... and nothing below it, each refusal naming it
        with pytest.raises(ConfigError, match=f"the smallest limit that works is {smallest}$"):
            load(limit)
