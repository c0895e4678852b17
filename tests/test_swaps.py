"""The swaps logic puzzle (common.make_swaps): generator, held-out split, verifiers, habit, hand-made
errors, the per-task built-in model (tiny-swaps), and every LM script for 1-2 steps with --task swaps."""
import importlib, json, os, random

import pytest
import torch

import common as C


def test_puzzle_generator_split_and_verifiers():
    train, test = C.make_task("swaps", 2000, seed=0), C.heldout("swaps")
    assert train == C.make_task("swaps", 2000, seed=0)                         # seeded
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}      # the fixed held-out split
    assert len({p["prompt"] for p in test}) == C.HELDOUT_N and C.heldout("swaps", 50) == test[:50]
    p = C.swaps_problem(2, ["13", "24", "12", "34", "23", "14"])
    assert p["prompt"] == "Q: ball 2; swap 13,24,12,34,23,14\nA: "
    assert p["solution"] == "13:2;24:4;12:4;34:3;23:2;14:2;#### 2" and p["answer"] == "2"
    assert C.verify(p, p["solution"]) and not C.verify(p, "13:2;#### 3") and not C.verify(p, "2")
    assert C.step_labels(p, p["solution"]) == [True] * 7
    assert C.step_labels(p, "13:2;24:4;12:4;34:4;23:4;14:1;#### 1") == [True] * 3 + [False] * 4   # a slip, carried on
    assert C.step_labels(p, p["solution"] + ";x") == [True] * 7 + [False] and C.step_labels(p, "") == []
    for q in train[:200]:                                                       # short: fits every script's budget
        assert C.verify(q, q["solution"]) and len(q["solution"]) <= 38 and len(q["prompt"]) <= 38
    assert len(C.make_task("swaps", 20, 0, difficulty=8)[0]["pairs"]) == 8
    with pytest.raises(C.InputError, match="only"):
        C.make_task("swaps", 100, 0, difficulty=1)                              # 24 puzzles in all


def test_habit_and_hand_made_errors():
    train = C.make_task("swaps", 4000, seed=0)
    sft = [s for _, s in C.tiny_sft_data(4000, 0, "swaps")]
    changed = [(s, p) for s, p in zip(sft, train) if s != p["solution"]]
    # the habit: the last swap written but not done; it shows only when the ball is under one of its cups
    hit = [p for p in train if str(C.swaps_positions(p["ball"], p["pairs"])[-2]) in p["pairs"][-1]]
    assert abs(len(hit) / len(train) - 0.5) < 0.03
    assert abs(len(changed) / len(hit) - C.SWAPS_HABIT) < 0.03
    for s, p in changed:
        assert s == C.swaps_solution(p["ball"], p["pairs"], skip_last=True) and not C.verify(p, s)
    rng = random.Random(0)
    for p in train[:500]:                                                       # corrupt(): always a wrong answer
        bad = C.corrupt(p, rng)
        assert not C.verify(p, bad) and C.format_ok(p, bad) and len(C.step_labels(p, bad)) == 7
    pair = C.make_pairs("swaps", 4, 0)[0]
    assert pair["rejected"] != pair["chosen"] and C.verify(pair["problem"], pair["chosen"])


def test_per_task_builtin_model_names(monkeypatch, capsys):
    assert C.tiny_cache_dir() == C.tiny_cache_dir("arithmetic") == os.environ["TINY_CACHE"]
    assert C.tiny_cache_dir("swaps") == os.environ["TINY_CACHE"] + "-swaps"
    assert C.tiny_recipe() == C.TINY_RECIPE != C.tiny_recipe("swaps")            # the arithmetic cache is kept
    assert C.task_model("tiny", "arithmetic") == "tiny" and C.task_model("tiny", "countdown") == "tiny"
    assert C.task_model("tiny", "swaps", dataset="x.jsonl") == "tiny" and C.task_model("folder", "swaps") == "folder"
    assert C.task_model("tiny", "swaps") == "tiny-swaps" and "tiny-swaps" in capsys.readouterr().out
    model, tok = C.load_model("tiny-swaps", device=torch.device("cpu"))        # built once by conftest
    assert open(os.path.join(C.tiny_cache_dir("swaps"), "built_with_steps.txt")).read() == C.tiny_recipe("swaps")
    out = C.generate(model, tok, [p["prompt"] for p in C.heldout("swaps", 8)], temperature=0, max_new_tokens=48)
    assert all("####" in t for t in out["texts"]), out["texts"]                # it writes the puzzle's chain


SMALL = ["--task", "swaps", "--device", "cpu", "--seed", "0"]
SMOKE = {  # script -> argv: --model tiny (the default) with --task swaps means tiny-swaps
    "grpo": ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--train-n", "8", "--eval-n", "4",
             "--eval-samples", "0", "--warmup-steps", "0"],
    "star": ["--train-n", "4", "--eval-n", "4", "--iterations", "1", "--steps", "1", "--batch-size", "2"],
    "ppo_lm": ["--train-n", "4", "--eval-n", "4", "--eval-samples", "1", "--steps", "1", "--batch-size", "2",
               "--mini-batch", "2", "--micro-batch", "2", "--ppo-epochs", "1"],
    "online_dpo": ["--rounds", "1", "--prompts", "4", "--k", "2", "--batch-size", "2", "--epochs", "1",
                   "--eval-n", "4"],
    "dpo": ["--train-n", "16", "--steps", "1", "--batch-size", "2", "--eval-n", "4", "--warmup-steps", "0"],
    "dpo:corrupt": ["--builtin", "corrupt", "--train-n", "8", "--steps", "1", "--batch-size", "2", "--eval-n", "4",
                    "--warmup-steps", "0"],
    "kto_ipo": ["--train-n", "16", "--steps", "1", "--batch-size", "2", "--eval-n", "4", "--warmup-steps", "0"],
    "kto_ipo:corrupt": ["--builtin", "corrupt", "--loss", "ipo", "--train-n", "8", "--steps", "1", "--batch-size", "2",
                        "--eval-n", "4", "--warmup-steps", "0"],
    "reward_model": ["--train-n", "16", "--eval-n", "8", "--steps", "1", "--batch-size", "4"],
    "prm": ["--train-n", "4", "--samples-per-problem", "1", "--steps", "1", "--batch-size", "4", "--eval-n", "2",
            "--max-n", "2", "--subsets", "1"],
    "reasoning_capstone": ["--model", "tiny", "--sft-steps", "1", "--sft-batch-size", "4", "--train-n", "32",
                           "--candidates", "4", "--rft-steps", "1", "--dpo-steps", "1", "--grpo-steps", "1",
                           "--prompts-per-step", "2", "--group-size", "2", "--batch-size", "2", "--eval-n", "4",
                           "--eval-samples", "2", "--pass-k", "1"],
}


@pytest.mark.parametrize("run", sorted(SMOKE))
def test_every_lm_script_runs_on_the_puzzle(run, tmp_path, capsys):
    mod = importlib.import_module(run.split(":")[0])
    summary = mod.main([*SMOKE[run], *SMALL, "--out", str(tmp_path / "out")])
    assert summary and json.load(open(tmp_path / "out" / "summary.json")) is not None
    assert "using the built-in model 'tiny-swaps'" in capsys.readouterr().out
