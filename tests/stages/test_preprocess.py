"""preprocess: seeded, stratified splits that leave the input alone."""

from __future__ import annotations

import pandas as pd
from stage_data import _raw, _table

from torchcycle.config import DataConfig
from torchcycle.tasks.ingest import ingest
from torchcycle.tasks.preprocess import preprocess


# ---- preprocess ---------------------------------------------------------------------------------
def test_preprocess_split_is_seeded_stratified_and_leaves_input_alone() -> None:
    frame = _table().assign(y=lambda f: f["y"].where(f.index != 0))  # one unlabeled row
    before = frame.copy()
    cfg = DataConfig(source="file:x", target="y", test_size=0.2, val_size=0.2)
    s = preprocess(_raw(frame), cfg, seed=0)
    pd.testing.assert_frame_equal(frame, before)
    assert s.dropped_rows == 1
    assert len(s.train) + len(s.val) + len(s.test) == 59
    assert set(s.test["y"]) == {"a", "b", "c"}  # stratified
    again = preprocess(_raw(frame), cfg, seed=0)
    pd.testing.assert_frame_equal(s.test, again.test)
    other = preprocess(_raw(frame), cfg, seed=1)
    assert not s.test.equals(other.test)


def test_preprocess_zero_sizes_reuse_training_rows() -> None:
    raw = ingest(DataConfig(source="synthetic:xor"))
    s = preprocess(raw, DataConfig(source="synthetic:xor", test_size=0, val_size=0), seed=0)
    assert len(s.train) == len(s.val) == len(s.test) == 4
