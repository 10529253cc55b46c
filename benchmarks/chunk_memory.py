"""Memory of a gradient-cache chunk per record kind, and the table of chunk sizes by GPU memory that training reads
(train.chunk_table, configs/chunk_sizes.yaml; docs/method.md#gradient-caching).

At its peak, a gradient-cached step (train.cached_step) holds
    the weights (bf16)
  + the trainable state: fp32 LoRA, calibrator and token vectors, their gradients and AdamW's two moments (16 bytes
    per trainable parameter)
  + what pass 1 keeps for the whole batch: each record's vision features, handed to the replay
    (model.reuse_vision_features)
  + the autograd graph of the one chunk being replayed, which grows with the chunk.
So, per record kind (records differ in visual load: KINDS), peak(chunk) = fixed + chunk * per_record. The table
gives, for each GPU memory size of MEMORY_GB and each sub-dataset, the largest chunk of CHUNKS that divides the
batch and whose predicted peak stays under --headroom of the memory: a fixed cost per chunk dominates on a GPU, so
the largest chunk that fits is the fastest; with calibrator.reg_per_chunk false the chunk is no part of the
objective (with it true, the release's, it is: configs/release.yaml keeps its own train.chunk_sizes).

--device cpu (default): an ESTIMATE of the activation memory, not an allocator peak. The replay's graph is counted,
not allocated: the bytes of every tensor autograd saves for backward during one chunk's replay
(torch.autograd.graph.saved_tensors_hooks; each storage once; parameters and the reused vision features left out,
as they are counted once in the fixed part), as a GPU saves them (as_on_a_gpu: bf16 autocast, CUDA's dropout), for
Qwen3-VL-4B's architecture (fake_backbones.random_qwen3vl_4b) with its text tower cut to 1 and 2 layers,
extrapolated linearly to the real depth (36 layers; configs/qwen3-vl-4b-instruct/config.json). The replay never
runs the frozen vision tower, so its depth (24 blocks) changes only the weights, which are counted for the whole
architecture. Not counted: the transient buffers of the backward and of pass 1, the CUDA context, the allocator's
fragmentation: --headroom leaves room for them, and a GPU run replaces the estimate. The prompts are tokenized by
the tiny backbone's tokenizer, as in benchmarks/*_throughput.py --real-arch: it splits the text-only kind's
description into 137 tokens where Qwen3's splits it into 68 (the instruction: 25 and 18), so text-only queries are
over-estimated, on the safe side.
--device cuda: MEASURED. torch.cuda.max_memory_allocated over one whole training step (train_throughput.step:
cached_step and AdamW) of a batch of two chunks, per kind at each --chunks size; the fit is of the peak less the
vision features kept for that batch, which are then added back for the table's batch. With --estimate (a table
this script wrote on CPU), every measured kind is printed next to its estimate, and the kinds not measured keep
their estimate, corrected as the measured kinds showed.

    OMP_NUM_THREADS=1 python benchmarks/chunk_memory.py --table configs/chunk_sizes.yaml     # CPU estimate, 2 min
    python benchmarks/chunk_memory.py --device cuda --kinds image,video --chunks 4,16 \\
        --estimate configs/chunk_sizes.yaml --table $OUT/chunk_sizes.yaml                  # GPU, ~1 min
    python benchmarks/chunk_memory.py --tiny                        # the CPU path on the tiny backbone, 15 s
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import av
import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import model  # noqa: E402
from config import load_config  # noqa: E402
from encode_throughput import write_images  # noqa: E402
from fake_backbones import (QWEN3_VL_4B, make_tiny_backbone, qwen3vl_config, random_qwen3vl_4b,  # noqa: E402
                            real_config)
from plumbing import write_text_atomic  # noqa: E402
from prepare_data import SKETCH_SETS, SUB_DATASETS, load_records  # noqa: E402

MEMORY_GB = (24, 40, 80, 141)          # GPU memory sizes as sold, in GB (10^9 bytes): an "80GB" H100 has 79.6 GiB
CHUNKS = (1, 2, 4, 8, 16, 32, 64)
GIB = 2 ** 30

DESCRIPTION = ("A navy wool coat with a wide notched collar, long sleeves with buttoned cuffs, two large flap "
               "pockets, a detachable belt at the waist and a single vent at the back; fully lined in satin, "
               "knee length, straight cut, with horn buttons down the front and a small logo on the inner "
               "pocket. Dry clean only.")
INSTRUCTION = "Find the dress in the reference image, but make it navy and give it long sleeves."
# Record kinds by visual load: (query images, query videos, text); "target" is a gallery image (prepare_targets).
KINDS = {"text": (0, 0, DESCRIPTION), "image": (1, 0, INSTRUCTION), "images3": (3, 0, INSTRUCTION),
         "images5": (5, 0, INSTRUCTION), "video": (0, 1, INSTRUCTION), "target": None}
# Each sub-dataset's queries at their heaviest (docs/method.md#data; U-FIRE-mini has the same shapes): text-only
# product descriptions (t2i); up to data.max_query_images sketches (ClothesV1, QMUL-Shoe-V2); up to 3 street or
# try-on photos (in-shop, street2shop); an outfit less its missing piece (Polyvore: up to 3 of 4); one video. --root
# counts them in a download instead.
QUERY_KINDS = {"1_t2i_FashionGen": "text", "1_t2i_Shoes": "text", "2_sketch2i_ClothesV1": "images5",
               "2_sketch2i_HAIFashion": "image", "2_sketch2i_QMUL-Shoe-V2": "images5",
               "3_inshop_DeepFashion": "images3", "4_street2shop_DeepFashion2": "images3",
               "5_compatibility_FashionVC": "image", "5_compatibility_Polyvore": "images3",
               "6_video2img_MovingFashion": "video", "7_cir_Fashion200K": "image", "7_cir_FashionIQ-Dress": "image",
               "7_cir_FashionIQ-Shirt": "image", "7_cir_FashionIQ-Toptee": "image", "7_cir_Shoes": "image",
               "8_sketch&text_CSTBIR": "image", "9_asfr_DARN": "image", "9_asfr_FashionAI": "image"}
# The config settings a table depends on; training refuses a table made for other values (loader.chunk_sizes_for).
ASSUMED = ("model.image_pixels", "model.video_frames", "model.lora_r", "model.lora_targets",
           "model.gradient_checkpointing", "model.reuse_vision_features", "model.normed_readout",
           "data.max_query_images", "train.batch_size", "train.asfr_hard_negatives")


# ----------------------------------------------------------------------------- counting what autograd saves

def storage_key(t):
    return t.device, t.untyped_storage().data_ptr()


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Inside the block, the bytes of the tensors autograd saves for backward, each storage counted once (views
    and tensors saved by several ops share one) and the storages of `exclude` (parameters, inputs held anyway) not
    at all. While the graph lives its saved storages stay allocated, so no two of them share an address."""

    def __init__(self, exclude=()):
        self.excluded = {storage_key(t) for t in exclude}
        self.storages = {}
        super().__init__(self.pack, lambda t: t)

    def pack(self, t):
        key = storage_key(t)
        if key not in self.excluded:
            self.storages[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self):
        return sum(self.storages.values())


def tensors_in(obj):
    """Every tensor in a nest of dicts, lists, tuples and transformers outputs."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def nbytes(tensors):
    return sum({storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


# ----------------------------------------------------------------------------- synthetic records of each kind

def write_videos(directory, n, frames=16, size=(160, 200)):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"video{i}.mp4")
        with av.open(path, "w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
            for _ in range(frames):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode())
        paths.append(path)
    return paths


class Media:
    """Random images and videos for synthetic records, written once (product-photo sizes; resized to the budget)."""

    def __init__(self, directory, n_images, n_videos):
        self.images = write_images(directory, n_images, size=(160, 200))
        self.videos = write_videos(directory, n_videos)

    def examples(self, kind, n):
        """n training views (TrainSet.example's format) of `kind`, each with its own target image."""
        images, videos, text = KINDS[kind]
        need = n * (images + 1)
        if need > len(self.images) or n * videos > len(self.videos):
            raise ValueError(f"{n} records of kind {kind} need {need} images and {n * videos} videos")
        return [{"id": f"{kind}-{i}", "key": kind, "instruction_text": text,
                 "query_image": self.images[n + i * images:n + (i + 1) * images],
                 "query_video": self.videos[i * videos:(i + 1) * videos], "target_image": self.images[i],
                 "target_label": None, "negative_image": [], "negative_label": []} for i in range(n)]

    def inputs(self, encoder, kind, n):
        """Model inputs of n records of `kind`, as the training step prepares them."""
        if kind == "target":
            return encoder.prepare_targets(self.images[:n], train=True), "target"
        return encoder.prepare_queries(self.examples(kind, n), train=True), "query"


# ----------------------------------------------------------------------------- the CPU estimate

@contextlib.contextmanager
def as_on_a_gpu():
    """The CPU saving what a GPU saves: bf16 weights and autocast (model.compute_dtype is fp32 on CPU), and dropout
    (LoRA's, on fp32 inputs) as CUDA's fused kernel, which keeps a one-byte mask; the CPU's own dropout keeps the
    input and a mask in the input's dtype (4 + 4 bytes per element instead of 1)."""
    compute_dtype, dropout = model.compute_dtype, F.dropout
    model.compute_dtype = lambda model_cfg, device: torch.bfloat16
    F.dropout = lambda input, p=0.5, training=True, inplace=False: (
        torch.native_dropout(input, p, training)[0] if training and p > 0 else input)
    try:
        yield
    finally:
        model.compute_dtype, F.dropout = compute_dtype, dropout


def replay_bytes(encoder, inputs, role, deepstack_levels):
    """(bytes autograd saves replaying one chunk, bytes of the vision features pass 1 keeps for it). The kept
    features are counted for `deepstack_levels` deepstack taps (the cut tower has fewer than the real one)."""
    with torch.no_grad():
        vision = encoder(inputs, role=role)["vision"]
    saved = SavedTensorBytes(exclude=list(encoder.parameters()) + tensors_in(vision))
    with saved:
        out = encoder(inputs, role=role, vision=vision)
    del out
    kept = 0
    for features in (vision or {}).values():   # merged visual tokens, then each deepstack level as large
        kept += nbytes(features.pooler_output) * (1 + deepstack_levels)
    return saved.bytes, kept


def build_cut(tmp, text_layers, tiny):
    """A backbone directory with `text_layers` text layers (and 1 vision block): Qwen3-VL-4B's architecture, or
    with `tiny` the tiny one. Returns the directory."""
    out = os.path.join(tmp, f"cut{text_layers}")
    if tiny:
        make_tiny_backbone(out, text_layers=text_layers, vision_depth=1)
    else:
        random_qwen3vl_4b(out, os.path.join(tmp, f"build{text_layers}"), "cpu", text_layers, 1)
    return out


def line(points):
    """Least-squares (intercept, slope) of y over x for [(x, y), ...]."""
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def estimate(cfg, kinds, media, chunks, depths, full_depth, tiny, tmp):
    """Per kind: the replay graph's bytes at each cut depth and chunk size, fitted in the chunk and extrapolated
    linearly in depth to full_depth; the kept vision features per record; the trainable parameter count and the
    frozen weights' bytes (one vision block), extrapolated the same way. Returns (fits {kind: {...}}, trainable
    parameters, frozen bytes, raw measurements)."""
    real_levels = 1 if tiny else len(real_config()["vision_config"]["deepstack_visual_indexes"])
    raw, per_depth, trainable, frozen = [], {}, {}, {}
    with as_on_a_gpu():
        for depth in depths:
            backbone = build_cut(tmp, depth, tiny)
            torch.manual_seed(0)
            encoder = model.build_encoder(cfg_with(cfg, backbone).model, cfg.calibrator, "cpu").train()
            trainable[depth] = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
            frozen[depth] = sum(p.nbytes for p in encoder.parameters() if not p.requires_grad)
            for kind in kinds:
                for chunk in chunks:
                    start = time.perf_counter()
                    inputs, role = media.inputs(encoder, kind, chunk)
                    saved, kept = replay_bytes(encoder, inputs, role, real_levels)
                    tokens = int(inputs["attention_mask"].sum())
                    raw.append({"kind": kind, "text_layers": depth, "chunk": chunk, "saved_bytes": saved,
                                "kept_vision_bytes": kept, "tokens": tokens})
                    per_depth.setdefault((kind, depth), []).append((chunk, saved, kept))
                    print(f"  {kind:8s} {depth} layer(s), chunk {chunk:2d}: {tokens:5d} tokens, graph "
                          f"{saved / 2**20:8.1f} MiB, kept vision {kept / 2**20:6.2f} MiB "
                          f"({time.perf_counter() - start:.1f} s)", flush=True)
            del encoder
            gc.collect()
    fits = {}
    for kind in kinds:
        at_depth = {d: line([(c, s) for c, s, _ in per_depth[kind, d]]) for d in depths}
        fixed = line([(d, at_depth[d][0]) for d in depths])
        slope = line([(d, at_depth[d][1]) for d in depths])
        kept = statistics.fmean(k / c for c, _, k in per_depth[kind, depths[0]])
        fits[kind] = {"graph_fixed_bytes": fixed[0] + full_depth * fixed[1],
                      "per_record_bytes": slope[0] + full_depth * slope[1], "kept_vision_per_record_bytes": kept}
    params, weights = line([(d, trainable[d]) for d in depths]), line([(d, frozen[d]) for d in depths])
    return fits, params[0] + full_depth * params[1], weights[0] + full_depth * weights[1], raw


def cfg_with(cfg, backbone):
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone = backbone
    return cfg


def architecture_weight_bytes():
    """Bytes of Qwen3-VL-4B's weights in bf16, every block of both towers, counted on the meta device (nothing
    built); the trainable copies are in the 16 bytes per trainable parameter."""
    from transformers import Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        lm = Qwen3VLForConditionalGeneration._from_config(qwen3vl_config(QWEN3_VL_4B), dtype=torch.bfloat16)
    return sum(p.numel() for p in lm.parameters()) * 2


# ----------------------------------------------------------------------------- the GPU measurement

def measure_cuda(cfg, kinds, media, chunks, tmp, device):
    """Per kind and chunk: the peak allocated over one training step (cached_step, AdamW) of a batch of two chunks,
    and the fit of peak - that batch's kept vision features = fixed + chunk * per_record. Returns ({kind: fit},
    raw measurements)."""
    from train_throughput import reset_peak_memory, step
    backbone = os.path.join(tmp, "qwen3-vl-4b-random")
    random_qwen3vl_4b(backbone, tmp, device)
    torch.manual_seed(0)
    cfg = cfg_with(cfg, backbone)
    encoder = model.build_encoder(cfg.model, cfg.calibrator, device).train()
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # One step first, so that AdamW's moments exist in every measured peak.
    step(encoder, cfg, media.examples("image", 2), 1, params, optimizer, scheduler)

    def kept_per_record(kind):
        with torch.no_grad():
            return nbytes(tensors_in(encoder(*media.inputs(encoder, kind, 1))["vision"]))

    target_kept = kept_per_record("target")
    raw, fits = [], {}
    for kind in kinds:
        kept, points = kept_per_record(kind), []
        for chunk in chunks[kind]:
            reset_peak_memory(device)
            start = time.perf_counter()
            step(encoder, cfg, media.examples(kind, 2 * chunk), chunk, params, optimizer, scheduler)
            peak = torch.cuda.max_memory_allocated(device)
            raw.append({"kind": kind, "chunk": chunk, "batch": 2 * chunk, "peak_bytes": peak})
            points.append((chunk, peak - 2 * chunk * (kept + target_kept)))
            print(f"  {kind:8s} chunk {chunk:2d}, batch {2 * chunk:3d}: peak {peak / GIB:6.2f} GiB "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
        fixed, per_record = line(points)
        fits[kind] = {"fixed": fixed, "per_record": per_record, "kept": kept, "points": points}
    return fits, raw


def calibrated(estimated, measured):
    """The measured fits, and for the kinds not measured the estimate corrected by what the measured kinds showed:
    per-record bytes times the median measured / estimated ratio, the fixed part plus the median difference. Prints
    each measured kind's prediction next to its measurement. Returns (fits, ratio, difference)."""
    ratios, differences = [], []
    for kind, m in measured.items():
        if kind not in estimated:
            continue
        e = estimated[kind]
        ratios.append(m["per_record"] / e["per_record"])
        differences.append(m["fixed"] - e["fixed"])
        print(f"  {kind:8s} estimated vs measured: fixed {e['fixed'] / GIB:6.2f} vs {m['fixed'] / GIB:6.2f} GiB, "
              f"per record {e['per_record'] / 2**20:7.1f} vs {m['per_record'] / 2**20:7.1f} MiB")
        for chunk, peak in m["points"]:
            print(f"           chunk {chunk:2d}: predicted {(e['fixed'] + chunk * e['per_record']) / GIB:6.2f} GiB, "
                  f"measured {peak / GIB:6.2f} GiB (both less the batch's kept vision features)")
    ratio = statistics.median(ratios) if ratios else 1.0
    difference = statistics.median(differences) if differences else 0.0
    fits = {kind: {"fixed": e["fixed"] + difference, "per_record": e["per_record"] * ratio, "kept": e["kept"]}
            for kind, e in estimated.items()}
    fits.update({kind: {k: m[k] for k in ("fixed", "per_record", "kept")} for kind, m in measured.items()})
    return fits, ratio, difference


# ----------------------------------------------------------------------------- the table

def query_kinds_of(root, cfg):
    """Each sub-dataset's heaviest query in a U-FIRE download (training records), as a kind of KINDS."""
    kinds = {}
    for key in SUB_DATASETS:
        records = load_records(root, key, "train")
        images = max(len(r.get("query_image", [])) for r in records)
        if key in SKETCH_SETS:
            images = min(images, cfg.data.max_query_images)
        videos = max(len(r.get("query_video", [])) for r in records)
        kind = "video" if videos else "text" if not images else "image" if images == 1 else f"images{images}"
        if kind not in KINDS:
            raise ValueError(f"{key}: queries with {images} images and {videos} videos; KINDS has no such kind")
        kinds[key] = kind
    return kinds


def predicted_peak(fits, key_kind, cfg, chunk):
    """Predicted peak bytes of a step on a sub-dataset whose queries are of kind key_kind: the heavier of its query
    chunk and its target chunk, with the vision features of the whole batch (queries, targets, hard negatives).
    When the queries and the targets are one chunk each, nothing is replayed: both keep their pass-1 graph until
    the loss's backward (train.embed_without_graph, keep_graph), so both graphs count at once."""
    batch, targets = cfg.train.batch_size, cfg.train.batch_size * (1 + cfg.train.asfr_hard_negatives)
    kept = batch * fits[key_kind]["kept"] + targets * fits["target"]["kept"]
    if chunk >= targets:
        return kept + fits[key_kind]["fixed"] + batch * fits[key_kind]["per_record"] + targets * fits["target"][
            "per_record"]
    return kept + max(fits[k]["fixed"] + chunk * fits[k]["per_record"] for k in (key_kind, "target"))


def table(fits, query_kinds, cfg, headroom):
    """{memory GB: {sub-dataset: largest chunk of CHUNKS dividing the batch whose predicted peak is under
    headroom * memory}}; a sub-dataset no chunk fits for is left out of that row (and named)."""
    batch = cfg.train.batch_size
    rows, misfits = {}, []
    for gb in MEMORY_GB:
        row = {}
        for key, kind in query_kinds.items():
            fitting = [c for c in CHUNKS
                       if batch % c == 0 and predicted_peak(fits, kind, cfg, c) <= headroom * gb * 1e9]
            if fitting:
                row[key] = max(fitting)
            else:
                misfits.append(f"{key} at {gb} GB")
        rows[gb] = row
    return rows, misfits


def assumed_settings(cfg):
    return {name: getattr(getattr(cfg, name.split(".")[0]), name.split(".")[1]) for name in ASSUMED}


def write_table(path, rows, fits, cfg, headroom, how):
    body = {"assumes": assumed_settings(cfg), "headroom": headroom,
            "fit": {k: {"fixed_gib": round(f["fixed"] / GIB, 3), "per_record_mib": round(f["per_record"] / 2**20, 2),
                        "kept_vision_per_record_mib": round(f["kept"] / 2**20, 3)} for k, f in fits.items()},
            "chunk_sizes": rows}
    how = how + ["chunk_sizes: per GPU memory in GB (10^9 bytes, as sold: an 80GB H100 has 79.6 GiB), the largest",
                 f"chunk of {list(CHUNKS)} dividing the batch whose predicted peak (fit: peak = fixed + chunk x",
                 "per_record + the batch's kept vision features) stays under headroom x memory. Training",
                 "(train.chunk_table) uses the row of the largest size at or below the GPU's memory; train.chunk_sizes",
                 "entries win over it."]
    header = "\n".join(f"# {line}" for line in how) + "\n"
    write_text_atomic(path, header + yaml.safe_dump(body, sort_keys=False, width=120))


def read_estimate(path):
    with open(path) as f:
        fit = yaml.safe_load(f)["fit"]
    return {k: {"fixed": v["fixed_gib"] * GIB, "per_record": v["per_record_mib"] * 2**20,
                "kept": v["kept_vision_per_record_mib"] * 2**20} for k, v in fit.items()}


def print_table(rows, fits):
    print("\nfit per record kind: peak = fixed + chunk x per_record (+ the batch's kept vision features)")
    for kind, f in fits.items():
        print(f"  {kind:8s} fixed {f['fixed'] / GIB:6.2f} GiB   per record {f['per_record'] / 2**20:8.1f} MiB   "
              f"kept vision per record {f['kept'] / 2**20:6.2f} MiB")
    keys = list(next(iter(rows.values())))
    print(f"\n{'sub-dataset':28s}" + "".join(f"{gb:>6d} GB" for gb in rows))
    for key in keys:
        print(f"{key:28s}" + "".join(f"{rows[gb].get(key, '-'):>9}" for gb in rows))


def cpu_estimate(args, cfg, kinds, tmp, command):
    """The CPU estimate's fits, raw measurements and the table's header lines."""
    chunks = [int(c) for c in (args.chunks or "1,2").split(",")]
    media = Media(tmp, max(chunks) * 6, max(chunks))
    arch = "the tiny" if args.tiny else "Qwen3-VL-4B's"
    full_depth = 2 if args.tiny else real_config()["text_config"]["num_hidden_layers"]
    print(f"CPU estimate: {arch} architecture, text tower cut to 1 and 2 layers and extrapolated to {full_depth}, "
          f"bf16 autocast, chunks {chunks}: bytes autograd saves (an estimate, not an allocator peak)")
    depth_fits, trainable, weights, raw = estimate(cfg, kinds, media, chunks, (1, 2), full_depth, args.tiny, tmp)
    weights = weights if args.tiny else architecture_weight_bytes()
    state = weights + 16 * trainable
    print(f"weights {weights / GIB:.2f} GiB (bf16); {trainable / 1e6:.1f} M trainable parameters x 16 bytes (fp32 "
          f"value, gradient, AdamW's two moments) = {16 * trainable / GIB:.2f} GiB")
    fits = {k: {"fixed": state + f["graph_fixed_bytes"], "per_record": f["per_record_bytes"],
                "kept": f["kept_vision_per_record_bytes"]} for k, f in depth_fits.items()}
    how = [f"Made by: {command}",
           f"on {datetime.date.today()}, on CPU: an ESTIMATE of the activation memory, not an allocator peak: the",
           "bytes autograd saves in one chunk's replay (bf16 autocast, dropout as CUDA's), for the architecture with",
           f"its text tower cut to 1 and 2 layers, extrapolated to {full_depth}; plus the weights, the trainable",
           "state (value, gradient, AdamW moments) and the vision features pass 1 keeps. Transients are left to the",
           "headroom. benchmarks/gpu_session.sh measures the peak on a GPU and writes the measured table",
           "($OUT/chunk_sizes.yaml): copy it over this file."]
    return fits, raw, how


def cuda_measurement(args, cfg, kinds, tmp, command):
    """The measured fits (kinds not measured: the --estimate table's, corrected), raw numbers and header lines."""
    chunks = [int(c) for c in (args.chunks or "4,16").split(",")]
    # Video and five-image queries hold 2.6x the tokens of an image query: a quarter of the chunk keeps them quick.
    per_kind = {k: sorted({max(1, c // 4) for c in chunks}) if k in ("video", "images5") else chunks for k in kinds}
    if any(len(c) < 2 for c in per_kind.values()):
        raise ValueError(f"the fit needs two chunk sizes per kind, got {per_kind}: give --chunks further apart")
    biggest = max(max(c) for c in per_kind.values())
    media = Media(tmp, 2 * biggest * 6, 2 * biggest)
    name = torch.cuda.get_device_name(args.device)
    print(f"CUDA measurement on {name}: chunks {per_kind}, each in one training step of two chunks")
    measured, raw = measure_cuda(cfg, kinds, media, per_kind, tmp, torch.device(args.device))
    fits, ratio, difference = calibrated(read_estimate(args.estimate) if args.estimate else {}, measured)
    how = [f"Made by: {command}",
           f"on {datetime.date.today()}, on {name}: MEASURED peaks (torch.cuda.max_memory_allocated over a training",
           f"step) for the kinds {sorted(measured)}; other kinds: the CPU estimate ({args.estimate or 'none'}),",
           f"per record x {ratio:.3f} and fixed {difference / GIB:+.2f} GiB, as the measured kinds showed."]
    return fits, raw, how


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to --config")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "full.yaml"))
    parser.add_argument("--device", default="cpu", help="cpu: estimate (default); cuda: measure")
    parser.add_argument("--kinds", default="", help="record kinds to estimate or measure (default: every kind on "
                                                    "cpu; image,video on cuda)")
    parser.add_argument("--chunks", default=None, help="chunk sizes per kind (default cpu 1,2; cuda 4,16; "
                                                       "video and images5 a quarter of them on cuda)")
    parser.add_argument("--headroom", type=float, default=0.8, help="fraction of the memory a predicted peak may use")
    parser.add_argument("--root", default="", help="a U-FIRE download: count each sub-dataset's query load there")
    parser.add_argument("--estimate", default="", help="cuda: a table this script wrote on CPU, for the kinds not "
                                                        "measured and for predicted vs measured")
    parser.add_argument("--tiny", action="store_true", help="the tiny backbone instead of Qwen3-VL-4B (a smoke test)")
    parser.add_argument("--table", default="", help="write the table (YAML) here")
    parser.add_argument("--json", default="", help="write the raw numbers (JSON) here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    kinds = (args.kinds or (",".join(KINDS) if args.device == "cpu" else "image,video")).split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {list(KINDS)}")
    if args.device != "cpu" and "target" in kinds:
        parser.error("--kinds target: on a GPU a gallery image is measured inside every training step, not on its "
                     "own; its fit comes from --estimate, corrected by the measured kinds")
    query_kinds = query_kinds_of(args.root, cfg) if args.root else QUERY_KINDS
    # Checked before the minutes of estimating or measuring: the kinds the table weighs that nothing will give.
    given = set(kinds) | (set(read_estimate(args.estimate)) if args.device != "cpu" and args.estimate else set())
    missing = sorted((set(query_kinds.values()) | {"target"}) - given)
    if missing:
        hint = "; on a GPU, give --estimate (a table this script wrote on CPU)" if args.device != "cpu" else ""
        parser.error(f"kinds {missing} are needed for the table but would be neither measured nor estimated{hint}")
    torch.manual_seed(0)
    started = time.perf_counter()
    command = f"python benchmarks/chunk_memory.py {' '.join(sys.argv[1:])}"
    with tempfile.TemporaryDirectory() as tmp:
        if args.device == "cpu":
            fits, raw, how = cpu_estimate(args, cfg, kinds, tmp, command)
        else:
            fits, raw, how = cuda_measurement(args, cfg, kinds, tmp, command)
        rows, misfits = table(fits, query_kinds, cfg, args.headroom)
        print_table(rows, fits)
        if misfits:
            print(f"no chunk fits: {', '.join(misfits)}")
        print(f"({time.perf_counter() - started:.0f} s)")
        if args.table:
            write_table(args.table, rows, fits, cfg, args.headroom, how)
        if args.json:
            write_text_atomic(args.json, json.dumps({"fits": fits, "raw": raw, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
