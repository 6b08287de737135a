"""`--engine ray`: image chunks embedded by a pool of Ray actors on a local 2-CPU cluster write the same
feature-store entry as the single-process engine, and an actor killed mid-task is retried with no chunk lost
or written twice."""


import numpy as np
import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.subprocess
def test_ray_engine_equals_single_process_and_survives_a_killed_worker(caption_dir, tmp_path, towers, local_cluster,
                                                                       monkeypatch):
    from cliplab.data import read_pairs
    from cliplab.embed import FeatureCache, embed_images
    from cliplab.embed import cache as cache_module

    paths = read_pairs(caption_dir / "captions.csv").image_paths()[:12]
    ref = embed_images(towers[0], paths, cache=FeatureCache(tmp_path / "local", chunk_size=4), progress=False,
                       backend="torch")
    writes = []
    original = cache_module.atomic_write
    monkeypatch.setattr(cache_module, "atomic_write", lambda p, w: writes.append(p.name) or original(p, w))
    monkeypatch.setenv("CLIPLAB_RAY_DIE_ONCE", str(tmp_path / "died"))
    got = embed_images(towers[0], paths, cache=FeatureCache(tmp_path / "ray", chunk_size=4), progress=False,
                       backend="torch", engine="ray", ray_actors=2)
    assert (tmp_path / "died").exists()  # an actor did exit mid-task
    assert got.path.name == ref.path.name  # the same store entry (key) as the single-process engine
    np.testing.assert_array_equal(np.asarray(got.features), np.asarray(ref.features))
    chunks = [w for w in writes if w.startswith("chunk-")]
    assert len(chunks) == 3 and len(set(chunks)) == 3  # each of the 3 chunks written exactly once
    again = embed_images(towers[0], paths, cache=FeatureCache(tmp_path / "ray", chunk_size=4), progress=False,
                         backend="torch", engine="ray")
    assert again.reused
