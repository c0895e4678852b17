"""The bad-input catalogue: each case gets a clear one-line error that names the file, row or flag
(exit status 2, no traceback), or a documented, logged recovery; nothing already written is lost.
The first 17 cases, then the second catalogue (issue 22): seven classes, each over every script that
has the reader or the flag. Resume after SIGKILL is tested in test_grpo.py, test_dpo.py, test_star.py
and test_prm.py (exact metrics after the restart); after Ctrl-C, here."""
import contextlib, hashlib, io, json, os, re, signal, subprocess, sys, time

import pytest
import torch

import common as C
from conftest import ROOT

DPO_SMALL = ["--train-n", "64", "--batch-size", "8", "--eval-n", "8", "--warmup-steps", "0", "--device", "cpu", "--builtin", "corrupt"]


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
    good = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(12)]
    f = write_jsonl(tmp_path / "pairs.jsonl", good[:5] + [{"prompt": "q", "chosen": "", "rejected": "b"}] + good[5:])
    err = assert_one_line_error("dpo.py", ["--dataset", f, "--eval-n", "2", "--out", str(tmp_path / "o")], "pairs.jsonl row 6", "--skip-bad-rows")
    assert "field 'chosen' is empty" in err
    assert C.load_pairs(f, skip_bad=True) == [{"prompt": r["prompt"], "chosen": "a", "rejected": "b"} for r in good]
    assert "dropped 1 of 13 rows" in capsys.readouterr().out
    u = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": "yes"},
                                             {"prompt": "q", "completion": "b", "label": False}])
    with pytest.raises(C.InputError, match="kto.jsonl row 2: field 'label' must be true/false"):
        C.load_unpaired(u)
    assert [r["label"] for r in C.load_unpaired(u, skip_bad=True)] == [True, False]
    assert len(C.load_unpaired(f, skip_bad=True)) == 24  # paired rows -> a desirable and an undesirable row each


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
    with pytest.raises(C.InputError, match="non-finite loss at step 2"):
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

# ============================================================================= the second catalogue
# Issue 22: every reader, every output path, every device. One class per block; each test runs every
# script that has the reader or the flag, in process: main(argv) raises the InputError that
# friendly_errors prints as `error: ...` and exit status 2 (a few cases check that line as a user sees it).

SCRIPTS = ["dpo", "grpo", "kto_ipo", "online_dpo", "ppo_gridworld", "ppo_lm", "prm", "reasoning_capstone", "reward_model", "star"]
CPU = ["--device", "cpu"]
GSM = [{"question": f"Tom has {i} apples and buys one (é). How many?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
       for i in range(12)]
PAIRS = [{"prompt": f"Q: {i}+1 (é)\nA: ", "chosen": f"#### {i + 1}", "rejected": f"#### {i}"} for i in range(12)]
SHEPHERD = [{"input": f"What is {i}+1 (é)? Step 1: {i}+1={i + 1} ки\nStep 2: The answer is {i + 1} ки",
             "label": f"What is {i}+1 (é)? Step 1: {i}+1={i + 1} +\nStep 2: The answer is {i + 1} +"} for i in range(12)]
# per script: its data, the flags that let 12 rows through, and the format it reads here (all six are covered)
DATA = {"dpo": (PAIRS, ["--eval-n", "2"], ".jsonl.gz"), "grpo": (GSM, ["--eval-n", "2"], ".jsonl.gz"),
        "kto_ipo": (PAIRS, ["--eval-n", "2"], ".json"), "online_dpo": (GSM, ["--eval-n", "2"], ".parquet"),
        "ppo_lm": (GSM, ["--eval-n", "2"], ".json.gz"), "prm": (SHEPHERD, [], ".parquet.gz"),
        "reasoning_capstone": (GSM, ["--eval-n", "2", "--sft-steps", "0"], ".jsonl"),
        "reward_model": (PAIRS, ["--eval-n", "2"], ".parquet"), "star": (GSM, ["--train-n", "10", "--eval-n", "2"], ".json")}
PROBLEMS = {"grpo": [], "star": [], "online_dpo": [], "reasoning_capstone": ["--sft-steps", "0"], "ppo_lm": [],
            "kto_ipo": ["--make-dataset"]}  # scripts that read GSM8K / Countdown / MATH rows through load_problems


def script(name):
    import importlib
    return importlib.import_module(name)


def write_rows(path, rows):
    """rows -> path in the format its name says: .jsonl, .json (an array), .parquet, each maybe .gz."""
    import gzip, io
    import pandas as pd
    base = str(path).removesuffix(".gz")
    if base.endswith(".parquet"):
        buf = io.BytesIO(); pd.DataFrame(rows).to_parquet(buf); data = buf.getvalue()
    else:
        data = (json.dumps(rows) if base.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)
    return str(path)


class Reached(Exception):
    """Raised by a spy where a test has seen what it needs: the rest of the run is not needed."""


def spy(monkeypatch, mod, name):
    """Replace common.<name> (and the script's imported copy) by a spy that calls the real function,
    records its arguments and result, then stops the run (Reached)."""
    real, seen = getattr(C, name), {}

    def fake(*a, **kw):
        seen.update(args=a, kw=kw, result=real(*a, **kw))
        raise Reached(name)
    monkeypatch.setattr(C, name, fake)
    if hasattr(mod, name):
        monkeypatch.setattr(mod, name, fake)
    return seen

# ----------------------------------------------------------------------------- class 1: one reader, every format


@pytest.mark.parametrize("fmt", [".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".parquet.gz"])
def test_one_reader_reads_every_format_for_every_loader(tmp_path, fmt):
    f = lambda rows, name: write_rows(tmp_path / (name + fmt), rows)
    assert C.read_rows(f(GSM, "q")) == GSM
    assert [p["answer"] for p in C.load_problems(f(GSM, "q"))] == [str(i + 1) for i in range(12)]
    assert C.load_pairs(f(PAIRS, "p")) == PAIRS
    assert len(C.load_unpaired(f(PAIRS, "p"))) == 24
    assert [it["labels"] for it in C.load_step_data(f(SHEPHERD, "s"))] == [[True, True]] * 12
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in GSM))  # the hub writes .json as JSON lines
    assert C.read_rows(str(tmp_path / "lines.json")) == GSM


@pytest.mark.parametrize("name", sorted(DATA))
def test_every_script_reads_its_dataset_through_the_one_reader(tmp_path, monkeypatch, capsys, name):
    """Each script on a small file in one of the six formats (a .jsonl.gz for grpo: the issue's crash)
    gets its rows, and the built-in tokenizer's unknown characters (é) are counted with a warning."""
    rows, flags, fmt = DATA[name]
    f = write_rows(tmp_path / ("data" + fmt), rows)
    seen = spy(monkeypatch, script(name), "warn_unknown_chars")
    with pytest.raises(Reached):
        script(name).main(["--dataset", f, "--out", str(tmp_path / "o")] + flags + CPU)
    _, got, spec = seen["args"][:3]
    assert spec == f and len(got) >= 12 and seen["result"] >= 12  # one é per row, in every row
    assert f"[common] warning: --dataset {f}: {seen['result']} character(s) (1 distinct, most often 'é') are outside " \
           "the built-in tokenizer's alphabet and become <unk>" in capsys.readouterr().out


def _bad_files(tmp_path):
    """Unreadable inputs and the exact error each must give: (file, message after `--dataset <file>`)."""
    import gzip, random
    gz = gzip.compress("".join(json.dumps(r) + "\n" for r in GSM * 40).encode(), mtime=0)
    files = {"random.jsonl": (random.Random(0).randbytes(4096), ":1: not UTF-8 text (byte 0xcd)"),
             "binary.jsonl": (b'{"a": 1}\n\x00\x01\x02\n', ":2: binary data, not text (a NUL byte at column 1)"),
             "latin1.jsonl": ('{"question": "caf\xe9"}\n'.encode("latin-1"), ":1: not UTF-8 text (byte 0xe9)"),
             "truncated.jsonl.gz": (gz[:len(gz) // 2], ":{row}: truncated gzip data (Compressed file ended before the "
                                    "end-of-stream marker was reached)"),
             "corrupt.jsonl.gz": (gz[:-8] + bytes(8), ":481: corrupt gzip data (CRC check failed 0x0 != "),
             "plain.jsonl.gz": (b'{"a": 1}\n', ":1: not gzip data (Not a gzipped file (b'{\"'))"),
             "gzipped.jsonl": (gz, ":1: gzip data in a file not named .gz"),
             "array_row.jsonl": (b'{"a": 1}\n[1, 2]\n', ":2: a row must be a JSON object {...}, got an array"),
             "string_row.jsonl": (b'"hello"\n', ":1: a row must be a JSON object {...}, got a string"),
             "items.json": (b'[{"a": 1},\n 3]', ": item 2 of the array must be a JSON object {...}, got a number"),
             "broken.json": (b'[{"a": 1},\n {"a": }]', ":2: not valid JSON (Expecting value)"),
             "random.parquet": (random.Random(0).randbytes(512), ": not a readable parquet file (ArrowInvalid: Parquet magic bytes "
                                "not found in footer. Either the file is corrupted or this is not a parquet file.)"),
             "empty.jsonl": (b"", ": no rows (an empty file)")}
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return {str(tmp_path / name): msg for name, (_, msg) in files.items()}


def test_unreadable_input_names_file_and_row(tmp_path):
    for f, msg in _bad_files(tmp_path).items():
        with pytest.raises(C.InputError) as e:
            C.read_rows(f)
        # the row where a cut-off gzip stream ends depends on the compressor: any row after the 1st of 480
        row = re.match(r".*truncated.jsonl.gz:(\d+):", str(e.value))
        assert row is None or 1 < int(row.group(1)) < 481
        assert str(e.value).startswith(f"--dataset {f}" + msg.replace("{row}", row.group(1) if row else "")), (str(e.value), msg)


@pytest.mark.parametrize("name", sorted(DATA))
def test_every_script_stops_on_random_bytes_with_file_and_row(tmp_path, name):
    import random
    f = tmp_path / "random.jsonl"
    f.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(C.InputError, match=re.escape(f"--dataset {f}:1: not UTF-8 text (byte 0xcd)")):
        script(name).main(["--dataset", str(f), "--out", str(tmp_path / "o")] + DATA[name][1] + CPU)


@pytest.mark.parametrize("argv, needle", [
    (["grpo.py", "--dataset", "{tmp}/corrupt.jsonl.gz"], "corrupt.jsonl.gz:481: corrupt gzip data (CRC check failed"),
    (["grpo.py", "--dataset", "{tmp}/random.jsonl"], "random.jsonl:1: not UTF-8 text"),
    (["dpo.py", "--out", "{tmp}/random.jsonl"], "random.jsonl: is a file, not a folder"),
    (["ppo_lm.py", "--reward-model", "{tmp}/no_such_rm"], "--reward-model {tmp}/no_such_rm: no such local folder"),
])
def test_as_a_user_sees_them_one_line_exit_2(tmp_path, argv, needle):
    _bad_files(tmp_path)
    fill = lambda s: s.replace("{tmp}", str(tmp_path))
    assert_one_line_error(argv[0], [fill(a) for a in argv[1:]] + ["--out", str(tmp_path / "o")] * (argv[1] != "--out") + CPU,
                          fill(needle))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_device_cuda_on_a_cpu_only_torch_is_one_line():
    assert_one_line_error("grpo.py", ["--device", "cuda"], "--device cuda: no such device here", "available: cpu")

# ----------------------------------------------------------------------------- class 2: output paths


@pytest.fixture
def unwritable(tmp_path, monkeypatch):
    """A folder that refuses new files. chmod does that for a normal user; root writes anywhere, so as
    root the probe write there is refused the way a read-only disk refuses it."""
    import tempfile
    d = tmp_path / "readonly"
    d.mkdir(); d.chmod(0o500)
    if os.geteuid() == 0:
        real = tempfile.TemporaryFile

        def refuse(*a, **kw):
            if os.path.abspath(kw.get("dir") or "").startswith(str(d)):
                raise PermissionError(13, "Permission denied")
            return real(*a, **kw)
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    yield d
    d.chmod(0o700)


@pytest.mark.parametrize("name", SCRIPTS)
def test_out_that_is_a_file_or_not_writable_stops_before_any_compute(tmp_path, monkeypatch, unwritable, name):
    mod = script(name)
    for m in (C, mod):  # any model load would come after the check
        monkeypatch.setattr(m, "load_model", lambda *a, **kw: pytest.fail("a model was loaded before --out was checked"), raising=False)
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    cases = [(str(f), f"--out {f}: is a file, not a folder"),
             (str(f / "run"), f"--out {f / 'run'}: {f} is a file, so no folder can be made under it"),
             (str(unwritable / "run"), f"--out {unwritable / 'run'}: cannot write in {unwritable} (Permission denied)")]
    for out, msg in cases:
        with pytest.raises(C.InputError) as e:
            mod.main(["--out", out] + CPU)
        assert str(e.value) == msg
    assert f.read_text() == "keep me" and os.listdir(unwritable) == []

# ----------------------------------------------------------------------------- class 3: devices


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_device_that_is_not_here_names_what_is(tmp_path, name):
    with pytest.raises(C.InputError, match=r"^--device cuda:99: no such device here.*; available: cpu"):
        script(name).main(["--device", "cuda:99", "--out", str(tmp_path / "o")])


def test_get_device_names_the_flag_and_the_available_devices():
    here = ", ".join(C.available_devices())
    assert C.get_device("cpu") == torch.device("cpu") and C.get_device(None).type in ("cpu", "cuda", "mps")
    with pytest.raises(C.InputError, match=re.escape(f"--device gpu: not a device name; available: {here}")):
        C.get_device("gpu")
    if "mps" not in here:
        with pytest.raises(C.InputError, match=re.escape(f"--device mps: no such device here; available: {here}")):
            C.get_device("mps")
    if not torch.cuda.is_available():
        built = "" if torch.backends.cuda.is_built() else " (this torch was built without CUDA)"
        with pytest.raises(C.InputError, match=re.escape(f"--device cuda:1: no such device here{built}; available: {here}")):
            C.get_device("cuda:1")

# ----------------------------------------------------------------------------- class 4: data the verifier cannot check

UNCHECKABLE = GSM[:10] + [{"question": "Who won?", "answer": "#### Evelyn"}, {"question": "Which one?", "answer": "the red one"}]


@pytest.mark.parametrize("name", sorted(PROBLEMS) + ["prm"])
def test_answers_without_a_number_stop_with_their_count(tmp_path, name):
    f = write_rows(tmp_path / "q.jsonl", UNCHECKABLE)
    flag, argv = ("--problems", ["--dataset", write_rows(tmp_path / "s.jsonl", SHEPHERD), "--problems", f]) if name == "prm" \
        else ("--dataset", ["--dataset", f] + PROBLEMS[name])
    with pytest.raises(C.InputError) as e:
        script(name).main(argv + ["--eval-n", "2"] * (name not in ("star", "prm")) + ["--out", str(tmp_path / "o")] + CPU)
    assert str(e.value) == f"{flag} {f} row 11: answer '#### Evelyn' holds no number, so the verifier cannot check it " \
                           "(2 of 12 rows unusable; --skip-bad-rows drops them)"


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_skip_bad_rows_accepts_them_in_every_problem_script(tmp_path, monkeypatch, capsys, name):
    f = write_rows(tmp_path / "q.jsonl", UNCHECKABLE)
    seen = spy(monkeypatch, script(name), "load_problems")
    with pytest.raises(Reached):
        script(name).main(["--dataset", f, "--skip-bad-rows", "--out", str(tmp_path / "o")] + PROBLEMS[name] + CPU
                          + ["--eval-n", "2"] * (name != "star"))
    assert len(seen["result"]) == 10
    assert f"--skip-bad-rows: dropped 2 of 12 rows of {f}: 11 (answer '#### Evelyn' holds no number" in capsys.readouterr().out


def test_countdown_rows_without_a_target(tmp_path):
    f = write_rows(tmp_path / "cd.jsonl", [{"nums": [3, 4], "target": 7}, {"nums": [3, 4], "target": ""}, {"nums": [], "target": 2},
                                           {"nums": ["x"], "target": 2}])
    with pytest.raises(C.InputError) as e:
        C.load_problems(f)
    assert str(e.value) == f"--dataset {f} row 2: field 'target' must be an integer, got '' (3 of 4 rows unusable; --skip-bad-rows drops them)"
    assert [p["target"] for p in C.load_problems(f, skip_bad=True)] == [7]


def test_unknown_characters_are_counted_once(capsys):
    tok = C.char_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "café\tcrème"}], "answer": "é"}, {"question": "plain ascii"}]
    assert C.warn_unknown_chars(tok, rows, "x.jsonl") == 4
    assert capsys.readouterr().out == ("[common] warning: --dataset x.jsonl: 4 character(s) (3 distinct, most often 'é', '\\t', 'è') "
                                       "are outside the built-in tokenizer's alphabet and become <unk>\n")
    assert C.warn_unknown_chars(tok, rows[1:], "x.jsonl") == 0 and capsys.readouterr().out == ""

    class Bpe:  # any other tokenizer: nothing to say
        def get_vocab(self):
            return {"a": 0}
    assert C.warn_unknown_chars(Bpe(), rows, "x.jsonl") == 0 and capsys.readouterr().out == ""

# ----------------------------------------------------------------------------- class 5: the flag the user typed


@pytest.mark.parametrize("name, argv, flag", [
    ("ppo_lm", ["--reward-model", "{missing}"], "--reward-model"),
    ("online_dpo", ["--judge", "{missing}"], "--judge"),
    ("kto_ipo", ["--make-dataset", "--judge", "{missing}"], "--judge"),
    ("dpo", ["--eval-winrate", "--judge", "{missing}"], "--judge"),
    ("dpo", ["--eval-winrate", "--judge-lm", "{missing}"], "--judge-lm"),
    ("prm", ["--rm-model", "{missing}"], "--rm-model"),
    ("star", ["--model", "{missing}"], "--model"),
    ("grpo", ["--dataset", "{gsm}", "--eval-dataset", "{missing}.jsonl"], "--eval-dataset"),
    ("star", ["--dataset", "{gsm}", "--eval-dataset", "{missing}.jsonl"], "--eval-dataset"),
    ("prm", ["--dataset", "{shepherd}", "--problems", "{missing}.jsonl"], "--problems"),
    ("dpo", ["--eval-winrate", "--eval-prompts", "{missing}.jsonl"], "--eval-prompts"),
])
def test_every_error_names_the_flag_the_user_typed(tmp_path, name, argv, flag):
    missing = str(tmp_path / "no_such")
    paths = dict(missing=missing, gsm=write_rows(tmp_path / "q.jsonl", GSM), shepherd=write_rows(tmp_path / "s.jsonl", SHEPHERD))
    argv = [a.format(**paths) for a in argv]
    small = ["--builtin", "corrupt", "--train-n", "64", "--batch-size", "8", "--eval-n", "8"] if name == "dpo" else []
    with pytest.raises(C.InputError) as e:  # (dpo reads --eval-prompts once its pairs are made: hand-made ones are quick)
        script(name).main(argv + small + ["--out", str(tmp_path / "o")] + CPU)
    what = "no such file" if argv[-1].endswith(".jsonl") else "no such local folder"
    assert str(e.value) == f"{flag} {argv[-1]}: {what}"

# ----------------------------------------------------------------------------- class 6: resume is exact, or there is none
# SIGKILL then --resume (periodic checkpoints): test_grpo.py, test_dpo.py, test_star.py, test_prm.py.


def test_every_script_that_writes_a_checkpoint_has_resume():
    for name in SCRIPTS:
        src = open(os.path.join(ROOT, f"{name}.py")).read()
        writes = "save_checkpoint(" in src or "ctrl_c_checkpoint(" in src  # the latter saves on Ctrl-C
        usage = io.StringIO()  # the flags as parse_args builds them (some come from common.py's shared sets)
        with contextlib.redirect_stdout(usage), pytest.raises(SystemExit):
            script(name).parse_args(["--help"])
        assert writes == ("--resume" in usage.getvalue()), name


RESUMABLE = {
    "dpo": DPO_SMALL + ["--steps", "4"],
    "grpo": ["--steps", "4", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "40", "--eval-n", "4",
             "--eval-every", "0", "--eval-samples", "0", "--temperature", "1.0"] + CPU,
    "kto_ipo": ["--steps", "4", "--batch-size", "4", "--train-n", "32", "--eval-n", "8", "--builtin", "corrupt"] + CPU,
    "ppo_lm": ["--steps", "3", "--batch-size", "8", "--mini-batch", "4", "--eval-n", "4", "--eval-samples", "1",
               "--max-new-tokens", "40"] + CPU,
    "prm": ["--train-n", "8", "--samples-per-problem", "1", "--steps", "6", "--batch-size", "8", "--eval-n", "4", "--max-n", "4",
            "--subsets", "2", "--log-every", "1"] + CPU,
    "reward_model": ["--steps", "6", "--train-n", "64", "--eval-n", "16", "--batch-size", "8", "--log-every", "1"] + CPU,
    "star": ["--train-n", "16", "--eval-n", "8", "--iterations", "2", "--steps", "4", "--batch-size", "4", "--log-every", "1",
             "--max-new-tokens", "40"] + CPU,
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_ctrl_c_then_resume_equals_a_run_never_stopped(tmp_path, monkeypatch, name):
    """Ctrl-C at the first loss check (nan_guard) of a middle step: the checkpoint written on the way out
    and --resume redo that step with the same batch and random numbers, so the metrics rows and the
    summary are those of the uninterrupted run (times aside)."""
    import re as _re
    mod, real, calls = script(name), C.nan_guard, []

    def guard(loss, step):
        calls.append(step)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(loss, step)
    for m in (C, mod):
        monkeypatch.setattr(m, "nan_guard", guard, raising=False)
    stop_at, keep = 0, lambda d: {k: v for k, v in d.items() if not _re.search(r"time|_s$|sec", k) and str(tmp_path) not in str(v)}
    a = mod.main(RESUMABLE[name] + ["--out", str(tmp_path / "a")])
    steps = sorted(set(calls))
    stop_at, calls[:] = calls.index(steps[len(steps) // 2]) + 1, []
    with pytest.raises(SystemExit) as e:
        mod.main(RESUMABLE[name] + ["--out", str(tmp_path / "b")])
    assert e.value.code == 130 and os.path.isfile(tmp_path / "b" / "checkpoint" / "state.pt")
    stop_at = 0
    b = mod.main(RESUMABLE[name] + ["--out", str(tmp_path / "b"), "--resume"])
    rows = [keep(r) for r in C.read_metrics(str(tmp_path / "a"))]
    assert [keep(r) for r in C.read_metrics(str(tmp_path / "b"))] == rows and len(rows) >= 3
    assert keep(b) == keep(a)

# ----------------------------------------------------------------------------- class 7: a checkpoint write that fails midway


def _fail_after_writing(monkeypatch, target, attr):
    """Make target.attr (torch.save(obj, file) or model.save_pretrained(folder)) write part of its
    output and then fail as a full disk does."""
    def partial(*a, **kw):
        path = next(x for x in a if isinstance(x, str))
        if attr == "save_pretrained":
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "model.safetensors")
        open(path, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(target, attr, partial)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model, tok = C.load_model("tiny", device=torch.device("cpu"))
    folder = str(tmp_path / "checkpoint")
    C.save_checkpoint(folder, model, tok, step=1, extra={"mark": "first"})
    before = digest(folder)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # what the failed save would have written
    for target, attr in ((torch, "save"), (type(model), "save_pretrained")):
        with monkeypatch.context() as m:
            _fail_after_writing(m, target, attr)
            with pytest.raises(C.InputError) as e:
                C.save_checkpoint(folder, model, tok, step=2)
        assert str(e.value) == (f"saving the checkpoint to {folder} failed (OSError: [Errno 28] No space left on device); "
                                "the previous checkpoint there is kept and loadable (--resume continues from it)")
        assert digest(folder) == before and os.listdir(tmp_path) == ["checkpoint"]  # the partial temp folder is gone
    assert C.load_checkpoint(folder, model) == (1, {"mark": "first"})
    with monkeypatch.context() as m:  # the model save at the end of a run: the same guarantee
        _fail_after_writing(m, type(model), "save_pretrained")
        with pytest.raises(C.InputError, match="saving the model to .*/model failed .*; there was no model there yet"):
            C.save_pretrained_atomic(str(tmp_path / "model"), model, tok)
    assert os.listdir(tmp_path) == ["checkpoint"]


def test_failed_rename_or_a_kill_between_the_renames_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    model, tok = C.load_model("tiny", device=torch.device("cpu"))
    folder = str(tmp_path / "checkpoint")
    C.save_checkpoint(folder, model, tok, step=1)
    real, n = os.rename, []

    def second_fails(src, dst):  # the first rename moves the old checkpoint aside, the second fails
        n.append(1)
        if len(n) == 2:
            raise OSError(5, "Input/output error")
        return real(src, dst)
    with monkeypatch.context() as m:
        m.setattr(os, "rename", second_fails)
        with pytest.raises(C.InputError, match=r"failed \(OSError: \[Errno 5\] Input/output error\); the previous checkpoint"):
            C.save_checkpoint(folder, model, tok, step=2)
    assert C.load_checkpoint(folder, model)[0] == 1 and sorted(os.listdir(tmp_path)) == ["checkpoint"]
    os.rename(folder, folder + ".old-12345")  # SIGKILL between the renames: only the moved-aside copy is left
    assert C.load_checkpoint(folder, model)[0] == 1
    assert capsys.readouterr().out.count(f"{folder} is missing (a save was cut off): resuming from the previous checkpoint, "
                                         f"{folder}.old-12345") == 1
    C.save_checkpoint(folder, model, tok, step=2)  # the run goes on and its next save lands in place
    assert C.load_checkpoint(folder, model)[0] == 2


def test_a_run_whose_checkpoint_write_fails_stops_and_resumes_from_the_last_good_one(tmp_path, monkeypatch):
    import dpo
    out, real, n = str(tmp_path / "run"), torch.save, []

    def second_fails(obj, path, *a, **kw):
        n.append(1)
        if len(n) == 2:
            open(path, "wb").write(b"half")
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **kw)
    monkeypatch.setattr(torch, "save", second_fails)
    with pytest.raises(C.InputError, match=re.escape(f"saving the checkpoint to {out}/checkpoint failed (OSError: [Errno 28] No space")):
        dpo.main(DPO_SMALL + ["--steps", "4", "--save-every", "1", "--out", out])
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=True)["step"] == 1
    s = dpo.main(DPO_SMALL + ["--steps", "4", "--save-every", "1", "--resume", "--out", out])
    assert s["steps"] == 4 and [r["step"] for r in C.read_metrics(out) if "loss" in r] == [0, 1, 2, 3]
