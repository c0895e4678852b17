"""How far the built-in `tiny` start model moves between builds: held-out accuracy over seeds.

    python tests/bench/tiny_spread.py --seeds 0,1,2                 # the recipe common.py uses
    python tests/bench/tiny_spread.py --seeds 0,1,2 --steps 100,150   # other SFT budgets
    python tests/bench/tiny_spread.py --seeds 0,1,2 --task swaps      # tiny-swaps, the logic puzzle's start

Each (steps, seed) builds `tiny` (or `tiny-<task>`) from scratch exactly as `common.build_tiny` does
(a child process on the AVX2 code paths, PORTABLE_NUMERICS) into out/tiny_spread/, then scores
greedy accuracy on the task's shared held-out set (common.heldout(), 500 problems), and for swaps
also on the half of it whose last swap moves the ball (where the SFT data's habit gives the wrong
answer) and the rest. Run it under each torch build you care about: the spread across seeds and
builds is the noise any learning claim has to beat. Writes out/tiny_spread/<torch
version>[-<task>].json.
Not a test.
"""
import argparse, json, os, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated build seeds")
    ap.add_argument("--steps", default=str(C.TINY_SFT_STEPS), help="comma-separated SFT step budgets")
    ap.add_argument("--n", type=int, default=C.HELDOUT_N, help="held-out problems")
    ap.add_argument("--task", default="arithmetic", choices=C.TINY_TASKS, help="the built-in model's task")
    args = ap.parse_args()
    torch.set_num_threads(1)
    test, rows = C.heldout(args.task, args.n), []
    # swaps: the puzzles whose last swap moves the ball, the ones the SFT data's habit gets wrong
    habit_hit = [str(([p["ball"]] + C.swaps_positions(p["ball"], p["pairs"]))[-2]) in p["pairs"][-1]
                 for p in test] if args.task == "swaps" else None
    for steps in map(int, args.steps.split(",")):
        accs = []
        for seed in map(int, args.seeds.split(",")):
            name = f"s{steps}_seed{seed}" if args.task == "arithmetic" else f"{args.task}_s{steps}_seed{seed}"
            folder, t0 = os.path.join(ROOT, "out", "tiny_spread", name), time.time()
            C.build_tiny(folder, seed=seed, steps=steps, task=args.task)
            model, tok = C.load_model(folder, device=torch.device("cpu"))
            texts = C.generate(model, tok, [p["prompt"] for p in test], temperature=0, max_new_tokens=64)["texts"]
            ok = [C.verify(p, t) for p, t in zip(test, texts)]
            accs.append(float(np.mean(ok)))
            extra = {} if habit_hit is None else dict(  # the habit's half vs the rest
                accuracy_last_swap_moves=float(np.mean([o for o, h in zip(ok, habit_hit) if h])),
                accuracy_other=float(np.mean([o for o, h in zip(ok, habit_hit) if not h])))
            print(json.dumps(dict(steps=steps, seed=seed, accuracy=accs[-1], **extra,
                                  wall_s=round(time.time() - t0, 1))), flush=True)
        rows.append(dict(steps=steps, seeds=args.seeds, accuracies=accs, mean=float(np.mean(accs)),
                         sd=float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0))
        print(f"{args.task} steps {steps}: {rows[-1]['mean']:.3f} ± {rows[-1]['sd']:.3f} over seeds {args.seeds} "
              f"(torch {torch.__version__})")
    tag = "" if args.task == "arithmetic" else f"-{args.task}"
    path = os.path.join(ROOT, "out", "tiny_spread", f"torch-{torch.__version__.replace('+', '_')}{tag}.json")
    json.dump(rows, open(path, "w"), indent=1)


if __name__ == "__main__":
    main()
