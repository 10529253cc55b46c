"""Approximate search, measured: for each faiss index type that search.py offers, Recall@10 relative to
exact search and queries/s on a generated catalogue of 100k and 1M vectors, and U-FIRE-mini Recall@10 of a trained
checkpoint with each index against exact search.

    .venv/bin/python benchmarks/ann_search.py --quick                                  # 10k smoke run, < 1 minute
    .venv/bin/python benchmarks/ann_search.py --n 100000 1000000 --ufire runs/tiny/best.pt   # docs/ann_search.md

Catalogue: embeddings of a large fashion catalogue are not available here, so they are generated (see `mixture`):
a two-level mixture of Gaussian clusters (categories, then styles within a category) of varying size and spread,
with a power-law spectrum that gives a local intrinsic dimension of about 25, rotated at random and put on the
unit sphere. Queries are held-out draws from the same mixture. Dimension 256 rather than Qwen3-VL-4B's 2560: 1M x
2560 fp32 is 10 GB and the index builds at that width do not fit a 2-core machine; the JSON records the width used.

Measured single-threaded (faiss.omp_set_num_threads(1); --build-threads for building only) with one batch of all
queries per search. Times are CPU seconds of this process (time.process_time), not wall time: the machine is
shared, and CPU time of a single thread does not grow with other people's load the way wall time does. Recall@10
relative to exact is the fraction of each query's exact top 10 (IndexFlatIP, checked against numpy) that the index
returns in its top 10. U-FIRE-mini Recall@10 follows evaluate.recall_at_k's protocol (a hit when a ground-truth
image is in the top 10, own images excluded), with the ranking of each index instead of exact search.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import faiss
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import write_text_atomic  # noqa: E402
from search import EF_CONSTRUCTION, EF_SEARCH, NPROBE, build_index, new_index, set_search_params  # noqa: E402

K = 10
LISTS_PER_SQRT_N = 4        # IVF nlist ~ 4 sqrt(N): faiss's usual range is 4 to 16 sqrt(N)
TRAIN_PER_LIST = 39         # IVF training sample: 39 rows per list, the least faiss's k-means accepts unwarned
DIMS_PER_CODE = 4           # PQ: one 8-bit code per 4 dimensions, 1/16 of fp32 (64 bytes at dim 256)
SWEEPS = {"efSearch": (16, 32, 64, 128, 256, 512), "nprobe": (1, 4, 16, 32, 64, 128, 256)}
# The picked defaults (docs/ann_search.md): IVF-Flat loses at most 1 point of Recall@10 against exact search at 1M
# vectors; HNSW32 does with --ef-construction 128 (measured at 100k); IVF-PQ cannot: its codes lose more at any nprobe.
DEFAULTS = {"efSearch": EF_SEARCH, "nprobe": NPROBE}


# ----------------------------------------------------------------------------------------------------------------
# The index types and their size rules

def index_types(n, dim):
    """{type: (factory, train_size or None, search parameter or None)} for a catalogue of n vectors of width dim, in
    the order they are measured (HNSW last: its build is the longest)."""
    nlist = max(1, round(LISTS_PER_SQRT_N * n ** 0.5))
    train = min(n, TRAIN_PER_LIST * nlist)
    m = dim // DIMS_PER_CODE
    # 8-bit codes need 256 training rows per sub-quantiser; a tiny gallery gets fewer bits (U-FIRE-mini only).
    bits = min(8, int(np.log2(train)))
    pq = f"PQ{m}" if bits == 8 else f"PQ{m}x{bits}"
    return {"Flat": ("Flat", None, None),
            "IVF-Flat": (f"IVF{nlist},Flat", train, "nprobe"),
            "IVF-PQ": (f"IVF{nlist},{pq}", train, "nprobe"),
            "HNSW32": ("HNSW32", None, "efSearch")}


def set_param(index, param, value):
    set_search_params(index, **{{"nprobe": "nprobe", "efSearch": "ef_search"}[param]: value})


# ----------------------------------------------------------------------------------------------------------------
# The generated catalogue

def mixture(dim, seed=0, categories=100, styles=20, alpha=0.75):
    """Parameters of the catalogue's distribution. Real image embeddings are neither uniform on the sphere (where
    every neighbour is equally far and no index beats brute force) nor a few tight blobs (where any index is exact):
    they cluster at several scales, with clusters of very different size and spread, and vary locally along a few
    tens of directions. Here: `categories` centres, `styles` style centres around each, points around a style with
    a log-normal spread; cluster weights log-normal (a few big styles, many small ones); every offset drawn with
    a power-law spectrum (variance i^-alpha along axis i: local intrinsic dimension about 25 at dim 256 and
    alpha 0.75), the whole rotated at random so no coordinate is special (PQ splits coordinates)."""
    rng = np.random.default_rng([seed, 0])
    scale = np.arange(1, dim + 1) ** (-alpha / 2)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    category = np.repeat(rng.standard_normal((categories, dim)) * scale, styles, axis=0)
    centres = category + 0.6 * rng.standard_normal((categories * styles, dim)) * scale
    weights = rng.lognormal(0.0, 1.0, categories * styles)
    return {"scale": scale, "rotation": rotation.astype(np.float32), "centres": centres,
            "weights": weights / weights.sum(), "spread": 0.4 * rng.lognormal(0.0, 0.3, categories * styles)}


def draw(mix, n, rng, chunk=100_000):
    """n L2-normalised float32 points [n, dim] of the mixture, drawn in chunks to bound the float64 temporaries."""
    out = np.empty((n, len(mix["scale"])), dtype=np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        cluster = rng.choice(len(mix["weights"]), size, p=mix["weights"])
        noise = rng.standard_normal((size, len(mix["scale"]))) * mix["scale"]
        out[start:start + size] = (mix["centres"][cluster] + mix["spread"][cluster, None] * noise) @ mix["rotation"].T
    faiss.normalize_L2(out)
    return out


def local_intrinsic_dimension(x, queries, k=20):
    """Median maximum-likelihood estimate (Levina & Bickel) from each query's k nearest Euclidean distances."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    dist, _ = index.search(queries, k)
    dist = np.sqrt(np.maximum(dist, 1e-12))
    return float(np.median(-1.0 / np.log(dist[:, :-1] / dist[:, -1:]).mean(axis=1)))


# ----------------------------------------------------------------------------------------------------------------
# Measurement

def cpu_timed(fn, *args):
    start = time.process_time()
    out = fn(*args)
    return out, time.process_time() - start


def timed_search(index, queries):
    """(ids [Q, K], queries per CPU second): the median of 3 searches, or one search when it takes over a second."""
    (_, ids), seconds = cpu_timed(index.search, queries, K)
    times = [seconds] + ([cpu_timed(index.search, queries, K)[1] for _ in range(2)] if seconds < 1.0 else [])
    return ids, len(queries) / max(statistics.median(times), 1e-9)


def overlap_recall(found, exact):
    """Mean fraction of each query's exact top K among its approximate top K, checked against plain sets."""
    hits = (found[:, :, None] == exact[:, None, :]).any(axis=2).sum(axis=1)
    assert hits.tolist() == [len(set(f) & set(e)) for f, e in zip(found.tolist(), exact.tolist())]
    return float(hits.mean()) / exact.shape[1]


def check_exact(x, queries, ids, scores, rows=32):
    """faiss's exact top K against numpy brute force on the first `rows` queries (scores equal; id sets equal
    wherever the K-th and (K+1)-th numpy scores are not tied)."""
    sims = queries[:rows] @ x.T
    top = np.argsort(-sims, axis=1)[:, :K + 1]
    top_scores = np.take_along_axis(sims, top, axis=1)
    assert np.allclose(scores[:rows], top_scores[:, :K], atol=1e-5), "faiss Flat disagrees with numpy"
    untied = top_scores[:, K - 1] - top_scores[:, K] > 1e-5
    assert all(set(a) == set(b) for a, b, u in zip(ids[:rows].tolist(), top[:, :K].tolist(), untied) if u)


def measure_catalogue(args, n, result, save):
    """Build and search every index type on a catalogue of n vectors into `result`; save() after each index."""
    mix = mixture(args.dim, args.seed)
    x = draw(mix, n, np.random.default_rng([args.seed, 1]))
    queries = draw(mix, args.queries, np.random.default_rng([args.seed, 2]))
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    (scores, exact), exact_s = cpu_timed(flat.search, queries, K)
    check_exact(x, queries, exact, scores)
    del flat
    result.update(n=n, dim=args.dim, queries=args.queries, exact_cpu_s=exact_s, indexes=[],
                  lid=local_intrinsic_dimension(x[:100_000], queries[:200]))
    for name, (factory, train_size, param) in index_types(n, args.dim).items():
        if name not in args.types:
            continue
        start_cpu = time.process_time()
        faiss.omp_set_num_threads(args.build_threads)
        index = new_index(args.dim, factory, args.ef_construction)
        train_s = 0.0
        if not index.is_trained:       # build_index's steps, timed apart
            rows = np.random.default_rng(args.seed).choice(n, min(train_size, n), replace=False)
            _, train_s = cpu_timed(index.train, x[np.sort(rows)])
        _, add_s = cpu_timed(index.add, x)
        faiss.omp_set_num_threads(1)
        entry = {"type": name, "factory": factory, "train_size": train_size, "train_cpu_s": train_s,
                 "add_cpu_s": add_s, "bytes_per_vector": faiss.serialize_index(index).size / n, "settings": []}
        values = [v for v in SWEEPS[param] if param != "nprobe" or v <= index_nlist(index)] if param else [None]
        for value in tqdm(values, desc=f"{n} {name}", leave=False):
            if param:
                set_param(index, param, value)
            found, qps = timed_search(index, queries)
            entry["settings"].append({"param": param, "value": value, "recall": overlap_recall(found, exact),
                                      "qps": qps, "default": param is None or DEFAULTS[param] == value})
        entry["total_cpu_s"] = time.process_time() - start_cpu
        result["indexes"].append(entry)
        del index
        save()
        tqdm.write(f"{n:,} {name}: train {train_s:.1f} + add {add_s:.1f} CPU s, "
                   f"{entry['bytes_per_vector']:.0f} bytes/vector")


def index_nlist(index):
    return faiss.extract_index_ivf(index).nlist


# ----------------------------------------------------------------------------------------------------------------
# U-FIRE-mini with a trained checkpoint

def task_recall(index, queries, ground_truth, exclude, n_gallery):
    """Recall@K (percent) by evaluate.recall_at_k's protocol with `index`'s ranking: a hit when a ground-truth image
    is among the first K results left after removing the query's own images."""
    from evaluate import _member
    depth = min(K + max(map(len, exclude)), n_gallery)
    _, ranked = index.search(queries, depth)
    is_gt, is_excluded = _member(ranked, ground_truth, n_gallery), _member(ranked, exclude, n_gallery)
    rank = np.cumsum(~is_excluded, axis=1) - 1
    return 100.0 * float(np.mean((is_gt & ~is_excluded & (rank < K)).any(axis=1)))


def measure_ufire(args):
    """Per test set of U-FIRE-mini: exact Recall@10 (evaluate.recall_at_k) and Recall@10 with each index type at
    the default settings, plus the fraction of the exact top 10 that each index finds."""
    import torch
    from encoding import encode_gallery, encode_sharded
    from evaluate import build_sets, load_encoder, recall_at_k, resolve_config
    cli = argparse.Namespace(ckpt=args.ufire, split=args.split, tasks=None, root=None, gallery_dir=None,
                             backbone=None, strict=False, no_exclude_own=False, baseline=None, untrained=False,
                             config=None)
    cfg, state, _ = resolve_config(cli)
    sets = build_sets(cli, cfg)
    encoder = load_encoder(cfg, state, "cpu", source=args.ufire)
    paths = list(dict.fromkeys(p for s in sets for p in s.gallery))
    row = {p: i for i, p in enumerate(paths)}
    batch = cfg.train.eval_batch_size
    with torch.no_grad():
        gallery_emb = encode_gallery(encoder, paths, batch, None, True).numpy()
        query_emb = encode_sharded(encoder.encode_queries, [q for s in sets for q in s.queries], batch, True,
                                   "queries").numpy()
    out, start = {}, 0
    for s in tqdm(sets, desc="U-FIRE-mini indexes"):
        queries = np.ascontiguousarray(query_emb[start:start + len(s.queries)])
        start += len(s.queries)
        gallery = np.ascontiguousarray(gallery_emb[[row[p] for p in s.gallery]])
        n, dim = gallery.shape
        exact = recall_at_k(queries, gallery, s.ground_truth, ks=(K,), exclude=s.exclude)[f"R@{K}"]
        _, exact_ids = build_index(gallery, "Flat").search(queries, min(K, n))
        entry = {"family": s.family, "queries": len(s.queries), "gallery": n, "exact": exact, "indexes": {}}
        for name, (factory, train_size, param) in index_types(n, dim).items():
            if name not in args.types:
                continue
            index = build_index(gallery, factory, train_size or n, args.seed)
            if param:
                set_param(index, param, DEFAULTS[param])
            recall = task_recall(index, queries, s.ground_truth, s.exclude, n)
            if name == "Flat":      # the protocol as reimplemented here, against evaluate.py's own
                assert abs(recall - exact) < 1e-9, (s.name, recall, exact)
            _, ids = index.search(queries, min(K, n))
            entry["indexes"][name] = {"factory": factory, "recall": recall, "overlap": overlap_recall(ids, exact_ids)}
        out[s.name] = entry
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tables

def catalogue_table(result):
    lines = [f"### {result['n']:,} vectors, dim {result['dim']}, {result['queries']:,} queries "
             f"(local intrinsic dimension {result['lid']:.1f})", "",
             "| index | factory | setting | Recall@10 vs exact | queries/s | train (CPU s) | add (CPU s) | "
             "bytes/vector |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for e in result["indexes"]:
        for i, s in enumerate(e["settings"]):
            setting = f"{s['param']}={s['value']}" if s["param"] else "exact"
            setting = f"**{setting}**" if s["default"] and s["param"] else setting
            build = (f"{e['train_cpu_s']:.1f} | {e['add_cpu_s']:.1f} | {e['bytes_per_vector']:.0f}" if i == 0
                     else " | | ")
            lines.append(f"| {e['type'] if i == 0 else ''} | {e['factory'] if i == 0 else ''} | {setting} | "
                         f"{100 * s['recall']:.1f} | {s['qps']:,.0f} | {build} |")
    return "\n".join(lines) + "\n"


def ufire_table(ufire, types):
    names = [t for t in types if any(t in e["indexes"] for e in ufire.values())]
    lines = ["| sets | exact | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for label, keep in (("18 sub-datasets", lambda e: e["family"] != "unseen"),
                        ("2 unseen tasks", lambda e: e["family"] == "unseen")):
        rows = [e for e in ufire.values() if keep(e)]
        if rows:
            means = [statistics.mean(e["indexes"][t]["recall"] for e in rows) for t in names]
            overlap = [statistics.mean(e["indexes"][t]["overlap"] for e in rows) for t in names]
            lines.append(f"| {label} (mean Recall@10 %; fraction of exact top 10 found) | "
                         f"{statistics.mean(e['exact'] for e in rows):.1f} | "
                         + " | ".join(f"{m:.1f} ({100 * o:.0f})" for m, o in zip(means, overlap)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="catalogue sizes")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--types", nargs="+", default=list(index_types(1, 256)), choices=list(index_types(1, 256)))
    parser.add_argument("--build-threads", type=int, default=1, help="faiss threads for training and adding only")
    parser.add_argument("--ef-construction", type=int, default=EF_CONSTRUCTION, help="HNSW build depth "
                        "(default: search.py's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ufire", metavar="CKPT", help="also U-FIRE-mini Recall@10 of this checkpoint")
    parser.add_argument("--split", choices=["val", "test"], default="test")
    parser.add_argument("--out", help="JSON (default: docs/ann_search.json; --quick: runs/ann_search_quick.json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10k vectors, 200 queries, no U-FIRE")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.ufire = [10_000], 200, None
    args.out = args.out or ("runs/ann_search_quick.json" if args.quick else "docs/ann_search.json")
    faiss.omp_set_num_threads(1)
    results = {"command": " ".join(sys.argv), "faiss": faiss.__version__, "search_threads": 1,
               "build_threads": args.build_threads, "ef_construction": args.ef_construction,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "load_average_start": os.getloadavg()[0], "defaults": DEFAULTS, "catalogue": {}, "ufire": None}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_text_atomic(args.out, json.dumps(results, indent=1) + "\n")

    if args.ufire:
        results["ufire"] = measure_ufire(args)
        save()
        print(f"### U-FIRE-mini {args.split}, {args.ufire}: defaults {DEFAULTS}\n")
        print(ufire_table(results["ufire"], args.types))
    for n in args.n:
        measure_catalogue(args, n, results["catalogue"].setdefault(str(n), {}), save)
        print(catalogue_table(results["catalogue"][str(n)]))
    results["load_average_end"] = os.getloadavg()[0]
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
