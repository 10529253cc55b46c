"""Training throughput: samples/s, where a step's time goes, model FLOPs utilisation and peak memory.

A step is exactly train.py's per-step work, imported from train.py: train.cached_step (gradient caching,
paper section IV-E; it also loads and preprocesses the batch's images), train.average_gradients, the token-gradient
norms GGAS reads (paper section IV-D), gradient clipping when the config asks for it, and an AdamW step. The sampler
update, the learning-rate schedule and the logging are left out (microseconds). Every setting runs 1 warm-up step
(allocator, AdamW state, kernels), excluded, then --steps measured steps; the median step time is reported
(timings with two or more threads on a shared CPU show multi-second spikes).

Default (CPU): configs/tiny.yaml with the tiny random Qwen3-VL (built into a temporary directory unless
--backbone is given) at several chunk sizes, on torch's thread count (OMP_NUM_THREADS; printed).

--real-arch (GPU): Qwen3-VL-4B-Instruct's architecture with random bf16 weights (benchmarks/encode_throughput.py's
config), configs/full.yaml (LoRA, batch 64, bf16 autocast) at chunk 8 and 16, next to configs/release.yaml
(keep_rope_positions, normed_readout, fp32_trainable off, reg_per_chunk on). Both encoders load the same saved
weights after the same seed, one at a time, so their peak memories do not overlap.

The batch is synthetic and needs no U-FIRE: one image + modification text per query (like 7_cir), a distinct
target image per query, in the training-view format of prepare_data.TrainSet.example.

Step time is split into train.py's phases (each timed with a device synchronisation at its ends): data (reading
and preprocessing the batch into chunks: prepare_chunks; with data.prepare_workers > 0 none of it: as in train.py
the chunks were prepared by threads during the step before, loader.StepPrefetch, and no-grad includes any wait for
them; the batch is the same every step, so every guess hits, as in training but where a GGAS refresh changes the
draw), no-grad (pass 1,
embed_without_graph), loss (pass 2, loss_and_embedding_gradients) and replay (pass 3, replay_with_graph, forward
with a graph and backward); "other" is the rest (gradient averaging, GGAS's token-gradient norms, clipping, AdamW).

FLOPs: one extra step per setting runs under torch.utils.flop_counter.FlopCounterMode, which counts every matrix
product and attention the step executes (pass 1, the replayed forward and the backward: what the hardware does,
recomputation included). Utilisation = FLOPs per step / seconds per step / the GPU's dense bf16 peak, taken from
BF16_PEAK_TFLOPS by the device's name (or --peak-tflops).

Host syncs (GPU): the times one step makes the host wait for the GPU, counted in one more step by torch's CUDA
sync debug mode (benchmarks/host_syncs.py counts the operations that would, on CPU).

Peak memory: on GPU torch.cuda.max_memory_allocated (weights, AdamW state and activations); on CPU the process's
peak resident set, reset per setting through /proc/self/clear_refs, so it includes the Python process and any
memory the allocator kept from earlier settings (chunk sizes therefore run smallest first). "before step" is what
is resident when the setting starts (weights; on CPU also the process), so peak minus it is what training adds.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py [--chunks 4,8,16,32] [--json out.json]
    python benchmarks/train_throughput.py --real-arch
    # CPU smoke test of the --real-arch path (architecture cut to 1 layer / 1 block, small batch):
    python benchmarks/train_throughput.py --real-arch --device cpu --text-layers 1 --vision-depth 1 \\
        --chunks 2,4 --steps 1 train.batch_size=4 model.image_pixels=4096
"""
import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from config import load_config  # noqa: E402
from encode_throughput import failure, peak_tflops, write_images  # noqa: E402
from fake_backbones import make_tiny_backbone, random_qwen3vl_4b  # noqa: E402
from loader import StepPrefetch  # noqa: E402
from model import build_encoder  # noqa: E402
from plumbing import write_text_atomic  # noqa: E402
import train  # noqa: E402
from train import cached_step, peak_memory_mb  # noqa: E402

# train.py's step phases (module-level functions that cached_step looks up in train's namespace) and their names.
PHASES = {"prepare_chunks": "data", "embed_without_graph": "no-grad", "loss_and_embedding_gradients": "loss",
          "replay_with_graph": "replay"}

INSTRUCTION = "Find the dress in the reference image, but make it navy and give it long sleeves."


def synthetic_batch(directory, n):
    """n training views (TrainSet.example's format) over 2n random PNGs: query image i, target image n + i."""
    paths = write_images(directory, 2 * n, size=(160, 200))
    return [{"id": f"bench-{i}", "key": "7_cir_FashionIQ-Dress", "instruction_text": INSTRUCTION,
             "query_image": [paths[i]], "query_video": [], "target_image": paths[n + i], "target_label": None,
             "negative_image": [], "negative_label": []} for i in range(n)]


def reset_peak_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: writing 5 resets the peak RSS (VmHWM, hence ru_maxrss read by train.peak_memory_mb) to the current RSS.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def phase_timers(device, seconds):
    """Adds each phase's wall time of the steps run inside to seconds[phase name]."""
    originals = {name: getattr(train, name) for name in PHASES}

    def timed(name, fn):
        def run(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(device)
                seconds[PHASES[name]] += time.perf_counter() - start
        return run

    for name, fn in originals.items():
        setattr(train, name, timed(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(train, name, fn)


def step(encoder, cfg, examples, chunk, params, optimizer, scheduler, prefetch=None):
    """One training step as train.train runs it: cached_step, then train.optimizer_step (gradient average, GGAS
    difficulty, the finiteness check, clipping, AdamW)."""
    pool = prefetched = prepare_next = None
    if prefetch:  # as in train.train, the next step's batch being this one
        batch = (examples[0]["key"], examples, chunk)
        pool, prefetched, prepare_next = prefetch.for_step(batch, batch)
    stats, bad = cached_step(encoder, examples, cfg, chunk, pool, prefetched, prepare_next)
    if bad:
        raise RuntimeError(f"synthetic batch has unreadable records: {bad}")
    train.optimizer_step(encoder, params, optimizer, scheduler, cfg, "benchmark step")
    return stats


def measure(encoder, cfg, examples, chunk, steps, device):
    """Median seconds per training step (warm-up excluded), the median seconds of each phase, memory in MiB
    resident before the first step and at the peak of all steps, FLOPs of one step, and the last step's stats."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.learning_rate_factor(cfg, steps + 3))
    encoder.train()
    reset_peak_memory(device)
    before = peak_memory_mb(device)  # just reset: what is resident before the step (weights, process)
    times, phases = [], []
    workers = cfg.data.prepare_workers
    with StepPrefetch(workers, encoder) if workers else contextlib.nullcontext() as prefetch:
        for _ in range(steps + 1):
            phase_seconds = dict.fromkeys(PHASES.values(), 0.0)
            with phase_timers(device, phase_seconds):
                synchronize(device)
                start = time.perf_counter()
                stats = step(encoder, cfg, examples, chunk, params, optimizer, scheduler, prefetch)
                synchronize(device)
            times.append(time.perf_counter() - start)
            phases.append(phase_seconds)
        peak = peak_memory_mb(device)
        with FlopCounterMode(display=False) as counter:  # after the timed steps: counting slows a step down
            step(encoder, cfg, examples, chunk, params, optimizer, scheduler, prefetch)
    phase_medians = {name: statistics.median(p[name] for p in phases[1:]) for name in PHASES.values()}
    return (statistics.median(times[1:]), phase_medians, before, peak, counter.get_total_flops(), stats,
            count_host_syncs(lambda: step(encoder, cfg, examples, chunk, params, optimizer, scheduler), device))


def count_host_syncs(fn, device):
    """GPU: how many times fn makes the host wait for the GPU (torch's CUDA sync debug mode warns at each:
    a value read back, a blocking copy, a stream synchronisation). None on CPU (benchmarks/host_syncs.py counts
    the operations that would be, on CPU)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_setting(rows, name, cfg, examples, chunks, args, device, save=lambda rows: None):
    """Appends one row per chunk size to `rows`, calling save(rows) after each: a run stopped early keeps what it
    measured. A chunk size that fails (a larger chunk can run out of memory where a smaller fits) is printed and
    recorded as an error row, and the next one runs."""
    torch.manual_seed(0)  # same LoRA / calibrator initialisation for every setting
    encoder = build_encoder(cfg.model, cfg.calibrator, device)
    peak = peak_tflops(device, args.peak_tflops)
    for chunk in chunks:
        try:
            seconds, phases, before, peak_mib, flops, stats, syncs = measure(encoder, cfg, examples, chunk,
                                                                             args.steps, device)
        except RuntimeError as err:   # torch.OutOfMemoryError and CUDA errors are RuntimeErrors
            traceback.print_exc()
            rows.append({"setting": name, "chunk": chunk, "batch": len(examples),
                         "error": failure(err)})
            print(f"| {name:8s} | {chunk:5d} | {len(examples):5d} | failed: {rows[-1]['error']}", flush=True)
        else:
            rows.append({"setting": name, "chunk": chunk, "batch": len(examples), "seconds_per_step": seconds,
                         "samples_per_s": len(examples) / seconds, "phase_seconds": phases,
                         "other_seconds": seconds - sum(phases.values()), "tflop_per_step": flops / 1e12,
                         "achieved_tflops": flops / 1e12 / seconds, "peak_tflops": peak,
                         "utilisation": flops / 1e12 / seconds / peak if peak else None,
                         "peak_memory_mib": peak_mib, "memory_before_mib": before, "loss": stats["loss"],
                         "host_syncs_per_step": syncs})
            print_row(rows[-1])
        save(rows)
    del encoder
    gc.collect()


def print_header():
    print("| setting  | chunk | batch | s/step | samples/s | data s | no-grad s | loss s | replay s | other s "
          "| TFLOP/step | TFLOP/s | MFU | peak GiB | before GiB | host syncs |")
    print("|----------|------:|------:|-------:|----------:|-------:|----------:|-------:|---------:|--------:"
          "|-----------:|--------:|----:|---------:|-----------:|-----------:|")


def print_row(r):
    p, syncs = r["phase_seconds"], r["host_syncs_per_step"]
    mfu = f"{100 * r['utilisation']:.1f}%" if r["utilisation"] is not None else "-"
    print(f"| {r['setting']:8s} | {r['chunk']:5d} | {r['batch']:5d} | {r['seconds_per_step']:6.3f} | "
          f"{r['samples_per_s']:9.1f} | {p['data']:6.3f} | {p['no-grad']:9.3f} | {p['loss']:6.3f} | "
          f"{p['replay']:8.3f} | {r['other_seconds']:7.3f} | {r['tflop_per_step']:10.3f} | "
          f"{r['achieved_tflops']:7.2f} | {mfu} | {r['peak_memory_mib'] / 1024:8.2f} | "
          f"{r['memory_before_mib'] / 1024:10.2f} | {'-' if syncs is None else syncs:>10} |", flush=True)


def print_ratios(rows):
    """Ours against the release at each chunk size, measured in the same process."""
    measured = [r for r in rows if "error" not in r]
    ours = {r["chunk"]: r for r in measured if r["setting"] == "ours"}
    for r in measured:
        if r["setting"] == "release" and r["chunk"] in ours:
            print(f"chunk {r['chunk']}: ours / release samples/s = "
                  f"{ours[r['chunk']]['samples_per_s'] / r['samples_per_s']:.2f}x, peak memory "
                  f"{ours[r['chunk']]['peak_memory_mib'] / r['peak_memory_mib']:.2f}x")


def save_json(args, header, rows):
    """--json: the setup line and the rows so far."""
    if args.json:
        write_text_atomic(args.json, json.dumps({"setup": header, "torch_threads": torch.get_num_threads(),
                                                 "steps": args.steps, "rows": rows}, indent=2))


def tiny_cpu(args, tmp):
    backbone = args.backbone or os.path.join(tmp, "tiny")
    if not args.backbone:
        make_tiny_backbone(backbone)
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), [f"model.backbone={backbone}", *args.overrides])
    examples = synthetic_batch(tmp, cfg.train.batch_size)
    device = torch.device("cpu")
    header = (f"tiny Qwen3-VL (configs/tiny.yaml, trainable {cfg.model.trainable}) on CPU, "
              f"{torch.get_num_threads()} torch thread(s), {cfg.model.image_pixels} pixels per image, "
              f"median of {args.steps} steps after 1 warm-up")
    print(header + "\n")
    print_header()
    rows = []
    run_setting(rows, "tiny", cfg, examples, args.chunks, args, device, lambda rows: save_json(args, header, rows))


def real_arch(args, tmp):
    device = torch.device(args.device)
    backbone = os.path.join(tmp, "qwen3-vl-4b-random")
    start = time.perf_counter()
    n_params = random_qwen3vl_4b(backbone, tmp, device, args.text_layers, args.vision_depth)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    peak = peak_tflops(device, args.peak_tflops)
    card += f", dense bf16 peak {peak:.0f} TFLOP/s" if peak else ", no bf16 peak known (--peak-tflops): no MFU"
    overrides = [f"model.backbone={backbone}", *args.overrides]
    settings = [("ours", load_config(os.path.join(ROOT, "configs/full.yaml"), overrides)),
                ("release", load_config(os.path.join(ROOT, "configs/release.yaml"), overrides))]
    cfg = settings[0][1]
    examples = synthetic_batch(tmp, cfg.train.batch_size)
    switches = ("keep_rope_positions", "normed_readout", "fp32_trainable", "reuse_vision_features", "vision_attention")
    header = (f"Qwen3-VL-4B architecture ({n_params / 1e9:.2f} B parameters, random weights, built in "
              f"{time.perf_counter() - start:.0f} s) on {card}; trainable {cfg.model.trainable} r={cfg.model.lora_r}, "
              f"{cfg.model.dtype + ' autocast' if device.type == 'cuda' else 'fp32'}, "
              f"{cfg.model.image_pixels} pixels per image, {torch.get_num_threads()} "
              f"torch thread(s), median of {args.steps} steps after 1 warm-up\n"
              + "\n".join(f"  {name}: " + ", ".join(f"{s}={getattr(c.model, s)}" for s in switches)
                          + f", reg_per_chunk={c.calibrator.reg_per_chunk}" for name, c in settings))
    print(header + "\n")
    print_header()
    rows = []
    for name, setting_cfg in settings:
        run_setting(rows, name, setting_cfg, examples, args.chunks, args, device,
                    lambda rows: save_json(args, header, rows))
    print_ratios(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every config, e.g. "
                                                     "train.batch_size=16 model.image_pixels=4096")
    parser.add_argument("--real-arch", action="store_true", help="Qwen3-VL-4B architecture on a GPU")
    parser.add_argument("--backbone", default="", help="tiny backbone directory (default: build one)")
    parser.add_argument("--chunks", default=None, help="chunk sizes, comma-separated (default 4,8,16,32 on CPU; "
                                                       "8,16 with --real-arch)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per setting (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: OMP_NUM_THREADS / torch's)")
    parser.add_argument("--device", default="cuda", help="--real-arch device; cpu only for a smoke test")
    parser.add_argument("--text-layers", type=int, help="--real-arch: fewer text layers (smoke test)")
    parser.add_argument("--vision-depth", type=int, help="--real-arch: fewer vision blocks (smoke test)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak in TFLOP/s "
                        "(default: from BF16_PEAK_TFLOPS by the GPU's name; none on CPU)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    args.chunks = [int(c) for c in (args.chunks or ("8,16" if args.real_arch else "4,8,16,32")).split(",")]
    if args.real_arch and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--real-arch needs a GPU (smoke test on CPU: --device cpu --text-layers 1 --vision-depth 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        (real_arch if args.real_arch else tiny_cpu)(args, tmp)


if __name__ == "__main__":
    main()
