"""Search app benchmark: indexing speed, incremental re-indexing, query latency and load over HTTP.

    python bench/search.py -m runs/demo [--n 10000] [--seconds 30] [--users 16]

1. A 10,000-image folder: Flickr8k's images, topped up with CIFAR-10 training images (hard links).
2. ``index.images_per_s``: a new index (walk, hash, decode, embed, FAISS, SQLite) from an empty work store,
   beside the naive loop (PIL decode + eager torch, one image at a time) on 200 of the images.
3. ``index.incremental_seconds``: 1% of the files re-encoded (new content and mtime), index re-run.
4. ``search.latency.*``: one client, text queries (distinct Flickr8k test captions, so no query cache hits)
   over HTTP against ``cliplab serve``, text encoding included; k = 10.
5. ``search.load.*``: locust, 16 concurrent users for 30 s, the same kind of queries; errors counted.
6. ``search.upload_load.*``: 8 clients upload query images without pause for 20 s (a 12 MP JPEG photo and a
   20 MP PNG, alternately: decoding is the expensive part) while one client asks ``/healthz`` every 50 ms;
   its latency must stay low (decoding and embedding run off the event loop, cores - 1 at a time).
Anchor: clip-retrieval's README (~50 ms per query, ~20 queries/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = '''
import json, random
from locust import HttpUser, task, constant
QUERIES = json.load(open({queries!r}))

class Searcher(HttpUser):
    wait_time = constant(0)

    @task
    def search(self):
        q = random.choice(QUERIES)
        with self.client.get("/api/search", params={{"q": q, "k": 10}}, name="/api/search",
                             catch_response=True) as r:
            if r.status_code != 200 or len(r.json().get("results", [])) != 10:
                r.failure(f"status {{r.status_code}}")
'''


def build_folder(dest: Path, n: int, flickr: Path, extra: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    sources = sorted(flickr.glob("*.jpg")) + sorted(extra.rglob("*.jpg"))
    if len(sources) < n:
        raise SystemExit(f"only {len(sources)} images available, need {n}")
    out = []
    for i, src in enumerate(sources[:n]):
        target = dest / ("flickr" if i < 8091 else "cifar") / f"{i:05d}_{src.name}"
        target.parent.mkdir(exist_ok=True)
        if not target.exists():
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)
        out.append(target)
    return out


def naive_images_per_s(model_spec: str, paths: list[Path]) -> float:
    """The loop a notebook would write: open, preprocess and embed one image at a time in eager torch."""
    import torch
    from PIL import Image

    from cliplab.models.factory import load_model

    model = load_model(model_spec)
    tf = model.preprocess()
    t = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            model.encode_image(tf(Image.open(p).convert("RGB"))[None])
    return len(paths) / (time.perf_counter() - t)


def upload_images(photo: Path) -> list[tuple[str, bytes, str]]:
    """A 12 MP JPEG (a photo upscaled) and a 20 MP PNG (flat colours: small file, many pixels, like issue #24's)."""
    import io

    from PIL import Image

    with Image.open(photo) as im:
        big = im.convert("RGB").resize((4000, 3000))
    jpeg = io.BytesIO()
    big.save(jpeg, "JPEG", quality=85)
    png = io.BytesIO()
    Image.new("RGB", (4472, 4472), (120, 160, 200)).save(png, "PNG")
    return [("photo.jpg", jpeg.getvalue(), "image/jpeg"), ("flat.png", png.getvalue(), "image/png")]


def upload_load(url: str, images: list[tuple[str, bytes, str]], users: int = 8, seconds: float = 20.0) -> dict:
    """``users`` threads upload images back to back; one more asks /healthz every 50 ms and times it."""
    import threading

    import httpx

    stop = time.monotonic() + seconds
    statuses: dict[int, int] = {}
    health: list[float] = []
    health_errors = []
    lock = threading.Lock()

    def uploader(n: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            i = n
            while time.monotonic() < stop:
                name, data, ctype = images[i % len(images)]
                try:
                    code = client.post("/api/search", files={"image": (name, data, ctype)}, data={"k": "10"}).status_code
                except httpx.HTTPError:
                    code = 0
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                i += 1

    def prober() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = client.get("/healthz")
                health.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    health_errors.append(r.status_code)
                time.sleep(0.05)

    threads = [threading.Thread(target=uploader, args=(n,)) for n in range(users)] + [threading.Thread(target=prober)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"users": users, "seconds": seconds, "uploads": statuses, "healthz_requests": len(health),
            "healthz_errors": len(health_errors), "healthz_p50_ms": float(np.percentile(health, 50)),
            "healthz_p99_ms": float(np.percentile(health, 99)), "healthz_max_ms": float(np.max(health))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="runs/demo")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--flickr", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--extra", default=str(ROOT.parent / "shared/data/cifar10/train"))
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--latency-queries", type=int, default=500)
    ap.add_argument("--upload-users", type=int, default=8)
    ap.add_argument("--upload-seconds", type=float, default=20.0)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cliplab-bench-search"))
    ap.add_argument("--index", default=None, help="serve this existing index (steps 1-3 skipped; results saved "
                                                   "as search_serve.json)")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.index:
        from cliplab.serve.index import PhotoIndex

        index_dir = Path(args.index)
        served = PhotoIndex(index_dir)
        results: dict = {"n_images": len(served), "model": served.info["model"], "index_dir": str(index_dir)}
        upload_photo = sorted((Path(args.flickr) / "images").glob("*.jpg"))[0]
    else:
        index_dir = work / "index"
        results, upload_photo = build_steps(args, work)
    server_steps(args, work, index_dir, results, upload_photo)
    summary = []
    if not args.index:
        summary += [("index.images_per_s", f"{results['index']['images_per_s']:.1f}",
                     f"{results['index']['images_per_s'] / results['index']['naive_images_per_s']:.2f}x naive loop"),
                    ("index.incremental_seconds", f"{results['incremental']['seconds']:.1f}",
                     f"{results['index']['seconds'] / results['incremental']['seconds']:.1f}x faster than a new index")]
    summary += [("search.latency.p50_ms", f"{results['latency']['p50_ms']:.1f}",
                 f"target <= 25 ({25 / results['latency']['p50_ms']:.2f}x); clip-retrieval anchor ~50"),
                ("search.latency.p99_ms", f"{results['latency']['p99_ms']:.1f}", ""),
                ("search.load.rps", f"{results['load']['rps']:.1f}",
                 f"target >= 100 ({results['load']['rps'] / 100:.2f}x); anchor ~20"),
                ("search.load.errors", str(results["load"]["errors"]), "target 0"),
                ("search.upload_load.healthz_p99_ms", f"{results['upload_load']['healthz_p99_ms']:.1f}",
                 f"target <= 100 under {results['upload_load']['users']} uploaders "
                 f"({100 / results['upload_load']['healthz_p99_ms']:.2f}x)")]
    print(table(summary, ("key", "value", "ratio / target")))
    save("search_serve" if args.index else "search", {"machine_detail": machine(), **results})


def build_steps(args, work: Path) -> tuple[dict, Path]:
    """Steps 1-3: the folder, a new index, an incremental re-index; returns the results and a photo."""
    from cliplab.serve.index import IndexBuilder

    photos = work / "photos"
    shutil.rmtree(work / "index", ignore_errors=True)
    files = build_folder(photos, args.n, Path(args.flickr) / "images", Path(args.extra))
    results: dict = {"n_images": len(files), "model": args.model}

    # 2. a new index
    t = time.perf_counter()
    report = IndexBuilder(work / "index", args.model, log=print).build([photos])
    build_s = time.perf_counter() - t
    results["index"] = {"seconds": build_s, "images_per_s": len(files) / build_s, **report.to_dict()}
    del results["index"]["skipped_items"]
    sample = random.Random(0).sample(files, 200)
    results["index"]["naive_images_per_s"] = naive_images_per_s(args.model, sample)
    print(f"index: {len(files)} images in {build_s:.1f} s = {len(files) / build_s:.1f} images/s "
          f"(naive loop {results['index']['naive_images_per_s']:.1f} images/s)")

    # 3. 1% of the files changed
    from PIL import Image

    changed = random.Random(1).sample(files, max(1, len(files) // 100))
    for p in changed:
        p.unlink()  # break the hard link: the shared data stays untouched
        with Image.open(sample[0]) as im:
            im.convert("RGB").rotate(90).save(p, quality=90)
    t = time.perf_counter()
    report = IndexBuilder(work / "index", args.model, log=print).build([photos])
    results["incremental"] = {"seconds": time.perf_counter() - t, "changed_files": len(changed),
                              "embedded": report.embedded, "unchanged": report.unchanged}
    print(f"incremental: {len(changed)} changed files re-indexed in {results['incremental']['seconds']:.1f} s")
    return results, sample[1]


def server_steps(args, work: Path, index_dir: Path, results: dict, upload_photo: Path) -> None:
    """Steps 4-6 against `cliplab serve INDEX` in a subprocess."""
    from cliplab.data.captions import load_caption_dataset

    ds = load_caption_dataset(args.flickr, "test")
    queries = list(dict.fromkeys(ds.captions))
    random.Random(2).shuffle(queries)
    (work / "queries.json").write_text(json.dumps(queries))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "cliplab", "serve", str(index_dir), "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("server did not start:\n" + (server.stdout.read() if server.poll() is not None else ""))
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as client:
            for q in queries[-20:]:  # warm-up (not measured)
                client.get("/api/search", params={"q": q, "k": 10})
            lat = []
            for q in queries[: args.latency_queries]:
                t = time.perf_counter()
                r = client.get("/api/search", params={"q": q, "k": 10})
                lat.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200 and len(r.json()["results"]) == 10
        results["latency"] = {"p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
                              "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(np.mean(lat)),
                              "queries": len(lat)}
        print(f"latency over HTTP, one client: p50 {results['latency']['p50_ms']:.1f} ms, "
              f"p99 {results['latency']['p99_ms']:.1f} ms")
        locustfile = work / "locustfile.py"
        locustfile.write_text(LOCUSTFILE.format(queries=str(work / "queries.json")))
        prefix = work / "locust"
        cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(args.users),
               "-r", str(args.users), "-t", f"{args.seconds}s", "--host", url, "--csv", str(prefix), "--only-summary",
               "--loglevel", "WARNING"]
        subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=args.seconds + 120)
        import csv

        rows = {r["Name"]: r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}
        agg = rows["Aggregated"]
        results["load"] = {"users": args.users, "seconds": args.seconds, "requests": int(agg["Request Count"]),
                           "errors": int(agg["Failure Count"]), "rps": float(agg["Requests/s"]),
                           "p50_ms": float(agg["50%"]), "p99_ms": float(agg["99%"])}
        print(f"load: {args.users} users, {results['load']['rps']:.1f} requests/s, {results['load']['errors']} errors, "
              f"p50 {results['load']['p50_ms']:.0f} ms")
        up = results["upload_load"] = upload_load(url, upload_images(upload_photo), args.upload_users, args.upload_seconds)
        print(f"upload load: {up['users']} uploaders, answers {up['uploads']}; /healthz p50 {up['healthz_p50_ms']:.1f} ms, "
              f"p99 {up['healthz_p99_ms']:.1f} ms, max {up['healthz_max_ms']:.1f} ms")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()



if __name__ == "__main__":
    main()
