"""Train FashionLens (paper sections IV-D and IV-E; docs/method.md#loss, #gradient-caching, #ggas).

    python train.py configs/tiny.yaml [section.key=value ...] [--resume]
    torchrun --nproc_per_node=8 --max-restarts=3 train.py configs/full.yaml    # restarts resume from last.pt

Every step trains on one sub-dataset chosen by GGAS (sampler.py), with an InfoNCE loss over that batch's
targets. The batch is pushed through the encoder in chunks with exact gradient caching, and gradients are
averaged across processes once per step. Checkpoints hold everything needed to resume bit-for-bit.
"""
import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import random
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import check_ranks_agree, checkpoint, checkpoint_to_resume, move_aside, restore, settle_best
from config import check_choice, load_config
from evaluate import EvaluationError, evaluate_sets, load_encoder, resolve_backbone, score
from loader import StepPrefetch, chunk_items, chunk_report, chunk_sizes_for, prepare_chunks
from plumbing import (DataError, SettingError, average_gradients, gather_list, one_line, save_atomic,
                      setup_distributed, world, write_text_atomic)
from prepare_data import SUB_DATASETS, TrainSet, build_eval_sets
from sampler import TaskSampler


# ----------------------------------------------------------------------------- gathering across processes

def gather_keep_local(x):
    """Every rank's rows of `x` in rank order (ranks may hold different counts after skipping bad records).
    This rank's rows stay `x` itself, so gradients of a loss on the result reach them. Returns rows, counts."""
    rank, size = world()
    counts = gather_list([x.shape[0]])
    padded = torch.cat([x.detach(), x.new_zeros(max(counts) - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    parts = [part[:n] for part, n in zip(parts, counts)]
    parts[rank] = x
    return torch.cat(parts), counts


# ----------------------------------------------------------------------------- the loss (paper section IV-E)

def contrastive_loss(q, t, positives, t_paths, t_labels, temperature):
    """Query->target InfoNCE (docs/method.md#loss). Row i's positive is column positives[i]. Other columns that
    show the same image, or (asfr) an image with the positive's label, are false negatives: masked out rather than
    pushed away."""
    path_ids = {p: i for i, p in enumerate(dict.fromkeys(t_paths))}
    label_ids = {lab: i for i, lab in enumerate(dict.fromkeys(t_labels))}
    # Unlabelled columns get distinct negative ids so they never match each other.
    paths = torch.tensor([path_ids[p] for p in t_paths])
    labels = torch.tensor([label_ids[lab] if lab is not None else -1 - j for j, lab in enumerate(t_labels)])
    false_negative = (paths[None, :] == paths[positives][:, None]) | (labels[None, :] == labels[positives][:, None])
    false_negative[torch.arange(len(positives)), positives] = False
    logits = (q @ t.T / temperature).masked_fill(false_negative.to(q.device), float("-inf"))
    return F.cross_entropy(logits, positives.to(q.device))


# ----------------------------------------------------------------------------- one step, gradient-cached

def torch_rng_state(cuda):
    return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None


def set_torch_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def embed_without_graph(encoder, chunks, role, keep_graph):
    """Pass 1: every chunk's embeddings without a graph, remembering the random state each chunk starts from.
    When the whole batch is one chunk there is nothing to save by caching: that chunk keeps its graph
    (keep_graph) and is not replayed. `chunks` may still be in preparation (an iterator).
    Returns (inputs, outputs, random states)."""
    cuda = next(encoder.parameters()).is_cuda
    seen, outs, states = [], [], []
    with torch.set_grad_enabled(keep_graph):
        for inputs in chunks:
            seen.append(inputs)
            states.append(torch_rng_state(cuda))
            outs.append(encoder(inputs, role=role))
    return seen, outs, states


def prepare_and_embed(encoder, examples, chunk_size, pool=None, prefetched=None):
    """Turn a batch into model inputs and embed them without a graph (pass 1), dropping unreadable records: a
    record whose file cannot be read is named in `bad`, and the batch is prepared and embedded again without it
    from the random state it started from (with a pool, pass 1 may have run on earlier chunks before the record
    was reached), so the result is the serial path's. `prefetched`: see prepare_chunks. Returns (kept examples,
    target paths, (query inputs, outputs, random states), (target inputs, outputs, random states), bad records)."""
    start = torch_rng_state(next(encoder.parameters()).is_cuda)
    bad = []
    while True:
        targets, q_items, t_items = chunk_items(examples, chunk_size)
        single = len(q_items) == 1 and len(t_items) == 1
        try:
            chunks = prepare_chunks(encoder, q_items, t_items, pool, prefetched)
            q = embed_without_graph(encoder, itertools.islice(chunks, len(q_items)), "query", keep_graph=single)
            t = embed_without_graph(encoder, chunks, "target", keep_graph=single)
            return examples, targets, q, t, bad
        except DataError as err:
            culprits = {e["id"] for e in examples if err.record_id == e["id"] or err.path in
                        (e["query_image"] + e["query_video"] + [e["target_image"]] + e["negative_image"])}
            if not culprits:
                raise
            bad.append((sorted(culprits), str(err)))
            examples = [e for e in examples if e["id"] not in culprits]
            prefetched = None               # the prefetched chunks held the record: prepared again without it
            set_torch_rng_state(start)


def loss_and_embedding_gradients(encoder, examples, q_outs, t_outs, t_paths, cfg, gather):
    """Pass 2: the InfoNCE loss of the whole batch and its gradient with respect to every embedding.
    With cross-GPU negatives (gather) every rank computes the global loss; scaling the local embedding
    gradients by the world size keeps the later average exact. A rank whose whole batch was unreadable still
    joins the gathers with no rows; skipping them would leave the other ranks waiting forever.
    Returns (loss, d(loss)/d(query embeddings), d(loss)/d(target embeddings), the count the regularisers' sum
    is divided by on this rank: the local batch, or with gather the global batch over the world size, so that the
    average over ranks is the global batch's mean even when ranks kept different counts of records)."""
    empty = torch.zeros(0, encoder.embed_dim, device=encoder.device)
    q = torch.cat([empty] + [out["emb"].detach() for out in q_outs]).requires_grad_(True)
    t = torch.cat([empty] + [out["emb"].detach() for out in t_outs]).requires_grad_(True)
    labels = [e["target_label"] for e in examples] + [lab for e in examples for lab in e["negative_label"]]
    if gather:
        _, size = world()
        q_all, q_counts = gather_keep_local(q)
        t_all, t_counts = gather_keep_local(t)
        t_starts = np.cumsum([0] + t_counts[:-1])
        # Each rank's first targets are its queries' positives, in order.
        positives = torch.tensor([t_starts[r] + i for r, n in enumerate(q_counts) for i in range(n)])
        loss = contrastive_loss(q_all, t_all, positives, gather_list(t_paths), gather_list(labels),
                                cfg.train.temperature)
        scale, reg_batch = size, sum(q_counts) / size
    else:
        loss = contrastive_loss(q, t, torch.arange(q.shape[0]), t_paths, labels, cfg.train.temperature)
        scale, reg_batch = 1, q.shape[0]
    grad_q, grad_t = torch.autograd.grad(loss, [q, t])
    return loss, grad_q * scale, grad_t * scale, reg_batch


def replay_with_graph(encoder, chunks, states, outs, grads, role, cfg, replay, reg_batch=None):
    """Pass 3: re-run each chunk with a graph (replay; else its pass-1 graph is kept), its random state restored
    so dropout masks match, and back-propagate the cached embedding gradients through it. The calibrator's
    regularisers (queries only) are summed and divided by `reg_batch` (see loss_and_embedding_gradients), or
    (release) averaged per chunk and summed over chunks. Returns the regularisers' total, on the device: reading it
    per chunk would make the host wait for each chunk's backward before it could queue the next chunk."""
    reg_total = 0.0
    w_fro, w_orth = cfg.calibrator.fro_weight, cfg.calibrator.orth_weight
    start = 0
    for inputs, state, out in zip(chunks, states, outs):
        if replay:
            set_torch_rng_state(state)
            out = encoder(inputs, role=role, vision=out["vision"])  # a frozen vision tower's pass-1 output
        n = out["emb"].shape[0]
        surrogate = (out["emb"] * grads[start:start + n]).sum()
        if out["reg_fro"] is not None:
            per_sample = w_fro * out["reg_fro"] + w_orth * out["reg_orth"]
            reg = per_sample.mean() if cfg.calibrator.reg_per_chunk else per_sample.sum() / reg_batch
            surrogate = surrogate + reg
            reg_total = reg_total + reg.detach().double()   # float64, as a sum of Python floats
        surrogate.backward()
        start += n
    return reg_total


def cached_step(encoder, examples, cfg, chunk_size, pool=None, prefetched=None, prepare_next=None):
    """Loss and gradients of one batch, exactly as if the whole batch went through the model at once
    (gradient caching, docs/method.md#gradient-caching): embed every chunk without a graph, get
    d(loss)/d(embedding), then replay each chunk with a graph and back-propagate the cached embedding gradients.
    `pool` and `prefetched`: see prepare_chunks. `prepare_next()` is called once every chunk is prepared, so that
    the pool prepares the next step's while this one computes (StepPrefetch).
    Leaves the local gradients in .grad; returns (stats, or None when this rank learns nothing this step,
    unreadable records). With gathered negatives a rank that kept no record still returns the global loss."""
    examples, t_paths, (q_chunks, q_outs, q_states), (t_chunks, t_outs, t_states), bad = prepare_and_embed(
        encoder, examples, chunk_size, pool, prefetched)
    if prepare_next is not None and examples:
        # Only after a batch that kept a record: this thread then tokenized its first chunk (or an earlier batch's),
        # which must happen before the pool's threads tokenize at once (see prepare_chunks).
        prepare_next()
    gather = cfg.train.gather_negatives and world()[1] > 1
    if not examples and not gather:
        return None, bad   # nothing to learn from; average_gradients still adds this rank's zeros
    single = len(q_chunks) == 1 and len(t_chunks) == 1
    end_state = torch_rng_state(next(encoder.parameters()).is_cuda)
    loss, grad_q, grad_t, reg_batch = loss_and_embedding_gradients(encoder, examples, q_outs, t_outs, t_paths, cfg,
                                                                   gather)
    reg = replay_with_graph(encoder, q_chunks, q_states, q_outs, grad_q, "query", cfg, not single, reg_batch)
    replay_with_graph(encoder, t_chunks, t_states, t_outs, grad_t, "target", cfg, replay=not single)
    set_torch_rng_state(end_state)
    gates = [out["gate"].detach() for out in q_outs if out["gate"] is not None]
    contrastive, reg = loss.item(), float(reg)    # read back once the whole step is queued
    return {"loss": contrastive + reg, "contrastive": contrastive, "reg": reg,
            "gate_mean": torch.cat(gates).mean().item() if gates else None, "samples": grad_q.shape[0]}, bad


# ----------------------------------------------------------------------------- the training loop

def refuse_fp16(model_cfg):
    """An fp16 autocast needs loss scaling (torch.amp.GradScaler), which the gradient-cached step does not do:
    gradients under fp16's smallest subnormal (6e-8) would flush to zero and their updates be lost, silently. bf16
    has fp32's range and needs none. Refused wherever it runs (a CPU computes in fp32 and would not show it)."""
    if model_cfg.dtype == "float16":
        raise SettingError("model.dtype=float16 cannot train: fp16 gradients need loss scaling, which train.py does "
                           "not do (small ones would vanish); use bfloat16, or float32 on a GPU without bf16")


def learning_rate_factor(cfg, total_steps):
    """A linear warm-up over train.warmup_steps (either schedule; release: none), then constant (release; paper
    section IV-E) or cosine decay to zero."""
    def factor(step):
        if step < cfg.train.warmup_steps:
            return (step + 1) / cfg.train.warmup_steps
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - cfg.train.warmup_steps) / max(1, total_steps - cfg.train.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    check_choice("train", "schedule", cfg.train.schedule)
    return factor


def batch_examples(train_set, indices, cfg, step, rank):
    """The batch's training views. The random choices (which target, which sketches, which hard negatives)
    come from a generator seeded by (seed, step, rank), so a resumed run draws the same ones."""
    rng = random.Random(f"{cfg.train.seed}-{step}-{rank}")
    examples = [train_set.example(i, rng) for i in indices]
    for e in examples:
        n = len(e["negative_image"])
        picked = rng.sample(range(n), min(cfg.train.asfr_hard_negatives, n))
        e["negative_image"] = [e["negative_image"][i] for i in picked]
        e["negative_label"] = [e["negative_label"][i] for i in picked]
    return examples


def draw_batch(sampler, train_sets, bad_records, chunks, cfg, step, rank):
    """Step `step`'s batch from the sampler's next draw, less the unreadable records known so far: (sub-dataset
    key, training views, gradient-cache chunk size from `chunks`, chunk_sizes_for's)."""
    key, indices = sampler.next_batch()
    examples = batch_examples(train_sets[key], indices, cfg, step, rank)
    examples = [e for e in examples if f"{key}/{e['id']}" not in bad_records]
    return key, examples, chunks[key]


def batch_report(cfg, sampler, size):
    """What one step holds, said once at start: the per-process and global batch, what each query is scored
    against, and the sub-datasets too small for one global batch."""
    batch, gathered = cfg.train.batch_size, cfg.train.gather_negatives and size > 1
    targets, source = (batch * size, "gathered from every process") if gathered else (batch, "its own process's")
    lines = [f"batch {batch} per process x {size} process(es) = global batch {batch * size}; each query is scored "
             f"against {targets} in-batch targets ({source}; plus up to {cfg.train.asfr_hard_negatives} hard "
             f"negatives per asfr query); {sampler.epoch_length} steps per epoch"]
    for key, n, b in zip(sampler.keys, sampler.sizes, sampler.batch):
        if b < batch:
            lines.append(f"  {key}: {n} training records, fewer than one global batch of {batch * size}: it trains "
                         f"with {b} per process and adds no steps to the epoch length")
    return "\n".join(lines)


def record_bad_records(bad_records, key, bad, rank, cfg):
    """Add this step's unreadable records of every rank to `bad_records` (a collective: every rank calls it every
    step, so all keep the same set). Each record is reported once; more than data.max_bad_records stops the run."""
    for ids, message in gather_list(bad):
        new = [f"{key}/{i}" for i in ids if f"{key}/{i}" not in bad_records]
        if new and rank == 0:
            print(f"skipped record(s) {', '.join(new)} from now on: {message}", file=sys.stderr)
        bad_records.update(new)
    if len(bad_records) > cfg.data.max_bad_records:
        first = sorted(bad_records)[:5]
        raise DataError(cfg.data.root, f"{len(bad_records)} unreadable training records (limit data."
                                       f"max_bad_records={cfg.data.max_bad_records}); first: {first}")


def across_ranks(per_rank):
    """One step's statistics over every rank, from each rank's cached_step stats (None: no record kept). The loss
    terms are averaged over ranks, a rank without records counting 0: averaged gradients descend exactly that mean
    (with gathered negatives every rank already holds the global contrastive loss, and its regulariser share is
    scaled so the mean is the global batch's). Samples are summed; the gate mean is weighted by each rank's queries."""
    kept = [s for s in per_rank if s is not None]
    if not kept:
        return {}
    stats = {name: sum(s[name] for s in kept) / len(per_rank) for name in ("loss", "contrastive", "reg")}
    stats["samples"] = sum(s["samples"] for s in kept)
    gated = [s for s in kept if s["gate_mean"] is not None and s["samples"]]
    stats["gate_mean"] = (sum(s["gate_mean"] * s["samples"] for s in gated) / sum(s["samples"] for s in gated)
                          if gated else None)
    return stats


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # The process's peak resident memory: ru_maxrss counts KiB on Linux but bytes on macOS.
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def load_val_sets(cfg, keys):
    """The validation sets, each cut to its first train.val_max_queries queries (0: all)."""
    val_sets = build_eval_sets(cfg.data.root, "val", keys=keys, unseen=False)
    if cfg.train.val_max_queries:
        for s in val_sets:
            s.queries, s.ground_truth, s.exclude = (x[:cfg.train.val_max_queries]
                                                    for x in (s.queries, s.ground_truth, s.exclude))
    return val_sets


def optimizer_step(encoder, params, optimizer, scheduler, cfg, where):
    """Average the gradients over processes, clip, step. Returns GGAS's difficulty d_k (paper section IV-D): the
    token-gradient norm, one norm of both tokens (release) or the sum of two norms.
    Non-finite gradients stop the run before they reach the weights (every rank holds the same averaged gradients,
    so every rank stops): one optimizer step would make every weight NaN, and the next checkpoint would save them.
    `where` names the step in that error."""
    average_gradients(params)
    joint, summed = encoder.token_grad_norms()
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not math.isfinite(norm):
        raise FloatingPointError(f"{where}: the gradients are not finite (total norm {float(norm)}); the run stops "
                                 f"before the optimizer applies them, so the last checkpoint holds finite weights")
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.train.grad_clip, norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return joint if cfg.sampler.difficulty == "joint" else summed


def validate(encoder, val_sets, cfg):
    """Every rank gets the same results back, so all take the same best-checkpoint decision."""
    results = evaluate_sets(encoder, val_sets, batch_size=cfg.train.eval_batch_size, progress=False)
    encoder.train()
    return results


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_log_until(path, step):
    """Drop the records of steps after `step` (the checkpoint resumed) from the log: a run killed after logging steps
    that its last.pt does not hold logs them again when it resumes, and the log must describe one run. An unterminated
    last line (cut by the kill) goes too; any other line that is not a record is a DataError naming it."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.endswith("\n"):
            break
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(path, f"line {number} is not a record written by train.py: "
                                  f"{one_line(err, with_type=True)}") from err
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(kept))
        print(f"{path}: dropped {len(lines) - len(kept)} line(s) logged after step {step}, which the resumed run "
              f"trains again")


def train(cfg, resume=False, stop_after=None):
    """Run training to the end (or, for tests that simulate a killed run, return after `stop_after` steps)."""
    refuse_fp16(cfg.model)
    device = setup_distributed(cfg.train.dist_timeout_s)
    rank, size = world()
    # A backbone that is not there is named before any data is read or file written.
    resolve_backbone(cfg.model, how="model.backbone at it (in the config, or model.backbone=DIR after it)")
    last_path = os.path.join(cfg.train.out_dir, "last.pt")
    best_path = os.path.join(cfg.train.out_dir, "best.pt")
    log_path = os.path.join(cfg.train.out_dir, "log.jsonl")

    keys = cfg.data.sub_datasets or list(SUB_DATASETS)
    chunks, source = chunk_sizes_for(cfg, keys, device)
    train_sets = {k: TrainSet(cfg.data.root, k, cfg.data.max_query_images) for k in keys}
    sampler = TaskSampler({k: len(s) for k, s in train_sets.items()}, cfg.sampler, cfg.train.batch_size,
                          world_size=size, rank=rank, seed=cfg.train.seed)
    total_steps = cfg.train.max_steps or int(cfg.train.epochs * sampler.epoch_length)
    val_sets = load_val_sets(cfg, keys)

    encoder = load_encoder(cfg, None, device)   # seeded with train.seed: the same fresh trainable weights on every rank
    # Then one random stream per rank (dropout masks differ across ranks, as under DDP).
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)
    encoder.train()
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(cfg, total_steps))
    # Unreadable training records, as "key/id": shared by every rank, excluded from sampling once found, counted
    # once each against data.max_bad_records, and saved in the checkpoint so a resumed run keeps skipping them.
    step, best_score, best_step, bad_records = 0, -1.0, None, set()
    os.makedirs(cfg.train.out_dir, exist_ok=True)   # only now: a setting refused above leaves no empty out_dir
    ckpt = checkpoint_to_resume(last_path, resume)
    if ckpt is not None:
        step, best_score, best_step, bad_records = restore(ckpt, cfg, encoder, optimizer, scheduler, sampler, rank,
                                                           last_path)
        if rank == 0:
            print(f"resumed {last_path} at step {step}")
            keep_log_until(log_path, step)
    elif rank == 0:
        # A fresh run replaces the run train.out_dir held: its log goes, and its last.pt is moved aside (as its best.pt
        # is, by settle_best), so that a --resume after this run is killed before its first save cannot continue it.
        if os.path.exists(log_path):
            os.remove(log_path)
        if os.path.exists(last_path):
            print(f"{last_path} belongs to another run (this one is not --resume): moved to "
                  f"{move_aside(last_path, 'last.orphan.pt')}")
    if rank == 0:
        settle_best(ckpt, best_path)
    check_ranks_agree(encoder, f"resuming {last_path} at step {step}" if ckpt is not None else "at start")
    if rank == 0:
        print(batch_report(cfg, sampler, size))
        print(chunk_report(chunks, source))

    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    workers = cfg.data.prepare_workers
    with StepPrefetch(workers, encoder) if workers else contextlib.nullcontext() as prefetch:
        while step < total_steps:
            started = time.time()
            batch = draw_batch(sampler, train_sets, bad_records, chunks, cfg, step, rank)
            key, examples, chunk = batch
            pool, prefetched, prepare_next = None, None, None
            if prefetch:
                # The next step's batch unless this step's GGAS update changes P (at an update_every or epoch
                # boundary, docs/method.md#ggas) or this step finds a new unreadable record. Drawn from a copy: the
                # sampler itself, and so every draw and checkpoint, is the same as without prefetch.
                guess = (draw_batch(copy.deepcopy(sampler), train_sets, bad_records, chunks, cfg, step + 1, rank)
                         if step + 1 < total_steps else None)
                pool, prefetched, prepare_next = prefetch.for_step(batch, guess)
            stats, bad = cached_step(encoder, examples, cfg, chunk, pool, prefetched, prepare_next)
            record_bad_records(bad_records, key, bad, rank, cfg)
            lr = scheduler.get_last_lr()[0]             # this step's rate, before the scheduler moves to the next
            where = f"step {step + 1} of {key} (loss {stats and stats['loss']}, records {[e['id'] for e in examples]})"
            difficulty = optimizer_step(encoder, params, optimizer, scheduler, cfg, where)
            sampler.update(key, difficulty, device=device)
            step += 1

            samples, elapsed = (stats or {}).get("samples", 0), time.time() - started
            record = {"step": step, "epoch": (step - 1) // sampler.epoch_length, "key": key, **(stats or {}),
                      "lr": lr, "probs": sampler.probabilities(),
                      "difficulty": sampler.difficulties(), "samples_per_s": samples * size / elapsed,
                      "peak_mem_mb": peak_memory_mb(device)}
            if prefetch:
                # Steps of this process so far whose inputs were prepared during the step before, and guesses missed.
                record.update(prefetch_hits=prefetch.hits, prefetch_misses=prefetch.misses)
            if step % cfg.train.log_every == 0 or step == total_steps:
                # Every rank's step time and statistics (a collective, at the same steps on every rank): a straggler
                # shows here, and the logged loss is the whole step's, not rank 0's share of it.
                times, per_rank = zip(*gather_list([(round(elapsed, 4), stats)]))
                step_stats = across_ranks(per_rank)
                record.update(step_stats, samples_per_s=step_stats.get("samples", 0) / elapsed,
                              step_time_s=list(times), slowest_rank=int(np.argmax(times)))
                if rank == 0:
                    append_log(log_path, record)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", task=key.split("_", 2)[-1],
                            sps=f"{record['samples_per_s']:.1f}")
            bar.update(1)

            new_best = False
            if (cfg.train.val_every and step % cfg.train.val_every == 0) or step == total_steps:
                results = validate(encoder, val_sets, cfg)
                current = score(results)
                if rank == 0:
                    append_log(log_path, {"step": step, "val": results, "val_score": current})
                if current > best_score:
                    best_score, best_step, new_best = current, step, True
            # A new best writes last.pt too, and first: best.pt is then never ahead of last.pt, and a run killed
            # between the two finds its best in last.pt when it resumes (checkpoints.settle_best).
            if new_best or step % cfg.train.save_every == 0 or step == total_steps:
                state = checkpoint(cfg, encoder, optimizer, scheduler, sampler, step, best_score, best_step,
                                   bad_records)
                if rank == 0:
                    save_atomic(state, last_path)
                    if new_best:
                        save_atomic(state, best_path)
            if stop_after is not None and step >= stop_after:
                break
    bar.close()
    return encoder, best_score


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt if it exists")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except (OSError, DataError, KeyError, TypeError, ValueError) as err:    # each names its file or key
        parser.error(one_line(err))
    # torchrun --max-restarts=N starts every worker again after one dies, with TORCHELASTIC_RESTART_COUNT > 0:
    # a restarted run continues from last.pt by itself.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        _, best = train(cfg, resume=args.resume or restarted)
    except (DataError, EvaluationError, SettingError) as err:   # each names its file, record, backbone or key
        sys.exit(f"train.py: {err}")
    if world()[0] == 0:
        print(f"best validation score (sum of Recall@1): {best:.2f}; checkpoints in {cfg.train.out_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
