"""reasoning_capstone.py: build a logic-puzzle specialist — SFT, sample, verify, then RFT vs DPO vs GRPO.

The week-12 capstone of the course: "Fine-tune a model to solve logic puzzles. 1. SFT on
chain-of-thought data. 2. Generate multiple candidate solutions per prompt. 3. Use a simple
verifier to label them. 4. Apply DPO/GRPO to prefer the correct reasoning paths." The built-in
puzzle (--task swaps, common.make_swaps) is the shell game: a ball under one of four cups, six swaps
of two cups, where is the ball? The chain of thought writes where the ball is after each swap, so
every step depends on the one before and can be checked by eye (`24:4`: cups 2 and 4 swapped, the
ball is under 4):
    Q: ball 2; swap 13,24,12,34,23,14      ->      13:2;24:4;12:4;34:3;23:2;14:2;#### 2
Every stage starts from the same SFT model and is evaluated on the same held-out puzzles:
  sft   supervised fine-tuning on reference chains of thought (loss on the completion only); built
        in: the recipe of the built-in models (C.TINY_SFT_STEPS steps x 64 at lr 1e-3 on
        common.tiny_sft_data, on a different data seed), with its habit: in 70% of the worked
        puzzles the last swap is written but not done, so the SFT model answers wrongly whenever
        the ball is under one of the last swap's cups (about half the puzzles; --task arithmetic:
        the dropped carry of `tiny`)
  rft   rejection-sampling fine-tuning: SFT again on the model's OWN verified-correct samples
        (Yuan et al. 2023, "Scaling Relationship on Learning Mathematical Reasoning"; STaR's
        filtering step without rationalization)
  dpo   DPO (Rafailov et al. 2023) on verified pairs: a correct vs an incorrect sample of the
        same prompt (offline: the candidates are sampled once)
  grpo  GRPO (Shao et al. 2024): online, a group of G samples per prompt, group-relative advantages
The table reports greedy accuracy, pass@k (unbiased estimator, Chen et al. 2021) and wall time.
Measured (mean ± sd over seeds 0-2, the 500 held-out puzzles of common.heldout("swaps"), torch 2.13
CPU; `python tests/bench/cross_algorithm.py --seeds 0,1,2 --only capstone`, README 'Results'):
sft 0.537 ± 0.075 -> rft 1.000 ± 0.000, dpo 0.956 ± 0.016, grpo 0.989 ± 0.015; 488-492 s of CPU
time a run (one thread). --task arithmetic: README, its own table.

Run:
    python reasoning_capstone.py                       # the swaps puzzle, tiny-untrained -> SFT -> RFT/DPO/GRPO, CPU
    python reasoning_capstone.py --method grpo         # one stage (after SFT)
    python reasoning_capstone.py --task arithmetic     # 3-digit addition (the dropped-carry habit)
    python reasoning_capstone.py --task countdown --sft-steps 400   # harder: the 0.87M model barely learns it (README)
    python reasoning_capstone.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset ../shared/realdata/tinyzero-countdown/countdown_train.parquet \\
        --sft-steps 0 --max-new-tokens 256 --rl-lr 1e-6 --dpo-lr 5e-7 --rft-lr 1e-5   # TinyZero Countdown rows
    python reasoning_capstone.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --sft-steps 0 ...
On real data the SFT stage uses the rows' reference solutions when they have them (GSM8K);
Countdown rows (TinyZero's countdown_train.parquet: nums, target) have none, so pass --sft-steps 0
and start from an instruct model; the prompt asks for the equation in <answer> </answer> tags and
common.countdown_verify checks it (every number once, exact value).

Outputs in --out: metrics.jsonl, stages.png, summary.json (the stage table: greedy accuracy,
pass@k, wall time), model_rft/, model_dpo/, model_grpo/.

Simplified: each stage is a short, fixed budget (it is a comparison, not a leaderboard run); the
DPO and GRPO losses are duplicated here from dpo.py and grpo.py (on-policy GRPO, one update per
rollout, so the ratio clip never binds and the loss is the plain group-relative policy gradient).
"""
import argparse, copy, json, os, random, time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """DPO (Rafailov et al. 2023, eq. 7) on (B,) summed completion log-probs:
    -log sigma(beta * ([log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)])). Returns (B,).
    The caller adds RPO's alpha * NLL(y_w) / |y_w| (Pang et al. 2024, eq. 2): on its own the DPO
    term lowers log pi of the correct answers too and costs the tiny model accuracy."""
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * h)


def grpo_loss(logps, advantages, mask):
    """On-policy GRPO (Shao et al. 2024, eq. 3 with pi_old = pi_theta, beta = 0): ratio = 1, so
    the clipped surrogate's gradient is -A_i * grad log pi per token. logps, mask (B, T);
    advantages (B,). Per-sequence token mean, then the batch mean."""
    ratio = (logps - logps.detach()).exp()                 # = 1, but carries the gradient
    per_seq = (-(ratio * advantages[:, None]) * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_seq.mean()


def group_advantages(rewards, group_size):
    """(r - group mean) / (group std + 1e-4); all-equal groups get exactly 0. rewards (B,)."""
    g = rewards.view(-1, group_size)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)
    return adv.masked_fill((g == g[:, :1]).all(1, keepdim=True), 0.0).reshape(-1)


def verified_candidates(model, tok, problems, k, max_new_tokens, temperature):
    """Step 2-3: k samples per problem, each labelled by the verifier. Returns
    [(problem, [(completion, correct), ...]), ...] gathered from all ranks."""
    mine = C.DIST.shard(problems)
    groups = C.generate_groups(model, tok, [p["prompt"] for p in mine], k, temperature=temperature,
                               max_new_tokens=max_new_tokens)
    return C.all_gather_list([(p, [(t, C.verify(p, t)) for t in texts]) for p, texts in zip(mine, groups)])


def evaluate(model, tok, test, args):
    # greedy accuracy, and pass@k of samples at the pipeline's sampling temperature
    r = C.evaluate(model, tok, test, samples=args.eval_samples, k=args.pass_k, temperature=args.temperature,
                   max_new_tokens=args.max_new_tokens)
    return r["accuracy"], r[f"pass@{args.pass_k}"]


# ----------------------------------------------------------------------------- the three improvers


def run_rft(sft_model, tok, cands, args):
    """SFT on the model's own correct samples (deduplicated per prompt)."""
    key = lambda prompt: prompt if isinstance(prompt, str) else json.dumps(prompt)  # chat messages are lists
    uniq = {(key(p["prompt"]), t): (p["prompt"], t) for p, cs in cands for t, ok in cs if ok}
    data = [uniq[k] for k in sorted(uniq)]
    C.check(data, "rft: no correct samples to train on (try more --candidates or a better SFT model)")
    C.print0(f"[rft] {len(data)} distinct verified-correct samples from {len(cands)} prompts")
    model = copy.deepcopy(sft_model)
    C.sft(C.ddp(model), tok, data, steps=args.rft_steps, batch_size=args.batch_size, lr=args.rft_lr, desc="rft")
    return model, dict(train_examples=len(data))


def run_dpo(sft_model, tok, cands, args):
    """DPO on (correct, incorrect) samples of the same prompt; the reference is the SFT model,
    whose log-probs are precomputed once (no second model held)."""
    rng = random.Random(args.seed)
    pairs = [dict(prompt=p["prompt"], chosen=rng.choice(good), rejected=rng.choice(bad))
             for p, cs in cands for good, bad in [([t for t, ok in cs if ok], [t for t, ok in cs if not ok])]
             if good and bad]
    C.check(len(pairs) >= args.batch_size,
            f"dpo: only {len(pairs)} prompts have both a correct and an incorrect sample, fewer than "
            f"--batch-size {args.batch_size}: raise --train-n or --candidates")
    C.print0(f"[dpo] {len(pairs)} verified pairs (prompts with both outcomes among {args.candidates} samples)")
    model = copy.deepcopy(sft_model)
    model.eval()
    with torch.no_grad():
        ref = [C.pair_logps(model, tok, pairs[i:i + 64]) for i in range(0, len(pairs), 64)]
    ref_c, ref_r = torch.cat([r[0] for r in ref]), torch.cat([r[1] for r in ref])
    model.train()
    ddp, opt = C.ddp(model), torch.optim.AdamW(model.parameters(), lr=args.dpo_lr, weight_decay=0.0)
    for step in tqdm(range(args.dpo_steps), desc="dpo", disable=not C.DIST.master or None, leave=False):
        idx = C.DIST.shard(random.Random(args.seed * 1000 + step).sample(range(len(pairs)), args.batch_size))
        pc, pr, n_c, _ = C.pair_logps(ddp, tok, [pairs[i] for i in idx])
        losses = dpo_loss(pc, pr, ref_c[idx].to(pc.device), ref_r[idx].to(pc.device), args.beta)
        loss = (losses + args.rpo_alpha * -pc / n_c).mean()
        C.nan_guard(loss, step)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    return model, dict(train_pairs=len(pairs))


def run_grpo(sft_model, tok, train, args):
    """Online: every step samples a fresh group of G completions for prompts_per_step prompts."""
    model = copy.deepcopy(sft_model)
    ddp, opt = C.ddp(model), torch.optim.AdamW(model.parameters(), lr=args.rl_lr, weight_decay=0.0)
    rng, rewards_seen = random.Random(args.seed), []
    for step in tqdm(range(args.grpo_steps), desc="grpo", disable=not C.DIST.master or None, leave=False):
        probs = C.DIST.shard(rng.sample(train, args.prompts_per_step))
        G = args.group_size
        out = C.generate(model, tok, [p["prompt"] for p in probs], n=G, temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens)
        r = torch.tensor([float(C.verify(p, t)) for i, p in enumerate(probs) for t in out["texts"][i * G:(i + 1) * G]])
        adv = group_advantages(r, args.group_size).to(C.DIST.device)
        ids, mask = out["ids"], out["mask"]  # (B, P+T): prompt and completion
        model.train()
        lp = C.token_logprobs(ddp, ids, mask, out["completion_ids"].shape[1])
        loss = grpo_loss(lp, adv, out["completion_mask"].float())
        C.nan_guard(loss, step)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        rewards_seen.append(C.all_reduce_mean(r.mean().item()))
    return model, dict(train_reward_first=float(np.mean(rewards_seen[:5])),
                       train_reward_last=float(np.mean(rewards_seen[-5:])))

# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description="Reasoning specialist: SFT -> sample -> verify -> RFT / DPO / GRPO")
    p.add_argument("--dataset", default=None, help="puzzles: Countdown (nums/target) or GSM8K rows, hub id or "
                   ".jsonl/.json/.parquet (or .gz); default: built-in")
    p.add_argument("--skip-bad-rows", action="store_true", help=C.SKIP_BAD_ROWS)
    p.add_argument("--model", default="tiny-untrained", help="starting model: built-in name (tiny-untrained: random "
                   "weights, so stage 1 is a real SFT; tiny with a --task means tiny-<task>), local folder or hub id")
    p.add_argument("--task", default="swaps", help="built-in task when no --dataset: swaps (the logic puzzle), "
                   "arithmetic or countdown")
    p.add_argument("--method", default="all", choices=["rft", "dpo", "grpo", "all"], help="which improvement stage(s) "
                   "to run after SFT")
    p.add_argument("--sft-steps", type=int, default=C.TINY_SFT_STEPS,
                   help="stage 1: SFT steps on chains of thought (0 = use the model as is); the default, x 64 at "
                        "lr 1e-3, is the recipe that builds tiny: long enough to converge (fewer steps can stop on a "
                        "learning cliff, README)")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="SFT learning rate")
    p.add_argument("--sft-batch-size", type=int, default=64, help="SFT batch (sequences)")
    p.add_argument("--train-n", type=int, default=512, help="training puzzles for candidate sampling / GRPO prompts")
    p.add_argument("--candidates", type=int, default=8, help="samples per training puzzle for RFT and DPO data")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for candidates and GRPO "
                   "(below 1, so that more of the candidates are correct)")
    p.add_argument("--rft-steps", type=int, default=100, help="RFT steps")
    p.add_argument("--rft-lr", type=float, default=1e-4, help="RFT learning rate")
    p.add_argument("--dpo-steps", type=int, default=60, help="DPO steps")
    p.add_argument("--dpo-lr", type=float, default=2e-5,
                   help="DPO learning rate (1e-4 collapsed the earlier tiny model)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--rpo-alpha", type=float, default=8.0, help="weight of the correct answer's per-token NLL added "
                   "to DPO (RPO, Pang et al. 2024, use 1; tiny: 8, as online_dpo.py; at 4 the DPO stage fell below "
                   "SFT in an earlier run, not re-measured); 0 = plain DPO")
    p.add_argument("--grpo-steps", type=int, default=60, help="GRPO steps")
    p.add_argument("--rl-lr", type=float, default=3e-5, help="GRPO learning rate (~30x below SFT's on the tiny model)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="GRPO prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="GRPO samples per prompt (G)")
    p.add_argument("--batch-size", type=int, default=32, help="RFT batch (sequences) and DPO batch (pairs)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion budget")
    p.add_argument("--eval-n", type=int, default=C.HELDOUT_N, help="held-out puzzles, the same for every stage (built "
                   "in: common.heldout)")
    p.add_argument("--eval-samples", type=int, default=8, help="samples per held-out puzzle for pass@k")
    p.add_argument("--pass-k", type=int, default=4, help="k of pass@k")
    C.add_run_flags(p, "reasoning_capstone")  # --out, --seed, --device, --wandb, --trust-remote-code
    args = p.parse_args(argv)
    C.check_flags(args, {"> 0": "train_n candidates batch_size sft_batch_size max_new_tokens eval_n eval_samples "
                                "pass_k prompts_per_step sft_lr rft_lr dpo_lr rl_lr beta temperature",
                         ">= 0": "sft_steps rft_steps dpo_steps grpo_steps rpo_alpha"})
    C.check(args.group_size >= 2,
            f"--group-size must be >= 2 (advantages compare samples within a group), got {args.group_size}")
    C.check(args.pass_k <= args.eval_samples, f"--pass-k {args.pass_k} needs --eval-samples >= k")
    args.model = C.task_model(args.model, args.task, args.dataset)  # tiny-<task> for a task tiny never saw
    return args


def main(argv=None):
    args = parse_args(argv)
    d = C.setup(args.seed, args.device, out=args.out)
    t_start = time.time()
    model, tok = C.load_model(args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    if args.dataset is None:
        train, test = C.make_task(args.task, args.train_n, args.seed), C.heldout(args.task, args.eval_n)
        sft_data = C.tiny_sft_data(args.sft_steps * args.sft_batch_size or 1, args.seed + 7, args.task)  # as tiny
    else:
        rows = C.load_problems(args.dataset, skip_bad=args.skip_bad_rows)
        C.warn_unknown_chars(tok, rows, args.dataset)
        pool, test = C.hold_out(rows, args.eval_n, args.dataset)
        train, sft_data = pool[:args.train_n], [(p["prompt"], p["solution"]) for p in pool if p.get("solution")]
        C.check(args.sft_steps == 0 or sft_data,
                f"--dataset {args.dataset} has no reference solutions: use --sft-steps 0")
    logger = C.Logger(args.out, vars(args), args.wandb)
    table = []

    def record(stage, m, t0, **extra):
        acc, pk = evaluate(m, tok, test, args)
        row = dict(stage=stage, accuracy=acc, **{f"pass@{args.pass_k}": pk}, wall_s=round(time.time() - t0, 1), **extra)
        table.append(row); logger.log(len(table) - 1, **{k: v for k, v in row.items() if k != "stage"}, stage=stage)
        return row

    t0 = time.time()
    record("start", model, t0)
    # ---- 1. SFT on chain-of-thought data
    t0 = time.time()
    if args.sft_steps:
        C.sft(C.ddp(model), tok, sft_data, steps=args.sft_steps, batch_size=args.sft_batch_size, lr=args.sft_lr,
              desc="sft")
    record("sft", model, t0)
    # ---- 2-3. sample candidates and verify them (shared by RFT and DPO)
    methods = ["rft", "dpo", "grpo"] if args.method == "all" else [args.method]
    cands = []
    if {"rft", "dpo"} & set(methods):
        t0 = time.time()
        cands = verified_candidates(model, tok, train, args.candidates, args.max_new_tokens, args.temperature)
        n_ok = sum(ok for _, cs in cands for _, ok in cs)
        C.print0(f"[sample] {len(cands)} puzzles x {args.candidates}: {n_ok} correct "
                 f"({n_ok / (len(cands) * args.candidates):.1%}) in {time.time() - t0:.0f}s")
    # ---- 4. improve with each method, always from the SFT model
    for m in methods:
        t0 = time.time()
        torch.manual_seed(args.seed)
        new, extra = {"rft": lambda: run_rft(model, tok, cands, args), "dpo": lambda: run_dpo(model, tok, cands, args),
                      "grpo": lambda: run_grpo(model, tok, train, args)}[m]()
        record(m, new, t0, **extra)
        if d.master:
            C.save_pretrained_atomic(os.path.join(args.out, f"model_{m}"), new, tok)

    k = f"pass@{args.pass_k}"
    C.print_table(table, f"stage accuracy {k} wall_s", "\nreasoning specialist, stage by stage (held-out)")
    C.plot(args.out, {"accuracy": (list(range(len(table))), [r["accuracy"] for r in table]),
                      k: (list(range(len(table))), [r[k] for r in table])},
           "stages.png", xlabel=" -> ".join(r["stage"] for r in table), title="reasoning specialist")
    summary = dict(task=args.task if args.dataset is None else args.dataset, table=table,
                   start_accuracy=table[0]["accuracy"], sft_accuracy=table[1]["accuracy"],
                   **{f"{r['stage']}_accuracy": r["accuracy"] for r in table[2:]},
                   wall_s=round(time.time() - t_start, 1))
    C.write_summary(args.out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
