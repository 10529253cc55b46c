"""The open_clip dual-encoder baseline (paper section V; docs/method.md#embedding): UniIR score fusion behind the
interface of model.py's Encoder, so train.py and evaluate.py run it unchanged (model.kind=openclip)."""
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from calibrator import QueryCalibrator
from media import load_image, load_video
from model import Encoder, instruction_text, resolve_device
from plumbing import SettingError


def tokenizer_markers(tokenizer):
    """The markers of an open_clip tokenizer (CLIP's own, or its wrapper of a transformers tokenizer). Written in a
    query's text they would be read as markers: CLIP pools the text at the first <end_of_text>, so the words after it
    would be dropped, silently; instruction_text refuses them."""
    wrapped = getattr(tokenizer, "tokenizer", None)
    if wrapped is not None:
        return list(wrapped.all_special_tokens)
    return [tokenizer.decoder[i] for i in tokenizer.all_special_ids]


class OpenClipEncoder(Encoder):
    """CLIP dual encoder with UniIR score fusion (the baseline): a query is the normalised sum of its text
    embedding and its image embedding, several query images (or a video's frames) averaged first. Targets are
    image embeddings. model.backbone = "NAME[:WEIGHTS]": an open_clip model name or the path of a JSON model
    config, and optionally a local weights file (none: random weights). All weights train (trainable "full");
    the input size is the model's own, so `train` does not change the pixel budget."""

    def __init__(self, model_cfg, calib_cfg, device=None):
        super().__init__()
        import open_clip  # imported here: it pulls in timm (seconds of start-up) that the Qwen3-VL path never needs
        if model_cfg.trainable != "full":
            raise SettingError(f"the open_clip baseline trains all its weights: set model.trainable=full "
                               f"(got {model_cfg.trainable!r})")
        self.model_cfg, self.calibrator_cfg = model_cfg, calib_cfg
        name, _, weights = model_cfg.backbone.partition(":")
        if name.endswith(".json"):
            open_clip.add_model_config(name)
            name = Path(name).stem
        self.clip, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=weights or None)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.special_tokens = tokenizer_markers(self.tokenizer)
        self.embed_dim = self.clip.text_projection.shape[1]
        self.calibrator = QueryCalibrator(self.embed_dim, calib_cfg)
        self.to(resolve_device(device))

    def prepare_queries(self, queries, train):
        pixels, owner = [], []
        for i, query in enumerate(queries):
            images = [load_image(p, query["id"]) for p in query["query_image"]]
            for path in query["query_video"]:
                images += [Image.fromarray(f) for f in load_video(path, self.model_cfg.video_frames, query["id"])[0]]
            pixels += [self.preprocess(image) for image in images]
            owner += [i] * len(images)
        return {"text": self.tokenizer([instruction_text(q, self.special_tokens) for q in queries]),
                "pixels": torch.stack(pixels) if pixels else torch.zeros(0),
                "owner": torch.tensor(owner, dtype=torch.long)}

    def prepare_targets(self, paths, train):
        return {"pixels": torch.stack([self.preprocess(load_image(p)) for p in paths])}

    def forward(self, inputs, role, vision=None):
        """`vision` is part of the interface only: both towers train, so there is never an output to reuse."""
        if role not in ("query", "target"):
            raise ValueError(f"role must be 'query' or 'target', got {role!r}")
        inputs = self.to_device(inputs)
        with self.autocast():
            if role == "target":
                images = F.normalize(self.clip.encode_image(inputs["pixels"]).float(), dim=-1)
                return {"emb": images, "gate": None, "reg_fro": None, "reg_orth": None, "vision": None}
            fused = F.normalize(self.clip.encode_text(inputs["text"]).float(), dim=-1)
            if inputs["pixels"].shape[0]:
                images = F.normalize(self.clip.encode_image(inputs["pixels"]).float(), dim=-1)
                # Mean image embedding per query; rows of queries without images stay 0 (text alone).
                mean = torch.zeros_like(fused).index_add_(0, inputs["owner"], images)
                fused = fused + F.normalize(mean, dim=-1)
        emb, gate, fro, orth = self.calibrator(fused)
        return {"emb": emb, "gate": gate, "reg_fro": fro, "reg_orth": orth, "vision": None}

    def token_grad_norms(self):
        """Stand-in for the learnable-token gradient (GGAS difficulty, paper section IV-D), which CLIP does not
        have: the gradients of the two final projections (image and text), (joint norm, sum of norms)."""
        projections = (self.clip.visual.proj, self.clip.text_projection)
        norms = [p.grad.float().norm() if p.grad is not None else torch.zeros((), device=p.device)
                 for p in projections]
        return float(torch.stack(norms).norm()), float(norms[0] + norms[1])
