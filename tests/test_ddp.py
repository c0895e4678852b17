"""Scale-out: every LM script runs unchanged under `torchrun --nproc_per_node=2` (gloo, CPU) and
writes the same summary keys as a single-process run with the same flags. (grpo.py and dpo.py
also check that one update's gradients on 2 ranks equal one process's: see their own tests.)"""
import importlib, json, os, subprocess, sys

import pytest

from conftest import ROOT

SMALL = {  # tiny settings: the point is the plumbing (sharding, DDP, gathers, rank-0 writes)
    "reward_model": ["--steps", "4", "--batch-size", "8", "--train-n", "32", "--eval-n", "16"],
    "ppo_lm": ["--reward", "verifier", "--steps", "2", "--batch-size", "8", "--mini-batch", "4", "--ppo-epochs", "1",
               "--eval-n", "8", "--eval-samples", "2", "--max-new-tokens", "44"],
    "dpo": ["--steps", "3", "--batch-size", "8", "--train-n", "128", "--eval-n", "8", "--max-new-tokens", "44"],
    "kto_ipo": ["--steps", "3", "--batch-size", "8", "--train-n", "128", "--eval-n", "8", "--max-new-tokens", "44"],
    "online_dpo": ["--rounds", "1", "--prompts", "16", "--k", "2", "--batch-size", "4", "--eval-n", "8", "--max-new-tokens", "44"],
    "prm": ["--train-n", "16", "--samples-per-problem", "2", "--steps", "4", "--batch-size", "8", "--eval-n", "4", "--max-n", "4",
            "--subsets", "2", "--max-new-tokens", "44"],
    "star": ["--iterations", "1", "--train-n", "16", "--eval-n", "8", "--steps", "2", "--batch-size", "8", "--max-new-tokens", "44"],
    "grpo": ["--steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--eval-n", "8", "--max-new-tokens", "44"],
    "reasoning_capstone": ["--model", "tiny", "--task", "arithmetic", "--sft-steps", "0", "--train-n", "16", "--candidates", "4", "--rft-steps", "2",
                           "--dpo-steps", "2", "--grpo-steps", "2", "--prompts-per-step", "4", "--group-size", "2",
                           "--batch-size", "4", "--eval-n", "8", "--eval-samples", "2", "--pass-k", "2", "--max-new-tokens", "44"],
}


def keys(d, prefix=""):
    """Nested key paths of a summary (lists of dicts: the keys of their rows)."""
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= keys(v, prefix + k + ".")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for row in v:
                out |= keys(row, prefix + k + "[].")
    return out


@pytest.mark.parametrize("script", sorted(SMALL))
def test_two_gloo_ranks_match_single_process_summary_keys(script, tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(ROOT, f"{script}.py"), *SMALL[script], "--device", "cpu", "--out", str(tmp_path / "ddp")],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.count("summary: ") == 1  # only rank 0 prints and writes the summary
    ddp = json.load(open(tmp_path / "ddp" / "summary.json"))
    single = importlib.import_module(script).main(SMALL[script] + ["--device", "cpu", "--out", str(tmp_path / "single")])
    assert keys(ddp) == keys(json.loads(json.dumps(single, default=float)))
