"""Fast paths of the encoder's forward that must not change a number: the frozen vision tower's output reused by the
gradient-cache replay, positions computed when the batch is prepared, the packed vision attention and the attention
kernels of the backbone (bf16, as on a GPU)."""
import contextlib

import pytest
import torch
from PIL import Image

import attention
import model
from attention import flash_attention_unavailable
from benchmarks.host_syncs import AsOnGpu
from config import Config
from model import build_encoder
from test_train import relative_error
from train import cached_step


def make_examples(tmp_path, n):
    """n training views, one image of one size each side, except the last query (text only): in chunks of 3 the
    first two query chunks and target chunks look alike to the model but for their pixels."""
    examples = []
    for i in range(n):
        paths = []
        for role in ("q", "t"):
            path = tmp_path / f"{role}{i}.png"
            Image.new("RGB", (64, 64), ((53 * i) % 256, (29 * i) % 256, 90 if role == "q" else 200)).save(path)
            paths.append(str(path))
        examples.append({"id": f"r{i}", "key": "7_cir_Shoes", "instruction_text": f"make shoe {i} taller",
                         "query_image": paths[:1] if i < n - 1 else [], "query_video": [], "target_image": paths[1],
                         "target_label": None, "negative_image": [], "negative_label": []})
    return examples


def step_with_tower_calls(encoder, examples, cfg, chunk_size):
    """One cached step from a fixed random state: (loss, gradients, vision tower forward calls)."""
    calls = []
    hook = encoder.lm.model.visual.register_forward_hook(lambda *args: calls.append(1))
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    try:
        stats, _ = cached_step(encoder, examples, cfg, chunk_size)
    finally:
        hook.remove()
    return stats["loss"], {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("trainable,dropout", [("lora", 0.0), ("lora", 0.3), ("full", 0.0)])
def test_replay_reuses_a_frozen_vision_towers_output_exactly(tiny_backbone, tmp_path, device, trainable, dropout):
    """A cached step (7 queries in chunks of 3: 2 of 3 query chunks and all 3 target chunks hold images) gives the
    same loss and gradients with model.reuse_vision_features on as off; with LoRA (frozen tower) the tower runs once
    per chunk with images instead of twice, with the whole backbone trained it still runs twice (its gradients need
    the replay's graph).
    Catches: reuse while the tower trains (the frozen-tower check dropped: its gradients go missing); the features
    of another chunk of the same shapes handed to the replay (train.replay_with_graph zipping chunks with
    `outs[1:2] + outs[:1] + outs[2:]`: wrong gradients). Also on a GPU, in fp32 (--device cuda)."""
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.lora_dropout = tiny_backbone, trainable, dropout
    cfg.model.image_pixels, cfg.model.dtype = 64 * 64, "float32"
    encoder = build_encoder(cfg.model, cfg.calibrator, device).train()
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA-B and the calibrator off their zero / identity starts: every gradient non-trivial
        for name, p in encoder.named_parameters():
            if p.requires_grad and ("lora_B" in name or "hyper" in name):
                p.add_(0.05 * torch.randn_like(p))
    examples = make_examples(tmp_path, 7)
    results = {}
    for reuse in (False, True):
        cfg.model.reuse_vision_features = reuse
        results[reuse] = step_with_tower_calls(encoder, examples, cfg, chunk_size=3)
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = results[False], results[True]
    assert loss_on == pytest.approx(loss_off, abs=1e-5)
    assert grads_on.keys() == grads_off.keys() and len(grads_off) > 10
    assert any(".visual." in n for n in grads_off) == (trainable == "full")
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4, msg=name)
    assert calls_off == 2 * 5
    assert calls_on == (5 if trainable == "lora" else 2 * 5)


def test_the_replay_reads_nothing_back_per_chunk(tiny_backbone, tmp_path, monkeypatch):
    """The gradient-cache replay (pass 3) queues every chunk's forward and backward without making the host wait
    for the GPU in between: none of the operations that would synchronise host and device
    (benchmarks/host_syncs.py) is a value train.py reads back while the chunks replay (the step's statistics are
    read once, at its end); the regulariser total is still the sum over chunks (tests/test_train.py checks its value).
    Catches: the regulariser read back per chunk (`reg_total += reg.item()` in replay_with_graph)."""
    import train
    from benchmarks.host_syncs import SyncCounter
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.image_pixels = tiny_backbone, "lora", 64 * 64
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    replay, counted = train.replay_with_graph, []

    def counted_replay(*args, **kwargs):
        with SyncCounter() as syncs:
            result = replay(*args, **kwargs)
        counted.append(syncs.by_caller)
        return result
    monkeypatch.setattr(train, "replay_with_graph", counted_replay)
    stats, _ = cached_step(encoder, make_examples(tmp_path, 7), cfg, chunk_size=3)
    assert len(counted) == 2 and stats["reg"] > 0           # queries (3 chunks, calibrated) and targets
    # Values read back by train.py itself (the backward's own operations are reported at its .backward() line).
    read_backs = [where for syncs in counted for where in syncs
                  if "train.py" in where and where.startswith(("aten._local_scalar_dense", "Tensor.tolist"))]
    assert not read_backs, counted


def test_sync_counter_counts_each_operation_a_gpu_would_wait_for():
    """benchmarks/host_syncs.SyncCounter, one line per operation, each named with this test's file and function:
    .item(), nonzero, a boolean-mask index, masked_select, repeat_interleave with a tensor of repeats, unique and
    tolist count once each; an integer index, arithmetic and repeat_interleave given its output_size do not; tolist
    and varlen attention are torch's and attention's own again after the blocks. Catches: an operation missing from
    SYNCING (nothing counted: the tests that expect no sync pass whatever the code reads back); the boolean-index or
    output_size checks inverted; the outermost frame named instead of the innermost; Tensor.tolist, or AsOnGpu's
    stand-in kernel, left in place after the block."""
    from benchmarks.host_syncs import SyncCounter
    x, mask, repeats = torch.tensor([0.0, 2.0, 3.0]), torch.tensor([False, True, True]), torch.tensor([1, 2, 0])
    tolist, kernel = torch.Tensor.tolist, (attention.has_varlen_kernel, attention.varlen_attn)
    with AsOnGpu(), SyncCounter() as counter:
        x.sum().item()
        x.nonzero()
        x[mask]
        torch.masked_select(x, mask)
        torch.repeat_interleave(x, repeats)
        torch.unique(x)
        x.tolist()
    with SyncCounter() as quiet:
        x[torch.tensor([0, 2])] + 1
        torch.repeat_interleave(x, repeats, output_size=3)
    assert not quiet.by_caller, quiet.by_caller
    assert torch.Tensor.tolist is tolist and (attention.has_varlen_kernel, attention.varlen_attn) == kernel
    where = "tests/test_fast_paths.py"
    assert all(key.endswith(" test_sync_counter_counts_each_operation_a_gpu_would_wait_for") and where in key
               for key in counter.by_caller), counter.by_caller
    assert sorted(key.split()[0] for key in counter.by_caller) == sorted(
        ["aten._local_scalar_dense", "aten.nonzero", "aten.index", "aten.masked_select", "aten.repeat_interleave",
         "aten._unique2", "Tensor.tolist"]) and sum(counter.by_caller.values()) == 7


def vision_attention_in_float64(attn, x, cu_seqlens, cos, sin):
    """Qwen3-VL's vision attention written out from its formulas in float64 on the CPU, with the module's weights:
    q, k, v from the fused projection, the rotary embedding on q and k (rotate-half form), softmax attention within
    each image's segment, the output projection. Returns (output, float64 leaves: x and the weights by name)."""
    x = x.detach().double().cpu().requires_grad_()
    w = {n: p.detach().double().cpu().requires_grad_() for n, p in attn.named_parameters()}
    cos, sin = cos.double().cpu()[:, None], sin.double().cpu()[:, None]
    q, k, v = (x @ w["qkv.weight"].T + w["qkv.bias"]).reshape(len(x), 3, attn.num_heads, -1).unbind(1)

    def rotary(t):
        first, second = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-second, first], dim=-1) * sin
    q, k = rotary(q), rotary(k)
    bounds = cu_seqlens.tolist()
    out = [torch.einsum("hqk,khd->qhd", (torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * attn.scaling).softmax(-1),
                        v[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(out).reshape(len(x), -1) @ w["proj.weight"].T + w["proj.bias"], {"x": x, **w}


def test_packed_vision_attention_matches_float64_in_bf16(tiny_backbone, device):
    """attention.packed_vision_attention on one vision block in bf16 (as a GPU runs the tower: on CUDA torch's varlen
    FlashAttention kernel, on CPU one sdpa call per image), four images of 16 to 64 patches: its output and its
    gradients (input, qkv and output projections: the tower trained in full) are within bf16 rounding of the same
    attention computed in float64 from the formulas, as close as transformers' own per-image attention gets.
    Catches (on CPU and CUDA): q, k, v taken from the wrong axis of the qkv output (`reshape(tokens, self.num_heads,
    3, -1).unbind(2)`); the rotary embedding left out; every image as one segment (`cu_seqlens[[0, -1]]` to the
    kernel). Only CUDA reaches the varlen kernel's call (argument order, scale, max_seqlen, cu_seqlens on the device),
    with --device cuda (benchmarks/gpu_session.sh)."""
    from transformers import Qwen3VLForConditionalGeneration
    from attention import packed_vision_attention
    lm = Qwen3VLForConditionalGeneration.from_pretrained(tiny_backbone, dtype=torch.bfloat16,
                                                         attn_implementation="sdpa")
    attn = lm.model.visual.blocks[0].attn.to(device)
    generator = torch.Generator().manual_seed(3)
    lengths = [16, 36, 64, 4]
    tokens, head_dim = sum(lengths), attn.head_dim
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    x = torch.randn(tokens, attn.dim, generator=generator).bfloat16()
    angles = 8 * torch.rand(tokens, head_dim // 2, generator=generator)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    mix = torch.randn(tokens, attn.dim, generator=generator)    # a loss that weighs every output
    reference, leaves = vision_attention_in_float64(attn, x, cu_seqlens, cos, sin)
    (reference * mix.double()).sum().backward()
    errors = {}
    for name, forward in [("packed", lambda *args: packed_vision_attention(attn, *args, max_seqlen=max(lengths))),
                          ("transformers", attn)]:
        attn.zero_grad(set_to_none=True)
        xs = x.to(device, copy=True).requires_grad_()
        out = forward(xs, cu_seqlens.to(device), (cos.to(device), sin.to(device)))
        (out.float() * mix.to(device)).sum().backward()
        got = {"output": out, "x": xs.grad, **{n: p.grad for n, p in attn.named_parameters()}}
        expected = {"output": reference, **{n: t.grad for n, t in leaves.items()}}
        errors[name] = {k: relative_error(got[k], expected[k]) for k in expected}
    for k, error in errors["packed"].items():
        # bf16 keeps 8 significant bits (relative rounding 2^-9 per value): errors of a few 1e-3
        assert error < 2e-2 and error < 2 * errors["transformers"][k] + 2e-3, (k, errors)


@pytest.mark.parametrize("branch", ["per_segment", "varlen"])
def test_packed_attention_is_attention_within_each_segment_at_the_given_scale(branch):
    """attention.packed_attention on segments of 5, 1 and 9 tokens (2 heads of 8 dims) at scale 0.2: softmax(scale
    q k^T) v within each segment, in float64 by hand. Qwen3-VL's own scaling is sdpa's default 1 / sqrt(head_dim), so
    the tower's tests cannot see the scale dropped. "varlen" is the GPU branch, with benchmarks/host_syncs.AsOnGpu's
    dense masked stand-in for torch's varlen kernel.
    Catches: the scale not handed on (`scale=scale` dropped from the sdpa call, or from the varlen call)."""
    q, k, v = torch.randn(3, 15, 2, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    with AsOnGpu() if branch == "varlen" else contextlib.nullcontext():
        out = attention.packed_attention(q, k, v, torch.tensor([0, 5, 6, 15], dtype=torch.int32), 9, 0.2)
    q, k, v = q.double(), k.double(), v.double()
    expected = torch.cat([torch.einsum("hqk,khd->qhd", (0.2 * torch.einsum("qhd,khd->hqk", q[a:b], k[a:b])).softmax(-1),
                                       v[a:b]) for a, b in ((0, 5), (5, 6), (6, 15))])
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_packed_vision_attention_reads_the_longest_segment_back_when_not_given(tiny_backbone):
    """attention.packed_vision_attention called without max_seqlen (the encoder hands it over with vision_index; any
    other caller of the tower does not) on its GPU branch (AsOnGpu): the varlen kernel gets the longest of segments of
    16, 36, 64 and 4 patches, 64 (by hand), and the output is the float64 attention of the formulas.
    Catches: the shortest segment read back (`.max()` -> `.min()`: the real kernel would leave rows out)."""
    from transformers import Qwen3VLForConditionalGeneration
    lm = Qwen3VLForConditionalGeneration.from_pretrained(tiny_backbone, dtype=torch.float32)
    attn = lm.model.visual.blocks[0].attn
    generator = torch.Generator().manual_seed(4)
    lengths = [16, 36, 64, 4]
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    x = torch.randn(sum(lengths), attn.dim, generator=generator)
    angles = 8 * torch.rand(sum(lengths), attn.head_dim // 2, generator=generator)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    seen = []
    with AsOnGpu(), torch.no_grad():
        kernel = attention.varlen_attn      # the stand-in; AsOnGpu puts torch's kernel back on exit
        attention.varlen_attn = lambda *args, **kwargs: seen.append(args[5:7]) or kernel(*args, **kwargs)
        out = attention.packed_vision_attention(attn, x, cu_seqlens, (cos, sin))
    assert seen == [(64, 64)]
    reference, _ = vision_attention_in_float64(attn, x, cu_seqlens, cos, sin)
    torch.testing.assert_close(out.double(), reference.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["eager", "flash_attention_2"])
def test_attention_kernels_give_the_same_readouts_on_a_padded_batch(tiny_backbone, tmp_path, device, monkeypatch,
                                                                    kernel):
    """model.attn_implementation: eager attention, and FlashAttention where it loads (CUDA with flash-attn installed;
    skipped elsewhere, saying why: flash-attn is a source build that many GPU machines lack), embed a padded batch
    (two image queries and a shorter text-only one) in bf16 as sdpa does, to bf16 rounding. Each reads the mask
    index_work prepared for its kernel (4-D for eager and sdpa; for FlashAttention the padding mask, by which it drops
    the padding), and transformers' FlashAttention runs the vision tower where the other two use the packed vision
    attention. On CPU bf16 is patched in, as tests/test_model.py does.
    Catches: the causal mask left out (`"causal_mask": None` in index_work: sdpa still attends causally, eager then
    lets the readout token see the tokens after it)."""
    if kernel == "flash_attention_2":
        reason = "FlashAttention runs on CUDA only" if device.type != "cuda" else flash_attention_unavailable()
        if reason:
            pytest.skip(f"flash_attention_2: {reason}")
    if device.type == "cpu":
        monkeypatch.setattr(model, "compute_dtype", lambda model_cfg, device: torch.bfloat16)
    examples = make_examples(tmp_path, 3)
    embeddings = {}
    for implementation in ("sdpa", kernel):
        cfg = Config()
        cfg.model.backbone, cfg.model.image_pixels = tiny_backbone, 64 * 64
        cfg.model.attn_implementation = implementation
        torch.manual_seed(0)
        encoder = build_encoder(cfg.model, cfg.calibrator, device).eval()
        assert encoder.lm.config.text_config._attn_implementation == implementation
        inputs = encoder.prepare_queries(examples, train=False)
        assert len(set(inputs["attention_mask"].sum(1).tolist())) == 2    # padded: the text-only query is shorter
        with torch.no_grad():
            embeddings[implementation] = encoder(inputs, "query")["emb"]
    errors = [relative_error(a, b) for a, b in zip(embeddings[kernel], embeddings["sdpa"])]
    assert max(errors) < 5e-2, errors    # bf16 rounding: about 8e-3 (eager, CPU); the breakage below: 0.27 to 0.57
