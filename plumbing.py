"""Plumbing shared by the stages: the data error type, atomic writes (files and whole folders), checkpoint loading
and torch.distributed."""
import contextlib
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import yaml


class DataError(Exception):
    """Bad input; the message names the file and, when known, the record id."""

    def __init__(self, path, message, record_id=None):
        self.path, self.message, self.record_id = path, message, record_id
        super().__init__(f"{path}{f' (record {record_id})' if record_id is not None else ''}: {message}")


class SettingError(ValueError):
    """A setting, or a combination of settings and data, that this run cannot work with; the message names the
    config key(s). train.py prints it in one line."""


def output_folder(path, what):
    """`path`, an output folder a command will write into: a DataError before any work when something other than
    a folder holds that name (else the work is done first, then lost to a NotADirectoryError traceback)."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise DataError(path, f"not a folder ({what})")
    return path


def one_line(err, with_type=False):
    """An exception's message on one line; with_type prefixes its type (for errors raised by other libraries)."""
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else err     # KeyError quotes its str
    text = " ".join(str(text).split())
    if not text:
        return type(err).__name__
    return f"{type(err).__name__}: {text}" if with_type else text


def read_yaml(path):
    """A YAML file's contents. Malformed YAML is a DataError naming the file and the line: yaml's own errors are no
    ValueError and span several lines, so the command lines let them out as tracebacks. A missing file is a DataError
    too, saying where a relative path was looked for (a command run from outside the repository)."""
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (a relative path is read from the working directory {os.getcwd()})"
        raise DataError(path, f"{'not a file' if os.path.exists(path) else 'no such file'}{where}")
    with open(path, "rb") as f:     # bytes: yaml detects the encoding, and reports bytes that are not text itself
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark and problem else one_line(err)
            raise DataError(path, f"not valid YAML ({where})") from None


@contextlib.contextmanager
def atomic_write(path):
    """A temporary name beside `path` for the block to write (and close); then one rename onto `path`. Nobody ever
    reads half a file, and a failed write leaves nothing behind. The new bytes reach the disk before the rename: else,
    after a power cut, the file system may keep the rename but not the data, and `path` (last.pt, say) comes back
    empty instead of old or new."""
    temp = f"{path}.tmp{os.getpid()}"
    try:
        yield temp
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_text_atomic(path, text):
    with atomic_write(path) as temp, open(temp, "w") as f:
        f.write(text)


def save_atomic(obj, path):
    with atomic_write(path) as temp:
        torch.save(obj, temp)


def staging_dir(out_dir):
    """A temporary folder beside out_dir (same file system, so publish_dir's renames are atomic), creating
    out_dir's parent if needed (`make-tiny runs/x` on a fresh clone has no runs/ yet). Named `<out_dir>.partial-*`:
    a process killed outright (SIGKILL, out of memory) cannot remove it, and what it leaves, up to a whole export's
    weights, must say what it is."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=parent, prefix=f"{os.path.basename(out_dir)}.partial-")


def publish_dir(tmp, out_dir):
    """Move every file of tmp into out_dir, config.json last, each with an atomic os.replace: an interrupted
    build never leaves a config.json next to missing or stale weights."""
    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))


def load_checkpoint(path, mmap=False):
    """A training checkpoint, every tensor on the CPU: torch.set_rng_state and torch.cuda.set_rng_state take
    only CPU byte tensors, and the optimizer moves its own state to its parameters' device when loaded. A file that
    cannot be read is a DataError naming it (torch's own errors do not). mmap: tensors are mapped, read only where
    used (a caller that wants the step and score of a full-training checkpoint need not read its weights)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:            # noqa: BLE001: a truncated zip, a pickle of anything, an empty file ...
        raise DataError(path, f"cannot read the checkpoint (truncated, or not a file written by train.py): "
                              f"{one_line(err, with_type=True)}") from err


# ----------------------------------------------------------------------------- distributed

def world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def setup_distributed(timeout_s=1800):
    """torchrun sets WORLD_SIZE; NCCL on GPU, gloo on CPU (one thread per rank: the ranks share the CPU's cores).
    A collective that waits longer than timeout_s (a dead or stuck rank) fails instead of hanging the job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps one store for all the attempts of a job (--max-restarts) and env:// adds no per-attempt
        # namespace, so the workers of a restarted attempt could read the addresses that the dead workers of the
        # previous attempt published, and fail to connect to them ("Connection refused"). One namespace per attempt:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"fashionlens/attempt-{attempt}", store), rank=rank,
                                world_size=size, timeout=timeout)
        if backend == "gloo":
            torch.set_num_threads(1)
    rank, _ = world()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def gather_list(items):
    """Concatenation of every rank's list, in rank order."""
    _, size = world()
    if size == 1:
        return list(items)
    parts = [None] * size
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def all_reduce_mean(tensor):
    """`tensor`, in place, averaged over every rank (gloo has no AVG: sum, then divide)."""
    dist.all_reduce(tensor)
    tensor /= world()[1]
    return tensor


def average_gradients(params):
    """One all-reduce per step, after every chunk has been replayed (not one per chunk). Parameters that a
    step did not use (the vision tower on a text-only task) contribute zeros, so every rank stays in lockstep.
    The buffer is fp32 and each average goes back in its parameter's dtype: with model.fp32_trainable=false on a GPU
    the token vectors and the calibrator are bf16 beside the fp32 LoRA adapters, and torch refuses a gradient of
    another dtype than its parameter's."""
    _, size = world()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if size > 1:
        flat = all_reduce_mean(torch.cat([g.reshape(-1).float() for g in grads]))
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).to(p.dtype, copy=True)
    else:
        for p, g in zip(params, grads):
            p.grad = g
