"""Every LM algorithm of the course on the same embedded task, from the same starting model.

    python tests/bench/cross_algorithm.py            # ~30-40 min on 2 CPU cores; --only dpo,grpo for a subset

Each script runs as a user would run it (its defaults, `--model tiny`, built-in 3-digit arithmetic,
the same 200 held-out problems: make_task(seed=1, split="test")), one after another, and the
table reports its held-out accuracy before -> after and its wall time. Greedy accuracy except
prm.py, which trains no policy: its row is best-of-N selection by the trained PRM vs one sample.
Writes out/cross_algorithm/table.md and table.json. Not a test: a benchmark whose numbers go into
the README with this command.
"""
import argparse, json, os, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "out", "cross_algorithm")

# name: (script, extra flags, (summary key before, summary key after), what the numbers are)
RUNS = {
    "ppo_lm (verifier reward)": ("ppo_lm.py", [], ("gold_accuracy_before", "gold_accuracy_after"), "greedy"),
    "dpo (+RPO NLL)": ("dpo.py", [], ("accuracy_before", "accuracy_after"), "greedy"),
    "ipo": ("kto_ipo.py", ["--loss", "ipo"], ("accuracy_before", "accuracy_after"), "greedy"),
    "kto": ("kto_ipo.py", ["--loss", "kto"], ("accuracy_before", "accuracy_after"), "greedy"),
    "orpo": ("kto_ipo.py", ["--loss", "orpo"], ("accuracy_before", "accuracy_after"), "greedy"),
    "online_dpo (verifier judge)": ("online_dpo.py", [], ("accuracy_before", "accuracy_after"), "greedy"),
    "star": ("star.py", [], ("accuracy_before", "accuracy_after"), "greedy"),
    "grpo": ("grpo.py", [], ("accuracy_before", "accuracy_after"), "greedy"),
    "prm best-of-N": ("prm.py", [], ("policy_sample_accuracy", "prm_at_max_n"), "one sample -> best-of-N by PRM"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated row-name prefixes to re-run; the other rows are kept from the last run (default: run all)")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "table.json")
    old = {r["name"]: r for r in json.load(open(path))} if args.only and os.path.exists(path) else {}
    rows = []
    for name, (script, extra, (kb, ka), what) in RUNS.items():
        if args.only and not any(name.startswith(o) for o in args.only.split(",")):
            continue
        out = os.path.join(OUT, name.split()[0] + ("_" + extra[-1] if extra else ""))
        cmd = [sys.executable, script, "--model", "tiny", *extra, "--seed", "0", "--out", out]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        wall = time.time() - t0
        if r.returncode != 0:
            rows.append(dict(name=name, command=" ".join(["python", script, *extra]), error=r.stderr.strip().splitlines()[-1:]))
        else:
            s = json.load(open(os.path.join(out, "summary.json")))
            rows.append(dict(name=name, command=" ".join(["python", script, *extra]), metric=what,
                             before=s[kb], after=s[ka], wall_s=round(wall, 1)))
        print(json.dumps(rows[-1]), flush=True)
    # --only re-measures some rows and keeps the others from the last full run
    rows = [next((r for r in rows if r["name"] == n), old[n]) for n in RUNS if n in old or any(r["name"] == n for r in rows)]
    json.dump(rows, open(path, "w"), indent=1)
    lines = ["| algorithm | command | held-out accuracy | before → after | wall s |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | `{r['command']}` | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['name']} | `{r['command']}` | {r['metric']} | {r['before']:.3f} → {r['after']:.3f} | {r['wall_s']:.0f} |")
    open(os.path.join(OUT, "table.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
