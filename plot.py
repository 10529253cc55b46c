"""Turn train.py's JSONL log into PNG plots: loss and regulariser, GGAS sampling probability and difficulty per
sub-dataset (paper §IV-D), the calibrator's mean gate (paper §IV-C) and, when present, the validation score.
Also the retrieval contact sheet (a query, then its top k) that search.py --show and evaluate.py --show draw.

    python plot.py runs/tiny/log.jsonl [--out DIR]      # DIR defaults to the log's folder
"""
import argparse
import html
import json
import math
import os
import re
import sys
import textwrap
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")                  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from plumbing import DataError, atomic_write, output_folder, publish_dir, staging_dir, write_text_atomic  # noqa: E402


def read_log(path):
    """(training lines, validation lines), each sorted by step with one line per step; other lines are ignored.

    A resumed run appends again the steps logged between its checkpoint and the kill: the last line for a step
    wins. A line cut short by a kill cannot be parsed; it is skipped with a warning naming file and line, and so is
    one that is not a train.py record (bytes that are not UTF-8, no integer step, a loss that is not a number)."""
    if not os.path.isfile(path):
        raise DataError(path, "no such log; train.py writes log.jsonl into its train.out_dir (runs/tiny for "
                              "configs/tiny.yaml)")
    train, val = {}, {}
    with open(path, "rb") as f:     # bytes: json.loads decodes them, and a line that is not UTF-8 is a ValueError
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if (not isinstance(record, dict) or type(record.get("step")) is not int
                    or type(record.get("loss", 0.0)) not in (int, float)):
                print(f"{path}:{number}: skipping an unreadable log line", file=sys.stderr)
                continue
            if "val_score" in record:
                val[record["step"]] = record
            elif "loss" in record:
                train[record["step"]] = record
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def save_figure(fig, path):
    try:
        with atomic_write(path) as temp:
            fig.savefig(temp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def moving_average(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_per_sub_dataset(lines, field, title, ylabel, path):
    """One curve per sub-dataset key of the dict `field` (probs or difficulty) over steps."""
    keys = sorted({k for line in lines for k in line[field]})
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = plt.get_cmap("tab20")
    for i, key in enumerate(keys):
        points = [(line["step"], line[field][key]) for line in lines if key in line[field]]
        # Ten distinct dark hues first, then their light, dashed twins (18 sub-datasets fit).
        ax.plot(*zip(*points), label=key, color=colors((2 * i) % 20 + (i % 20 >= 10)),
                linestyle="--" if i % 20 >= 10 else "-", linewidth=1.2)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_log(log_path, out_dir=None):
    """Write the PNGs for one log; returns their paths."""
    train, val = read_log(log_path)
    if not train:
        raise DataError(log_path, "no training lines to plot")
    out_dir = out_dir or os.path.dirname(os.path.abspath(log_path))
    os.makedirs(out_dir, exist_ok=True)
    steps = [line["step"] for line in train]
    written = []

    fig, (ax_loss, ax_reg) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    loss = [line["loss"] for line in train]
    ax_loss.plot(steps, loss, alpha=0.35, linewidth=0.8, label="loss")
    ax_loss.plot(steps, moving_average(loss, max(1, len(loss) // 50)), label="moving average")
    ax_loss.set(title="training loss (InfoNCE, paper §IV-E)", ylabel="loss")
    ax_loss.legend()
    ax_reg.plot(steps, [line["reg"] for line in train], color="tab:red")
    ax_reg.set(title="calibrator regulariser (paper §IV-C)", xlabel="step", ylabel="regulariser")
    for ax in (ax_loss, ax_reg):
        ax.grid(alpha=0.3)
    written.append(os.path.join(out_dir, "loss.png"))
    save_figure(fig, written[-1])

    written.append(os.path.join(out_dir, "probabilities.png"))
    plot_per_sub_dataset(train, "probs", "GGAS sampling probability P_k (paper §IV-D)", "P_k", written[-1])
    written.append(os.path.join(out_dir, "difficulty.png"))
    plot_per_sub_dataset(train, "difficulty", "GGAS difficulty G_k, EMA of the token gradient norm (paper §IV-D)",
                         "G_k", written[-1])

    gate = [(line["step"], line["gate_mean"]) for line in train if line.get("gate_mean") is not None]
    if gate:        # gate_mean is null when the model has no calibrator
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(*zip(*gate), color="tab:green")
        ax.set(title="mean calibrator gate lambda (paper §IV-C)", xlabel="step", ylabel="lambda")
        ax.grid(alpha=0.3)
        written.append(os.path.join(out_dir, "gate.png"))
        save_figure(fig, written[-1])

    if val:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([line["step"] for line in val], [line["val_score"] for line in val], marker="o")
        ax.set(title="validation score: sum of Recall@1 over sub-datasets (paper §III)", xlabel="step",
               ylabel="sum R@1")
        ax.grid(alpha=0.3)
        written.append(os.path.join(out_dir, "val_score.png"))
        save_figure(fig, written[-1])
    return written


# ----------------------------------------------------------------------------------------------------------------
# Contact sheet: what a query retrieves

HIT_COLOUR = "#1a9641"


def thumbnail(path, size=256):
    """A small RGB copy of the image, or None when it cannot be read (a catalogue image deleted since indexing)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    image.thumbnail((size, size))
    return image


def query_media(query, video_frames=4):
    """[(label, image)] of a query record: its images (photos, sketches, outfit items), then a few frames of each
    video spread over the clip."""
    media = [(f"query image {i + 1}", thumbnail(p)) for i, p in enumerate(query["query_image"])]
    for path in query["query_video"]:
        from PIL import Image
        from media import load_video     # here: it loads transformers, which a training-log plot never needs
        try:
            frames, meta = load_video(path, video_frames)
            media += [(f"frame {index}", Image.fromarray(frame)) for frame, index in zip(frames, meta.frames_indices)]
        except Exception:                 # noqa: BLE001: a sheet shows an unreadable video as such, it does not fail
            media.append((os.path.basename(path), None))
    return media


def show_image(ax, image, title, colour="black", hit=None):
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes, color="grey")
    else:
        ax.imshow(image)
    ax.set_title(title, fontsize=8, color=colour)
    for spine in ax.spines.values():
        spine.set_edgecolor(HIT_COLOUR if hit else "lightgrey")
        spine.set_linewidth(5 if hit else 1)


def draw_contact_sheet(query, results, title=None, columns=5, video_frames=4):
    """A figure: the query (its media and its instruction text, wrapped) on the first row, then its results in rank
    order, each with rank, score and file name. A result with "hit": True gets a thick green frame and "hit" in its
    title (evaluate.py --show knows the ground truth; search.py does not, and marks nothing)."""
    media = query_media(query, video_frames)[:columns - 1] if query["query_image"] or query["query_video"] else []
    rows = 1 + math.ceil(len(results) / columns)
    fig = plt.figure(figsize=(2.2 * columns, 2.5 * rows))
    grid = fig.add_gridspec(rows, columns)
    for i, (label, image) in enumerate(media):
        show_image(fig.add_subplot(grid[0, i]), image, label)
    text_ax = fig.add_subplot(grid[0, len(media):])
    text_ax.axis("off")
    wrapped = textwrap.fill(query["instruction_text"] or "(no text)", width=28 * (columns - len(media)))
    text_ax.text(0, 0.5, wrapped, va="center", fontsize=10, transform=text_ax.transAxes)
    for i, result in enumerate(results):
        hit = result.get("hit")
        label = f"#{result['rank']}  {result['score']:.3f}" + ("  hit" if hit else "")
        ax = fig.add_subplot(grid[1 + i // columns, i % columns])
        show_image(ax, thumbnail(result["path"]), label, HIT_COLOUR if hit else "black", hit)
        ax.set_xlabel(textwrap.shorten(os.path.basename(result["path"]), 30, placeholder="..."), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.04, top=0.9 if title else 0.95, wspace=0.08, hspace=0.35)
    return fig


def contact_sheet(query, results, path, title=None, columns=5):
    """Write draw_contact_sheet's figure as a PNG at path (atomically).

    query: a query record (instruction_text, query_image, query_video); results: [{"rank", "score", "path",
    optional "hit"}], best first."""
    save_figure(draw_contact_sheet(query, results, title, columns), path)


def write_show_pages(eval_sets, shown, out_dir, title, k):
    """evaluate.py --show: a contact sheet per shown query (hits marked: its ground-truth images), then index.html,
    written last. The PNGs are drawn in a staging folder and moved into out_dir together."""
    sections = []
    with staging_dir(out_dir) as tmp:
        for s in eval_sets:
            entries = []
            for n, entry in enumerate(shown[s.name]):
                query, truth = s.queries[entry["query"]], set(s.ground_truth[entry["query"]])
                results = [{"rank": r + 1, "score": score, "path": s.gallery[j], "hit": j in truth}
                           for r, (j, score) in enumerate(zip(entry["ranked"], entry["scores"]))]
                hits = [r["rank"] for r in results if r["hit"]]
                verdict = (f"hits at rank {', '.join(map(str, hits))}" if hits else
                           f"no hit in the top {k}" if truth else "no ground truth in the gallery")
                name = f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', s.name)}-{n + 1:02d}.png"
                contact_sheet(query, results, os.path.join(tmp, name),
                              title=f"{s.name}, query {query['id']}: {verdict}")
                entries.append(f'<p><a href="{quote(name)}">query {html.escape(query["id"])}</a>: {verdict}<br>'
                               f'<a href="{quote(name)}"><img src="{quote(name)}" style="max-width:100%"></a></p>')
            sections.append(f"<h2>{html.escape(s.name)} ({s.family}, {len(s.queries)} queries, gallery "
                            f"{len(s.gallery)})</h2>\n" + "\n".join(entries))
        publish_dir(tmp, out_dir)
    page = (f"<!doctype html>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n<h1>{html.escape(title)}"
            f"</h1>\n<p>Each query's top {k}; its ground-truth images are framed in green and marked "
            f"\"hit\".</p>\n" + "\n".join(sections) + "\n")
    write_text_atomic(os.path.join(out_dir, "index.html"), page)
    return os.path.join(out_dir, "index.html")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="the JSONL log written by train.py")
    parser.add_argument("--out", help="folder for the PNGs (default: the log's folder)")
    args = parser.parse_args()
    try:
        written = plot_log(args.log, output_folder(args.out, "--out: the plots are written into it"))
    except DataError as err:        # names the file: a traceback adds nothing
        sys.exit(f"plot.py: {err}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
