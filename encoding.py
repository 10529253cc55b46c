"""Encoding for evaluation and search: each distinct image once, sharded over the ranks; the gallery-embedding
cache.

Sharding: under torch.distributed rank r encodes items r, r+W, r+2W, ... and rank 0 gathers them in order.
Cache (evaluate.py --cache DIR): one sub-directory per model fingerprint (the model and calibrator config, the size
and mtime of every backbone file, the library versions, the source of model.py, of the module of the encoder's class
and of the repository modules they import, the trainable weights) and the device's arithmetic (its compute dtype
and attention kernels); in it, entries are keyed by image path, size, mtime and ctime, so an image regenerated or
replaced at the same path is encoded again.
"""
import ast
import dataclasses
import glob
import hashlib
import importlib.metadata
import json
import os
import sys

import PIL
import torch
import torch.distributed as dist
from tqdm import tqdm

import model
from plumbing import DataError, one_line, save_atomic, world

CHUNK_BATCHES = 16          # forward batches per encoding chunk: the unit of progress and of cache files


def encode_sharded(encode, items, batch_size, progress, desc, on_chunk=None):
    """Embeddings [len(items), D] fp32 on rank 0 (None on other ranks).

    Under torch.distributed rank r encodes items r, r+W, r+2W, ...: interleaving gives every rank the same mix of
    cheap and expensive queries (text vs video). Each item is encoded once: a rank with one item fewer than rank 0
    sends a zero row in its place, so every rank sends as many rows, and the zero rows are dropped after the gather.
    on_chunk(items, emb) sees every encoded chunk (the embedding cache writes it to disk).
    """
    rank, size = world()
    shard = items[rank::size]
    rows = -(-len(items) // size)                 # rank 0's count, the most any rank has
    chunk = batch_size * CHUNK_BATCHES
    pieces = []
    with tqdm(total=rows * size, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        for start in range(0, len(shard), chunk):
            part = shard[start:start + chunk]
            emb = encode(part, batch_size=batch_size).float().cpu()
            if on_chunk is not None:
                on_chunk(part, emb)
            pieces.append(emb)
            bar.update(len(part) * size)
    if size == 1:
        return torch.cat(pieces)
    width = [pieces[0].shape[1] if pieces else None]
    if len(items) < size:                         # a rank without items learns the width from rank 0
        dist.broadcast_object_list(width, src=0)
    local = torch.cat(pieces + [torch.zeros(rows - len(shard), width[0])])
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    local = local.to(device)
    gathered = [torch.empty_like(local) for _ in range(size)] if rank == 0 else None
    dist.gather(local, gathered, dst=0)
    if rank != 0:
        return None
    # gathered[r][i] is items[i * W + r] (a zero row past the end): stacking on dim 1 restores the order.
    return torch.stack(gathered, dim=1).reshape(-1, local.shape[1])[:len(items)].cpu()


def encode_gallery(encoder, paths, batch_size, cache_dir, progress):
    """Gallery embeddings [len(paths), D] on rank 0. With cache_dir, embeddings found there are reused and every new
    chunk is written there as soon as it is encoded, so a killed run loses at most one chunk per rank.

    Cache entries are keyed by the image file's identity (path, size, mtime and ctime in ns; see file_key), so an
    image regenerated or replaced at the same path is encoded again; the directory itself is specific to the model
    (fingerprint)."""
    if cache_dir is None:
        return encode_sharded(encoder.encode_targets, paths, batch_size, progress, "gallery")
    rank, size = world()
    # Stat before encoding: an image rewritten while it is encoded is then keyed by its old identity and is encoded
    # again next time, never the other way round.
    keys = [file_key(p) for p in paths] if rank == 0 else None
    cached, decided = {}, [None]
    if rank == 0:
        try:
            cached = load_cache(cache_dir, encoder.embed_dim)
            decided = [list(dict.fromkeys(k for k in keys if k not in cached))]
        except DataError as err:                  # raised on every rank below, so none waits for rank 0
            decided = [(err.path, err.message)]
    if size > 1:                                  # rank 0 decides, so every rank encodes the same list
        dist.broadcast_object_list(decided, src=0)
    if isinstance(decided[0], tuple):
        raise DataError(*decided[0])
    missing = decided[0]
    if missing:
        new = encode_sharded(lambda items, batch_size: encoder.encode_targets([k[0] for k in items],
                                                                               batch_size=batch_size),
                              missing, batch_size, progress, "gallery",
                              on_chunk=lambda part, emb: save_cache_chunk(cache_dir, part, emb))
        if rank == 0:
            cached.update(zip(missing, new))
    return torch.stack([cached[k] for k in keys]) if rank == 0 else None


def file_key(path):
    """Cache key of a gallery image: (path, size in bytes, mtime in ns, ctime in ns). The ctime is there because
    copying tools set the mtime back (cp -p, rsync -a, tar): a replaced image of the same size would keep its key.
    The kernel sets the ctime on every write and it cannot be set back; the price is that data copied to another
    disk (or chmod-ed) is encoded once more. A file that cannot be stat'ed keys as (path, -1, -1, -1); encoding it
    reports the missing file."""
    try:
        stat = os.stat(path)
    except OSError:
        return (path, -1, -1, -1)
    return (path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def load_cache(cache_dir, dim):
    """{file_key: embedding} of every readable chunk file. A chunk file without file identities of file_key's form
    (written by an earlier version) or one that cannot be read is skipped with a warning: it is only a cache. A chunk
    that reads but does not hold one float32 row of the model's width `dim` per key was not written for this model
    (save_cache_chunk writes encode_sharded's fp32 rows): a DataError naming it, as its rows would reach faiss."""
    cached = {}
    for path in sorted(glob.glob(os.path.join(cache_dir, "targets-*.pt"))):
        try:
            chunk = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:           # noqa: BLE001: torch.load and pickle raise many types
            print(f"embedding cache: ignoring unreadable cache file {path}: {one_line(err, with_type=True)}",
                  file=sys.stderr)
            continue
        if not isinstance(chunk, dict) or "keys" not in chunk or any(len(key) != 4 for key in chunk["keys"]):
            print(f"embedding cache: ignoring cache file {path}: an older format (its file identities lack the ctime, "
                  f"or are absent); its images are encoded again", file=sys.stderr)
            continue
        emb, expected = chunk.get("emb"), (len(chunk["keys"]), dim)
        if not (isinstance(emb, torch.Tensor) and emb.dtype == torch.float32 and emb.shape == expected):
            found = f"{emb.dtype} {list(emb.shape)}" if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise DataError(path, f"cache chunk holds {found} embeddings, expected {torch.float32} {list(expected)} "
                                  f"(one row of the model's width per image): not written for this model; delete the "
                                  f"cache folder {cache_dir}")
        cached.update(zip((tuple(k) for k in chunk["keys"]), emb))
    return cached


def save_cache_chunk(cache_dir, keys, emb):
    os.makedirs(cache_dir, exist_ok=True)
    name = hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:20]
    target = os.path.join(cache_dir, f"targets-{name}.pt")
    save_atomic({"keys": [list(k) for k in keys], "emb": emb.clone()}, target)


def backbone_files(model_cfg):
    """The local files the backbone is loaded from: every file under a Qwen3-VL backbone directory (hidden ones
    aside, such as a download tool's .cache), or an open_clip model-config JSON and weights file."""
    if model_cfg.kind == "openclip":
        name, _, weights = model_cfg.backbone.partition(":")
        return [p for p in (name, weights) if p and os.path.isfile(p)]
    if os.path.isfile(model_cfg.backbone):
        return [model_cfg.backbone]
    files = []
    for folder, dirs, names in os.walk(model_cfg.backbone):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(folder, n) for n in sorted(names) if not n.startswith(".")]
    return files


def embedding_sources(encoder):
    """model.py, the module that defines the encoder's class, and every module of this repository they import,
    directly or not (attention.py, media.py, ...): the code that turns an image into an embedding, found from the
    import statements so that none is forgotten."""
    root = os.path.dirname(os.path.abspath(model.__file__))
    found, todo = [], [os.path.abspath(model.__file__), os.path.abspath(sys.modules[type(encoder).__module__].__file__)]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.append(path)
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        imports = tree.body             # the module's own imports; a command's (model.py export) are not the model's
        names = [node.module for node in imports if isinstance(node, ast.ImportFrom) and node.module]
        names += [alias.name for node in imports if isinstance(node, ast.Import) for alias in node.names]
        todo += [p for p in (os.path.join(root, f"{name}.py") for name in names) if os.path.exists(p)]
    return sorted(found)


def fingerprint(cfg, encoder):
    """Cache key for gallery embeddings: the model and calibrator config (backbone path, pixel budget, ...), the
    identity (relative name, size, mtime in ns) of every backbone file, the loaded backbone weights
    (Encoder.backbone_identity), the versions of the libraries that turn an image into an embedding and the source
    of this repository's code that does (embedding_sources), and every trainable tensor (name, shape, its values as
    fp32 bytes). It names the model; how a device computes it is `arithmetic`."""
    import transformers  # here, not at the top: model.py must set HF_HUB_OFFLINE before transformers loads

    digest = hashlib.sha256(json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.calibrator)],
                                       sort_keys=True).encode())
    root = cfg.model.backbone if os.path.isdir(cfg.model.backbone) else ""
    for path in backbone_files(cfg.model):
        stat = os.stat(path)
        digest.update(f"file {os.path.relpath(path, root) if root else path} {stat.st_size} "
                      f"{stat.st_mtime_ns}\n".encode())
    # By content too: another fine-tune of the same architecture has files of the same sizes, and a copy that keeps
    # times (cp -p, rsync -a, an archive) carries its source's mtimes, which need not differ from the replaced ones.
    digest.update(f"weights {encoder.backbone_identity()}\n".encode())
    digest.update(f"torch {torch.__version__} transformers {transformers.__version__} PIL {PIL.__version__} "
                  f"open_clip {importlib.metadata.version('open_clip_torch')}\n".encode())
    for path in embedding_sources(encoder):
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    for name, tensor in sorted(encoder.trainable_state_dict().items()):
        # As fp32: with model.fp32_trainable=false a GPU holds the token vectors and the calibrator in bf16, a CPU
        # the same values in fp32; one model, computed two ways (arithmetic), not two models.
        tensor = tensor.detach().cpu().float().contiguous()
        digest.update(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def arithmetic(cfg, encoder):
    """How this device computes the model's embeddings: device type, compute dtype (model.dtype on a GPU, fp32 on a
    CPU) and attention kernels ("auto" picks FlashAttention or sdpa, and the vision tower's packed path), e.g.
    "cuda-bfloat16-sdpa-packed". The same checkpoint gives other embeddings on another device: cached embeddings
    equal uncached ones only when both were computed the same way."""
    lm = getattr(encoder, "lm", None)
    dtype = str(model.compute_dtype(cfg.model, encoder.device)).removeprefix("torch.")
    attention = lm.config._attn_implementation if lm is not None else type(encoder).__name__
    return f"{encoder.device.type}-{dtype}-{attention}" + ("-packed" if getattr(encoder, "vision_attention_packed",
                                                                              False) else "")


def cache_key(cfg, encoder):
    """The folder of a gallery-embedding cache: which model (fingerprint), computed how (arithmetic)."""
    return f"{fingerprint(cfg, encoder)}-{arithmetic(cfg, encoder)}"
