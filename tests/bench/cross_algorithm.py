"""Every LM algorithm of the course on the same embedded task, from the same start, over seeds.

    python tests/bench/cross_algorithm.py --seeds 0,1,2                # ~45 min on 2 CPU cores
    python tests/bench/cross_algorithm.py --seeds 0,1,2 --only grpo,dpo   # a subset
    python tests/bench/cross_algorithm.py --seeds 0,1,2 --only capstone   # the main job's table (the swaps puzzle)
    python tests/bench/cross_algorithm.py --seeds 0,1,2 --only capstone --task arithmetic   # the capstone on arithmetic
    python tests/bench/cross_algorithm.py --seeds 0,1,2 --task swaps      # every script on the logic puzzle
    python tests/bench/cross_algorithm.py --seeds 0,1,2 --only reviews    # week 3: PPO on the reviews world
    python tests/bench/cross_algorithm.py --seeds 0,1,2 --only dpo --extra="--rpo-alpha 0"   # an ablation row

Each script runs as a user would run it (its defaults, `--model tiny`, built-in 3-digit arithmetic,
`--seed S`), one after another, and is scored on the one shared held-out set (common.heldout(): the
same 500 problems for every script and seed). --task T passes `--task T` to every script (with
`--model tiny` a script then starts from tiny-T, common.task_model); its rows and folders carry the
task. The table gives mean ± sd over the seeds of the held-out accuracy before and after and of the
gain, and the mean wall time. Greedy accuracy except prm.py, which trains no policy: its row is
best-of-N selection by the trained PRM vs one sample. The capstone (reasoning_capstone.py, SFT from
random weights, then RFT / DPO / GRPO from the SFT model, on its default task, the swaps puzzle,
unless --task) gives one row per stage. Writes out/cross_algorithm/<torch version>/table.md and
table.json. Not a test: a benchmark whose numbers go into the README with this command.
"""
import argparse, json, os, subprocess, sys, time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "out", "cross_algorithm", "torch-" + torch.__version__.replace("+", "_"))

# run name: (script, extra flags, [(row name, summary key before, summary key after)], what the numbers are)
RUNS = {
    "ppo_lm": ("ppo_lm.py", [], [("ppo_lm (verifier reward)", "gold_accuracy_before", "gold_accuracy_after")],
               "greedy"),
    "dpo": ("dpo.py", [], [("dpo (+RPO NLL)", "accuracy_before", "accuracy_after")], "greedy"),
    "ipo": ("kto_ipo.py", ["--loss", "ipo"], [("ipo (+NLL)", "accuracy_before", "accuracy_after")], "greedy"),
    "kto": ("kto_ipo.py", ["--loss", "kto"], [("kto (+NLL)", "accuracy_before", "accuracy_after")], "greedy"),
    "orpo": ("kto_ipo.py", ["--loss", "orpo"], [("orpo", "accuracy_before", "accuracy_after")], "greedy"),
    "online_dpo": ("online_dpo.py", [], [("online_dpo (verifier judge)", "accuracy_before", "accuracy_after")],
                   "greedy"),
    "star": ("star.py", [], [("star", "accuracy_before", "accuracy_after")], "greedy"),
    "grpo": ("grpo.py", [], [("grpo", "accuracy_before", "accuracy_after")], "greedy"),
    "prm": ("prm.py", [], [("prm: best of 8 by the PRM", "policy_sample_accuracy", "best_of_n.prm.3"),
                           ("prm: best of 64 by the PRM", "policy_sample_accuracy", "prm_at_max_n"),
                           ("prm: PRM-weighted vote of 64", "policy_sample_accuracy", "prm_vote_at_max_n")],
            "one T=1 sample -> selection"),
    "reviews": ("ppo_lm.py", ["--task", "reviews"], [("ppo_lm reviews: gold positive share", "gold_sampled_before",
                                                      "gold_sampled_after"),
                                                     ("ppo_lm reviews: KL to the start (nats)", "kl_before", "kl_after"),
                                                     ("ppo_lm reviews: word distinct-2", "words_distinct_2_before",
                                                      "words_distinct_2_after"),
                                                     ("ppo_lm reviews: self-similarity", "words_self_similarity_before",
                                                      "words_self_similarity_after")], "samples at T=0.7"),
    "capstone": ("reasoning_capstone.py", [], [("capstone: sft (random weights)", "start_accuracy", "sft_accuracy"),
                                               ("capstone: rft", "sft_accuracy", "rft_accuracy"),
                                               ("capstone: dpo + RPO", "sft_accuracy", "dpo_accuracy"),
                                               ("capstone: grpo", "sft_accuracy", "grpo_accuracy")], "greedy"),
}
DEFAULT = [k for k in RUNS if k not in ("capstone", "reviews")]


def get(summary, key):
    """summary["a"]["b"][3] for key "a.b.3"."""
    for k in key.split("."):
        summary = summary[int(k)] if isinstance(summary, list) else summary[k]
    return summary


def pm(xs):
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each passed as --seed to every script")
    ap.add_argument("--reuse", action="store_true", help="take a run's numbers from its existing summary.json "
                    "instead of running it again (e.g. to rebuild the table from runs made elsewhere)")
    ap.add_argument("--extra", default="", help="flags added to every run of --only (an ablation); its rows and "
                    "output folders carry the flags in their names")
    ap.add_argument("--task", default="", help="built-in task passed to every script as --task (arithmetic, countdown, "
                    "swaps); default: each script's own default (the capstone: swaps; the others: arithmetic)")
    ap.add_argument("--only", default="", help=f"comma-separated runs ({', '.join(RUNS)}); default: all but capstone")
    args = ap.parse_args()
    names, seeds = args.only.split(",") if args.only else DEFAULT, [int(s) for s in args.seeds.split(",")]
    bad = [n for n in names if n not in RUNS]
    if bad:
        sys.exit(f"error: --only {','.join(bad)}: choose from {', '.join(RUNS)}")
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for name in names:
        script, extra, keys, what = RUNS[name]
        if args.extra:  # an ablation: its own rows and folders, next to the defaults' ones
            extra = extra + args.extra.split()
            keys = [(f"{row} {args.extra}", kb, ka) for row, kb, ka in keys]
        if args.task:  # another task: its own rows and folders too
            extra = extra + ["--task", args.task]
            keys = [(f"{row} [{args.task}]", kb, ka) for row, kb, ka in keys]
        res = {row: dict(before=[], after=[], wall_s=[]) for row, _, _ in keys}
        tag = "".join(c if c.isalnum() else "_" for c in args.extra + (" " + args.task if args.task else "")).strip("_")
        for seed in seeds:
            out = os.path.join(OUT, f"{name}{'_' + tag if tag else ''}_seed{seed}")
            cmd = [sys.executable, script, "--model", "tiny", *extra, "--seed", str(seed), "--out", out]
            if name == "capstone":
                cmd[2:4] = []  # the capstone starts from its own default (random weights) and runs SFT
            t0, done = time.time(), os.path.join(out, "summary.json")
            if not (args.reuse and os.path.exists(done)):
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                   env={**os.environ, "TQDM_DISABLE": "1"})
                if r.returncode != 0:
                    print(f"{name} seed {seed} failed: {r.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                open(os.path.join(out, "bench_wall_s.txt"), "w").write(f"{time.time() - t0:.1f}")  # with start-up
            s = json.load(open(done))
            timed = os.path.join(out, "bench_wall_s.txt")
            wall = float(open(timed).read()) if os.path.exists(timed) else s.get("wall_s")
            for row, kb, ka in keys:
                res[row]["before"].append(get(s, kb)); res[row]["after"].append(get(s, ka))
                res[row]["wall_s"].append(wall)
            print(json.dumps(dict(run=name, seed=seed, **{row: (get(s, kb), get(s, ka)) for row, kb, ka in keys},
                                  wall_s=round(wall, 1))), flush=True)
        for row, _, _ in keys:
            v = res[row]
            rows.append(dict(name=row, command=" ".join(["python", script, *extra]), metric=what, seeds=seeds, **v,
                             gain=[a - b for a, b in zip(v["after"], v["before"])]))
    path = os.path.join(OUT, "table.json")
    old = {r["name"]: r for r in json.load(open(path))} if os.path.exists(path) else {}
    old.update({r["name"]: r for r in rows})  # a subset re-measures its rows and keeps the others
    json.dump(list(old.values()), open(path, "w"), indent=1)
    lines = [f"torch {torch.__version__}; mean ± sd over seeds {args.seeds}; the shared 500 held-out problems of "
             "each task",
             "", "| algorithm | command | held-out accuracy | before | after | gain | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in old.values():
        if not r["after"]:
            lines.append(f"| {r['name']} | `{r['command']}` | failed | | | | |")
            continue
        lines.append(f"| {r['name']} | `{r['command']}` | {r['metric']} | {pm(r['before'])} | {pm(r['after'])} | "
                     f"{pm(r['gain'])} | {np.mean(r['wall_s']):.0f} |")
    open(os.path.join(OUT, "table.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
