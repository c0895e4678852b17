"""prm.py: losses by hand, step labels, the Math-Shepherd / PRM800K parsers, best-of-N selection,
and seeded end-to-end runs (built-in task, real PRM800K rows, a GPT-2 backbone, two DDP ranks)."""
import json, os, random, subprocess, sys

import pytest
import torch

import common as C
import prm
from conftest import kill_at_first_checkpoint, REALDATA, ROOT

PRM800K = os.path.join(REALDATA, "prm800k-stepwise", "phase1_test.stepwise-critic.parquet")


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine is shared: one torch thread per process avoids oversubscription."""
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_prm_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0, 5.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 0, 0]])              # only the first two tokens end a step
    # BCE(z=0, y=1) = log 2 = 0.693147; BCE(z=2, y=0) = log(1 + e^2) = 2.126928; mean = 1.410038
    assert abs(prm.prm_loss(logits, labels, mask).item() - 1.410038) < 1e-5
    # a second row with no step ends changes nothing: the mean runs over step positions only
    two = prm.prm_loss(torch.cat([logits, logits]), torch.cat([labels, labels]), torch.cat([mask, 0 * mask]))
    assert abs(two.item() - 1.410038) < 1e-5


def test_orm_loss_by_hand():
    # BCE(z=1, y=1) = log(1 + e^-1) = 0.313262; BCE(z=-3, y=0) = log(1 + e^-3) = 0.048587; mean 0.180924
    assert abs(prm.orm_loss(torch.tensor([1.0, -3.0]), torch.tensor([1.0, 0.0])).item() - 0.180924) < 1e-5


def test_step_labels_of_a_known_wrong_solution():
    p = dict(task="arithmetic", x=876, y=530, prompt="Q: 876+530\nA: ", answer="1406",
             solution=C.arithmetic_solution(876, 530))
    it = C.task_item(p, "6+0+0=6;7+3+0=10;8+5+0=13;#### 1306")    # dropped carry at step 3
    assert it["steps"] == ["6+0+0=6", "7+3+0=10", "8+5+0=13", "#### 1306"]
    assert it["labels"] == [True, True, False, False] and not it["correct"] and it["answer"] == "1306"
    lucky = C.task_item(p, "6+0+0=6;7+3+0=11;8+5+1=14;#### 1406")   # wrong step 2, right answer
    assert lucky["labels"] == [True, False, False, False] and lucky["correct"]   # ORM says good, PRM bad
    assert C.task_item(p, "")["labels"] == [False]
    assert C.task_item(p, "6+0+0=6;7+3+0=10")["labels"] == [True, False]   # cut off: EOS claims "done"
    real = C.task_item(dict(task="gsm8k", prompt="Q", answer="5"), "2+3=5\n#### 5", "\n")   # no step verifier
    assert real["steps"] == ["2+3=5", "#### 5"] and real["labels"] is None and real["correct"]
    for seed in range(20):                                              # a slip: exactly one step is off
        s = C.slip(p, random.Random(seed))
        labels = C.arithmetic_step_labels(p, s)
        assert not C.verify(p, s) and False in labels and s.count(";") == 3
        steps = s.split(";")[:-1]
        assert sum(eval(st.split("=")[0]) != int(st.split("=")[1]) for st in steps) == 1, s
    # the PRM reads the step ends: ';' after each step, EOS after the last
    tok = C.char_tokenizer()
    b = C.encode(tok, [it], ";", "cpu", 256)
    ends = b["ids"][0][b["step_mask"][0].bool()].tolist()
    assert ends == [tok.convert_tokens_to_ids(";")] * 3 + [tok.eos_token_id]
    assert b["labels"][0][b["step_mask"][0].bool()].tolist() == [1.0, 1.0, 0.0, 0.0] and b["outcome"].tolist() == [0.0]


def test_best_of_n_on_a_constructed_case():
    cands, answers = [0, 1, 2, 3], ["12", "15", "12", None]
    assert prm.best_of_n(cands, [0.1, 0.9, 0.3, 0.2], answers, "prm") == 1
    assert prm.best_of_n(cands, [0.5, 0.1, 0.7, 0.2], answers, "orm") == 2
    assert prm.best_of_n(cands, None, answers, "majority") == 0        # '12' has two votes; first one
    assert prm.best_of_n(cands, None, [None, "7", "7", "8"], "majority") == 1
    assert prm.best_of_n(cands, None, answers, "random", random.Random(0)) in cands
    assert prm.best_of_n(cands, [0.1, 0.9, 0.3, 0.2], answers, "prm_vote") == 1   # '15': 0.9 > '12': 0.4
    assert prm.best_of_n(cands, [0.5, 0.6, 0.5, 0.9], answers, "orm_vote") == 0   # '12': 1.0 > '15': 0.6
    assert prm.aggregate([0.9, 0.5, 0.8], "min") == 0.5 and abs(prm.aggregate([0.9, 0.5, 0.8], "prod") - 0.36) < 1e-12
    # a perfect PRM reaches the oracle, an anti-correlated ORM never picks a right one
    recs = [dict(correct=[i == k for i in range(8)], answers=[str(i % 3) for i in range(8)],
                 prm=[float(i == k) for i in range(8)], orm=[float(i != k) for i in range(8)]) for k in range(8)]
    t = prm.bon_table(recs, [1, 2, 8], subsets=4, seed=0)
    assert t["prm"] == t["oracle"] and t["prm"][-1] == 1.0 and t["orm"][-1] == 0.0 and set(t) == set(prm.METHODS)
    assert len({t[m][0] for m in prm.METHODS}) == 1       # N = 1: every method picks the one sample


def test_auc_and_step_metrics():
    assert C.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75 and C.auc([1, 2], [1, 1]) is None
    items = [dict(labels=[True, False, False], probs=[0.9, 0.2, 0.6], prm=0.1, orm=0.3, correct=False),
             dict(labels=[True, True], probs=[0.8, 0.7], prm=0.6, orm=0.2, correct=True)]
    m = C.step_metrics(items)
    assert m["step_accuracy"] == 0.8 and m["first_error_accuracy"] == 1.0 and m["outcome_auc_prm"] == 1.0
    assert m["outcome_auc_orm"] == 0.0 and abs(m["step_f1_bad"] - 2 / 3) < 1e-12


MS_Q = "Tom has 3 apples and buys 2 more. How many apples does he have?"


def test_math_shepherd_parser_on_constructed_rows(tmp_path):
    row = {"input": MS_Q + " Step 1: He has 3 + 2 = 5 apples. ки\nStep 2: The answer is: 6 ки",
           "label": MS_Q + " Step 1: He has 3 + 2 = 5 apples. +\nStep 2: The answer is: 6 -", "task": "GSM8K"}
    q, steps, labels = C.parse_math_shepherd(row)
    assert q == MS_Q and steps == ["Step 1: He has 3 + 2 = 5 apples.", "Step 2: The answer is: 6"] and labels == [True, False]
    stray = {"input": "Half of 10 ки is? Step 1: 10 / 2 = 5 ки", "label": "Half of 10 + is? Step 1: 10 / 2 = 5 +"}
    assert C.parse_math_shepherd(stray) == ("Half of 10 is?", ["Step 1: 10 / 2 = 5"], [True])
    no_step = {"input": "What is 2+2? It is 4. ки", "label": "What is 2+2? It is 4. -"}
    assert C.parse_math_shepherd(no_step) == ("What is 2+2?", ["It is 4."], [False])
    with pytest.raises(C.InputError, match="row 7: 'label' has no"):
        C.parse_math_shepherd({"input": row["input"], "label": row["input"]}, "row 7")
    path = tmp_path / "ms.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(stray) + "\n")
    items = C.load_step_data(str(path))
    assert items[0]["prompt"] == [{"role": "user", "content": MS_Q}] and items[0]["correct"] is False and items[1]["correct"]
    path.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    with pytest.raises(C.InputError, match="unknown columns"):
        C.load_step_data(str(path))


@pytest.mark.skipif(not os.path.isfile(PRM800K), reason="../shared/realdata absent")
def test_prm800k_parser_on_real_rows():
    rows = C.read_rows(PRM800K)
    data = C.parse_prm800k(rows)
    rated = [r for r in rows if r["rating"] == r["rating"]]          # NaN = human-written step
    assert len(data) == len(rated) == 5082
    q, steps, labels = data[0]
    assert q.startswith("Three pencils and a jumbo eraser") and len(steps) == 1 and labels == [True]
    assert data[1][1][1].startswith("The first equation is 3p + e = 124") and data[1][2] == [True, False]
    assert all(len(s) == len(l) and all(l[:-1]) for _, s, l in data)   # only the candidate can be wrong
    assert sum(not l[-1] for _, _, l in data) == sum(r["rating"] == -1 for r in rated)
    # ratings stored as strings ('-1', '0', '1') parse the same
    as_str = [dict(r, rating=None if r["rating"] != r["rating"] else str(int(r["rating"]))) for r in rows[:40]]
    assert C.parse_prm800k(as_str) == C.parse_prm800k(rows[:40])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prm"))
    n = torch.get_num_threads(); torch.set_num_threads(1)
    s = prm.main(["--train-n", "96", "--steps", "120", "--eval-n", "24", "--max-n", "8", "--subsets", "4",
                  "--seed", "0", "--out", out])
    torch.set_num_threads(n)
    return out, s


def test_prm_beats_chance_on_held_out_steps(tiny_run):
    _, s = tiny_run
    # held-out = policy samples on test problems; chance AUC is 0.5 and the untrained head is the baseline.
    # Measured (seed 0, torch 2.13 CPU, pinned numerics): step AUC 0.92; a PRM-weighted vote over 8 samples
    # 0.875 vs one sample 0.625 (the best single pick by the PRM: 0.75). Not asserted: step accuracy at
    # p = 0.5 (0.34 vs the 0.77 majority baseline): the training mix (policy samples + reference + two
    # hand-made errors) has more bad steps than the held-out samples, so that threshold is miscalibrated
    # while the ranking, which selection uses, is good.
    assert s["step_auc"] > 0.8 and s["step_auc"] > s["before"]["step_auc"] + 0.2, (s["step_auc"], s["before"])
    assert s["prm_vote_at_max_n"] >= s["policy_sample_accuracy"] + 0.1, s


def test_end_to_end_writes_summary_and_table(tiny_run):
    out, s = tiny_run
    disk = json.load(open(os.path.join(out, "summary.json")))
    assert disk["best_of_n"]["N"] == [1, 2, 4, 8]
    for m in prm.METHODS:
        assert len(disk["best_of_n"][m]) == 4 and all(0 <= v <= 1 for v in disk["best_of_n"][m])
    for k in ("prm_at_max_n", "orm_at_max_n", "majority_at_max_n", "ordering", "reproduces_paper_ordering",
              "step_f1_bad", "first_error_accuracy", "first_error_baseline", "outcome_auc_orm", "before_best_of_n"):
        assert k in disk, k
    assert disk["oracle_at_max_n"] >= max(disk[f"{m}_at_max_n"] for m in ("prm", "orm", "majority", "random"))
    assert os.path.isfile(os.path.join(out, "best_of_n.png")) and os.path.isfile(os.path.join(out, "curves.png"))
    for sub in ("model", "orm"):                    # logratio head: causal LMs, scored against the backbone
        C.load_model(os.path.join(out, sub), device=torch.device("cpu"))


@pytest.mark.skipif(not os.path.isfile(PRM800K), reason="../shared/realdata absent")
def test_end_to_end_on_prm800k_rows(tmp_path):
    s = prm.main(["--dataset", PRM800K, "--train-n", "300", "--steps", "3", "--batch-size", "8", "--out", str(tmp_path)])
    assert "best_of_n" not in s and s["step_auc"] is not None and s["train_solutions"] + 0 > 200


def test_gpt2_backbone_with_classifier_heads(tmp_path):
    from test_common import save_random_causal
    folder = save_random_causal(str(tmp_path / "gpt2"), "gpt2")
    s = prm.main(["--model", folder, "--head", "classifier", "--train-n", "8", "--samples-per-problem", "1", "--steps", "2", "--eval-n", "2",
                  "--max-n", "2", "--subsets", "1", "--max-new-tokens", "12", "--out", str(tmp_path / "o")])
    assert s["best_of_n"]["N"] == [1, 2] and s["head"] == "classifier"
    from transformers import AutoModelForTokenClassification
    assert AutoModelForTokenClassification.from_pretrained(str(tmp_path / "o" / "model")).config.model_type == "gpt2"


def test_flag_errors():
    with pytest.raises(C.InputError, match="--lr must be > 0, got -1"):
        prm.main(["--lr", "-1"])
    with pytest.raises(C.InputError, match="--problems needs --dataset"):
        prm.main(["--problems", "x.jsonl"])


def test_two_ranks_with_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(ROOT, "prm.py"), "--train-n", "16", "--samples-per-problem", "1", "--steps", "3",
                        "--eval-n", "4", "--max-n", "4", "--subsets", "2", "--device", "cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["eval_problems"] == 4 and s["best_of_n"]["N"] == [1, 2, 4] and r.stdout.count("summary:") == 1


def test_resume_after_sigkill_continues_the_same_run(tmp_path):
    """Killed (SIGKILL: no cleanup) once its first checkpoint exists, then --resume: metrics.jsonl keeps
    the rows before the checkpoint (it used to be truncated) and the batch order and RNG continue,
    so every row and the summary equal those of a run never stopped (32 solutions, 8 a step: the
    order is reshuffled after step 4)."""
    flags = ["--train-n", "8", "--samples-per-problem", "1", "--steps", "6", "--save-every", "2", "--batch-size", "8",
             "--eval-n", "4", "--max-n", "4", "--subsets", "2", "--log-every", "1", "--device", "cpu"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    a = prm.main(flags + ["--out", full])
    state = kill_at_first_checkpoint("prm.py", flags, cut)
    assert torch.load(state, weights_only=True)["step"] in (2, 4)
    b = prm.main(flags + ["--out", cut, "--resume"])
    rows = C.read_metrics(full)
    assert [r["step"] for r in rows] == list(range(6)) and C.read_metrics(cut) == rows
    assert {k: v for k, v in b.items() if k != "wall_s"} == {k: v for k, v in a.items() if k != "wall_s"}
    assert not os.path.exists(os.path.join(cut, "checkpoint-orm"))  # one checkpoint holds both verifiers
