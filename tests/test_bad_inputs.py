"""The bad-input catalogue: each case gets a clear one-line error that names the file, row or flag
(exit status 2, no traceback), or a documented, logged recovery; nothing already written is lost.
Resume after SIGKILL is tested in test_grpo.py and test_dpo.py (exact metrics after the restart)."""
import hashlib, json, os, signal, subprocess, sys, time

import pytest
import torch

import common as C
from conftest import ROOT

DPO_SMALL = ["--n-pairs", "64", "--batch-size", "8", "--eval-n", "8", "--warmup-steps", "0", "--device", "cpu", "--builtin", "corrupt"]


def run(script, *argv, timeout=300):
    """A script as a user runs it: returns (exit status, stderr lines)."""
    r = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    return r.returncode, r.stderr.strip().splitlines()


def assert_one_line_error(script, argv, *needles):
    rc, err = run(script, *argv)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err[-5:])
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def digest(folder):
    h = hashlib.sha256()
    for f in sorted(os.listdir(folder)):
        h.update(f.encode()); h.update(open(os.path.join(folder, f), "rb").read())
    return h.hexdigest()

# ----------------------------------------------------------------------------- 1-5: data files


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, '{"prompt": "a", "chosen": '])
    assert_one_line_error("dpo.py", ["--dataset", f, "--out", str(tmp_path / "o")], "pairs.jsonl:2", "not valid JSON")


def test_missing_field_names_row_and_field(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    assert_one_line_error("reward_model.py", ["--dataset", f, "--out", str(tmp_path / "o")], "pairs.jsonl row 2", "'rejected'")


def test_skip_bad_rows_drops_and_counts(tmp_path, capsys):
    """Real data has a few bad rows (hh-rlhf: empty responses). The error names the row and the flag;
    --skip-bad-rows (dpo, kto_ipo, reward_model) drops exactly those rows and says how many."""
    import kto_ipo
    good = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(12)]
    f = write_jsonl(tmp_path / "pairs.jsonl", good[:5] + [{"prompt": "q", "chosen": "", "rejected": "b"}] + good[5:])
    err = assert_one_line_error("dpo.py", ["--dataset", f, "--eval-n", "2", "--out", str(tmp_path / "o")], "pairs.jsonl row 6", "--skip-bad-rows")
    assert "field 'chosen' is empty" in err
    assert C.load_pairs(f, skip_bad=True) == [{"prompt": r["prompt"], "chosen": "a", "rejected": "b"} for r in good]
    assert "dropped 1 of 13 rows" in capsys.readouterr().out
    u = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": "yes"},
                                             {"prompt": "q", "completion": "b", "label": False}])
    with pytest.raises(C.InputError, match="kto.jsonl row 2: field 'label' must be true/false"):
        kto_ipo.load_unpaired(u)
    assert [r["label"] for r in kto_ipo.load_unpaired(u, skip_bad=True)] == [True, False]
    assert len(kto_ipo.load_unpaired(f, skip_bad=True)) == 24  # paired rows -> a desirable and an undesirable row each


def test_empty_prompt_or_completion(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "  ", "rejected": "c"}])
    with pytest.raises(C.InputError, match="row 1: field 'chosen' is empty"):
        C.load_pairs(f)
    probs = write_jsonl(tmp_path / "q.jsonl", [{"question": "", "answer": "#### 3"}])
    with pytest.raises(C.InputError, match="q.jsonl row 1"):
        C.load_problems(probs)


def test_chosen_identical_to_rejected(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "same", "rejected": "same"}])
    assert_one_line_error("dpo.py", ["--dataset", f, "--out", str(tmp_path / "o")], "row 1", "chosen is identical to rejected")


def test_unknown_dataset_schema_and_missing_file(tmp_path):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello", "label": 1}])
    assert_one_line_error("grpo.py", ["--dataset", f, "--out", str(tmp_path / "o")], "odd.jsonl row 1")
    assert_one_line_error("grpo.py", ["--dataset", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")], "nope.jsonl", "no such file")

# ----------------------------------------------------------------------------- 6-7: models, flags


def test_unknown_model_offline_is_one_line(tmp_path):
    msg = assert_one_line_error("dpo.py", ["--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o")], "--model no-such-org/no-such-model")
    assert "Traceback" not in msg
    assert_one_line_error("star.py", ["--model", str(tmp_path / "missing_folder"), "--out", str(tmp_path / "o")], "missing_folder")


@pytest.mark.parametrize("script, argv, needle", [
    ("dpo.py", ["--lr", "-1"], "--lr"),
    ("grpo.py", ["--group-size", "1"], "--group-size must be >= 2"),
    ("kto_ipo.py", ["--beta", "0"], "--beta"),
    ("ppo_gridworld.py", ["--num-envs", "0"], "--num-envs"),
])
def test_bad_flag_values(tmp_path, script, argv, needle):
    assert_one_line_error(script, argv + ["--out", str(tmp_path / "o")], needle)

# ----------------------------------------------------------------------------- 8-10: generation edge cases


def test_prompt_longer_than_context_is_cut_from_the_left_with_a_warning(capsys):
    model, tok = C.load_model("tiny", device=torch.device("cpu"))
    ctx = model.config.max_position_embeddings
    long_prompt = "1+" * ctx + "Q: 2+3\nA: "
    out = C.generate(model, tok, [long_prompt, "Q: 1+1\nA: "], max_new_tokens=8, temperature=0)
    assert "truncated from the left" in capsys.readouterr().out
    assert out["prompt_ids"].shape[1] == ctx - 8   # prompt budget = context - completion budget
    assert tok.decode(out["prompt_ids"][0, -7:]) == "2+3\nA: "  # the end of the prompt (the question) is kept


def test_completions_that_never_emit_eos():
    """Documented recovery: a completion cut at --max-new-tokens has has_eos False and a full mask;
    grpo.py --mask-truncated then gives it zero loss, ppo_lm.py --missing-eos-penalty a penalty."""
    model, tok = C.load_model("tiny", device=torch.device("cpu"))
    out = C.generate(model, tok, ["Q: 123+456\nA: "] * 2, max_new_tokens=4, temperature=0)
    assert not out["has_eos"].any() and out["completion_mask"].sum().item() == 8
    out = C.generate(model, tok, ["Q: 123+456\nA: "], max_new_tokens=60, temperature=0)
    assert out["has_eos"].all() and out["completion_mask"].sum() < 60


def test_group_with_zero_reward_variance_teaches_nothing():
    import grpo
    adv = grpo.group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), 4)
    assert adv[:8].abs().max().item() == 0.0 and torch.isfinite(adv).all()

# ----------------------------------------------------------------------------- 11-13: faults


def test_nan_loss_stops_before_overwriting_the_checkpoint(tmp_path, monkeypatch):
    import dpo
    out = str(tmp_path / "run")
    dpo.main(DPO_SMALL + ["--steps", "2", "--save-every", "2", "--out", out])
    ckpt = os.path.join(out, "checkpoint")
    before = digest(ckpt)
    monkeypatch.setattr(dpo, "dpo_loss", lambda *a, **k: (torch.full((a[0].shape[0],), float("nan")),) * 3)
    with pytest.raises(C.InputError, match="non-finite loss at step 3"):
        dpo.main(DPO_SMALL + ["--steps", "4", "--save-every", "1", "--resume", "--out", out])
    assert digest(ckpt) == before  # the good checkpoint is untouched


def test_ctrl_c_saves_a_checkpoint_then_exits(tmp_path):
    out = str(tmp_path / "run")
    # SIG_DFL in the child: a test run started in the background (`cmd &`) ignores SIGINT, the child
    # would inherit that, Python would install no KeyboardInterrupt handler, and the run would go on
    p = subprocess.Popen([sys.executable, "dpo.py", *DPO_SMALL, "--steps", "100000", "--log-every", "1", "--out", out], cwd=ROOT,
                         env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        metrics, t0 = os.path.join(out, "metrics.jsonl"), time.time()
        while p.poll() is None and time.time() - t0 < 300:
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:  # the before-row and two steps
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        stdout, _ = p.communicate(timeout=120)
    finally:
        p.kill()  # never leave a 100000-step run behind
    assert p.returncode == 130, stdout[-2000:]
    assert "continue with --resume" in stdout
    st = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=True)
    assert st["step"] >= 2


def test_resume_refuses_a_pickled_state_file(tmp_path):
    """No pickle loads of files a user did not make: state.pt is read with weights_only=True."""
    model, tok = C.load_model("tiny", device=torch.device("cpu"))
    folder = str(tmp_path / "checkpoint")
    C.save_checkpoint(folder, model, tok, step=1)
    torch.save({"step": 1, "evil": C.Logger}, os.path.join(folder, "state.pt"))  # a class: needs unpickling code
    with pytest.raises(C.InputError, match="state.pt is not a checkpoint this code wrote"):
        C.load_checkpoint(folder, model)


def test_remote_code_runs_only_with_the_flag(tmp_path):
    """A folder whose config points at its own modeling code: without trust_remote_code that code
    never runs (transformers loads its built-in class); with the flag it does."""
    model, tok = C.load_model("tiny", device=torch.device("cpu"))
    folder = str(tmp_path / "custom")
    model.save_pretrained(folder); tok.save_pretrained(folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    marker = tmp_path / "code_ran"
    (tmp_path / "custom" / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('evil')\n")
    C.load_model(folder, device=torch.device("cpu"))
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="evil"):
        C.load_model(folder, device=torch.device("cpu"), trust_remote_code=True)
    assert marker.exists()  # the flag is the one gate
