"""plot.py turns a JSONL training log into valid PNGs; resumed and cut-short logs are handled."""
import json
import math
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plot  # noqa: E402
from plot import plot_log, read_log  # noqa: E402

KEYS = ["1_t2i_FashionGen", "7_cir_Shoes", "9_asfr_DARN"]


def train_line(step, gate=True):
    probs = [1 + math.sin(step / 10 + i) ** 2 for i in range(len(KEYS))]
    return {"step": step, "epoch": step // 40, "key": KEYS[step % 3], "loss": 3 / (1 + step / 30), "reg": 1e-4,
            "gate_mean": 0.05 + step / 1000 if gate else None, "lr": 1e-4,
            "probs": {k: p / sum(probs) for k, p in zip(KEYS, probs)},
            "difficulty": {k: (i + 1) * (1 - math.exp(-step / 20)) for i, k in enumerate(KEYS)},
            "samples_per_s": 50.0, "peak_mem_mb": 900.0}


def write_log(path, lines, tail=""):
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
        f.write(tail)


def test_read_log_keeps_last_line_per_step_and_skips_cut_lines(tmp_path, capsys):
    lines = [train_line(s) for s in range(10)] + [{"step": 9, "val": {}, "val_score": 0.5}]
    resumed = [dict(train_line(s), loss=-1.0) for s in range(6, 12)]     # resumed from a step-6 checkpoint
    path = str(tmp_path / "log.jsonl")
    write_log(path, lines, '{"step": 10, "loss": 1.')                   # killed mid-line ...
    with open(path, "a") as f:
        f.write("\n" + "".join(json.dumps(line) + "\n" for line in resumed))    # ... then resumed
    train, val = read_log(path)
    assert [line["step"] for line in train] == list(range(12))
    assert [line["loss"] for line in train[6:]] == [-1.0] * 6
    assert [line["val_score"] for line in val] == [0.5]
    assert "log.jsonl:12: skipping" in capsys.readouterr().err


def test_plot_log_writes_valid_pngs(tmp_path):
    log = str(tmp_path / "log.jsonl")
    write_log(log, [train_line(s) for s in range(120)] + [{"step": 60, "val": {}, "val_score": 1.2}])
    written = plot_log(log, str(tmp_path / "plots"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["difficulty.png", "gate.png", "loss.png", "probabilities.png", "val_score.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100
            image.verify()
    assert sorted(os.listdir(tmp_path / "plots")) == names                 # no temp files left behind


def test_cli_without_gate_or_validation(tmp_path):
    log = str(tmp_path / "log.jsonl")
    write_log(log, [train_line(s, gate=False) for s in range(30)])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), log], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
    assert sorted(os.listdir(tmp_path)) == ["difficulty.png", "log.jsonl", "loss.png", "probabilities.png"]
    assert len(result.stdout.split()) == 3


def test_plotted_curves_are_the_logged_values(tmp_path, monkeypatch):
    """The data behind the PNGs: loss.png's raw loss, its moving average over len // 50 = 2 steps (the first point
    its own mean) and the regulariser; probabilities.png's curve per sub-dataset, P_k of that key at each step.
    Catches: the moving average divided by the full window from the first step, or subtracting a step late; another
    window; the regulariser panel showing another field; the probability plot drawing the difficulty, or one key's
    values under every label."""
    log = str(tmp_path / "log.jsonl")
    lines = [dict(train_line(s), reg=s / 7) for s in range(120)]
    write_log(log, lines)
    figures = {}
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: figures.update({os.path.basename(path): fig}))
    plot_log(log, str(tmp_path))
    loss = [line["loss"] for line in lines]
    raw, average = figures["loss.png"].axes[0].lines
    assert list(raw.get_ydata()) == loss
    assert list(average.get_ydata()) == pytest.approx([sum(loss[max(0, i - 1):i + 1]) / min(i + 1, 2)
                                                       for i in range(120)])
    assert list(figures["loss.png"].axes[1].lines[0].get_ydata()) == [s / 7 for s in range(120)]
    curves = figures["probabilities.png"].axes[0].lines
    assert sorted(c.get_label() for c in curves) == sorted(KEYS)
    for curve in curves:
        assert list(curve.get_ydata()) == [line["probs"][curve.get_label()] for line in lines]
    for fig in figures.values():
        plt.close(fig)


def test_cli_out_writes_the_pngs_there(tmp_path, monkeypatch, capsys):
    """`plot.py LOG --out DIR` writes the PNGs into DIR (created) and prints their paths; nothing lands beside
    the log. Catches: main not passing --out on (the PNGs go to the log's folder)."""
    log = str(tmp_path / "log.jsonl")
    write_log(log, [train_line(s) for s in range(30)])
    monkeypatch.setattr(sys, "argv", ["plot.py", log, "--out", str(tmp_path / "plots")])
    plot.main()
    names = ["difficulty.png", "gate.png", "loss.png", "probabilities.png"]
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", "plots"] and sorted(os.listdir(tmp_path / "plots")) == names
    assert sorted(capsys.readouterr().out.split()) == [str(tmp_path / "plots" / name) for name in names]
