#!/usr/bin/env python
"""Latency and peak memory of `sbir search`'s exact top-k, beside faiss IndexFlatIP.

    .venv/bin/python benchmarks/bench_search.py [--sizes 1000 100000 1000000] [--dim 64] [--out FILE]

Cases, each in a fresh child process (so its peak RSS is its own), on random L2-normalised float32
embeddings of ``--dim`` (default 64: ``distill.student.embed_dim`` of the default params):

* ``memory``: the gallery is an (N, D) tensor in RAM; ``sbir.search.topk_cosine`` (running top-k
  over blocks) and faiss ``IndexFlatIP`` (exact inner product; its ``add`` copies the gallery);
* ``parquet``: the gallery is an embedding cache file on disk (the format ``sbir search`` writes),
  streamed one row group at a time by ``EmbeddingCache.iter_chunks``, at every N (a bounded peak
  does not grow with N).

Figures per case: latency of one query (median of ``--reps`` single-query searches) and of a batch
of ``--batch`` queries (median of 3), k = ``--k``; peak RSS increase during the searches over the
RSS just before them (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``; tracemalloc does not see torch's or faiss's allocations), next to the
gallery's own size. Both libraries run on ``--threads`` threads (default 1: the machine is shared).
Also the throughput of embedding photos into a cache (decode + resize + small CNN + Parquet) on the
embedded dataset's test split (``data/prepared``) with ``outputs/distill/students.pt`` when present.

Prints a table and writes the JSON to ``--out`` (default benchmarks/results/search.json).
``main(argv)`` returns the figures as a dict (benchmarks/run_all.py calls it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


# --------------------------------------------------------------------------- memory probes
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak RSS increase (MB) over the RSS at entry."""

    def __enter__(self) -> "PeakRss":
        self.reset = _reset_peak()
        self.base = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.delta = _status_mb("VmHWM") - self.base


def _timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- child cases
def _gallery(n: int, dim: int, seed: int):
    import torch

    g = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(g, dim=1)


def case_memory(n: int, dim: int, k: int, batch: int, reps: int, threads: int) -> dict:
    import faiss
    import torch

    from sbir.search import topk_cosine

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    g = _gallery(n, dim, 0)
    q = _gallery(batch, dim, 1)
    out: dict = {"n": n, "dim": dim, "k": k, "batch": batch, "gallery_mb": round(g.numel() * 4 / 2**20, 1)}
    # the gallery rows are unit vectors, as in a cache (sbir search passes gallery_is_unit=True)
    topk_cosine(q[:1], g, k, gallery_is_unit=True)  # warm-up (allocator, kernels)
    with PeakRss() as m:
        out["ours_query_ms"] = round(1000 * _timed(lambda: topk_cosine(q[:1], g, k, gallery_is_unit=True), reps), 3)
        out["ours_batch_ms"] = round(1000 * _timed(lambda: topk_cosine(q, g, k, gallery_is_unit=True), 3), 3)
    out["ours_peak_rss_delta_mb"] = round(m.delta, 1)
    # the generic call normalises every gallery block itself
    out["ours_normalising_query_ms"] = round(1000 * _timed(lambda: topk_cosine(q[:1], g, k), reps), 3)
    out["ours_normalising_batch_ms"] = round(1000 * _timed(lambda: topk_cosine(q, g, k), 3), 3)
    ours = topk_cosine(q, g, k, gallery_is_unit=True)
    gn = g.numpy()
    with PeakRss() as m_add:
        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(dim)
        index.add(gn)
        out["faiss_add_s"] = round(time.perf_counter() - t0, 4)
    out["faiss_index_rss_delta_mb"] = round(m_add.delta, 1)
    qn = q.numpy()
    index.search(qn[:1], k)
    with PeakRss() as m:
        out["faiss_query_ms"] = round(1000 * _timed(lambda: index.search(qn[:1], k), reps), 3)
        out["faiss_batch_ms"] = round(1000 * _timed(lambda: index.search(qn, k), 3), 3)
    out["faiss_peak_rss_delta_mb"] = round(m.delta, 1)
    fv, fi = index.search(qn, k)
    out["same_topk_as_faiss"] = float((ours[1].numpy() == fi).mean())
    out["max_score_diff"] = float(abs(ours[0].numpy() - fv).max())
    out["peak_reset_supported"] = m.reset
    return out


def write_cache(path: str, n: int, dim: int) -> dict:
    """A cache file of n random embeddings, written in slices (the writer's memory stays bounded)."""
    import torch

    from sbir.search import CacheWriter

    t0 = time.perf_counter()
    w = CacheWriter(path, dim, {"version": 1, "checkpoint_sha256": "random", "model": "random", "image_size": 0,
                                "gallery": f"random:{n}x{dim}"})
    gen = torch.Generator().manual_seed(0)
    step = 65536
    for s in range(0, n, step):
        m = min(step, n - s)
        emb = torch.nn.functional.normalize(torch.randn(m, dim, generator=gen), dim=1)
        w.add([f"r{i}" for i in range(s, s + m)], [None] * m, [None] * m, emb)
    w.close()
    return {"write_s": round(time.perf_counter() - t0, 2), "file_mb": round(os.path.getsize(path) / 2**20, 1)}


def case_parquet(path: str, k: int, batch: int, reps: int, threads: int) -> dict:
    import torch

    from sbir.search import EmbeddingCache, topk_cosine

    torch.set_num_threads(threads)
    cache = EmbeddingCache(path)
    q = _gallery(batch, cache.dim, 1)
    out: dict = {"n": len(cache), "dim": cache.dim, "k": k, "batch": batch,
                 "gallery_mb": round(len(cache) * cache.dim * 4 / 2**20, 1)}
    def run(qq):  # as sbir.search.search streams a cache
        return topk_cosine(qq, cache.iter_chunks(), k, gallery_is_unit=True)

    run(q[:1])
    with PeakRss() as m:
        out["ours_query_ms"] = round(1000 * _timed(lambda: run(q[:1]), reps), 3)
        out["ours_batch_ms"] = round(1000 * _timed(lambda: run(q), 3), 3)
    out["ours_peak_rss_delta_mb"] = round(m.delta, 1)
    # the streamed result equals the in-memory one
    full = cache.read_all()
    out["same_topk_as_in_memory"] = bool(torch.equal(run(q)[1], topk_cosine(q, full, k)[1]))
    return out


def case_embed(threads: int) -> dict:
    """Photos/s of embed_gallery (decode + resize + encoder + Parquet) on data/prepared's test split."""
    import torch

    from sbir.search import embed_gallery, load_encoder, open_gallery

    torch.set_num_threads(threads)
    ckpt, data = REPO / "outputs" / "distill" / "students.pt", REPO / "data" / "prepared"
    if not ckpt.is_file() or not (data / "manifest.json").is_file():
        return {"skipped": f"needs {ckpt} and {data} (run the default pipeline)"}
    enc = load_encoder(ckpt)
    gallery = open_gallery(data, ["train", "test"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = embed_gallery(enc, gallery, tmp, progress=False, log=lambda m: None)
        secs = time.perf_counter() - t0
    return {"photos": len(cache), "seconds": round(secs, 3), "photos_per_s": round(len(cache) / secs, 1),
            "image_size": enc.image_size, "model": f"{enc.name} ({ckpt.relative_to(REPO)})", "dim": enc.embed_dim}


def _child(spec: dict) -> dict:
    """Run one case in a fresh interpreter; its JSON comes back on the last stdout line."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark case {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000], help="gallery sizes")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension (default: %(default)s)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64, help="queries per batch (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=9, help="single-query repetitions (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch / faiss threads (default: %(default)s)")
    ap.add_argument("--no-parquet", action="store_true", help="skip the on-disk streamed case")
    ap.add_argument("--no-embed", action="store_true", help="skip the gallery embedding throughput")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "search.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        fn = {"memory": case_memory, "parquet": case_parquet, "embed": case_embed, "write": write_cache}[spec.pop("case")]
        print(json.dumps(fn(**spec)))
        return {}
    import torch

    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                                 "torch": torch.__version__, "note": "2 CPU cores shared with other jobs"},
                     "params": {"dim": args.dim, "k": args.k, "batch": args.batch, "reps": args.reps},
                     "memory": [], "parquet": None, "embed": None}
    common = {"k": args.k, "batch": args.batch, "reps": args.reps, "threads": args.threads}
    for n in args.sizes:
        r = _child({"case": "memory", "n": n, "dim": args.dim, **common})
        results["memory"].append(r)
        print(f"N={n:>9,}  ours: {r['ours_query_ms']:9.2f} ms/query  {r['ours_batch_ms']:9.1f} ms/{args.batch}  "
              f"+{r['ours_peak_rss_delta_mb']:6.1f} MB | faiss: {r['faiss_query_ms']:9.2f} ms/query  "
              f"{r['faiss_batch_ms']:9.1f} ms/{args.batch}  +{r['faiss_peak_rss_delta_mb']:6.1f} MB "
              f"(index +{r['faiss_index_rss_delta_mb']:.0f} MB) | gallery {r['gallery_mb']} MB, "
              f"same top-k {r['same_topk_as_faiss']:.4f}; ours normalising each block: "
              f"{r['ours_normalising_query_ms']:.2f} ms/query, {r['ours_normalising_batch_ms']:.1f} ms/{args.batch}",
              flush=True)
    if not args.no_parquet:
        results["parquet"] = []
        for n in args.sizes:  # every size: a bounded peak does not grow with N
            with tempfile.TemporaryDirectory() as tmp:
                path = str(Path(tmp) / "gallery.parquet")
                w = _child({"case": "write", "path": path, "n": n, "dim": args.dim})
                r = _child({"case": "parquet", "path": path, **common})
            r.update(w)
            results["parquet"].append(r)
            print(f"N={n:>9,} streamed from Parquet ({r['file_mb']} MB file): {r['ours_query_ms']:9.2f} ms/query  "
                  f"{r['ours_batch_ms']:9.1f} ms/{args.batch}  +{r['ours_peak_rss_delta_mb']:6.1f} MB peak RSS "
                  f"(gallery {r['gallery_mb']} MB); same top-k as in memory: {r['same_topk_as_in_memory']}",
                  flush=True)
    if not args.no_embed:
        r = _child({"case": "embed", "threads": args.threads})
        results["embed"] = r
        if "skipped" in r:
            print(f"gallery embedding: skipped ({r['skipped']})")
        else:
            print(f"gallery embedding: {r['photos']} photos at {r['image_size']} px in {r['seconds']} s = "
                  f"{r['photos_per_s']} photos/s ({r['model']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
