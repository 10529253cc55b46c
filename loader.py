"""Feeding the gradient-cached training step (train.py; docs/method.md#gradient-caching): a batch cut into chunks,
the chunks' model inputs prepared by data.prepare_workers threads (during the step before, when the next batch can
be guessed), and each sub-dataset's chunk size, which on a GPU comes from a table by GPU memory."""
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from plumbing import DataError, SettingError, read_yaml


# ----------------------------------------------------------------------------- a batch's chunks, prepared in threads

def in_submission_order(futures, first=()):
    """The chunks of `first` (prepared already), then each future's result in the order the futures were submitted
    (see prepare_chunks)."""
    try:
        yield from first
        for future in futures:
            yield future.result()           # re-raises the chunk's DataError here, in the serial path's order
    finally:
        for future in futures:              # after an unreadable record the batch is prepared again without it
            future.cancel()


def chunk_items(examples, chunk_size):
    """A batch's targets (every query's positive in query order, then the hard negatives) and its query and target
    chunks. Returns (target paths, query chunks, target chunks)."""
    targets = [e["target_image"] for e in examples] + [p for e in examples for p in e["negative_image"]]
    return (targets, [examples[i:i + chunk_size] for i in range(0, len(examples), chunk_size)],
            [targets[i:i + chunk_size] for i in range(0, len(targets), chunk_size)])


def preparation_jobs(encoder, q_items, t_items):
    return ([(encoder.prepare_queries, items) for items in q_items]
            + [(encoder.prepare_targets, items) for items in t_items])


def prepare_chunks(encoder, q_items, t_items, pool=None, prefetched=None):
    """Model inputs of every query chunk, then every target chunk, in that order, as an iterator (each chunk is
    prepared once and reused by the replay). Serial (no pool): all of them are prepared before this returns, so an
    unreadable record is found before the model runs. With a pool (data.prepare_workers threads), the first chunk
    is prepared here and the others by the pool's threads while the model embeds the chunks before them (pass 1):
    decoding overlaps the model, and several chunks decode at once (PIL, PyAV and torch release the GIL). The
    chunks come back in submission order whatever finishes first, and a chunk's DataError is raised when its turn
    comes, so the inputs and the first unreadable record are the serial path's. `prefetched`: the pool's futures
    of exactly these chunks, submitted during the step before (StepPrefetch); none is prepared here then."""
    if prefetched is not None:
        return in_submission_order(prefetched)
    jobs = preparation_jobs(encoder, q_items, t_items)
    if pool is None or not jobs:
        return iter([prepare(items, train=True) for prepare, items in jobs])
    # The threads share the processor's tokenizer. transformers sets its padding state on the first call (and again
    # only for other padding settings; every call here asks for the same): two threads doing it at once fail
    # ("Already borrowed"). The first chunk, needed first anyway, is therefore tokenized here before any thread runs.
    prepare, items = jobs[0]
    first = prepare(items, train=True)
    return in_submission_order([pool.submit(prepare, items, train=True) for prepare, items in jobs[1:]], [first])


class StepPrefetch:
    """data.prepare_workers threads for the whole run: they prepare each step's chunks (prepare_chunks) and, while a
    step computes its loss, replay and optimizer step, a guess at the next step's batch, so that a step need not
    wait for its first chunk. The next step uses the guess only if its real batch is the same (key, training views,
    chunk size); otherwise the guess is cancelled and the step prepares its batch as without it. Either way the
    step's inputs, and the unreadable record it finds (a prefetched chunk's DataError is raised only when the step
    that uses it reaches that chunk), are the serial path's. At most one step ahead; hits and misses are counted
    for the log."""

    def __init__(self, workers, encoder):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare")
        self.encoder = encoder
        self.guess, self.futures = None, []
        self.hits = self.misses = 0

    def prepare(self, batch):
        """Submit the preparation of the chunks of `batch`, (key, training views, chunk size): the guess."""
        _, q_items, t_items = chunk_items(*batch[1:])
        self.guess = batch
        self.futures = [self.pool.submit(prepare, items, train=True)
                        for prepare, items in preparation_jobs(self.encoder, q_items, t_items)]

    def for_step(self, batch, guess):
        """cached_step's pool, prefetched and prepare_next for a step on `batch` that prepares `guess` (None: no
        next step) for the step after it."""
        return self.pool, self.take(batch), None if guess is None else functools.partial(self.prepare, guess)

    def take(self, batch):
        """The futures of `batch`'s chunks if the guess was exactly `batch`, else None (nothing was guessed, or the
        guess is cancelled)."""
        guess, futures, self.guess, self.futures = self.guess, self.futures, None, []
        if guess is None:
            return None
        if guess == batch:
            self.hits += 1
            return futures
        self.misses += 1
        for future in futures:
            future.cancel()
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(cancel_futures=True)     # a guess for a step that will not run


# ----------------------------------------------------------------------------- chunk sizes by GPU memory

def chunk_sizes_for(cfg, keys, device):
    """Each sub-dataset's gradient-cache chunk (docs/method.md#gradient-caching): its train.chunk_sizes entry, else on
    a GPU the train.chunk_table row for the GPU's memory, else train.chunk_size. The largest chunk that fits is the
    fastest, and with calibrator.reg_per_chunk false the chunk is no part of the objective; with it true it is (the
    regularisers' weight is batch / chunk), so a table is refused. Returns ({key: chunk}, where they come from)."""
    row, source = {}, f"train.chunk_size={cfg.train.chunk_size}"
    if cfg.train.chunk_table:
        if cfg.calibrator.reg_per_chunk:
            raise SettingError("train.chunk_table picks chunk sizes by GPU memory, but with calibrator.reg_per_chunk="
                               "true the chunk is part of the objective: set train.chunk_sizes (configs/release.yaml)")
        if device.type == "cuda":
            row, source = chunk_table_row(cfg, torch.cuda.get_device_properties(device).total_memory)
        else:
            source += f"; {cfg.train.chunk_table} is for GPUs"
    chunks = {k: cfg.train.chunk_sizes.get(k, row.get(k, cfg.train.chunk_size)) for k in keys}
    return chunks, source + (", train.chunk_sizes first" if cfg.train.chunk_sizes else "")


def chunk_table_row(cfg, memory_bytes):
    """The row of train.chunk_table for the largest memory size (GB, as GPUs are sold) at or below memory_bytes, after
    checking the table was made for this config's settings. Returns (row, a description of the choice)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), cfg.train.chunk_table)
    table = read_yaml(path)
    if not isinstance(table, dict) or not {"assumes", "chunk_sizes"} <= table.keys():
        raise DataError(path, "not a chunk table (benchmarks/chunk_memory.py writes them): needs 'assumes' and "
                              "'chunk_sizes'")
    ours = {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}
    differing = [f"{name}: table {value!r}, config {ours.get(name)!r}" for name, value in table["assumes"].items()
                 if ours.get(name) != value]
    if differing:
        raise DataError(path, f"made for other settings ({'; '.join(differing)}): make one for this config with "
                              f"benchmarks/chunk_memory.py, or set train.chunk_sizes and train.chunk_table=''")
    fitting = [gb for gb in table["chunk_sizes"] if gb * 1e9 <= memory_bytes]
    if not fitting:
        raise DataError(path, f"no row for a GPU of {memory_bytes / 1e9:.1f} GB (smallest: "
                              f"{min(table['chunk_sizes'])} GB): set train.chunk_sizes and train.chunk_table=''")
    gb = max(fitting)
    return table["chunk_sizes"][gb], f"{cfg.train.chunk_table}, row {gb} GB for this GPU's {memory_bytes / 1e9:.1f} GB"


def chunk_report(chunks, source):
    by_size = {}
    for key, chunk in chunks.items():
        by_size.setdefault(chunk, []).append(key)
    return f"gradient-cache chunk per sub-dataset ({source}): " + "; ".join(
        f"{chunk}: {', '.join(keys)}" for chunk, keys in sorted(by_size.items(), reverse=True))
