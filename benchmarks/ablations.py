"""What each part of FashionLens contributes on U-FIRE-mini (README "Results on U-FIRE-mini").

    python benchmarks/ablations.py [--seeds 0 1 2] [--jobs 2] [--out runs/ablations] [section.key=value ...]

Trains configs/tiny.yaml and one variant per ablation of the paper (section V) for each seed, evaluates each best
checkpoint on the test split, and writes <out>/ablations.md and <out>/ablations.json (every run's full results).
The tables give mean ± std over seeds of R@1 and R@10 per task family, overall, and on the two unseen tasks, and
beside them each variant's paired difference from FashionLens: variant minus FashionLens on the same seed, mean
± std over seeds, which removes the seed-to-seed spread the two share. The sampler variants get FashionLens'
uniform warm-up epoch (sampler.warmup_all_modes), so they differ from it in the sampler alone. Runs already
evaluated with the same overrides are reused, so an interrupted sweep continues where it stopped. Needs
`make demo`'s tiny backbone and U-FIRE-mini (runs/tiny-qwen3vl, data/ufire-mini).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from plumbing import write_text_atomic  # noqa: E402
from fake_backbones import make_tiny_openclip_config  # noqa: E402

REFERENCE = "FashionLens"
# Each variant is one configs/ablation_<name>.yaml overlay, applied on top of --config as overrides.
OVERLAYS = {"no calibrator": "no_calibrator", "lerp instead of slerp": "lerp", "uniform sampling": "uniform",
            "size-proportional sampling": "size", "scale-prior sampling": "size_pow",
            "release configuration": "release", "open_clip dual encoder": "openclip"}


def overlay_overrides(name):
    """The section.key=value overrides an ablation overlay sets, in its order; its inherit and out_dir aside."""
    with open(os.path.join(REPO, "configs", f"ablation_{name}.yaml")) as f:
        overlay = yaml.safe_load(f)
    overlay.pop("inherit")
    overlay["train"].pop("out_dir")
    return [f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
            for section, values in overlay.items() for key, value in values.items()]


VARIANTS = {REFERENCE: [], **{name: overlay_overrides(overlay) for name, overlay in OVERLAYS.items()}}


def run(cmd, log_path):
    with open(log_path, "a") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def train_and_evaluate(name, seed, args, clip_config):
    slug = name.lower().replace(" ", "_").replace("-", "_")
    out = os.path.join(args.out, f"{slug}-seed{seed}")
    results = os.path.join(out, "eval_test", "results.json")
    overrides = [f"train.out_dir={out}", f"train.seed={seed}", *VARIANTS[name], *args.overrides]
    if name == "open_clip dual encoder":
        overrides.append(f"model.backbone={clip_config}")
    # A finished run is reused only if it was made with these very overrides (the variants change over time).
    recorded = os.path.join(out, "overrides.json")
    if os.path.exists(results):
        made_with = "unrecorded"
        if os.path.exists(recorded):
            with open(recorded) as f:
                made_with = json.load(f)
        if made_with != overrides:
            raise RuntimeError(f"{out} was trained with overrides {made_with}, not {overrides}: delete it or use "
                               f"another --out")
    else:
        os.makedirs(out, exist_ok=True)
        write_text_atomic(recorded, json.dumps(overrides) + "\n")
        log = os.path.join(out, "stdout.log")
        run([sys.executable, "train.py", args.config, *overrides], log)
        run([sys.executable, "evaluate.py", os.path.join(out, "best.pt"), "--split", "test"], log)
        print(f"done: {name}, seed {seed}", flush=True)
    with open(results) as f:
        return json.load(f)


def scores(results):
    """{column: recall} of one run: R@1 and R@10 per family, overall (trained sub-datasets), unseen tasks' R@10."""
    trained = [r for r in results["sets"].values() if r["family"] != "unseen"]
    row = {}
    for family in dict.fromkeys(r["family"] for r in trained):
        members = [r for r in trained if r["family"] == family]
        for k in ("R@1", "R@10"):
            row[f"{family} {k}"] = statistics.mean(r["recall"][k] for r in members)
    for k in ("R@1", "R@10"):
        row[f"overall {k}"] = statistics.mean(r["recall"][k] for r in trained)
    for task, r in results["sets"].items():
        if r["family"] == "unseen":
            row[f"unseen: {task} R@10"] = r["recall"]["R@10"]
    return row


def mean_std(values):
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs, reference=REFERENCE):
    """runs: {variant: {seed: results}} -> (absolute, paired), each {variant: {column: (mean, std)}}.

    absolute is over the variant's seeds; paired is over the per-seed differences variant - reference, on the
    seeds both have (the reference itself has none). std is the sample standard deviation (n - 1)."""
    rows = {name: {seed: scores(r) for seed, r in by_seed.items()} for name, by_seed in runs.items()}
    base = rows[reference]
    absolute = {name: {c: mean_std(row[c] for row in by_seed.values()) for c in next(iter(by_seed.values()))}
                for name, by_seed in rows.items()}
    paired = {}
    for name, by_seed in rows.items():
        if name == reference:
            continue
        seeds = sorted(by_seed.keys() & base.keys())
        if not seeds:
            raise ValueError(f"{name} shares no seed with {reference}: no paired difference")
        paired[name] = {c: mean_std(by_seed[s][c] - base[s][c] for s in seeds) for c in absolute[name]}
    return absolute, paired


def markdown(absolute, paired, seeds, reference=REFERENCE):
    """The headline table (overall and unseen tasks, each absolute with its Δ beside it), then every column
    absolute, then every column's Δ (the paired difference from the reference)."""
    columns = list(absolute[reference])
    headline = [c for c in columns if c.startswith(("overall ", "unseen: "))]

    def cell(name, column, diff=False):
        if not diff:
            return "{:.1f} ± {:.1f}".format(*absolute[name][column])
        return "{:+.1f} ± {:.1f}".format(*paired[name][column]) if name in paired else "—"

    def table(header, cells):
        return ["| variant | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header),
                *(f"| {name} | " + " | ".join(cells(name)) + " |" for name in absolute), ""]

    return "\n".join([
        f"Recall (%) on the U-FIRE-mini test split, mean ± std (n - 1) over seeds {', '.join(map(str, seeds))}. "
        f"Δ: the variant minus {reference} on the same seed, mean ± std of those per-seed differences.", "",
        *table([h for c in headline for h in (c, "Δ")],
               lambda name: [cell(name, c, diff) for c in headline for diff in (False, True)]),
        "Every column:", "", *table(columns, lambda name: [cell(name, c) for c in columns]),
        f"Every column, Δ from {reference}:", "",
        *table(columns, lambda name: [cell(name, c, True) for c in columns])])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses OMP_NUM_THREADS threads)")
    parser.add_argument("--out", default="runs/ablations")
    args = parser.parse_args()
    args.variants = list(dict.fromkeys([REFERENCE, *args.variants]))    # the paired differences need it
    os.makedirs(args.out, exist_ok=True)
    clip_config = make_tiny_openclip_config(os.path.join(args.out, "tiny-clip"))
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]   # every variant once, then again
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train_and_evaluate(*job, args, clip_config), jobs))
    runs = {name: {s: r for (n, s), r in zip(jobs, results) if n == name} for name in args.variants}
    table = markdown(*summarise(runs), args.seeds)
    write_text_atomic(os.path.join(args.out, "ablations.md"), table)
    write_text_atomic(os.path.join(args.out, "ablations.json"), json.dumps(
        {"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
         "runs": {f"{n}/seed{s}": r for (n, s), r in zip(jobs, results)}}, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
