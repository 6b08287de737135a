"""A user's files are sacred (issue #24): `cliplab index` deletes only what it wrote, refuses a folder that is
not its own, runs one build at a time, writes durably, and survives vanished files, damaged chunks, a full
disk and an interrupted build whose photo list then changed."""

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import COLOURS, SHAPES, make_image, tiny_hf_clip

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def model(tmp_path_factory, towers) -> str:
    """A tiny random CLIP (fast to embed with; the index logic does not care which model)."""
    _, folder = tiny_hf_clip(tmp_path_factory.mktemp("model"), towers[1].tokenizer)
    return f"clip:{folder}"


def photos(root: Path, n: int = 6, prefix: str = "p") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(root / f"{prefix}{i:03d}.jpg", list(COLOURS)[i % 4], SHAPES[i % 2], seed=i, size=32)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def builder(folder: Path, model: str, **kw):
    from cliplab.serve.index import IndexBuilder

    return IndexBuilder(folder, model, log=lambda m: None, progress=False, device="cpu", **kw)


def users_folder(root: Path) -> Path:
    """A photo folder that also holds the user's own files with names an index cleaner might like."""
    photos(root)
    (root / ".bashrc").write_text("export PATH=$HOME/bin:$PATH\n")
    (root / "meta-plan.txt").write_text("my plan\n")
    (root / "vectors-notes.npy").write_bytes(b"not cliplab's")
    (root / "faiss-talk.index").write_text("slides\n")
    (root / "work").mkdir()
    (root / "work" / "notes.txt").write_text("thesis notes\n")
    return root


def test_out_equal_to_the_photo_folder_is_refused_and_deletes_nothing(tmp_path, cli, model):
    folder = users_folder(tmp_path / "Photos")
    before = snapshot(folder)
    res = cli("index", folder, "--out", folder, "-m", model, "--device", "cpu")
    assert res.returncode == 2
    assert "not a cliplab index" in res.stdout and "nothing was written" in res.stdout
    assert len([line for line in res.stdout.splitlines() if line.strip()]) == 1  # one line, no traceback
    assert snapshot(folder) == before


def test_out_home_is_refused_and_deletes_nothing(tmp_path, cli, model, monkeypatch):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / ".bashrc").write_text("alias ll='ls -l'\n")
    (home / ".profile").write_text("umask 022\n")
    (home / "Documents" / "cv.txt").write_text("cv\n")
    users_folder(home / "Pictures")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(home)
    res = cli("index", home / "Pictures", "--out", Path("~").expanduser(), "-m", model, "--device", "cpu")
    assert res.returncode == 2 and "not a cliplab index" in res.stdout
    assert snapshot(home) == before


def test_out_containing_an_indexed_root_is_refused(tmp_path, model):
    from cliplab.errors import DataError

    index = tmp_path / "index"
    builder(index, model).build([photos(tmp_path / "pics")])
    inside = photos(index / "holiday")  # the user keeps photos inside the index folder
    before = snapshot(index)
    with pytest.raises(DataError, match="is or contains the indexed folder"):
        builder(index, model).build([inside])
    with pytest.raises(DataError, match="is or contains the indexed folder"):
        builder(index, model).build([index])
    assert snapshot(index) == before


def test_index_inside_the_root_is_left_out_of_the_walk(tmp_path, model):
    from cliplab.serve.index import PhotoIndex

    pics = photos(tmp_path / "pics", n=5)
    report = builder(pics / ".cliplab-index", model).build([pics])
    assert report.total == 5
    report = builder(pics / ".cliplab-index", model).build([pics])  # its own files are never indexed
    assert report.total == 5 and report.embedded == 0
    assert all(not h["path"].startswith(".cliplab-index") for h in PhotoIndex(pics / ".cliplab-index").items(
        list(range(1, 20))).values())


def test_clean_up_deletes_only_cliplabs_exact_names(tmp_path, model):
    """Files a user drops into an index folder survive every build; cliplab's own leftovers do not."""
    from cliplab.serve.index import WORK, PhotoIndex

    pics = photos(tmp_path / "pics")
    index = tmp_path / "index"
    builder(index, model).build([pics])
    (index / ".bashrc").write_text("mine\n")
    (index / "meta-plan.txt").write_text("mine\n")
    (index / "vectors-backup.npy").write_bytes(b"mine")
    (index / "notes").mkdir()
    (index / "notes" / "n.txt").write_text("mine\n")
    (index / "work").mkdir()
    (index / "work" / "thesis.tex").write_text("mine\n")
    (index / WORK).mkdir()
    (index / WORK / "keep.txt").write_text("a work folder without cliplab's marker is not cliplab's\n")
    users = {k: v for k, v in snapshot(index).items() if k.startswith((".bashrc", "meta-plan", "vectors-backup",
                                                                      "notes/", "work/", f"{WORK}/"))}
    (index / "meta-7.sqlite").write_bytes(b"leftover of a killed build")
    (index / ".vectors-7.npy.cliplab-0123456789abcdef.tmp").write_bytes(b"a killed writer's temp file")
    report = builder(index, model).build([pics])
    after = snapshot(index)
    assert {k: after.get(k) for k in users} == users
    assert not (index / "meta-7.sqlite").exists() and not (index / ".vectors-7.npy.cliplab-0123456789abcdef.tmp").exists()
    assert report.generation == 2 and len(PhotoIndex(index)) == 6
    assert sorted(p.name for p in index.glob("vectors-*")) == ["vectors-2.npy", "vectors-backup.npy"]


def test_an_index_written_before_the_marker_is_still_updated(tmp_path, model):
    from cliplab.serve.index import MARKER, index_folder_state

    pics = photos(tmp_path / "pics")
    index = tmp_path / "index"
    builder(index, model).build([pics])
    (index / MARKER).unlink()
    assert index_folder_state(index) == "legacy"
    assert builder(index, model).build([pics]).generation == 2
    assert index_folder_state(index) == "index"


@pytest.mark.subprocess
def test_a_second_build_at_once_is_refused_and_the_lock_dies_with_its_process(tmp_path, model):
    """A build holding the lock (another process, later killed with SIGKILL): a second build is refused with
    one clear line while it runs, and succeeds once the holder is gone (flock is released by the kernel)."""
    from cliplab.errors import DataError
    from cliplab.serve.index import LOCK, PhotoIndex

    pics = photos(tmp_path / "pics")
    index = tmp_path / "index"
    builder(index, model).build([pics])
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom cliplab.serve.index import index_lock\n"
        "with index_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n"), str(index)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataError, match="being updated by another `cliplab index`"):
            builder(index, model).build([pics])
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    assert (index / LOCK).exists()  # the file stays; its lock does not
    assert builder(index, model).build([pics]).generation == 2
    assert len(PhotoIndex(index)) == 6


def test_two_concurrent_builds_one_commits_the_other_is_refused(tmp_path, model):
    from cliplab.errors import DataError
    from cliplab.serve.index import PhotoIndex

    pics = photos(tmp_path / "pics", n=12)
    index = tmp_path / "index"
    results: list = []
    barrier = threading.Barrier(2)

    def run():
        b = builder(index, model, chunk_size=4)
        barrier.wait()
        try:
            results.append(b.build([pics]))
        except DataError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    refused = [r for r in results if isinstance(r, DataError)]
    done = [r for r in results if not isinstance(r, DataError)]
    assert len(results) == 2 and len(done) >= 1  # both may succeed one after the other, never interleaved
    assert all("being updated by another" in str(r) for r in refused), refused
    idx = PhotoIndex(index)
    assert len(idx) == 12 and idx.faiss.ntotal == 12 and idx.current["generation"] == len(done)


def test_writes_are_fsynced_and_get_the_umask_mode(tmp_path, monkeypatch):
    from cliplab import utils

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(utils.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    old = os.umask(0o022)
    try:
        utils.write_json(tmp_path / "CURRENT", {"generation": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "CURRENT").stat().st_mode & 0o777 == 0o644  # readable by the group and others
    assert any(".CURRENT.cliplab-" in s for s in synced)  # the temp file, before the rename
    assert str(tmp_path) in synced  # the folder, after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT"]


def test_a_damaged_chunk_or_entry_is_recomputed(tmp_path):
    from cliplab.embed.cache import FeatureCache

    calls = []

    def compute(a, b):
        calls.append((a, b))
        return np.arange(a, b, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32), np.ones(b - a, bool), []

    cache = FeatureCache(tmp_path, chunk_size=4)
    folder = cache.entry_dir("x", "k")
    folder.mkdir(parents=True)
    # a chunk file that exists but was cut short (written by a version without fsync, then power loss)
    (folder / "chunk-0000000000-0000000004.npz").write_bytes(b"PK\x03\x04 truncated")
    out = cache.get_or_compute("x", "k", 10, compute, progress=False)
    assert calls == [(0, 4), (4, 8), (8, 10)] and np.array_equal(out.features[:, 0], np.arange(10))
    # the merged entry damaged: recomputed, not a permanent failure
    (folder / "features.npy").write_bytes(b"\x93NUMPY garbage")
    calls.clear()
    out = cache.get_or_compute("x", "k", 10, compute, progress=False)
    assert calls == [(0, 4), (4, 8), (8, 10)] and not out.reused
    assert np.array_equal(out.features[:, 0], np.arange(10))
    assert cache.get_or_compute("x", "k", 10, compute, progress=False).reused


def test_an_interrupted_build_then_one_more_photo_reuses_the_finished_chunks(tmp_path, model, monkeypatch):
    """Killed half-way (an exception at the 30th image), then a photo is added: the next build embeds only
    the chunks it did not finish plus the new photo's chunk, not every image again."""
    from cliplab.data.images import ImageFiles
    from cliplab.serve import index as index_mod

    pics = photos(tmp_path / "pics", n=48)
    index = tmp_path / "index"

    class Interrupt(Exception):
        pass

    loads = []
    real_load = ImageFiles.load

    def load(self, i):
        loads.append(i)
        if stop_at is not None and len(loads) > stop_at:
            raise Interrupt
        return real_load(self, i)

    monkeypatch.setattr(ImageFiles, "load", load)
    monkeypatch.setattr("cliplab.embed.extract.default_workers", lambda: 0)  # decode in order, in this thread
    stop_at = 30
    with pytest.raises(Interrupt):
        builder(index, model, chunk_size=4, batch_size=2).build([pics])
    assert list((index / index_mod.WORK).rglob("part-*.npz"))
    make_image(pics / "p020b.jpg", "red", "circle", seed=99, size=32)  # sorts in among the finished ones
    stop_at, loads[:] = None, []
    report = builder(index, model, chunk_size=4, batch_size=2).build([pics])
    assert report.total == 49 and report.embedded == 49
    assert len(loads) < 49 - 15  # most of the 30 decoded before the interrupt were reused
    assert not (index / index_mod.WORK).exists()


def test_a_file_that_vanishes_mid_index_is_skipped_and_counted(tmp_path, model, monkeypatch):
    from cliplab.serve import index as index_mod

    pics = photos(tmp_path / "pics", n=6)
    real_walk, real_collect = index_mod.walk_images, index_mod.collect_sources

    def walk(root, exclude=None, formats=index_mod.SAFE_IMAGE_FORMATS):
        for path, reason in real_walk(root, exclude, formats):
            if path.name == "p001.jpg":
                path.unlink()  # gone between the listing and the stat
            yield path, reason

    def collect(*a, **k):
        out = real_collect(*a, **k)
        (pics / "p005.jpg").unlink()  # gone after the walk, before it is decoded
        return out

    monkeypatch.setattr(index_mod, "walk_images", walk)
    monkeypatch.setattr(index_mod, "collect_sources", collect)
    report = builder(tmp_path / "index", model).build([pics])
    reasons = dict(report.skipped)
    assert report.total == 4 and reasons["p001.jpg"] == "file vanished while indexing"
    assert "p005.jpg" in reasons and "not found" in reasons["p005.jpg"]


def test_non_finite_embeddings_are_refused_and_nothing_is_committed(tmp_path, model, monkeypatch):
    from cliplab.embed import pipeline
    from cliplab.errors import DataError
    from cliplab.serve.index import PhotoIndex

    pics = photos(tmp_path / "pics", n=4)
    index = tmp_path / "index"
    builder(index, model).build([pics])
    make_image(pics / "new.jpg", "blue", "square", seed=7, size=32)
    real = pipeline.image_embeddings

    def nan_embeddings(*a, **k):
        z, good, errors = real(*a, **k)
        z[0, 0] = np.nan
        return z, good, errors

    monkeypatch.setattr(pipeline, "image_embeddings", nan_embeddings)
    with pytest.raises(DataError, match="non-finite embeddings"):
        builder(index, model).build([pics])
    idx = PhotoIndex(index)
    assert idx.current["generation"] == 1 and len(idx) == 4 and np.isfinite(np.asarray(idx.vectors)).all()


@pytest.mark.parametrize("name", ["Photos #2", "100% holiday", "Fotos Été 東京"])
def test_index_paths_with_uri_characters(tmp_path, model, name):
    from cliplab.serve.index import PhotoIndex

    parent = tmp_path / name
    pics = photos(parent / "pics", n=3)
    index = parent / f"index {name}"
    builder(index, model).build([pics])
    idx = PhotoIndex(index)
    assert len(idx) == 3 and idx.summary()["images"] == 3
    assert sorted(p.name for p in parent.iterdir()) == sorted(["pics", f"index {name}"])  # no stray files
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_or_read_only_folder_leaves_the_previous_generation_whole(tmp_path, model, monkeypatch, err,
                                                                              cli):
    from cliplab import utils
    from cliplab.serve.index import PhotoIndex

    pics = photos(tmp_path / "pics", n=4)
    index = tmp_path / "index"
    builder(index, model).build([pics])
    make_image(pics / "new.jpg", "blue", "square", seed=7, size=32)
    real_open = os.open

    def failing_open(path, flags, *args):
        if flags & os.O_CREAT and str(path).startswith(str(index)) and "faiss-" in str(path):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(utils.os, "open", failing_open)
    res = cli("index", pics, "--out", index, "-m", model, "--device", "cpu")
    assert res.returncode == 2 and os.strerror(err) in res.stdout and "previous generation is unchanged" in res.stdout
    assert len([line for line in res.stdout.splitlines() if line.strip() and "error" in line]) == 1
    idx = PhotoIndex(index)
    assert idx.current["generation"] == 1 and len(idx) == 4
    assert idx.search(idx.vector(int(idx.row_to_id[0])), 1)[0]["id"] == int(idx.row_to_id[0])
    assert not [p for p in index.iterdir() if ".cliplab-" in p.name]  # no temp file left behind


def test_indexing_decodes_only_the_allowed_formats(tmp_path, model):
    from PIL import Image

    pics = photos(tmp_path / "pics", n=3)
    Image.new("RGB", (16, 16), (10, 20, 30)).save(pics / "scan.tif")
    (pics / "fake.jpg").write_bytes((pics / "scan.tif").read_bytes())  # a TIFF behind a .jpg name
    report = builder(tmp_path / "index", model).build([pics])
    assert report.total == 3 and "scan.tif" not in dict(report.skipped)  # .tif is not walked by default
    assert "not one of JPEG" in dict(report.skipped)["fake.jpg"]
    report = builder(tmp_path / "index2", model, formats=["jpeg", "tiff"]).build([pics])
    assert report.total == 5
