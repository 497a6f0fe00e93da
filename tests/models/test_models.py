"""Each model: output shapes, and the loss falls when trained."""

from __future__ import annotations

import pytest
import torch

from torchcycle.models import MODELS, build_model, make_config, user_fields
from torchcycle.models.inference import predict
from torchcycle.models.training import TensorData, TrainConfig, fit, loss_fn, resolve_device


def _data(task: str, n: int = 64, f: int = 16, classes: int = 3) -> TensorData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, f, generator=g)
    classes = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 learnable classes
    y = classes if task == "classification" else 3 * x[:, 0] - 2 * x[:, 1] + 0.5
    return TensorData(x, y, x, y)


CASES = [
    ("linear", "regression", {}),
    ("softmax", "classification", {}),
    ("mlp", "classification", {"hidden": (16,)}),
    ("mlp", "regression", {"hidden": (16,)}),
    ("cnn", "classification", {"channels": (4, 8), "hidden": 16}),
]


@pytest.mark.parametrize(("kind", "task", "params"), CASES)
def test_shapes_and_loss_falls(kind: str, task: str, params: dict) -> None:
    torch.manual_seed(0)
    n_out = 3 if task == "classification" else 1
    cfg = make_config(kind, params, in_features=16, n_outputs=n_out, image_shape=(1, 4, 4))
    model = build_model(kind, cfg)
    data = _data(task)
    out = model(data.x_train[:5])
    assert out.shape == (5, n_out)
    before = loss_fn(task, model(data.x_train), data.y_train).item()
    result = fit(
        model,
        data,
        TrainConfig(epochs=30, batch_size=16, lr=0.02, patience=0),
        task=task,
        device=torch.device("cpu"),
        progress=False,
    )
    after = loss_fn(task, predict(model, data.x_train, torch.device("cpu")), data.y_train).item()
    assert len(result.history) == 30
    assert after < 0.5 * before, f"{kind}: loss {before:.3f} -> {after:.3f}"


def test_cnn_accepts_images_and_flat_pixels() -> None:
    cfg = make_config("cnn", {"channels": (4,), "hidden": 8}, in_features=64, n_outputs=10, image_shape=(1, 8, 8))
    model = build_model("cnn", cfg).eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(model(x), model(x.flatten(1)))


def test_cnn_rejects_too_small_images() -> None:
    cfg = make_config("cnn", {"channels": (4, 4, 4, 4)}, in_features=64, n_outputs=10, image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        build_model("cnn", cfg)


def test_knn_votes_and_means() -> None:
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    cls = build_model("knn", make_config("knn", {"k": 2}, in_features=2, n_outputs=2))
    cls.fit(x, torch.tensor([0, 0, 1, 1]))
    probs = torch.softmax(cls(torch.tensor([[0.05, 0.0], [5.05, 5.0]])), dim=1)
    assert probs.argmax(1).tolist() == [0, 1]
    assert probs[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    reg = build_model("knn", make_config("knn", {"k": 2}, in_features=2, n_outputs=1))
    reg.fit(x, torch.tensor([1.0, 3.0, 10.0, 20.0]))
    assert reg(torch.tensor([[0.0, 0.0]])).tolist() == [[2.0]]


def test_knn_state_dict_round_trip_resizes_buffers() -> None:
    cfg = make_config("knn", {"k": 1}, in_features=3, n_outputs=2)
    a = build_model("knn", cfg).fit(torch.randn(7, 3), torch.randint(0, 2, (7,)))
    b = build_model("knn", cfg)
    b.load_state_dict(a.state_dict())
    q = torch.randn(4, 3)
    assert torch.equal(a(q), b(q))


def test_knn_needs_k_rows() -> None:
    model = build_model("knn", make_config("knn", {"k": 5}, in_features=2, n_outputs=2))
    with pytest.raises(ValueError, match="at least k"):
        model.fit(torch.randn(3, 2), torch.tensor([0, 1, 0]))


def test_early_stopping_restores_best_epoch() -> None:
    torch.manual_seed(0)
    data = _data("regression")
    # Validation targets unrelated to the inputs: val loss cannot keep improving.
    noisy = TensorData(data.x_train, data.y_train, data.x_val, torch.randn(len(data.y_val)) * 10)
    model = build_model("mlp", make_config("mlp", {"hidden": (32,)}, in_features=16, n_outputs=1))
    res = fit(
        model,
        noisy,
        TrainConfig(epochs=200, lr=0.05, patience=3),
        task="regression",
        device=torch.device("cpu"),
        progress=False,
    )
    assert res.stopped_early
    assert len(res.history) == res.best_epoch + 3
    assert res.best_val_loss == min(h["val_loss"] for h in res.history)


def test_callback_gets_every_epoch() -> None:
    seen: list[tuple[int, dict]] = []
    model = build_model("linear", make_config("linear", {}, in_features=16, n_outputs=1))
    fit(
        model,
        _data("regression"),
        TrainConfig(epochs=4, patience=0),
        task="regression",
        device=torch.device("cpu"),
        callback=lambda e, m: seen.append((e, m)),
        progress=False,
    )
    assert [e for e, _ in seen] == [1, 2, 3, 4]
    assert {"train_loss", "val_loss"} <= set(seen[0][1])


def test_divergence_is_a_clear_error() -> None:
    model = build_model("linear", make_config("linear", {}, in_features=16, n_outputs=1))
    data = _data("regression")
    big = TensorData(data.x_train * 1e20, data.y_train, data.x_val, data.y_val)
    with pytest.raises(FloatingPointError, match=r"lower train\.lr"):
        fit(
            model,
            big,
            TrainConfig(epochs=3, lr=10.0, optimizer="sgd"),
            task="regression",
            device=torch.device("cpu"),
            progress=False,
        )


def test_seeded_training_is_reproducible() -> None:
    def run() -> torch.Tensor:
        torch.manual_seed(1)
        model = build_model("mlp", make_config("mlp", {"hidden": (8,)}, in_features=16, n_outputs=3))
        fit(
            model,
            _data("classification"),
            TrainConfig(epochs=3, patience=0),
            task="classification",
            device=torch.device("cpu"),
            seed=1,
            progress=False,
        )
        return model.net[0].weight.detach().clone()

    assert torch.equal(run(), run())


def test_resolve_device_auto_and_explicit() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type in {"cpu", "mps"}


def test_registry_lists_user_fields_without_derived_ones() -> None:
    assert set(MODELS) == {"linear", "softmax", "mlp", "cnn", "knn"}
    assert "in_features" not in user_fields("mlp")
    assert user_fields("knn")["k"] == 5
