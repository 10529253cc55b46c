"""benchmarks/ablations.py: the summary tables, on small fake evaluation results worked out by hand."""
import json
import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import ablations  # noqa: E402
from ablations import markdown, summarise, train_and_evaluate  # noqa: E402


def fake_results(x):
    """evaluate.py's results.json shape: t2i sets at R@1 x and x + 2, a cir set at x + 4 (R@10 = R@1 + 50), and
    one unseen task at R@10 = x. Overall R@1 is the mean over the three trained sub-datasets: x + 2."""
    recall = lambda r1: {"R@1": r1, "R@10": r1 + 50}
    return {"sets": {"t2i_a": {"family": "t2i", "recall": recall(x)},
                     "t2i_b": {"family": "t2i", "recall": recall(x + 2)},
                     "cir_a": {"family": "cir", "recall": recall(x + 4)},
                     "Unseen Task": {"family": "unseen", "recall": {"R@1": 0, "R@10": x}}}}


def test_summary_pairs_variants_with_the_reference_seed_by_seed():
    """Absolute mean ± sample std over seeds and paired differences on the seeds both runs have, by hand.
    FashionLens overall R@1 per seed 0, 1, 2: 12, 22, 32; uniform on seeds 0, 1, 2: 10, 20, 31; the late variant
    ran seeds 1, 2, 3 and pairs with FashionLens on 1 and 2 only.
    Catches: the difference taken from the reference's mean instead of the same seed (unpaired: std 10.0 instead
    of 0.58), population instead of sample std, and pairing on the variant's seeds without intersecting."""
    runs = {"FashionLens": {0: fake_results(10), 1: fake_results(20), 2: fake_results(30)},
            "uniform sampling": {0: fake_results(8), 1: fake_results(18), 2: fake_results(29)},
            "late variant": {1: fake_results(21), 2: fake_results(33), 3: fake_results(0)}}
    absolute, paired = summarise(runs)
    assert absolute["FashionLens"]["overall R@1"] == pytest.approx((22, 10))
    assert absolute["FashionLens"]["t2i R@1"] == pytest.approx((21, 10))
    assert absolute["FashionLens"]["overall R@10"] == pytest.approx((72, 10))
    assert absolute["FashionLens"]["unseen: Unseen Task R@10"] == pytest.approx((20, 10))
    # uniform: mean of 10, 20, 31 = 20.333; deviations -10.333, -0.333, 10.667 -> sample variance 220.667 / 2
    assert absolute["uniform sampling"]["overall R@1"] == pytest.approx((61 / 3, (220.667 / 2) ** 0.5), abs=1e-3)
    # differences from FashionLens, seed by seed: -2, -2, -1 -> mean -5/3, sample std sqrt(1/3)
    assert paired["uniform sampling"]["overall R@1"] == pytest.approx((-5 / 3, (1 / 3) ** 0.5))
    assert paired["uniform sampling"]["cir R@10"] == pytest.approx((-5 / 3, (1 / 3) ** 0.5))
    # late variant against FashionLens on seeds 1 and 2: +1 and +3 -> mean 2, sample std sqrt(2)
    assert paired["late variant"]["overall R@1"] == pytest.approx((2, 2 ** 0.5))
    assert "FashionLens" not in paired
    with pytest.raises(ValueError, match="shares no seed"):
        summarise({"FashionLens": {0: fake_results(10)}, "other": {1: fake_results(10)}})


def test_markdown_puts_each_difference_beside_its_absolute_value():
    """Catches: the Δ cells taken from the absolute numbers, or the reference row given a difference."""
    runs = {"FashionLens": {0: fake_results(10), 1: fake_results(20), 2: fake_results(30)},
            "uniform sampling": {0: fake_results(8), 1: fake_results(18), 2: fake_results(29)}}
    lines = markdown(*summarise(runs), seeds=[0, 1, 2]).splitlines()
    header = next(line for line in lines if line.startswith("| variant | overall R@1 | Δ |"))
    assert header.split(" | ")[1:5] == ["overall R@1", "Δ", "overall R@10", "Δ"]
    first = lines.index(header)
    assert lines[first + 2].startswith("| FashionLens | 22.0 ± 10.0 | — | 72.0 ± 10.0 | — |")
    assert lines[first + 3].startswith("| uniform sampling | 20.3 ± 10.5 | -1.7 ± 0.6 | 70.3 ± 10.5 | -1.7 ± 0.6 |")


def test_finished_run_is_reused_only_with_the_same_overrides(tmp_path):
    """A run evaluated before a variant changed (e.g. uniform sampling without the warm-up) must not be reused.
    Catches: the recorded-overrides check removed (the stale results would be returned as the new variant's)."""
    args = SimpleNamespace(out=str(tmp_path), overrides=["train.epochs=2"])
    out = tmp_path / "uniform_sampling-seed0"
    (out / "eval_test").mkdir(parents=True)
    (out / "eval_test" / "results.json").write_text(json.dumps(fake_results(10)))
    with pytest.raises(RuntimeError, match="unrecorded"):
        train_and_evaluate("uniform sampling", 0, args, clip_config=None)
    overrides = [f"train.out_dir={out}", "train.seed=0", "sampler.mode=uniform", "sampler.warmup_all_modes=true",
                 "train.epochs=2"]
    (out / "overrides.json").write_text(json.dumps(overrides))
    assert train_and_evaluate("uniform sampling", 0, args, clip_config=None) == fake_results(10)
    (out / "overrides.json").write_text(json.dumps(overrides[:-1]))
    with pytest.raises(RuntimeError, match="not"):
        train_and_evaluate("uniform sampling", 0, args, clip_config=None)


def test_each_variant_runs_its_own_overlay():
    """The overrides behind each row, written out from configs/ablation_*.yaml. Catches: two overlays swapped
    between rows (size-proportional sampling reporting the scale-prior runs)."""
    assert ablations.VARIANTS["FashionLens"] == []
    assert ablations.VARIANTS["no calibrator"] == ["calibrator.mode=none"]
    assert ablations.VARIANTS["lerp instead of slerp"] == ["calibrator.mode=lerp"]
    for name, mode in (("uniform sampling", "uniform"), ("size-proportional sampling", "size"),
                       ("scale-prior sampling", "size_pow")):
        assert ablations.VARIANTS[name] == [f"sampler.mode={mode}", "sampler.warmup_all_modes=true"]
    assert ablations.VARIANTS["open_clip dual encoder"] == ["model.kind=openclip", "model.trainable=full",
                                                         "calibrator.mode=none"]


def test_a_run_trains_with_its_seed_and_evaluates_its_own_checkpoint(tmp_path, monkeypatch):
    """The two commands of a fresh run, with the training and evaluation replaced by a recorder. Catches: the seed
    not reaching train.py (every seed trains seed 0), the open_clip variant trained without its backbone, seeds of
    one variant sharing an output directory."""
    commands = []

    def fake_run(cmd, log_path):
        commands.append(cmd)
        if cmd[1] == "evaluate.py":
            os.makedirs(os.path.join(os.path.dirname(cmd[2]), "eval_test"))
            with open(os.path.join(os.path.dirname(cmd[2]), "eval_test", "results.json"), "w") as f:
                json.dump(fake_results(len(commands)), f)

    monkeypatch.setattr(ablations, "run", fake_run)
    args = SimpleNamespace(out=str(tmp_path), overrides=["train.epochs=2"], config="configs/tiny.yaml")
    assert train_and_evaluate("open_clip dual encoder", 1, args, clip_config="CLIP") == fake_results(2)
    out = str(tmp_path / "open_clip_dual_encoder-seed1")
    assert commands[0][1:] == ["train.py", "configs/tiny.yaml", f"train.out_dir={out}", "train.seed=1",
                               "model.kind=openclip", "model.trainable=full", "calibrator.mode=none",
                               "train.epochs=2", "model.backbone=CLIP"]
    assert commands[1][1:] == ["evaluate.py", os.path.join(out, "best.pt"), "--split", "test"]
    assert train_and_evaluate("open_clip dual encoder", 2, args, clip_config="CLIP") == fake_results(4)
    assert commands[2][3:5] == [f"train.out_dir={tmp_path / 'open_clip_dual_encoder-seed2'}", "train.seed=2"]


def test_main_writes_each_variant_and_seed_to_its_row(tmp_path, monkeypatch, capsys):
    """The whole script with each run's results given: FashionLens seeds 0, 1 at x = 10, 20 and uniform sampling at
    x = 13, 21 (fake_results). By hand: overall R@1 12, 22 -> 17.0 ± 7.1 and 15, 23 -> 19.0 ± 5.7, paired +3, +1 ->
    +2.0 ± 1.4; t2i R@1 11, 21 -> 16.0 ± 7.1 and 14, 22 -> 18.0 ± 5.7, paired +2.0 ± 1.4 (every column of
    fake_results moves with x).
    Catches: every row given FashionLens' runs, the reference not run when --variants leaves it out, variants not
    asked for put in the tables, the per-family tables reduced to the headline columns or the Δ table showing
    absolute values, a positive Δ printed without its sign, the seeds named wrongly, the overrides left out of the
    JSON."""
    given = {("FashionLens", 0): 10, ("FashionLens", 1): 20, ("uniform sampling", 0): 13, ("uniform sampling", 1): 21}
    monkeypatch.setattr(ablations, "train_and_evaluate", lambda name, seed, args, clip: fake_results(given[name, seed]))
    monkeypatch.setattr(ablations, "make_tiny_openclip_config", lambda out: None)
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--seeds", "0", "1", "--variants", "uniform sampling",
                                      "--out", str(tmp_path), "train.epochs=2"])
    ablations.main()
    written = json.loads((tmp_path / "ablations.json").read_text())
    assert written["overrides"] == ["train.epochs=2"] and written["seeds"] == [0, 1]
    assert written["runs"] == {f"{name}/seed{seed}": fake_results(x) for (name, seed), x in given.items()}
    lines = (tmp_path / "ablations.md").read_text().splitlines()
    assert "over seeds 0, 1." in lines[0]
    assert lines[4] == ("| FashionLens | 17.0 ± 7.1 | — | 67.0 ± 7.1 | — | 15.0 ± 7.1 | — |")
    assert lines[5] == ("| uniform sampling | 19.0 ± 5.7 | +2.0 ± 1.4 | 69.0 ± 5.7 | +2.0 ± 1.4 | 17.0 ± 5.7 | "
                        "+2.0 ± 1.4 |")
    every, delta = lines.index("Every column:"), lines.index("Every column, Δ from FashionLens:")
    assert lines[every + 2].split(" | ")[1:3] == ["t2i R@1", "t2i R@10"]
    assert lines[every + 4].startswith("| FashionLens | 16.0 ± 7.1 | 66.0 ± 7.1 | 19.0 ± 7.1 |")
    assert lines[every + 5].startswith("| uniform sampling | 18.0 ± 5.7 | 68.0 ± 5.7 | 21.0 ± 5.7 |")
    assert lines[delta + 4].startswith("| FashionLens | — | — | — |")
    assert lines[delta + 5].startswith("| uniform sampling | +2.0 ± 1.4 | +2.0 ± 1.4 | +2.0 ± 1.4 |")
    assert len(lines) == delta + 6          # no row for a variant not asked for
    assert capsys.readouterr().out.startswith(lines[0])
