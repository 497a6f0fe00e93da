"""Image sources at the stage level: the folder and table layouts, what counts as a bad image and what happens to
it, the digest of file contents, the config's image settings, the CNN's options and the batch augmentation."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from torchcycle.config import config_from_dict
from torchcycle.errors import ConfigError, DataError
from torchcycle.image_demo import write_shapes
from torchcycle.models import build_model, make_config
from torchcycle.models.augment import Augment, augmenter
from torchcycle.runtime.images import decode
from torchcycle.tasks.features import build_features
from torchcycle.tasks.ingest import ingest
from torchcycle.tasks.preprocess import preprocess
from torchcycle.tasks.validate import validate


def _cfg(source: str, **data):
    raw = {"name": "img", "data": {"source": source, **data}, "model": {"kind": "cnn", "channels": [4, 8]}}
    return config_from_dict(raw)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    write_shapes(root, 12, seed=3)
    return root


def test_a_folder_of_class_folders_is_read_decoded_and_resized(folder: Path) -> None:
    raw = ingest(_cfg(f"images:{folder}", image_size=[24, 20]).data)
    assert raw.images is not None and raw.images.shape == (36, 3, 24, 20) and raw.images.dtype == np.uint8
    assert raw.image_shape == (3, 24, 20)
    assert list(raw.frame.columns) == ["image", "label"]
    assert sorted(raw.frame["label"].unique()) == ["circle", "square", "triangle"]
    # the frame holds each file's own bytes, row for row with the decoded images and their paths
    assert raw.frame["image"][5] == Path(raw.paths[5]).read_bytes()
    assert raw.task == "classification" and not raw.skipped and not raw.ignored
    validate(raw)


def test_splits_and_features_keep_images_with_their_labels(folder: Path) -> None:
    cfg = _cfg(f"images:{folder}")
    raw = ingest(cfg.data)
    splits = preprocess(raw, cfg.data, seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 36
    for frame, images in ((splits.train, splits.train_images), (splits.test, splits.test_images)):
        for i in range(len(frame)):  # each split's image i is the decoded bytes of its frame's row i
            expect = decode(frame["image"][i], 3, (32, 32)).numpy()
            np.testing.assert_array_equal(images[i], expect)
    prepared = build_features(splits, cfg.features)
    pipe = prepared.pipeline
    assert prepared.x_train.shape == (len(splits.train), 3 * 32 * 32) and prepared.x_train.dtype == np.float32
    # normalised by the train split's per-channel statistics: mean ~0 and std ~1 per channel there
    per_channel = prepared.x_train.reshape(len(splits.train), 3, -1)
    np.testing.assert_allclose(per_channel.mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(per_channel.std(axis=(0, 2)), 1, atol=1e-3)
    # and the pipeline turns the test split's raw bytes into the same model inputs
    np.testing.assert_allclose(pipe.transform(splits.test.drop(columns=["label"])), prepared.x_test, atol=1e-6)
    assert pipe.classes == ["circle", "square", "triangle"]


def _png_bytes(mode: str, size=(30, 30)) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def test_grey_palette_and_rgba_images_are_converted_among_rgb_ones(folder: Path) -> None:
    (folder / "circle" / "grey.png").write_bytes(_png_bytes("L"))
    (folder / "square" / "palette.png").write_bytes(_png_bytes("P"))
    (folder / "triangle" / "alpha.png").write_bytes(_png_bytes("RGBA"))
    raw = ingest(_cfg(f"images:{folder}").data)
    assert raw.images.shape == (39, 3, 32, 32)
    grey = raw.paths.index(str(folder / "circle" / "grey.png"))
    assert (raw.images[grey][0] == raw.images[grey][1]).all()  # grey became three equal channels
    one = ingest(_cfg(f"images:{folder}", channels=1).data)
    assert one.images.shape == (39, 1, 32, 32)


def test_a_corrupt_jpeg_and_a_fake_png_are_refused_by_path(folder: Path) -> None:
    victim = sorted((folder / "square").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:150])  # truncated
    fake = folder / "circle" / "notes.png"
    fake.write_text("this is not an image")
    with pytest.raises(DataError) as err:
        ingest(_cfg(f"images:{folder}").data)
    text = str(err.value)
    assert "2 of 37 image(s) cannot be read" in text and str(victim) in text and str(fake) in text
    assert "skip_bad_images" in text


def test_skip_bad_images_skips_them_and_counts_them(folder: Path) -> None:
    victim = sorted((folder / "square").glob("*.jpg"))[0]
    victim.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "circle" / "empty.png").write_bytes(b"")
    raw = ingest(_cfg(f"images:{folder}", skip_bad_images=True).data)
    assert len(raw.frame) == 35 and raw.images.shape[0] == 35  # 36 good, 1 truncated, 1 empty
    assert len(raw.skipped) == 2 and any(str(victim) in s for s in raw.skipped)
    assert str(victim) not in raw.paths


def test_non_image_files_are_ignored_and_counted_not_read(folder: Path) -> None:
    (folder / "circle" / "README.txt").write_text("notes")
    (folder / "circle" / ".DS_Store").write_bytes(b"\0\1")
    (folder / "labels.csv").write_text("a,b\n")  # beside the class folders
    raw = ingest(_cfg(f"images:{folder}").data)
    assert len(raw.frame) == 36
    assert sorted(Path(p).name for p in raw.ignored) == [".DS_Store", "README.txt", "labels.csv"]


def test_an_empty_class_folder_is_refused_by_path(folder: Path) -> None:
    (folder / "hexagon").mkdir()
    (folder / "hexagon" / "todo.txt").write_text("draw some")
    with pytest.raises(DataError, match=r"class folder\(s\) hold no images.*hexagon \(1 other file\(s\)\)"):
        ingest(_cfg(f"images:{folder}").data)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda root: root, "image source not found"),
        (lambda root: (root.mkdir(), root)[1], "has no class folders"),
        (
            lambda root: (
                (root / "only").mkdir(parents=True),
                (root / "only" / "a.png").write_bytes(_png_bytes("RGB")),
                root,
            )[2],
            "at least 2 classes",
        ),
    ],
)
def test_folders_that_cannot_train_are_one_clear_error(tmp_path: Path, make, needle: str) -> None:
    root = make(tmp_path / "imgs")
    with pytest.raises(DataError, match=needle):
        validate(ingest(_cfg(f"images:{root}").data))


def test_the_digest_follows_file_contents_not_names_or_places(folder: Path, tmp_path: Path) -> None:
    first = ingest(_cfg(f"images:{folder}").data).digest
    moved = tmp_path / "elsewhere" / "train"
    shutil.copytree(folder, moved)
    assert ingest(_cfg(f"images:{moved}").data).digest == first  # same images elsewhere: the same data
    img = sorted((moved / "circle").glob("*.png"))[0]
    pixels = np.asarray(Image.open(img)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(img)  # one pixel of one image, same name
    assert ingest(_cfg(f"images:{moved}").data).digest != first


def test_a_table_of_paths_or_bytes_with_labels(folder: Path, tmp_path: Path) -> None:
    files = sorted(folder.rglob("*.*"))
    rel = [str(p.relative_to(folder)) for p in files]
    labels = [p.parent.name for p in files]
    pd.DataFrame({"file": rel, "kind": labels}).to_csv(folder / "index.csv", index=False)
    by_path = ingest(_cfg(f"images:{folder / 'index.csv'}", image_column="file", target="kind").data)
    assert by_path.images.shape == (36, 3, 32, 32) and by_path.target == "kind"
    blobs = tmp_path / "blobs.parquet"
    pd.DataFrame({"file": [p.read_bytes() for p in files], "kind": labels}).to_parquet(blobs)
    by_bytes = ingest(_cfg(f"images:{blobs}", image_column="file", target="kind").data)
    np.testing.assert_array_equal(by_bytes.images, by_path.images)
    pd.DataFrame({"file": [*rel[:3], None], "kind": labels[:4]}).to_csv(folder / "holes.csv", index=False)
    with pytest.raises(DataError, match="neither a path nor image bytes"):
        ingest(_cfg(f"images:{folder / 'holes.csv'}", image_column="file", target="kind").data)
    pd.DataFrame({"file": ["circle/nowhere.png", *rel[:3]], "kind": labels[:4]}).to_csv(
        folder / "gone.csv", index=False
    )
    with pytest.raises(DataError, match=r"1 of 4 image\(s\) cannot be read: .*circle/nowhere.png"):
        ingest(_cfg(f"images:{folder / 'gone.csv'}", image_column="file", target="kind").data)
    with pytest.raises(DataError, match=r"column\(s\) 'picture' not found"):
        ingest(_cfg(f"images:{folder / 'index.csv'}", image_column="picture", target="kind").data)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"data": {"source": "sklearn:iris", "image_size": 32}}, "data.image_size: applies to images: sources only"),
        (
            {"data": {"source": "sklearn:iris"}, "features": {"augment": {"flip": True}}},
            "features.augment: applies to images: sources only",
        ),
        ({"data": {"source": "images:x", "image_size": 0}}, "data.image_size"),
        ({"data": {"source": "images:x", "channels": 2}}, "data.channels"),
        ({"data": {"source": "images:x", "task": "regression"}}, "images: sources are classification"),
        ({"data": {"source": "images:"}}, "images source needs a path"),
        ({"data": {"source": "images:x"}, "features": {"augment": {"crop_scale": 0}}}, "crop_scale"),
        (
            {"data": {"source": "images:x", "image_size": 4}, "model": {"kind": "cnn", "channels": [4, 4, 4]}},
            "3 conv stages halve the (3, 4, 4) images",
        ),
    ],
)
def test_image_settings_are_checked_at_the_edge(raw: dict, needle: str) -> None:
    full = {"name": "x", "model": {"kind": "cnn", "channels": [4]}, **raw}
    with pytest.raises(ConfigError) as err:
        config_from_dict(full)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "options",
    [{}, {"batch_norm": True}, {"global_pool": True}, {"residual": True, "global_pool": True}, {"residual": True}],
)
def test_cnn_options_build_train_a_step_and_keep_their_shapes(options: dict) -> None:
    cfg = make_config("cnn", {"channels": (4, 8), "hidden": 8, **options}, in_features=3 * 16 * 16, n_outputs=3,
                      image_shape=(3, 16, 16))  # fmt: skip
    model = build_model("cnn", cfg)
    x = torch.randn(5, 3 * 16 * 16)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert model(x).shape == (5, 3)
    if options.get("global_pool"):  # the input size is free
        assert model.eval()(torch.randn(2, 3, 40, 24)).shape == (2, 3)
    if options.get("batch_norm") or options.get("residual"):
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_augmentation_draws_per_image_and_changes_nothing_when_off() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3 * 8 * 8)
    off = augmenter(Augment(), (3, 8, 8), [0.5] * 3, [0.2] * 3)
    torch.testing.assert_close(off(x), x.reshape(64, 3, 8, 8))
    flip = augmenter(Augment(flip=True), (3, 8, 8), [0.5] * 3, [0.2] * 3)(x)
    images = x.reshape(64, 3, 8, 8)
    mirrored = torch.isclose(flip, images.flip(-1), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(flip, images, atol=1e-5).flatten(1).all(1)
    assert (mirrored | same).all() and 10 < int(mirrored.sum()) < 54  # each image its own coin
    full = augmenter(Augment(True, 0.5, 0.3), (3, 8, 8), [0.5] * 3, [0.2] * 3)
    a = full(x)
    assert a.shape == (64, 3, 8, 8) and torch.isfinite(a).all()
    torch.manual_seed(1)
    b1 = full(x)
    torch.manual_seed(1)
    b2 = full(x)
    torch.testing.assert_close(b1, b2)  # seeded: a run is reproducible
    assert not torch.allclose(a, b1)


def test_the_model_decodes_bytes_only_and_scores_images_in_small_batches(folder: Path) -> None:
    """A path sent to a model is never opened (a served model must not read files a request names), and batch
    scoring of an image model reads at most IMAGE_BATCH_ROWS encoded images at a time."""
    from torchcycle.registry import ResolvedModel
    from torchcycle.runtime.images import ImageError
    from torchcycle.tables import IMAGE_BATCH_ROWS
    from torchcycle.tasks.score import Scorer

    cfg = _cfg(f"images:{folder}")
    prepared = build_features(preprocess(ingest(cfg.data), cfg.data, seed=0), cfg.features)
    path = str(sorted(folder.rglob("*.png"))[0])
    with pytest.raises(ImageError, match="not image bytes but str"):
        prepared.pipeline.transform(pd.DataFrame({"image": [path]}))
    model = ResolvedModel("m", "1", "run")
    assert Scorer(lambda f: f, {"image": "binary"}, model).batch_rows == IMAGE_BATCH_ROWS == 256
    assert Scorer(lambda f: f, {"x": "number"}, model).batch_rows == 65_536


def test_image_stage_outputs_go_through_the_stage_cache_without_pickle(folder: Path) -> None:
    from torchcycle.cache import SafeSerializer

    raw = {
        "name": "img",
        "data": {"source": f"images:{folder}"},
        "features": {"augment": {"flip": True, "crop_scale": 0.7}},
        "model": {"kind": "cnn", "channels": [4]},
    }
    cfg = config_from_dict(raw)
    splits = preprocess(ingest(cfg.data), cfg.data, seed=0)
    prepared = build_features(splits, cfg.features)
    s2 = SafeSerializer().loads(SafeSerializer().dumps(splits))
    np.testing.assert_array_equal(s2.train_images, splits.train_images)
    assert s2.test["image"].tolist() == splits.test["image"].tolist()  # the files' bytes
    p2 = SafeSerializer().loads(SafeSerializer().dumps(prepared))
    assert p2.augment == Augment(True, 0.7, 0.0)
    assert p2.pipeline.channel_mean == prepared.pipeline.channel_mean
    np.testing.assert_allclose(p2.pipeline.transform(prepared.test_frame.drop(columns=["label"])), prepared.x_test)
