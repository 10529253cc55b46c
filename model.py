"""FashionLens encoders (paper section IV-B; docs/method.md#embedding).

- FashionLensEncoder: Qwen3-VL prompted as in paper section IV-B, read out at a learnable token (<|MEAN|> for
  queries, <|IMG|> for gallery images), queries calibrated by PGSQC (calibrator.py). LoRA or full training.
- OpenClipEncoder (baseline.py): the dual-encoder baseline (UniIR score fusion) with the same interface.
The random-weight stand-ins for Qwen3-VL-4B-Instruct used on CPU are built by fake_backbones.py.

Interface of both encoders (train.py and evaluate.py use nothing else): prepare_queries / prepare_targets
(records -> CPU tensors), forward(inputs, role, vision=None) -> {"emb", "gate", "reg_fro", "reg_orth", "vision"},
encode_queries / encode_targets, trainable_state_dict / load_trainable_state_dict, token_grad_norms, embed_dim.
"vision" is a chunk's frozen vision-tower output (else None), which the gradient-cache replay hands back.
"""
import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download (open_clip would retry the hub ~46 s)

import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as video_smart_resize
from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights,
                                       get_vision_position_ids)

from attention import attention_kernel, packed_vision_attention
from calibrator import QueryCalibrator
from media import load_image, load_video, resize_frames, resize_to_budget
from plumbing import DataError, SettingError

QUERY_TOKEN, TARGET_TOKEN = "<|MEAN|>", "<|IMG|>"
SYSTEM_PROMPT = "You are a fashion expert in processing fashion images."
QUERY_SUFFIX = "Summarize the semantic feature of the target fashion image in one word."
TARGET_SUFFIX = "Summarize the image in one word."


def conversation(user_content, readout_token):
    """The prompt of paper section IV-B: system, the user turn, and the readout token as the assistant's answer."""
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": user_content},
            {"role": "assistant", "content": [{"type": "text", "text": readout_token}]}]


# ----------------------------------------------------------------------------- prompts

def instruction_text(query, special_tokens=()):
    """A query's text. A lone surrogate ("\\ud800" is valid JSON, no character) would end in a TypeError from the
    tokenizer naming nothing; the readers refuse it, and so does this for queries built by other means (a training
    example names its sub-dataset; an evaluation query only its id). One of the tokenizer's special tokens written in
    the text (<|im_end|>, <|image_pad|>, a readout token, ...) would be read as that token, not as text: it would end
    the user's turn early or stand for an image that is not there, so it is refused as well."""
    text = query["instruction_text"]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(query.get("key", "query"), "'instruction_text' holds a lone surrogate", query["id"]) from None
    found = sorted(token for token in special_tokens if token in text)
    if found:
        raise DataError(query.get("key", "query"), f"'instruction_text' holds the tokenizer's special token(s) {found}",
                        query["id"])
    return text


# ----------------------------------------------------------------------------- shared encoder machinery

def tensors_identity(tensors):
    """A hash of named tensors by their names and first 64 values rounded to bf16: the same weights in another dtype
    or file layout hash the same, other weights (another backbone, another checkpoint's trained state) do not."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1)[:64].to("cpu", torch.bfloat16).view(torch.int16).numpy())
    return digest.hexdigest()[:16]


class Encoder(nn.Module):
    """What FashionLensEncoder and OpenClipEncoder share: batched no-grad encoding and the trainable state."""

    @property
    def device(self):
        return next(self.parameters()).device

    def to_device(self, inputs):
        def move(v):
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
        return move(inputs)

    def autocast(self):
        # bf16 compute on GPU, trainable tensors in fp32 (README "Differences from the authors' release");
        # CPU runs fp32.
        dtype = compute_dtype(self.model_cfg, self.device)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def encode_queries(self, queries, batch_size=32, progress=False):
        return self._encode(queries, self.prepare_queries, "query", batch_size, progress)

    def encode_targets(self, paths, batch_size=32, progress=False):
        return self._encode(paths, self.prepare_targets, "target", batch_size, progress)

    @torch.no_grad()
    def _encode(self, items, prepare, role, batch_size, progress):
        """One thread decodes and processes the next batch while the model embeds this one (PIL, PyAV and the
        tokenizer release the GIL). The first batch is prepared here, before the thread starts: the tokenizer sets
        its padding state on its first call, which two threads must not do at once."""
        was_training = self.training
        self.eval()
        batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        embs = []
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
                upcoming = None
                for i in tqdm(range(len(batches)), desc=f"encode {role}s", disable=not progress):
                    inputs = upcoming.result() if upcoming else prepare(batches[i], train=False)
                    upcoming = pool.submit(prepare, batches[i + 1], train=False) if i + 1 < len(batches) else None
                    embs.append(self(inputs, role)["emb"].cpu())
        finally:
            self.train(was_training)
        return torch.cat(embs) if embs else torch.zeros(0, self.embed_dim)

    def trainable_state_dict(self):
        return {n: p.detach().to("cpu", copy=True) for n, p in self.named_parameters() if p.requires_grad}

    def backbone_identity(self):
        """A hash of the weights a checkpoint relies on without holding them: the first 64 values of every frozen
        tensor, rounded to bf16 (so a bf16 copy of the weights, one loaded in fp32, or another sharding of the files
        is the same backbone). Two backbones of one architecture (an Instruct and a Thinking model) differ here, and
        trained LoRA factors or token vectors are only right on the weights they were trained with. Every name of a
        trainable tensor is left out: with trainable=full the tied lm_head.weight is the trained token embedding under
        a second name, which named_parameters() lists only once."""
        trainable = {n for n, p in self.named_parameters(remove_duplicate=False) if p.requires_grad}
        return tensors_identity({name: tensor for name, tensor in self.state_dict().items()
                                 if name not in trainable and tensor.is_floating_point()})

    def tokenizer_identity(self):
        """A hash of what turns a prompt into ids, or None where the config names it (open_clip's tokenizer follows
        the model name). A checkpoint that trained every weight (model.trainable=full) relies on nothing of the
        backbone directory but this: backbone_identity then hashes no tensor."""
        return None

    def identities(self):
        """What a checkpoint records of the backbone it was trained on, checked by other_backbone when it loads."""
        return {"backbone_identity": self.backbone_identity(), "tokenizer_identity": self.tokenizer_identity()}

    def other_backbone(self, trained_on):
        """Why trainable tensors trained on the backbone of `trained_on` (a checkpoint, or its identities()) must not
        load here, or None: the same architecture with other weights (an Instruct and a Thinking model) would take
        them and be wrong, and so would token ids from another tokenizer. An identity the checkpoint lacks (written
        before it was recorded) is not checked."""
        here = self.identities()
        for key, what in (("backbone_identity", "other weights"), ("tokenizer_identity", "another tokenizer")):
            saved = trained_on.get(key)
            if saved is not None and saved != here[key]:
                return (f"trained on a backbone with {what} than {self.model_cfg.backbone} ({key.replace('_', ' ')} "
                        f"{saved}, this one's {here[key]})")
        return None

    def load_trainable_state_dict(self, state):
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        if missing or unexpected:
            raise KeyError(f"trainable state does not match this encoder: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]} (was it saved with another model config?)")
        for name, value in state.items():  # all checked before any is copied: no half-loaded encoder
            if not torch.is_tensor(value) or value.shape != params[name].shape:
                found = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"trainable tensor {name} has shape {found}, this encoder's has "
                                 f"{tuple(params[name].shape)} (was it saved with another backbone or model config?)")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def uses_packed_vision_attention(model_cfg, device, attn_implementation):
    """model.vision_attention: "auto" packs where torch's varlen kernel runs (GPU, bf16/fp16) unless FlashAttention
    runs the tower (transformers packs the images itself then); on CPU transformers' per-image loop is as fast and
    keeps the numbers bit for bit."""
    choice = model_cfg.vision_attention
    if choice not in ("auto", "packed", "transformers"):    # spelt out, not config.check_choice: see calibrator.py
        raise ValueError(f"model.vision_attention must be 'auto', 'packed' or 'transformers', got {choice!r}")
    if choice == "auto":
        half = compute_dtype(model_cfg, device) in (torch.float16, torch.bfloat16)   # never on CPU (fp32 there)
        return half and "flash" not in attn_implementation
    return choice == "packed"


def resolve_device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def compute_dtype(model_cfg, device):
    """Dtype of the frozen backbone weights and of autocast: model.dtype on GPU, fp32 on CPU (no fast bf16 there;
    tests patch this function to run the bf16 paths on CPU)."""
    return getattr(torch, model_cfg.dtype) if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- FashionLens (Qwen3-VL)

class FashionLensEncoder(Encoder):
    """Qwen3-VL embedder of paper section IV-B. Each correction to the release is a ModelConfig switch:
    keep_rope_positions, normed_readout, fp32_trainable, eval_image_pixels, fill_pixel_budget,
    reuse_vision_features."""

    def __init__(self, model_cfg, calib_cfg, device=None):
        super().__init__()
        if 0 < model_cfg.eval_image_pixels < model_cfg.image_pixels:
            raise SettingError(f"model.eval_image_pixels={model_cfg.eval_image_pixels} is below model.image_pixels="
                               f"{model_cfg.image_pixels}: evaluation sizes each image between the two (0: the same)")
        device = resolve_device(device)
        self.model_cfg, self.calibrator_cfg = model_cfg, calib_cfg
        # transformers 5 loads in the checkpoint's dtype unless given one; bf16 is slow on CPUs, so CPU runs fp32.
        dtype = compute_dtype(model_cfg, device)
        heads_dtype = torch.float32 if model_cfg.fp32_trainable else dtype  # token vectors and calibrator
        self.processor = AutoProcessor.from_pretrained(model_cfg.backbone, local_files_only=True)
        temporal_patch = self.processor.video_processor.temporal_patch_size
        if not model_cfg.fill_pixel_budget and model_cfg.video_frames < temporal_patch:
            # Qwen3-VL's smart_resize, which sizes the release's videos, refuses a clip shorter than one temporal
            # patch ("t:1 must be larger than temporal_factor:2", at the first video, naming no setting).
            raise SettingError(f"model.video_frames={model_cfg.video_frames} with model.fill_pixel_budget=false: the "
                               f"release's video sizing needs at least {temporal_patch} frames (one temporal patch)")
        self.padding_side = "right"  # a tokenizer attribute would not be saved with it; the readout ignores it
        tokenizer = self.processor.tokenizer
        tokenizer.add_tokens([QUERY_TOKEN, TARGET_TOKEN], special_tokens=True)
        self.special_tokens = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
        attn_implementation = attention_kernel(model_cfg, device)
        self.lm = Qwen3VLForConditionalGeneration.from_pretrained(
            model_cfg.backbone, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
        self.pack_vision_attention(uses_packed_vision_attention(model_cfg, device, attn_implementation))
        vocab = self.lm.get_input_embeddings().weight
        self.token_ids = {"query": tokenizer.convert_tokens_to_ids(QUERY_TOKEN),
                          "target": tokenizer.convert_tokens_to_ids(TARGET_TOKEN)}
        if max(self.token_ids.values()) >= vocab.shape[0]:
            raise ValueError(f"{model_cfg.backbone}: vocabulary of {vocab.shape[0]} rows has no room for "
                             f"{QUERY_TOKEN}/{TARGET_TOKEN} (ids {self.token_ids})")
        # The two learnable readout tokens start from <|im_end|>'s embedding (paper section IV-B). Their own rows
        # in the embedding table are never used; the <|image_pad|> row must stay untouched: the release readout's
        # transformers forward finds image placeholders by comparing input embeddings with it.
        im_end = vocab[tokenizer.convert_tokens_to_ids("<|im_end|>")].detach().to(heads_dtype)
        self.query_token = nn.Parameter(im_end.clone())
        self.target_token = nn.Parameter(im_end.clone())
        self.embed_dim = vocab.shape[1]
        self.calibrator = QueryCalibrator(self.embed_dim, calib_cfg).to(heads_dtype)
        self.set_trainable(model_cfg)
        self.to(device)

    def tokenizer_identity(self):
        """The tokenizer's vocabulary (every token and its id, ours added) and the processor's chat template."""
        digest = hashlib.sha256(json.dumps(sorted(self.processor.tokenizer.get_vocab().items())).encode())
        digest.update((self.processor.chat_template or "").encode())
        return digest.hexdigest()[:16]

    def set_trainable(self, cfg):
        """Trainable backbone weights are fp32 whatever model.fp32_trainable says: the release, too, kept LoRA
        in fp32 (peft creates adapters in the base layer's dtype)."""
        if cfg.gradient_checkpointing:  # non-reentrant, before LoRA wrapping: works with LoRA and inputs_embeds
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if cfg.trainable == "lora":
            from peft import LoraConfig, inject_adapter_in_model
            self.lm.requires_grad_(False)
            # A string target is a full-match regex: restricted to the language model (paper section IV-B).
            inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                               target_modules=cfg.lora_targets), self.lm)
            for p in self.lm.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        elif cfg.trainable == "full":  # the tiny random backbone: LoRA on random weights learns little
            self.lm.float().requires_grad_(True)
            self.lm.get_input_embeddings().requires_grad_(cfg.train_embeddings)
        elif cfg.trainable == "none":  # inference
            self.requires_grad_(False)
        else:
            raise ValueError(f"model.trainable must be 'lora', 'full' or 'none', got {cfg.trainable!r}")

    def pack_vision_attention(self, packed):
        """Every vision block attends with packed_vision_attention (True) or as transformers has it (False); which
        one is kept in self.vision_attention_packed."""
        self.vision_attention_packed = packed
        for block in self.lm.model.visual.blocks:
            if packed:
                block.attn.forward = types.MethodType(packed_vision_attention, block.attn)
            else:
                block.attn.__dict__.pop("forward", None)

    # --- records -> inputs

    def prepare_queries(self, queries, train):
        conversations, images, videos, metadata = [], [], [], []
        for query in queries:
            images += [load_image(p, query["id"]) for p in query["query_image"]]
            for path in query["query_video"]:
                frames, meta = load_video(path, self.model_cfg.video_frames, query["id"])
                videos.append(frames)
                metadata.append(meta)
            media = [{"type": "image"}] * len(query["query_image"]) + [{"type": "video"}] * len(query["query_video"])
            text = [{"type": "text", "text": instruction_text(query, self.special_tokens)}]
            conversations.append(conversation(text + media + [{"type": "text", "text": QUERY_SUFFIX}], QUERY_TOKEN))
        return self.process(conversations, images, videos, metadata, train, "query")

    def prepare_targets(self, paths, train):
        user = [{"type": "image"}, {"type": "text", "text": TARGET_SUFFIX}]
        return self.process([conversation(user, TARGET_TOKEN)] * len(paths), [load_image(p) for p in paths], [], [],
                            train, "target")

    def process(self, conversations, images, videos, metadata, train, role):
        # One pixel budget per image and per video frame, for train and eval (README "Differences from the
        # release"); the release evaluates each image between image_pixels and eval_image_pixels (224^2, 256^2).
        cfg = self.model_cfg
        low = cfg.image_pixels
        high = cfg.eval_image_pixels if cfg.eval_image_pixels and not train else low
        # Every decoded frame is kept (the processor's default re-sampling would silently drop half of them), and
        # sized here: the processor's own video resize depends on cap_pixels_per_frame, whose default is to change.
        videos_kwargs = {"do_sample_frames": False, "do_resize": False}
        if cfg.fill_pixel_budget:
            images = [resize_to_budget(image, low, high) for image in images]
            videos = [np.stack([np.asarray(resize_to_budget(Image.fromarray(f), low, high)) for f in frames])
                      for frames in videos]
            images_kwargs = {"do_resize": False}
        else:  # the release: Qwen2-VL's smart_resize; a video's budget covers all its frames together (uncapped)
            images_kwargs = {"size": {"shortest_edge": low, "longest_edge": high}}
            vp = self.processor.video_processor
            videos = [resize_frames(frames, *video_smart_resize(
                len(frames), *frames.shape[1:3], temporal_factor=vp.temporal_patch_size,
                factor=vp.patch_size * vp.merge_size, min_pixels=low * len(frames), max_pixels=high * len(frames)))
                      for frames in videos]
        texts = self.processor.apply_chat_template(conversations, tokenize=False)
        batch = self.processor(
            text=texts, images=images or None, videos=videos or None, video_metadata=metadata or None,
            padding=True, padding_side=self.padding_side, return_tensors="pt",
            images_kwargs=images_kwargs, videos_kwargs=videos_kwargs)
        return {**batch, **self.index_work(batch, role)}

    def index_work(self, batch, role):
        """The readout token's place in each prompt, the rotary positions, the vision tower's index work, where the
        vision tokens go and the causal mask, computed here on the CPU tensors, once per chunk for both
        gradient-cache passes: on a GPU, each check, boolean mask and per-prompt loop in the forward would stop it
        for a host-device synchronisation (benchmarks/host_syncs.py)."""
        at_token = batch["input_ids"] == self.token_ids[role]
        if not bool((at_token.sum(1) == 1).all()):
            raise ValueError(f"every prompt needs exactly one readout token (id {self.token_ids[role]}) in its text")
        media = [media for media in ("image", "video") if f"{media}_grid_thw" in batch]
        placeholder = {"image": self.lm.config.image_token_id, "video": self.lm.config.video_token_id}
        text = self.lm.model.language_model
        work = {"role": role, "readout_index": at_token.int().argmax(1),
                "vision_index": {m: self.vision_index(batch[f"{m}_grid_thw"]) for m in media},
                # [2, tokens]: (prompt, position) of each placeholder the tower's merged tokens replace, in order
                "vision_at": {m: (batch["input_ids"] == placeholder[m]).nonzero().T.contiguous() for m in media},
                # transformers' own mask for these prompts (None where none is needed), built from the padding
                "causal_mask": create_causal_mask(
                    config=text.config, attention_mask=batch["attention_mask"], cache=None,
                    inputs_embeds=torch.empty(*batch["input_ids"].shape, 0, dtype=text.embed_tokens.weight.dtype))}
        if self.model_cfg.keep_rope_positions:
            # Correction 1: Qwen3-VL's 3-D rotary positions for vision tokens, computed from the ids; with
            # inputs_embeds alone the vision rows get text positions, silently (docs/method.md#embedding).
            work["position_ids"], _ = self.lm.model.get_rope_index(
                batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
                attention_mask=batch["attention_mask"])
        return work

    def vision_index(self, grid_thw):
        """The vision tower's own index work for these images or videos (patch positions, the position-embedding
        interpolation, the per-image attention segments and the longest), by transformers' functions on the CPU
        grid: in the tower they run on the GPU and read lengths back from it."""
        visual = self.lm.model.visual
        cu_seqlens = get_vision_cu_seqlens(grid_thw)
        interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
        return {"cu_seqlens": cu_seqlens, "max_seqlen": int(cu_seqlens.diff().max()),
                "position_ids": get_vision_position_ids(grid_thw, visual.spatial_merge_size),
                "interp_indices": interp_indices, "interp_weights": interp_weights}

    # --- inputs -> embeddings

    def forward(self, inputs, role, vision=None):
        """`vision`: this chunk's "vision" from an earlier call (the gradient-cache replay), in place of running the
        vision tower again."""
        if role not in self.token_ids:
            raise ValueError(f"role must be 'query' or 'target', got {role!r}")
        # A frozen vision tower (LoRA on the language model only) gives the same output in the replay as in pass 1:
        # it runs once per chunk (docs/method.md#gradient-caching). A trainable one must run again, with a graph.
        reusable = self.model_cfg.reuse_vision_features and not any(
            p.requires_grad for p in self.lm.model.visual.parameters())
        if inputs["role"] != role:
            raise ValueError(f"inputs prepared as {inputs['role']}s cannot be embedded as {role}s")
        if vision is not None and not reusable:
            raise ValueError("vision features can only be reused with model.reuse_vision_features and a frozen "
                             "vision tower")
        inputs = self.to_device(inputs)
        with self.autocast():
            vision = vision if vision is not None else self.vision_features(inputs)
            h = self.readout(inputs, self.token_ids[role], self.query_token if role == "query" else self.target_token,
                             vision)
        # Only what the language model reads is kept (not the tower's last patch-level state), without a graph.
        kept = {k: BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(t.detach() for t in out.pooler_output),
            deepstack_features=[tuple(t.detach() for t in level) for level in out.deepstack_features])
            for k, out in vision.items()} if reusable else None
        if role == "target":  # targets are never calibrated (paper section IV-C)
            return {"emb": F.normalize(h.float(), dim=-1), "gate": None, "reg_fro": None, "reg_orth": None,
                    "vision": kept}
        emb, gate, fro, orth = self.calibrator(h)
        return {"emb": emb, "gate": gate, "reg_fro": fro, "reg_orth": orth, "vision": kept}

    def vision_features(self, inputs):
        """The vision tower's output for the images and the videos of `inputs`, as transformers' mm_encoder_outputs
        (merged visual tokens and deepstack features) with one entry for the whole chunk: transformers'
        get_image_features splits them per image, reading the sizes back from the device, and the language model
        concatenates them again."""
        visual, vision = self.lm.model.visual, {}
        for media, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            if pixels in inputs:   # the index work was precomputed with the batch; the tower takes it as keywords
                out = visual(inputs[pixels].type(visual.dtype), grid_thw=inputs[f"{media}_grid_thw"],
                             return_dict=True, **inputs["vision_index"][media])
                vision[media] = BaseModelOutputWithDeepstackFeatures(
                    pooler_output=(out.pooler_output,), deepstack_features=[(f,) for f in out.deepstack_features])
        return vision

    def readout(self, inputs, token_id, token_vector, vision):
        """Hidden state at the readout token, one row per prompt, [B, D] (paper section IV-B;
        docs/method.md#embedding). `vision`: vision_features(inputs)."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = self.lm.get_input_embeddings()(ids)
        embeds = torch.where((ids == token_id)[..., None], token_vector.to(embeds.dtype), embeds)
        if self.model_cfg.keep_rope_positions:
            positions = inputs["position_ids"]  # Correction 1, computed with the batch (index_work)
        else:
            # Release: inputs_embeds only, for which transformers 4.57 numbered the non-padding tokens 0, 1, 2, ...
            # on all three rotary axes. Passed explicitly: 5.x would reuse rope deltas cached by another call.
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
        if self.model_cfg.normed_readout:
            # Correction 2: the inner model's final normed state; no LM head, no KV cache.
            hidden = self.language_model(embeds, positions, inputs, vision)
        else:
            # Release: the full LM forward (vocabulary logits, a KV cache and every layer's state, all discarded),
            # read before the final norm. In transformers 5.24 hidden_states[-1] is the *normed* state, so the
            # pre-norm state is taken as the input of the final norm. The vision tower's output goes in as
            # precomputed encoder outputs (a fresh dict: the model would fill a missing modality into it); the
            # grids are only read when positions are not given.
            captured = []
            final_norm = self.lm.model.language_model.norm
            hook = final_norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
            try:
                self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                        output_hidden_states=True, mm_encoder_outputs=dict(vision))
            finally:
                hook.remove()
            hidden = captured[0]
        # Index per row: independent of the padding side and of the other prompts.
        return hidden[torch.arange(ids.shape[0], device=ids.device), inputs["readout_index"]]

    def language_model(self, embeds, positions, inputs, vision):
        """Qwen3-VL's language model over the prompts, normed, without a KV cache: what transformers' Qwen3VLModel
        and Qwen3VLTextModel forwards compute, with the vision tokens' places and the causal mask taken from
        index_work. transformers finds those places with boolean masks and reads the padding mask back to choose
        its attention mask: on a GPU, five host-device synchronisations per pass over a chunk of image queries."""
        text = self.lm.model.language_model
        at = {media: inputs["vision_at"][media].unbind() for media in vision}
        for media, out in vision.items():   # the merged visual tokens take their placeholders' places
            embeds = embeds.index_put(at[media], out.pooler_output[0].to(embeds.dtype))
        hidden, rotary = embeds, text.rotary_emb(embeds, positions)
        for depth, layer in enumerate(text.layers):
            hidden = layer(hidden, attention_mask=inputs["causal_mask"], position_embeddings=rotary)
            for media, out in vision.items():   # DeepStack: the tower's middle layers join the first decoder layers
                if depth < len(out.deepstack_features):
                    added = hidden[at[media]] + out.deepstack_features[depth][0].to(hidden.dtype)
                    hidden = hidden.index_put(at[media], added)
        return text.norm(hidden)

    def token_grad_norms(self):
        """(joint, summed) gradient norms of the two learnable tokens: the GGAS difficulty (paper section IV-D,
        docs/method.md#ggas)."""
        norms = [p.grad.float().norm() if p.grad is not None else torch.zeros((), device=p.device)
                 for p in (self.query_token, self.target_token)]
        return float(torch.stack(norms).norm()), float(norms[0] + norms[1])

    # --- standalone export with LoRA folded into the weights

    def merged_state_dict(self):
        """The backbone's weights with LoRA folded in, in fp32: rounded to bf16, the part of the delta below half a
        bf16 step of the base weight (most of a typical LoRA delta) would be lost. Returns (state, merged layers)."""
        state, merged = self.lm.state_dict(), []
        for name, module in self.lm.named_modules():
            if hasattr(module, "get_delta_weight"):  # a peft LoRA layer: base weight + scale * B A
                base = state.pop(f"{name}.base_layer.weight")
                with torch.no_grad():
                    state[f"{name}.weight"] = base.float() + module.get_delta_weight("default").float()
                merged.append(name)
                if f"{name}.base_layer.bias" in state:
                    state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
        return {k: v for k, v in state.items() if "lora_" not in k}, merged


def build_encoder(model_cfg, calib_cfg, device=None):
    """The encoder named by model_cfg.kind, on `device` (default: CUDA when available, else CPU)."""
    if model_cfg.kind == "qwen3vl":
        return FashionLensEncoder(model_cfg, calib_cfg, device)
    if model_cfg.kind == "openclip":
        from baseline import OpenClipEncoder  # here: baseline.py builds on this module's Encoder
        return OpenClipEncoder(model_cfg, calib_cfg, device)
    raise ValueError(f"model.kind must be 'qwen3vl' or 'openclip', got {model_cfg.kind!r}")


if __name__ == "__main__":
    # `python model.py export CKPT OUT_DIR`: hf_export.py builds on this module, so it is imported here, at run time.
    import hf_export
    hf_export.main()
