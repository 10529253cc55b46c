"""U-FIRE data stage (paper section III): readers, a validator for a downloaded U-FIRE, the synthetic U-FIRE-mini.

    python prepare_data.py                  # write U-FIRE-mini to data/ufire-mini (--out, --seed, --scale)
    python prepare_data.py --root DIR       # check a real U-FIRE tree: table per sub-dataset (--report FILE)

The readers serve both trees unchanged: triplet files -> records (load_records), a torch Dataset per sub-dataset
for training (TrainSet), galleries and ground truth as docs/method.md#data says (build_eval_set(s)).
"""
import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass

import av
from PIL import Image
from tqdm import tqdm

from config import DataConfig
from plumbing import DataError, atomic_write

# The benchmark's names (paper section III): key = file prefix -> (family = prefix without its number, dataset).
SUB_DATASETS = {key: tuple(key.split("_", 2)[1:]) for key in (
    "1_t2i_FashionGen", "1_t2i_Shoes", "2_sketch2i_ClothesV1", "2_sketch2i_HAIFashion", "2_sketch2i_QMUL-Shoe-V2",
    "3_inshop_DeepFashion", "4_street2shop_DeepFashion2", "5_compatibility_FashionVC", "5_compatibility_Polyvore",
    "6_video2img_MovingFashion", "7_cir_Fashion200K", "7_cir_FashionIQ-Dress", "7_cir_FashionIQ-Shirt",
    "7_cir_FashionIQ-Toptee", "7_cir_Shoes", "8_sketch&text_CSTBIR", "9_asfr_DARN", "9_asfr_FashionAI")}
UNSEEN_TASKS = ["Street+Modification Text 2 Shop", "Image(s)+Text 2 Compatible Item"]
SPLITS = ("train", "val", "test")
SKETCH_SETS = ("2_sketch2i_ClothesV1", "2_sketch2i_QMUL-Shoe-V2")   # up to max_query_images drawn (paper §III)
MEDIA_FIELDS = ("query_image", "query_video", "target_image", "negative_image")
TEXT_FIELDS = ("instruction_text", "query_text", "attribute", "target_label", "task", "category")


def read_json(path):
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"malformed JSON: {e}") from None


def write_json(path, obj):
    """Atomic (plumbing.atomic_write). What UTF-8 cannot hold (a lone surrogate, e.g. from a file name that is not
    valid UTF-8) is written as its JSON escape \\udcxx."""
    text = json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8", "backslashreplace")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as temp, open(temp, "wb") as f:
        f.write(text)


def is_unicode(text):
    """False for a string with a lone surrogate: "\\ud800" is valid JSON but no character, and tokenizers fail on it."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def in_root(root, rel, path, record_id=None):
    """root/rel for a path named in a data file. A path that leaves the root (absolute, or through '..') is refused:
    a data file names files of its own tree only. (Lexical: symbolic links inside the root may point anywhere.)"""
    full = os.path.normpath(os.path.join(root, rel))
    if os.path.isabs(rel) or not full.startswith(os.path.join(root, "")):
        raise DataError(path, f"{rel!r} is outside the data root {root}", record_id)
    return full


def check_records(records, path, required, lists=MEDIA_FIELDS):
    """Schema of a triplet file (paper section III): a non-empty list of objects, unique string ids, typed fields,
    the required fields present and, when they list media, not empty."""
    if not isinstance(records, list):
        raise DataError(path, f"expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(path, "no records")
    ids = set()
    for i, rec in enumerate(records):
        rid = rec.get("id") if isinstance(rec, dict) else None
        if not isinstance(rid, str) or rid in ids:
            raise DataError(path, f"record #{i} needs an object with a unique string 'id'", rid)
        ids.add(rid)
        for name in required:
            if name not in rec:
                raise DataError(path, f"missing field '{name}'", rid)
        for name, value in rec.items():
            if name in lists and not (isinstance(value, list) and all(isinstance(p, str) and p for p in value)):
                raise DataError(path, f"'{name}' must be a list of non-empty path strings", rid)
            if name in TEXT_FIELDS and not isinstance(value, str):
                raise DataError(path, f"'{name}' must be a string", rid)
            if name in TEXT_FIELDS and not is_unicode(value):
                raise DataError(path, f"'{name}' holds a lone surrogate (not valid Unicode)", rid)
        empty = [name for name in required if name in lists and not rec[name]]
        if empty:
            raise DataError(path, f"'{empty[0]}' is empty", rid)


def triplet_path(root, key, split):
    if key not in SUB_DATASETS:
        raise DataError(os.path.join(root, "0_triplet_files"),
                        f"unknown sub-dataset {key!r}; known: {list(SUB_DATASETS)}")
    return os.path.join(root, "0_triplet_files", f"{key}_{split}_triplet_data.json")


def load_records(root, key, split):
    """Schema-checked records of one sub-dataset split, media paths made absolute (and kept inside root)."""
    root = os.path.abspath(root)
    path = triplet_path(root, key, split)
    if not os.path.isdir(os.path.dirname(path)):    # no data at all: the prepare step not run, or another directory
        raise DataError(root, "no U-FIRE data here (no 0_triplet_files/): python prepare_data.py writes U-FIRE-mini "
                              "to data/ufire-mini; a relative data.root or --root is read from the working directory")
    records = read_json(path)
    family = SUB_DATASETS[key][0]
    # Every family but t2i queries with media; without this a misspelt or empty query field would leave a text-only
    # query that is still evaluated, a wrong number and no error.
    query_media = {"t2i": (), "video2img": ("query_video",)}.get(family, ("query_image",))
    check_records(records, path, ("instruction_text", "target_image") + query_media
                  + (("attribute", "target_label") if family == "asfr" else ()))
    for rec in records:
        for name in MEDIA_FIELDS:
            if name in rec:
                rec[name] = [in_root(root, p, path, rec["id"]) for p in rec[name]]
    return records


def count_records(root, key, split):
    return len(load_records(root, key, split))


class TrainSet:
    """Training view of one sub-dataset (docs/method.md#data): one target drawn per visit, sketch sets subsampled."""

    def __init__(self, root, key, max_query_images=5):
        self.key, self.max_query_images = key, max_query_images
        self.records = load_records(root, key, "train")
        # asfr: a pool image's label, known from the records that list it as a positive, so the loss can mask a
        # hard negative drawn for one query that carries another query's label (train.contrastive_loss).
        self.label_of = {p: rec["target_label"] for rec in self.records if rec.get("target_label")
                         for p in rec["target_image"]}

    def __len__(self):
        return len(self.records)

    def example(self, index, rng):
        rec = self.records[index]
        query_image = rec.get("query_image", [])
        if self.key in SKETCH_SETS and len(query_image) > self.max_query_images:
            query_image = rng.sample(query_image, self.max_query_images)
        negatives = list(rec.get("negative_image", []))
        return {"id": rec["id"], "key": self.key, "instruction_text": rec["instruction_text"],
                "query_image": list(query_image), "query_video": list(rec.get("query_video", [])),
                "target_image": rng.choice(rec["target_image"]), "target_label": rec.get("target_label"),
                "negative_image": negatives, "negative_label": [self.label_of.get(p) for p in negatives]}

@dataclass
class EvalSet:
    name: str                       # sub-dataset key, or the unseen task's name
    family: str                     # "t2i", ..., "asfr"; "unseen" for the evaluation-only tasks
    queries: list                   # {"id", "instruction_text", "query_image", "query_video"}
    gallery: list                   # absolute image paths, unique, first-seen order
    ground_truth: list              # per query: gallery indices; empty for a query none of whose targets is listed
    exclude: list                   # per query: gallery indices of its own images (unseen tasks only)
    missing: int = 0                # queries with an empty ground truth: misses, as in the release (strict: an error)


def candidate_path(root, key, split, gallery_dir=None):
    """The gallery file of a split: asfr val pools sit with the triplets, test galleries in gallery_dir."""
    if split == "val":
        return os.path.join(root, "0_triplet_files", f"{key}_val_candidate_data.json")
    name = f"{key}_test_candidate_data.json" if SUB_DATASETS[key][0] == "asfr" else f"{key}_test_candidates.json"
    return os.path.join(gallery_dir or os.path.join(root, "0_test_candidates"), name)


def path_list(entries, path, what="gallery"):
    """A JSON list of paths, deduplicated in first-seen order."""
    if not isinstance(entries, list) or not all(isinstance(p, str) and p for p in entries):
        raise DataError(path, f"{what}: expected a list of non-empty path strings")
    if not entries:
        raise DataError(path, f"empty {what}")
    return list(dict.fromkeys(entries))


def load_candidates(path, root):
    """A candidate file -> (gallery: unique absolute paths in first-seen order, labels: {path: label} or None).

    A plain file is a JSON list of paths (DeepFashion lists 71 twice: galleries are deduplicated,
    docs/method.md#data); an asfr file maps each label to its paths, plus one key ending in "_candidate" that holds
    the whole pool.
    """
    data, root = read_json(path), os.path.abspath(root)
    pool_keys = [k for k in data if k.endswith("_candidate")] if isinstance(data, dict) else [None]
    if len(pool_keys) != 1:
        raise DataError(path, f"expected exactly one '*_candidate' pool key, found {pool_keys}")
    gallery = [in_root(root, p, path) for p in path_list(data[pool_keys[0]] if pool_keys[0] else data, path)]
    if not isinstance(data, dict):
        return gallery, None
    labels, pool = {}, set(gallery)
    for label in [k for k in data if k != pool_keys[0]]:
        for p in path_list(data[label], path, f"label {label!r}"):
            p = in_root(root, p, path)
            if p not in pool or labels.setdefault(p, label) != label:
                raise DataError(path, f"{p} of label {label!r} is not in the pool or has a second label")
    return gallery, labels


def checked_hits(hits, strict, path, record_id):
    """A query none of whose targets is in the gallery stays, as a miss: the release divides recall by all queries.
    strict: refuse it instead."""
    if not hits and strict:
        raise DataError(path, "no ground-truth image in the gallery (strict)", record_id)
    return hits


def build_eval_set(root, key, split, gallery_dir=None, strict=False):
    """Gallery and ground truth of one sub-dataset split (paper section III; docs/method.md#data)."""
    if split not in ("val", "test"):
        raise ValueError(f"evaluation split must be 'val' or 'test', got {split!r}")
    root = os.path.abspath(root)
    records, path, labels = load_records(root, key, split), triplet_path(root, key, split), {}
    family = SUB_DATASETS[key][0]
    if family == "asfr" or split == "test":
        where = candidate_path(root, key, split, gallery_dir)
        gallery, labels = load_candidates(where, root)
        if family == "asfr" and labels is None:   # asfr ground truth is the labels: without them every query misses
            raise DataError(where, "an asfr candidate file maps each label to its images (plus the '*_candidate' "
                                   "pool), not a plain list")
    else:   # the validation gallery is the union of the split's targets
        gallery = list(dict.fromkeys(p for rec in records for p in rec["target_image"]))
    index, by_label = {p: i for i, p in enumerate(gallery)}, defaultdict(list)
    for p, label in (labels or {}).items():
        by_label[label].append(index[p])
    queries, ground_truth = [], []
    for rec in records:
        if family == "asfr":   # every gallery image with the query's label is a hit (paper section III)
            hits = sorted(by_label.get(rec["target_label"], []))
        else:
            hits = list(dict.fromkeys(index[p] for p in rec["target_image"] if p in index))
        queries.append({"id": rec["id"], "instruction_text": rec["instruction_text"],
                        "query_image": rec.get("query_image", []), "query_video": rec.get("query_video", [])})
        ground_truth.append(checked_hits(hits, strict, path, rec["id"]))
    missing = sum(not hits for hits in ground_truth)
    return EvalSet(key, family, queries, gallery, ground_truth, [[] for _ in records], missing)


def unseen_source(task, street2shop_images=DataConfig.street2shop_images):
    """Where the bare names of an evaluation-only task live when <task>/images/ lacks them: a path pattern relative to
    the root, {name} the bare name, {id} the name less its "<category>+" prefix. Compatible Item names are files of
    the Polyvore gallery; Street+Modification names are "<category>+<DeepFashion2 train-split image id>"."""
    return {UNSEEN_TASKS[0]: street2shop_images, UNSEEN_TASKS[1]: "Polyvore_images/{name}"}[task]


def build_unseen_eval_set(root, task, strict=False, street2shop_images=DataConfig.street2shop_images):
    """An evaluation-only task; a query must not find its own images, so they are excluded from its ranking.
    Bare names resolve to <task>/images/ first (U-FIRE-mini ships one), then as unseen_source says; names that
    resolve to the same file are one gallery image."""
    root = os.path.abspath(root)
    task_dir = os.path.join(root, "evaluation_only_tasks", task)
    if task not in UNSEEN_TASKS:
        raise DataError(task_dir, f"unknown evaluation-only task; known: {UNSEEN_TASKS}")
    images, source = os.path.join(task_dir, "images"), unseen_source(task, street2shop_images)
    local = set(os.listdir(images)) if os.path.isdir(images) else set()

    def resolve(name, path, record_id=None):
        if os.path.basename(name) != name or name in (".", ".."):   # a bare name cannot leave the root
            raise DataError(path, f"{name!r} is not a bare file name", record_id)
        if name in local:
            return os.path.join(images, name)
        return os.path.join(root, source.format(name=name, id=name.split("+", 1)[-1]))

    path = os.path.join(task_dir, "triplet_data.json")
    records = read_json(path)
    check_records(records, path, ("instruction_text", "query_image", "target_image"), ("query_image", "target_image"))
    gallery_path = os.path.join(task_dir, "candidate_images.json")
    gallery = list(dict.fromkeys(resolve(n, gallery_path) for n in path_list(read_json(gallery_path), gallery_path)))
    index = {p: i for i, p in enumerate(gallery)}
    queries, ground_truth, exclude = [], [], []
    for rec in records:
        query_image = [resolve(n, path, rec["id"]) for n in rec["query_image"]]
        targets = [resolve(n, path, rec["id"]) for n in rec["target_image"]]
        ground_truth.append(checked_hits([index[p] for p in targets if p in index], strict, path, rec["id"]))
        queries.append({"id": rec["id"], "instruction_text": rec["instruction_text"], "query_image": query_image,
                        "query_video": []})
        exclude.append([index[p] for p in query_image if p in index])
    return EvalSet(task, "unseen", queries, gallery, ground_truth, exclude, sum(not h for h in ground_truth))


def build_eval_sets(root, split, keys=None, gallery_dir=None, unseen=True, strict=False,
                    street2shop_images=DataConfig.street2shop_images):
    sets = [build_eval_set(root, key, split, gallery_dir, strict) for key in (keys or SUB_DATASETS)]
    return sets + [build_unseen_eval_set(root, t, strict, street2shop_images)
                   for t in UNSEEN_TASKS if unseen and split == "test"]


# ----------------------------------------------------------------------------------------------------------------
# The validator: `python prepare_data.py --root DIR` checks a user's U-FIRE tree and changes nothing.

def check_media(path, record_id=None):
    """Raise DataError unless the file exists and decodes (images fully, videos frame by frame)."""
    if not os.path.isfile(path):
        raise DataError(path, "file not found", record_id)
    try:
        if path.lower().endswith((".mp4", ".avi", ".mov", ".webm", ".mkv")):
            from media import video_problem     # here, not at the top: media loads torch and transformers (+3 s)
            problem = video_problem(path)       # no video stream, no decodable frame, cut within the header
            if problem:
                raise DataError(path, problem, record_id)
            with av.open(path) as container:
                for _ in container.decode(video=0):
                    pass
        else:
            with Image.open(path) as im:
                im.draft("RGB", (64, 64))   # JPEG decodes every block at reduced size: corruption still shows
                im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, av.error.FFmpegError) as e:
        raise DataError(path, f"cannot decode: {e}", record_id) from None


def unknown_names(root, gallery_dir=None):
    """Entries of a tree's annotation folders that no sub-dataset or evaluation-only task reads: a misspelt or extra
    sub-dataset would otherwise be ignored without a word."""
    known = {os.path.basename(triplet_path(root, k, s)) for k in SUB_DATASETS for s in SPLITS}
    known |= {os.path.basename(candidate_path(root, k, "val")) for k, (f, _) in SUB_DATASETS.items() if f == "asfr"}
    folders = {os.path.join(root, "0_triplet_files"): known,
               gallery_dir or os.path.join(root, "0_test_candidates"):
                   {os.path.basename(candidate_path(root, k, "test")) for k in SUB_DATASETS},
               os.path.join(root, "evaluation_only_tasks"): set(UNSEEN_TASKS)}
    return [os.path.join(folder, n) for folder, names in folders.items() if os.path.isdir(folder)
            for n in sorted(os.listdir(folder)) if n not in names]


def validate_tree(root, gallery_dir=None, progress=True, street2shop_images=DataConfig.street2shop_images):
    """Every JSON file parsed and schema-checked, the val and test sets built as evaluation builds them (strictly: a
    query with no ground truth in its gallery is an error here), every file named opened: a report row per
    sub-dataset/task. A bad file is reported once, under the first row naming it; every record naming it lands in
    bad_records. A tree without 0_triplet_files/ (the released annotations alone, README "Full reproduction") has its
    test galleries and evaluation-only tasks checked, not their images."""
    root, rows, media = os.path.abspath(root), {}, defaultdict(list)     # media: path -> [(row, record id, split)]
    galleries_only = not os.path.isdir(os.path.join(root, "0_triplet_files"))
    test_galleries = []

    def attempt(row, load):   # one JSON file: its problem goes to the row, the other files are still checked
        try:
            return load()
        except DataError as e:
            row["errors"].append(str(e))

    for name in list(SUB_DATASETS) + UNSEEN_TASKS:
        row = rows[name] = {"records": {}, "gallery": None, "errors": [], "missing": [], "unreadable": [],
                            "bad_records": defaultdict(dict)}
        for split in ("test",) if name in UNSEEN_TASKS else SPLITS:
            if name in UNSEEN_TASKS:
                ev = attempt(row, lambda: build_unseen_eval_set(root, name, True, street2shop_images))
                records, gallery = (ev.queries, ev.gallery) if ev else (None, None)
            else:
                records = None if galleries_only else attempt(row, lambda: load_records(root, name, split))
                has_gallery = split == "test" or (split == "val" and SUB_DATASETS[name][0] == "asfr"
                                                  and not galleries_only)   # asfr val pools sit with the triplets
                where = candidate_path(root, name, split, gallery_dir)
                gallery = attempt(row, lambda: load_candidates(where, root)[0]) if has_gallery else None
                if split != "train" and records is not None and (gallery is not None or not has_gallery):
                    attempt(row, lambda: build_eval_set(root, name, split, gallery_dir, strict=True))
            if records is not None:
                row["records"][split] = len(records)
                for rec in records:
                    for p in (p for f in MEDIA_FIELDS for p in rec.get(f, [])):
                        media[p].append((name, rec["id"], split))
            if gallery is not None:
                row["gallery"] = len(gallery) if split == "test" else row["gallery"]
                test_galleries += gallery if split == "test" and name in SUB_DATASETS else []
                for p in gallery:
                    media[p].append((name, None, split))
    for p, refs in tqdm({} if galleries_only else media.items(), desc="checking files", unit="file",
                        disable=not progress):
        try:
            check_media(p, refs[0][1])
        except DataError as e:
            rows[refs[0][0]]["unreadable" if os.path.isfile(p) else "missing"].append(str(e))
            for name, rid, split in refs:
                if rid is not None:
                    rows[name]["bad_records"][split][rid] = None      # an ordered set
    for row in rows.values():
        row["bad_records"] = {split: list(ids) for split, ids in row["bad_records"].items()}
    return {"root": root, "gallery_dir": gallery_dir, "galleries_only": galleries_only, "rows": rows,
            "test_gallery_images": [len(test_galleries), len(set(test_galleries))],     # per gallery, distinct
            "warnings": [f"{p}: not a sub-dataset or task name; ignored" for p in unknown_names(root, gallery_dir)]}


def format_report(report):
    lines = [f"{'sub-dataset / task':34s}{'train':>7s}{'val':>6s}{'test':>6s}{'gallery':>9s}{'missing':>9s}"
             f"{'unreadable':>11s}{'errors':>7s}"]
    for name, row in report["rows"].items():
        n = [str(row["records"].get(s, "-")) for s in SPLITS]
        lines.append(f"{name:34s}{n[0]:>7s}{n[1]:>6s}{n[2]:>6s}{str(row['gallery'] or '-'):>9s}"
                     f"{len(row['missing']):>9d}{len(row['unreadable']):>11d}{len(row['errors']):>7d}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/ufire-mini", help="where U-FIRE-mini goes")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every sub-dataset's size")
    parser.add_argument("--image-size", type=int, default=96, help="side of the square images, in pixels")
    parser.add_argument("--root", help="validate this real U-FIRE tree instead of generating")
    parser.add_argument("--gallery-dir", help="test candidate files (the release ships them in gallery/)")
    parser.add_argument("--report", help="also write the validation report as JSON here")
    parser.add_argument("--allow-missing", action="store_true", help="report missing or unreadable files, exit 0")
    parser.add_argument("--street2shop-images", default=DataConfig.street2shop_images,
                        help="where Street+Modification Text 2 Shop's images are (data.street2shop_images)")
    args = parser.parse_args(argv)
    if not args.root:
        from ufire_mini import generate   # here, not at the top: ufire_mini builds on this module's readers
        print(f"wrote {generate(args.out, args.seed, args.scale, args.image_size)}")
        return 0
    if not os.path.isdir(args.root):  # else every annotation file of the tree is reported missing, one by one
        sys.exit(f"prepare_data.py --root {args.root}: no such directory")
    if args.report:   # found before the scan, not after it
        try:
            if os.path.isdir(args.report):
                raise IsADirectoryError(f"{args.report} is a directory")
            os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
            tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(args.report))).close()
        except OSError as e:
            sys.exit(f"cannot write the report {args.report}: {e}")
    report = validate_tree(args.root, args.gallery_dir, street2shop_images=args.street2shop_images)
    print(format_report(report))
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    print("test galleries: {} images, {} distinct".format(*report["test_gallery_images"]))
    if report["rows"][UNSEEN_TASKS[0]]["missing"]:
        print(f"{UNSEEN_TASKS[0]}: its images are DeepFashion2 train-split images, looked for at "
              f"{args.street2shop_images!r} under the root (--street2shop-images, data.street2shop_images)")
    if args.report:
        write_json(args.report, report)
    errors = [e for row in report["rows"].values() for e in row["errors"]]
    bad = [e for row in report["rows"].values() for e in row["missing"] + row["unreadable"]]
    if errors or (bad and not args.allow_missing):
        sys.exit("validation failed; first problems:\n  " + "\n  ".join((errors + bad)[:5]))
    if report["galleries_only"]:
        print(f"{report['root']} has no 0_triplet_files/: its test galleries and evaluation-only tasks are well-formed "
              "(their images were not looked for)")
    else:
        print(f"{len(bad)} missing or unreadable files (--allow-missing)" if bad else "all files present and readable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
