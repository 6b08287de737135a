"""The one image feed (cliplab.embed.feed): worker processes give the features the threaded decoder gave, in
order, with per-item failures; content-keyed image features survive a copied folder; the GPU paths (skipped
without CUDA); the bench/gpu.py dry run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from cliplab.data.images import ImageFiles, MirroredImages, load_rgb
from cliplab.embed import extract
from cliplab.embed.cache import FeatureCache
from cliplab.embed.extract import ImageChunkEncoder, embed_images
from cliplab.embed.feed import ImageFeed, default_batch_size, split_transform
from cliplab.errors import CliplabError
from tests.conftest import make_image

pytestmark = pytest.mark.subprocess  # the feed's worker processes (the autouse fixture below starts them for any job)
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def old_path_features(tower, paths) -> np.ndarray:
    """What the threaded decoder fed the tower: the whole transform per image (PIL draft at the tower's size)."""
    tf = tower.transform()
    x = torch.stack([tf(load_rgb(p, tower.image_size)) for p in paths])
    with torch.inference_mode():
        return tower.eval()(x).numpy()


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(autouse=True)
def pool_for_any_job(monkeypatch):
    """These tests are about the worker processes: start them whatever the job's size."""
    from cliplab.embed import feed

    monkeypatch.setattr(feed, "INLINE_BELOW", 0)


def test_a_small_job_is_decoded_here_with_the_same_pixels(pics, monkeypatch):
    """Fewer than INLINE_BELOW images never start the worker pool and give the pool's pixels."""
    from cliplab.embed import feed

    tf = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    with ImageFeed(ImageFiles(pics), tf, num_workers=2, batch_size=4) as pool:
        want = torch.cat([b.pixels for b in pool.batches()])
        want_batch = pool.batch([3, 1, 7]).pixels
        assert pool._pool is not None
    monkeypatch.setattr(feed, "INLINE_BELOW", len(pics) + 1)
    with ImageFeed(ImageFiles(pics), tf, num_workers=2, batch_size=4) as small:
        got = torch.cat([b.pixels for b in small.batches()])
        got_batch = small.batch([3, 1, 7]).pixels
        assert small._pool is None
        for _ in range(feed.INLINE_FIRST_BATCHES - 1):
            small.batch([3, 1, 7])
        assert small._pool is None
        again = small.batch([3, 1, 7]).pixels  # a longer run's later batches start the pool
        assert small._pool is not None
    assert torch.equal(got, want) and torch.equal(got_batch, want_batch) and torch.equal(again, want_batch)


@pytest.fixture()
def pics(tmp_path) -> list[Path]:
    folder = tmp_path / "pics"
    folder.mkdir()
    out = []
    for i in range(10):
        path = folder / f"p{i:02d}.jpg"
        make_image(path, ["red", "green", "blue", "yellow"][i % 4], "circle" if i % 3 else "square", size=48 + 4 * i,
                   seed=i)
        out.append(path)
    return out


@pytest.fixture()
def digest_home(tmp_path, monkeypatch):
    """A fresh digest table (in a fresh cache root) and an empty in-process memo."""
    from cliplab import utils

    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "digest-home"))
    monkeypatch.setattr(utils, "_FILE_HASHES", {})
    return tmp_path / "digest-home"


@pytest.mark.parametrize("workers", [0, 2])
def test_the_feed_gives_the_threaded_decoders_features_in_order(towers, pics, tmp_path, workers):
    ref = old_path_features(towers[0], pics)
    got = embed_images(towers[0], pics, cache=FeatureCache(tmp_path / f"c{workers}"), num_workers=workers,
                       batch_size=3, backend="torch", progress=False)
    cos = cosine(ref, got.features)
    assert cos.min() >= 0.99999
    sims = np.asarray(got.features) @ ref.T  # each row is its own image's features: exact order
    assert (np.argmax(sims / np.linalg.norm(ref, axis=1), axis=1) == np.arange(len(pics))).all()
    assert got.valid.all()


def test_feed_pixels_equal_the_whole_transform_for_any_worker_count_and_order(towers, pics):
    tf = towers[0].transform()
    images = ImageFiles(pics)
    ref = torch.stack([tf(images.load(i)) for i in range(len(pics))])
    for workers in (0, 2):
        with ImageFeed(images, tf, num_workers=workers, batch_size=4) as feed:
            batches = list(feed.batches(1, 9))
            assert [b.indices for b in batches] == [[1, 2, 3, 4], [5, 6, 7, 8]]
            assert torch.equal(torch.cat([b.pixels for b in batches]), ref[1:9])  # bit for bit
            picked = feed.batch([7, 0, 3, 3, 9])
            assert torch.equal(picked.pixels, ref[[7, 0, 3, 3, 9]])
    with ImageFeed(images, tf, num_workers=2, batch_size=4) as feed:
        feed._work.scale = False  # as for a GPU: uint8 crosses, scaling and Normalize run on the device (torch)
        got = torch.cat([b.pixels for b in feed.batches()])
    assert torch.equal(got, ref)


def test_transforms_split_at_to_tensor_and_others_run_whole(towers, pics):
    tf = towers[0].transform()
    prep = split_transform(tf)
    assert prep.uint8 and prep.mean == tuple(towers[0].mean) and prep.resize is not None
    odd = T.Compose([T.Resize(40), T.CenterCrop(40), T.ToTensor(), T.Lambda(lambda x: x * 2)])
    assert not split_transform(odd).uint8
    images = ImageFiles(pics[:3])
    with ImageFeed(images, odd, num_workers=0) as feed:
        got = next(feed.batches()).pixels
    assert torch.equal(got, torch.stack([odd(images.load(i)) for i in range(3)]))
    assert default_batch_size("cpu") == 64 and default_batch_size("cuda") == 256


def test_bad_images_are_skipped_and_counted(towers, pics, tmp_path):
    (pics[2]).write_bytes(b"not a jpeg")
    missing = pics[0].parent / "gone.jpg"
    paths = pics[:5] + [missing]
    for workers in (0, 2):
        got = embed_images(towers[0], paths, cache=FeatureCache(tmp_path / f"c{workers}"), num_workers=workers,
                           batch_size=2, on_error="skip", backend="torch", progress=False)
        assert got.valid.tolist() == [True, True, False, True, True, False]
        assert sorted(got.errors) == [2, 5]
        assert "corrupt image" in got.errors[2] and "image not found" in got.errors[5]
    with pytest.raises(CliplabError, match="corrupt image"):
        embed_images(towers[0], paths, cache=FeatureCache(tmp_path / "raise"), num_workers=2, progress=False)


def test_training_batches_are_seeded_per_item_and_leave_this_process_rng_alone(pics):
    tf = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.2,) * 3)])
    aug = T.Compose([T.RandomResizedCrop(32, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize((0.5,) * 3, (0.2,) * 3)])
    images = ImageFiles(pics)
    out = {}
    for workers in (0, 2):
        with ImageFeed(images, tf, train_transform=aug, num_workers=workers) as feed:
            out[workers] = feed.batch([4, 1, 8, 2], seed=123, train=True).pixels
            other = feed.batch([4, 1, 8, 2], seed=124, train=True).pixels
            plain = feed.batch([4, 1, 8, 2]).pixels
    assert torch.equal(out[0], out[2])  # the same crops whatever the number of workers
    assert not torch.equal(out[2], other) and not torch.equal(out[2], plain)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with ImageFeed(images, tf, train_transform=aug, num_workers=0) as feed:
        feed.batch([0, 1], seed=5, train=True)
    assert torch.equal(torch.rand(3), expected)  # in-process augmentation did not draw from the caller's RNG


def count_computed(monkeypatch) -> list[int]:
    """Items the image encoder computes from now on (a list of chunk sizes)."""
    computed: list[int] = []
    original = ImageChunkEncoder.__call__

    def counting(self, start, stop):
        computed.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(ImageChunkEncoder, "__call__", counting)
    return computed


@pytest.mark.parametrize("content_chunks", [False, True])
def test_a_copied_folder_hits_the_cache_and_a_changed_image_is_recomputed(towers, pics, tmp_path, monkeypatch,
                                                                          digest_home, content_chunks):
    cache = FeatureCache(tmp_path / "cache", chunk_size=4)
    first = embed_images(towers[0], pics, cache=cache, num_workers=2, progress=False, backend="torch",
                         content_chunks=content_chunks)
    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(pics[0].parent, copy, copy_function=shutil.copyfile)  # new paths, inodes and mtimes
    later = 2_000_000_000
    for p in copy.iterdir():
        os.utime(p, (later, later))
    moved = [copy / p.name for p in pics]
    computed = count_computed(monkeypatch)
    again = embed_images(towers[0], moved, cache=cache, num_workers=2, progress=False, backend="torch",
                         content_chunks=content_chunks)
    assert computed == [] and again.reused
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(first.features))

    make_image(moved[6], "yellow", "square", size=60, seed=99)  # new bytes
    changed = embed_images(towers[0], moved, cache=cache, num_workers=2, progress=False, backend="torch",
                           content_chunks=content_chunks)
    assert not changed.reused and sum(computed) >= 1
    assert not np.allclose(changed.features[6], first.features[6])
    np.testing.assert_array_equal(np.asarray(changed.features[:6]), np.asarray(first.features[:6]))


def test_digests_are_remembered_across_processes_and_shared_with_the_index(pics, digest_home, monkeypatch):
    from cliplab import utils
    from cliplab.serve import index

    hashed: list[str] = []
    real = utils.hash_file
    monkeypatch.setattr(utils, "hash_file", lambda p: hashed.append(str(p)) or real(p))
    first = ImageFiles(pics).keys()
    assert len(hashed) == len(pics) and (digest_home / utils.DIGEST_TABLE).is_file()
    monkeypatch.setattr(utils, "_FILE_HASHES", {})  # a new process: only the table remembers
    hashed.clear()
    assert ImageFiles(pics).keys() == first and hashed == []
    os.utime(pics[3], (1_900_000_000, 1_900_000_000))  # touched: read again, same digest
    assert ImageFiles(pics).keys() == first and hashed == [str(pics[3].resolve())]
    assert index.sha256_file is utils.sha256_file  # the index's content hash is this digest
    assert first[5] == f"sha256:{utils.sha256_file(pics[5])}"
    assert MirroredImages(ImageFiles(pics)).keys() == ["hflip"] + first


def test_an_unwritable_digest_table_is_only_a_missed_memo(pics, tmp_path, monkeypatch):
    from cliplab import utils

    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CLIPLAB_CACHE", str(blocker))
    monkeypatch.setattr(utils, "_FILE_HASHES", {})
    assert all(k.startswith("sha256:") for k in ImageFiles(pics).keys())


def test_entries_cached_under_path_keys_are_adopted_and_damaged_ones_recomputed(towers, pics, tmp_path, monkeypatch,
                                                                                digest_home):
    cache = FeatureCache(tmp_path / "cache")
    first = embed_images(towers[0], pics, cache=cache, num_workers=0, progress=False, backend="torch")
    fingerprint, key = extract.image_cache_key(towers[0], ImageFiles(pics), cache, "torch", "cpu")
    old_key = cache.key(fingerprint, ImageFiles(pics).stat_keys(), extra="image-v1")
    cache.entry_dir("image", key).rename(cache.entry_dir("image", old_key))  # as an older cliplab left it
    computed = count_computed(monkeypatch)
    again = embed_images(towers[0], pics, cache=cache, num_workers=0, progress=False, backend="torch")
    assert computed == [] and again.path == cache.entry_dir("image", key)
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(first.features))

    cache.entry_dir("image", key).rename(cache.entry_dir("image", old_key))
    (cache.entry_dir("image", old_key) / "features.npy").write_bytes(b"cut short")
    redone = embed_images(towers[0], pics, cache=cache, num_workers=0, progress=False, backend="torch")
    assert sum(computed) == len(pics) and redone.valid.all()


def test_an_image_changed_after_it_was_keyed_fails_alone(towers, pics, tmp_path, digest_home):
    images = ImageFiles(pics[:4])
    enc = ImageChunkEncoder(towers[0], images, cache=FeatureCache(tmp_path), num_workers=0, on_error="skip",
                            backend="torch")
    keys = images.keys()
    enc.expect(keys[:2] + ["sha256:" + "0" * 64] + keys[3:])
    _, valid, errors = enc(0, 4)
    assert valid.tolist() == [True, True, False, True] and "changed while it was embedded" in errors[0]


def test_pixel_training_inputs_come_through_the_feed(towers, pics):
    from cliplab.train.inputs import PixelActs, train_augmentation

    tf = towers[0].transform()
    acts = PixelActs(ImageFiles(pics), tf, train_augmentation(towers[0].image_size, towers[0].mean, towers[0].std),
                     workers=2)
    x = acts.batch(np.array([3, 1]), "cpu")
    assert torch.equal(x, torch.stack([tf(load_rgb(pics[i])) for i in (3, 1)]))
    torch.manual_seed(1)
    a = acts.batch(np.array([3, 1]), "cpu", rng=np.random.default_rng(0))
    torch.manual_seed(1)
    b = acts.batch(np.array([3, 1]), "cpu", rng=np.random.default_rng(0))
    assert torch.equal(a, b) and not torch.equal(a, x)
    pics[1].write_bytes(b"broken")
    with pytest.raises(CliplabError, match="corrupt image"):
        acts.batch(np.array([0, 1]), "cpu")


@pytest.mark.slow
def test_bench_gpu_dry_run_on_the_cpu(tmp_path, monkeypatch):
    import runpy

    out = tmp_path / "gpu.json"
    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--device", "cpu", "--quick", "--out", str(out),
                                      "--data", str(tmp_path / "no-data")])  # synthetic JPEGs
    runpy.run_path(str(ROOT / "bench" / "gpu.py"), run_name="__main__")
    import json

    res = json.loads(out.read_text())
    for key in ("model_only_images_per_s", "decode_cpu_workers_images_per_s", "embed_images_per_s",
                "embed_captions_per_s", "train_full_tower_images_per_s"):
        assert res[key] > 0, key
    assert res["n_images"] == 32 and res["device"] == "cpu"


# -- on a GPU (skipped without CUDA)
@pytest.mark.parametrize("_", [pytest.param(0, marks=CUDA)])
def test_gpu_jpeg_decoding_matches_the_cpu_path(towers, pics, tmp_path, _):
    png = pics[4].with_suffix(".png")
    load_rgb(pics[4]).save(png)  # a PNG takes the PIL fallback
    bad = pics[0].parent / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\0" * 64)  # JPEG magic, no image: refused, then reported by PIL
    paths = pics + [png, bad]
    cpu = embed_images(towers[0], paths, cache=FeatureCache(tmp_path / "a"), device="cuda", on_error="skip",
                       progress=False)
    gpu = embed_images(towers[0], paths, cache=FeatureCache(tmp_path / "b"), device="cuda", on_error="skip",
                       gpu_decode=True, progress=False)
    assert gpu.path.name != cpu.path.name  # GPU-decoded features keep their own key
    assert gpu.valid.tolist() == cpu.valid.tolist() == [True] * 11 + [False]
    assert cosine(cpu.features[:11], gpu.features[:11]).min() >= 0.99


@pytest.mark.parametrize("_", [pytest.param(0, marks=CUDA)])
def test_bf16_features_on_cuda_have_their_own_cache_key(towers, pics, tmp_path, _):
    cache = FeatureCache(tmp_path)
    cpu = embed_images(towers[0], pics, cache=cache, backend="torch", progress=False)
    cuda = embed_images(towers[0], pics, cache=cache, device="cuda", progress=False)
    assert cuda.path != cpu.path and not cuda.reused
    assert cosine(cpu.features, cuda.features).min() >= 0.99
    from cliplab.embed.extract import embed_texts

    texts = ["a red circle", "a much longer caption about a small blue square on a light background", "x"] * 30
    t_cpu = embed_texts(towers[1], texts, cache=cache, backend="torch", progress=False)
    t_cuda = embed_texts(towers[1], texts, cache=cache, device="cuda", progress=False)
    assert t_cuda.path != t_cpu.path and cosine(t_cpu.features, t_cuda.features).min() >= 0.99


@pytest.mark.parametrize("_", [pytest.param(0, marks=CUDA)])
def test_full_tower_training_under_amp_on_cuda(caption_dir, tmp_path, _):
    from tests.test_tuning import tuned_config

    from cliplab.train.run import train_run

    cfg = tuned_config(caption_dir, tmp_path / "cache", epochs=2, device="cuda", amp=True, augment="full",
                       image_tower={"mode": "full"}, text_tower={"mode": "frozen"})
    res = train_run(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    assert res["parameters"]["image_tower"]["trainable"] > 0
    assert np.isfinite(res["test"]["trained"]["t2i_mrr"])
