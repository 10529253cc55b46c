"""FashionLens embeddings with plain transformers: the documented function of an exported FashionLens directory.

Depends on torch, transformers, safetensors, PIL and PyAV only (not on the FashionLens repository). The directory
holds a standard Qwen3-VL model (LoRA merged, <|MEAN|>/<|IMG|> as real vocabulary rows), its processor,
fashionlens.json (prompt and pixel budget) and calibrator.safetensors (the PGSQC query calibrator, paper section
IV-C). A query is read out at <|MEAN|> and calibrated; a gallery image is read out at <|IMG|>; both are unit vectors
and their inner product is the retrieval score.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import video_utils
from transformers.image_transforms import convert_to_rgb


def load_head(out_dir):
    """The prompt settings and the calibrator weights written next to the model."""
    with open(os.path.join(out_dir, "fashionlens.json")) as f:
        settings = json.load(f)
    path = os.path.join(out_dir, "calibrator.safetensors")
    return {"settings": settings, "calibrator": load_file(path) if os.path.exists(path) else {}}


# ----------------------------------------------------------------------------- media, sized as in training

def fill_size(height, width, pixels, factor=32):
    """Sides (multiples of 32) with area <= pixels that keep the aspect ratio best: the floor or ceil of the exact
    fit per side, the one whose worse axis keeps the most resolution, then the largest area."""
    units = pixels // (factor * factor)
    exact_h = min(max(math.sqrt(units * height / width), 1.0), units)
    exact_w = units / exact_h
    sides = [(h, w) for h in (math.floor(exact_h), math.ceil(exact_h))
             for w in (math.floor(exact_w), math.ceil(exact_w)) if h * w <= units]
    h, w = max(sides, key=lambda s: (min(s[0] / exact_h, s[1] / exact_w), s[0] * s[1]))
    return h * factor, w * factor


def sized(image, settings):
    """A PIL image resized to its own area clamped to the evaluation pixel budget."""
    low, high = settings["image_pixels"], settings["eval_image_pixels"] or settings["image_pixels"]
    height, width = fill_size(image.height, image.width, min(max(image.width * image.height, low), high))
    return image.resize((width, height), Image.Resampling.BICUBIC)


def read_image(image):
    """An RGB image, its transparent parts over white (as the processor's own conversion does)."""
    if isinstance(image, Image.Image):
        return Image.fromarray(convert_to_rgb(image, return_numpy=True))
    with Image.open(image) as opened:
        return read_image(opened)


def read_video(path, num_frames):
    """num_frames frames sampled uniformly (short clips repeat frames) and their metadata (fps, frame indices:
    Qwen3-VL's video prompt holds their timestamps)."""
    def uniform(metadata, **kwargs):
        if metadata.total_num_frames == 0:  # .mkv, .webm, .ts store no frame count: count by decoding
            import av
            with av.open(path) as container:
                metadata.total_num_frames = sum(1 for _ in container.decode(video=0))
        return np.linspace(0, max(metadata.total_num_frames - 1, 0), num_frames).round().astype(int)

    try:  # the reader names no file: a stream with no decodable frame fails with "need at least one array to stack"
        frames, meta = video_utils.load_video(path, backend="pyav", sample_indices_fn=uniform)
    except Exception as err:
        raise ValueError(f"{path}: cannot read video ({type(err).__name__}: {err})") from err
    decoded = np.unique(meta.frames_indices)
    pick = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    meta.frames_indices = decoded[pick].tolist()
    meta.fps = meta.fps or 24.0
    return frames[pick], meta


# ----------------------------------------------------------------------------- readout

def conversation(settings, user, token):
    """System prompt, the user turn, and the readout token as the assistant's answer (paper section IV-B)."""
    return [{"role": "system", "content": [{"type": "text", "text": settings["system_prompt"]}]},
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": token}]}]


@torch.no_grad()
def readout(model, processor, conversations, images, videos, metadata, token):
    """Final normed hidden state at the readout token of each prompt, [B, D], from the plain input_ids forward."""
    texts = processor.apply_chat_template(conversations, tokenize=False)
    batch = processor(text=texts, images=images or None, videos=videos or None, video_metadata=metadata or None,
                      padding=True, padding_side="right", return_tensors="pt", images_kwargs={"do_resize": False},
                      videos_kwargs={"do_sample_frames": False, "do_resize": False}).to(model.device)
    ids = batch["input_ids"]
    at_token = ids == processor.tokenizer.convert_tokens_to_ids(token)
    if not bool((at_token.sum(1) == 1).all()):
        raise ValueError(f"every prompt needs exactly one {token} token")
    hidden = model.model(**batch, use_cache=False).last_hidden_state
    return hidden[torch.arange(ids.shape[0], device=ids.device), at_token.int().argmax(1)]


def calibrate(h, head):
    """PGSQC (paper section IV-C): a hypernetwork writes A, B and a gate; the query moves from q = h/|h| towards
    p = normalize(q + q A B) along the great circle (slerp; lerp: renormalised linear) by the gate."""
    cfg, w = head["settings"]["calibrator"], head["calibrator"]
    q = F.normalize(h.float(), dim=-1)
    if cfg["mode"] == "none":
        return q
    x = h.to(w["hyper.0.weight"].dtype)
    x = F.linear(x, w["hyper.0.weight"], w["hyper.0.bias"])
    x = F.gelu(F.layer_norm(x, x.shape[-1:], w["hyper.1.weight"], w["hyper.1.bias"]))
    out = F.linear(x, w["hyper.3.weight"], w["hyper.3.bias"]).float()
    d, r = q.shape[1], cfg["rank"]
    a, b = out[:, :d * r].reshape(-1, d, r), out[:, d * r:2 * d * r].reshape(-1, r, d)
    gate = torch.sigmoid(out[:, -1]) if cfg["gate"] == "learned" else torch.full_like(q[:, 0], cfg["fixed_gate"])
    p = F.normalize(q + ((q[:, None] @ a) @ b)[:, 0], dim=-1)
    lam = gate[:, None]
    linear = (1 - lam) * q + lam * p
    if cfg["mode"] == "lerp":
        return F.normalize(linear, dim=-1)
    # Near-(anti)parallel q, p: normalised lerp (slerp to O(w^2)); exactly opposite ones at lam = 0.5: q.
    linear = torch.where(linear.norm(dim=-1, keepdim=True) < 1e-6, q, linear)
    omega = 2 * torch.atan2((q - p).norm(dim=-1, keepdim=True), (q + p).norm(dim=-1, keepdim=True))
    spherical = (torch.sin((1 - lam) * omega) * q + torch.sin(lam * omega) * p) / torch.sin(omega)
    parallel = (q * p).sum(-1, keepdim=True).abs() > 1 - 1e-6
    return F.normalize(torch.where(parallel, linear, spherical), dim=-1)


# ----------------------------------------------------------------------------- the documented functions

def embed_queries(model, processor, head, queries):
    """Unit query embeddings [Q, D] fp32. queries: dicts {"text": str, "images": [path or PIL image, ...],
    "videos": [path, ...]} (images and videos optional); the text comes first, then the images, then the videos."""
    s = head["settings"]
    special = [t.content for t in processor.tokenizer.added_tokens_decoder.values() if t.special]
    conversations, images, videos, metadata = [], [], [], []
    for number, query in enumerate(queries):
        found = sorted(token for token in special if token in query["text"])
        if found:   # read as the token, not as text: <|im_end|> would end the user's turn early, silently
            raise ValueError(f"query {number}: the text holds the tokenizer's special token(s) {found}")
        images += [sized(read_image(image), s) for image in query.get("images", [])]
        for path in query.get("videos", []):
            frames, meta = read_video(path, s["video_frames"])
            videos.append(np.stack([np.asarray(sized(Image.fromarray(f), s)) for f in frames]))
            metadata.append(meta)
        media = [{"type": "image"}] * len(query.get("images", [])) + [{"type": "video"}] * len(query.get("videos", []))
        user = [{"type": "text", "text": query["text"]}] + media + [{"type": "text", "text": s["query_suffix"]}]
        conversations.append(conversation(s, user, s["query_token"]))
    return calibrate(readout(model, processor, conversations, images, videos, metadata, s["query_token"]), head)


def embed_images(model, processor, head, images, batch_size=16):
    """Unit gallery-image embeddings [N, D] fp32 (never calibrated). images: paths or PIL images."""
    s = head["settings"]
    user = [{"type": "image"}, {"type": "text", "text": s["target_suffix"]}]
    out = []
    for i in range(0, len(images), batch_size):
        chunk = [sized(read_image(image), s) for image in images[i:i + batch_size]]
        h = readout(model, processor, [conversation(s, user, s["target_token"])] * len(chunk), chunk, [], [],
                    s["target_token"])
        out.append(F.normalize(h.float(), dim=-1))
    return torch.cat(out)
