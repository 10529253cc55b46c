"""Does a checkpoint retrieve by attribute, or only by look? A probe of the two asfr sub-datasets (image + attribute
name -> every gallery image with the same value of that attribute, paper section III; docs/method.md#data).

    .venv/bin/python benchmarks/asfr_probe.py runs/tiny/best.pt [--root data/ufire-mini] [--split test]

For each asfr sub-dataset and each attribute name it prints Recall@10 three ways:
- query: the real query (photo + instruction naming the attribute), as evaluate.py ranks it;
- image only: the query photo embedded like a gallery image, so the attribute is ignored: pure look-alike search;
- chance: K / gallery size, per query (evaluate.chance_recall).
and two spreads: the mean cosine between different queries and between different gallery images. A query side
that is about as good as "image only" matches items, not attributes; queries whose mutual cosine is near 1 say
the same thing for every photo (U-FIRE-mini's DARN: docs/results.md).
"""
import argparse
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import Config  # noqa: E402
from evaluate import chance_recall, load_encoder, recall_at_k  # noqa: E402
from plumbing import load_checkpoint  # noqa: E402
from prepare_data import SUB_DATASETS, build_eval_set, load_records  # noqa: E402


def mean_offdiagonal_cosine(x):
    x = F.normalize(x, dim=-1)
    n = x.shape[0]
    return ((x @ x.T).sum() - n) / (n * (n - 1))


def probe(encoder, root, key, split, batch_size):
    eval_set = build_eval_set(root, key, split)
    attributes = [rec["attribute"] for rec in load_records(root, key, split)]   # same order as eval_set.queries
    queries = encoder.encode_queries(eval_set.queries, batch_size, progress=True)
    gallery = encoder.encode_targets(eval_set.gallery, batch_size, progress=True)
    photos = encoder.encode_targets([q["query_image"][0] for q in eval_set.queries], batch_size, progress=True)
    print(f"\n{key} ({split}): {len(queries)} queries, gallery {len(gallery)}; mean cosine query-query "
          f"{mean_offdiagonal_cosine(queries):.2f}, gallery-gallery {mean_offdiagonal_cosine(gallery):.2f}")
    print(f"  {'attribute':<18} {'queries':>7} {'R@10 query':>10} {'image only':>10} {'chance':>7}")
    groups = defaultdict(list)
    for i, attribute in enumerate(attributes):
        groups[attribute].append(i)
    for attribute, rows in [("all", list(range(len(attributes))))] + sorted(groups.items()):
        truth = [eval_set.ground_truth[i] for i in rows]
        recall = lambda emb: recall_at_k(emb[rows], gallery, truth)["R@10"]
        chance = chance_recall(len(gallery), truth)["R@10"]
        print(f"  {attribute:<18} {len(rows):>7} {recall(queries):>10.1f} {recall(photos):>10.1f} {chance:>7.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="checkpoint written by train.py")
    parser.add_argument("--root", help="U-FIRE root (default: the checkpoint's data.root)")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    state = load_checkpoint(args.ckpt)
    cfg = Config.from_dict(state["config"])
    encoder = load_encoder(cfg, state["model"], "cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        for key, (family, _) in SUB_DATASETS.items():
            if family == "asfr":
                probe(encoder, args.root or cfg.data.root, key, args.split, args.batch_size)


if __name__ == "__main__":
    main()
