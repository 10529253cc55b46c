"""Evaluation cost on the released U-FIRE test galleries, ours against a naive implementation in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_scaling.py [--annotations ../shared/ufire-annotations]

Part 1, per sub-dataset, on the 18 released test galleries (145,663 entries):
- construction of the gallery and ground truth. Ours: prepare_data.build_eval_set (dicts for every index).
  Naive: the gallery deduplicated by list membership, ground truth by list.index (asfr: once per label).
  Both read the same JSON files and produce the same gallery and ground truth (checked).
- search. Ours: evaluate.recall_at_k (faiss IndexFlatIP, exact fp32). Naive: bf16 torch matmul + topk, as the
  release ranks. Top-1 agreement of the naive ranking with the exact one is reported on the first 200 queries.
Part 2: search time as the gallery grows from 10k to 1M vectors.

The released galleries come without queries (the test triplet files are not public), so queries are synthesised:
one per 10 gallery images (at most --max-queries), each with one target drawn at random from the gallery (asfr: a
random label; its ground truth is every image of that label). Embeddings are random unit vectors, 2560-d fp32 like
Qwen3-VL-4B's hidden size in part 1; part 2 uses --scaling-dim (default 256) so a 1M gallery (1 GB) fits in memory
and the naive bf16 search finishes on a 2-core machine. Everything runs on --threads threads (default 1:
on a shared CPU two-thread timings show multi-second spikes).
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

import faiss
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import KS, recall_at_k  # noqa: E402
from prepare_data import SUB_DATASETS, build_eval_set, candidate_path, triplet_path  # noqa: E402

AGREEMENT_QUERIES = 200


def synthesise_queries(gallery_dir, key, root, max_queries, rng):
    """Write <root>/0_triplet_files/<key>_test_triplet_data.json with random queries over the released gallery."""
    family, dataset = SUB_DATASETS[key]
    with open(candidate_path(root, key, "test", gallery_dir)) as f:
        data = json.load(f)
    entries = data[f"{dataset}_asfr_test_candidate"] if family == "asfr" else data
    records = []
    for i in range(min(max_queries, max(1, len(entries) // 10))):
        record = {"id": f"{key}-{i}", "instruction_text": "benchmark query", "task": family, "dataset": dataset,
                  "split": "test"}
        # Every family but t2i queries with media: load_records refuses a record without. Never read here.
        media = {"t2i": None, "video2img": "query_video"}.get(family, "query_image")
        if media:
            record[media] = [f"benchmark/query{i}"]
        if family == "asfr":
            label = rng.choice(sorted(k for k in data if not k.endswith("_candidate")))
            record.update(attribute=label.split("+")[1], target_label=label, target_image=[rng.choice(data[label])])
        else:
            record["target_image"] = [rng.choice(entries)]
        records.append(record)
    path = triplet_path(root, key, "test")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f)
    return len(entries)


def naive_build(root, key, gallery_dir):
    """The straightforward construction: list membership to deduplicate, list.index to find ids."""
    family, dataset = SUB_DATASETS[key]
    with open(triplet_path(root, key, "test")) as f:
        records = json.load(f)
    with open(candidate_path(root, key, "test", gallery_dir)) as f:
        data = json.load(f)
    entries = data[f"{dataset}_asfr_test_candidate"] if family == "asfr" else data
    gallery = []
    for p in entries:
        p = os.path.join(root, p)
        if p not in gallery:
            gallery.append(p)
    if family == "asfr":
        label_ids = {label: sorted(gallery.index(os.path.join(root, p)) for p in paths)
                     for label, paths in data.items() if not label.endswith("_candidate")}
        return gallery, [label_ids[r["target_label"]] for r in records]
    ground_truth = []
    for r in records:
        targets = [os.path.join(root, p) for p in r["target_image"]]
        ground_truth.append([gallery.index(p) for p in targets if p in gallery])
    return gallery, ground_truth


def naive_recall(queries, gallery, ground_truth, ks=KS):
    """bf16 matmul + topk, then a hit test per query (embeddings already held in bf16, as the release holds them)."""
    top = (queries @ gallery.T).topk(min(max(ks), len(gallery)), dim=1).indices.tolist()
    return {f"R@{k}": 100.0 * sum(not set(row[:k]).isdisjoint(gt) for row, gt in zip(top, ground_truth))
            / len(ground_truth) for k in ks}, top


def unit_rows(rng, n, dim):
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def per_sub_dataset(args, rng, root):
    gallery_dir = os.path.join(args.annotations, "gallery")
    py_rng = random.Random(0)
    print(f"## Part 1: the 18 released test galleries, {args.dim}-d fp32, {args.threads} thread(s)\n")
    print("| sub-dataset | entries | gallery | queries | build ours (s) | build naive (s) | ratio | "
          "search ours (s) | search naive bf16 (s) | ratio | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = np.zeros(4)
    distinct, per_gallery = set(), 0
    for key in SUB_DATASETS:
        entries = synthesise_queries(gallery_dir, key, root, args.max_queries, py_rng)
        eval_set, build_ours = timed(build_eval_set, root, key, "test", gallery_dir)
        (gallery_naive, gt_naive), build_naive = timed(naive_build, root, key, gallery_dir)
        if gallery_naive != eval_set.gallery or gt_naive != eval_set.ground_truth:
            sys.exit(f"{key}: naive and prepare_data.build_eval_set disagree on the gallery or ground truth")
        distinct.update(eval_set.gallery)
        per_gallery += len(eval_set.gallery)
        gallery = unit_rows(rng, len(eval_set.gallery), args.dim)
        queries = unit_rows(rng, len(eval_set.queries), args.dim)
        _, search_ours = timed(recall_at_k, queries, gallery, eval_set.ground_truth)
        q16, g16 = torch.from_numpy(queries).bfloat16(), torch.from_numpy(gallery).bfloat16()
        (_, top), search_naive = timed(naive_recall, q16, g16, eval_set.ground_truth)
        index = faiss.IndexFlatIP(args.dim)
        index.add(gallery)
        exact_top1 = index.search(queries[:AGREEMENT_QUERIES], 1)[1][:, 0]
        agreement = np.mean([row[0] for row in top[:AGREEMENT_QUERIES]] == exact_top1)
        totals += (build_ours, build_naive, search_ours, search_naive)
        print(f"| {key} | {entries} | {len(eval_set.gallery)} | {len(eval_set.queries)} | {build_ours:.3f} | "
              f"{build_naive:.3f} | {build_naive / build_ours:.0f}× | {search_ours:.2f} | {search_naive:.2f} | "
              f"{search_naive / search_ours:.1f}× | {100 * agreement:.1f}% |")
    print(f"| **total** | | {per_gallery} ({len(distinct)} distinct) | | {totals[0]:.2f} | {totals[1]:.2f} | "
          f"{totals[1] / totals[0]:.0f}× | {totals[2]:.1f} | {totals[3]:.1f} | {totals[3] / totals[2]:.1f}× | |\n")


def scaling(args, rng):
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"## Part 2: search time vs gallery size, {args.scaling_dim}-d, {args.scaling_queries} queries, "
          f"top {max(KS)}, {args.threads} thread(s)\n")
    print("| gallery | ours faiss fp32 (s) | ms / query | naive bf16 matmul + topk (s) | ms / query | ratio | "
          "top-1 agreement |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    full = unit_rows(rng, max(sizes), args.scaling_dim)
    queries = unit_rows(rng, args.scaling_queries, args.scaling_dim)
    q16 = torch.from_numpy(queries).bfloat16()
    for n in sizes:
        gallery = full[:n]
        ground_truth = [[int(i)] for i in rng.integers(0, n, size=len(queries))]
        _, ours = timed(recall_at_k, queries, gallery, ground_truth)
        g16 = torch.from_numpy(gallery).bfloat16()
        (_, top), naive = timed(naive_recall, q16, g16, ground_truth)
        del g16
        index = faiss.IndexFlatIP(args.scaling_dim)
        index.add(gallery)
        exact_top1 = index.search(queries[:AGREEMENT_QUERIES], 1)[1][:, 0]
        del index
        agreement = np.mean([row[0] for row in top[:AGREEMENT_QUERIES]] == exact_top1)
        per_query = 1000 / len(queries)
        print(f"| {n:,} | {ours:.2f} | {ours * per_query:.2f} | {naive:.2f} | {naive * per_query:.2f} | "
              f"{naive / ours:.1f}× | {100 * agreement:.1f}% |")


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default_annotations = os.path.join(repo, "..", "shared", "ufire-annotations")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", default=os.environ.get("UFIRE_ANNOTATIONS", default_annotations),
                        help="released U-FIRE annotations holding gallery/ (default: $UFIRE_ANNOTATIONS or "
                             "../shared/ufire-annotations)")
    parser.add_argument("--dim", type=int, default=2560, help="embedding size in part 1 (Qwen3-VL-4B: 2560)")
    parser.add_argument("--max-queries", type=int, default=1000, help="synthetic queries per sub-dataset, at most")
    parser.add_argument("--sizes", default="10000,30000,100000,300000,1000000", help="part 2 gallery sizes")
    parser.add_argument("--scaling-dim", type=int, default=256)
    parser.add_argument("--scaling-queries", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-part1", action="store_true")
    parser.add_argument("--skip-part2", action="store_true")
    args = parser.parse_args()
    if not args.skip_part1 and not os.path.isdir(os.path.join(args.annotations, "gallery")):
        sys.exit(f"eval_scaling.py: no released test galleries at {os.path.abspath(args.annotations)}/gallery; "
                 f"pass --annotations DIR (or set UFIRE_ANNOTATIONS), or --skip-part1")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    if not args.skip_part1:
        with tempfile.TemporaryDirectory(prefix="ufire-bench-") as root:    # the synthetic triplet files
            per_sub_dataset(args, rng, root)
    if not args.skip_part2:
        scaling(args, rng)


if __name__ == "__main__":
    main()
