"""Checkpoints that resume bit for bit, on one process or many: the trainable weights, optimizer, scheduler, GGAS
sampler, every rank's random states and the unreadable records; rank 0 decides whether to resume and sends the
checkpoint to every rank, and every rank's weights are checked against rank 0's."""
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from plumbing import DataError, gather_list, load_checkpoint, save_atomic, world


def rng_states():
    """This process's random states. On a GPU only its own device's generator (setup_distributed set it current):
    every visible GPU's (get_rng_state_all) could not be restored where fewer GPUs are visible."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_states(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint(cfg, encoder, optimizer, scheduler, sampler, step, best_score, best_step, bad_records):
    # Each rank's random state differs (seeded per rank); all of them are saved so every rank resumes exactly.
    # best_step: the step of best_score (None before the first validation), which settle_best checks best.pt against.
    return {"config": cfg.to_dict(), "model": encoder.trainable_state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "rng": gather_list([rng_states()]),
            "step": step, "best_score": best_score, "best_step": best_step, "bad_records": sorted(bad_records),
            **encoder.identities()}


def checkpoint_to_resume(path, resume):
    """The checkpoint every rank resumes from, or None for a fresh start. Rank 0 alone decides and reads it and
    sends it to the others: a rank must never start fresh because its own file system lacks the file."""
    rank, size = world()
    ckpt = load_checkpoint(path) if rank == 0 and resume and os.path.exists(path) else None
    if size > 1:
        box = [ckpt]
        dist.broadcast_object_list(box, src=0)
        ckpt = box[0]
    return ckpt


def settle_best(last, best_path):
    """Make best.pt the best checkpoint of the run that `last` (the checkpoint resumed from; None: a fresh run)
    continues, so that best.pt, last.pt and log.jsonl describe one run. Rank 0, before training. train.py writes
    last.pt at every new best and before best.pt, so a run killed between the two resumes from its best step: last.pt
    is written as best.pt. Any other best.pt that is not the one last.pt records (a fresh run's leftover; one ahead of
    last.pt, as an earlier train.py, which wrote best.pt first, left when killed between the two) is moved aside to
    best.orphan-step<N>.pt, never deleted. A last.pt written before best_step was recorded accepts a best.pt of its
    best score at or before its step."""
    best = readable_best(best_path)
    if (best is not None and last is not None and best["best_score"] == last["best_score"]
            and best["step"] <= last["step"] and best["step"] == last.get("best_step", best["step"])):
        return
    if best is not None:
        orphan = move_aside(best_path, f"best.orphan-step{best['step']}.pt")
        run = (f"the run resumed at step {last['step']} (best score {last['best_score']:.2f} at step "
               f"{last.get('best_step')})" if last is not None else "this fresh run")
        print(f"{best_path} (step {best['step']}, score {best['best_score']:.2f}) is not the best checkpoint of "
              f"{run}: moved to {orphan}")
    if last is not None and last.get("best_step") == last["step"]:
        save_atomic(last, best_path)
        print(f"wrote {best_path} from the checkpoint resumed (step {last['step']}, best score "
              f"{last['best_score']:.2f}): the run stopped after writing last.pt, before best.pt")


def readable_best(best_path):
    """best.pt's checkpoint, or None where there is none. One that cannot be read or lacks the step and score train.py
    writes (a file cut by a crash, or not train.py's) is moved aside with a note: best.pt is an output of the run,
    never a reason to stop it."""
    if not os.path.exists(best_path):
        return None
    try:
        best = load_checkpoint(best_path, mmap=True)    # its step and score only: a full-training best.pt is GBs
        if isinstance(best, dict) and {"step", "best_score"} <= best.keys():
            return best
        problem = "no step and best score: not a checkpoint train.py wrote"
    except DataError as err:
        problem = err.message
    print(f"{best_path}: {problem}; moved to {move_aside(best_path, 'best.orphan-unreadable.pt')}")
    return None


def move_aside(path, name):
    """Rename `path` to `name` in its folder, or to name-2, name-3, ... where that is taken: a file another run left is
    kept, never overwritten. Returns the new path."""
    stem, ext = os.path.splitext(name)
    target, n = os.path.join(os.path.dirname(path), name), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(os.path.dirname(path), f"{stem}-{n}{ext}")
    os.replace(path, target)
    return target


def check_ranks_agree(encoder, when):
    """Every rank's trainable weights must equal rank 0's (a checksum per tensor, compared across ranks): data
    parallel training keeps them equal only if they start equal."""
    rank, size = world()
    if size == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in encoder.parameters() if p.requires_grad]).tolist()
    every = gather_list([sums])
    differing = [r for r in range(size) if every[r] != every[0]]
    if differing:
        raise RuntimeError(f"{when}: the trainable weights of rank(s) {differing} differ from rank 0's "
                           f"(checksums); every rank must start from the same weights")


# Settings that change only speed or waiting, never what is computed (the packed vision attention: up to float
# rounding), and may differ when a run resumes; a checkpoint written before one of them existed resumes too.
RESUME_MAY_DIFFER = {"data": ("prepare_workers",), "model": ("reuse_vision_features", "vision_attention"),
                     "train": ("dist_timeout_s",)}
# The gradient-cache chunk settings may differ too, unless calibrator.reg_per_chunk makes the chunk part of the
# objective (the regularisers' weight is batch / chunk). Without it the chunk changes no term of the loss: the
# gradient is the whole batch's (docs/method.md#gradient-caching) for any chunk, equal up to float rounding
# (tests/test_train.py). So a run resumed on another GPU, whose train.chunk_table row picks other chunks, or with
# smaller chunks set by hand to fit, trains the same objective. It does not continue bit for bit: besides the
# rounding, LoRA dropout draws its masks chunk by chunk, so other chunks draw other masks (another draw of the
# same random masking; on the same GPU and chunks a resumed run is still bit for bit).
CHUNK_SETTINGS = ("chunk_size", "chunk_sizes", "chunk_table")


def comparable_config(config):
    """A config dict less the settings of RESUME_MAY_DIFFER (and CHUNK_SETTINGS without reg_per_chunk)."""
    may_differ = dict(RESUME_MAY_DIFFER)
    if not config.get("calibrator", {}).get("reg_per_chunk"):    # a config without it is refused for that (restore)
        may_differ["train"] = may_differ.get("train", ()) + CHUNK_SETTINGS
    return {section: {k: v for k, v in values.items() if k not in may_differ.get(section, ())}
            if isinstance(values, dict) else values for section, values in config.items()}


def restore(ckpt, cfg, encoder, optimizer, scheduler, sampler, rank, path):
    """Load a checkpoint into every part of training; returns (step, best score, its step, unreadable records). A
    checkpoint of another config or of other backbone weights is refused."""
    saved, now = comparable_config(ckpt["config"]), comparable_config(cfg.to_dict())
    differ = [f"{section}.{key}" for section in sorted(saved.keys() | now.keys())
              for key in sorted(saved.get(section, {}).keys() | now.get(section, {}).keys())
              if saved.get(section, {}).get(key) != now.get(section, {}).get(key)]
    if differ:
        raise DataError(path, f"written with another config (differing: {', '.join(differ[:5])}); resume with the "
                              f"same config")
    # The config names the backbone by path only: a directory replaced in place by another model of the same
    # architecture would load the trainable state without complaint and go on training it on other weights (the
    # identity is bf16-rounded, so a copy of the same weights in another dtype resumes); so would one with another
    # tokenizer, whose ids mean other tokens.
    problem = encoder.other_backbone(ckpt)
    if problem:
        raise DataError(path, f"{problem}; resume on the backbone it was trained on")
    encoder.load_trainable_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    sampler.load_state_dict(ckpt["sampler"])
    set_rng_states(ckpt["rng"][rank])
    return ckpt["step"], ckpt["best_score"], ckpt.get("best_step"), set(ckpt["bad_records"])
