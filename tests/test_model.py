"""model.py on the tiny random Qwen3-VL and a tiny open_clip: every query kind embeds, a query's embedding does
not depend on its batch or the padding side, the release switches change what they should (and only that),
the readout equals the plain input-ids forward, and saved trainable state reloads to identical embeddings
(exports: test_export.py)."""
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fake_backbones
from launch import REPO
from media import load_image, load_video, resize_frames
import model
from benchmarks.host_syncs import AsOnGpu, SyncCounter
from config import CalibratorConfig, ModelConfig
from plumbing import DataError, SettingError

PIXELS = 128 * 128  # small budget: 16 visual tokens per image keeps every test fast


def write_png(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def write_mp4(path, frames, seed, size=(96, 64), rate=4):
    """A clip of random frames; the container is chosen by the suffix (.mkv stores no frame count)."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_audio_only(path, seconds=1, rate=8000):
    """A file holding one AAC audio stream (silence) and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        for _ in range(seconds * rate // 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_undecodable_video(path, packets=3):
    """A video stream whose packets are bytes no decoder makes a frame of: an .mp4 stores its count (3 frames), an
    .mkv none."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
        for i in range(packets):
            packet = av.Packet(b"\x00\x00\x01\xb6garbage" * 5)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, stream.codec_context.time_base
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    sizes = [(120, 90), (64, 160), (200, 200)]  # upscaled, tall, square
    return {"images": [write_png(d / f"img{i}.png", size, i) for i, size in enumerate(sizes)],
            "video": write_mp4(d / "clip.mp4", 12, 0), "short_video": write_mp4(d / "short.mp4", 3, 1)}


def queries_of_every_kind(media):
    imgs, video, short = media["images"], media["video"], media["short_video"]
    return [{"id": "text", "instruction_text": "Find a red silk dress.", "query_image": [], "query_video": []},
            {"id": "image", "instruction_text": "Find the shop image.", "query_image": imgs[:1], "query_video": []},
            {"id": "sketches", "instruction_text": "Find the shoe.", "query_image": imgs, "query_video": []},
            {"id": "video", "instruction_text": "Find the item.", "query_image": [], "query_video": [video]},
            {"id": "mixed", "instruction_text": "Make it blue.", "query_image": imgs[1:2], "query_video": [short]}]


def build(tiny_backbone, seed=0, calibrator=None, **model_overrides):
    torch.manual_seed(seed)  # the calibrator's (and LoRA's) initialisation
    cfg = ModelConfig(**{"backbone": tiny_backbone, "trainable": "full", "image_pixels": PIXELS, **model_overrides})
    return model.build_encoder(cfg, calibrator or CalibratorConfig(), device="cpu")


@pytest.fixture(scope="module")
def encoder(tiny_backbone):
    return build(tiny_backbone).eval()


def test_make_tiny_is_deterministic_per_seed(tiny_backbone, tmp_path):
    def digest(d, name):
        return hashlib.sha256(open(os.path.join(d, name), "rb").read()).hexdigest()

    same = tmp_path / "runs" / "same"           # runs/ does not exist yet, as on a fresh clone
    n_params = fake_backbones.make_tiny_backbone(str(same), seed=0)
    assert 0.5e6 < n_params < 5e6
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert digest(same, name) == digest(tiny_backbone, name), name
    fake_backbones.make_tiny_backbone(str(tmp_path / "other"), seed=1)
    assert digest(tmp_path / "other", "model.safetensors") != digest(tiny_backbone, "model.safetensors")


def test_tiny_chat_template_renders_as_qwen3_vls_own(tiny_backbone):
    """The tiny backbone's chat template (fake_backbones.CHAT_TEMPLATE) stands in for Qwen3-VL's: every prompt the
    encoder builds (a query with text, images and a video; a gallery image), a plain-string message and the
    generation prompt render to the same string as Qwen3-VL-4B-Instruct's own template
    (configs/qwen3-vl-4b-instruct/chat_template.json), character for character.
    Fails when CHAT_TEMPLATE drops the newline after <|im_end|>, renders a video as an image, or drops the
    generation prompt: the CPU tests would then check prompts the real model never sees."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_backbone)
    with open(os.path.join(fake_backbones.QWEN3_VL_4B_FILES, "chat_template.json")) as f:
        real = json.load(f)["chat_template"]
    query = [{"type": "text", "text": "find it"}, {"type": "image"}, {"type": "image"}, {"type": "video"},
             {"type": "text", "text": model.QUERY_SUFFIX}]
    target = [{"type": "image"}, {"type": "text", "text": model.TARGET_SUFFIX}]
    conversations = [model.conversation(query, model.QUERY_TOKEN), model.conversation(target, model.TARGET_TOKEN),
                     [{"role": "user", "content": "a plain string"}]]
    for generation in (False, True):
        tiny = processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation)
        assert tiny == processor.apply_chat_template(conversations, tokenize=False, chat_template=real,
                                                     add_generation_prompt=generation)
    assert tiny[0].count("<|video_pad|>") == 1 and tiny[2].endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_prompts_are_section_iv_bs_for_queries_and_gallery_images(encoder, media):
    """docs/method.md#embedding: after the system prompt, a query's user turn is its text, its images, then the
    query suffix, answered by <|MEAN|>; a gallery image's is the image, then the target suffix, answered by <|IMG|>.
    The prepared token ids decode to those prompts written out by hand (each run of vision placeholders as one).
    Catches: the gallery prompt with the query's suffix (`TARGET_SUFFIX` -> `QUERY_SUFFIX` in prepare_targets), the
    system turn dropped from conversation(), the query's images put before its text (`media + text + ...`)."""
    query = {"id": "q", "instruction_text": "Make it blue.", "query_image": media["images"][:2], "query_video": []}
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    start = ("<|im_start|>system\nYou are a fashion expert in processing fashion images.<|im_end|>\n"
             "<|im_start|>user\n")
    expected = {"query": start + "Make it blue." + image + image + "Summarize the semantic feature of the target "
                "fashion image in one word.<|im_end|>\n<|im_start|>assistant\n<|MEAN|><|im_end|>\n",
                "target": start + image + "Summarize the image in one word.<|im_end|>\n<|im_start|>assistant\n"
                "<|IMG|><|im_end|>\n"}
    for inputs in (encoder.prepare_queries([query], train=True), encoder.prepare_targets(media["images"][:1], True)):
        text = encoder.processor.tokenizer.decode(inputs["input_ids"][0])
        assert re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", text) == expected[inputs["role"]]


def test_a_video_querys_prompt_stamps_its_frames_at_the_clips_rate_and_images_keep_their_order(encoder, media):
    """The video prompt holds one timestamp per temporal patch, from the clip's own rate: the 12-frame clip at 4
    frames/s read as 8 frames (0 2 3 5 6 8 9 11) makes 4 patches of 2 frames, stamped at their mean times 0.25, 1.0,
    1.75, 2.5 s, printed to one decimal (by hand). A query's images reach the processor in the query's order: its pixel
    rows are those of each image prepared alone, in turn.
    Catches: the clip's metadata not handed to the processor (`metadata.append(meta)` dropped: its default rate
    stamps other times); a query's images reversed (`[::-1]`)."""
    query = {"id": "v", "instruction_text": "Find the item.", "query_image": [], "query_video": [media["video"]]}
    text = encoder.processor.tokenizer.decode(encoder.prepare_queries([query], train=True)["input_ids"][0])
    assert re.findall(r"<([0-9.]+) seconds>", text) == ["0.2", "1.0", "1.8", "2.5"]
    images = media["images"][:2]       # 120 x 90 and 64 x 160: different sizes, so different pixel rows
    together = encoder.prepare_queries([{**query, "query_image": images, "query_video": []}], train=True)
    alone = [encoder.prepare_targets([path], train=True) for path in images]
    assert torch.equal(together["pixel_values"], torch.cat([inputs["pixel_values"] for inputs in alone]))
    assert together["image_grid_thw"].tolist() == [inputs["image_grid_thw"][0].tolist() for inputs in alone]


def test_backbone_identity_sees_a_frozen_weight_past_the_first(tiny_backbone):
    """Encoder.backbone_identity hashes the first 64 values of every frozen tensor: a backbone whose weights differ
    only at the 41st value of one frozen matrix (one fine-tuned in a few places) is another backbone, and putting
    the value back gives the identity back; a trainable tensor (a LoRA factor) does not count.
    Fails when fewer values are hashed (`[:1]`: the changed value is not seen) or trainable tensors are hashed."""
    enc = build(tiny_backbone, trainable="lora")
    weight = enc.lm.model.language_model.layers[0].mlp.down_proj.base_layer.weight
    lora = enc.lm.model.language_model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert not weight.requires_grad and lora.requires_grad
    before = enc.backbone_identity()
    with torch.no_grad():
        old = weight.view(-1)[40].item()
        weight.view(-1)[40] = old + 1.0
        changed = enc.backbone_identity()
        weight.view(-1)[40] = old
        lora.add_(1.0)
    assert changed != before and enc.backbone_identity() == before


def test_backbone_identity_of_a_bf16_copy_of_the_weights_is_the_fp32_ones(tiny_backbone):
    """A checkpoint trained on the bf16 weights (GPU) must load on the same backbone read in fp32 (CPU): every frozen
    tensor rounded to bf16 and back leaves backbone_identity as it was, while its values did change.
    Catches: the values hashed at another precision (`torch.float16`: fp32 keeps 10 mantissa bits there, the bf16
    copy 8)."""
    enc = build(tiny_backbone, trainable="lora")
    before = enc.backbone_identity()
    frozen = [p for p in enc.lm.parameters() if not p.requires_grad]
    with torch.no_grad():
        rounded = [p.to(torch.bfloat16).float() for p in frozen]
        assert any(not torch.equal(p, r) for p, r in zip(frozen, rounded))
        for p, r in zip(frozen, rounded):
            p.copy_(r)
    assert enc.backbone_identity() == before


def test_backbone_identity_of_full_training_ignores_the_trained_embedding_under_its_tied_name(tiny_backbone):
    """With trainable=full the token embedding trains, and Qwen3-VL ties lm_head.weight to it: one tensor, two names,
    named_parameters() lists one. The tied name was hashed as a frozen weight, so a checkpoint's identity (taken on
    its trained weights) stopped matching the fresh backbone's once training moved the embedding's first row in bf16,
    and resume and evaluate.py refused the run's own checkpoints as "other backbone weights". A frozen weight still
    counts. Catches: `remove_duplicate=False` dropped from backbone_identity's trainable names."""
    enc = build(tiny_backbone, trainable="full")
    embedding = enc.lm.get_input_embeddings().weight
    assert embedding.requires_grad and embedding is enc.lm.lm_head.weight       # the case under test: tied
    before = enc.backbone_identity()
    with torch.no_grad():
        embedding[0, :8] += 0.5                                                 # as a trained first row
    assert enc.backbone_identity() == before
    frozen = build(tiny_backbone, trainable="full", train_embeddings=False)
    assert not frozen.lm.lm_head.weight.requires_grad
    frozen_before = frozen.backbone_identity()
    with torch.no_grad():
        frozen.lm.lm_head.weight[0, :8] += 0.5
    assert frozen.backbone_identity() != frozen_before


def test_tiny_backbone_leaves_room_for_the_readout_tokens_at_any_tokenizer_size(tmp_path):
    """make_tiny_backbone pads the vocabulary above its tokenizer (as Qwen's 151,936 rows > 151,669 tokens) so the
    encoder's <|MEAN|> and <|IMG|> get rows of their own: with --bpe-vocab 626 the tokenizer has 640 = 10 x 64
    tokens, and the model still has room for two more (ids 640 and 641), so the encoder builds.
    Fails when the vocabulary is only rounded up to a multiple of 64 (`+ 64` dropped: 640 rows, no room, and the
    encoder refuses the backbone), which the default tokenizer's 650 tokens cannot show."""
    out = str(tmp_path / "tight")
    fake_backbones.make_tiny_backbone(out, seed=0, bpe_vocab=626)
    with open(os.path.join(out, "config.json")) as f:
        rows = json.load(f)["text_config"]["vocab_size"]
    enc = build(out)
    assert len(enc.processor.tokenizer) == 642 and rows >= 642
    assert sorted(enc.token_ids.values()) == [640, 641]


def test_tiny_config_names_the_real_checkpoints_tokens_and_has_a_deepstack_tap(tiny_backbone):
    """The tiny backbone's config.json points at the same tokens as Qwen3-VL-4B-Instruct's (configs/.../config.json
    read through the real Qwen3 tokenizer): bos <|endoftext|>, eos <|im_end|>, image, video, vision start and end
    pads, each read back through the tiny tokenizer; and like the real tower (taps 5, 11, 17 of 24) its 2-block
    vision tower feeds deepstack features from inside it (block 1), so the CPU tests run Qwen3-VL's deepstack path.
    Fails when an id names another token (eos <|endoftext|>) or the tiny tower has no deepstack tap."""
    from transformers import AutoTokenizer
    real_tokenizer = AutoTokenizer.from_pretrained(fake_backbones.qwen3_tokenizer_dir())
    tiny_tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    real, tiny = fake_backbones.real_config(), json.load(open(os.path.join(tiny_backbone, "config.json")))
    keys = [(None, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")]
    keys += [("text_config", k) for k in ("bos_token_id", "eos_token_id")]
    for section, key in keys:
        real_id = (real[section] if section else real)[key]
        tiny_id = (tiny[section] if section else tiny)[key]
        assert tiny_tokenizer.convert_ids_to_tokens(tiny_id) == real_tokenizer.convert_ids_to_tokens(real_id), key
    assert tiny_tokenizer.convert_ids_to_tokens(tiny["text_config"]["eos_token_id"]) == "<|im_end|>"
    assert tiny["vision_config"]["depth"] == 2 and tiny["vision_config"]["deepstack_visual_indexes"] == [1]


def test_tiny_backbone_preprocesses_tokenizes_and_rotates_as_the_real_checkpoint(tiny_backbone):
    """Besides its widths, the tiny backbone is Qwen3-VL-4B-Instruct as published (configs/qwen3-vl-4b-instruct and
    the real Qwen3 tokenizer): the image and video processors' patch 16, temporal patch 2, merge 2, mean = std =
    0.5 and pixel ranges; the tokenizer's normalisation (NFC), pre-tokenisation (words with their leading space,
    single digits) and eos / pad tokens, with every byte encodable (any text decodes back); rope theta 5,000,000,
    interleaved M-RoPE whose (t, h, w) section keeps the real 24 / 20 / 20 of 64 rotary pairs at 16 (6 / 5 / 5),
    tied embeddings. Catches: CLIP's mean or std, another pixel range; NFKC; digits kept in runs; a prefix space;
    eos <|endoftext|> or pad <|im_end|>; a BPE without the byte alphabet (characters outside its corpus dropped);
    the section's order reversed; rope theta 10,000; non-interleaved M-RoPE."""
    from transformers import AutoTokenizer
    with open(os.path.join(tiny_backbone, "processor_config.json")) as f:
        processors = json.load(f)
    for kind, name in (("image_processor", "preprocessor_config.json"),
                       ("video_processor", "video_preprocessor_config.json")):
        with open(os.path.join(fake_backbones.QWEN3_VL_4B_FILES, name)) as f:
            real = json.load(f)
        for key in ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            assert processors[kind][key] == real[key], (kind, key)
    real, tiny = AutoTokenizer.from_pretrained(fake_backbones.qwen3_tokenizer_dir()), AutoTokenizer.from_pretrained(
        tiny_backbone)
    text = "Ünïcødé café, ﬁne ①: size 2024 it's a NAVY coat!\n\n  ✓ 😀 e\u0301"
    ours, theirs = tiny.backend_tokenizer, real.backend_tokenizer
    assert ours.normalizer.normalize_str(text) == theirs.normalizer.normalize_str(text)
    assert ours.pre_tokenizer.pre_tokenize_str(text) == theirs.pre_tokenizer.pre_tokenize_str(text)
    assert tiny.decode(tiny(text[:-2])["input_ids"]) == text[:-2]      # the last two are no NFC form
    assert (tiny.eos_token, tiny.pad_token) == (real.eos_token, real.pad_token) == ("<|im_end|>", "<|endoftext|>")
    real = fake_backbones.real_config()
    with open(os.path.join(tiny_backbone, "config.json")) as f:
        config = json.load(f)
    rope, real_rope = config["text_config"]["rope_parameters"], real["text_config"]["rope_scaling"]
    assert rope["rope_theta"] == real["text_config"]["rope_theta"] == 5_000_000
    assert rope["mrope_interleaved"] is real_rope["mrope_interleaved"] is True
    half, real_half = config["text_config"]["head_dim"] // 2, real["text_config"]["head_dim"] // 2
    assert rope["mrope_section"] == [n * half // real_half for n in real_rope["mrope_section"]] == [6, 5, 5]
    assert config["tie_word_embeddings"] is config["text_config"]["tie_word_embeddings"] is real["tie_word_embeddings"]


def test_the_random_4b_architecture_is_the_published_one(tmp_path, monkeypatch):
    """QWEN3_VL_4B, the architecture of the GPU benchmarks' random 4B model (random_qwen3vl_4b), is
    Qwen3-VL-4B-Instruct's: every field it sets, in both towers, has the value of configs/qwen3-vl-4b-instruct/
    config.json, also after random_qwen3vl_4b and benchmarks/chunk_memory.architecture_weight_bytes have built a
    model from it (the 4B build itself stubbed out). Catches: another number of key-value heads, M-RoPE section,
    deepstack taps or position-embedding grid than the checkpoint's; the shared dict handed to Qwen3VLConfig as it
    is (`Qwen3VLConfig(**config)` in fake_backbones.qwen3vl_config: it writes rope_theta into the text tower's
    rope_scaling and renames the vision tower's model_type)."""
    from benchmarks import chunk_memory

    class Built(Exception):
        pass

    def from_config(config, dtype):
        raise Built
    monkeypatch.setattr(fake_backbones.Qwen3VLForConditionalGeneration, "_from_config", from_config)
    with pytest.raises(Built):
        fake_backbones.random_qwen3vl_4b(str(tmp_path / "4b"), str(tmp_path), "cpu")
    monkeypatch.undo()
    chunk_memory.architecture_weight_bytes()
    real = fake_backbones.real_config()
    for key, value in fake_backbones.QWEN3_VL_4B.items():
        assert value == ({k: real[key][k] for k in value} if isinstance(value, dict) else real[key]), key


def test_every_query_kind_embeds(encoder, media):
    queries = queries_of_every_kind(media)
    out = encoder(encoder.prepare_queries(queries, train=True), role="query")
    emb = out["emb"]
    assert emb.shape == (5, encoder.embed_dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert (emb @ emb.T - torch.eye(5)).abs().max() < 0.999  # five different queries, five different embeddings
    for key in ("gate", "reg_fro", "reg_orth"):
        assert out[key].shape == (5,) and torch.isfinite(out[key]).all()
    targets = encoder(encoder.prepare_targets(media["images"], train=True), role="target")
    assert targets["emb"].shape == (3, encoder.embed_dim) and targets["gate"] is None
    assert torch.allclose(targets["emb"].norm(dim=-1), torch.ones(3), atol=1e-5)


def tokens(grid_thw):
    """Visual tokens per image (per temporal patch for a video): patches / merge 2x2."""
    return [h * w // 4 for _, h, w in grid_thw.tolist()]


def test_video_keeps_every_frame_and_pixel_budget(encoder, media):
    """Catches: video frames left out of the image budget (not resized: 96x64 -> 6 x 4 patches)."""
    for path in (media["video"], media["short_video"]):
        frames, meta = load_video(path, 8)
        assert frames.shape[0] == 8 and len(meta.frames_indices) == 8
    queries = queries_of_every_kind(media)
    t, h, w = encoder.prepare_queries(queries[3:4], train=True)["video_grid_thw"][0].tolist()
    assert t == 8 // 2  # 8 frames, temporal patch 2: no frame dropped
    # 96x64 frames in 16 units of 32x32: exact fit 4.90 x 3.27 units; 5 x 3 keeps most of the worse axis (see
    # test_pixel_budget_is_used_fully): 160x96 pixels, a grid of 6 x 10 patches, like a 96x64 image.
    assert (h, w) == (6, 10)


def test_release_video_grid_is_qwen3_vl_smart_resize(tiny_backbone, tmp_path):
    """model.fill_pixel_budget=false sizes a clip by Qwen3-VL's video smart_resize (factor 32, temporal 2), its
    budget of 8 x 128 x 128 = 131,072 pixels for the 8 frames together (min = max), uncapped. By hand, 8 frames
    of 224 x 96 (w x h): sides round to 96 x 224 (3 x 7 units of 32); 8 x 96 x 224 = 172,032 > 131,072, so both
    are scaled by beta = sqrt(172,032 / 131,072) = 1.1456 and floored to multiples of 32: 96 / 1.1456 = 83.8 -> 64,
    224 / 1.1456 = 195.5 -> 192. Grid 4 x 4 x 12, 48 tokens (ours, fill_size: 64 x 224, 4 x 4 x 14).
    Catches: the processor's per-frame cap on (max becomes 8 x int(1.05 x 131,072) = 1,101,000 >= 172,032: no
    downscale, 96 x 224, grid 4 x 6 x 14), as the release path would be if the processor's default changed."""
    clip = write_mp4(tmp_path / "wide.mp4", 8, seed=3, size=(224, 96))
    release = build(tiny_backbone, fill_pixel_budget=False)
    query = {"id": "v", "instruction_text": "Find the item.", "query_image": [], "query_video": [clip]}
    inputs = release.prepare_queries([query], train=True)
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 12]]
    assert int((inputs["input_ids"] == release.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum()) == 48
    # 3 frames of 144 x 112 (model.video_frames=3): sides round to 128 x 128; smart_resize counts the frames as
    # temporal patches hold them, round(3 / 2) x 2 = 4, and 4 x 16,384 > 3 x 16,384, so both sides are scaled by
    # beta = sqrt(3 x 112 x 144 / 49,152) = 0.9922: 112 / 0.9922 = 112.9 -> 96, 144 / 0.9922 = 145.1 -> 128. Grid
    # 2 x 6 x 8 (the 3 frames padded to 4). Catches: the temporal factor left out (`temporal_factor=1`: 3 x 16,384 is
    # within the budget, 128 x 128, grid 2 x 8 x 8).
    odd = build(tiny_backbone, fill_pixel_budget=False, video_frames=3)
    clip = write_mp4(tmp_path / "three.mp4", 3, seed=5, size=(144, 112))
    assert odd.prepare_queries([{**query, "query_video": [clip]}], train=True)["video_grid_thw"].tolist() == [[2, 6, 8]]
    # 8 frames of 64 x 32, whole units of 32 already: 8 x 32 x 64 = 16,384 is under the budget (min = max), so both
    # sides are scaled up by beta = sqrt(131,072 / 16,384) = 2.828 and rounded up to multiples of 32: 32 x 2.828 =
    # 90.5 -> 96, 64 x 2.828 = 181 -> 192. Grid 4 x 6 x 12. Catches: the lower bound for one frame, not the clip
    # (`min_pixels=low`: 16,384 is within it, no upscale, grid 4 x 2 x 4).
    clip = write_mp4(tmp_path / "small.mp4", 8, seed=4, size=(64, 32))
    assert release.prepare_queries([{**query, "query_video": [clip]}], train=True)["video_grid_thw"].tolist() == [
        [4, 6, 12]]


def test_one_frame_per_video_is_refused_by_name_with_the_release_sizing_and_encodes_with_ours(tiny_backbone, tmp_path):
    """model.video_frames=1 under the release's video sizing (fill_pixel_budget=false) ended at the first video in
    transformers' "t:1 must be larger than temporal_factor:2", naming no setting: Qwen3-VL's smart_resize needs one
    temporal patch (2 frames). The encoder now refuses it when built, naming both settings; with our sizing the
    processor pads the frame to a temporal patch and the clip encodes, and 2 frames build under the release's.
    Catches: the check removed (the build passes and the first video query raises the ValueError above); the check
    as `video_frames <= temporal_patch` (2 frames, which smart_resize takes, refused)."""
    with pytest.raises(SettingError, match="model.video_frames=1 with model.fill_pixel_budget=false: the release's "
                                           "video sizing needs at least 2 frames"):
        build(tiny_backbone, fill_pixel_budget=False, video_frames=1)
    clip = write_mp4(tmp_path / "clip.mp4", 4, seed=1)
    query = {"id": "v", "instruction_text": "Find the item.", "query_image": [], "query_video": [clip]}
    assert build(tiny_backbone, video_frames=1).encode_queries([query]).shape[0] == 1
    assert build(tiny_backbone, fill_pixel_budget=False, video_frames=2).prepare_queries(
        [query], train=True)["video_grid_thw"].tolist()[0][0] == 1


def test_video_processing_prints_no_deprecation_warning(encoder, media):
    """Transformers 5.24 warns on every video run that leaves cap_pixels_per_frame unset; we resize frames ourselves
    and never pass the deprecated argument. Catches: media.py's filter of that warning dropped."""
    import logging
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    logging.Logger.warning_once.cache_clear()  # a warning an earlier test triggered would not be repeated
    logger.addHandler(handler)
    try:
        encoder.prepare_queries(queries_of_every_kind(media)[3:4], train=True)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == []

def test_pixel_budget_is_used_fully(tiny_backbone, tmp_path):
    """At 224x224 (49 units of 32x32) each image gets the sides, in units, within one unit of the exact
    aspect-keeping fit that keep the most resolution on the worse axis, then the most area, by hand:
      300x300, 600x600: exact 7 x 7                            -> 7 x 7 = 49 tokens (release: 6 x 6 = 36)
      750x1101 (w x h): exact 5.78 x 8.48 -> 5|6 x 8|9; 6 x 8 keeps min(6/5.78, 8/8.48) = 94%
                                                               -> 6 x 8 = 48 tokens (release: 5 x 8 = 40)
      1920x1080: exact 9.33 x 5.25 -> only 9 x 5 fits          -> 45 tokens (release: 45)
    The release's smart_resize scales both sides by one factor and floors them.
    Catches: only the floors of the exact fit as candidates (fill_size), model.fill_pixel_budget ignored."""
    sizes = [(300, 300), (600, 600), (750, 1101), (1920, 1080)]
    paths = [str(tmp_path / f"{w}x{h}.png") for w, h in sizes]
    for (w, h), path in zip(sizes, paths):
        Image.new("RGB", (w, h), (200, 30, 90)).save(path)
    enc = build(tiny_backbone, image_pixels=224 * 224)
    for train in (True, False):
        assert tokens(enc.prepare_targets(paths, train=train)["image_grid_thw"]) == [49, 49, 48, 45]
    grid = enc.prepare_targets(paths[2:3], train=True)["image_grid_thw"]
    assert grid.tolist() == [[1, 16, 12]]  # 256 high, 192 wide: the aspect ratio is not turned around
    enc.model_cfg.fill_pixel_budget = False
    assert tokens(enc.prepare_targets(paths, train=True)["image_grid_thw"]) == [36, 36, 40, 45]


def test_a_pixel_budget_under_one_patch_is_refused_by_name():
    """model.image_pixels below one 32x32 patch (16-pixel patches merged 2x2) gets an error that says so.
    Catches: the check removed (a ZeroDivisionError from deep inside the sizing instead)."""
    from media import fill_size
    assert fill_size(100, 100, 1024) == (32, 32)                     # exactly one patch is enough
    with pytest.raises(ValueError, match="pixel budget 1000 is smaller than one 32x32 patch"):
        fill_size(100, 100, 1000)


def test_palette_greyscale_and_transparent_images_embed_as_their_rgb_versions(encoder, tmp_path):
    """Catalogue PNGs are often palette or greyscale images, and cut-out product shots and sketches often have a
    transparent background (black underneath). Each must embed exactly as its RGB version saved as a separate file,
    at training and evaluation sizes: PIL's conversion for palette and greyscale; for transparency (RGBA, LA, a
    palette with a transparent entry) the opaque pixels as they are and the transparent ones white, made here with
    numpy. A palette image resized before conversion would be resized by nearest neighbour (PIL's rule for mode P).
    Catches: load_image without .convert("RGB") (the palette image's embedding moves); load_image's old
    `image.convert("RGB")` for every image (the transparent background stays black)."""
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    cut_out = np.zeros((90, 70), dtype=bool)
    cut_out[20:70, 15:55] = True                                       # the product; around it, transparent
    rgb = np.asarray(photo) * cut_out[..., None]                       # black under the transparent pixels
    alpha = np.where(cut_out, 255, 0).astype(np.uint8)
    palette = photo.quantize(colors=16)
    transparent_entry = int(np.asarray(palette)[0, 0])
    cases = {"P": (palette, palette.convert("RGB")),
             "L": (photo.convert("L"), photo.convert("L").convert("RGB")),
             "RGBA": (Image.fromarray(np.dstack([rgb, alpha])), np.where(cut_out[..., None], rgb, 255)),
             "LA": (Image.fromarray(np.dstack([rgb[..., 0], alpha])), np.where(cut_out, rgb[..., 0], 255)),
             "P-transparent": (palette, np.where((np.asarray(palette) == transparent_entry)[..., None], 255,
                                                 np.asarray(palette.convert("RGB"))))}
    paths, references = [], []
    for name, (image, as_rgb) in cases.items():
        paths.append(str(tmp_path / f"{name}.png"))
        image.save(paths[-1], **({"transparency": transparent_entry} if name == "P-transparent" else {}))
        assert Image.open(paths[-1]).mode == name.split("-")[0]        # the case under test
        references.append(str(tmp_path / f"{name}-as-rgb.png"))
        as_rgb = Image.fromarray(np.asarray(as_rgb, dtype=np.uint8)) if isinstance(as_rgb, np.ndarray) else as_rgb
        as_rgb.convert("RGB").save(references[-1])
    for train in (True, False):
        with torch.no_grad():
            got = encoder(encoder.prepare_targets(paths, train=train), "target")["emb"]
            expected = encoder(encoder.prepare_targets(references, train=train), "target")["emb"]
        assert torch.equal(got, expected)


def test_a_16_bit_grey_image_reads_as_its_8_bit_version_and_32_bit_pixels_are_refused(tmp_path):
    """A 16-bit grey PNG went through convert_to_rgb clipped at 255: a mid-grey image came out white (mean 254.5
    instead of 127), and evaluation scored it without a word. Its 8-bit reading is the 8-bit image it was made from
    (v * 257 >> 8 == v). Fails when load_image drops the I;16 scaling (the image reads white), or the refusal of
    modes I and F (a float image reads black)."""
    grey = np.random.default_rng(4).integers(0, 256, (40, 30), dtype=np.uint8)
    path = str(tmp_path / "grey16.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode == "I;16"                               # the case under test
    assert np.array_equal(np.asarray(load_image(path)), np.repeat(grey[..., None], 3, axis=2))
    for deep in (grey.astype(np.float32) / 255, grey.astype(np.int32)):
        path = str(tmp_path / f"deep-{deep.dtype}.tif")
        Image.fromarray(deep).save(path)
        with pytest.raises(DataError, match="32-bit") as e:
            load_image(path, "rec-3")
        assert e.value.path == path and e.value.record_id == "rec-3"


def test_an_image_pil_refuses_with_a_value_error_is_a_data_error_naming_it(tmp_path):
    """PIL raises ValueError, not OSError, for some files it cannot read: here a 4 x 4 PNG whose zTXt text chunk
    decompresses past PIL's MAX_TEXT_CHUNK. load_image names the file and the record, as for any unreadable image.
    Catches: ValueError left out of load_image's except (PIL's own error, naming no record)."""
    import zlib
    from test_data import png_chunk
    write_png(tmp_path / "plain.png", (4, 4), 0)
    png = (tmp_path / "plain.png").read_bytes()
    at = png.index(b"IDAT") - 4              # the text chunk goes before the pixels, where PIL reads it on open
    path = tmp_path / "text-bomb.png"
    path.write_bytes(png[:at] + png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * (2 << 20))) + png[at:])
    with pytest.raises(DataError, match="cannot read image: Decompressed data too large") as err:
        load_image(str(path), "rec-5")
    assert err.value.path == str(path) and err.value.record_id == "rec-5"


def test_a_big_endian_16_bit_tiff_reads_as_its_8_bit_version(tmp_path):
    """A 16-bit grey TIFF written big-endian opens in PIL as mode I;16B, not I;16, and must be scaled to 8 bits like
    the little-endian PNG of the test above.
    Catches: the 16-bit check as `image.mode == "I;16"` (the I;16B image goes through convert_to_rgb unscaled)."""
    grey, low = np.random.default_rng(5).integers(0, 256, (2, 40, 30), dtype=np.uint16)
    path = str(tmp_path / "grey16be.tif")      # low bytes that differ from the high ones: byte order matters
    Image.frombytes("I;16B", (30, 40), (grey * 256 + low).astype(">u2").tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"                              # the case under test
    assert np.array_equal(np.asarray(load_image(path)), np.repeat(grey[..., None], 3, axis=2).astype(np.uint8))


def test_release_evaluates_between_the_two_budgets(tiny_backbone, tmp_path):
    """The release evaluates with min 224x224 and max 256x256 pixels (Qwen2-VL's smart_resize), by hand:
      112x112: rounds to 128x128, under the min: scaled by sqrt(224^2 / 112^2) = 2, ceil -> 224x224, 49 tokens
      240x240: rounds to 256x256 (7.5 -> 8), within [min, max]                         -> 64 tokens
      400x300: rounds to 384x288, over the max: scaled by sqrt(65536 / 120000), floor -> 288x192, 54 tokens
    and trains at 224x224 (112x112 -> 49 tokens).
    Catches: evaluation forced to exactly 256x256 (min = max = eval_image_pixels: 112x112 -> 64 tokens)."""
    sizes = [(112, 112), (240, 240), (400, 300)]
    paths = [str(tmp_path / f"{w}x{h}.png") for w, h in sizes]
    for (w, h), path in zip(sizes, paths):
        Image.new("RGB", (w, h), (10, 120, 250)).save(path)
    release = build(tiny_backbone, image_pixels=224 * 224, eval_image_pixels=256 * 256, fill_pixel_budget=False)
    assert tokens(release.prepare_targets(paths, train=False)["image_grid_thw"]) == [49, 64, 54]
    assert tokens(release.prepare_targets(paths[:1], train=True)["image_grid_thw"]) == [49]


def test_an_evaluation_budget_below_the_training_budget_is_refused(tiny_backbone):
    """model.eval_image_pixels is the upper end of evaluation's range, image_pixels its lower end: a value below
    image_pixels has no meaning (resize_to_budget would let it win, evaluating below the training budget) and is
    refused when the encoder is built, naming both settings.
    The same value as image_pixels is a range of one size, and builds.
    Catches: the check removed (the encoder builds and evaluates every image at the smaller budget); the equal value
    refused too (`eval_image_pixels <= image_pixels`); one pixel below let through (`< image_pixels - 1`)."""
    for below in (32 * 32, 64 * 64 - 1):
        with pytest.raises(ValueError, match=f"model.eval_image_pixels={below} is below model.image_pixels=4096"):
            build(tiny_backbone, image_pixels=64 * 64, eval_image_pixels=below)
    assert build(tiny_backbone, image_pixels=64 * 64, eval_image_pixels=64 * 64).model_cfg.eval_image_pixels == 4096


def test_video_without_frame_count_is_counted_by_decoding(tmp_path):
    """A container that stores no frame count (.mkv) still gives 8 distinct frames spread over the whole clip,
    equal to the frames PyAV decodes at the uniform indices round(linspace(0, 11, 8)).
    Catches: the frame count taken from the container as it is (0 -> 8 copies of frame 0)."""
    path = write_mp4(tmp_path / "clip.mkv", 12, seed=2)
    with av.open(path) as container:
        assert container.streams.video[0].frames == 0  # the case under test
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    frames, meta = load_video(path, 8)
    assert len(decoded) == 12 and meta.total_num_frames == 12
    assert meta.frames_indices == [0, 2, 3, 5, 6, 8, 9, 11]  # 11 * k / 7 rounded, by hand
    assert np.array_equal(frames, np.stack([decoded[i] for i in meta.frames_indices]))


def test_a_clip_shorter_than_the_frame_count_repeats_frames_with_their_own_indices(tmp_path):
    """A 3-frame clip read as 8 frames repeats frames at round(linspace(0, 2, 8)) = 0 0 1 1 1 1 2 2 (by hand), and
    each frame's index (Qwen3-VL's video prompt holds its timestamp) is the index of the frame actually returned, as
    PyAV decodes it.
    Catches: load_video mapping the picks onto the sampled indices as listed (with repeats) instead of the decoded
    ones: indices 0 0 0 0 0 0 1 1 for frames 0 0 1 1 1 1 2 2."""
    path = write_mp4(tmp_path / "short.mp4", 3, seed=3)
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    frames, meta = load_video(path, 8)
    assert meta.frames_indices == [0, 0, 1, 1, 1, 1, 2, 2]
    assert np.array_equal(frames, np.stack([decoded[i] for i in meta.frames_indices]))


def test_a_clips_frame_rate_reaches_the_video_metadata(tmp_path, monkeypatch):
    """Qwen3-VL's video prompt stamps each frame with its time, index / fps, so the fps must be the clip's own (4 here);
    load_video falls back to 24, the processor's default, only for a container that states none.
    Catches: the container's rate replaced by the default (`meta.fps = 24.0`: a 4 fps clip's times 6x too small); the
    fallback dropped (a reader that finds no rate stands in here: fps None, and the processor's timestamps fail)."""
    import media
    check_clip_rate_and_its_fallback(load_video, media, tmp_path, monkeypatch)


def check_clip_rate_and_its_fallback(read_video, module, tmp_path, monkeypatch):
    """read_video(path, 8) of a 4 fps clip gives fps 4; with the reader `module` calls (its video_utils.load_video)
    finding no rate, 24."""
    path = write_mp4(tmp_path / "slow.mp4", 12, seed=4, rate=4)
    assert read_video(path, 8)[1].fps == 4
    read = module.video_utils.load_video

    def no_rate(*args, **kwargs):
        frames, meta = read(*args, **kwargs)
        meta.fps = None
        return frames, meta
    monkeypatch.setattr(module.video_utils, "load_video", no_rate)
    assert read_video(path, 8)[1].fps == 24.0


def test_video_frames_are_resized_as_the_video_processor_resizes_them(tiny_backbone):
    """model.py sizes video frames itself (resize_frames) and runs the processor with do_resize=False, so the pixels
    must be the ones Qwen3-VL's video processor makes at the same size: its own resize (BaseVideoProcessor.resize,
    which Qwen3VLVideoProcessor.resize calls after smart_resize), at its own resample, on random frames halved.
    Catches: resize_frames without antialiasing (`antialias=False`) or with another interpolation (BILINEAR)."""
    from transformers import AutoVideoProcessor
    from transformers.image_utils import SizeDict
    from transformers.video_processing_utils import BaseVideoProcessor
    processor = AutoVideoProcessor.from_pretrained(tiny_backbone)
    frames = np.random.default_rng(6).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    theirs = BaseVideoProcessor.resize(processor, image=torch.from_numpy(frames).permute(0, 3, 1, 2),
                                       size=SizeDict(height=32, width=48), resample=processor.resample)
    assert np.array_equal(resize_frames(frames, 32, 48), theirs.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("side", ["left", "right"])
def test_embedding_independent_of_batch_and_padding_side(encoder, media, side):
    queries = queries_of_every_kind(media)
    encoder.padding_side = "right"
    alone = torch.cat([encoder.encode_queries([q]) for q in queries])
    encoder.padding_side = side
    try:
        together = encoder.encode_queries(queries[::-1], batch_size=5).flip(0)
        pairs = encoder.encode_queries([queries[0], queries[3], queries[1], queries[4], queries[2]], batch_size=2)
    finally:
        encoder.padding_side = "right"
    assert (together - alone).abs().max() < 1e-5
    assert (pairs - alone[[0, 3, 1, 4, 2]]).abs().max() < 1e-5
    targets = encoder.encode_targets(media["images"], batch_size=2)
    assert (targets - torch.cat([encoder.encode_targets([p]) for p in media["images"]])).abs().max() < 1e-5


def test_rope_switch_changes_only_vision_queries(tiny_backbone, media):
    none = CalibratorConfig(mode="none")
    ours = build(tiny_backbone, calibrator=none)
    release = build(tiny_backbone, calibrator=none, keep_rope_positions=False)
    queries = queries_of_every_kind(media)
    a, b = ours.encode_queries(queries), release.encode_queries(queries)
    assert (a[0] - b[0]).abs().max() < 1e-6  # text only: 3-D positions reduce to 0, 1, 2, ...
    assert ((a[1:] - b[1:]).abs().amax(dim=1) > 1e-3).all()  # images / video: positions lost in the release


def processor_outputs(inputs):
    """What the processor returned, without what prepare_* adds (model.FashionLensEncoder.index_work)."""
    return {k: v for k, v in inputs.items() if k not in (
        "role", "readout_index", "position_ids", "vision_index", "vision_at", "causal_mask")}


@pytest.mark.parametrize("side", ["left", "right"])
def test_readout_and_its_gradients_equal_transformers_forward_from_the_ids(tiny_backbone, media, side):
    """The readout (FashionLensEncoder.language_model: the vision tokens placed and the causal mask built with the
    batch, DeepStack added by index) equals transformers' own Qwen3VLModel forward from the token ids (the readout
    token's embedding row set to the learned token), values and gradients of every weight, for queries of every kind
    (text only; several images; a video; an image and a video) padded on either side.
    Catches: DeepStack left out; its features added with .detach() (values unchanged, gradients not); the causal
    mask not passed (attention_mask=None: wrong only under left padding); the video's tokens placed at the
    image placeholders."""
    queries = queries_of_every_kind(media)
    readouts, grads = [], []
    for path in ("ours", "transformers"):
        encoder = build(tiny_backbone).eval()
        encoder.padding_side = side
        inputs = encoder.prepare_queries(queries, train=True)
        token, lm = encoder.token_ids["query"], encoder.lm
        if path == "ours":
            hidden = encoder.readout(inputs, token, encoder.query_token, encoder.vision_features(inputs))
        else:
            with torch.no_grad():
                lm.get_input_embeddings().weight[token] = encoder.query_token  # the ids path sees the same vector
            hidden = lm.model(**processor_outputs(inputs), use_cache=False).last_hidden_state
            hidden = hidden[torch.arange(len(queries)), (inputs["input_ids"] == token).int().argmax(1)]
        (hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        readouts.append(hidden.detach())
        grads.append({n: p.grad for n, p in lm.named_parameters() if p.grad is not None and "embed_tokens" not in n})
    assert torch.equal(readouts[0], readouts[1])   # the same operations on the same numbers
    assert grads[0].keys() == grads[1].keys() and any(".visual." in n for n in grads[0])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_prepared_with_the_batch_are_the_ones_transformers_computes(encoder, media, side):
    """The 3-D rotary positions prepare_* computes on the CPU (text, one image, three images, video, image + video,
    and targets; either padding side) equal those Qwen3-VL computes itself inside its forward from the ids.
    Catches: an axis swapped (`position_ids[[0, 2, 1]]`), an offset (`+ 1`), positions of the unpadded prompt."""
    captured = []
    hook = encoder.lm.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["position_ids"]), with_kwargs=True)
    encoder.padding_side = side
    try:
        for inputs in (encoder.prepare_queries(queries_of_every_kind(media), train=True),
                       encoder.prepare_targets(media["images"], train=True)):
            with torch.no_grad():
                encoder.lm.model(**processor_outputs(inputs), use_cache=False)
            assert torch.equal(inputs["position_ids"], captured.pop())
    finally:
        hook.remove()
        encoder.padding_side = "right"


def every_kind_of_input(encoder, media):
    """Prepared queries of every kind (three image sizes, videos, image + video) and targets."""
    return (encoder.prepare_queries(queries_of_every_kind(media), train=True),
            encoder.prepare_targets(media["images"], train=True))


def test_vision_index_prepared_with_the_batch_is_what_the_tower_computes(encoder, media):
    """The vision tower's index work that prepare_* does on the CPU (FashionLensEncoder.vision_index: patch
    positions, position-embedding interpolation, attention segments) gives the tower's outputs bit for bit as when
    transformers computes it inside the tower, for queries of every kind and targets.
    The longest segment handed to the varlen kernel is the largest frame's h x w patches.
    Catches: the interpolation without the spatial merge order (spatial_merge_size=1); align_corners flipped; a
    video's frames as one attention segment (get_vision_cu_seqlens(grid, merge_temporal=True)); the longest segment
    taken as all the patches (`int(cu_seqlens[-1])`: right on the CPU, a kernel sized for the whole chunk on a GPU)."""
    for inputs in every_kind_of_input(encoder, media):
        for kind, index in inputs["vision_index"].items():
            assert index["max_seqlen"] == max(h * w for _, h, w in inputs[f"{kind}_grid_thw"].tolist())
        inside_the_tower = {**inputs, "vision_index": {media: {} for media in inputs["vision_index"]}}
        with torch.no_grad():
            ours, theirs = encoder.vision_features(inputs), encoder.vision_features(inside_the_tower)
        assert ours.keys() == theirs.keys() and len(ours) == (2 if inputs["role"] == "query" else 1)
        for kind in ours:
            for a, b in zip([ours[kind].pooler_output, *ours[kind].deepstack_features],
                            [theirs[kind].pooler_output, *theirs[kind].deepstack_features], strict=True):
                assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), kind


@pytest.mark.parametrize("kernel", ["per_segment", "varlen"])
def test_packed_vision_attention_gives_the_per_image_numbers(tiny_backbone, media, kernel):
    """model.vision_attention=packed (every image of a chunk in one attention call per block) embeds queries of every
    kind and targets as transformers' per-image loop does, with the same gradients for the trained vision tower.
    "per_segment" is the branch CPUs take; "varlen" the GPU branch, with a dense masked attention standing in for
    torch's varlen kernel (benchmarks/host_syncs.AsOnGpu).
    Catches: q, k, v taken from the wrong axis of the qkv output (reshape(tokens, heads, 3, -1)); the rotary
    embedding left out; every image of the chunk as one segment (cu_seqlens[[0, -1]] to the kernel); the kernel
    given [heads, tokens, head_dim]."""
    mix = torch.randn(5 + 3, 1, generator=torch.Generator().manual_seed(0))  # a loss that weighs every row
    results = {}
    for attention in ("transformers", "packed"):
        encoder = build(tiny_backbone, vision_attention=attention).eval()  # same weights; eval: no dropout
        with AsOnGpu() if kernel == "varlen" else contextlib.nullcontext():
            queries, targets = every_kind_of_input(encoder, media)
            emb = torch.cat([encoder(queries, "query")["emb"], encoder(targets, "target")["emb"]])
            (emb * mix * torch.arange(emb.shape[1])).sum().backward()
        grads = {n: p.grad for n, p in encoder.named_parameters() if ".visual." in n and p.grad is not None}
        results[attention] = emb.detach(), grads
    (emb_per_image, grads_per_image), (emb_packed, grads_packed) = results["transformers"], results["packed"]
    torch.testing.assert_close(emb_packed, emb_per_image, atol=1e-5, rtol=1e-5)
    assert grads_packed.keys() == grads_per_image.keys() and len(grads_per_image) > 10
    for name in grads_per_image:
        difference = (grads_packed[name] - grads_per_image[name]).abs().max()
        assert difference <= 1e-5 * grads_per_image[name].abs().max(), name  # summation order differs


def test_vision_attention_auto_packs_on_a_gpu_without_flash_attn():
    """model.vision_attention=auto packs on a GPU in bf16/fp16 unless flash-attn runs the tower (which packs already),
    never on CPU or in fp32 (no varlen kernel there); an unknown value is refused.
    Catches: the flash-attn check dropped; the dtype check dropped (CPU and fp32 GPU then pack)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = ModelConfig(vision_attention="auto")
    assert model.uses_packed_vision_attention(auto, cuda, "sdpa")
    assert not model.uses_packed_vision_attention(auto, cuda, "flash_attention_2")
    assert not model.uses_packed_vision_attention(auto, cpu, "sdpa")
    assert not model.uses_packed_vision_attention(ModelConfig(vision_attention="auto", dtype="float32"), cuda, "sdpa")
    assert model.uses_packed_vision_attention(ModelConfig(vision_attention="packed"), cpu, "sdpa")
    assert not model.uses_packed_vision_attention(ModelConfig(vision_attention="transformers"), cuda, "sdpa")
    with pytest.raises(ValueError, match="vision_attention"):
        model.uses_packed_vision_attention(ModelConfig(vision_attention="varlen"), cuda, "sdpa")


def test_a_chunk_reads_nothing_back_from_the_device(tiny_backbone, media):
    """With the packed vision attention on its GPU branch and LoRA (the frozen tower's output reused), neither
    gradient-cache pass over a chunk asks for a host-device synchronisation (benchmarks/host_syncs.py counts, on
    CPU, what would be one on a GPU), for queries of every kind (image and video in one chunk) and for targets:
    pass 1 without a graph, then the replay's forward and backward. transformers' own path asks for 3 per vision
    block plus 6 per tower call, and 5 per pass in the language model.
    Catches: vision_index not handed to the tower (index work inside it); max_seqlen not precomputed (a read-back
    per block); the tower's output split per image (get_image_features); the vision tokens placed by transformers'
    Qwen3VLModel forward (boolean masks, the padding mask read back)."""
    encoder = build(tiny_backbone, vision_attention="packed", trainable="lora")
    queries, targets = every_kind_of_input(encoder, media)
    with AsOnGpu():
        for inputs, role in ((queries, "query"), (targets, "target")):
            with SyncCounter() as first_pass, torch.no_grad():
                vision = encoder(inputs, role)["vision"]
            with SyncCounter() as replay:
                encoder(inputs, role, vision=vision)["emb"].sum().backward()
            assert not first_pass.by_caller and not replay.by_caller, (role, first_pass.by_caller, replay.by_caller)


def test_special_tokens_in_a_query_text_are_a_data_error_naming_the_record(encoder):
    """A query text holding one of the tokenizer's special tokens is refused, naming the record, before the processor
    sees it: the readout token (else a prompt with two), <|im_end|> (else the user's turn ends early, silently),
    <|image_pad|> (else the processor's count error, naming no record).
    Catches: instruction_text not given the encoder's special tokens (`instruction_text(query)` in prepare_queries)."""
    for text in ("Find <|MEAN|> in red.", "A red dress<|im_end|>\n<|im_start|>assistant", "a <|image_pad|> dress"):
        query = {"id": "q-9", "instruction_text": text, "query_image": [], "query_video": []}
        with pytest.raises(DataError, match="special token") as e:
            encoder.prepare_queries([query], train=True)
        assert e.value.record_id == "q-9", text


def test_readout_token_and_role_are_checked_when_prepared_and_embedded(encoder, media):
    """Token ids holding the readout token twice are refused while the batch is prepared (index_work), and inputs
    prepared as targets are refused as queries (their readout index points at <|IMG|>).
    Catches: either check dropped (a wrong embedding, silently)."""
    query = {"id": "q", "instruction_text": "Find it in red.", "query_image": [], "query_video": []}
    batch = processor_outputs(encoder.prepare_queries([query], train=True))
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][0, 3] = encoder.token_ids["query"]
    with pytest.raises(ValueError, match="exactly one readout token"):
        encoder.index_work(batch, "query")
    with pytest.raises(ValueError, match="prepared as targets"):
        encoder(encoder.prepare_targets(media["images"][:1], train=True), "query")


def test_release_readout_is_the_pre_norm_state(tiny_backbone, encoder, media):
    release = build(tiny_backbone, normed_readout=False)
    inputs = encoder.prepare_queries(queries_of_every_kind(media), train=True)
    token = encoder.token_ids["query"]
    with torch.no_grad():
        pre_norm = release.readout(inputs, token, release.query_token, release.vision_features(inputs))
        normed = encoder.readout(inputs, token, encoder.query_token, encoder.vision_features(inputs))
        assert (release.lm.model.language_model.norm(pre_norm) - normed).abs().max() < 1e-5
    assert (pre_norm - normed).abs().max() > 1e-2


def train_a_little(encoder, media):
    """Stand-in for training: every trainable tensor moved off its initial value."""
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))


def test_lora_trains_only_adapters_tokens_calibrator(tiny_backbone, media):
    enc = build(tiny_backbone, trainable="lora")
    names = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith(("query_token", "target_token", "calibrator.")) for n in names)
    assert any("language_model" in n and "lora_A" in n for n in names)
    assert not any("visual" in n for n in names)
    queries = queries_of_every_kind(media)[:2]
    loss = (enc(enc.prepare_queries(queries, train=True), "query")["emb"]
            * enc(enc.prepare_targets(media["images"][:2], train=True), "target")["emb"]).sum()
    loss.backward()
    joint, summed = enc.token_grad_norms()
    a, b = enc.query_token.grad.norm().item(), enc.target_token.grad.norm().item()
    assert a > 0 and b > 0
    assert joint == pytest.approx((a * a + b * b) ** 0.5, rel=1e-5) and summed == pytest.approx(a + b, rel=1e-5)


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_backbone, media):
    """With checkpointing on, the backward pass re-runs each decoder layer: a forward pre-hook inside layer 0 (on
    its MLP: transformers checkpoints the layer's `forward`, so hooks on the layer itself stay outside and fire once)
    runs twice per forward+backward, and once with checkpointing off; the gradients are the same. (A pre-hook:
    the recompute stops as soon as it has rebuilt what the backward needs, inside the MLP's forward.)
    Catches: model.gradient_checkpointing ignored (`if cfg.gradient_checkpointing` -> `if False`)."""
    queries = queries_of_every_kind(media)[1:3]
    grads, calls = [], []
    for checkpointing in (False, True):
        enc = build(tiny_backbone, trainable="lora", lora_dropout=0.0, gradient_checkpointing=checkpointing).train()
        train_a_little(enc, media)  # LoRA B starts at zero: give A a gradient too
        calls.append(0)
        hook = enc.lm.model.language_model.layers[0].mlp.register_forward_pre_hook(
            lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        enc(enc.prepare_queries(queries, train=True), "query")["emb"].square().sum().backward()
        hook.remove()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


@pytest.fixture
def bf16_on_cpu(monkeypatch):
    """Run the GPU dtype path on CPU: bf16 backbone weights and bf16 autocast."""
    monkeypatch.setattr(model, "compute_dtype", lambda model_cfg, device: torch.bfloat16)


def test_autocast_is_bf16_where_the_compute_dtype_is_and_off_in_fp32(encoder, monkeypatch):
    """Encoder.autocast: off where the compute dtype is fp32 (CPU), a bf16 autocast where it is bf16 (a GPU, stood in
    for by patching compute_dtype). Catches: the switch inverted (`enabled=dtype == torch.float32`: bf16 weights
    then run without autocast on a GPU)."""
    with encoder.autocast():
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(model, "compute_dtype", lambda model_cfg, device: torch.bfloat16)
    with encoder.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_an_explicit_attention_implementation_reaches_the_backbone(tiny_backbone):
    """model.attn_implementation other than "auto" goes to transformers as it is: "eager" builds a backbone whose
    language model and vision tower both attend eagerly. Catches: the setting replaced by sdpa (`return "sdpa"` for
    every value but "auto" in attention.attention_kernel)."""
    enc = build(tiny_backbone, attn_implementation="eager")
    assert enc.lm.config.text_config._attn_implementation == "eager"
    assert enc.lm.config.vision_config._attn_implementation == "eager"


@pytest.mark.parametrize("fp32_trainable", [True, False])
def test_fp32_trainable_decides_only_the_heads_dtype(tiny_backbone, media, bf16_on_cpu, fp32_trainable):
    """In bf16, model.fp32_trainable=false puts the calibrator and the two token vectors in bf16 (the release) and
    nothing else: LoRA adapters stay fp32 either way, the frozen backbone is bf16, and a training step runs.
    Catches: the LoRA adapters cast with the heads (`p.data.float()` -> `p.data.to(heads_dtype)`), and the switch
    ignored (`heads_dtype = torch.float32`)."""
    enc = build(tiny_backbone, trainable="lora", fp32_trainable=fp32_trainable).train()
    heads = torch.float32 if fp32_trainable else torch.bfloat16
    dtypes = {n: p.dtype for n, p in enc.named_parameters()}
    assert dtypes["query_token"] == dtypes["target_token"] == heads
    assert {d for n, d in dtypes.items() if n.startswith("calibrator.")} == {heads}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if n.startswith("lm.") and "lora_" not in n} == {torch.bfloat16}
    queries = queries_of_every_kind(media)[1:2]
    loss = (enc(enc.prepare_queries(queries, train=True), "query")["emb"]
            * enc(enc.prepare_targets(media["images"][:1], train=True), "target")["emb"]).sum()
    loss.backward()
    assert enc.query_token.grad.dtype == heads and enc.query_token.grad.abs().sum() > 0


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_trainable_state_round_trip_gives_identical_embeddings(tiny_backbone, media, tmp_path, trainable):
    trained = build(tiny_backbone, seed=0, trainable=trainable)
    train_a_little(trained, media)
    torch.save(trained.trainable_state_dict(), tmp_path / "state.pt")
    fresh = build(tiny_backbone, seed=1, trainable=trainable)
    queries = queries_of_every_kind(media)
    assert (fresh.encode_queries(queries) - trained.encode_queries(queries)).abs().max() > 1e-3
    fresh.load_trainable_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(fresh.encode_queries(queries), trained.encode_queries(queries))
    assert torch.equal(fresh.encode_targets(media["images"]), trained.encode_targets(media["images"]))
    other = build(tiny_backbone, trainable="lora" if trainable == "full" else "full")
    with pytest.raises(KeyError, match="missing"):
        other.load_trainable_state_dict(trained.trainable_state_dict())


def test_trainable_state_with_tensors_this_encoder_lacks_is_refused(encoder, tiny_backbone):
    """A checkpoint trained with the calibrator, loaded into an encoder built without one (calibrator.mode=none):
    every tensor the encoder has is in the state, but the calibrator's are left over, so the load is refused, naming
    them, and nothing is copied. Catches: only missing tensors checked (`if missing or unexpected` -> `if missing`:
    the run would evaluate without the calibrator it trained, silently)."""
    plain = build(tiny_backbone, calibrator=CalibratorConfig(mode="none"))
    before = plain.trainable_state_dict()
    with pytest.raises(KeyError, match=r"missing \[\], unexpected \['calibrator\."):
        plain.load_trainable_state_dict(encoder.trainable_state_dict())
    assert all(torch.equal(p, before[n]) for n, p in plain.trainable_state_dict().items())


def test_unreadable_media_raise_data_error_naming_path_and_record(encoder, media, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    missing = str(tmp_path / "missing.jpg")
    query = {"id": "rec-7", "instruction_text": "x", "query_image": [missing], "query_video": []}
    with pytest.raises(DataError) as err:
        encoder.prepare_queries([query], train=True)
    assert err.value.path == missing and err.value.record_id == "rec-7" and missing in str(err.value)
    query = {"id": "rec-8", "instruction_text": "x", "query_image": [], "query_video": [str(broken)]}
    with pytest.raises(DataError) as err:
        encoder.prepare_queries([query], train=True)
    assert err.value.path == str(broken) and err.value.record_id == "rec-8"
    with pytest.raises(DataError, match="not found"):
        load_video(str(tmp_path / "missing.mp4"), record_id="rec-9")


def test_a_video_without_a_video_stream_or_a_decodable_frame_is_named_as_such(tmp_path):
    """An audio-only file was refused with "cannot read video: tuple index out of range" (transformers' reader takes
    streams.video[0]); a video stream with no decodable frame with "need at least one array to stack" (.mp4, which
    stores a frame count) or "Operation not permitted" (.mkv, counted by decoding: 0, then a seek).
    A file cut within its header (here: a stream declared, no packet written) read "[Errno 541478725] End of file".
    Catches: video_problem's stream check removed (the IndexError's message comes back); its first-frame check
    removed (either of the other two messages); its EOFError clause removed (the End of file message); load_video
    not asking video_problem (all three)."""
    audio = write_audio_only(tmp_path / "audio.mp4")
    with av.open(audio) as container:                       # the cases under test
        assert [stream.type for stream in container.streams] == ["audio"]
    with pytest.raises(DataError) as err:
        load_video(audio, record_id="rec-1")
    assert str(err.value) == f"{audio} (record rec-1): cannot read video: the file has no video stream (streams: audio)"
    for name, stored in (("junk.mp4", 3), ("junk.mkv", 0)):
        path = write_undecodable_video(tmp_path / name)
        with av.open(path) as container:
            assert container.streams.video[0].frames == stored and not list(container.decode(video=0))
        with pytest.raises(DataError) as err:
            load_video(path, record_id="rec-2")
        assert str(err.value) == f"{path} (record rec-2): cannot read video: its video stream has no decodable frames"
    header_only = str(tmp_path / "header-only.mkv")       # a stream declared, not one packet written
    with av.open(header_only, "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    with pytest.raises(av.error.EOFError):                    # the case under test
        av.open(header_only)
    with pytest.raises(DataError) as err:
        load_video(header_only, record_id="rec-3")
    assert str(err.value) == f"{header_only} (record rec-3): cannot read video: the file ends before its first frame " \
                             f"(cut short?)"


def test_a_fault_while_naming_a_videos_problem_leaves_the_readers_own_message(tmp_path, monkeypatch):
    """video_problem runs once the reader has failed, only to put the cause in words: a fault of its own (here PyAV's
    av.open raising a RuntimeError, for the reader and for it alike) leaves load_video's DataError with the reader's
    message, never a traceback of its own.
    Catches: video_problem catching PyAV's errors only (`except Exception` -> `except av.error.FFmpegError`: the
    RuntimeError escapes load_video)."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"not a video")

    def broken_open(*args, **kwargs):
        raise RuntimeError("the library is broken")

    monkeypatch.setattr(av, "open", broken_open)
    with pytest.raises(DataError) as err:
        load_video(str(path), record_id="rec-4")
    assert str(err.value) == f"{path} (record rec-4): cannot read video: the library is broken"


def test_encoding_prepares_the_next_batch_while_embedding_this_one(encoder, media, tmp_path):
    """Encoding in batches, the next batch prepared in a thread while this one is embedded, gives each item the
    embedding of a plain loop (prepare, then embed, batch after batch), in order, when the count is not a multiple
    of the batch size; an unreadable image in a later batch stops it with the error that names it.
    Catches: the thread preparing the batch after next (`batches[i + 2]`); the batches' embeddings out of order
    (`embs.insert(0, ...)`)."""
    paths = media["images"] * 3 + media["images"][:1]                  # 10 images, batches of 4: 4 + 4 + 2
    with torch.no_grad():
        plain = torch.cat([encoder(encoder.prepare_targets(paths[i:i + 4], train=False), "target")["emb"]
                           for i in range(0, len(paths), 4)])
    assert torch.equal(encoder.encode_targets(paths, batch_size=4), plain)
    missing = str(tmp_path / "gone.png")
    with pytest.raises(DataError) as err:
        encoder.encode_targets(paths[:9] + [missing], batch_size=4)
    assert err.value.path == missing


def test_encoding_embeds_at_the_evaluation_budget_in_eval_mode_and_gives_the_mode_back(tiny_backbone, tmp_path):
    """encode_targets prepares every batch as evaluation does (train=False: up to model.eval_image_pixels), embeds
    without dropout and leaves a training encoder training (train.py validates mid-run). With image_pixels 64^2,
    eval_image_pixels 128^2 and LoRA dropout 0.5, two 300 x 300 images in batches of one (the first prepared before
    the thread starts, the second by it) embed as plain forwards of prepare_targets(train=False) in eval mode, at 16
    visual tokens each (the training budget gives 4).
    Catches: the first batch, or the one the thread prepares, made with train=True (`prepare(batches[i],
    train=True)`, `pool.submit(prepare, batches[i + 1], train=True)`); the encoder left in eval mode after encoding
    (`self.train(was_training)` -> `self.train(False)`: training would go on without dropout) or in training mode
    (`self.train(True)`: an evaluating encoder would go on with dropout)."""
    paths = [write_png(tmp_path / f"{i}.png", (300, 300), i) for i in range(2)]
    enc = build(tiny_backbone, trainable="lora", lora_dropout=0.5, image_pixels=64 * 64, eval_image_pixels=128 * 128)
    train_a_little(enc, None)           # LoRA B off zero: dropout changes the embeddings
    encoded = enc.train().encode_targets(paths, batch_size=1)
    assert enc.training
    enc.eval().encode_targets(paths[:1])
    assert not enc.training
    assert tokens(enc.prepare_targets(paths, train=False)["image_grid_thw"]) == [16, 16]
    with torch.no_grad():
        plain = torch.cat([enc(enc.prepare_targets([p], train=False), "target")["emb"] for p in paths])
    assert torch.equal(encoded, plain)


def test_encoding_no_items_gives_no_rows_of_the_embedding_width(encoder):
    """An empty list encodes to a [0, D] matrix (D the language model's hidden size), which concatenates with other
    embeddings. Catches: the empty case shaped otherwise (`torch.zeros(0, 1)`)."""
    width = encoder.lm.config.text_config.hidden_size
    assert encoder.encode_targets([]).shape == encoder.encode_queries([]).shape == (0, width)


def test_readout_tokens_start_as_copies_of_im_ends_embedding(tiny_backbone):
    """<|MEAN|> and <|IMG|> start from <|im_end|>'s input embedding (paper section IV-B), each a copy of its own:
    moving one moves neither the other nor <|im_end|>'s row, which every prompt reads after each turn (a frozen row
    under LoRA).
    Catches: another token's row (`<|im_start|>`); the query token sharing the table's storage (`.clone()` dropped:
    training it would rewrite <|im_end|> in every prompt)."""
    enc = build(tiny_backbone, trainable="lora")
    table = enc.lm.get_input_embeddings().weight
    im_end = enc.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    row = table[im_end].detach().clone()
    assert torch.equal(enc.query_token.detach(), row) and torch.equal(enc.target_token.detach(), row)
    with torch.no_grad():
        enc.query_token.add_(1.0)
        enc.target_token.add_(2.0)
    assert torch.equal(table[im_end].detach(), row)
    assert torch.equal(enc.query_token.detach(), row + 1.0) and torch.equal(enc.target_token.detach(), row + 2.0)


def test_vision_features_handed_back_are_refused_unless_reusable(tiny_backbone, media):
    """forward takes a chunk's vision features back (the gradient-cache replay) only with
    model.reuse_vision_features and a frozen tower: a tower that trains needs the replay's own graph, and without
    the switch nothing promised the features are this chunk's. Both other cases are refused.
    Catches: the check dropped (`if vision is not None and not reusable` -> `if False`: a trained tower's gradients
    would go missing, silently)."""
    for overrides in ({"trainable": "full", "reuse_vision_features": True},
                      {"trainable": "lora", "reuse_vision_features": False}):
        enc = build(tiny_backbone, **overrides)
        inputs = enc.prepare_targets(media["images"][:1], train=True)
        vision = enc.vision_features(inputs)
        with pytest.raises(ValueError, match="can only be reused"):
            enc(inputs, "target", vision=vision)


def test_a_vocabulary_without_a_row_for_each_readout_token_is_refused(tiny_backbone, tmp_path):
    """<|MEAN|> and <|IMG|> take the two ids after the tokenizer's; a backbone whose vocabulary has one row too few
    for them (tokenizer size + 1 rows: <|IMG|>'s id is the row count) is refused when the encoder is built, naming
    the backbone; one with exactly enough (+ 2) builds.
    Catches: the bound off by one (`>=` -> `>`: the encoder builds, and the first target fails in the embedding
    lookup)."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
    size = len(AutoTokenizer.from_pretrained(tiny_backbone))
    for extra in (1, 2):
        backbone = tmp_path / f"rows-{extra}"
        shutil.copytree(tiny_backbone, backbone)
        lm = Qwen3VLForConditionalGeneration.from_pretrained(tiny_backbone)
        lm.resize_token_embeddings(size + extra)
        lm.save_pretrained(backbone)
        if extra == 1:
            with pytest.raises(ValueError, match=f"{backbone}: vocabulary of {size + 1} rows has no room"):
                build(str(backbone))
        else:
            assert sorted(build(str(backbone)).token_ids.values()) == [size, size + 1]


def test_trainable_none_trains_nothing(tiny_backbone):
    """model.trainable=none (inference) leaves no tensor to train: not the backbone, the readout tokens or the
    calibrator. Catches: only the backbone frozen (`self.lm.requires_grad_(False)`)."""
    enc = build(tiny_backbone, trainable="none")
    assert not any(p.requires_grad for p in enc.parameters()) and enc.trainable_state_dict() == {}


def test_vision_attention_is_packed_and_unpacked_on_request(tiny_backbone, media, monkeypatch):
    """pack_vision_attention(False) gives every vision block transformers' own attention back (benchmarks/
    encode_throughput.py times both paths on one encoder): packed_attention runs once per block and image batch
    while packed, never once unpacked, and again when packed again.
    Catches: unpacking leaving the packed forward bound (`block.attn.__dict__.pop("forward", None)` -> `pass`)."""
    import attention
    calls, packed_attention = [], attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention",
                        lambda *args, **kwargs: calls.append(1) or packed_attention(*args, **kwargs))
    enc = build(tiny_backbone, vision_attention="packed")
    blocks = len(enc.lm.model.visual.blocks)
    counts = []
    for packed in (True, False, True):
        enc.pack_vision_attention(packed)
        calls.clear()
        enc.encode_targets(media["images"][:1])
        counts.append(len(calls))
    assert counts == [blocks, 0, blocks]


def test_a_query_text_may_hold_an_added_token_that_is_not_special(tiny_backbone, tmp_path):
    """Only the tokenizer's special tokens are refused in a query text: the real Qwen3 tokenizer also holds added
    tokens that are not special (<think>, <tool_call>), which a query may contain. On a copy of the tiny backbone
    whose tokenizer has "<think>" added as a non-special token, "a <think> dress" prepares (one <think> token in its
    prompt) and "<|im_end|>" is still refused.
    Catches: every added token refused (`if token.special` dropped from the encoder's special_tokens)."""
    from transformers import AutoTokenizer
    backbone = tmp_path / "think"
    shutil.copytree(tiny_backbone, backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenizer.add_tokens(["<think>"])
    tokenizer.save_pretrained(backbone)
    enc = build(str(backbone))
    think = enc.processor.tokenizer.convert_tokens_to_ids("<think>")
    query = {"id": "q", "instruction_text": "a <think> dress", "query_image": [], "query_video": []}
    assert int((enc.prepare_queries([query], train=False)["input_ids"] == think).sum()) == 1
    with pytest.raises(DataError, match="special token"):
        enc.prepare_queries([{**query, "instruction_text": "a <|im_end|> dress"}], train=False)


# ----------------------------------------------------------------------------- open_clip baseline

@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    config = fake_backbones.make_tiny_openclip_config(str(tmp_path_factory.mktemp("clip")))
    torch.manual_seed(0)
    cfg = ModelConfig(kind="openclip", backbone=config, trainable="full")
    return model.build_encoder(cfg, CalibratorConfig(mode="none"), device="cpu").eval()


@pytest.mark.parametrize("module", ["model", "media", "fake_backbones"])
def test_importing_a_module_that_loads_backbones_turns_the_hub_off_before_transformers_reads_it(module):
    """Each module that loads a backbone or processor sets HF_HUB_OFFLINE itself: a process started without it
    (the tests' conftest sets it, so only a fresh interpreter can tell) would otherwise let open_clip retry the hub
    for about 46 s on a pretrained tag. huggingface_hub reads the variable once, on import: its own constant is
    the independent check that it was set in time.
    Catches: model.py's (or media.py's, fake_backbones.py's) `os.environ.setdefault("HF_HUB_OFFLINE", "1")` removed."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    script = f"import {module}, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True"]


def test_open_clip_offline_fuses_text_and_images(clip, media):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    imgs = media["images"]
    text = {"id": "t", "instruction_text": "a red dress", "query_image": [], "query_video": []}
    one = dict(text, id="i", query_image=imgs[:1])
    two = dict(text, id="ii", query_image=imgs[:2])
    video = dict(text, id="v", query_video=[media["video"]])
    q = clip.encode_queries([text, one, two, video])
    t = clip.encode_targets(imgs[:2])
    assert q.shape == (4, clip.embed_dim) and torch.allclose(q.norm(dim=-1), torch.ones(4), atol=1e-5)
    # UniIR score fusion: normalised sum of the text embedding and the (mean) image embedding.
    assert torch.allclose(q[1], F.normalize(q[0] + t[0], dim=0), atol=1e-5)
    assert torch.allclose(q[2], F.normalize(q[0] + F.normalize(t[0] + t[1], dim=0), dim=0), atol=1e-5)
    assert (q[3] - q[0]).abs().max() > 1e-3
    assert torch.allclose(clip.encode_queries([two, text]), q[[2, 0]], atol=1e-5)
    assert torch.allclose(clip.encode_queries([text]), q[:1], atol=1e-5)


def test_open_clip_refuses_its_tokenizer_markers_in_a_query_text_naming_the_record(clip):
    """CLIP pools a text at its first <end_of_text>, so before this check "a red dress <end_of_text> with white
    buttons" embedded exactly as "a red dress": the words after the marker were dropped, silently (shown here with the
    check off). Catches: instruction_text not given the baseline's markers (`instruction_text(q)` in
    prepare_queries)."""
    assert set(clip.special_tokens) == {"<start_of_text>", "<end_of_text>"}
    short, marked = ({"id": i, "instruction_text": t, "query_image": [], "query_video": []} for i, t in
                     (("q-1", "a red dress"), ("q-2", "a red dress <end_of_text> with white buttons")))
    markers, clip.special_tokens = clip.special_tokens, []
    try:
        assert torch.equal(clip.encode_queries([marked]), clip.encode_queries([short]))
    finally:
        clip.special_tokens = markers
    for text in ("a red dress <end_of_text> with white buttons", "<start_of_text>a red dress"):
        with pytest.raises(DataError, match="special token") as e:
            clip.prepare_queries([short, dict(marked, instruction_text=text)], train=False)
        assert e.value.record_id == "q-2", text


def test_open_clip_markers_of_both_tokenizer_kinds(tiny_backbone):
    """CLIP's own tokenizer gives its two markers; open_clip's wrapper of a transformers tokenizer (the text towers
    taken from the Hugging Face hub) gives that tokenizer's special tokens, here the tiny Qwen3 one's.
    Catches: the wrapped tokenizer's markers not read (an empty list: nothing refused)."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    from baseline import tokenizer_markers
    assert tokenizer_markers(SimpleTokenizer()) == ["<start_of_text>", "<end_of_text>"]
    assert {"<|im_end|>", "<|endoftext|>"} <= set(tokenizer_markers(HFTokenizer(tiny_backbone)))


def test_open_clip_trains_and_round_trips(clip, media):
    enc = clip.train()
    try:
        query = {"id": "i", "instruction_text": "a red dress", "query_image": media["images"][:1], "query_video": []}
        (enc(enc.prepare_queries([query], True), "query")["emb"]
         * enc(enc.prepare_targets(media["images"][1:2], True), "target")["emb"]).sum().backward()
        joint, summed = enc.token_grad_norms()
        assert joint > 0 and summed >= joint
        state = enc.trainable_state_dict()
        before = enc.encode_queries([query])
        enc.load_trainable_state_dict({k: v + 0.01 for k, v in state.items()})
        assert (enc.encode_queries([query]) - before).abs().max() > 1e-4
        enc.load_trainable_state_dict(state)
        assert torch.equal(enc.encode_queries([query]), before)
    finally:
        enc.zero_grad(set_to_none=True)
        enc.eval()
    with pytest.raises(ValueError, match="trainable=full"):
        model.build_encoder(ModelConfig(kind="openclip", backbone=enc.model_cfg.backbone), CalibratorConfig())


def test_open_clip_video_frames_join_the_query_images(clip, media, tmp_path, monkeypatch):
    """A query with an image and a video: the text embedding plus the normalised mean of the normalised embeddings of
    the image and every decoded frame (docs/method.md#embedding), recomputed from the text-only query and from the
    frames embedded as gallery images (saved as PNG, which keeps their pixels), at model.video_frames 3 (not the
    default 8). Catches: the frames replacing the query's images (`images = [...]` for `images += [...]`); one frame
    per video (`load_video(...)[0][:1]`); model.video_frames ignored (`load_video(path, 8, ...)`)."""
    monkeypatch.setattr(clip.model_cfg, "video_frames", 3)
    text = {"id": "t", "instruction_text": "a red dress", "query_image": [], "query_video": []}
    mixed = dict(text, id="m", query_image=media["images"][1:2], query_video=[media["short_video"]])
    frames = load_video(media["short_video"], clip.model_cfg.video_frames)[0]
    paths = [str(tmp_path / f"frame{i}.png") for i in range(len(frames))]
    for frame, path in zip(frames, paths):
        Image.fromarray(frame).save(path)
    images = clip.encode_targets(media["images"][1:2] + paths)
    q = clip.encode_queries([text, mixed])
    expected = F.normalize(q[0] + F.normalize(images.sum(0), dim=0), dim=0)
    assert len(frames) == 3 and torch.allclose(q[1], expected, atol=1e-5)


def test_open_clip_difficulty_is_the_two_projections_gradient_norms(clip):
    """The baseline's GGAS difficulty stand-in from given gradients: the image projection's of norm 3 and the text
    projection's of norm 4 give (joint norm 5, sum of norms 7); other gradients do not count. Catches: the joint norm
    taken as a sum (`stack(norms).sum()`); one projection counted twice (`norms[0] + norms[0]`, or `visual.proj` in
    place of `text_projection`)."""
    image, text = clip.clip.visual.proj, clip.clip.text_projection
    try:
        for p in clip.parameters():
            p.grad = torch.ones_like(p)
        image.grad, text.grad = torch.zeros_like(image), torch.zeros_like(text)
        image.grad[0, 0], text.grad[-1, -1] = 3.0, -4.0
        assert clip.token_grad_norms() == pytest.approx((5.0, 7.0))
    finally:
        clip.zero_grad(set_to_none=True)


def test_open_clip_backbone_loads_the_weights_file_it_names(clip, media, tmp_path):
    """model.backbone = "CONFIG.json:WEIGHTS": the weights file is loaded. By hand: the fixture's model with every
    weight moved by a seeded offset, saved with torch.save; an encoder built from "CONFIG:that file" under another
    seed embeds a query and gallery images exactly as the moved model does (same state dict), and the same config
    without the file (random weights of that seed) does not.
    Fails when the weights part of model.backbone is dropped (`pretrained=None`: random weights, silently)."""
    torch.manual_seed(1)
    moved = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in clip.clip.state_dict().items()}
    weights = str(tmp_path / "clip-weights.pt")
    torch.save(moved, weights)
    torch.manual_seed(7)
    loaded = model.build_encoder(ModelConfig(kind="openclip", backbone=f"{clip.model_cfg.backbone}:{weights}",
                                             trainable="full"), CalibratorConfig(mode="none"), device="cpu").eval()
    torch.manual_seed(7)
    unloaded = model.build_encoder(ModelConfig(kind="openclip", backbone=clip.model_cfg.backbone, trainable="full"),
                                   CalibratorConfig(mode="none"), device="cpu").eval()
    state = loaded.clip.state_dict()
    assert state.keys() == moved.keys() and all(torch.equal(state[k], moved[k]) for k in moved)
    query = {"id": "i", "instruction_text": "a red dress", "query_image": media["images"][:1], "query_video": []}
    assert not torch.equal(unloaded.encode_targets(media["images"][:2]), loaded.encode_targets(media["images"][:2]))
    assert not torch.equal(unloaded.encode_queries([query]), loaded.encode_queries([query]))


def test_open_clip_embed_dim_is_the_projections_output_width(tmp_path, media):
    """A CLIP whose text tower is narrower than its embedding (width 32, embed_dim 48, as RN50's 512 -> 1024):
    embed_dim is 48, the width of every query and gallery embedding (the size search.py builds its index with and
    the calibrator is built for). Fails when embed_dim is read from the projection's input side
    (`text_projection.shape[0]`: 32), which the test fixture's square 64 x 64 projection cannot tell apart."""
    config = {"embed_dim": 48,
              "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "narrow-clip.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    enc = model.build_encoder(ModelConfig(kind="openclip", backbone=str(path), trainable="full"),
                              CalibratorConfig(mode="slerp"), device="cpu").eval()
    query = {"id": "i", "instruction_text": "a red dress", "query_image": media["images"][:1], "query_video": []}
    assert enc.embed_dim == 48
    assert enc.encode_queries([query]).shape == (1, 48) and enc.encode_targets(media["images"][:1]).shape == (1, 48)


def test_open_clip_difficulty_takes_the_euclidean_norm_of_each_projections_gradient(clip):
    """Each projection's gradient spread over two entries: the image projection's (3, 4) has norm 5 (L1 7), the
    text projection's (6, -8) norm 10 (L1 14), so (joint norm sqrt(125), sum 15), by hand. Fails when a gradient's
    norm is another one (`abs().sum()`: (sqrt(441), 21)), which one non-zero entry per projection cannot show."""
    image, text = clip.clip.visual.proj, clip.clip.text_projection
    try:
        image.grad, text.grad = torch.zeros_like(image), torch.zeros_like(text)
        image.grad[0, 0], image.grad[1, 2] = 3.0, 4.0
        text.grad[2, 1], text.grad[-1, -1] = 6.0, -8.0
        assert clip.token_grad_norms() == pytest.approx((125 ** 0.5, 15.0))
    finally:
        clip.zero_grad(set_to_none=True)


def test_open_clip_difficulty_counts_a_projection_without_a_gradient_as_zero(clip):
    """A projection with no gradient (none yet, or set to None by zero_grad) counts as norm 0: the image projection's
    gradient of norm 3 alone gives (3, 3), by hand, and no gradient at all (0, 0).
    Catches: the `p.grad is not None` guard removed (an AttributeError on None)."""
    image = clip.clip.visual.proj
    clip.zero_grad(set_to_none=True)
    try:
        assert clip.token_grad_norms() == (0.0, 0.0)
        image.grad = torch.zeros_like(image)
        image.grad[0, 0] = 3.0
        assert clip.token_grad_norms() == pytest.approx((3.0, 3.0))
    finally:
        clip.zero_grad(set_to_none=True)


def test_open_clip_query_of_one_image_alone_in_its_batch_is_fused(clip, media):
    """A batch holding a single query image in all (search.py query --text ... --image ONE): that query is the
    normalised sum of its text's embedding and its image's, recomputed from a text-only query and the image encoded
    as a gallery image. Fails when the image branch runs only for batches of several images
    (`shape[0] > 1`: the lone image is dropped and the query is its text alone)."""
    text = {"id": "t", "instruction_text": "a red dress", "query_image": [], "query_video": []}
    one = dict(text, id="i", query_image=media["images"][:1])
    alone = clip.encode_queries([one])
    expected = F.normalize(clip.encode_queries([text])[0] + clip.encode_targets(media["images"][:1])[0], dim=0)
    assert torch.allclose(alone[0], expected, atol=1e-5)
    assert torch.allclose(clip.encode_queries([text, one])[1], expected, atol=1e-5)


def test_open_clip_queries_pass_through_the_configured_calibrator(clip, media):
    """The baseline's fused query goes through PGSQC built from the calibrator config (here the train.py ablation's
    lerp with a fixed gate of 1: the output is the proposal p = normalize(q + q A B)). The hypernetwork's last layer
    set by hand to write A = e_0 (rank 1) and B = 2 e_1 for every query: p = normalize(q + 2 q_0 e_1), with q the
    normalised sum of the text-only query's and the gallery image's embeddings (same CLIP weights as the fixture).
    Catches: the calibrator built without the config (`QueryCalibrator(dim, CalibratorConfig(mode="none"))`: no
    hypernetwork to set) or skipped in forward (`emb = F.normalize(fused)`: the query comes back as q)."""
    torch.manual_seed(0)
    enc = model.build_encoder(clip.model_cfg, CalibratorConfig(mode="lerp", gate="fixed", fixed_gate=1.0, rank=1),
                              device="cpu").eval()
    enc.clip.load_state_dict(clip.clip.state_dict())
    d, last = enc.embed_dim, enc.calibrator.hyper[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0], last.bias[d + 1] = 1.0, 2.0      # A [d, 1]: A[0, 0]; B [1, d]: B[0, 1]
    text = {"id": "t", "instruction_text": "a red dress", "query_image": [], "query_video": []}
    one = dict(text, id="i", query_image=media["images"][:1])
    q = F.normalize(clip.encode_queries([text])[0] + clip.encode_targets(media["images"][:1])[0], dim=0)
    expected = q.clone()
    expected[1] += 2 * q[0]
    assert torch.allclose(enc.encode_queries([one])[0], F.normalize(expected, dim=0), atol=1e-5)


def test_open_clip_refuses_a_role_it_does_not_know(clip):
    """forward's role is "query" or "target"; any other word (a typo, "targets") is refused, not embedded as a query.
    Catches: the role check removed (a query batch under role "targets" comes back as query embeddings)."""
    inputs = clip.prepare_queries([{"id": "t", "instruction_text": "a red dress", "query_image": [],
                                    "query_video": []}], train=False)
    with pytest.raises(ValueError, match="role must be 'query' or 'target', got 'targets'"):
        clip(inputs, "targets")


def test_open_clip_trains_every_clip_weight(clip):
    """trainable "full" (the only setting the baseline takes): every parameter of the open_clip model, both towers
    and the logit scale, is in the trainable state, listed here from open_clip's own module; with calibrator mode
    none there is nothing else.
    Catches: a tower left frozen (`self.clip.visual.requires_grad_(False)` in __init__): the round-trip test still
    passes, since the text tower moves the queries."""
    assert set(clip.trainable_state_dict()) == {f"clip.{n}" for n, _ in clip.clip.named_parameters()}
    assert any(n.startswith("visual.") for n, _ in clip.clip.named_parameters())


def test_open_clip_unreadable_query_media_names_the_query(clip, media, tmp_path):
    """A query image or video that cannot be read: one DataError naming the file and the query's id (the record to
    fix), as for the Qwen3-VL encoder.
    Catches: the query's id not passed on (`load_image(p)` or `load_video(path, frames)`: record_id None)."""
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    base = {"id": "q-9", "instruction_text": "a red dress", "query_image": [], "query_video": []}
    for query in (dict(base, query_image=[str(bad)]), dict(base, query_video=[str(tmp_path / "missing.mp4")])):
        with pytest.raises(DataError) as e:
            clip.prepare_queries([dict(base, id="q-1"), query], train=False)
        assert e.value.record_id == "q-9" and e.value.path in (str(bad), str(tmp_path / "missing.mp4"))


def test_lora_layers_add_alpha_over_r_times_b_a_of_the_dropped_out_input(tiny_backbone):
    """A LoRA-wrapped projection (model.lora_targets) computes W x + (lora_alpha / lora_r) B A dropout(x), by hand on
    one layer with lora_r 4, lora_alpha 12 (scale 3, not the defaults' 2) and lora_dropout 0.25: with A reading input
    coordinate 0 and B writing output 0, output 0 less the base layer's is 3 x_0 / 0.75 where dropout keeps x_0 and
    0 where it drops it, for about a quarter of 4,000 rows in train mode and for none in eval mode; every other output
    is the base layer's.
    Catches: LoraConfig given lora_alpha=cfg.lora_r (scale 1) or without model.lora_dropout (nothing dropped)."""
    enc = build(tiny_backbone, trainable="lora", lora_r=4, lora_alpha=12, lora_dropout=0.25)
    layer = enc.lm.model.language_model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()[0, 0] = 1.0     # A: [r, in]
        layer.lora_B["default"].weight.zero_()[0, 0] = 1.0     # B: [out, r]
    x = 0.5 + torch.rand(4000, layer.in_features, generator=torch.Generator().manual_seed(0))
    for training in (True, False):
        layer.train(training)
        with torch.no_grad():
            delta = layer(x) - layer.base_layer(x)
        assert torch.equal(delta[:, 1:], torch.zeros_like(delta[:, 1:]))
        dropped = delta[:, 0] == 0
        kept = ~dropped
        scale = 3 / 0.75 if training else 3.0
        torch.testing.assert_close(delta[kept, 0], scale * x[kept, 0], rtol=1e-5, atol=1e-5)
        assert abs(dropped.float().mean().item() - (0.25 if training else 0.0)) < 0.03


def test_fill_size_breaks_a_tie_on_the_worse_axis_by_the_larger_area():
    """380 x 160 (w x h) at 224^2 = 49 units of 32^2, by hand: the exact fit is 4.54 x 10.79 units (h x w); 4 x 10
    and 4 x 11 both keep 4 / 4.54 = 88% of the worse (height) axis, 5 x 10 = 50 units is over the budget, so the
    larger area wins: 4 x 11 units, 128 x 352 pixels (44 tokens, not 40).
    Catches: fill_size's key without its area tie-break (max keeps the first of the tie: 4 x 10, 128 x 320)."""
    from media import fill_size
    assert fill_size(160, 380, 224 * 224) == (128, 352)


def test_evaluation_budget_and_frame_count_reach_images_and_video_frames(tiny_backbone, tmp_path):
    """model.fill_pixel_budget (ours) with model.image_pixels 64^2, model.eval_image_pixels 128^2 and
    model.video_frames 4: at evaluation each image and video frame gets its own area clamped to [64^2, 128^2], in
    training 64^2; a clip gives 4 frames. By hand (tokens: 16-pixel patches merged 2 x 2):
      300 x 300: evaluation capped at 128 x 128 (8 x 8 patches, 16 tokens); training 64 x 64 (4 tokens)
      96 x 96:   evaluation its own area, 96 x 96 (6 x 6 patches, 9 tokens); training 4 tokens
      40 x 40:   evaluation raised to 64 x 64 (4 tokens); training 4 tokens
      frames of 160 x 96 (w x h): evaluation its own area 15,360 = 15 units of 32^2, exact fit 3 x 5 units: 96 x 160
        (6 x 10 patches); training 4 units, exact 1.55 x 2.58: 2 x 2 keeps 0.78 of its worse axis (1 x 2 and 1 x 3:
        0.65): 64 x 64 (4 x 4 patches); 4 frames at temporal patch 2: t = 2 (8 frames: 4).
    Catches: evaluation images or video frames sized at the training budget (resize_to_budget(..., low, low));
    training at the evaluation budget (`high = cfg.eval_image_pixels or low`); every image at the largest budget
    (`area = max_pixels` in resize_to_budget); model.video_frames ignored (load_video(path, 8, ...))."""
    paths = []
    for side in (300, 96, 40):
        paths.append(write_png(tmp_path / f"{side}.png", (side, side), side))
    clip = write_mp4(tmp_path / "clip.mp4", 12, seed=4, size=(160, 96))
    enc = build(tiny_backbone, image_pixels=64 * 64, eval_image_pixels=128 * 128, video_frames=4)
    query = {"id": "v", "instruction_text": "Find the item.", "query_image": [], "query_video": [clip]}
    expected = {False: ([[1, 8, 8], [1, 6, 6], [1, 4, 4]], [[2, 6, 10]]),
                True: ([[1, 4, 4], [1, 4, 4], [1, 4, 4]], [[2, 4, 4]])}
    for train, (images, video) in expected.items():
        assert enc.prepare_targets(paths, train=train)["image_grid_thw"].tolist() == images, train
        assert enc.prepare_queries([query], train=train)["video_grid_thw"].tolist() == video, train


def test_make_tiny_command_line_passes_seed_sizes_and_tokenizer_on(tmp_path):
    """`fake_backbones.py make-tiny DIR --seed 3` with every size option: config.json holds the widths, depths and
    head counts given (written out here), the tokenizer the vocabulary size given, and the weights are seed 3's
    (those of make_tiny_backbone(seed=3) with the same sizes), not seed 0's. With --real-tokenizer: the real Qwen3
    tokenizer file and its 151,936-row vocabulary.
    Catches: main not passing --seed, one of the size options or --real-tokenizer on to make_tiny_backbone."""
    sizes = {"text_hidden": 64, "text_layers": 1, "text_heads": 2, "text_kv_heads": 1, "text_intermediate": 96,
             "vision_depth": 1, "vision_hidden": 32, "vision_heads": 1, "vision_intermediate": 48, "bpe_vocab": 600}
    options = [f"--{name.replace('_', '-')}={value}" for name, value in sizes.items()]
    fake_backbones.main(["make-tiny", str(tmp_path / "cli"), "--seed", "3", *options])
    config = json.load(open(tmp_path / "cli" / "config.json"))
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"],
            text["intermediate_size"]) == (64, 1, 2, 1, 96)
    assert (vision["depth"], vision["hidden_size"], vision["num_heads"], vision["intermediate_size"]) == (1, 32, 1, 48)
    assert len(json.load(open(tmp_path / "cli" / "tokenizer.json"))["model"]["vocab"]) == 600

    def weights(d):
        return open(os.path.join(d, "model.safetensors"), "rb").read()

    for seed in (3, 0):
        fake_backbones.make_tiny_backbone(str(tmp_path / f"seed{seed}"), seed=seed, **sizes)
    assert weights(tmp_path / "cli") == weights(tmp_path / "seed3") != weights(tmp_path / "seed0")

    fake_backbones.main(["make-tiny", str(tmp_path / "real"), "--real-tokenizer", "--text-layers=1",
                         "--vision-depth=1"])
    assert json.load(open(tmp_path / "real" / "config.json"))["text_config"]["vocab_size"] == 151936
    with open(os.path.join(fake_backbones.qwen3_tokenizer_dir(), "tokenizer.json"), "rb") as f:
        assert (tmp_path / "real" / "tokenizer.json").read_bytes() == f.read()


def test_make_tiny_refuses_a_bpe_vocabulary_with_the_real_tokenizer(tmp_path, capsys):
    """`fake_backbones.py make-tiny DIR --real-tokenizer --bpe-vocab 500` is a usage error naming both options (the
    real tokenizer brings its own 151,669 tokens; the size would be ignored without a word), and writes nothing.
    Fails when main drops that check."""
    with pytest.raises(SystemExit) as e:
        fake_backbones.main(["make-tiny", str(tmp_path / "out"), "--real-tokenizer", "--bpe-vocab", "500"])
    assert e.value.code == 2 and "--bpe-vocab sizes the local tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_make_real_layout_command_line_passes_seed_and_depths_on(tmp_path, monkeypatch):
    """`fake_backbones.py make-real-layout DIR --seed 2 --text-layers 3 --vision-depth 4` builds with those values
    (the build itself, 400 M parameters, is test_real_layout's; recorded here).
    Catches: main not passing --seed, --text-layers or --vision-depth on (the 1-layer defaults are built)."""
    calls = []
    monkeypatch.setattr(fake_backbones, "make_real_layout_backbone",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or 4e8)
    fake_backbones.main(["make-real-layout", str(tmp_path), "--seed", "2", "--text-layers", "3", "--vision-depth", "4"])
    assert calls == [((str(tmp_path), 2), {"text_layers": 3, "vision_depth": 4})]
