"""evaluate.py: Recall@K against hand-computed values, chance levels, one encoding per distinct image, the embedding
cache and its key, two gloo processes == one, the table, non-finite and all-zero embeddings refused, and the command
line's errors for bad checkpoints and backbones; benchmarks/eval_scaling.py and benchmarks/asfr_probe.py from given
timings and embeddings."""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter

import numpy as np
from PIL import Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import evaluate
from benchmarks import asfr_probe, eval_scaling
from encoding import arithmetic, cache_key, file_key, fingerprint
from evaluate import (EvaluationError, chance_recall, evaluate_sets, format_table, main, recall_at_k,
                      resolve_backbone, score)
from launch import join_gloo, launch_two_nodes
from plumbing import DataError
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
    # Torch input gives the same answer; so do bf16 tensors (an encoder's autocast output), as their fp32 values.
    # Catches: _as_f32 without `.float()` (numpy cannot take a bf16 tensor: a TypeError).
    assert recall_at_k(torch.from_numpy(queries), torch.from_numpy(gallery), gt) == recall_at_k(queries, gallery, gt)
    low_q, low_g = torch.from_numpy(queries).bfloat16(), torch.from_numpy(gallery).bfloat16()
    assert recall_at_k(low_q, low_g, gt) == recall_at_k(low_q.float().numpy(), low_g.float().numpy(), gt)


def test_recall_exclusion_shifts_ranks_and_excluded_ground_truth_is_a_miss():
    gallery = np.eye(6, dtype=np.float32)
    queries = np.stack([ranked_query([2, 0, 1, 3, 4, 5], 6), ranked_query([1, 2, 3, 4, 5, 0], 6),
                        ranked_query([0, 1, 2, 3, 4, 5], 6)])
    gt = [[0], [0], [0]]
    exclude = [[2], [1, 2], [0]]     # q0: gt now first; q1: gt at rank 3; q2: its only gt is excluded -> never a hit
    assert recall_at_k(queries, gallery, gt, exclude=exclude) == pytest.approx(
        {"R@1": 100 / 3, "R@5": 200 / 3, "R@10": 200 / 3, "R@50": 200 / 3})


def test_recall_refuses_non_finite_embeddings():
    gallery = np.eye(6, dtype=np.float32)
    queries = np.stack([ranked_query([0, 1, 2, 3, 4, 5], 6), ranked_query([1, 0, 2, 3, 4, 5], 6)])
    assert recall_at_k(queries, gallery, [[0], [1]])["R@1"] == 100.0
    for bad_row in (0, 1):
        broken = queries.copy()
        broken[bad_row, 2] = np.nan
        with pytest.raises(ValueError, match=rf"non-finite query embedding.*rows \[{bad_row}\]"):
            recall_at_k(broken, gallery, [[0], [1]])
    broken = gallery.copy()
    broken[4, 0] = np.inf
    with pytest.raises(ValueError, match=r"non-finite gallery embedding.*rows \[4\]"):
        recall_at_k(queries, broken, [[0], [1]])


def test_recall_refuses_an_empty_query_list():
    """Recall divides by the number of queries: none is refused, not a NaN table row.
    Catches: the `len(queries) == 0` check in recall_at_k removed (every R@K NaN, with a numpy warning)."""
    with pytest.raises(ValueError, match="recall_at_k: no queries"):
        recall_at_k(np.zeros((0, 6), dtype=np.float32), np.eye(6, dtype=np.float32), [])


def test_recall_refuses_all_zero_embeddings():
    """An all-zero query scores 0 against every gallery image and an all-zero gallery image 0 against every query:
    recall near chance, in the table as if measured. The encoders' outputs are unit vectors unless the readout is
    zero (F.normalize leaves 0 at 0), so such a row is a broken model, refused like a non-finite one.
    Catches: UNUSABLE without "all-zero" (the zero rows are scored)."""
    gallery = np.eye(6, dtype=np.float32)
    queries = np.stack([ranked_query([0, 1, 2, 3, 4, 5], 6), ranked_query([1, 0, 2, 3, 4, 5], 6)])
    broken = queries.copy()
    broken[1] = 0.0
    with pytest.raises(ValueError, match=r"1 all-zero query embedding\(s\), rows \[1\]"):
        recall_at_k(broken, gallery, [[0], [1]])
    broken = gallery.copy()
    broken[4] = 0.0
    with pytest.raises(ValueError, match=r"1 all-zero gallery embedding\(s\), rows \[4\]"):
        recall_at_k(queries, broken, [[0], [1]])
    tiny = gallery.copy()
    tiny[4] *= 1e-30                    # tiny but not zero: a direction, ranked as such
    assert recall_at_k(queries, tiny, [[0], [1]])["R@1"] == 100.0


def test_recall_never_counts_faiss_no_result_as_a_hit(monkeypatch):
    """faiss answers id -1 where it has no result (a NaN query). Query 1's -1 has the pair code 1 * 3 - 1 = 2, the
    code of query 0's ground truth 2: counted as a member, it was a hit at every K."""
    real_index = evaluate.faiss.IndexFlatIP

    class NoResultForQuery1:
        def __init__(self, dim):
            self.index = real_index(dim)

        def add(self, x):
            self.index.add(x)

        def search(self, x, k):
            scores, ids = self.index.search(x, k)
            ids[1] = -1
            return scores, ids

    gallery = np.eye(3, dtype=np.float32)
    queries = np.stack([ranked_query([2, 0, 1], 3), ranked_query([0, 1, 2], 3)])
    monkeypatch.setattr(evaluate.faiss, "IndexFlatIP", NoResultForQuery1)
    assert recall_at_k(queries, gallery, [[2], [0]]) == {"R@1": 50.0, "R@5": 50.0, "R@10": 50.0, "R@50": 50.0}
    # The -1 stays -1 through the tie-breaking reorder, and the --show pages list no result for query 1.
    # Catches: exact_search mapping every id through the order (`order[ids]`: -1 becomes the last shuffled image),
    # and shown_rankings keeping -1 ids (`if j >= 0` dropped).
    assert evaluate.exact_search(queries, gallery, 3, [[], []])[1][1].tolist() == [-1, -1, -1]
    shown = evaluate.shown_rankings(queries, gallery, [[], []], n=2)
    assert [s["ranked"] for s in shown] == [[2, 0, 1], []]


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


def test_tied_scores_are_not_broken_by_gallery_order():
    """A collapsed model gives every query the same score for every gallery image. faiss breaks such ties by position,
    and a gallery lists its targets in the order of its queries (a validation gallery is their targets in record
    order): 40 queries whose targets were the first 40 of 400 images all hit within the top 50 (Recall@50 100% where
    chance is 12.5%), and targets last in the gallery never hit. Ties are broken in a fixed random order instead, so
    such a model scores near chance wherever its targets lie.
    Fails when exact_search indexes the gallery in its file order (`order = np.arange(len(gallery))`)."""
    gallery = np.full((400, 8), 8 ** -0.5, dtype=np.float32)
    for ground_truth in ([[i] for i in range(40)], [[399 - i] for i in range(40)]):
        recall = recall_at_k(gallery[:40], gallery, ground_truth)
        chance = chance_recall(len(gallery), ground_truth)
        assert all(abs(recall[k] - chance[k]) <= 10 for k in recall), (recall, chance)


def test_tied_scores_are_ranked_the_same_way_on_every_run():
    """The order that breaks ties is fixed, so evaluating one collapsed checkpoint twice (or on two machines) gives
    the same rankings and the same Recall: two exact_search calls on 400 tied images return the same ids, a
    permutation of the gallery that is not its file order.
    Fails when the tie order is drawn afresh on each call (`np.random.default_rng()` unseeded)."""
    gallery = np.full((400, 8), 8 ** -0.5, dtype=np.float32)
    first = evaluate.exact_search(gallery[:3], gallery, 400, [])[1]
    again = evaluate.exact_search(gallery[:3], gallery, 400, [])[1]
    assert np.array_equal(first, again)
    assert sorted(first[0]) == list(range(400)) and not np.array_equal(first[0], np.arange(400))
    ground_truth = [[i] for i in range(40)]
    assert recall_at_k(gallery[:40], gallery, ground_truth) == recall_at_k(gallery[:40], gallery, ground_truth)


def test_chance_recall_hand_computed():
    # Single target: K / G.
    assert chance_recall(200, [[3]] * 5) == pytest.approx({"R@1": 0.5, "R@5": 2.5, "R@10": 5.0, "R@50": 25.0})
    # Two of four are hits: P(miss in top 2) = C(2,2)/C(4,2) = 1/6; gallery < K counts everything.
    assert chance_recall(4, [[0, 1]], ks=(1, 2, 10)) == pytest.approx({"R@1": 50.0, "R@2": 500 / 6, "R@10": 100.0})
    # Exclusion shrinks the gallery (and removes excluded ground truth): G = 3, one hit left.
    assert chance_recall(4, [[0, 1]], ks=(1,), exclude=[[1]]) == pytest.approx({"R@1": 100 / 3})


def test_chance_recall_counts_an_own_image_listed_twice_once():
    """An unseen-task record may name one of its own images twice (or by two names of one file): exclude then lists
    its gallery index twice, and recall_at_k drops that one image once. Chance must too: G = 4 - 1 = 3, so R@1 is
    1/3 and R@2 2/3 for a single target, as without the repeat.
    Catches: chance_recall shrinking the gallery by len(ex) (G = 2: R@1 50, R@2 100; the bug this test came with)."""
    assert chance_recall(4, [[0]], ks=(1, 2), exclude=[[1, 1]]) == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3})
    # The same query counted by recall_at_k: ground truth at rank 2 of the three kept images, whether or not the
    # own image is listed twice.
    query = ranked_query([1, 2, 3, 0], 4)[None]
    for exclude in ([[1]], [[1, 1]]):
        assert recall_at_k(query, np.eye(4, dtype=np.float32), [[0]], ks=(2, 3), exclude=exclude) == {
            "R@2": 0.0, "R@3": 100.0}


# ---------------------------------------------------------------------------------------------------------------
# evaluate_sets with a fake encoder

def unit_vector(text, dim=16):
    seed = int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)
    return F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)


class FakeEncoder:
    """Deterministic embeddings from the path / query strings (a query lands near its own images); records every
    path and query id it encodes."""
    embed_dim = 16

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


class ContentEncoder(FakeEncoder):
    """Embeddings from the files' bytes (and the path), like a real encoder: a rewritten image encodes differently."""

    def encode_targets(self, paths, batch_size=32, progress=False):
        self.targets += paths
        return torch.stack([unit_vector(p + hashlib.sha1(open(p, "rb").read()).hexdigest()) for p in paths])


def sets_on_disk(folder):
    """make_sets with every gallery image a small file under `folder`."""
    sets = make_sets()
    for s in sets:
        s.gallery = [str(folder / p.lstrip("/")) for p in s.gallery]
        for q in s.queries:
            q["query_image"] = [str(folder / p.lstrip("/")) for p in q["query_image"]]
    for p in {p for s in sets for p in s.gallery}:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(p.encode())
    return sets


def test_cache_reencodes_an_image_rewritten_at_the_same_path(tmp_path):
    sets, cache = sets_on_disk(tmp_path / "data"), str(tmp_path / "cache")
    evaluate_sets(ContentEncoder(), sets, batch_size=4, cache_dir=cache, progress=False)
    rerun = ContentEncoder()
    evaluate_sets(rerun, sets, batch_size=4, cache_dir=cache, progress=False)
    assert rerun.targets == []
    # Regenerated with other bytes (and so another size), as a tree rebuilt with another --image-size.
    changed = sets[0].gallery[3]
    with open(changed, "wb") as f:
        f.write(b"regenerated " * 7)
    after = ContentEncoder()
    cached = evaluate_sets(after, sets, batch_size=4, cache_dir=cache, progress=False)
    assert after.targets == [changed]                          # that image only, encoded afresh
    assert cached == evaluate_sets(ContentEncoder(), sets, batch_size=4, progress=False)    # = no cache at all
    # Same size, other bytes, another modification time: re-encoded too.
    size = os.path.getsize(changed)
    with open(changed, "wb") as f:
        f.write(b"x" * size)
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = ContentEncoder()
    cached = evaluate_sets(again, sets, batch_size=4, cache_dir=cache, progress=False)
    assert again.targets == [changed]
    assert cached == evaluate_sets(ContentEncoder(), sets, batch_size=4, progress=False)
    stat = os.stat(changed)
    assert file_key(changed) == (changed, size, stat.st_mtime_ns, stat.st_ctime_ns)
    # Same size, other bytes, the mtime set back (cp -p, rsync -a and tar do): re-encoded too, by its new ctime.
    # Catches: file_key without st_ctime_ns (the old embedding is served for the new image).
    time.sleep(0.05)                # the kernel's file timestamps tick in jiffies: let the ctime move on
    with open(changed, "wb") as f:
        f.write(b"y" * size)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    restored = ContentEncoder()
    cached = evaluate_sets(restored, sets, batch_size=4, cache_dir=cache, progress=False)
    assert restored.targets == [changed]
    assert cached == evaluate_sets(ContentEncoder(), sets, batch_size=4, progress=False)


class BrokenEncoder(FakeEncoder):
    """A broken model: `query_value` (NaN by default) in every entry of the listed query ids' embeddings,
    `gallery_value` (+inf) in the listed gallery paths'."""

    def __init__(self, queries=(), paths=(), query_value=float("nan"), gallery_value=float("inf")):
        super().__init__()
        self.bad_queries, self.bad_paths = set(queries), set(paths)
        self.query_value, self.gallery_value = query_value, gallery_value

    def encode_targets(self, paths, batch_size=32, progress=False):
        emb = super().encode_targets(paths, batch_size)
        emb[[i for i, p in enumerate(paths) if p in self.bad_paths]] = self.gallery_value
        return emb

    def encode_queries(self, queries, batch_size=32, progress=False):
        emb = super().encode_queries(queries, batch_size)
        emb[[i for i, q in enumerate(queries) if q["id"] in self.bad_queries]] = self.query_value
        return emb


def test_non_finite_embeddings_are_refused_naming_set_and_query_or_image():
    with pytest.raises(EvaluationError, match=r"non-finite query embedding \(9_asfr_B: query b-3\)"):
        evaluate_sets(BrokenEncoder(queries=["b-3"]), make_sets(), batch_size=4, progress=False)
    with pytest.raises(EvaluationError, match=r"7_cir_A: query a-0 and 1 more; Unseen C: query c-6\)"):
        evaluate_sets(BrokenEncoder(queries=["a-0", "a-5", "c-6"]), make_sets(), batch_size=4, progress=False)
    # A gallery image: its path and every set whose gallery holds it.
    with pytest.raises(EvaluationError, match=r"gallery embedding of /img/shared1.jpg \(gallery of 7_cir_A, "
                                              r"9_asfr_B, Unseen C\); 2 of 25"):
        evaluate_sets(BrokenEncoder(paths=["/img/shared1.jpg", "/img/c4.jpg"]), make_sets(), batch_size=4,
                      progress=False)


def test_all_zero_embeddings_are_refused_naming_set_and_query_or_image():
    """Catches: evaluate_sets checking non-finite rows only (UNUSABLE without "all-zero": a table comes out)."""
    with pytest.raises(EvaluationError, match=r"^all-zero query embedding \(9_asfr_B: query b-3\): the model gives "
                                              r"all-zero outputs$"):
        evaluate_sets(BrokenEncoder(queries=["b-3"], query_value=0.0), make_sets(), batch_size=4, progress=False)
    with pytest.raises(EvaluationError, match=r"^all-zero gallery embedding of /img/c4.jpg \(gallery of Unseen C\); "
                                              r"1 of 25 gallery images have one"):
        evaluate_sets(BrokenEncoder(paths=["/img/c4.jpg"], gallery_value=0.0), make_sets(), batch_size=4,
                      progress=False)


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
    join_gloo(rank, world, init_file)
    encoder = FakeEncoder()
    results = evaluate_sets(encoder, make_sets(), batch_size=2, cache_dir=cache_dir, progress=False)
    try:                      # a non-finite query seen by rank 0 alone must stop every rank, none left waiting
        evaluate_sets(BrokenEncoder(queries=["b-2"]), make_sets(), batch_size=2, progress=False)
        error = None
    except EvaluationError as err:
        error = str(err)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"results": results, "targets": encoder.targets, "queries": encoder.queries, "error": error}, f)
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    """Two gloo processes evaluate like one: the same results on both ranks, the distinct images and queries split
    between the ranks (each encoded once: rank 0 has one more), the cache both wrote serving a one-process rerun
    whole, and a non-finite query that rank 0 alone sees stopping both ranks with one error.
    Catches: rank 0's cache decision not broadcast (`dist.broadcast_object_list(decided, src=0)` dropped: rank 0
    waits in a collective rank 1 never joins; the process group's 60 s timeout fails the test instead of hanging);
    rank 1 encoding a copy of the last item to send as many rows as rank 0 (13 and 13)."""
    single = json.loads(json.dumps(evaluate_sets(FakeEncoder(), make_sets(), batch_size=2, progress=False)))
    cache = str(tmp_path / "cache")
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path), cache), nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["results"] == single and ranks[1]["results"] == single
    assert ranks[0]["error"] == ranks[1]["error"] and "9_asfr_B: query b-2" in ranks[0]["error"]
    # 25 distinct images and 21 queries: odd, so rank 0 encodes one item more than rank 1, and no item twice.
    for kind, expected, per_rank in (("targets", {p for s in make_sets() for p in s.gallery}, 13),
                                     ("queries", {q["id"] for s in make_sets() for q in s.queries}, 11)):
        assert len(expected) == 2 * per_rank - 1
        assert (len(ranks[0][kind]), len(ranks[1][kind])) == (per_rank, per_rank - 1)
        assert set(ranks[0][kind]) | set(ranks[1][kind]) == expected
    # The cache written by both ranks serves a single-process rerun completely.
    rerun = FakeEncoder()
    assert json.loads(json.dumps(evaluate_sets(rerun, make_sets(), batch_size=2, cache_dir=cache,
                                               progress=False))) == single
    assert rerun.targets == []


def test_two_nodes_evaluate_like_one_process_and_fill_one_cache(tiny_backbone, mini_root, tmp_path):
    """`evaluate.py` launched as two torchrun "nodes" (one process each, c10d on 127.0.0.1) with --cache: the
    ranks encode disjoint shards into the shared cache and the table equals one process's. Catches: shards chosen
    by the node-local rank (LOCAL_RANK is 0 on both nodes, so both encode shard 0 and half the gallery is never
    encoded)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--untrained", "--config", os.path.join(repo, "configs", "tiny.yaml"), "--root", mini_root,
            "--backbone", tiny_backbone, "--split", "test", "--tasks", "1_t2i_Shoes", "7_cir_Shoes"]
    launch_two_nodes(os.path.join(repo, "evaluate.py"), *args, "--cache", tmp_path / "cache",
                     "--out", tmp_path / "two")
    main(args + ["--out", str(tmp_path / "one")])
    two, one = (json.load(open(tmp_path / run / "results.json")) for run in ("two", "one"))
    assert two["sets"] == one["sets"]
    parsed = evaluate.parse_args(args)
    gallery = {p for s in evaluate.build_sets(parsed, evaluate.resolve_config(parsed)[0]) for p in s.gallery}
    cached = {key[0] for chunk in (tmp_path / "cache").glob("*/targets-*.pt")
              for key in torch.load(chunk, weights_only=True)["keys"]}
    assert cached == gallery


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
    # An unseen task near chance is marked and explained too, though no trained sub-dataset is.
    # Catches: the footnote decided over the trained sub-datasets only (`for r in trained.values()`).
    results = fake_results()
    results["sets"]["1_t2i_Shoes"]["near_chance"] = False
    results["sets"]["Street+Modification Text 2 Shop"]["near_chance"] = True
    lines = format_table(results).splitlines()
    assert any(line.startswith("| unseen | Street+Modification Text 2 Shop ⚠ |") for line in lines)
    assert lines[-1] == "⚠ near chance: recall below twice the random-ranking level at every K."


# ---------------------------------------------------------------------------------------------------------------
# End to end: U-FIRE-mini, tiny Qwen3-VL, the command line

def perturb(encoder, seed):
    """A trained-looking state, unlike a fresh one (whose LoRA is a no-op), so loading it matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return encoder


def cached_embeddings(cache_root, path):
    """{file key: [embeddings]} of every cache entry for `path`, over all fingerprint directories."""
    found = {}
    for chunk_file in cache_root.glob("*/targets-*.pt"):
        chunk = torch.load(chunk_file, weights_only=True)
        for key, emb in zip(chunk["keys"], chunk["emb"]):
            if key[0] == path:
                found.setdefault(tuple(key), []).append(emb)
    return found


def test_cli_end_to_end_on_ufire_mini(tmp_path, tiny_backbone, monkeypatch):
    from config import Config
    from model import build_encoder
    from prepare_data import SUB_DATASETS, UNSEEN_TASKS, build_eval_set
    from ufire_mini import generate

    root = generate(str(tmp_path / "mini"), scale=0.05, image_size=32, progress=False)
    cfg = Config()
    cfg.data.root, cfg.model.backbone, cfg.model.image_pixels = root, tiny_backbone, 64 * 64
    torch.manual_seed(1)
    encoder = perturb(build_encoder(cfg.model, cfg.calibrator, "cpu"), seed=1)
    run = tmp_path / "run"
    run.mkdir()
    # The backbone is saved relative to the checkpoint's directory and evaluation runs elsewhere: found there.
    os.symlink(tiny_backbone, run / "backbone")
    saved = cfg.to_dict()
    saved["model"]["backbone"] = "backbone"
    ckpt = run / "best.pt"
    torch.save({"config": saved, "model": encoder.trainable_state_dict(), "step": 3}, ckpt)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cache = tmp_path / "cache"

    main([str(ckpt), "--split", "test", "--batch-size", "8", "--cache", str(cache)])
    out = run / "eval_test"
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert list(results["sets"]) == list(SUB_DATASETS) + UNSEEN_TASKS
    for name in list(SUB_DATASETS) + UNSEEN_TASKS:
        assert f"| {name}" in table
    # The score written is the sum of Recall@1 over the 18 trained sub-datasets (not recomputed by score()).
    trained_r1 = sum(results["sets"][key]["recall"]["R@1"] for key in SUB_DATASETS)
    assert results["score"] == pytest.approx(trained_r1)
    assert f"Model-selection score (sum of R@1 over trained sub-datasets): {trained_r1:.2f}" in table
    # The cache folder names how this device computed the embeddings, beside the model (cache_key; fails when the
    # command line keys the folder by the fingerprint alone).
    assert [folder.name.split("-", 1)[1] for folder in cache.iterdir()] == [arithmetic(cfg, encoder)]
    # The command line loaded the checkpoint's weights: its cached gallery embeddings are the saved encoder's, and
    # differ from those of the encoder it builds when it loads no weights.
    chunk = torch.load(next(cache.glob("*/targets-*.pt")), weights_only=True)
    probe = [key[0] for key in chunk["keys"][:8]]
    assert [tuple(key) for key in chunk["keys"][:8]] == [file_key(p) for p in probe]
    assert torch.allclose(chunk["emb"][:8], encoder.encode_targets(probe, batch_size=8), atol=1e-5)
    unloaded = evaluate.load_encoder(cfg, None, "cpu")
    assert not torch.allclose(chunk["emb"][:8], unloaded.encode_targets(probe, batch_size=8), atol=1e-3)

    # Other weights, the same --cache: the gallery is encoded with them, not taken from the first model's entries.
    torch.manual_seed(1)
    other = perturb(build_encoder(cfg.model, cfg.calibrator, "cpu"), seed=2)
    other_ckpt = run / "other.pt"
    torch.save({"config": saved, "model": other.trainable_state_dict(), "step": 4}, other_ckpt)
    tasks = ["--tasks", "1_t2i_Shoes", "Street+Modification Text 2 Shop"]
    main([str(other_ckpt), "--split", "test", "--batch-size", "8", "--cache", str(cache), *tasks])
    image = build_eval_set(root, "1_t2i_Shoes", "test").gallery[0]
    entries = cached_embeddings(cache, image)[file_key(image)]
    assert len(entries) == 2
    assert any(torch.allclose(e, other.encode_targets([image])[0], atol=1e-5) for e in entries)

    # U-FIRE-mini regenerated at the same path with larger images: the cache re-encodes them and the table is
    # the one of a run without a cache.
    old_bytes = open(image, "rb").read()
    generate(root, scale=0.05, image_size=48, progress=False)
    assert open(image, "rb").read() != old_bytes
    main([str(other_ckpt), "--split", "test", "--batch-size", "8", "--cache", str(cache), *tasks,
          "--out", str(tmp_path / "cached")])
    main([str(other_ckpt), "--split", "test", "--batch-size", "8", *tasks, "--out", str(tmp_path / "uncached")])
    cached, uncached = (json.loads((tmp_path / name / "results.json").read_text())["sets"]
                        for name in ("cached", "uncached"))
    assert cached == uncached
    fresh = other.encode_targets([image])[0]
    assert torch.allclose(cached_embeddings(cache, image)[file_key(image)][0], fresh, atol=1e-5)
    assert not torch.allclose(entries[0], fresh, atol=1e-3) and not torch.allclose(entries[1], fresh, atol=1e-3)


class OwnImagesFirstEncoder(FakeEncoder):
    """Queries closest to their own images, then to their first ground-truth image. 2,048 dimensions: a query with
    k own images has cosine 1/sqrt(4k + 1) with its target (0.24 at k = 4) and about N(0, 1/2048) with any other
    image (std 0.022); at 256 dimensions (std 0.0625) a gallery of hundreds outranked the target in about 1 of
    70 sessions. Without exclusion every unseen query misses at Recall@1; with it, every one hits."""

    DIM = 2048

    def __init__(self, eval_sets):
        super().__init__()
        self.target = {self.key(q): s.gallery[gt[0]] for s in eval_sets for q, gt in zip(s.queries, s.ground_truth)}

    @staticmethod
    def key(query):                       # ids alone repeat across tasks
        return query["id"], tuple(query["query_image"])

    def encode_targets(self, paths, batch_size=32, progress=False):
        self.targets += paths
        return torch.stack([unit_vector(p, self.DIM) for p in paths])

    def encode_queries(self, queries, batch_size=32, progress=False):
        self.queries += [q["id"] for q in queries]
        return torch.stack([F.normalize(2 * sum(unit_vector(p, self.DIM) for p in q["query_image"])
                                        + unit_vector(self.target[self.key(q)], self.DIM), dim=0) for q in queries])


def test_cli_excludes_own_images_by_default(tmp_path, mini_root, monkeypatch):
    from prepare_data import UNSEEN_TASKS, build_unseen_eval_set

    unseen = [build_unseen_eval_set(mini_root, task) for task in UNSEEN_TASKS]
    assert all(all(s.exclude) for s in unseen)                 # every query's own images are in its gallery
    monkeypatch.setattr(evaluate, "load_encoder", lambda cfg, state, device, **_: OwnImagesFirstEncoder(unseen))

    def run(*extra):
        out = tmp_path / f"out{len(extra)}"
        main(["--untrained", "--root", mini_root, "--backbone", str(tmp_path), "--split", "test",
              "--tasks", *UNSEEN_TASKS, "--out", str(out), *extra])
        return json.loads((out / "results.json").read_text())["sets"]

    default, kept = run(), run("--no-exclude-own")
    for s in unseen:
        assert default[s.name]["recall"] == recall_from_scratch(OwnImagesFirstEncoder(unseen), s)
        assert default[s.name]["recall"]["R@1"] == 100.0
        assert kept[s.name]["recall"]["R@1"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The cache key; bad checkpoints and backbones

def test_fingerprint_follows_weights_and_backbone_files(tmp_path, tiny_backbone):
    """The fingerprint changes with a training step, a backbone file edited in place, a file added in a subdirectory
    and other weights; a hidden folder or file in the backbone directory (a download tool's .cache, a hub
    snapshot's .gitattributes) leaves it as it is.
    Catches: hidden files hashed (`if not n.startswith(".")` dropped from backbone_files)."""
    from config import Config
    from fake_backbones import make_tiny_backbone
    from model import build_encoder

    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone, backbone)
    cfg = Config()
    cfg.model.backbone, cfg.model.image_pixels = str(backbone), 64 * 64
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    before = fingerprint(cfg, encoder)
    torch.manual_seed(0)
    assert fingerprint(cfg, build_encoder(cfg.model, cfg.calibrator, "cpu")) == before     # same model, same key

    # One optimizer step.
    paths = []
    for colour in ("red", "blue"):
        paths.append(str(tmp_path / f"{colour}.png"))
        Image.new("RGB", (32, 32), colour).save(paths[-1])
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-4)
    emb = encoder(encoder.prepare_targets(paths, train=True), "target")["emb"]
    (emb[0] @ emb[1]).backward()
    optimizer.step()
    stepped = fingerprint(cfg, encoder)
    assert stepped != before

    # One backbone file changed in place (same path), then the whole backbone rebuilt with other weights.
    config_json = backbone / "config.json"
    config_json.write_text(config_json.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    edited = fingerprint(cfg, encoder)
    assert edited != stepped
    # A file in a subdirectory of the backbone (hidden ones aside) is part of the key too.
    (backbone / "extra").mkdir()
    (backbone / "extra" / "vocab.json").write_text("{}")
    nested = fingerprint(cfg, encoder)
    assert nested != edited
    (backbone / ".cache").mkdir()
    (backbone / ".cache" / "lock").write_text("")
    (backbone / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert fingerprint(cfg, encoder) == nested
    # Rewritten at another size with its mtime set back, as cp -p or rsync -a of another file may leave it: the size
    # tells it apart. Catches: the file's size left out of the fingerprint (its mtime alone kept).
    stat = config_json.stat()
    config_json.write_text(config_json.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-5'))
    os.utime(config_json, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert config_json.stat().st_size != stat.st_size
    resized = fingerprint(cfg, encoder)
    assert resized != nested
    make_tiny_backbone(str(backbone), seed=1)
    assert fingerprint(cfg, encoder) not in (before, stepped, edited, nested, resized)


def test_fingerprint_follows_backbone_weights_replaced_with_the_same_sizes_and_times(tmp_path, tiny_backbone):
    """Another fine-tune of the same architecture copied over the backbone with its times kept (cp -p, rsync -a, an
    archive stamped with one time): every file keeps its size and, here, its mtime, the token embedding (and so the
    readout vectors initialised from it) is unchanged, but a language layer's weights differ, and so would every
    embedding. The gallery cache's key must change.
    Catches: the fingerprint without the loaded weights' identity (`encoder.backbone_identity()` not hashed: the
    key stays, and the old backbone's embeddings are served from the cache)."""
    from safetensors.torch import load_file, save_file
    from config import Config
    from model import build_encoder

    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone, backbone)
    cfg = Config()
    cfg.model.backbone, cfg.model.image_pixels = str(backbone), 64 * 64
    torch.manual_seed(0)
    before = fingerprint(cfg, build_encoder(cfg.model, cfg.calibrator, "cpu"))
    weights = backbone / "model.safetensors"
    stat = weights.stat()
    tensors = load_file(weights)
    tensors["model.language_model.layers.0.mlp.down_proj.weight"][0, :8] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    torch.manual_seed(0)
    assert fingerprint(cfg, build_encoder(cfg.model, cfg.calibrator, "cpu")) != before


def test_fingerprint_follows_the_open_clip_model_config_file(tmp_path):
    """An open_clip baseline read from a model-config JSON: an edit of that file (same path) that leaves every
    tensor as it is, here quick_gelu (another activation, other embeddings), must change the key; the path alone
    is in model.backbone.
    Catches: backbone_files listing the weights file only for open_clip (the config JSON's identity not hashed)."""
    from config import Config
    from fake_backbones import make_tiny_openclip_config
    from model import build_encoder
    cfg = Config()
    cfg.model.kind, cfg.model.trainable = "openclip", "full"
    cfg.model.backbone = make_tiny_openclip_config(str(tmp_path))
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    before = fingerprint(cfg, encoder)
    spec = json.loads(open(cfg.model.backbone).read())
    with open(cfg.model.backbone, "w") as f:
        json.dump(dict(spec, quick_gelu=True), f)
    torch.manual_seed(0)
    gelu = build_encoder(cfg.model, cfg.calibrator, "cpu")
    same, other = encoder.trainable_state_dict(), gelu.trainable_state_dict()
    assert same.keys() == other.keys() and all(torch.equal(same[n], other[n]) for n in same)    # the same tensors
    assert fingerprint(cfg, gelu) != before


def test_a_release_checkpoint_has_one_fingerprint_on_a_gpu_and_on_a_cpu(tiny_backbone, monkeypatch):
    """With model.fp32_trainable=false (configs/release.yaml) the token vectors and the calibrator are bf16 on a GPU
    and fp32 on a CPU, holding the same checkpoint values: one model computed two ways, which `arithmetic` tells
    apart. search.Index refuses an index of another fingerprint as another checkpoint's and searches one of another
    arithmetic with a note, so the CPU's fingerprint of a checkpoint written on a GPU must be the GPU's (bf16 stood
    in for on the CPU by patching compute_dtype, as test_model does); it still follows the values.
    Catches: the trainable tensors hashed in their own dtype (`.float()` dropped in fingerprint: an index a GPU
    built with a release checkpoint was refused on a CPU as another checkpoint's)."""
    import model
    from config import Config
    cfg = Config()
    cfg.model.backbone, cfg.model.image_pixels, cfg.model.fp32_trainable = tiny_backbone, 64 * 64, False
    torch.manual_seed(0)
    cpu = model.build_encoder(cfg.model, cfg.calibrator, "cpu")
    monkeypatch.setattr(model, "compute_dtype", lambda model_cfg, device: torch.bfloat16)
    torch.manual_seed(0)
    gpu = model.build_encoder(cfg.model, cfg.calibrator, "cpu")
    assert (gpu.query_token.dtype, cpu.query_token.dtype) == (torch.bfloat16, torch.float32)
    cpu.load_trainable_state_dict(gpu.trainable_state_dict())      # the checkpoint the GPU wrote
    assert fingerprint(cfg, cpu) == fingerprint(cfg, gpu) and arithmetic(cfg, cpu) != arithmetic(cfg, gpu)
    with torch.no_grad():
        cpu.query_token[0] += 1
    assert fingerprint(cfg, cpu) != fingerprint(cfg, gpu)


def test_fingerprint_follows_the_libraries_that_embed(tiny_backbone, monkeypatch):
    """Cached gallery embeddings are reused only with the same torch, transformers, PIL (decoding, resizing) and
    open_clip (the baseline's preprocessing): a different version of any of them gives a new key.
    Catches: any one of the four versions left out of the key (open_clip's was, before the baseline's key)."""
    import importlib.metadata
    import PIL
    import transformers
    from config import Config
    from model import build_encoder

    cfg = Config()
    cfg.model.backbone, cfg.model.image_pixels = str(tiny_backbone), 64 * 64
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    keys = [fingerprint(cfg, encoder)]
    for module in (torch, transformers, PIL):
        monkeypatch.setattr(module, "__version__", module.__version__ + ".other")
        keys.append(fingerprint(cfg, encoder))
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: version(name) + (".other" if name == "open_clip_torch" else ""))
    keys.append(fingerprint(cfg, encoder))
    assert len(set(keys)) == len(keys), keys


def test_fingerprint_follows_the_source_of_the_modules_the_model_imports(tmp_path, tiny_backbone, monkeypatch):
    """Cached gallery embeddings are reused only while the code that computes them is unchanged: model.py and every
    repository module it imports at the top, directly or through another (the vision tower's packed attention in
    attention.py, the image resizing in media.py). Run on a copy of the repository's modules: a comment added to
    model.py, to attention.py, to media.py, or to a module media.py is made to import, gives a new key; one added
    to evaluate.py (imported only by a command inside model.py) does not. For the open_clip baseline, an edit of
    baseline.py (its class's module) or of model.py gives a new key.
    Catches: model.py's source alone hashed (the key before the attention and media code moved out of it);
    model.py's own source left out; imports followed one level only; imports inside functions followed too (every
    edit of evaluate.py would then throw the cache away); the encoder class's module left out."""
    import glob
    import baseline
    import model
    from config import Config
    from fake_backbones import make_tiny_openclip_config
    from model import build_encoder

    copy = tmp_path / "repo"
    copy.mkdir()
    for path in glob.glob(os.path.join(os.path.dirname(model.__file__), "*.py")):
        shutil.copy(path, copy)
    monkeypatch.setattr(model, "__file__", str(copy / "model.py"))
    cfg = Config()
    cfg.model.backbone, cfg.model.image_pixels = str(tiny_backbone), 64 * 64
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")

    def key_after_editing(name):
        with open(copy / name, "a") as f:
            f.write("\n# edited\n")
        return fingerprint(cfg, encoder)

    keys = [fingerprint(cfg, encoder)]
    assert key_after_editing("evaluate.py") == keys[-1]
    for name in ("model.py", "attention.py", "media.py"):
        keys.append(key_after_editing(name))
    (copy / "media_helper.py").write_text("SCALE = 1\n")
    (copy / "media.py").write_text("import media_helper  # noqa: F401\n" + (copy / "media.py").read_text())
    keys.append(fingerprint(cfg, encoder))
    keys.append(key_after_editing("media_helper.py"))
    assert len(set(keys)) == len(keys), keys

    # The open_clip baseline's class lives in baseline.py, which model.py imports only inside build_encoder.
    monkeypatch.setattr(baseline, "__file__", str(copy / "baseline.py"))
    cfg.model.kind, cfg.model.backbone = "openclip", make_tiny_openclip_config(str(tmp_path))
    cfg.model.trainable = "full"
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    clip_keys = [fingerprint(cfg, encoder), key_after_editing("baseline.py"), key_after_editing("model.py")]
    assert len(set(clip_keys)) == len(clip_keys), clip_keys
    assert key_after_editing("evaluate.py") == clip_keys[-1]


def test_relative_backbone_looked_for_in_working_dir_then_checkpoint_dir(tmp_path, monkeypatch):
    from config import ModelConfig

    work, run = tmp_path / "work", tmp_path / "run"
    (run / "bb").mkdir(parents=True)
    work.mkdir()
    monkeypatch.chdir(work)
    ckpt = str(run / "best.pt")
    real = os.path.realpath
    assert real(resolve_backbone(ModelConfig(backbone="bb"), ckpt=ckpt)) == real(run / "bb")
    (work / "bb").mkdir()
    assert real(resolve_backbone(ModelConfig(backbone="bb"), ckpt=ckpt)) == real(work / "bb")
    assert real(resolve_backbone(ModelConfig(), override="../run/bb", ckpt=ckpt)) == real(run / "bb")
    with pytest.raises(EvaluationError, match=r"local directory 'nope' not found \(looked for .*work/nope or "
                                              r".*run/nope\)"):
        resolve_backbone(ModelConfig(backbone="nope"), ckpt=ckpt)
    with pytest.raises(EvaluationError, match=r"local directory 'nope' not found \(looked for [^ ]*work/nope\)"):
        resolve_backbone(ModelConfig(backbone="nope"))
    # An empty model.backbone names itself, rather than resolving to the working directory (os.path.join(cwd, "")).
    # Catches: the `if not backbone` check removed (the working directory is returned as the backbone).
    with pytest.raises(EvaluationError, match="model.backbone is empty"):
        resolve_backbone(ModelConfig(backbone=""), ckpt=ckpt)
    gone = str(tmp_path / "gone")
    with pytest.raises(EvaluationError, match=rf"local directory '{gone}' not found \(looked for {gone}\)"):
        resolve_backbone(ModelConfig(backbone=gone), ckpt=ckpt)
    # open_clip: the weights file (and a JSON model config) the same way; a model name is left alone.
    (run / "w.bin").write_bytes(b"")
    got = resolve_backbone(ModelConfig(kind="openclip", backbone="ViT-B-32:w.bin"), ckpt=ckpt)
    assert got.split(":")[0] == "ViT-B-32" and real(got.split(":")[1]) == real(run / "w.bin")
    with pytest.raises(EvaluationError, match="open_clip weights file 'x.bin' not found"):
        resolve_backbone(ModelConfig(kind="openclip", backbone="ViT-B-32:x.bin"), ckpt=ckpt)


def test_an_unknown_open_clip_name_is_one_line_not_open_clips_list_of_models(tmp_path):
    """`evaluate.py --baseline openclip:ViT-B-33` (a typo), or `train.py configs/ablation_openclip.yaml` without its
    model.backbone (tiny.yaml's Qwen3-VL directory is inherited), ended in open_clip's RuntimeError traceback listing
    every model it knows. resolve_backbone now refuses a name open_clip does not know in one line; a known name
    passes unchanged.
    Catches: resolve_backbone without the name check (`if name not in open_clip.list_models()` -> `if False`: the
    baseline reaches open_clip, whose RuntimeError ends main in a traceback)."""
    from config import ModelConfig
    assert resolve_backbone(ModelConfig(kind="openclip", backbone="ViT-B-32")) == "ViT-B-32"
    with pytest.raises(SystemExit) as exit_info:
        main(["--baseline", "openclip:ViT-B-33", "--tasks", "7_cir_Shoes", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == (
        "evaluate.py: backbone: 'ViT-B-33' is not an open_clip model name or a model-config .json path "
        "(model.backbone, or evaluate.py --baseline openclip:MODEL[:WEIGHTS])")
    assert not (tmp_path / "out").exists()


def test_cli_bad_checkpoints_are_one_line_errors_naming_the_file(tmp_path, tiny_backbone, mini_root):
    """Each bad checkpoint (missing, truncated, not one, lacking tensors, a config key this code does not know,
    another backbone, a moved backbone, NaN weights) ends evaluate.py with one line naming the file and the fault;
    a missing one (evaluate before train) also says what writes it.
    Catches, among others: plumbing.one_line keeping a KeyError's quotes (`text = err`); read_checkpoint's
    missing-file message without its hint (`f"{path}: checkpoint not found"`)."""
    from config import Config
    from fake_backbones import make_tiny_backbone
    from model import build_encoder

    out = tmp_path / "out"
    args = ["--split", "test", "--tasks", "1_t2i_Shoes", "--out", str(out)]

    def fails(ckpt, *extra):
        with pytest.raises(SystemExit) as info:
            main([str(ckpt), *args, *extra])
        message = info.value.code
        assert isinstance(message, str) and message.startswith("evaluate.py: ") and "\n" not in message
        assert str(ckpt) in message
        return message

    cfg = Config()
    cfg.data.root, cfg.model.backbone, cfg.model.image_pixels = mini_root, tiny_backbone, 64 * 64
    torch.manual_seed(0)
    state = build_encoder(cfg.model, cfg.calibrator, "cpu").trainable_state_dict()
    good = tmp_path / "good.pt"
    torch.save({"config": cfg.to_dict(), "model": state, "step": 1}, good)

    missing = tmp_path / "missing.pt"
    assert fails(missing) == (f"evaluate.py: {missing}: checkpoint not found (train.py writes best.pt and last.pt "
                              f"into its train.out_dir: runs/tiny for configs/tiny.yaml)")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    assert "cannot read the checkpoint (truncated" in fails(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert "cannot read the checkpoint" in fails(text)
    bare = tmp_path / "bare.pt"                       # a bare state dict, no config
    torch.save(state, bare)
    assert "not a FashionLens checkpoint" in fails(bare)
    lacking = tmp_path / "lacking.pt"
    torch.save({"config": cfg.to_dict(), "model": dict(list(state.items())[1:])}, lacking)
    assert f"missing ['{next(iter(state))}']" in fails(lacking)
    newer = tmp_path / "newer.pt"   # a config key this code does not know: a KeyError's message, without its quotes
    torch.save({"config": {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "colour": 1}}, "model": state}, newer)
    assert "config is not valid here: unknown config key model.colour; known: [" in fails(newer)

    # Another backbone (hidden size 64, not 128): the first tensor that does not fit is named.
    small = tmp_path / "small-backbone"
    make_tiny_backbone(str(small), seed=0, text_hidden=64, vision_hidden=64)
    message = fails(good, "--backbone", str(small))
    name, shape = next((n, tuple(t.shape)) for n, t in state.items() if 128 in t.shape)
    assert f"trainable tensor {name} has shape {shape}, this encoder's has" in message

    # A backbone directory that is not there: reported as such, nothing about a hub.
    elsewhere = tmp_path / "moved.pt"
    saved = cfg.to_dict()
    saved["model"]["backbone"] = "qwen-moved-away"
    torch.save({"config": saved, "model": state}, elsewhere)
    with pytest.raises(SystemExit) as info:
        main([str(elsewhere), *args])
    assert "local directory 'qwen-moved-away' not found" in info.value.code
    assert "hub" not in info.value.code.lower() and "hugging" not in info.value.code.lower()

    # NaN in the query token: refused, naming the set and a query; nothing written.
    broken = dict(state, query_token=torch.full_like(state["query_token"], float("nan")))
    nan = tmp_path / "nan.pt"
    torch.save({"config": cfg.to_dict(), "model": broken}, nan)
    with pytest.raises(SystemExit) as info:
        main([str(nan), *args])
    assert "non-finite query embedding (1_t2i_Shoes: query " in info.value.code
    assert not out.exists()


def test_cli_out_or_cache_that_is_a_file_is_refused_before_anything_is_evaluated(tmp_path):
    """--out or --cache naming a file ends evaluate.py in one line naming it before the checkpoint is even read (the
    checkpoint here does not exist), and the file is left as it was.
    Catches: main finding out only at its os.makedirs(out), after the whole evaluation (the --out check removed: a
    FileExistsError traceback and every number lost); --cache not checked (a NotADirectoryError traceback when the
    first gallery chunk is saved)."""
    taken = tmp_path / "results"
    taken.write_text("mine\n")
    for option, why in (("--out", "results are written into --out"),
                        ("--cache", "--cache keeps gallery embeddings in it")):
        with pytest.raises(SystemExit) as info:
            main([str(tmp_path / "missing.pt"), "--split", "test", option, str(taken)])
        assert info.value.code == f"evaluate.py: {taken}: not a folder ({why})"
    assert taken.read_text() == "mine\n"


# ---------------------------------------------------------------------------------------------------------------
# --show: what the model retrieves

class HalfFoundEncoder(OwnImagesFirstEncoder):
    """OwnImagesFirstEncoder, except that about half the queries (by a hash of their id) point away from their first
    ground-truth image: the pages then show hits and misses at rank 1, and own images that only exclusion keeps off
    the top."""

    def encode_queries(self, queries, batch_size=32, progress=False):
        found = [int(hashlib.sha1(q["id"].encode()).hexdigest(), 16) % 2 == 0 for q in queries]
        own = [sum((unit_vector(p, self.DIM) for p in q["query_image"]), torch.zeros(self.DIM)) for q in queries]
        return torch.stack([F.normalize(2 * mine + (1 if hit else -1) * unit_vector(self.target[self.key(q)], self.DIM),
                                        dim=0) for q, mine, hit in zip(queries, own, found)])


def test_show_marks_exactly_the_ground_truth_in_each_shown_top_10(tmp_path, mini_root, monkeypatch):
    """The pages' hit markers are the ground truth: for every shown query, the results drawn are its top 10 by a
    brute-force numpy ranking of the same embeddings (own images excluded) and exactly those that are ground truth
    are marked. Catches: hits marked by rank instead of ground truth, rankings that keep the query's own images,
    pages of one query showing another's results.
    Mutation runs: plot.write_show_pages' "hit": j in truth -> j in truth or r == 0: fails; shown_rankings without the
    exclusion (`and j not in exclude[i]` removed): fails; shown_rankings' picks shifted by one
    (`picks[1:] + picks[:1]` in the search): fails."""
    import plot
    from prepare_data import UNSEEN_TASKS, build_eval_set, build_unseen_eval_set

    keys = ["1_t2i_Shoes", "9_asfr_DARN"]
    sets = [build_eval_set(mini_root, k, "test") for k in keys] + [build_unseen_eval_set(mini_root, UNSEEN_TASKS[0])]
    monkeypatch.setattr(evaluate, "load_encoder", lambda cfg, state, device, **_: HalfFoundEncoder(sets))
    drawn, draw = [], plot.contact_sheet
    monkeypatch.setattr(plot, "contact_sheet", lambda query, results, path, title=None:
                        drawn.append((query, results, os.path.basename(path))) or draw(query, results, path, title))
    out = tmp_path / "out"
    main(["--untrained", "--root", mini_root, "--backbone", str(tmp_path), "--split", "test", "--tasks", *keys,
          UNSEEN_TASKS[0], "--show", "2", "--out", str(out)])

    stub = HalfFoundEncoder(sets)
    marked = []
    for s in sets:
        pages = [d for d in drawn if d[2].startswith(s.name.replace("+", "-").replace(" ", "-") + "-")]
        assert len(pages) == 2
        gallery = stub.encode_targets(s.gallery).numpy()
        for query, results, _ in pages:
            i = s.queries.index(query)
            scores = gallery @ stub.encode_queries([query]).numpy()[0]
            scores[s.exclude[i]] = -np.inf
            top = np.argsort(-scores, kind="stable")[:10]
            assert [r["path"] for r in results] == [s.gallery[j] for j in top]
            assert [r["path"] for r in results if r["hit"]] == [s.gallery[j] for j in top if j in s.ground_truth[i]]
            marked += [r["hit"] for r in results]
    assert any(marked) and not all(marked)                      # marked and unmarked results are on the pages
    index = (out / "show" / "index.html").read_text()
    for _, _, name in drawn:
        assert f'href="{name}"' in index and Image.open(out / "show" / name).size[0] > 0


# ---------------------------------------------------------------------------------------------------------------
# Found by a mutation audit: behaviours the tests above did not pin down

class PerfectEncoder(FakeEncoder):
    """Every query embeds to its ground-truth image's embedding (the query records carry it as "truth")."""

    def encode_queries(self, queries, batch_size=32, progress=False):
        self.queries += [q["id"] for q in queries]
        return torch.stack([unit_vector(q["truth"]) for q in queries])


def test_set_results_carry_chance_with_exclusion_and_the_near_chance_flag():
    """Each set's "chance" is the random-ranking level of its queries as counted (own images excluded), here by hand:
    single-target queries in a gallery of G' images score min(K, G') / G' (Unseen C: 11 images less 2 own ones);
    "near_chance" holds only when recall is below twice chance at EVERY K: a perfect model on a 20-image gallery
    (R@1 = 100 against 5) is not near chance, though at K = 50 its 100 is below twice the chance level of 100.
    Catches: evaluate_sets' chance computed without the exclusion; near_chance with any() instead of all(), or with
    <= instead of < (below)."""
    sets = make_sets()
    results = evaluate_sets(FakeEncoder(), sets, batch_size=4, progress=False)["sets"]
    assert results["Unseen C"]["chance"] == pytest.approx({"R@1": 100 / 9, "R@5": 500 / 9, "R@10": 100.0,
                                                            "R@50": 100.0})
    assert results["7_cir_A"]["chance"] == pytest.approx({"R@1": 100 / 15, "R@5": 500 / 15, "R@10": 1000 / 15,
                                                           "R@50": 100.0})
    for r in results.values():
        assert r["near_chance"] == all(r["recall"][k] < 2 * r["chance"][k] for k in r["recall"])

    gallery = [f"/img/p{i}.jpg" for i in range(20)]
    queries = [{"id": f"p-{i}", "instruction_text": "find it", "query_image": [], "query_video": [],
                "truth": gallery[(3 * i) % 20]} for i in range(6)]
    perfect = EvalSet("1_t2i_P", "t2i", queries, gallery, [[(3 * i) % 20] for i in range(6)], [[] for _ in range(6)])
    found = evaluate_sets(PerfectEncoder(), [perfect], batch_size=4, progress=False)["sets"]["1_t2i_P"]
    assert found["recall"]["R@1"] == 100.0 and found["chance"]["R@1"] == pytest.approx(5.0)
    assert found["near_chance"] is False
    # Exactly twice chance is not below it: a 4-image gallery, one of two queries first (R@1 50 = 2 x 25), every K
    # >= 4 at 100 (chance 100). Catches: near_chance with `<=` (the boundary flagged).
    gallery = gallery[:4]
    queries = [{"id": f"h-{i}", "instruction_text": "find it", "query_image": [], "query_video": [],
                "truth": gallery[0]} for i in range(2)]
    half = EvalSet("1_t2i_H", "t2i", queries, gallery, [[0], [1]], [[], []])
    found = evaluate_sets(PerfectEncoder(), [half], batch_size=4, progress=False)["sets"]["1_t2i_H"]
    assert found["recall"] == {"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0}
    assert found["chance"] == pytest.approx({"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0})
    assert found["near_chance"] is False


def test_shown_rankings_scores_are_the_cosines_of_the_shown_images():
    """--show pages print each result's score: it must be the cosine of the query with that very gallery image
    (numpy here), in rank order, own images left out.
    Catches: scores paired with the wrong ids (e.g. the score row reversed)."""
    rng = np.random.default_rng(1)
    gallery = F.normalize(torch.from_numpy(rng.standard_normal((30, 8)).astype(np.float32)), dim=1).numpy()
    queries = F.normalize(torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32)), dim=1).numpy()
    exclude = [[0, 1], [], [29], [3, 4, 5], []]
    for shown in evaluate.shown_rankings(queries, gallery, exclude, n=5, k=10):
        i = shown["query"]
        cosines = gallery @ queries[i]
        order = [int(j) for j in np.argsort(-cosines) if int(j) not in exclude[i]][:10]
        assert shown["ranked"] == order
        np.testing.assert_allclose(shown["scores"], cosines[order], atol=1e-6)


def test_shown_queries_are_a_seeded_sample_in_query_order():
    """--show N pages show a seeded sample of N queries, in query order, the same on every run; not the first N (a
    file's first queries are often alike: the same product, the same annotator), and every query when N is larger.
    Catches: shown_rankings taking the first n queries (`picks = list(range(n))`)."""
    rng = np.random.default_rng(2)
    gallery = F.normalize(torch.from_numpy(rng.standard_normal((12, 8)).astype(np.float32)), dim=1).numpy()
    queries = F.normalize(torch.from_numpy(rng.standard_normal((30, 8)).astype(np.float32)), dim=1).numpy()
    exclude = [[] for _ in range(30)]
    picked = [s["query"] for s in evaluate.shown_rankings(queries, gallery, exclude, n=4)]
    assert picked == [s["query"] for s in evaluate.shown_rankings(queries, gallery, exclude, n=4)]
    assert picked == sorted(set(picked)) and len(picked) == 4 and all(0 <= i < 30 for i in picked)
    assert picked != [0, 1, 2, 3]
    assert [s["query"] for s in evaluate.shown_rankings(queries[:3], gallery, exclude, n=4)] == [0, 1, 2]


def test_checkpoint_model_with_non_tensor_entries_is_refused(tmp_path):
    """read_checkpoint names a checkpoint whose 'model' holds something other than tensors (a pickled training script
    state, a state dict of the wrong thing) instead of failing later inside load_trainable_state_dict.
    Catches: the non-tensor check in read_checkpoint removed."""
    from config import Config
    path = tmp_path / "odd.pt"
    torch.save({"config": Config().to_dict(), "model": {"query_token": torch.zeros(4), "step": 7}}, path)
    with pytest.raises(EvaluationError, match=r"odd.pt: not a FashionLens checkpoint \('model' holds non-tensor "
                                              r"entries \['step'\]\)"):
        evaluate.read_checkpoint(str(path))


def test_checkpoint_without_a_model_dict_is_refused(tmp_path):
    """A checkpoint with a config but no 'model' dict (an optimizer-only save, a list of tensors) is named as not
    a checkpoint, in one line, like one without a config.
    Catches: read_checkpoint without `isinstance(ckpt.get("model"), dict)` (a KeyError or an AttributeError
    traceback from `ckpt["model"].items()`)."""
    from config import Config
    for name, ckpt in (("no-model.pt", {"config": Config().to_dict(), "optimizer": {}}),
                       ("list.pt", {"config": Config().to_dict(), "model": [torch.zeros(4)]})):
        torch.save(ckpt, tmp_path / name)
        with pytest.raises(EvaluationError, match=rf"{name}: not a FashionLens checkpoint \(expected a dict with a "
                                                  r"'config' dict and a 'model' dict of tensors, found a dict with "
                                                  r"keys \['config', "):
            evaluate.read_checkpoint(str(tmp_path / name))


def test_untrained_with_a_checkpoint_evaluates_fresh_trainable_parts(tmp_path):
    """`evaluate.py CKPT --untrained` is the floor of that run: the checkpoint's config, none of its trained tensors
    (load_encoder then seeds fresh ones); without --untrained the saved tensors are what is loaded.
    Catches: resolve_config handing the checkpoint's tensors to the untrained floor (the trained model's table then
    reported under the label "untrained")."""
    from config import Config
    cfg = Config()
    cfg.train.seed = 7
    ckpt = str(tmp_path / "best.pt")
    torch.save({"config": cfg.to_dict(), "model": {"query_token": torch.ones(4)}}, ckpt)
    floor_cfg, floor_state, _, label = evaluate.resolve_config(
        evaluate.parse_args([ckpt, "--untrained", "--backbone", str(tmp_path)]))
    assert floor_state is None and floor_cfg.train.seed == 7 and label == f"untrained ({ckpt})"
    _, state, _, label = evaluate.resolve_config(evaluate.parse_args([ckpt, "--backbone", str(tmp_path)]))
    assert torch.equal(state["query_token"], torch.ones(4)) and label == ckpt


def test_a_checkpoint_is_refused_on_a_backbone_with_other_weights(tiny_backbone, mini_root, tmp_path):
    """Two backbones of one architecture (an Instruct and a Thinking model; here two tiny ones of other seeds) take the
    same trained state without complaint, and the other one's embeddings would be wrong. The checkpoint records the
    identity of the weights it was trained on: evaluate.py (like search.py and model.py export, through load_encoder)
    refuses another backbone naming both, and takes the same weights saved in bf16 in another folder.
    Fails when load_encoder skips the check (the other backbone's table is printed), or when backbone_identity hashes
    the frozen values unrounded (the bf16 copy is refused)."""
    from transformers import Qwen3VLForConditionalGeneration
    from config import Config
    from fake_backbones import make_tiny_backbone
    from model import build_encoder
    other, in_bf16 = str(tmp_path / "other"), str(tmp_path / "bf16")
    make_tiny_backbone(other, seed=1)
    shutil.copytree(tiny_backbone, in_bf16)
    Qwen3VLForConditionalGeneration.from_pretrained(tiny_backbone, dtype=torch.bfloat16).save_pretrained(in_bf16)
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.data.root = tiny_backbone, "lora", mini_root
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    ckpt = str(tmp_path / "best.pt")
    torch.save({"config": cfg.to_dict(), "model": encoder.trainable_state_dict(),
                "backbone_identity": encoder.backbone_identity()}, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        main([ckpt, "--backbone", other, "--tasks", "1_t2i_Shoes"])
    message = str(exit_info.value.code)
    assert f"{ckpt}: trained on a backbone with other weights than {other}" in message
    assert encoder.backbone_identity() in message
    cfg.model.backbone = in_bf16
    assert evaluate.load_encoder(cfg, encoder.trainable_state_dict(), "cpu", source=ckpt,
                                 trained_on=encoder.identities()) is not None


def test_a_fully_trained_checkpoint_on_a_backbone_with_another_tokenizer_is_refused(tiny_backbone, mini_root,
                                                                                      tmp_path):
    """model.trainable=full (tiny.yaml) trains every weight, so the checkpoint holds all of them and backbone_identity
    hashes no tensor: what it still takes from the backbone directory is the tokenizer. A tiny backbone of another
    seed has another BPE vocabulary (the same size, so every shape fits): its ids mean other tokens, and evaluate.py
    printed other numbers with exit 0. It is refused naming the checkpoint and both tokenizer identities; the
    backbone it was trained on loads it.
    Catches: other_backbone checking the weights only (the tokenizer's row dropped from its loop: the other
    backbone's table is printed); identities() without the tokenizer."""
    from config import Config
    from fake_backbones import make_tiny_backbone
    from model import build_encoder
    other = str(tmp_path / "other")
    make_tiny_backbone(other, seed=7)
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.image_pixels = tiny_backbone, "full", 64 * 64
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    assert not [n for n, p in encoder.named_parameters() if not p.requires_grad]
    ckpt = str(tmp_path / "best.pt")
    torch.save({"config": cfg.to_dict(), "model": encoder.trainable_state_dict(), **encoder.identities()}, ckpt)
    cfg.model.backbone = other
    here = build_encoder(cfg.model, cfg.calibrator, "cpu").tokenizer_identity()
    with pytest.raises(SystemExit) as exit_info:
        main([ckpt, "--backbone", other, "--root", mini_root, "--tasks", "1_t2i_Shoes"])
    assert str(exit_info.value.code) == (
        f"evaluate.py: {ckpt}: trained on a backbone with another tokenizer than {other} (tokenizer identity "
        f"{encoder.tokenizer_identity()}, this one's {here}); point --backbone or model.backbone at the one it was "
        f"trained on")
    cfg.model.backbone = tiny_backbone
    assert evaluate.load_encoder(cfg, encoder.trainable_state_dict(), "cpu", source=ckpt,
                                 trained_on=evaluate.read_checkpoint(ckpt)[2]) is not None


def test_untrained_floor_is_the_same_whatever_random_numbers_came_before(tiny_backbone):
    """--untrained evaluates fresh trainable parts: seeded from train.seed in load_encoder, so every rank (and every
    run) evaluates the same floor whatever the process drew before.
    Catches: load_encoder's torch.manual_seed removed (only a fresh process's fixed default seed kept ranks equal)."""
    from config import Config
    cfg = Config()
    cfg.model.backbone, cfg.model.image_pixels = tiny_backbone, 64 * 64
    first = evaluate.load_encoder(cfg, None, "cpu").trainable_state_dict()
    torch.rand(1000)
    second = evaluate.load_encoder(cfg, None, "cpu").trainable_state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert any(t.abs().sum() > 0 for t in first.values())
    # The floor of a run seeded otherwise is another draw; and the encoder is in eval mode (no LoRA dropout in the
    # embeddings that are scored).
    # Catches: load_encoder seeding a constant (`torch.manual_seed(0)`), and returning the encoder in train mode
    # (`.eval()` dropped).
    cfg.train.seed = 1
    encoder = evaluate.load_encoder(cfg, None, "cpu")
    other = encoder.trainable_state_dict()
    assert any(not torch.equal(first[name], other[name]) for name in first)
    assert not any(m.training for m in encoder.modules())


def test_fingerprint_follows_the_model_config(tiny_backbone):
    """The gallery cache is only valid for the settings that turn an image into an embedding: model.eval_image_pixels
    (another resize, other embeddings, same weights and backbone) must change the key. (The source code's part of
    the key: test_fingerprint_follows_the_source_of_the_modules_the_model_imports.)
    Catches: fingerprint without the model/calibrator config."""
    from config import Config
    from model import build_encoder
    cfg = Config()
    cfg.model.backbone, cfg.model.image_pixels = tiny_backbone, 64 * 64
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    before = fingerprint(cfg, encoder)
    cfg.model.eval_image_pixels = 32 * 32
    assert fingerprint(cfg, encoder) != before


def test_untrained_floor_is_not_checked_against_the_checkpoints_backbone(tiny_backbone):
    """load_encoder with no state to load (--untrained CKPT: fresh trainable parts on the backbone) builds the
    encoder whatever backbone identity the checkpoint records, as documented (nothing trained is put on other
    weights); with the state it refuses. Fails when the identity check runs without a state (`state is not None`
    dropped: the untrained floor of a checkpoint cannot be measured on another backbone)."""
    from config import Config
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable = tiny_backbone, "lora"
    encoder = evaluate.load_encoder(cfg, None, "cpu", source="best.pt",
                                    trained_on={"backbone_identity": "0123456789abcdef"})
    assert encoder.backbone_identity() != "0123456789abcdef"
    with pytest.raises(EvaluationError, match="best.pt: trained on a backbone with other weights"):
        evaluate.load_encoder(cfg, encoder.trainable_state_dict(), "cpu", source="best.pt",
                              trained_on={"backbone_identity": "0123456789abcdef"})


def test_arithmetic_names_device_dtype_attention_kernel_and_packed_vision():
    """encoding.arithmetic, by hand, for stand-in encoders: a CPU with sdpa -> "cpu-float32-sdpa" (a CPU computes in
    fp32 whatever model.dtype says); a GPU with FlashAttention and the packed vision path -> "cuda-bfloat16-
    flash_attention_2-packed"; an encoder without a Qwen3-VL (the open_clip baseline) names its class. Each part
    changes the embeddings, so each must change the cache folder.
    Fails when the attention kernel or the packed vision path is left out of the name (a gallery encoded with
    FlashAttention would be served to an sdpa run from the same cache)."""
    from types import SimpleNamespace
    from config import Config
    cfg = Config()
    cfg.model.dtype = "bfloat16"

    def stand_in(device, kernel, packed):
        lm = SimpleNamespace(config=SimpleNamespace(_attn_implementation=kernel))
        return SimpleNamespace(lm=lm, device=torch.device(device), vision_attention_packed=packed)

    assert arithmetic(cfg, stand_in("cpu", "sdpa", False)) == "cpu-float32-sdpa"
    assert arithmetic(cfg, stand_in("cuda", "flash_attention_2", True)) == "cuda-bfloat16-flash_attention_2-packed"
    assert arithmetic(cfg, stand_in("cuda", "sdpa", False)) == "cuda-bfloat16-sdpa"

    class OpenClipEncoder(SimpleNamespace):
        pass
    assert arithmetic(cfg, OpenClipEncoder(device=torch.device("cpu"))) == "cpu-float32-OpenClipEncoder"


def test_a_gallery_cached_in_fp32_is_not_served_to_a_bf16_encoder(tiny_backbone, tmp_path, monkeypatch):
    """The same checkpoint and config compute in fp32 on a CPU and in model.dtype (bf16) on a GPU: other embeddings.
    A cache filled by the fp32 encoder, then read through the cache folder (evaluate.py's cache_key) of a bf16
    encoder holding the same trainable weights, must give what the bf16 encoder computes without a cache (bf16 stood
    in for on the CPU by patching compute_dtype, as test_model does).
    Fails when cache_key leaves out the arithmetic (`return fingerprint(cfg, encoder)`: the fp32 embeddings come
    back), or when arithmetic leaves out the compute dtype."""
    import model
    from config import Config
    paths = []
    for i, colour in enumerate(("red", "navy", "olive")):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40 + 8 * i, 48), colour).save(paths[-1])
    cfg = Config()
    cfg.model.backbone, cfg.model.image_pixels = tiny_backbone, 64 * 64
    cfg.model.vision_attention = "transformers"     # as in fp32: only the dtype tells the two encoders apart
    cache = tmp_path / "cache"

    def encoder_and_key(state=None):
        torch.manual_seed(0)
        encoder = model.build_encoder(cfg.model, cfg.calibrator, "cpu").eval()
        if state is not None:      # one checkpoint: a bf16 build alone would round the token vectors' start
            encoder.load_trainable_state_dict(state)
        return encoder, str(cache / cache_key(cfg, encoder))

    fp32, key = encoder_and_key()
    from encoding import encode_gallery
    in_fp32 = encode_gallery(fp32, paths, 2, key, progress=False)
    monkeypatch.setattr(model, "compute_dtype", lambda model_cfg, device: torch.bfloat16)
    bf16, key = encoder_and_key(fp32.trainable_state_dict())
    uncached = encode_gallery(bf16, paths, 2, None, progress=False)
    assert not torch.allclose(uncached, in_fp32, atol=1e-4)     # the two really differ
    assert torch.equal(encode_gallery(bf16, paths, 2, key, progress=False), uncached)


def test_cache_file_of_an_older_format_is_ignored_with_a_warning(tmp_path, capsys):
    """A cache chunk without file identities (written before they were part of the key), or with identities of
    (path, size, mtime) only (before the ctime was), is skipped with a warning and its images encoded afresh; the
    results equal an uncached run.
    Catches: load_cache reading such a file (KeyError on its missing 'keys'); load_cache without its check of the
    keys' length (the second file is read without a word, and its images are encoded again unexplained)."""
    sets, cache = make_sets(), tmp_path / "cache"
    cache.mkdir()
    old = sorted({p for s in sets for p in s.gallery})[:4]
    torch.save({"paths": old, "emb": torch.zeros(4, 16)}, cache / "targets-old.pt")
    torch.save({"keys": [[p, 10, 20] for p in old], "emb": torch.zeros(4, 16)}, cache / "targets-mtime.pt")
    encoder = FakeEncoder()
    assert evaluate_sets(encoder, sets, batch_size=4, cache_dir=str(cache), progress=False) == \
        evaluate_sets(FakeEncoder(), sets, batch_size=4, progress=False)
    assert set(old) <= set(encoder.targets)
    err = capsys.readouterr().err
    for name in ("targets-old.pt", "targets-mtime.pt"):
        assert f"ignoring cache file {cache / name}: an older format" in err


def test_encoding_sharded_over_three_ranks_pads_and_restores_the_order(monkeypatch):
    """Rank r of W encodes items r, r+W, ...; a rank with one item fewer than rank 0 pads its shard with a zero row
    so that every rank sends a shard of one size, and rank 0 restores the order. Simulated here for W = 3 (the gloo
    tests run W = 2): ranks 1 and 2 run first and their shards are handed to rank 0's gather.
    Catches: the shard size as len // W (10 items: rank 0's 4 rows do not fit); the gather concatenated rank by
    rank; padding encoded as items (each of the 10 items goes through the model once, the 2 zero rows never)."""
    import encoding
    items = [f"item{j}" for j in range(10)]
    shards = {}

    class FakeDist:
        rank = 0

        @staticmethod
        def get_backend():
            return "gloo"

        def gather(self, local, gathered, dst):
            shards[self.rank] = local.clone()
            if gathered is not None:          # rank 0: every rank's shard, as torch.distributed.gather fills it
                gathered[:] = [shards[r] for r in range(3)]

    fake = FakeDist()
    monkeypatch.setattr(encoding, "dist", fake)

    encoded = []

    def encode(part, batch_size):
        encoded.extend(part)
        return torch.tensor([[float(p[4:]), 1.0] for p in part])

    for rank in (1, 2, 0):
        fake.rank = rank
        monkeypatch.setattr(encoding, "world", lambda rank=rank: (rank, 3))
        out = encoding.encode_sharded(encode, items, 2, False, "test")
        assert (out is None) == (rank != 0)
    assert [len(shards[r]) for r in range(3)] == [4, 4, 4]
    assert out[:, 0].tolist() == list(range(10))
    assert sorted(encoded, key=lambda p: int(p[4:])) == items


def test_encoding_goes_chunk_by_chunk_over_every_item_once_in_order():
    """encode_sharded encodes CHUNK_BATCHES forward batches at a time (the unit of progress and of cache files): 40
    items in batches of 2 are chunks of 32 and 8, each handed to on_chunk, every item encoded once, in order.
    Catches: overlapping chunks (`shard[start:start + chunk + 1]`: item 32 encoded twice, the embeddings one longer
    than the items); chunks of CHUNK_BATCHES items instead of batches (`chunk = CHUNK_BATCHES`: 16, 16, 8)."""
    import encoding
    items, encoded, handed = [f"item{j}" for j in range(40)], [], []

    def encode(part, batch_size):
        encoded.append(len(part))
        return torch.tensor([[float(p[4:])] for p in part])

    out = encoding.encode_sharded(encode, items, 2, False, "test", on_chunk=lambda part, emb: handed.append(len(emb)))
    assert encoding.CHUNK_BATCHES == 16 and encoded == handed == [32, 8]
    assert out[:, 0].tolist() == list(range(40))


def test_the_gallery_cache_encodes_an_image_listed_twice_once_and_stores_fp32(tmp_path):
    """encode_gallery with a cache: an image listed twice (a and b, then a again) is encoded once and both of its
    rows get its embedding; an encoder that gives bf16 rows is handed on, and cached, as fp32 (the values of its bf16
    rows), so the next run reads the cache back (load_cache takes fp32 chunks only) and encodes nothing.
    Catches: the images to encode not deduplicated (`dict.fromkeys` dropped: a encoded twice); encode_sharded handing
    on the encoder's dtype (`.float()` dropped: the next run refuses its own cache chunk)."""
    from encoding import encode_gallery

    class Bf16Encoder(FakeEncoder):
        def encode_targets(self, paths, batch_size=32, progress=False):
            return super().encode_targets(paths, batch_size).to(torch.bfloat16)

    paths = [str(tmp_path / f"{name}.jpg") for name in ("a", "b", "a")]
    for path in paths[:2]:
        with open(path, "wb") as f:
            f.write(path.encode())
    expected = torch.stack([unit_vector(p) for p in paths]).to(torch.bfloat16).float()
    for run in range(2):
        encoder = Bf16Encoder()
        emb = encode_gallery(encoder, paths, 4, str(tmp_path / "cache"), progress=False)
        assert emb.dtype == torch.float32 and torch.equal(emb, expected)
        assert encoder.targets == ([paths[0], paths[1]] if run == 0 else [])


def test_unreadable_cache_file_is_ignored_with_a_warning(tmp_path, capsys):
    """A cache chunk that cannot be read (truncated by a full disk, or any foreign bytes) is only a cache: it is skipped
    with a warning naming it, its images are encoded afresh, and the results equal an uncached run.
    Catches: load_cache catching only some errors (an unpickling error then stops the evaluation)."""
    sets, cache = make_sets(), tmp_path / "cache"
    evaluate_sets(FakeEncoder(), sets, batch_size=4, cache_dir=str(cache), progress=False)
    chunk = sorted(cache.glob("targets-*.pt"))[0]
    lost = [key[0] for key in torch.load(chunk, weights_only=True)["keys"]]
    chunk.write_bytes(chunk.read_bytes()[:100])
    encoder = FakeEncoder()
    assert evaluate_sets(encoder, sets, batch_size=4, cache_dir=str(cache), progress=False) == \
        evaluate_sets(FakeEncoder(), sets, batch_size=4, progress=False)
    assert sorted(encoder.targets) == sorted(lost)
    assert f"ignoring unreadable cache file {chunk}" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["width", "rows", "dtype", "none"])
def test_a_cache_chunk_of_another_width_row_count_or_dtype_is_refused_naming_it(tmp_path, damage):
    """A cache chunk that reads but holds embeddings of another width (another model's), fewer rows than keys,
    another dtype than encode_sharded's float32, or no tensor at all was not written for this model: a DataError
    naming the file, what it holds against what was expected, and the folder to delete. Before, another width ended
    in torch.stack's or faiss's error and a missing row was re-encoded without a word.
    Catches: load_cache's shape and dtype check removed (`if not (...)` -> `if False`: no DataError); its tensor
    check dropped (`isinstance(emb, torch.Tensor) and ` removed: an AttributeError on None's dtype)."""
    sets, cache = make_sets(), tmp_path / "cache"
    evaluate_sets(FakeEncoder(), sets, batch_size=4, cache_dir=str(cache), progress=False)
    chunk = sorted(cache.glob("targets-*.pt"))[0]
    saved = torch.load(chunk, weights_only=True)
    rows = len(saved["keys"])
    emb, found = {"width": (saved["emb"][:, :8], f"torch.float32 [{rows}, 8]"),
                  "rows": (saved["emb"][1:], f"torch.float32 [{rows - 1}, 16]"),
                  "dtype": (saved["emb"].double(), f"torch.float64 [{rows}, 16]"),
                  "none": (None, "NoneType")}[damage]
    torch.save({"keys": saved["keys"], "emb": emb}, chunk)
    with pytest.raises(DataError) as err:
        evaluate_sets(FakeEncoder(), sets, batch_size=4, cache_dir=str(cache), progress=False)
    assert str(err.value) == (f"{chunk}: cache chunk holds {found} embeddings, expected torch.float32 [{rows}, 16] "
                              f"(one row of the model's width per image): not written for this model; delete the "
                              f"cache folder {cache}")


def test_a_refused_cache_chunk_stops_every_rank(tmp_path, monkeypatch):
    """Rank 0 alone reads the cache; when it refuses a chunk, the other ranks get its error through the broadcast
    that would have told them what to encode, and raise it too instead of waiting in the gather for rank 0. Rank 1
    of 2 simulated: the broadcast hands it what rank 0 sends.
    Catches: the other ranks not raising (`if isinstance(decided[0], tuple): raise ...` dropped: rank 1 goes on to
    encode and gather)."""
    import encoding
    sent = [(str(tmp_path / "targets-x.pt"), "cache chunk holds ...")]
    monkeypatch.setattr(encoding, "world", lambda: (1, 2))
    monkeypatch.setattr(encoding.dist, "broadcast_object_list", lambda objects, src: objects.__setitem__(0, sent[0]))
    encoder = FakeEncoder()
    with pytest.raises(DataError) as err:
        encoding.encode_gallery(encoder, ["/img/a.jpg"], 4, str(tmp_path), progress=False)
    assert str(err.value) == f"{tmp_path / 'targets-x.pt'}: cache chunk holds ..." and encoder.targets == []


def test_rank_0_sends_its_refusal_of_a_cache_chunk_to_every_rank(tmp_path, monkeypatch, capsys):
    """Rank 0 of 2 (simulated: the broadcast records what it sends), meeting a cache chunk of another width, sends
    (file, message) to the other ranks before it raises the DataError itself: raising before the broadcast would
    leave them waiting in it.
    Catches: rank 0 raising at once (`decided = [(err.path, err.message)]` -> `raise`), or not catching the
    DataError (`except DataError` -> `except ValueError`): nothing is sent; DataError keeping another message than
    the one it was given (`self.message = message` -> `= str(path)`: the other ranks would raise "path: path")."""
    import encoding
    cache = tmp_path / "cache"
    evaluate_sets(FakeEncoder(), make_sets(), batch_size=4, cache_dir=str(cache), progress=False)
    chunk = sorted(cache.glob("targets-*.pt"))[0]
    saved = torch.load(chunk, weights_only=True)
    torch.save({"keys": saved["keys"], "emb": saved["emb"][:, :8]}, chunk)
    sent = []
    monkeypatch.setattr(encoding, "world", lambda: (0, 2))
    monkeypatch.setattr(encoding.dist, "broadcast_object_list", lambda objects, src: sent.append(list(objects)))
    with pytest.raises(DataError) as err:
        encoding.encode_gallery(FakeEncoder(), ["/img/a.jpg"], 4, str(cache), progress=False)
    assert str(err.value).startswith(f"{chunk}: cache chunk holds")
    assert sent == [[(str(chunk), str(err.value)[len(f"{chunk}: "):])]]


def test_a_cache_chunk_is_never_left_half_written(tmp_path, monkeypatch):
    """A run killed while it writes a cache chunk leaves no chunk file behind (the write goes to a temporary name,
    then one rename), so no later run reads half a chunk. The kill is simulated by a torch.save that writes some
    bytes and then fails.
    Catches: save_cache_chunk writing the chunk file in place (torch.save straight onto targets-*.pt)."""
    def dies_while_writing(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a chunk")
        raise OSError("killed")

    monkeypatch.setattr(torch, "save", dies_while_writing)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="killed"):
        evaluate_sets(FakeEncoder(), make_sets(), batch_size=4, cache_dir=str(cache), progress=False)
    assert os.listdir(cache) == []


class BatchRecordingEncoder(FakeEncoder):
    """FakeEncoder that records the batch size of every encoding call."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = set()

    def encode_targets(self, paths, batch_size=32, progress=False):
        self.batch_sizes.add(batch_size)
        return super().encode_targets(paths, batch_size, progress)

    def encode_queries(self, queries, batch_size=32, progress=False):
        self.batch_sizes.add(batch_size)
        return super().encode_queries(queries, batch_size, progress)


def test_cli_batch_size_and_config_reach_the_encoder(tmp_path, mini_root, monkeypatch):
    """`--batch-size 3` encodes the gallery and the queries in batches of 3 (a smaller batch is how a run that does
    not fit in memory is made to fit); without it, the batches are train.eval_batch_size of the `--config` given
    (5 here), and without --config that of the default config (32).
    Catches: --batch-size ignored (`args.batch_size or ...` dropped: every batch 5); --config not loaded
    (`load_config(None)`: batches of 32)."""
    encoders = []

    def load_encoder(cfg, state, device, **_):
        encoders.append(BatchRecordingEncoder())
        return encoders[-1]

    monkeypatch.setattr(evaluate, "load_encoder", load_encoder)
    config = tmp_path / "eval.yaml"
    config.write_text("train:\n  eval_batch_size: 5\n")
    args = ["--untrained", "--root", mini_root, "--backbone", str(tmp_path), "--tasks", "1_t2i_Shoes"]
    main([*args, "--config", str(config), "--batch-size", "3", "--out", str(tmp_path / "a")])
    main([*args, "--config", str(config), "--out", str(tmp_path / "b")])
    main([*args, "--out", str(tmp_path / "c")])
    assert [e.batch_sizes for e in encoders] == [{3}, {5}, {32}]
    assert all(e.targets and e.queries for e in encoders)


def test_cli_baseline_is_zero_shot_open_clip_labelled_as_given(tmp_path, mini_root, monkeypatch):
    """`evaluate.py --baseline openclip:CONFIG.json` evaluates the open_clip dual encoder that JSON config describes
    (random weights) with all its weights counted as trainable and no calibrator (the zero-shot baseline), and
    labels its results with the --baseline string.
    Catches: the baseline built with the config's calibrator (mode slerp: a random calibrator bends every query) or
    its trainable setting (lora: open_clip refuses it and --baseline cannot run); the results labelled
    "untrained (default config)"."""
    from fake_backbones import make_tiny_openclip_config
    spec = "openclip:" + make_tiny_openclip_config(str(tmp_path))
    built, real = [], evaluate.load_encoder

    def load_encoder(cfg, *args, **kwargs):
        built.append(cfg)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(evaluate, "load_encoder", load_encoder)
    main(["--baseline", spec, "--root", mini_root, "--tasks", "1_t2i_Shoes", "--out", str(tmp_path / "out")])
    (cfg,) = built
    assert (cfg.model.kind, cfg.model.backbone, cfg.model.trainable, cfg.calibrator.mode) == (
        "openclip", spec[len("openclip:"):], "full", "none")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"] == spec and list(results["sets"]) == ["1_t2i_Shoes"]
    assert f"U-FIRE val, {spec}" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    ([], "give a checkpoint, --baseline or --untrained"),
    (["--baseline", "openclip:ViT-B-32", "best.pt"], "--baseline takes no checkpoint and no --untrained"),
    (["--baseline", "openclip:ViT-B-32", "--untrained"], "--baseline takes no checkpoint and no --untrained"),
    (["--baseline", "open_clip:ViT-B-32"], "--baseline must look like openclip:MODEL[:WEIGHTS], got 'open_clip:"),
    (["--baseline", "openclip:"], "--baseline must look like openclip:MODEL[:WEIGHTS], got 'openclip:'"),
    (["best.pt", "--config", "configs/tiny.yaml"], "--config is only for runs without a checkpoint"),
    (["best.pt", "--show", "-1"], "--show takes a number of queries per sub-dataset, got -1")])
def test_contradictory_or_malformed_arguments_are_usage_errors(argv, message, capsys):
    """Each combination parse_args refuses ends in argparse's usage error (status 2) with its reason, before any data
    or model is read.
    Catches: each check in parse_args removed or weakened: --baseline with --untrained accepted (`args.ckpt` alone),
    an empty model name accepted (`len(...) == len("openclip:")` dropped), --config beside a checkpoint silently
    ignored, --show -1 accepted (`< -1`)."""
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unknown_tasks_and_unseen_tasks_off_the_test_split_are_named(tmp_path):
    """--tasks with a name that is neither a sub-dataset nor an evaluation-only task is refused listing the known
    ones; an evaluation-only task on --split val (they have test data only) is refused as such. Both before any file
    is read (the root here does not exist).
    Catches: the unknown-task check removed (`unknown = []`: nothing evaluated, an empty table) and the split check
    removed (the val run looks for the task's files and fails on a missing file instead)."""
    from config import Config
    cfg = Config()
    cfg.data.root = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"unknown task\(s\) \['7_cir_Boots'\]; known: \['1_t2i_FashionGen'"):
        evaluate.build_sets(evaluate.parse_args(["--untrained", "--tasks", "7_cir_Shoes", "7_cir_Boots"]), cfg)
    with pytest.raises(SystemExit, match=r"the evaluation-only tasks \['Street\+Modification Text 2 Shop'\] exist "
                                         r"for --split test only"):
        evaluate.build_sets(evaluate.parse_args(["--untrained", "--tasks", "Street+Modification Text 2 Shop"]), cfg)


def test_batch_size_below_1_is_a_usage_error(capsys):
    """--batch-size 0 fell back to train.eval_batch_size without a word and --batch-size -3 ended in torch.cat's
    "expected a non-empty list of Tensors". Fails when parse_args stops checking it (the parse succeeds)."""
    for size in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args(["best.pt", "--batch-size", size])
        assert e.value.code == 2 and f"--batch-size must be at least 1, got {size}" in capsys.readouterr().err
    assert evaluate.parse_args(["best.pt", "--batch-size", "1"]).batch_size == 1


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/eval_scaling.py and benchmarks/asfr_probe.py

def test_eval_scaling_naive_recall_by_hand():
    """The naive bf16 matmul + topk on the hand-ranked queries of test_recall_hand_computed_small_gallery_and_multi_
    target. Catches: the hit test inverted, one result too many counted (row[:k + 1]), topk deeper than the
    gallery."""
    gallery = torch.eye(6).bfloat16()
    queries = torch.from_numpy(np.stack([ranked_query([2, 0, 1, 3, 4, 5], 6), ranked_query([0, 1, 2, 3, 4, 5], 6),
                                         ranked_query([4, 0, 1, 2, 3, 5], 6), ranked_query([1, 2, 3, 4, 5, 0], 6)]))
    recall, top = eval_scaling.naive_recall(queries.bfloat16(), gallery, [[0], [5, 3], [4], [0]], ks=(1, 2, 4, 6))
    assert recall == pytest.approx({"R@1": 25.0, "R@2": 50.0, "R@4": 75.0, "R@6": 100.0})
    assert top[0] == [2, 0, 1, 3, 4, 5]
    assert eval_scaling.naive_recall(queries.bfloat16(), gallery, [[0], [5, 3], [4], [0]])[0]["R@50"] == 100.0


def scaling_timed(seconds, seen):
    """eval_scaling.timed with given durations by function name; records each search's fp32 and bf16 inputs."""
    def timed(fn, *args):
        if fn.__name__ in ("recall_at_k", "naive_recall"):
            seen.setdefault(fn.__name__, []).append(args[:2])
        return fn(*args), seconds(fn.__name__, args)
    return timed


def top1_agreement(fp32, bf16):
    """Percent of the first 200 queries whose top-1 under bf16 is the fp32 top-1, by numpy argmax."""
    (q, g), (q16, g16) = fp32, bf16
    exact = np.argmax(q[:200] @ g.T, axis=1)
    return 100 * np.mean(np.argmax((q16[:200].float() @ g16.float().T).numpy(), axis=1) == exact)


def test_eval_scaling_per_sub_dataset_table_from_given_timings(tmp_path, monkeypatch, capsys):
    """Part 1 on four hand-written released-format galleries (t2i: 30 entries, one twice; cir: 20, 5 of them the
    t2i's; asfr: a pool of 12 in two labels; video: 10), every duration given (ours 0.5 s to build and 2 s to
    search, naive 10 s and 5 s). By hand: 3, 2, 1 and 1 synthetic queries; galleries 29, 20, 12, 10: 71, 66
    distinct; ratios 20x and 2.5x; totals 2.00 / 40.00 / 8.0 / 20.0 s. The top-1 agreement is recomputed here with
    numpy argmax. Catches: a query family with media given none (the records are refused: part 1 stopped at the
    first sketch set), one synthetic query per entry instead of per 10, the ratios inverted, the build and search totals
    swapped, the distinct images counted per gallery, agreement taken on the second result, the naive search run
    in fp32."""
    gallery = tmp_path / "annotations" / "gallery"
    gallery.mkdir(parents=True)
    shoes = [f"shoes/a{i}.jpg" for i in range(29)]
    (gallery / "1_t2i_Shoes_test_candidates.json").write_text(json.dumps(shoes + ["shoes/a3.jpg"]))
    (gallery / "7_cir_Shoes_test_candidates.json").write_text(json.dumps(shoes[:5] + [f"cir/b{i}.jpg" for i in
                                                                                      range(15)]))
    darn = [f"darn/d{i}.jpg" for i in range(12)]
    (gallery / "9_asfr_DARN_test_candidate_data.json").write_text(json.dumps(
        {"DARN_asfr_test_candidate": darn, "DARN+0+1": darn[:6], "DARN+1+0": darn[6:]}))
    (gallery / "6_video2img_MovingFashion_test_candidates.json").write_text(json.dumps([f"mf/{i}.jpg" for i in
                                                                                         range(10)]))
    keys = ("1_t2i_Shoes", "6_video2img_MovingFashion", "7_cir_Shoes", "9_asfr_DARN")
    monkeypatch.setattr(eval_scaling, "SUB_DATASETS", {k: v for k, v in eval_scaling.SUB_DATASETS.items() if k in keys})
    seconds = {"build_eval_set": 0.5, "naive_build": 10.0, "recall_at_k": 2.0, "naive_recall": 5.0}
    seen = {}
    monkeypatch.setattr(eval_scaling, "timed", scaling_timed(lambda name, args: seconds[name], seen))
    args = argparse.Namespace(annotations=str(tmp_path / "annotations"), dim=32, max_queries=1000, threads=1)
    root = tmp_path / "root"
    eval_scaling.per_sub_dataset(args, np.random.default_rng(0), str(root))
    rows = capsys.readouterr().out.splitlines()[4:]
    agreement = [top1_agreement(fp32, bf16) for fp32, bf16 in zip(seen["recall_at_k"], seen["naive_recall"])]
    assert {t.dtype for pair in seen["naive_recall"] for t in pair} == {torch.bfloat16}
    assert rows[:4] == [f"| {key} | {entries} | {size} | {queries} | 0.500 | 10.000 | 20× | 2.00 | 5.00 | 2.5× | "
                        f"{a:.1f}% |" for key, entries, size, queries, a in
                        zip(keys, (30, 10, 20, 12), (29, 10, 20, 12), (3, 1, 2, 1), agreement)]
    assert rows[4] == "| **total** | | 71 (66 distinct) | | 2.00 | 40.00 | 20× | 8.0 | 20.0 | 2.5× | |"
    records = json.loads((root / "0_triplet_files" / "9_asfr_DARN_test_triplet_data.json").read_text())
    assert records[0]["target_label"] in ("DARN+0+1", "DARN+1+0") and records[0]["attribute"] in ("0", "1")


def test_eval_scaling_search_time_table_from_given_timings(monkeypatch, capsys):
    """Part 2 at galleries of 20 and 50 vectors, 10 queries, ours taking N / 10 s and the naive search N / 4 s. By
    hand: 2.00 s and 200.00 ms per query against 5.00 s and 500.00 ms (2.5x) at 20; 5.00 / 500.00 against 12.50 /
    1250.00 at 50. Catches: ms per query off by 1000, the ratio inverted, every size searching the whole gallery,
    the agreement taken against another size's exact ranking, the naive search run in fp32."""
    seen = {}
    monkeypatch.setattr(eval_scaling, "timed", scaling_timed(
        lambda name, args: len(args[1]) / (10 if name == "recall_at_k" else 4), seen))
    args = argparse.Namespace(sizes="20,50", scaling_dim=8, scaling_queries=10, threads=1)
    eval_scaling.scaling(args, np.random.default_rng(0))
    rows = capsys.readouterr().out.splitlines()[4:]
    agreement = [top1_agreement(fp32, bf16) for fp32, bf16 in zip(seen["recall_at_k"], seen["naive_recall"])]
    assert [len(g) for _, g in seen["recall_at_k"]] == [len(g) for _, g in seen["naive_recall"]] == [20, 50]
    assert {t.dtype for pair in seen["naive_recall"] for t in pair} == {torch.bfloat16}
    assert rows == [f"| 20 | 2.00 | 200.00 | 5.00 | 500.00 | 2.5× | {agreement[0]:.1f}% |",
                    f"| 50 | 5.00 | 500.00 | 12.50 | 1250.00 | 2.5× | {agreement[1]:.1f}% |"]


def test_asfr_probe_mean_offdiagonal_cosine_by_hand():
    """Rows along x, along y (length 2) and the diagonal (length 3 sqrt 2): cosines 0, 1/sqrt 2, 1/sqrt 2, so the
    mean over the 6 ordered pairs is sqrt 2 / 3. Catches: the diagonal's ones left in, the mean over n^2 pairs,
    the rows not normalised."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    assert float(asfr_probe.mean_offdiagonal_cosine(x)) == pytest.approx(2 ** 0.5 / 3)


def test_asfr_probe_rows_per_attribute(monkeypatch, capsys):
    """probe on a one-hot gallery of 30 with four queries, attributes colour, category, colour, colour, query i's
    ground truth image i. Real queries rank their own ground truth first, last, first, first (the others' ground
    truths last but one); the query photos the other way round. By hand, R@10 query / image only / chance (10 of
    30): all 75.0 / 25.0 / 33.3; category 0.0 / 100.0; colour 100.0 / 0.0. Catches: a group scored on the first
    queries or the first ground truths instead of its own, the query and photo columns swapped, chance taken over
    the queries instead of the gallery."""
    others = list(range(4, 30))

    def ranking(i, hit):
        rest = others + [j for j in range(4) if j != i]
        return ranked_query([i] + rest if hit else rest + [i], 30)

    hits = [True, False, True, True]
    eval_set = argparse.Namespace(queries=[{"query_image": [f"photo{i}"]} for i in range(4)], gallery=[
        f"g{i}" for i in range(30)], ground_truth=[[0], [1], [2], [3]])
    queries = torch.from_numpy(np.stack([ranking(i, hit) for i, hit in enumerate(hits)]))
    photos = torch.from_numpy(np.stack([ranking(i, not hit) for i, hit in enumerate(hits)]))

    class Encoder:
        def encode_queries(self, records, batch_size, progress):
            return queries

        def encode_targets(self, paths, batch_size, progress):
            return photos if paths[0].startswith("photo") else torch.eye(30)

    monkeypatch.setattr(asfr_probe, "build_eval_set", lambda root, key, split: eval_set)
    monkeypatch.setattr(asfr_probe, "load_records", lambda root, key, split: [
        {"attribute": a} for a in ("colour", "category", "colour", "colour")])
    asfr_probe.probe(Encoder(), "root", "9_asfr_DARN", "test", 8)
    out = capsys.readouterr().out.splitlines()
    assert out[1].endswith("gallery-gallery 0.00")
    assert [line.split() for line in out[3:]] == [["all", "4", "75.0", "25.0", "33.3"],
                                                  ["category", "1", "0.0", "100.0", "33.3"],
                                                  ["colour", "3", "100.0", "0.0", "33.3"]]


def test_asfr_probe_runs_the_two_asfr_sets_of_the_checkpoint(monkeypatch):
    """main with the checkpoint and the probe replaced by recorders. Catches: other families probed, --root
    ignored (the checkpoint's data.root used instead)."""
    calls = []
    monkeypatch.setattr(asfr_probe, "load_checkpoint", lambda path: {"config": {}, "model": {}})
    monkeypatch.setattr(asfr_probe.Config, "from_dict", lambda d: argparse.Namespace(
        data=argparse.Namespace(root="data/ufire-mini")))
    monkeypatch.setattr(asfr_probe, "load_encoder", lambda cfg, state, device: "encoder")
    monkeypatch.setattr(asfr_probe, "probe", lambda *args: calls.append(args))
    for argv, root in ((["best.pt", "--split", "val"], "data/ufire-mini"), (["best.pt", "--root", "elsewhere"],
                                                                           "elsewhere")):
        calls.clear()
        monkeypatch.setattr(sys, "argv", ["asfr_probe.py", *argv])
        asfr_probe.main()
        split = "val" if "val" in argv else "test"
        assert calls == [("encoder", root, "9_asfr_DARN", split, 64), ("encoder", root, "9_asfr_FashionAI", split, 64)]
