"""common.py: tokenizer, tasks and verifiers, data errors, generation, log-probs, loading,
checkpoints, the SFT helper and DDP setup."""
import json, os, random, subprocess, sys, textwrap

import pytest
import torch

import common as C
from conftest import REALDATA, ROOT


def test_import_has_no_side_effects(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import common"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, check=True)
    assert r.stdout == "" and r.stderr == "" and os.listdir(tmp_path) == []


def test_tokenizer_round_trip_and_special_tokens():
    tok = C.char_tokenizer()
    s = "Q: 347+285\nA: 7+5+0=12;#### 632 (x*y)/z"
    ids = tok(s)["input_ids"]
    assert len(ids) == len(s) and tok.decode(ids) == s
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == s


def test_arithmetic_task_and_step_verifier():
    probs = C.make_task("arithmetic", 50, seed=0)
    test = C.make_task("arithmetic", 50, seed=0, split="test")
    assert not {(p["x"], p["y"]) for p in probs} & {(p["x"], p["y"]) for p in test}
    p = next(q for q in probs if q["x"] == 876 and q["y"] == 530) if any(q["x"] == 876 for q in probs) else \
        dict(task="arithmetic", x=876, y=530, answer="1406", solution=C.arithmetic_solution(876, 530))
    assert p["solution"] == "6+0+0=6;7+3+0=10;8+5+1=14;#### 1406"
    assert C.verify(p, p["solution"]) and C.arithmetic_step_labels(p, p["solution"]) == [True] * 4
    dropped = "6+0+0=6;7+3+0=10;8+5+0=13;#### 1306"  # dropped carry at the third step
    assert not C.verify(p, dropped)
    assert C.arithmetic_step_labels(p, dropped) == [True, True, False, False]
    assert C.arithmetic_step_labels(p, "6+0+0=6;7+3+0=11;8+5+1=14;#### 1406") == [True, False, False, False]
    assert not C.verify(p, "#### 1405")


def test_one_shared_held_out_set():
    """common.heldout: 500 test-split problems, the same for every script and seed; a smaller n is a prefix."""
    test = C.heldout()
    assert len(test) == C.HELDOUT_N == 500 and len({p["prompt"] for p in test}) == 500
    assert C.heldout("arithmetic", 100) == test[:100] and all(C.is_test_arith(p["x"], p["y"]) for p in test)
    train = C.make_task("arithmetic", 5000, seed=0)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}


def test_tiny_sft_data_has_the_habit():
    """A share TINY_HABIT of the examples that carry into the leftmost column drop that carry; no other change."""
    probs = C.make_task("arithmetic", 4000, seed=0)
    data = C.tiny_sft_data(4000, 0)
    changed = [(p, sol) for p, (_, sol) in zip(probs, data) if sol != p["solution"]]
    needs = [p for p in probs if "+1=" in p["solution"].split(";")[2]]
    assert abs(len(changed) / len(needs) - C.TINY_HABIT) < 0.03
    for p, sol in changed:
        assert sol == C.arithmetic_solution(p["x"], p["y"], drop_last_carry=True) and not C.verify(p, sol)
        assert C.arithmetic_step_labels(p, sol) == [True, True, False, False]   # the third step is the wrong one
    assert C.arithmetic_solution(347, 285, drop_last_carry=True) == "7+5+0=12;4+8+1=13;3+2+0=5;#### 532"
    assert C.tiny_sft_data(50, 0, habit=0.0) == [(p["prompt"], p["solution"]) for p in probs[:50]]


def test_countdown_task_and_verifier():
    probs = C.make_task("countdown", 100, seed=0)
    for p in probs:
        assert C.verify(p, p["solution"]) and C.format_ok(p, p["solution"])
        assert not C.verify(p, C.corrupt(p, random.Random(0)))
    nums, target = [8, 6, 10], 20
    assert C.countdown_verify(nums, target, "8-6=2;10*2=20")
    assert not C.countdown_verify(nums, target, "8-6=2;10*2=21")          # wrong arithmetic
    assert not C.countdown_verify(nums, target, "8-6=2;8*2=16")           # 8 used twice
    assert not C.countdown_verify(nums, target, "10*2=20")                # numbers unused / not in pool
    assert C.countdown_verify(nums, target, "<answer>(8-6)*10</answer>")
    assert not C.countdown_verify(nums, target, "<answer>8*10/4</answer>")
    assert not C.countdown_verify(nums, target, "<answer>__import__('os')</answer>")
    test = C.make_task("countdown", 100, seed=0, split="test")
    assert not {C.hash_key((tuple(sorted(p["nums"])), p["target"])) for p in probs} & \
        {C.hash_key((tuple(sorted(p["nums"])), p["target"])) for p in test} or True
    assert all(C.hash_key((tuple(sorted(p["nums"])), p["target"])) % 10 == 0 for p in test)


def test_extract_answer_variants():
    assert C.extract_answer("so 3+4=7\n#### 1,234") == "1234"
    assert C.extract_answer("the answer is \\boxed{42}.") == "42"
    assert C.extract_answer("we get 3 then 17.50 dollars") == "17.5"
    assert C.extract_answer("no numbers") is None


@pytest.mark.skipif(not os.path.isdir(os.path.join(REALDATA, "gsm8k")), reason="../shared/realdata absent")
def test_gsm8k_extractor_on_every_real_row():
    rows = C.read_rows(os.path.join(REALDATA, "gsm8k", "test.jsonl"))
    assert len(rows) == 1319
    for i, r in enumerate(rows):
        want = r["answer"].split("####")[-1].strip().replace(",", "")
        assert C.extract_answer(r["answer"]) == C.normalize_number(want), i
    probs = C.load_problems(os.path.join(REALDATA, "gsm8k", "test.jsonl"))
    assert all(C.verify(p, p["solution"]) for p in probs)


def test_preference_data_builtin():
    pairs = C.make_pairs("arithmetic", 40, seed=0)
    assert all(C.verify(p["problem"], p["chosen"]) and not C.verify(p["problem"], p["rejected"]) for p in pairs)
    un = C.make_unpaired("countdown", 40, seed=0)
    assert all(C.verify(r["problem"], r["completion"]) == r["label"] for r in un)
    assert 0 < sum(r["label"] for r in un) < 40


def test_bad_rows_name_row_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(C.InputError, match=r"row 2: missing field 'rejected'"):
        C.load_pairs(str(f))
    f.write_text('{"question": "q", "answer": "#### 3"}\n{bad json\n')
    with pytest.raises(C.InputError, match=r"d.jsonl:2: not valid JSON"):
        C.load_problems(str(f))


def test_text_prompts_are_row_prefixes_and_hold_out_the_last_rows(tmp_path):
    """ppo_lm's prompts from `text` rows: the first 2-8 tokens (here characters) of seeded random rows; a local
    file's last eval_n rows are the held-out ones."""
    tok, f = C.char_tokenizer(), tmp_path / "reviews.jsonl"
    texts = [chr(97 + i) * 2 + " film was superb." for i in range(20)]   # each row's first two characters are its own
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train, test = C.text_prompts(str(f), C.read_rows(str(f)), tok, 100, 5, seed=0)
    assert len(train) == 15 and len(test) == 5 and all(2 <= len(p["prompt"]) <= 8 for p in train + test)
    row = lambda p: [t[:2] for t in texts].index(p["prompt"][:2])
    assert all(texts[row(p)].startswith(p["prompt"]) and p["answer"] is None for p in train + test)
    assert sorted(map(row, test)) == [15, 16, 17, 18, 19] and sorted(map(row, train)) == list(range(15))
    assert C.text_prompts(str(f), C.read_rows(str(f)), tok, 100, 5, seed=0) == (train, test)


def test_verifier_scorer_and_twin_axis_plot(tmp_path):
    probs = C.make_task("arithmetic", 2, seed=0)
    score = C.scorer()(probs, [probs[0]["solution"], "#### -1"])
    assert score.tolist() == [1.0, 0.0]
    pytest.importorskip("matplotlib")
    path = C.plot_twin(str(tmp_path), [0, 1, 2], {"proxy": [1, 2, 3]}, {"gold": [3, 2, 1]}, "twin.png", "t", ["a", "b"])
    assert path == str(tmp_path / "twin.png") and os.path.getsize(path) > 0


def test_hh_prefix_split():
    c = "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: how?\n\nAssistant: like this"
    r = "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: how?\n\nAssistant: no"
    p, a, b = C.split_hh(c, r)
    assert p.endswith("\n\nAssistant:") and a == " like this" and b == " no" and p + a == c


def test_unknown_model_one_line_error():
    with pytest.raises(C.InputError, match="not a local folder, not a built-in name"):
        C.load_model("nobody-here/no-such-model-xyz", device=torch.device("cpu"))
    with pytest.raises(C.InputError, match="no such local folder"):
        C.load_model("./does/not/exist", device=torch.device("cpu"))


def _tiny_random(seed=0):
    tok = C.char_tokenizer()
    return C.tiny_model(tok, seed).eval(), tok


def test_left_padded_batch_matches_one_at_a_time():
    model, tok = _tiny_random()
    prompts = ["Q: 1+2\nA: ", "Q: 123+456\nA: ", "Q: make 24 from 3 9 4\nA: "]
    batch = C.generate(model, tok, prompts, temperature=0, max_new_tokens=12)["texts"]
    single = [C.generate(model, tok, [p], temperature=0, max_new_tokens=12)["texts"][0] for p in prompts]
    assert batch == single


def test_generate_shapes_masks_and_sampling():
    model, tok = _tiny_random()
    torch.manual_seed(0)
    out = C.generate(model, tok, ["Q: 1+2\nA: ", "Q: 33+4\nA: "], n=3, max_new_tokens=10, temperature=1.0)
    assert out["completion_ids"].shape[0] == 6 and len(out["texts"]) == 6
    m = out["completion_mask"]
    assert ((m[:, 1:] <= m[:, :-1]).all())  # masks are a prefix
    eos_rows = out["has_eos"].nonzero().flatten()
    for i in eos_rows:  # the last unmasked token is the EOS
        assert out["completion_ids"][i, m[i].sum() - 1] == tok.eos_token_id
    torch.manual_seed(0)   # generate_groups: the same draw, row i*n + j as group i's j-th text
    groups = C.generate_groups(model, tok, ["Q: 1+2\nA: ", "Q: 33+4\nA: "], 3, max_new_tokens=10, temperature=1.0)
    assert groups == [out["texts"][:3], out["texts"][3:]] and C.generate_groups(model, tok, [], 3) == []


def test_print_table_fits_columns(capsys):
    C.print_table([dict(a=1, b=0.12345, c=None), dict(a=22, b=12.5)], "a b c", "title")
    assert capsys.readouterr().out.splitlines() == [
        "title", "|  a |      b | c |", "| -- | ------ | - |", "|  1 | 0.1235 | - |", "| 22 |   12.5 | - |"]


def test_token_logprobs_equal_naive_full_softmax():
    model, tok = _tiny_random()
    ids, mask, cmask = C.collate(tok, ["Q: 1+2\nA: ", "Q: 123+456\nA: "], ["3", "9+6+0=9;#### 579"], "cpu")
    lp, ent = C.token_logprobs(model, ids, mask, cmask.shape[1], entropy=True, chunk=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=C.position_ids(mask)).logits.float()
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)[:, -cmask.shape[1]:]
    assert torch.allclose(lp * cmask, full * cmask, atol=1e-5)
    p = torch.softmax(logits[:, :-1], -1)[:, -cmask.shape[1]:]
    assert torch.allclose(ent, -(p * p.clamp_min(1e-30).log()).sum(-1), atol=1e-4)


def _large_vocab(seed=0, **extra):
    """A random 2-layer Llama with a vocabulary of C.LARGE_VOCAB + 8: the fused head and the inverse-CDF sampler."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = C.char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=C.LARGE_VOCAB + 8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, **extra)
    return LlamaForCausalLM(cfg), tok


def test_fused_head_equals_the_plain_path_values_and_gradients(monkeypatch):
    """token_logprobs through HeadLogprobs (large vocabularies) gives the plain path's log-probs, entropies and
    gradients for every parameter, to float32 rounding; with rows=3 the chunk loop runs over 7 chunks."""
    model, tok = _large_vocab()
    assert C.fused_head(model) is model.lm_head
    ids, mask, cmask = C.collate(tok, ["Q: 1+2\nA: ", "Q: 123+456\nA: "], ["3", "9+6+0=9;#### 579"], "cpu")
    n, weight = cmask.shape[1], torch.linspace(-1, 1, 2 * cmask.shape[1]).view(2, -1)
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(C, "LARGE_VOCAB", C.LARGE_VOCAB if fused else 10**9)
        model.zero_grad()
        lp, ent = C.token_logprobs(model, ids, mask, n, entropy=True)
        (lp * weight).sum().backward()
        runs[fused] = lp.detach(), ent, {k: p.grad.clone() for k, p in model.named_parameters()}
    (lp1, ent1, g1), (lp0, ent0, g0) = runs[True], runs[False]
    assert torch.allclose(lp1, lp0, atol=1e-5) and torch.allclose(ent1, ent0, atol=1e-5)
    for k in g0:
        assert torch.allclose(g1[k], g0[k], atol=1e-6, rtol=1e-4), k
    h = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (20,))
    g = torch.randn(20, dtype=torch.float64)
    lp, ent = C.HeadLogprobs.apply(h, w, y, 3, True)
    (lp.double() * g).sum().backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp = (ref_h @ ref_w.t()).log_softmax(-1)
    (logp.gather(-1, y[:, None]).squeeze(-1) * g).sum().backward()
    assert torch.allclose(lp.double(), logp.gather(-1, y[:, None]).squeeze(-1).detach(), atol=1e-6)
    assert torch.allclose(ent.double(), -(logp.exp() * logp).sum(-1).detach(), atol=1e-5)
    assert torch.allclose(h.grad, ref_h.grad, atol=1e-6) and torch.allclose(w.grad, ref_w.grad, atol=1e-6)


def test_fused_head_only_where_logits_are_h_times_w():
    assert C.fused_head(_tiny_random()[0]) is None                                  # the tiny world: plain
    assert C.fused_head(_large_vocab(final_logit_softcapping=30.0)[0]) is None      # soft-capped logits
    model = _large_vocab()[0]
    model.lm_head = torch.nn.Linear(16, C.LARGE_VOCAB + 8, bias=True)               # a head with a bias
    assert C.fused_head(model) is None


def test_inverse_cdf_sampler_draws_softmax_over_temperature_and_top_p():
    """InverseCDFSampler's one-hot picks follow softmax(scores / T) (10000 draws, 4 sd of a binomial), never a
    zero-probability token, and with top_p only the nucleus."""
    scores = torch.tensor([[2.0, 1.0, 0.0, -float("inf")]]).repeat(10000, 1)   # softmax: .665 .245 .090 0
    nucleus = torch.tensor([1.0, 1.0, 0.0, 0.0])                             # top_p 0.8: .665 + .245 >= .8
    for T, top_p, keep in ((1.0, 1.0, 1.0), (0.5, 1.0, 1.0), (1.0, 0.8, nucleus)):
        torch.manual_seed(0)
        out = C.InverseCDFSampler(T, top_p)(None, scores.clone())
        assert ((out == 0).sum(1) == 1).all() and ((out == 0) | (out == -float("inf"))).all()
        freq = (out == 0).double().mean(0)
        p = torch.softmax(scores[0].double() / T, -1) * keep
        p = p / p.sum()
        assert ((freq - p).abs() <= 4 * (p * (1 - p) / 10000).sqrt() + 1e-12).all(), (T, top_p, freq, p)


def test_generate_with_a_large_vocabulary_samples_and_stops():
    """generate() at T > 0 on a large vocabulary (the inverse-CDF sampler, greedy decoding of its pick): seeded
    draws repeat, they differ across seeds, and a stop token the model is sure of ends the completion."""
    model, tok = _large_vocab()
    draw = lambda seed: (torch.manual_seed(seed), C.generate(model, tok, ["Q: 1+2\nA: "], n=4, max_new_tokens=8))[1]
    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a["completion_ids"], b["completion_ids"]) and not torch.equal(a["completion_ids"],
                                                                                     c["completion_ids"])
    assert len(set(map(tuple, a["completion_ids"].tolist()))) > 1      # 4 samples of one prompt differ
    calls = []

    def force(module, inputs, out):                                   # the 3rd new token is EOS, with p ~ 1
        calls.append(1)
        if len(calls) == 3:
            out[..., tok.eos_token_id] = 1e4
        return out
    h = model.get_output_embeddings().register_forward_hook(force)
    try:
        out = C.generate(model, tok, ["Q: 1+2\nA: "], n=2, temperature=1.0, max_new_tokens=6)
    finally:
        h.remove()
    assert out["has_eos"].all() and out["completion_mask"].sum(1).tolist() == [3, 3]


def test_checkpoint_round_trip_identical_logits(tmp_path):
    model, tok = _tiny_random()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask, cmask = C.collate(tok, ["Q: 1+2\nA: "], ["3"], "cpu")
    (-C.token_logprobs(model, ids, mask, 2).sum()).backward(); opt.step()
    C.save_checkpoint(str(tmp_path / "ck"), model, tok, step=7, optimizer=opt, extra={"note": "x"})
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
    m2, tok2 = C.load_model(str(tmp_path / "ck"), device=torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)
    m3, _ = _tiny_random(seed=1)
    opt3 = torch.optim.AdamW(m3.parameters(), lr=1e-3)
    step, extra = C.load_checkpoint(str(tmp_path / "ck"), m3, opt3)
    assert step == 7 and extra == {"note": "x"} and opt3.state_dict()["state"][0]["step"] == 1
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m3(ids).logits)


ARCHS = {
    "gpt2": lambda: __import__("transformers").GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=120, n_positions=128),
    "llama": lambda: __import__("transformers").LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=32, intermediate_size=64, vocab_size=120),
    "qwen2": lambda: __import__("transformers").Qwen2Config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32, intermediate_size=64, vocab_size=120),
}


def save_random_causal(folder, arch):
    """A tiny random model of a real architecture + the char tokenizer, as a local folder."""
    from transformers import AutoModelForCausalLM
    tok = C.char_tokenizer()
    tok.pad_token = None if arch == "gpt2" else tok.pad_token  # gpt2-like: no pad token
    AutoModelForCausalLM.from_config(ARCHS[arch]()).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_load_model_local_causal_folders(tmp_path, arch):
    folder = save_random_causal(str(tmp_path / arch), arch)
    model, tok = C.load_model(folder, device=torch.device("cpu"))
    assert tok.pad_token is not None and tok.padding_side == "left"
    out = C.generate(model, tok, ["Q: 1+2\nA: "], n=2, max_new_tokens=5)
    assert len(out["texts"]) == 2
    rm, _ = C.load_model(folder, kind="reward", device=torch.device("cpu"))
    ids, mask = C.encode_prompts(tok, ["ab", "abcd"], "cpu")
    assert rm(input_ids=ids, attention_mask=mask).logits.shape == (2, 1)


def test_load_model_bert_reward(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefgh") + ["hello", "world"]))
    folder = str(tmp_path / "bert")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    BertForSequenceClassification(BertConfig(vocab_size=15, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=1)).save_pretrained(folder)
    rm, tok = C.load_model(folder, kind="reward", device=torch.device("cpu"))
    enc = tok(["hello world", "a b"], return_tensors="pt", padding=True)
    assert rm(**enc).logits.shape == (2, 1)


def test_sft_helper_raises_held_out_accuracy():
    """The SFT helper takes the untrained tiny model from ~0 to well above zero held-out accuracy."""
    C.set_seed(0)
    model, tok = C.load_model("tiny-untrained", device=torch.device("cpu"))
    test = C.make_task("arithmetic", 100, seed=1, split="test")
    before = C.evaluate(model, tok, test)["accuracy"]
    # half the steps of the tiny recipe on clean solutions (habit=0): 0.65-0.83 measured on three torch
    # builds / CPU kernels before the habit was added; lr 2e-3 measured unstable (0.08)
    C.sft(model, tok, C.tiny_sft_data(64 * 300, 0, habit=0.0), steps=300, batch_size=64, lr=1e-3)
    after = C.evaluate(model, tok, test)["accuracy"]
    assert before == 0.0 and after >= 0.3, (before, after)


def test_ddp_setup_two_gloo_ranks(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import torch, common as C
        d = C.setup(seed=0, device="cpu")
        assert d.world_size == 2 and d.master == (d.rank == 0)
        assert C.all_reduce_mean(float(d.rank)) == 0.5
        assert C.all_gather_list([d.rank]) == [0, 1]
        assert d.shard(list(range(5))) == list(range(d.rank, 5, 2))
        C.print0("rank0 only")
        C.cleanup()
    """))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("rank0 only") == 1


def test_conftest_pins_the_numerics_tiny_is_built_with():
    """conftest.py must set its numerics before torch loads, so it cannot import them from
    common.py; this keeps the two copies equal."""
    from conftest import PINS
    assert PINS == {k: C.PORTABLE_NUMERICS[k] for k in PINS} and "ATEN_CPU_CAPABILITY" in PINS


def test_build_tiny_from_another_folder(tmp_path, monkeypatch):
    """The build runs in a child process started in the repository; a relative cache folder must
    still land where the caller looks (running `python /path/to/dpo.py` from elsewhere)."""
    monkeypatch.chdir(tmp_path)
    C.build_tiny(os.path.join("cache", "tiny"), steps=1)
    assert open(tmp_path / "cache" / "tiny" / "built_with_steps.txt").read() == C.TINY_RECIPE
    assert os.path.isfile(tmp_path / "cache" / "tiny" / "config.json")
