"""One config object for the whole pipeline, saved inside every checkpoint.

Defaults are FashionLens' own choices (paper sections IV-B to IV-E; docs/method.md). Every place where we
deliberately differ from the authors' release is a field whose docstring says "release: ..."; configs/release.yaml
sets all of them back.
A config is YAML (nested by section) plus `section.key=value` overrides; unknown keys, values of another type and
words outside a key's CHOICES are errors.
"""
import dataclasses
import math
import os
from dataclasses import dataclass, field

import yaml

from plumbing import read_yaml


@dataclass
class DataConfig:
    root: str = "data/ufire-mini"            # U-FIRE root: 0_triplet_files/, <Dataset>_images/, ...
    gallery_dir: str = ""                    # test candidate files; "" means <root>/0_test_candidates
    sub_datasets: list = field(default_factory=list)   # keys like "7_cir_Shoes"; empty = all 18
    max_query_images: int = 5                # ClothesV1 / QMUL-Shoe-V2: up to 5 sketches drawn at random
    max_bad_records: int = 20                # unreadable records are skipped and reported; more stop training
    prepare_workers: int = 0                 # threads preparing a step's chunks (decoding, processor) while the
                                             #   model runs, and the next step's during this one's loss, replay and
                                             #   optimizer step (loader.StepPrefetch); 0 = serial, in the training
                                             #   thread. Speed only: the same inputs and gradients for every value
                                             #   (release: 0)
    # Street+Modification Text 2 Shop's bare names "<category>+<id>.jpg" are DeepFashion2 train-split images: where
    # they are, relative to root ({id}: the name less "<category>+"). Default: U-FIRE's flattened DeepFashion2 names
    # (train/image/000003.jpg -> DeepFashion2_images/train+image+000003.jpg); raw DeepFashion2: ".../train/image/{id}".
    street2shop_images: str = "DeepFashion2_images/train+image+{id}"


@dataclass
class ModelConfig:
    kind: str = "qwen3vl"                    # "qwen3vl" (FashionLens) or "openclip" (dual-encoder baseline)
    backbone: str = "runs/tiny-qwen3vl"      # local directory (Qwen3-VL) or open_clip "NAME:WEIGHTS_FILE"
    trainable: str = "lora"                  # "lora" (real backbone), "full" (tiny random backbone), "none"
    train_embeddings: bool = True            # trainable=full: the token embeddings too (false: frozen; with the
                                             #   real vocabulary, the tiny backbone's 151,936 rows double a CPU step)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    keep_rope_positions: bool = True         # release: False (inputs_embeds only; 3-D rotary positions lost)
    normed_readout: bool = True              # release: False (pre-norm state via LM head + cache + all states)
    fp32_trainable: bool = True              # release: False (calibrator and token vectors in bf16; LoRA fp32 in both)
    dtype: str = "bfloat16"                  # compute dtype on GPU (CPU always computes in fp32); float16 does not
                                             #   train (no loss scaling: train.py refuses it)
    image_pixels: int = 224 * 224            # pixel budget per image (and per video frame), training and evaluation
    eval_image_pixels: int = 0               # 0 = image_pixels; release: 256 * 256 (evaluation keeps each image
                                             #   near its own size, between image_pixels and this; not below it)
    fill_pixel_budget: bool = True           # release: False (Qwen2-VL's smart_resize: up to ~27% of it unused)
    video_frames: int = 8
    gradient_checkpointing: bool = False
    reuse_vision_features: bool = True       # release: False (a frozen vision tower runs again in the gradient-cache
                                             #   replay; true: pass 1's output is reused, same numbers)
    attn_implementation: str = "auto"        # "auto": flash_attention_2 on GPU in bf16/fp16 when flash-attn loads,
                                             #   else sdpa
    vision_attention: str = "auto"           # "packed": the vision tower attends within every image of a chunk in one
                                             #   varlen kernel call per block; "transformers": as transformers runs it
                                             #   (flash-attn's varlen if used, else one sdpa call per image and block);
                                             #   "auto": packed on GPU unless flash-attn is used, transformers on CPU.
                                             #   release: "transformers". Speed only: the same numbers

@dataclass
class CalibratorConfig:
    mode: str = "slerp"                      # "slerp" | "lerp" | "none"   (paper section IV-C)
    gate: str = "learned"                    # "learned" | "fixed"
    fixed_gate: float = 0.5                  # lambda when gate == "fixed"
    hidden: int = 512
    rank: int = 32
    gate_bias_init: float = -3.0
    init_std: float = 1e-6
    fro_weight: float = 1e-4
    orth_weight: float = 1e-2
    reg_per_chunk: bool = False              # release: True (regularisers summed per gradient-cache chunk)


@dataclass
class SamplerConfig:
    mode: str = "ggas"                       # "ggas" | "uniform" | "size" | "size_pow"  (paper section IV-D)
    alpha: float = 0.9                       # EMA of the difficulty
    gamma: float = 0.5                       # data-scale prior exponent
    eta: float = 1.0                         # temperature
    floor: float = 0.02
    guaranteed_floor: bool = True            # release: False (floor, renormalise; the floor may not hold)
    warmup_epochs: int = 1                   # uniform over sub-datasets first
    warmup_all_modes: bool = False           # the warm-up also for uniform/size/size_pow (false: GGAS only)
    update_every: int = 50                   # recompute P every N steps; release: 0 (= once per epoch)
    difficulty: str = "joint"                # "joint" (one norm of both tokens, release) | "sum" (two norms)


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    seed: int = 0
    batch_size: int = 64                     # per GPU / process
    chunk_size: int = 16                     # gradient-cache chunk, default for every sub-dataset
    chunk_sizes: dict = field(default_factory=dict)   # per sub-dataset override, e.g. {"6_video2img_MovingFashion": 4}
    chunk_table: str = ""                    # on a GPU, per sub-dataset chunks by its memory (configs/chunk_sizes.yaml,
                                             #   relative to the repository; benchmarks/chunk_memory.py); chunk_sizes
                                             #   entries win. Speed only while calibrator.reg_per_chunk is false
                                             #   (release: "", hand-set chunk_sizes)
    epochs: float = 5.0
    max_steps: int = 0                       # > 0 stops earlier (quick runs, tests)
    lr: float = 1e-4
    weight_decay: float = 1e-3
    schedule: str = "constant"               # "constant" (release) | "cosine"
    warmup_steps: int = 0                    # linear warm-up of the learning rate (release: 0)
    grad_clip: float = 0.0                   # 0 = off (release)
    temperature: float = 0.07
    gather_negatives: bool = False           # negatives from every GPU
    asfr_hard_negatives: int = 0             # extra targets per asfr query from its negative_image list
    val_every: int = 0                       # 0 = only at the end
    val_max_queries: int = 0                 # cap queries per sub-dataset during periodic validation; 0 = all
    log_every: int = 10
    save_every: int = 100                    # write last.pt every N steps (and at the end, and at each new best)
    eval_batch_size: int = 32
    dist_timeout_s: int = 1800               # a collective waiting longer (a dead or stuck rank) fails the job


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    calibrator: CalibratorConfig = field(default_factory=CalibratorConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        cfg = cls()
        for section, values in check_sections(d or {}, "config").items():
            if section not in SECTIONS:
                raise KeyError(f"unknown config section {section!r}; known: {sorted(SECTIONS)}")
            for key, value in (values or {}).items():
                _set(cfg, section, key, value)
        return cfg


SECTIONS = {f.name for f in dataclasses.fields(Config)}

# Keys that take one of a few words, checked where a config is read: a misspelt value is one line naming the key
# before anything loads, not a traceback from deep in a run (model.dtype is not even read on a CPU, so "bf16" passed
# every CPU check and failed on the GPU). model.attn_implementation is transformers' to check.
CHOICES = {("model", "kind"): ("qwen3vl", "openclip"), ("model", "trainable"): ("lora", "full", "none"),
           ("model", "dtype"): ("bfloat16", "float32", "float16"),
           ("model", "vision_attention"): ("auto", "packed", "transformers"),
           ("calibrator", "mode"): ("slerp", "lerp", "none"), ("calibrator", "gate"): ("learned", "fixed"),
           ("sampler", "mode"): ("ggas", "uniform", "size", "size_pow"), ("sampler", "difficulty"): ("joint", "sum"),
           ("train", "schedule"): ("constant", "cosine")}


def check_sections(d, where):
    """A config is a mapping of sections, each a mapping of keys (or empty): YAML written as a list says nothing
    until a `.items()` fails far from the file."""
    if not isinstance(d, dict):
        raise TypeError(f"{where}: a config is a mapping of sections ({', '.join(sorted(SECTIONS))}), "
                        f"got a {type(d).__name__}")
    for section, values in d.items():
        if values is not None and not isinstance(values, dict):
            raise TypeError(f"{where}: config section {section!r} must be a mapping of keys, got a "
                            f"{type(values).__name__}")
    return d


def _set(cfg, section, key, value):
    sub = getattr(cfg, section)
    names = {f.name: f for f in dataclasses.fields(sub)}
    if key not in names:
        raise KeyError(f"unknown config key {section}.{key}; known: {sorted(names)}")
    default = getattr(sub, key)
    # Values from YAML or the command line are coerced to the field's type so "lr=1e-3" is a float.
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = yaml.safe_load(value)      # "1e-3" -> 1e-3, "true" -> True, "[a, b]" -> list
        except yaml.YAMLError:                 # its message names "<unicode string>", not the key
            raise TypeError(f"config {section}.{key} must be {type(default).__name__}, got {value!r} "
                            f"(not valid YAML)") from None
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            value = float(value)               # YAML reads "1e-4" as a string and "1" as an int
        except ValueError:                     # float's own message ("could not convert ...") names no key
            raise TypeError(f"config {section}.{key} must be float, got {value!r}") from None
    if type(value) is not type(default):
        raise TypeError(f"config {section}.{key} must be {type(default).__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):   # "nan", ".inf" parse; no setting means them
        raise ValueError(f"config {section}.{key} must be a finite number, got {value!r}")
    check_choice(section, key, value)
    setattr(sub, key, value)


def check_choice(section, key, value):
    """A key of CHOICES holds one of its words. Called where a config is read (_set) and again where a setting is
    used, for configs built in Python, which skip _set."""
    if value not in CHOICES.get((section, key), (value,)):
        raise ValueError(f"config {section}.{key} must be one of {', '.join(CHOICES[section, key])}, got {value!r}")


def load_config(path=None, overrides=()):
    """YAML file (may `inherit: other.yaml`, relative to itself) plus `section.key=value` overrides. Malformed YAML
    is a plumbing.DataError naming the file and line; a wrong key or value a KeyError, TypeError or ValueError."""
    raw = {}
    if path:
        raw = read_yaml(path) or {}
        parent = raw.pop("inherit", None) if isinstance(raw, dict) else None
        check_sections(raw, path)
        if parent:
            base = load_config(os.path.join(os.path.dirname(path), parent)).to_dict()
            for section, values in raw.items():
                base.setdefault(section, {}).update(values or {})
            raw = base
    cfg = Config.from_dict(raw)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise KeyError(f"unknown config section {section!r} in override {item!r}")
        _set(cfg, section, key, value)
    return cfg
