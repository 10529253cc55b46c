"""Search your own catalogue with a FashionLens checkpoint: index a folder of images (or a JSONL list), then query it
with text, images, sketches or a video, as training builds queries for each task (paper section IV-B).

    python search.py index runs/tiny/best.pt --catalog shop_photos/ --out runs/shop-index
    torchrun --nproc_per_node=8 search.py index ckpt.pt --catalog catalogue.jsonl --out idx --index IVF4096,PQ64
    python search.py query runs/shop-index --text "red floral midi dress" -k 10 --show sheet.png
    python search.py query runs/shop-index --image ref.jpg --text "is sleeveless" --task cir --category dress
    python search.py query runs/shop-index --video clip.mp4 --json

Catalogue: a folder (every image file under it, recursively) or a JSONL file, one {"path": ..., any metadata} per
line (relative paths are relative to the JSONL file). Each distinct image is embedded once. Unreadable images are
reported, skipped and counted (listed in meta.json). Shards of embeddings are written atomically as they are
encoded (encoding.py's cache format, keyed by file path, size, mtime and ctime, in a folder per model fingerprint
and device arithmetic), so a killed or extended run encodes only what is missing. Under torchrun the ranks split the
catalogue.

Index: faiss exact inner product over L2-normalised embeddings (cosine) by default; --index takes a faiss factory
string (e.g. IVF4096,PQ64 or HNSW32) for catalogues where exact search no longer fits; such an index is trained on
a seeded random sample of at most --train-size vectors. IVF indexes probe --nprobe lists, HNSW explores
--ef-search candidates. The index folder holds shards/<fingerprint>-<arithmetic>/, index.faiss, items.jsonl (path
and metadata of vector i on line i) and meta.json (written last: fingerprint, arithmetic, checkpoint, config,
factory, counts, skipped). Indexing into a folder that holds another checkpoint's or catalogue's index replaces it,
with a note (its shards stay).

Query: --task picks the instruction template of a task family (the phrasing of the U-FIRE instructions, verb
"find"); without it the task follows from the inputs (text alone: t2i; a video: video2img; images and text: cir;
images alone: inshop). --instruction gives the whole instruction text instead. The query goes through the
calibrator (PGSQC, paper section IV-C) exactly as in training. An index built with another checkpoint, config,
backbone or version of the embedding code (another fingerprint) is refused, naming both. An index encoded on
another kind of device (a GPU's bf16 against a CPU's fp32: another arithmetic) is searched, with a note.

Python API (what both commands use):
    model = Model("runs/tiny/best.pt")                 # load once
    index = Index("runs/shop-index", model)            # refused unless built by this model
    query = make_query(text="red floral midi dress")
    hits = index.search(model.encode_queries([query]), k=10)[0]    # [{"rank", "score", "path", ...metadata}]
    model.encode_targets(paths)                        # catalogue images, [N, D]
"""
import argparse
import json
import os
import pathlib
import string
import sys
import time

import faiss
import numpy as np
import torch
import torch.distributed as dist

from encoding import arithmetic, encode_gallery, fingerprint
from evaluate import UNUSABLE, EvaluationError, load_encoder, read_checkpoint, resolve_backbone
from model import resolve_device
from plumbing import (DataError, atomic_write, gather_list, one_line, output_folder, setup_distributed, world,
                      write_text_atomic)
from ufire_mini import REQUESTS, VERBS

# Runtime parameters of approximate indexes: how many IVF lists to probe, how many HNSW candidates to explore.
# Larger is slower and closer to exact search; benchmarks/ measures what they cost in Recall@10.
# Both chosen to lose under 1 point of Recall@10 against exact search at 1M vectors (docs/ann_search.md).
NPROBE = 32
EF_SEARCH = 256
EF_CONSTRUCTION = 128         # HNSW's build depth: with the factory's 40 no efSearch came within 1 point of exact
TRAIN_SIZE = 200_000          # vectors an approximate index is trained on (a seeded random sample)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TASKS = list(REQUESTS)        # the task families, the in-shop sub-tasks and the two evaluation-only tasks
OPTION_OF = {"text": "--text", "cat": "--category", "attr": "--attribute"}    # template field -> its option


class SearchError(Exception):
    """What the command line reports in one line: a bad catalogue or index, a mismatched model, a bad query."""


# ----------------------------------------------------------------------------------------------------------------
# The model: a checkpoint loaded once

class Model:
    """A checkpoint loaded once (evaluate.py's loaders), encoding queries and catalogue images as evaluation does.

    encode_targets is tolerant: an image that cannot be read gets a NaN row and its reason in self.unreadable
    (indexing skips it), so one bad file in a million does not stop a run."""

    def __init__(self, ckpt, backbone=None, device=None, batch_size=None):
        self.ckpt = os.path.abspath(ckpt)
        self.cfg, state, trained_on = read_checkpoint(ckpt)
        self.cfg.model.backbone = resolve_backbone(self.cfg.model, backbone, ckpt)
        self.encoder = load_encoder(self.cfg, state, resolve_device(device), source=ckpt, trained_on=trained_on)
        self.fingerprint, self.arithmetic = fingerprint(self.cfg, self.encoder), arithmetic(self.cfg, self.encoder)
        self.batch_size = batch_size or self.cfg.train.eval_batch_size
        self.unreadable, self.encoded = {}, 0

    @property
    def embed_dim(self):
        return self.encoder.embed_dim

    def encode_queries(self, queries, batch_size=None):
        emb = self.encoder.encode_queries(queries, batch_size=batch_size or self.batch_size)
        for kind, (rows_of, cause) in UNUSABLE.items():
            bad = rows_of(emb)
            if len(bad):
                raise SearchError(f"{kind} embedding (the model gives {cause}) of query {queries[bad[0]]['id']}")
        return emb

    def encode_targets(self, paths, batch_size=None):
        batch_size = batch_size or self.batch_size
        try:
            emb = self.encoder.encode_targets(paths, batch_size=batch_size)
        except DataError:       # one image of the batch is unreadable: find it (and any other) one by one
            rows = []
            for path in paths:
                try:
                    rows.append(self.encoder.encode_targets([path], batch_size=1)[0])
                except DataError as err:
                    self.unreadable[path] = one_line(err)
                    print(f"search.py: skipping {err}", file=sys.stderr)
                    rows.append(torch.full((self.encoder.embed_dim,), float("nan")))
            emb = torch.stack(rows)
        self.encoded += sum(p not in self.unreadable for p in paths)      # images/s counts embedded images only
        # A NaN row means "unreadable" to the index; one from a readable image is a broken model, never skipped.
        for kind, (rows_of, cause) in UNUSABLE.items():
            broken = [paths[i] for i in rows_of(emb) if paths[i] not in self.unreadable]
            if broken:
                raise SearchError(f"{kind} embedding (the model gives {cause}) of {broken[0]}")
        return emb


# ----------------------------------------------------------------------------------------------------------------
# Queries, built as training builds them

def make_query(text=None, images=(), video=None, task=None, category="item", attribute=None, instruction=None):
    """The query record model.py encodes (prepare_data's format): the task family's instruction template filled
    with the text (and category / attribute where the template names one), then the images and the video."""
    images, videos = [os.path.abspath(p) for p in images], [os.path.abspath(video)] if video else []
    if instruction is None:
        if task is None:
            task = ("video2img" if videos else "cir" if images and text else "inshop" if images else "t2i")
        if task not in TASKS:
            raise SearchError(f"unknown task {task!r}; known: {TASKS}")
        template = f"{VERBS[0]} {REQUESTS[task]}"
        values = {"text": text, "cat": category, "attr": attribute}
        needed = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        missing = [OPTION_OF[name] for name in sorted(needed) if not values[name]]
        if missing:
            raise SearchError(f"task {task} ({template!r}) needs {' and '.join(missing)}")
        if text and "text" not in needed:
            raise SearchError(f"task {task} ({template!r}) takes no text; give --instruction to word it yourself")
        instruction = template.format(**values)
    if not (instruction or images or videos):
        raise SearchError("an empty query: give --text, --image, --video or --instruction")
    return {"id": "query", "instruction_text": instruction, "query_image": images, "query_video": videos}


# ----------------------------------------------------------------------------------------------------------------
# The catalogue

def read_catalogue(source):
    """[{"path": absolute path, **metadata}], one per distinct image, in catalogue order (the first entry's
    metadata wins for an image listed twice). A folder: every image file under it; a JSONL file: one object with a
    "path" per line. A bad line is a DataError naming the file and the line."""
    if os.path.isdir(source):
        items = [{"path": os.path.abspath(os.path.join(folder, name))}
                 for folder, dirs, names in sorted(os.walk(source))
                 for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    elif os.path.isfile(source):
        items, base = [], os.path.dirname(os.path.abspath(source))
        with open(source, "rb") as f:            # bytes: a line that is not UTF-8 is named like any bad line
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise DataError(f"{source}:{number}", f"not a JSON line: {err}") from None
                if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
                    raise DataError(f"{source}:{number}", 'expected an object with a non-empty "path" string')
                items.append({**item, "path": os.path.normpath(os.path.join(base, item["path"]))})
    else:
        raise DataError(source, "catalogue not found (a folder of images or a JSONL file)")
    distinct = list({item["path"]: item for item in reversed(items)}.values())[::-1]
    if not distinct:
        raise DataError(source, f"no images in the catalogue (image files end in {', '.join(IMAGE_EXTENSIONS)})")
    if len(distinct) < len(items) and world()[0] == 0:
        print(f"{source}: {len(items) - len(distinct)} entries list an image already listed (indexed once)")
    return distinct


# ----------------------------------------------------------------------------------------------------------------
# faiss

def build_index(embeddings, factory="Flat", train_size=TRAIN_SIZE, seed=0):
    """A faiss inner-product index over L2-normalised float32 embeddings [N, D] (so scores are cosines). An index
    that needs training (IVF, PQ) is trained on a random sample of at most train_size vectors, seeded."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = new_index(x.shape[1], factory)
    if not index.is_trained:
        sample = x
        if len(x) > train_size:
            sample = x[np.sort(np.random.default_rng(seed).choice(len(x), train_size, replace=False))]
        try:
            index.train(sample)
        except RuntimeError as err:
            raise SearchError(f"--index {factory!r}: training on {len(sample)} vectors failed "
                              f"({faiss_message(err)}); use fewer lists or centroids, or exact search") from None
    index.add(x)
    return index


def new_index(dim, factory, ef_construction=EF_CONSTRUCTION):
    """An empty inner-product index from a faiss factory string, with the build settings docs/ann_search.md
    measured: HNSW graphs built with efConstruction = ef_construction; IVF-PQ without polysemous training (the
    factory turns it on; only Hamming-filtered search uses it, and it made training 6 times slower)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise SearchError(f"--index {factory!r}: not a faiss factory string ({faiss_message(err)})") from None
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efConstruction = ef_construction
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        faiss.downcast_index(ivf).do_polysemous_training = False
    return index


def set_search_params(index, nprobe=NPROBE, ef_search=EF_SEARCH):
    """Runtime parameters where the index has them (faiss.ParameterSpace): IVF probes nprobe lists, HNSW (and an
    HNSW coarse quantizer) explores ef_search candidates. Exact indexes have none."""
    space = faiss.ParameterSpace()
    space.initialize(index)
    names = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("quantizer_efSearch", ef_search)):
        if name in names:
            space.set_index_parameter(index, name, value)
    return index


def faiss_message(err):
    """faiss's C++ errors start with a source location; its last line says what went wrong."""
    return str(err).strip().splitlines()[-1].split("failed: ")[-1]


# ----------------------------------------------------------------------------------------------------------------
# search.py index

def index_catalogue(model, catalogue, out_dir, factory="Flat", train_size=TRAIN_SIZE, seed=0, progress=True):
    """Embed the catalogue (resuming from out_dir's shards), build the faiss index and write out_dir. Every rank
    calls it; rank 0 writes the index and returns meta, the others return None."""
    rank, size = world()
    items = read_catalogue(catalogue)
    paths = [item["path"] for item in items]
    if rank == 0:
        note_replaced_index(out_dir, model, catalogue)
    # Shards of another model, or computed another way (bf16 on a GPU, fp32 on a CPU), are never mixed in.
    shards = os.path.join(out_dir, "shards", f"{model.fingerprint}-{model.arithmetic}")
    start = time.time()
    # encode_gallery takes what shards/ already holds, encodes the rest sharded over the ranks and writes each
    # chunk as soon as it is encoded: a killed run loses at most one chunk per rank.
    emb = encode_gallery(model, paths, model.batch_size, shards, progress)
    seconds = time.time() - start
    encoded = sum(gather_list([model.encoded]))
    reasons = dict(gather_list(list(model.unreadable.items())))
    if rank != 0:
        return None
    if encoded:
        print(f"encoded {encoded} images in {seconds:.1f} s ({encoded / seconds:.1f} images/s, {size} process(es))")
    good = torch.isfinite(emb).all(dim=1).numpy()
    skipped = [{"path": p, "reason": reasons.get(p, "unreadable when a previous run indexed it (file unchanged)")}
               for p, ok in zip(paths, good) if not ok]
    if skipped:
        print(f"skipped {len(skipped)} of {len(paths)} catalogue images (unreadable; listed in "
              f"{out_dir}/meta.json), e.g. {skipped[0]['reason']}")
    if not good.any():
        raise SearchError(f"{catalogue}: no readable image in the catalogue")
    index = build_index(emb[good].numpy(), factory, train_size, seed)
    kept = [item for item, ok in zip(items, good) if ok]
    meta = {"fingerprint": model.fingerprint, "arithmetic": model.arithmetic, "checkpoint": model.ckpt,
            "config": model.cfg.to_dict(), "catalogue": os.path.abspath(catalogue), "factory": factory,
            "train_size": train_size, "seed": seed, "vectors": index.ntotal, "dim": index.d, "skipped": skipped}
    # meta.json marks a finished index: removed first, written last, so a reader never pairs old and new files.
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    write_text_atomic(os.path.join(out_dir, "items.jsonl"),
                      "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in kept))
    with atomic_write(os.path.join(out_dir, "index.faiss")) as temp:
        faiss.write_index(index, temp)
    write_text_atomic(meta_path, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"indexed {index.ntotal} images ({factory}) in {out_dir}")
    return meta


def note_replaced_index(out_dir, model, catalogue):
    """Say so when out_dir holds the finished index of another checkpoint or catalogue, which this run replaces (the
    other model's embeddings stay in their shards/ folder, so indexing it again encodes nothing)."""
    try:
        old = read_meta(out_dir)
    except SearchError:     # no finished index there, or a damaged one: replaced as a failed build would be
        return
    if (old["fingerprint"], old.get("catalogue")) != (model.fingerprint, os.path.abspath(catalogue)):
        print(f"note: {out_dir} holds the index of checkpoint {old['checkpoint']} over {old.get('catalogue')}; "
              f"this run replaces it (its embeddings stay in {os.path.join(out_dir, 'shards')})")


# ----------------------------------------------------------------------------------------------------------------
# search.py query

def read_index_file(path, read):
    """read(path) of one file of an index folder. search.py writes each atomically, so one that cannot be read was
    damaged afterwards: a SearchError naming it, not a JSON or faiss traceback."""
    try:
        return read(path)
    except (OSError, ValueError, RuntimeError) as err:  # JSON and UTF-8 errors are ValueErrors, faiss's RuntimeErrors
        reason = faiss_message(err) if isinstance(err, RuntimeError) else one_line(err)
        raise SearchError(f"{path}: cannot read this index file ({reason}); index the catalogue again") from err


def read_meta(index_dir):
    """meta.json of an index folder; written last, so without it the folder is not a finished index."""
    path = os.path.join(index_dir, "meta.json")
    if not os.path.isfile(path):
        raise SearchError(f"{index_dir}: no meta.json: not an index, or its build did not finish (run search.py "
                          f"index again: it resumes)")
    meta = read_index_file(path, lambda p: json.loads(pathlib.Path(p).read_text(encoding="utf-8")))
    if not (isinstance(meta, dict) and {"fingerprint", "checkpoint"} <= meta.keys()):
        raise SearchError(f"{path}: not the meta.json search.py writes (a JSON object with 'fingerprint' and "
                          f"'checkpoint'); the folder was changed by hand; index the catalogue again")
    return meta


class Index:
    """A finished index folder, opened for the model that built it (another fingerprint is refused)."""

    def __init__(self, index_dir, model, nprobe=NPROBE, ef_search=EF_SEARCH):
        self.meta = read_meta(index_dir)
        if self.meta["fingerprint"] != model.fingerprint and self.meta["checkpoint"] == model.ckpt:
            # The same file gives another fingerprint: rewritten (a new run into the same out_dir), or the code changed.
            raise SearchError(f"{index_dir} was built with checkpoint {model.ckpt} (fingerprint "
                              f"{self.meta['fingerprint']}), which now gives fingerprint {model.fingerprint}: the "
                              f"checkpoint was rewritten, or its config's backbone or the embedding code changed "
                              f"since. Index the catalogue again")
        if self.meta["fingerprint"] != model.fingerprint:
            raise SearchError(f"{index_dir} was built with checkpoint {self.meta['checkpoint']} (fingerprint "
                              f"{self.meta['fingerprint']}), but the model loaded is checkpoint {model.ckpt} "
                              f"(fingerprint {model.fingerprint}): another checkpoint, config, backbone or version of "
                              f"the embedding code. Query with --ckpt {self.meta['checkpoint']} or index the catalogue "
                              f"again")
        if self.meta.get("arithmetic", model.arithmetic) != model.arithmetic:
            # The same model computed another way: the vectors agree to the lower precision's rounding (minimum
            # cosine 0.99999 between bf16 and fp32 runs of one export, docs/use.md), so the index still serves.
            print(f"note: {index_dir} was encoded as {self.meta['arithmetic']}, queries here as {model.arithmetic}: "
                  f"scores differ from an index encoded here at that precision's rounding", file=sys.stderr)
        self.index = set_search_params(read_index_file(os.path.join(index_dir, "index.faiss"), faiss.read_index),
                                       nprobe, ef_search)
        self.items = read_index_file(os.path.join(index_dir, "items.jsonl"), lambda p: [
            json.loads(line) for line in pathlib.Path(p).read_text(encoding="utf-8").split("\n") if line])
        if len(self.items) != self.index.ntotal:
            raise SearchError(f"{index_dir}: items.jsonl lists {len(self.items)} images, index.faiss holds "
                              f"{self.index.ntotal}: the folder was changed by hand; index the catalogue again")
        if self.index.d != model.embed_dim:    # else every query fails in a reshape, or faiss asserts
            raise SearchError(f"{index_dir}: index.faiss holds vectors of width {self.index.d}, the model gives "
                              f"{model.embed_dim}: the folder was changed by hand; index the catalogue again")

    def search(self, query_emb, k=10):
        """Per query, its top k as [{"rank", "score", "path", ...metadata}], best first."""
        queries = np.ascontiguousarray(torch.as_tensor(query_emb).float().reshape(-1, self.index.d).numpy())
        scores, ids = self.index.search(queries, min(k, self.index.ntotal))
        # An approximate index can return fewer than k (id -1) when the probed lists hold fewer.
        return [[{"rank": r + 1, "score": float(s), **self.items[i]} for r, (s, i) in enumerate(zip(row_s, row_i))
                 if i >= 0] for row_s, row_i in zip(scores, ids)]


def print_results(query, results, as_json):
    if as_json:
        print(json.dumps({"instruction": query["instruction_text"], "query_image": query["query_image"],
                          "query_video": query["query_video"], "results": results}, indent=1, ensure_ascii=False))
        return
    print(f"query: {query['instruction_text']!r}" + "".join(f" + {p}" for p in query["query_image"] +
                                                          query["query_video"]))
    for hit in results:
        extra = {k: v for k, v in hit.items() if k not in ("rank", "score", "path")}
        metadata = f"  {json.dumps(extra, ensure_ascii=False)}" if extra else ""
        print(f"{hit['rank']:>4}  {hit['score']:.4f}  {hit['path']}{metadata}")


# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="embed a catalogue and build its faiss index")
    index.add_argument("ckpt", help="checkpoint written by train.py")
    index.add_argument("--catalog", required=True, help="folder of images, or JSONL of {\"path\": ..., metadata}")
    index.add_argument("--out", required=True, help="index folder (an unfinished one is resumed)")
    index.add_argument("--index", default="Flat", metavar="FACTORY",
                       help="faiss factory string, e.g. IVF4096,PQ64 or HNSW32 (default: Flat, exact search)")
    index.add_argument("--train-size", type=int, default=TRAIN_SIZE, help="vectors to train an approximate index on")
    index.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    query = commands.add_parser("query", help="search an index")
    query.add_argument("index_dir")
    query.add_argument("--text", help="what to look for (a description, or a modification of the --image)")
    query.add_argument("--image", nargs="+", action="extend", default=[], metavar="PATH",
                       help="query image(s): photos, sketches, outfit items")
    query.add_argument("--video", metavar="PATH", help="query video")
    query.add_argument("--task", choices=TASKS, help="task family whose instruction to use (default: from the inputs)")
    query.add_argument("--category", default="item", help="the {cat} of cir / compatibility / in-shop instructions")
    query.add_argument("--attribute", help="the {attr} of asfr instructions, e.g. 'sleeve length'")
    query.add_argument("--instruction", help="the whole instruction text (instead of --task's template and --text)")
    query.add_argument("-k", type=int, default=10, help="results to show")
    query.add_argument("--show", metavar="PNG", help="write a contact sheet: the query, then the top k")
    query.add_argument("--json", action="store_true", help="print the results as JSON")
    query.add_argument("--ckpt", help="checkpoint (default: the one the index was built with)")
    query.add_argument("--nprobe", type=int, default=NPROBE, help="IVF lists probed")
    query.add_argument("--ef-search", type=int, default=EF_SEARCH, help="HNSW candidates explored")
    for sub in (index, query):
        sub.add_argument("--backbone", help="backbone directory (default: the checkpoint's model.backbone)")
        sub.add_argument("--batch-size", type=int, help="encoding batch (default: train.eval_batch_size)")
    args = parser.parse_args(argv)
    if args.command == "query" and args.instruction and (args.text or args.task):
        parser.error("--instruction is the whole instruction: give it without --text and --task")
    for option, value in (("-k", getattr(args, "k", 1)), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:     # faiss asserts on k < 1; a batch below 1 fails deep in encoding
            parser.error(f"{option} must be at least 1, got {value}")
    return args


def run_query(args):
    folder = os.path.dirname(os.path.abspath(args.show)) if args.show else None
    if args.show and (os.path.isdir(args.show) or not os.path.isdir(folder)):     # else a traceback after the search
        raise SearchError(f"--show {args.show}: cannot write a PNG there ("
                          f"{'a folder' if os.path.isdir(args.show) else f'no folder {folder}'})")
    ckpt = args.ckpt or read_meta(args.index_dir)["checkpoint"]
    query = make_query(args.text, args.image, args.video, args.task, args.category, args.attribute, args.instruction)
    model = Model(ckpt, args.backbone, batch_size=args.batch_size)
    index = Index(args.index_dir, model, args.nprobe, args.ef_search)
    results = index.search(model.encode_queries([query]), args.k)[0]
    print_results(query, results, args.json)
    if args.show:
        from plot import contact_sheet      # matplotlib only when a sheet is asked for
        contact_sheet(query, results, args.show)
        print(f"wrote {args.show}", file=sys.stderr if args.json else sys.stdout)
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "query":
            return run_query(args)
        output_folder(args.out, "--out: the index is written into it")
        device = setup_distributed()
        model = Model(args.ckpt, args.backbone, device, args.batch_size)
        meta = index_catalogue(model, args.catalog, args.out, args.index, args.train_size, args.seed)
        if dist.is_initialized():
            dist.destroy_process_group()
        return meta
    except (DataError, EvaluationError, SearchError) as error:
        sys.exit(f"search.py: {error}")


if __name__ == "__main__":
    main()
