"""dpo.py: Direct Preference Optimization, plus a pairwise win-rate evaluation against the start.

DPO (Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model", arXiv:2305.18290) trains a policy directly on
preference pairs (x, y_w = chosen, y_l = rejected), with no reward model and no sampling.

Derivation (paper sec. 4). RLHF maximises reward under a KL leash to a reference policy:
    max_pi  E_{x, y~pi}[ r(x, y) ] - beta * KL( pi(.|x) || pi_ref(.|x) )             (eq. 3)
Its optimum has a closed form,  pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)      (eq. 4)
so any reward can be read back from its optimal policy (the "implicit reward"):
    r(x, y) = beta * log( pi*(y|x) / pi_ref(y|x) ) + beta * log Z(x)                    (eq. 5)
Plug that into the Bradley-Terry model p(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)): the
intractable Z(x) cancels, and maximum likelihood on the pairs becomes a loss on the policy:
    L_DPO = -E log sigma( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x))
                                 - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )             (eq. 7)
DPO vs PPO (RLHF step 3, Ouyang et al. 2022). Both optimise eq. 3 with the same beta-KL
regulariser. PPO does it *on-policy*: it needs a learned reward model r_phi, a value model
(critic) for advantages, the frozen reference for the KL penalty, and fresh samples y ~ pi at
every iteration, then maximises the clipped surrogate  min(rho A, clip(rho, 1-eps, 1+eps) A).
DPO fits the *same* optimum in closed form: the reward model is the policy's own log-ratio,
so it needs only the policy and the reference log-probs of the fixed pairs. Nothing is
sampled, the data never change, so DPO is *offline* (supervised-learning cost, no
generation). The price: it learns only from responses in the data set (no exploration), and
its optimum is only as good as the pairs (PPO can improve beyond them with a good RM).

Run:
    python dpo.py                                    # built-in arithmetic pairs, tiny model, CPU (results below)
    python dpo.py --eval-winrate                     # + win/tie/loss of DPO vs start, verifier as judge
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset HuggingFaceH4/ultrafeedback_binarized \\
        --n-pairs 20000 --steps 600 --batch-size 64 --micro-batch-size 4 --lr 5e-7 --warmup-steps 60 --rpo-alpha 0 \\
        --max-len 1024 --eval-winrate --eval-prompts mt_bench__question.jsonl \\
        --judge-lm Qwen/Qwen2.5-7B-Instruct --max-new-tokens 512
    torchrun --nproc_per_node=8 dpo.py ...           # same flags; --batch-size stays the global batch
    torchrun --nproc_per_node=8 dpo.py --fsdp ...    # FSDP2: the model sharded over the ranks (no checkpoints)
    python dpo.py --save-every 50 ...; python dpo.py --resume ...   # resume is exact on CPU
Outputs in --out (default out/dpo): metrics.jsonl, rewards.png, loss.png, logps.png, winrate.jsonl,
model/ (HF folder), checkpoint/ (with --save-every or Ctrl-C), summary.json.

What the tiny model shows (`python dpo.py`). The built-in pairs: 4096 training prompts, 2 samples
each at T=0.7 from the start model; every prompt with a wrong sample gives (reference solution,
that wrong answer), so the rejected answers are the model's own mistakes. Measured results (mean
± sd over seeds, shared held-out set common.heldout()): README 'Results',
`python tests/bench/cross_algorithm.py --seeds 0,1,2 --only dpo`. Ablations observed on the
earlier start model and not re-measured: the gain came from the RPO NLL term, not the preference
term (beta -> 1e-4, the NLL alone, did as well; beta 0.5 or rpo-alpha 2 did worse); plain DPO
(rpo-alpha 0) collapsed accuracy while the margins still rose (log pi(y_w) falls with log
pi(y_l): chosen and rejected share all but a few tokens). Hand-made rejected answers
(--builtin corrupt) raised it less and less reliably: the model already put almost no mass on them.

Simplified vs the paper / TRL's DPOTrainer (beta 0.1, sigmoid loss): AdamW (paper: RMSprop,
lr 1e-6) with linear warmup then a constant lr; pairs with over-long prompts are dropped and
completions truncated to --max-len; only the sigmoid loss (+ cDPO label smoothing, Mitchell
2023) is implemented; no IPO/hinge variants, no padding-free packing, no PEFT. The win-rate
uses greedy answers and judges only the first MT-Bench turn.
"""
import argparse, contextlib, functools, json, os, random, re, time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C
from common import DIST, check, print0


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, label_smoothing=0.0):
    """Per-pair DPO loss (Rafailov et al. 2023, eq. 7), with cDPO label smoothing.

    Inputs: (B,) log pi(y|x) summed over each completion's tokens, for the policy and the
    reference on the chosen (y_w) and rejected (y_l) completions.
        h      = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
        loss   = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    eps = label_smoothing is the assumed probability that a label is flipped (conservative DPO);
    eps = 0 is plain DPO. Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the
    rewards are the implicit rewards beta * log(pi / pi_ref) (eq. 5 without beta log Z(x),
    which cancels in the difference), detached: they are for logging only."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps       # log pi(y_w)/pi(y_l)
    ref_logratios = ref_chosen_logps - ref_rejected_logps            # same under the reference
    h = pi_logratios - ref_logratios                                  # (B,)
    # log sigma via logsigmoid: stable for large |beta h| (no log(0))
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_logps(model, tok, pairs, max_len):
    """Summed completion log-probs of chosen and rejected in ONE forward pass: rows
    [prompt | chosen] for the b pairs, then [prompt | rejected] (2b rows). Returns three (b,)
    tensors: log pi(y_w|x), log pi(y_l|x) and the chosen token counts."""
    b, prompts = len(pairs), [p["prompt"] for p in pairs]
    ids, mask, cmask = C.collate(tok, prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                                 next(model.parameters()).device, max_len=max_len)
    lp = C.token_logprobs(model, ids, mask, cmask.shape[1])          # (2b, n) per-token log-probs
    seq = (lp * cmask).sum(1)                                         # (2b,) log pi(y|x)
    return seq[:b], seq[b:], cmask[:b].sum(1)                         # + chosen lengths |y_w|


def autocast(device):
    """bf16 autocast on CUDA (weights stay fp32: DPO's ~1e-6 updates vanish in bf16 weights)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def all_pair_logps(model, tok, pairs, batch_size, max_len):
    """(chosen, rejected) summed log-probs of every pair: sharded over ranks, gathered in order."""
    was = model.training; model.eval()
    mine, rows = DIST.shard(list(range(len(pairs)))), []
    for i in range(0, -(-len(pairs) // DIST.world_size), batch_size):  # as many forwards as the largest shard (FSDP: in step)
        j = mine[i:i + batch_size]
        with autocast(DIST.device):
            c, r, _ = pair_logps(model, tok, [pairs[k] for k in j or [0]], max_len)  # empty slice: one dropped pair
        rows += zip(j, c.float().tolist(), r.float().tolist())
    model.train(was)
    rows = sorted(C.all_gather_list(rows))
    return torch.tensor([c for _, c, _ in rows]), torch.tensor([r for _, _, r in rows])


@torch.no_grad()
def sample_pairs(model, tok, problems, tries, temperature, max_new_tokens):
    """Built-in pairs from the start model's OWN mistakes: sample `tries` answers per problem;
    where one is wrong (verifier), the pair is (reference solution, that wrong answer). Real
    preference sets are built the same way (UltraFeedback: model answers ranked by a judge).
    Why not hand-made errors (--builtin corrupt): the model already puts ~no mass on them, so
    pushing them down changes little it would say (measured in the README)."""
    mine = DIST.shard(list(range(len(problems))))
    with autocast(DIST.device):
        texts = C.generate(model, tok, [problems[i]["prompt"] for i in mine], n=tries, temperature=temperature,
                           max_new_tokens=max_new_tokens)["texts"] if mine else []
    found = []
    for j, i in enumerate(mine):  # completions of problem i are texts[j*tries : (j+1)*tries]
        wrong = [t for t in texts[j * tries:(j + 1) * tries] if not C.verify(problems[i], t)]
        if wrong:
            found.append((i, wrong[0]))
    return [dict(prompt=problems[i]["prompt"], chosen=problems[i]["solution"], rejected=w, problem=problems[i])
            for i, w in sorted(C.all_gather_list(found))]


@functools.lru_cache(maxsize=4)
def _perm(seed, epoch, n):
    return random.Random(seed * 1_000_003 + epoch).sample(range(n), n)


def batch_indices(step, batch_size, n, seed):
    """The global batch of update `step` (0-based): example k = step*B + j is item k % n of a
    permutation seeded by (seed, epoch = k // n). A pure function of (seed, step), so a resumed
    run sees exactly the batches the uninterrupted run would have seen."""
    return [_perm(seed, k // n, n)[k % n] for k in range(step * batch_size, (step + 1) * batch_size)]

# ----------------------------------------------------------------------------- win-rate judges
# MT-Bench pairwise prompt "pair-v2" (Zheng et al. 2023, "Judging LLM-as-a-Judge", FastChat, Apache-2.0)
JUDGE_SYSTEM = ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user "
                "question displayed below. You should choose the assistant that follows the user's instructions and answers the user's "
                "question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, "
                "and level of detail of their responses. Begin your evaluation by comparing the two responses and provide a short "
                "explanation. Avoid any position biases and ensure that the order in which the responses were presented does not influence "
                "your decision. Do not allow the length of the responses to influence your evaluation. Do not favor certain names of the "
                "assistants. Be as objective as possible. After providing your explanation, output your final verdict by strictly following "
                "this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
JUDGE_USER = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
              "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")


def parse_verdict(text):
    """'A', 'B' or 'C' (tie) from the judge's last [[X]]; None when it gave no verdict."""
    found = re.findall(r"\[\[([ABC])\]\]", text)
    return found[-1] if found else None


def combine_orders(v_ab, v_ba):
    """+1 (first answer wins) / 0 (tie) / -1 from verdicts with the answers in both positions:
    a win counts only when both orders agree, so position bias cancels (MT-Bench convention)."""
    if v_ab == "A" and v_ba == "B":
        return 1
    if v_ab == "B" and v_ba == "A":
        return -1
    return 0


def _question(prompt):
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


@torch.no_grad()
def judge_pairs(args, prompts, problems, answers_a, answers_b):
    """Outcome of answer a vs answer b per prompt: +1 / 0 / -1. Judge: the task verifier,
    a reward-model folder (higher score wins, equal = tie) or a judge LM (both orders)."""
    if args.judge == "verifier":
        return [(C.verify(p, a) > C.verify(p, b)) - (C.verify(p, a) < C.verify(p, b)) for p, a, b in zip(problems, answers_a, answers_b)]
    if args.judge_lm is None:  # reward model: a sequence classifier scoring prompt + answer
        rm, rtok = C.load_model(args.judge, kind="reward", trust_remote_code=args.trust_remote_code, flag="--judge")
        rm.eval()

        def score(answers):
            with autocast(DIST.device):
                return C.rm_score(rm, rtok, prompts, answers, batch_size=16).tolist()
        sa, sb = score(answers_a), score(answers_b)
        return [(x > y) - (x < y) for x, y in zip(sa, sb)]
    jm, jtok = C.load_model(args.judge_lm, trust_remote_code=args.trust_remote_code, flag="--judge-lm")

    def verdicts(first, second):
        msgs = [[{"role": "system", "content": JUDGE_SYSTEM},
                 {"role": "user", "content": JUDGE_USER.format(question=_question(p), answer_a=a, answer_b=b)}]
                for p, a, b in zip(prompts, first, second)]
        with autocast(DIST.device):
            texts = C.generate(jm, jtok, msgs, temperature=0, max_new_tokens=args.judge_max_new_tokens, batch_size=16)["texts"]
        return [parse_verdict(t) for t in texts]
    return [combine_orders(x, y) for x, y in zip(verdicts(answers_a, answers_b), verdicts(answers_b, answers_a))]


def eval_prompts(args, heldout, problems):
    """Win-rate prompts (+ problems for the verifier): the task's test prompts, the held-out
    pairs' prompts, or a jsonl (MT-Bench `turns`: the first turn; else `prompt`/`instruction`)."""
    spec = args.eval_prompts or ("task" if args.dataset is None else "heldout")
    if spec == "task":
        check(problems, "--eval-prompts task needs the built-in task (no --dataset)")
        return [p["prompt"] for p in problems], problems
    if spec == "heldout":
        return [p["prompt"] for p in heldout], [p.get("problem") for p in heldout]
    rows, prompts = C.read_rows(spec, flag="--eval-prompts")[:args.eval_n], []
    for i, r in enumerate(rows, 1):
        where = f"--eval-prompts {spec} row {i}"
        if "turns" in r:
            check(isinstance(r["turns"], list) and r["turns"] and isinstance(r["turns"][0], str),
                  f"{where}: field 'turns' must be a non-empty list of text")
            prompts.append([{"role": "user", "content": r["turns"][0]}])
        else:
            key = next((k for k in ("prompt", "instruction", "question") if k in r), "prompt")
            C.require(r, [key], where)
            prompts.append(r[key] if not isinstance(r[key], str) or args.dataset is None else [{"role": "user", "content": r[key]}])
    check(prompts, f"--eval-prompts {spec}: no rows")
    return prompts, [None] * len(prompts)


def greedy_answers(model, tok, prompts, max_new_tokens):
    """Greedy answers for every prompt (sharded over ranks, gathered in order)."""
    mine = DIST.shard(list(range(len(prompts))))
    with autocast(DIST.device):
        texts = C.generate(model, tok, [prompts[i] for i in mine], temperature=0, max_new_tokens=max_new_tokens)["texts"] if mine else []
    return [t for _, t in sorted(C.all_gather_list(list(zip(mine, texts))))]

# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description="Direct Preference Optimization (Rafailov et al. 2023) + win-rate evaluation")
    p.add_argument("--model", default="tiny", help="start (SFT) model: built-in name, local folder or hub id; also the reference")
    p.add_argument("--dataset", default=None, help="preference pairs: hub id (UltraFeedback binarized, hh-rlhf) or "
                   "local .jsonl/.json/.parquet (or .gz); default: built-in task pairs")
    p.add_argument("--task", default="arithmetic", help="built-in task when no --dataset: arithmetic, "
                   "countdown or swaps (the logic puzzle; --model tiny then means tiny-swaps)")
    p.add_argument("--skip-bad-rows", action="store_true", help="--dataset: drop (and count) rows with a missing field, empty text or chosen == rejected instead of stopping")
    p.add_argument("--builtin", default="model", choices=["model", "corrupt"], help="built-in pairs' rejected answers: the start model's own wrong samples, or hand-made errors (dropped carry, off-by-one)")
    p.add_argument("--sample-tries", type=int, default=2, help="--builtin model: answers sampled per prompt to find a wrong one")
    p.add_argument("--sample-temperature", type=float, default=0.7, help="--builtin model: sampling temperature")
    p.add_argument("--n-pairs", type=int, default=4096, help="training pairs at most (rows of --dataset; --builtin model: prompts sampled, pairs = those with a wrong answer)")
    p.add_argument("--steps", type=int, default=120, help="optimizer updates")
    p.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch in pairs (split evenly over torchrun ranks)")
    p.add_argument("--micro-batch-size", type=int, default=0, help="pairs per forward pass per rank (gradient accumulation); 0 = whole local batch")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (tiny: 2e-5; 1e-4 lowered the "
                   "earlier start model's accuracy; real models: ~5e-7)")
    p.add_argument("--warmup-steps", type=int, default=5, help="linear lr warmup, then constant")
    p.add_argument("--beta", type=float, default=0.1, help="KL strength beta of eq. 3 / inverse temperature of the implicit reward (TRL's default)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO: assumed label-flip probability in [0, 0.5)")
    p.add_argument("--rpo-alpha", type=float, default=8.0, help="weight of the chosen answer's per-token NLL added "
                   "to the loss (RPO, Pang et al. 2024, use 1; TRL rpo_alpha); tiny: 8; 0 = plain DPO, which "
                   "collapsed the earlier start model's task accuracy")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--max-len", type=int, default=1024, help="max tokens of prompt + completion (completions are cut)")
    p.add_argument("--max-prompt-len", type=int, default=512, help="pairs whose prompt is longer (tokens) are dropped")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model over the ranks (FSDP2) instead of DDP, for models that do not fit on one GPU; no --save-every/--resume")
    p.add_argument("--ref-on-the-fly", action="store_true", help="keep the reference model and compute its log-probs every step (default: precompute once, no second model)")
    p.add_argument("--log-every", type=int, default=1, help="log training metrics every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0 = only before and after)")
    p.add_argument("--eval-n", type=int, default=C.HELDOUT_N, help="held-out pairs / test problems (built in: common.heldout) / win-rate prompts")
    p.add_argument("--eval-winrate", action="store_true", help="judge greedy answers of the DPO model vs the start model: win/tie/loss")
    p.add_argument("--eval-prompts", default=None, help="win-rate prompts: 'task' (built-in test prompts), 'heldout' (held-out pair prompts) or a jsonl (MT-Bench questions: first turn)")
    p.add_argument("--judge", default=None, help="'verifier' (built-in task; the default there) or a reward-model folder/hub id (higher score wins)")
    p.add_argument("--judge-lm", default=None, help="judge LM (hub id/folder): MT-Bench pairwise prompt, both answer orders")
    p.add_argument("--judge-max-new-tokens", type=int, default=512, help="judge LM's budget for explanation + verdict")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length for accuracy and win-rate")
    p.add_argument("--save-every", type=int, default=0, help="write <out>/checkpoint every N steps (0 = never)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (same flags)")
    p.add_argument("--out", default=os.path.join("out", "dpo"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, data order)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    p.add_argument("--trust-remote-code", action="store_true", help="allow hub models with custom code")
    args = p.parse_args(argv)
    for k in ("n_pairs", "sample_tries", "steps", "batch_size", "max_len", "max_prompt_len", "log_every", "eval_n", "max_new_tokens", "judge_max_new_tokens"):
        check(getattr(args, k) > 0, f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    for k in ("micro_batch_size", "warmup_steps", "eval_every", "save_every"):
        check(getattr(args, k) >= 0, f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    check(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    check(args.beta > 0, f"--beta must be > 0, got {args.beta}")
    check(args.sample_temperature > 0, f"--sample-temperature must be > 0, got {args.sample_temperature}")
    check(args.rpo_alpha >= 0, f"--rpo-alpha must be >= 0, got {args.rpo_alpha}")
    check(0 <= args.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    check(not (args.judge and args.judge_lm), "give --judge or --judge-lm, not both")
    check(not (args.fsdp and (args.save_every or args.resume)), "--fsdp: checkpoints of sharded optimizer state are not implemented; drop --save-every/--resume")
    args.judge = args.judge or (None if args.judge_lm else "verifier" if args.dataset is None else None)
    check(not args.eval_winrate or args.judge or args.judge_lm, "--eval-winrate on a --dataset needs --judge <reward model> or --judge-lm <model>")
    args.model = C.task_model(args.model, args.task, args.dataset)  # tiny-<task> for a task tiny never saw
    return args


def main(argv=None):
    args = parse_args(argv)
    d = C.setup(args.seed, args.device, out=args.out)
    for flag, name in (("--judge", args.judge), ("--judge-lm", args.judge_lm)):  # loaded after the training
        C.check_model_path(name, flag)
    check(args.batch_size % d.world_size == 0, f"--batch-size {args.batch_size} must be divisible by the {d.world_size} ranks")
    t0, ckpt = time.time(), os.path.join(args.out, "checkpoint")

    # ---- model: fp32 master weights (bf16 autocast on GPU), dropout off (as TRL: log-probs must be deterministic)
    model, tok = C.load_model(args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    max_len = min(args.max_len, getattr(model.config, "max_position_embeddings", None) or args.max_len)
    fsdp = args.fsdp and d.world_size > 1
    if fsdp:  # before anything runs the model or creates the optimizer
        C.shard_model(model)

    # ---- data: built-in pairs (chosen = reference solution, rejected = the start model's own
    # mistake, or a hand-made error with --builtin corrupt) or real pairs. `problems`: accuracy set.
    problems = None
    if args.dataset is None:
        problems = C.heldout(args.task, args.eval_n)  # the shared test set, the same for every --seed
        if args.builtin == "corrupt":
            train, heldout = C.make_pairs(args.task, args.n_pairs, args.seed), C.make_pairs(args.task, args.eval_n, C.HELDOUT_SEED, split="test")
        else:
            sample = lambda probs: sample_pairs(model, tok, probs, args.sample_tries, args.sample_temperature, args.max_new_tokens)
            train, heldout = sample(C.make_task(args.task, args.n_pairs, args.seed)), sample(problems)
    elif os.path.isfile(args.dataset):  # a local file: the last --eval-n rows are held out
        rows = C.load_pairs(args.dataset, skip_bad=args.skip_bad_rows)
        check(len(rows) > args.eval_n, f"--dataset {args.dataset}: {len(rows)} rows, need more than --eval-n {args.eval_n}")
        train, heldout = rows[:-args.eval_n][:args.n_pairs], rows[-args.eval_n:]
    else:
        train = C.load_pairs(args.dataset, "train", args.n_pairs, args.skip_bad_rows)
        heldout = C.load_pairs(args.dataset, "test_prefs" if "ultrafeedback" in args.dataset else "test", args.eval_n, args.skip_bad_rows)
    C.warn_unknown_chars(tok, train + heldout, args.dataset)
    fits = lambda p: len(C.prompt_ids(tok, p["prompt"])) <= min(args.max_prompt_len, max_len // 2)
    n0, train, heldout = len(train), [p for p in train if fits(p)], [p for p in heldout if fits(p)]
    print0(f"{len(train)} training pairs ({n0 - len(train)} dropped: prompt > {min(args.max_prompt_len, max_len // 2)} tokens), {len(heldout)} held out")
    check(len(train) >= args.batch_size and heldout, f"{len(train)} training / {len(heldout)} held-out pairs: need >= --batch-size {args.batch_size} "
          f"and >= 1 (raise --n-pairs / --eval-n{', --sample-tries' if args.dataset is None and args.builtin == 'model' else ''})")
    mb = args.micro_batch_size or args.batch_size // d.world_size

    ref = None
    if args.ref_on_the_fly:  # a frozen copy of the start model (memory: a second model)
        ref, _ = C.load_model(args.model, trust_remote_code=args.trust_remote_code)
        ref.eval().requires_grad_(False)

    def heldout_eval(ref_c, ref_r):
        """Held-out preference metrics (+ verifier accuracy on the built-in task)."""
        pc, pr = all_pair_logps(model, tok, heldout, mb, max_len)
        _, cr, rr = dpo_loss(pc, pr, ref_c, ref_r, args.beta)
        res = dict(heldout_reward_acc=(cr > rr).float().mean().item(), heldout_reward_margin=(cr - rr).mean().item(),
                   heldout_likelihood_acc=(pc > pr).float().mean().item(),  # pi(y_w) > pi(y_l): needs no reference
                   heldout_logp_chosen=pc.mean().item(), heldout_logp_rejected=pr.mean().item())
        if problems:
            res["accuracy"] = C.evaluate(model, tok, problems, max_new_tokens=args.max_new_tokens)["accuracy"]
        return res

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    win_prompts, win_problems = eval_prompts(args, heldout, problems) if args.eval_winrate else ([], [])
    cfg = dict(seed=args.seed, batch_size=args.batch_size, n_train=len(train), model=args.model, dataset=args.dataset, builtin=args.builtin)
    if args.resume:
        start, extra = C.load_checkpoint(ckpt, model, opt, sched)
        check(extra["config"] == cfg, f"--resume: flags differ from the checkpoint's {extra['config']}")
        check(start < args.steps, f"--resume: the checkpoint is at step {start}, --steps is {args.steps}")
        print0(f"resumed from {ckpt} at step {start}")
    else:
        # Reference log-probs: the reference IS the start model, so precompute them with the policy
        # before its first update; no second model is ever held in memory (unless --ref-on-the-fly).
        start, extra = 0, dict(config=cfg)
        extra["heldout_ref"] = all_pair_logps(ref or model, tok, heldout, mb, max_len)
        extra["train_ref"] = None if ref else all_pair_logps(model, tok, train, mb, max_len)
        extra["before"] = heldout_eval(*extra["heldout_ref"])
        extra["start_answers"] = greedy_answers(model, tok, win_prompts, args.max_new_tokens) if args.eval_winrate else []
    logger = C.Logger(args.out, vars(args), args.wandb, resume_step=start if args.resume else None)  # drops rows after the checkpoint
    if start == 0:
        logger.log(0, **extra["before"])
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.world_size > 1 and not fsdp else model

    # ---- training: one flat loop; batch = DIST.shard(global batch of this step)
    model.train()
    done = start  # last finished update (what a Ctrl-C checkpoint saves)
    try:
        for step in tqdm(range(start + 1, args.steps + 1), desc="dpo", disable=not d.master or None, initial=start, total=args.steps):
            t_step = time.time()
            idx = DIST.shard(batch_indices(step - 1, args.batch_size, len(train), args.seed))  # B / world_size pairs
            opt.zero_grad(set_to_none=True)
            stats = torch.zeros(7, dtype=torch.float64)
            chunks = [idx[i:i + mb] for i in range(0, len(idx), mb)]  # same count on every rank
            for k, chunk in enumerate(chunks):
                pairs = [train[i] for i in chunk]
                sync = k == len(chunks) - 1 or d.world_size == 1 or fsdp  # FSDP reduce-scatters every micro-batch
                with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast(d.device):
                    pc, pr, n_c = pair_logps(ddp, tok, pairs, max_len)
                    if ref is not None:
                        with torch.no_grad():
                            rc, rr, _ = pair_logps(ref, tok, pairs, max_len)
                    else:
                        rc, rr = (t[chunk].to(pc.device) for t in extra["train_ref"])
                    losses, c_rew, r_rew = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), args.beta, args.label_smoothing)
                    # RPO (Pang et al. 2024): + alpha * per-token NLL of the chosen answer keeps
                    # log pi(y_w) from falling along with log pi(y_l) (see --rpo-alpha)
                    losses = losses + args.rpo_alpha * (-pc.float() / n_c)
                    # Sum over this rank's pairs / its B/W pairs = local mean; DDP averages the W
                    # ranks' gradients -> (1/B) * sum over the global batch = one process's gradient.
                    loss = losses.sum() / len(idx)
                    C.nan_guard(loss, step)
                    loss.backward()
                stats += torch.stack([losses.sum(), (c_rew > r_rew).float().sum(), (c_rew - r_rew).sum(), c_rew.sum(),
                                      r_rew.sum(), pc.detach().sum(), pr.detach().sum()]).double().cpu()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
            opt.step(); sched.step(); done = step
            if step % args.log_every == 0 or step == args.steps:
                s = C.all_reduce_mean(stats / len(idx)).tolist()  # equal local batches: mean of means = global mean
                logger.log(step, loss=s[0], reward_acc=s[1], reward_margin=s[2], chosen_reward=s[3], rejected_reward=s[4],
                           logp_chosen=s[5], logp_rejected=s[6], grad_norm=grad_norm.item(), lr=sched.get_last_lr()[0],
                           step_time=time.time() - t_step)
            if args.eval_every and step % args.eval_every == 0 and step != args.steps:
                logger.log(step, **heldout_eval(*extra["heldout_ref"]))
            if args.save_every and step % args.save_every == 0:
                C.save_checkpoint(ckpt, model, tok, step, opt, sched, extra)
    except KeyboardInterrupt:
        if fsdp:
            print0(f"interrupted at step {done}: no checkpoint under --fsdp")
            raise SystemExit(130)
        C.save_checkpoint(ckpt, model, tok, done, opt, sched, extra)
        print0(f"interrupted: checkpoint at step {done} in {ckpt} (continue with --resume)")
        raise SystemExit(130)

    # ---- evaluation and summary
    after = heldout_eval(*extra["heldout_ref"])
    logger.log(args.steps, **after)
    before = extra["before"]
    summary = dict(steps=args.steps, train_pairs=len(train), wall_s=round(time.time() - t0, 1),
                   heldout_reward_acc=after["heldout_reward_acc"], heldout_reward_margin=after["heldout_reward_margin"],
                   **{f"{k}_{w}": r[k] for k in ("heldout_likelihood_acc", "heldout_logp_chosen", "heldout_logp_rejected", "accuracy")
                      for w, r in (("before", before), ("after", after)) if k in r})
    if args.eval_winrate:
        answers = greedy_answers(model, tok, win_prompts, args.max_new_tokens)
        mine = DIST.shard(list(range(len(win_prompts))))
        pick = lambda xs: [xs[i] for i in mine]
        res = judge_pairs(args, pick(win_prompts), pick(win_problems), pick(answers), pick(extra["start_answers"]))
        outcome = [o for _, o in sorted(C.all_gather_list(list(zip(mine, res))))]
        win, tie, loss = outcome.count(1), outcome.count(0), outcome.count(-1)
        summary["winrate"] = dict(judge=args.judge_lm or args.judge, n=len(outcome), win=win, tie=tie, loss=loss,
                                  win_rate=(win + 0.5 * tie) / len(outcome))
        if d.master:
            with open(os.path.join(args.out, "winrate.jsonl"), "w") as f:
                for p, a, b, o in zip(win_prompts, answers, extra["start_answers"], outcome):
                    f.write(json.dumps(dict(prompt=p, dpo=a, start=b, outcome={1: "win", 0: "tie", -1: "loss"}[o])) + "\n")
    C.save_pretrained_atomic(os.path.join(args.out, "model"), model, tok)  # rank 0 writes (FSDP: all ranks gather)
    C.plot_metrics(args.out, ["chosen_reward", "rejected_reward", "reward_margin"], "rewards.png", title="DPO implicit rewards")
    C.plot_metrics(args.out, ["loss", "reward_acc"], "loss.png", title="DPO loss and reward accuracy")
    C.plot_metrics(args.out, ["logp_chosen", "logp_rejected"], "logps.png", title="policy log-probs (chosen falls too)")
    C.write_summary(args.out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
