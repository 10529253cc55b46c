"""prepare_data.py: readers, U-FIRE-mini, the validator, the released annotations and bad input (CPU, seconds)."""
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

import prepare_data as pd
from plumbing import DataError
import ufire_mini
from prepare_data import (SUB_DATASETS, UNSEEN_TASKS, build_eval_set, build_eval_sets, build_unseen_eval_set,
                          check_media, count_records, load_candidates, load_records, validate_tree)
from ufire_mini import COLOUR_PAIRS, VERBS, Mini, describe, generate, modification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANNOTATIONS = os.environ.get("UFIRE_ANNOTATIONS", os.path.join(REPO, "..", "shared", "ufire-annotations"))
needs_annotations = pytest.mark.skipif(
    not os.path.isdir(os.path.join(ANNOTATIONS, "gallery")),
    reason=f"released U-FIRE annotations not found at {ANNOTATIONS} (set UFIRE_ANNOTATIONS)")
GALLERY_SIZES = {   # docs/method.md#data, per gallery after deduplication
    "1_t2i_FashionGen": 51089, "1_t2i_Shoes": 1200, "2_sketch2i_ClothesV1": 220, "2_sketch2i_HAIFashion": 1200,
    "2_sketch2i_QMUL-Shoe-V2": 400, "3_inshop_DeepFashion": 10563, "4_street2shop_DeepFashion2": 9369,
    "5_compatibility_FashionVC": 7006, "5_compatibility_Polyvore": 7249, "6_video2img_MovingFashion": 2608,
    "7_cir_Fashion200K": 2790, "7_cir_FashionIQ-Dress": 5650, "7_cir_FashionIQ-Shirt": 8215,
    "7_cir_FashionIQ-Toptee": 7237, "7_cir_Shoes": 4910, "8_sketch&text_CSTBIR": 2632, "9_asfr_DARN": 8854,
    "9_asfr_FashionAI": 14400}


def tree_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def copy_tree(mini_root, tmp_path):
    return str(shutil.copytree(mini_root, tmp_path / "copy"))


# ---------------------------------------------------------------------------------------------------- U-FIRE-mini

def test_generation_is_byte_identical_per_seed(tmp_path):
    """Same seed -> the same files, also from two processes: Python salts its string hashes per process, so a set
    of strings may iterate in another order in each (a and b are generated under PYTHONHASHSEED 1 and 2).
    Catches: DARN's value indices taken in a set's order (`list({...})` for `sorted({...})`)."""
    generation = ("import sys; from ufire_mini import generate; "
                  "generate(sys.argv[1], seed=3, scale=0.03, image_size=32, progress=False)")
    for name, hash_seed in (("a", "1"), ("b", "2")):
        subprocess.run([sys.executable, "-c", generation, str(tmp_path / name)], cwd=REPO,
                       env=dict(os.environ, PYTHONHASHSEED=hash_seed), check=True)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    c = generate(str(tmp_path / "c"), seed=4, scale=0.03, image_size=32, progress=False)
    assert tree_files(a) == tree_files(b)
    for rel in tree_files(a):
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel
    triplets = "0_triplet_files/1_t2i_FashionGen_train_triplet_data.json"
    with open(os.path.join(a, triplets)) as fa, open(os.path.join(c, triplets)) as fc:
        assert fa.read() != fc.read()
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]   # no temporary folders left behind


def test_every_sub_dataset_and_unseen_task_has_valid_records(mini_root):
    """Catches: load_records dropping a record (count_records is len(load_records), so it is counted from the raw
    file here)."""
    for key, (family, dataset) in SUB_DATASETS.items():
        for split in ("train", "val", "test"):
            records = load_records(mini_root, key, split)    # schema-checked
            with open(pd.triplet_path(mini_root, key, split)) as f:
                raw = json.load(f)
            assert records and count_records(mini_root, key, split) == len(records) == len(raw)
            assert [r["id"] for r in records] == [r["id"] for r in raw]
            for rec in records:
                assert (rec["dataset"], rec["split"], rec["task"].split("-")[0]) == (dataset, split, family)
                assert rec["instruction_text"].split(" ")[0] in {v.split(" ")[0] for v in VERBS}
                assert family != "asfr" or (rec["attribute"] and rec["target_label"] and "negative_image" in rec)
                assert family != "video2img" or len(rec["query_video"]) == 1
    for task in UNSEEN_TASKS:
        with open(os.path.join(mini_root, "evaluation_only_tasks", task, "triplet_data.json")) as f:
            records = json.load(f)
        assert records and all("/" not in name for r in records for name in r["query_image"] + r["target_image"])


def test_instructions_use_four_templates_per_task(mini_root):
    for key in ("1_t2i_FashionGen", "3_inshop_DeepFashion", "9_asfr_FashionAI"):
        verbs = {next(v for v in VERBS if r["instruction_text"].startswith(v + " "))
                 for r in load_records(mini_root, key, "train")}
        assert verbs == set(VERBS), key


def test_every_referenced_file_exists_and_decodes(mini_root):
    report = validate_tree(mini_root, progress=False)
    for name, row in report["rows"].items():
        assert not (row["errors"] or row["missing"] or row["unreadable"]), (name, row)
        assert row["gallery"] > 0 and row["records"]["test"] > 0
    # The table's numbers, counted from the files by hand: records per split, distinct test gallery images, and over
    # the sub-datasets' test galleries their sum and the distinct images. Catches: the record count kept for the
    # test split alone (`row["records"]["test"] = len(records)`); the evaluation-only galleries added to the sum;
    # the two numbers swapped.
    galleries = []
    for key in SUB_DATASETS:
        with open(pd.candidate_path(mini_root, key, "test")) as f:
            listed = json.load(f)
        listed = set(next(v for k, v in listed.items() if k.endswith("_candidate")) if isinstance(listed, dict)
                     else listed)
        records = {}
        for split in pd.SPLITS:
            with open(pd.triplet_path(mini_root, key, split)) as f:
                records[split] = len(json.load(f))
        assert report["rows"][key]["records"] == records and report["rows"][key]["gallery"] == len(listed), key
        galleries.append(listed)
    assert report["test_gallery_images"] == [sum(map(len, galleries)), len(set.union(*galleries))]
    folder = os.path.join(mini_root, "MovingFashion_videos")
    videos = [os.path.join(folder, v) for v in sorted(os.listdir(folder))]
    for video in videos:
        with av.open(video) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
        assert len(frames) >= 8 and frames[0].size == (64, 64)
    from transformers.video_utils import load_video       # the model's decoding path (media.load_video, PyAV)
    frames, metadata = load_video(videos[0], backend="pyav", num_frames=8)
    assert frames.shape[0] == 8 and list(metadata.frames_indices) == list(range(8))


def test_eval_sets_follow_the_protocol(mini_root):
    for split in ("val", "test"):
        sets = build_eval_sets(mini_root, split)
        assert [s.name for s in sets] == list(SUB_DATASETS) + (UNSEEN_TASKS if split == "test" else [])
        for ev in sets:
            assert len(set(ev.gallery)) == len(ev.gallery) and all(os.path.isabs(p) for p in ev.gallery)
            assert len(ev.ground_truth) == len(ev.exclude) == len(ev.queries) > 0
            assert all(hits and all(0 <= i < len(ev.gallery) for i in hits) for hits in ev.ground_truth)
            assert ev.missing == 0
            assert all(q.keys() == {"id", "instruction_text", "query_image", "query_video"} for q in ev.queries)
            assert ev.family == "unseen" or not any(ev.exclude)
            if ev.family not in ("asfr", "unseen"):   # ground truth = the listed targets, all in the gallery
                records = load_records(mini_root, ev.name, split)
                for rec, hits in zip(records, ev.ground_truth):
                    assert {ev.gallery[i] for i in hits} == set(rec["target_image"])
    # The DeepFashion candidate file lists some images twice, as the release does; the gallery holds them once.
    with open(os.path.join(mini_root, "0_test_candidates", "3_inshop_DeepFashion_test_candidates.json")) as f:
        listed = json.load(f)
    assert len(build_eval_set(mini_root, "3_inshop_DeepFashion", "test").gallery) == len(set(listed)) < len(listed)
    # The training split is no evaluation split. Catches: build_eval_set's split check removed (a gallery of the
    # training targets, evaluated without a word).
    with pytest.raises(ValueError, match="evaluation split must be 'val' or 'test', got 'train'"):
        build_eval_set(mini_root, "7_cir_Shoes", "train")


def test_eval_queries_carry_their_records_text_images_and_video(mini_root):
    """Each evaluation query is its record as the triplet file lists it (read here with json, paths joined to the
    root by hand): id, instruction, query images and query video, in file order, for every sub-dataset and split.
    Catches: build_eval_set dropping a field (`"query_video": []`: MovingFashion's queries evaluated as text alone,
    a wrong number and no error)."""
    for key in SUB_DATASETS:
        for split in ("val", "test"):
            with open(os.path.join(mini_root, "0_triplet_files", f"{key}_{split}_triplet_data.json")) as f:
                records = json.load(f)
            expected = [{"id": r["id"], "instruction_text": r["instruction_text"],
                         "query_image": [os.path.join(mini_root, p) for p in r.get("query_image", [])],
                         "query_video": [os.path.join(mini_root, p) for p in r.get("query_video", [])]}
                        for r in records]
            assert build_eval_set(mini_root, key, split).queries == expected, (key, split)
    assert any(q["query_video"] for q in build_eval_set(mini_root, "6_video2img_MovingFashion", "test").queries)


def test_asfr_ground_truth_is_every_image_with_the_label(mini_root):
    for key in ("9_asfr_DARN", "9_asfr_FashionAI"):
        for split in ("val", "test"):
            ev = build_eval_set(mini_root, key, split)
            gallery, labels = load_candidates(pd.candidate_path(mini_root, key, split), mini_root)
            assert gallery == ev.gallery and labels.keys() == set(gallery)   # labels partition the pool
            for rec, hits in zip(load_records(mini_root, key, split), ev.ground_truth):
                assert sorted(hits) == [i for i, p in enumerate(gallery) if labels[p] == rec["target_label"]]
                assert all(labels[p] == rec["target_label"] for p in rec["target_image"])
                attribute = rec["target_label"].rsplit("+", 1)[0]      # same attribute, another value
                assert all(labels[p] != rec["target_label"] and labels[p].rsplit("+", 1)[0] == attribute
                           for p in rec["negative_image"])


def test_asfr_records_list_at_most_10_positives_and_50_negatives(tmp_path):
    """An asfr record lists up to 10 of its label's images as targets and up to 50 images of the same attribute
    with another value as negatives (DARN's and FashionAI's files do): with a pool of 300 images for 100 queries,
    labels of more than 10 images occur, and every record lists min(10, that label's images) distinct positives
    of its label and min(50, the attribute's other images) distinct negatives, none of its label.
    Fails when more than 10 positives are listed (`min(11, ...)`), which the small test set's labels never reach."""
    g = Mini(str(tmp_path), 0, 32)
    records, labels = ufire_mini.build_asfr(g, "9_asfr_DARN", "test", 100)
    of = {p: label for label, paths in labels.items() for p in paths}
    assert max(len(paths) for paths in labels.values()) > 10 and len(records) == 100
    for r in records:
        attribute = r["target_label"].split("+")[1]
        same_attribute = [p for p, label in of.items() if label.split("+")[1] == attribute]
        assert len(set(r["target_image"])) == len(r["target_image"]) == min(10, len(labels[r["target_label"]]))
        assert {of[p] for p in r["target_image"]} == {r["target_label"]}
        others = len(same_attribute) - len(labels[r["target_label"]])
        assert len(set(r["negative_image"])) == len(r["negative_image"]) == min(50, others)
        assert r["target_label"] not in {of[p] for p in r["negative_image"]}


def test_unseen_names_resolve_to_the_task_images_first_then_the_source(mini_root):
    street = build_unseen_eval_set(mini_root, UNSEEN_TASKS[0])
    images = os.path.join(mini_root, "evaluation_only_tasks", UNSEEN_TASKS[0], "images")
    assert all(os.path.dirname(p) == images for p in street.gallery)
    compatible = build_unseen_eval_set(mini_root, UNSEEN_TASKS[1])
    polyvore = set(build_eval_set(mini_root, "5_compatibility_Polyvore", "test").gallery)
    assert set(compatible.gallery) <= polyvore       # all from the Polyvore test gallery, as in the release
    for ev in (street, compatible):
        for query, exclude, hits in zip(ev.queries, ev.exclude, ev.ground_truth):
            assert [ev.gallery[i] for i in exclude] == query["query_image"]   # its own images leave its ranking
            assert not set(exclude) & set(hits)


def test_no_query_contains_its_own_target(mini_root):
    """A query that holds its target image is solved by copy detection (a try-on view once shared the shop
    shot's file name, so in-shop queries contained their answer)."""
    for key in SUB_DATASETS:
        for split in pd.SPLITS:
            for rec in pd.load_records(mini_root, key, split):
                assert not set(rec.get("query_image", [])) & set(rec["target_image"]), (key, rec["id"])


def draw(train_set, index):
    """A training view of record `index`, its random choices seeded by the index."""
    return train_set.example(index, random.Random(index))


def test_train_set_draws_one_target_and_at_most_max_sketches(mini_root):
    # Both sketch sets of the paper (section III) subsample. Catches: QMUL-Shoe-V2 dropped from SKETCH_SETS (its
    # queries would keep every sketch).
    for key in ("2_sketch2i_QMUL-Shoe-V2", "2_sketch2i_ClothesV1"):
        sketches = pd.TrainSet(mini_root, key, max_query_images=2)
        assert any(len(r["query_image"]) > 2 for r in sketches.records)
        for i, rec in enumerate(sketches.records):
            ex = sketches.example(i, random.Random(7))
            assert len(ex["query_image"]) == min(2, len(rec["query_image"]))
            assert set(ex["query_image"]) <= set(rec["query_image"])
            assert ex["target_image"] in rec["target_image"] and draw(sketches, i) == draw(sketches, i)
    # The kept sketches are drawn, not the first ones: over 20 draws of a record of more than 2 sketches, more than
    # one pair is kept and every sketch is kept some time. Catches: `rng.sample(query_image, k)` ->
    # `query_image[:k]` (the other sketches never seen in training).
    i = next(i for i, r in enumerate(sketches.records) if len(r["query_image"]) > 2)
    drawn = [sketches.example(i, random.Random(s))["query_image"] for s in range(20)]
    assert len({tuple(sorted(d)) for d in drawn}) > 1
    assert set(sketches.records[i]["query_image"]) == {p for d in drawn for p in d}
    multi_target = pd.TrainSet(mini_root, "1_t2i_FashionGen")
    i = next(i for i, r in enumerate(multi_target.records) if len(r["target_image"]) > 1)
    assert len({multi_target.example(i, random.Random(s))["target_image"] for s in range(20)}) > 1
    polyvore = pd.TrainSet(mini_root, "5_compatibility_Polyvore", max_query_images=1)   # outfits are not subsampled
    assert ([draw(polyvore, i)["query_image"] for i in range(len(polyvore))]
            == [r["query_image"] for r in polyvore.records])
    asfr = pd.TrainSet(mini_root, "9_asfr_DARN")
    examples = [draw(asfr, i) for i in range(len(asfr))]
    assert all(ex["target_label"] for ex in examples) and any(ex["negative_image"] for ex in examples)
    # hard negatives carry their pool label where some record lists them as a positive; never the query's own
    labelled = [(lab, ex["target_label"]) for ex in examples for lab in ex["negative_label"]]
    assert len(labelled) == sum(len(ex["negative_image"]) for ex in examples)
    assert sum(lab is not None for lab, _ in labelled) > len(labelled) // 2 and all(lab != own for lab, own in labelled)
    assert draw(pd.TrainSet(mini_root, "6_video2img_MovingFashion"), 0)["query_video"][0].endswith(".mp4")


def test_pools_hold_hard_distractors(tmp_path):
    g = Mini(str(tmp_path), 0, 32)
    pool = g.pool("test", 60, ufire_mini.CLOTHES)
    assert len(set(pool)) == 60 and all(g.split_of[it] == "test" for it in pool)
    differ_once = lambda a, b: a.category == b.category and sum(x != y for x, y in zip(a.attrs(), b.attrs())) == 1
    assert sum(any(differ_once(a, b) for b in pool) for a in pool) >= 40


def test_outfits_follow_the_hidden_compatibility_rule(tmp_path):
    g = Mini(str(tmp_path), 0, 32)
    records, images = ufire_mini.build_compatibility(g, "5_compatibility_Polyvore", "test", 40)
    assert len(records) == 40 and len(set(images)) == len(images)
    for items, _, _ in g.polyvore_test:
        assert any({it.colour for it in items} <= set(pair) for pair in COLOUR_PAIRS)
        assert sum(it.pattern != "plain" for it in items) <= 1
        lower = {it.category for it in items} & {"dress", "skirt", "trousers"}
        shoes = next(it.style for it in items if it.category == "shoes")
        assert shoes in (("heel", "sandal") if lower & {"dress", "skirt"} else ("sneaker", "boot"))


def test_polyvore_outfits_are_built_on_a_dress_or_on_a_top_and_a_bottom(tmp_path):
    """Polyvore outfits follow U-FIRE's mix: a dress (with shoes, maybe a coat) or a top and a bottom (with shoes,
    maybe a coat), the dress in about 4 of 10: over 80 test outfits both kinds occur, and each record asks for one
    of its outfit's pieces by the piece's name. Fails when every outfit is a top and a bottom (no dress)."""
    g = Mini(str(tmp_path), 0, 32)
    records, _ = ufire_mini.build_compatibility(g, "5_compatibility_Polyvore", "test", 240)
    kinds = set()
    for items, _, names in g.polyvore_test:
        pieces = sorted(it.category for it in items if it.category not in ("shoes", "coat"))
        kinds.add("dress" if pieces == ["dress"] else "top+bottom")
        assert pieces == ["dress"] or (len(pieces) == 2 and set(pieces) & set(ufire_mini.TOPS)
                                       and set(pieces) & set(ufire_mini.BOTTOMS)), pieces
    assert len(g.polyvore_test) >= 60 and kinds == {"dress", "top+bottom"}
    assert {r["task"] for r in records} >= {"compatibility-dress", "compatibility-top", "compatibility-shoes"}


def test_a_figure_wears_its_garments_in_layer_order_whatever_the_list_order(tmp_path):
    """person() draws garments in LAYERS order (trousers, skirt, t-shirt, shirt, dress, coat): the same outfit
    listed in any order is the same picture, the coat over the t-shirt over the trousers.
    Fails when the garments are drawn in list order (a t-shirt listed last would cover the coat)."""
    g = Mini(str(tmp_path), 0, 32)
    outfit = [g.by_cat["train", c][0] for c in ("coat", "t-shirt", "trousers")]
    pictures = [np.asarray(ufire_mini.person(order, 64, (200, 150, 120)))
                for order in (outfit, outfit[::-1], outfit[1:] + outfit[:1])]
    assert all(np.array_equal(pictures[0], p) for p in pictures[1:])


def test_texts_name_the_attributes(tmp_path):
    g, rng = Mini(str(tmp_path), 0, 32), random.Random(0)
    for category in ufire_mini.CATEGORIES:
        for item in g.by_cat["train", category][:20]:
            text = describe(item, rng)
            nouns = ufire_mini.NOUNS[item.style if category == "shoes" else category]
            assert item.colour in text and any(n in text for n in nouns), text
            for attr, value in item.attrs()[1:]:
                assert (attr == "style" and category == "shoes") or any(
                    w in text for w in ufire_mini.words(attr, value)), text
            changed = g.change(item, ["colour", "pattern"])
            caption = modification(item, changed, rng)
            assert changed.colour in caption and any(w in caption for w in ufire_mini.words("pattern", changed.pattern))


def test_cir_texts_say_how_the_target_differs_from_the_reference(tmp_path):
    """Each modification text names, for every attribute where the target differs from the reference, the target's
    value (and, where it names one, the reference's as the old value); Fashion200K's says "replace old with new".
    Reference and target are read back from the files' item ids. Catches: the text describing the reference
    against the target (ground truth contradicting the instruction), old and new swapped."""
    g = Mini(str(tmp_path), 0, 32)
    item_of = {it.uid: it for it in g.by_key.values()}
    uid = lambda path: item_of[os.path.basename(path).split("+")[1]]
    for key in ("7_cir_FashionIQ-Dress", "7_cir_Shoes", "7_cir_Fashion200K"):
        pool = g.pool("test", 20, ufire_mini.ITEM_CATEGORIES.get(key, ufire_mini.CLOTHES))
        for item in pool:
            query = ufire_mini.cir_query(g, key, "f", "test", item, pool)
            ref, target = uid(query["query_image"][0]), uid(query["targets"][0])
            changed = [(a, old, new) for (a, old), (_, new) in zip(ref.attrs(), target.attrs()) if old != new]
            assert target == item and 1 <= len(changed) <= 2
            forms = set()
            for attr, old, new in changed:
                (adj, phrase), was = ufire_mini.words(attr, new), ufire_mini.words(attr, old)[0]
                forms |= {f"is {adj}", f"has {phrase}", f"is {adj} instead of {was}", f"{adj} rather than {was}",
                          f"replace {was} with {adj}"}
            parts = query["query_text"].split(" and ")
            assert len(parts) == len(changed) and set(parts) <= forms, (key, query["query_text"], changed)


def test_fashioniq_and_shoes_cir_queries_change_one_or_two_attributes(tmp_path):
    """FashionIQ- and Shoes-style references differ from their target in one attribute or in two (a relative
    caption of two clauses), Fashion200K's in one (colour or pattern): over 40 queries of each kind, both one- and
    two-attribute changes occur for FashionIQ-Dress and Shoes (each query changes two with probability 0.4, so
    all-one has probability 0.6^40 ~ 1e-9), and Fashion200K only ever changes one. Reference and target are read
    back from the files' item ids. Fails when every FashionIQ / Shoes query changes a single attribute."""
    g = Mini(str(tmp_path), 0, 32)
    item_of = {it.uid: it for it in g.by_key.values()}
    uid = lambda path: item_of[os.path.basename(path).split("+")[1]]
    for key, expected in (("7_cir_FashionIQ-Dress", {1, 2}), ("7_cir_Shoes", {1, 2}), ("7_cir_Fashion200K", {1})):
        pool = g.pool("test", 40, ufire_mini.ITEM_CATEGORIES.get(key, ufire_mini.CLOTHES))
        counts = set()
        for item in pool:
            query = ufire_mini.cir_query(g, key, "f", "test", item, pool)
            ref = uid(query["query_image"][0])
            counts.add(sum(old != new for (_, old), (_, new) in zip(ref.attrs(), item.attrs())))
        assert counts == expected, key


def test_unseen_street_queries_change_only_the_colour_named(tmp_path):
    """Evaluation-only task 1: the street photo shows the reference, the answer is the target's shop shot, and the
    text says "from <reference colour> to <target colour>" with the two items differing in colour only.
    Catches: the colours swapped in the text; the reference not changed (the query shows its answer)."""
    g, shown = Mini(str(tmp_path), 0, 32), {}

    def drawn(stem, item):
        shown[stem] = item
        return stem
    g.worn = lambda folder, split, items, view, stem: drawn(stem, items[0])
    g.shop = lambda folder, split, item, stem: drawn(stem, item)
    records, _ = ufire_mini.build_unseen(g, UNSEEN_TASKS[0], 30)
    for rec in records:
        ref, target = shown[rec["query_image"][0]], shown[rec["target_image"][0]]
        assert [a for (a, old), (_, new) in zip(ref.attrs(), target.attrs()) if old != new] == ["colour"]
        assert rec["query_text"].endswith(f" from {ref.colour} to {target.colour}")


def test_images_depend_on_the_seed_and_items_split_60_20_20_in_every_category(tmp_path):
    """The same photo drawn under seeds 0, 0 and 1: the same bytes, then others. The catalogue: 60 / 20 / 20 % of
    the items in train / val / test, and every category in every split. Catches: an image RNG not seeded by the
    seed; the split boundaries moved; the catalogue split before it is shuffled (whole categories in one split)."""
    minis = [Mini(str(tmp_path / f"{n}"), seed, 32) for n, seed in enumerate((0, 0, 1))]
    item = minis[0].by_cat["train", "dress"][0]
    photos = []
    for g in minis:
        with open(os.path.join(g.out, g.worn("f", "train", [item], "street")), "rb") as f:
            photos.append(f.read())
    assert photos[0] == photos[1] != photos[2]
    split_of = minis[0].split_of
    for split, share in zip(pd.SPLITS, (0.6, 0.2, 0.2)):
        assert sum(s == split for s in split_of.values()) / len(split_of) == pytest.approx(share, abs=1e-3)
        assert all(minis[0].by_cat[split, c] for c in ufire_mini.CATEGORIES)


def test_the_catalogue_splits_into_exactly_1800_600_600_items(tmp_path):
    """The catalogue, by hand: 10 colours x 4 patterns x (t-shirt 3 x 3 + shirt 3 x 3 + dress 3 x 3 x 3 + coat 3 x 3 +
    trousers 3 + skirt 3 x 2 + shoes 4 x 3 = 75 combinations) = 3,000 items, split exactly 60 / 20 / 20: 1,800 train,
    600 val, 600 test. Fails when a split boundary moves by one item (`k > 0.8 * len(items)`: 601 val, 599 test),
    which the share test's tolerance of 3 items lets through."""
    split_of = Mini(str(tmp_path), 0, 32).split_of
    assert len(split_of) == 3000
    assert [sum(s == split for s in split_of.values()) for split in pd.SPLITS] == [1800, 600, 600]


def test_item_test_galleries_add_a_third_of_distractors_beyond_the_targets(mini_root):
    """build_items draws n + n // 3 pool items for n queries: the last n // 3 are gallery images no query asks for
    (U-FIRE's galleries are larger than their query sets). At scale 0.1 each item sub-dataset's test gallery holds
    exactly n // 3 images that are no record's target, n = max(2, round(0.1 x its test size)), by hand from SIZES
    (Fashion200K: at least one, as a distractor may match a target's colour and pattern).
    The compatibility sets' galleries hold at least n + n // 3 outfit images.
    Fails when the pool holds only the query items (`g.pool(split, n, ...)`: a gallery of targets alone), or when
    build_compatibility stops at n records whatever its gallery's size."""
    item_keys = [k for k, (family, _) in SUB_DATASETS.items() if family not in ("compatibility", "asfr")]
    assert len(item_keys) == 14
    for key in item_keys:
        n = max(2, round(ufire_mini.SIZES[key][2] * 0.1))
        with open(pd.triplet_path(mini_root, key, "test")) as f:
            targets = {p for record in json.load(f) for p in record["target_image"]}
        with open(pd.candidate_path(mini_root, key, "test")) as f:
            gallery = set(json.load(f))
        # Fashion200K's targets are every pool item of the target's category, colour and pattern: a distractor
        # can be one of them.
        distractors = len(gallery - targets)
        assert targets <= gallery and (1 <= distractors <= n // 3 if key == "7_cir_Fashion200K" else
                                       distractors == n // 3), key
    # The compatibility sets' test galleries: every outfit image, at least n + n // 3 of them.
    for key in ("5_compatibility_FashionVC", "5_compatibility_Polyvore"):
        n = max(2, round(ufire_mini.SIZES[key][2] * 0.1))
        with open(pd.candidate_path(mini_root, key, "test")) as f:
            assert len(set(json.load(f))) >= n + n // 3, key


def test_each_split_has_its_scaled_number_of_queries(mini_root):
    """U-FIRE-mini at scale 0.1: each split of each sub-dataset has round(SIZES x 0.1) records (at least 2).
    Catches: one split's size used for all three."""
    for key, sizes in ufire_mini.SIZES.items():
        assert [count_records(mini_root, key, split) for split in pd.SPLITS] == [max(2, round(n * 0.1)) for n in sizes]


# What each file of U-FIRE-mini shows, recorded while it is drawn: the tests below check the annotations against
# the pictures (the items handed to the drawing functions), not against the record-building code.

@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """U-FIRE-mini (scale 0.1, 32 pixels) generated with the drawing functions spied on. Returns (root, the Mini,
    shows: {path relative to the root: (kind, items)}): kind "shop", "worn", "sketch" or "video", items the catalogue
    items drawn in the file (the outfit a photo's figure or a video's is drawn wearing, the wearer's garment first)."""
    shows, saving, minis = {}, [], []
    save = ufire_mini.Mini.save

    def spied_save(g, rel, render):
        minis[:] = [g]
        saving.append(rel)
        try:
            return save(g, rel, render)
        finally:
            saving.pop()

    def spy(kind, draw, items):
        return lambda *args, **kwargs: shows.setdefault(saving[-1], (kind, items(args))) and draw(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ufire_mini.Mini, "save", spied_save)
        mp.setattr(ufire_mini, "shop_image", spy("shop", ufire_mini.shop_image, lambda a: [a[0]]))
        mp.setattr(ufire_mini, "person", spy("worn", ufire_mini.person, lambda a: list(a[0])))   # the figure drawn
        mp.setattr(ufire_mini, "sketch_image", spy("sketch", ufire_mini.sketch_image, lambda a: [a[0]]))
        mp.setattr(ufire_mini, "write_video", spy("video", ufire_mini.write_video, lambda a: list(a[1])))
        root = generate(str(tmp_path_factory.mktemp("drawn") / "ufire-mini"), seed=0, scale=0.1, image_size=32,
                        progress=False)
    return root, minis[0], shows


def media_of(record):
    return [p for field in pd.MEDIA_FIELDS for p in record.get(field, [])]


def test_every_picture_shows_items_of_its_records_split(drawn):
    """Items, not images, are split 60/20/20: every picture a train, val or test record names, and every test
    gallery image, shows only catalogue items of that split (a figure's whole outfit), outside the compatibility
    sets, whose outfits draw on the whole catalogue; the evaluation-only street task's targets are test items; and
    no file is named by two splits. The items are those the drawing functions were handed, not read from file names.
    Not checked: CIR references and the street task's reference photos, which Mini.change draws from the whole
    catalogue. Catches: a street photo's companion picked from the whole catalogue (`self.pick("any", ...)`); the
    asfr pool or the unseen street task's targets drawn from the training items; compatibility outfits numbered from
    1 in every split (a test outfit's files are a training outfit's)."""
    root, g, shows = drawn
    split_of = {}
    for key, (family, _) in SUB_DATASETS.items():
        for split in pd.SPLITS:
            with open(pd.triplet_path(root, key, split)) as f:
                records = json.load(f)
            paths = [p for r in records for p in media_of(r) if not (family == "cir" and p in r["query_image"])]
            if split == "test" or family == "asfr" and split == "val":    # the galleries written
                with open(pd.candidate_path(root, key, split)) as f:
                    listed = json.load(f)
                paths += [p for v in listed.values() for p in v] if isinstance(listed, dict) else listed
            for p in paths:
                assert split_of.setdefault(p, split) == split, (key, p)
                assert family == "compatibility" or {g.split_of[it] for it in shows[p][1]} == {split}, (key, p)
    street = os.path.join("evaluation_only_tasks", UNSEEN_TASKS[0])
    with open(os.path.join(root, street, "triplet_data.json")) as f:
        targets = [f"{street}/images/{r['target_image'][0]}" for r in json.load(f)]
    assert targets and all([g.split_of[it] for it in shows[p][1]] == ["test"] for p in targets)


def test_each_query_asks_for_what_its_targets_show(drawn):
    """What each record asks for is what its targets show, read from the items the pictures were drawn from:
    - t2i: the targets are shop shots of one item (one view, but for FashionGen), whose colour and a noun of whose
      kind the text names;
    - sketch2i: every sketch is of the target's item; video2img: the video's wearer wears the target's item;
    - in-shop: queries and targets show the one item; inshop-plain asks for shop shots with photos of it worn,
      inshop-tryon for photos of it worn with a shop shot; some record shows it worn in 3 views;
    - street2shop: every photo's wearer wears the target's item and the rest of an outfit (a top gets a bottom, a
      bottom or a coat a top, a dress nothing); the targets are distinct shop shots of it; the task is
      multi-query exactly when there are several photos;
    - CIR: FashionIQ's instructions name the sub-dataset's kind (dress, shirt, toptee); Fashion200K's targets share
      the first one's category, colour and pattern ("replace red with blue");
    - sketch&text: the sketch is of the photo wearer's garment and the text names the outfit's colours in order;
    - compatibility: the target is the piece the task names, and FashionVC asks for tops and for bottoms;
    - asfr: the query's item and every target's item have the same value of the attribute asked for, every
      negative's item another, and all are of kinds the attribute applies to;
    - the evaluation-only compatible-item task: the text names the target piece's colour and a noun of its kind.
    Catches: in-shop records of one worn view each; Shoes' t2i queries given FashionGen's extra views; the t2i text,
    a sketch2i sketch or a sketch&text sketch drawn from another item than the target; the video showing only the
    companion; inshop-plain and inshop-tryon swapped; a second street2shop target that is the first again;
    FashionIQ's kind cut one letter early ("-dress images"); street2shop-multi-query for one photo; a dress given a
    companion, or a top a top; Fashion200K's extra targets matching colour only; the sketch&text text giving the
    sketched garment's colour for every piece; the photo without the rest of the outfit (or any photo's figure drawn
    in its first garment only); FashionVC's top and bottom names swapped, or only tops asked for; an asfr label
    dropping its attribute (`DARN+0+...`: one label for a category and a colour of the same index), or naming its
    item field (FashionAI's coat length "knee" and skirt length "knee" one label); an asfr query showing another
    item; the compatible-item text describing another piece of the outfit."""
    root, g, shows = drawn
    nouns = lambda item: ufire_mini.NOUNS[item.style if item.category == "shoes" else item.category]
    names = {"FashionVC": {"t-shirt": "top", "shirt": "top", "trousers": "bottom", "skirt": "bottom"},
             "Polyvore": {"t-shirt": "top", "shirt": "top", "trousers": "pants", "skirt": "skirt", "dress": "dress",
                          "coat": "outwear", "shoes": "shoes"}}
    worn_views = []    # in-shop: photos of the item worn per record
    for key, (family, dataset) in SUB_DATASETS.items():
        fields = {name: (field, cats) for name, field, cats in ufire_mini.ASFR_ATTRIBUTES.get(key, ())}
        tasks = set()
        for split in pd.SPLITS:
            with open(pd.triplet_path(root, key, split)) as f:
                records = json.load(f)
            for r in records:
                tasks.add(r["task"])
                kinds = {p: shows[p][0] for p in media_of(r)}
                items = {p: shows[p][1] for p in media_of(r)}
                target = items[r["target_image"][0]][0]
                query = [items[p] for p in r.get("query_image", []) + r.get("query_video", [])]
                where = (key, r["id"])
                if family in ("t2i", "sketch2i", "video2img", "street2shop", "inshop"):
                    assert all(items[p][0] == target for p in r["target_image"]), where
                    assert all(outfit[0] == target for outfit in query), where
                if family == "t2i":
                    assert {kinds[p] for p in r["target_image"]} == {"shop"}, where
                    assert dataset == "FashionGen" or len(r["target_image"]) == 1, where   # one view of a shoe
                    assert target.colour in r["query_text"] and any(n in r["query_text"] for n in nouns(target))
                elif family == "inshop":
                    shown = {kinds[p] for p in r["query_image"]}, {kinds[p] for p in r["target_image"]}
                    assert shown == {"inshop-plain": ({"worn"}, {"shop"}), "inshop-tryon": ({"shop"}, {"worn"})}.get(
                        r["task"], ({"worn"}, shown[1])), where
                    worn_views.append(sum(kinds[p] == "worn" for p in media_of(r)))
                elif family == "street2shop":
                    assert len(set(r["target_image"])) == len(r["target_image"]), where
                    assert {kinds[p] for p in r["target_image"]} == {"shop"}, where
                    assert r["task"] == f"street2shop-{'multi' if len(query) > 1 else 'one'}-query", where
                    rest = [] if target.category == "dress" else [ufire_mini.BOTTOMS] if target.category in (
                        ufire_mini.TOPS) else [ufire_mini.TOPS]
                    for outfit in query:
                        assert len(outfit) == 1 + len(rest) and all(
                            it.category in c for it, c in zip(outfit[1:], rest)), where
                elif family == "cir" and dataset.startswith("FashionIQ-"):
                    kind = {"FashionIQ-Dress": "dress", "FashionIQ-Shirt": "shirt", "FashionIQ-Toptee": "toptee"}
                    assert f" {kind[dataset]} images matching" in r["instruction_text"], where
                elif dataset == "Fashion200K":
                    assert all((it.category, it.colour, it.pattern) == (target.category, target.colour,
                                                                         target.pattern)
                               for p in r["target_image"] for it in items[p]), where
                elif family == "sketch&text":
                    outfit, text = items[r["target_image"][0]], r["query_text"]
                    assert query == [[outfit[0]]] and kinds[r["query_image"][0]] == "sketch", where
                    assert f"{outfit[0].colour} provided sketch" in text and text.count(" and ") == len(outfit) - 1
                    assert all(f" and {it.colour} " in text for it in outfit[1:]), where
                elif family == "compatibility":
                    assert r["task"] == f"compatibility-{names[dataset][target.category]}", where
                elif family == "asfr":
                    field, cats = fields[r["attribute"]]
                    value = getattr(query[0][0], field)
                    assert all(getattr(items[p][0], field) == value for p in r["target_image"]), where
                    assert all(getattr(items[p][0], field) != value for p in r["negative_image"]), where
                    assert all(items[p][0].category in cats for p in media_of(r)), where
        assert dataset != "FashionVC" or tasks == {"compatibility-top", "compatibility-bottom"}
    assert max(worn_views) == 3     # 1 to 3 views of the item worn
    with open(os.path.join(root, "evaluation_only_tasks", UNSEEN_TASKS[1], "triplet_data.json")) as f:
        records = json.load(f)
    for r in records:
        target = shows[f"Polyvore_images/{r['target_image'][0]}"][1][0]
        assert target.colour in r["query_text"] and any(n in r["query_text"] for n in nouns(target)), r["id"]
        assert r["category"] == names["Polyvore"][target.category], r["id"]


def test_a_shop_shot_shows_every_attribute_of_its_item(tmp_path):
    """Every attribute the annotations give is drawn: for every kind of garment and every attribute, the front shop
    shots of items differing only in that attribute's value are different pictures (for each pair of values), and a
    plain item's shot has its colour's RGB value (the colour the texts and labels name) on a twentieth of its pixels
    or more; a sketch hints at each pattern differently (same hand, same wobble); a garment with a neckline looks
    otherwise from the back. Catches: a pattern not drawn (`pattern_tile(item.colour, "plain", ...)`); the shoes'
    sole drawn in the body's colour, not the trim's; two lengths drawn alike (cropped trousers as full ones);
    straight and flared skirts alike; two colours of one RGB value; the sketch's pattern patch drawn for plain items
    only; a back view drawn as the front."""
    g = Mini(str(tmp_path), 0, 32)
    shot = lambda item: np.asarray(ufire_mini.shop_image(item, "front", 64, random.Random(0)))
    for category in ufire_mini.CATEGORIES:
        base = g.by_cat["any", category][0]
        for attr, _ in base.attrs():
            values = ufire_mini.choices(category, attr)
            pictures = [shot(g.by_key[dataclasses.replace(base, **{attr: v}).key()]).tobytes() for v in values]
            assert len(set(pictures)) == len(values), (category, attr)
        sketches = [ufire_mini.sketch_image(g.by_key[dataclasses.replace(base, pattern=v).key()], 0, 64,
                                            random.Random(0)).tobytes() for v in ufire_mini.PATTERNS]
        assert len(set(sketches)) == len(ufire_mini.PATTERNS), category
        if base.neckline:
            back = ufire_mini.shop_image(base, "back", 64, random.Random(0))
            assert not np.array_equal(np.asarray(back), shot(base)), category
        for colour, rgb in ufire_mini.COLOURS.items():
            picture = shot(g.by_key[dataclasses.replace(base, colour=colour, pattern="plain").key()])
            assert (picture == rgb).all(-1).mean() > 0.05, (category, colour)

# ---------------------------------------------------------------------------------- the released annotations

@needs_annotations
def test_released_test_galleries_have_the_published_sizes():
    gallery_dir, distinct, total = os.path.join(ANNOTATIONS, "gallery"), set(), 0
    for key, size in GALLERY_SIZES.items():
        gallery, _ = load_candidates(pd.candidate_path(ANNOTATIONS, key, "test", gallery_dir), ANNOTATIONS)
        assert len(gallery) == size, key
        total += len(gallery)
        distinct.update(gallery)
    assert (total, len(distinct)) == (145592, 144762)


@needs_annotations
def test_released_asfr_labels_partition_their_pool():
    for key in ("9_asfr_DARN", "9_asfr_FashionAI"):
        path = pd.candidate_path(ANNOTATIONS, key, "test", os.path.join(ANNOTATIONS, "gallery"))
        gallery, labels = load_candidates(path, ANNOTATIONS)
        with open(path) as f:
            raw = json.load(f)
        assert labels.keys() == set(gallery)
        assert sum(len(v) for k, v in raw.items() if not k.endswith("_candidate")) == len(gallery)


@needs_annotations
def test_released_unseen_tasks_resolve_to_their_source_images():
    """Compatible Item names are Polyvore test-gallery files (2,302 of 2,302); Street+Modification names
    "<category>+<id>.jpg" are DeepFashion2 train-split images, which U-FIRE names
    DeepFashion2_images/train+image+<id>.jpg (its DeepFashion2 test gallery holds 25 of them under exactly that name).
    Catches: Polyvore names resolved under DeepFashion2_images/; Street names kept as they stand ({name} for {id});
    data.street2shop_images ignored."""
    gallery_dir = os.path.join(ANNOTATIONS, "gallery")
    test_gallery = lambda key: set(load_candidates(pd.candidate_path(ANNOTATIONS, key, "test", gallery_dir),
                                                   ANNOTATIONS)[0])
    street, compatible = (build_unseen_eval_set(ANNOTATIONS, task) for task in UNSEEN_TASKS)
    assert len(compatible.gallery) == 2302 and set(compatible.gallery) <= test_gallery("5_compatibility_Polyvore")
    with open(os.path.join(ANNOTATIONS, "evaluation_only_tasks", UNSEEN_TASKS[0], "candidate_images.json")) as f:
        names = json.load(f)
    ids = [name.split("+")[1] for name in names]
    expected = {os.path.join(os.path.abspath(ANNOTATIONS), "DeepFashion2_images", f"train+image+{i}") for i in ids}
    assert len(names) == 1765 and len(expected) == 1755     # 10 images are named under two categories
    assert set(street.gallery) == expected and len(expected & test_gallery("4_street2shop_DeepFashion2")) == 25
    raw = build_unseen_eval_set(ANNOTATIONS, UNSEEN_TASKS[0], street2shop_images="/data/DeepFashion2/train/image/{id}")
    assert raw.gallery[0] == f"/data/DeepFashion2/train/image/{ids[0]}"
    for ev in (street, compatible):
        assert len(ev.queries) == 1000 and ev.missing == 0
        assert all(len(hits) == 1 for hits in ev.ground_truth) and all(ev.exclude)
        assert all(1 <= len(q["query_image"]) <= 7 for q in ev.queries)


# ------------------------------------------------------------------------------------------------- bad input

def test_a_video_with_no_video_stream_is_reported_not_a_traceback(mini_root, tmp_path):
    """A MovingFashion video replaced by an audio-only file ended `prepare_data.py --root` in "IndexError: tuple index
    out of range" (check_media's decode(video=0)); it is now an unreadable file of its sub-dataset, named.
    Catches: check_media's stream check removed (the IndexError escapes validate_tree)."""
    from test_model import write_audio_only
    root = copy_tree(mini_root, tmp_path)
    rec = load_records(root, "6_video2img_MovingFashion", "val")[0]
    video = write_audio_only(rec["query_video"][0])
    report = validate_tree(root, progress=False)
    assert report["rows"]["6_video2img_MovingFashion"]["unreadable"] == [
        f"{video} (record {rec['id']}): the file has no video stream (streams: audio)"]


def test_check_media_names_a_frameless_or_cut_video_as_training_does(tmp_path):
    """prepare_data.py checks a video with media.video_problem, the words training's reader gives: a stream of
    undecodable packets was "video has no frames" (.mkv) or "cannot decode: [Errno 1] Operation not permitted" (.mp4),
    and a file cut within its header (a stream declared, no packet written) "cannot decode: [Errno 541478725] End of
    file". Catches: check_media not asking video_problem (its own frame count back); video_problem's frame check
    disabled."""
    from test_model import write_undecodable_video
    for name in ("frameless.mkv", "frameless.mp4"):
        path = write_undecodable_video(tmp_path / name)
        with pytest.raises(DataError) as err:
            check_media(path, "rec-4")
        assert str(err.value) == f"{path} (record rec-4): its video stream has no decodable frames"
    cut = str(tmp_path / "cut.mkv")
    with av.open(cut, "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    with pytest.raises(DataError) as err:
        check_media(cut, "rec-5")
    assert str(err.value) == f"{cut} (record rec-5): the file ends before its first frame (cut short?)"


def test_check_media_decodes_every_frame_of_a_video(tmp_path):
    """An .mp4 of 12 frames whose middle bytes are overwritten decodes its first frame (so media.video_problem finds
    nothing wrong) and fails further on ("Invalid data found when processing input"): check_media, which decodes a
    video frame by frame, names it. Catches: check_media stopping after video_problem (the decode loop dropped: the
    clip passes the validator and fails when training samples a later frame)."""
    from test_model import write_mp4
    path = write_mp4(tmp_path / "damaged.mp4", frames=12, seed=0)
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 2000] = np.random.default_rng(0).bytes(2000)
    with open(path, "wb") as f:
        f.write(data)
    with av.open(path) as container:
        assert next(container.decode(video=0), None) is not None
    with pytest.raises(DataError, match=r"\(record rec-6\): cannot decode: .*Invalid data found"):
        check_media(path, "rec-6")


def test_missing_and_corrupt_files_are_named_with_their_record(mini_root, tmp_path, capsys):
    root = copy_tree(mini_root, tmp_path)
    rec = load_records(root, "4_street2shop_DeepFashion2", "test")[0]     # its street photo is its own
    missing, truncated = rec["query_image"][0], rec["target_image"][0]
    corrupt = load_records(root, "2_sketch2i_HAIFashion", "test")[0]["query_image"][0]
    video = load_records(root, "6_video2img_MovingFashion", "val")[0]["query_video"][0]
    os.remove(missing)
    with open(corrupt, "wb") as f:
        f.write(b"not a png")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    with open(video, "wb") as f:
        f.write(b"\x00" * 100)
    # A hard negative that no other record or gallery names is checked too. Catches: the validator collecting the
    # media of the query and target fields only (MEDIA_FIELDS[:3]).
    darn = pd.triplet_path(root, "9_asfr_DARN", "train")
    with open(darn) as f:
        raw = json.load(f)
    raw[0]["negative_image"].append("DARN_images/gone-negative.jpg")
    pd.write_json(darn, raw)
    # So is a gallery image that no record names (a distractor); it is no record's fault. Catches: the validator
    # not checking gallery images; a gallery image's missing record id (None) listed among the bad records.
    shoes = pd.candidate_path(root, "7_cir_Shoes", "test")
    with open(shoes) as f:
        pd.write_json(shoes, json.load(f) + ["Shoes_images/gone-distractor.jpg"])
    for path in (missing, corrupt, truncated, video):
        with pytest.raises(DataError) as e:
            check_media(path, "rec-7")
        assert path in str(e.value) and "rec-7" in str(e.value) and e.value.record_id == "rec-7"
    # A missing file is said to be missing, not undecodable. Catches: check_media's isfile check removed (PIL's
    # "cannot decode: [Errno 2] No such file or directory").
    with pytest.raises(DataError) as e:
        check_media(missing, "rec-7")
    assert str(e.value) == f"{missing} (record rec-7): file not found"
    report_path = tmp_path / "report.json"
    with pytest.raises(SystemExit) as e:
        pd.main(["--root", root, "--report", str(report_path)])
    assert e.value.code != 0 and missing in str(e.value)
    report = json.loads(report_path.read_text())   # complete JSON, and no temporary file beside it
    assert sorted(os.listdir(tmp_path)) == ["copy", "report.json"]
    row = report["rows"]["4_street2shop_DeepFashion2"]
    assert any(missing in m and rec["id"] in m for m in row["missing"]) and rec["id"] in row["bad_records"]["test"]
    assert report["rows"]["9_asfr_DARN"]["missing"] == [
        f"{os.path.join(root, 'DARN_images', 'gone-negative.jpg')} (record {raw[0]['id']}): file not found"]
    assert report["rows"]["9_asfr_DARN"]["bad_records"] == {"train": [raw[0]["id"]]}
    assert report["rows"]["7_cir_Shoes"]["missing"] == [
        f"{os.path.join(root, 'Shoes_images', 'gone-distractor.jpg')}: file not found"]
    assert report["rows"]["7_cir_Shoes"]["bad_records"] == {}
    assert len(sum((r["missing"] + r["unreadable"] for r in report["rows"].values()), [])) == 6
    capsys.readouterr()
    assert pd.main(["--root", root, "--allow-missing"]) == 0
    # --allow-missing says how many files it let through, under the table. Catches: "all files present and
    # readable" printed whatever was found; the table not printed.
    out = capsys.readouterr().out
    assert out.startswith("sub-dataset / task") and out.endswith("\n6 missing or unreadable files (--allow-missing)\n")


def test_malformed_json_bad_schema_and_unknown_names(mini_root, tmp_path):
    root = copy_tree(mini_root, tmp_path)
    path = pd.triplet_path(root, "1_t2i_Shoes", "train")
    with open(path, "w") as f:
        f.write('[{"id": "a", ')
    with pytest.raises(DataError, match="malformed JSON") as e:
        load_records(root, "1_t2i_Shoes", "train")
    assert e.value.path == path
    good = load_records(mini_root, "9_asfr_DARN", "train")[0]
    # An asfr record needs its attribute too (benchmarks/asfr_probe.py groups queries by it). Catches: load_records
    # requiring ("target_label",) alone of asfr records.
    for broken, field in (({k: v for k, v in good.items() if k != "target_image"}, "target_image"),
                          ({**good, "target_image": []}, "target_image"),
                          ({k: v for k, v in good.items() if k != "target_label"}, "target_label"),
                          ({k: v for k, v in good.items() if k != "attribute"}, "attribute"),
                          ({**good, "query_image": "one.jpg"}, "query_image")):
        pd.write_json(pd.triplet_path(root, "9_asfr_DARN", "train"), [broken])
        with pytest.raises(DataError, match=field) as e:
            load_records(root, "9_asfr_DARN", "train")
        assert e.value.record_id == good["id"] and "9_asfr_DARN_train" in str(e.value)
    pd.write_json(pd.triplet_path(root, "9_asfr_DARN", "train"), [good, good])
    with pytest.raises(DataError, match="unique"):
        load_records(root, "9_asfr_DARN", "train")
    for call in (lambda: load_records(root, "1_t2i_Nope", "train"), lambda: build_eval_set(root, "1_t2i_Nope", "val"),
                 lambda: build_unseen_eval_set(root, "Sketch 2 Nothing")):
        with pytest.raises(DataError, match="unknown"):
            call()
    assert validate_tree(root, progress=False)["rows"]["1_t2i_Shoes"]["errors"][0].startswith(path)


def test_empty_gallery_and_missing_ground_truth(mini_root, tmp_path):
    root = copy_tree(mini_root, tmp_path)
    candidates = pd.candidate_path(root, "7_cir_Shoes", "test")
    pd.write_json(candidates, [])
    with pytest.raises(DataError, match="empty gallery") as e:
        build_eval_set(root, "7_cir_Shoes", "test")
    assert e.value.path == candidates
    first = load_records(root, "7_cir_Shoes", "test")[0]
    pd.write_json(candidates, [os.path.relpath(p, root) for r in load_records(root, "7_cir_Shoes", "test")[1:]
                               for p in r["target_image"] if p not in first["target_image"]])
    with pytest.raises(DataError, match="no ground-truth") as e:
        build_eval_set(root, "7_cir_Shoes", "test", strict=True)
    assert e.value.record_id == first["id"] and e.value.path == pd.triplet_path(root, "7_cir_Shoes", "test")
    asfr = pd.candidate_path(root, "9_asfr_DARN", "val")
    pd.write_json(asfr, {"DARN+0+0": ["DARN_images/elsewhere.jpg"], "DARN_asfr_val_candidate": ["DARN_images/a.jpg"]})
    with pytest.raises(DataError, match="not in the pool"):
        build_eval_set(root, "9_asfr_DARN", "val")


def test_failed_generation_leaves_no_partial_output(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ufire_mini, "sketch_image", broken)
    with pytest.raises(RuntimeError):
        generate(str(tmp_path / "fresh"), scale=0.03, image_size=32, progress=False)
    old = tmp_path / "old"
    old.mkdir()
    (old / "marker").write_text("previous tree")
    with pytest.raises(RuntimeError):
        generate(str(old), scale=0.03, image_size=32, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["old"] and os.listdir(old) == ["marker"]


def drop_target_from_test_gallery(root, key, i):
    """Remove test record i's targets from the test gallery file; returns (test records, gallery file)."""
    records = load_records(root, key, "test")
    candidates = pd.candidate_path(root, key, "test")
    with open(candidates) as f:
        listed = json.load(f)
    pd.write_json(candidates, [p for p in listed if os.path.join(root, p) not in records[i]["target_image"]])
    return records, candidates


def test_validator_builds_the_eval_sets_as_evaluation_does(mini_root, tmp_path):
    """A target missing from the gallery, an asfr label missing from the pool and an empty test triplet file are
    errors (exit 1), each naming its file and record. Catches: the validator not building the val/test sets, or
    building them non-strictly; an empty record list accepted."""
    root = copy_tree(mini_root, tmp_path)
    cir, candidates = drop_target_from_test_gallery(root, "7_cir_Shoes", 0)
    darn = load_records(root, "9_asfr_DARN", "val")
    pool_path = pd.candidate_path(root, "9_asfr_DARN", "val")
    with open(pool_path) as f:
        pool = json.load(f)
    gone = pool.pop(darn[0]["target_label"])
    pool["DARN_asfr_val_candidate"] = [p for p in pool["DARN_asfr_val_candidate"] if p not in gone]
    pd.write_json(pool_path, pool)
    pd.write_json(pd.triplet_path(root, "1_t2i_Shoes", "test"), [])
    rows = validate_tree(root, progress=False)["rows"]
    assert [e for e in rows["7_cir_Shoes"]["errors"] if candidates not in e and cir[0]["id"] in e]   # the triplets
    assert any(pd.triplet_path(root, "9_asfr_DARN", "val") in e and darn[0]["id"] in e
               for e in rows["9_asfr_DARN"]["errors"])
    assert rows["1_t2i_Shoes"]["errors"] == [f"{pd.triplet_path(root, '1_t2i_Shoes', 'test')}: no records"]
    with pytest.raises(SystemExit) as e:
        pd.main(["--root", root, "--allow-missing"])
    assert "no records" in str(e.value)
    with pytest.raises(DataError, match="no records"):      # evaluation refuses it too, naming the file
        build_eval_set(root, "1_t2i_Shoes", "test")


def test_a_query_without_its_target_in_the_gallery_is_a_miss(mini_root, tiny_backbone, tmp_path, capsys):
    """The release keeps such a query and divides recall by all queries; --strict refuses it. Catches: the query
    dropped (or refused) by default, missing not counted, strict ignored, evaluate.py not passing --strict."""
    import evaluate
    root = copy_tree(mini_root, tmp_path)
    cir, candidates = drop_target_from_test_gallery(root, "7_cir_Shoes", 1)
    ev = build_eval_set(root, "7_cir_Shoes", "test")
    assert [q["id"] for q in ev.queries] == [r["id"] for r in cir] and ev.missing == 1
    assert ev.ground_truth[1] == [] and all(ev.ground_truth[:1] + ev.ground_truth[2:])
    with pytest.raises(DataError, match="no ground-truth") as e:
        build_eval_set(root, "7_cir_Shoes", "test", strict=True)
    assert e.value.record_id == cir[1]["id"] and e.value.path == pd.triplet_path(root, "7_cir_Shoes", "test")
    task = UNSEEN_TASKS[1]
    unseen_candidates = os.path.join(root, "evaluation_only_tasks", task, "candidate_images.json")
    with open(unseen_candidates) as f:
        names = json.load(f)
    with open(os.path.join(root, "evaluation_only_tasks", task, "triplet_data.json")) as f:
        first = json.load(f)[0]
    pd.write_json(unseen_candidates, [n for n in names if n != first["target_image"][0]])
    assert build_unseen_eval_set(root, task).missing == 1
    with pytest.raises(DataError, match="no ground-truth"):
        build_unseen_eval_set(root, task, strict=True)
    args = ["--untrained", "--root", root, "--backbone", tiny_backbone, "--split", "test",
            "--tasks", "7_cir_Shoes", task]
    sets = evaluate.build_sets(evaluate.parse_args(args), evaluate.resolve_config(evaluate.parse_args(args))[0])
    assert [s.missing for s in sets] == [1, 1]
    assert f"7_cir_Shoes: 1 of {len(cir)} queries have no target in the gallery" in capsys.readouterr().out
    for one in ("7_cir_Shoes", task):     # --strict reaches both readers
        strict = evaluate.parse_args(["--untrained", "--root", root, "--backbone", tiny_backbone, "--split", "test",
                                      "--tasks", one, "--strict"])
        with pytest.raises(DataError, match="no ground-truth"):
            evaluate.build_sets(strict, evaluate.resolve_config(strict)[0])


def test_evaluation_reads_the_galleries_and_street_images_the_config_and_command_line_name(mini_root, tmp_path):
    """evaluate.py builds its sets from where data.gallery_dir / --gallery-dir and data.street2shop_images point, and
    --strict refuses a query without a target, with and without --tasks. A decoy: <root>/0_test_candidates lacks
    7_cir_Shoes' first targets, <root>/gallery/ is complete; Street+Modification's images/ folder is gone, so its
    names resolve through street2shop_images. Expected galleries written out from the JSON files by hand.
    Catches: the default path (no --tasks) not passing strict or street2shop_images to build_eval_sets; the --tasks
    path not passing gallery_dir or street2shop_images; --gallery-dir not overriding data.gallery_dir (each one
    silently evaluates the decoy gallery or looks for the street images elsewhere)."""
    import evaluate
    root = copy_tree(mini_root, tmp_path)
    shutil.copytree(os.path.join(root, "0_test_candidates"), os.path.join(root, "gallery"))
    cir, _ = drop_target_from_test_gallery(root, "7_cir_Shoes", 0)
    street_dir = os.path.join(root, "evaluation_only_tasks", UNSEEN_TASKS[0])
    shutil.rmtree(os.path.join(street_dir, "images"))
    with open(os.path.join(root, "gallery", "7_cir_Shoes_test_candidates.json")) as f:
        cir_gallery = [os.path.join(root, p) for p in dict.fromkeys(json.load(f))]
    with open(os.path.join(street_dir, "candidate_images.json")) as f:
        street_gallery = list(dict.fromkeys(os.path.join(root, "DF2", "train+image+" + name.split("+", 1)[1])
                                            for name in json.load(f)))
    street_only, both = tmp_path / "street.yaml", tmp_path / "both.yaml"
    street_only.write_text("data:\n  street2shop_images: DF2/train+image+{id}\n")
    both.write_text(f"data:\n  street2shop_images: DF2/train+image+{{id}}\n  gallery_dir: {root}/gallery\n")

    def build(*argv):
        args = evaluate.parse_args(["--untrained", "--root", root, "--backbone", str(tmp_path), "--split", "test",
                                    *argv])
        return {s.name: s for s in evaluate.build_sets(args, evaluate.resolve_config(args)[0])}

    tasks = ["--tasks", "7_cir_Shoes", UNSEEN_TASKS[0]]
    for argv in (["--config", str(both)], ["--config", str(both), *tasks],
                 ["--config", str(street_only), "--gallery-dir", os.path.join(root, "gallery"), *tasks]):
        sets = build(*argv)
        assert sets["7_cir_Shoes"].gallery == cir_gallery and sets["7_cir_Shoes"].missing == 0, argv
        assert sets[UNSEEN_TASKS[0]].gallery == street_gallery, argv
    assert build("--config", str(street_only))["7_cir_Shoes"].missing == 1          # the decoy, as a miss
    with pytest.raises(DataError, match="no ground-truth") as e:                    # --strict without --tasks
        build("--config", str(street_only), "--strict")
    assert e.value.record_id == cir[0]["id"]


def test_recall_and_chance_divide_by_all_queries():
    """Three queries over a gallery of four, the third with no ground truth: query 0 ranks its target first, query 1
    second, query 2 can never hit. By hand: R@1 = 1/3, R@5 = 2/3; chance at K=1 = (1/4 + 1/4 + 0) / 3 = 1/6.
    Catches: recall or chance averaged over the queries with a ground truth only (1/2, 1, 1/4)."""
    from evaluate import chance_recall, recall_at_k
    gallery = torch.eye(4)
    queries = torch.stack([gallery[0], 0.9 * gallery[3] + 0.1 * gallery[1], gallery[2]])
    recall = recall_at_k(torch.nn.functional.normalize(queries, dim=1), gallery, [[0], [1], []], ks=(1, 5))
    assert recall == pytest.approx({"R@1": 100 / 3, "R@5": 200 / 3})
    assert chance_recall(4, [[0], [1], []], ks=(1,)) == pytest.approx({"R@1": 100 / 6})


def test_asfr_ground_truth_is_the_label_not_the_listed_targets(tmp_path):
    """A hand-made asfr split: label "DARN+colour+red" has three pool images, the query lists one of them; the
    ground truth is all three (and only them). Catches: ground truth taken from the listed targets."""
    root = str(tmp_path)
    pool = {"DARN+colour+red": ["DARN_images/r0.jpg", "DARN_images/r1.jpg", "DARN_images/r2.jpg"],
            "DARN+colour+blue": ["DARN_images/b0.jpg", "DARN_images/b1.jpg"]}
    pd.write_json(pd.candidate_path(root, "9_asfr_DARN", "val"),
                  {**pool, "DARN_asfr_val_candidate": ["DARN_images/b0.jpg", "DARN_images/r0.jpg", "DARN_images/b1.jpg",
                                                       "DARN_images/r1.jpg", "DARN_images/r2.jpg"]})
    pd.write_json(pd.triplet_path(root, "9_asfr_DARN", "val"), [
        {"id": "q", "instruction_text": "same colour", "query_image": ["DARN_images/q.jpg"], "attribute": "colour",
         "target_label": "DARN+colour+red", "target_image": ["DARN_images/r1.jpg"], "negative_image": []}])
    ev = build_eval_set(root, "9_asfr_DARN", "val")
    assert ev.ground_truth == [[1, 3, 4]]      # r0, r1, r2 at their places in the pool


def test_a_validation_gallery_holds_a_target_shared_by_two_queries_once(tmp_path):
    """The validation gallery is the union of the split's targets: an image that is the target of two queries is one
    gallery image, and both queries' ground truth is that one index. Listed twice, it would be ranked twice, its
    first copy counted as a distractor above the ground truth. Expected gallery and ground truth by hand.
    Catches: build_eval_set's val gallery built without deduplication (the released val splits share targets;
    U-FIRE-mini's do not)."""
    root = str(tmp_path)
    pd.write_json(pd.triplet_path(root, "7_cir_Shoes", "val"), [
        {"id": "q0", "instruction_text": "is red", "query_image": ["Shoes_images/r0.jpg"],
         "target_image": ["Shoes_images/a.jpg"]},
        {"id": "q1", "instruction_text": "is blue", "query_image": ["Shoes_images/r1.jpg"],
         "target_image": ["Shoes_images/b.jpg", "Shoes_images/c.jpg"]},
        {"id": "q2", "instruction_text": "is green", "query_image": ["Shoes_images/r2.jpg"],
         "target_image": ["Shoes_images/c.jpg", "Shoes_images/a.jpg"]}])
    ev = build_eval_set(root, "7_cir_Shoes", "val")
    assert ev.gallery == [os.path.join(root, "Shoes_images", n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert ev.ground_truth == [[0], [1, 2], [2, 0]] and ev.missing == 0


def test_asfr_ground_truth_keeps_every_image_of_a_large_label(tmp_path):
    """An asfr label of the release holds thousands of pool images: the ground truth is every one of them, not the
    first few. Here 60 images of label "red" around three of "blue"; expected indices by hand.
    Catches: the asfr ground truth cut to the first 50 (U-FIRE-mini's labels hold fewer, so its tests cannot tell)."""
    root = str(tmp_path)
    red, blue = [f"DARN_images/r{i}.jpg" for i in range(60)], [f"DARN_images/b{i}.jpg" for i in range(3)]
    pool = [blue[0]] + red[:30] + [blue[1]] + red[30:] + [blue[2]]
    pd.write_json(pd.candidate_path(root, "9_asfr_DARN", "val"),
                  {"DARN+colour+red": red, "DARN+colour+blue": blue, "DARN_asfr_val_candidate": pool})
    pd.write_json(pd.triplet_path(root, "9_asfr_DARN", "val"), [
        {"id": "q", "instruction_text": "same colour", "query_image": ["DARN_images/q.jpg"], "attribute": "colour",
         "target_label": "DARN+colour+red", "target_image": [red[0]], "negative_image": []}])
    assert build_eval_set(root, "9_asfr_DARN", "val").ground_truth == [list(range(1, 31)) + list(range(32, 62))]


def test_paths_leaving_the_root_are_refused(mini_root, tmp_path):
    """'../outside.jpg' or an absolute path elsewhere, in a query, a target, a gallery or an unseen task: a DataError
    naming the file and the record, in the readers (so training, evaluation and the validator refuse it).
    Catches: in_root not checking; an unseen name with a folder accepted."""
    root = copy_tree(mini_root, tmp_path)
    (tmp_path / "outside.jpg").write_bytes(open(load_records(root, "1_t2i_Shoes", "val")[0]["target_image"][0],
                                                 "rb").read())
    path = pd.triplet_path(root, "7_cir_Shoes", "train")
    with open(path) as f:
        good = json.load(f)[0]      # paths relative to the root
    for field, bad in (("query_image", "../outside.jpg"), ("target_image", str(tmp_path / "outside.jpg")),
                       ("query_image", "Shoes_images/../../outside.jpg")):
        pd.write_json(path, [{**good, field: [bad]}])
        with pytest.raises(DataError, match="outside the data root") as e:
            load_records(root, "7_cir_Shoes", "train")
        assert e.value.path == path and e.value.record_id == good["id"] and bad in str(e.value)
    candidates = pd.candidate_path(root, "1_t2i_Shoes", "test")
    pd.write_json(candidates, ["../outside.jpg"])
    with pytest.raises(DataError, match="outside the data root") as e:
        build_eval_set(root, "1_t2i_Shoes", "test")
    assert e.value.path == candidates
    # The validator reports the bad gallery file once: the eval set it cannot build is not tried again.
    # Catches: validate_tree building the test set after its gallery failed (the same error twice).
    assert validate_tree(root, progress=False)["rows"]["1_t2i_Shoes"]["errors"] == [
        f"{candidates}: '../outside.jpg' is outside the data root {root}"]
    task_dir = os.path.join(root, "evaluation_only_tasks", UNSEEN_TASKS[0])
    with open(os.path.join(task_dir, "triplet_data.json")) as f:
        first = json.load(f)[0]
    pd.write_json(os.path.join(task_dir, "triplet_data.json"), [{**first, "query_image": ["../../../outside.jpg"]}])
    with pytest.raises(DataError, match="not a bare file name") as e:
        build_unseen_eval_set(root, UNSEEN_TASKS[0])
    assert e.value.record_id == first["id"]


def png_chunk(kind, data):
    """One PNG chunk: its length, type, data and CRC, as the format frames them."""
    import struct
    import zlib
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width, height, chunks=()):
    """An 8-bit RGB PNG of width x height with the given (type, data) chunks between its header and its end."""
    import struct
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)), *chunks, (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, data) for kind, data in chunks)


def png_header(width, height):
    """A PNG that declares width x height and holds no pixels: a decompression bomb in 45 bytes."""
    return png_bytes(width, height)


def write_rle8_bmp(path):
    """A BMP whose compression field says RLE8 for its 24-bit pixels: PIL refuses it with a ValueError ("unknown raw
    mode"), not an OSError."""
    from PIL import Image
    Image.new("RGB", (8, 6), (200, 10, 10)).save(path)
    data = bytearray(path.read_bytes())
    data[30] = 1            # biCompression: BI_RLE8
    path.write_bytes(bytes(data))


def test_images_pil_fails_on_with_a_syntax_or_value_error_are_named(tmp_path):
    """PIL reports some damage outside OSError: a PNG whose second IDAT chunk has a damaged type raises SyntaxError
    ("broken PNG file") when its pixels are read, a BMP whose compression field says RLE8 for 24-bit pixels raises
    ValueError ("unknown raw mode"). Both are unreadable files of their record, not a traceback out of the validator.
    Catches: SyntaxError, or ValueError, dropped from check_media's except tuple."""
    import zlib
    pixels = zlib.compress(b"".join(b"\x00" + bytes(range(48)) for _ in range(16)))     # 16 x 16 RGB rows
    png = tmp_path / "two-idat.png"
    png.write_bytes(png_bytes(16, 16, [(b"IDAT", pixels[:len(pixels) // 2]), (b"I#AT", pixels[len(pixels) // 2:])]))
    bmp = tmp_path / "rle.bmp"
    write_rle8_bmp(bmp)
    for path, reason in ((png, "broken PNG file"), (bmp, "unknown raw mode")):
        with pytest.raises(DataError) as e:
            check_media(str(path), "rec-8")
        assert str(e.value).startswith(f"{path} (record rec-8): cannot decode: {reason}")


def test_decompression_bomb_is_named_without_a_traceback(mini_root, tmp_path):
    """A 20000x20000 PNG header: the validator reports the file and exits 1 with a message. Catches: PIL's
    DecompressionBombError (not an OSError) left uncaught in check_media."""
    root = copy_tree(mini_root, tmp_path)
    bomb = load_records(root, "2_sketch2i_HAIFashion", "test")[0]["query_image"][0]
    with open(bomb, "wb") as f:
        f.write(png_header(20000, 20000))
    with pytest.raises(DataError, match="decompression bomb") as e:
        check_media(bomb, "rec-3")
    assert bomb in str(e.value) and e.value.record_id == "rec-3"
    with pytest.raises(SystemExit) as e:
        pd.main(["--root", root])
    assert bomb in str(e.value)


def test_a_decompression_bomb_met_in_training_or_evaluation_is_a_data_error(tmp_path):
    """The encoders read images with media.load_image, not the validator: a 20000x20000 PNG header there must be a
    DataError naming the file and record, as for any unreadable image, not PIL's own error.
    Catches: media.load_image catching only OSError and ValueError (DecompressionBombError is neither)."""
    from media import load_image
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))
    with pytest.raises(DataError, match="cannot read image: .*decompression bomb") as e:
        load_image(str(bomb), "rec-4")
    assert e.value.path == str(bomb) and e.value.record_id == "rec-4"


def test_lone_surrogate_in_a_caption_is_a_data_error(mini_root, tmp_path, tiny_backbone):
    """"\\ud800" is valid JSON but no character: the readers name file, record and field; at encoding time both
    encoders name the record instead of failing in the tokenizer. Catches: the check removed from check_records or
    from either encoder's prepare_queries."""
    import fake_backbones
    import model
    from config import CalibratorConfig, ModelConfig
    root = copy_tree(mini_root, tmp_path)
    good = load_records(mini_root, "1_t2i_Shoes", "train")[0]
    path = pd.triplet_path(root, "1_t2i_Shoes", "train")
    for field in ("instruction_text", "query_text"):
        with open(path, "w") as f:
            f.write(json.dumps([{**good, field: "a red \ud800 shoe"}]))     # ensure_ascii: written as \ud800
        with pytest.raises(DataError, match=f"'{field}' holds a lone surrogate") as e:
            load_records(root, "1_t2i_Shoes", "train")
        assert e.value.path == path and e.value.record_id == good["id"]
    query = {"id": "q-7", "instruction_text": "a red \ud800 shoe", "query_image": [], "query_video": []}
    clip_cfg = ModelConfig(kind="openclip", backbone=fake_backbones.make_tiny_openclip_config(str(tmp_path)),
                           trainable="full")
    for cfg in (ModelConfig(backbone=tiny_backbone, trainable="full"), clip_cfg):
        encoder = model.build_encoder(cfg, CalibratorConfig(mode="none"), device="cpu")
        with pytest.raises(DataError, match="lone surrogate") as e:
            encoder.prepare_queries([query], train=False)
        assert e.value.record_id == "q-7"


def test_a_root_that_is_not_a_directory_is_one_line(tmp_path, monkeypatch):
    """`prepare_data.py --root` on a path that does not exist (a typo) printed a table of 20 rows with one error each
    and the first five annotation files it lacks as not found; now one line before any scan.
    Catches: the directory check removed (validate_tree runs: the stand-in fails the test)."""
    monkeypatch.setattr(pd, "validate_tree", lambda *a, **k: pytest.fail("scanned a root that is not there"))
    missing = str(tmp_path / "no-such-root")
    with pytest.raises(SystemExit) as e:
        pd.main(["--root", missing])
    assert e.value.code == f"prepare_data.py --root {missing}: no such directory"


def test_report_writer_is_safe(mini_root, tmp_path, monkeypatch):
    """An unwritable --report fails before the scan; a lone surrogate is escaped; a failed write leaves no temporary
    file. Catches: the writability check after the scan; a UTF-8 write of a lone surrogate; the temporary file kept
    on failure."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(pd, "validate_tree", lambda *a, **k: pytest.fail("scanned before checking --report"))
    with pytest.raises(SystemExit, match="cannot write the report"):
        pd.main(["--root", mini_root, "--report", str(blocker / "report.json")])
    # A folder given as the report is refused before the scan too. Catches: main's isdir check removed (the scan
    # runs, then the write fails on the folder).
    with pytest.raises(SystemExit, match=f"cannot write the report {tmp_path}: {tmp_path} is a directory"):
        pd.main(["--root", mini_root, "--report", str(tmp_path)])
    report = tmp_path / "out" / "report.json"
    pd.write_json(str(report), {"missing": ["images/\udce9t\u00e9.jpg"]})
    assert json.loads(report.read_text()) == {"missing": ["images/\udce9t\u00e9.jpg"]}
    with pytest.raises(TypeError):
        pd.write_json(str(report), {"not json": {1, 2}})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        pd.write_json(str(report), {"new": 1})
    assert os.listdir(tmp_path / "out") == ["report.json"]
    assert json.loads(report.read_text()) == {"missing": ["images/\udce9t\u00e9.jpg"]}


def test_released_annotations_alone_check_with_exit_0(mini_root, tmp_path, capsys):
    """The check of the released galleries (docs/scaling.md): a tree with gallery/ and evaluation_only_tasks/ JSON
    files only (no triplet files, no images) exits 0; a broken gallery file still fails. Catches: absent triplet files
    or images counted as errors in that mode."""
    annotations = tmp_path / "annotations"
    shutil.copytree(os.path.join(mini_root, "0_test_candidates"), annotations / "gallery")
    for task in UNSEEN_TASKS:
        for name in ("triplet_data.json", "candidate_images.json"):
            os.makedirs(annotations / "evaluation_only_tasks" / task, exist_ok=True)
            shutil.copy(os.path.join(mini_root, "evaluation_only_tasks", task, name),
                        annotations / "evaluation_only_tasks" / task / name)
    args = ["--root", str(annotations), "--gallery-dir", str(annotations / "gallery")]
    assert pd.main(args) == 0
    assert "well-formed" in capsys.readouterr().out
    (annotations / "gallery" / "7_cir_Shoes_test_candidates.json").write_text("[")
    with pytest.raises(SystemExit, match="7_cir_Shoes_test_candidates.json: malformed JSON"):
        pd.main(args)


def test_unknown_sub_dataset_names_are_warned(mini_root, tmp_path, capsys):
    """Catches: files or folders under names no sub-dataset or task reads, ignored without a word."""
    root = copy_tree(mini_root, tmp_path)
    extra = [os.path.join(root, "0_triplet_files", "1_t2i_Shoes2_train_triplet_data.json"),
             os.path.join(root, "0_test_candidates", "7_cir_Shos_test_candidates.json"),
             os.path.join(root, "evaluation_only_tasks", "Sketch 2 Shop")]
    for p in extra[:2]:
        pd.write_json(p, [])
    os.makedirs(extra[2])
    report = validate_tree(root, progress=False)
    assert report["warnings"] == [f"{p}: not a sub-dataset or task name; ignored" for p in extra]
    assert pd.main(["--root", root]) == 0 and all(f"warning: {p}" in capsys.readouterr().out for p in extra[:1])
    # With --gallery-dir, the test candidate files read are that folder's, so its names are the ones checked.
    # Catches: unknown_names looking in <root>/0_test_candidates whatever the gallery folder.
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name in ("7_cir_Shoes_test_candidates.json", "7_cir_Shos_test_candidates.json"):
        (gallery / name).write_text("[]")
    assert pd.unknown_names(str(tmp_path / "elsewhere"), str(gallery)) == [
        str(gallery / "7_cir_Shos_test_candidates.json")]


def test_a_sibling_folder_sharing_the_roots_name_prefix_is_outside_the_root(tmp_path):
    """The root is a folder, not a string prefix: '../ufire-private/a.jpg' from root '.../ufire' normalises to
    '.../ufire-private/a.jpg', which starts with the root's characters but lies outside it.
    Catches: in_root comparing with startswith(root) instead of startswith(root + os.sep)."""
    root = str(tmp_path / "ufire")
    with pytest.raises(DataError, match="outside the data root") as e:
        pd.in_root(root, "../ufire-private/a.jpg", "file.json", "rec-1")
    assert e.value.path == "file.json" and e.value.record_id == "rec-1"
    assert pd.in_root(root, "imgs/../a.jpg", "file.json") == os.path.join(root, "a.jpg")
    # An absolute path is refused even where it points inside the root: a data file names its tree's files
    # relative to the root, so the tree can move. Catches: the os.path.isabs test dropped from in_root.
    with pytest.raises(DataError, match="outside the data root"):
        pd.in_root(root, os.path.join(root, "imgs", "a.jpg"), "file.json")


def test_asfr_candidate_files_need_one_pool_and_one_label_per_image(tmp_path):
    """An asfr candidate file maps labels to images plus exactly one '*_candidate' pool (docs/method.md#data): an
    image under two labels would make its ground truth depend on the order of the file, and a file without a pool
    would end in an IndexError; both are DataErrors naming the file.
    Catches: load_candidates accepting an image's second label; the pool-key count checked as > 1 (none accepted)."""
    path = str(tmp_path / "asfr.json")
    pd.write_json(path, {"DARN+0+0": ["a.jpg"], "DARN+0+1": ["a.jpg", "b.jpg"], "DARN_candidate": ["a.jpg", "b.jpg"]})
    with pytest.raises(DataError, match="second label") as e:
        load_candidates(path, str(tmp_path))
    assert e.value.path == path
    pd.write_json(path, {"DARN+0+0": ["a.jpg"], "DARN+0+1": ["b.jpg"]})
    with pytest.raises(DataError, match=r"exactly one '\*_candidate' pool key, found \[\]") as e:
        load_candidates(path, str(tmp_path))
    assert e.value.path == path
    pd.write_json(path, {"DARN+0+0": ["a.jpg"], "DARN+0+1": ["b.jpg"], "DARN_candidate": ["b.jpg", "a.jpg"]})
    gallery, labels = load_candidates(path, str(tmp_path))
    assert gallery == [str(tmp_path / "b.jpg"), str(tmp_path / "a.jpg")]
    assert labels == {str(tmp_path / "a.jpg"): "DARN+0+0", str(tmp_path / "b.jpg"): "DARN+0+1"}


def test_an_empty_path_in_a_media_list_is_named_as_such():
    """check_records refuses "" in a media list with a message that says so (in_root would otherwise call it
    "outside the data root", and an unseen task would resolve it to a folder).
    Catches: the non-empty test dropped from check_records' media-list check."""
    record = {"id": "r1", "instruction_text": "find it", "query_image": ["a.jpg", ""], "target_image": ["b.jpg"]}
    with pytest.raises(DataError, match="'query_image' must be a list of non-empty path strings") as e:
        pd.check_records([record], "file.json", ("instruction_text", "target_image"))
    assert e.value.record_id == "r1"
    # A gallery file's list likewise: an empty path, or one path where a list belongs, is named as such, not as
    # "outside the data root" or a gallery of the path's characters. Catches: path_list without its non-empty
    # test, or without its list test (a string's characters pass `all(isinstance(p, str) and p ...)`).
    for entries in (["a.jpg", ""], "a.jpg"):
        with pytest.raises(DataError) as e:
            pd.path_list(entries, "gallery.json")
        assert str(e.value) == "gallery.json: gallery: expected a list of non-empty path strings"


def test_a_missing_triplet_or_candidate_file_is_a_data_error_naming_it(tmp_path):
    """A tree whose 0_triplet_files/ lacks one split's file (or a gallery file) is a DataError naming that file, so
    the validator reports it on its row and evaluation prints one line, not a FileNotFoundError traceback (the
    validator's per-file `attempt` catches DataErrors only).
    Catches: read_json's isfile check removed (open's FileNotFoundError escapes)."""
    root = str(tmp_path)
    pd.write_json(pd.triplet_path(root, "7_cir_Shoes", "train"), [
        {"id": "q0", "instruction_text": "is red", "query_image": ["a.jpg"], "target_image": ["b.jpg"]}])
    val = pd.triplet_path(root, "7_cir_Shoes", "val")
    with pytest.raises(DataError) as e:
        load_records(root, "7_cir_Shoes", "val")
    assert str(e.value) == f"{val}: file not found" and e.value.path == val
    gallery = pd.candidate_path(root, "7_cir_Shoes", "test")
    with pytest.raises(DataError) as e:
        load_candidates(gallery, root)
    assert str(e.value) == f"{gallery}: file not found"


@pytest.mark.parametrize("record, named", [
    ("q0", "file.json: "), (["q0"], "file.json: "), ({"id": 7}, "file.json (record 7): "),
    ({"id": 0}, "file.json (record 0): "), ({"id": None}, "file.json: "),
    ({"instruction_text": "is red"}, "file.json: ")])
def test_a_record_that_is_not_an_object_with_a_string_id_is_named(record, named):
    """A record that is not a JSON object (a bare string or list), or whose id is a number, null or absent, is a
    DataError naming the file and the record's position, as for a duplicate id; a number id would otherwise pass
    and meet string ids later (the checkpoint's sorted bad records, "key/id" names). The message shows the id it
    found, 0 included (prefixes written by hand).
    Catches: check_records calling rec.get on a record that is not an object (an AttributeError); the id's type
    check reduced to `rid is None` (7 accepted); DataError naming the record only when its id is truthy
    (`if record_id is not None` -> `if record_id`: id 0 left out)."""
    good = {"id": "q1", "instruction_text": "is red", "query_image": ["a.jpg"], "target_image": ["b.jpg"]}
    with pytest.raises(DataError) as e:
        pd.check_records([good, record], "file.json", ("instruction_text", "target_image"))
    assert e.value.path == "file.json"
    assert str(e.value) == named + "record #1 needs an object with a unique string 'id'"


def test_unseen_names_of_one_file_are_one_gallery_image(tmp_path):
    """Street+Modification names are "<category>+<DeepFashion2 id>": "dress+1.jpg" and "top+1.jpg" are one image. It
    must be one gallery entry, or the query's own street photo survives exclusion as the second copy and ranks first.
    Expected gallery, ground truth and exclusion written out by hand.
    Catches: build_unseen_eval_set keeping one gallery entry per name instead of per resolved file."""
    task_dir = tmp_path / "evaluation_only_tasks" / UNSEEN_TASKS[0]
    task_dir.mkdir(parents=True)
    pd.write_json(str(task_dir / "candidate_images.json"), ["dress+1.jpg", "top+1.jpg", "top+2.jpg"])
    query = {"id": "q0", "instruction_text": "find it", "query_image": ["dress+1.jpg"], "target_image": ["top+2.jpg"]}
    pd.write_json(str(task_dir / "triplet_data.json"), [query])
    ev = build_unseen_eval_set(str(tmp_path), UNSEEN_TASKS[0], street2shop_images="DF2/train+image+{id}")
    assert ev.gallery == [str(tmp_path / "DF2" / "train+image+1.jpg"), str(tmp_path / "DF2" / "train+image+2.jpg")]
    assert ev.ground_truth == [[1]] and ev.exclude == [[0]]
    # ".." is no bare name (it names a folder), and a record without query_image is named, not a KeyError.
    # Catches: resolve's `name in (".", "..")` test dropped; query_image not required of an unseen task's records.
    pd.write_json(str(task_dir / "triplet_data.json"), [{**query, "target_image": [".."]}])
    with pytest.raises(DataError, match="'..' is not a bare file name") as e:
        build_unseen_eval_set(str(tmp_path), UNSEEN_TASKS[0])
    assert e.value.record_id == "q0"
    pd.write_json(str(task_dir / "triplet_data.json"), [{k: v for k, v in query.items() if k != "query_image"}])
    with pytest.raises(DataError, match="missing field 'query_image'") as e:
        build_unseen_eval_set(str(tmp_path), UNSEEN_TASKS[0])
    assert e.value.record_id == "q0" and e.value.path == str(task_dir / "triplet_data.json")


def test_the_validator_refuses_an_evaluation_only_query_without_its_target(tmp_path):
    """The validator builds the evaluation-only tasks strictly, as it does the sub-datasets: a query whose target is
    not among the task's candidates is an error on the task's row, naming the file and the record (evaluation would
    count it as a miss). A tree of the released annotations alone (no 0_triplet_files/), written by hand.
    Catches: validate_tree building the evaluation-only tasks with strict=False."""
    task_dir = tmp_path / "evaluation_only_tasks" / UNSEEN_TASKS[1]
    task_dir.mkdir(parents=True)
    pd.write_json(str(task_dir / "candidate_images.json"), ["a.jpg", "b.jpg"])
    pd.write_json(str(task_dir / "triplet_data.json"), [
        {"id": "q0", "instruction_text": "find it", "query_image": ["a.jpg"], "target_image": ["b.jpg"]},
        {"id": "q1", "instruction_text": "find it", "query_image": ["a.jpg"], "target_image": ["c.jpg"]}])
    row = validate_tree(str(tmp_path), progress=False)["rows"][UNSEEN_TASKS[1]]
    assert row["errors"] == [f"{task_dir / 'triplet_data.json'} (record q1): no ground-truth image in the gallery "
                             f"(strict)"]


def test_the_validator_builds_test_sets_from_the_gallery_folder_given(tmp_path):
    """`prepare_data.py --root R --gallery-dir G` (the release ships its test galleries in gallery/): the validator
    checks each test set against G's candidate file, as evaluation with --gallery-dir builds it. A hand-made 7_cir_Shoes
    whose test gallery lies in G only, the query's target among it: no error on its row (its images are absent, so
    they are reported missing, which is not what this checks).
    Catches: validate_tree building the test sets with gallery_dir=None (<root>/0_test_candidates: file not found)."""
    root, gallery = str(tmp_path / "ufire"), tmp_path / "gallery"
    record = {"id": "q0", "instruction_text": "is red", "query_image": ["Shoes/r.jpg"], "target_image": ["Shoes/a.jpg"]}
    for split in pd.SPLITS:
        pd.write_json(pd.triplet_path(root, "7_cir_Shoes", split), [record])
    pd.write_json(pd.candidate_path(root, "7_cir_Shoes", "test", str(gallery)), ["Shoes/b.jpg", "Shoes/a.jpg"])
    row = validate_tree(root, str(gallery), progress=False)["rows"]["7_cir_Shoes"]
    assert row["errors"] == [] and row["gallery"] == 2


def test_a_missing_file_named_by_two_sub_datasets_marks_the_records_of_both(tmp_path):
    """A file named by records of two sub-datasets is reported once, under the first row naming it, and every record
    naming it lands in its own row's bad_records (validate_tree's docstring). Hand-made: Shoes/a.jpg, missing, is a
    1_t2i_Shoes target and a 7_cir_Shoes query in every split; Shoes/b.jpg exists.
    Catches: bad_records filled under the reporting row for every record (7_cir_Shoes' record lost)."""
    from PIL import Image
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "Shoes"))
    Image.new("RGB", (8, 8), (10, 20, 30)).save(os.path.join(root, "Shoes", "b.jpg"))
    for split in pd.SPLITS:
        pd.write_json(pd.triplet_path(root, "1_t2i_Shoes", split), [
            {"id": "t0", "instruction_text": "red shoes", "target_image": ["Shoes/a.jpg"]}])
        pd.write_json(pd.triplet_path(root, "7_cir_Shoes", split), [
            {"id": "c0", "instruction_text": "is red", "query_image": ["Shoes/a.jpg"],
             "target_image": ["Shoes/b.jpg"]}])
    rows = validate_tree(root, progress=False)["rows"]
    assert rows["1_t2i_Shoes"]["missing"] == [f"{os.path.join(root, 'Shoes', 'a.jpg')} (record t0): file not found"]
    assert rows["7_cir_Shoes"]["missing"] == []
    assert rows["1_t2i_Shoes"]["bad_records"] == {split: ["t0"] for split in pd.SPLITS}
    assert rows["7_cir_Shoes"]["bad_records"] == {split: ["c0"] for split in pd.SPLITS}


def test_the_validators_table_shows_each_rows_counts_in_its_column():
    """format_report's table, from a report written by hand: per row the records of train, val and test ("-" for a
    split it has none of: the evaluation-only tasks), the test gallery ("-" when none was read), then the numbers of
    missing files, unreadable files and errors, each in its column, every line as wide as the header.
    Catches: a split without records, or a row without a gallery, shown as 0; the missing and unreadable counts
    swapped."""
    row = lambda records, gallery, missing, unreadable, errors: {
        "records": records, "gallery": gallery, "missing": ["m"] * missing, "unreadable": ["u"] * unreadable,
        "errors": ["e"] * errors}
    report = {"rows": {"1_t2i_Shoes": row({"train": 12, "val": 3, "test": 4}, 40, 1, 0, 2),
                       "9_asfr_DARN": row({"train": 7}, None, 0, 3, 1),
                       UNSEEN_TASKS[0]: row({"test": 5}, 9, 0, 0, 0)}}
    lines = pd.format_report(report).split("\n")
    assert [line.split() for line in lines] == [
        ["sub-dataset", "/", "task", "train", "val", "test", "gallery", "missing", "unreadable", "errors"],
        ["1_t2i_Shoes", "12", "3", "4", "40", "1", "0", "2"],
        ["9_asfr_DARN", "7", "-", "-", "-", "0", "3", "1"],
        UNSEEN_TASKS[0].split() + ["-", "-", "5", "9", "0", "0", "0"]]
    assert {len(line) for line in lines} == {len(lines[0])}


def test_an_asfr_rows_gallery_column_is_its_test_gallery_never_its_validation_pool(mini_root, tmp_path):
    """The validator's gallery column is the test gallery. An asfr sub-dataset also reads a validation pool; with its
    test candidate file unreadable (here cut to "["), the row shows no gallery and one error, not the pool's size.
    Catches: validate_tree setting row["gallery"] from every split's gallery (`row["gallery"] = len(gallery)`:
    the val pool's size shown as the test gallery's)."""
    root = copy_tree(mini_root, tmp_path)
    broken = pd.candidate_path(root, "9_asfr_DARN", "test")
    with open(broken, "w") as f:
        f.write("[")
    row = validate_tree(root, progress=False)["rows"]["9_asfr_DARN"]
    assert row["gallery"] is None and len(row["errors"]) == 1 and row["errors"][0].startswith(f"{broken}: malformed")


def test_a_json_file_that_is_not_utf8_is_a_data_error_naming_it(tmp_path):
    """A data file in another encoding (Latin-1 captions) is refused as malformed JSON naming the file, like any
    other malformed file, not a UnicodeDecodeError traceback.
    Catches: read_json catching JSONDecodeError only."""
    path = tmp_path / "captions.json"
    path.write_bytes('[{"id": "a", "instruction_text": "robe d\'été"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="malformed JSON") as e:
        pd.read_json(str(path))
    assert e.value.path == str(path)


@pytest.mark.parametrize("field,value", [("instruction_text", None), ("instruction_text", 7), ("attribute", ["a"])])
def test_a_text_field_that_is_not_a_string_is_named(field, value):
    """check_records refuses a text field holding null, a number or a list, naming the field and the record (the
    tokenizer would otherwise fail far from the file, or "7" be embedded as a caption).
    Catches: the string-type check of TEXT_FIELDS dropped from check_records."""
    record = {"id": "r1", "instruction_text": "find it", "target_image": ["b.jpg"], field: value}
    with pytest.raises(DataError, match=f"'{field}' must be a string") as e:
        pd.check_records([record], "file.json", ("instruction_text", "target_image"))
    assert e.value.record_id == "r1"


def test_an_odd_or_tiny_image_size_is_refused_before_anything_is_written(tmp_path):
    """generate's stated limits, "even and at least 32": --image-size 33 and 30 are refused at once, naming the
    option, and nothing is left behind (33 was otherwise drawn in full: yuv420p video stores chroma at half
    resolution, so odd sides do not map onto it exactly).
    Fails when the odd-size check is dropped (`image_size % 2` removed)."""
    for size in (33, 30):
        with pytest.raises(ValueError, match=f"--image-size must be even and at least 32, got {size}"):
            generate(str(tmp_path / "out"), scale=0.01, image_size=size, progress=False)
    assert os.listdir(tmp_path) == []


def test_generation_command_line_passes_out_seed_scale_and_image_size_on(tmp_path, monkeypatch):
    """`prepare_data.py --out DIR --seed 3 --scale 0.03 --image-size 40` writes into DIR the tree that
    generate(seed=3, scale=0.03, image_size=40) writes, byte for byte: 40 x 40 images, round(SIZES x 0.03) records
    (at least 2) per split.
    Catches: main not passing --out (the tree lands in data/ufire-mini), --seed, --scale or --image-size on."""
    from PIL import Image
    monkeypatch.chdir(tmp_path)                     # where the default --out would put it
    out = str(tmp_path / "cli")
    assert pd.main(["--out", out, "--seed", "3", "--scale", "0.03", "--image-size", "40"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["cli"]
    key = "1_t2i_Shoes"
    assert [count_records(out, key, split) for split in pd.SPLITS] == [max(2, round(n * 0.03))
                                                                      for n in ufire_mini.SIZES[key]]
    with Image.open(build_eval_set(out, key, "test").gallery[0]) as image:
        assert image.size == (40, 40)
    ref = generate(str(tmp_path / "ref"), seed=3, scale=0.03, image_size=40, progress=False)
    assert tree_files(out) == tree_files(ref)
    for rel in tree_files(out):
        with open(os.path.join(out, rel), "rb") as fa, open(os.path.join(ref, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel


def test_generation_defaults_write_the_tree_the_configs_and_docs_read(monkeypatch, capsys):
    """`python prepare_data.py` alone writes U-FIRE-mini where data.root points by default (config.DataConfig),
    at full scale, with seed 0 and the 96 x 96 images docs/results.md measured on.
    Catches: a changed default for --out, --seed, --scale or --image-size (another tree than the one documented)."""
    from config import DataConfig
    calls = []
    monkeypatch.setattr(ufire_mini, "generate", lambda *args: calls.append(args) or "the-tree")
    assert pd.main([]) == 0
    assert calls == [(DataConfig().root, 0, 1.0, 96)] and capsys.readouterr().out == "wrote the-tree\n"

def test_validator_looks_for_street_images_where_the_command_line_says(mini_root, tmp_path, capsys):
    """`prepare_data.py --root R --street2shop-images PATTERN`: Street+Modification's names that its own images/
    folder lacks resolve through PATTERN. Its images moved from images/<category>+<id>.jpg to DF2/train+image+<id>.jpg:
    the default pattern (DeepFashion2_images/...) finds none and the validation fails naming one; `--street2shop-images
    DF2/train+image+{id}` finds them all (exit 0).
    Catches: main not passing --street2shop-images on to validate_tree (the default pattern is always used)."""
    root = copy_tree(mini_root, tmp_path)
    images = os.path.join(root, "evaluation_only_tasks", UNSEEN_TASKS[0], "images")
    os.makedirs(os.path.join(root, "DF2"))
    for name in os.listdir(images):
        os.replace(os.path.join(images, name), os.path.join(root, "DF2", "train+image+" + name.split("+", 1)[1]))
    os.rmdir(images)
    with pytest.raises(SystemExit, match=r"(?s)validation failed.*DeepFashion2_images/train\+image\+"):
        pd.main(["--root", root])
    assert "looked for at 'DeepFashion2_images/train+image+{id}'" in capsys.readouterr().out
    assert pd.main(["--root", root, "--street2shop-images", "DF2/train+image+{id}"]) == 0
    assert "all files present and readable" in capsys.readouterr().out


@pytest.mark.parametrize("key, field", [("3_inshop_DeepFashion", "query_image"), ("9_asfr_DARN", "query_image"),
                                        ("6_video2img_MovingFashion", "query_video")])
def test_a_query_without_its_media_is_a_data_error_naming_it(mini_root, tmp_path, key, field):
    """A misspelt or empty query-media field left a text-only query that was evaluated without a word (evaluate.py
    printed Recall for in-shop queries with no image). Fails when load_records requires no query media field."""
    good = json.load(open(pd.triplet_path(mini_root, key, "test")))
    path = pd.triplet_path(str(tmp_path), key, "test")
    for broken in ({**{k: v for k, v in good[0].items() if k != field}, field + "s": good[0][field]},
                   {**good[0], field: []}):
        pd.write_json(path, good[1:] + [broken])
        with pytest.raises(DataError, match=field) as e:
            load_records(str(tmp_path), key, "test")
        assert e.value.path == path and e.value.record_id == good[0]["id"]
    t2i = json.load(open(pd.triplet_path(mini_root, "1_t2i_Shoes", "test")))
    assert not any(r.get("query_image") or r.get("query_video") for r in t2i)      # text alone stays valid
    pd.write_json(pd.triplet_path(str(tmp_path), "1_t2i_Shoes", "test"), t2i)
    assert len(load_records(str(tmp_path), "1_t2i_Shoes", "test")) == len(t2i)


def test_an_asfr_candidate_file_without_labels_is_a_data_error(mini_root, tmp_path):
    """An asfr pool given as a plain list had no labels, so every query missed: evaluate.py printed Recall 0.0 for
    9_asfr_DARN (8 of 8 queries "no target in the gallery") and exited 0. Fails when build_eval_set accepts an asfr
    candidate file without labels."""
    root = str(tmp_path)
    for split in ("val", "test"):
        pd.write_json(pd.triplet_path(root, "9_asfr_DARN", split),
                      json.load(open(pd.triplet_path(mini_root, "9_asfr_DARN", split))))
        candidates = json.load(open(pd.candidate_path(mini_root, "9_asfr_DARN", split)))
        where = pd.candidate_path(root, "9_asfr_DARN", split)
        pd.write_json(where, candidates)
        labelled = build_eval_set(root, "9_asfr_DARN", split)     # the file as released: every query has a hit
        assert labelled.missing == 0 and all(labelled.ground_truth)
        pd.write_json(where, candidates[f"DARN_asfr_{split}_candidate"])
        with pytest.raises(DataError, match="asfr candidate file") as e:
            build_eval_set(root, "9_asfr_DARN", split)
        assert e.value.path == where


def test_no_data_at_the_root_says_to_run_the_prepare_step(tmp_path, monkeypatch):
    """Training or evaluating before `python prepare_data.py`, or from another directory (data.root is relative to the
    working directory), named only the first triplet file as "file not found". A root without 0_triplet_files/ is now
    a DataError naming the absolute root and saying what writes it, whichever reader meets it first.
    Catches: load_records without its 0_triplet_files/ check (`if not os.path.isdir(...)` -> `if False`: the
    message is "..._train_triplet_data.json: file not found")."""
    monkeypatch.chdir(tmp_path)
    expected = (f"{tmp_path / 'data' / 'ufire-mini'}: no U-FIRE data here (no 0_triplet_files/): python "
                f"prepare_data.py writes U-FIRE-mini to data/ufire-mini; a relative data.root or --root is read from "
                f"the working directory")
    for read in (lambda: pd.TrainSet("data/ufire-mini", "7_cir_Shoes"),
                 lambda: build_eval_sets("data/ufire-mini", "test", keys=["7_cir_Shoes"], unseen=False)):
        with pytest.raises(DataError) as error:
            read()
        assert str(error.value) == expected
