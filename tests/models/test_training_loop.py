"""The training loop's phases: steps per epoch under DDP, progress output in logs, the train config section."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

import torchcycle.models.training as training
from torchcycle.config import _TRAIN_LIMITS, TrainSection, _fields_of, _Strict
from torchcycle.models.mlp import MLP, MLPConfig
from torchcycle.models.training import TensorData, TrainConfig, fit, steps_per_epoch


def _data(n: int, f: int = 4) -> TensorData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 20, f, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorData(x[:n], y[:n], x[n:], y[n:])


# ---- steps per epoch: what the LR schedule is sized from ------------------------------------------
@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streaming"])
@pytest.mark.parametrize(("n", "world", "batch_size"), [(321, 2, 32), (100, 3, 64), (101, 3, 7), (47, 4, 3), (9, 1, 4)])
def test_steps_per_epoch_is_what_every_rank_iterates(monkeypatch, n, world, batch_size, resident) -> None:
    """Counted from `_train_batches` itself on every rank, for N not divisible by the world size. No
    processes: DistributedSampler takes the (patched) rank and world size without a process group."""
    data = _data(n)
    cfg = TrainConfig(batch_size=batch_size, num_workers=0)
    expected = steps_per_epoch(n, batch_size, world, resident)
    for rank in range(world):
        monkeypatch.setattr(training, "distributed", lambda rank=rank: (rank, world))
        gen = torch.Generator().manual_seed(0)
        batches = list(training._train_batches(data, cfg, torch.device("cpu"), resident, gen, epoch=1))
        assert len(batches) == expected, (rank, world)


def test_streaming_ranks_take_more_steps_than_an_even_split_would() -> None:
    """The bug: N // world rows a rank (10 steps here) under-counts the padded ceil(N / world) (11 steps),
    so a one-cycle schedule sized from it was stepped past its end."""
    assert steps_per_epoch(321, 32, 2, resident=True) == 10  # 160 rows a rank, batches of 16
    assert steps_per_epoch(321, 32, 2, resident=False) == 11  # 161 rows a rank


def _ddp_rank(rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        training.data_fits_on_device = lambda *a: False  # the streaming path (on CPU the data always fits)
        torch.manual_seed(0)
        model = MLP(MLPConfig(in_features=4, out_features=2, hidden=(8,)))
        cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, schedule="onecycle", patience=0, num_workers=0)
        result = fit(model, _data(321), cfg, task="classification", device=torch.device("cpu"), progress=False)
        torch.save({"epochs": len(result.history), "state": model.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="no gloo backend in this torch build")
def test_two_process_streaming_ddp_runs_its_one_cycle_schedule_to_the_end(tmp_path: Path) -> None:
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["epochs"] for r in ranks] == [2, 2]
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k  # DDP: every rank ends with the same weights


# ---- progress: a bar on a terminal, plain lines in logs -------------------------------------------
def _fit_with_progress(epochs: int) -> None:
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=4, out_features=2, hidden=(8,)))
    cfg = TrainConfig(epochs=epochs, batch_size=16, patience=0)
    fit(model, _data(64), cfg, task="classification", device=torch.device("cpu"), progress=True)


def test_progress_off_a_terminal_is_one_plain_line_per_epoch(capsys) -> None:
    _fit_with_progress(3)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split()[:2] for line in lines] == [["epoch", f"{e}/3"] for e in (1, 2, 3)], err
    assert all(" train_loss=" in line and " val_loss=" in line and " val_accuracy=" in line for line in lines)


def test_progress_on_a_terminal_is_a_bar(capsys, monkeypatch) -> None:
    monkeypatch.setattr(training, "_on_terminal", lambda stream: True)
    _fit_with_progress(2)
    err = capsys.readouterr().err
    assert "\r" in err and "epoch 1/2" not in err


def test_scoring_off_a_terminal_says_one_line_per_file(tmp_path: Path, capsys) -> None:
    from torchcycle.registry import ResolvedModel
    from torchcycle.tasks.score import Scorer

    src = tmp_path / "in.parquet"
    pd.DataFrame({"x1": np.linspace(0, 1, 500)}).to_parquet(src, row_group_size=100)
    scorer = Scorer(lambda f: pd.DataFrame({"prediction": f["x1"]}), {"x1": "number"}, ResolvedModel("m", "1", "r"))
    scorer.batch_rows = 100
    scorer.score([src], tmp_path / "out.parquet")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.startswith("scored in.parquet: 500 rows in ") and len(err.splitlines()) == 1, err


# ---- the config section is TrainConfig's fields --------------------------------------------------
def test_train_section_has_exactly_the_train_config_fields_and_defaults() -> None:
    assert list(TrainSection.model_fields) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert TrainSection().to_train_config() == TrainConfig()
    assert set(_TRAIN_LIMITS) <= set(TrainSection.model_fields)
    changed = TrainSection(epochs=3, optimizer="sgd", momentum=0.5, device="cuda:1").to_train_config()
    assert changed == TrainConfig(epochs=3, optimizer="sgd", momentum=0.5, device="cuda:1")


def test_a_limit_on_a_field_train_config_lacks_is_refused() -> None:
    with pytest.raises(TypeError, match="limits for learning_rate, which TrainConfig does not have"):
        _fields_of(TrainConfig, {**_TRAIN_LIMITS, "learning_rate": _TRAIN_LIMITS["lr"]}, _Strict)
