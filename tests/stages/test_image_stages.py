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
from torchcycle.models.augment import Augment, augmenter, normaliser
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
    # kept as uint8 pixels (a quarter of float32's memory), normalised per batch where they are used
    assert prepared.x_train.shape == (len(splits.train), 3 * 32 * 32) and prepared.x_train.dtype == np.uint8
    np.testing.assert_array_equal(prepared.x_train, splits.train_images.reshape(len(splits.train), -1))
    x = prepared.model_inputs(prepared.x_train)
    assert x.dtype == np.float32
    # normalised by the train split's per-channel statistics: mean ~0 and std ~1 per channel there
    per_channel = x.reshape(len(splits.train), 3, -1)
    np.testing.assert_allclose(per_channel.mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(per_channel.std(axis=(0, 2)), 1, atol=1e-3)
    # the pipeline turns the test split's raw bytes into the same model inputs, bit for bit
    test_x = prepared.model_inputs(prepared.x_test)
    np.testing.assert_array_equal(pipe.transform(splits.test.drop(columns=["label"])), test_x)
    # and the training loop's on-device normalisation computes the same float32 values
    m, sd = pipe.channel_mean, pipe.channel_std
    on_device = normaliser((3, 32, 32), m, sd)(torch.from_numpy(prepared.x_test)).numpy()
    np.testing.assert_array_equal(on_device, test_x)
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
        ({"data": {"source": "images:x", "image_size": 0}}, "data.image_size: must be N or [H, W] pixels"),
        ({"data": {"source": "images:x", "image_size": True}}, "got True"),
        ({"data": {"source": "images:x", "image_size": [32]}}, "got [32]"),
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
    torch.testing.assert_close(off(x), x)  # the shape it is given back
    flip = augmenter(Augment(flip=True), (3, 8, 8), [0.5] * 3, [0.2] * 3)(x.reshape(64, 3, 8, 8))
    images = x.reshape(64, 3, 8, 8)
    mirrored = torch.isclose(flip, images.flip(-1), atol=1e-5).flatten(1).all(1)
    same = torch.isclose(flip, images, atol=1e-5).flatten(1).all(1)
    assert (mirrored | same).all() and 10 < int(mirrored.sum()) < 54  # each image its own coin
    full = augmenter(Augment(True, 0.5, 0.3), (3, 8, 8), [0.5] * 3, [0.2] * 3)
    a = full(x)
    assert a.shape == (64, 3 * 8 * 8) and torch.isfinite(a).all()
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
    np.testing.assert_array_equal(p2.x_test, prepared.x_test)
    expect = prepared.model_inputs(prepared.x_test)
    np.testing.assert_array_equal(p2.pipeline.transform(prepared.test_frame.drop(columns=["label"])), expect)


def test_uint8_pixels_normalised_per_batch_train_exactly_like_normalised_floats() -> None:
    """TensorData.prepare: uint8 stored, normalised batch by batch for training and validation, ends with the
    weights and history of the same run on inputs normalised beforehand (what 4x more resident images costs)."""
    from torchcycle.models.training import TensorData, TrainConfig, fit
    from torchcycle.runtime.images import normalise

    rng = np.random.default_rng(0)
    shape, mean, std = (3, 4, 4), [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    pixels = {k: rng.integers(0, 256, (n, 48), dtype=np.uint8) for k, n in (("train", 96), ("val", 32))}
    labels = {k: torch.from_numpy(rng.integers(0, 3, len(v))) for k, v in pixels.items()}
    cfg = TrainConfig(epochs=3, batch_size=16, patience=0)
    runs = []
    for stored in ("uint8", "float"):
        torch.manual_seed(0)
        model = build_model("mlp", make_config("mlp", {"hidden": (8,)}, in_features=48, n_outputs=3))
        if stored == "uint8":
            x = {k: torch.from_numpy(v) for k, v in pixels.items()}
            data = TensorData(
                x["train"], labels["train"], x["val"], labels["val"], prepare=normaliser(shape, mean, std)
            )
        else:
            x = {k: torch.from_numpy(normalise(v.reshape(-1, *shape), mean, std)) for k, v in pixels.items()}
            data = TensorData(x["train"], labels["train"], x["val"], labels["val"])
        result = fit(model, data, cfg, task="classification", device=torch.device("cpu"), progress=False)
        runs.append((result.history, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


def test_linked_folders_are_followed_once_and_broken_links_counted(folder: Path, tmp_path: Path) -> None:
    extra = tmp_path / "more-circles"
    write_shapes(extra, 4, seed=9, labelled=False)  # 12 images, named <class>-<n>
    (folder / "circle" / "linked").symlink_to(extra, target_is_directory=True)
    (folder / "circle" / "loop").symlink_to(folder / "circle", target_is_directory=True)  # a cycle: ends
    (folder / "square" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    raw = ingest(_cfg(f"images:{folder}").data)
    assert len(raw.frame) == 36 + 12
    assert sum("/linked/" in p for p in raw.paths) == 12
    assert [p for p in raw.ignored if "gone.png" in p] == [f"{folder / 'square' / 'gone.png'} (a link to nothing)"]


@pytest.mark.parametrize(("side", "needle"), [(12000, "12000x12000 pixels: more than"), (30000, "too many pixels")])
def test_a_decompression_bomb_is_refused_from_its_header(side: int, needle: str) -> None:
    """A small PNG whose header claims side x side pixels: refused before a byte of it is decoded."""
    import struct
    import time
    import zlib

    from torchcycle.runtime.images import ImageError

    png = bytearray(_png_bytes("RGB", (8, 8)))
    ihdr = bytearray(png[12:29])  # b"IHDR" + width, height, depth, colour type, ...
    ihdr[4:12] = struct.pack(">II", side, side)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    start = time.perf_counter()
    with pytest.raises(ImageError, match=needle):
        decode(bytes(png), 3, (32, 32))
    assert time.perf_counter() - start < 1.0


def test_a_folder_of_images_beside_a_table_is_refused_not_half_scored(tmp_path: Path) -> None:
    from torchcycle.tables import NoInputs, find_inputs

    mixed = tmp_path / "mixed"
    write_shapes(mixed, 2, seed=1, labelled=False)
    assert find_inputs(mixed) == [mixed]  # images only: one input
    (mixed / "list.csv").write_text("image\ncircle-0000.png\n")
    with pytest.raises(DataError, match=r"holds both tables .*list\.csv.* and images"):
        find_inputs(mixed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoInputs, match="or images"):
        find_inputs(tmp_path / "empty")
