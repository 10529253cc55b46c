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


def test_lines_that_are_not_train_records_are_skipped_naming_their_line(tmp_path, capsys):
    """A log line that parses but is no train.py record (no step, a JSON list, a loss that is not a number) or that is
    not UTF-8 is skipped with a warning naming file and line, as a cut line is; the other steps are plotted.
    Catches: read_log without its record check (`if (not isinstance(record, dict) ...` -> `if record is None:`:
    KeyError 'step' / TypeError tracebacks naming no file), or reading the log as text (`open(path, "rb")` ->
    `open(path)`: a UnicodeDecodeError traceback)."""
    path = str(tmp_path / "log.jsonl")
    write_log(path, [train_line(0), {"loss": 1.0}, [1, 2], {"step": 3, "loss": "high"}, train_line(4)])
    with open(path, "ab") as f:
        f.write(b'{"step": 5, "key": "\xff\xfe"}\n')
    train, _ = read_log(path)
    assert [line["step"] for line in train] == [0, 4]
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"{path}:{n}: skipping an unreadable log line" for n in (2, 3, 4, 6)]
    assert len(plot_log(path, str(tmp_path / "plots"))) == 4


def test_a_logged_step_without_a_loss_is_left_out_of_the_curves(tmp_path):
    """train.py logs a step whose records were all unreadable without a loss (its stats are None, so the line lacks
    loss, reg and gate_mean): read_log leaves it out of the training lines, and the plots draw the other steps.
    Catches: read_log taking every line without val_score as a training line (`elif "loss" in record` -> `else`:
    plot_log's KeyError on "loss")."""
    skipped = {k: v for k, v in train_line(1).items() if k not in ("loss", "reg", "gate_mean")}
    path = str(tmp_path / "log.jsonl")
    write_log(path, [train_line(0), skipped, train_line(2)])
    train, _ = read_log(path)
    assert [line["step"] for line in train] == [0, 2]
    assert len(plot_log(path, str(tmp_path / "plots"))) == 4

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


def test_cli_out_that_is_a_file_ends_in_one_line_naming_it(tmp_path, monkeypatch):
    """`plot.py LOG --out FILE` ends in one line naming FILE, which is left as it was.
    Catches: main not checking --out (publish_dir's FileExistsError traceback after every plot is drawn)."""
    log, taken = str(tmp_path / "log.jsonl"), tmp_path / "plots"
    write_log(log, [train_line(s) for s in range(3)])
    taken.write_text("mine\n")
    monkeypatch.setattr(sys, "argv", ["plot.py", log, "--out", str(taken)])
    with pytest.raises(SystemExit) as exit_info:
        plot.main()
    assert exit_info.value.code == f"plot.py: {taken}: not a folder (--out: the plots are written into it)"
    assert taken.read_text() == "mine\n"


def test_cli_ends_a_missing_or_empty_log_in_one_line_naming_it(tmp_path, monkeypatch):
    """`plot.py LOG` before training (no log yet), on the run's folder instead of its log, or on a log without
    training lines ends in one line naming the file and, for a missing one, where train.py writes it; nothing is
    written.
    Catches: main letting the DataError through (its `except DataError` removed: a traceback); read_log without its
    existence check (`if not os.path.isfile(path)` -> `if False`: open's FileNotFoundError traceback), or checking
    only that the path exists (`os.path.isfile` -> `os.path.exists`: open's IsADirectoryError traceback)."""
    missing, folder, empty = tmp_path / "run" / "log.jsonl", tmp_path / "other-run", tmp_path / "log.jsonl"
    empty.write_text("\n")
    folder.mkdir()
    for log, message in ((missing, "no such log; train.py writes log.jsonl into its train.out_dir"),
                         (folder, "no such log; train.py writes log.jsonl into its train.out_dir"),
                         (empty, "no training lines to plot")):
        monkeypatch.setattr(sys, "argv", ["plot.py", str(log)])
        with pytest.raises(SystemExit) as exit_info:
            plot.main()
        assert str(exit_info.value.code).startswith(f"plot.py: {log}: {message}")
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", "other-run"] and not os.listdir(folder)


def test_gate_validation_and_difficulty_curves_are_the_logged_values(tmp_path, monkeypatch):
    """The data behind gate.png, val_score.png and difficulty.png: the gate curve is gate_mean at every step that
    logged one (a step without a calibrator logs null and is left out), the validation curve is val_score at each
    validation step, each difficulty curve that key's G_k. Expected values are the ones written to the log.
    Fails when the validation plot draws another field (`line["step"]` for `line["val_score"]`), the gate curve
    drops or shifts points, or the difficulty plot draws the probabilities."""
    log = str(tmp_path / "log.jsonl")
    lines = [train_line(s, gate=s % 4 != 3) for s in range(40)]
    vals = [{"step": s, "val": {}, "val_score": 10.0 + s / 8} for s in (9, 19, 29, 39)]
    write_log(log, lines + vals)
    figures = {}
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: figures.update({os.path.basename(path): fig}))
    plot_log(log, str(tmp_path))
    gate = figures["gate.png"].axes[0].lines[0]
    assert list(gate.get_xdata()) == [s for s in range(40) if s % 4 != 3]
    assert list(gate.get_ydata()) == [0.05 + s / 1000 for s in range(40) if s % 4 != 3]
    val = figures["val_score.png"].axes[0].lines[0]
    assert list(val.get_xdata()) == [9, 19, 29, 39] and list(val.get_ydata()) == [11.125, 12.375, 13.625, 14.875]
    for curve in figures["difficulty.png"].axes[0].lines:
        assert list(curve.get_ydata()) == [line["difficulty"][curve.get_label()] for line in lines]
    for fig in figures.values():
        plt.close(fig)


def test_read_log_orders_steps_that_a_resume_logged_out_of_file_order(tmp_path):
    """A run logged every 10 steps to step 40, then resumed from its step-20 checkpoint logging every 5 steps: the
    new steps 25 and 35 come after 40 in the file; the curves must still run in step order (0, 10, 20, 25, 30, 35,
    40, 45), each step's last line winning. Fails when read_log returns the steps in file order (sorted() dropped:
    the curve doubles back from 40 to 25)."""
    path = str(tmp_path / "log.jsonl")
    first = [train_line(s) for s in (0, 10, 20, 30, 40)]
    resumed = [dict(train_line(s), loss=-float(s)) for s in (25, 30, 35, 40, 45)]
    write_log(path, first + resumed + [{"step": 45, "val": {}, "val_score": 2.0},
                                       {"step": 25, "val": {}, "val_score": 1.0}])
    train, val = read_log(path)
    assert [line["step"] for line in train] == [0, 10, 20, 25, 30, 35, 40, 45]
    assert [line["loss"] for line in train][3:] == [-25.0, -30.0, -35.0, -40.0, -45.0]
    assert [line["step"] for line in val] == [25, 45]


def test_eighteen_sub_datasets_get_eighteen_colours(tmp_path, monkeypatch):
    """U-FIRE's 18 sub-datasets on one probability plot: ten dark hues (solid), then the light twins of the first
    eight (dashed): 18 different colours, the twins dashed. Fails when the colour index drops the light-twin offset
    (`(2 * i) % 20` alone: sub-dataset 11 drawn in sub-dataset 1's colour)."""
    keys = [f"{i:02d}_task" for i in range(18)]
    lines = [{"step": s, "loss": 1.0, "reg": 0.0, "probs": {k: 1 / 18 for k in keys},
              "difficulty": {k: 1.0 for k in keys}} for s in range(3)]
    log = str(tmp_path / "log.jsonl")
    write_log(log, lines)
    figures = {}
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: figures.update({os.path.basename(path): fig}))
    plot_log(log, str(tmp_path))
    curves = figures["probabilities.png"].axes[0].lines
    assert len({tuple(c.get_color()) for c in curves}) == 18
    # In key order, so a sub-dataset keeps its colour from run to run. Catches: the keys taken in set order
    # (string hashing differs per process).
    assert [c.get_label() for c in curves] == keys
    assert [c.get_linestyle() for c in curves] == ["-"] * 10 + ["--"] * 8
    for fig in figures.values():
        plt.close(fig)


def test_contact_sheets_first_row_is_the_querys_media_then_its_text(tmp_path):
    """A five-column sheet's first row: up to four of the query's media, each titled, then its instruction text.
    By hand: a query of one photo and a 9-frame clip read as 4 frames (round(linspace(0, 8, 4)) = frames 0, 3, 5,
    8) shows "query image 1", "frame 0", "frame 3", "frame 5"; a query of six photos shows photos 1 to 4; a
    text-only query shows its text alone, "(no text)" when it has none.
    Fails when the row keeps fewer media (`[:columns - 2]`), the frames are labelled by their position in the list
    instead of their index in the clip, or the query's text is not drawn."""
    from test_model import write_mp4
    photos = []
    for i in range(6):
        photos.append(str(tmp_path / f"p{i}.png"))
        Image.new("RGB", (40, 30), (40 * i, 80, 120)).save(photos[-1])
    clip = write_mp4(tmp_path / "clip.mp4", 9, 0)
    results = [{"rank": 1, "score": 0.5, "path": photos[0]}]

    def first_row(query):
        fig = plot.draw_contact_sheet(query, results)
        titles = [ax.get_title() for ax in fig.axes if not ax.get_title().startswith("#")]
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        plt.close(fig)
        return [t for t in titles if t], texts

    mixed = {"instruction_text": "the same coat in red", "query_image": photos[:1], "query_video": [clip]}
    assert first_row(mixed) == (["query image 1", "frame 0", "frame 3", "frame 5"], ["the same coat in red"])
    many = {"instruction_text": "these", "query_image": photos, "query_video": []}
    assert first_row(many)[0] == [f"query image {i}" for i in range(1, 5)]
    assert first_row({"instruction_text": "a red coat", "query_image": [], "query_video": []}) == ([], ["a red coat"])
    assert first_row({"instruction_text": "", "query_image": [], "query_video": []}) == ([], ["(no text)"])
    # A result is titled with its rank and score (3 places) and labelled with its file name; the sheet's title is
    # drawn. Catches: the score, the file name or the sheet's title left off.
    fig = plot.draw_contact_sheet(mixed, [{"rank": 1, "score": 0.48765, "path": photos[2]}], title="7_cir_Shoes, q3")
    result = next(ax for ax in fig.axes if ax.get_title().startswith("#"))
    assert (result.get_title(), result.get_xlabel(), fig.get_suptitle()) == ("#1  0.488", "p2.png",
                                                                                    "7_cir_Shoes, q3")
    plt.close(fig)


def test_show_pages_state_each_querys_verdict(tmp_path):
    """write_show_pages' verdict per query, by hand from the rankings given: ground truth at ranks 2 and 3 -> "hits
    at rank 2, 3"; ground truth outside the top 3 -> "no hit in the top 3"; no ground truth at all (an evaluation
    set may list a query whose targets are not in the gallery) -> "no ground truth in the gallery". Each verdict is
    in the sheet's title and on index.html.
    Fails when a query without ground truth is reported as a plain miss (`if truth` dropped), or hits are found by
    rank instead of by the ground truth."""
    from types import SimpleNamespace
    gallery = []
    for i in range(5):
        gallery.append(str(tmp_path / f"g{i}.png"))
        Image.new("RGB", (20, 20), (50 * i, 0, 0)).save(gallery[-1])
    queries = [{"id": f"q{i}", "instruction_text": "find it", "query_image": [], "query_video": []} for i in range(3)]
    s = SimpleNamespace(name="1_t2i_Shoes", family="t2i", queries=queries, gallery=gallery,
                        ground_truth=[[3, 1], [4], []])
    shown = {s.name: [{"query": q, "ranked": [0, 1, 3], "scores": [0.9, 0.8, 0.7]} for q in range(3)]}
    titles = []
    real = plot.contact_sheet
    plot.contact_sheet = lambda query, results, path, title=None: titles.append(title) or real(query, results, path,
                                                                                                title)
    try:
        index = plot.write_show_pages([s], shown, str(tmp_path / "show"), "demo", 3)
    finally:
        plot.contact_sheet = real
    verdicts = ["hits at rank 2, 3", "no hit in the top 3", "no ground truth in the gallery"]
    assert titles == [f"1_t2i_Shoes, query q{i}: {v}" for i, v in enumerate(verdicts)]
    page = open(index).read()
    assert all(f"query q{i}</a>: {v}" in page for i, v in enumerate(verdicts))


def test_show_pages_escape_names_and_link_the_sheets_they_wrote(tmp_path):
    """index.html shows a set's name, a query id and the page title as text even when they hold HTML's own
    characters (an unseen task is named "Image(s)+Text 2 Compatible Item"; ids come from the data files), and each
    sheet's file name is the set's name with every run of other characters than [A-Za-z0-9_.-] made one "-", so the
    links on the page are the files in the folder. Expected page fragments and file names written out by hand.
    Catches: the query id, set name or title put on the page unescaped (`html.escape(...)` dropped: "<b>" becomes a
    tag); the set name used as the file name as it is (`re.sub(...)` dropped: a file "Image(s)+Text 2 ...png")."""
    from types import SimpleNamespace
    gallery = str(tmp_path / "g0.png")
    Image.new("RGB", (20, 20), (200, 0, 0)).save(gallery)
    query = {"id": 'q<1>&"x"', "instruction_text": "find it", "query_image": [], "query_video": []}
    s = SimpleNamespace(name="Image(s)+Text <2>", family="unseen", queries=[query], gallery=[gallery],
                        ground_truth=[[0]])
    out = tmp_path / "show"
    index = plot.write_show_pages([s], {s.name: [{"query": 0, "ranked": [0], "scores": [0.9]}]}, str(out),
                                  "run <b> & co", 1)
    assert sorted(os.listdir(out)) == ["Image-s-Text-2--01.png", "index.html"]
    page = open(index).read()
    assert "<title>run &lt;b&gt; &amp; co</title>" in page and "<h1>run &lt;b&gt; &amp; co</h1>" in page
    assert "<h2>Image(s)+Text &lt;2&gt; (unseen, 1 queries, gallery 1)</h2>" in page
    assert '<a href="Image-s-Text-2--01.png">query q&lt;1&gt;&amp;&quot;x&quot;</a>: hits at rank 1' in page
    assert '<img src="Image-s-Text-2--01.png"' in page


def test_thumbnails_are_small_and_an_unreadable_image_is_none(tmp_path):
    """A contact sheet draws each image as a thumbnail of at most 256 px a side, aspect kept (a 600 x 300 photo ->
    256 x 128); an image it cannot read, whether deleted since indexing, not an image, or a decompression bomb (a
    PNG header declaring 20000 x 20000), is None, drawn as "unreadable", not an error that loses the whole page.
    Catches: the thumbnail left full size (`image.thumbnail(...)` dropped); PIL's DecompressionBombError or the
    ValueError of a damaged file left out of thumbnail's except tuple."""
    from test_data import png_header, write_rle8_bmp
    photo = tmp_path / "wide.png"
    Image.new("RGB", (600, 300), (10, 20, 30)).save(photo)
    assert plot.thumbnail(str(photo)).size == (256, 128)
    bomb, bmp, text = tmp_path / "bomb.png", tmp_path / "rle.bmp", tmp_path / "text.jpg"
    bomb.write_bytes(png_header(20000, 20000))
    write_rle8_bmp(bmp)
    text.write_text("not an image")
    for path in (tmp_path / "gone.png", text, bomb, bmp):
        assert plot.thumbnail(str(path)) is None, path


def test_an_unreadable_query_video_is_one_tile_named_by_its_file(tmp_path):
    """A query video that cannot be decoded (deleted, or not a video) takes one tile of the sheet's first row,
    titled with its file name and drawn as unreadable; the sheet is still written.
    Catches: load_video's error let out of query_media (`except Exception` narrowed, here to ImportError: the whole
    --show page lost for one clip)."""
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"\x00" * 100)
    query = {"id": "q0", "instruction_text": "this look", "query_image": [], "query_video": [str(broken)]}
    assert plot.query_media(query) == [("clip.mp4", None)]
    plot.contact_sheet(query, [], str(tmp_path / "sheet.png"))
    assert Image.open(tmp_path / "sheet.png").size[0] > 0
