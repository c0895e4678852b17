"""star.py: the loss by hand, the hint never leaking into the kept data, an embedded run that
raises held-out accuracy, a real architecture on real GSM8K rows, flag errors, torchrun."""
import json, os, subprocess, sys
from types import SimpleNamespace

import pytest
import torch

import common as C
import star
from conftest import kill_at_first_checkpoint, REALDATA, ROOT
from test_common import save_random_causal


def test_star_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -7.0],
                          [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0],
                         [1.0, 0.0, 0.0]])
    # masked tokens: -1, -2, -3 -> NLL = (1 + 2 + 3) / 3 = 2
    assert star.star_loss(logps, mask).item() == pytest.approx(2.0)
    # gradient: -m / sum(m) = -1/3 on the three real tokens, 0 on padding
    lp = logps.clone().requires_grad_()
    star.star_loss(lp, mask).backward()
    assert torch.allclose(lp.grad, -mask / 3)


def test_rationalize_prompt_is_pure_and_places_the_hint():
    assert star.rationalize_prompt("Q: 347+285\nA: ", "632") == "Q: 347+285 (answer: 632)\nA: "
    assert star.rationalize_prompt("no cue", "7") == "no cue (answer: 7)"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and 3+3?"}]
    hinted = star.rationalize_prompt(msgs, "6")
    assert hinted[3]["content"] == "and 3+3?\n(answer: 6)" and hinted[:3] == msgs[:3]
    assert msgs[3]["content"] == "and 3+3?"  # the input is not modified
    with pytest.raises(C.InputError):
        star.rationalize_prompt([{"role": "system", "content": "x"}], "1")


def test_filter_kept_keeps_first_correct_and_never_the_hint():
    probs = C.make_task("arithmetic", 4, seed=0)
    right = [p["solution"] for p in probs]
    wrong = [r.rsplit("#### ", 1)[0] + "#### 1" for r in right]
    completions = [[wrong[0], right[0], right[0] + ";"],               # second sample is the first correct one
                   [wrong[1]],                                        # failed
                   [f"{star.HINT.format(probs[2]['answer'])} {right[2]}"],  # correct but echoes the hint
                   [f"{star.HINT.format(probs[3]['answer'])} {right[3]}", right[3]]]
    kept, failed = star.filter_kept(probs, completions)
    assert [k[0] for k in kept] == [probs[0]["prompt"], probs[2]["prompt"], probs[3]["prompt"]] and failed == [probs[1]]
    assert kept[0][1] == right[0]
    kept, failed = star.filter_kept(probs, completions, hinted=True)
    assert kept == [(probs[0]["prompt"], right[0]), (probs[3]["prompt"], right[3])] and failed == [probs[1], probs[2]]


def test_rationalization_never_leaks_the_hint(monkeypatch):
    """Through sample_and_filter: a fake sampler that fails every plain prompt and, given a hint,
    either solves it or copies the hint. Every kept pair must carry the ORIGINAL prompt."""
    probs = C.make_task("arithmetic", 20, seed=3)
    by_hinted = {star.rationalize_prompt(p["prompt"], p["answer"]): p for p in probs}
    calls = []

    def fake_generate(model, tok, prompts, n=1, **kw):
        calls.append(prompts)
        texts = []
        for i, pr in enumerate(prompts):
            for j in range(n):
                if pr in by_hinted:  # hinted: echo the hint for even problems, solve odd ones
                    p = by_hinted[pr]
                    texts.append(f"{star.HINT.format(p['answer'])} #### {p['answer']}" if p["x"] % 2 == 0 else p["solution"])
                else:
                    texts.append("#### 0")
        return dict(texts=texts)

    monkeypatch.setattr(star.C, "generate", fake_generate)
    args = SimpleNamespace(samples=2, max_new_tokens=8, temperature=1.0, top_p=1.0, rationalize=True)
    direct, rat = star.sample_and_filter(None, None, probs, args)
    originals = {p["prompt"]: p for p in probs}
    assert direct == [] and len(rat) == sum(p["x"] % 2 for p in probs) > 0
    for prompt, text in rat:
        assert prompt in originals and text == originals[prompt]["solution"]
        assert star.HINT_MARKER not in prompt and star.HINT_MARKER not in text
    assert all(star.HINT_MARKER in pr for pr in calls[1])  # the second pass really saw the hints
    calls.clear()
    direct, rat = star.sample_and_filter(None, None, probs, SimpleNamespace(**{**vars(args), "rationalize": False}))
    assert direct == rat == [] and len(calls) == 1  # --no-rationalize: no hinted pass at all


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from a second thread, and on a busy 2-core box two OpenMP
    threads per process run ~10x slower than one (measured); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_embedded_star_raises_heldout_accuracy(tmp_path, one_thread):
    """Seed 0, torch 2.13 CPU, pinned numerics: 0.482 -> 0.996 -> 0.998 on the 500 shared held-out problems."""
    s = star.main(["--iterations", "2", "--seed", "0", "--out", str(tmp_path)])
    for k in ["accuracy_before", "accuracy_per_iteration", "accuracy_after", "kept_direct", "kept_rationalized", "steps"]:
        assert k in s
    assert json.load(open(tmp_path / "summary.json"))["accuracy_after"] == s["accuracy_after"]
    assert (tmp_path / "star.png").exists() and (tmp_path / "model" / "config.json").exists()
    assert s["steps"] == [40, 48]  # +20% per iteration
    assert min(s["kept_direct"]) > 100  # most training problems are solved by sampling
    assert s["accuracy_after"] >= s["accuracy_before"] + 0.25, s


@pytest.mark.skipif(not os.path.isdir(REALDATA), reason="../shared/realdata absent")
def test_real_architecture_on_gsm8k_rows(tmp_path, monkeypatch, one_thread):
    """A random qwen2 on real GSM8K chat prompts. It solves nothing, so the kept set is made of
    reference solutions to drive the fine-tuning loop through a real architecture."""
    folder = save_random_causal(str(tmp_path / "qwen2"), "qwen2")
    real = star.sample_and_filter

    def with_references(model, tok, problems, args):
        direct, rat = real(model, tok, problems, args)  # the real sampler, on chat prompts with hints
        assert direct == rat == []
        return [(p["prompt"], p["solution"]) for p in problems[:3]], []

    monkeypatch.setattr(star, "sample_and_filter", with_references)
    s = star.main(["--model", folder, "--dataset", os.path.join(REALDATA, "gsm8k", "train.jsonl"), "--train-n", "4",
                   "--eval-n", "2", "--iterations", "2", "--steps", "2", "--batch-size", "2", "--micro-batch-size", "1",
                   "--max-new-tokens", "8", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert s["train_n"] == 4 and s["eval_n"] == 2 and s["kept_direct"] == [3, 3] and s["steps"] == [2, 2]
    losses = [r["loss"] for r in C.read_metrics(str(tmp_path / "out")) if "loss" in r]
    assert len(losses) == 4 and all(l == l and l > 0 for l in losses)


def test_bad_flags_are_one_line_errors():
    with pytest.raises(C.InputError, match="--lr must be > 0, got -1"):
        star.main(["--lr", "-1"])
    with pytest.raises(C.InputError, match="--step-growth must be >= 1"):
        star.main(["--step-growth", "0.5"])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "star.py"), "--task", "sudoku"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --task 'sudoku': choose arithmetic, countdown, swaps, reviews"


def test_torchrun_two_ranks_gather_the_kept_set(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(ROOT, "star.py"), "--train-n", "16", "--samples", "4", "--eval-n", "8", "--iterations", "1",
                        "--steps", "2", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert r.stdout.count("summary:") == 1  # rank 0 writes and prints
    assert s["train_n"] == 16 and s["kept_direct"][0] > 8  # more than one rank's 8 problems: gathered


def test_resume_after_sigkill_continues_the_same_run(tmp_path, one_thread):
    """Killed (SIGKILL: no cleanup at all) once its first checkpoint exists, then --resume: the same
    metrics rows and summary as a run never stopped. Resuming the finished run from its last
    checkpoint (written after the last iteration) adds no row and changes nothing."""
    flags = ["--train-n", "16", "--eval-n", "8", "--iterations", "2", "--steps", "4", "--batch-size", "4", "--save-every", "2",
             "--log-every", "1", "--max-new-tokens", "40", "--device", "cpu"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    a = star.main(flags + ["--out", full])
    kill_at_first_checkpoint("star.py", flags, cut)
    b = star.main(flags + ["--out", cut, "--resume"])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]
    rows = strip(C.read_metrics(full))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 8] and strip(C.read_metrics(cut)) == rows
    assert {k: v for k, v in b.items() if k != "wall_s"} == {k: v for k, v in a.items() if k != "wall_s"}
    assert star.main(flags + ["--out", full, "--resume"])["accuracy_per_iteration"] == a["accuracy_per_iteration"]
    assert strip(C.read_metrics(full)) == rows
    with pytest.raises(C.InputError, match="--resume: flags differ"):
        star.main(flags + ["--out", full, "--resume", "--lr", "1e-3"])
