"""What each part of FashionLens contributes on U-FIRE-mini (README "Results on U-FIRE-mini").

    python benchmarks/ablations.py [--seeds 0 1 2] [--jobs 2] [--out runs/ablations] [section.key=value ...]

Trains configs/tiny.yaml and one variant per ablation of the paper (section V) for each seed, evaluates each best
checkpoint on the test split, and writes <out>/ablations.md (mean ± std over seeds of R@1 and R@10 per task
family, overall, and on the two unseen tasks) and <out>/ablations.json (every run's full results). Runs already
evaluated are reused, so an interrupted sweep continues where it stopped. Needs `make demo`'s tiny backbone and
U-FIRE-mini (runs/tiny-qwen3vl, data/ufire-mini).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from evaluate import write_atomic  # noqa: E402
from model import make_tiny_openclip_config  # noqa: E402

# The release's behaviour at the tiny scale: its five encoder defects, its per-chunk regularisers, its sampler
# (floor that may not hold, P once per epoch) and its optimisation (constant learning rate, no clipping). The
# release evaluates each image between 224^2 and 256^2 pixels while training at 224^2; the same ratio at the tiny
# budget of 96^2 is 110^2. Images are sized by Qwen2-VL's smart_resize.
RELEASE = ["model.keep_rope_positions=false", "model.normed_readout=false", "model.fp32_trainable=false",
           "model.eval_image_pixels=12100", "model.fill_pixel_budget=false", "calibrator.reg_per_chunk=true",
           "sampler.guaranteed_floor=false", "sampler.update_every=0", "train.schedule=constant",
           "train.warmup_steps=0", "train.grad_clip=0"]

VARIANTS = {
    "FashionLens": [],
    "no calibrator": ["calibrator.mode=none"],
    "lerp instead of slerp": ["calibrator.mode=lerp"],
    "uniform sampling": ["sampler.mode=uniform"],
    "size-proportional sampling": ["sampler.mode=size"],
    "release configuration": RELEASE,
    # A CLIP dual encoder of about the tiny backbone's size, trained with the same data, loss and sampler
    # (UniIR score fusion for multimodal queries; no calibrator, so it is the plain baseline).
    "open_clip dual encoder": ["model.kind=openclip", "model.trainable=full", "calibrator.mode=none"],
}


def run(cmd, log_path):
    with open(log_path, "a") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def train_and_evaluate(name, seed, args, clip_config):
    slug = name.lower().replace(" ", "_").replace("-", "_")
    out = os.path.join(args.out, f"{slug}-seed{seed}")
    results = os.path.join(out, "eval_test", "results.json")
    if not os.path.exists(results):
        os.makedirs(out, exist_ok=True)
        overrides = [f"train.out_dir={out}", f"train.seed={seed}", *VARIANTS[name], *args.overrides]
        if name == "open_clip dual encoder":
            overrides.append(f"model.backbone={clip_config}")
        log = os.path.join(out, "stdout.log")
        run([sys.executable, "train.py", args.config, *overrides], log)
        run([sys.executable, "evaluate.py", os.path.join(out, "best.pt"), "--split", "test"], log)
        print(f"done: {name}, seed {seed}", flush=True)
    with open(results) as f:
        return json.load(f)


def summarise(runs):
    """{column: (mean, std)} over seeds: R@1 and R@10 per family, overall (trained sub-datasets), unseen tasks."""
    per_run = []
    for results in runs:
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
                row[f"{task} R@10"] = r["recall"]["R@10"]
        per_run.append(row)
    return {c: (statistics.mean(r[c] for r in per_run), statistics.pstdev(r[c] for r in per_run) if len(per_run) > 1
                else 0.0) for c in per_run[0]}


def markdown(summaries, seeds):
    columns = list(next(iter(summaries.values())))
    lines = [f"Recall (%) on the U-FIRE-mini test split, mean ± std over seeds {', '.join(map(str, seeds))}.", "",
             "| variant | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, summary in summaries.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in summary.values()) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses OMP_NUM_THREADS threads)")
    parser.add_argument("--out", default="runs/ablations")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    clip_config = make_tiny_openclip_config(os.path.join(args.out, "tiny-clip"))
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]   # every variant once, then again
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train_and_evaluate(*job, args, clip_config), jobs))
    runs = {name: [r for (n, _), r in zip(jobs, results) if n == name] for name in args.variants}
    summaries = {name: summarise(rs) for name, rs in runs.items()}
    table = markdown(summaries, args.seeds)
    write_atomic(os.path.join(args.out, "ablations.md"), table)
    write_atomic(os.path.join(args.out, "ablations.json"), json.dumps(
        {"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
         "runs": {f"{n}/seed{s}": r for (n, s), r in zip(jobs, results)}}, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
