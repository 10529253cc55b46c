"""search.py: a catalogue indexed with a checkpoint and queried gives the brute-force cosine ranking of the same
model; killed runs resume; unreadable images are skipped and counted; another checkpoint is refused; approximate
faiss indexes build and search; two torchrun processes index like one; benchmarks/ann_search.py's recall against
exact search, timings and tables from given inputs."""
import argparse
import json
import os
import re
import shutil

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

import encoding
import evaluate
import search
from benchmarks import ann_search
from launch import join_gloo
from search import SearchError, build_index, make_query, set_search_params
from test_evaluate import perturb, ranked_query


@pytest.fixture(scope="module")
def setup(tiny_backbone, tmp_path_factory):
    """Two checkpoints of the tiny backbone (other weights), a catalogue folder of 9 small images in two folders
    plus one truncated JPEG, and the first checkpoint's exact index of it (built once: encoding is the slow part)."""
    from config import Config
    from model import build_encoder

    tmp = tmp_path_factory.mktemp("search")
    cfg = Config()
    cfg.model.backbone, cfg.model.image_pixels = tiny_backbone, 64 * 64
    encoders, ckpts = [], []
    for seed in (1, 2):
        torch.manual_seed(1)
        encoders.append(perturb(build_encoder(cfg.model, cfg.calibrator, "cpu"), seed))
        ckpts.append(str(tmp / f"ckpt{seed}.pt"))
        torch.save({"config": cfg.to_dict(), "model": encoders[-1].trainable_state_dict(), "step": 1}, ckpts[-1])
    rng = np.random.default_rng(0)
    catalogue = tmp / "catalogue"
    paths = []
    for i in range(9):
        folder = catalogue / ("dresses" if i < 5 else "shoes")
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(str(folder / f"item{i}.{'png' if i % 2 else 'jpg'}"))
        Image.fromarray(rng.integers(0, 255, (32 + 8 * (i % 3), 32, 3), dtype=np.uint8)).save(paths[-1])
    good = open(paths[0], "rb").read()
    broken = str(catalogue / "dresses" / "item0x-broken.jpg")      # second in the catalogue: rank 1 meets it
    with open(broken, "wb") as f:
        f.write(good[:len(good) // 3])
    index_dir = str(tmp / "index")
    search.main(["index", ckpts[0], "--catalog", str(catalogue), "--out", index_dir, "--batch-size", "4"])
    return {"tmp": tmp, "encoder": encoders[0], "ckpts": ckpts, "catalogue": str(catalogue), "paths": paths,
            "broken": broken, "index": index_dir}


def indexed(index_dir):
    """(paths, embeddings) of a finished index folder, from its files."""
    index = faiss.read_index(os.path.join(index_dir, "index.faiss"))
    with open(os.path.join(index_dir, "items.jsonl")) as f:
        return [json.loads(line)["path"] for line in f], index.reconstruct_n(0, index.ntotal)


def test_query_ranks_like_brute_force_cosine_of_the_same_model(setup, capsys):
    """Catches: a query built otherwise than training builds it (instruction template, media, calibrator), the
    catalogue encoded with other weights than the checkpoint's, items.jsonl out of step with the faiss ids.
    Mutation run: the cir template's verb 'find' -> VERBS[1] ('search for') in make_query: fails."""
    encoder, paths = setup["encoder"], sorted(setup["paths"])
    results = search.main(["query", setup["index"], "--text", "has long sleeves", "--image", paths[0], "-k", "20",
                           "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"] == results
    # Independently: the query record spelled out by hand (U-FIRE's cir instruction), encoded by the in-memory
    # encoder the checkpoint was saved from, ranked by numpy over all readable catalogue images.
    query = {"id": "q", "instruction_text": "find item images matching the text modifications of the given image: "
                                            "has long sleeves", "query_image": [paths[0]], "query_video": []}
    assert printed["instruction"] == query["instruction_text"]
    q = encoder.encode_queries([query]).numpy()[0]
    targets = encoder.encode_targets(paths, batch_size=4).numpy()
    scores = targets @ q
    order = np.argsort(-scores)
    assert [r["path"] for r in results] == [paths[i] for i in order]          # all 9: k is capped at the index size
    np.testing.assert_allclose([r["score"] for r in results], scores[order], atol=1e-5)
    assert [r["rank"] for r in results] == list(range(1, 10))
    search.main(["query", setup["index"], "--text", "has long sleeves", "--image", paths[0], "-k", "3", "--show",
                 str(setup["tmp"] / "sheet.png")])
    assert Image.open(setup["tmp"] / "sheet.png").size[0] > 0


def test_contact_sheet_marks_exactly_the_hits(setup):
    """Catches: a sheet that marks results by position or marks none. Mutation runs: show_image's frame colour
    HIT_COLOUR if hit -> if True: fails; the title's "  hit" dropped: fails."""
    from plot import HIT_COLOUR, draw_contact_sheet
    from matplotlib.colors import same_color

    query = {"instruction_text": "find it", "query_image": setup["paths"][:2], "query_video": []}
    results = [{"rank": r + 1, "score": 1 - r / 10, "path": setup["paths"][r % 9], "hit": r in (1, 4, 7)}
               for r in range(8)] + [{"rank": 9, "score": 0.1, "path": setup["broken"], "hit": True}]
    fig = draw_contact_sheet(query, results)
    shown = [ax for ax in fig.axes if ax.get_title().startswith("#")]
    assert [ax.get_title().split()[0] for ax in shown] == [f"#{r}" for r in range(1, 10)]
    framed = [r + 1 for r, ax in enumerate(shown) if same_color(ax.spines["top"].get_edgecolor(), HIT_COLOUR)]
    titled = [r + 1 for r, ax in enumerate(shown) if ax.get_title().endswith("hit")]
    assert framed == titled == [2, 5, 8, 9]


def test_unreadable_image_reported_skipped_and_counted(setup):
    """Catches: an unreadable image that stops the run, is indexed (a NaN vector), or is skipped silently.
    Mutation run: Model.encode_targets recording no reason (self.unreadable[path] = ... removed): the reason
    check fails; rows of NaN added to the index (good = all True): the count check fails."""
    with open(os.path.join(setup["index"], "meta.json")) as f:
        meta = json.load(f)
    assert [s["path"] for s in meta["skipped"]] == [setup["broken"]]
    assert "cannot read image" in meta["skipped"][0]["reason"] and setup["broken"] in meta["skipped"][0]["reason"]
    paths, emb = indexed(setup["index"])
    assert sorted(paths) == sorted(setup["paths"]) and meta["vectors"] == 9
    assert np.isfinite(emb).all()


def test_killed_run_resumes_encoding_only_the_missing_images(setup, monkeypatch):
    """Catches: a resumed run that encodes everything again, or one that mixes in another model's shards.
    Mutation run: index_catalogue's shard folder out_dir/shards/<fingerprint> -> out_dir/shards-<time.time()>
    (nothing found on resume): encoded 10 images, not 8; load_cache returning {}: the same."""
    out, catalogue, ckpt = str(setup["tmp"] / "resumed"), setup["catalogue"], setup["ckpts"][0]
    monkeypatch.setattr(encoding, "CHUNK_BATCHES", 1)     # chunks (shards) of one batch of 2 images
    save = encoding.save_cache_chunk

    def save_then_die(*args):
        save(*args)
        raise KeyboardInterrupt("killed after the first shard")

    monkeypatch.setattr(encoding, "save_cache_chunk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        search.main(["index", ckpt, "--catalog", catalogue, "--out", out, "--batch-size", "2"])
    assert not os.path.exists(os.path.join(out, "meta.json"))
    monkeypatch.setattr(encoding, "save_cache_chunk", save)
    seen = []
    encode = search.Model.encode_targets
    monkeypatch.setattr(search.Model, "encode_targets", lambda self, paths, batch_size=None:
                        seen.extend(paths) or encode(self, paths, batch_size))
    search.main(["index", ckpt, "--catalog", catalogue, "--out", out, "--batch-size", "2"])
    everything = search.read_catalogue(catalogue)
    assert len(everything) == 10 and len(seen) == 8                         # the first shard's 2 were on disk
    assert sorted(seen) == sorted(item["path"] for item in everything[2:])
    paths, emb = indexed(out)
    reference_paths, reference = indexed(setup["index"])                    # the uninterrupted run (batch 4)
    assert paths == reference_paths
    np.testing.assert_allclose(emb, reference, atol=1e-5)


def test_index_of_another_checkpoint_is_refused_naming_both(setup, capsys):
    """Catches: querying with weights the index was not built with (scores from two models).
    Mutation run: Index.__init__'s fingerprint comparison removed: no error, the test fails."""
    with pytest.raises(SystemExit) as exit_info:
        search.main(["query", setup["index"], "--text", "red dress", "--ckpt", setup["ckpts"][1]])
    message = str(exit_info.value.code)
    assert setup["ckpts"][0] in message and setup["ckpts"][1] in message and "fingerprint" in message


def test_index_of_a_checkpoint_rewritten_since_says_to_index_again(setup, tmp_path):
    """Queried with the checkpoint path it was built with, an index whose fingerprint no longer matches (the file
    rewritten by a new training run into the same out_dir, or the embedding code changed by an update) said
    "Query with --ckpt <that same path>", which changes nothing; it now says to index the catalogue again.
    Catches: Index.__init__ without the same-checkpoint branch (`and self.meta["checkpoint"] == model.ckpt` ->
    `and False`: the message suggests --ckpt with the path already used)."""
    index_dir = tmp_path / "index"
    shutil.copytree(setup["index"], index_dir)
    meta = json.loads((index_dir / "meta.json").read_text())
    meta["fingerprint"] = "0123456789abcdef"                  # what the checkpoint gave when the index was built
    (index_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        search.main(["query", str(index_dir), "--text", "red dress"])
    message = str(exit_info.value.code)
    assert f"{index_dir} was built with checkpoint {setup['ckpts'][0]} (fingerprint 0123456789abcdef), which now " \
           f"gives fingerprint " in message
    assert message.endswith("Index the catalogue again") and "--ckpt" not in message


def test_a_checkpoint_on_a_backbone_with_other_weights_is_refused(setup, tmp_path):
    """A checkpoint records the identity of the backbone weights it was trained on (model.backbone_identity); one that
    is not the backbone's here (another model of the same architecture at that path) is refused in one line naming
    the checkpoint and both identities, before anything is searched.
    Catches: search.Model not handing the checkpoint's identity to load_encoder (`trained_on=trained_on` dropped: the
    trained state is loaded onto other weights and the query answered)."""
    ckpt = torch.load(setup["ckpts"][0], weights_only=False)
    ckpt["backbone_identity"] = "0123456789abcdef"
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as exit_info:
        search.main(["query", setup["index"], "--text", "red dress", "--ckpt", str(tmp_path / "other.pt")])
    message = str(exit_info.value.code)
    assert f"{tmp_path / 'other.pt'}: trained on a backbone with other weights than" in message
    assert "backbone identity 0123456789abcdef" in message


def test_index_encoded_on_another_device_is_searched_with_a_note(setup, tmp_path, capsys):
    """The same model computed another way (an index a GPU encoded in bf16, queried on this CPU in fp32) differs by
    rounding only: it is searched, not refused, and a note names both arithmetics. The index records its own.
    Fails when Index.__init__ refuses another arithmetic as it refuses another fingerprint, when the note is
    dropped, or when index_catalogue leaves the arithmetic out of meta.json."""
    gpu_index = tmp_path / "gpu-index"
    shutil.copytree(setup["index"], gpu_index)
    meta = json.loads((gpu_index / "meta.json").read_text())
    assert meta["arithmetic"] == "cpu-float32-sdpa"
    meta["arithmetic"] = "cuda-bfloat16-sdpa-packed"
    (gpu_index / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    search.main(["query", setup["index"], "--text", "red dress", "--json"])
    here = capsys.readouterr()
    search.main(["query", str(gpu_index), "--text", "red dress", "--json"])
    there = capsys.readouterr()
    assert there.out == here.out and "note:" not in here.err
    assert "encoded as cuda-bfloat16-sdpa-packed, queries here as cpu-float32-sdpa" in there.err


def test_shards_encoded_another_way_are_not_reused(setup, tmp_path, monkeypatch, capsys):
    """Indexing again into a folder whose shards were computed another way (here fp32 on a CPU; then, say, bf16 on a
    GPU) encodes every image again rather than mixing the two precisions in one index. The count printed is of the
    9 images embedded, not the 10 tried (one is unreadable).
    Fails when index_catalogue's shard folder leaves out model.arithmetic (shards/<fingerprint>: nothing encoded),
    or when Model.encode_targets counts the unreadable image as encoded."""
    out = tmp_path / "again"
    shutil.copytree(setup["index"], out)
    monkeypatch.setattr(search, "arithmetic", lambda cfg, encoder: "cuda-bfloat16-sdpa-packed")
    seen = []
    encode = search.Model.encode_targets
    monkeypatch.setattr(search.Model, "encode_targets", lambda self, paths, batch_size=None:
                        seen.extend(paths) or encode(self, paths, batch_size))
    search.main(["index", setup["ckpts"][0], "--catalog", setup["catalogue"], "--out", str(out)])
    assert sorted(seen) == sorted(item["path"] for item in search.read_catalogue(setup["catalogue"]))
    assert json.loads((out / "meta.json").read_text())["arithmetic"] == "cuda-bfloat16-sdpa-packed"
    assert "encoded 9 images in" in capsys.readouterr().out


def test_a_damaged_index_file_is_named(setup, tmp_path, capsys):
    """search.py writes an index folder's files atomically, so only later damage (by hand, a disk) leaves one that
    cannot be read: it must be named, not end in a JSONDecodeError or faiss traceback.
    Fails when Index.__init__ reads meta.json, index.faiss or items.jsonl without read_index_file (the JSON error,
    or faiss's RuntimeError, escapes: no SystemExit)."""
    for name, damage in (("meta.json", lambda b: b[:len(b) // 2]), ("index.faiss", lambda b: b""),
                         ("items.jsonl", lambda b: b + b"{not json\n")):
        damaged = tmp_path / name.replace(".", "-")
        shutil.copytree(setup["index"], damaged)
        (damaged / name).write_bytes(damage((damaged / name).read_bytes()))
        with pytest.raises(SystemExit) as exit_info:
            search.main(["query", str(damaged), "--text", "red dress"])
        assert f"{damaged / name}: cannot read this index file" in str(exit_info.value.code)


def test_a_meta_json_of_another_shape_is_named_and_indexing_over_it_replaces_it(setup, tmp_path, capsys):
    """A meta.json that parses but is not the object search.py writes (a JSON list, an object without its
    fingerprint) stops a query with a SearchError naming it, not an AttributeError or KeyError traceback; indexing
    into that folder replaces it like a failed build.
    Catches: read_meta without its shape check (the query ends in a TypeError/KeyError, indexing in an
    AttributeError in note_replaced_index)."""
    for name, meta in (("list", [1, 2]), ("no-fingerprint", {"checkpoint": "stub.pt"})):
        folder = tmp_path / name
        shutil.copytree(setup["index"], folder)
        (folder / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(SystemExit) as exit_info:
            search.main(["query", str(folder), "--text", "red dress"])
        assert f"{folder / 'meta.json'}: not the meta.json search.py writes" in str(exit_info.value.code)
        search.index_catalogue(stub_model(), setup["catalogue"], str(folder), progress=False)
        assert "note:" not in capsys.readouterr().out
        assert json.loads((folder / "meta.json").read_text())["checkpoint"] == "stub.pt"


def test_a_missing_index_file_is_named_and_faiss_errors_without_their_source_location(setup, tmp_path):
    """An index folder whose items.jsonl or index.faiss was deleted after indexing (meta.json still there) stops
    with a SearchError naming the missing file, not a FileNotFoundError traceback; a damaged index.faiss is named
    with faiss's own reason ("read error in ...") and without its C++ source location ("Error in
    std::unique_ptr<...> at /project/faiss/impl/index_read.cpp:...").
    Fails when read_index_file does not catch OSError, or gives a faiss error's whole text."""
    for name in ("items.jsonl", "index.faiss"):
        folder = tmp_path / ("no-" + name.replace(".", "-"))
        shutil.copytree(setup["index"], folder)
        (folder / name).unlink()
        with pytest.raises(SystemExit) as exit_info:
            search.main(["query", str(folder), "--text", "red dress"])
        assert f"{folder / name}: cannot read this index file" in str(exit_info.value.code)
    folder = tmp_path / "empty-faiss"
    shutil.copytree(setup["index"], folder)
    (folder / "index.faiss").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        search.main(["query", str(folder), "--text", "red dress"])
    message = str(exit_info.value.code)
    assert f"cannot read this index file (read error in {folder / 'index.faiss'}" in message
    assert "Error in" not in message and "index_read.cpp" not in message


def test_catalogue_jsonl_metadata_and_bad_lines(setup, tmp_path):
    """Catches: relative JSONL paths resolved against the working directory, an image listed twice indexed twice,
    a malformed line that is skipped silently or crashes without naming the line.
    Mutation run: read_catalogue's dedup removed (items returned as read): the length check fails."""
    rel = os.path.relpath(setup["paths"][0], tmp_path)
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": rel, "sku": "A1"}) + "\n\n"
                                         + json.dumps({"path": setup["paths"][0], "sku": "dup"}) + "\n")
    assert search.read_catalogue(str(tmp_path / "list.jsonl")) == [{"path": setup["paths"][0], "sku": "A1"}]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": rel}) + "\n" + '{"sku": "B2"}\n')
    with pytest.raises(search.DataError, match=r"bad.jsonl:2.*path"):
        search.read_catalogue(str(tmp_path / "bad.jsonl"))
    # An empty path would name the JSONL's folder as an image. Catches: `or not item["path"]` dropped.
    (tmp_path / "empty.jsonl").write_text(json.dumps({"path": rel}) + "\n" + '{"path": ""}\n')
    with pytest.raises(search.DataError, match=r"empty.jsonl:2.*non-empty"):
        search.read_catalogue(str(tmp_path / "empty.jsonl"))


def test_query_instruction_follows_the_task_template():
    """Catches: an instruction that is not the training data's phrasing, or a template filled with None.
    Mutation run: make_query's default task for images + text 'cir' -> 'inshop': the cir check fails."""
    assert make_query(text="a red dress")["instruction_text"] == "find images using the description text: a red dress"
    assert make_query(text="is red", images=["a.jpg"], category="dress")["instruction_text"] == (
        "find dress images matching the text modifications of the given image: is red")
    assert make_query(video="v.mp4")["instruction_text"] == (
        "find images that match the main cloth from the video provided")
    assert make_query(images=["a.jpg"], task="asfr", attribute="sleeve length")["instruction_text"] == (
        "find images with the same sleeve length with the provided image")
    with pytest.raises(SearchError, match="--attribute"):
        make_query(images=["a.jpg"], task="asfr")
    with pytest.raises(SearchError, match="takes no text"):
        make_query(text="red", images=["a.jpg"], task="sketch2i")
    # The Python API has no --task choices: an unknown task is named. An empty --text is no text. A video alone,
    # with an empty --instruction, is a query. Image and video paths are absolute (the query is printed and drawn).
    # Catches: the task check dropped (a KeyError); `if not values[name]` -> `if values[name] is None` (t2i of "");
    # the video left out of the empty-query check; relative image paths kept.
    with pytest.raises(SearchError, match="unknown task 'nope'"):
        make_query(text="red", task="nope")
    with pytest.raises(SearchError, match="needs --text"):
        make_query(text="")
    query = make_query(images=["a.jpg"], video="v.mp4", instruction="")
    assert query["query_image"] == [os.path.join(os.getcwd(), "a.jpg")]
    assert query["query_video"] == [os.path.join(os.getcwd(), "v.mp4")]
    assert make_query(video="v.mp4", instruction="")["instruction_text"] == ""


def test_approximate_indexes_build_and_search_like_exact_when_exhaustive(setup, tmp_path):
    """Catches: runtime parameters that are not applied (IVF probing one list, HNSW a narrow beam), training
    failures that surface as faiss tracebacks, a factory string not passed on by the command line.
    Mutation run: set_search_params setting nothing (names = set()): the IVF comparison fails (nprobe stays 1);
    new_index without its efConstruction line, or without its polysemous line: fails."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[:20] + 0.3 * rng.standard_normal((20, 16)).astype(np.float32)
    exact = np.argsort(-(queries @ x.T), axis=1)[:, :10]                        # brute force, numpy
    ivf = set_search_params(build_index(x, "IVF8,Flat", train_size=200), nprobe=8)
    assert (ivf.search(queries, 10)[1] == exact).all()                           # every list probed: exact
    assert not (set_search_params(ivf, nprobe=1).search(queries, 10)[1] == exact).all()
    hnsw = set_search_params(build_index(x, "HNSW16"), ef_search=300)
    assert (hnsw.search(queries, 10)[1] == exact).all()
    # The build settings docs/ann_search.md measured: a deeper HNSW build, no polysemous training for IVF-PQ.
    assert hnsw.hnsw.efConstruction == 128
    pq = build_index(x, "IVF4,PQ4x4", train_size=300)          # kept referenced: faiss's views do not own it
    assert not faiss.downcast_index(faiss.try_extract_index_ivf(pq)).do_polysemous_training
    with pytest.raises(SearchError, match="not a faiss factory string"):
        build_index(x, "IVF8,Bogus")
    with pytest.raises(SearchError, match=r"training on 300 vectors failed.*at least as large"):
        build_index(x, "IVF512,Flat")

    # The command line: another factory over the same shards (nothing encoded again), queried with its nprobe.
    out = tmp_path / "ivf"
    shutil.copytree(os.path.join(setup["index"], "shards"), out / "shards")
    search.main(["index", setup["ckpts"][0], "--catalog", setup["catalogue"], "--out", str(out), "--index",
                 "IVF2,Flat"])
    assert json.loads((out / "meta.json").read_text())["factory"] == "IVF2,Flat"
    assert "IVF" in type(faiss.downcast_index(faiss.read_index(str(out / "index.faiss")))).__name__
    args = ["--text", "a red dress", "-k", "5"]
    approx = search.main(["query", str(out), *args, "--nprobe", "2"])
    # --nprobe 1 probes one of the two lists, which holds fewer than the catalogue's 9 readable images.
    assert len(search.main(["query", str(out), "--text", "a red dress", "-k", "9", "--nprobe", "1"])) < 9
    exact = search.main(["query", setup["index"], *args])
    assert [r["path"] for r in approx] == [r["path"] for r in exact]
    np.testing.assert_allclose([r["score"] for r in approx], [r["score"] for r in exact], atol=1e-5)


class BytesEncoder:
    """Stand-in for the encoder: an image's embedding from a hash of its bytes; reads it as model.py does (an
    unreadable image raises DataError)."""
    embed_dim = 16

    def encode_targets(self, paths, batch_size=32):
        from media import load_image
        rows = []
        for path in paths:
            load_image(path)
            seed = int.from_bytes(open(path, "rb").read()[-8:], "little") % 2 ** 63
            rows.append(torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(seed)),
                                                      dim=0))
        return torch.stack(rows)


def stub_model():
    from config import Config
    model = search.Model.__new__(search.Model)        # Model's own tolerant encode_targets, no checkpoint load
    model.ckpt, model.cfg, model.fingerprint, model.arithmetic, model.batch_size = "stub.pt", Config(), "stub", "cpu", 2
    model.encoder, model.unreadable, model.encoded = BytesEncoder(), {}, 0
    return model


def distributed_worker(rank, world, init_file, catalogue, out):
    join_gloo(rank, world, init_file)
    model = stub_model()
    search.index_catalogue(model, catalogue, out, progress=False)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(model.encoded, f)
    torch.distributed.destroy_process_group()


def index_by_one_and_by_two_processes(catalogue, tmp_path):
    """`catalogue` indexed by stub_model in one process and in two (gloo): the two index folders and the count of
    images each of the two ranks encoded."""
    import torch.multiprocessing as mp
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    search.index_catalogue(stub_model(), catalogue, one, progress=False)
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), catalogue, two), nprocs=2, join=True)
    return one, two, [json.load(open(os.path.join(two, f"rank{r}.json"))) for r in range(2)]


def test_two_processes_index_like_one(setup, tmp_path):
    """Catches: ranks that encode the same images (or drop some), an unreadable image met by rank 1 that rank 0
    does not report, shards of one rank only in the index.
    Mutation run: index_catalogue's reasons from this rank only (dict(model.unreadable.items()) instead of the
    gather): the broken image's reason is lost; encode_gallery given paths[rank::size] on every rank: the paths
    differ."""
    one, two, encoded = index_by_one_and_by_two_processes(setup["catalogue"], tmp_path)
    paths, emb = indexed(two)
    reference_paths, reference = indexed(one)
    assert paths == reference_paths and len(paths) == 9
    np.testing.assert_array_equal(emb, reference)
    # 10 images split 5 and 5; the unreadable one, rank 1's, is not counted as encoded.
    assert encoded == [5, 4]
    skipped = json.loads(open(os.path.join(two, "meta.json")).read())["skipped"]
    assert [s["path"] for s in skipped] == [setup["broken"]] and "cannot read image" in skipped[0]["reason"]


def test_two_processes_encode_an_odd_catalogue_once(setup, tmp_path):
    """A catalogue of 9 (8 readable, the broken one second: rank 1's) split over 2 processes: rank 0 encodes items
    0, 2, 4, 6, 8 and rank 1 items 1, 3, 5, 7, and the index is 1 process's. The "encoded N images" line sums the
    ranks' counts, so it said 9 images where one process says 8 (rank 1 also encoded the padding, item 8 again).
    Catches: encode_sharded encoding its padding (every rank sends as many rows, so the padding was a copy of the
    last item run through the model: [5, 4])."""
    catalogue = tmp_path / "odd.jsonl"
    paths = [sorted(setup["paths"])[0], setup["broken"], *sorted(setup["paths"])[1:-1]]
    catalogue.write_text("".join(json.dumps({"path": p}) + "\n" for p in paths))
    one, two, encoded = index_by_one_and_by_two_processes(str(catalogue), tmp_path)
    assert encoded == [5, 3]
    (got_paths, got), (want_paths, want) = indexed(two), indexed(one)
    assert got_paths == want_paths == [p for p in paths if p != setup["broken"]]
    np.testing.assert_array_equal(got, want)


def test_two_processes_index_a_catalogue_of_one_image(setup, tmp_path):
    """Fewer images than processes: rank 1 has nothing to encode and sends one zero row, of the width rank 0 tells
    it; the index is rank 0's one image, as one process indexes it.
    Catches: the width not sent to a rank without images (its zero row has no width: the run fails)."""
    catalogue = tmp_path / "one.jsonl"
    catalogue.write_text(json.dumps({"path": setup["paths"][0]}) + "\n")
    one, two, encoded = index_by_one_and_by_two_processes(str(catalogue), tmp_path)
    assert encoded == [1, 0]
    (got_paths, got), (want_paths, want) = indexed(two), indexed(one)
    assert got_paths == want_paths == [setup["paths"][0]]
    np.testing.assert_array_equal(got, want)


def stub_index(tmp_path, setup, factory="Flat"):
    """An index folder of the catalogue built by stub_model (no checkpoint, embeddings from the image bytes)."""
    out = str(tmp_path / f"stub-{factory.replace(',', '-')}")
    search.index_catalogue(stub_model(), setup["catalogue"], out, factory=factory, progress=False)
    return out


def test_a_shard_of_another_width_is_refused_naming_it(setup, tmp_path):
    """A shard of the index folder holding embeddings of another width than the model's (a shard copied from
    another model's folder) was indexed as it was: here, the catalogue's only shard, an index 32 wide on which every
    16-wide query fails; beside shards of the right width, torch.stack's error. It is now a DataError naming the
    shard, both widths and the folder to delete, which search.main prints in one line.
    Catches: load_cache's shape and dtype check removed (`if not (...)` -> `if False`: no DataError), or
    search.Model without its embed_dim property (an AttributeError)."""
    from plumbing import DataError
    out = stub_index(tmp_path, setup)
    shards = os.path.join(out, "shards", "stub-cpu")
    shard = sorted(os.path.join(shards, name) for name in os.listdir(shards))[0]
    saved = torch.load(shard, weights_only=True)
    rows = len(saved["keys"])
    torch.save({"keys": saved["keys"], "emb": torch.cat([saved["emb"]] * 2, dim=1)}, shard)
    with pytest.raises(DataError) as err:
        search.index_catalogue(stub_model(), setup["catalogue"], out, progress=False)
    assert str(err.value) == (f"{shard}: cache chunk holds torch.float32 [{rows}, 32] embeddings, expected "
                              f"torch.float32 [{rows}, 16] (one row of the model's width per image): not written for "
                              f"this model; delete the cache folder {shards}")


def test_an_approximate_index_returning_fewer_than_k_gives_only_real_hits(setup, tmp_path):
    """An IVF index probing one of two lists holds fewer than k candidates: faiss pads with id -1, which must not come
    back as a result (items[-1], the last catalogue image, with score -3.4e38). Every result returned is a real
    catalogue image whose score is its cosine with the query, computed here with numpy from the exact index.
    Catches: Index.search keeping id -1 (`if i >= 0` dropped)."""
    exact_dir, ivf_dir = stub_index(tmp_path, setup), stub_index(tmp_path, setup, "IVF2,Flat")
    paths, vectors = indexed(exact_dir)
    cosine = dict(zip(paths, vectors @ vectors[0]))
    index = search.Index(ivf_dir, stub_model(), nprobe=1)
    results = index.search(torch.from_numpy(vectors[:1]), k=9)[0]
    assert 0 < len(results) < 9                                    # the probed list does not hold all 9
    assert len({r["path"] for r in results}) == len(results)
    for r in results:
        assert r["score"] == pytest.approx(float(cosine[r["path"]]), abs=1e-5)


def test_a_readable_image_or_query_with_a_non_finite_embedding_stops_the_run(setup):
    """A NaN row means "unreadable" to the index; a readable image that embeds to NaN or to all zeros is a broken model
    and must stop the run, naming the image, never be skipped as unreadable or indexed. The same for a query.
    Catches: Model.encode_targets' broken-model check removed (the image is skipped silently); Model.encode_queries'
    check removed (a NaN query ranks arbitrarily); evaluate.UNUSABLE without "all-zero" (a zero row scores 0
    against everything)."""
    class NaNFor(BytesEncoder):
        def __init__(self, bad):
            self.bad = bad

        def encode_targets(self, paths, batch_size=32):
            emb = super().encode_targets(paths, batch_size)
            emb[[i for i, p in enumerate(paths) if p == self.bad]] = float("nan")
            return emb

        def encode_queries(self, queries, batch_size=32):
            return torch.full((len(queries), self.embed_dim), float("nan"))

    class ZeroFor(NaNFor):
        def encode_targets(self, paths, batch_size=32):
            return torch.nan_to_num(super().encode_targets(paths, batch_size), nan=0.0)

        def encode_queries(self, queries, batch_size=32):
            return torch.zeros(len(queries), self.embed_dim)

    model = stub_model()
    model.encoder = NaNFor(setup["paths"][3])
    with pytest.raises(SearchError, match=r"non-finite embedding \(.*\) of " + re.escape(setup["paths"][3])):
        model.encode_targets(setup["paths"][:5])
    with pytest.raises(SearchError, match=r"non-finite embedding \(.*\) of query query"):
        model.encode_queries([make_query(text="red")])
    model.encoder = ZeroFor(setup["paths"][3])
    with pytest.raises(SearchError, match=r"all-zero embedding \(.*\) of " + re.escape(setup["paths"][3])):
        model.encode_targets(setup["paths"][:5])
    with pytest.raises(SearchError, match=r"all-zero embedding \(.*\) of query query"):
        model.encode_queries([make_query(text="red")])


def test_a_broken_query_embedding_names_its_own_query(setup):
    """Of two queries, q1 (finite) and q2 (NaN, then all zeros), the refusal names q2, the one the model broke.
    Catches: Model.encode_queries naming the first query of the batch (`queries[bad[0]]['id']` ->
    `queries[0]['id']`)."""
    class SecondBroken:
        embed_dim = 16

        def __init__(self, value):
            self.value = value

        def encode_queries(self, queries, batch_size=32):
            emb = torch.nn.functional.normalize(torch.ones(len(queries), self.embed_dim), dim=1)
            emb[1] = self.value
            return emb

    model = stub_model()
    queries = [dict(make_query(text="red"), id="q1"), dict(make_query(text="blue"), id="q2")]
    for value, kind in ((float("nan"), "non-finite"), (0.0, "all-zero")):
        model.encoder = SecondBroken(value)
        with pytest.raises(SearchError, match=rf"^{kind} embedding \(.*\) of query q2$"):
            model.encode_queries(queries)


def test_a_failed_reindex_leaves_no_finished_marker(setup, tmp_path, monkeypatch):
    """meta.json marks a finished index: indexing again into a finished folder removes it first, so a run that dies
    while writing index.faiss leaves a folder that Index refuses rather than one whose meta.json describes files of
    two runs.
    Catches: index_catalogue not removing the old meta.json before writing the new files."""
    out = stub_index(tmp_path, setup)
    assert os.path.exists(os.path.join(out, "meta.json"))

    def die(index, path):
        raise OSError("disk full")

    monkeypatch.setattr(search.faiss, "write_index", die)
    with pytest.raises(OSError, match="disk full"):
        search.index_catalogue(stub_model(), setup["catalogue"], out, factory="IVF2,Flat", progress=False)
    assert not os.path.exists(os.path.join(out, "meta.json"))
    with pytest.raises(SearchError, match="no meta.json"):
        search.Index(out, stub_model())


def test_items_out_of_step_with_the_index_are_refused(setup, tmp_path):
    """items.jsonl line i describes vector i: a folder where they disagree in number (changed by hand) is refused; so
    is an index.faiss of another width than the model's, narrower or wider (every query failed in a reshape).
    Catches: Index.__init__'s items / ntotal comparison removed; its width comparison removed, or made one-sided
    (`self.index.d != model.embed_dim` -> `self.index.d < model.embed_dim`: the 32-wide index is searched)."""
    out = stub_index(tmp_path, setup)
    items = open(os.path.join(out, "items.jsonl")).read().splitlines()
    with open(os.path.join(out, "items.jsonl"), "w") as f:
        f.write("\n".join(items[:-1]) + "\n")
    with pytest.raises(SearchError, match="lists 8 images, index.faiss holds 9"):
        search.Index(out, stub_model())
    with open(os.path.join(out, "items.jsonl"), "w") as f:
        f.write("\n".join(items) + "\n")
    for width in (8, 32):                           # 9 vectors again, each narrower or wider than the model's 16
        other = faiss.IndexFlatIP(width)
        other.add(np.random.default_rng(0).standard_normal((9, width)).astype(np.float32))
        faiss.write_index(other, os.path.join(out, "index.faiss"))
        with pytest.raises(SearchError, match=f"index.faiss holds vectors of width {width}, the model gives 16"):
            search.Index(out, stub_model())


def test_approximate_index_training_sample_is_seeded():
    """An IVF index trained on a sample of train_size vectors: the same seed gives the same sample and so the same
    coarse centroids (faiss's k-means is itself seeded); another seed another sample.
    Catches: the training sample drawn from an unseeded generator."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def centroids(seed):
        index = build_index(x, "IVF4,Flat", train_size=100, seed=seed)
        return faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).reconstruct_n(0, 4)

    np.testing.assert_array_equal(centroids(0), centroids(0))
    assert not np.allclose(centroids(0), centroids(1))


def test_approximate_index_trains_on_a_sample_of_distinct_vectors(monkeypatch):
    """--train-size caps the vectors an approximate index is trained on: over the cap, k-means gets train_size
    distinct catalogue vectors (a sample without repeats, as faiss subsamples a k-means training set itself); at or
    under it, every vector once. A sample with repeats would train on fewer points than asked and weigh the repeated
    ones twice. The sample handed to train() is read back and matched to the catalogue's rows by hand.
    Catches: the sample drawn with replacement (`replace=False` -> `replace=True`: about 54 repeats among 200 draws
    of 300); the cap ignored (`len(x) > train_size` -> `False`: all 300 trained on)."""
    class Recorder:        # stands in for the faiss index: keeps what build_index trains it on
        is_trained = False

        def train(self, x):
            self.sample = x.copy()

        def add(self, x):
            self.added = x.copy()

    monkeypatch.setattr(search, "new_index", lambda dim, factory: Recorder())
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    row_of = {row.tobytes(): i for i, row in enumerate(x)}
    for n, train_size, expected in ((300, 200, 200), (300, 300, 300), (120, 200, 120)):
        index = build_index(x[:n], "IVF4,Flat", train_size=train_size)
        rows = [row_of[row.tobytes()] for row in index.sample]
        assert len(rows) == len(set(rows)) == expected and max(rows) < n, (n, train_size)
        np.testing.assert_array_equal(index.added, x[:n])


def test_printed_results_show_rank_score_path_and_the_items_metadata(capsys):
    """What `search.py query` prints without --json, written out by hand: the query (instruction, then its media),
    then per hit its rank, score to 4 places, path, and the catalogue's metadata for it as JSON, its characters as
    written in the catalogue (a JSONL's "Robe d'été", not "Robe d'\\u00e9t\\u00e9"); a hit without metadata ends at its
    path. Catches: the metadata left out, or holding rank, score or path again; non-ASCII metadata printed as
    escapes (json.dumps' default ensure_ascii); the media left off the query line."""
    query = {"id": "query", "instruction_text": "find dress images matching the text modifications of the given "
             "image: is red", "query_image": ["/shop/ref.jpg"], "query_video": []}
    results = [{"rank": 1, "score": 0.912345, "path": "/shop/a.jpg", "sku": "A1", "name": "Robe d'été"},
               {"rank": 2, "score": 0.5, "path": "/shop/b.jpg"}]
    search.print_results(query, results, as_json=False)
    assert capsys.readouterr().out == (
        "query: 'find dress images matching the text modifications of the given image: is red' + /shop/ref.jpg\n"
        "   1  0.9123  /shop/a.jpg  {\"sku\": \"A1\", \"name\": \"Robe d'été\"}\n"
        "   2  0.5000  /shop/b.jpg\n")


def test_index_catalogue_trains_on_the_sample_its_seed_draws(setup, tmp_path):
    """`search.py index --seed S` (meta.json records it): the IVF index written has the coarse centroids of
    build_index trained on the sample seed S draws from the same vectors, not seed 0's.
    Catches: index_catalogue not passing its seed on to build_index (meta.json then names a seed that was not used)."""
    _, vectors = indexed(stub_index(tmp_path, setup))

    def centroids(index):
        return faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).reconstruct_n(0, 2)

    out = str(tmp_path / "seeded")
    meta = search.index_catalogue(stub_model(), setup["catalogue"], out, factory="IVF2,Flat", train_size=4, seed=3,
                                  progress=False)
    assert meta["seed"] == 3
    written = centroids(faiss.read_index(os.path.join(out, "index.faiss")))
    seed3, seed0 = (build_index(vectors, "IVF2,Flat", train_size=4, seed=seed) for seed in (3, 0))
    np.testing.assert_array_equal(written, centroids(seed3))
    assert not np.allclose(written, centroids(seed0))


def test_query_and_catalogue_edge_cases(tmp_path):
    """A video with text has no template (video2img takes no text); an empty instruction with no media is an empty
    query; hidden files in a catalogue folder (e.g. macOS ._ files) are not catalogue images.
    Catches: a video with text inferred as cir; the empty-query check removed; read_catalogue listing dot files."""
    with pytest.raises(SearchError, match="video2img .* takes no text"):
        make_query(text="red", video="clip.mp4")
    with pytest.raises(SearchError, match="an empty query"):
        make_query(instruction="")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "._a.jpg").write_bytes(b"x")
    assert [item["path"] for item in search.read_catalogue(str(tmp_path))] == [str(tmp_path / "a.jpg")]


def test_catalogue_folder_lists_images_whatever_the_case_of_their_extension(tmp_path):
    """Cameras and exports write IMG_0001.JPG or photo.Png: every image file of a catalogue folder is indexed, whatever
    the case of its extension; other files are not.
    Catches: read_catalogue matching extensions case-sensitively (upper-case files dropped without a word)."""
    for name in ("a.jpg", "B.JPG", "c.Png", "d.jpeg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [item["path"] for item in search.read_catalogue(str(tmp_path))] == [
        str(tmp_path / name) for name in ("B.JPG", "a.jpg", "c.Png", "d.jpeg")]


def test_catalogue_folder_order_is_the_sorted_paths_whatever_order_the_filesystem_lists(tmp_path, monkeypatch):
    """A catalogue folder is read in the order of its sorted paths, which every rank and every machine agree on, not
    in the order the filesystem lists folders (on ext4 a hash order; stood in for here by os.walk listing them in
    reverse order). A folder without images is refused, naming it.
    Catches: read_catalogue walking in the filesystem's order (`sorted(os.walk(...))` -> `os.walk(...)`); the
    empty-catalogue check dropped (an index of nothing)."""
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(b"x")
    walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top: sorted(walk(top), reverse=True))
    assert [item["path"] for item in search.read_catalogue(str(tmp_path))] == [
        str(tmp_path / folder / "x.jpg") for folder in ("a", "b", "c")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(search.DataError, match="no images in the catalogue") as err:
        search.read_catalogue(str(tmp_path / "empty"))
    assert err.value.path == str(tmp_path / "empty")


def test_only_embedded_images_are_counted_and_a_catalogue_of_none_is_refused(setup, tmp_path):
    """Model.encoded (the count behind "encoded N images (... images/s)") counts the images embedded: a batch of a
    readable image and the truncated JPEG adds 1 and records the JPEG as unreadable. A catalogue whose every image
    is unreadable is a SearchError naming it, and no finished index is written.
    Catches: every path counted (`self.encoded += len(paths)`); the no-readable-image check dropped (an index of
    no vectors, marked finished)."""
    model = stub_model()
    emb = model.encode_targets([setup["paths"][0], setup["broken"]])
    assert model.encoded == 1 and list(model.unreadable) == [setup["broken"]]
    assert torch.isfinite(emb[0]).all() and torch.isnan(emb[1]).all()
    catalogue, out = tmp_path / "broken-only", str(tmp_path / "index")
    catalogue.mkdir()
    shutil.copy(setup["broken"], catalogue)
    with pytest.raises(SearchError, match=f"{catalogue}: no readable image in the catalogue"):
        search.index_catalogue(stub_model(), str(catalogue), out, progress=False)
    assert not os.path.exists(os.path.join(out, "meta.json"))


def test_an_index_file_of_another_width_is_refused_naming_both(setup, tmp_path):
    """An index.faiss replaced by hand with one of other vectors (32 wide, as many as items.jsonl lists) is refused
    when opened, naming both widths, instead of failing in every query's reshape.
    Catches: Index's width check dropped (`if self.index.d != model.embed_dim` -> `if False`)."""
    out = stub_index(tmp_path, setup)
    model = stub_model()
    wide = faiss.IndexFlatIP(32)
    wide.add(np.zeros((search.Index(out, model).index.ntotal, 32), dtype=np.float32))
    faiss.write_index(wide, os.path.join(out, "index.faiss"))
    with pytest.raises(SearchError, match="index.faiss holds vectors of width 32, the model gives 16"):
        search.Index(out, model)


def test_ef_search_reaches_an_hnsw_coarse_quantizer():
    """An IVF index with an HNSW coarse quantizer (IVF..._HNSW.., the large-catalogue setting) explores ef_search
    candidates when it picks the lists to probe, as --ef-search says; read back from faiss.
    Catches: set_search_params leaving out quantizer_efSearch (the quantizer keeps faiss's default of 16)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    index = set_search_params(build_index(x / np.linalg.norm(x, axis=1, keepdims=True), "IVF8_HNSW4,Flat"),
                              nprobe=3, ef_search=77)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == 3
    assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 77


def test_query_command_line_builds_the_query_its_options_name(setup, tmp_path, capsys):
    """`search.py query` builds the query from --task, --category, --attribute, --instruction and --video as U-FIRE
    words its instructions (written out here by hand), prints it with --json, and returns -k results.
    Catches: run_query not passing one of --video, --task, --category, --attribute, --instruction on to make_query
    (the query becomes another task's, or is refused); -k ignored (10 results: all 9 images)."""
    from test_model import write_mp4
    image = sorted(setup["paths"])[0]
    write_mp4(tmp_path / "clip.mp4", 4, 0)

    def printed(*options):
        results = search.main(["query", setup["index"], *options, "-k", "2", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert out["results"] == results and len(results) == 2
        return out

    asfr = printed("--image", image, "--task", "asfr", "--attribute", "sleeve length")
    assert asfr["instruction"] == "find images with the same sleeve length with the provided image"
    cir = printed("--image", image, "--text", "is red", "--category", "dress")
    assert cir["instruction"] == "find dress images matching the text modifications of the given image: is red"
    own = printed("--image", image, "--instruction", "my own words")
    assert own["instruction"] == "my own words" and own["query_image"] == [image]
    clip = printed("--video", str(tmp_path / "clip.mp4"))
    assert clip["instruction"] == "find images that match the main cloth from the video provided"
    assert clip["query_video"] == [str(tmp_path / "clip.mp4")] and clip["query_image"] == []


def test_index_and_query_command_lines_pass_their_options_on(setup, tiny_backbone, tmp_path, monkeypatch):
    """`search.py index --index IVF2,Flat --train-size 4 --seed 3 --batch-size 3 --backbone DIR` on a checkpoint
    whose saved backbone is gone: the catalogue is encoded in batches of 3 by the backbone --backbone names, and the
    index written has the coarse centroids build_index trains on the 4-vector sample seed 3 draws from the same
    embeddings (those of the exact index). `search.py query --backbone DIR --batch-size 3` encodes the query so.
    Catches: main not passing --train-size, --seed, --batch-size or --backbone on (index: defaults 200,000 vectors,
    seed 0, train.eval_batch_size 32; a missing backbone); run_query not passing --backbone or --batch-size on."""
    import model
    sizes = {"targets": [], "queries": []}
    for what in sizes:
        real = getattr(model.Encoder, f"encode_{what}")
        monkeypatch.setattr(model.Encoder, f"encode_{what}", lambda self, items, batch_size=32, progress=False,
                            real=real, what=what: sizes[what].append(batch_size) or real(self, items, batch_size))
    saved = torch.load(setup["ckpts"][0], weights_only=True)
    saved["config"]["model"]["backbone"] = str(tmp_path / "moved-away")
    ckpt, out = str(tmp_path / "moved.pt"), str(tmp_path / "ivf")
    torch.save(saved, ckpt)
    with pytest.raises(SystemExit, match="moved-away"):
        search.main(["index", ckpt, "--catalog", setup["catalogue"], "--out", out])
    meta = search.main(["index", ckpt, "--catalog", setup["catalogue"], "--out", out, "--index", "IVF2,Flat",
                        "--train-size", "4", "--seed", "3", "--batch-size", "3", "--backbone", tiny_backbone])
    assert max(sizes["targets"]) == 3

    def centroids(index):
        return faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).reconstruct_n(0, 2)

    paths, vectors = indexed(setup["index"])
    assert [json.loads(line)["path"] for line in open(os.path.join(out, "items.jsonl"))] == paths
    written = centroids(faiss.read_index(os.path.join(out, "index.faiss")))
    np.testing.assert_allclose(written, centroids(build_index(vectors, "IVF2,Flat", train_size=4, seed=3)), atol=1e-5)
    for other in ({"train_size": 4, "seed": 0}, {"train_size": 9, "seed": 3}):
        assert not np.allclose(written, centroids(build_index(vectors, "IVF2,Flat", **other)), atol=1e-3), other
    assert (meta["train_size"], meta["seed"]) == (4, 3)

    results = search.main(["query", out, "--text", "a red dress", "--nprobe", "2", "--backbone", tiny_backbone,
                           "--batch-size", "3"])
    assert len(results) == 9 and sizes["queries"] == [3]


def test_query_command_line_sets_ef_search(setup, tmp_path, monkeypatch):
    """`search.py query --ef-search 7` on an HNSW index: the index searched explores 7 candidates (read back from
    faiss). Catches: run_query not passing --ef-search on (faiss then explores search.EF_SEARCH = 256)."""
    out = tmp_path / "hnsw"
    shutil.copytree(os.path.join(setup["index"], "shards"), out / "shards")      # nothing encoded again
    search.main(["index", setup["ckpts"][0], "--catalog", setup["catalogue"], "--out", str(out), "--index", "HNSW8"])
    opened, real = [], search.set_search_params
    monkeypatch.setattr(search, "set_search_params", lambda *args: opened.append(real(*args)) or opened[-1])
    assert len(search.main(["query", str(out), "--text", "a red dress", "--ef-search", "7"])) == 9
    assert [faiss.downcast_index(index).hnsw.efSearch for index in opened] == [7]


def test_k_and_batch_size_below_1_are_usage_errors(capsys):
    """query -k 0 or -k -2 ended in a bare AssertionError from faiss, --batch-size -1 in an IndexError, with
    tracebacks naming neither option. Fails when parse_args stops checking them (the parse succeeds)."""
    for argv, option in ((["query", "idx", "--text", "x", "-k", "0"], "-k"), (["query", "idx", "-k", "-2"], "-k"),
                         (["query", "idx", "--batch-size", "-1"], "--batch-size"),
                         (["index", "c.pt", "--catalog", "c", "--out", "o", "--batch-size", "0"], "--batch-size")):
        with pytest.raises(SystemExit) as e:
            search.parse_args(argv)
        assert e.value.code == 2 and f"{option} must be at least 1" in capsys.readouterr().err
    assert search.parse_args(["query", "idx", "-k", "1", "--batch-size", "1"]).k == 1
    # --instruction is the whole instruction: with --task (whose template it replaces) it is a usage error too.
    # Catches: only --text checked (`args.instruction and args.text`: the --task is dropped without a word).
    for extra in (["--text", "red"], ["--task", "t2i"]):
        with pytest.raises(SystemExit) as e:
            search.parse_args(["query", "idx", "--instruction", "find a red dress", *extra])
        assert e.value.code == 2 and "give it without --text and --task" in capsys.readouterr().err


def test_an_index_out_that_is_a_file_is_refused_before_anything_is_read(tmp_path):
    """`search.py index CKPT --out FILE` ends in one line naming FILE before the checkpoint is read (here there is
    none), and FILE is left as it was.
    Catches: main not checking --out (a NotADirectoryError traceback at the first shard, after the model load)."""
    taken = tmp_path / "index"
    taken.write_text("mine\n")
    with pytest.raises(SystemExit) as e:
        search.main(["index", str(tmp_path / "missing.pt"), "--catalog", str(tmp_path), "--out", str(taken)])
    assert e.value.code == f"search.py: {taken}: not a folder (--out: the index is written into it)"
    assert taken.read_text() == "mine\n"


def test_a_show_path_that_cannot_be_written_is_refused_before_the_search(tmp_path):
    """query --show into a folder that does not exist, or naming a folder, ends in one line naming the path before
    the index is even opened (here there is none); nothing is created.
    Catches: run_query without its --show check (the `if args.show and (...)` removed: the search runs, then
    contact_sheet's FileNotFoundError / IsADirectoryError traceback names only a temporary file)."""
    missing = tmp_path / "sheets" / "sheet.png"
    for show, why in ((missing, f"no folder {missing.parent}"), (tmp_path, "a folder")):
        with pytest.raises(SystemExit) as e:
            search.main(["query", str(tmp_path / "no-index"), "--text", "x", "--show", str(show)])
        assert e.value.code == f"search.py: --show {show}: cannot write a PNG there ({why})"
    assert not os.listdir(tmp_path)


def test_a_catalogue_line_that_is_not_utf8_is_named(tmp_path):
    """A Latin-1 JSONL catalogue ended search.py index in a UnicodeDecodeError traceback naming neither the file nor
    the line. Fails when read_catalogue decodes the file as text before json.loads (the error escapes)."""
    (tmp_path / "latin1.jsonl").write_bytes(b'{"path": "a.jpg"}\n{"path": "caf\xe9.jpg"}\n')
    with pytest.raises(search.DataError, match=r"latin1.jsonl:2: not a JSON line"):
        search.read_catalogue(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "utf8.jsonl").write_bytes('{"path": "café.jpg", "name": "Crêpe"}\n'.encode())
    assert search.read_catalogue(str(tmp_path / "utf8.jsonl")) == [{"path": str(tmp_path / "café.jpg"),
                                                                    "name": "Crêpe"}]


def test_indexing_into_the_index_of_another_checkpoint_or_catalogue_says_it_is_replaced(setup, tmp_path, capsys,
                                                                                       monkeypatch):
    """`search.py index` into a folder holding another checkpoint's (or catalogue's) finished index replaced it
    without a word. It now prints a note naming the index it replaces; indexing the same model and catalogue again
    (a resume, or a rebuild with other faiss options) prints none.
    Catches: the note_replaced_index call removed (no note); its comparison made `!=` on the fingerprint alone (no
    note for another catalogue) or always true (a note on a plain rebuild)."""
    out = str(tmp_path / "index")
    model = stub_model()
    search.index_catalogue(model, setup["catalogue"], out, progress=False)
    search.index_catalogue(model, setup["catalogue"], out, factory="IVF2,Flat", train_size=4, progress=False)
    assert "note:" not in capsys.readouterr().out
    other = stub_model()
    other.ckpt, other.fingerprint = "other.pt", "other"
    search.index_catalogue(other, setup["catalogue"], out, progress=False)
    assert (f"note: {out} holds the index of checkpoint stub.pt over {os.path.abspath(setup['catalogue'])}; this run "
            f"replaces it (its embeddings stay in {os.path.join(out, 'shards')})") in capsys.readouterr().out
    smaller = tmp_path / "smaller"
    shutil.copytree(os.path.join(setup["catalogue"], "shoes"), smaller)
    search.index_catalogue(other, str(smaller), out, progress=False)
    assert f"note: {out} holds the index of checkpoint other.pt over {setup['catalogue']}" in capsys.readouterr().out
    # The same catalogue named by a relative path is the same catalogue: no note. A damaged meta.json is replaced as
    # a failed build's would be. Catches: the catalogue compared as given (`os.path.abspath` dropped: a note on a
    # plain rebuild); note_replaced_index letting read_meta's SearchError through (`except SearchError` ->
    # `except ValueError`: the rebuild stops).
    monkeypatch.chdir(tmp_path)
    search.index_catalogue(other, "smaller", out, progress=False)
    assert "note:" not in capsys.readouterr().out
    with open(os.path.join(out, "meta.json"), "w") as f:
        f.write("{not json")
    meta = search.index_catalogue(other, "smaller", out, progress=False)
    assert meta["vectors"] == len(search.read_catalogue(str(smaller))) and "note:" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- benchmarks/ann_search.py

def test_ann_overlap_recall_is_the_fraction_of_the_exact_top_k_found():
    """Two queries of an exact top 4: the first finds 2 of its 4 (and a faiss "no result" -1), the second all 4 in
    another order: 3 of 4 on average. Catches: hits summed instead of averaged over queries, the count not divided
    by K (2 of 4 -> 2.0)."""
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert ann_search.overlap_recall(np.array([[4, 3, 9, -1], [8, 7, 6, 5]]), exact) == 0.75
    assert ann_search.overlap_recall(np.array([[4, 3, 9, -1]]), exact[:1]) == 0.5


def test_ann_timed_search_gives_queries_per_cpu_second_of_the_median_search(monkeypatch):
    """A search of 100 queries taking 0.5, 0.9, 0.2 CPU s is timed three times: median 0.5 s, 200 queries/s; one
    taking 2 CPU s is timed once: 50 queries/s. Catches: the mean (1.6 / 3 s) or the fastest search instead of the
    median, the search repeated when it takes over a second, the rate of one query instead of the batch."""
    clock = [0.0]
    monkeypatch.setattr(ann_search.time, "process_time", lambda: clock[0])

    class Index:
        def __init__(self, durations):
            self.durations, self.calls = list(durations), 0

        def search(self, queries, k):
            clock[0] += self.durations[self.calls]
            self.calls += 1
            return None, np.zeros((len(queries), k), dtype=np.int64)

    queries = np.zeros((100, 4), dtype=np.float32)
    index = Index([0.5, 0.9, 0.2])
    ids, qps = ann_search.timed_search(index, queries)
    assert ids.shape == (100, ann_search.K) and qps == pytest.approx(200) and index.calls == 3
    index = Index([2.0])
    assert ann_search.timed_search(index, queries)[1] == pytest.approx(50) and index.calls == 1


def test_ann_index_types_follow_the_documented_size_rules():
    """nlist = round(4 sqrt(N)), trained on min(N, 39 nlist) rows, one PQ code per 4 dimensions, 8 bits unless the
    training sample is under 256 rows (then floor(log2 rows)), by hand; the factories docs/ann_search.md lists
    (IVF1265 at 100k, IVF4000 at 1M, PQ32x6 and PQ32 on U-FIRE-mini galleries of 80 and 394).
    Catches: nlist truncated (IVF1264), the training sample not capped at N, bits rounded (PQ32x7 at 100 rows),
    8-bit codes given to a sample under 256 rows, codes per 8 dimensions."""
    def factories(n, dim):
        return {name: (factory, train) for name, (factory, train, _) in ann_search.index_types(n, dim).items()}
    assert factories(100_000, 256) == {"Flat": ("Flat", None), "IVF-Flat": ("IVF1265,Flat", 49_335),
                                       "IVF-PQ": ("IVF1265,PQ64", 49_335), "HNSW32": ("HNSW32", None)}
    assert factories(1_000_000, 256)["IVF-PQ"] == ("IVF4000,PQ64", 156_000)
    assert factories(80, 128)["IVF-PQ"] == ("IVF36,PQ32x6", 80)
    assert factories(100, 128)["IVF-PQ"] == ("IVF40,PQ32x6", 100)     # log2(100) = 6.64
    assert factories(200, 128)["IVF-PQ"] == ("IVF57,PQ32x7", 200)
    assert factories(394, 128)["IVF-PQ"] == ("IVF79,PQ32", 394)
    assert [p for _, _, p in ann_search.index_types(1000, 16).values()] == [None, "nprobe", "nprobe", "efSearch"]


def test_ann_local_intrinsic_dimension_of_points_on_a_line():
    """Points at 1, 2, ..., 100 on a line in the plane; three queries whose 20 nearest distances are known: at 0
    (1, 2, ..., 20), at 50.25 (0.25, 0.75, 1.25, ...) and 10 off the line at 0 (sqrt(100 + t^2)). Each estimate is
    1 / mean over j < 20 of log(d_20 / d_j), by hand; the result is their median.
    Catches: squared distances (faiss's L2 returns them) used as distances, the 20th neighbour's own log(1) = 0
    averaged in, the mean of the three estimates instead of the median, the sign."""
    x = np.array([[t, 0.0] for t in range(1, 101)], dtype=np.float32)
    queries = np.array([[0.0, 0.0], [50.25, 0.0], [0.0, 10.0]], dtype=np.float32)
    distances = [[float(t) for t in range(1, 21)], [0.25 + 0.5 * i for i in range(20)],
                 [(100.0 + t * t) ** 0.5 for t in range(1, 21)]]
    estimates = sorted(1 / (sum(np.log(d[-1] / dj) for dj in d[:-1]) / 19) for d in distances)
    assert estimates[0] < estimates[1] < estimates[2]
    assert ann_search.local_intrinsic_dimension(x, queries) == pytest.approx(estimates[1], rel=1e-4)


def test_ann_catalogue_draws_unit_vectors_in_chunks():
    """Catches: the last chunk drawn at full size (250 rows in chunks of 100), the rows left unnormalised, the
    cluster weights not summing to 1; the same seed drawing other rows."""
    mix = ann_search.mixture(16, seed=0, categories=5, styles=3)
    x = ann_search.draw(mix, 250, np.random.default_rng([0, 1]), chunk=100)
    assert x.shape == (250, 16) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(x, ann_search.draw(ann_search.mixture(16, seed=0, categories=5, styles=3), 250,
                                                     np.random.default_rng([0, 1]), chunk=100))


def test_ann_catalogue_rows_measure_each_setting_against_exact_search(monkeypatch):
    """measure_catalogue on 1,024 generated 16-d vectors with every CPU timing given (train 3 s, add 5 s, any search
    8 s): each setting's recall is checked against numpy brute force and plain sets here, the nprobe sweep stops at
    nlist (128: 1 to 128, the last exhaustive), the defaults (nprobe 32, efSearch 256) are the only ones marked,
    Flat stores 4 bytes per dimension. Catches: the recall measured against another ranking than exact search, the
    sweep cut below nlist or going past it, the default mark on other settings, training and adding times swapped,
    bytes per vector divided by the width instead of N, the training sample drawn with repeats, the queries drawn
    from the catalogue's own random stream."""
    timings = {"train": 3.0, "add": 5.0, "search": 8.0}
    trained_on = []

    def fake_timed(fn, *args):
        name = fn.__name__.removeprefix("replacement_")          # faiss's Python wrappers of its methods
        if name == "train":
            trained_on.append(args[0])
        return fn(*args), timings[name]

    found = []
    real_timed_search = ann_search.timed_search
    monkeypatch.setattr(ann_search, "cpu_timed", fake_timed)
    monkeypatch.setattr(ann_search, "timed_search", lambda index, q: found.append(real_timed_search(index, q)[0])
                        or (found[-1], len(q) / 8.0))
    args = argparse.Namespace(dim=16, seed=0, queries=50, types=["Flat", "IVF-Flat", "HNSW32"], build_threads=1,
                              ef_construction=40)
    result = {}
    ann_search.measure_catalogue(args, 1024, result, save=lambda: None)
    mix = ann_search.mixture(16, 0)
    x = ann_search.draw(mix, 1024, np.random.default_rng([0, 1]))
    queries = ann_search.draw(mix, 50, np.random.default_rng([0, 2]))
    exact = np.argsort(-(queries @ x.T), axis=1)[:, :10].tolist()
    settings = [s for e in result["indexes"] for s in e["settings"]]
    assert len(settings) == len(found) == 1 + 6 + 6
    for s, ids in zip(settings, found):
        assert s["recall"] == pytest.approx(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(ids.tolist(), exact)]))
        assert s["qps"] == 50 / 8.0
    flat, ivf, hnsw = result["indexes"]
    assert flat["settings"][0]["recall"] == 1.0
    assert ivf["settings"][-1]["recall"] == 1.0 > ivf["settings"][0]["recall"]
    assert [(s["value"], s["default"]) for s in ivf["settings"]] == [(1, False), (4, False), (16, False), (32, True),
                                                                    (64, False), (128, False)]
    assert [s["value"] for s in hnsw["settings"] if s["default"]] == [256]
    assert (ivf["factory"], ivf["train_size"], ivf["train_cpu_s"], ivf["add_cpu_s"]) == ("IVF128,Flat", 1024, 3.0, 5.0)
    assert (flat["train_cpu_s"], flat["add_cpu_s"], result["exact_cpu_s"]) == (0.0, 5.0, 8.0)
    assert 64 <= flat["bytes_per_vector"] < 64.2
    assert len(trained_on) == 1 and len(np.unique(trained_on[0], axis=0)) == 1024


def test_ann_task_recall_follows_evaluates_protocol():
    """Recall@10 from an index's ranking, one-hot gallery of 14, by hand: q0 finds its ground truth first after its
    own image; q1's only ground truth is its own image (a miss); q2's ground truth is 11th with one own image
    before it (10th once removed: a hit); q3's is 11th, none removed (a miss); q4's 10th (a hit): 60%, as
    evaluate.recall_at_k gives. Catches: an excluded ground truth counted as a hit, ranks counted before removing
    the own images, a search only K deep, the 11th result counted."""
    gallery = np.eye(14, dtype=np.float32)
    rest = lambda first: first + [i for i in range(14) if i not in first]
    queries = np.stack([ranked_query(rest(order), 14) for order in
                        ([3, 0], [5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0],
                         [1, 2, 3, 4, 5, 6, 7, 8, 9, 0])])
    ground_truth, exclude = [[0], [5], [0], [0], [0]], [[3], [5], [4], [], []]
    index = build_index(gallery, "Flat")
    assert ann_search.task_recall(index, queries, ground_truth, exclude, 14) == pytest.approx(60.0)
    assert evaluate.recall_at_k(queries, gallery, ground_truth, ks=(10,), exclude=exclude)["R@10"] == pytest.approx(60)


def test_ann_ufire_sets_take_their_own_queries_and_gallery_rows(monkeypatch):
    """measure_ufire with the checkpoint's encoding given: one-hot embeddings of 65 gallery images, set A (t2i) over
    images 0-39, set B (unseen, its queries' own images excluded) over images 64 down to 20, queries ranking the
    gallery as written. By hand: A's ground truth 1st, 13th and 10th -> 66.7; B's 11th behind its own image (a hit)
    and 16th -> 50.0. IVF-Flat at the default nprobe 32 probes all of its 25 or 27 lists: exact search's recall and
    its whole top 10. Then HNSW32 replaced by an index that drops each query's exact first result (9 of the exact
    top 10 found): A 33.3 (only the 10th moves into the top 10), B 50.0 (B's first dropped is its own image).
    Catches: every set taking the first set's queries, a set's gallery taken as the first rows of the encoded
    images, the default nprobe or efSearch not set, the own images not excluded from "exact", the fraction of the
    exact top 10 taken against the index's own ranking."""
    rest = lambda first: ranked_query(first + [i for i in range(65) if i not in first], 65)
    sets = [argparse.Namespace(name="A", family="t2i", gallery=[f"p{i}" for i in range(40)], ground_truth=[[0]] * 3,
                               exclude=[[], [], []],
                               queries=[rest([0]), rest(list(range(28, 40)) + [0]), rest(list(range(30, 39)) + [0])]),
            argparse.Namespace(name="B", family="unseen", gallery=[f"p{i}" for i in range(64, 19, -1)],
                               ground_truth=[[64 - 40], [64 - 21]], exclude=[[64 - 30], []],
                               queries=[rest([30] + list(range(50, 59)) + [40]), rest(list(range(41, 56)) + [21])])]
    cfg = argparse.Namespace(train=argparse.Namespace(eval_batch_size=8))
    monkeypatch.setattr(evaluate, "resolve_config", lambda cli: (cfg, None, None))
    monkeypatch.setattr(evaluate, "build_sets", lambda cli, cfg: sets)
    monkeypatch.setattr(evaluate, "load_encoder", lambda *a, **k: argparse.Namespace(encode_queries=None))
    monkeypatch.setattr(encoding, "encode_gallery",
                        lambda encoder, paths, *a: torch.eye(65)[[int(p[1:]) for p in paths]])
    monkeypatch.setattr(encoding, "encode_sharded", lambda fn, queries, *a: torch.from_numpy(np.stack(queries)))
    args = argparse.Namespace(ufire="ckpt.pt", split="test", types=["Flat", "IVF-Flat"], seed=0)
    out = ann_search.measure_ufire(args)
    assert [(k, e["family"], e["queries"], e["gallery"]) for k, e in out.items()] == [("A", "t2i", 3, 40),
                                                                                   ("B", "unseen", 2, 45)]
    for name, recall in (("A", 200 / 3), ("B", 50.0)):
        assert out[name]["exact"] == pytest.approx(recall)
        assert out[name]["indexes"]["Flat"] == {"factory": "Flat", "recall": pytest.approx(recall), "overlap": 1.0}
        assert out[name]["indexes"]["IVF-Flat"]["recall"] == pytest.approx(recall)
        assert out[name]["indexes"]["IVF-Flat"]["overlap"] == 1.0

    class DropFirst:
        def __init__(self, gallery):
            self.flat = build_index(gallery, "Flat")

        def search(self, queries, k):
            return None, self.flat.search(queries, k + 1)[1][:, 1:]

    monkeypatch.setattr(ann_search, "build_index", lambda gallery, factory, *a: DropFirst(gallery)
                        if factory == "HNSW32" else build_index(gallery, factory, *a))
    settings = []
    monkeypatch.setattr(ann_search, "set_param", lambda index, param, value: settings.append((param, value)))
    out = ann_search.measure_ufire(argparse.Namespace(ufire="ckpt.pt", split="test", types=["HNSW32"], seed=0))
    assert settings == [("efSearch", 256)] * 2
    assert [(e["indexes"]["HNSW32"]["recall"], e["indexes"]["HNSW32"]["overlap"]) for e in out.values()] == [
        (pytest.approx(100 / 3), pytest.approx(0.9)), (pytest.approx(50.0), pytest.approx(0.9))]


def test_ann_tables_label_rows_and_columns():
    """The two tables from given results (a U-FIRE-mini run of --types IVF-PQ HNSW32), every cell by hand.
    Catches: the sub-datasets and unseen tasks swapped between rows, the exact column read from the Flat index, an
    index type absent from every set given a column, the fraction not in percent, the build columns repeated on
    every setting, the default not marked."""
    ufire = {"a": {"family": "t2i", "exact": 60.0, "indexes": {"IVF-PQ": {"recall": 50.0, "overlap": 0.9},
                                                               "HNSW32": {"recall": 60.0, "overlap": 1.0}}},
             "b": {"family": "cir", "exact": 40.0, "indexes": {"IVF-PQ": {"recall": 44.0, "overlap": 0.8},
                                                               "HNSW32": {"recall": 38.0, "overlap": 0.96}}},
             "u": {"family": "unseen", "exact": 30.0, "indexes": {"IVF-PQ": {"recall": 20.0, "overlap": 0.5},
                                                                  "HNSW32": {"recall": 30.0, "overlap": 1.0}}}}
    assert ann_search.ufire_table(ufire, ["Flat", "IVF-Flat", "IVF-PQ", "HNSW32"]).splitlines() == [
        "| sets | exact | IVF-PQ | HNSW32 |", "|---|---:|---:|---:|",
        "| 18 sub-datasets (mean Recall@10 %; fraction of exact top 10 found) | 50.0 | 47.0 (85) | 49.0 (98) |",
        "| 2 unseen tasks (mean Recall@10 %; fraction of exact top 10 found) | 30.0 | 20.0 (50) | 30.0 (100) |"]
    result = {"n": 1000, "dim": 16, "queries": 50, "lid": 3.14, "indexes": [
        {"type": "Flat", "factory": "Flat", "train_cpu_s": 0.0, "add_cpu_s": 0.01, "bytes_per_vector": 64.2,
         "settings": [{"param": None, "value": None, "recall": 1.0, "qps": 1234.4, "default": True}]},
        {"type": "IVF-Flat", "factory": "IVF126,Flat", "train_cpu_s": 1.26, "add_cpu_s": 0.5, "bytes_per_vector": 70.4,
         "settings": [{"param": "nprobe", "value": 1, "recall": 0.8761, "qps": 20000.0, "default": False},
                      {"param": "nprobe", "value": 32, "recall": 0.99949, "qps": 5000.4, "default": True}]}]}
    assert ann_search.catalogue_table(result).splitlines()[0] == ("### 1,000 vectors, dim 16, 50 queries (local "
                                                                  "intrinsic dimension 3.1)")
    assert ann_search.catalogue_table(result).splitlines()[4:] == [
        "| Flat | Flat | exact | 100.0 | 1,234 | 0.0 | 0.0 | 64 |",
        "| IVF-Flat | IVF126,Flat | nprobe=1 | 87.6 | 20,000 | 1.3 | 0.5 | 70 |",
        "|  |  | **nprobe=32** | 99.9 | 5,000 |  | |  |"]


def test_indexing_another_checkpoint_into_the_same_folder_embeds_with_that_checkpoint(setup, tmp_path):
    """A folder indexed with one checkpoint, then with another (a new training run, the same unchanged catalogue):
    the second index holds the second checkpoint's embeddings, as that model computes them here without any cache,
    not the first checkpoint's shards served under the second's fingerprint.
    Catches: the shard folder keyed without the fingerprint (`shards/<fingerprint>-<arithmetic>` ->
    `shards/<arithmetic>`: every image found in the first checkpoint's shards, nothing encoded again)."""
    out = str(tmp_path / "index")
    for ckpt in setup["ckpts"]:
        search.main(["index", ckpt, "--catalog", setup["catalogue"], "--out", out, "--batch-size", "4"])
    paths, emb = indexed(out)
    second = search.Model(setup["ckpts"][1])
    np.testing.assert_allclose(emb, second.encoder.encode_targets(paths, batch_size=4).numpy(), atol=1e-5)
    assert not np.allclose(emb, indexed(setup["index"])[1], atol=1e-3)     # the two checkpoints embed otherwise
