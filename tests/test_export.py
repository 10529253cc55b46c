"""`python model.py export`: the exported directory, loaded with plain transformers and its own fashionlens_embed.py
(not this repository), gives the training encoder's embeddings for every query kind and for gallery images; it
loads without warnings; its calibrator equals calibrator.py's; its model card's snippet runs as written."""
import contextlib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

import hf_export
import model
from calibrator import QueryCalibrator
from config import CalibratorConfig, Config
from test_model import (PIXELS, build, check_clip_rate_and_its_fallback, write_audio_only, write_mp4, write_png,
                        write_undecodable_video)


def perturbed(encoder):
    """Every trained part moved far enough that leaving it out shows: LoRA factors (B A no longer 0), the two
    readout vectors (no longer <|im_end|>'s row), the calibrator (A, B no longer ~0, gate 0.5 instead of 0.05)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
        encoder.query_token.normal_(0, 1)
        encoder.target_token.normal_(0, 1)
        encoder.calibrator.hyper[-1].weight.normal_(0, 0.05)
        encoder.calibrator.hyper[-1].bias.zero_()
    return encoder.eval()


@pytest.fixture(scope="module")
def trained(tiny_backbone):
    return perturbed(build(tiny_backbone, trainable="lora", lora_dropout=0.0))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("export-media")
    sizes = [(120, 90), (64, 160), (200, 200)]
    images = [write_png(d / f"img{i}.png", size, i) for i, size in enumerate(sizes)]
    with Image.open(images[-1]) as image:   # a cut-out: transparent around the middle, black underneath
        cut_out = np.zeros((200, 200), dtype=np.uint8)
        cut_out[50:150, 40:160] = 255
        Image.fromarray(np.dstack([np.asarray(image) * (cut_out[..., None] > 0), cut_out])).save(d / "cut-out.png")
    return {"images": images + [str(d / "cut-out.png")], "video": write_mp4(d / "clip.mp4", 12, 0)}


def load_standalone(out_dir):
    """fashionlens_embed.py from the export, as its own module (not the repository's export/ copy)."""
    spec = importlib.util.spec_from_file_location(f"fashionlens_embed_{abs(hash(out_dir))}",
                                                  os.path.join(out_dir, "fashionlens_embed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain(out_dir, dtype=torch.float32):
    """The export loaded with plain transformers: (model, processor, head, the standalone module)."""
    fl = load_standalone(out_dir)
    lm = Qwen3VLForConditionalGeneration.from_pretrained(out_dir, dtype=dtype).eval()
    return lm, AutoProcessor.from_pretrained(out_dir), fl.load_head(out_dir), fl


def cosines(trained, media, out_dir, dtype=torch.float32):
    """Per-item cosine(export, training encoder): a text, an image, an image+text (two images), a video query,
    then the gallery images."""
    imgs = media["images"]
    queries = [{"id": kind, "instruction_text": text, "query_image": images, "query_video": videos}
               for kind, text, images, videos in [("text", "Find a red silk dress.", [], []),
                                                  ("image", "", imgs[:1], []),
                                                  ("image+text", "Make it blue.", imgs[1:], []),
                                                  ("video", "Find the item.", [], [media["video"]])]]
    lm, processor, head, fl = plain(out_dir, dtype)
    records = [{"text": q["instruction_text"], "images": q["query_image"], "videos": q["query_video"]}
               for q in queries]
    ours = fl.embed_queries(lm, processor, head, records)
    gallery = fl.embed_images(lm, processor, head, imgs, batch_size=2)
    return torch.cat([F.cosine_similarity(ours, trained.encode_queries(queries)),
                      F.cosine_similarity(gallery, trained.encode_targets(imgs))])


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "fashionlens")
    hf_export.export(trained, out, source="test")
    return out


def test_export_gives_the_training_embeddings(trained, media, exported):
    """Text, image, image+text and video queries and gallery images (one with a transparent background): cosine >=
    0.9999 with the training encoder.
    Catches (each seen to fail): the LoRA merge skipped (`base.float() + delta` -> `base.float()`); the token rows
    not written (the plain forward reads the backbone's untouched <|MEAN|>/<|IMG|> rows); the calibrator not
    applied (embed_queries returning F.normalize of the readout); the readout one position late (`argmax(1) + 1`,
    the <|im_end|> after the token); fashionlens_embed.read_image dropping the alpha channel (`convert("RGB")`)."""
    cos = cosines(trained, media, exported)
    assert cos.min() >= 0.9999, cos.tolist()


def test_export_loads_without_warnings_and_keeps_the_vocabulary(trained, exported, capfd):
    """No missing, unexpected or mismatched weights (transformers' "newly initialized" / "not used" report), the
    config's vocabulary is the saved matrix's and the encoder's, the head is tied, the tokens are real tokenizer
    entries at the encoder's ids. Catches: LoRA factors left in the saved state (`return state` without dropping
    "lora_" keys), the tied head saved as its own copy of the matrix (`state.pop("lm_head.weight")` left out:
    loaded untied)."""
    capfd.readouterr()
    lm, info = Qwen3VLForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    err = capfd.readouterr().err
    for phrase in ("newly initialized", "not used", "UNEXPECTED", "MISSING", "MISMATCH"):
        assert phrase not in err, err
    rows = trained.lm.get_input_embeddings().weight.shape[0]
    assert lm.config.text_config.vocab_size == lm.get_input_embeddings().weight.shape[0] == rows
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    with safe_open(os.path.join(exported, "model.safetensors"), "pt") as f:
        assert not any("lora_" in k or k.startswith("lm_head") for k in f.keys())
    tokenizer = AutoProcessor.from_pretrained(exported).tokenizer
    assert tokenizer.convert_tokens_to_ids([model.QUERY_TOKEN, model.TARGET_TOKEN]) == [
        trained.token_ids["query"], trained.token_ids["target"]]
    assert torch.equal(lm.get_input_embeddings().weight[trained.token_ids["query"]], trained.query_token)


def test_export_leaves_the_encoders_embedding_table_as_the_backbone_file_holds_it(trained, exported, tiny_backbone):
    """export writes the learnt <|MEAN|>/<|IMG|> vectors into the saved vocabulary, a copy: after exporting, the
    encoder's own (frozen, fp32 on a CPU: no dtype cast copies it) embedding table still equals the backbone file's.
    Catches: the vocabulary not copied (`.float().clone()` -> `.float()`: the export rewrites the encoder's rows)."""
    with safe_open(os.path.join(tiny_backbone, "model.safetensors"), "pt") as f:
        table = f.get_tensor("model.language_model.embed_tokens.weight")
    assert torch.equal(trained.lm.get_input_embeddings().weight.detach(), table)


def test_an_fp32_exports_card_says_its_merged_weights_are_kept_exactly(exported):
    """export measures the effect of the dtype it saves: the card of an fp32 export (of merged LoRA layers) says they
    are kept exactly and gives no bf16 figure.
    Catches: the bf16 effect measured whatever the dtype (`dtype_effect(encoder, state, merged, torch.bfloat16)`)."""
    with open(os.path.join(exported, "README.md")) as f:
        card = f.read()
    assert "weights saved in **float32**. Fp32 keeps the merged weights exactly." in card
    assert "bf16 rounding" not in card


@pytest.mark.parametrize("mode,gate", [("slerp", "learned"), ("lerp", "learned"), ("slerp", "fixed"),
                                       ("none", "learned")])
def test_standalone_calibrator_equals_calibrator_py(exported, mode, gate):
    """fashionlens_embed.calibrate against calibrator.QueryCalibrator, per variant, on random readouts and on
    readouts whose proposal is parallel to them (A, B = 0: the slerp fallback), with fp32 weights and with bf16 ones
    (model.fp32_trainable=false: the hypernetwork then runs in bf16 on the fp32 readouts). In the random case every
    weight is random, the LayerNorm's too (its initial weight 1 and bias 0 would hide it being left out).
    Catches: the parallel fallback dropped (`torch.where(parallel, linear, spherical)` -> `spherical`: NaN), lerp
    computed as slerp, the fixed gate read from the gate logit; the LayerNorm's weight or bias left out; the readout
    cast to fp32 instead of the weights' dtype (`h.float()`: bf16 weights fail on fp32 readouts)."""
    fl = load_standalone(exported)
    torch.manual_seed(0)
    cfg = CalibratorConfig(mode=mode, gate=gate, fixed_gate=0.3, hidden=16, rank=4)
    settings = {"calibrator": {"mode": mode, "gate": gate, "fixed_gate": 0.3, "rank": 4}}
    h = 3 * torch.randn(6, 32)
    for dtype in (torch.float32, torch.bfloat16):
        for scale in (0.3, 0.0):   # random weights; then a zero last layer: A = B = 0, p = q (the parallel fallback)
            reference = QueryCalibrator(32, cfg)
            with torch.no_grad():
                for p in reference.parameters() if scale else []:
                    p.normal_(0, scale)
                if mode != "none" and not scale:
                    reference.hyper[-1].weight.zero_()
            reference.to(dtype)
            head = {"settings": settings, "calibrator": reference.state_dict()}
            with torch.no_grad():
                ours, expected = fl.calibrate(h, head), reference(h)[0]
            assert torch.isfinite(ours).all() and torch.allclose(ours, expected, atol=1e-6), (dtype, scale,
                                                                                              ours - expected)
            if not scale:
                assert torch.allclose(ours, F.normalize(h, dim=-1), atol=1e-6)


def test_cli_export_of_a_checkpoint_and_its_model_card_snippet(trained, media, tmp_path):
    """`python model.py export CKPT OUT_DIR --dtype bf16` on a train.py-style checkpoint: bf16 weights, the measured
    effect and the checkpoint's score in the card, and the card's snippet, run as written (first line: the file
    names) in a fresh Python where this repository is not importable, gives the training embeddings (cosine >=
    0.9999 with the bf16 weights read into fp32). Catches: --dtype ignored (weights saved fp32), the checkpoint's
    best_score left out of the card, fashionlens_embed.py importing the repository (`from media import ...`),
    the card's `dtype=torch.float32` dropped (the model then runs in bf16, still within the cosine bound)."""
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.lora_dropout = trained.model_cfg.backbone, "lora", 0.0
    cfg.model.image_pixels = PIXELS
    ckpt, out = tmp_path / "best.pt", tmp_path / "export"
    torch.save({"config": cfg.to_dict(), "model": trained.trainable_state_dict(), "step": 7, "best_score": 123.4567},
               ckpt)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "model.py", "export", str(ckpt), str(out), "--dtype", "bf16"], cwd=repo,
                   check=True, capture_output=True)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    card = (out / "README.md").read_text()
    assert "**bfloat16**" in card and "LoRA delta's norm" in card and "123.46" in card and "step 7" in card
    assert card.count("<|MEAN|><|im_end|>") == len(hf_export.FAMILY_MEDIA) and "<|IMG|><|im_end|>" in card

    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    work = tmp_path / "user"
    work.mkdir()
    for name, source in (("query.jpg", media["images"][0]), ("a.jpg", media["images"][1]),
                         ("b.jpg", media["images"][2]), ("query.mp4", media["video"])):
        shutil.copy(source, work / name)
    first, rest = snippet.split("\n", 1)
    assert first.startswith("EXPORT_DIR, QUERY_IMAGE, QUERY_VIDEO, GALLERY = ")
    script = (f"EXPORT_DIR, QUERY_IMAGE, QUERY_VIDEO, GALLERY = {str(out)!r}, 'query.jpg', 'query.mp4', "
              f"['a.jpg', 'b.jpg']\n{rest}"
              "torch.save({'queries': queries, 'gallery': gallery, 'dtype': str(model.dtype)}, 'emb.pt')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    emb = torch.load(work / "emb.pt", weights_only=True)
    assert emb["dtype"] == "torch.float32"   # the card loads the bf16 weights into fp32, as it says
    texts = [line.split('"text": "')[1].split('"')[0] for line in rest.splitlines() if '"text": ' in line]
    queries = [{"id": "t", "instruction_text": texts[0], "query_image": [], "query_video": []},
               {"id": "i", "instruction_text": texts[1], "query_image": [str(work / "query.jpg")], "query_video": []},
               {"id": "v", "instruction_text": texts[2], "query_image": [], "query_video": [str(work / "query.mp4")]}]
    assert F.cosine_similarity(emb["queries"], trained.encode_queries(queries)).min() >= 0.9999
    gallery = trained.encode_targets([str(work / "a.jpg"), str(work / "b.jpg")])
    assert F.cosine_similarity(emb["gallery"], gallery).min() >= 0.9999


def test_exported_settings_are_the_encoders_calibrator_and_dtype(trained, tmp_path):
    """fashionlens.json carries the calibrator variant the standalone code applies (mode, gate, fixed_gate, rank:
    the encoder's own config, with a non-default fixed gate), and a bf16 export's config.json says bfloat16 (what
    from_pretrained(dtype="auto") loads), while the encoder's own config keeps its dtype.
    The calibrator is saved as the encoder holds it (fp32) whatever the export dtype: bf16 would round its weights.
    The media settings are the encoder's too, with an evaluation budget (40,000 pixels) above the training one.
    Catches: fixed_gate left out of the exported settings (the standalone code would use its default); the saved
    config's dtype not set to the export dtype; calibrator.safetensors cast to the export dtype; the training budget
    exported as the evaluation one (`"eval_image_pixels": cfg.image_pixels`)."""
    import json
    cal, cfg = trained.calibrator_cfg, trained.model_cfg
    saved_gate, cal.fixed_gate = cal.fixed_gate, 0.37
    saved_eval, cfg.eval_image_pixels = cfg.eval_image_pixels, 40_000
    try:
        hf_export.export(trained, str(tmp_path / "bf16"), dtype="bfloat16")
    finally:
        cal.fixed_gate, cfg.eval_image_pixels = saved_gate, saved_eval
    exported = json.loads((tmp_path / "bf16" / "fashionlens.json").read_text())
    settings = exported["calibrator"]
    assert settings == {"mode": cal.mode, "gate": cal.gate, "fixed_gate": 0.37, "rank": cal.rank}
    assert [exported[k] for k in ("image_pixels", "eval_image_pixels", "video_frames")] == [
        cfg.image_pixels, 40_000, cfg.video_frames]
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert trained.lm.config.dtype != torch.bfloat16
    with safe_open(os.path.join(tmp_path, "bf16", "calibrator.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    own = trained.calibrator.state_dict()
    assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k]) for k in own)


def test_a_bf16_export_loads_in_bf16_with_dtype_auto_in_both_towers(trained, tmp_path):
    """A bf16 export's config.json says bfloat16 at the top and in the text and vision sub-configs (each describes
    the weights saved), and from_pretrained(dtype="auto") loads every weight of both towers in bf16.
    Fails when only the top-level dtype is set: the sub-configs then claim the training model's float32 for bf16
    weights. (The transformers installed here loads by the top-level dtype, so the load itself still gives bf16
    under that mutation; the sub-config assertion is what catches it.) The file holds bf16 weights, not fp32 ones
    that the load casts: catches the state saved in fp32 whatever the dtype (`.to(target)` -> `.to(torch.float32)`).
    """
    import json
    out = tmp_path / "bf16"
    hf_export.export(trained, str(out), dtype="bfloat16")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    config = json.loads((out / "config.json").read_text())
    assert [config[k].get("dtype") for k in ("text_config", "vision_config")] == ["bfloat16", "bfloat16"]
    lm = Qwen3VLForConditionalGeneration.from_pretrained(str(out), dtype="auto")
    assert {p.dtype for p in lm.model.language_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in lm.model.visual.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("switch", ["keep_rope_positions", "normed_readout", "fill_pixel_budget"])
def test_export_refuses_the_release_switches_it_cannot_reproduce(trained, tmp_path, switch):
    """The plain forward computes rotary positions and the normed last state itself and the standalone code sizes
    media by fill_size: an encoder with one of those release switches off would export a different model. Refused,
    naming the switch, before anything is written.
    Catches: the switch check in export removed."""
    saved = getattr(trained.model_cfg, switch)
    setattr(trained.model_cfg, switch, False)
    try:
        with pytest.raises(ValueError, match=f"model.{switch}=false"):
            hf_export.export(trained, str(tmp_path / "out"))
    finally:
        setattr(trained.model_cfg, switch, saved)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_dtype_other_than_fp32_or_bf16(trained, tmp_path):
    """export() saves float32 or bfloat16 (what the command line offers and the card's rounding figure measures):
    float16 through the Python API is refused, naming it, before anything is written.
    Catches: the dtype check removed (an fp16 export, written without a word)."""
    with pytest.raises(ValueError, match="export: dtype must be float32 or bfloat16, got 'float16'"):
        hf_export.export(trained, str(tmp_path / "out"), dtype="float16")
    assert not (tmp_path / "out").exists()


def test_model_card_states_the_encoders_pixel_budget_frames_and_token_ids(trained):
    """The card's media sentence gives the encoder's own settings: with model.video_frames 5 and an evaluation
    budget of 40,000 pixels above training's, "(40000 pixels each, every video frame too; 5 frames per video)";
    without an evaluation budget, the training one. The readout ids are the tokenizer's ids of <|MEAN|> and <|IMG|>.
    Fails when the card's frame count or pixel budget is a constant or the training budget alone."""
    cfg = trained.model_cfg
    saved = cfg.video_frames, cfg.eval_image_pixels
    try:
        cfg.video_frames, cfg.eval_image_pixels = 5, 40000
        card = hf_export.model_card(trained, "ckpt.pt", "float32", "fp32 keeps the merged weights exactly", "")
        cfg.eval_image_pixels = 0
        plain_card = hf_export.model_card(trained, "ckpt.pt", "float32", "fp32 keeps the merged weights exactly", "")
    finally:
        cfg.video_frames, cfg.eval_image_pixels = saved
    assert "(40000 pixels each, every video frame too; 5 frames per video)" in card
    assert f"({cfg.image_pixels} pixels each, every video frame too; 5 frames per video)" in plain_card
    ids = trained.processor.tokenizer.convert_tokens_to_ids(["<|MEAN|>", "<|IMG|>"])
    assert f"(ids {ids[0]} and {ids[1]})" in card
    # The rest of the card's header, from the arguments and the encoder's calibrator config: the source, the effect
    # as a sentence, the calibrator variant, and what stands in for a missing source or numbers. Catches: the
    # calibrator's rank left out, or "mode none" described as a calibrator; the placeholders for an empty source or
    # numbers dropped; the effect not made a sentence.
    cal = trained.calibrator_cfg
    assert "from `ckpt.pt`." in card and "**float32**. Fp32 keeps the merged weights exactly.\n" in card
    assert f"(the PGSQC hypernetwork, mode {cal.mode}, gate {cal.gate}, rank {cal.rank})" in card
    assert card.endswith("## Numbers of this checkpoint\n\nNone given at export.\n")
    saved_mode, cal.mode = cal.mode, "none"
    try:
        bare = hf_export.model_card(trained, "", "float32", "fp32 keeps the merged weights exactly", "")
    finally:
        cal.mode = saved_mode
    assert "from `a FashionLens encoder`." in bare
    assert "(the PGSQC hypernetwork, mode none: the query is only normalised)" in bare
    # A query's example prompt is U-FIRE's instruction (verb "find") then the release's query suffix, in one user turn.
    # Catches: the instruction without its verb; the query suffix left out of the examples.
    assert ("<|im_start|>user\nfind images using the description text: {text}Summarize the semantic feature of the "
            "target fashion image in one word.<|im_end|>") in card


def test_card_numbers_keep_a_best_score_of_zero(tmp_path):
    """train.py stores best_score = -1 until a validation ran; a validated score of exactly 0.00 (a model that finds
    nothing) is a score and goes on the card, with the step it was reached at where the checkpoint records it (a
    last.pt's step is later than its best's).
    Catches: card_numbers treating best_score <= 0 as "no validation score"; best_step left out of the card."""
    path = tmp_path / "best.pt"
    torch.save({"config": Config().to_dict(), "best_score": 0.0, "step": 5}, path)
    assert "**0.00**" in hf_export.card_numbers(str(path)) and "step 5" in hf_export.card_numbers(str(path))
    config = Config()
    config.data.root = "/data/u-fire"
    torch.save({"config": config.to_dict(), "best_score": 12.5, "step": 9, "best_step": 6}, path)
    assert "up to step 9: **12.50** (reached at step 6)," in hf_export.card_numbers(str(path))
    # the data the score was measured on. Catches: another config field named as the val split's root.
    assert "of the val split of `/data/u-fire` (train.py's model selection" in hf_export.card_numbers(str(path))
    torch.save({"config": Config().to_dict(), "best_score": -1.0, "step": 5}, path)
    assert "holds no validation score" in hf_export.card_numbers(str(path))


def test_card_numbers_name_a_results_file_that_evaluate_py_did_not_write(tmp_path):
    """--results with a file that is not evaluate.py's results.json (missing, not JSON, a list, an object without
    its keys, a set that is not an object) is a ValueError naming the file, which main prints in one line.
    Catches: OSError, ValueError, KeyError, TypeError or AttributeError dropped from card_numbers' except tuple
    (the error escapes as a traceback)."""
    path = tmp_path / "results.json"
    for text in (None, "{", "[1]", "{}", '{"ks": [1], "sets": {"1_t2i_Shoes": 5}}'):
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        with pytest.raises(ValueError, match=f"^{path}: not a results.json written by evaluate.py"):
            hf_export.card_numbers(str(tmp_path / "best.pt"), str(path))

def test_publish_dir_moves_config_json_last(tmp_path, monkeypatch):
    """An export (or make-tiny) is published file by file; config.json last, so an interrupted publish never leaves
    a config.json beside missing or stale weights (from_pretrained would load it).
    Catches: publish_dir's order turned around (config.json first)."""
    from plumbing import publish_dir
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in ("config.json", "a.safetensors", "tokenizer.json", "z.json"):
        (staging / name).write_text(name)
    moved, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: moved.append(os.path.basename(dst)) or replace(src, dst))
    publish_dir(str(staging), str(tmp_path / "out"))
    assert sorted(moved) == ["a.safetensors", "config.json", "tokenizer.json", "z.json"] and moved[-1] == "config.json"
    assert (tmp_path / "out" / "config.json").read_text() == "config.json"


def test_staging_dir_creates_a_missing_parent_and_stages_beside_the_output(tmp_path):
    """`make-tiny runs/x` on a fresh clone has no runs/ yet: staging_dir creates it and stages inside it (the same
    file system, so publish_dir's renames are atomic), and publish_dir then fills runs/x. The staging folder is named
    after the output (`x.partial-*`), as what a killed build leaves must be recognisable.
    Catches: staging_dir without its `os.makedirs(parent, exist_ok=True)` (FileNotFoundError on a fresh clone);
    without its prefix (a killed export leaves `tmpab12cd` beside it, gigabytes of weights nobody can place)."""
    from plumbing import publish_dir, staging_dir
    out = tmp_path / "runs" / "x"
    with staging_dir(str(out)) as staging:
        assert os.path.dirname(staging) == str(tmp_path / "runs")
        assert os.path.basename(staging).startswith("x.partial-"), staging
        with open(os.path.join(staging, "config.json"), "w") as f:
            f.write("{}")
        publish_dir(staging, str(out))
    assert os.listdir(tmp_path / "runs") == ["x"] and os.listdir(out) == ["config.json"]


def test_the_cards_bf16_figure_is_the_rounding_error_over_the_lora_delta(trained):
    """The model card's bf16 figure is 100 x sqrt(sum of squared bf16 rounding errors of the merged weights / sum of
    squared LoRA deltas) over all merged layers, recomputed here in float64 from each layer's base weight and its
    LoRA factors (scaling x B A).
    Catches: the square root dropped (the ratio of the squared sums); each layer's error overwriting the last
    (`error = ...` for `error += ...`); a fully trained model (no merged layer) exported in bf16 described as exact
    (`if dtype == torch.float32 or not merged`)."""
    state, merged = trained.merged_state_dict()
    error = delta = 0.0
    for name in merged:
        layer = trained.lm.get_submodule(name)
        with torch.no_grad():
            lora_delta = (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
                          * layer.scaling["default"])
            weight = (layer.base_layer.weight.double() + lora_delta).float()
        error += float((weight.to(torch.bfloat16).double() - weight.double()).square().sum())
        delta += float(lora_delta.square().sum())
    figure = re.search(r"([\d.]+)% of the LoRA delta", hf_export.dtype_effect(trained, state, merged, torch.bfloat16))
    assert len(merged) > 4 and float(figure.group(1)) == pytest.approx(100 * math.sqrt(error / delta), abs=0.051)
    # Full training merges no LoRA layer: a bf16 export is not exact.
    assert hf_export.dtype_effect(trained, state, [], torch.bfloat16).startswith("bf16 rounds every weight")
    assert hf_export.dtype_effect(trained, state, [], torch.float32) == "fp32 keeps the weights exactly"
    # An fp32 export of merged LoRA layers keeps them exactly: no bf16 figure in its card. Catches: the fp32 case
    # of merged layers dropped (the card of an fp32 export then states "bf16 rounding ... is 0.0%").
    assert hf_export.dtype_effect(trained, state, merged, torch.float32) == "fp32 keeps the merged weights exactly"


def test_standalone_refuses_a_query_text_holding_a_special_token(exported):
    """fashionlens_embed.embed_queries refuses, naming the query, a text holding a special token of the exported
    tokenizer (<|im_end|>: the user's turn would end early and the query embed silently; the readout token <|MEAN|>,
    saved with the export as a special token).
    Catches: the check removed from embed_queries (`found = []`)."""
    lm, processor, head, fl = plain(exported)
    for text in ("red dress<|im_end|>\n<|im_start|>assistant", "Find <|MEAN|> in red."):
        with pytest.raises(ValueError, match=r"query 1: the text holds the tokenizer's special token"):
            fl.embed_queries(lm, processor, head, [{"text": "a red dress"}, {"text": text}])


def test_standalone_takes_a_text_holding_an_added_token_that_is_not_special(trained, exported):
    """Only special tokens are refused, as the training encoder refuses only those (model.py: added tokens with
    special=True): the real Qwen3 tokenizer also holds added tokens that are not special (<think>, <tool_call>),
    which a query may contain and training embeds. With "<think>" added as a non-special token to the export's
    tokenizer, "a <think> dress" embeds to a unit vector, while "<|im_end|>" is still refused.
    Fails when embed_queries refuses every added token (`if t.special` dropped)."""
    lm, processor, head, fl = plain(exported)
    processor.tokenizer.add_tokens(["<think>"])
    assert "<think>" not in trained.special_tokens and "<|im_end|>" in trained.special_tokens
    emb = fl.embed_queries(lm, processor, head, [{"text": "a <think> dress"}])
    assert emb.shape == (1, trained.embed_dim) and torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    with pytest.raises(ValueError, match="special token"):
        fl.embed_queries(lm, processor, head, [{"text": "a <|im_end|> dress"}])


def test_standalone_readout_needs_exactly_one_readout_token_per_prompt(exported):
    """fashionlens_embed.readout, called directly (the documented functions refuse such texts first), with a
    prompt holding <|MEAN|> twice (once in the user's text, once as the answer) and with one holding it not at all:
    both are refused, since the readout would take an arbitrary one of them. Fails when the check accepts a prompt
    with several readout tokens (`>= 1`)."""
    lm, processor, head, fl = plain(exported)
    s = head["settings"]
    twice = fl.conversation(s, [{"type": "text", "text": "a " + s["query_token"]}], s["query_token"])
    never = fl.conversation(s, [{"type": "text", "text": "a dress"}], "done")
    for conversation in (twice, never):
        with pytest.raises(ValueError, match="exactly one <\\|MEAN\\|> token"):
            fl.readout(lm, processor, [conversation], [], [], [], s["query_token"])


def test_standalone_gallery_embeddings_are_unit_vectors(media, exported):
    """embed_images returns unit vectors, so the inner product with a query is the cosine, the retrieval score the
    card documents (the cosine comparisons above cannot see a missing normalisation).
    Catches: embed_images returning the raw readout (F.normalize dropped)."""
    lm, processor, head, fl = plain(exported)
    gallery = fl.embed_images(lm, processor, head, media["images"], batch_size=3)
    assert torch.allclose(gallery.norm(dim=-1), torch.ones(len(media["images"])), atol=1e-5)


def test_standalone_sizes_images_between_the_two_pixel_budgets():
    """fashionlens_embed.sized gives an image its own area clamped to [image_pixels, eval_image_pixels], as evaluation
    does (model.eval_image_pixels; the release's 224^2 .. 256^2), here with budgets of 64^2 and 128^2, by hand:
    300 x 300 -> 128 x 128 (capped), 96 x 96 -> 96 x 96 (its own area), 40 x 40 -> 64 x 64 (raised); with
    eval_image_pixels 0 everything gets 64 x 64.
    Catches: sized ignoring eval_image_pixels (every image at the training budget)."""
    fl = load_standalone(os.path.join(os.path.dirname(hf_export.__file__), "export"))
    settings = {"image_pixels": 64 * 64, "eval_image_pixels": 128 * 128}
    for side, expected in ((300, 128), (96, 96), (40, 64)):
        assert fl.sized(Image.new("RGB", (side, side)), settings).size == (expected, expected)
    assert fl.sized(Image.new("RGB", (300, 300)), {**settings, "eval_image_pixels": 0}).size == (64, 64)


def test_standalone_fill_size_of_extreme_and_tied_aspect_ratios():
    """fashionlens_embed.fill_size at 224^2 = 49 units of 32^2, by hand: a 30 x 2000 strip (h x w) fits as 0.86 x 57
    units, clamped to 1 x 49: 32 x 1568 (and 1568 x 32 standing); 160 x 380 ties 4 x 10 and 4 x 11 on the worse
    axis and takes the larger area, 4 x 11: 128 x 352. The training side (media.fill_size) gives the same.
    Fails when the exact fit is not clamped to [1, units] (a side of 0 pixels), or the tie-break by area is dropped
    (128 x 320)."""
    from media import fill_size
    fl = load_standalone(os.path.join(os.path.dirname(hf_export.__file__), "export"))
    for (h, w), expected in (((30, 2000), (32, 1568)), ((2000, 30), (1568, 32)), ((160, 380), (128, 352))):
        assert fl.fill_size(h, w, 224 * 224) == fill_size(h, w, 224 * 224) == expected
    assert fl.sized(Image.new("RGB", (2000, 30)), {"image_pixels": 224 * 224, "eval_image_pixels": 0}).size == (
        1568, 32)


@pytest.mark.parametrize("name, length, indices", [("short.mp4", 3, [0, 0, 1, 1, 1, 1, 2, 2]),
                                                    ("clip.mkv", 12, [0, 2, 3, 5, 6, 8, 9, 11])])
def test_standalone_reads_a_clip_with_the_indices_of_the_frames_it_returns(tmp_path, name, length, indices):
    """fashionlens_embed.read_video on clips read as 8 frames, as media.load_video does for training: a 3-frame clip
    gives frames round(linspace(0, 2, 8)) = 0 0 1 1 1 1 2 2, a 12-frame .mkv (a container that stores no frame
    count: counted by decoding) round(linspace(0, 11, 8)) = 0 2 3 5 6 8 9 11 (both by hand), each equal to the frame
    PyAV decodes at its index, and that index in the metadata (the video prompt's timestamps).
    Catches: read_video mapping the picks onto the sampled indices as listed (np.unique dropped): 0 0 0 0 0 0 1 1;
    the frame count of an .mkv taken as stored (`== 0` -> `< 0`: 8 copies of frame 0)."""
    import av
    fl = load_standalone(os.path.join(os.path.dirname(hf_export.__file__), "export"))
    path = write_mp4(tmp_path / name, length, seed=3)
    with av.open(path) as container:
        assert container.streams.video[0].frames == (0 if name.endswith(".mkv") else length)   # the case under test
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    frames, meta = fl.read_video(path, 8)
    assert meta.frames_indices == indices
    assert np.array_equal(frames, np.stack([decoded[i] for i in meta.frames_indices]))


def test_standalone_stamps_a_clips_frames_at_its_own_rate_and_at_24_where_it_states_none(tmp_path, monkeypatch):
    """fashionlens_embed.read_video keeps the clip's frame rate (4 here, by hand), which Qwen3-VL's video prompt
    divides each frame's index by, and falls back to 24 (the processor's default) only where the reader finds none,
    as media.load_video does for training (test_model.py).
    Catches: the standalone fallback dropped (`meta.fps = meta.fps or 24.0` removed: fps None reaches the
    processor), which survived the rest of this file."""
    fl = load_standalone(os.path.join(os.path.dirname(hf_export.__file__), "export"))
    check_clip_rate_and_its_fallback(fl.read_video, fl, tmp_path, monkeypatch)


def test_standalone_names_a_video_it_cannot_read(tmp_path):
    """fashionlens_embed.read_video on a video stream with no decodable frame (.mp4, which stores a frame count, and
    .mkv, which does not) and on an audio-only file: a ValueError naming the file, with the reader's own error. The
    reader (transformers' load_video) fails on such files with "need at least one array to stack", "[Errno 1]
    Operation not permitted" or "tuple index out of range", naming no file: embed_queries then did not say which of
    its queries' videos is at fault (its own "no decodable frames" check came after the reader and never ran)."""
    fl = load_standalone(os.path.join(os.path.dirname(hf_export.__file__), "export"))
    for path in (write_undecodable_video(tmp_path / "junk.mp4"), write_undecodable_video(tmp_path / "junk.mkv"),
                 write_audio_only(tmp_path / "audio.mp4")):
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: cannot read video "):
            fl.read_video(path, 4)


@pytest.mark.parametrize("offset, gate_logit", [(0.0, -0.85), (1e-3, -0.85), (0.0, 0.0), (3e-2, -0.85)])
def test_standalone_calibrator_equals_the_training_one_where_p_opposes_q(offset, gate_logit):
    """The export's calibrate against calibrator.QueryCalibrator with the same weights, where the hypernetwork's
    A, B (set through the last layer's bias) send p to -q exactly (offset 0) or to within 1e-3 of it: both must take
    the normalised-lerp fallback, which at gate sigmoid(-0.85) < 0.5 gives q (by hand), not the ill-conditioned
    great circle through q and -q; at gate 0.5 exactly the lerp of q and -q vanishes and the output is q (by hand).
    At offset 3e-2 (|q.p| = 1 - 4.5e-4, clear of the fallback's 1 - 1e-6) both take the great circle: the output is
    lambda (pi - atan(0.03)) from q (by hand).
    Catches: the standalone's fallback test without `.abs()` (cosine with q -0.99); the vanishing lerp replaced by p
    instead of q (-q at gate 0.5); the fallback threshold at 1 - 1e-3 (at offset 3e-2 the lerp's 0.02 rad from q
    instead of 0.93)."""
    fl = load_standalone(os.path.join(os.path.dirname(hf_export.__file__), "export"))
    d, cfg = 16, CalibratorConfig()
    calibrator = QueryCalibrator(d, cfg)
    q = F.normalize(torch.arange(1.0, d + 1), dim=0)
    other = F.normalize(torch.eye(d)[0] - q[0] * q, dim=0)          # a unit vector orthogonal to q
    a, b = torch.zeros(d, cfg.rank), torch.zeros(cfg.rank, d)
    a[:, 0], b[0] = q, -2 * q + offset * other                      # q A B = -2 q + offset * other
    with torch.no_grad():
        calibrator.hyper[-1].weight.zero_()
        calibrator.hyper[-1].bias.copy_(torch.cat([a.reshape(-1), b.reshape(-1), torch.tensor([gate_logit])]))
    head = {"settings": {"calibrator": {"mode": cfg.mode, "gate": cfg.gate, "fixed_gate": cfg.fixed_gate,
                                        "rank": cfg.rank}},
            "calibrator": calibrator.state_dict()}
    h = 2.5 * q[None]
    with torch.no_grad():
        expected = calibrator(h)[0]
    angle = torch.sigmoid(torch.tensor(gate_logit)) * (math.pi - math.atan(offset)) if offset > 1e-2 else 0.0
    assert torch.acos((expected[0] @ q).clamp(-1, 1)).item() == pytest.approx(float(angle), abs=1e-3)
    assert torch.allclose(fl.calibrate(h, head), expected, atol=1e-5)


class ProcessorSpy:
    """The export's processor, keeping what each call returned (the model inputs the standalone code built)."""

    def __init__(self, processor):
        self.processor, self.seen = processor, []

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, **kwargs):
        self.seen.append(self.processor(**kwargs))
        return self.seen[-1]


def test_standalone_builds_the_training_encoders_evaluation_inputs(trained, media, tmp_path):
    """An encoder that evaluates at model.eval_image_pixels 256^2 above its training 128^2 and reads
    model.video_frames 4, exported: the model inputs fashionlens_embed.py builds (token ids, pixels, grids) for a
    query with an image then a video, a video query and a 200 x 200 gallery image (its own area, between the two
    budgets) are bit for bit the training encoder's evaluation inputs (prepare_queries / prepare_targets, train=False).
    A cosine threshold cannot see these: on the tiny random backbone other video frames or another resampling filter
    move an embedding by less than 1e-4.
    Catches: eval_image_pixels or video_frames not carried into fashionlens.json (sized at image_pixels; 8 frames);
    embed_queries placing a query's video before its images; read_video sampling up to frame N instead of N - 1;
    media.resize_to_budget resampling bilinear instead of bicubic, or at the largest budget (`area = max_pixels`)."""
    cfg = trained.model_cfg
    saved = cfg.eval_image_pixels, cfg.video_frames
    cfg.eval_image_pixels, cfg.video_frames = 256 * 256, 4
    try:
        out = str(tmp_path / "out")
        hf_export.export(trained, out)
        lm, processor, head, fl = plain(out)
        spy = ProcessorSpy(processor)
        queries = [{"id": "iv", "instruction_text": "Find this jacket.", "query_image": media["images"][2:3],
                    "query_video": [media["video"]]},
                   {"id": "v", "instruction_text": "Find the item.", "query_image": [],
                    "query_video": [media["video"]]}]
        fl.embed_queries(lm, spy, head, [{"text": q["instruction_text"], "images": q["query_image"],
                                          "videos": q["query_video"]} for q in queries])
        fl.embed_images(lm, spy, head, media["images"][2:3])
        expected = [trained.prepare_queries(queries, train=False),
                    trained.prepare_targets(media["images"][2:3], train=False)]
    finally:
        cfg.eval_image_pixels, cfg.video_frames = saved
    assert len(spy.seen) == 2
    assert expected[0]["video_grid_thw"].tolist() == [[2, 6, 10]] * 2   # 4 frames of 96 x 64, raised to 96 x 160
    assert expected[1]["image_grid_thw"].tolist() == [[1, 12, 12]]      # 200 x 200 -> 192 x 192, not 128 x 128
    for built, training in zip(spy.seen, expected):
        assert built.keys() <= training.keys()
        for key in built:
            assert torch.equal(built[key], training[key]), key


def test_cli_export_puts_only_the_checkpoints_own_numbers_on_its_card(trained, mini_root, tmp_path):
    """--results from evaluate.py run on the checkpoint goes on the card. After best.pt is replaced by a later best
    (one LoRA factor moved), the same results.json is another model's numbers: the export is refused naming both,
    and so are the untrained floor's results for that checkpoint. A results.json written before evaluate.py recorded
    model_identity is taken when its "model" is this checkpoint's path, refused when it is another's.
    Catches: card_numbers without its identity check (another model's table on the card); evaluate.py not recording
    model_identity (`tensors_identity(state)` -> `None`: its own checkpoint's results refused); the path fallback
    applied to every results.json (`if "model_identity" in results` -> `if False`: the later best's card states the
    earlier one's numbers)."""
    import json
    import evaluate
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.lora_dropout = trained.model_cfg.backbone, "lora", 0.0
    cfg.model.image_pixels, cfg.data.root = PIXELS, mini_root
    ckpt, state = str(tmp_path / "best.pt"), trained.trainable_state_dict()
    torch.save({"config": cfg.to_dict(), "model": state, **trained.identities()}, ckpt)

    def results_of(*how):
        out = str(tmp_path / f"eval{len(os.listdir(tmp_path))}")
        evaluate.main([ckpt, *how, "--tasks", "1_t2i_Shoes", "--split", "test", "--out", out])
        return os.path.join(out, "results.json")

    def export(results):
        hf_export.main(["export", ckpt, str(tmp_path / f"out{len(os.listdir(tmp_path))}"), "--results", results])

    own, untrained = results_of(), results_of("--untrained")
    export(own)
    with pytest.raises(SystemExit, match=re.escape(f"{untrained}: the numbers of 'untrained ({ckpt})', not of {ckpt}")):
        export(untrained)
    later = {name: t + 0.1 if name == sorted(state)[0] else t for name, t in state.items()}
    torch.save({"config": cfg.to_dict(), "model": later, **trained.identities()}, ckpt)
    with pytest.raises(SystemExit, match=re.escape(f"{own}: the numbers of {ckpt!r}, not of {ckpt} (other trained")):
        export(own)
    older = json.load(open(own))
    del older["model_identity"]
    for named, refused in ((ckpt, False), (str(tmp_path / "other.pt"), True)):
        with open(own, "w") as f:
            json.dump(dict(older, model=named), f)
        with pytest.raises(SystemExit) if refused else contextlib.nullcontext():
            export(own)


def test_cli_export_refuses_a_checkpoint_on_a_backbone_with_other_weights(trained, tmp_path):
    """`model.py export CKPT OUT --backbone OTHER`, OTHER a tiny backbone of the same architecture and another seed:
    the checkpoint's backbone_identity (the one train.py records, here the trained encoder's own) is not OTHER's, so
    the export stops naming the checkpoint and writes nothing, as evaluate.py and search.py do; on the backbone it
    was trained on it exports. Fails when main does not hand the checkpoint's identity to load_encoder (the trained
    LoRA factors and readout vectors are merged into other weights and exported without a word)."""
    from fake_backbones import make_tiny_backbone
    other = str(tmp_path / "other-seed")
    make_tiny_backbone(other, seed=1)
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.lora_dropout = trained.model_cfg.backbone, "lora", 0.0
    cfg.model.image_pixels = PIXELS
    ckpt = tmp_path / "best.pt"
    torch.save({"config": cfg.to_dict(), "model": trained.trainable_state_dict(), "step": 7, "best_score": 1.0,
                "backbone_identity": trained.backbone_identity()}, ckpt)
    with pytest.raises(SystemExit, match="best.pt: trained on a backbone with other weights"):
        hf_export.main(["export", str(ckpt), str(tmp_path / "refused"), "--backbone", other])
    assert not (tmp_path / "refused").exists()
    hf_export.main(["export", str(ckpt), str(tmp_path / "out")])
    assert (tmp_path / "out" / "config.json").is_file()


def test_cli_export_takes_the_cards_numbers_from_results_and_the_backbone_from_the_option(trained, tmp_path, capsys):
    """`model.py export CKPT OUT --results results.json --backbone DIR` on a checkpoint whose saved backbone is gone:
    the backbone --backbone names is exported, and the card holds evaluate.py's table of that results.json (its
    title, a set's row as written out here), not the checkpoint's own best score.
    Catches: main not passing --results on (the card states the checkpoint's score instead of the table);
    --backbone not passed on (the export stops: backbone not found)."""
    import json
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.lora_dropout = str(tmp_path / "moved-away"), "lora", 0.0
    cfg.model.image_pixels = PIXELS
    ckpt = tmp_path / "best.pt"
    torch.save({"config": cfg.to_dict(), "model": trained.trainable_state_dict(), "step": 7, "best_score": 123.4567},
               ckpt)
    results = {"model": str(ckpt), "ks": [1, 5], "split": "test", "root": "/data/u-fire", "sets": {"7_cir_Shoes": {
        "family": "cir", "queries": 10, "gallery": 100, "recall": {"R@1": 41.5, "R@5": 80.0},
        "chance": {"R@1": 1.0, "R@5": 5.0}, "near_chance": False}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="moved-away"):
        hf_export.main(["export", str(ckpt), str(tmp_path / "without")])
    hf_export.main(["export", str(ckpt), str(tmp_path / "out"), "--results", str(tmp_path / "results.json"),
                    "--backbone", trained.model_cfg.backbone])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "From `results.json` (evaluate.py)" in card and "U-FIRE test split of /data/u-fire" in card
    # The card names the checkpoint file, not the path it was read from, and the command says what it wrote.
    # Catches: the card's source given as the full path; the closing line not printed.
    assert "from `best.pt`." in card and str(tmp_path) not in card
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out'} (fp32: fp32 keeps the merged weights exactly)\n"
    # A results file that is not evaluate.py's, or an output folder that cannot be made, is one line, and nothing
    # is written. Catches: main's except without ValueError, or without OSError (a traceback).
    (tmp_path / "bad.json").write_text("[1]")
    (tmp_path / "file").write_text("")
    for extra, out, message in ((["--results", str(tmp_path / "bad.json")], tmp_path / "refused", "not a results.json"),
                                ([], tmp_path / "file" / "out", re.escape(str(tmp_path / "file")))):
        with pytest.raises(SystemExit, match=f"^model.py export: .*{message}"):
            hf_export.main(["export", str(ckpt), str(out), "--backbone", trained.model_cfg.backbone, *extra])
        assert not out.exists()
    assert "| cir | 7_cir_Shoes | 10 | 100 | 41.5 (1.0) | 80.0 (5.0) |" in card and "123.46" not in card


def test_an_untied_lm_head_is_exported_as_its_own_matrix(tiny_backbone, tmp_path):
    """A backbone whose LM head is not tied to the input embeddings (as Qwen3-VL-8B's is not; the tiny backbone's
    is, so it is untied here in memory, a matrix of its own): the export holds that head, and transformers loads it
    back as that matrix with no weight missing. Catches: lm_head.weight dropped whatever the config says
    (`if encoder.lm.config.tie_word_embeddings:` -> `if True:`: the head is missing, initialised at random)."""
    encoder = build(tiny_backbone, trainable="lora", lora_dropout=0.0)
    head = encoder.lm.get_input_embeddings().weight.detach() * 2 + 1
    encoder.lm.lm_head.weight = torch.nn.Parameter(head.clone())
    for config in (encoder.lm.config, encoder.lm.config.text_config):
        config.tie_word_embeddings = False
    out = str(tmp_path / "untied")
    hf_export.export(encoder, out)
    lm, info = Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info
    torch.testing.assert_close(lm.lm_head.weight, head)
