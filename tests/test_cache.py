import numpy as np
import pytest

from cliplab.data import read_pairs
from cliplab.embed import FeatureCache, embed_texts, tower_features



def test_cache_resumes_after_interruption(tmp_path):
    cache = FeatureCache(tmp_path, chunk_size=4)
    calls = []

    def compute(start, stop):
        calls.append((start, stop))
        if len(calls) == 3 and not getattr(compute, "resumed", False):
            raise KeyboardInterrupt  # killed mid-extraction
        x = np.arange(start, stop, dtype=np.float32)[:, None].repeat(3, 1)
        return x, np.ones(stop - start, bool), []

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute("t", "k1", 10, compute, progress=False)
    assert calls == [(0, 4), (4, 8), (8, 10)]
    compute.resumed = True
    calls.clear()
    out = cache.get_or_compute("t", "k1", 10, compute, progress=False)
    assert calls == [(8, 10)]  # only the missing chunk
    np.testing.assert_array_equal(out.features[:, 0], np.arange(10))
    assert not out.reused
    again = cache.get_or_compute("t", "k1", 10, compute, progress=False)
    assert again.reused and calls == [(8, 10)]
    assert not list(out.path.glob("chunk-*"))  # merged


@pytest.mark.slow
def test_tower_features_cached_and_keyed(caption_dir, tmp_path, fresh_towers):
    ds = read_pairs(caption_dir / "captions.csv")
    it, tt = fresh_towers
    cache = FeatureCache(tmp_path / "c", chunk_size=8)
    first = tower_features(it, tt, ds, cache=cache, progress=False, num_workers=0)
    assert first.image.shape == (16, 1280) and first.text.shape == (40, 384) and not first.reused
    second = tower_features(it, tt, ds, cache=cache, progress=False, num_workers=0)
    assert second.reused
    np.testing.assert_array_equal(first.image, second.image)
    # a different caption list is a different cache entry; result order follows the input order
    texts = list(reversed(ds.captions))
    rev = embed_texts(tt, texts, cache=cache, progress=False)
    assert not rev.reused
    np.testing.assert_allclose(rev.features, first.text[::-1], atol=1e-5)
    # different preprocessing is a different key
    import copy

    it2 = copy.deepcopy(it)
    it2.image_size = 192
    assert it2.fingerprint() != it.fingerprint()
