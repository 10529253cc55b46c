"""train.py: exact gradient caching, the loss's false-negative mask, bit-for-bit resume, two-process training,
and a loss that falls on U-FIRE-mini."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image

from config import Config, load_config
from model import build_encoder
from prepare_data import TrainSet
from train import contrastive_loss, cached_step, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """The tiny backbone trained in full (no LoRA, so no dropout) at 64 x 64 pixels."""
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.image_pixels = tiny_backbone, "full", 64 * 64
    return cfg


def uncached_reference(encoder, examples, cfg, chunk_size):
    """The same computation with every chunk's graph kept (no caching): forward all chunks with gradients in
    the same order, one loss, one backward."""
    targets = [e["target_image"] for e in examples]
    q_out = [encoder(encoder.prepare_queries(examples[i:i + chunk_size], train=True), role="query")
             for i in range(0, len(examples), chunk_size)]
    t_out = [encoder(encoder.prepare_targets(targets[i:i + chunk_size], train=True), role="target")
             for i in range(0, len(targets), chunk_size)]
    q = torch.cat([o["emb"] for o in q_out])
    t = torch.cat([o["emb"] for o in t_out])
    loss = contrastive_loss(q, t, torch.arange(len(examples)), targets, [e["target_label"] for e in examples],
                            cfg.train.temperature)
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


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_cached_gradients_equal_uncached_with_dropout(tiny_backbone, tmp_path, chunk_size):
    cfg = Config()
    cfg.model.backbone, cfg.model.trainable, cfg.model.lora_dropout = tiny_backbone, "lora", 0.3
    cfg.model.image_pixels = 64 * 64
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    perturb(encoder)
    examples = make_examples(tmp_path, 7)

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


def test_chunk_size_does_not_change_loss_or_gradients(tiny_backbone, tmp_path):
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    perturb(encoder)
    examples = make_examples(tmp_path, 6)
    results = []
    for chunk_size in (1, 3, 6):
        encoder.zero_grad(set_to_none=True)
        stats, _ = cached_step(encoder, examples, cfg, chunk_size)
        results.append((stats["loss"], grads(encoder)))
    for loss, g in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-5)
        for name in g:
            torch.testing.assert_close(g[name], results[0][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_unreadable_record_is_skipped_and_named(tiny_backbone, tmp_path):
    cfg = full_training_config(tiny_backbone)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    examples = make_examples(tmp_path, 4)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    examples[2]["target_image"] = str(tmp_path / "broken.png")
    stats, bad = cached_step(encoder, examples, cfg, 2)
    assert stats["samples"] == 3
    assert bad[0][0] == ["r2"] and "broken.png" in bad[0][1]


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


def test_rank_with_no_readable_record_still_joins_gathered_negatives(tiny_backbone, tmp_path):
    """With train.gather_negatives every rank must take part in the gathers. Rank 1's only record is unreadable;
    before it joined with no rows, rank 0 waited on it forever. Both ranks must end with the gradient that rank
    0's records give in a single process. (The calibrator's regularisers are off: each rank averages them over
    its own batch, like the loss without gathered negatives, so with uneven ranks they are weighted per rank.)"""
    examples = make_examples(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    examples[2]["target_image"] = str(tmp_path / "broken.png")
    (tmp_path / "batches.json").write_text(json.dumps([examples[:2], examples[2:]]))
    script = tmp_path / "step.py"
    script.write_text(
        "import json, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from config import Config\nfrom model import build_encoder\n"
        "from train import average_gradients, cached_step, setup_distributed\n"
        "setup_distributed()\nrank = dist.get_rank()\n"
        "cfg = Config()\n"
        f"cfg.model.backbone, cfg.model.trainable, cfg.model.image_pixels = {tiny_backbone!r}, 'full', 64 * 64\n"
        "cfg.train.gather_negatives = True\n"
        "cfg.calibrator.fro_weight = cfg.calibrator.orth_weight = 0.0\n"
        "torch.manual_seed(0)\nencoder = build_encoder(cfg.model, cfg.calibrator, 'cpu').train()\n"
        f"batch = json.load(open({str(tmp_path / 'batches.json')!r}))[rank]\n"
        "stats, bad = cached_step(encoder, batch, cfg, 2)\n"
        "average_gradients([p for p in encoder.parameters() if p.requires_grad])\n"
        "grads = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}\n"
        f"torch.save({{'stats': stats, 'bad': bad, 'grads': grads}}, f'{tmp_path}/rank{{rank}}.pt')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["stats"]["samples"] == 2 and rank1["stats"] is None
    assert rank1["bad"][0][0] == ["r2"] and "broken.png" in rank1["bad"][0][1]

    cfg = full_training_config(tiny_backbone)
    cfg.calibrator.fro_weight = cfg.calibrator.orth_weight = 0.0
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu").train()
    stats, _ = cached_step(encoder, examples[:2], cfg, 2)
    assert rank0["stats"]["loss"] == pytest.approx(stats["loss"], abs=1e-5)
    expected = grads(encoder)
    assert len(expected) > 10
    for name, grad in expected.items():
        torch.testing.assert_close(rank0["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
        assert torch.equal(rank0["grads"][name], rank1["grads"][name]), name


def test_throughput_benchmark_feeds_training_views_in_the_training_format(mini_root, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from train_throughput import synthetic_batch
    view = TrainSet(mini_root, "7_cir_FashionIQ-Dress").example(0, random.Random(0))
    assert set(synthetic_batch(str(tmp_path), 2)[0]) == set(view)


# ----------------------------------------------------------------------------- whole runs on U-FIRE-mini

def run_overrides(tiny_backbone, mini_root, out_dir, *extra):
    """configs/tiny.yaml shrunk to a few sub-datasets and small batches, with GGAS active from step 0."""
    return [f"model.backbone={tiny_backbone}", f"data.root={mini_root}", f"train.out_dir={out_dir}",
            "data.sub_datasets=[1_t2i_Shoes, 9_asfr_DARN, 7_cir_FashionIQ-Dress]", "train.batch_size=4",
            "train.chunk_size=2", "train.val_max_queries=4", "train.log_every=1", "sampler.warmup_epochs=0",
            "sampler.update_every=2", "model.trainable=lora", "model.lora_dropout=0.1", *extra]


def run_config(*args):
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"), run_overrides(*args))


def test_killed_run_resumes_bit_for_bit(tiny_backbone, mini_root, tmp_path):
    straight = run_config(tiny_backbone, mini_root, tmp_path / "straight", "train.max_steps=6", "train.save_every=3")
    encoder, _ = train(straight)
    expected = encoder.trainable_state_dict()

    interrupted = run_config(tiny_backbone, mini_root, tmp_path / "resumed", "train.max_steps=6", "train.save_every=3")
    train(interrupted, stop_after=4)           # killed after step 4: last.pt holds step 3
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["step"] == 3
    encoder, _ = train(interrupted, resume=True)
    resumed = encoder.trainable_state_dict()
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    # the run really trained: parameters moved away from a fresh encoder
    fresh = build_encoder(straight.model, straight.calibrator, "cpu").trainable_state_dict()
    changed = sum(not torch.equal(fresh[n], expected[n]) for n in fresh)
    assert changed > len(fresh) // 2


def test_torchrun_two_processes_keep_identical_parameters(tiny_backbone, mini_root, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from config import load_config\nfrom train import train\n"
        "cfg = load_config(sys.argv[1], sys.argv[2:])\n"
        "encoder, _ = train(cfg)\n"
        "torch.save(encoder.trainable_state_dict(), f'{cfg.train.out_dir}/rank{dist.get_rank()}.pt')\n")
    overrides = run_overrides(tiny_backbone, mini_root, tmp_path / "ddp", "train.max_steps=3",
                              "train.gather_negatives=true")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                           str(script), os.path.join(REPO, "configs", "tiny.yaml"), *overrides],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2


def test_training_loss_falls_on_ufire_mini(tiny_backbone, mini_root, tmp_path):
    cfg = run_config(tiny_backbone, mini_root, tmp_path / "learn", "train.max_steps=40", "train.batch_size=8",
                     "train.chunk_size=8", "data.sub_datasets=[1_t2i_FashionGen]", "train.lr=1e-3")
    train(cfg)
    import json
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "learn" / "log.jsonl") if '"loss"' in line]
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
