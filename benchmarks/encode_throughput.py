"""Encoding throughput of the FashionLens encoder (model.py).

Default (CPU): the tiny random Qwen3-VL. Items per second for query encoding (text-only and image+text queries)
and target encoding, medians over repeats, one thread.

--real-arch (GPU): Qwen3-VL-4B-Instruct's architecture, built from its config (written out below; random weights,
bf16) with LoRA as in training. At the training pixel budget it reports images/s and peak GPU memory (weights
included) for target encoding (no grad) and for a training chunk (forward + backward), with our readout (inner
model, normed state, no LM head or cache) and the release's (LM head + KV cache + all hidden states, pre-norm
state) side by side: one encoder, the readout switch flipped between measurements, so the weights are identical;
ours with the packed vision attention (model.vision_attention "auto" on a GPU), the release's with transformers' own.
Then the packed vision attention alone against transformers' own: encoding images/s and the embeddings' cosine.
FLOPs of each measurement are counted by torch.utils.flop_counter in one extra run; utilisation (MFU) divides the
achieved FLOP/s by the GPU's dense bf16 peak (BF16_PEAK_TFLOPS, by device name, or --peak-tflops).

    python benchmarks/encode_throughput.py
    python benchmarks/encode_throughput.py --real-arch
"""
import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import CalibratorConfig, ModelConfig  # noqa: E402
from fake_backbones import make_tiny_backbone, random_qwen3vl_4b  # noqa: E402
from model import FashionLensEncoder  # noqa: E402

# Dense bf16 tensor-core peak, TFLOP/s, by device name (vendor data sheets; the first match wins).
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),
                    ("H800 PCIe", 756.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
                    ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("4090", 165.0)]


def write_images(directory, n, size=(320, 400)):
    """n random photos of a typical product-image size (they are resized to the pixel budget)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def peak_tflops(device, override):
    if override or device.type != "cuda":
        return override or None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def median_seconds(fn, repeats):
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiny_cpu(args, tmp):
    torch.set_num_threads(1)
    backbone = args.backbone or os.path.join(tmp, "tiny")
    if not args.backbone:
        start = time.perf_counter()
        make_tiny_backbone(backbone)
        print(f"make-tiny: {time.perf_counter() - start:.1f} s")
    torch.manual_seed(0)
    encoder = FashionLensEncoder(ModelConfig(backbone=backbone, trainable="full", image_pixels=args.pixels),
                                 CalibratorConfig(), device="cpu")
    images = write_images(tmp, args.items)
    text = [{"id": str(i), "instruction_text": "A navy wool coat with a belt and large pockets.",
             "query_image": [], "query_video": []} for i in range(args.items)]
    image_text = [dict(q, query_image=[p]) for q, p in zip(text, images)]
    print(f"tiny Qwen3-VL on CPU, 1 thread, {args.items} items, batch {args.batch_size}, "
          f"{args.pixels} pixels per image, median of {args.repeats}")
    for name, fn in [("query (text)", lambda: encoder.encode_queries(text, args.batch_size)),
                     ("query (image+text)", lambda: encoder.encode_queries(image_text, args.batch_size)),
                     ("target (image)", lambda: encoder.encode_targets(images, args.batch_size))]:
        print(f"  {name:20s} {args.items / median_seconds(fn, args.repeats):8.1f} items/s")


def real_arch(args, tmp):
    device = torch.device(args.device)
    backbone = os.path.join(tmp, "qwen3-vl-4b-random")
    start = time.perf_counter()
    random_qwen3vl_4b(backbone, tmp, device, args.text_layers, args.vision_depth)
    model_cfg = ModelConfig(backbone=backbone, trainable="lora", image_pixels=args.pixels)
    encoder = FashionLensEncoder(model_cfg, CalibratorConfig(), device=device)
    n_params = sum(p.numel() for p in encoder.lm.parameters())
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Qwen3-VL-4B architecture ({n_params / 1e9:.2f} B parameters, random weights) ready in "
          f"{time.perf_counter() - start:.0f} s on {card}; {args.pixels} pixels per image, LoRA r={model_cfg.lora_r}, "
          f"median of {args.repeats}")
    images = write_images(tmp, max(args.batch_size, args.train_chunk))
    encode_inputs = encoder.prepare_targets(images[:args.batch_size], train=True)
    train_inputs = encoder.prepare_targets(images[:args.train_chunk], train=True)

    def encode():
        with torch.no_grad():
            encoder(encode_inputs, role="target")

    def train_chunk():
        encoder(train_inputs, role="target")["emb"].sum().backward()

    peak = peak_tflops(device, args.peak_tflops)
    print(f"  dense bf16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (--peak-tflops): no MFU'}")
    print(f"  {'readout':8s} {'work':28s} {'images/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s}")
    rate = {}
    packed = encoder.vision_attention_packed   # as model.vision_attention decided for this device
    for normed in (True, False):
        encoder.model_cfg = dataclasses.replace(model_cfg, normed_readout=normed)
        encoder.pack_vision_attention(packed and normed)   # the release's tower attends as transformers has it
        setting = "ours" if normed else "release"
        for work, fn, n, mode in [(f"encode, batch {args.batch_size}", encode, args.batch_size, "eval"),
                                  (f"train fwd+bwd, chunk {args.train_chunk}", train_chunk, args.train_chunk, "train")]:
            encoder.train(mode == "train")
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = median_seconds(fn, args.repeats)
                memory = (f"{torch.cuda.max_memory_allocated(device) / 2**30:9.1f}" if device.type == "cuda"
                          else f"{'-':>9s}")
                with FlopCounterMode(display=False) as counter:  # a separate run: counting slows it down
                    fn()
            except RuntimeError as err:     # a kernel's first run on this GPU, out of memory: the others still run
                traceback.print_exc()
                print(f"  {setting:8s} {work:28s} failed: {failure(err)}")
                continue
            finally:
                encoder.zero_grad(set_to_none=True)
            tflops = counter.get_total_flops() / 1e12 / seconds
            mfu = f"{100 * tflops / peak:5.1f}%" if peak else f"{'-':>6s}"
            rate[setting, work] = n / seconds
            print(f"  {setting:8s} {work:28s} {n / seconds:9.1f} {tflops:8.2f} {mfu} {memory}")
    for work in dict.fromkeys(w for _, w in rate):
        if ("ours", work) in rate and ("release", work) in rate:
            print(f"  {work}: ours / release images/s = {rate['ours', work] / rate['release', work]:.2f}x")
    try:
        compare_vision_attention(encoder, model_cfg, encode_inputs, args.repeats)
    except RuntimeError as err:
        traceback.print_exc()
        print(f"  vision attention, encode: failed: {failure(err)}")


def failure(err):
    """An error as one line, its type and the first line of its message (CUDA's messages run on for lines)."""
    return f"{type(err).__name__}: {next(iter(str(err).splitlines()), '')}"


def compare_vision_attention(encoder, model_cfg, inputs, repeats):
    """The packed vision attention (model.vision_attention) against transformers' own, same weights and batch, our
    readout: encoding speed and how far apart the embeddings are."""
    encoder.model_cfg = model_cfg
    encoder.eval()
    embeddings, rate = {}, {}
    for packed in (True, False):
        encoder.pack_vision_attention(packed)

        def encode():
            with torch.no_grad():
                embeddings[packed] = encoder(inputs, role="target")["emb"].float()
        rate[packed] = len(inputs["input_ids"]) / median_seconds(encode, repeats)
    cosine = (embeddings[True] * embeddings[False]).sum(-1)
    print(f"  vision attention, encode: packed {rate[True]:.1f} images/s, transformers' {rate[False]:.1f} images/s "
          f"({rate[True] / rate[False]:.2f}x); embeddings' cosine packed vs transformers' min {cosine.min():.6f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-arch", action="store_true", help="Qwen3-VL-4B architecture on a GPU")
    parser.add_argument("--backbone", default="", help="tiny backbone directory (default: build one)")
    parser.add_argument("--items", type=int, default=64, help="CPU: items per measurement")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (CPU) / 64 (--real-arch)")
    parser.add_argument("--train-chunk", type=int, default=16, help="--real-arch: gradient-cache chunk size")
    parser.add_argument("--pixels", type=int, default=224 * 224, help="pixel budget per image (training: 224^2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="--real-arch device; cpu only for a smoke test")
    parser.add_argument("--text-layers", type=int, help="--real-arch: fewer text layers (smoke test)")
    parser.add_argument("--vision-depth", type=int, help="--real-arch: fewer vision blocks (smoke test)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak in TFLOP/s "
                        "(default: from BF16_PEAK_TFLOPS by the GPU's name; none on CPU)")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (64 if args.real_arch else 16)
    with tempfile.TemporaryDirectory() as tmp:
        (real_arch if args.real_arch else tiny_cpu)(args, tmp)


if __name__ == "__main__":
    main()
