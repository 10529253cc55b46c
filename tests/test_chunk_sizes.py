"""Gradient-cache chunk sizes by GPU memory: loader.chunk_sizes_for / chunk_table_row reading a table,
benchmarks/chunk_memory.py writing one (the bytes autograd saves, the fit, the choice per memory size), and resuming
with other chunks (checkpoints.comparable_config)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from checkpoints import comparable_config
from config import Config, load_config
from plumbing import DataError
from prepare_data import SKETCH_SETS, SUB_DATASETS
from loader import chunk_report, chunk_sizes_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import chunk_memory  # noqa: E402

KEYS = ["1_t2i_Shoes", "6_video2img_MovingFashion", "7_cir_Shoes"]
ROWS = {24: {"1_t2i_Shoes": 4, "6_video2img_MovingFashion": 1, "7_cir_Shoes": 8},
        40: {"1_t2i_Shoes": 8, "6_video2img_MovingFashion": 2, "7_cir_Shoes": 16},
        80: {"1_t2i_Shoes": 16, "6_video2img_MovingFashion": 4, "7_cir_Shoes": 32},
        141: {"1_t2i_Shoes": 32, "6_video2img_MovingFashion": 8}}


def table_config(tmp_path, **train):
    """A Config with a chunk table of ROWS made for its own settings (as chunk_memory.py writes it)."""
    cfg = Config()
    path = tmp_path / "chunks.yaml"
    path.write_text(yaml.safe_dump({"assumes": chunk_memory.assumed_settings(cfg), "headroom": 0.8,
                                    "chunk_sizes": ROWS}))
    cfg.train.chunk_table, cfg.train.chunk_size = str(path), 16
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def on_gpu(monkeypatch, memory_bytes):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=memory_bytes))
    return torch.device("cuda")


@pytest.mark.parametrize("memory_bytes, row", [(85_520_809_984, 80),     # H100 80GB HBM3: 79.6 GiB
                                               (150_754_820_096, 141),   # H200: 140.4 GiB
                                               (40e9, 40), (39.9e9, 24), (25_757_220_864, 24)])
def test_table_row_is_the_largest_memory_size_at_or_below_the_gpus(tmp_path, monkeypatch, memory_bytes, row):
    """The row is the largest size (GB, as sold) the GPU has; a sub-dataset the row lacks keeps train.chunk_size.
    Catches: comparing in GiB (an 80GB H100 has 79.6 GiB: it would get the 40 row); `<=` made `<` (40e9 would
    get the 24 row); the smallest fitting row instead of the largest; a missing key not falling back."""
    chunks, source = chunk_sizes_for(table_config(tmp_path), KEYS, on_gpu(monkeypatch, memory_bytes))
    assert chunks == {k: ROWS[row].get(k, 16) for k in KEYS}
    assert f"row {row} GB" in source


def test_explicit_chunk_sizes_win_over_the_table(tmp_path, monkeypatch):
    """Catches: the table's row looked up before train.chunk_sizes."""
    cfg = table_config(tmp_path, chunk_sizes={"7_cir_Shoes": 2})
    chunks, _ = chunk_sizes_for(cfg, KEYS, on_gpu(monkeypatch, 85e9))
    assert chunks == {"1_t2i_Shoes": 16, "6_video2img_MovingFashion": 4, "7_cir_Shoes": 2}


def test_without_a_gpu_or_a_table_chunks_are_chunk_size_and_chunk_sizes(tmp_path, monkeypatch):
    """Today's behaviour on CPU (the table is not even read) and on a GPU without a table: train.chunk_size (5 here,
    not the default 16) for every sub-dataset without a train.chunk_sizes entry. The report train.py prints says
    where the chunks came from and lists them largest first, written out here.
    Catches: the device check dropped (the CPU would read the GPU's memory: the mock raises); train.chunk_size
    ignored (the default 16 in its place); the report's "is for GPUs" or "train.chunk_sizes first" dropped, or its
    chunks listed smallest first (`sorted(..., reverse=True)` -> `sorted(...)`)."""
    def no_gpu(device):
        raise AssertionError("a CPU run must not ask for GPU properties")
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_gpu)
    cfg = table_config(tmp_path, chunk_sizes={"7_cir_Shoes": 2})
    cfg.train.chunk_size = 5
    expected = {"1_t2i_Shoes": 5, "6_video2img_MovingFashion": 5, "7_cir_Shoes": 2}
    table = cfg.train.chunk_table
    chunks, source = chunk_sizes_for(cfg, KEYS, torch.device("cpu"))
    assert chunks == expected
    assert chunk_report(chunks, source) == (
        f"gradient-cache chunk per sub-dataset (train.chunk_size=5; {table} is for GPUs, train.chunk_sizes first): "
        f"5: 1_t2i_Shoes, 6_video2img_MovingFashion; 2: 7_cir_Shoes")
    cfg.train.chunk_table = ""
    assert chunk_sizes_for(cfg, KEYS, on_gpu(monkeypatch, 85e9)) == (expected,
                                                                     "train.chunk_size=5, train.chunk_sizes first")


def test_a_chunk_table_with_per_chunk_regularisers_is_refused(tmp_path, monkeypatch):
    """reg_per_chunk makes the chunk part of the objective, so chunks may not follow the GPU; refused on CPU too
    (the config is wrong wherever it runs). configs/release.yaml (reg_per_chunk) keeps its chunk_sizes, no table.
    Catches: the refusal only on a GPU, or missing; release.yaml inheriting full.yaml's table."""
    cfg = table_config(tmp_path)
    cfg.calibrator.reg_per_chunk = True
    for device in (torch.device("cpu"), on_gpu(monkeypatch, 85e9)):
        with pytest.raises(ValueError, match="reg_per_chunk"):
            chunk_sizes_for(cfg, KEYS, device)
    release = load_config(os.path.join(REPO, "configs", "release.yaml"))
    chunks, _ = chunk_sizes_for(release, list(SUB_DATASETS), on_gpu(monkeypatch, 85e9))
    assert chunks == release.train.chunk_sizes


def test_a_table_made_for_other_settings_or_a_smaller_gpu_is_refused(tmp_path, monkeypatch):
    """A table sized for 224 x 224 images says nothing about another pixel budget; one assuming a setting this
    config does not have (renamed or removed since) says nothing about this code.
    Catches: the `assumes` check dropped; settings the config lacks skipped (`if name in ours and ...`); a GPU
    below every row silently given train.chunk_size."""
    cfg = table_config(tmp_path)
    cfg.model.image_pixels = 448 * 448
    with pytest.raises(DataError, match=r"chunks.yaml.*model.image_pixels: table 50176, config 200704"):
        chunk_sizes_for(cfg, KEYS, on_gpu(monkeypatch, 85e9))
    cfg = table_config(tmp_path)
    table = yaml.safe_load((tmp_path / "chunks.yaml").read_text())
    table["assumes"]["model.vision_chunk"] = 8
    (tmp_path / "chunks.yaml").write_text(yaml.safe_dump(table))
    with pytest.raises(DataError, match=r"model.vision_chunk: table 8, config None"):
        chunk_sizes_for(cfg, KEYS, on_gpu(monkeypatch, 85e9))
    with pytest.raises(DataError, match="no row for a GPU of 16.0 GB"):
        chunk_sizes_for(table_config(tmp_path), KEYS, on_gpu(monkeypatch, 16e9))


def test_a_chunk_table_that_is_not_yaml_is_refused_naming_the_file_and_line(tmp_path, monkeypatch):
    """A hand-edited table with a YAML syntax error ended training on a GPU in yaml's multi-line traceback.
    Catches: chunk_table_row reading the table with yaml.safe_load instead of plumbing.read_yaml (a ScannerError,
    not a DataError)."""
    cfg = table_config(tmp_path)
    (tmp_path / "chunks.yaml").write_text("assumes: {}\nchunk_sizes:\n  80: {7_cir_Shoes: 4}: 8\n")
    with pytest.raises(DataError, match=r"chunks.yaml: not valid YAML \(line 3, column 23: mapping values are not "
                                        r"allowed here\)$"):
        chunk_sizes_for(cfg, KEYS, on_gpu(monkeypatch, 85e9))


@pytest.mark.parametrize("content", [{"chunk_sizes": ROWS}, {"assumes": {}}, ["not", "a", "mapping"]])
def test_a_file_that_is_not_a_chunk_table_is_a_data_error_naming_it(tmp_path, monkeypatch, content):
    """train.chunk_table naming a YAML file without both parts benchmarks/chunk_memory.py writes (a hand-written
    {GB: chunks} list, a table cut short) stops with a DataError naming the file, not a KeyError from the lookup.
    Catches: the format check reduced to `isinstance(table, dict)` (KeyError: 'assumes' / 'chunk_sizes') or without
    it (AttributeError: a list has no keys)."""
    cfg = table_config(tmp_path)
    (tmp_path / "chunks.yaml").write_text(yaml.safe_dump(content))
    with pytest.raises(DataError, match=r"chunks.yaml: not a chunk table .*needs 'assumes' and 'chunk_sizes'"):
        chunk_sizes_for(cfg, KEYS, on_gpu(monkeypatch, 85e9))


def test_full_config_table_covers_every_sub_dataset_and_fits_its_settings(monkeypatch, tmp_path):
    """configs/chunk_sizes.yaml, as full.yaml uses it: every sub-dataset in every row, chunks dividing the batch,
    never smaller on a larger GPU, and made for full.yaml's settings (else training on a GPU stops). The table's
    path is the repository's, found from any working directory (here another one).
    Catches: a table regenerated for other settings or fewer sub-datasets; full.yaml without the table; the table
    looked up from the working directory (`os.path.join(os.path.dirname(os.path.abspath(__file__)),
    cfg.train.chunk_table)` -> `cfg.train.chunk_table` in chunk_table_row: "no such file")."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(os.path.join(REPO, "configs", "full.yaml"))
    assert cfg.train.chunk_table == "configs/chunk_sizes.yaml" and not cfg.train.chunk_sizes
    with open(os.path.join(REPO, cfg.train.chunk_table)) as f:
        rows = yaml.safe_load(f)["chunk_sizes"]
    assert sorted(rows) == [24, 40, 80, 141]
    for gb in rows:
        chunks, _ = chunk_sizes_for(cfg, list(SUB_DATASETS), on_gpu(monkeypatch, gb * 1e9))
        assert chunks == rows[gb]
        assert all(chunk in chunk_memory.CHUNKS and cfg.train.batch_size % chunk == 0 for chunk in chunks.values())
    for smaller, larger in zip(sorted(rows), sorted(rows)[1:]):
        assert all(rows[smaller][k] <= rows[larger][k] for k in SUB_DATASETS)


def test_resume_may_change_chunks_only_without_per_chunk_regularisers():
    """Another GPU picks other chunks from the table (or smaller ones are set to fit): the same objective unless
    reg_per_chunk makes the chunk part of it. Catches: chunk settings ignored whatever reg_per_chunk says, or
    compared always (a resume on another GPU refused)."""
    saved, resumed = Config(), Config()
    resumed.train.chunk_size, resumed.train.chunk_sizes, resumed.train.chunk_table = 8, {"7_cir_Shoes": 4}, "t.yaml"
    assert comparable_config(saved.to_dict()) == comparable_config(resumed.to_dict())
    saved.calibrator.reg_per_chunk = resumed.calibrator.reg_per_chunk = True
    assert comparable_config(saved.to_dict()) != comparable_config(resumed.to_dict())


# ----------------------------------------------------------------------------- benchmarks/chunk_memory.py

def test_saved_bytes_match_a_hand_count_on_a_linear_gelu_stack():
    """x -> Linear(d, h) -> GELU -> Linear(h, d) + Linear(h, d) (both reading the GELU's output) -> rows 1: of the
    sum -> GELU, fp32. Autograd saves, besides the weights: the first Linear's input x (for its weight's gradient;
    x needs none), the first GELU's input (n x h), the GELU's output once for both Linears (n x h), and the last
    GELU's input, a view of the whole sum, which it keeps alive (n x d, not (n - 1) x d): 4 n (2d + 2h) bytes.
    Catches: a storage counted once per op saving it (+ n h), parameters counted, a view's own size counted
    instead of its storage's (- d)."""
    n, d, h = 3, 5, 7
    torch.manual_seed(0)
    first, second, third = torch.nn.Linear(d, h), torch.nn.Linear(h, d), torch.nn.Linear(h, d)
    x = torch.randn(1, n, d)
    saved = chunk_memory.SavedTensorBytes(exclude=[p for m in (first, second, third) for p in m.parameters()])
    with saved:
        g = torch.nn.functional.gelu(first(x))
        torch.nn.functional.gelu((second(g) + third(g))[:, 1:])
    assert saved.bytes == 4 * n * (2 * d + 2 * h)


def test_estimate_is_linear_in_depth_and_chunk(tiny_backbone, tmp_path):
    """The CPU estimate's fit (chunks 1, 2 on 1 and 2 text layers, extrapolated) predicts a count it never saw:
    3 text layers, chunk 3, counted directly; the vision features kept per record, by hand. Catches: an
    extrapolation off by a layer (full_depth - 1 or + 1), intercept and slope swapped, the chunk fit evaluated at
    the wrong depth; the kept features not divided by the chunk, or the deepstack levels counted without the merged
    tokens; the trainable parameters or the frozen weights' bytes not extrapolated to the full depth."""
    cfg = load_config(os.path.join(REPO, "configs", "full.yaml"), ["model.image_pixels=4096", "model.video_frames=2"])
    media = chunk_memory.Media(str(tmp_path), 12, 0)
    fits, trainable, frozen, _ = chunk_memory.estimate(cfg, ["image"], media, [1, 2], (1, 2), 3, True, str(tmp_path))
    with chunk_memory.as_on_a_gpu():
        backbone = chunk_memory.build_cut(str(tmp_path), 3, tiny=True)
        encoder = chunk_memory.model.build_encoder(chunk_memory.cfg_with(cfg, backbone).model, cfg.calibrator, "cpu")
        saved, _ = chunk_memory.replay_bytes(encoder.train(), *media.inputs(encoder, "image", 3), 1)
    assert fits["image"]["graph_fixed_bytes"] + 3 * fits["image"]["per_record_bytes"] == pytest.approx(saved, rel=1e-4)
    assert trainable == pytest.approx(sum(p.numel() for p in encoder.parameters() if p.requires_grad))
    assert frozen == pytest.approx(sum(p.nbytes for p in encoder.parameters() if not p.requires_grad))
    # a 4096-pixel image: 4 merged tokens of 128 bf16 values, and the tiny tower's one deepstack level as large
    assert fits["image"]["kept_vision_per_record_bytes"] == 2 * 4 * 128 * 2


def test_table_picks_the_largest_chunk_under_the_headroom():
    """Hand-made fits: fixed 10 GiB, 1 GiB per query record, 0.5 per target, headroom 0.8 of GB (10^9 bytes): the
    largest power of two c with 10 + c <= 0.8 * GB / 2^30 is 4, 16, 32 at 24, 40, 80 GB; at 141 GB (105 GiB usable)
    64 would fit alone, but at 64 = the batch the queries and targets are one chunk each and both graphs are kept
    (10 + 64 * 1.5 = 106 GiB): 32. Targets at 2 GiB per record make the chunk 2, 8, 16, 32 (the heavier of the two
    chunks rules); 32 GiB of vision features kept for the batch (0.5 GiB per query) leave none at 24 and 40 GB, 16
    at 80, 32 at 141. Catches: GiB taken for GB; the headroom ignored; the target chunk or the batch's kept vision
    features left out; one chunk each counted as one graph (no `chunk >= targets` case)."""
    gib = 2 ** 30
    cfg = Config()
    cfg.train.batch_size = 64
    light = {"image": {"fixed": 10 * gib, "per_record": gib, "kept": 0}, "target": {"fixed": 10 * gib,
             "per_record": gib / 2, "kept": 0}}
    rows, misfits = chunk_memory.table(light, {"7_cir_Shoes": "image"}, cfg, 0.8)
    assert {gb: row["7_cir_Shoes"] for gb, row in rows.items()} == {24: 4, 40: 16, 80: 32, 141: 32} and not misfits
    heavy_targets = dict(light, target={"fixed": 10 * gib, "per_record": 2 * gib, "kept": 0})
    rows, _ = chunk_memory.table(heavy_targets, {"7_cir_Shoes": "image"}, cfg, 0.8)
    assert {gb: row["7_cir_Shoes"] for gb, row in rows.items()} == {24: 2, 40: 8, 80: 16, 141: 32}
    kept = dict(light, image=dict(light["image"], kept=gib / 2))
    rows, misfits = chunk_memory.table(kept, {"7_cir_Shoes": "image"}, cfg, 0.8)
    assert {gb: row.get("7_cir_Shoes") for gb, row in rows.items()} == {24: None, 40: None, 80: 16, 141: 32}
    assert misfits == ["7_cir_Shoes at 24 GB", "7_cir_Shoes at 40 GB"]


def test_predicted_peak_by_hand_with_hard_negatives_and_chunks_dividing_the_batch():
    """Batch 8 with 1 asfr hard negative each: 16 targets. Queries: fixed 10 GiB, 1 GiB per record, 0.5 GiB kept;
    targets: 10, 0.5, 0.25. Kept for the batch: 8 x 0.5 + 16 x 0.25 = 8 GiB. Chunk 4: 8 + max(10 + 4, 10 + 2) = 22;
    chunk 8 (< 16 targets, replayed): 8 + max(18, 14) = 26; chunk 16 (both one chunk): 8 + 10 + 8 + 8 = 34 GiB.
    A batch of 48 at 141 GB (105 GiB usable): 32 and 64 would fit but do not divide it: 16.
    Catches: the hard negatives left out of the targets; the targets' kept vision features left out; chunks that
    do not divide the batch allowed."""
    gib = 2 ** 30
    cfg = Config()
    cfg.train.batch_size, cfg.train.asfr_hard_negatives = 8, 1
    fits = {"image": {"fixed": 10 * gib, "per_record": gib, "kept": gib / 2},
            "target": {"fixed": 10 * gib, "per_record": gib / 2, "kept": gib / 4}}
    assert [chunk_memory.predicted_peak(fits, "image", cfg, c) / gib for c in (4, 8, 16)] == [22, 26, 34]
    cfg.train.batch_size, cfg.train.asfr_hard_negatives = 48, 0
    light = {k: dict(f, kept=0) for k, f in fits.items()}
    rows, _ = chunk_memory.table(light, {"7_cir_Shoes": "image"}, cfg, 0.8)
    assert rows[141]["7_cir_Shoes"] == 16


def test_cpu_estimate_adds_weights_and_16_bytes_per_trainable_parameter(tmp_path, monkeypatch):
    """The table's fixed part on CPU: bf16 weights (3 GiB here) + 16 bytes per trainable parameter (fp32 value,
    gradient, AdamW's two moments: 2^26 of them, 1 GiB) + the replay graph's fixed part (2 GiB) = 6 GiB; per record
    and kept features as estimated. Catches: a term of the fixed part dropped, or the state at other than 16 bytes."""
    gib = 2 ** 30
    depth_fits = {"image": {"graph_fixed_bytes": 2 * gib, "per_record_bytes": 5e8, "kept_vision_per_record_bytes": 7e5}}
    monkeypatch.setattr(chunk_memory, "estimate", lambda *args: (depth_fits, 2 ** 26, 0, []))
    monkeypatch.setattr(chunk_memory, "architecture_weight_bytes", lambda: 3 * gib)
    args = SimpleNamespace(chunks=None, tiny=False)
    fits, _, _ = chunk_memory.cpu_estimate(args, Config(), ["image"], str(tmp_path), "test")
    assert fits == {"image": {"fixed": 6 * gib, "per_record": 5e8, "kept": 7e5}}


def test_cuda_fit_takes_the_batchs_kept_vision_features_out_of_the_peak(tmp_path, monkeypatch):
    """--device cuda with the tiny backbone, the training step stubbed and the peak stubbed at 10 GiB + 1 GiB per
    chunk record: a step of 2 chunks keeps, per record, a query image's and a target image's vision features
    (4096 pixels: 4 merged tokens x 128 values, fp32 on CPU, and one deepstack level as large: 4096 bytes each), so
    the fit is fixed 10 GiB, per record 1 GiB - 2 x 8192 bytes. Catches: the kept features of one chunk taken out
    instead of the batch's (two chunks), or the target's left in; a step on one chunk's records."""
    import train_throughput
    cfg = load_config(os.path.join(REPO, "configs", "full.yaml"), ["model.image_pixels=4096"])
    from fake_backbones import make_tiny_backbone
    monkeypatch.setattr(chunk_memory, "random_qwen3vl_4b", lambda backbone, tmp, device: make_tiny_backbone(backbone))
    chunk_of_step = []
    batches = []

    def step(encoder, cfg, examples, chunk, *_):
        chunk_of_step.append(chunk)
        batches.append(len(examples))
    monkeypatch.setattr(train_throughput, "step", step)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: (10 + chunk_of_step[-1]) * 2 ** 30)
    media = chunk_memory.Media(str(tmp_path), 32, 0)
    fits, _ = chunk_memory.measure_cuda(cfg, ["image"], media, {"image": [2, 8]}, str(tmp_path), torch.device("cpu"))
    assert batches == [2, 4, 16]                    # the warm-up step, then two chunks at each size
    assert fits["image"]["kept"] == 4096
    assert fits["image"]["fixed"] == pytest.approx(10 * 2 ** 30, abs=1)
    assert fits["image"]["per_record"] == pytest.approx(2 ** 30 - 2 * 8192, abs=1e-3)


def test_calibration_corrects_unmeasured_kinds_by_the_median_measured_ratio_and_difference():
    """Three measured kinds with per-record ratios measured / estimated 2, 3, 10 (median 3, mean 5) and fixed
    differences +1, +2, +6 GiB (median 2): the unmeasured text kind gets 3x its per-record bytes and 2 GiB more
    fixed; measured kinds keep their measurement. Catches: the ratio inverted, the difference subtracted, the mean
    taken instead of the median, an estimate overriding a measurement."""
    gib = 2 ** 30
    estimated = {k: {"fixed": 10 * gib, "per_record": gib, "kept": 5.0} for k in ("image", "video", "images3", "text")}
    measured = {k: {"fixed": (10 + d) * gib, "per_record": r * gib, "kept": 6.0, "points": [(1, 1.0)]}
                for k, r, d in (("image", 2, 1), ("video", 3, 2), ("images3", 10, 6))}
    fits, ratio, difference = chunk_memory.calibrated(estimated, measured)
    assert (ratio, difference) == (3, 2 * gib)
    assert fits["text"] == {"fixed": 12 * gib, "per_record": 3 * gib, "kept": 5.0}
    assert fits["images3"] == {"fixed": 16 * gib, "per_record": 10 * gib, "kept": 6.0}


def test_calibration_without_an_estimate_and_its_predicted_vs_measured_lines(capsys):
    """calibrated with no --estimate keeps the measurement as it is (ratio 1, difference 0: the table header's
    "per record x 1.000, fixed +0.00 GiB"); with one, it prints per measured chunk the estimate's prediction (fixed
    10 GiB + chunk x 1 GiB: 14 and 26 GiB at chunks 4 and 16) next to the measurement (20 and 44 GiB).
    Catches: a measured kind missing from the estimate not skipped (KeyError: no table from a run without
    --estimate); ratio 0 without an estimate; the chunk's records left out of the prediction."""
    gib = 2 ** 30
    measured = {"image": {"fixed": 12 * gib, "per_record": 2 * gib, "kept": 6.0,
                          "points": [(4, 20 * gib), (16, 44 * gib)]}}
    assert chunk_memory.calibrated({}, measured) == ({"image": {"fixed": 12 * gib, "per_record": 2 * gib,
                                                                "kept": 6.0}}, 1.0, 0.0)
    capsys.readouterr()
    chunk_memory.calibrated({"image": {"fixed": 10 * gib, "per_record": gib, "kept": 5.0}}, measured)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "estimated", "vs", "measured:", "fixed", "10.00", "vs", "12.00", "GiB,",
                                "per", "record", "1024.0", "vs", "2048.0", "MiB"]
    assert [line.split()[3:7] for line in lines[1:]] == [["14.00", "GiB,", "measured", "20.00"],
                                                         ["26.00", "GiB,", "measured", "44.00"]]


def test_cuda_chunk_sizes_per_kind_and_enough_media_for_them(tmp_path, monkeypatch):
    """cuda_measurement: --chunks 4,5 would give video and five-image queries a quarter of them, 1 and 1, one size:
    refused before anything is built. --chunks 2,8: three-image queries at 2 and 8, five-image and video queries at
    1 and 2, and the random media suffice for each of them in a batch of two chunks (8 x 2 records of 1 + 3 images).
    Catches: the two-sizes check off by one (a fit over one point divides by zero after the GPU run); a quarter of
    a chunk rounded down to 0; media counted for two images a record."""
    measured = []

    def measure_cuda(cfg, kinds, media, chunks, tmp, device):
        measured.append(chunks)
        for kind in kinds:
            for chunk in chunks[kind]:
                assert len(media.examples(kind, 2 * chunk)) == 2 * chunk
        return {k: {"fixed": 1.0, "per_record": 1.0, "kept": 1.0, "points": []} for k in kinds}, []
    monkeypatch.setattr(chunk_memory, "measure_cuda", measure_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stub GPU")
    with pytest.raises(ValueError, match="two chunk sizes"):
        chunk_memory.cuda_measurement(SimpleNamespace(chunks="4,5", device="cpu", estimate=""), Config(),
                                      ["image", "video"], str(tmp_path), "test")
    chunk_memory.cuda_measurement(SimpleNamespace(chunks="2,8", device="cpu", estimate=""), Config(),
                                  ["images3", "images5", "video"], str(tmp_path), "test")
    assert measured == [{"images3": [2, 8], "images5": [1, 2], "video": [1, 2]}]


def test_a_table_needs_the_target_kind(monkeypatch, capsys):
    """chunk_memory.py --kinds image,images3,images5,text,video on CPU would estimate no target: the table (which
    weighs each sub-dataset's target chunk) is refused before the estimate runs, naming the kind missing.
    Catches: the target kind left out of the check (a KeyError after the estimate's minutes)."""
    monkeypatch.setattr(chunk_memory, "cpu_estimate", lambda *args: pytest.fail("the estimate ran"))
    monkeypatch.setattr(sys, "argv", ["chunk_memory.py", "--tiny", "--kinds", "image,images3,images5,text,video"])
    with pytest.raises(SystemExit):
        chunk_memory.main()
    assert "kinds ['target'] are needed for the table" in capsys.readouterr().err


def test_a_gpu_measurement_is_checked_before_it_runs(tmp_path, monkeypatch, capsys):
    """chunk_memory.py --device cuda: by default it measures image and video records (a gallery image alone is no
    training step: measuring "target" is refused), and without --estimate the table's other kinds would come from
    nowhere: refused before anything is built, naming them and --estimate. With --estimate, the measurement runs.
    Catches: every kind measured by default on a GPU ("target" among them: a TypeError after building the 4B model);
    the table's kinds checked only after the measurement (the GPU minutes spent, then the error)."""
    ran = []

    def cuda_measurement(args, cfg, kinds, tmp, command):
        ran.append(kinds)
        return chunk_memory.read_estimate(args.estimate), [], []
    monkeypatch.setattr(chunk_memory, "cuda_measurement", cuda_measurement)
    estimate = os.path.join(REPO, "configs", "chunk_sizes.yaml")
    for argv, refusal in [([], "kinds ['images3', 'images5', 'target', 'text'] are needed for the table but would "
                                "be neither measured nor estimated; on a GPU, give --estimate"),
                          (["--kinds", "image,target", "--estimate", estimate], "--kinds target: on a GPU")]:
        monkeypatch.setattr(sys, "argv", ["chunk_memory.py", "--device", "cuda", *argv])
        with pytest.raises(SystemExit):
            chunk_memory.main()
        assert refusal in capsys.readouterr().err
    assert ran == []
    monkeypatch.setattr(sys, "argv", ["chunk_memory.py", "--device", "cuda", "--estimate", estimate])
    chunk_memory.main()
    assert ran == [["image", "video"]]


def test_table_file_gives_back_the_fits_it_was_written_with(tmp_path):
    """write_table stores the fit in GiB and MiB; read_estimate (cuda --estimate) reads it back in bytes. Values
    that the rounding keeps exactly come back exactly. Catches: GB or MB (10^9, 10^6) on either side."""
    fits = {"image": {"fixed": 9.5 * 2 ** 30, "per_record": 800.25 * 2 ** 20, "kept": 0.5 * 2 ** 20}}
    path = tmp_path / "chunks.yaml"
    chunk_memory.write_table(str(path), {24: {}}, fits, Config(), 0.8, [])
    assert chunk_memory.read_estimate(str(path)) == fits


def test_query_kinds_are_u_fire_minis_heaviest_queries(mini_root):
    """QUERY_KINDS, the kinds the table is sized for, against the heaviest training query of each sub-dataset of
    U-FIRE-mini (which has U-FIRE's shapes), as --root counts them. Catches: a sub-dataset given a lighter kind
    (QMUL-Shoe-V2's up to 5 sketches as one image: a chunk that does not fit); the sketch sets' queries not cut to
    data.max_query_images (3 here: three-image queries)."""
    cfg = load_config(os.path.join(REPO, "configs", "full.yaml"))
    assert chunk_memory.query_kinds_of(mini_root, cfg) == chunk_memory.QUERY_KINDS
    cfg.data.max_query_images = 3
    assert chunk_memory.query_kinds_of(mini_root, cfg) == dict(chunk_memory.QUERY_KINDS, **{
        key: "images3" for key in SKETCH_SETS})


def test_script_cpu_path_writes_a_table_training_reads(tmp_path, monkeypatch):
    """benchmarks/chunk_memory.py --tiny end to end (about 15 s): the table it writes is one train.chunk_table reads
    for configs/full.yaml's settings, with every sub-dataset, and --json holds the fits, the raw counts (one per
    kind, depth and chunk) and the rows. Catches: writer and reader disagreeing on the layout (keys, the 'assumes'
    names, GB rows); the rows written as the raw counts."""
    out = tmp_path / "chunks.yaml"
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "chunk_memory.py"), "--tiny", "--table",
                    str(out), "--json", str(tmp_path / "raw.json")], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert len(raw["raw"]) == len(chunk_memory.KINDS) * 2 * 2 and set(raw["fits"]) == set(chunk_memory.KINDS)
    assert raw["rows"] == {str(gb): row for gb, row in yaml.safe_load(out.read_text())["chunk_sizes"].items()}
    assert out.read_text().startswith("# Made by: python benchmarks/chunk_memory.py --tiny")
    cfg = load_config(os.path.join(REPO, "configs", "full.yaml"), [f"train.chunk_table={out}"])
    chunks, source = chunk_sizes_for(cfg, list(SUB_DATASETS), on_gpu(monkeypatch, 85e9))
    assert "row 80 GB" in source and set(chunks) == set(SUB_DATASETS)
    assert chunks == yaml.safe_load(out.read_text())["chunk_sizes"][80]


def test_the_cuda_measurement_path_runs(tmp_path, monkeypatch):
    """What gpu_session.sh runs on the GPU (`chunk_memory.py --device cuda --kinds image,video --estimate ...`), run
    here on CPU with the tiny backbone for the 4B and torch.cuda's name and peak counter stubbed (the peak since the
    counter's reset grows by 1 GiB per chunk record over 10 GiB): it trains, fits, calibrates the estimate's other
    kinds and gives a table for every sub-dataset. A GPU session is short and rare; a call that fails only there
    wastes it. Catches: a training step called with another signature than train_throughput.step's (the merge that
    made its `prefetch` argument required: TypeError); the peak counter not reset before each measurement (the
    video steps' peaks would be the image steps' 18 GiB)."""
    cfg = load_config(os.path.join(REPO, "configs", "full.yaml"), ["model.image_pixels=4096"])
    from fake_backbones import make_tiny_backbone
    monkeypatch.setattr(chunk_memory, "random_qwen3vl_4b", lambda backbone, tmp, device: make_tiny_backbone(backbone))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stub GPU")
    peak = [0]
    import train_throughput
    real_step = train_throughput.step

    def counted_step(encoder, cfg, examples, chunk, *args, **kwargs):
        peak[0] = max(peak[0], (10 + chunk) * 2 ** 30)
        return real_step(encoder, cfg, examples, chunk, *args, **kwargs)
    monkeypatch.setattr(train_throughput, "step", counted_step)
    monkeypatch.setattr(train_throughput, "reset_peak_memory", lambda device: peak.__setitem__(0, 0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak[0])
    args = SimpleNamespace(chunks="2,8", device="cpu", estimate=os.path.join(REPO, "configs", "chunk_sizes.yaml"))
    fits, raw, how = chunk_memory.cuda_measurement(args, cfg, ["image", "video"], str(tmp_path), "test")
    assert [(r["kind"], r["chunk"], r["peak_bytes"] / 2 ** 30) for r in raw] == [
        ("image", 2, 12), ("image", 8, 18), ("video", 1, 11), ("video", 2, 12)]
    rows, _ = chunk_memory.table(fits, chunk_memory.QUERY_KINDS, cfg, 0.8)
    assert set(rows[141]) == set(SUB_DATASETS)
