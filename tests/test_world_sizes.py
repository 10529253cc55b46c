"""Results that must not depend on how the work is split: the whole training loop on three processes against one
process on the same global batch, and validation at any train.eval_batch_size."""
import json
import os
import shutil

import pytest
import torch

from config import load_config
from launch import torchrun
from model import build_encoder
from plumbing import load_checkpoint
from prepare_data import TrainSet
from sampler import TaskSampler
from test_train import assert_same_state, perturb, run_overrides
from train import load_val_sets, train, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def test_three_processes_train_like_one_process_with_a_global_batch_three_does_not_divide(tiny_backbone, mini_root,
                                                                                           tmp_path):
    """`torchrun --nproc_per_node=3 train.py configs/tiny.yaml` with batch 2 per process and cross-process negatives
    against one process with batch 6, 4 steps, LoRA without dropout (nothing random differs between the runs; the
    sub-datasets have one target per record and no hard negatives, so the per-rank draws of batch_examples pick
    nothing). train.batch_size is per process, so the global batch is always a multiple of the world size; what
    makes it one 3 does not divide is an unreadable record: the first step's fifth record (rank 2's first) has a
    corrupt image, so that step trains on 5 records (2 + 2 + 1 on three processes) and later draws of it leave it
    out. Both runs must log the same sub-datasets and sample counts at every step, the same losses, regulariser
    and gate mean, the same validation, and end with the same weights, AdamW moments, GGAS state and unreadable
    records. Step 1 is the same arithmetic in both (each rank's 2 records are one of the single process's
    gradient-cache chunks of 2); the gradients' summation order differs (one backward per chunk, then
    average_gradients over ranks), which leaves the weights within fp32 rounding of each other (measured: 1e-7;
    tolerance 1e-6) and moves later losses by that times the logits' 1 / temperature = 14 (measured: 1.3e-6;
    tolerance 1e-5) and GGAS's difficulty, a gradient norm near 2, by 1e-6 of itself (measured: 2e-6; tolerance
    1e-5). Recall is compared exactly: that small a difference reorders no gallery here.
    Catches: the world-size scaling of the embedding gradients dropped (`scale, reg_batch = size, ...` ->
    `1, ...`: each rank's gradient a third of its share); the regulariser's share from each rank's own count
    (`sum(q_counts) / size` -> `q.shape[0]`: rank 2's one record weighted 5 / 3 times too much); t_starts from the
    previous rank's target count, not the running sum (`np.cumsum([0] + t_counts[:-1])` -> `[0] + t_counts[:-1]`:
    rank 2's positives point at rank 1's targets, which two ranks cannot show); each rank recording only the
    unreadable records it found itself (`gather_list(bad)` -> `bad` in record_bad_records: rank 0's checkpoint
    lists none)."""
    root = tmp_path / "ufire"
    shutil.copytree(mini_root, root)
    keys = ["1_t2i_Shoes", "7_cir_FashionIQ-Dress"]
    common = ["train.max_steps=4", "train.gather_negatives=true", "model.lora_dropout=0.0",
              f"data.sub_datasets=[{', '.join(keys)}]"]
    overrides = {run: run_overrides(tiny_backbone, str(root), tmp_path / run, *common, f"train.batch_size={batch}")
                 for run, batch in (("three", 2), ("one", 6))}
    # The first step's records, as one process draws them: ranks 0, 1, 2 of three take 2 each, in order.
    cfg = load_config(TINY, overrides["one"])
    sets = {k: TrainSet(str(root), k) for k in keys}
    key, indices = TaskSampler({k: len(s) for k, s in sets.items()}, cfg.sampler, 6, seed=cfg.train.seed).next_batch()
    broken = sets[key].records[indices[4]]
    with open((broken["query_image"] or broken["target_image"])[0], "wb") as f:
        f.write(b"not an image")

    torchrun(os.path.join(REPO, "train.py"), TINY, *overrides["three"], nproc=3)
    train(load_config(TINY, overrides["one"]))

    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("three", "one")]
    assert len(logs[0]) == len(logs[1]) == 5                        # 4 steps, then validation
    assert logs[0][0]["key"] == key and logs[0][0]["samples"] == logs[1][0]["samples"] == 5
    for three, one in zip(*logs):
        assert three["step"] == one["step"] and three.get("key") == one.get("key")
        for name in ("loss", "contrastive", "reg", "samples", "gate_mean"):
            assert three.get(name) == pytest.approx(one.get(name), abs=1e-5), (three["step"], name)
        assert (three.get("val"), three.get("val_score")) == (one.get("val"), one.get("val_score"))
    three, one = (load_checkpoint(tmp_path / run / "last.pt") for run in ("three", "one"))
    assert len(three["rng"]) == 3 and three["step"] == one["step"] == 4
    assert three["bad_records"] == one["bad_records"] == [f"{key}/{broken['id']}"]
    assert_same_state(three["model"], one["model"], "model", atol=1e-6)
    assert_same_state(three["optimizer"], one["optimizer"], "optimizer", atol=1e-6)
    for name in ("G", "P", "positions", "passes"):
        assert_same_state(three["sampler"][name], one["sampler"][name], name, atol=1e-5)


def test_validation_does_not_depend_on_eval_batch_size(tiny_backbone, mini_root, monkeypatch):
    """train.validate at train.eval_batch_size 1 (every prompt alone: no padding), 7 (several batches, the last
    partial, text, image, multi-image and video prompts padded together) and 64 (every query in one batch) encodes
    in batches of that size and gives the same embeddings and the same results. The calibrator is moved off its
    near-identity start so it takes part. Tolerance 1e-5 on unit vectors: each embedding is a row of the same fp32
    computation, and batching only changes the shapes of the matmuls (their blocking, so the last bits; measured:
    1.4e-7, about fp32's epsilon); padding, on the right of a causal model, must change nothing, and anything
    reading across rows changes far more. Recall is compared exactly: a 1e-7 difference reorders no gallery here.
    Catches: every row read at the first prompt's readout position (`hidden[torch.arange(ids.shape[0], ...),
    inputs["readout_index"]]` -> `hidden[:, inputs["readout_index"][0]]` in model.readout: right for a batch of
    one); validate encoding at the default batch, not the config's (`batch_size=cfg.train.eval_batch_size` ->
    `batch_size=32`)."""
    cfg = load_config(TINY, [f"model.backbone={tiny_backbone}", f"data.root={mini_root}", "train.val_max_queries=6"])
    val_sets = load_val_sets(cfg, ["1_t2i_Shoes", "5_compatibility_Polyvore", "6_video2img_MovingFashion",
                                   "7_cir_FashionIQ-Dress"])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.calibrator, "cpu")
    perturb(encoder)
    calls = []

    def recording(encode):
        def wrapper(items, batch_size=32, progress=False):
            emb = encode(items, batch_size=batch_size, progress=progress)
            calls[-1]["batches"].add(batch_size)
            calls[-1]["emb"].append(emb)
            return emb
        return wrapper

    monkeypatch.setattr(encoder, "encode_targets", recording(encoder.encode_targets))
    monkeypatch.setattr(encoder, "encode_queries", recording(encoder.encode_queries))
    for batch in (1, 7, 64):
        cfg.train.eval_batch_size = batch
        calls.append({"batches": set(), "emb": []})
        calls[-1]["results"] = validate(encoder, val_sets, cfg)
        calls[-1]["emb"] = torch.cat(calls[-1]["emb"])
    alone = calls[0]
    assert len(alone["emb"]) == 42 and alone["batches"] == {1}    # 21 gallery images, then 21 queries
    for call, batch in zip(calls[1:], (7, 64)):
        assert call["batches"] == {batch}
        assert (call["emb"] - alone["emb"]).abs().max() < 1e-5, batch
        assert call["results"] == alone["results"], batch
