"""`python model.py export CKPT OUT_DIR`: a FashionLens checkpoint as a standard Hugging Face directory that plain
transformers loads, plus fashionlens_embed.py (export/, copied in) that turns it into the training encoder's
embeddings, the calibrator's weights and a model card (export/model_card.md filled in)."""
import argparse
import json
import math
import os
import shutil
import string
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import QUERY_SUFFIX, QUERY_TOKEN, SYSTEM_PROMPT, TARGET_SUFFIX, TARGET_TOKEN, conversation, tensors_identity
from plumbing import load_checkpoint, publish_dir, staging_dir

EXPORT_FILES = Path(__file__).resolve().parent / "export"   # the standalone embedding code and the card template
# Example media per task family for the card's prompts (the instructions come from ufire_mini.REQUESTS).
FAMILY_MEDIA = {"t2i": [], "sketch2i": ["image"], "inshop": ["image"], "street2shop": ["image"],
                "compatibility": ["image", "image"], "video2img": ["video"], "cir": ["image"],
                "sketch&text": ["image"], "asfr": ["image"]}


def export(encoder, out_dir, dtype="float32", source="", numbers=""):
    """Write out_dir (atomically): a standard Qwen3-VL directory that plain transformers loads and that
    fashionlens_embed.py (copied in) turns into this encoder's embeddings: LoRA merged in fp32, the learnt
    <|MEAN|>/<|IMG|> vectors written into their own vocabulary rows (the plain input_ids forward then reads them
    where training spliced them in), the calibrator's weights, fashionlens.json and a model card. Returns the
    measured effect of the saved dtype on the merged weights (a sentence)."""
    cfg = encoder.model_cfg
    if cfg.kind != "qwen3vl":   # not isinstance: `python model.py` builds encoders from the module evaluate imports
        raise ValueError(f"export: only the Qwen3-VL encoder exports (model.kind={cfg.kind!r})")
    # The plain forward computes Qwen3-VL's rotary positions and its normed last state itself, and the standalone
    # code sizes media by fill_size: the release switches would need code there that nothing else uses.
    for switch in ("keep_rope_positions", "normed_readout", "fill_pixel_budget"):
        if not getattr(cfg, switch):
            raise ValueError(f"export: model.{switch}=false (the release's behaviour) is not supported by the export")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"export: dtype must be float32 or bfloat16, got {dtype!r}")
    state, merged = encoder.merged_state_dict()
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight") and "language_model" in k)
    vocab = state[embed_key].float().clone()   # a copy: the state's tensors are the encoder's own
    vocab[encoder.token_ids["query"]] = encoder.query_token.detach().float().cpu()
    vocab[encoder.token_ids["target"]] = encoder.target_token.detach().float().cpu()
    state[embed_key] = vocab
    if encoder.lm.config.tie_word_embeddings:  # the LM head is the same matrix: saved once, as transformers does
        state.pop("lm_head.weight", None)
    target = getattr(torch, dtype)
    effect = dtype_effect(encoder, state, merged, target)
    state = {k: v.detach().cpu().to(target) if v.is_floating_point() else v.cpu() for k, v in state.items()}
    settings = {"system_prompt": SYSTEM_PROMPT, "query_suffix": QUERY_SUFFIX, "target_suffix": TARGET_SUFFIX,
                "query_token": QUERY_TOKEN, "target_token": TARGET_TOKEN, "image_pixels": cfg.image_pixels,
                "eval_image_pixels": cfg.eval_image_pixels, "video_frames": cfg.video_frames,
                "calibrator": {k: getattr(encoder.calibrator_cfg, k) for k in ("mode", "gate", "fixed_gate", "rank")}}
    calibrator = {k: v.detach().cpu().contiguous() for k, v in encoder.calibrator.state_dict().items()}
    with staging_dir(out_dir) as tmp:
        encoder.lm.save_pretrained(tmp, state_dict=state)
        # save_pretrained writes the in-memory model's dtype (fp32) into config.json, whatever state_dict holds;
        # the saved weights' dtype is what from_pretrained(dtype="auto") must load.
        set_config_dtype(os.path.join(tmp, "config.json"), dtype)
        encoder.processor.save_pretrained(tmp)
        if calibrator:
            save_file(calibrator, os.path.join(tmp, "calibrator.safetensors"))
        with open(os.path.join(tmp, "fashionlens.json"), "w") as f:
            json.dump(settings, f, indent=1)
        shutil.copy(EXPORT_FILES / "fashionlens_embed.py", tmp)
        card = model_card(encoder, source, dtype, effect, numbers)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
        publish_dir(tmp, out_dir)
    return effect


def set_config_dtype(path, dtype):
    """config.json's "dtype", top level and in every sub-config (text, vision), set to `dtype`."""
    with open(path) as f:
        config = json.load(f)
    for section in [config] + [v for v in config.values() if isinstance(v, dict) and "dtype" in v]:
        section["dtype"] = dtype
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def dtype_effect(encoder, state, merged, dtype):
    """The saved dtype's effect on the merged weights: the rounding error of base + delta, relative to the LoRA
    delta it would blur (root of the summed squares over all merged layers)."""
    if not merged:      # full training: no LoRA delta to measure the rounding against
        return ("fp32 keeps the weights exactly" if dtype == torch.float32 else
                "bf16 rounds every weight (full training: no LoRA delta to measure it against)")
    if dtype == torch.float32:
        return "fp32 keeps the merged weights exactly"
    error = delta = 0.0
    for name in merged:
        weight = state[f"{name}.weight"]
        error += float((weight.to(dtype).float() - weight).square().sum())
        with torch.no_grad():
            delta += float(encoder.lm.get_submodule(name).get_delta_weight("default").float().square().sum())
    return (f"bf16 rounding of the merged weights is {100 * math.sqrt(error / max(delta, 1e-30)):.1f}% of the "
            f"LoRA delta's norm (fp32 keeps it exactly)")


def model_card(encoder, source, dtype, effect, numbers):
    """README.md of an export: export/model_card.md filled in; the prompts rendered by the processor's template."""
    from ufire_mini import REQUESTS   # the instruction templates, only for the card's examples
    rows = []
    for family, media in FAMILY_MEDIA.items():
        instruction = f"find {REQUESTS[family]}"
        user = [{"type": "text", "text": instruction}] + [{"type": m} for m in media]
        user.append({"type": "text", "text": QUERY_SUFFIX})
        rows.append((f"query, {family}", conversation(user, QUERY_TOKEN)))
    gallery = [{"type": "image"}, {"type": "text", "text": TARGET_SUFFIX}]
    rows.append(("gallery image (every task)", conversation(gallery, TARGET_TOKEN)))
    prompts = "".join(f"{what}:\n\n```\n{encoder.processor.apply_chat_template([c], tokenize=False)[0]}```\n\n"
                      for what, c in rows)
    cal = encoder.calibrator_cfg
    template = string.Template((EXPORT_FILES / "model_card.md").read_text())
    return template.substitute(
        source=source or "a FashionLens encoder", query_id=encoder.token_ids["query"],
        target_id=encoder.token_ids["target"], dtype=dtype, dtype_effect=effect[0].upper() + effect[1:] + ".",
        calibrator=f"mode {cal.mode}, gate {cal.gate}, rank {cal.rank}" if cal.mode != "none" else "mode none: "
        "the query is only normalised", pixels=encoder.model_cfg.eval_image_pixels or encoder.model_cfg.image_pixels,
        frames=encoder.model_cfg.video_frames, prompts=prompts, numbers=numbers or "None given at export.")


def card_numbers(ckpt_path, results_path=None, state=None):
    """The card's numbers: evaluate.py's results.json (--results) as its table, else the model-selection score
    that train.py stores in the checkpoint. A results.json of other weights than the checkpoint's trainable `state`
    (another checkpoint, the untrained floor, a baseline) is refused: the card would state another model's numbers.
    One written before results recorded model_identity must name this checkpoint's path."""
    import evaluate   # here, not at the top: evaluate imports this module
    if results_path:
        try:
            with open(results_path) as f:
                results = json.load(f)
            title = f"U-FIRE {results.get('split', '?')} split of {results.get('root', '?')}"
            table = evaluate.format_table(results, title)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{results_path}: not a results.json written by evaluate.py ({err!r})") from err
        if "model_identity" in results:
            same_model = results["model_identity"] == tensors_identity(state)
        else:   # written before evaluate.py recorded it: the checkpoint's path must match
            same_model = os.path.realpath(str(results.get("model"))) == os.path.realpath(ckpt_path)
        if not same_model:
            raise ValueError(f"{results_path}: the numbers of {results.get('model')!r}, not of {ckpt_path} (other "
                             f"trained weights); run evaluate.py on {ckpt_path} and pass its results.json")
        return f"From `{os.path.basename(results_path)}` (evaluate.py):\n\n" + table
    saved = load_checkpoint(ckpt_path, mmap=True)     # its score and step: read_checkpoint has read the weights
    if saved.get("best_score", -1) < 0:
        return "The checkpoint holds no validation score; export with `--results results.json` from evaluate.py."
    reached = f" (reached at step {saved['best_step']})" if saved.get("best_step") is not None else ""
    return (f"Best validation score of the run up to step {saved.get('step', '?')}: **{saved['best_score']:.2f}**"
            f"{reached}, the sum of Recall@1 (%) over the trained sub-datasets of the val split of "
            f"`{saved['config']['data']['root']}` (train.py's model selection; it is this checkpoint's own score when "
            f"the file is best.pt). For the full table, run evaluate.py on the checkpoint and export with `--results`.")


def main(argv=None):
    parser = argparse.ArgumentParser(description="FashionLens encoders; `export` writes a plain transformers "
                                                 "directory with a model card (README.md in OUT_DIR).")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("export", help="CKPT (train.py) -> OUT_DIR (Hugging Face layout)")
    cmd.add_argument("ckpt")
    cmd.add_argument("out_dir")
    cmd.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                     help="saved weights (default fp32: bf16 rounding blurs the merged LoRA delta; the effect on "
                          "this checkpoint is printed and written in the card)")
    cmd.add_argument("--results", help="evaluate.py's results.json for the card's numbers")
    cmd.add_argument("--backbone", help="backbone directory (default: the checkpoint's model.backbone)")
    args = parser.parse_args(argv)
    # evaluate.py imports this module, so it is imported here, at run time, not at the top.
    from evaluate import EvaluationError, load_encoder, read_checkpoint, resolve_backbone
    try:
        cfg, state, trained_on = read_checkpoint(args.ckpt)
        cfg.model.backbone = resolve_backbone(cfg.model, args.backbone, args.ckpt)
        encoder = load_encoder(cfg, state, "cpu", source=args.ckpt, trained_on=trained_on)
        numbers = card_numbers(args.ckpt, args.results, state)
        effect = export(encoder, args.out_dir, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype],
                        source=os.path.basename(args.ckpt), numbers=numbers)
    except (EvaluationError, OSError, ValueError) as error:
        sys.exit(f"model.py export: {error}")
    print(f"wrote {args.out_dir} ({args.dtype}: {effect})")


if __name__ == "__main__":
    main()
