"""Host-device synchronisations in one chunk of a training step, counted on the CPU (no GPU needed).

On a GPU, an operation whose result the host must read (a tensor's value turned into a Python number or list, a
boolean-mask index, nonzero) makes the host wait until every queued kernel has run: the GPU idles while Python
catches up. This counts, in one gradient-cache chunk of the tiny random Qwen3-VL (pass 1 without a graph, then the
replay with a graph and its backward; docs/method.md#gradient-caching), every operation that would synchronise on a
GPU, grouped by the source line that asked for it. Preparing the chunk's inputs (prepare_queries, on CPU tensors,
before the model runs) is not counted: there the values are already on the host.

Counted: aten._local_scalar_dense (.item(), int(), bool(), float() of a tensor), aten.nonzero, aten.masked_select,
aten.index with a boolean mask, aten.repeat_interleave with a tensor of repeats, aten.unique*, and Tensor.tolist
(which copies without dispatching an operation, so it is counted at the Python level).

    OMP_NUM_THREADS=1 python benchmarks/host_syncs.py [--as-on-gpu] [model.trainable=lora ...]
"""
import argparse
import collections
import contextlib
import os
import sys
import tempfile
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model  # noqa: E402  (first: it keeps transformers offline)
import attention  # noqa: E402

SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
           "aten._unique2", "aten.unique_dim", "aten.unique_consecutive"}


def caller():
    """The innermost source line outside torch that led to the operation, as 'file:line function'."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("host_syncs.py"):
            return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno} {frame.name}"
    return "?"


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_caller = collections.Counter()
        self.tolist = torch.Tensor.tolist

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        syncs = name in SYNCING
        if name == "aten.index":
            syncs = any(torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name == "aten.repeat_interleave":
            syncs = torch.is_tensor(args[0]) and "output_size" not in (kwargs or {})
        if syncs:
            self.by_caller[f"{name:<28} {caller()}"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter, tolist = self, self.tolist

        def counted_tolist(tensor):
            counter.by_caller[f"{'Tensor.tolist':<28} {caller()}"] += 1
            return tolist(tensor)
        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)


def dense_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=None):
    """What torch's varlen_attn computes (q, k, v [tokens, heads, head_dim]; token i attends to the tokens of its own
    segment), as one dense masked attention on any device, reading nothing back. Like the kernel, a max_q below the
    longest segment is an error (the kernel would leave rows out)."""
    assert cu_seq_q is cu_seq_k and max_q == max_k, "self-attention only"
    torch._assert_async(cu_seq_q.diff().max() <= max_q, "max_q is below the longest segment")  # no read-back
    segment = torch.bucketize(torch.arange(q.shape[0]), cu_seq_q[1:], right=True)
    mask = segment[:, None] == segment[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


class AsOnGpu:
    """attention.packed_attention takes its GPU branch on CPU tensors, with dense_varlen_attn standing in for torch's
    varlen kernel (which runs on GPUs only): what the packed path does around the kernel can then be counted and
    compared on a CPU."""

    def __enter__(self):
        self.saved = attention.has_varlen_kernel, attention.varlen_attn
        attention.has_varlen_kernel, attention.varlen_attn = (lambda q: True), dense_varlen_attn
        return self

    def __exit__(self, *exc):
        attention.has_varlen_kernel, attention.varlen_attn = self.saved


def report(title, counter):
    print(f"{title}: {sum(counter.by_caller.values())} synchronising operations")
    for where, n in counter.by_caller.most_common():
        print(f"  {n:4d}  {where}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, default=8, help="records per chunk (image + text queries)")
    parser.add_argument("--as-on-gpu", action="store_true",
                        help="as model.vision_attention=auto does on a GPU in bf16: the packed vision attention, "
                             "taking its GPU branch (see AsOnGpu)")
    parser.add_argument("overrides", nargs="*", help="section.key=value on top of configs/tiny.yaml")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from config import load_config
    from fake_backbones import make_tiny_backbone
    from train_throughput import synthetic_batch
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, AsOnGpu() if args.as_on_gpu else contextlib.nullcontext():
        backbone = os.path.join(tmp, "tiny")
        make_tiny_backbone(backbone)
        as_on_gpu = ["model.vision_attention=packed"] if args.as_on_gpu else []     # the overrides given come after
        cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                          [f"model.backbone={backbone}", *as_on_gpu, *args.overrides])
        encoder = model.build_encoder(cfg.model, cfg.calibrator, "cpu")
        inputs = encoder.prepare_queries(synthetic_batch(tmp, args.chunk), train=True)
        with SyncCounter() as no_grad, torch.no_grad():
            out = encoder(inputs, "query")
        with SyncCounter() as replay:
            emb = encoder(inputs, "query", vision=out["vision"])["emb"]
            emb.sum().backward()
    print(f"one chunk of {args.chunk} image + text queries, tiny Qwen3-VL, overrides {args.overrides or 'none'}")
    report("pass 1 (no graph)", no_grad)
    report("replay (forward with a graph + backward)", replay)


if __name__ == "__main__":
    main()
