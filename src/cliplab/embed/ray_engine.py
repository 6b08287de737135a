"""Image features on a Ray cluster (``--engine ray``): the missing chunks of a feature-store entry are a Ray
Data dataset, mapped by a pool of actors (one tower per actor, on a GPU when the cluster has them); the
driver writes each chunk into the same store, atomically, as it arrives, then merges. The result is the
entry the single-process engine writes (same key, same chunks, same features). An actor that dies is
restarted and its chunk recomputed (Ray Data retries actor tasks); a chunk is written once.

Multi-node: start Ray on each machine (``ray start --head`` / ``ray start --address HEAD:6379``), keep the
images and the cache folder (``--cache-dir``) on storage every node sees at the same path, and pass
``--ray-address HEAD:6379`` (or set ``RAY_ADDRESS``). The object store only carries chunk results.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from cliplab.errors import ConfigError
from cliplab.extras import require

DIE_ONCE = "CLIPLAB_RAY_DIE_ONCE"  # test hook: a marker path; the first actor call that creates it exits


def _pack(feats, valid, errors) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, features=feats, valid=valid, errors=np.asarray("\n".join(errors)))
    return buf.getvalue()


def _unpack(blob: bytes):
    with np.load(io.BytesIO(blob)) as z:
        errors = str(z["errors"])
        return z["features"], z["valid"], [e for e in errors.split("\n") if e]


class ChunkActor:
    """One image tower per actor; ``__call__`` computes the chunks of a batch of spans."""

    def __init__(self, tower_config: dict, paths: list[str], cache_root: str, batch_size: int, on_error: str,
                 backend: str, max_pixels: int | None = None, threads: int | None = None,
                 formats: list[str] | None = None) -> None:
        import torch

        if threads:  # the driver's intra-op threads: same summation order, so the same features bit for bit
            torch.set_num_threads(threads)

        from cliplab.data.images import ImageFiles
        from cliplab.embed.cache import FeatureCache
        from cliplab.embed.extract import ImageChunkEncoder
        from cliplab.models.factory import pretrained_tower
        from cliplab.models.image_tower import ImageTowerConfig

        device = "cuda" if torch.cuda.is_available() else "cpu"
        tower = pretrained_tower(ImageTowerConfig.from_dict(tower_config))
        images = ImageFiles(paths, max_pixels=max_pixels, formats=tuple(formats) if formats else None)
        self.encode = ImageChunkEncoder(tower, images, cache=FeatureCache(cache_root), batch_size=batch_size,
                                        device=device, on_error=on_error, backend=backend)

    def __call__(self, batch: dict) -> dict:
        marker = os.environ.get(DIE_ONCE)
        if marker and not Path(marker).exists():
            Path(marker).write_text("died once\n")
            os._exit(1)  # a worker lost mid-task: Ray restarts the actor and retries the chunk
        blobs = [_pack(*self.encode(int(a), int(b))) for a, b in zip(batch["start"], batch["stop"])]
        return {"start": batch["start"], "stop": batch["stop"], "blob": np.asarray(blobs, dtype=object)}


def ray_chunk_runner(tower, paths: list[Path], *, cache_root: Path, batch_size: int = 64, on_error: str = "raise",
                     backend: str = "auto", actors: int = 2, address: str | None = None, gpus_per_actor: float = 0,
                     max_pixels: int | None = None, formats: tuple[str, ...] | None = None):
    """A ``run_chunks`` for :meth:`FeatureCache.get_or_compute` that computes the spans on Ray."""
    from cliplab.models.image_tower import ImageTower

    if not isinstance(tower, ImageTower):
        raise ConfigError("--engine ray embeds cliplab image towers (two-tower models, ConSE); a CLIP's "
                          "embeddings run in-process")

    import torch

    threads = torch.get_num_threads()

    def run(spans):
        ray = require("ray", "the Ray engine (--engine ray)")
        if not spans:
            return
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in (DIE_ONCE, "CLIPLAB_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=False, runtime_env={"env_vars": env} if env else None,
                     **({} if (address or os.environ.get("RAY_ADDRESS")) else {"num_cpus": max(actors, 1)}))
        ds = ray.data.from_items([{"start": a, "stop": b} for a, b in spans], override_num_blocks=len(spans))
        env = {k: os.environ[k] for k in (DIE_ONCE,) if k in os.environ}
        out = ds.map_batches(ChunkActor, batch_size=1, concurrency=actors, num_cpus=1, num_gpus=gpus_per_actor,
                             runtime_env={"env_vars": env} if env else None,
                             fn_constructor_kwargs={"tower_config": tower.config.to_dict(),
                                                    "paths": [str(p) for p in paths], "cache_root": str(cache_root),
                                                    "batch_size": batch_size, "on_error": on_error,
                                                    "backend": backend, "max_pixels": max_pixels,
                                                    "threads": threads,
                                                    "formats": list(formats) if formats else None})
        for row in out.iter_rows():
            yield (int(row["start"]), int(row["stop"]), *_unpack(row["blob"]))

    return run
