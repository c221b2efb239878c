"""ONNX Runtime and eager torch give the same vectors, on the photos scikit-image ships: for the
packaged model, each pooling, and a trained export with a head; and an index built with one
runtime answers queries embedded with the other with the same top-10."""
import faiss
import numpy as np
import pytest

from configs.schema import ModelConfig
from embedding.embedder import Embedder
from tests.images import distinct_images, jpeg

MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [jpeg(img.convert("RGB")) for img in distinct_images().values()]


def both(cfg: ModelConfig, tmp_path) -> tuple[Embedder, Embedder]:
    onnx = Embedder(cfg.model_copy(update={"runtime": "onnx", "onnx_cache": str(tmp_path)}))
    torch = Embedder(cfg.model_copy(update={"runtime": "torch"}))
    assert (onnx.runner.name, torch.runner.name) == ("onnx", "torch")
    return onnx, torch


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)


@pytest.mark.parametrize("pooling", ["mean", "gem", "rmac"])
def test_onnx_vectors_equal_torch_vectors(pooling, photos, tmp_path):
    onnx, torch = both(ModelConfig(pooling=pooling, image_size=160), tmp_path)
    assert cosines(onnx.embed_bytes(photos[:24]), torch.embed_bytes(photos[:24])).min() >= MIN_COSINE
    assert cosines(onnx.embed_bytes(photos[:8], for_index=True),
                   torch.embed_bytes(photos[:8], for_index=True)).min() >= MIN_COSINE


def test_a_trained_export_with_a_head_runs_the_same_in_onnx(photos, tmp_path):
    import torch as th

    from embedding.model import build_model, export_model, projection_head
    from embedding.runtime import cache_key

    net = build_model(ModelConfig())
    net.head = projection_head(1280, 128)
    th.manual_seed(0)
    for p in net.head.parameters():
        th.nn.init.normal_(p, std=0.05)
    path = str(tmp_path / "model.pt")
    export_model(net, "efficientnet_lite0", "mean", (1280, 128), path)
    onnx, torch = both(ModelConfig(weights=path), tmp_path)
    a, b = onnx.embed_bytes(photos[:16]), torch.embed_bytes(photos[:16])
    assert a.shape == (16, 128) and cosines(a, b).min() >= MIN_COSINE
    # Other weights, another export: the cache is keyed by the weights' digest.
    assert cache_key(net, ModelConfig()) != cache_key(build_model(ModelConfig()), ModelConfig())


def test_an_index_built_with_one_runtime_answers_the_other_the_same(photos, tmp_path):
    import io

    from PIL import Image, ImageEnhance

    onnx, torch = both(ModelConfig(), tmp_path)
    index = faiss.IndexFlatIP(onnx.dim)
    index.add(onnx.embed_bytes(photos, for_index=True))

    def edited(data: bytes) -> bytes:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        return jpeg(ImageEnhance.Brightness(img.crop((w // 8, h // 8, w - w // 8, h - h // 8))).enhance(1.3))

    queries = [edited(p) for p in photos[::3]]
    _, by_onnx = index.search(onnx.embed_bytes(queries), 10)
    _, by_torch = index.search(torch.embed_bytes(queries), 10)
    assert (by_onnx == by_torch).all()
