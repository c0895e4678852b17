"""Week 4 on the reviews world: the KL sweep of ppo_lm.py over seeds (the alignment tax).

    python tests/bench/kl_sweep.py --seeds 0,1,2                       # ~4 runs x 3 seeds, ~25 min on 2 CPU cores
    python tests/bench/kl_sweep.py --seeds 0,1,2 --betas 0.01,0.2     # a subset

Runs `python ppo_lm.py --task reviews --kl-sweep <betas> --kl-target <t> --seed S` for each seed (every
run of a sweep has the same prompts and seed; only β differs) and gives, per β and for the start
model, mean ± sd over seeds of: the sentiment RM's score, the gold positive share of the held-out
samples, KL(π || π_ref) per completion, word distinct-1 / distinct-2, self-similarity and the alignment
tax (word distinct-2 lost per unit of positive share gained). Writes out/kl_sweep/<torch version>/
table.{json,md} and frontier.png (positive share vs distinct-2, mean over seeds, one point per β).
Not a test: a benchmark whose numbers go into the README with this command.
"""
import argparse, json, os, subprocess, sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "out", "kl_sweep", "torch-" + torch.__version__.replace("+", "_"))
KEYS = ["score", "gold_sampled", "kl", "words_distinct_1", "words_distinct_2", "words_self_similarity", "alignment_tax"]


def pm(xs):
    xs = [x for x in xs if x is not None]
    return "-" if not xs else f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--betas", default="0.01,0.05,0.2,adaptive", help="the --kl-sweep values")
    ap.add_argument("--kl-target", default="6", help="target KL (nats per completion) of the adaptive run")
    ap.add_argument("--extra", default="", help="more ppo_lm.py flags for every run")
    ap.add_argument("--reuse", action="store_true", help="reuse a seed's existing summary.json")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    per_seed = []
    for seed in args.seeds.split(","):
        out = os.path.join(OUT, f"seed{seed}")
        cmd = [sys.executable, "ppo_lm.py", "--task", "reviews", "--kl-sweep", args.betas, "--kl-target", args.kl_target,
               *args.extra.split(), "--seed", seed, "--out", out]
        done = os.path.join(out, "summary.json")
        if not (args.reuse and os.path.exists(done)):
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if r.returncode != 0:
                print(f"seed {seed} failed: {r.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
        per_seed.append(json.load(open(done))["kl_sweep"])
        print(json.dumps(dict(seed=seed, rows=per_seed[-1])), flush=True)
    rows = []
    for i, row in enumerate(per_seed[0]):
        vals = {k: [s[i].get(k) for s in per_seed] for k in KEYS}
        rows.append(dict(beta=str(row["beta"]), seeds=args.seeds, **vals))
    json.dump(rows, open(os.path.join(OUT, "table.json"), "w"), indent=1)
    lines = [f"torch {torch.__version__}; mean ± sd over seeds {args.seeds}; "
             f"`python ppo_lm.py --task reviews --kl-sweep {args.betas} --kl-target {args.kl_target} {args.extra}`",
             "", "| β | RM score | gold positive | KL (nats) | distinct-1 | distinct-2 | self-similarity | tax |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['beta']} | " + " | ".join(pm(r[k]) for k in KEYS) + " |" for r in rows]
    open(os.path.join(OUT, "table.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [np.mean(r["gold_sampled"]) for r in rows]
    y = [np.mean(r["words_distinct_2"]) for r in rows]
    ax.errorbar(x, y, xerr=[np.std(r["gold_sampled"]) for r in rows], yerr=[np.std(r["words_distinct_2"]) for r in rows],
                fmt="o")
    for xi, yi, r in zip(x, y, rows):
        ax.annotate("SFT" if r["beta"] == "start" else f"β={r['beta']}", (xi, yi), textcoords="offset points",
                    xytext=(4, 4))
    ax.set_xlabel("gold positive share (held-out samples)"); ax.set_ylabel("word distinct-2")
    ax.set_title("The alignment tax: diversity vs reward over β"); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(os.path.join(OUT, "frontier.png"), dpi=100)


if __name__ == "__main__":
    main()
