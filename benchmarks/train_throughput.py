"""Training throughput: samples/s and peak memory of one training step.

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
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from config import load_config  # noqa: E402
from encode_throughput import write_images  # noqa: E402
from fake_backbones import make_tiny_backbone, random_qwen3vl_4b  # noqa: E402
from model import build_encoder  # noqa: E402
from plumbing import average_gradients, write_text_atomic  # noqa: E402
from train import cached_step, peak_memory_mb  # noqa: E402

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


def measure(encoder, cfg, examples, chunk, steps, device):
    """Median seconds per training step (warm-up excluded), memory in MiB resident before the first step and at
    the peak of all steps, and the last step's stats."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    encoder.train()
    reset_peak_memory(device)
    before = peak_memory_mb(device)  # just reset: what is resident before the step (weights, process)
    times = []
    for _ in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        stats, bad = cached_step(encoder, examples, cfg, chunk)
        if bad:
            raise RuntimeError(f"synthetic batch has unreadable records: {bad}")
        average_gradients(params)
        encoder.token_grad_norms()  # the GGAS difficulty: a device sync, part of every real step
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), before, peak_memory_mb(device), stats


def run_setting(rows, name, cfg, examples, chunks, args, device):
    torch.manual_seed(0)  # same LoRA / calibrator initialisation for every setting
    encoder = build_encoder(cfg.model, cfg.calibrator, device)
    for chunk in chunks:
        seconds, before, peak, stats = measure(encoder, cfg, examples, chunk, args.steps, device)
        rows.append({"setting": name, "chunk": chunk, "batch": len(examples), "seconds_per_step": seconds,
                     "samples_per_s": len(examples) / seconds, "peak_memory_mib": peak, "memory_before_mib": before,
                     "loss": stats["loss"]})
        print_row(rows[-1])
    del encoder
    gc.collect()


def print_header():
    print(f"| {'setting':8s} | chunk | batch | s/step (median) | samples/s | peak GiB | before step GiB |")
    print("|----------|------:|------:|----------------:|----------:|---------:|----------------:|")


def print_row(r):
    print(f"| {r['setting']:8s} | {r['chunk']:5d} | {r['batch']:5d} | {r['seconds_per_step']:15.3f} | "
          f"{r['samples_per_s']:9.1f} | {r['peak_memory_mib'] / 1024:8.2f} | {r['memory_before_mib'] / 1024:15.2f} |",
          flush=True)


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
    run_setting(rows, "tiny", cfg, examples, args.chunks, args, device)
    return header, rows


def real_arch(args, tmp):
    device = torch.device(args.device)
    backbone = os.path.join(tmp, "qwen3-vl-4b-random")
    start = time.perf_counter()
    n_params = random_qwen3vl_4b(backbone, tmp, device, args.text_layers, args.vision_depth)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    overrides = [f"model.backbone={backbone}", *args.overrides]
    settings = [("ours", load_config(os.path.join(ROOT, "configs/full.yaml"), overrides)),
                ("release", load_config(os.path.join(ROOT, "configs/release.yaml"), overrides))]
    cfg = settings[0][1]
    examples = synthetic_batch(tmp, cfg.train.batch_size)
    switches = ("keep_rope_positions", "normed_readout", "fp32_trainable")
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
        run_setting(rows, name, setting_cfg, examples, args.chunks, args, device)
    return header, rows


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
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    args.chunks = [int(c) for c in (args.chunks or ("8,16" if args.real_arch else "4,8,16,32")).split(",")]
    if args.real_arch and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--real-arch needs a GPU (smoke test on CPU: --device cpu --text-layers 1 --vision-depth 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        header, rows = (real_arch if args.real_arch else tiny_cpu)(args, tmp)
    if args.json:
        write_text_atomic(args.json, json.dumps({"setup": header, "torch_threads": torch.get_num_threads(),
                                                 "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
