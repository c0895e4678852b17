"""How far the built-in `tiny` start model moves between builds: held-out accuracy over seeds.

    python tests/bench/tiny_spread.py --seeds 0,1,2                 # the recipe common.py uses
    python tests/bench/tiny_spread.py --seeds 0,1,2 --steps 100,150   # other SFT budgets

Each (steps, seed) builds `tiny` from scratch exactly as `common.build_tiny` does (a child process on
the AVX2 code paths, PORTABLE_NUMERICS) into out/tiny_spread/, then scores greedy accuracy on the
shared held-out set (common.heldout(), 500 problems). Run it under each torch build you care about:
the spread across seeds and builds is the noise any learning claim has to beat. Writes
out/tiny_spread/<torch version>.json. Not a test.
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
    args = ap.parse_args()
    torch.set_num_threads(1)
    test, rows = C.heldout("arithmetic", args.n), []
    for steps in map(int, args.steps.split(",")):
        accs = []
        for seed in map(int, args.seeds.split(",")):
            folder, t0 = os.path.join(ROOT, "out", "tiny_spread", f"s{steps}_seed{seed}"), time.time()
            C.build_tiny(folder, seed=seed, steps=steps)
            model, tok = C.load_model(folder, device=torch.device("cpu"))
            accs.append(C.evaluate(model, tok, test)["accuracy"])
            print(json.dumps(dict(steps=steps, seed=seed, accuracy=accs[-1], wall_s=round(time.time() - t0, 1))),
                  flush=True)
        rows.append(dict(steps=steps, seeds=args.seeds, accuracies=accs, mean=float(np.mean(accs)),
                         sd=float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0))
        print(f"steps {steps}: {rows[-1]['mean']:.3f} ± {rows[-1]['sd']:.3f} over seeds {args.seeds} "
              f"(torch {torch.__version__})")
    path = os.path.join(ROOT, "out", "tiny_spread", f"torch-{torch.__version__.replace('+', '_')}.json")
    json.dump(rows, open(path, "w"), indent=1)


if __name__ == "__main__":
    main()
