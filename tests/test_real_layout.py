"""The real Qwen3-VL-4B-Instruct path, offline: a directory in the published layout (fake_backbones.py make-real-layout:
the real Qwen3 tokenizer, Qwen3-VL's processor configs and chat template, the real widths and 151,936-row
vocabulary, random weights, one text layer and one vision block) loaded through the same from_pretrained calls
as the real checkpoint. Expected prompts, ids and visual-token counts are written out by hand from the paper's
prompt (section IV-B), Qwen's vocabulary and the processor's published resize rule; none come from the code."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import attention
import fake_backbones
import model
from config import CalibratorConfig, Config, ModelConfig
from test_model import write_mp4

# Qwen's vocabulary (vocab.json / tokenizer_config.json of the real tokenizer).
IM_START, IM_END, NEWLINE, ASSISTANT = 151644, 151645, 198, 77091   # "<|im_start|>", "<|im_end|>", "\n", "assistant"
IMAGE_PAD, VIDEO_PAD = 151655, 151656
MEAN, IMG = 151669, 151670     # appended after the 151,669 tokens of the real tokenizer, in that order

SYSTEM = "<|im_start|>system\nYou are a fashion expert in processing fashion images.<|im_end|>\n"
PICTURE, CLIP = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"


def query_prompt(user):
    """The release's query prompt: Qwen3-VL's template renders text items back to back, no separator."""
    return (SYSTEM + "<|im_start|>user\n" + user + "Summarize the semantic feature of the target fashion image in "
            "one word.<|im_end|>\n<|im_start|>assistant\n<|MEAN|><|im_end|>\n")


TARGET_PROMPT = (SYSTEM + "<|im_start|>user\n" + PICTURE + "Summarize the image in one word.<|im_end|>\n"
                 "<|im_start|>assistant\n<|IMG|><|im_end|>\n")


@pytest.fixture(scope="session")
def real_backbone(tmp_path_factory):
    out = tmp_path_factory.mktemp("real-layout")
    fake_backbones.make_real_layout_backbone(str(out), seed=0)
    return str(out)


@pytest.fixture(scope="module")
def encoder(real_backbone):
    torch.manual_seed(0)
    return model.FashionLensEncoder(ModelConfig(backbone=real_backbone, trainable="lora"), CalibratorConfig(),
                                    "cpu").eval()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Photos at real sizes (width x height) and an 8-frame 640x360 clip."""
    d = tmp_path_factory.mktemp("real-media")
    rng = np.random.default_rng(0)
    photos = {}
    for w, h in [(750, 1101), (1920, 1080), (300, 300)]:
        photos[w, h] = str(d / f"{w}x{h}.jpg")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos[w, h])
    return {"photos": photos, "video": write_mp4(d / "clip.mp4", 8, 0, (640, 360), rate=8)}


def record(text, images=(), video=()):
    return {"id": "q", "instruction_text": text, "query_image": list(images), "query_video": list(video)}


def rendered(encoder, prepare, items):
    """What prepare_* renders with the directory's template (the processor's apply_chat_template, spied on),
    and the model inputs it produced."""
    seen = []
    render = encoder.processor.apply_chat_template
    encoder.processor.apply_chat_template = lambda *a, **k: seen.append(render(*a, **k)) or seen[-1]
    try:
        inputs = prepare(items, train=True)
    finally:
        del encoder.processor.apply_chat_template
    return seen[0], inputs


def test_real_layout_directory_holds_the_published_files_but_for_the_depths(real_backbone):
    """make-real-layout writes Qwen3-VL-4B-Instruct's own files: config.json as published (legacy rope_scaling, the
    real token ids) but for the towers cut to 1 text layer and 1 vision block with its deepstack tap inside (block
    0); chat_template.json and both preprocessor configs byte for byte, Qwen3-VL's template in tokenizer_config.json
    too; the weights in bf16, as the checkpoint stores them. Catches: config.json left as transformers writes it
    (rope_parameters); a vision block more than asked; chat_template.json or the video preprocessor config not
    copied; tokenizer_config.json without Qwen3-VL's template; the weights saved in fp32."""
    expected = fake_backbones.real_config()
    expected["text_config"]["num_hidden_layers"] = 1
    expected["vision_config"].update(depth=1, deepstack_visual_indexes=[0])
    with open(os.path.join(real_backbone, "config.json")) as f:
        assert json.load(f) == expected
    for name in ("chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        with open(os.path.join(fake_backbones.QWEN3_VL_4B_FILES, name), "rb") as f:
            assert open(os.path.join(real_backbone, name), "rb").read() == f.read(), name
    with open(os.path.join(fake_backbones.QWEN3_VL_4B_FILES, "chat_template.json")) as f:
        template = json.load(f)["chat_template"]
    with open(os.path.join(real_backbone, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == template      # Qwen3-VL's, not the tokenizer package's Qwen3 one
    with safe_open(os.path.join(real_backbone, "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}


class Unbuilt:
    """Stands in for Qwen3VLForConditionalGeneration where only the config a builder hands it matters (the model,
    hundreds of millions of parameters, is not built); the config is kept in `configs`."""
    configs = []

    def __init__(self, config):
        self.configs.append(config)

    @classmethod
    def _from_config(cls, config, dtype):
        return cls(config)

    def to(self, dtype):
        return self

    def save_pretrained(self, out):
        pass

    def parameters(self):
        return []


CUT_TAPS = [(5, [4]), (6, [5]), (12, [5, 11]), (24, [5, 11, 17])]


@pytest.mark.parametrize("depth, taps", CUT_TAPS)
def test_real_layout_keeps_the_deepstack_taps_inside_the_cut_vision_tower(tmp_path, monkeypatch, depth, taps):
    """Cut to `depth` vision blocks, the real taps 5, 11, 17 that lie inside the tower stay and a tower too short for
    any taps its last block (written out by hand per depth); the model is not built here (its config is what is
    written). Catches: a tap at the block just past the tower kept (`i <= vision_depth`); block 0 as the fallback."""
    monkeypatch.setattr(fake_backbones, "Qwen3VLForConditionalGeneration", Unbuilt)
    fake_backbones.make_real_layout_backbone(str(tmp_path / "cut"), vision_depth=depth)
    with open(tmp_path / "cut" / "config.json") as f:
        vision = json.load(f)["vision_config"]
    assert (vision["depth"], vision["deepstack_visual_indexes"]) == (depth, taps)


@pytest.mark.parametrize("depth, taps", [(2, [1])] + CUT_TAPS)
def test_random_4b_keeps_the_deepstack_taps_inside_the_cut_vision_tower(tmp_path, monkeypatch, depth, taps):
    """The GPU benchmarks' random 4B (random_qwen3vl_4b, cut for a CPU smoke test) follows the same rule as the real
    layout: the model it builds gets the taps written out by hand per depth (`--vision-depth 2`, the smoke tests'
    cut: block 1). Catches: the cut tower keeping the real taps 5, 11, 17 (transformers then skips every tap without
    a word and the model runs without deepstack features)."""
    monkeypatch.setattr(fake_backbones.Qwen3VLForConditionalGeneration, "_from_config", Unbuilt._from_config)
    monkeypatch.setattr(Unbuilt, "configs", [])     # the tiny backbone it builds first is a real model
    fake_backbones.random_qwen3vl_4b(str(tmp_path / "4b"), str(tmp_path), "cpu", vision_depth=depth)
    [config] = Unbuilt.configs
    assert (config.vision_config.depth, config.vision_config.deepstack_visual_indexes) == (depth, taps)


def test_prompt_of_every_task_family_is_the_release_prompt(encoder, media):
    """Each task family's prompt, rendered through the real directory, is byte for byte the release's
    processor.apply_chat_template(conversation, tokenize=False) with Qwen3-VL's template (written out by hand),
    and the ids around the readout are <|im_start|> assistant \\n <|MEAN|>/<|IMG|> <|im_end|> \\n.
    Catches: Qwen3's text template (the tokenizer package's) as the directory's chat template (it cannot render
    Qwen3-VL's list contents); media placed before the instruction in prepare_queries; a query's video placed
    before its images (docs/method.md#embedding: instruction, images, video)."""
    sketch, street, square = media["photos"][750, 1101], media["photos"][1920, 1080], media["photos"][300, 300]
    families = {
        "text": (record("A navy wool coat with a belt."), "A navy wool coat with a belt."),
        "sketch": (record("Find the shoe in these sketches.", [sketch, square]),
                   "Find the shoe in these sketches." + PICTURE * 2),
        "street photo": (record("Find the shop image of this item.", [street]),
                         "Find the shop image of this item." + PICTURE),
        "video": (record("Find the product in the video.", video=[media["video"]]),
                  "Find the product in the video." + CLIP),
        "image+text": (record("Is red and has short sleeves.", [square]), "Is red and has short sleeves." + PICTURE),
        "outfit": (record("Find the bag that goes with this outfit.", [sketch, street, square]),
                   "Find the bag that goes with this outfit." + PICTURE * 3),
        "attribute": (record("Find items with the same neckline design.", [street]),
                      "Find items with the same neckline design." + PICTURE),
        "image+video": (record("Find this jacket.", [square], video=[media["video"]]),
                        "Find this jacket." + PICTURE + CLIP),
    }
    for family, (query, user) in families.items():
        text, inputs = rendered(encoder, encoder.prepare_queries, [query])
        assert text == [query_prompt(user)], family
        ids = inputs["input_ids"][0].tolist()
        at = ids.index(MEAN)
        assert ids[at - 3:] == [IM_START, ASSISTANT, NEWLINE, MEAN, IM_END, NEWLINE], family
    text, inputs = rendered(encoder, encoder.prepare_targets, [square])
    assert text == [TARGET_PROMPT]
    assert inputs["input_ids"][0].tolist()[-6:] == [IM_START, ASSISTANT, NEWLINE, IMG, IM_END, NEWLINE]


def test_readout_tokens_start_from_im_end_without_resizing_the_vocabulary(encoder, real_backbone):
    """<|MEAN|> and <|IMG|> get ids 151669 and 151670 inside the real 151,936-row embedding (no resize), and both
    learnable vectors start as <|im_end|>'s row of the saved weights (read from model.safetensors directly).
    Catches: `self.lm.resize_token_embeddings(len(tokenizer))` after adding the tokens (151,671 rows); the vectors
    initialised from another row (`<|endoftext|>`)."""
    assert encoder.token_ids == {"query": MEAN, "target": IMG}
    assert encoder.lm.get_input_embeddings().weight.shape == (151936, 2560)
    with safe_open(os.path.join(real_backbone, "model.safetensors"), "pt") as f:
        im_end = f.get_slice("model.language_model.embed_tokens.weight")[IM_END].float()
    for vector in (encoder.query_token, encoder.target_token):
        assert torch.equal(vector.detach(), im_end)


@pytest.mark.parametrize("fill", [True, False])
def test_visual_tokens_follow_the_pixel_budget_and_the_published_resize_rule(encoder, media, fill):
    """Visual tokens at the default budget P = 224 x 224 = 50,176 pixels = 49 units of 32 x 32 (model.image_pixels),
    one token per 2 x 2 patches of 16 (per 2 frames for video).

    model.fill_pixel_budget=true (ours): each side is the floor or ceil of the exact aspect-keeping fit in units
    of 32 (h_u * w_u = 49), the candidate that keeps most resolution on its worse axis, area <= 49 units:
    - 750 x 1101 (w x h): exact 8.48 x 5.78 units; candidates 8x5, 8x6, 9x5 -> 8x6 (worse axis 0.943):
      256 x 192, 16 x 12 patches, 48 tokens.
    - 1920 x 1080: exact 5.25 x 9.33 -> 5x9: 160 x 288, 10 x 18 patches, 45 tokens.
    - 300 x 300: exact 7 x 7: 224 x 224, 14 x 14 patches, 49 tokens.
    - each of 8 frames of 640 x 360 like 1920 x 1080: 4 x 10 x 18 patches, 180 tokens.
    false (the release): Qwen2-VL's published smart_resize with factor 32 and min = max = P (video: 8 x P for the
    8 frames together): round each side to a multiple of 32; if above P, scale both by beta = sqrt(h w / P) and
    floor to multiples of 32.
    - 750 x 1101: beta = 4.057 -> h 271.4 -> 256, w 184.9 -> 160: 16 x 10 patches, 40 tokens.
    - 1920 x 1080: beta = 6.429 -> h 168.0 -> 160, w 298.7 -> 288: 10 x 18 patches, 45 tokens.
    - 300 x 300: 300/beta is 224 on paper but 223.99999999999997 in floating point, floored to 192: 12 x 12
      patches, 36 tokens.
    - 8 frames of 640 x 360: beta = sqrt(8 * 230400 / 401408) = 2.143 -> 160 x 288: 4 x 10 x 18, 180 tokens.
    Catches: the image budget not passed to the processor (the published minimum of 65,536 pixels and maximum
    of 16,777,216 apply: 1088 x 736 for the first photo); do_sample_frames=False dropped (the clip is re-sampled
    to 4 frames: grid 2 x 14 x 26); the fill switch ignored (48/49 tokens become 40/36 or the reverse)."""
    photos = [media["photos"][s] for s in [(750, 1101), (1920, 1080), (300, 300)]]
    grids, tokens = (([[1, 16, 12], [1, 10, 18], [1, 14, 14]], [48, 45, 49]) if fill else
                     ([[1, 16, 10], [1, 10, 18], [1, 12, 12]], [40, 45, 36]))
    saved, encoder.model_cfg.fill_pixel_budget = encoder.model_cfg.fill_pixel_budget, fill
    try:
        inputs = encoder.prepare_targets(photos, train=False)
        video = encoder.prepare_queries([record("Find the product in the video.", video=[media["video"]])],
                                        train=False)
    finally:
        encoder.model_cfg.fill_pixel_budget = saved
    assert inputs["image_grid_thw"].tolist() == grids
    assert (inputs["input_ids"] == IMAGE_PAD).sum(1).tolist() == tokens
    assert video["video_grid_thw"].tolist() == [[4, 10, 18]]
    assert int((video["input_ids"] == VIDEO_PAD).sum()) == 180


def test_train_step_evaluation_and_reload_end_to_end(real_backbone, mini_root, tmp_path):
    """train.py on the real layout: one step of batch 4 in chunks of 2 (gradient caching), LoRA on, calibrator on;
    the end-of-run validation ranks a small gallery; the checkpoint reloads (evaluate.load_encoder) to the same
    embeddings. Catches: load_trainable_state_dict not copying the saved tensors (the reloaded encoder keeps its
    fresh LoRA, tokens and calibrator)."""
    from evaluate import load_encoder
    from prepare_data import TrainSet
    from plumbing import load_checkpoint
    from train import train
    cfg = Config()
    cfg.data.root, cfg.data.sub_datasets = mini_root, ["7_cir_Shoes"]
    cfg.model.backbone, cfg.model.trainable = real_backbone, "lora"
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.batch_size, cfg.train.chunk_size = str(tmp_path), 1, 4, 2
    cfg.train.lr, cfg.train.val_max_queries, cfg.train.eval_batch_size = 1e-2, 4, 8
    trained, best = train(cfg)
    val = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"val"' in line]
    assert len(val) == 1 and 0.0 <= best == val[0]["val_score"] <= 100.0
    ckpt = load_checkpoint(tmp_path / "last.pt")
    lora_b = [v for k, v in ckpt["model"].items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)

    reloaded = load_encoder(cfg, ckpt["model"], "cpu")
    records = TrainSet(mini_root, "7_cir_Shoes").records[:2]
    queries, targets = [record(r["instruction_text"], r["query_image"]) for r in records], [r["target_image"][0]
                                                                                             for r in records]
    torch.testing.assert_close(reloaded.encode_queries(queries), trained.encode_queries(queries), atol=1e-5, rtol=0)
    torch.testing.assert_close(reloaded.encode_targets(targets), trained.encode_targets(targets), atol=1e-5, rtol=0)


def install_flash_attn(tmp_path, monkeypatch, init, transformers_accepts):
    """A flash_attn package on the path whose __init__ is `init`, and transformers' version check answering
    `transformers_accepts`: what auto attention meets on a GPU machine."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(init)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    from transformers.utils import import_utils
    monkeypatch.setattr(import_utils, "is_flash_attn_2_available", lambda *a, **k: transformers_accepts)


WORKING_FLASH_ATTN = "def flash_attn_varlen_func(*args, **kwargs):\n    pass\n"


BROKEN_FLASH_ATTN = {"broken": "raise ImportError('flash_attn_2_cuda.so: undefined symbol: "
                               "_ZN3c104cuda9SetDeviceEi')\n",
                     "faulting": "raise RuntimeError('CUDA error: no kernel image is available for execution on the "
                                 "device')\n"}


@pytest.mark.parametrize("build", ["broken", "faulting", "working"])
def test_auto_attention_uses_flash_attention_only_when_it_loads(tmp_path, monkeypatch, capsys, build):
    """model.attn_implementation=auto on a GPU: a flash-attn whose compiled kernels do not load (built for another
    torch: ImportError "undefined symbol"; built for another GPU architecture: a RuntimeError from CUDA while it
    imports) gives sdpa and one line saying why; one that imports gives flash_attention_2. transformers' own check
    (package metadata and version) passes in every case, as it does for a mismatched build. Catches: choosing by
    `find_spec("flash_attn")` alone (the broken build is picked and from_pretrained fails at load); the import
    guarded by `except ImportError` only (the faulting build's RuntimeError escapes attention_kernel)."""
    install_flash_attn(tmp_path, monkeypatch, BROKEN_FLASH_ATTN.get(build, WORKING_FLASH_ATTN), True)
    kernel = attention.attention_kernel(ModelConfig(attn_implementation="auto"), torch.device("cuda"))
    lines = capsys.readouterr().out.splitlines()
    if build != "working":
        assert kernel == "sdpa" and len(lines) == 1, lines
        assert ("undefined symbol" if build == "broken" else "RuntimeError: CUDA error") in lines[0], lines
    else:
        assert kernel == "flash_attention_2" and lines == []
    assert attention.attention_kernel(ModelConfig(attn_implementation="auto"), torch.device("cpu")) == "sdpa"


def test_auto_attention_gives_sdpa_in_fp32_even_where_flash_attention_loads(tmp_path, monkeypatch, capsys):
    """model.attn_implementation=auto on a GPU with model.dtype=float32 (the `--device cuda` exactness checks build
    such encoders) and a flash-attn that loads gives sdpa and one line saying why: FlashAttention's kernels are
    fp16/bf16 only, and with autocast off transformers would hand them fp32 tensors. In bf16 and in fp16 (which
    evaluates, though it does not train) the same flash-attn is used. Catches: the dtype left out of the choice
    (`half = True`: flash_attention_2 picked for fp32); fp16 left out of the half dtypes (`half = model_cfg.dtype in
    ("bfloat16",)`: sdpa for fp16, with a line saying its kernels are fp16/bf16 only)."""
    install_flash_attn(tmp_path, monkeypatch, WORKING_FLASH_ATTN, True)
    cuda = torch.device("cuda")
    assert attention.attention_kernel(ModelConfig(attn_implementation="auto", dtype="float32"), cuda) == "sdpa"
    assert capsys.readouterr().out.splitlines() == [
        "model.attn_implementation=auto: sdpa, because FlashAttention cannot be used: model.dtype=float32 (its "
        "kernels are fp16/bf16 only)"]
    for half in ("bfloat16", "float16"):
        assert attention.attention_kernel(ModelConfig(attn_implementation="auto", dtype=half), cuda) == \
            "flash_attention_2"
    assert capsys.readouterr().out == ""


def test_auto_attention_gives_sdpa_for_a_flash_attn_that_transformers_does_not_accept(tmp_path, monkeypatch, capsys):
    """model.attn_implementation=auto on a GPU with a flash-attn that imports but that transformers' own check refuses
    (is_flash_attn_2_available false: a version it does not support) gives sdpa and one line saying why, since
    from_pretrained would refuse flash_attention_2.
    Catches: transformers' check dropped from flash_attention_unavailable (`if False:`: flash_attention_2 picked)."""
    install_flash_attn(tmp_path, monkeypatch, WORKING_FLASH_ATTN, False)
    assert attention.attention_kernel(ModelConfig(attn_implementation="auto"), torch.device("cuda")) == "sdpa"
    assert capsys.readouterr().out.splitlines() == [
        "model.attn_implementation=auto: sdpa, because FlashAttention cannot be used: transformers does not support "
        "the installed flash-attn version"]


def test_auto_attention_says_flash_attn_is_not_installed_where_it_is_not(monkeypatch, capsys):
    """model.attn_implementation=auto on a GPU without the flash-attn package (most GPU machines: it is a source
    build) gives sdpa and the line naming that cause, not an import failure.
    Catches: the package check dropped (`if False:` for `find_spec(...) is None`: the line then says "importing
    flash_attn failed (ModuleNotFoundError ...)", as for a broken build)."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)      # what find_spec and import see when it is missing
    assert attention.attention_kernel(ModelConfig(attn_implementation="auto"), torch.device("cuda")) == "sdpa"
    assert capsys.readouterr().out.splitlines() == [
        "model.attn_implementation=auto: sdpa, because FlashAttention cannot be used: the flash-attn package is not "
        "installed"]


def test_tiny_backbone_with_the_real_tokenizer(tmp_path, media):
    """fake_backbones.py make-tiny --real-tokenizer: tiny widths (hidden 128) with the real tokenizer's files byte
    for byte, Qwen3-VL's template and the real 151,936 rows, so <|MEAN|>/<|IMG|> are 151669/151670 and the target
    prompt is the release's; model.train_embeddings=false freezes those rows. Catches: the vocabulary padded above the
    loaded tokenizer as for the local BPE (151,744 rows); the train_embeddings switch ignored."""
    out = tmp_path / "tiny-real-tokenizer"
    fake_backbones.make_tiny_backbone(str(out), seed=0, real_tokenizer=True)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        with open(os.path.join(fake_backbones.qwen3_tokenizer_dir(), name), "rb") as f:
            assert (out / name).read_bytes() == f.read(), name
    enc = model.FashionLensEncoder(ModelConfig(backbone=str(out), trainable="full", train_embeddings=False),
                                   CalibratorConfig(), "cpu")
    assert enc.token_ids == {"query": MEAN, "target": IMG}
    embeddings = enc.lm.get_input_embeddings().weight
    assert embeddings.shape == (151936, 128) and not embeddings.requires_grad
    text, _ = rendered(enc, enc.prepare_targets, [media["photos"][300, 300]])
    assert text == [TARGET_PROMPT]
