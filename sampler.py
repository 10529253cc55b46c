"""Gradient-Guided Adaptive Sampling, GGAS (paper section IV-D; docs/method.md#ggas).

Every training step trains on one sub-dataset k, so in-batch negatives come from the same task. The choice of k
follows a distribution P that favours sub-datasets whose gradients are large (hard, not yet learnt) and large
ones (data-scale prior), with a floor so no sub-dataset is starved:

    G_k <- alpha * G_k + (1 - alpha) * d_k                  (EMA of the difficulty, G_k starts at 0)
    log S_k = gamma * log N_k + G_k / eta                   (scale prior plus difficulty)
    P = softmax(log S)
    P_k >= epsilon for every k                              (the floor)

Under DDP every rank holds an identical sampler: the same seeded generators and the same rank-averaged
difficulties, so all ranks pick the same k at every step without communicating the choice, and each rank takes
its own slice of one shared permutation of k's records (no record twice in the global batch).
"""
import numpy as np
import torch
import torch.distributed as dist

from config import check_choice
from plumbing import SettingError, all_reduce_mean


def softmax(x):
    z = np.exp(x - np.max(x))
    return z / z.sum()


def floor_renormalise(p, eps):
    """The release's floor (docs/method.md#ggas): clamp to eps, then renormalise. The renormalisation pushes
    clamped entries back below eps whenever anything was clamped (config sampler.guaranteed_floor=false)."""
    p = np.maximum(p, eps)
    return p / p.sum()


def floor_water_fill(p, eps):
    """A floor that holds (paper section IV-D): entries below eps are fixed at eps and the remaining mass is shared
    among the others in proportion to p; repeat, since shrinking the others can push more of them under eps.
    Each round fixes at least one more entry, so it ends within len(p) rounds."""
    fixed = np.zeros(len(p), dtype=bool)
    while True:
        free_mass = 1.0 - eps * fixed.sum()
        out = np.where(fixed, eps, free_mass * p / p[~fixed].sum())
        below = ~fixed & (out < eps)
        if not below.any():
            return out
        fixed |= below


class TaskSampler:
    """Chooses the sub-dataset of every step and this rank's record indices within it (paper section IV-D).

    sizes: N_k, the number of training records per sub-dataset key (insertion order is the key order).
    batch_size: records per rank; a sub-dataset smaller than one global batch gives N_k // world_size per rank.
    All state is identical on every rank, so any rank's state_dict() resumes all of them.
    """

    def __init__(self, sizes, cfg, batch_size, world_size=1, rank=0, seed=0):
        check_choice("sampler", "mode", cfg.mode)
        check_choice("sampler", "difficulty", cfg.difficulty)
        if not sizes:
            raise ValueError("TaskSampler needs at least one sub-dataset")
        if batch_size < 1:      # else the per-sub-dataset check below blames the size of the sub-datasets
            raise SettingError(f"train.batch_size must be at least 1, got {batch_size}")
        if cfg.mode == "ggas" and cfg.floor * len(sizes) >= 1:
            raise SettingError(f"sampler.floor={cfg.floor} leaves no room for {len(sizes)} sub-datasets "
                               f"(floor * K >= 1); use sampler.mode=uniform for uniform sampling")
        self.keys = list(sizes)
        self.sizes = np.array([sizes[k] for k in self.keys], dtype=np.int64)
        self.cfg, self.world_size, self.rank, self.seed = cfg, world_size, rank, seed
        # Per-rank batch; smaller sub-datasets shrink it so one global batch still holds distinct records.
        self.batch = np.minimum(batch_size, self.sizes // world_size)
        for key, b in zip(self.keys, self.batch):
            if b < 1:
                raise SettingError(f"sub-dataset {key} has {sizes[key]} training records, fewer than the "
                                   f"{world_size} ranks: every rank needs at least one record per batch")
        self.batch_size = batch_size
        # An epoch is sum_k floor(N_k / (world_size * batch)) steps (docs/method.md#ggas).
        self.epoch_length = int((self.sizes // (world_size * batch_size)).sum())
        if self.epoch_length == 0:
            raise SettingError(f"every sub-dataset is smaller than one global batch ({world_size} x {batch_size}); "
                               f"sizes: {dict(sizes)}; lower train.batch_size")
        # The draws depend only on the step count, G, this generator and the seeded shuffles (_permutation),
        # all identical across ranks.
        self.task_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0])))
        self.step = 0
        self.G = np.zeros(len(self.keys))
        self.passes = np.zeros(len(self.keys), dtype=np.int64)     # completed shuffles per sub-dataset
        self.positions = np.zeros(len(self.keys), dtype=np.int64)  # next unread slot in the current shuffle
        self._permutations = [self._permutation(i) for i in range(len(self.keys))]
        self.P = self._uniform() if self._in_warmup() else self._target_probabilities()

    @property
    def epoch(self):
        return self.step // self.epoch_length

    def _uniform(self):
        return np.full(len(self.keys), 1.0 / len(self.keys))

    def _in_warmup(self):
        # The uniform warm-up belongs to GGAS (it gathers difficulty estimates); sampler.warmup_all_modes gives it
        # to the ablation modes too, so that an ablation differs from GGAS in the sampler alone.
        warms_up = self.cfg.mode == "ggas" or self.cfg.warmup_all_modes
        return warms_up and self.epoch < self.cfg.warmup_epochs

    def _target_probabilities(self):
        mode = self.cfg.mode
        if mode == "uniform":
            return self._uniform()
        if mode == "size":
            return self.sizes / self.sizes.sum()
        if mode == "size_pow":
            return softmax(self.cfg.gamma * np.log(self.sizes))
        p = softmax(self.cfg.gamma * np.log(self.sizes) + self.G / self.cfg.eta)   # P = softmax(log S)
        floor = floor_water_fill if self.cfg.guaranteed_floor else floor_renormalise
        return floor(p, self.cfg.floor)                                              # the floor

    def _refresh(self):
        """P for the step about to be drawn: uniform during warm-up, then recomputed from G at the start of every
        epoch and, when sampler.update_every > 0, every update_every steps (release: 0, once per epoch)."""
        if self._in_warmup():
            self.P = self._uniform()
        elif self.step % self.epoch_length == 0 or (self.cfg.update_every and self.step % self.cfg.update_every == 0):
            self.P = self._target_probabilities()

    def _permutation(self, i):
        # A shuffle is a pure function of (seed, sub-dataset, pass), so resuming needs only pass and position.
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 1, i, int(self.passes[i])])))
        return rng.permutation(int(self.sizes[i]))

    def next_batch(self):
        """(key, this rank's record indices) for the next step; identical key on every rank."""
        self._refresh()
        # Inverse-CDF draw from one uniform number: identical on all ranks given identical P.
        i = min(int(np.searchsorted(np.cumsum(self.P), self.task_rng.random(), side="right")), len(self.keys) - 1)
        b, global_batch = int(self.batch[i]), int(self.batch[i]) * self.world_size
        if self.positions[i] + global_batch > self.sizes[i]:
            # Too few unread records left for a whole global batch: reshuffle rather than mixing the tail of the
            # old shuffle with the new one, which could put a record twice in one batch.
            self.passes[i] += 1
            self.positions[i] = 0
            self._permutations[i] = self._permutation(i)
        start = int(self.positions[i]) + self.rank * b
        indices = self._permutations[i][start:start + b].tolist()
        self.positions[i] += global_batch
        self.step += 1
        return self.keys[i], indices

    def update(self, key, difficulty, device=None):
        """Feed the difficulty d_k of the step just trained on `key` into its EMA G_k.

        d_k is the gradient norm of the two learnable token vectors; config sampler.difficulty picks one norm of
        both ("joint", release) or the sum of two norms ("sum"), computed by the trainer. Under DDP it is
        averaged across ranks first so every rank keeps the same G; this is
        a collective, so every rank calls it every step. For NCCL pass the rank's CUDA device."""
        if key not in self.keys:
            raise KeyError(f"unknown sub-dataset {key!r}; known: {self.keys}")
        d = float(difficulty)
        if dist.is_available() and dist.is_initialized():
            d = all_reduce_mean(torch.tensor([d], dtype=torch.float64, device=device)).item()
        if not np.isfinite(d):
            raise ValueError(f"non-finite difficulty {d} for sub-dataset {key} at step {self.step}")
        i = self.keys.index(key)
        self.G[i] = self.cfg.alpha * self.G[i] + (1 - self.cfg.alpha) * d

    def probabilities(self):
        return dict(zip(self.keys, self.P.tolist()))

    def difficulties(self):
        return dict(zip(self.keys, self.G.tolist()))

    def state_dict(self):
        return {"keys": list(self.keys), "sizes": self.sizes.tolist(), "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self.seed, "step": self.step, "G": self.G.tolist(),
                "P": self.P.tolist(), "task_rng": self.task_rng.bit_generator.state,
                "passes": self.passes.tolist(), "positions": self.positions.tolist()}

    def load_state_dict(self, state):
        mine = {"keys": list(self.keys), "sizes": self.sizes.tolist(), "world_size": self.world_size,
                "batch_size": self.batch_size}
        theirs = {name: state[name] for name in mine}
        if theirs != mine:
            raise SettingError(f"sampler state does not match this run (an exact resume needs the same sub-datasets, "
                               f"sizes, world size and batch size): saved {theirs}, now {mine}")
        self.seed, self.step = state["seed"], state["step"]
        self.G = np.array(state["G"], dtype=np.float64)
        self.P = np.array(state["P"], dtype=np.float64)
        self.task_rng.bit_generator.state = state["task_rng"]
        self.passes = np.array(state["passes"], dtype=np.int64)
        self.positions = np.array(state["positions"], dtype=np.int64)
        self._permutations = [self._permutation(i) for i in range(len(self.keys))]
