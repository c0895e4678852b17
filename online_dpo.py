"""online_dpo.py: iterative / online DPO — the policy makes its own preference data, round by round.

Static DPO learns only from pairs somebody else sampled. Online (iterative) DPO closes the loop
(Xu et al. 2023 "Some things are more CRINGE than others"; Guo et al. 2024 "Direct Language Model
Alignment from Online AI Feedback"); Self-Rewarding Language Models (Yuan et al. 2024) make the
policy its own judge. Each round:
    1. sample K completions per prompt from the CURRENT policy            (on-policy data)
    2. score them with a judge: the task verifier, a reward-model folder, or the policy itself
       as LLM-as-a-judge with the paper's additive 5-point prompt (`--judge self`)
    3. pair the best against the worst completion of each prompt (ties skipped: no signal)
    4. DPO on those pairs (+ alpha x the chosen answer's NLL: Iterative RPO, Pang et al. 2024), the
       reference = the policy at the START of the round
    5. evaluate (gold accuracy with the verifier, KL to the initial model), then repeat.
The course assignment: "Generate 100 responses with your current model, score them with an RM,
construct a new DPO dataset, and train for one epoch. Repeat." — that is `--prompts 100 --k 2 --epochs 1`.

Run:
    python online_dpo.py                                   # tiny model, verifier judge, CPU
    python online_dpo.py --judge out/reward_model/model    # a reward model from reward_model.py
    python online_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --judge verifier \\
        --prompts 256 --k 4 --lr 5e-7 --max-new-tokens 512
    python online_dpo.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset my_prompts.jsonl --judge self
    torchrun --nproc_per_node=2 online_dpo.py              # prompts sharded, pairs gathered

A round's judge score is scored on that round's fresh prompts before the policy trains on them, so
with the verifier it is a held-out sampled accuracy of the previous round's policy. Measured results
(mean ± sd over seeds, shared held-out set common.heldout()): README 'Results',
`python tests/bench/cross_algorithm.py --seeds 0,1,2 --only online_dpo`. Observed on the earlier
start model and not re-measured: the NLL weight is what made it learn: with alpha 4 the judge score
stayed flat, and with alpha 1 or plain DPO the DPO term pulled the correct answers' log-probs down
with the wrong ones' and accuracy fell (README, calibration sweep).

Outputs in --out: metrics.jsonl, rounds.png (gold accuracy and judge score per round),
summary.json (the per-round table, accuracy before/after, KL to the initial model), model/.

Simplified vs the papers: one fixed prompt pool sampled per round (the papers use fresh prompts
or a growing pool); best-vs-worst pairing only (Yuan et al. also use it); the self-judge is the
policy of the current round (the paper's M_t judges for M_{t+1}, the same thing).
"""
import argparse, copy, os, random, re, time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, eq. 7), duplicated from dpo.py on purpose. Inputs (B,) summed
    completion log-probs; h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)];
    loss = -(1-eps) log sigma(beta h) - eps log sigma(-beta h). Returns (losses (B,),
    chosen_rewards (B,), rejected_rewards (B,)), the implicit rewards beta*log(pi/pi_ref), detached."""
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    return losses, chosen_rewards, beta * (policy_rejected_logps - ref_rejected_logps).detach()


def best_vs_worst(prompts, completions, scores, k):
    """One pair per prompt: the highest- vs the lowest-scored of its k completions (rows i*k..i*k+k-1).
    Prompts whose k scores are all equal give no preference and are skipped (counted by the caller)."""
    pairs = []
    for i, p in enumerate(prompts):
        s = scores[i * k:(i + 1) * k]
        hi, lo = int(np.argmax(s)), int(np.argmin(s))
        if s[hi] > s[lo]:
            pairs.append(dict(prompt=p, chosen=completions[i * k + hi], rejected=completions[i * k + lo]))
    return pairs


# Self-Rewarding LMs (Yuan et al. 2024), Figure 2: the LLM-as-a-judge prompt, additive 5 points.
SELF_JUDGE = (
    "Review the user's question and the corresponding response using the additive 5-point scoring system "
    "described below. Points are accumulated based on the satisfaction of each criterion:\n"
    "- Add 1 point if the response is relevant and provides some information related to the user's inquiry, "
    "even if it is incomplete or contains some irrelevant content.\n"
    "- Add another point if the response addresses a substantial portion of the user's question, but does not"
    " completely resolve the query or provide a direct answer.\n"
    "- Award a third point if the response answers the basic elements of the user's question in a useful way,"
    " regardless of whether it seems to have been written by an AI Assistant or if it has elements typically "
    "found in blogs or search results.\n"
    "- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing"
    " the user's question directly and comprehensively, and is well-organized and helpful, even if there is "
    "slight room for improvement in clarity, conciseness or focus.\n"
    "- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI "
    "Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a "
    "high-quality, engaging, and insightful answer.\n"
    "\n"
    "User: {prompt}\n"
    "<response>{response}</response>\n"
    "\n"
    "After examining the user's instruction and the response:\n"
    "- Briefly justify your total score, up to 100 words.\n"
    "- Conclude with the score using the format: \"Score: <total points>\"\n"
    "Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To "
    "evaluate the response in alignment with this additive scoring model, we'll systematically attribute "
    "points based on the outlined criteria.")


def parse_score(text):
    """The judge's 'Score: N' (0-5); None when it gave none (treated as 0 by the caller)."""
    m = re.findall(r"Score:\s*([0-5])", text)
    return int(m[-1]) if m else None


def _text(prompt):
    """A prompt as plain text to quote inside a judge prompt (a template's special tokens would be parsed as such)."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


@torch.no_grad()
def judge_scores(args, problems, completions, policy, tok, rm):
    """A scalar score per completion (problems are repeated k times, row-aligned)."""
    if args.judge == "verifier":
        return [float(C.verify(p, c)) for p, c in zip(problems, completions)]
    if args.judge == "self":  # the policy judges itself, greedy, averaged over nothing (paper: 3 samples)
        msgs = [[{"role": "user", "content": SELF_JUDGE.format(prompt=_text(p["prompt"]), response=c)}]
                for p, c in zip(problems, completions)]
        texts = C.generate(policy, tok, msgs, temperature=0, max_new_tokens=args.judge_max_new_tokens)["texts"]
        return [float(parse_score(t) or 0) for t in texts]
    rm_model, rm_tok = rm  # a reward-model folder: a sequence classifier on prompt text + completion
    return C.rm_score(rm_model, rm_tok, [p["prompt"] for p in problems], completions, batch_size=32).tolist()


@torch.no_grad()
def kl_to_initial(policy, init, tok, problems, max_new_tokens):
    """KL(pi || pi_init) per completion, Monte Carlo with the k1 estimator: sample y ~ pi, average
    sum_t [log pi(y_t) - log pi_init(y_t)] (unbiased; shows how far the rounds drifted). Also
    returns the accuracy of those T=1 samples (held-out sampled accuracy)."""
    out = C.generate(policy, tok, [p["prompt"] for p in problems], temperature=1.0, max_new_tokens=max_new_tokens)
    gold = all(p.get("answer") for p in problems)
    sampled_acc = float(np.mean([C.verify(p, t) for p, t in zip(problems, out["texts"])])) if gold else 0.0
    ids, mask = out["ids"], out["mask"]  # (B, P+T): prompt and completion
    n, cm = out["completion_ids"].shape[1], out["completion_mask"]
    diff = (C.token_logprobs(policy, ids, mask, n) - C.token_logprobs(init, ids, mask, n)) * cm
    return diff.sum(1).mean().item(), sampled_acc


def parse_args(argv):
    p = argparse.ArgumentParser(description="Iterative / online DPO with a verifier, RM or self judge")
    p.add_argument("--model", default="tiny", help="starting policy: built-in name, local folder or hub id")
    p.add_argument("--dataset", default=None, help="prompts with answers (GSM8K/Countdown/MATH rows, hub id or "
                   ".jsonl/.json/.parquet, or .gz); default: built-in task")
    p.add_argument("--skip-bad-rows", action="store_true", help=C.SKIP_BAD_ROWS)
    p.add_argument("--task", default="arithmetic", help="built-in task when no --dataset: arithmetic, "
                   "countdown or swaps (the logic puzzle; --model tiny then means tiny-swaps)")
    p.add_argument("--judge", default="verifier", help="'verifier' (gold checker), 'self' (policy as LLM-as-a-judge) "
                   "or a reward-model folder / hub id")
    p.add_argument("--rounds", type=int, default=4, help="generate -> judge -> DPO rounds")
    p.add_argument("--prompts", type=int, default=256, help="prompts sampled per round")
    p.add_argument("--k", type=int, default=8, help="completions per prompt (pairs are best vs worst of k; k=4 gave "
                   "too few informative pairs on the earlier start model)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for the policy's own data "
                   "(the earlier start model's T=1 samples were mostly wrong)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion budget")
    p.add_argument("--judge-max-new-tokens", type=int, default=128, help="budget of the self-judge's justification + "
                   "score")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (KL strength to the round's reference)")
    p.add_argument("--rpo-alpha", type=float, default=8.0, help="weight of the chosen completion's per-token NLL "
                   "(Iterative RPO, Pang et al. 2024, use 1); tiny: 8 (at 1 or 0 the earlier start model's "
                   "accuracy fell)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (tiny: 2e-5, 1e-4 collapsed the "
                   "earlier start model; 0.5B-7B models: ~5e-7)")
    p.add_argument("--batch-size", type=int, default=16, help="global DPO batch in pairs (divisible by the number of "
                   "ranks)")
    p.add_argument("--epochs", type=int, default=2, help="DPO epochs over each round's pairs")
    p.add_argument("--eval-n", type=int, default=C.HELDOUT_N, help="held-out problems for gold accuracy and KL (built "
                   "in: common.heldout)")
    C.add_run_flags(p, "online_dpo")  # --out, --seed, --device, --wandb, --trust-remote-code
    args = p.parse_args(argv)
    C.check_flags(args, {"> 0": "rounds prompts max_new_tokens batch_size epochs eval_n lr beta", ">= 0": "rpo_alpha"})
    C.check(args.k >= 2, f"--k must be >= 2 (a pair needs two completions), got {args.k}")
    C.check(args.temperature > 0,
            f"--temperature must be > 0 to sample distinct completions, got {args.temperature}")
    args.model = C.task_model(args.model, args.task, args.dataset)  # tiny-<task> for a task tiny never saw
    return args


def main(argv=None):
    args = parse_args(argv)
    d = C.setup(args.seed, args.device, out=args.out)
    C.check_ranks(args.batch_size)
    t0 = time.time()
    policy, tok = C.load_model(args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    init = copy.deepcopy(policy).eval().requires_grad_(False)  # the initial model, for KL only
    rm = C.load_model(args.judge, kind="reward", trust_remote_code=args.trust_remote_code, flag="--judge") \
        if args.judge not in ("verifier", "self") else None
    if rm:
        rm[0].eval()
    if args.dataset is None:
        pool, test = C.make_task(args.task, 4096, args.seed), C.heldout(args.task, args.eval_n)
    else:
        rows = C.load_problems(args.dataset, skip_bad=args.skip_bad_rows)
        pool, test = C.hold_out(rows, args.eval_n, args.dataset)
        C.warn_unknown_chars(tok, rows, args.dataset)
    C.check(args.judge != "verifier" or all(p.get("answer") for p in test),
            "--judge verifier needs problems with answers")
    logger = C.Logger(args.out, vars(args), args.wandb)
    rng = random.Random(args.seed)

    acc0 = C.evaluate(policy, tok, test, max_new_tokens=args.max_new_tokens)["accuracy"]
    s0 = C.all_reduce_mean(kl_to_initial(policy, init, tok, C.DIST.shard(test), args.max_new_tokens)[1])
    table = [dict(round=0, judge_score=None, gold_accuracy=acc0, sampled_accuracy=s0, pairs=0, skipped_ties=0,
                  kl_to_initial=0.0)]
    logger.log(0, gold_accuracy=acc0)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    ddp = C.ddp(policy)
    step = 0
    for rnd in range(1, args.rounds + 1):
        # ---- 1-2. sample K completions per prompt (this rank's share) and judge them
        prompts = C.DIST.shard(rng.sample(pool, min(args.prompts, len(pool))))
        out = C.generate(policy, tok, [p["prompt"] for p in prompts], n=args.k, temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens)
        scores = judge_scores(args, [p for p in prompts for _ in range(args.k)], out["texts"], policy, tok, rm)
        # ---- 3. best vs worst; every rank gets the same global list of pairs
        pairs = C.all_gather_list(best_vs_worst([p["prompt"] for p in prompts], out["texts"], scores, args.k))
        ties = args.prompts - len(pairs)
        judge_mean = C.all_reduce_mean(float(np.mean(scores)))
        C.print0(f"round {rnd}: judge score {judge_mean:.3f}, {len(pairs)} pairs kept, {ties} prompts skipped "
                 f"(all {args.k} tied)")
        # ---- 4. one epoch of DPO; the reference is the policy at the start of this round, so its
        # log-probs are computed once now, before the first update (no second model in memory).
        order = rng.sample(range(len(pairs)), len(pairs))
        nb = len(pairs) // args.batch_size  # full global batches only: every rank runs the same count
        with torch.no_grad():
            policy.eval()
            ref = {}
            for b in range(nb):
                idx = C.DIST.shard(order[b * args.batch_size:(b + 1) * args.batch_size])
                rc, rr = C.pair_logps(policy, tok, [pairs[i] for i in idx])[:2]
                ref.update({i: (c, r) for i, c, r in zip(idx, rc.tolist(), rr.tolist())})
        policy.train()
        for epoch in range(args.epochs):
            for b in tqdm(range(nb), desc=f"round {rnd} dpo", disable=not d.master or None, leave=False):
                idx = C.DIST.shard(order[b * args.batch_size:(b + 1) * args.batch_size])
                pc, pr, n_c, _ = C.pair_logps(ddp, tok, [pairs[i] for i in idx])
                rc = torch.tensor([ref[i][0] for i in idx], device=d.device)
                rr = torch.tensor([ref[i][1] for i in idx], device=d.device)
                losses, cr, rjr = dpo_loss(pc, pr, rc, rr, args.beta)
                # Iterative RPO (Pang et al. 2024, eq. 2): + alpha * per-token NLL of the chosen
                # (judge-preferred) completion. Plain DPO lowers log pi(y_w) along with log pi(y_l)
                # and, on the policy's own samples, drifts off the task (seen on the earlier start model).
                losses = losses + args.rpo_alpha * (-pc / n_c)
                loss = losses.sum() / len(idx)  # local mean; DDP averages ranks -> global mean
                C.nan_guard(loss, step)
                opt.zero_grad(set_to_none=True); loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0); opt.step()
                mean = lambda x: C.all_reduce_mean(x.float().mean().item())  # over the batch, then the ranks
                logger.log(step, loss=mean(loss), reward_acc=mean(cr > rjr), reward_margin=mean(cr - rjr),
                           logp_chosen=mean(pc))
                step += 1  # updates done; rows carry the 0-based index of theirs
        # ---- 5. evaluate
        acc = C.evaluate(policy, tok, test, max_new_tokens=args.max_new_tokens)["accuracy"]
        kl, sacc = (C.all_reduce_mean(v) for v in kl_to_initial(policy, init, tok, d.shard(test), args.max_new_tokens))
        row = dict(round=rnd, judge_score=judge_mean, gold_accuracy=acc, sampled_accuracy=sacc, pairs=len(pairs))
        table.append(dict(row, skipped_ties=ties, kl_to_initial=kl))
        logger.log(step - 1, **row, kl_to_initial=kl)  # after the round's last update

    C.print_table(table, "round judge_score gold_accuracy sampled_accuracy pairs kl_to_initial",
                  "\nonline DPO (gold: greedy, checked by the verifier; sampled: T=1; pairs kept after ties)")
    C.plot(args.out, {"gold accuracy": ([r["round"] for r in table], [r["gold_accuracy"] for r in table]),
                      "judge score": ([r["round"] for r in table[1:]], [r["judge_score"] for r in table[1:]])},
           "rounds.png", xlabel="round", title="online DPO")
    if d.master:
        C.save_pretrained_atomic(os.path.join(args.out, "model"), policy, tok)
    summary = dict(judge=args.judge, rounds=args.rounds, accuracy_before=acc0,
                   accuracy_after=table[-1]["gold_accuracy"], sampled_accuracy_before=s0,
                   sampled_accuracy_after=table[-1]["sampled_accuracy"],
                   kl_to_initial=table[-1]["kl_to_initial"], table=table, wall_s=round(time.time() - t0, 1))
    C.write_summary(args.out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
