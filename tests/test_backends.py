"""Every inference backend matches torch eager (cosine >= 0.9999); int8 is separate and reports its cost."""

import numpy as np
import pytest
import torch

from cliplab.data import read_pairs
from cliplab.embed import FeatureCache, embed_images, embed_texts
from cliplab.embed.backends import OnnxImageTower, OnnxTextTower, resolve_backend


def cosine(a, b):
    a, b = torch.as_tensor(np.array(a, dtype=np.float32)), torch.as_tensor(np.array(b, dtype=np.float32))
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.mark.slow
def test_onnx_image_and_text_parity(towers, tmp_path):
    image_tower, text_tower = towers
    x = torch.randn(5, 3, 224, 224)
    onnx_img = OnnxImageTower(image_tower, tmp_path)
    with torch.inference_mode():
        ref = image_tower(x)
    got = onnx_img(x)
    assert cosine(ref, got).min() >= 0.9999 and (ref - got).abs().max() < 1e-3
    texts = ["a dog", "two children are playing in the water near a big red boat", "x", "A man in a hat ."]
    onnx_txt = OnnxTextTower(text_tower, tmp_path)
    with torch.inference_mode():
        ref_t = text_tower.encode(texts)
    got_t = onnx_txt.encode(texts)
    assert cosine(ref_t, got_t).min() >= 0.9999 and (ref_t - got_t).abs().max() < 1e-4
    # batches in flight side by side (one single-threaded session call per core) come back in order
    many = [texts[:2], texts[2:], texts[1:3], texts]
    sequential = OnnxTextTower(text_tower, tmp_path, concurrency=1)
    assert onnx_txt.concurrency >= 1 and sequential.concurrency == 1
    for a, b, c in zip(onnx_txt.encode_batches(iter(many)), sequential.encode_batches(many), many):
        assert a.shape == (len(c), text_tower.output_dim) and torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(a, onnx_txt.encode(c), atol=1e-5)
    # the export is cached on disk and the original model is untouched
    assert onnx_img.onnx_path.is_file()
    with torch.inference_mode():
        assert torch.allclose(text_tower.encode(texts), ref_t)


@pytest.mark.slow
def test_cached_features_match_across_backends(towers, caption_dir, tmp_path):
    image_tower, text_tower = towers
    ds = read_pairs(caption_dir / "captions.csv")
    torch_img = embed_images(image_tower, ds.image_paths(), cache=FeatureCache(tmp_path / "a"), backend="torch",
                             progress=False, num_workers=0)
    onnx_img = embed_images(image_tower, ds.image_paths(), cache=FeatureCache(tmp_path / "b"), backend="onnx",
                            progress=False, num_workers=0)
    assert cosine(torch_img.features, onnx_img.features).min() >= 0.9999
    t1 = embed_texts(text_tower, ds.captions, cache=FeatureCache(tmp_path / "a"), backend="torch", progress=False)
    t2 = embed_texts(text_tower, ds.captions, cache=FeatureCache(tmp_path / "b"), backend="onnx", progress=False)
    assert cosine(t1.features, t2.features).min() >= 0.9999
    # float16 store: half the bytes, same features to fp16 precision, its own cache key
    half = embed_texts(text_tower, ds.captions, cache=FeatureCache(tmp_path / "a", dtype="float16"),
                       backend="torch", progress=False)
    assert half.features.dtype == np.float16 and half.path != t1.path
    assert cosine(t1.features, half.features.astype(np.float32)).min() >= 0.9999


@pytest.mark.slow
def test_int8_is_opt_in_and_keyed_separately(towers, caption_dir, tmp_path):
    image_tower, _ = towers
    assert resolve_backend("auto", torch.device("cpu")) == "onnx"
    ds = read_pairs(caption_dir / "captions.csv")
    cache = FeatureCache(tmp_path)
    fp32 = embed_images(image_tower, ds.image_paths()[:4], cache=cache, backend="onnx", progress=False, num_workers=0)
    int8 = embed_images(image_tower, ds.image_paths()[:4], cache=cache, backend="onnx-int8", progress=False,
                        num_workers=0)
    assert int8.path != fp32.path
    cos = cosine(fp32.features, int8.features)
    assert 0.6 < cos.mean() < 0.9999  # correlated, but not the same numbers: int8 has an accuracy cost


def test_faiss_index_exact_and_approximate(tmp_path):
    from cliplab.embed.index import VectorIndex

    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(3000, 32)).astype(np.float32)
    np.save(tmp_path / "g.npy", gallery)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    queries = gallery[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    normed = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    brute = np.argsort(-(qn @ normed.T), axis=1)[:, :5]
    flat = VectorIndex.build(mm, "flat", batch_size=700)
    scores, ids = flat.search(queries, 5)
    np.testing.assert_array_equal(ids, brute)
    assert np.allclose(scores[:, 0], (qn * normed[brute[:, 0]]).sum(1), atol=1e-5)
    for kind in ("ivf", "hnsw"):
        _, ids = VectorIndex.build(mm, kind).search(queries, 1)
        assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
    flat.save(tmp_path / "i.faiss")
    assert len(VectorIndex.load(tmp_path / "i.faiss")) == 3000


def test_draft_mode_decodes_large_jpeg_smaller(tmp_path):
    from PIL import Image

    from cliplab.data.images import load_rgb

    Image.new("RGB", (2000, 1600), (10, 200, 30)).save(tmp_path / "big.jpg")
    assert load_rgb(tmp_path / "big.jpg").size == (2000, 1600)
    small = load_rgb(tmp_path / "big.jpg", draft_size=224)
    assert min(small.size) >= 224 and small.size[0] < 2000 and small.size == (500, 400)


@pytest.mark.slow  # exports the MiniLM text tower to ONNX (~10 s)
def test_search_queries_encode_text_through_onnx_with_the_same_embeddings(towers):
    """The server's query text path (ONNX Runtime text tower + the model's projection) gives encode_text's
    embeddings; a model it cannot export keeps encode_text."""
    from cliplab.models.factory import create_conse
    from cliplab.serve import query

    model = create_conse(*towers).eval()
    encode = query.query_text_encoder(model)
    texts = ["a dog running on the beach", "two children playing football in a park"]
    with torch.inference_mode():
        got, ref = encode(texts), model.encode_text(texts, normalize=True)
    assert cosine(ref, got).min() >= 0.9999
    runs_onnx = lambda f: any(isinstance(c.cell_contents, OnnxTextTower) for c in f.__closure__ or ())  # noqa: E731
    assert runs_onnx(encode)
    model.text_tower.onnx_exportable = False  # an instance attribute over the class's True
    try:
        assert not runs_onnx(query.query_text_encoder(model))
    finally:
        del model.text_tower.onnx_exportable
