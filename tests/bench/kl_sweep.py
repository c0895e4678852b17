"""Week 4 on the reviews world: the KL sweep of ppo_lm.py over seeds (the alignment tax).

    python tests/bench/kl_sweep.py --seeds 0,1,2                       # ~4 runs x 3 seeds, ~25 min on 2 CPU cores
    python tests/bench/kl_sweep.py --seeds 0,1,2 --betas 0.01,0.2     # a subset
    python reward_model.py && python tests/bench/kl_sweep.py --seeds 0 --betas 0.01,0.05,0.2 \\
        --extra "--task arithmetic --reward-model out/reward_model/model --steps 40"   # the arithmetic RM instead

For each seed S and each β, one `python ppo_lm.py --task reviews <--extra> --init-kl-coef β --seed S`, and for
'adaptive' one with `--kl-target <t>` (ppo_lm's controller, from its --init-kl-coef); every run of a seed has the
same prompts and seed, only β differs. Each run goes to <out>/seed<S>/beta_<β> (or adaptive). Per seed, from the
runs' summary.json: kl_sweep.json, the table of held-out metrics (a start row from the *_before keys, the same
start model for every β, then one row per β from the *_after keys), with the alignment tax = word distinct-2
lost per unit of gold positive share gained (the RM score where there is no gold rule; None without a gain);
kl_frontier.png (proxy score and gold accuracy against KL) and tax_frontier.png (diversity against reward).
Over seeds, in <out> (default out/kl_sweep/<torch version>): table.{json,md} (mean ± sd of the RM score, the
gold positive share, KL(π || π_ref) per completion, word distinct-1 / distinct-2, self-similarity and the tax),
frontier.png (positive share vs distinct-2, one point per β, error bars: sd), and kl_frontier.png and
tax_frontier.png of the means. Not a test: a benchmark whose numbers go into the README with this command.
"""
import argparse, json, os, shlex, subprocess, sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402

OUT = os.path.join(ROOT, "out", "kl_sweep", "torch-" + torch.__version__.replace("+", "_"))
KEYS = ["score", "kl", "gold_accuracy", "gold_sampled", "entropy", "distinct_2", "unique", "words_distinct_1",
        "words_distinct_2", "words_self_similarity"]  # each run's summary: <key>_before, <key>_after
SHOWN = ["score", "gold_sampled", "kl", "words_distinct_1", "words_distinct_2", "words_self_similarity",
         "alignment_tax"]


def pm(xs):
    xs = [x for x in xs if x is not None]
    return "-" if not xs else f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.3f}"


def reward_key(table):
    """What the tax counts as reward: the gold positive share of the samples, or the RM score without gold."""
    return "gold_sampled" if table[0].get("gold_sampled") is not None else "score"


def sweep_table(betas, runs, kl_target):
    """One seed's table from its runs' summaries (runs[i] at betas[i]): the start row, one row per β."""
    table = [dict(beta="start", **{k: runs[0].get(f"{k}_before") for k in KEYS})] + \
            [dict(beta=float(b) if b != "adaptive" else f"adaptive (target {float(kl_target):g})",
                  **{k: r.get(f"{k}_after") for k in KEYS}) for b, r in zip(betas, runs)]
    reward = reward_key(table)
    for row in table[1:]:  # the alignment tax: word distinct-2 lost per unit of reward gained
        gain = row[reward] - table[0][reward]
        row["alignment_tax"] = (table[0]["words_distinct_2"] - row["words_distinct_2"]) / gain if gain > 0 else None
    return table


def frontiers(folder, table):
    """kl_frontier.png (proxy score and gold against KL) and tax_frontier.png (diversity against reward)."""
    reward, pts = reward_key(table), sorted(table, key=lambda r: r["kl"])
    notes = [f"β={r['beta']}" if r["beta"] != "start" else "SFT" for r in pts]
    gold = "gold_accuracy" if table[0].get("gold_accuracy") is not None else "entropy"
    C.plot_twin(folder, [r["kl"] for r in pts], {"proxy score": [r["score"] for r in pts]},
                {gold: [r[gold] for r in pts]}, "kl_frontier.png", "KL sweep: reward vs KL (the alignment tax)",
                notes, xlabel="KL(π || π_ref) per completion (nats)")
    C.plot_twin(folder, [r[reward] for r in pts], {"word distinct-2": [r["words_distinct_2"] for r in pts]},
                {"self-similarity": [r["words_self_similarity"] for r in pts]}, "tax_frontier.png",
                "Diversity vs reward: the alignment tax", notes, xlabel=f"{reward} (held-out samples)")


def mean_or_none(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--betas", default="0.01,0.05,0.2,adaptive", help="comma-separated fixed β values and 'adaptive'")
    ap.add_argument("--kl-target", default="6", help="target KL (nats per completion) of the adaptive run")
    ap.add_argument("--extra", default="", help="more ppo_lm.py flags for every run (not --kl-target)")
    ap.add_argument("--reuse", action="store_true", help="reuse a run's existing summary.json")
    ap.add_argument("--out", default=OUT, help="output folder (default: out/kl_sweep/<torch version>)")
    args = ap.parse_args()
    betas, extra = args.betas.split(","), shlex.split(args.extra)
    for b in betas:
        try:
            ok = b == "adaptive" or float(b) >= 0
        except ValueError:
            ok = False
        if not ok:
            ap.error(f"--betas must be comma-separated numbers >= 0 or 'adaptive', got {args.betas!r}")
    if "--kl-target" in extra:
        ap.error("--kl-target in --extra would make every run adaptive: pass the adaptive run's target as --kl-target")
    os.makedirs(args.out, exist_ok=True)
    per_seed, seeds = [], []
    for seed in args.seeds.split(","):
        runs = []
        for b in betas:
            folder = os.path.join(args.out, f"seed{seed}", "adaptive" if b == "adaptive" else f"beta_{float(b):g}")
            beta = ["--kl-target", args.kl_target] if b == "adaptive" else ["--init-kl-coef", b]
            cmd = [sys.executable, "ppo_lm.py", "--task", "reviews", *extra, *beta, "--seed", seed, "--out", folder]
            done = os.path.join(folder, "summary.json")
            if not (args.reuse and os.path.exists(done)):
                env = {**os.environ, "TQDM_DISABLE": "1"}
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    print(f"seed {seed} β {b} failed: {r.stderr.strip().splitlines()[-1:]}", flush=True)
                    break
            runs.append(json.load(open(done)))
        else:
            table = sweep_table(betas, runs, args.kl_target)
            with open(os.path.join(args.out, f"seed{seed}", "kl_sweep.json"), "w") as f:
                json.dump(dict(seed=int(seed), betas=args.betas, extra=args.extra, kl_sweep=table), f, indent=1)
            frontiers(os.path.join(args.out, f"seed{seed}"), table)
            per_seed.append(table); seeds.append(seed)
            print(json.dumps(dict(seed=seed, rows=table)), flush=True)
    if not per_seed:
        sys.exit("kl_sweep: no seed finished")
    rows = [dict(beta=str(row["beta"]), seeds=",".join(seeds), **{k: [s[i].get(k) for s in per_seed] for k in SHOWN})
            for i, row in enumerate(per_seed[0])]
    json.dump(rows, open(os.path.join(args.out, "table.json"), "w"), indent=1)
    cmd = f"python tests/bench/kl_sweep.py --seeds {','.join(seeds)} --betas {args.betas} --kl-target {args.kl_target}"
    lines = [f"torch {torch.__version__}; mean ± sd over seeds {','.join(seeds)}; `{cmd}"
             + (f" --extra={shlex.quote(args.extra)}`" if args.extra else "`"),
             "", "| β | RM score | gold positive | KL (nats) | distinct-1 | distinct-2 | self-similarity | tax |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['beta']} | " + " | ".join(pm(r[k]) for k in SHOWN) + " |" for r in rows]
    open(os.path.join(args.out, "table.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    means = [dict(beta=row["beta"], **{k: mean_or_none([s[i].get(k) for s in per_seed]) for k in KEYS})
             for i, row in enumerate(per_seed[0])]
    frontiers(args.out, means)
    plt, reward = C.pyplot(), reward_key(means)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    sd = lambda k: [np.std([x for x in r[k] if x is not None] or [0]) for r in rows]
    x, y = [r[reward] for r in means], [r["words_distinct_2"] for r in means]
    ax.errorbar(x, y, xerr=sd(reward), yerr=sd("words_distinct_2"), fmt="o")
    for xi, yi, r in zip(x, y, rows):
        ax.annotate("SFT" if r["beta"] == "start" else f"β={r['beta']}", (xi, yi), textcoords="offset points",
                    xytext=(4, 4))
    ax.set_xlabel(f"{'gold positive share' if reward == 'gold_sampled' else 'RM score'} (held-out samples)")
    ax.set_ylabel("word distinct-2"); ax.set_title("The alignment tax: diversity vs reward over β"); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(os.path.join(args.out, "frontier.png"), dpi=100); plt.close(fig)


if __name__ == "__main__":
    main()
