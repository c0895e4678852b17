"""kto_ipo.py: each loss by hand, KTO's weights and KL estimate, the unpaired loader, dataset
engineering + a KTO run on it, quick IPO/ORPO runs that learn, DDP, real architectures."""
import json, math, os, subprocess, sys

import pytest
import torch

import common as C
import kto_ipo as K
from conftest import REALDATA, ROOT
from test_common import save_random_causal

CPU = ["--device", "cpu"]


def test_ipo_loss_by_hand():
    # tau 0.5 -> target margin 1/(2 tau) = 1.   h = (pc - rc) - (pr - rr)
    # pair 1: (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1   -> (1 - 1)^2 = 0      (on target: no push)
    # pair 2: (-2 - -1.5) - (-1 - -1.5) = -0.5 - 0.5 = -1 -> (-1 - 1)^2 = 4
    # pair 3: (0 - -1.5) - (-3 - -1.5) = 1.5 + 1.5 = 3    -> (3 - 1)^2 = 4      (overshoot costs as much: unlike DPO)
    pc = torch.tensor([-1.0, -2.0, 0.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-2.0, -1.0, -3.0]), torch.full((3,), -1.5), torch.full((3,), -1.5)
    losses, cr, rj = K.ipo_loss(pc, pr, rc, rr, tau=0.5)
    assert torch.allclose(losses, torch.tensor([0.0, 4.0, 4.0]))
    assert torch.allclose(cr, torch.tensor([0.5, -0.5, 1.5])) and torch.allclose(rj, torch.tensor([-0.5, 0.5, -1.5]))
    assert not cr.requires_grad
    losses.sum().backward()  # d/dpc = 2 (h - 1): 0, -4 (raise chosen), +4 (lower it again)
    assert torch.allclose(pc.grad, torch.tensor([0.0, -4.0, 4.0]))
    # tau 0.1 -> target 5: pair 1 (h = 1) -> (1 - 5)^2 = 16
    assert math.isclose(K.ipo_loss(pc[:1], pr[:1], rc[:1], rr[:1], tau=0.1)[0].item(), 16.0, rel_tol=1e-6)


def test_kto_loss_by_hand_both_labels_and_the_clamp():
    # beta 0.5, lam_D 2, lam_U 1. Example 1 desirable: r = -3 - -4 = 1. Example 2 undesirable: r = -5 - -4 = -1.
    pol, ref = torch.tensor([-3.0, -5.0], requires_grad=True), torch.tensor([-4.0, -4.0])
    lab = torch.tensor([True, False])
    kl = torch.tensor(-0.3, requires_grad=True)  # a negative KL estimate is clamped: z0 = 0
    losses, rew = K.kto_loss(pol, ref, lab, kl, beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    # desirable: 2 - 2 sigma(0.5 (1 - 0)) = 2 - 2 * 0.6224593 = 0.7550813
    # undesirable: 1 - sigma(0.5 (0 - -1)) = 1 - 0.6224593 = 0.3775407
    assert torch.allclose(losses, torch.tensor([0.7550813, 0.3775407]), atol=1e-6)
    assert torch.allclose(rew, torch.tensor([0.5, -0.5])) and not rew.requires_grad  # beta r
    # z0 = 0.4 (positive: used as is): 2 - 2 sigma(0.5 * 0.6) = 2 - 2 * 0.5744425 = 0.8511150
    #                                   1 - sigma(0.5 * (0.4 + 1)) = 1 - 0.6681878 = 0.3318122
    l2, _ = K.kto_loss(pol, ref, lab, 0.4, beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    assert torch.allclose(l2, torch.tensor([0.8511150, 0.3318122]), atol=1e-6)
    # the clamp: every kl <= 0 gives the same loss as kl = 0
    assert torch.allclose(K.kto_loss(pol, ref, lab, -7.0, 0.5, 2.0, 1.0)[0], K.kto_loss(pol, ref, lab, 0.0, 0.5, 2.0, 1.0)[0])
    # z0 carries no gradient; d loss_D / d pol = -lam beta sigma'(0.5) = -2 * 0.5 * 0.2350037 = -0.2350037
    (losses.sum() + l2.sum() * 0).backward()
    assert kl.grad is None or kl.grad.abs().item() == 0.0
    assert math.isclose(pol.grad[0].item(), -0.2350037, abs_tol=1e-6)  # desirable: raise log pi
    assert math.isclose(pol.grad[1].item(), 0.1175019, abs_tol=1e-6)   # undesirable: 1 * 0.5 * 0.2350037, lower it


def test_orpo_loss_by_hand():
    # pair 1: p_w = 0.5 (odds 1, log odds 0), p_l = 0.2 (odds 0.25, log odds -1.3862944)
    #   ratio term: -log sigma(0 + 1.3862944) = log(1 + e^-1.3862944) = log 1.25 = 0.2231436
    #   NLL(y_w) = -log 0.5 = 0.6931472;  loss = 0.6931472 + 0.1 * 0.2231436 = 0.7154615
    # pair 2: swapped -> ratio term log(1 + 4) = 1.6094379; NLL = -log 0.2 = 1.6094379 -> 1.6094379 * 1.1 = 1.7703817
    cw, cl = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.2, 0.5]))
    losses, lo_w, lo_l = K.orpo_loss(cw, cl, -cw, lam=0.1)
    assert torch.allclose(losses, torch.tensor([0.7154615, 1.7703817]), atol=1e-6)
    assert torch.allclose(lo_w, torch.tensor([0.0, -1.3862944]), atol=1e-6)
    assert torch.allclose(lo_l, torch.tensor([-1.3862944, 0.0]), atol=1e-6)
    # p -> 1 stays finite (log odds large but not inf)
    assert torch.isfinite(K.orpo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([0.0]))[0]).all()


def test_kto_weights_follow_the_paper_rule():
    # 300 desirable, 100 undesirable: lam_U 1, lam_D = 100/300 -> lam_D n_D / (lam_U n_U) = 1
    lam_d, lam_u = K.kto_weights(300, 100)
    assert lam_u == 1.0 and math.isclose(lam_d, 1 / 3) and math.isclose(lam_d * 300 / (lam_u * 100), 1.0)
    # 1 desirable : 10 undesirable -> lam_D = 10
    assert math.isclose(K.kto_weights(50, 500)[0], 10.0)
    # a given lam_D is clipped into [1, 4/3] * lam_U n_U / n_D: 1.0 -> 1/3 * 4/3 = 0.4444; 0.4 stays
    assert math.isclose(K.kto_weights(300, 100, desirable_weight=1.0)[0], 4 / 9)
    assert math.isclose(K.kto_weights(300, 100, desirable_weight=0.4)[0], 0.4)
    assert K.kto_weights(0, 0) == (1.0, 1.0)


def test_kl_estimate_uses_shifted_completions():
    assert K.shift_completions(["a", "b", "c", "d"]) == ["d", "a", "b", "c"]
    C.setup(0, "cpu")
    ref, tok = C.load_model("tiny", device=torch.device("cpu"))
    pol, _ = C.load_model("tiny", device=torch.device("cpu"))
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = C.make_unpaired("arithmetic", 4, seed=3)
    x, y = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    kl = K.kl_estimate(pol, ref, tok, x, y, micro=2, max_len=256)

    def mean_ratio(ys):
        with torch.no_grad():
            return (C.seq_logps(pol, tok, x, ys, 256)[0] - C.seq_logps(ref, tok, x, ys, 256)[0]).mean().item()
    # prompt i is scored with completion i-1: (x0, y3), (x1, y0), (x2, y1), (x3, y2)
    assert math.isclose(kl, mean_ratio([y[3], y[0], y[1], y[2]]), abs_tol=1e-5)
    assert not math.isclose(kl, mean_ratio(y), abs_tol=1e-3)  # not the matched pairs


def test_load_unpaired_kto_mix_style_and_row_errors(tmp_path):
    good = tmp_path / "kto.jsonl"
    msgs = lambda role, text: [{"role": role, "content": text}]
    rows = [{"prompt": msgs("user", "What is 2+2?"), "completion": msgs("assistant", "4"), "label": True},
            {"prompt": "The sky is", "completion": " green.", "label": False},
            {"prompt": msgs("user", "Hi"), "completion": msgs("assistant", "Hello!"), "label": 1}]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = C.load_unpaired(str(good))
    assert [r["label"] for r in out] == [True, False, True] and out[0]["completion"] == "4"
    assert out[0]["prompt"] == msgs("user", "What is 2+2?") and out[1]["prompt"] == "The sky is"
    pairs = tmp_path / "pairs.jsonl"  # paired rows -> two unpaired rows each (chosen True, rejected False)
    pairs.write_text(json.dumps({"prompt": "Q: 1+1\nA: ", "chosen": "2", "rejected": "3"}) + "\n")
    assert C.load_unpaired(str(pairs)) == [dict(prompt="Q: 1+1\nA: ", completion="2", label=True),
                                           dict(prompt="Q: 1+1\nA: ", completion="3", label=False)]
    for bad, msg in (({"prompt": "p", "completion": "c", "label": "yes"}, "row 2: field 'label' must be true/false"),
                     ({"prompt": "p", "label": True}, "row 2: missing field 'completion'"),
                     ({"prompt": [{"role": "user"}], "completion": "c", "label": True}, "row 2: field 'prompt' must be a string or"),
                     ({"prompt": "p", "completion": msgs("assistant", " "), "label": False}, "row 2: field 'completion' is empty")):
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps(rows[1]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(C.InputError, match=msg):
            C.load_unpaired(str(f))


def test_make_dataset_then_kto_learns(tmp_path):
    """--make-dataset: K samples per prompt from tiny, verifier labels, both files written with the
    printed counts; KTO weights from the imbalance; the KTO run on the made set learns."""
    s = K.main(CPU + ["--make-dataset", "--n-prompts", "128", "--samples", "4", "--steps", "40", "--batch-size", "16",
                      "--eval-n", "100", "--seed", "0", "--out", str(tmp_path)])
    made = s["made_dataset"]
    pairs = [json.loads(l) for l in open(tmp_path / "pairs.jsonl")]
    kto = [json.loads(l) for l in open(tmp_path / "kto.jsonl")]
    assert made["pairs"] == len(pairs) > 20 and made["unpaired"] == len(kto) == s["train_rows"]
    assert made["desirable"] == sum(r["label"] for r in kto) and made["undesirable"] == sum(not r["label"] for r in kto)
    # duplicates are dropped: tiny's right answers repeat, its wrong ones differ (measured 0.46 desirable)
    assert 0.2 < made["desirable_frac"] < 0.8
    assert all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in pairs)
    probs = {p["prompt"]: p for p in C.make_task("arithmetic", 128, 0)}
    assert all(C.verify(probs[r["prompt"]], r["chosen"]) and not C.verify(probs[r["prompt"]], r["rejected"]) for r in pairs)
    assert all(C.verify(probs[r["prompt"]], r["completion"]) == r["label"] for r in kto)
    # lam_U = 1, lam_D = n_U / n_D: lam_D n_D / (lam_U n_U) = 1, the low end of the paper's [1, 4/3]
    assert s["undesirable_weight"] == 1.0 and math.isclose(s["desirable_weight"], made["undesirable"] / made["desirable"])
    # the files round-trip through the loaders
    assert len(C.load_unpaired(str(tmp_path / "kto.jsonl"))) == len(kto) and len(C.load_pairs(str(tmp_path / "pairs.jsonl"))) == len(pairs)
    # learned: on held-out answers to the test prompts the implicit reward separates desirable from
    # undesirable and greedy accuracy rises (measured, seed 0: AUC 0.5 -> 0.87, accuracy 0.50 -> 1.00
    # on 100 problems).
    assert s["heldout_reward_margin_before"] == pytest.approx(0, abs=1e-6) and s["heldout_reward_acc_before"] == 0.5
    assert s["heldout_reward_margin_after"] > 0.05 and s["heldout_reward_acc_after"] > 0.6, s
    assert s["accuracy_after"] >= s["accuracy_before"] + 0.1, s
    for k in ("accuracy_before", "accuracy_after", "last_kl", "last_z0", "last_reward_margin", "wall_s"):
        assert k in s, k
    assert s == json.load(open(tmp_path / "summary.json"))
    rows = [r for r in C.read_metrics(str(tmp_path)) if "loss" in r]
    assert len(rows) == 40 and {"kl", "z0", "chosen_reward", "rejected_reward", "reward_margin", "reward_acc"} <= set(rows[0])
    assert all(r["z0"] >= 0 for r in rows)
    assert all(os.path.isfile(tmp_path / f) for f in ("rewards.png", "health.png", "model/config.json"))


def test_make_dataset_with_reward_model_judge(tmp_path):
    """--judge: an (untrained) tiny reward model scores the answers; label = score > median score,
    pairs = best vs worst answer of prompts whose scores differ. --steps 0: make + evaluate only."""
    rm, tok = C.load_model("tiny", kind="reward", device=torch.device("cpu"))
    C.save_pretrained_atomic(str(tmp_path / "rm"), rm, tok)
    s = K.main(CPU + ["--make-dataset", "--judge", str(tmp_path / "rm"), "--loss", "ipo", "--n-prompts", "16", "--samples", "4",
                      "--steps", "0", "--batch-size", "4", "--eval-n", "8", "--out", str(tmp_path / "run")])
    m, kto = s["made_dataset"], [json.loads(l) for l in open(tmp_path / "run" / "kto.jsonl")]
    assert m["unpaired"] == len(kto) and 0 < m["desirable"] <= len(kto) / 2  # strictly above the median
    assert m["pairs"] == sum(1 for _ in open(tmp_path / "run" / "pairs.jsonl")) == s["train_rows"] > 0
    assert s["heldout_reward_acc_before"] == s["heldout_reward_acc_after"]  # 0 steps: nothing changed


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    flags = CPU + ["--steps", "4", "--batch-size", "4", "--train-n", "32", "--eval-n", "8", "--builtin", "corrupt", "--out", str(tmp_path)]
    calls, real = [], K.kto_loss

    def interrupted(*a, **kw):  # Ctrl-C during the 3rd update
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(K, "kto_loss", interrupted)
    with pytest.raises(SystemExit) as e:
        K.main(flags)
    assert e.value.code == 130 and torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(K, "kto_loss", real)
    s = K.main(flags + ["--resume"])
    resumed = [r for r in C.read_metrics(str(tmp_path)) if "loss" in r]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3] and s["steps"] == 4
    K.main(flags[:-1] + [str(tmp_path / "straight")])  # the same 4 steps without the interruption
    straight = [r for r in C.read_metrics(str(tmp_path / "straight")) if "loss" in r]
    for k in ("loss", "kl", "grad_norm"):
        assert [r[k] for r in resumed] == pytest.approx([r[k] for r in straight], abs=1e-6), k
    with pytest.raises(C.InputError, match="flags differ"):
        K.main(flags + ["--resume", "--seed", "1"])


@pytest.mark.parametrize("loss", ["kto", "ipo", "orpo"])
def test_each_loss_learns_on_the_builtin_data(tmp_path, loss):
    """Built-in data with the defaults per loss: the reference solution vs the start model's own wrong
    sample (KTO: one of the two per prompt, balanced labels). Measured with these flags, seed 0 (the
    full defaults, 200 problems, seeds 0 / 1, in the module docstring): accuracy rises for all three."""
    s = K.main(CPU + ["--loss", loss, "--train-n", "2048", "--eval-n", "100", "--seed", "0", "--out", str(tmp_path)])
    assert s["train_rows"] > 500, s
    if loss == "kto":    # AUC of the implicit reward over (desirable, undesirable) held-out couples
        assert s["heldout_reward_acc_before"] == 0.5 and s["heldout_reward_acc_after"] >= 0.75, s
    elif loss == "ipo":  # ties at the start (policy = reference)
        assert s["heldout_reward_acc_before"] == 0 and s["heldout_reward_acc_after"] >= 0.75, s
    else:                # no reference: log-odds margin, already positive at the start
        assert s["heldout_reward_margin_after"] > s["heldout_reward_margin_before"] + 0.3, s
    # measured (seed 0, torch 2.13 CPU, pinned numerics, 100 problems): 0.50 -> kto 0.95, ipo 0.95, orpo 0.85;
    # 0.1 leaves ORPO 3x the sd of its default run's gain over seeds (0.084, README)
    assert s["accuracy_after"] >= s["accuracy_before"] + 0.1, s
    rows = [r for r in C.read_metrics(str(tmp_path)) if "loss" in r]
    assert len(rows) == 160 and {"kto": "z0", "ipo": "h", "orpo": "nll"}[loss] in rows[0]


def test_bad_flags_are_one_line_errors(tmp_path):
    for flags, msg in ((["--lr", "-1"], "--lr must be > 0"), (["--tau", "0"], "--tau must be > 0"),
                       (["--micro-batch-size", "1"], "kto: --batch-size and --micro-batch-size must be >= 2"),
                       (["--judge", "x"], "add --make-dataset"), (["--make-dataset", "--resume"], "--resume cannot re-make"),
                       (["--dataset", str(tmp_path / "nope.jsonl")], "no such file")):
        with pytest.raises(C.InputError, match=msg):
            K.main(flags + ["--out", str(tmp_path)])


def test_real_architecture_with_chat_rows(tmp_path):
    """A random llama folder on kto-mix-14k-style message rows (KTO), then ORPO on message-list pairs."""
    folder = save_random_causal(str(tmp_path / "llama"), "llama")
    data, pairs = tmp_path / "kto.jsonl", tmp_path / "uf.jsonl"
    with open(data, "w") as f, open(pairs, "w") as g:
        for i in range(24):
            user = {"role": "user", "content": f"Say something about {i}."}
            f.write(json.dumps({"prompt": [user], "completion": [{"role": "assistant", "content": f"{i} is fine." if i % 3 else "no"}],
                                "label": bool(i % 3)}) + "\n")
            g.write(json.dumps({"chosen": [user, {"role": "assistant", "content": f"{i} is a number."}],
                                "rejected": [user, {"role": "assistant", "content": "no"}]}) + "\n")
    s = K.main(CPU + ["--model", folder, "--dataset", str(data), "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2",
                      "--eval-n", "6", "--out", str(tmp_path / "kto")])
    assert s["train_rows"] == 18 and "accuracy_after" not in s and math.isclose(s["desirable_weight"], 6 / 12)
    rows = [r for r in C.read_metrics(str(tmp_path / "kto")) if "loss" in r]
    assert abs(rows[0]["kl"]) < 1e-4  # step 1: policy = reference, so the KL estimate is 0
    s = K.main(CPU + ["--loss", "orpo", "--model", folder, "--dataset", str(pairs), "--steps", "2", "--batch-size", "4",
                      "--eval-n", "4", "--out", str(tmp_path / "orpo")])
    assert s["train_rows"] == 20 and math.isfinite(s["last_loss"])


@pytest.mark.skipif(not os.path.isdir(REALDATA), reason="../shared/realdata absent")
def test_hh_rlhf_pairs_as_kto_rows(tmp_path):
    """Real hh-rlhf pairs -> unpaired rows (chosen True / rejected False) for KTO on a random qwen2."""
    folder = save_random_causal(str(tmp_path / "qwen2"), "qwen2")
    spec = os.path.join(REALDATA, "hh-rlhf", "harmless-base", "test.jsonl.gz")
    rows = C.load_unpaired(spec, n=10)
    assert len(rows) == 20 and [r["label"] for r in rows[:2]] == [True, False]
    s = K.main(CPU + ["--model", folder, "--dataset", spec, "--train-n", "24", "--steps", "2", "--batch-size", "4",
                      "--eval-n", "4", "--max-len", "384", "--out", str(tmp_path / "run")])
    assert s["train_rows"] > 0 and math.isfinite(s["last_loss"])


def test_ddp_kto_matches_single_process(tmp_path):
    """2 gloo ranks, global batch 8 (z0 over the global batch via all-reduce) take the same steps as one process."""
    flags = CPU + ["--steps", "2", "--batch-size", "8", "--eval-n", "8", "--train-n", "64", "--lr", "1e-4", "--beta", "1", "--builtin", "corrupt"]
    K.main(flags + ["--out", str(tmp_path / "one")])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(ROOT, "kto_ipo.py")] + flags + ["--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "two" / "summary.json"))["world_size"] == 2
    one = [x for x in C.read_metrics(str(tmp_path / "one")) if "loss" in x]
    two = [x for x in C.read_metrics(str(tmp_path / "two")) if "loss" in x]
    for k in ("loss", "kl", "reward_acc", "chosen_reward", "rejected_reward"):  # step 2 depends on step 1's gradient
        assert [x[k] for x in one] == pytest.approx([x[k] for x in two], rel=1e-4, abs=1e-5), k


def test_fsdp_kto_matches_single_process(tmp_path):
    """--fsdp: policy and reference sharded over 2 gloo ranks (FSDP2), KTO's z0 from the global batch:
    the same steps and the same saved weights as one process."""
    flags = CPU + ["--steps", "2", "--batch-size", "8", "--eval-n", "8", "--train-n", "64", "--lr", "1e-4", "--beta", "1", "--builtin", "corrupt"]
    K.main(flags + ["--out", str(tmp_path / "one")])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(ROOT, "kto_ipo.py")] + flags + ["--fsdp", "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one = [x for x in C.read_metrics(str(tmp_path / "one")) if "loss" in x]
    two = [x for x in C.read_metrics(str(tmp_path / "two")) if "loss" in x]
    for k in ("loss", "kl", "reward_acc", "chosen_reward", "rejected_reward", "grad_norm"):
        assert [x[k] for x in one] == pytest.approx([x[k] for x in two], rel=1e-4, abs=1e-5), k
    a, _ = C.load_model(str(tmp_path / "one" / "model"), device=torch.device("cpu"))
    b, _ = C.load_model(str(tmp_path / "two" / "model"), device=torch.device("cpu"))
    assert all(torch.allclose(p, q, rtol=1e-4, atol=1e-5) for p, q in zip(a.parameters(), b.parameters()))
