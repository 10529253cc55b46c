"""The attention kernels of the Qwen3-VL backbone (model.py): FlashAttention when it loads (model.attn_implementation),
and the vision tower's packed attention (model.vision_attention): every image of a chunk in one kernel call."""
import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision


def attention_kernel(model_cfg, device):
    """"auto": FlashAttention on GPU in bf16/fp16 when it actually loads, else PyTorch's sdpa, saying why in one line
    (on CPU silently: FlashAttention is GPU-only). Any other value of model.attn_implementation goes to transformers
    as it is."""
    if model_cfg.attn_implementation != "auto":
        return model_cfg.attn_implementation
    if device.type != "cuda":
        return "sdpa"
    # FlashAttention has fp16/bf16 kernels only. With model.dtype=float32 autocast is off, transformers hands it the
    # fp32 tensors of the fp32 weights, and the first forward fails.
    half = model_cfg.dtype in ("bfloat16", "float16")
    reason = (flash_attention_unavailable() if half else
              f"model.dtype={model_cfg.dtype} (its kernels are fp16/bf16 only)")
    if reason:
        print(f"model.attn_implementation=auto: sdpa, because FlashAttention cannot be used: {reason}")
        return "sdpa"
    return "flash_attention_2"


def flash_attention_unavailable():
    """None when flash-attn imports and transformers accepts it, else the reason."""
    from transformers.utils import import_utils
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    try:  # loads the compiled kernels: a build for another torch or CUDA fails here (undefined symbol ...)
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as err:
        return f"importing flash_attn failed ({type(err).__name__}: {err})"
    if not import_utils.is_flash_attn_2_available():
        return "transformers does not support the installed flash-attn version"
    return None


def has_varlen_kernel(q):
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def packed_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    """Attention within each segment [cu_seqlens[i], cu_seqlens[i + 1]) of q, k, v [tokens, heads, head_dim]: all
    segments in one call of torch's varlen FlashAttention kernel (GPU, bf16/fp16; `max_seqlen` is a Python int, so
    nothing is read back from the GPU). Elsewhere, one sdpa call per segment (on CPU the lengths are free to read)."""
    if has_varlen_kernel(q):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    segments = zip(*(x.split(cu_seqlens.diff().tolist()) for x in (q, k, v)))
    return torch.cat([F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in segment), scale=scale)
                      .transpose(0, 1) for segment in segments])


def packed_vision_attention(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen=None, **kwargs):
    """Qwen3VLVisionAttention.forward with all images of a chunk attended in one kernel call per block (each image
    attends to itself only, as in transformers' own path). Without flash-attn, transformers splits the batch and
    runs sdpa once per image and block, reading the image lengths back from the GPU each time. Bound to each block's
    attention module by FashionLensEncoder when model.vision_attention packs."""
    tokens = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).unbind(1)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    if max_seqlen is None:  # not precomputed with the batch (vision_index): one read-back per block
        max_seqlen = int(cu_seqlens.diff().max())
    return self.proj(packed_attention(q, k, v, cu_seqlens, max_seqlen, self.scaling).reshape(tokens, -1))
