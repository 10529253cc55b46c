"""U-FIRE evaluation: Recall@{1,5,10,50} per sub-dataset for a FashionLens checkpoint or a baseline.

    python evaluate.py runs/tiny/best.pt                        # val split; everything else from the checkpoint
    python evaluate.py runs/tiny/best.pt --split test --cache runs/emb-cache
    python evaluate.py --baseline openclip:ViT-B-32:weights.bin --root DIR --split test   # zero-shot baseline
    python evaluate.py --untrained --config configs/full.yaml   # floor: the backbone with fresh trainable parts
    torchrun --nproc_per_node=8 evaluate.py runs/full/best.pt    # encoding sharded over ranks, rank 0 searches
    python evaluate.py runs/tiny/best.pt --show 5               # also <out>/show/index.html: what the model retrieves

Protocol (paper section III; docs/method.md#evaluation): every sub-dataset is ranked against its own gallery; a
query is a hit at K when any of its ground-truth images is among its top K (its top min(K, gallery size) when the
gallery is smaller than K); Recall@K is divided by all queries. Search is faiss exact inner product in fp32 over
L2-normalised embeddings, i.e. cosine (the release ranks in bf16, where ties make Recall@1 unstable).

Own-image exclusion: in the two evaluation-only tasks the query's own images sit in the gallery (the outfit
items of a compatibility query, the street photo of a street-to-shop query) and would trivially rank first.
EvalSet.exclude lists them per query and they are dropped from that query's ranking before ranks are counted.
On by default; --no-exclude-own keeps them in the ranking.

Gallery-embedding cache (--cache DIR): see encoding.py; an image regenerated at the same path is encoded again.

Refused with a one-line error naming the file or the record (exit status 1), never a number in the table: a missing,
truncated or foreign checkpoint; trainable tensors that do not fit the backbone (the tensor is named); a backbone
directory that is not there (a relative path is looked for in the working directory, then the checkpoint's
directory; nothing is downloaded); a non-finite or all-zero query or gallery embedding (faiss ranks a NaN query
nowhere, a zero one scores like chance; the encoders' outputs are unit vectors unless the model is broken); a
--cache chunk file that does not hold one float32 row of the model's width per image (encoding.load_cache).

--show N: per sub-dataset, N queries (a seeded sample) each followed by its top 10, ground-truth images marked
"hit" in green (after own-image exclusion, as counted), one PNG page per query (plot.contact_sheet) and one
index.html showing and linking them all, under <out>/show/.

The library functions (evaluate_sets, score, format_table) also serve train.py's periodic validation.
"""
import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import sys
from collections import Counter

import faiss
import numpy as np
import torch
import torch.distributed as dist

from config import Config, load_config
from model import build_encoder, tensors_identity
from encoding import cache_key, encode_gallery, encode_sharded
from plumbing import (DataError, SettingError, load_checkpoint, one_line, output_folder, setup_distributed, world,
                      write_text_atomic)
from prepare_data import SUB_DATASETS, UNSEEN_TASKS, build_eval_sets, build_unseen_eval_set

KS = (1, 5, 10, 50)
SHOW_K = 10                 # results per query on the --show pages


class EvaluationError(Exception):
    """What the command line reports in one line instead of a traceback: an unreadable or mismatched checkpoint, a
    missing backbone, a model that gives a non-finite embedding. The message names the file or the record."""


# ----------------------------------------------------------------------------------------------------------------
# Recall@K

def recall_at_k(query_emb, gallery_emb, ground_truth, ks=KS, exclude=None):
    """Recall@K in percent, {"R@1": ..., ...}, of L2-normalised query [Q, D] vs gallery [G, D] embeddings.

    ground_truth[q]: gallery indices that count as a hit for query q (several for multi-target and asfr queries).
    exclude[q]: gallery indices removed from q's ranking before ranks are counted (its own images).
    """
    queries, gallery = _as_f32(query_emb), _as_f32(gallery_emb)
    if len(queries) == 0:
        raise ValueError("recall_at_k: no queries")
    for what, emb in (("query", queries), ("gallery", gallery)):
        for kind, (rows_of, _) in UNUSABLE.items():
            bad = rows_of(emb)
            if len(bad):    # evaluate_sets names the record first
                raise ValueError(f"recall_at_k: {len(bad)} {kind} {what} embedding(s), rows {bad[:5].tolist()}")
    exclude = exclude or [[]] * len(queries)
    _, ranked = exact_search(queries, gallery, max(ks), exclude)     # [Q, depth] gallery ids, best first
    is_gt = _member(ranked, ground_truth, len(gallery))
    is_excluded = _member(ranked, exclude, len(gallery))
    rank = np.cumsum(~is_excluded, axis=1) - 1                # rank among the results that are kept
    first_hit = np.where(is_gt & ~is_excluded, rank, np.inf).min(axis=1)     # inf: no hit in the whole depth
    return {f"R@{k}": 100.0 * float(np.mean(first_hit < k)) for k in ks}


def exact_search(queries, gallery, k, exclude):
    """faiss exact inner-product search of float32 [Q, D] queries in a [G, D] gallery, deep enough that k results
    survive the largest exclusion, never deeper than the gallery: (scores, gallery ids), each [Q, depth].

    Equal scores are ranked in a fixed random order of the gallery, not in its file order: faiss breaks ties by
    position, and a gallery's order follows its queries' (a validation gallery is their targets in record order),
    so a collapsed model, whose scores all tie, would otherwise score far from chance in either direction."""
    depth = min(k + max(map(len, exclude), default=0), len(gallery))
    order = np.random.default_rng(0).permutation(len(gallery))
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery[order]))
    scores, ids = index.search(queries, depth)
    return scores, np.where(ids >= 0, order[ids], -1)


def _as_f32(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _non_finite_rows(emb):
    """Indices of the rows of [N, D] that hold a NaN or an infinity."""
    return np.flatnonzero(~np.isfinite(_as_f32(emb)).all(axis=1))


def _zero_rows(emb):
    """Indices of the rows of [N, D] that are all zeros."""
    return np.flatnonzero(~_as_f32(emb).any(axis=1))


# Embeddings no working model gives, refused rather than scored: faiss ranks a NaN query nowhere (id -1), and an
# all-zero row scores 0 against everything, i.e. chance. Every embedding the encoders return is F.normalize'd
# (model.py, baseline.py; the calibrator's outputs too), which is a unit vector unless the readout itself is zero.
# Each kind: (its rows in [N, D], what the model does to give one).
UNUSABLE = {"non-finite": (_non_finite_rows, "NaN or infinite outputs"), "all-zero": (_zero_rows, "all-zero outputs")}


def _member(ranked, id_lists, n_gallery):
    """Boolean [Q, depth]: ranked[q, j] is in id_lists[q]. One vectorised lookup of (query, id) pair codes, as an
    asfr query has thousands of ground-truth ids and a test set tens of thousands of queries. faiss's "no result"
    id -1 is never a member (its code q * G - 1 would be the previous query's last gallery image)."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    owners = np.repeat(np.arange(len(id_lists), dtype=np.int64), lengths)
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
    ranked_codes = np.arange(len(ranked), dtype=np.int64)[:, None] * n_gallery + ranked
    return np.isin(ranked_codes, owners * n_gallery + ids) & (ranked >= 0)


def chance_recall(n_gallery, ground_truth, ks=KS, exclude=None):
    """Expected Recall@K (percent) of a random ranking: per query 1 - C(G-n, K) / C(G, K), with n its ground-truth
    images and G the gallery less its excluded images. It is K/G for single-target queries and much higher for asfr,
    where a query's ground truth is every image of its label."""
    exclude = exclude or [[]] * len(ground_truth)
    # As sets: an own image named twice by a record (or by two names of one file) leaves the gallery once.
    cases = Counter((n_gallery - len(set(ex)), len(set(gt) - set(ex))) for gt, ex in zip(ground_truth, exclude))

    def hit_probability(size, n_gt, k):
        k = min(k, size)
        return 1.0 - math.comb(size - n_gt, k) / math.comb(size, k)     # exact integers; comb is 0 when k > n

    total = sum(cases.values())
    return {f"R@{k}": 100.0 * sum(c * hit_probability(g, n, k) for (g, n), c in cases.items()) / total for k in ks}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of a list of EvalSets

def evaluate_sets(encoder, eval_sets, batch_size, cache_dir=None, progress=True, show=0):
    """Encode and score prepare_data.EvalSets; returns the same results dict on every rank.

    Each distinct gallery image is encoded once across all sets (docs/method.md#data: 18 test galleries hold 145,592
    images counted per gallery, 144,762 distinct). Under torch.distributed, gallery and query encoding are sharded
    evenly over the ranks; rank 0 searches and broadcasts the results. cache_dir must be specific to the encoder's
    weights and arithmetic (the CLI uses <--cache>/<encoding.cache_key>). Results: {"ks": [...], "sets": {name:
    {"family", "queries", "gallery", "recall": {"R@1": %, ...}, "chance": {...}, "near_chance": bool}}}, sets in the
    given order.
    show > 0 adds "shown": {name: shown_rankings(...)} for show queries of each set (evaluate.py --show).
    """
    if not eval_sets or not all(s.queries for s in eval_sets):
        # Checked here, on every rank, rather than by rank 0 alone after encoding (the other ranks would hang).
        raise ValueError(f"evaluate_sets: need sets with queries, got {[(s.name, len(s.queries)) for s in eval_sets]}")
    rank, size = world()
    paths = list(dict.fromkeys(p for s in eval_sets for p in s.gallery))
    row = {p: i for i, p in enumerate(paths)}
    target_emb = encode_gallery(encoder, paths, batch_size, cache_dir, progress)
    query_emb = encode_sharded(encoder.encode_queries, [q for s in eval_sets for q in s.queries],
                                batch_size, progress, "queries")
    results = [None]
    error = _unusable_error(eval_sets, paths, target_emb, query_emb) if rank == 0 else None
    if error:
        results = [{"error": error}]
    elif rank == 0:
        sets, start = {}, 0
        for s in eval_sets:
            queries = query_emb[start:start + len(s.queries)]
            start += len(s.queries)
            gallery = target_emb[[row[p] for p in s.gallery]]
            recall = recall_at_k(queries, gallery, s.ground_truth, exclude=s.exclude)
            chance = chance_recall(len(s.gallery), s.ground_truth, exclude=s.exclude)
            sets[s.name] = {"family": s.family, "queries": len(s.queries), "gallery": len(s.gallery),
                            "recall": recall, "chance": chance,
                            # Not even twice a random ranking's recall at any K: the model has learnt nothing here.
                            "near_chance": all(recall[k] < 2 * chance[k] for k in recall)}
        results = [{"ks": list(KS), "sets": sets}]
        if show:
            start, shown = 0, {}
            for s in eval_sets:
                queries = query_emb[start:start + len(s.queries)]
                start += len(s.queries)
                shown[s.name] = shown_rankings(queries, target_emb[[row[p] for p in s.gallery]], s.exclude, show)
            results[0]["shown"] = shown
    if size > 1:
        dist.broadcast_object_list(results, src=0)
    if "error" in results[0]:                      # raised on every rank, so none waits for the others
        raise EvaluationError(results[0]["error"])
    return results[0]


def shown_rankings(query_emb, gallery_emb, exclude, n, k=SHOW_K, seed=0):
    """[{"query": index, "ranked": [gallery ids], "scores": [cosines]}] for a seeded sample of n queries (in query
    order): each one's top k after its own images are excluded, as recall_at_k ranks them."""
    picks = sorted(random.Random(seed).sample(range(len(query_emb)), min(n, len(query_emb))))
    scores, ranked = exact_search(_as_f32(query_emb)[picks], _as_f32(gallery_emb), k, [exclude[i] for i in picks])
    shown = []
    for i, row_scores, row_ids in zip(picks, scores, ranked):
        kept = [(int(j), float(score)) for j, score in zip(row_ids, row_scores) if j >= 0 and j not in exclude[i]][:k]
        shown.append({"query": i, "ranked": [j for j, _ in kept], "scores": [score for _, score in kept]})
    return shown


def _unusable_error(eval_sets, paths, target_emb, query_emb):
    """The message refusing non-finite or all-zero embeddings (UNUSABLE; naming the first gallery image or the
    first query of each set that has one), or None: neither must end as a number in the table."""
    for kind, (rows_of, cause) in UNUSABLE.items():
        bad = rows_of(target_emb)
        if len(bad):
            first = paths[bad[0]]
            owners = [s.name for s in eval_sets if first in s.gallery]
            return (f"{kind} gallery embedding of {first} (gallery of {', '.join(owners)}); {len(bad)} of "
                    f"{len(paths)} gallery images have one: the model gives {cause}")
        bad, start, named = set(rows_of(query_emb).tolist()), 0, []
        for s in eval_sets:
            rows = [i for i in range(len(s.queries)) if start + i in bad]
            start += len(s.queries)
            if rows:
                more = f" and {len(rows) - 1} more" if len(rows) > 1 else ""
                named.append(f"{s.name}: query {s.queries[rows[0]]['id']}{more}")
        if named:
            return f"{kind} query embedding ({'; '.join(named)}): the model gives {cause}"
    return None


def score(results):
    """Model selection (paper section III; docs/method.md#evaluation): the sum of Recall@1 over the trained
    sub-datasets (unseen tasks excluded)."""
    return sum(r["recall"]["R@1"] for r in results["sets"].values() if r["family"] != "unseen")


def format_table(results, title="U-FIRE"):
    """Markdown: per-sub-dataset rows with the chance level in brackets, per-family and overall means over the
    trained sub-datasets, then the unseen tasks on their own."""
    columns = [f"R@{k}" for k in results["ks"]]
    trained = {n: r for n, r in results["sets"].items() if r["family"] != "unseen"}
    unseen = {n: r for n, r in results["sets"].items() if r["family"] == "unseen"}

    def set_rows(rows, what):
        lines = [f"| family | {what} | queries | gallery | {' | '.join(columns)} |",
                 "|---|---|---:|---:|" + "---:|" * len(columns)]
        for name, r in rows.items():
            cells = [f"{r['recall'][c]:.1f} ({r['chance'][c]:.1f})" for c in columns]
            mark = " ⚠" if r["near_chance"] else ""
            lines.append(f"| {r['family']} | {name}{mark} | {r['queries']} | {r['gallery']} | {' | '.join(cells)} |")
        return lines

    def mean_row(label, rows):
        means = [sum(r["recall"][c] for r in rows) / len(rows) for c in columns]
        return f"| {label} | {len(rows)} | " + " | ".join(f"{m:.1f}" for m in means) + " |"

    lines = [f"## {title}: Recall@K (%), chance level of a random ranking in brackets", ""]
    if trained:
        lines += set_rows(trained, "sub-dataset")
        lines += ["", f"| family | sub-datasets | {' | '.join(columns)} |", "|---|---:|" + "---:|" * len(columns)]
        for family in dict.fromkeys(r["family"] for r in trained.values()):
            lines.append(mean_row(family, [r for r in trained.values() if r["family"] == family]))
        lines += [mean_row("**overall mean**", list(trained.values())), "",
                  f"Model-selection score (sum of R@1 over trained sub-datasets): {score(results):.2f}"]
    if unseen:
        lines += ["", "### Evaluation-only (unseen) tasks", ""] + set_rows(unseen, "task")
    if any(r["near_chance"] for r in results["sets"].values()):
        lines += ["", "⚠ near chance: recall below twice the random-ranking level at every K."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", nargs="?", help="checkpoint written by train.py")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--tasks", nargs="+", metavar="KEY",
                        help="sub-dataset keys and/or unseen task names (default: all 18, plus both unseen on test)")
    parser.add_argument("--out", help="output directory (default: <checkpoint dir>/eval_<split>; without a "
                                      "checkpoint runs/eval_untrained_<split> or runs/eval_baseline_<split>)")
    parser.add_argument("--root", help="U-FIRE root (default: the checkpoint's data.root)")
    parser.add_argument("--gallery-dir", help="test candidate files (default: <root>/0_test_candidates)")
    parser.add_argument("--backbone", help="backbone directory (default: the checkpoint's model.backbone)")
    parser.add_argument("--batch-size", type=int, help="encoding batch (default: train.eval_batch_size)")
    parser.add_argument("--cache", help="gallery embedding cache root; a folder per model fingerprint and device "
                                        "arithmetic")
    parser.add_argument("--strict", action="store_true",
                        help="a query with no target in its gallery is an error (default: a miss, as in the release)")
    parser.add_argument("--no-exclude-own", action="store_true",
                        help="keep an unseen-task query's own images in its ranking")
    parser.add_argument("--baseline", metavar="openclip:MODEL[:WEIGHTS]",
                        help="zero-shot open_clip baseline; MODEL is an open_clip name or a model-config JSON path, "
                             "WEIGHTS a local file (none: random weights)")
    parser.add_argument("--untrained", action="store_true", help="backbone with fresh trainable parts (a floor)")
    parser.add_argument("--config", help="YAML config for --untrained / --baseline without a checkpoint (default: "
                                         "config.py's defaults, not configs/tiny.yaml's)")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="write N queries per sub-dataset with their top 10, hits marked, to <out>/show/")
    args = parser.parse_args(argv)
    if args.baseline and (args.ckpt or args.untrained):
        parser.error("--baseline takes no checkpoint and no --untrained")
    if args.baseline and (not args.baseline.startswith("openclip:") or len(args.baseline) == len("openclip:")):
        parser.error(f"--baseline must look like openclip:MODEL[:WEIGHTS], got {args.baseline!r}")
    if not (args.ckpt or args.baseline or args.untrained):
        parser.error("give a checkpoint, --baseline or --untrained")
    if args.ckpt and args.config:
        parser.error("--config is only for runs without a checkpoint (the checkpoint holds its config)")
    if args.show < 0:
        parser.error(f"--show takes a number of queries per sub-dataset, got {args.show}")
    if args.batch_size is not None and args.batch_size < 1:     # 0 fell back to the default, < 0 failed in encoding
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def resolve_config(args):
    """(config with command-line overrides, trainable state to load or None, the identities of the backbone it was
    trained on, label) for the checkpoint, the baseline or the untrained floor. A bad checkpoint or a backbone that is
    not there is an EvaluationError."""
    state = trained_on = None
    if args.ckpt:
        cfg, ckpt_state, trained_on = read_checkpoint(args.ckpt)
        state, label = (None, f"untrained ({args.ckpt})") if args.untrained else (ckpt_state, args.ckpt)
    else:
        try:
            cfg = load_config(args.config)
        except (OSError, KeyError, TypeError, ValueError) as err:      # malformed YAML: a DataError, for main
            raise EvaluationError(f"{args.config}: cannot load the config: {one_line(err)}") from err
        label = args.baseline or f"untrained ({args.config or 'default config'})"
    if args.baseline:
        # Zero-shot dual encoder: open_clip's own weights (baseline.py's OpenClipEncoder counts them all as trainable),
        # no calibrator.
        cfg.model.kind, cfg.model.backbone = "openclip", args.baseline[len("openclip:"):]
        cfg.model.trainable, cfg.calibrator.mode = "full", "none"
    cfg.data.root = args.root or cfg.data.root
    cfg.data.gallery_dir = args.gallery_dir or cfg.data.gallery_dir
    cfg.model.backbone = resolve_backbone(cfg.model, args.backbone, args.ckpt)
    return cfg, state, trained_on, label


def read_checkpoint(path):
    """(Config, trainable state, identities of the backbone it was trained on: Encoder.identities()) of a checkpoint
    written by train.py; EvaluationError naming the file when it is missing, truncated, not a checkpoint, or holds a
    config this code does not know."""
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: checkpoint not found (train.py writes best.pt and last.pt into its "
                              f"train.out_dir: runs/tiny for configs/tiny.yaml)" if not os.path.exists(path) else
                              f"{path}: checkpoint is not a file")
    try:
        ckpt = load_checkpoint(path)
    except DataError as err:
        raise EvaluationError(str(err)) from err
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("model"), dict)):
        what = f"a dict with keys {sorted(map(str, ckpt))[:3]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise EvaluationError(f"{path}: not a FashionLens checkpoint (expected a dict with a 'config' dict and a "
                              f"'model' dict of tensors, found {what})")
    bad = [str(k) for k, v in ckpt["model"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise EvaluationError(f"{path}: not a FashionLens checkpoint ('model' holds non-tensor entries {bad[:5]})")
    try:
        cfg = Config.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise EvaluationError(f"{path}: the checkpoint's config is not valid here: {one_line(err)}") from err
    return cfg, ckpt["model"], {key: ckpt.get(key) for key in ("backbone_identity", "tokenizer_identity")}


def resolve_backbone(model_cfg, override=None, ckpt=None, how="model.backbone or --backbone at it"):
    """The backbone (model.backbone, or --backbone) with relative local paths resolved against the working
    directory, then the checkpoint's directory. A Qwen3-VL backbone must be a local directory (nothing is
    downloaded); one that is not there is an EvaluationError naming where it was looked for and how to set it (`how`:
    train.py has no --backbone). For open_clip ("NAME[:WEIGHTS]") the weights file, and NAME when it is a JSON
    config path, are resolved the same way."""
    backbone = override or model_cfg.backbone
    places = [os.getcwd()] + ([os.path.dirname(os.path.abspath(ckpt))] if ckpt else [])

    def find(path, kind, exists):
        candidates = list(dict.fromkeys(os.path.join(place, path) for place in places))
        found = next((c for c in candidates if exists(c)), None)
        if found is None:
            where = " or ".join(candidates) if not os.path.isabs(path) else path
            tiny = "; python fake_backbones.py make-tiny DIR builds the tiny one" if kind == "local directory" else ""
            raise EvaluationError(f"backbone: {kind} {path!r} not found (looked for {where}); the backbone must be "
                                  f"local: point {how}{tiny}")
        return os.path.abspath(found)

    if model_cfg.kind == "openclip":
        name, colon, weights = backbone.partition(":")
        if name.endswith(".json"):
            name = find(name, "open_clip model config", os.path.isfile)
        else:
            import open_clip  # here: it pulls in timm, which the Qwen3-VL path never needs
            if name not in open_clip.list_models():     # else open_clip's RuntimeError lists every model it knows
                raise EvaluationError(f"backbone: {name!r} is not an open_clip model name or a model-config .json "
                                      f"path (model.backbone, or evaluate.py --baseline openclip:MODEL[:WEIGHTS])")
        weights = find(weights, "open_clip weights file", os.path.isfile) if weights else ""
        return name + colon + weights
    if not backbone:
        raise EvaluationError(f"backbone: model.backbone is empty; the backbone is a local directory: point {how}")
    return find(backbone, "local directory", os.path.isdir)


def load_encoder(cfg, state, device, source=None, trained_on=None):
    """The encoder of cfg with `state` (trainable tensors) loaded. A backbone that cannot be loaded, a state that does
    not fit it (names, shapes), or a backbone whose weights or tokenizer are not those the state was trained on
    (`trained_on`: the checkpoint's identities) is an EvaluationError naming the backbone or `source` (the
    checkpoint)."""
    torch.manual_seed(cfg.train.seed)      # fresh trainable parts (untrained floor) must be identical on every rank
    try:
        encoder = build_encoder(cfg.model, cfg.calibrator, device)
    except SettingError as err:         # names its key: the backbone is not to blame
        raise EvaluationError(str(err)) from err
    except (OSError, ValueError) as err:   # transformers / open_clip: a directory that holds no (complete) model
        raise EvaluationError(f"backbone {cfg.model.backbone}: cannot load the model: {one_line(err)}") from err
    problem = encoder.other_backbone(trained_on or {}) if state is not None else None
    if problem:
        raise EvaluationError(f"{source or 'trainable state'}: {problem}; point --backbone or model.backbone at the "
                              f"one it was trained on")
    if state is not None:
        try:
            encoder.load_trainable_state_dict(state)
        except (KeyError, ValueError) as err:
            raise EvaluationError(f"{source or 'trainable state'}: {one_line(err)}") from err
    return encoder.eval()


def build_sets(args, cfg):
    gallery_dir = cfg.data.gallery_dir or None
    if args.tasks is None:
        sets = build_eval_sets(cfg.data.root, args.split, gallery_dir=gallery_dir, unseen=args.split == "test",
                               strict=args.strict, street2shop_images=cfg.data.street2shop_images)
    else:
        unknown = [t for t in args.tasks if t not in SUB_DATASETS and t not in UNSEEN_TASKS]
        if unknown:
            sys.exit(f"evaluate.py: unknown task(s) {unknown}; known: {list(SUB_DATASETS) + UNSEEN_TASKS}")
        keys = [t for t in args.tasks if t in SUB_DATASETS]
        unseen = [t for t in args.tasks if t in UNSEEN_TASKS]
        if unseen and args.split != "test":
            sys.exit(f"evaluate.py: the evaluation-only tasks {unseen} exist for --split test only")
        sets = build_eval_sets(cfg.data.root, args.split, keys=keys, gallery_dir=gallery_dir,
                               unseen=False, strict=args.strict) if keys else []
        sets += [build_unseen_eval_set(cfg.data.root, task, args.strict, cfg.data.street2shop_images)
                 for task in unseen]
    if args.no_exclude_own:
        sets = [dataclasses.replace(s, exclude=[[] for _ in s.queries]) for s in sets]
    for s in sets:   # counted as misses: recall divides by all queries (--strict refuses them)
        if s.missing:
            print(f"{s.name}: {s.missing} of {len(s.queries)} queries have no target in the gallery (misses)")
    return sets


def default_out_dir(args):
    if args.ckpt:
        return os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"eval_{args.split}")
    return os.path.join("runs", f"eval_{'baseline' if args.baseline else 'untrained'}_{args.split}")


def main(argv=None):
    args = parse_args(argv)
    try:
        out = output_folder(args.out or default_out_dir(args), "results are written into --out")
        output_folder(args.cache, "--cache keeps gallery embeddings in it")
    except DataError as error:
        sys.exit(f"evaluate.py: {error}")
    device = setup_distributed()
    rank, _ = world()

    try:
        cfg, state, trained_on, label = resolve_config(args)
        sets = build_sets(args, cfg)           # data errors surface before the slow model load
        encoder = load_encoder(cfg, state, device, source=args.ckpt, trained_on=trained_on)
        cache_dir = os.path.join(args.cache, cache_key(cfg, encoder)) if args.cache else None
        results = evaluate_sets(encoder, sets, args.batch_size or cfg.train.eval_batch_size, cache_dir,
                                show=args.show)
    except (DataError, EvaluationError) as error:
        sys.exit(f"evaluate.py: {error}")
    if rank == 0:
        shown = results.pop("shown", None)
        # model_identity: which trained weights these numbers are of (model.py export checks it for its card).
        results.update(model=label, model_identity=tensors_identity(state) if state is not None else None,
                       split=args.split, root=cfg.data.root, score=score(results))
        os.makedirs(out, exist_ok=True)
        table = format_table(results, title=f"U-FIRE {args.split}, {label}")
        print(table)
        write_text_atomic(os.path.join(out, "results.md"), table)
        write_text_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}/results.md and results.json")
        if shown:
            from plot import write_show_pages      # matplotlib only when pages are asked for
            page = write_show_pages(sets, shown, os.path.join(out, "show"), f"U-FIRE {args.split}, {label}", SHOW_K)
            print(f"wrote {page}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
