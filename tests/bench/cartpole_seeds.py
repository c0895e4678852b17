"""ppo_gridworld.py on CartPole-v1 at its default budget, one seed after another.

    python tests/bench/cartpole_seeds.py --seeds 0,1,2,3,4      # ~1 min on a CPU core

Each seed runs as a user would run it (`python ppo_gridworld.py --env CartPole-v1 --seed S`, the
PRESETS defaults, one torch thread), in its own subprocess, one after another. The table reports
each seed's greedy evaluation return (mean over the script's default 20 episodes, read from
<out>/summary.json), its wall time (the whole process: imports, training, evaluation, plots) and
mean ± sd over the seeds. Writes out/cartpole_seeds/table.json. Not a test: a benchmark whose
numbers go into ppo_gridworld.py's docstring with this command.
"""
import argparse, json, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "out", "cartpole_seeds")


def mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds, run one after another")
    ap.add_argument("--env", default="CartPole-v1", help="gymnasium id passed to ppo_gridworld.py --env")
    ap.add_argument("--extra", default="",
                    help="extra flags for ppo_gridworld.py, space-separated; write --extra='--lr 3e-4' (default: none)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    os.makedirs(OUT, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    for seed in seeds:
        out = os.path.join(OUT, f"seed{seed}")
        cmd = [sys.executable, "ppo_gridworld.py", "--env", args.env, "--seed", str(seed), "--out", out,
               *args.extra.split()]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        wall = time.time() - t0
        if r.returncode != 0:
            rows.append(dict(seed=seed, error=r.stderr.strip().splitlines()[-1:]))
        else:
            with open(os.path.join(out, "summary.json")) as f:
                s = json.load(f)
            rows.append(dict(seed=seed, eval_return=s["eval_return_mean"], env_steps=s["env_steps"],
                             train_s=s["train_time_s"], wall_s=round(wall, 1)))
        print(json.dumps(rows[-1]), flush=True)
    ok = [r for r in rows if "error" not in r]
    table = dict(command="python ppo_gridworld.py --env " + args.env + (" " + args.extra if args.extra else ""),
                 seeds=seeds, rows=rows)
    if ok:
        (rm, rs), (wm, ws) = mean_sd([r["eval_return"] for r in ok]), mean_sd([r["wall_s"] for r in ok])
        table.update(eval_return_mean=rm, eval_return_sd=rs, wall_s_mean=wm, wall_s_sd=ws,
                     min_eval_return=min(r["eval_return"] for r in ok))
    with open(os.path.join(OUT, "table.json"), "w") as f:
        json.dump(table, f, indent=1)
    print(f"\n{'seed':>4}  {'greedy eval':>11}  {'wall s':>6}")
    for r in rows:
        print(f"{r['seed']:>4}  failed: {r['error']}" if "error" in r else
              f"{r['seed']:>4}  {r['eval_return']:>11.1f}  {r['wall_s']:>6.1f}")
    if ok:
        print(f"mean  {rm:>6.1f} ± {rs:<5.1f} {wm:>4.1f} ± {ws:.1f}   ({len(ok)}/{len(rows)} seeds ran)")
    sys.exit(0 if len(ok) == len(rows) else 1)


if __name__ == "__main__":
    main()
