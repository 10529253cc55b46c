"""evaluate.py: Recall@K against hand-computed values, chance levels, one encoding per distinct image, the embedding
cache, two gloo processes == one, and the table."""
import hashlib
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from evaluate import chance_recall, evaluate_sets, format_table, main, recall_at_k, score
from prepare_data import EvalSet


def ranked_query(order, n_gallery):
    """A query whose inner products with a one-hot gallery rank the gallery exactly in `order`."""
    scores = np.zeros(n_gallery, dtype=np.float32)
    scores[order] = np.arange(n_gallery, 0, -1)
    return scores / np.linalg.norm(scores)


# ---------------------------------------------------------------------------------------------------------------
# Recall@K

def test_recall_hand_computed_small_gallery_and_multi_target():
    gallery = np.eye(6, dtype=np.float32)                       # gallery of 6 < 50: R@10 and R@50 see everything
    queries = np.stack([ranked_query([2, 0, 1, 3, 4, 5], 6),    # gt 0 at rank 1
                        ranked_query([0, 1, 2, 3, 4, 5], 6),    # gts {5, 3}: first at rank 3
                        ranked_query([4, 0, 1, 2, 3, 5], 6),    # gt 4 at rank 0
                        ranked_query([1, 2, 3, 4, 5, 0], 6)])   # gt 0 at rank 5
    gt = [[0], [5, 3], [4], [0]]
    assert recall_at_k(queries, gallery, gt) == pytest.approx({"R@1": 25.0, "R@5": 75.0, "R@10": 100.0,
                                                               "R@50": 100.0})
    assert recall_at_k(queries, gallery, gt, ks=(1, 2, 4, 6)) == pytest.approx(
        {"R@1": 25.0, "R@2": 50.0, "R@4": 75.0, "R@6": 100.0})
    # Torch input gives the same answer.
    assert recall_at_k(torch.from_numpy(queries), torch.from_numpy(gallery), gt) == recall_at_k(queries, gallery, gt)


def test_recall_exclusion_shifts_ranks_and_excluded_ground_truth_is_a_miss():
    gallery = np.eye(6, dtype=np.float32)
    queries = np.stack([ranked_query([2, 0, 1, 3, 4, 5], 6), ranked_query([1, 2, 3, 4, 5, 0], 6),
                        ranked_query([0, 1, 2, 3, 4, 5], 6)])
    gt = [[0], [0], [0]]
    exclude = [[2], [1, 2], [0]]     # q0: gt now first; q1: gt at rank 3; q2: its only gt is excluded -> never a hit
    assert recall_at_k(queries, gallery, gt, exclude=exclude) == pytest.approx(
        {"R@1": 100 / 3, "R@5": 200 / 3, "R@10": 200 / 3, "R@50": 200 / 3})


def test_recall_search_depth_covers_excluded_results():
    n = 60
    gallery = np.eye(n, dtype=np.float32)
    query = ranked_query(list(range(n)), n)[None]
    # gt at raw rank 52; with 5 better-ranked images excluded it is at rank 47, inside the top 50.
    assert recall_at_k(query, gallery, [[52]])["R@50"] == 0.0
    assert recall_at_k(query, gallery, [[52]], exclude=[[0, 1, 2, 3, 4]]) == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0,
                                                                            "R@50": 100.0}


def reference_recall(queries, gallery, gt, ks, exclude):
    """Straightforward per-query reference: full argsort, drop excluded, look for the first ground-truth image."""
    out = {k: 0 for k in ks}
    for q, targets, ex in zip(queries, gt, exclude):
        ranking = [int(i) for i in np.argsort(-(gallery @ q)) if int(i) not in ex]
        first = min(ranking.index(t) for t in targets if t in ranking) if set(targets) - set(ex) else len(gallery)
        for k in ks:
            out[k] += first < k
    return {f"R@{k}": 100.0 * out[k] / len(queries) for k in ks}


def test_recall_asfr_label_ground_truth_matches_reference():
    rng = np.random.default_rng(0)
    gallery = F.normalize(torch.from_numpy(rng.standard_normal((300, 8)).astype(np.float32)), dim=1).numpy()
    labels = rng.integers(0, 12, size=300)                     # asfr: every image with the query's label is a hit
    queries = F.normalize(torch.from_numpy(rng.standard_normal((40, 8)).astype(np.float32)), dim=1).numpy()
    query_labels = rng.integers(0, 12, size=40)
    gt = [list(np.flatnonzero(labels == label)) for label in query_labels]
    exclude = [list(rng.choice(300, size=rng.integers(0, 8), replace=False)) for _ in range(40)]
    ks = (1, 2, 5, 10, 50)
    got = recall_at_k(queries, gallery, gt, ks=ks, exclude=exclude)
    assert got == pytest.approx(reference_recall(queries, gallery, gt, ks, exclude))
    assert got["R@1"] < got["R@5"] < got["R@50"]               # a case where the ranks actually matter


def test_chance_recall_hand_computed():
    # Single target: K / G.
    assert chance_recall(200, [[3]] * 5) == pytest.approx({"R@1": 0.5, "R@5": 2.5, "R@10": 5.0, "R@50": 25.0})
    # Two of four are hits: P(miss in top 2) = C(2,2)/C(4,2) = 1/6; gallery < K counts everything.
    assert chance_recall(4, [[0, 1]], ks=(1, 2, 10)) == pytest.approx({"R@1": 50.0, "R@2": 500 / 6, "R@10": 100.0})
    # Exclusion shrinks the gallery (and removes excluded ground truth): G = 3, one hit left.
    assert chance_recall(4, [[0, 1]], ks=(1,), exclude=[[1]]) == pytest.approx({"R@1": 100 / 3})


# ---------------------------------------------------------------------------------------------------------------
# evaluate_sets with a fake encoder

def unit_vector(text, dim=16):
    seed = int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)
    return F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)


class FakeEncoder:
    """Deterministic embeddings from the path / query strings (a query lands near its own images); records every
    path and query id it encodes."""

    def __init__(self):
        self.targets, self.queries = [], []

    def encode_targets(self, paths, batch_size=32, progress=False):
        self.targets += paths
        return torch.stack([unit_vector(p) for p in paths])

    def encode_queries(self, queries, batch_size=32, progress=False):
        self.queries += [q["id"] for q in queries]
        return torch.stack([F.normalize(sum((unit_vector(p) for p in q["query_image"]), torch.zeros(16))
                                        + unit_vector(q["instruction_text"]), dim=0) for q in queries])


def make_sets():
    """Three sets sharing gallery images (25 distinct of 39 entries), one of them unseen with own-image exclusion."""
    def query(set_name, i, images, text="find it"):
        return {"id": f"{set_name}-{i}", "instruction_text": f"{text} {i}", "query_image": images, "query_video": []}

    shared = [f"/img/shared{i}.jpg" for i in range(8)]
    a_gallery = shared + [f"/img/a{i}.jpg" for i in range(7)]
    b_gallery = [f"/img/b{i}.jpg" for i in range(5)] + shared[::-1]
    c_gallery = shared[:3] + [f"/img/b{i}.jpg" for i in range(3)] + [f"/img/c{i}.jpg" for i in range(5)]
    a = EvalSet("7_cir_A", "cir", [query("a", i, [a_gallery[i]]) for i in range(9)], a_gallery,
                [[(i + 1) % len(a_gallery)] for i in range(9)], [[] for _ in range(9)])
    b = EvalSet("9_asfr_B", "asfr", [query("b", i, [], "text only") for i in range(5)], b_gallery,
                [[0, 2, 4], [1, 3], [5, 6, 7, 8], [9, 10, 11, 12], [0]], [[] for _ in range(5)])
    c = EvalSet("Unseen C", "unseen", [query("c", i, [c_gallery[i], c_gallery[i + 1]]) for i in range(7)], c_gallery,
                [[(i + 2) % len(c_gallery)] for i in range(7)], [[i, i + 1] for i in range(7)])
    return [a, b, c]


def test_each_distinct_image_encoded_once_and_cache_reused(tmp_path):
    sets = make_sets()
    distinct = {p for s in sets for p in s.gallery}
    assert sum(len(s.gallery) for s in sets) > len(distinct)   # the sets do share images
    encoder = FakeEncoder()
    results = evaluate_sets(encoder, sets, batch_size=4, progress=False)
    assert Counter(encoder.targets) == Counter(distinct)       # every distinct path exactly once
    assert Counter(encoder.queries) == Counter(q["id"] for s in sets for q in s.queries)
    assert list(results["sets"]) == ["7_cir_A", "9_asfr_B", "Unseen C"]
    assert results["sets"]["9_asfr_B"]["gallery"] == 13 and results["sets"]["Unseen C"]["queries"] == 7

    cache = str(tmp_path / "cache")
    first = FakeEncoder()
    assert evaluate_sets(first, sets, batch_size=4, cache_dir=cache, progress=False) == results
    rerun = FakeEncoder()
    assert evaluate_sets(rerun, sets, batch_size=4, cache_dir=cache, progress=False) == results
    assert rerun.targets == []                                 # everything came from the cache
    more = sets + [EvalSet("1_t2i_D", "t2i", sets[0].queries[:2], ["/img/new.jpg", "/img/a0.jpg"], [[0], [1]],
                           [[], []])]
    extended = FakeEncoder()
    evaluate_sets(extended, more, batch_size=4, cache_dir=cache, progress=False)
    assert extended.targets == ["/img/new.jpg"]                # only the image the cache lacks


def test_set_without_queries_is_refused_before_encoding():
    sets = make_sets()
    sets[1].queries, sets[1].ground_truth, sets[1].exclude = [], [], []
    encoder = FakeEncoder()
    with pytest.raises(ValueError, match="9_asfr_B"):
        evaluate_sets(encoder, sets, batch_size=4, progress=False)
    assert encoder.targets == [] and encoder.queries == []


def recall_from_scratch(encoder, s):
    queries = encoder.encode_queries(s.queries)
    gallery = encoder.encode_targets(s.gallery)
    return recall_at_k(queries, gallery, s.ground_truth, exclude=s.exclude)


def test_results_match_per_set_computation_and_exclusion_matters():
    sets = make_sets()
    results = evaluate_sets(FakeEncoder(), sets, batch_size=3, progress=False)
    for s in sets:
        assert results["sets"][s.name]["recall"] == recall_from_scratch(FakeEncoder(), s)
    # The unseen queries sit on their own images: without exclusion these would outrank the ground truth.
    unseen = sets[2]
    kept = EvalSet(unseen.name, unseen.family, unseen.queries, unseen.gallery, unseen.ground_truth,
                   [[] for _ in unseen.queries])
    assert recall_from_scratch(FakeEncoder(), kept)["R@1"] < results["sets"]["Unseen C"]["recall"]["R@1"]


def distributed_worker(rank, world, init_file, out_dir, cache_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    encoder = FakeEncoder()
    results = evaluate_sets(encoder, make_sets(), batch_size=2, cache_dir=cache_dir, progress=False)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"results": results, "targets": encoder.targets, "queries": encoder.queries}, f)
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    single = json.loads(json.dumps(evaluate_sets(FakeEncoder(), make_sets(), batch_size=2, progress=False)))
    cache = str(tmp_path / "cache")
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path), cache), nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["results"] == single and ranks[1]["results"] == single
    # 25 distinct images and 21 queries: odd, so one rank encodes one padding item and both ranks encode as many.
    for kind, expected, per_rank in (("targets", {p for s in make_sets() for p in s.gallery}, 13),
                                     ("queries", {q["id"] for s in make_sets() for q in s.queries}, 11)):
        assert len(expected) == 2 * per_rank - 1
        assert len(ranks[0][kind]) == len(ranks[1][kind]) == per_rank
        assert set(ranks[0][kind]) | set(ranks[1][kind]) == expected
    # The cache written by both ranks serves a single-process rerun completely.
    rerun = FakeEncoder()
    assert json.loads(json.dumps(evaluate_sets(rerun, make_sets(), batch_size=2, cache_dir=cache,
                                               progress=False))) == single
    assert rerun.targets == []


# ---------------------------------------------------------------------------------------------------------------
# score and table

def fake_results():
    def entry(family, r1, chance1, near=False):
        recall = {"R@1": r1, "R@5": r1 + 10, "R@10": r1 + 20, "R@50": r1 + 30}
        chance = {"R@1": chance1, "R@5": 5 * chance1, "R@10": 10 * chance1, "R@50": 50 * chance1}
        return {"family": family, "queries": 10, "gallery": 100, "recall": recall, "chance": chance,
                "near_chance": near}
    return {"ks": [1, 5, 10, 50], "sets": {
        "7_cir_Shoes": entry("cir", 20.0, 0.1), "7_cir_Fashion200K": entry("cir", 40.0, 0.1),
        "1_t2i_Shoes": entry("t2i", 1.0, 1.0, near=True),
        "Street+Modification Text 2 Shop": entry("unseen", 50.0, 0.1)}}


def test_score_sums_trained_r1_only():
    assert score(fake_results()) == pytest.approx(61.0)


def test_format_table_means_unseen_section_and_chance_marker():
    table = format_table(fake_results())
    lines = table.splitlines()
    assert "| cir | 2 | 30.0 | 40.0 | 50.0 | 60.0 |" in lines                 # family mean
    assert "| **overall mean** | 3 | 20.3 | 30.3 | 40.3 | 50.3 |" in lines    # over trained sub-datasets only
    assert any(line.startswith("| t2i | 1_t2i_Shoes ⚠ |") for line in lines)
    assert not any("7_cir_Shoes ⚠" in line for line in lines)
    unseen_at = lines.index("### Evaluation-only (unseen) tasks")
    assert any("Street+Modification Text 2 Shop" in line for line in lines[unseen_at:])
    assert not any("Street+Modification" in line for line in lines[:unseen_at])
    assert "| cir | 7_cir_Shoes | 10 | 100 | 20.0 (0.1) | 30.0 (0.5) | 40.0 (1.0) | 50.0 (5.0) |" in lines


# ---------------------------------------------------------------------------------------------------------------
# End to end: U-FIRE-mini, tiny Qwen3-VL, the command line

def test_cli_end_to_end_on_ufire_mini(tmp_path, tiny_backbone):
    from config import Config
    from model import build_encoder
    from prepare_data import SUB_DATASETS, UNSEEN_TASKS, generate

    root = generate(str(tmp_path / "mini"), scale=0.05, image_size=32, progress=False)
    cfg = Config()
    cfg.data.root, cfg.model.backbone, cfg.model.image_pixels = root, tiny_backbone, 64 * 64
    torch.manual_seed(1)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    with torch.no_grad():                     # a trained-looking state, unlike a fresh one, so loading it matters
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    torch.save({"config": cfg.to_dict(), "model": encoder.trainable_state_dict(), "step": 3}, ckpt)

    main([str(ckpt), "--split", "test", "--batch-size", "8", "--cache", str(tmp_path / "cache")])
    out = tmp_path / "run" / "eval_test"
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert list(results["sets"]) == list(SUB_DATASETS) + UNSEEN_TASKS
    for name in list(SUB_DATASETS) + UNSEEN_TASKS:
        assert f"| {name}" in table
    assert results["score"] == pytest.approx(score(results))
    # The command line loaded the checkpoint's weights: its cached gallery embeddings are the saved encoder's, and
    # differ from those of a freshly built encoder.
    chunk = torch.load(next((tmp_path / "cache").glob("*/targets-*.pt")), weights_only=True)
    probe = chunk["paths"][:8]
    assert torch.allclose(chunk["emb"][:8], encoder.encode_targets(probe, batch_size=8), atol=1e-5)
    torch.manual_seed(1)
    fresh = build_encoder(cfg.model, cfg.calibrator, "cpu")
    assert not torch.allclose(chunk["emb"][:8], fresh.encode_targets(probe, batch_size=8), atol=1e-3)

