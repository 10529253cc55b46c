"""train.py: exact gradient caching, the loss's false-negative mask, the optimizer step and learning rate, a batch's
seeded choices, bit-for-bit resume, two-process training, a loss that falls on U-FIRE-mini, chunks prepared in threads
(also a step ahead) exactly like serially, and config overrides and inheritance (config.py)."""
import contextlib
import copy
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import plumbing
import train as train_module
from config import CHOICES, Config, load_config
from launch import launch_two_nodes, torchrun
from loader import StepPrefetch, prepare_chunks
import model
from model import build_encoder
from plumbing import load_checkpoint
from prepare_data import SUB_DATASETS, TrainSet
from sampler import TaskSampler
from checkpoints import rng_states
from train import across_ranks, batch_report, contrastive_loss, cached_step, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))    # the benchmark scripts, imported by their tests


def assert_same_state(a, b, where="", atol=0.0):
    """Recursive comparison of two checkpoint-like objects: tensors and floats equal within atol (exactly at 0),
    everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a.keys() ^ b.keys()))
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]", atol)
    elif isinstance(a, torch.Tensor):
        if atol == 0.0 or not a.is_floating_point():
            assert torch.equal(a, b), where
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=where)
    elif hasattr(a, "shape"):                                    # numpy arrays inside RNG states
        assert (a == b).all(), where
    elif isinstance(a, float) and atol:
        assert a == pytest.approx(b, abs=atol), where
    else:
        assert a == b, where


# ----------------------------------------------------------------------------- the loss

def test_false_negatives_are_masked_not_pushed():
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    paths = ["a", "b", "a", "c"]            # column 2 shows the same image as query 0's positive
    labels = [None, "red", None, "red"]     # column 3 shares query 1's asfr label
    loss = contrastive_loss(q, t, torch.arange(3), paths, labels, 0.07)
    logits = q @ t.T / 0.07
    expected = torch.stack([
        -logits[0, 0] + torch.logsumexp(logits[0, [0, 1, 3]], 0),
        -logits[1, 1] + torch.logsumexp(logits[1, [0, 1, 2]], 0),
        -logits[2, 2] + torch.logsumexp(logits[2, [1, 2, 3]], 0)]).mean()
    torch.testing.assert_close(loss, expected)


def test_false_negative_mask_follows_each_querys_positive_column():
    """Gathered negatives lay the targets out rank by rank, each rank's positives then its hard negatives, so query i's
    positive is not column i: here queries 0, 1 (rank 0) have columns 0, 1 and hard negative 2, query 2 (rank 1) has
    column 3 and hard negatives 4-6. Denominators written out by hand: query 0 (image "a", unlabelled) drops column 4
    (image "a" again) but keeps the unlabelled columns 3 and 6; query 1 ("red") drops column 2 ("red"); query 2
    (unlabelled) keeps every column.
    Catches: the mask built from column i instead of the positive's (`paths[positives]` -> `paths[:len(positives)]`:
    query 2 would drop column 1, red like column 2); unlabelled columns matching each other (`-1 - j` -> `-1`)."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    paths = ["a", "b", "n1", "c", "a", "n2", "n3"]
    labels = [None, "red", "red", None, None, "blue", None]
    positives = torch.tensor([0, 1, 3])
    loss = contrastive_loss(q, t, positives, paths, labels, 1.0)    # every column weighs in the denominators
    logits = q @ t.T
    expected = torch.stack([
        -logits[0, 0] + torch.logsumexp(logits[0, [0, 1, 2, 3, 5, 6]], 0),
        -logits[1, 1] + torch.logsumexp(logits[1, [0, 1, 3, 4, 5, 6]], 0),
        -logits[2, 3] + torch.logsumexp(logits[2, [0, 1, 2, 3, 4, 5, 6]], 0)]).mean()
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------- gradient caching

def make_examples(tmp_path, n):
    """n training views with small distinct images; asfr-style labels repeat so the mask is exercised."""
    examples = []
    for i in range(n):
        paths = []
        for role in ("q", "t"):
            path = tmp_path / f"{role}{i}.png"
            Image.new("RGB", (64, 64), ((37 * i) % 256, (91 * i) % 256, 128 if role == "q" else 30)).save(path)
            paths.append(str(path))
        examples.append({"id": f"r{i}", "key": "9_asfr_DARN", "instruction_text": f"find item number {i} in red",
                         "query_image": [paths[0]] if i % 2 else [], "query_video": [], "target_image": paths[1],
                         "target_label": f"label{i % 3}", "negative_image": [], "negative_label": []})
    return examples


def full_training_config(tiny_backbone):
    """The tiny backbone trained in full (no LoRA, so no dropout) at 64 x 64 pixels, in fp32 on any device."""
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.image_pixels = tiny_backbone, "full", 64 * 64
    cfg.model.dtype = "float32"
    return cfg


def lora_dropout_config(tiny_backbone):
    """The tiny backbone with LoRA at dropout 0.3 (dropout masks must match between passes) at 64 x 64 pixels, in
    fp32 on any device."""
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.lora_dropout = tiny_backbone, "lora", 0.3
    cfg.model.image_pixels, cfg.model.dtype = 64 * 64, "float32"
    return cfg


def uncached_reference(encoder, examples, cfg, chunk_size):
    """The same computation with every chunk's graph kept (no caching): forward all chunks with gradients in
    the same order, one loss, one backward. The targets: every query's positive, then the hard negatives."""
    targets = [e["target_image"] for e in examples] + [p for e in examples for p in e["negative_image"]]
    labels = [e["target_label"] for e in examples] + [lab for e in examples for lab in e["negative_label"]]
    q_out = [encoder(encoder.prepare_queries(examples[i:i + chunk_size], train=True), role="query")
             for i in range(0, len(examples), chunk_size)]
    t_out = [encoder(encoder.prepare_targets(targets[i:i + chunk_size], train=True), role="target")
             for i in range(0, len(targets), chunk_size)]
    q = torch.cat([o["emb"] for o in q_out])
    t = torch.cat([o["emb"] for o in t_out])
    loss = contrastive_loss(q, t, torch.arange(len(examples)), targets, labels, cfg.train.temperature)
    per_sample = torch.cat([cfg.calibrator.fro_weight * o["reg_fro"] + cfg.calibrator.orth_weight * o["reg_orth"]
                            for o in q_out])
    total = loss + per_sample.mean()
    total.backward()
    return total.item()


def grads(encoder):
    return {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}


def perturb(encoder):
    """Move the calibrator and LoRA-B off their near-identity, zero starts so every gradient is non-trivial."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if p.requires_grad and ("lora_B" in name or "hyper" in name):
                p.add_(0.05 * torch.randn_like(p))


def add_hard_negatives(tmp_path, examples, k):
    """k hard negatives per view (asfr), each labelled like another view's positive so the mask is exercised."""
    for i, e in enumerate(examples):
        e["negative_image"], e["negative_label"] = [], []
        for j in range(k):
            path = tmp_path / f"n{i}_{j}.png"
            Image.new("RGB", (64, 64), ((61 * i + 17 * j) % 256, 200, (43 * j) % 256)).save(path)
            e["negative_image"].append(str(path))
            e["negative_label"].append(f"label{(i + j + 1) % 3}")
    return examples


@pytest.mark.parametrize("views, negatives, chunk_size", [(7, 0, 1), (7, 0, 3), (7, 0, 7), (4, 2, 4)])
def test_cached_gradients_equal_uncached_with_dropout(tiny_backbone, tmp_path, device, views, negatives, chunk_size):
    """A cached step's loss and gradients (LoRA dropout on) equal one uncached forward and backward of the same
    chunks from the same random state. (4, 2, 4): the 4 queries are one chunk, their 4 positives and 8 hard negatives
    three. Catches: a chunk's random state saved after its forward (dropout masks differ in the replay); the replay's
    random state restored for no chunk; the replay's cached gradients not advanced per chunk (`start += n` dropped);
    one chunk of queries taken for a batch that needs no replay (`single = ... or ...`: the targets' pass-1
    embeddings have no graph). With --device cuda (the `device` fixture) the dropout masks come from the CUDA
    random state, which the replay must restore."""
    cfg = lora_dropout_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, device).train()
    perturb(encoder)
    examples = add_hard_negatives(tmp_path, make_examples(tmp_path, views), negatives)

    torch.manual_seed(123)
    stats, bad = cached_step(encoder, examples, cfg, chunk_size)
    cached = grads(encoder)
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    reference_loss = uncached_reference(encoder, examples, cfg, chunk_size)
    reference = grads(encoder)

    assert bad == []
    assert stats["loss"] == pytest.approx(reference_loss, abs=1e-5)
    assert cached.keys() == reference.keys() and len(cached) > 10
    for name in reference:
        torch.testing.assert_close(cached[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)
    # dropout really is on: the same input twice in train mode gives different embeddings
    inputs = encoder.prepare_targets([examples[0]["target_image"]], train=True)
    with torch.no_grad():
        assert not torch.equal(encoder(inputs, "target")["emb"], encoder(inputs, "target")["emb"])


def test_chunk_size_does_not_change_loss_or_gradients(tiny_backbone, tmp_path, device):
    """Chunks of 1, 3 and 6 queries give the same loss, gradients and logged mean gate (over the whole batch), also
    on a GPU (--device cuda).
    Catches: the gate mean of the first chunk only (`gates[0].mean()`)."""
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, device).train()
    perturb(encoder)
    examples = make_examples(tmp_path, 6)
    results = []
    for chunk_size in (1, 3, 6):
        encoder.zero_grad(set_to_none=True)
        stats, _ = cached_step(encoder, examples, cfg, chunk_size)
        results.append((stats["loss"], grads(encoder), stats["gate_mean"]))
    for loss, g, gate_mean in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-5)
        assert gate_mean == pytest.approx(results[0][2], abs=1e-6)
        for name in g:
            torch.testing.assert_close(g[name], results[0][1][name], atol=1e-5, rtol=1e-4, msg=name)


def relative_error(value, reference):
    """‖value − reference‖ / ‖reference‖, in float64."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return float((value - reference).norm() / reference.norm())


@pytest.mark.parametrize("trainable, dropout", [("lora", 0.3), ("full", 0.0)])
def test_cached_gradients_equal_uncached_in_bf16_with_the_packed_vision_attention(tiny_backbone, tmp_path, device,
                                                                                 monkeypatch, trainable, dropout):
    """The gradient-cache equality above in bf16, as a GPU trains (model.dtype bfloat16: bf16 frozen weights, bf16
    autocast; on CPU the dtype is patched in, as tests/test_model.py does), with the packed vision attention: a cached
    step of 7 views in chunks of 2 and one uncached forward and backward of the same chunks from the same random state
    give the same loss and gradients. Both see the same bf16 values, so on CPU they agree to the order of the fp32
    sums (1e-7); the bound is bf16's (1e-2: on a GPU an attention backward may sum in another order each run, and
    a bf16 result then moves by a unit in its last place), far under what a breakage gives (0.08 to 1.3).
    LoRA with dropout: the frozen tower's output reused by the replay; trained in full: the tower runs again in the
    replay and the gradients go through the packed attention's backward (torch's varlen kernel: CUDA only, with
    --device cuda; tests/test_fast_paths.py checks its values against float64).
    Catches: the replay's random state not restored (`set_torch_rng_state(state)` dropped: dropout masks differ);
    the frozen tower's features of another chunk of the same shapes handed to the replay (`outs[1:2] + outs[:1] +
    outs[2:]` in replay_with_graph); the replay's cached gradients not advanced per chunk (`start += n` dropped)."""
    if device.type == "cpu":
        monkeypatch.setattr(model, "compute_dtype", lambda model_cfg, device: torch.bfloat16)
    cfg = lora_dropout_config(tiny_backbone)
    cfg.model.trainable, cfg.model.lora_dropout, cfg.model.dtype = trainable, dropout, "bfloat16"
    cfg.model.vision_attention = "packed"
    encoder = build_encoder(cfg.model, cfg.calibrator, device).train()
    assert encoder.vision_attention_packed and encoder.lm.model.visual.dtype == (
        torch.float32 if trainable == "full" else torch.bfloat16)
    perturb(encoder)
    examples = make_examples(tmp_path, 7)

    torch.manual_seed(123)
    stats, bad = cached_step(encoder, examples, cfg, 2)
    cached = grads(encoder)
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    reference_loss = uncached_reference(encoder, examples, cfg, 2)
    reference = grads(encoder)

    assert bad == []
    assert stats["loss"] == pytest.approx(reference_loss, rel=1e-3)
    assert cached.keys() == reference.keys() and len(cached) > 10
    assert any(".visual." in n for n in reference) == (trainable == "full")
    errors = {name: relative_error(cached[name], reference[name]) for name in reference}
    assert max(errors.values()) < 1e-2, sorted(errors.items(), key=lambda item: -item[1])[:5]


@pytest.mark.parametrize("broken", ["target", "hard negative", "text"])
def test_unreadable_record_is_skipped_and_named(tiny_backbone, tmp_path, broken):
    """A record whose target image, hard negative image or instruction text (a lone surrogate: the error names the
    sub-dataset and the record, no file) cannot be read is named and left out; the step trains on the other three.
    Catches: a hard negative's path not matched to its record (`+ e["negative_image"]` dropped from the culprit
    search: the step stops with the error); an error matched by file only (`err.record_id == e["id"] or` dropped: the
    text's error stops the step)."""
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    examples = add_hard_negatives(tmp_path, make_examples(tmp_path, 4), 1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    if broken == "target":
        examples[2]["target_image"] = str(tmp_path / "broken.png")
    elif broken == "hard negative":
        examples[2]["negative_image"] = [str(tmp_path / "broken.png")]
    else:
        examples[2]["instruction_text"] = "find item \ud800"
    stats, bad = cached_step(encoder, examples, cfg, 2)
    assert stats["samples"] == 3
    assert bad[0][0] == ["r2"]
    assert ("broken.png" in bad[0][1]) if broken != "text" else ("9_asfr_DARN (record r2)" in bad[0][1])


@pytest.mark.parametrize("kind", ["query_image", "query_video"])
def test_a_query_file_two_records_share_drops_both_at_the_first_retry(tiny_backbone, tmp_path, kind):
    """Records r1 and r3 of a batch share one unreadable query image (or video), as records built on the same
    reference image do. The error names r1 (the first to load it) and the file: both records are matched to it at
    once, by id and by path, so the batch is prepared again once, without both, and the report names them together.
    Catches: query images (or videos) left out of the culprit search (`e["query_image"] + ` or `e["query_video"] + `
    dropped in prepare_and_embed: r3 is found only at a second retry, reported apart)."""
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    examples = make_examples(tmp_path, 4)
    broken = tmp_path / ("broken.png" if kind == "query_image" else "broken.mp4")
    broken.write_bytes(b"neither an image nor a video")
    for e in examples[1], examples[3]:
        e[kind] = [str(broken)]
    stats, bad = cached_step(encoder, examples, cfg, 2)
    assert stats["samples"] == 2
    assert len(bad) == 1 and bad[0][0] == ["r1", "r3"] and "(record r1)" in bad[0][1] and broken.name in bad[0][1]


def test_an_unreadable_file_of_no_record_in_the_batch_stops_the_step(tiny_backbone, tmp_path, monkeypatch):
    """A DataError that names no record of the batch and none of its files cannot be cured by leaving a record out:
    the step stops with it. Preparing the batch again would meet it again, for ever (here a second preparation fails
    the test instead).
    Catches: the retry without its check that some record was at fault (`if not culprits: raise` -> `if False:`)."""
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    calls = []

    def failing(paths, train):
        calls.append(paths)
        assert len(calls) == 1, "the batch was prepared again though no record of it holds the file"
        raise plumbing.DataError("elsewhere.png", "cannot read image")

    monkeypatch.setattr(encoder, "prepare_targets", failing)
    with pytest.raises(plumbing.DataError, match=r"^elsewhere.png: cannot read image$"):
        cached_step(encoder, make_examples(tmp_path, 2), cfg, 2)


def test_pass_one_keeps_no_graph_unless_the_batch_is_one_chunk_of_each(tiny_backbone, tmp_path):
    """Gradient caching saves memory because pass 1 embeds every chunk without a graph (docs/method.md#gradient-
    caching); only a batch that is one query chunk and one target chunk keeps its graph, and is not replayed. Two
    views with one hard negative each: chunks of 2 give one query chunk and two target chunks (no graph anywhere);
    chunks of 4 give one of each (graphs kept).
    Catches: a graph kept for the query or target chunks of a batch of several chunks (`keep_graph=single` ->
    `keep_graph=True` for either role: every chunk's activations held through pass 2); one chunk of queries taken for
    a batch that needs no replay (`single = ... and ...` -> `... or ...` in prepare_and_embed: the two target chunks
    keep their graphs)."""
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    examples = add_hard_negatives(tmp_path, make_examples(tmp_path, 2), 1)
    for chunk_size, chunks, graph in ((2, [1, 2], False), (4, [1, 1], True)):
        _, _, q, t, _ = train_module.prepare_and_embed(encoder, examples, chunk_size)
        assert [len(q[1]), len(t[1])] == chunks, chunk_size
        assert [out["emb"].requires_grad for out in q[1] + t[1]] == [graph] * sum(chunks), chunk_size


def test_a_step_that_kept_no_record_starts_no_preparation_of_the_next(tiny_backbone, tmp_path):
    """StepPrefetch's guess is prepared by the pool's threads at once, which is safe only once this thread has
    tokenized (the tokenizer sets its padding state on its first call: two threads doing that together fail, "Already
    borrowed"; loader.prepare_chunks). A step whose only record has an unreadable query image fails before its text
    is tokenized and keeps nothing: it must not start the next step's preparation. A step that kept a record starts it
    once. The step that kept nothing returns no statistics (a single process then logs no loss for it).
    Catches: prepare_next called whatever the step kept (`if prepare_next is not None and examples` ->
    `if prepare_next is not None` in cached_step); statistics of zeros returned for a step that learnt nothing
    (`return None, bad` -> a dict of zero loss and samples: a loss of 0 logged)."""
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    examples = make_examples(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    examples[1]["query_image"] = [str(tmp_path / "broken.png")]
    started = []
    for batch, calls in (([examples[1]], 0), (examples, 1)):
        stats, bad = cached_step(encoder, batch, cfg, 2, prepare_next=lambda: started.append(len(batch)))
        assert bad[0][0] == ["r1"] and len(started) == calls, (len(batch), stats, started)
        assert (stats is None) == (calls == 0)          # nothing learnt: no statistics to log


def test_hard_negative_with_another_querys_label_is_masked(tiny_backbone, tmp_path):
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    examples = make_examples(tmp_path, 3)
    negative = str(tmp_path / "negative.png")    # query 0's hard negative, labelled like query 1's positive
    Image.new("RGB", (64, 64), (200, 10, 90)).save(negative)
    examples[0]["negative_image"], examples[0]["negative_label"] = [negative], [examples[1]["target_label"]]
    stats, _ = cached_step(encoder, examples, cfg, 4)
    with torch.no_grad():
        q = encoder(encoder.prepare_queries(examples, train=True), "query")["emb"]
        paths = [e["target_image"] for e in examples] + [negative]
        t = encoder(encoder.prepare_targets(paths, train=True), "target")["emb"]
    labels = [e["target_label"] for e in examples]
    masked = contrastive_loss(q, t, torch.arange(3), paths, labels + [examples[1]["target_label"]], 0.07)
    unmasked = contrastive_loss(q, t, torch.arange(3), paths, labels + [None], 0.07)
    assert stats["contrastive"] == pytest.approx(masked.item(), abs=1e-5)
    assert abs(masked.item() - unmasked.item()) > 1e-3


def per_sample_regulariser(encoder, examples, cfg):
    """The weighted calibrator regulariser of each query, from one plain forward of the whole batch."""
    with torch.no_grad():
        out = encoder(encoder.prepare_queries(examples, train=True), "query")
    return cfg.calibrator.fro_weight * out["reg_fro"] + cfg.calibrator.orth_weight * out["reg_orth"]


@pytest.mark.parametrize("per_chunk", [False, True])
def test_regulariser_weight_scales_with_chunks_only_in_release_mode(tiny_backbone, tmp_path, per_chunk):
    """calibrator.reg_per_chunk=false: the regularisers are averaged over the batch, whatever the chunking;
    true (release): averaged per chunk and summed over chunks, so the weight is the number of chunks.
    Catches: `per_sample.mean()` and `per_sample.sum() / q.shape[0]` swapped, or either branch ignored."""
    cfg = full_training_config(tiny_backbone)
    cfg.calibrator.reg_per_chunk = per_chunk
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    perturb(encoder)
    examples = make_examples(tmp_path, 6)
    batch_mean = per_sample_regulariser(encoder, examples, cfg).mean().item()
    for chunk_size, chunks in ((6, 1), (2, 3)):
        encoder.zero_grad(set_to_none=True)
        stats, _ = cached_step(encoder, examples, cfg, chunk_size)
        assert stats["reg"] == pytest.approx(batch_mean * (chunks if per_chunk else 1), rel=1e-5), chunk_size


def test_step_loss_follows_the_temperature_and_the_penalty_weights(tiny_backbone, tmp_path):
    """A cached step with train.temperature 0.5, calibrator.fro_weight 0.5 and calibrator.orth_weight 0.25 (every
    other test keeps the defaults 0.07, 1e-4, 1e-2): the contrastive term is cross-entropy(q t^T / 0.5) of one plain
    forward (three views with distinct labels: nothing masked), and the regulariser term the batch mean of
    0.5 |A|+|B| + 0.25 |A^T A - I| from the same forward's per-query norms.
    Catches: the loss at the default temperature (`contrastive_loss(..., 0.07)`); either regulariser weight fixed at
    its default; the two weights swapped; the logged loss without the regulariser (`"loss": contrastive`)."""
    cfg = full_training_config(tiny_backbone)
    cfg.train.temperature, cfg.calibrator.fro_weight, cfg.calibrator.orth_weight = 0.5, 0.5, 0.25
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    perturb(encoder)
    examples = make_examples(tmp_path, 3)
    with torch.no_grad():
        q_out = encoder(encoder.prepare_queries(examples, train=True), "query")
        t = encoder(encoder.prepare_targets([e["target_image"] for e in examples], train=True), "target")["emb"]
    contrastive = torch.nn.functional.cross_entropy(q_out["emb"] @ t.T / 0.5, torch.arange(3)).item()
    reg = (0.5 * q_out["reg_fro"] + 0.25 * q_out["reg_orth"]).mean().item()
    at_default = torch.nn.functional.cross_entropy(q_out["emb"] @ t.T / 0.07, torch.arange(3)).item()
    assert abs(contrastive - at_default) > 1e-3 and reg > 1e-3     # the settings matter here
    stats, _ = cached_step(encoder, examples, cfg, 2)
    assert stats["contrastive"] == pytest.approx(contrastive, rel=1e-5)
    assert stats["reg"] == pytest.approx(reg, rel=1e-5)
    assert stats["loss"] == pytest.approx(contrastive + reg, rel=1e-5)


# The release's gradient-cache chunk per sub-dataset (its training script), at batch 64 per GPU.
RELEASE_CHUNKS = {"FashionGen": 8, "Shoes-t2i": 32, "ClothesV1": 16, "HAIFashion": 16, "QMUL-Shoe-V2": 16,
                  "DeepFashion": 8, "DeepFashion2": 8, "FashionVC": 32, "Polyvore": 8, "MovingFashion": 2,
                  "Fashion200K": 8, "FashionIQ-Dress": 32, "FashionIQ-Shirt": 32, "FashionIQ-Toptee": 32,
                  "Shoes-cir": 32, "CSTBIR": 32, "DARN": 4, "FashionAI": 4}


def test_release_config_reproduces_the_release_regulariser_weight():
    """With per-chunk regularisers (tested above: weight = number of chunks) the release's weight per sub-dataset
    is 64 / its chunk size, so configs/release.yaml must carry the release's chunk sizes and batch 64.
    Catches: a sub-dataset missing from release.yaml's chunk_sizes (it would inherit full.yaml's 16 or 8)."""
    cfg = load_config(os.path.join(REPO, "configs", "release.yaml"))
    assert cfg.calibrator.reg_per_chunk and cfg.train.batch_size == 64
    for key, (family, dataset) in SUB_DATASETS.items():
        name = f"{dataset}-{family}" if dataset == "Shoes" else dataset
        chunk = cfg.train.chunk_sizes.get(key, cfg.train.chunk_size)
        assert cfg.train.batch_size / chunk == 64 / RELEASE_CHUNKS[name], key


# ----------------------------------------------------------------------------- optimizer step, learning rate

def test_learning_rate_factor_by_hand():
    """Cosine, warm-up 4 of 12 steps: (step + 1) / 4 for steps 0-3, then 0.5 (1 + cos(pi (step - 4) / 8)): 1, 0.8536,
    0.5, 0.1464, 0 at steps 4, 6, 8, 10, 12, and 0 after the end. With warm-up = total (4) the scheduler's last call,
    step 4, gives 1. Constant: the same warm-up, then 1. Catches: warm-up from 0 (`(step + 1)` -> `step`) or one step
    longer (`<` -> `<=`); the decay not held at 0 past the end (`min(1.0, progress)` dropped); another decay shape
    (`cos(pi/2 * progress)`); the empty decay dividing by zero (`max(1, ...)` dropped); an unknown schedule accepted."""
    cfg = Config()
    cfg.train.schedule, cfg.train.warmup_steps = "cosine", 4
    factor = train_module.learning_rate_factor(cfg, total_steps=12)
    expected = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 6: 0.8535533906, 8: 0.5, 10: 0.1464466094, 12: 0.0, 15: 0.0}
    assert {step: factor(step) for step in expected} == pytest.approx(expected, abs=1e-9)
    assert train_module.learning_rate_factor(cfg, total_steps=4)(4) == 1.0
    cfg.train.schedule = "constant"
    factor = train_module.learning_rate_factor(cfg, total_steps=12)
    assert [factor(step) for step in (0, 3, 4, 12, 100)] == [0.25, 1.0, 1.0, 1.0, 1.0]
    cfg.train.schedule = "linear"
    with pytest.raises(ValueError, match="train.schedule"):
        train_module.learning_rate_factor(cfg, total_steps=12)


def test_a_parameter_the_step_did_not_use_gets_a_zero_gradient():
    """One process: plumbing.average_gradients keeps a used parameter's gradient and gives one without a gradient
    (None) zeros, so AdamW treats it as used with gradient 0 (weight decay, moment decay) and, with several ranks,
    every rank all-reduces the same shapes. Catches: None left in place (`grads = [p.grad for p in params]`)."""
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    used.grad = torch.tensor([2.0, -1.0, 0.5])
    plumbing.average_gradients([used, unused])
    assert torch.equal(used.grad, torch.tensor([2.0, -1.0, 0.5]))
    assert unused.grad is not None and torch.equal(unused.grad, torch.zeros(2))


@pytest.mark.parametrize("difficulty", ["joint", "sum"])
def test_optimizer_step_reads_the_difficulty_then_clips_steps_and_schedules(tiny_backbone, difficulty):
    """Given gradients of total norm far above train.grad_clip=0.5: the returned GGAS difficulty is the unclipped
    token gradients' joint norm or sum of norms (sampler.difficulty), every parameter moves by the clipped gradient
    times the step's learning rate (plain SGD at lr 1, cosine warm-up 4: factor 0.25 at step 0), the scheduler moves
    to step 1 (factor 0.5) and the gradients are cleared. Then train.grad_clip=0 (release: no clipping) moves every
    parameter by its whole gradient times 0.5. Catches: joint and summed swapped; the difficulty read after
    clipping; clipping off (`grad_clip > 0` -> `< 0`); the scheduler not stepped; clipping at 0 (`grad_clip >= 0`:
    every gradient scaled to zero, nothing learns)."""
    cfg = full_training_config(tiny_backbone)
    cfg.train.grad_clip, cfg.sampler.difficulty = 0.5, difficulty
    cfg.train.schedule, cfg.train.warmup_steps = "cosine", 4
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    params = [p for p in encoder.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
    given = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    total = torch.cat([g.reshape(-1) for g in given]).norm().item()
    q, t = encoder.query_token.grad.norm().item(), encoder.target_token.grad.norm().item()
    assert total > 100 * cfg.train.grad_clip
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_module.learning_rate_factor(cfg, total_steps=12))

    got = train_module.optimizer_step(encoder, params, optimizer, scheduler, cfg, "step 1")
    assert got == pytest.approx((q * q + t * t) ** 0.5 if difficulty == "joint" else q + t, rel=1e-5)
    scale = 0.25 * cfg.train.grad_clip / total
    for p, g, start in zip(params, given, before):
        torch.testing.assert_close(start - p.detach(), scale * g, atol=1e-7, rtol=1e-4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    assert all(p.grad is None for p in params)
    cfg.train.grad_clip = 0.0
    for p in params:
        p.grad = torch.randn_like(p)
    given = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    train_module.optimizer_step(encoder, params, optimizer, scheduler, cfg, "step 2")
    for p, g, start in zip(params, given, before):
        torch.testing.assert_close(start - p.detach(), 0.5 * g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("poisoned, value", [("lm.model.language_model.layers.0.mlp.up_proj.weight", float("inf")),
                                             ("query_token", float("nan"))])
def test_non_finite_gradients_stop_the_run_before_the_weights_change(tiny_backbone, poisoned, value):
    """One non-finite gradient entry, in a weight of the language model or in the query token: optimizer_step raises
    a FloatingPointError naming the step it was given, and no weight, optimizer moment or schedule has moved.
    Catches: the check removed (the inf in a language-model weight leaves the token norms, and so GGAS's own check,
    finite: AdamW would turn that weight into NaN and the run would go on and checkpoint it)."""
    cfg = full_training_config(tiny_backbone)
    cfg.train.grad_clip = 1.0
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    params = [p for p in encoder.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
    dict(encoder.named_parameters())[poisoned].grad.view(-1)[3] = value
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    with pytest.raises(FloatingPointError, match=r"^step 7 of 1_t2i_Shoes \(records \[\]\): the gradients are not "):
        train_module.optimizer_step(encoder, params, optimizer, scheduler, cfg, "step 7 of 1_t2i_Shoes (records [])")
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert not optimizer.state and scheduler.last_epoch == 0


def test_a_non_finite_loss_stops_training_naming_the_step_and_keeps_finite_checkpoints(tiny_backbone, mini_root,
                                                                                       tmp_path, monkeypatch):
    """The loss turns NaN at step 3 (checkpoints every step): training stops with an error naming step 3, its
    sub-dataset, its records and the NaN loss; last.pt holds step 2 with finite weights.
    Catches: `where` not built from this step (the step number, key or records missing from the message)."""
    calls = []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = contrastive_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(train_module, "contrastive_loss", nan_at_step_3)
    cfg = run_config(tiny_backbone, mini_root, tmp_path / "run", "train.max_steps=4", "train.save_every=1",
                     "train.val_every=0")
    with pytest.raises(FloatingPointError) as err:
        train(cfg)
    keys = [r["key"] for r in map(json.loads, open(tmp_path / "run" / "log.jsonl")) if "loss" in r]
    assert len(keys) == 2
    message = str(err.value)
    drawn = "1_t2i_Shoes|9_asfr_DARN|7_cir_FashionIQ-Dress"
    assert re.match(rf"step 3 of ({drawn}) \(loss nan, records \['", message), message
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_unreadable_records_beyond_the_limit_stop_the_run(capsys):
    """data.max_bad_records=2: two distinct records pass, one of them found again by a later step (reported once: the
    later step names only the new one); a third record (the same id in another sub-dataset is another record) stops
    the run with a DataError counting 3.
    Catches: the limit off by one either way (`>` -> `>=`, or `> max_bad_records + 1`); a record found again reported
    again (`if f"{key}/{i}" not in bad_records` dropped from `new`)."""
    cfg = Config()
    cfg.data.max_bad_records = 2
    found = set()
    train_module.record_bad_records(found, "1_t2i_Shoes", [(["r1"], "cannot read")], 0, cfg)
    capsys.readouterr()
    train_module.record_bad_records(found, "1_t2i_Shoes", [(["r1", "r2"], "cannot read")], 0, cfg)
    assert found == {"1_t2i_Shoes/r1", "1_t2i_Shoes/r2"}
    assert capsys.readouterr().err == "skipped record(s) 1_t2i_Shoes/r2 from now on: cannot read\n"
    with pytest.raises(plumbing.DataError, match=r"3 unreadable training records \(limit data.max_bad_records=2\)"):
        train_module.record_bad_records(found, "9_asfr_DARN", [(["r1"], "cannot read")], 0, cfg)


# ----------------------------------------------------------------------------- a batch's random choices

def test_batch_examples_are_drawn_from_seed_step_and_rank(mini_root):
    """The random choices of a batch (each record's target, its asfr hard negatives) are the same for the same
    (train.seed, step, rank), wherever and however often they are drawn (a resumed run, a prefetch guess), and differ
    when any of the three differs. The hard negatives are train.asfr_hard_negatives distinct images of the record's
    list (all of them when it has fewer), drawn afresh each step, each with the label the training
    set knows for that image. Catches: the step or the rank left out of the seed; the labels not following the picked
    images (`negative_label[:len(picked)]`); the record's first k negatives always (`list(range(k))`); k not capped at
    the record's count (`min(k, n)` -> `k`: a ValueError)."""
    darn = TrainSet(mini_root, "9_asfr_DARN")
    indices = list(range(min(8, len(darn))))
    negatives_of = {e["id"]: e["negative_image"] for e in (darn.example(i, random.Random(0)) for i in indices)}
    assert min(len(n) for n in negatives_of.values()) > 2, "the records need more negatives than are drawn"

    def draw(seed=0, step=5, rank=1, k=2):
        cfg = Config()
        cfg.train.seed, cfg.train.asfr_hard_negatives = seed, k
        return train_module.batch_examples(darn, indices, cfg, step, rank)

    assert draw() == draw()
    assert draw(step=6) != draw() and draw(rank=0) != draw() and draw(seed=1) != draw()
    firsts = set()
    for step in range(10):
        for k in (2, 1000):
            for e in draw(step=step, k=k):
                listed = negatives_of[e["id"]]
                assert len(e["negative_image"]) == min(k, len(listed)) == len(set(e["negative_image"]))
                assert set(e["negative_image"]) <= set(listed)
                assert e["negative_label"] == [darn.label_of.get(p) for p in e["negative_image"]]
        firsts.add(tuple(draw(step=step)[0]["negative_image"]))
    assert len(firsts) > 5, firsts


def step_script(tmp_path, tiny_backbone, body):
    """A torchrun script: this rank's full-training tiny encoder config in `cfg`, then `body`, then the process group
    destroyed (left to the interpreter's exit, gloo's threads can abort a rank: "terminate called without an active
    exception", exit -6)."""
    script = tmp_path / "step.py"
    script.write_text(
        "import json, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from config import Config\nfrom model import build_encoder\n"
        "from plumbing import average_gradients, setup_distributed\nfrom train import cached_step\n"
        "setup_distributed()\nrank = dist.get_rank()\n"
        "cfg = Config()\n"
        f"cfg.model.backbone, cfg.model.trainable, cfg.model.image_pixels = {tiny_backbone!r}, 'full', 64 * 64\n"
        + body + "dist.destroy_process_group()\n")
    return script


def test_three_processes_average_bf16_and_fp32_gradients_each_in_its_parameters_dtype(tmp_path):
    """model.fp32_trainable=false (configs/release.yaml) on a GPU keeps the token vectors and the calibrator in bf16
    beside the fp32 LoRA adapters. Three gloo processes hold a bf16 and an fp32 parameter with gradients that differ
    by rank (rank 1's bf16 parameter has none: a step that did not use it); after average_gradients each parameter's
    gradient has its parameter's dtype and is the ranks' mean, worked out here from the same seeded values. A list of
    bf16 parameters alone (trainable=full with fp32_trainable=false) is averaged in fp32 too and rounded once: the mean
    of three bf16 gradients, summed and divided in bf16, would be rounded up to three times.
    Catches: the average assigned in the fp32 buffer's dtype (`.to(p.dtype, copy=True)` -> `.clone()`: torch refuses
    an fp32 gradient for a bf16 parameter, and release.yaml stopped at its first step on 2 or more GPUs); the buffer
    left in the gradients' dtype (`.float()` dropped from the torch.cat: the bf16-only list averaged in bf16)."""
    script = tmp_path / "average.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from plumbing import average_gradients, setup_distributed\n"
        "setup_distributed()\nrank = dist.get_rank()\n"
        "params = [torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(5))]\n"
        "alone = [torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))]\n"
        "g = torch.Generator().manual_seed(rank)\n"
        "a, b, c = torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(64, generator=g)\n"
        "params[0].grad = a.bfloat16() if rank != 1 else None\n"
        "params[1].grad, alone[0].grad = b, c.bfloat16()\n"
        "average_gradients(params)\n"
        "average_gradients(alone)\n"
        f"torch.save([p.grad for p in params + alone], f'{tmp_path}/rank{{rank}}.pt')\n"
        "dist.destroy_process_group()\n")   # as step_script does
    torchrun(script, nproc=3)
    drawn = []
    for rank in range(3):
        g = torch.Generator().manual_seed(rank)
        drawn.append([torch.randn(4, 3, generator=g).bfloat16(), torch.randn(5, generator=g),
                      torch.randn(64, generator=g).bfloat16()])
    # Each mean worked out in float64 (the bf16 sums are exact there), then rounded to fp32 and to the dtype.
    expected = [((drawn[0][0].double() + drawn[2][0].double()) / 3).float().bfloat16(),
                (sum(d[1].double() for d in drawn) / 3).float(),
                (sum(d[2].double() for d in drawn) / 3).float().bfloat16()]
    for rank in range(3):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.bfloat16]
        assert torch.equal(grads[0], expected[0]) and torch.equal(grads[2], expected[2])
        assert torch.allclose(grads[1], expected[1], rtol=1e-6, atol=0)


def test_a_steps_logged_statistics_over_ranks_by_hand():
    """Without gathered negatives a rank whose records were all unreadable returns no stats and adds zero
    gradients, so the averaged gradients descend (rank 0's loss + 0) / 2: that is the logged loss. The gate mean
    weights each rank by its queries; a model without calibrator logs none. Catches: the mean taken over the ranks
    that kept records (`len(per_rank)` -> `len(kept)`); an unweighted gate mean; samples of rank 0 only."""
    a = {"loss": 3.0, "contrastive": 2.0, "reg": 1.0, "samples": 1, "gate_mean": 0.2}
    b = {"loss": 5.0, "contrastive": 4.5, "reg": 0.5, "samples": 3, "gate_mean": 0.6}
    assert across_ranks([a, None]) == {"loss": 1.5, "contrastive": 1.0, "reg": 0.5, "samples": 1, "gate_mean": 0.2}
    both = across_ranks([a, b, None])
    assert (both["loss"], both["contrastive"], both["reg"], both["samples"]) == (8 / 3, 6.5 / 3, 0.5, 4)
    assert both["gate_mean"] == pytest.approx((0.2 * 1 + 0.6 * 3) / 4)
    assert across_ranks([dict(a, gate_mean=None)])["gate_mean"] is None and across_ranks([None, None]) == {}


def test_rank_with_no_readable_record_still_joins_gathered_negatives(tiny_backbone, tmp_path):
    """With train.gather_negatives every rank must take part in the gathers. Rank 1's only record is unreadable;
    before it joined with no rows, rank 0 waited on it forever. Both ranks must end with the gradient that rank
    0's three records give in a single process, regularisers included (rank 0's share is its sum over the global
    batch per rank, 3 / 2 = 1.5: a count the world size does not divide), and rank 1 still reports the global
    contrastive loss, so the step's logged loss (across_ranks) is the single process's. Both ranks record rank 1's
    unreadable record (record_bad_records), so both skip it from then on and save it in the checkpoint.
    Catches: the regulariser divided by rank 0's own count (`sum(q_counts) / size` -> `q.shape[0]`) or by a floored
    share (`sum(q_counts) // size`: 1); rank 1 returning no stats (None); the logged loss rank 0's alone (twice the
    regulariser's mean); each rank recording only the unreadable records it found itself (`gather_list(bad)` ->
    `bad` in record_bad_records)."""
    examples = make_examples(tmp_path, 4)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    examples[3]["target_image"] = str(tmp_path / "broken.png")
    (tmp_path / "batches.json").write_text(json.dumps([examples[:3], examples[3:]]))
    script = step_script(tmp_path, tiny_backbone,
        "cfg.train.gather_negatives = True\n"
        "torch.manual_seed(0)\nencoder = build_encoder(cfg.model, cfg.calibrator, 'cpu').train()\n"
        f"batch = json.load(open({str(tmp_path / 'batches.json')!r}))[rank]\n"
        "stats, bad = cached_step(encoder, batch, cfg, 2)\n"
        "from train import record_bad_records\nfound = set()\n"
        "record_bad_records(found, '9_asfr_DARN', bad, rank, cfg)\n"
        "average_gradients([p for p in encoder.parameters() if p.requires_grad])\n"
        "grads = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}\n"
        f"torch.save({{'stats': stats, 'bad': bad, 'found': found, 'grads': grads}}, f'{tmp_path}/rank{{rank}}.pt')\n")
    torchrun(script)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (rank0["stats"]["samples"], rank1["stats"]["samples"], rank1["stats"]["reg"]) == (3, 0, 0.0)
    assert rank1["bad"][0][0] == ["r3"] and "broken.png" in rank1["bad"][0][1]
    assert rank0["found"] == rank1["found"] == {"9_asfr_DARN/r3"}

    cfg = full_training_config(tiny_backbone)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    stats, _ = cached_step(encoder, examples[:3], cfg, 2)
    assert stats["reg"] > 1e-3                  # the regularisers take part
    logged = across_ranks([rank0["stats"], rank1["stats"]])
    for name in ("loss", "contrastive", "reg", "samples", "gate_mean"):
        assert logged[name] == pytest.approx(stats[name], abs=1e-5), name
    assert rank1["stats"]["contrastive"] == pytest.approx(stats["contrastive"], abs=1e-5)
    expected = grads(encoder)
    assert len(expected) > 10
    for name, grad in expected.items():
        torch.testing.assert_close(rank0["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
        assert torch.equal(rank0["grads"][name], rank1["grads"][name]), name


def test_three_processes_with_uneven_batches_step_like_one_process(tiny_backbone, tmp_path):
    """Data parallel, one step: 3 processes holding 1, 2 and 3 records (as after skipping unreadable ones) against
    one process on the same 6 records. With train.gather_negatives the averaged gradient must equal one process's
    on all 6 (every query sees all targets); without, it must equal the mean of the three parts' gradients, each
    with its own negatives. Each record has an asfr hard negative labelled like another record's positive, some on
    other ranks (the mask crosses ranks): gathered, the targets are rank 0's positives and negatives, then rank 1's,
    then rank 2's. Three ranks, because two cannot tell a running sum of the target counts from the previous
    rank's count alone.
    Catches: gradients summed instead of averaged in average_gradients; every rank's positives indexing rank 0's
    targets (`t_starts[r] + i` -> `i` in cached_step); a rank's positives placed by the query counts (`t_counts` ->
    `q_counts` in t_starts); t_starts from the previous rank's count, not the running sum (`np.cumsum(...)` ->
    `[0] + t_counts[:-1]`); each rank's gathered rows cut to its own count (`part[:n]` -> `part[:x.shape[0]]` in
    gather_keep_local); the world-size scaling of the embedding gradients dropped; with gather, the regularisers
    averaged over each rank's own records (`reg_batch = q.shape[0]`: ranks of 1 and 3 records weighted alike)."""
    bounds = [0, 1, 3, 6]
    examples = add_hard_negatives(tmp_path, make_examples(tmp_path, bounds[-1]), 1)
    (tmp_path / "examples.json").write_text(json.dumps(examples))
    script = step_script(tmp_path, tiny_backbone,
        "torch.manual_seed(0)\nencoder = build_encoder(cfg.model, cfg.calibrator, 'cpu').train()\n"
        "torch.manual_seed(1)\n"
        "with torch.no_grad():\n"
        "    for n, p in encoder.named_parameters():\n"
        "        if 'hyper' in n: p.add_(0.05 * torch.randn_like(p))\n"
        f"bounds = {bounds!r}\n"
        f"batch = json.load(open({str(tmp_path / 'examples.json')!r}))[bounds[rank]:bounds[rank + 1]]\n"
        "params = [p for p in encoder.parameters() if p.requires_grad]\n"
        "out = {}\n"
        "for gather in (False, True):\n"
        "    cfg.train.gather_negatives = gather\n"
        "    encoder.zero_grad(set_to_none=True)\n"
        "    stats, _ = cached_step(encoder, batch, cfg, 1)\n"
        "    average_gradients(params)\n"
        "    out[gather] = {'contrastive': stats['contrastive'],\n"
        "                   'grads': {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}}\n"
        f"torch.save(out, f'{tmp_path}/rank{{rank}}.pt')\n")
    torchrun(script, nproc=3)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3)]

    cfg = full_training_config(tiny_backbone)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    perturb(encoder)                               # the same perturbation as the script's
    whole, _ = cached_step(encoder, examples, cfg, 2)
    expected_gathered = grads(encoder)
    parts = []
    for start, end in zip(bounds, bounds[1:]):
        encoder.zero_grad(set_to_none=True)
        stats, _ = cached_step(encoder, examples[start:end], cfg, 2)
        parts.append((stats["contrastive"], grads(encoder)))
    expected_local = {n: sum(part[1][n] for part in parts) / 3 for n in expected_gathered}
    assert len(expected_gathered) > 10
    for rank, result in enumerate(ranks):
        assert result[True]["contrastive"] == pytest.approx(whole["contrastive"], abs=1e-5)
        assert result[False]["contrastive"] == pytest.approx(parts[rank][0], abs=1e-5)
        for name in expected_gathered:
            torch.testing.assert_close(result[True]["grads"][name], expected_gathered[name], atol=2e-5, rtol=1e-3,
                                       msg=lambda m, name=name: f"gathered {name}: {m}")
            torch.testing.assert_close(result[False]["grads"][name], expected_local[name], atol=2e-5, rtol=1e-3,
                                       msg=lambda m, name=name: f"local {name}: {m}")


def test_throughput_benchmark_feeds_training_views_in_the_training_format(mini_root, tmp_path):
    from train_throughput import synthetic_batch
    view = TrainSet(mini_root, "7_cir_FashionIQ-Dress").example(0, random.Random(0))
    assert set(synthetic_batch(str(tmp_path), 2)[0]) == set(view)


def test_throughput_row_by_hand(monkeypatch, capsys):
    """train_throughput.run_setting and measure, the step replaced by one of given durations (warm-up 10 s, then 1,
    3, 2 s: median 2 s, of which 0.25 s no-grad and 0.5 s replay), 2 x 10 x 100 x 1000 = 2e6 FLOPs, on a batch of 8
    with a peak of 4e-6 TFLOP/s and memory 100 MiB before, 3072 MiB at the peak: 4 samples/s, 1.25 s other,
    1e-6 TFLOP/s, utilisation 0.25, 3.00 GiB printed. Catches: the warm-up step in the median; samples/s per chunk
    instead of per batch; FLOPs scaled by other than 1e12, multiplied by the time, or MFU not divided by the peak;
    "other" less one phase only; peak and before swapped, or MiB printed as GB."""
    import train_throughput
    clock, durations = [0.0], iter([10.0, 1.0, 3.0, 2.0, 100.0])

    def phase(seconds):
        def run():
            clock[0] += seconds
        return run

    def step(encoder, cfg, examples, chunk, params, optimizer, scheduler, prefetch=None):
        train_module.embed_without_graph()
        train_module.replay_with_graph()
        clock[0] += next(durations) - 0.75
        torch.ones(10, 100) @ torch.ones(100, 1000)
        return {"loss": 1.5}
    monkeypatch.setattr(train_module, "embed_without_graph", phase(0.25))
    monkeypatch.setattr(train_module, "replay_with_graph", phase(0.5))
    monkeypatch.setattr(train_throughput, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(train_throughput, "step", step)
    monkeypatch.setattr(train_throughput, "build_encoder", lambda *args: torch.nn.Linear(2, 2))
    monkeypatch.setattr(train_throughput, "reset_peak_memory", lambda device: None)
    memory = iter([100.0, 3072.0])
    monkeypatch.setattr(train_throughput, "peak_memory_mb", lambda device: next(memory))
    rows = []
    train_throughput.run_setting(rows, "ours", Config(), [{}] * 8, [4], SimpleNamespace(peak_tflops=4e-6, steps=3),
                                 torch.device("cpu"))
    row = rows[0]
    assert (row["seconds_per_step"], row["samples_per_s"], row["other_seconds"]) == (2, 4, 1.25)
    assert row["phase_seconds"] == {"data": 0, "no-grad": 0.25, "loss": 0, "replay": 0.5}
    assert row["tflop_per_step"] == pytest.approx(2e-6) and row["achieved_tflops"] == pytest.approx(1e-6)
    assert row["utilisation"] == pytest.approx(0.25)
    assert (row["peak_memory_mib"], row["memory_before_mib"], row["loss"]) == (3072, 100, 1.5)
    cells = [c.strip() for c in capsys.readouterr().out.split("|")]
    assert cells[5] == "4.0" and cells[13] == "25.0%" and cells[14] == "3.00" and cells[15] == "0.10"


def test_throughput_chunk_size_that_fails_is_recorded_and_the_next_one_runs(monkeypatch, capsys):
    """train_throughput.run_setting: a chunk size whose measurement runs out of memory becomes an error row naming the
    error's first line, the next chunk size is still measured, save() gets the rows after each chunk size (a run cut
    short keeps them), and the ratios leave the failed row out.
    Catches: the error not caught (`except RuntimeError` -> `except ValueError`: nothing after it is measured);
    save() only at the end (`save(rows)` after the loop); the ratios over error rows (`measured = rows`: KeyError)."""
    import train_throughput

    def measure(encoder, cfg, examples, chunk, steps, device):
        if chunk == 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return 2.0, dict.fromkeys(["data", "no-grad", "loss", "replay"], 0.0), 100.0, 200.0, 1e12, {"loss": 1.0}, 0
    monkeypatch.setattr(train_throughput, "measure", measure)
    monkeypatch.setattr(train_throughput, "build_encoder", lambda *args: torch.nn.Linear(2, 2))
    rows, saved = [], []
    train_throughput.run_setting(rows, "ours", Config(), [{}] * 8, [64, 16], SimpleNamespace(peak_tflops=0, steps=3),
                                 torch.device("cpu"), lambda rows: saved.append([r["chunk"] for r in rows]))
    assert saved == [[64], [64, 16]]
    assert rows[0] == {"setting": "ours", "chunk": 64, "batch": 8,
                       "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert rows[1]["samples_per_s"] == 4.0
    capsys.readouterr()
    train_throughput.print_ratios(rows + [dict(rows[1], setting="release", samples_per_s=1.0),
                                          dict(rows[0], setting="release")])
    assert capsys.readouterr().out == "chunk 16: ours / release samples/s = 4.00x, peak memory 1.00x\n"


def test_throughput_ratios_are_ours_over_the_release(capsys):
    """A chunk size only the release measured (ours ran out of memory there) has no ratio.
    Catches: the samples/s or peak-memory ratio inverted, or taken at another chunk size; a ratio looked up for a
    chunk size ours lacks (KeyError: the run ends without its ratios)."""
    from train_throughput import print_ratios
    rows = [{"setting": s, "chunk": c, "samples_per_s": v, "peak_memory_mib": m}
            for s, c, v, m in [("ours", 8, 30, 1000), ("ours", 16, 90, 1), ("release", 8, 20, 4000),
                               ("release", 64, 10, 9000)]]
    print_ratios(rows)
    assert capsys.readouterr().out == "chunk 8: ours / release samples/s = 1.50x, peak memory 0.25x\n"


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                                          ("NVIDIA H800 PCIe", 756), ("NVIDIA H800", 989),
                                          ("NVIDIA A800-SXM4-80GB", 312),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L40S", 362), ("NVIDIA L40", 181),
                                          ("NVIDIA L4", 121), ("NVIDIA A10", 125), ("NVIDIA GeForce RTX 4090", 165),
                                          ("Tesla T4", None)])
def test_bf16_peak_by_gpu_name(monkeypatch, name, tflops):
    """Dense bf16 peaks from the vendors' data sheets (half the "with sparsity" figure), by the name CUDA reports.
    Catches: a short name listed before a longer one containing it (H100 before H100 PCIe, L4 before L40); the name
    searched in the key instead of the key in the name."""
    from encode_throughput import peak_tflops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda"), 0.0) == tflops
    assert peak_tflops(torch.device("cuda"), 500.0) == 500.0 and peak_tflops(torch.device("cpu"), 0.0) is None


def stub_encode_real_arch(monkeypatch, tiny_backbone, median_seconds, flops=0):
    """benchmarks/encode_throughput.py for its --real-arch tests: the 4B build replaced by a copy of the tiny backbone,
    each measurement's seconds given by median_seconds(fn, repeats), every FLOP count `flops`. Returns the module."""
    import encode_throughput

    class Counter(contextlib.nullcontext):
        def __init__(self, display):
            super().__init__(self)

        def get_total_flops(self):
            return flops
    monkeypatch.setattr(encode_throughput, "random_qwen3vl_4b", lambda out, *args: shutil.copytree(tiny_backbone, out))
    monkeypatch.setattr(encode_throughput, "median_seconds", median_seconds)
    monkeypatch.setattr(encode_throughput, "FlopCounterMode", Counter)
    return encode_throughput


def test_encode_benchmark_rates_utilisation_and_ratios_by_hand(tiny_backbone, monkeypatch, tmp_path, capsys):
    """encode_throughput --real-arch on the tiny backbone (CPU), the timings given (ours: encode 2 s, train 4 s;
    release: encode 8 s, train 10 s) and 6e12 FLOPs per measurement, batch 4, chunk 2, peak 10 TFLOP/s: images/s
    2.0, 0.5, 0.5, 0.2; TFLOP/s 3, 1.5, 0.75, 0.6; MFU 30%, 15%, 7.5%, 6%; ours / release 4.00x encoding, 2.50x
    training. Catches: TFLOP/s not divided by the time, MFU not in percent, images/s of the batch for the chunk, the
    ratio inverted."""
    seconds = iter([2.0, 4.0, 8.0, 10.0])
    encode_throughput = stub_encode_real_arch(monkeypatch, tiny_backbone, lambda fn, repeats: next(seconds), 6e12)
    monkeypatch.setattr(encode_throughput, "compare_vision_attention", lambda *args: None)
    args = SimpleNamespace(device="cpu", text_layers=None, vision_depth=None, pixels=4096, batch_size=4, train_chunk=2,
                           repeats=1, peak_tflops=10.0)
    encode_throughput.real_arch(args, str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    measured = [line.split()[-4:-1] for line in lines if line.split()[0] in ("ours", "release")]
    assert measured == [["2.0", "3.00", "30.0%"], ["0.5", "1.50", "15.0%"], ["0.5", "0.75", "7.5%"],
                        ["0.2", "0.60", "6.0%"]]
    assert [line.split()[-1] for line in lines if "ours / release" in line] == ["4.00x", "2.50x"]


def test_encode_benchmark_measures_the_rest_after_one_measurement_fails(tiny_backbone, monkeypatch, tmp_path, capsys):
    """encode_throughput --real-arch where ours' encoding fails (as the packed attention's varlen kernel could on its
    first run on a GPU, or a batch out of memory): that row says "failed" with the error's first line, the other
    three are measured, only training gets an ours / release ratio, and a failing packed-vs-transformers comparison
    is one more "failed" line, not the end of the run (the GPU session's encoding stage then still reports the
    release's rows). Catches: the measurement's `except RuntimeError` removed (the run ends at the first row); the
    ratio printed without both rates (a KeyError); compare_vision_attention's failure not caught."""
    def seconds(fn, repeats, timings=iter([None, 4.0, 8.0, 10.0])):
        timing = next(timings)
        if timing is None:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore detail")
        return timing

    def compare(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    encode_throughput = stub_encode_real_arch(monkeypatch, tiny_backbone, seconds, 6e12)
    monkeypatch.setattr(encode_throughput, "compare_vision_attention", compare)
    args = SimpleNamespace(device="cpu", text_layers=None, vision_depth=None, pixels=4096, batch_size=4, train_chunk=2,
                           repeats=1, peak_tflops=10.0)
    encode_throughput.real_arch(args, str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(maxsplit=1) for line in lines if line.split()[0] in ("ours", "release")]
    assert [setting for setting, _ in rows] == ["ours", "ours", "release", "release"]
    work, error = rows[0][1].split(" failed: ")
    assert work.strip() == "encode, batch 4"
    assert error == "RuntimeError: CUDA error: no kernel image is available for execution on the device"
    assert [row.split()[-4] for _, row in rows[1:]] == ["0.5", "0.5", "0.2"]
    assert [line.strip() for line in lines if "ours / release" in line] == [
        "train fwd+bwd, chunk 2: ours / release images/s = 2.50x"]
    assert lines[-1] == ("  vision attention, encode: failed: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                         "2.00 GiB")


def test_encode_benchmark_runs_the_random_4b_end_to_end():
    """`encode_throughput.py --real-arch`, the GPU session's encoding stage, run for real on the CPU with the towers
    cut (1 text layer, 2 vision blocks; about 25 s and 4 GiB, in its own process): fake_backbones.random_qwen3vl_4b
    builds Qwen3-VL-4B's architecture, saves it with the tiny backbone's tokenizer and loads it back through
    from_pretrained; every measurement runs (none says "failed"), and the packed vision attention gives transformers'
    embeddings at the 4B's head size. The other tests of this script stub the 4B build out. Catches: the 4B config
    without the tiny tokenizer's image and video token ids (`dict(QWEN3_VL_4B)`: "Image features and image tokens do
    not match", on a GPU machine after minutes of setup); the packed attention without the rotary embedding
    (`apply_rotary_pos_emb_vision` dropped: cosine 0.9985)."""
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "encode_throughput.py"), "--real-arch",
                          "--device", "cpu", "--text-layers", "1", "--vision-depth", "2", "--repeats", "1",
                          "--batch-size", "2", "--train-chunk", "2", "--pixels", "4096"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["ours"], ["release"])]
    assert [row[0] for row in rows] == ["ours", "ours", "release", "release"] and "failed" not in run.stdout, lines
    assert all(float(row[-4]) > 0 for row in rows), rows
    cosine = float(re.search(r"embeddings' cosine packed vs transformers' min (\S+)", run.stdout).group(1))
    assert cosine > 0.99999, run.stdout     # 1.000000 as printed; 0.9985 without the rotary embedding


class QueuedGpu:
    """A clock and a GPU stream as the benchmarks see them: queue(s) returns at once, the work runs only when the
    host synchronises (the clock then advances by everything queued)."""

    def __init__(self):
        self.now, self.queued = 0.0, 0.0

    def perf_counter(self):
        return self.now

    def queue(self, seconds):
        self.queued += seconds

    def synchronize(self, device=None):
        self.now, self.queued = self.now + self.queued, 0.0


def test_throughput_phase_timer_charges_a_phase_only_its_own_queued_work(monkeypatch):
    """On a GPU a phase returns before its kernels run: 2 s of the step queued before the no-grad pass, 0.5 s queued
    by it, 1 s after it: the phase took 0.5 s. After the block (also one left by an error, as a chunk size out of
    memory is) train.py's functions are its own again. Catches: no synchronisation at the phase's start (the 2 s
    before it charged to it) or at its end (0 s); the originals not put back."""
    import train_throughput
    gpu, originals = QueuedGpu(), {name: getattr(train_module, name) for name in train_throughput.PHASES}
    monkeypatch.setattr(train_throughput, "time", gpu)
    monkeypatch.setattr(train_throughput, "synchronize", gpu.synchronize)
    monkeypatch.setattr(train_module, "embed_without_graph", lambda: gpu.queue(0.5))
    seconds = dict.fromkeys(train_throughput.PHASES.values(), 0.0)
    originals["embed_without_graph"] = train_module.embed_without_graph
    with pytest.raises(RuntimeError, match="out of memory"):
        with train_throughput.phase_timers(torch.device("cuda"), seconds):
            gpu.queue(2.0)
            train_module.embed_without_graph()
            gpu.queue(1.0)
            raise RuntimeError("CUDA out of memory")
    assert seconds == {"data": 0.0, "no-grad": 0.5, "loss": 0.0, "replay": 0.0}
    assert {name: getattr(train_module, name) for name in train_throughput.PHASES} == originals


def test_throughput_on_a_gpu_by_hand(monkeypatch):
    """run_setting on a (simulated) GPU whose step only queues its work: warm-up 10 s, then steps of 1, 5, 2 s (median
    2 s; a step fewer would give 3 s), each running pass 1 twice (queries, then targets) for 2 x 0.2, 2 x 0.05, 2 x
    0.15 s (median 0.3 s; the warm-up's 2 x 2 s would make it 0.4 s), on a batch of 8 on an "NVIDIA H200" (989
    TFLOP/s by its name). Memory: the peak counter reset, then read for "before", then after the timed steps. Host
    syncs: the step makes 3 "synchronizing" warnings from one line (and one other warning) while the sync debug mode
    is "warn", which is set back to "default". Catches: the step's time read before the GPU finished (no
    synchronisation at its end); a step fewer timed; a phase's time replaced, not added, by its second call; the
    warm-up in the phases' medians; the peak taken from --peak-tflops only; the peak counter not reset before
    "before" is read; warnings of one line counted once, or every warning counted; the debug mode left on."""
    import train_throughput
    gpu, events, modes = QueuedGpu(), [], []
    durations, no_grad = iter([10.0, 1.0, 5.0, 2.0, 0.0, 0.0]), iter([2.0, 0.2, 0.05, 0.15, 0.0, 0.0])

    def step(encoder, cfg, examples, chunk, params, optimizer, scheduler, prefetch=None):
        events.append("step")
        seconds = next(no_grad)
        for _ in range(2):
            train_module.embed_without_graph(seconds)
        gpu.queue(next(durations) - 2 * seconds)
        for message in ["called a synchronizing CUDA operation"] * 3 + ["something else"]:
            if modes[-1:] == ["warn"]:
                warnings.warn(message)
        return {"loss": 1.0}
    monkeypatch.setattr(train_throughput, "time", gpu)
    monkeypatch.setattr(train_throughput, "synchronize", gpu.synchronize)
    monkeypatch.setattr(train_module, "embed_without_graph", gpu.queue)
    monkeypatch.setattr(train_throughput, "step", step)
    monkeypatch.setattr(train_throughput, "build_encoder", lambda *args: torch.nn.Linear(2, 2))
    monkeypatch.setattr(train_throughput, "reset_peak_memory", lambda device: events.append("reset"))
    monkeypatch.setattr(train_throughput, "peak_memory_mb", lambda device: events.append("read") or 1024.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    rows = []
    train_throughput.run_setting(rows, "ours", Config(), [{}] * 8, [4], SimpleNamespace(peak_tflops=0.0, steps=3),
                                 torch.device("cuda"))
    row = rows[0]
    assert (row["seconds_per_step"], row["samples_per_s"], row["peak_tflops"]) == pytest.approx((2.0, 4.0, 989.0))
    assert row["phase_seconds"]["no-grad"] == pytest.approx(0.3)
    assert events == ["reset", "read"] + ["step"] * 4 + ["read"] + ["step"] * 2
    assert row["host_syncs_per_step"] == 3 and modes == ["warn", "default"]


def test_throughput_row_without_a_known_peak_printed_and_saved(monkeypatch, capsys, tmp_path):
    """Two settings measured as given (4 s a step, phases 0.125, 0.25, 0.5, 1 s, 8e12 FLOPs, 2048 MiB before and
    5120 MiB at the peak, no host-sync count) on a CPU with no --peak-tflops: every cell of the printed row by hand,
    utilisation None (no MFU, "-"), both settings starting from the same initial weights, and --json holding the
    setup line, the steps and every row so far. Catches: a phase printed in another's column; "before" in units of
    1000; utilisation 0 (or a number) without a peak; the seed not reset per setting; the last row left out of the
    JSON, or the JSON not written."""
    import train_throughput
    weights = []

    def measure(encoder, cfg, examples, chunk, steps, device):
        weights.append(encoder.weight.detach().clone())
        phases = {"data": 0.125, "no-grad": 0.25, "loss": 0.5, "replay": 1.0}
        return 4.0, phases, 2048.0, 5120.0, 8e12, {"loss": 1.0}, None
    monkeypatch.setattr(train_throughput, "measure", measure)
    monkeypatch.setattr(train_throughput, "build_encoder", lambda *args: torch.nn.Linear(2, 2))
    args = SimpleNamespace(peak_tflops=0.0, steps=3, json=str(tmp_path / "out.json"))
    rows = []
    for name in ("ours", "release"):
        torch.rand(3)                                  # the random state moves on between the settings
        train_throughput.run_setting(rows, name, Config(), [{}] * 8, [16], args, torch.device("cpu"),
                                     lambda rows: train_throughput.save_json(args, "the setup", rows))
    cells = [c.strip() for c in capsys.readouterr().out.splitlines()[0].split("|")[1:-1]]
    assert cells == ["ours", "16", "8", "4.000", "2.0", "0.125", "0.250", "0.500", "1.000", "2.125", "8.000", "2.00",
                     "-", "5.00", "2.00", "-"]
    assert rows[0]["utilisation"] is None and torch.equal(weights[0], weights[1])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert (saved["setup"], saved["steps"]) == ("the setup", 3)
    assert [r["setting"] for r in saved["rows"]] == ["ours", "release"]
    assert saved["rows"][1]["utilisation"] is None and saved["rows"][1]["achieved_tflops"] == 2.0


def test_throughput_step_trains_and_uses_the_prefetched_batch(tiny_backbone, tmp_path):
    """train_throughput.step on the tiny backbone with one prefetch thread, two steps: the second step's batch was
    prepared during the first (a hit), and every step changes the trainable weights (AdamW ran) and returns the
    loss. Catches: the optimizer step left out of the timed step (its time, and AdamW's state in the peak memory,
    missing); no guess of the next batch (every chunk prepared in the step: "data" measured for a path training
    does not take)."""
    import train_throughput
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [f"model.backbone={tiny_backbone}",
                                                                   "model.image_pixels=4096"])
    examples = train_throughput.synthetic_batch(str(tmp_path), 4)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with StepPrefetch(1, encoder) as prefetch:
        for _ in range(2):
            before = [p.detach().clone() for p in params]
            stats = train_throughput.step(encoder, cfg, examples, 2, params, optimizer, scheduler, prefetch)
            assert stats["loss"] > 0 and any(not torch.equal(a, p) for a, p in zip(before, params))
    assert (prefetch.hits, prefetch.misses) == (1, 0)


def test_throughput_real_arch_runs_ours_then_the_release_and_prints_their_ratio(tiny_backbone, monkeypatch, capsys,
                                                                               tmp_path):
    """train_throughput --real-arch (the 4B build replaced by the tiny backbone, each setting's measurement by rows
    whose samples/s and peak memory are given): "ours" is configs/full.yaml (normed readout, no per-chunk
    regulariser), "release" configs/release.yaml (neither), in that order, on one synthetic batch of
    train.batch_size, and the run ends with ours / release at each chunk size: 3 / 2 samples/s, 10 / 40 GiB.
    Catches: the two configs swapped (every ratio inverted); the ratio lines not printed."""
    import train_throughput
    seen = []

    def run_setting(rows, name, cfg, examples, chunks, args, device, save):
        seen.append((name, cfg.model.normed_readout, cfg.calibrator.reg_per_chunk, len(examples)))
        for chunk in chunks:
            rows.append({"setting": name, "chunk": chunk, "samples_per_s": 3.0 if name == "ours" else 2.0,
                         "peak_memory_mib": 10240.0 if name == "ours" else 40960.0})
    monkeypatch.setattr(train_throughput, "random_qwen3vl_4b", lambda out, *args: shutil.copytree(tiny_backbone, out)
                        and 5e6)
    monkeypatch.setattr(train_throughput, "run_setting", run_setting)
    args = SimpleNamespace(device="cpu", text_layers=None, vision_depth=None, peak_tflops=0.0, steps=1, chunks=[2, 4],
                           overrides=["train.batch_size=4"], json="")
    train_throughput.real_arch(args, str(tmp_path))
    assert seen == [("ours", True, False, 4), ("release", False, True, 4)]
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "chunk 2: ours / release samples/s = 1.50x, peak memory 0.25x",
        "chunk 4: ours / release samples/s = 1.50x, peak memory 0.25x"]


def test_encode_median_seconds_waits_for_the_gpu_and_leaves_out_the_warm_up(monkeypatch):
    """encode_throughput.median_seconds on a (simulated) GPU whose work only queues: runs of 10 s (the warm-up),
    then 1, 5, 2 s: 2 s. Catches: no warm-up run (10 s timed: 5 s), a repeat fewer (3 s), the mean (2.67 s), the time
    read before the GPU finished (0 s)."""
    import encode_throughput
    gpu, durations = QueuedGpu(), iter([10.0, 1.0, 5.0, 2.0])
    monkeypatch.setattr(encode_throughput, "time", gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", gpu.synchronize)
    assert encode_throughput.median_seconds(lambda: gpu.queue(next(durations)), 3) == 2.0


def test_encode_benchmark_measures_each_readout_with_its_own_attention_and_mode(tiny_backbone, monkeypatch, tmp_path):
    """encode_throughput --real-arch where the vision attention is packed (as model.vision_attention=auto on a GPU):
    each measurement's readout, attention and train/eval mode, in order: ours (normed readout, packed attention)
    encoding in eval mode and a training chunk in train mode, then the release's (pre-norm readout, transformers'
    attention) likewise, then the attention comparison with our readout, packed and not, in eval mode.
    Catches: the release measured with the packed attention, or with our readout; encoding timed in train mode
    (dropout); the comparison run with the release's readout (the last one set)."""
    import encode_throughput
    seen = []

    class Encoder(encode_throughput.FashionLensEncoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pack_vision_attention(True)
            seen.append(self)

    def median_seconds(fn, repeats):
        encoder = seen[0]
        seen.append((encoder.model_cfg.normed_readout, encoder.vision_attention_packed, encoder.training))
        fn()
        return 1.0
    stub_encode_real_arch(monkeypatch, tiny_backbone, median_seconds)
    monkeypatch.setattr(encode_throughput, "FashionLensEncoder", Encoder)
    args = SimpleNamespace(device="cpu", text_layers=None, vision_depth=None, pixels=4096, batch_size=2, train_chunk=2,
                           repeats=1, peak_tflops=0.0)
    encode_throughput.real_arch(args, str(tmp_path))
    assert seen[1:] == [(True, True, False), (True, True, True), (False, False, False), (False, False, True),
                        (True, True, False), (True, False, False)]


def test_encode_vision_attention_comparison_by_hand(monkeypatch, capsys):
    """compare_vision_attention with an encoder whose embeddings are given: 6 images encoded in 2 s packed and 4 s
    with transformers' attention: 3.0 and 1.5 images/s, 2.00x; embeddings [1, 0], [0.6, 0.8] packed against [0.6,
    0.8] twice: cosines 0.6 and 1, minimum 0.6. Catches: the images counted along the wrong axis of input_ids; the
    ratio inverted; an embedding compared with itself (cosine 1 whatever the attention); the maximum reported."""
    import encode_throughput
    emb = {True: torch.tensor([[1.0, 0.0], [0.6, 0.8]]), False: torch.tensor([[0.6, 0.8], [0.6, 0.8]])}

    class Encoder:
        def pack_vision_attention(self, packed):
            self.packed = packed

        def eval(self):
            pass

        def __call__(self, inputs, role):
            return {"emb": emb[self.packed]}
    seconds = iter([2.0, 4.0])
    monkeypatch.setattr(encode_throughput, "median_seconds", lambda fn, repeats: (fn(), next(seconds))[1])
    encode_throughput.compare_vision_attention(Encoder(), None, {"input_ids": torch.zeros(6, 3)}, 1)
    assert capsys.readouterr().out == ("  vision attention, encode: packed 3.0 images/s, transformers' 1.5 images/s "
                                       "(2.00x); embeddings' cosine packed vs transformers' min 0.600000\n")


def test_throughput_peak_memory_is_reset_per_setting(monkeypatch):
    """reset_peak_memory: on CPU the peak resident set falls back to what is resident (300 MB allocated and freed
    before it no longer count); on a GPU the allocator's cache is emptied and the peak counter of that device reset.
    Catches: another value written to /proc/self/clear_refs (4 clears soft-dirty bits, not the peak); the CUDA peak
    counter not reset (a setting's peak would include the previous setting's)."""
    import train_throughput
    block = np.ones(300 * 2 ** 20 // 8)
    del block
    high = train_module.peak_memory_mb(torch.device("cpu"))
    train_throughput.reset_peak_memory(torch.device("cpu"))
    assert train_module.peak_memory_mb(torch.device("cpu")) < high - 200
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(device))
    train_throughput.reset_peak_memory(torch.device("cuda", 1))
    assert calls == ["empty", torch.device("cuda", 1)]

# ----------------------------------------------------------------------------- whole runs on U-FIRE-mini

def run_overrides(tiny_backbone, mini_root, out_dir, *extra):
    """configs/tiny.yaml shrunk to a few sub-datasets and small batches, with GGAS active from step 0."""
    return [f"model.backbone={tiny_backbone}", f"data.root={mini_root}", f"train.out_dir={out_dir}",
            "data.sub_datasets=[1_t2i_Shoes, 9_asfr_DARN, 7_cir_FashionIQ-Dress]", "train.batch_size=4",
            "train.chunk_size=2", "train.val_max_queries=4", "train.log_every=1", "sampler.warmup_epochs=0",
            "sampler.update_every=2", "model.trainable=lora", "model.lora_dropout=0.1", *extra]


def run_config(*args):
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"), run_overrides(*args))


def logged_steps(out_dir):
    return [r["step"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if "loss" in r]


def test_the_log_gives_each_step_the_learning_rate_it_trained_with(tiny_backbone, mini_root, tmp_path):
    """Cosine schedule, warm-up 2 of 4 steps, train.lr 3e-4 (not tiny.yaml's 1e-4): the steps train at 3e-4 x 0.5, 1,
    1, 0.5 (learning_rate_factor of steps 0-3, by hand), and log.jsonl's step 1-4 records (the optimizer's rate, as
    the scheduler set it) say so. Their peak_mem_mb is the process's peak resident memory in MiB: over 100 (torch is
    loaded) and at most the peak the kernel reports after the run (/proc/self/status VmHWM, in KiB).
    Catches: the rate read after optimizer_step (each step logged the next one's: 1, 1, 0.5, 0); AdamW built with
    the default rate, not train.lr (`lr=1e-4`); train.val_every=0 validating every step (`cfg.train.val_every and
    step % cfg.train.val_every == 0` -> `step % (cfg.train.val_every or 1) == 0`); ru_maxrss (KiB on Linux) read as
    bytes (`/ 1024` -> `/ 2**20` in peak_memory_mb) or divided by 1000."""
    cfg = run_config(tiny_backbone, mini_root, tmp_path / "run", "train.max_steps=4", "train.schedule=cosine",
                     "train.warmup_steps=2", "train.val_every=0", "train.lr=3e-4")
    train(cfg)
    log = list(map(json.loads, open(tmp_path / "run" / "log.jsonl")))
    assert [r["step"] for r in log if "val" in r] == [4]                  # train.val_every=0: at the end only
    records = [r for r in log if "loss" in r]
    assert [r["lr"] for r in records] == pytest.approx([3e-4 * f for f in (0.5, 1.0, 1.0, 0.5)])
    # peak_mem_mb on a CPU: this process's peak resident memory in MiB, at most the kernel's count read afterwards.
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1))
    assert all(100 < r["peak_mem_mb"] <= peak_kib / 1024 for r in records), ([r["peak_mem_mb"] for r in records],
                                                                              peak_kib)


def test_the_log_gives_each_step_the_epoch_it_belongs_to(tiny_backbone, mini_root, tmp_path):
    """2_sketch2i_ClothesV1 alone (24 records) at batch 8 is an epoch of 24 // 8 = 3 steps: of 4 steps, steps 1-3
    are epoch 0 and step 4 is epoch 1.
    Catches: the epoch read from the sampler after the step (`sampler.epoch`: the epochs completed, so step 3, the
    last of epoch 0, logged as epoch 1)."""
    cfg = run_config(tiny_backbone, mini_root, tmp_path / "run", "data.sub_datasets=[2_sketch2i_ClothesV1]",
                     "train.batch_size=8", "train.max_steps=4", "train.log_every=1", "train.val_every=0")
    train(cfg)
    log = [r for r in map(json.loads, open(tmp_path / "run" / "log.jsonl")) if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in log] == [(1, 0), (2, 0), (3, 0), (4, 1)]


@pytest.mark.parametrize("platform, ru_maxrss", [("linux", 3 * 2**20), ("darwin", 3 * 2**30)])
def test_peak_memory_on_a_cpu_is_in_mib_on_linux_and_macos(monkeypatch, platform, ru_maxrss):
    """log.jsonl's peak_mem_mb on a CPU comes from getrusage's ru_maxrss, which Linux gives in KiB and macOS in
    bytes: a peak of 3 GiB (3 x 2^20 KiB, or 3 x 2^30 bytes) is 3072 MiB on both.
    Catches: ru_maxrss read as KiB on macOS too (`unit = 1 if sys.platform == "darwin" else 1024` -> `unit = 1024`:
    a Mac's log says 3 TiB)."""
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(train_module.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=ru_maxrss))
    assert train_module.peak_memory_mb(torch.device("cpu")) == 3072

def test_best_checkpoint_holds_the_best_validation_and_the_last_step_is_logged(tiny_backbone, mini_root, tmp_path,
                                                                               monkeypatch):
    """Three steps validated after each with scores 4, 9, 9 (scripted), log_every=2: best.pt is step 2's with best
    score 9 (step 3 only equals it), last.pt (step 3) keeps 9 as the best score, and log.jsonl holds the step records
    of steps 2 and 3 (the last step although 3 is not a multiple of 2) and the three scores. Catches: the best score
    not updated (every validation writes best.pt: step 3's); the comparison flipped (`current < best_score`: no
    best.pt); a tie taken as a new best (`current >= best_score`: step 3's); the last step's record not logged
    (`or step == total_steps` dropped). A one-step run whose validation scores 0 (no query's target first, as an
    untrained model may) still writes best.pt: fails when the best score starts at 0 (`best_score = -1.0` -> `0.0`:
    no best.pt, and last.pt records no best step)."""
    scores = iter([4.0, 9.0, 9.0])
    monkeypatch.setattr(train_module, "validate", lambda encoder, val_sets, cfg: {"sets": {}})
    monkeypatch.setattr(train_module, "score", lambda results: next(scores))
    cfg = run_config(tiny_backbone, mini_root, tmp_path / "run", "train.max_steps=3", "train.val_every=1",
                     "train.log_every=2", "train.save_every=1")
    _, best = train(cfg)
    log = list(map(json.loads, open(tmp_path / "run" / "log.jsonl")))
    assert [r["step"] for r in log if "loss" in r] == [2, 3]
    assert [r["val_score"] for r in log if "val" in r] == [4.0, 9.0, 9.0]
    best_ckpt, last = (load_checkpoint(tmp_path / "run" / name) for name in ("best.pt", "last.pt"))
    assert best == 9.0 and (best_ckpt["step"], best_ckpt["best_score"]) == (2, 9.0)
    assert (last["step"], last["best_score"]) == (3, 9.0)
    scores = iter([0.0])
    _, best = train(run_config(tiny_backbone, mini_root, tmp_path / "zero", "train.max_steps=1"))
    assert best == 0.0 and load_checkpoint(tmp_path / "zero" / "best.pt")["step"] == 1


def test_killed_run_resumes_bit_for_bit(tiny_backbone, mini_root, tmp_path, capsys):
    """A run killed after step 4 (last.pt at step 3), and while writing step 5's log line, and resumed must really
    continue from step 3 and end with exactly the uninterrupted run's last.pt: trainable weights, optimizer and
    scheduler state, sampler state, every RNG state, best score; and with its log.jsonl: the killed run's step 4 and
    the cut line are dropped, so the log holds the uninterrupted run's records (steps, sub-datasets, losses, rates,
    sampling probabilities, validation). It resumes with another data.prepare_workers (speed only), while another
    learning rate is refused. Catches: resume switched off (`if resume and ...` -> `if False and ...`: a fresh
    seeded run would give the same weights and log, but the other learning rate is not refused); any piece of state
    not restored (the RNG, the sampler's generator, the optimizer moments) or not saved; the config comparison
    ignoring every setting, or none (checkpoints.RESUME_MAY_DIFFER emptied: the prepare_workers resume is refused); a
    fresh run appending to the log an earlier run left in its directory (`os.remove(log_path)` dropped); the log not
    cut back on resume (`keep_log_until(log_path, step)` dropped: step 4 logged twice, the cut line glued to the next);
    an unterminated last line kept (`if not line.endswith("\\n"): break` dropped: not JSON, a DataError)."""
    straight = run_config(tiny_backbone, mini_root, tmp_path / "straight", "train.max_steps=6", "train.save_every=3")
    train(straight)

    interrupted = run_config(tiny_backbone, mini_root, tmp_path / "resumed", "train.max_steps=6", "train.save_every=3")
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "log.jsonl").write_text('{"step": 9, "loss": 1.0}\n')    # an earlier run's
    train(interrupted, stop_after=4)           # killed after step 4: last.pt holds step 3
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 3
    assert logged_steps(tmp_path / "resumed") == [1, 2, 3, 4]
    with open(tmp_path / "resumed" / "log.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 0, "ke')         # killed while writing step 5's record
    other_lr = run_config(tiny_backbone, mini_root, tmp_path / "resumed", "train.max_steps=6", "train.save_every=3",
                          "train.lr=1e-3")
    with pytest.raises(plumbing.DataError, match=r"last.pt: written with another config \(differing: train.lr\)"):
        train(other_lr, resume=True)
    capsys.readouterr()
    train(run_config(tiny_backbone, mini_root, tmp_path / "resumed", "train.max_steps=6", "train.save_every=3",
                     f"data.prepare_workers={1 - interrupted.data.prepare_workers}"), resume=True)
    fields = ("step", "key", "loss", "contrastive", "reg", "gate_mean", "samples", "lr", "probs", "difficulty",
              "val_score")
    logs = [[{k: r[k] for k in fields if k in r} for r in map(json.loads, open(tmp_path / run / "log.jsonl"))]
            for run in ("straight", "resumed")]
    assert logged_steps(tmp_path / "resumed") == [1, 2, 3, 4, 5, 6] and logs[1] == logs[0]
    out = capsys.readouterr().out
    assert f"resumed {tmp_path / 'resumed' / 'last.pt'} at step 3" in out
    assert f"{tmp_path / 'resumed' / 'log.jsonl'}: dropped 2 line(s) logged after step 3" in out

    expected = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert expected["step"] == 6
    expected["config"]["train"].pop("out_dir"), resumed["config"]["train"].pop("out_dir")
    expected["config"]["data"].pop("prepare_workers"), resumed["config"]["data"].pop("prepare_workers")
    assert_same_state(expected, resumed)
    # the run really trained: parameters moved away from a fresh encoder
    fresh = build_encoder(straight.model, straight.calibrator, "cpu").trainable_state_dict()
    changed = sum(not torch.equal(fresh[n], expected["model"][n]) for n in fresh)
    assert changed > len(fresh) // 2


def test_a_log_line_that_is_not_a_record_stops_the_resume_naming_the_log_and_line(tmp_path, capsys):
    """Cutting log.jsonl back to the resumed step reads every line: one that is not a record of train.py (not JSON, no
    step) is a DataError naming the file and line, and the log is left as it was; lines up to the step are kept.
    Catches: the parse errors not caught (`except (ValueError, KeyError, TypeError)` -> `except KeyError`: a raw
    JSONDecodeError traceback from train.py; `-> except (ValueError, KeyError)`: the TypeError of a line that is a
    JSON list); the comparison off by one (`<= step` -> `< step`). A log with nothing after the step is left as it was
    and no line is said to be dropped; a run resumed before its first logged step has no log, and resumes.
    Catches: the log rewritten whatever it held (`if len(kept) < len(lines)` -> `if True`: "dropped 0 line(s)"); a
    missing log read (the `if not os.path.exists(path): return` guard dropped: FileNotFoundError, the run cannot
    resume)."""
    log = tmp_path / "log.jsonl"
    for bad in ("not json", '{"loss": 1.0}', "[3]"):
        text = f'{{"step": 1}}\n{bad}\n{{"step": 3}}\n'
        log.write_text(text)
        with pytest.raises(plumbing.DataError, match=f"^{re.escape(str(log))}: line 2 is not a record written by "
                                                     f"train.py"):
            train_module.keep_log_until(str(log), 2)
        assert log.read_text() == text
    log.write_text('{"step": 1}\n{"step": 2, "val_score": 3.0}\n{"step": 3}\n')
    train_module.keep_log_until(str(log), 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "val_score": 3.0}\n'
    capsys.readouterr()
    train_module.keep_log_until(str(log), 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "val_score": 3.0}\n' and capsys.readouterr().out == ""
    train_module.keep_log_until(str(tmp_path / "none.jsonl"), 2)
    assert not (tmp_path / "none.jsonl").exists()


def test_cutting_the_log_back_is_never_left_half_done(tmp_path, monkeypatch):
    """keep_log_until rewrites log.jsonl through a temporary file and one rename: killed while it writes (here a
    write that writes half its text, then fails), it leaves the log as it was and no temporary file.
    Catches: the log rewritten in place (`write_text_atomic(path, "".join(kept))` ->
    `open(path, "w").write("".join(kept))`: half a log, the records of steps it keeps cut)."""
    real_open = open

    class DiesWhileWriting:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.close()
            raise OSError("killed")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def dying_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return DiesWhileWriting(f) if "w" in mode else f

    for module in (train_module, plumbing):
        monkeypatch.setattr(module, "open", dying_open, raising=False)
    text = '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    log = tmp_path / "log.jsonl"
    log.write_text(text)
    with pytest.raises(OSError, match="killed"):
        train_module.keep_log_until(str(log), 2)
    assert os.listdir(tmp_path) == ["log.jsonl"] and log.read_text() == text


class Killed(Exception):
    """Stands in for the process dying at that point of a run."""


def test_resume_keeps_best_pt_to_the_run_that_last_pt_continues(tiny_backbone, mini_root, tmp_path, monkeypatch,
                                                                  capsys):
    """best.pt must be the best validated checkpoint of the run that last.pt and log.jsonl describe. Validation after
    every step (scores scripted), last.pt every 10 steps and at each new best, 4 steps:
    ahead: a run stops after step 2 (scores 4, 3: last.pt and best.pt hold step 1), and a best.pt of a later step
    (3, score 9, not a state this run reaches) is put in its place, as a run that wrote best.pt before last.pt leaves
    when killed between the two. The resumed run scores 3, 2, 1, never beating 4: best.pt must end as step 1's
    checkpoint, and the later one must be kept as best.orphan-step3.pt.
    behind: a run scoring 4, 3, 9 dies while writing step 3's best.pt, after last.pt: the resumed run (score 2 at step
    4) must end with best.pt = last.pt of step 3, the earlier best.pt kept as best.orphan-step1.pt.
    A fresh run moves a best.pt and a last.pt it finds aside (they are another run's: a --resume after the fresh run is
    killed before its first save must not continue the other run), never over a file moved aside before; a best.pt it
    cannot read, or one without a step and score, is moved aside too, and the run goes on.
    Catches: settle_best not called in train (ahead: best.pt stays the step-3 one; behind: step 1's); last.pt written
    after best.pt (save_atomic(state, last_path) moved below the best.pt write: the death leaves last.pt at step 1);
    last.pt not written at a new best (`new_best or` dropped: the run stopped after step 2 left no last.pt);
    settle_best's `save_atomic(last, best_path)` dropped (no best.pt); its `os.replace(best_path, orphan)` dropped (no
    orphan file, the later best.pt overwritten); a fresh run leaving the other run's last.pt in place (its move
    dropped: no last.orphan.pt); move_aside overwriting a name taken (`while os.path.exists(target)` -> `while False`:
    best.orphan-step1.pt replaced); readable_best letting a cut best.pt's DataError out (`except DataError` ->
    `except KeyError`), or taking one without a step (the `<= best.keys()` check -> `isinstance(best, dict)`: KeyError);
    its note naming the path twice, not the problem (DataError's `self.message = message` -> `= str(path)`)."""
    real_save = train_module.save_atomic

    def run(out_dir, scores, resume=False, stop_after=None, die_at=None):
        def save(obj, path):
            if os.path.basename(path) == "best.pt" and obj["step"] == die_at:
                raise Killed
            real_save(obj, path)
        monkeypatch.setattr(train_module, "save_atomic", save)
        monkeypatch.setattr(train_module, "validate", lambda encoder, val_sets, cfg: {"sets": {}})
        monkeypatch.setattr(train_module, "score", lambda results, scores=iter(scores): next(scores))
        train(run_config(tiny_backbone, mini_root, out_dir, "train.max_steps=4", "train.val_every=1",
                         "train.save_every=10"), resume=resume, stop_after=stop_after)

    ahead = tmp_path / "ahead"
    run(ahead, [4.0, 3.0], stop_after=2)
    step1 = load_checkpoint(ahead / "last.pt")
    assert (step1["step"], step1["best_score"], step1["best_step"]) == (1, 4.0, 1)
    later = load_checkpoint(ahead / "best.pt")
    later["step"], later["best_score"] = 3, 9.0
    torch.save(later, ahead / "best.pt")
    capsys.readouterr()
    run(ahead, [3.0, 2.0, 1.0], resume=True)
    out = capsys.readouterr().out
    assert f"{ahead / 'best.pt'} (step 3, score 9.00) is not the best checkpoint of the run resumed at step 1 " \
           f"(best score 4.00 at step 1): moved to {ahead / 'best.orphan-step3.pt'}" in out
    assert_same_state(load_checkpoint(ahead / "best.pt"), step1)
    assert load_checkpoint(ahead / "best.orphan-step3.pt")["best_score"] == 9.0

    behind = tmp_path / "behind"
    with pytest.raises(Killed):
        run(behind, [4.0, 3.0, 9.0], die_at=3)
    step3 = load_checkpoint(behind / "last.pt")
    assert (step3["step"], step3["best_score"], load_checkpoint(behind / "best.pt")["step"]) == (3, 9.0, 1)
    run(behind, [2.0], resume=True)
    out = capsys.readouterr().out
    assert f"wrote {behind / 'best.pt'} from the checkpoint resumed (step 3, best score 9.00)" in out
    assert_same_state(load_checkpoint(behind / "best.pt"), step3)
    assert load_checkpoint(behind / "best.orphan-step1.pt")["best_score"] == 4.0
    assert load_checkpoint(behind / "last.pt")["step"] == 4

    previous_last = load_checkpoint(behind / "last.pt")
    run(behind, [1.0], stop_after=1)
    assert load_checkpoint(behind / "best.orphan-step3.pt")["best_score"] == 9.0
    assert load_checkpoint(behind / "best.pt")["best_score"] == 1.0
    assert_same_state(load_checkpoint(behind / "last.orphan.pt"), previous_last)
    run(behind, [1.0], stop_after=1)                    # again: the names taken get a number, nothing is overwritten
    assert load_checkpoint(behind / "best.orphan-step1.pt")["best_score"] == 4.0
    assert load_checkpoint(behind / "best.orphan-step1-2.pt")["best_score"] == 1.0
    assert_same_state(load_checkpoint(behind / "last.orphan.pt"), previous_last)
    assert load_checkpoint(behind / "last.orphan-2.pt")["step"] == 1
    # A best.pt cut by a crash, or one that is not train.py's, is moved aside and the run goes on.
    for junk in (b"PK\x03\x04 cut", None):
        if junk is None:
            torch.save({"model": {}}, behind / "best.pt")
        else:
            (behind / "best.pt").write_bytes(junk)
        capsys.readouterr()
        run(behind, [1.0], stop_after=1)
        problem = "cannot read the checkpoint" if junk else "no step and best score"
        assert f"{behind / 'best.pt'}: {problem}" in capsys.readouterr().out
        assert load_checkpoint(behind / "best.pt")["best_score"] == 1.0
    assert (behind / "best.orphan-unreadable.pt").read_bytes() == b"PK\x03\x04 cut"
    assert load_checkpoint(behind / "best.orphan-unreadable-2.pt") == {"model": {}}


def test_settle_best_keeps_moves_or_writes_best_pt_by_hand(tmp_path):
    """settle_best on hand-made checkpoints, each case in a folder of its own, no training. A last.pt written before
    best_step was recorded (step 5, best score 2.0) keeps a best.pt of score 2.0 at step 3 (at or before its step) and
    moves aside one at step 7 (ahead of it) or one of score 1.0 (another run's), writing none in its place. A last.pt
    whose best step (3) is not its own step (5) writes no best.pt where there is none. A best.pt at last.pt's own
    step and best step (5) is kept as it is, nothing moved; one of the same score at another step (3) is moved aside
    and last.pt written in its place. A best.pt with a step but no best score, or holding a list (not train.py's), is
    moved aside as unreadable.
    Catches: the score comparison dropped (`best["best_score"] == last["best_score"]` -> `True`: the score 1.0
    best.pt kept); the step comparison dropped (`best["step"] <= last["step"]` -> `True`: the step 7 best.pt kept);
    a missing best_step taken as None (`last.get("best_step", best["step"])` -> `last.get("best_step")`: the step 3
    best.pt moved aside); last.pt written as best.pt whatever its best step (`if last is not None:`); `<=` -> `<`
    (the step 5 best.pt moved to best.orphan-step5.pt and written again); the best step comparison dropped
    (`best["step"] == last.get("best_step", best["step"])` -> `True`: the step 3 best.pt kept); readable_best
    taking a checkpoint with a step only (`{"step", "best_score"} <= best.keys()` -> `"step" in best`: a KeyError), or
    asking a list for its keys (`isinstance(best, dict) and` dropped: an AttributeError stops the run)."""
    from checkpoints import settle_best
    older = {"step": 5, "best_score": 2.0}
    for name, best, kept in (("behind", {"step": 3, "best_score": 2.0}, True),
                             ("ahead", {"step": 7, "best_score": 2.0}, False),
                             ("other", {"step": 3, "best_score": 1.0}, False)):
        (tmp_path / name).mkdir()
        torch.save(best, tmp_path / name / "best.pt")
        settle_best(older, str(tmp_path / name / "best.pt"))
        left = "best.pt" if kept else f"best.orphan-step{best['step']}.pt"
        assert os.listdir(tmp_path / name) == [left], name
        assert load_checkpoint(tmp_path / name / left) == best
    (tmp_path / "none").mkdir()
    settle_best({"step": 5, "best_score": 2.0, "best_step": 3}, str(tmp_path / "none" / "best.pt"))
    assert os.listdir(tmp_path / "none") == []
    (tmp_path / "own").mkdir()
    own = {"step": 5, "best_score": 2.0, "best_step": 5, "model": {"w": torch.arange(3.0)}}
    torch.save(own, tmp_path / "own" / "best.pt")
    settle_best(own, str(tmp_path / "own" / "best.pt"))
    assert os.listdir(tmp_path / "own") == ["best.pt"]
    assert_same_state(load_checkpoint(tmp_path / "own" / "best.pt"), own)
    (tmp_path / "same-score").mkdir()
    torch.save({"step": 3, "best_score": 2.0}, tmp_path / "same-score" / "best.pt")
    settle_best(own, str(tmp_path / "same-score" / "best.pt"))
    assert sorted(os.listdir(tmp_path / "same-score")) == ["best.orphan-step3.pt", "best.pt"]
    assert_same_state(load_checkpoint(tmp_path / "same-score" / "best.pt"), own)
    for name, content in (("unscored", {"step": 4}), ("list", [4, 2.0])):
        (tmp_path / name).mkdir()
        torch.save(content, tmp_path / name / "best.pt")
        settle_best(None, str(tmp_path / name / "best.pt"))
        assert os.listdir(tmp_path / name) == ["best.orphan-unreadable.pt"], name


def test_best_pt_written_on_resume_is_never_half_written_and_files_moved_aside_are_numbered(tmp_path, monkeypatch):
    """move_aside onto a name taken twice already (best.orphan-step1.pt and -2) picks -3 and leaves both as they were.
    settle_best writing last.pt as best.pt, killed while it writes (a torch.save that writes some bytes, then fails),
    leaves no best.pt and no temporary file.
    Catches: move_aside trying one other name only (`while os.path.exists(target)` -> `if ...`: -2 overwritten);
    best.pt written in place (`save_atomic(last, best_path)` -> `torch.save(last, best_path)`: half a best.pt)."""
    from checkpoints import move_aside, settle_best
    for name, text in (("best.pt", "new"), ("best.orphan-step1.pt", "first"), ("best.orphan-step1-2.pt", "second")):
        (tmp_path / name).write_text(text)
    assert move_aside(str(tmp_path / "best.pt"), "best.orphan-step1.pt") == str(tmp_path / "best.orphan-step1-3.pt")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "best.orphan-step1.pt": "first", "best.orphan-step1-2.pt": "second", "best.orphan-step1-3.pt": "new"}

    def dies_while_writing(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("killed")

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(torch, "save", dies_while_writing)
    with pytest.raises(OSError, match="killed"):
        settle_best({"step": 3, "best_score": 1.0, "best_step": 3}, str(tmp_path / "run" / "best.pt"))
    assert os.listdir(tmp_path / "run") == []


def test_resume_refuses_a_backbone_replaced_by_other_weights_and_takes_a_bf16_copy(tiny_backbone, mini_root, tmp_path,
                                                                                 monkeypatch, capsys):
    """The config names the backbone by its path only. A run killed after step 1, whose backbone directory is then
    replaced by another tiny Qwen3-VL (the same architecture, seed 1), must not resume: `train.py --resume` ends in
    one line naming last.pt, the backbone path and both identities (the one last.pt records, the one a fresh encoder
    on the new weights has), and last.pt stays at step 1. The first weights saved in bf16 in that directory resume.
    Catches: restore's identity check dropped (`if False and trained_on is not None ...`: the run resumes on seed 1's
    weights and reaches step 2); the check raising a ValueError instead of a DataError (a traceback, not one line);
    the identity hashed unrounded in model.backbone_identity (`.to("cpu", torch.bfloat16).view(torch.int16)` ->
    `.to("cpu").view(torch.int32)`: the bf16 copy is refused)."""
    from safetensors.torch import load_file
    from transformers import Qwen3VLForConditionalGeneration
    from fake_backbones import make_tiny_backbone
    backbone, run = tmp_path / "backbone", tmp_path / "run"
    shutil.copytree(tiny_backbone, backbone)
    overrides = run_overrides(str(backbone), mini_root, run, "train.max_steps=2", "train.save_every=1")
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), overrides)
    train(cfg, stop_after=1)
    trained_on = load_checkpoint(run / "last.pt")["backbone_identity"]

    shutil.rmtree(backbone)
    make_tiny_backbone(str(backbone), seed=1)
    other = build_encoder(cfg.model, cfg.calibrator, "cpu").backbone_identity()
    assert other != trained_on
    monkeypatch.setattr(sys, "argv", ["train.py", os.path.join(REPO, "configs", "tiny.yaml"), *overrides, "--resume"])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert str(exit_info.value.code) == (
        f"train.py: {run / 'last.pt'}: trained on a backbone with other weights than {backbone} (backbone identity "
        f"{trained_on}, this one's {other}); resume on the backbone it was trained on")
    assert load_checkpoint(run / "last.pt")["step"] == 1

    shutil.rmtree(backbone)
    shutil.copytree(tiny_backbone, backbone)
    Qwen3VLForConditionalGeneration.from_pretrained(tiny_backbone, dtype=torch.bfloat16).save_pretrained(backbone)
    assert {t.dtype for t in load_file(backbone / "model.safetensors").values()} == {torch.bfloat16}
    capsys.readouterr()
    train(cfg, resume=True)
    assert f"resumed {run / 'last.pt'} at step 1" in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["step"] == 2


def test_a_run_follows_its_seed_epochs_query_images_weight_decay_and_validation_schedule(tiny_backbone, mini_root,
                                                                                          tmp_path, monkeypatch):
    """A run of train.epochs=0.5 (no max_steps) over 1_t2i_Shoes (15 records) and 2_sketch2i_ClothesV1 (24) at batch
    4 lasts int(0.5 * (15 // 4 + 24 // 4)) = 4 steps. With train.seed=5 and uniform sampling its steps train on the
    records a TaskSampler seeded 5 draws, its first step starts from the weights and random state torch.manual_seed(5)
    gives, every sketch query holds at most data.max_query_images=2 sketches (some records have more), AdamW decays
    at train.weight_decay, and train.val_every=3 validates at steps 3 and 4 (the last).
    Catches: the epochs' step count off by one (`int(epochs * epoch_length) + 1`); train.seed not given to the
    sampler (its default seed 0), or the weights / dropout stream seeded without it (`torch.manual_seed(0)`,
    `torch.manual_seed(rank)`); data.max_query_images not given to TrainSet (its default 5); AdamW at its default
    weight decay (`weight_decay=` dropped); the last step not validated (`or step == total_steps` dropped) or
    validations one step early (`(step + 1) % val_every`)."""
    steps, validated, first = [], [], {}
    real_step = train_module.cached_step

    def recording_step(encoder, examples, *args):
        if not first:
            first["rng"] = torch.get_rng_state()
            first["weights"] = copy.deepcopy(encoder.trainable_state_dict())
        steps.append([e["id"] for e in examples])
        for e in examples:
            if e["key"] == "2_sketch2i_ClothesV1":
                first.setdefault("sketches", []).append(len(e["query_image"]))
        return real_step(encoder, examples, *args)

    monkeypatch.setattr(train_module, "cached_step", recording_step)
    monkeypatch.setattr(train_module, "validate", lambda encoder, val_sets, cfg: validated.append(len(steps)) or {})
    monkeypatch.setattr(train_module, "score", lambda results: 1.0)
    keys = ["1_t2i_Shoes", "2_sketch2i_ClothesV1"]
    cfg = run_config(tiny_backbone, mini_root, tmp_path / "run", f"data.sub_datasets=[{', '.join(keys)}]",
                     "train.max_steps=0", "train.epochs=0.5", "train.seed=5", "sampler.mode=uniform",
                     "data.max_query_images=2", "train.weight_decay=0.02", "train.val_every=3")
    train(cfg)

    sets = {k: TrainSet(mini_root, k) for k in keys}
    assert [len(s) for s in sets.values()] == [15, 24]
    assert len(steps) == 4 and validated == [3, 4]
    sampler = TaskSampler({k: len(s) for k, s in sets.items()}, cfg.sampler, 4, seed=5)
    drawn = [sampler.next_batch() for _ in range(4)]
    assert steps == [[sets[key].records[i]["id"] for i in indices] for key, indices in drawn]
    assert "2_sketch2i_ClothesV1" in [key for key, _ in drawn]
    assert max(len(r["query_image"]) for r in sets["2_sketch2i_ClothesV1"].records) > 2
    assert first["sketches"] and max(first["sketches"]) <= 2
    torch.manual_seed(5)
    fresh_encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    fresh = fresh_encoder.trainable_state_dict()
    assert torch.equal(first["rng"], torch.manual_seed(5).get_state())
    assert_same_state(first["weights"], fresh)
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert [group["weight_decay"] for group in saved["optimizer"]["param_groups"]] == [0.02]
    # The identities of the backbone weights and tokenizer it trained on, which evaluation checks (fails when
    # checkpoint() omits one).
    assert saved["backbone_identity"] == fresh_encoder.backbone_identity()
    assert saved["tokenizer_identity"] == fresh_encoder.tokenizer_identity() is not None


def test_checkpoint_rng_states_load_as_cpu_byte_tensors(tmp_path):
    """torch.set_rng_state / torch.cuda.set_rng_state accept only CPU byte tensors, so a checkpoint must load
    to the CPU whatever device the run uses. Catches: `map_location=device` in load_checkpoint (on a GPU the RNG
    states land on CUDA and resuming crashes; `map_location="meta"` stands in for that on CPU)."""
    torch.save({"rng": [rng_states()], "model": {"w": torch.ones(2)}}, tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")["rng"][0]["torch"]
    assert state.device.type == "cpu" and state.dtype == torch.uint8
    torch.set_rng_state(state)


def test_a_gpu_checkpoint_resumes_where_fewer_gpus_are_visible(monkeypatch):
    """Each rank saves and restores its own GPU's generator, the one its dropout draws from, so a run written on a
    node with 8 visible GPUs resumes where 4 are (the same world size, a smaller machine). torch's CUDA generators
    are stood in for on this CPU: one state per visible device, each set or read on its own index, as torch does
    (`default_generators[i]`, which fails for an index past the device count).
    Fails when rng_states saves every visible GPU's state (get_rng_state_all: restoring device 4 of 8 fails on the
    4-GPU node) or set_rng_states restores another device than the current one."""
    from checkpoints import set_rng_states
    gpus = {"count": 8, "current": 2, "states": {}}        # states: what set_rng_state wrote, by device

    def generator(device):      # "cuda" is the current device, as in torch
        index = gpus["current"] if device == "cuda" else device
        if index >= gpus["count"]:
            raise IndexError("tuple index out of range")
        return index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([generator(device)]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": gpus["states"].__setitem__(
        generator(device), int(state)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.cuda.get_rng_state(i) for i in range(8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [torch.cuda.set_rng_state(state, i)
                                                                         for i, state in enumerate(states)])
    saved = rng_states()                                   # rank 2 on the 8-GPU node
    gpus["count"] = 4                                      # the same rank on a 4-GPU node
    set_rng_states(saved)
    assert gpus["states"] == {2: 2}                        # device 2's own state, back on device 2


def test_last_checkpoint_is_resumed_only_when_asked(tmp_path):
    """A run started without --resume (and not restarted by torchrun) starts fresh even though its out_dir holds a
    last.pt; with --resume it reads that file, and with none there it starts fresh.
    Catches: the resume flag ignored in checkpoint_to_resume (`rank == 0 and resume and os.path.exists(path)` without
    `resume`: a fresh run silently continues the old one)."""
    from checkpoints import checkpoint_to_resume
    path = tmp_path / "last.pt"
    assert checkpoint_to_resume(str(path), resume=True) is None
    torch.save({"step": 3}, path)
    assert checkpoint_to_resume(str(path), resume=False) is None
    assert checkpoint_to_resume(str(path), resume=True) == {"step": 3}


def test_a_failed_checkpoint_save_keeps_the_last_one_and_leaves_no_temporary(tmp_path):
    """save_atomic writes beside last.pt and renames: a save that fails part-way (torch.save meets an object it cannot
    pickle, a lock, after a tensor) leaves the previous last.pt whole and no temporary file in out_dir.
    Catches: atomic_write's cleanup dropped (a .tmp<pid> file left behind by every failed save)."""
    from plumbing import save_atomic
    path = tmp_path / "last.pt"
    save_atomic({"step": 3}, path)
    with pytest.raises(TypeError, match="pickle"):
        save_atomic({"w": torch.ones(1000), "lock": threading.Lock()}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path) == {"step": 3}


def test_a_file_is_on_disk_whole_before_its_rename(tmp_path, monkeypatch):
    """A power cut may keep a rename but lose data still in the page cache: last.pt (or log.jsonl) would come back
    empty. atomic_write therefore flushes the temporary file to disk (fsync) before it renames it onto the path, for
    the checkpoint and the text writers alike. Each fsync is recorded with the file's size on disk at that moment.
    Catches: the fsync dropped from atomic_write; done after the rename (a rename that can outlive the data)."""
    from plumbing import save_atomic, write_text_atomic
    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))

    monkeypatch.setattr(plumbing.os, "fsync", recording_fsync)
    monkeypatch.setattr(plumbing.os, "replace", lambda src, dst: (events.append(("replace", str(src))),
                                                                  replace(src, dst)))
    save_atomic({"w": torch.ones(1000)}, tmp_path / "last.pt")
    write_text_atomic(tmp_path / "log.jsonl", '{"step": 1}\n')
    temps = [f"{tmp_path}/last.pt.tmp{os.getpid()}", f"{tmp_path}/log.jsonl.tmp{os.getpid()}"]
    sizes = [(tmp_path / "last.pt").stat().st_size, len('{"step": 1}\n')]
    assert events == [("fsync", temps[0], sizes[0]), ("replace", temps[0]),
                      ("fsync", temps[1], sizes[1]), ("replace", temps[1])]

def test_a_reader_of_a_file_being_replaced_reads_the_old_file_whole(tmp_path):
    """save_atomic and write_text_atomic put the new file in place with one rename: a reader that opened last.pt (or
    log.jsonl) before the write, as an evaluation reading a checkpoint while training saves it, reads the old file
    whole, never the new one half written.
    Catches: the new file copied onto the old one (`os.replace(temp, path)` -> `shutil.copy(temp, path)` in
    atomic_write: the old file is cut and rewritten under the reader)."""
    from plumbing import save_atomic, write_text_atomic
    path = tmp_path / "last.pt"
    save_atomic({"step": 3, "w": torch.zeros(1000)}, path)
    old = path.read_bytes()
    with open(path, "rb") as reader:
        save_atomic({"step": 4, "w": torch.ones(1000)}, path)
        assert reader.read() == old
    assert load_checkpoint(path)["step"] == 4
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n')
    with open(log) as reader:
        write_text_atomic(log, '{"step": 1}\n')
        assert reader.read() == '{"step": 1}\n{"step": 2}\n'
    assert log.read_text() == '{"step": 1}\n'


def test_checkpoint_restores_step_best_score_unreadable_records_and_random_states(tiny_backbone, tmp_path, device):
    """A checkpoint written at step 7 with best validation score 12.5 (reached at step 5) and one unreadable record,
    saved and loaded, restored into a fresh encoder, optimizer, scheduler and sampler: the step, the best score and its
    step, the unreadable records, and the Python, NumPy and torch random streams (with --device cuda, the GPU's too:
    its dropout masks) continue where they were when it was written.
    Catches: the best score not restored (-1.0: the first validation after a resume would overwrite best.pt with a
    worse model); its step not restored (None: the next last.pt would not say which best.pt is its own); the
    unreadable records not restored (`set()`: met and reported again); a random state not restored."""
    from checkpoints import checkpoint, restore
    from plumbing import save_atomic
    cfg = full_training_config(tiny_backbone)

    def training_parts():
        encoder = build_encoder(cfg.model, cfg.calibrator, device)
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=cfg.train.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_module.learning_rate_factor(cfg, 10))
        return encoder, optimizer, scheduler, TaskSampler({"a": 10, "b": 20}, cfg.sampler, 4)

    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, device=device).item()

    written = training_parts()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)        # seeds the GPU's generator too
    save_atomic(checkpoint(cfg, *written, 7, 12.5, 5, {"a/r3"}), tmp_path / "last.pt")
    draws = draw()
    torch.manual_seed(6)
    resumed = restore(load_checkpoint(tmp_path / "last.pt"), cfg, *training_parts(), 0, tmp_path / "last.pt")
    assert resumed == (7, 12.5, 5, {"a/r3"})
    assert draw() == draws


def test_a_checkpoint_written_on_a_gpu_resumes_and_evaluates_on_a_cpu(tiny_backbone, tmp_path, monkeypatch):
    """A GPU run's last.pt holds its AdamW moments on the GPU (optimizer.state_dict() leaves them where they are):
    stood in for here by saving every tensor with torch's "cuda:0" location tag, which torch.load on this CPU refuses
    unless told where to put it. Such a checkpoint must resume on a CPU (optimizer moments, weights and step back as
    written) and load in evaluate.py (and so search.py and model.py export, which read it the same way).
    Catches: load_checkpoint without map_location (`torch.load(path, weights_only=False)`: "Attempting to
    deserialize object on a CUDA device")."""
    import torch.serialization
    from checkpoints import checkpoint, restore
    from evaluate import read_checkpoint
    from plumbing import save_atomic
    cfg = lora_dropout_config(tiny_backbone)

    def training_parts():
        torch.manual_seed(0)
        encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=cfg.train.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_module.learning_rate_factor(cfg, 10))
        return encoder, optimizer, scheduler, TaskSampler({"a": 10, "b": 20}, cfg.sampler, 4)

    written = training_parts()
    perturb(written[0])
    for p in written[1].param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    written[1].step()
    path = tmp_path / "last.pt"
    with monkeypatch.context() as gpu:
        gpu.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_atomic(checkpoint(cfg, *written, 3, 1.5, 3, set()), path)
    with pytest.raises(RuntimeError, match="CUDA"):       # the file really places its tensors on a GPU
        torch.load(path, weights_only=False)
    resumed = training_parts()
    assert restore(load_checkpoint(path), cfg, *resumed, 0, path) == (3, 1.5, 3, set())
    assert_same_state(resumed[1].state_dict(), written[1].state_dict(), "optimizer")
    assert_same_state(resumed[0].trainable_state_dict(), written[0].trainable_state_dict(), "model")
    assert_same_state(read_checkpoint(str(path))[1], written[0].trainable_state_dict(), "evaluate")


def test_a_checkpoint_written_before_best_step_and_backbone_identity_were_recorded_resumes(tiny_backbone, tmp_path):
    """A last.pt of an earlier train.py holds neither best_step nor backbone_identity: it resumes, with best step None
    (settle_best then takes a best.pt of its best score at or before its step), and no backbone is refused.
    Catches: restore refusing a checkpoint without an identity (`if trained_on is not None and trained_on != here` ->
    `if trained_on != here`); or reading best_step as a required key (`ckpt.get("best_step")` -> `ckpt["best_step"]`:
    a KeyError)."""
    from checkpoints import checkpoint, restore
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_module.learning_rate_factor(cfg, 10))
    parts = encoder, optimizer, scheduler, TaskSampler({"a": 10, "b": 20}, cfg.sampler, 4)
    older = checkpoint(cfg, *parts, 7, 12.5, 5, {"a/r3"})
    del older["best_step"], older["backbone_identity"]
    assert restore(older, cfg, *parts, 0, str(tmp_path / "last.pt")) == (7, 12.5, None, {"a/r3"})


@pytest.mark.parametrize("launch", ["one node", "two nodes"])
def test_two_processes_train_like_one_process_on_the_combined_batch(tiny_backbone, mini_root, tmp_path, launch):
    """torchrun with 2 processes x batch 2 and cross-process negatives must train like 1 process with batch 4:
    the same records per step, the same loss at every step and, after 4 steps, the same weights, optimizer
    moments and GGAS state (which sub-dataset is drawn depends on the averaged token gradients). Launched as one
    node with 2 processes, and as two nodes of one process each (--nnodes=2, c10d rendezvous on 127.0.0.1).
    Catches: gradients summed instead of averaged (the optimizer's second moments and GGAS's difficulty double);
    rank 1's positives pointing at rank 0's targets (`t_starts[r] + i` -> `i`); ranks reading the same records;
    the logged throughput of one rank's records only (rank 0's `samples` / elapsed); the fastest rank
    logged as the slowest (`np.argmax` -> `np.argmin`); the logged regulariser (and so loss) rank 0's share of the
    step's, not the step's (`record.update(across_ranks(...))` dropped)."""
    # One target per record and no hard negatives: nothing is drawn per rank. No dropout (full training).
    common = ["train.max_steps=4", "train.gather_negatives=true", "model.trainable=full",
              "data.sub_datasets=[1_t2i_Shoes, 7_cir_FashionIQ-Dress]"]
    overrides = run_overrides(tiny_backbone, mini_root, tmp_path / "two", *common, "train.batch_size=2")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from config import load_config\nfrom train import train\n"
        "train(load_config(sys.argv[1], sys.argv[2:]))\n")
    (torchrun if launch == "one node" else launch_two_nodes)(script, os.path.join(REPO, "configs", "tiny.yaml"),
                                                             *overrides)
    train(run_config(tiny_backbone, mini_root, tmp_path / "one", *common, "train.batch_size=4"))

    logs = [[r for r in map(json.loads, open(tmp_path / run / "log.jsonl")) if "loss" in r] for run in ("two", "one")]
    assert [r["key"] for r in logs[0]] == [r["key"] for r in logs[1]] and len(logs[0]) == 4
    for two, single in zip(*logs):
        for name in ("loss", "contrastive", "reg", "samples", "gate_mean"):
            assert two[name] == pytest.approx(single[name], abs=1e-6), (two["step"], name)
    for r in logs[0]:   # every rank's time; rank 0's throughput counts both ranks' 2 records
        assert len(r["step_time_s"]) == 2 and r["slowest_rank"] == int(np.argmax(r["step_time_s"]))
        assert r["samples_per_s"] * r["step_time_s"][0] == pytest.approx(4, rel=1e-2)
    two, single = (load_checkpoint(tmp_path / run / "last.pt") for run in ("two", "one"))
    assert len(two["rng"]) == 2 and two["step"] == single["step"] == 4
    assert_same_state(two["model"], single["model"], "model", atol=1e-6)
    assert_same_state(two["optimizer"], single["optimizer"], "optimizer", atol=1e-6)
    # G is an EMA of float32 token-gradient norms near 2, and P follows from it: summed in another order over two
    # processes they move by a few float32 rounding steps (G by 1.0e-6 on one machine); summed gradients double G.
    for name in ("G", "P", "positions", "passes"):
        assert_same_state(two["sampler"][name], single["sampler"][name], name, atol=1e-5)


def test_killed_worker_restarts_and_continues_from_last_checkpoint(tiny_backbone, mini_root, tmp_path):
    """Under torchrun --max-restarts=1, rank 1 is killed (SIGKILL) during step 3 (last.pt holds step 2): torchrun
    starts both workers again, they resume from last.pt by themselves and end with exactly the uninterrupted
    2-process run's last.pt. Each rank's first step starts from the random state torch.manual_seed(train.seed +
    rank) gives (its own dropout stream, as under DDP). Catches: a restarted worker starting fresh
    (TORCHELASTIC_RESTART_COUNT ignored: it would train 4 steps from scratch with another log and state); the process
    group of the restarted attempt sharing the store namespace of the dead one (no per-attempt prefix: gloo connects
    to the dead worker's address, "Connection refused", in about half the runs); every rank seeded alike
    (`torch.manual_seed(cfg.train.seed + rank)` -> `(cfg.train.seed)`: the ranks would draw from one stream)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import os, signal, sys, torch\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import train\n"
        "kill_at, calls, step = int(sys.argv[1]), [0], train.cached_step\n"
        "def dying_step(*args):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 1 and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':\n"
        "        name = f'first_step_rng{kill_at}_{os.environ[\"RANK\"]}.pt'\n"
        "        torch.save(torch.get_rng_state(), os.path.join(os.path.dirname(__file__), name))\n"
        "    if (calls[0] == kill_at and os.environ['RANK'] == '1'\n"
        "            and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(*args)\n"
        "train.cached_step = dying_step\n"
        "sys.argv = ['train.py'] + sys.argv[2:]\n"
        "train.main()\n")
    runs = {}
    for name, kill_at in (("straight", 0), ("killed", 3)):
        overrides = run_overrides(tiny_backbone, mini_root, tmp_path / name, "train.max_steps=4",
                                  "train.save_every=2", "train.batch_size=2")
        proc = torchrun(script, kill_at, os.path.join(REPO, "configs", "tiny.yaml"), *overrides,
                        launcher=["--max-restarts=1"])
        runs[name] = load_checkpoint(tmp_path / name / "last.pt")
        runs[name]["config"]["train"].pop("out_dir")
    assert "resumed" in proc.stdout and "at step 2" in proc.stdout
    assert logged_steps(tmp_path / "killed")[-2:] == [3, 4] and logged_steps(tmp_path / "killed").count(1) == 1
    assert_same_state(runs["straight"], runs["killed"])
    for rank in (0, 1):
        torch.manual_seed(runs["straight"]["config"]["train"]["seed"] + rank)
        assert torch.equal(torch.load(tmp_path / f"first_step_rng0_{rank}.pt"), torch.get_rng_state()), rank


def test_resume_ignores_speed_only_settings_and_their_absence_from_older_checkpoints():
    """A checkpoint written before model.reuse_vision_features and model.vision_attention existed (or with other
    values: both change speed only) resumes, also with another train.dist_timeout_s (how long a collective may
    wait); one that differs in a setting that changes results does not.
    Catches: any of the three left out of checkpoints.RESUME_MAY_DIFFER; the comparison emptied."""
    from checkpoints import comparable_config
    older = Config().to_dict()
    del older["model"]["reuse_vision_features"], older["model"]["vision_attention"]
    now = Config()
    now.model.reuse_vision_features, now.model.vision_attention = False, "packed"
    now.train.dist_timeout_s = older["train"]["dist_timeout_s"] + 600
    assert comparable_config(older) == comparable_config(now.to_dict())
    now.model.keep_rope_positions = False
    assert comparable_config(older) != comparable_config(now.to_dict())


def test_a_checkpoint_without_a_setting_or_section_that_changes_results_is_refused_naming_it(tmp_path):
    """A last.pt written before a setting that changes results existed (here model.keep_rope_positions, or the whole
    sampler or calibrator section, missing from its config) cannot say it trained with this run's values: restore
    refuses it naming what differs, before it loads anything.
    Catches: only the checkpoint's keys compared (`saved.get(section, {}).keys() | now.get(section, {}).keys()` ->
    `saved.get(section, {}).keys()`), or only the sections both have (`saved.keys() | now.keys()` ->
    `saved.keys() & now.keys()`): it resumes; comparable_config reading calibrator.reg_per_chunk as a required key
    (`config.get("calibrator", {}).get("reg_per_chunk")` -> `config["calibrator"]["reg_per_chunk"]`: a KeyError
    traceback naming no file)."""
    from checkpoints import restore
    path = str(tmp_path / "last.pt")
    for section, key, named in (("model", "keep_rope_positions", "model.keep_rope_positions"),
                                ("sampler", None, "sampler."), ("calibrator", None, "calibrator.")):
        older = Config().to_dict()
        if key:
            del older[section][key]
        else:
            del older[section]
        with pytest.raises(plumbing.DataError, match=re.escape(f"{path}: written with another config (differing: "
                                                               f"{named}")):
            restore({"config": older}, Config(), None, None, None, None, 0, path)


def test_resume_is_decided_by_rank_0_and_reaches_every_rank(tiny_backbone, mini_root, tmp_path):
    """Two processes resume a run whose last.pt only rank 0 can see (rank 1's os.path.exists says no, as on a
    node without the shared output directory): both must resume and end with identical weights. Only rank 0 touches
    the run's files: rank 1, to which a log.jsonl always seems there, neither removes it (fresh run) nor cuts it back
    (resumed run), nor settles best.pt or moves a file aside (each of these raises on rank 1 here).
    Catches: each rank deciding from its own file system (rank 1 starts fresh; the start-up weight check then
    stops the run, and without that check the ranks' weights differ at the end); the fresh run's clean-up on every
    rank (`elif rank == 0:` -> `elif True:`: rank 1 removes the log rank 0 removes); settle_best on every rank
    (`if rank == 0:` -> `if True:`: two ranks moving the same best.pt)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from config import load_config\nfrom plumbing import setup_distributed\nfrom train import train\n"
        "import train as train_module\n"
        "setup_distributed()\n"
        "if dist.get_rank() == 1:\n"
        "    exists, remove = os.path.exists, os.remove\n"
        "    os.path.exists = lambda p: (False if str(p).endswith('last.pt') else\n"
        "                                True if str(p).endswith('log.jsonl') else exists(p))\n"
        "    def rank_0_only(*args):\n"
        "        raise RuntimeError(f'rank 1 touched the run files: {args}')\n"
        "    train_module.settle_best = train_module.keep_log_until = train_module.move_aside = rank_0_only\n"
        "    os.remove = lambda p: rank_0_only(p) if str(p).endswith('log.jsonl') else remove(p)\n"
        "cfg = load_config(sys.argv[1], sys.argv[4:])\n"
        "encoder, _ = train(cfg, resume=sys.argv[2] == 'resume', stop_after=int(sys.argv[3]))\n"
        "torch.save(encoder.trainable_state_dict(), f'{cfg.train.out_dir}/rank{dist.get_rank()}.pt')\n")
    overrides = run_overrides(tiny_backbone, mini_root, tmp_path / "run", "train.max_steps=4", "train.save_every=2",
                              "train.batch_size=2")
    config = os.path.join(REPO, "configs", "tiny.yaml")
    torchrun(script, config, "fresh", 3, *overrides)            # killed after step 3: last.pt holds step 2
    proc = torchrun(script, config, "resume", 4, *overrides)
    assert "at step 2" in proc.stdout
    rank0, rank1 = (torch.load(tmp_path / "run" / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_ranks_starting_from_different_weights_stop_with_a_clear_error(tiny_backbone, tmp_path):
    """Data parallel training keeps ranks equal only if they start equal: a rank whose weights differ from rank
    0's is named and the run stops, on every rank. Catches: the start-up checksum comparison skipped; each rank
    comparing with its own checksums (`every[r] != every[0]` -> `every[r] != every[rank]`: rank 1 names rank 0)."""
    script = step_script(tmp_path, tiny_backbone,
        "from checkpoints import check_ranks_agree\n"
        "torch.manual_seed(0)\nencoder = build_encoder(cfg.model, cfg.calibrator, 'cpu')\n"
        "if rank == 1:\n"
        "    with torch.no_grad(): encoder.query_token[0] += 1e-3\n"
        "check_ranks_agree(encoder, 'at start')\n")
    proc = torchrun(script, check=False)
    assert proc.returncode != 0
    for rank in (0, 1):         # every rank stops, naming the same rank
        assert f"[rank{rank}]: RuntimeError: at start: the trainable weights of rank(s) [1] differ from rank 0's" \
            in proc.stderr, rank


def test_train_stops_before_its_first_step_when_a_rank_loaded_other_weights(tiny_backbone, mini_root, tmp_path):
    """train() on two processes whose rank 1 loads other trainable weights (its query token moved by 1e-3, as a rank
    seeded otherwise would) stops on every rank before its first step, naming rank 1: no step is logged.
    Catches: train() not calling the start-up check (`check_ranks_agree(encoder, ...)` dropped: the ranks train on
    from different weights to the end, exit 0)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from config import load_config\nfrom plumbing import setup_distributed\nimport train as train_module\n"
        "setup_distributed()\n"
        "load = train_module.load_encoder\n"
        "def load_on_this_rank(*args):\n"
        "    encoder = load(*args)\n"
        "    if dist.get_rank() == 1:\n"
        "        with torch.no_grad(): encoder.query_token[0] += 1e-3\n"
        "    return encoder\n"
        "train_module.load_encoder = load_on_this_rank\n"
        "train_module.train(load_config(sys.argv[1], sys.argv[2:]))\n")
    overrides = run_overrides(tiny_backbone, mini_root, tmp_path / "run", "train.max_steps=2", "train.batch_size=2")
    proc = torchrun(script, os.path.join(REPO, "configs", "tiny.yaml"), *overrides, check=False)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: RuntimeError: at start: the trainable weights of rank(s) [1] differ from rank 0's" \
            in proc.stderr, (rank, proc.stderr[-3000:])
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_batch_report_states_global_batch_negatives_and_small_sub_datasets():
    """8 processes x 64 with gathered negatives: global batch 512, 512 in-batch targets, epoch of 5000 // 512 = 9
    steps; 300 and 40 records are fewer than one global batch and train with 300 // 8 = 37 and 40 // 8 = 5 per
    process. Catches: the world size left out of the global batch or the negatives; a small sub-dataset not
    reported."""
    cfg = load_config(os.path.join(REPO, "configs", "full.yaml"), ["train.gather_negatives=true"])
    sampler = TaskSampler({"a": 5000, "b": 300, "c": 40}, cfg.sampler, 64, world_size=8)
    lines = batch_report(cfg, sampler, 8).splitlines()
    assert lines[0].startswith("batch 64 per process x 8 process(es) = global batch 512; each query is scored "
                               "against 512 in-batch targets (gathered from every process;")
    assert lines[0].endswith("9 steps per epoch")
    assert lines[1:] == [f"  {k}: {n} training records, fewer than one global batch of 512: it trains with {b} per "
                         f"process and adds no steps to the epoch length" for k, n, b in (("b", 300, 37), ("c", 40, 5))]
    cfg.train.gather_negatives = False
    assert "against 64 in-batch targets (its own process's;" in batch_report(cfg, sampler, 8)


def test_periodic_validation_keeps_the_first_queries_with_their_own_ground_truth(mini_root):
    """train.val_max_queries cuts each validation set to its first N queries, each with its own ground truth and
    exclusions, against the whole gallery; 0 keeps every query. Catches: the lists cut out of step (ground truth and
    exclusions swapped in the cut: every query scored against another list)."""
    from prepare_data import build_eval_sets
    keys = ["1_t2i_Shoes", "9_asfr_DARN"]
    cfg = Config()
    cfg.data.root, cfg.train.val_max_queries = mini_root, 3
    whole = build_eval_sets(mini_root, "val", keys=keys, unseen=False)
    cut = train_module.load_val_sets(cfg, keys)
    for w, c in zip(whole, cut, strict=True):
        assert len(w.queries) > 3 and any(w.ground_truth[:3])
        assert (c.queries, c.ground_truth, c.exclude, c.gallery) == (w.queries[:3], w.ground_truth[:3],
                                                                     w.exclude[:3], w.gallery)
    cfg.train.val_max_queries = 0
    assert [s.queries for s in train_module.load_val_sets(cfg, keys)] == [w.queries for w in whole]


def test_process_group_timeout_comes_from_the_config(monkeypatch):
    """train.dist_timeout_s reaches init_process_group. Catches: the timeout not passed (torch's default)."""
    import datetime
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(plumbing.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(plumbing.dist, "rendezvous", lambda url, timeout: iter([(plumbing.dist.HashStore(), 0, 2)]))
    monkeypatch.setattr(plumbing.dist, "init_process_group", lambda backend, **kw: seen.update(kw))
    monkeypatch.setattr(plumbing, "world", lambda: (0, 2))
    plumbing.setup_distributed(timeout_s=123)
    assert seen["timeout"] == datetime.timedelta(seconds=123)


def test_training_sets_up_the_process_group_with_train_dist_timeout_s(monkeypatch, tmp_path):
    """train() hands train.dist_timeout_s (77 here, not the default 1800) to setup_distributed, its first call.
    Catches: train() calling setup_distributed without the config's timeout, or with the default."""
    class Stop(Exception):
        pass

    def setup(timeout_s=None):
        raise Stop(timeout_s)
    monkeypatch.setattr(train_module, "setup_distributed", setup)
    cfg = Config()
    cfg.train.dist_timeout_s, cfg.train.out_dir = 77, str(tmp_path / "run")
    with pytest.raises(Stop) as stopped:
        train(cfg)
    assert stopped.value.args == (77,)


def test_corrupt_record_is_reported_once_and_left_out(tiny_backbone, mini_root, tmp_path, monkeypatch, capsys):
    """One corrupt image in a 15-record sub-dataset, 20 steps of 4 (5 passes over it): the run ends normally,
    the record is reported once, saved in last.pt, and never reaches a batch again.
    Catches: visits counted instead of distinct records (it would exceed data.max_bad_records=1 and stop the
    run); the record not excluded from later batches; the set not saved in the checkpoint."""
    root = tmp_path / "ufire"
    shutil.copytree(mini_root, root)
    record = TrainSet(str(root), "1_t2i_Shoes").records[5]
    with open(record["target_image"][0], "wb") as f:
        f.write(b"not an image")
    seen = []
    real_step = train_module.cached_step

    def counting_step(encoder, examples, *args):
        seen.extend(e["id"] for e in examples)
        return real_step(encoder, examples, *args)

    monkeypatch.setattr(train_module, "cached_step", counting_step)
    cfg = run_config(tiny_backbone, str(root), tmp_path / "run", "data.sub_datasets=[1_t2i_Shoes]",
                     "train.max_steps=20", "data.max_bad_records=1")
    capsys.readouterr()
    train(cfg)
    assert capsys.readouterr().err.count(record["id"]) == 1
    assert seen.count(record["id"]) == 1 and len(seen) > 60
    assert load_checkpoint(tmp_path / "run" / "last.pt")["bad_records"] == [f"1_t2i_Shoes/{record['id']}"]


def test_training_loss_falls_on_ufire_mini(tiny_backbone, mini_root, tmp_path):
    cfg = run_config(tiny_backbone, mini_root, tmp_path / "learn", "train.max_steps=40", "train.batch_size=8",
                     "train.chunk_size=8", "data.sub_datasets=[1_t2i_FashionGen]", "train.lr=1e-3")
    train(cfg)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "learn" / "log.jsonl") if '"loss"' in line]
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


# ----------------------------------------------------------------------------- chunks prepared in threads

def test_prepare_workers_give_the_serial_inputs_and_drop_the_same_record(tiny_backbone, tmp_path):
    """With a pool of 2 threads, and serially, every chunk's inputs and pass 1's embeddings (LoRA dropout on) must
    equal a plain loop's over the batch without its unreadable record, which both name the same way. The record
    (r5's target) is in the second target chunk, so with threads pass 1 has run on four chunks when it is found.
    The 64 x 64 images are prepared for training at model.image_pixels (32 x 32), not at model.eval_image_pixels.
    A batch of the unreadable record alone leaves no chunk to prepare, serially and with threads.
    Catches: a worker's DataError swallowed (`yield future.result()` only for futures without an exception: the
    record is neither named nor dropped); the random state not restored before the retry (dropout masks shift);
    chunks prepared at the evaluation budget (`train=True` -> `train=False` in prepare_chunks, serially or for the
    first chunk with a pool, or in StepPrefetch.prepare: the chunks of the kept records prepared a step ahead are
    compared too); a pool given work without checking there is any (`if pool is None or not jobs` -> `if pool is
    None`: an IndexError when a batch whose only record is the unreadable one, a rank's whole batch, is prepared
    again without it with 2 threads)."""
    cfg = lora_dropout_config(tiny_backbone)
    cfg.model.image_pixels, cfg.model.eval_image_pixels = 32 * 32, 64 * 64
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    perturb(encoder)
    examples = make_examples(tmp_path, 7)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    examples[5]["target_image"] = str(tmp_path / "broken.png")

    kept = [e for e in examples if e["id"] != "r5"]
    torch.manual_seed(7)
    expected = []
    with torch.no_grad():
        for prepare, items, role in ((encoder.prepare_queries, kept, "query"),
                                     (encoder.prepare_targets, [e["target_image"] for e in kept], "target")):
            for i in range(0, len(items), 3):
                inputs = prepare(items[i:i + 3], train=True)
                expected.append((inputs, encoder(inputs, role)["emb"]))

    for workers in (0, 2):
        torch.manual_seed(7)
        with ThreadPoolExecutor(workers) if workers else contextlib.nullcontext() as pool:
            got, _, q, t, bad = train_module.prepare_and_embed(encoder, examples, 3, pool)
            alone = train_module.prepare_and_embed(encoder, [examples[5]], 3, pool)
        assert alone[0] == [] and alone[2][0] == alone[3][0] == [] and alone[4][0][0] == ["r5"], (workers, alone)
        assert [e["id"] for e in got] == [e["id"] for e in kept], workers
        assert len(bad) == 1 and bad[0][0] == ["r5"] and "broken.png" in bad[0][1], (workers, bad)
        chunks, outs = q[0] + t[0], q[1] + t[1]
        assert len(chunks) == len(expected) == 4, workers
        for (inputs, emb), chunk, out in zip(expected, chunks, outs):
            assert_same_state(inputs, chunk, f"workers={workers}")
            assert torch.equal(emb, out["emb"]), workers

    with StepPrefetch(2, encoder) as prefetch:
        batch = ("key", kept, 3)
        prefetch.prepare(batch)
        torch.manual_seed(7)
        _, _, q, t, _ = train_module.prepare_and_embed(encoder, kept, 3, prefetch.pool, prefetch.take(batch))
    assert prefetch.hits == 1
    for (inputs, emb), chunk, out in zip(expected, q[0] + t[0], q[1] + t[1], strict=True):
        assert_same_state(inputs, chunk, "prefetched")
        assert torch.equal(emb, out["emb"])


class GatedPreparer:
    """Stands in for an encoder in prepare_chunks: chunk ["b"] finishes only after chunk ["c"] has finished, so
    with two threads the chunks complete out of order. Records whether ["b"] really waited for ["c"]."""

    def __init__(self):
        self.c_done, self.waited = threading.Event(), None

    def prepare_queries(self, items, train):
        if items == ["b"]:
            self.waited = self.c_done.wait(timeout=30)
        if items == ["c"]:
            self.c_done.set()
        return {"items": items}

    prepare_targets = prepare_queries


def test_prepared_chunks_come_back_in_submission_order():
    """Chunks finishing out of order (["c"] before ["b"]) are still handed to the model in the serial order.
    Catches: results taken as they complete (`as_completed(futures)` instead of `futures`)."""
    encoder = GatedPreparer()
    with ThreadPoolExecutor(2) as pool:
        chunks = list(prepare_chunks(encoder, [["a"], ["b"], ["c"]], [["d"]], pool))
    assert encoder.waited, "chunk ['b'] did not run alongside chunk ['c']: the order was not put to the test"
    assert [c["items"] for c in chunks] == [["a"], ["b"], ["c"], ["d"]]


def test_a_batchs_first_chunk_is_prepared_by_the_calling_thread_before_the_pool_starts():
    """With a pool, prepare_chunks prepares the first chunk itself and only then submits the others: the tokenizer
    sets its padding state on its first call, and two threads doing that at once fail ("Already borrowed"), so the
    pool's threads must never be the first to tokenize.
    Catches: every chunk submitted to the pool (`jobs[1:]` -> `jobs`, no chunk prepared by the calling thread)."""
    calls = []

    def prepare(items, train):
        calls.append((items, threading.current_thread() is threading.main_thread()))
        return items

    encoder = SimpleNamespace(prepare_queries=prepare, prepare_targets=prepare)
    with ThreadPoolExecutor(2) as pool:
        chunks = list(prepare_chunks(encoder, [["a"], ["b"]], [["c"], ["d"]], pool))
    assert chunks == [["a"], ["b"], ["c"], ["d"]]
    assert calls[0] == (["a"], True) and sorted(calls[1:]) == [(["b"], False), (["c"], False), (["d"], False)]


def test_chunks_a_step_will_not_use_are_cancelled():
    """Work that no step will use is cancelled, not left to hold the prepare threads while the step waits for its
    own chunks: the chunks after one that holds an unreadable record (the batch is prepared again without it), and
    a guessed batch that is not the step's. One thread, held by the guess's first chunk, leaves the others queued.
    Catches: in_submission_order without its cancelling `finally` (the chunk after the DataError left queued);
    StepPrefetch.take keeping a missed guess's futures (its `future.cancel()` loop dropped)."""
    from concurrent.futures import Future
    from loader import in_submission_order
    failed, queued = Future(), Future()
    failed.set_exception(plumbing.DataError("x.png", "cannot decode"))
    with pytest.raises(plumbing.DataError, match="x.png: cannot decode"):
        list(in_submission_order([failed, queued], [{"items": ["a"]}]))
    assert queued.cancelled()

    release = threading.Event()
    encoder = SimpleNamespace(prepare_queries=lambda items, train: release.wait(timeout=60) and items,
                              prepare_targets=lambda items, train: items)
    views = [{"id": f"r{i}", "target_image": f"r{i}.png", "negative_image": []} for i in range(2)]
    with StepPrefetch(1, encoder) as prefetch:
        try:
            prefetch.prepare(("k", views, 1))       # 2 query chunks, then 2 target chunks
            futures = prefetch.futures
            assert prefetch.take(("j", views, 1)) is None
            assert len(futures) == 4 and all(f.cancelled() for f in futures[1:])
        finally:
            release.set()                           # else the pool's shutdown waits for the first chunk


def test_step_guess_is_used_only_when_it_is_exactly_the_steps_batch():
    """StepPrefetch hands a step the chunks prepared during the step before only if the guessed batch equals the
    step's batch in all three parts: key, training views and chunk size. A guess with the same key but another
    record, or the same records in other chunks, is a miss and the step prepares its own batch.
    Catches: the guess compared by its key alone (`guess == batch` -> `guess[0] == batch[0]`: the step trains on
    the guessed records) or without its chunk size (`guess[:2] == batch[:2]`: chunks of the guessed size); a guess
    kept after it was taken (`guess, futures, self.guess, self.futures = self.guess, self.futures, None, []` ->
    `guess, futures = self.guess, self.futures`: a step after one that prepared no guess takes the old one again,
    counted as a second hit)."""
    def views(ids):
        return [{"id": i, "target_image": f"{i}.png", "negative_image": []} for i in ids]

    encoder = SimpleNamespace(prepare_queries=lambda items, train: [e["id"] for e in items],
                              prepare_targets=lambda items, train: list(items))
    guess = ("k", views(["r0", "r1", "r2", "r3"]), 2)
    with StepPrefetch(1, encoder) as prefetch:
        for batch in [("k", views(["r0", "r1", "r2", "r9"]), 2), ("k", guess[1], 4), ("j", guess[1], 2)]:
            prefetch.prepare(guess)
            assert prefetch.take(batch) is None, batch
        prefetch.prepare(guess)
        futures = prefetch.take(("k", views(["r0", "r1", "r2", "r3"]), 2))     # equal to the guess, not the same
        assert [f.result() for f in futures] == [["r0", "r1"], ["r2", "r3"], ["r0.png", "r1.png"],
                                                 ["r2.png", "r3.png"]]
        # The step after, which its step (keeping no record) gave no guess: nothing is guessed, nothing counted.
        assert prefetch.take(guess) is None
    assert (prefetch.hits, prefetch.misses) == (1, 3)


def logged_training_steps(out_dir):
    """The log's step records less what differs between identical runs (timings, the prefetch counters)."""
    steps = [r for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if "loss" in r]
    for record in steps:
        for key in ("samples_per_s", "step_time_s", "slowest_rank", "peak_mem_mb", "prefetch_hits",
                    "prefetch_misses"):
            record.pop(key, None)
    return steps


def prefetch_counters(out_dir):
    """Per logged step: (prefetch_hits, prefetch_misses) so far."""
    log = map(json.loads, open(os.path.join(out_dir, "log.jsonl")))
    return [(r["prefetch_hits"], r["prefetch_misses"]) for r in log if "loss" in r]


def test_training_with_prepare_workers_matches_serial_training(tiny_backbone, mini_root, tmp_path, monkeypatch,
                                                               capsys):
    """Six steps of train() (batch 4 in chunks of 2, LoRA dropout, GGAS refreshing P every 2 steps) with
    data.prepare_workers=2, which prepares each step's chunks during the step before (loader.StepPrefetch), must log
    the same losses, report the same unreadable record at the same step and end with the same last.pt (weights,
    optimizer, sampler, every RNG state, unreadable records) as serial training. The run must exercise a guess that
    missed (P refreshed between the guess and the draw) and an unreadable record in a prefetched step: step 2's
    second record's target image is damaged (step 2's batch replayed from a fresh sampler: no P refresh before it).
    Catches: train() handing the step no pool and no prefetched chunks (`pool, prefetched = None, None`: step 2
    prepared again); the guess used without comparing it with the real batch (`if guess == batch` -> `if True`: step
    3 embeds the guessed batch's chunks, a shape error); the guess drawn from the real sampler
    (`copy.deepcopy(sampler)` -> `sampler`: later draws shift, the weights differ); the prefetched chunks reused after
    their DataError (`prefetched = None` dropped from prepare_and_embed: the retry meets the record again and the run
    stops with it); the guess's DataError raised in the step before (StepPrefetch.prepare waiting for its futures'
    results: the run stops with it)."""
    root = tmp_path / "ufire"
    shutil.copytree(mini_root, root)
    cfg = run_config(tiny_backbone, str(root), tmp_path / "none", "train.max_steps=6")
    train_sets = {k: TrainSet(str(root), k) for k in cfg.data.sub_datasets}
    sampler = TaskSampler({k: len(s) for k, s in train_sets.items()}, cfg.sampler, cfg.train.batch_size,
                          seed=cfg.train.seed)
    sampler.next_batch()
    key, indices = sampler.next_batch()
    first_batch_paths = {p for e in train_module.batch_examples(train_sets[key], indices, cfg, 0, 0)
                         for p in e["query_image"] + [e["target_image"]] + e["negative_image"]}
    bad = train_module.batch_examples(train_sets[key], indices, cfg, 1, 0)[1]
    assert bad["target_image"] not in first_batch_paths
    with open(bad["target_image"], "wb") as f:
        f.write(b"not an image")

    threads = set()
    prepare_targets = model.FashionLensEncoder.prepare_targets

    def recording(self, paths, train):
        threads.add(threading.current_thread().name)
        return prepare_targets(self, paths, train)

    reported, record_bad_records = [], train_module.record_bad_records

    def reporting(bad_records, key, bad, *args):      # the unreadable records each step found
        reported.append(bad)
        return record_bad_records(bad_records, key, bad, *args)

    monkeypatch.setattr(model.FashionLensEncoder, "prepare_targets", recording)
    monkeypatch.setattr(train_module, "record_bad_records", reporting)
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        capsys.readouterr()
        reported.clear()
        train(run_config(tiny_backbone, str(root), out, "train.max_steps=6", f"data.prepare_workers={workers}"))
        runs[workers] = load_checkpoint(out / "last.pt")
        runs[workers]["log"] = logged_training_steps(out)
        runs[workers]["skipped"] = re.findall(r"skipped record.*", capsys.readouterr().err)
        runs[workers]["found"] = list(reported)
        runs[workers]["config"]["train"].pop("out_dir"), runs[workers]["config"]["data"].pop("prepare_workers")
    assert any(name.startswith("prepare") for name in threads), threads
    assert len(runs[0]["log"]) == 6 and runs[0]["log"][1]["key"] == key
    assert f"{key}/{bad['id']}" in runs[0]["bad_records"]
    assert any(bad["id"] in ids for ids, _ in runs[0]["found"][1]), runs[0]["found"]  # found at step 2
    assert_same_state(runs[0], runs[2])
    counters = prefetch_counters(tmp_path / "workers2")
    hit = [now[0] > before[0] for before, now in zip([(0, 0)] + counters, counters)]
    assert hit[1], "step 2, holding the unreadable record, did not use prefetched chunks"
    assert counters[-1][1] >= 1, "no guess missed: the comparison with the real batch was not put to the test"


def test_prefetch_counts_the_steps_whose_guess_was_their_batch(tiny_backbone, mini_root, tmp_path, monkeypatch):
    """Eight steps with data.prepare_workers=1 and GGAS refreshing P at every step. Replayed independently from the
    logged difficulties: step s's batch (key, indices) was guessed right when a sampler holding G as it was before
    step s-1's update draws the same. The logged prefetch_hits / prefetch_misses must count exactly those, and the
    training thread must prepare chunks only in the steps that did not use a guess (the first and the misses). A
    guess is prepared in every step but the last (seven), none for a step that will not run.
    Catches: a guess counted as a hit before it is compared (`self.hits += 1` moved above `if guess == batch`); a hit
    whose prefetched chunks are not used (`return futures` -> `return None` in take: the training thread prepares
    again); the guess drawn with the current step's seed (`step + 1` -> `step` in the guess's draw_batch: the asfr
    hard negatives differ, every such guess misses); a guess of the step after the last (`if step + 1 < total_steps`
    -> `<=`: a batch decoded alongside the final validation for nothing)."""
    main_thread_prepares, in_step, guesses = [], [0, False], []     # (steps started, inside cached_step)
    prepare_queries, cached, guess = (model.FashionLensEncoder.prepare_queries, train_module.cached_step,
                                      StepPrefetch.prepare)

    def recording(self, queries, train):
        if threading.current_thread() is threading.main_thread() and in_step[1]:   # not validation's
            main_thread_prepares.append(in_step[0])
        return prepare_queries(self, queries, train)

    def counting(*args):
        in_step[:] = in_step[0] + 1, True
        try:
            return cached(*args)
        finally:
            in_step[1] = False

    monkeypatch.setattr(model.FashionLensEncoder, "prepare_queries", recording)
    monkeypatch.setattr(train_module, "cached_step", counting)
    monkeypatch.setattr(StepPrefetch, "prepare", lambda self, batch: guesses.append(in_step[0]) or guess(self, batch))
    cfg = run_config(tiny_backbone, mini_root, tmp_path / "run", "train.max_steps=8", "sampler.update_every=1",
                     "data.prepare_workers=1")
    train(cfg)
    log = [r for r in map(json.loads, open(tmp_path / "run" / "log.jsonl")) if "loss" in r]

    sampler = TaskSampler({k: len(TrainSet(mini_root, k)) for k in cfg.data.sub_datasets}, cfg.sampler,
                          cfg.train.batch_size, seed=cfg.train.seed)
    hits, misses = [], []
    g_now = g_before = np.zeros(len(sampler.keys))   # G after the last update, and after the one before it
    for step, record in enumerate(log, 1):
        sampler.G = g_before                              # what the guess drawn during the step before saw
        guess = copy.deepcopy(sampler).next_batch()
        sampler.G = g_now
        drawn = sampler.next_batch()
        assert drawn[0] == record["key"], step            # the replay follows the run
        if step > 1:
            (hits if guess == drawn else misses).append(step)
        g_before, g_now = g_now, np.array(list(record["difficulty"].values()))
    assert hits and misses, (hits, misses)
    assert (log[-1]["prefetch_hits"], log[-1]["prefetch_misses"]) == (len(hits), len(misses))
    assert sorted(set(main_thread_prepares)) == [1] + misses, (main_thread_prepares, misses)
    assert guesses == [1, 2, 3, 4, 5, 6, 7]


# ----------------------------------------------------------------------------- configs and overrides

def test_overrides_take_each_fields_type_and_refuse_others():
    """`section.key=value` overrides are read as YAML and coerced to the field's type: "1e-4" (a string to YAML 1.1)
    and 1 become floats, a string field keeps "123" as text and a value holding "=" whole; a value of another type, an
    unknown key or section, and a malformed override are refused.
    Catches: strings parsed as YAML for string fields too (`and not isinstance(default, str)` dropped: "123" -> 123, a
    TypeError); "1e-4" not converted (`(int, str)` -> `int`); a bool taken as a float (`not isinstance(value, bool)`
    dropped: lr=true -> 1.0); the type check dropped; the value cut at a second "=" (`split("=", 1)` ->
    `split("=")`)."""
    cfg = load_config(None, ["train.lr=1e-4", "train.temperature=1", "train.max_steps=5", "model.backbone=123",
                             "data.sub_datasets=[1_t2i_Shoes, 7_cir_Shoes]", "train.chunk_sizes={7_cir_Shoes: 4}",
                             "train.gather_negatives=true", "data.street2shop_images=images/a=b/{id}"])
    assert cfg.train.lr == 1e-4 and cfg.train.temperature == 1.0 and type(cfg.train.temperature) is float
    assert cfg.train.max_steps == 5 and cfg.model.backbone == "123" and cfg.train.gather_negatives is True
    assert cfg.data.sub_datasets == ["1_t2i_Shoes", "7_cir_Shoes"] and cfg.train.chunk_sizes == {"7_cir_Shoes": 4}
    assert cfg.data.street2shop_images == "images/a=b/{id}"
    for wrong in ("train.lr=true", "train.max_steps=1.5", "train.gather_negatives=1", "model.lora_r=abc",
                  "data.sub_datasets=1_t2i_Shoes"):
        with pytest.raises(TypeError, match=wrong.split("=")[0]):
            load_config(None, [wrong])
    with pytest.raises(KeyError, match="unknown config key train.learning_rate"):
        load_config(None, ["train.learning_rate=1e-4"])
    with pytest.raises(KeyError, match="unknown config section 'optim'"):
        load_config(None, ["optim.lr=1e-4"])
    for malformed in ("train.lr", "lr=1e-4"):
        with pytest.raises(ValueError, match="section.key=value"):
            load_config(None, [malformed])


def test_an_unknown_section_in_a_config_file_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """A config file with a section config.py does not have (`optim:` written for `train:`), on its own or inheriting
    another, is a KeyError naming it and the five sections there are, written out here; train.py ends in its usage
    line with that message.
    Catches: from_dict's section check dropped (`if section not in SECTIONS:` -> `if False:`: getattr's
    AttributeError, a traceback naming no section); the `inherit:` merge indexing the parent's sections
    (`base.setdefault(section, {})` -> `base[section]`: "KeyError: 'optim'", naming neither what is wrong nor what
    is known)."""
    (tmp_path / "parent.yaml").write_text("train:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("inherit: parent.yaml\noptim:\n  lr: 1.0e-3\n")
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1.0e-3\n")
    for name in ("c.yaml", "child.yaml"):
        with pytest.raises(KeyError, match=re.escape(
                "unknown config section 'optim'; known: ['calibrator', 'data', 'model', 'sampler', 'train']")):
            load_config(str(tmp_path / name))
    monkeypatch.setattr(sys, "argv", ["train.py", str(tmp_path / "c.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert exit_info.value.code == 2 and "unknown config section 'optim'" in capsys.readouterr().err


def test_a_word_that_is_not_one_of_a_keys_choices_is_refused_where_the_config_is_read(tmp_path, monkeypatch, capsys):
    """model.dtype=bf16 passed every CPU check (a CPU computes in fp32 and never reads it) and ended on a GPU in
    "AttributeError: module 'torch' has no attribute 'bf16'" after the data had loaded; sampler.mode=GGAS or
    train.schedule=cos in a ValueError traceback from inside train(). Each key that takes one of a few words takes
    every word config.py's comments name for it (written out here) as an override and is refused another, in one
    line naming the key; a misspelt word in a YAML file is refused the same way; every config shipped in configs/
    loads. Catches: the CHOICES check removed from _set; a key missing from CHOICES (model.dtype dropped); a word
    missing from a key's CHOICES (calibrator.gate without "fixed", model.trainable without "none", model.kind
    without "openclip": the fixed-gate ablation, the frozen floor and the baseline's checkpoints refused)."""
    documented = {"model.kind": "qwen3vl openclip", "model.trainable": "lora full none",
                  "model.dtype": "bfloat16 float32 float16", "model.vision_attention": "auto packed transformers",
                  "calibrator.mode": "slerp lerp none", "calibrator.gate": "learned fixed",
                  "sampler.mode": "ggas uniform size size_pow", "sampler.difficulty": "joint sum",
                  "train.schedule": "constant cosine"}
    assert {f"{section}.{key}" for section, key in CHOICES} == documented.keys()
    for name, words in documented.items():
        section, key = name.split(".")
        for word in words.split():
            assert load_config(None, [f"{name}={word}"]).to_dict()[section][key] == word
        with pytest.raises(ValueError, match=f"config {name} must be one of .*, got 'typo'"):
            load_config(None, [f"{name}=typo"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  dtype: bf16\n")
    with pytest.raises(ValueError, match="config model.dtype must be one of bfloat16, float32, float16, got 'bf16'"):
        load_config(str(broken))
    monkeypatch.setattr(sys, "argv", ["train.py", str(broken), f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert exit_info.value.code == 2 and "model.dtype must be one of" in capsys.readouterr().err
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        if os.path.basename(path) != "chunk_sizes.yaml":
            load_config(path)


def test_a_float_override_that_is_not_a_number_names_its_key():
    """train.lr=abc ended train.py with "ValueError: could not convert string to float: 'abc'", naming no key.
    Fails when _set lets float()'s ValueError through."""
    for wrong in ("train.lr=abc", "sampler.floor=1e-3x", "calibrator.fixed_gate=''"):
        with pytest.raises(TypeError, match=f"config {re.escape(wrong.split('=')[0])} must be float"):
            load_config(None, [wrong])


def test_a_float_key_that_is_not_finite_is_refused_naming_it(tmp_path):
    """"nan" and "inf" parse as floats and were taken: train.temperature=inf makes every logit 0, so the loss is
    log(batch) and every gradient 0, and a run "trains" to the end learning nothing; train.lr=nan makes every weight
    NaN after one step. Fails when _set accepts a non-finite float."""
    for wrong in ("train.temperature=inf", "train.lr=nan", "train.lr=.nan", "sampler.floor=-.inf"):
        with pytest.raises(ValueError, match=f"config {re.escape(wrong.split('=')[0])} must be a finite number"):
            load_config(None, [wrong])
    (tmp_path / "c.yaml").write_text("train:\n  lr: .inf\n")
    with pytest.raises(ValueError, match="train.lr must be a finite number"):
        load_config(str(tmp_path / "c.yaml"))
    assert load_config(None, ["train.temperature=1e-30"]).train.temperature == 1e-30      # tiny but finite


def test_a_config_file_that_is_not_a_mapping_of_sections_names_the_file_and_section(tmp_path):
    """YAML written as a list (`train:` then `- lr: 1e-4`), or a whole file that is a list, ended in
    "AttributeError: 'list' object has no attribute 'items'", naming neither the file nor the section; so did such a
    config inside a checkpoint. Fails when load_config stops checking the file (`check_sections(raw, path)` removed:
    the AttributeError, or a TypeError from the `inherit:` merge, comes back), or from_dict stops checking. An empty
    section (`train:` and nothing under it) is fine, in a file that inherits or not: fails when from_dict reads it
    as a mapping (`(values or {}).items()` -> `values.items()`: an AttributeError)."""
    (tmp_path / "parent.yaml").write_text("train:\n  lr: 0.5\n")
    for name, text, message in (("section.yaml", "train:\n  - lr: 1e-4\n", "config section 'train' must be a mapping"),
                                ("root.yaml", "- train\n- model\n", "a config is a mapping of sections"),
                                ("child.yaml", "inherit: parent.yaml\nmodel:\n  - dtype: float32\n",
                                 "config section 'model' must be a mapping")):
        (tmp_path / name).write_text(text)
        with pytest.raises(TypeError, match=re.escape(f"{tmp_path / name}: {message}")):
            load_config(str(tmp_path / name))
    with pytest.raises(TypeError, match="config: config section 'sampler' must be a mapping of keys, got a list"):
        Config.from_dict({"sampler": [{"mode": "uniform"}]})
    (tmp_path / "empty-section.yaml").write_text("inherit: parent.yaml\ntrain:\n")      # an empty section is fine
    assert load_config(str(tmp_path / "empty-section.yaml")).train.lr == 0.5
    (tmp_path / "bare-empty-section.yaml").write_text("train:\nmodel:\n  lora_r: 4\n")
    cfg = load_config(str(tmp_path / "bare-empty-section.yaml"))
    assert (cfg.model.lora_r, cfg.train.lr) == (4, 1e-4)


def test_command_line_errors_end_in_one_line_naming_the_key_or_file(tmp_path, mini_root, tiny_backbone,
                                                                     monkeypatch, capsys):
    """train.py ends a config error with its usage status (2) and the message naming the key, and bad input met in
    training (here a last.pt cut in half, then a last.pt of another train.lr, met by --resume) with the message naming
    the file (and the differing key), not a traceback.
    Fails when main lets the config error through (pytest sees the TypeError), when it lets the DataError through,
    or when load_checkpoint lets torch's own error out (it names no file: the DataError is not raised), or when
    restore refuses another config with a ValueError (`raise DataError(path, ...` -> `raise ValueError(...`)."""
    config = os.path.join(REPO, "configs", "tiny.yaml")
    monkeypatch.setattr(sys, "argv", ["train.py", config, "train.lr=abc"])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert exit_info.value.code == 2 and "config train.lr must be float, got 'abc'" in capsys.readouterr().err
    good = tmp_path / "good.pt"
    torch.save({"step": 3, "weights": torch.zeros(1000)}, good)
    (tmp_path / "last.pt").write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    monkeypatch.setattr(sys, "argv", ["train.py", config, f"data.root={mini_root}", f"model.backbone={tiny_backbone}",
                                      f"train.out_dir={tmp_path}", "--resume"])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert str(exit_info.value.code).startswith(f"train.py: {tmp_path / 'last.pt'}: cannot read the checkpoint")
    other = load_config(config, sys.argv[2:-1] + ["train.lr=1e-3"])
    torch.save({"config": other.to_dict()}, tmp_path / "last.pt")
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert str(exit_info.value.code) == (f"train.py: {tmp_path / 'last.pt'}: written with another config (differing: "
                                         f"train.lr); resume with the same config")


def test_float16_does_not_train_from_the_command_line_or_from_train(tmp_path, monkeypatch, capsys):
    """model.dtype=float16 on a GPU would train under an fp16 autocast without loss scaling: gradients under 6e-8
    flush to zero, silently. train() refuses it before it writes anything, on any device (a CPU computes in fp32
    and would not show it), and train.py says so in one line naming the key; bfloat16 and float32 pass.
    Catches: the refusal dropped (`if model_cfg.dtype == "float16"` -> `if False`); refuse_fp16 raising a plain
    ValueError again (train.py's traceback)."""
    config = os.path.join(REPO, "configs", "tiny.yaml")
    out = f"train.out_dir={tmp_path / 'run'}"
    monkeypatch.setattr(sys, "argv", ["train.py", config, "model.dtype=float16", out])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert str(exit_info.value.code).startswith("train.py: model.dtype=float16 cannot train: fp16 gradients need "
                                                "loss scaling")
    with pytest.raises(ValueError, match="model.dtype=float16 cannot train: fp16 gradients need loss scaling"):
        train(load_config(config, ["model.dtype=float16", out]))
    assert not (tmp_path / "run").exists()
    for dtype in ("bfloat16", "float32"):
        train_module.refuse_fp16(load_config(config, [f"model.dtype={dtype}"]).model)


def test_a_missing_backbone_ends_train_in_one_line_before_anything_is_written(tmp_path, mini_root, monkeypatch):
    """`train.py configs/tiny.yaml` before `fake_backbones.py make-tiny` (or with a misspelt model.backbone) ended in
    transformers' OSError traceback about huggingface.co, after reading the data and creating train.out_dir. It now
    ends in one line naming the directory and where it was looked for, before out_dir is created.
    Catches: train without its resolve_backbone check (the line removed: load_encoder's "cannot load the model"
    after out_dir exists); main letting EvaluationError through (`except (DataError, EvaluationError)` ->
    `except DataError`: a traceback)."""
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", os.path.join(REPO, "configs", "tiny.yaml"), f"data.root={mini_root}",
                                      f"train.out_dir={run}", "model.backbone=no-backbone"])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert str(exit_info.value.code) == (
        f"train.py: backbone: local directory 'no-backbone' not found (looked for {tmp_path / 'no-backbone'}); the "
        f"backbone must be local: point model.backbone at it (in the config, or model.backbone=DIR after it); python "
        f"fake_backbones.py make-tiny DIR builds the tiny one")
    assert not run.exists()


def test_one_line_joins_a_multi_line_message_and_names_an_empty_one_by_its_type():
    """plumbing.one_line is what the commands print for an error another library raised: its lines and indents
    become single spaces, a KeyError loses its quotes, an empty message is the type's name (all written by hand).
    Catches: one_line's whitespace join dropped (`text = str(text)`: a library's multi-line message printed over
    several lines, the indent kept)."""
    err = ValueError("cannot read model.safetensors:\n  header too large\n")
    assert plumbing.one_line(err) == "cannot read model.safetensors: header too large"
    assert plumbing.one_line(err, with_type=True) == "ValueError: cannot read model.safetensors: header too large"
    assert plumbing.one_line(KeyError("model.lr")) == "model.lr"
    assert plumbing.one_line(RuntimeError(" \n")) == "RuntimeError"


def test_malformed_yaml_ends_each_command_in_one_line_naming_the_file_and_line(tmp_path, monkeypatch, capsys):
    """yaml's errors are no ValueError: `evaluate.py --untrained --config broken.yaml` ended in a ScannerError
    traceback, and an override that is not YAML (`train.lr=[`) in a message naming "<unicode string>", not the key.
    A malformed file, or a malformed parent it inherits, is now a DataError naming that file and line, which train.py
    and evaluate.py print in one line.
    Catches: read_yaml letting yaml.YAMLError through (its `except` removed: both commands end in a traceback, here
    the ScannerError out of main); _set letting the override's YAMLError through (its `except` removed)."""
    import evaluate
    (tmp_path / "broken.yaml").write_text("model:\n  kind: qwen3vl\n   backbone: x\n")
    (tmp_path / "child.yaml").write_text("inherit: broken.yaml\ntrain: {lr: 0.5}\n")
    expected = f"{tmp_path / 'broken.yaml'}: not valid YAML (line 3, column 12: mapping values are not allowed here)"
    for name in ("broken.yaml", "child.yaml"):
        with pytest.raises(plumbing.DataError) as error:
            load_config(str(tmp_path / name))
        assert str(error.value) == expected
    monkeypatch.setattr(sys, "argv", ["train.py", str(tmp_path / "child.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert exit_info.value.code == 2 and capsys.readouterr().err.endswith(f"train.py: error: {expected}\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--untrained", "--config", str(tmp_path / "broken.yaml")])
    assert exit_info.value.code == f"evaluate.py: {expected}"
    with pytest.raises(TypeError, match=re.escape("config train.lr must be float, got '[' (not valid YAML)")):
        load_config(None, ["train.lr=["])


def test_a_config_not_found_from_another_directory_says_where_it_was_looked_for(tmp_path, monkeypatch, capsys):
    """`python /path/to/train.py configs/tiny.yaml` outside the repository ended in "[Errno 2] No such file or
    directory: 'configs/tiny.yaml'"; read_yaml now names the file and the working directory a relative path is
    read from, and train.py and evaluate.py print it in one line. A directory given as the config is "not a file".
    Catches: read_yaml without its existence check (`if not os.path.isfile(path)` -> `if False`: open's
    FileNotFoundError, whose message names no working directory); a directory called missing (`'not a file' if
    os.path.exists(path) else 'no such file'` -> `'no such file'`) or let through (`os.path.isfile` ->
    `os.path.exists`: open's IsADirectoryError)."""
    import evaluate
    monkeypatch.chdir(tmp_path)
    expected = f"configs/tiny.yaml: no such file (a relative path is read from the working directory {os.getcwd()})"
    monkeypatch.setattr(sys, "argv", ["train.py", "configs/tiny.yaml"])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert exit_info.value.code == 2 and capsys.readouterr().err.endswith(f"train.py: error: {expected}\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--untrained", "--config", "configs/tiny.yaml"])
    assert exit_info.value.code == f"evaluate.py: {expected}"
    os.mkdir("configs")
    with pytest.raises(plumbing.DataError) as error:
        load_config("configs")
    assert str(error.value) == f"configs: not a file (a relative path is read from the working directory {os.getcwd()})"


def test_a_config_of_other_bytes_than_text_an_empty_one_and_an_override_yaml_cannot_scan(tmp_path):
    """A config file holding a byte that is not UTF-8 is a DataError naming the file (yaml's reader reports it,
    reading the bytes); an empty config file is the default config; an override that yaml cannot even scan
    (`train.lr=a: b: c`) is a TypeError naming the key, as one it cannot parse (`train.lr=[`).
    Catches: read_yaml opening the file as text (`open(path, "rb")` -> `open(path)`: a UnicodeDecodeError naming no
    file); read_yaml catching marked errors only (`except yaml.YAMLError` -> `except yaml.MarkedYAMLError`: yaml's
    ReaderError escapes, a traceback); `read_yaml(path) or {}` -> `read_yaml(path)` (the empty file is refused);
    _set catching parser errors only (`except yaml.YAMLError` -> `except yaml.parser.ParserError`: a ScannerError
    naming "<unicode string>")."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"train:\n  lr: \xff\n")
    with pytest.raises(plumbing.DataError, match=f"^{re.escape(str(latin1))}: not valid YAML \\(unacceptable "
                                                 f"character #x00ff"):
        load_config(str(latin1))
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(str(tmp_path / "empty.yaml")).to_dict() == Config().to_dict()
    with pytest.raises(TypeError, match=re.escape("config train.lr must be float, got 'a: b: c' (not valid YAML)")):
        load_config(None, ["train.lr=a: b: c"])


def test_another_librarys_error_is_given_as_a_single_line():
    """plumbing.one_line turns another library's error into the single line a command prints (train.py's usage
    error, evaluate.py's EvaluationError, search.py's unreadable images), by hand: runs of whitespace and line
    breaks become one space, a KeyError loses the quotes its str adds, an error without a message is named by its
    type, and with_type prefixes the type.
    Catches: the whitespace not collapsed (`text = str(text)`: a multi-line message spreads over lines); an empty
    message left empty (`if not text: return ...` dropped: "cannot load the model: " followed by nothing)."""
    from plumbing import one_line
    assert (one_line(ValueError("Unrecognized model in /x.\n  Should have a `model_type` key\tin config.json"))
            == "Unrecognized model in /x. Should have a `model_type` key in config.json")
    assert one_line(KeyError("lm_head.weight")) == "lm_head.weight"
    assert one_line(RuntimeError()) == one_line(RuntimeError(" \n ")) == "RuntimeError"
    assert one_line(RuntimeError(), with_type=True) == "RuntimeError"
    assert one_line(OSError("disk\nfull"), with_type=True) == "OSError: disk full"


def test_inherited_config_is_merged_key_by_key_relative_to_its_file(tmp_path, monkeypatch):
    """`inherit:` names a file beside the config (not in the working directory); the child's keys replace the
    parent's one by one, a section the child leaves out is the parent's, and overrides win over both. A YAML file's
    `1e-4` (a string to YAML 1.1) is a float too. A parent may inherit in turn, from a file beside itself.
    Catches: a child's section replacing the parent's whole section (`base[section] = values`: lora_alpha and
    batch_size back to their defaults); the parent looked up from the working directory; the parent read as YAML
    only (`load_config(...).to_dict()` -> `read_yaml(...)`: its own `inherit:` taken for a section, a TypeError)."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "parent.yaml").write_text(
        "model: {lora_r: 4, lora_alpha: 8}\ntrain: {lr: 1e-4, batch_size: 8}\nsampler: {eta: 2.0}\n")
    (tmp_path / "configs" / "child.yaml").write_text(
        "inherit: parent.yaml\nmodel: {lora_r: 16}\ntrain: {out_dir: runs/child}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/child.yaml", ["train.batch_size=2"])
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.sampler.eta) == (16, 8, 2.0)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.out_dir) == (1e-4, 2, "runs/child")
    assert load_config("configs/child.yaml").train.batch_size == 8
    (tmp_path / "configs" / "base").mkdir()
    (tmp_path / "configs" / "base" / "grandparent.yaml").write_text("model: {lora_dropout: 0.2, lora_r: 2}\n")
    (tmp_path / "configs" / "middle.yaml").write_text("inherit: base/grandparent.yaml\nmodel: {lora_r: 4}\n")
    (tmp_path / "configs" / "leaf.yaml").write_text("inherit: middle.yaml\ntrain: {lr: 0.5}\n")
    cfg = load_config("configs/leaf.yaml")
    assert (cfg.model.lora_dropout, cfg.model.lora_r, cfg.train.lr) == (0.2, 4, 0.5)


def test_defaults_are_the_documented_values_and_release_yaml_sets_each_switch_back():
    """Config() holds the hyperparameters docs/method.md states (several are set by no config file: tiny.yaml runs
    with the regulariser weights and temperature of the defaults), and every switch of README's "Differences from
    the authors' release" table, read from the README, has its "ours" value by default (full.yaml's where the table
    says so) and its "release" value in configs/release.yaml.
    Catches: a wrong default no config overrides (calibrator.fro_weight 1e-3, calibrator.orth_weight 1e-3,
    train.temperature 0.05, data.max_query_images 3, calibrator.init_std 1e-3, train.asfr_hard_negatives 2,
    train.gather_negatives true, sampler.warmup_all_modes true); sampler.update_every defaulting to the release's
    0; release.yaml without its `update_every: 0` line; the README's table and the code disagreeing; a setting of a
    row naming several (train.grad_clip defaulting to 1.0, train.schedule to cosine) not read."""
    cfg = Config()
    documented = {"calibrator": {"fro_weight": 1e-4, "orth_weight": 1e-2, "gate_bias_init": -3.0, "init_std": 1e-6},
                  "sampler": {"alpha": 0.9, "gamma": 0.5, "eta": 1.0, "floor": 0.02, "warmup_epochs": 1,
                              "warmup_all_modes": False},
                  "train": {"temperature": 0.07, "lr": 1e-4, "weight_decay": 1e-3, "asfr_hard_negatives": 0,
                            "gather_negatives": False},
                  "model": {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
                  "data": {"max_query_images": 5}}
    for section, values in documented.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"

    configs = {name: load_config(os.path.join(REPO, "configs", f"{name}.yaml")) for name in ("full", "release")}
    table = open(os.path.join(REPO, "README.md")).read().split("## Differences from the authors' release")[1]
    rows = [row.split("|")[1:4] for row in table.split("\n## ")[0].splitlines() if row.startswith("| `")]
    checked = 0
    for switch, ours, release in rows:
        names = re.findall(r"`([\w.]+)`", switch)     # "`train.schedule`, `warmup_steps`": one section, several keys
        section = names[0].split(".")[0]
        if len(names) == 1:                             # "`0` (= train)": the first quoted value
            ours_values, release_values = ([re.search(r"`([^`]*)`", cell).group(1)] for cell in (ours, release))
        else:                                           # "`constant`, 0, 0" | "same"
            ours_values = [v.strip(" `") for v in ours.split(",")]
            release_values = ours_values if release.strip() == "same" else [v.strip(" `") for v in release.split(",")]
        default = configs["full"] if "full.yaml" in ours else cfg
        for name, mine, theirs in zip(names, ours_values, release_values, strict=True):
            key = name.split(".")[-1]
            assert getattr(getattr(default, section), key) == yaml.safe_load(mine), f"ours {section}.{key}"
            released = getattr(getattr(configs["release"], section), key)
            assert released == yaml.safe_load(theirs), f"release {section}.{key}"
            checked += 1
    assert checked == 16


def test_full_and_release_configs_hold_the_papers_hyperparameters():
    """configs/full.yaml (the paper's run) and configs/release.yaml (which inherits it) hold the hyper-parameters of
    paper sections IV-B to IV-E, written out here by hand; the release differs from full.yaml in its switches only.
    Catches: full.yaml's calibrator.rank 16, calibrator.hidden 256, train.epochs 4, train.batch_size 32,
    model.lora_alpha 32, model.lora_dropout 0.1, train.temperature 0.05, model.image_pixels 65536,
    model.video_frames 16, train.lr 2e-4, train.weight_decay 1e-2, sampler.alpha 0.8, sampler.floor 0.01,
    sampler.warmup_epochs 0, sampler.mode uniform or calibrator.gate fixed (no other test reads full.yaml's
    values: the defaults test reads Config())."""
    paper = {"model": {"kind": "qwen3vl", "trainable": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                       "image_pixels": 224 * 224, "video_frames": 8, "dtype": "bfloat16"},
             "calibrator": {"mode": "slerp", "gate": "learned", "hidden": 512, "rank": 32, "fro_weight": 1e-4,
                            "orth_weight": 1e-2, "gate_bias_init": -3.0, "init_std": 1e-6},
             "sampler": {"mode": "ggas", "alpha": 0.9, "gamma": 0.5, "eta": 1.0, "floor": 0.02, "warmup_epochs": 1},
             "train": {"batch_size": 64, "epochs": 5.0, "lr": 1e-4, "weight_decay": 1e-3, "schedule": "constant",
                       "warmup_steps": 0, "grad_clip": 0.0, "temperature": 0.07, "asfr_hard_negatives": 0,
                       "gather_negatives": False},
             "data": {"max_query_images": 5}}
    for name in ("full", "release"):
        cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        for section, values in paper.items():
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value, f"{name}.yaml {section}.{key}"


def test_default_lora_adapts_the_seven_documented_projections_of_every_language_layer(tiny_backbone):
    """docs/method.md#embedding: LoRA on the language model's q/k/v/o/gate/up/down projections, of every layer, and
    nothing of the vision tower. Read from the tiny backbone built with the default model.lora_targets.
    Catches: a projection left out of the default pattern (`|o_proj` dropped: attention outputs stay frozen)."""
    cfg = full_training_config(tiny_backbone)
    cfg.model.trainable = "lora"
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    adapted = {}
    for name, _ in encoder.named_parameters():
        match = re.search(r"language_model\.layers\.(\d+)\..*\.(\w+_proj)\.lora_A", name)
        if match:
            adapted.setdefault(int(match.group(1)), set()).add(match.group(2))
        assert "lora_" not in name or "language_model" in name, name
    layers = encoder.lm.config.text_config.num_hidden_layers
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted == {layer: expected for layer in range(layers)}


def test_command_line_passes_overrides_and_resume_on(tmp_path, monkeypatch, capsys):
    """`train.py CONFIG section.key=value ... [--resume]`: train() gets CONFIG's config with the overrides applied,
    and resume=True exactly when --resume is given or torchrun restarted the worker (TORCHELASTIC_RESTART_COUNT > 0).
    Catches: --resume not passed on (`resume=restarted`: the run starts fresh, deleting its log, and overwrites
    last.pt); the overrides dropped (`load_config(args.config)`)."""
    calls = []
    monkeypatch.setattr(train_module, "train", lambda cfg, resume=False, stop_after=None:
                        calls.append((cfg, resume)) or (None, 1.5))
    config = os.path.join(REPO, "configs", "tiny.yaml")
    with open(config) as f:
        assert yaml.safe_load(f)["train"]["lr"] != 0.125
    for argv, restarts in (([config, "train.lr=0.125", f"train.out_dir={tmp_path}", "--resume"], "0"),
                           ([config, f"train.out_dir={tmp_path}"], "0"), ([config], "1")):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restarts)
        monkeypatch.setattr(sys, "argv", ["train.py", *argv])
        train_module.main()
    assert [resume for _, resume in calls] == [True, False, True]
    assert calls[0][0].train.lr == 0.125 and calls[0][0].train.out_dir == str(tmp_path)
    assert calls[1][0].train.lr == 1e-4 and calls[2][0].train.out_dir == "runs/tiny"
    assert f"best validation score (sum of Recall@1): 1.50; checkpoints in {tmp_path}" in capsys.readouterr().out


@pytest.mark.parametrize("setting, message", [
    ("sampler.floor=0.2", "sampler.floor=0.2 leaves no room for 18 sub-datasets"),
    ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ("train.chunk_table=configs/chunk_sizes.yaml", "train.chunk_table picks chunk sizes by GPU memory, but with "
                                                   "calibrator.reg_per_chunk=true"),
    ("model.eval_image_pixels=1024", "model.eval_image_pixels=1024 is below model.image_pixels="),
])
def test_a_setting_the_run_cannot_work_with_ends_train_in_one_line_before_out_dir_exists(
        tmp_path, mini_root, tiny_backbone, monkeypatch, setting, message):
    """`train.py configs/tiny.yaml sampler.floor=0.2` (18 sub-datasets: floor * K >= 1) ended in a ValueError
    traceback from inside TaskSampler, after train.out_dir was created. Settings refused by the sampler, the chunk
    table or the encoder are SettingErrors, printed in one line by main, and out_dir is created only after them; the
    encoder's no longer blamed on the backbone ("backbone ...: cannot load the model: model.eval_image_pixels=...").
    Catches: main not catching SettingError (`except (DataError, EvaluationError)`: a traceback); the sampler's check
    raising a plain ValueError again; os.makedirs(out_dir) back at the top of train() (an empty out_dir is left);
    load_encoder without its `except SettingError` (the backbone blamed)."""
    run = tmp_path / "run"
    extra = ["calibrator.reg_per_chunk=true"] if "chunk_table" in setting else []
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["train.py", os.path.join(REPO, "configs", "tiny.yaml"), f"data.root={mini_root}",
                                      f"train.out_dir={run}", f"model.backbone={tiny_backbone}", setting, *extra])
    with pytest.raises(SystemExit) as exit_info:
        train_module.main()
    assert isinstance(exit_info.value.code, str) and "\n" not in exit_info.value.code
    assert exit_info.value.code.startswith(f"train.py: {message}")
    assert not run.exists()
