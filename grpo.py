"""grpo.py: Group Relative Policy Optimization (GRPO) with verifiable rewards, from scratch.

GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
arXiv:2402.03300; the RL recipe behind DeepSeek-R1, 2025) is PPO without the value network. For every prompt q it
samples a *group* of G completions o_1..o_G from the current policy, scores each with a verifier (1 = correct
final answer) and uses the group itself as the baseline (outcome supervision, paper section 4.1.2):

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)        (every token of o_i gets A_i)

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t ( min(ρ_it A_i, clip(ρ_it, 1-ε_low, 1+ε_high) A_i) - β KL_it ) ]
    ρ_it  = π_θ(o_it | q, o_i,<t) / π_old(o_it | q, o_i,<t)
    KL_it = π_ref/π_θ - log(π_ref/π_θ) - 1        (per token, the unbiased "k3" estimator, eq. 4)

No critic means no second policy-sized model to train and hold in memory; a group whose G rewards are all
equal (all right or all wrong) has zero advantage and teaches nothing (logged as frac_zero_std). The variants,
one flag each (their papers and equations: group_advantages, grpo_loss; README 'Policy-gradient variants'):
DAPO (--loss-type dapo --eps-high 0.28), Dr. GRPO (--loss-type dr_grpo --scale-rewards none), RLOO (--advantage
rloo), REINFORCE++ (--advantage reinforce++), GSPO (--importance-sampling sequence), CISPO (--loss-type cispo).
With --num-iterations 1 every ratio is 1, so GSPO and CISPO differ from GRPO and DAPO only when it is > 1.

Run:
    python grpo.py            # built-in tiny model on 3-digit addition, 200 steps, CPU
    python grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --max-new-tokens 256 \\
        --micro-batch 8 --lr 2e-6 --beta 0.04 --steps 200 --eval-n 500 --grad-checkpointing
    python grpo.py --dataset train.jsonl --eval-dataset test.jsonl     # local GSM8K/Countdown rows
    torchrun --nproc_per_node 4 grpo.py --model ... --prompts-per-step 32   # prompts sharded by rank
    python grpo.py --save-every 20 ... ; python grpo.py --resume ...        # continue a run
Real data: common.load_problems() makes GSM8K rows chat messages that ask for the answer after '####';
the verifier compares the extracted final number (`#### 42`, else the last \\boxed{}, else the last one).
Outputs in --out: metrics.jsonl, curves.png, summary.json (held-out greedy accuracy and sampled pass@1 at the
rollout temperature, before and after), model/ and checkpoint/ (--save-every, Ctrl-C). Measured (mean ± sd over
seeds, the shared held-out set): README 'Results', `python tests/bench/cross_algorithm.py --seeds 0,1,2 --only grpo`.

Follows TRL's GRPOTrainer and nanochat's chat_rl.py. Simplified vs the paper: outcome rewards only (no process
supervision), no iterative reward-model retraining, a constant lr after a short warmup; with --num-iterations 1
(default) the update is exactly on-policy (ρ = 1, the clip never binds) and the old log-probs are not recomputed.
REINFORCE++ puts a k1 KL penalty into the reward; here --beta adds GRPO's k3 term to the loss. Weights and AdamW
state are fp32; on GPUs the forward passes run under bf16 autocast (pure-bf16 weights would round lr ~1e-6 away).
"""
import argparse, copy, os, time

import numpy as np
import torch
from tqdm.auto import tqdm

import common as C

# ----------------------------------------------------------------------------- the loss


def group_advantages(rewards, group_size, scale="group", estimator="grpo"):
    """rewards: (B,) with rows grouped by prompt (row i*G + j = sample j of prompt i). Returns (B,) advantages.
      'grpo'        r_i - mean(group)                                      (Shao et al. 2024)
      'rloo'        r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean(group))  (Ahmadian et al. 2024)
      'reinforce++' r_i - mean(batch): no group baseline                   (Hu 2025)
    then divided by the group's std ('group', the paper), by the whole batch's std ('batch'; REINFORCE++'s
    global normalisation) or not at all ('none'; Dr. GRPO, RLOO). std is the unbiased (n-1) one, as in torch
    and TRL. grpo/rloo: a group whose rewards are all equal gets exactly 0 (no 1e-4 blow-up of rounding)."""
    C.check(rewards.numel() % group_size == 0, f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size).float()                      # (n_groups, G)
    if estimator == "reinforce++":
        adv = g - g.mean()
    elif estimator in ("grpo", "rloo"):
        adv = (g - g.mean(1, keepdim=True)) * (group_size / (group_size - 1) if estimator == "rloo" else 1.0)
    else:
        raise C.InputError(f"estimator={estimator!r}: choose grpo, rloo or reinforce++")
    if scale == "group":
        adv = adv / (g.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (g.std() + 1e-4)
    elif scale != "none":
        raise C.InputError(f"scale={scale!r}: choose group, batch or none")
    if estimator != "reinforce++":
        adv = adv.masked_fill((g == g[:, :1]).all(1, keepdim=True), 0.0)   # nothing to learn in this group
    return adv.reshape(-1)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
              loss_type="grpo", max_completion_length=None, importance_sampling="token"):
    """The clipped GRPO surrogate (to minimise), token level. logps (B, T): log π_θ of the sampled tokens (with
    grad); old_logps (B, T): log π_old (None = logps.detach(), i.e. on-policy, ρ = 1); ref_logps (B, T) or None:
    log π_ref, used when beta > 0; advantages (B,); mask (B, T): 1 for completion tokens that count.
    Aggregation (the papers differ only here):
      'grpo'    per-sequence mean, then mean over the B sequences      (Shao et al. 2024, eq. 3)
      'dapo'    sum over all tokens / number of tokens in the batch    (Yu et al. 2025)
      'dr_grpo' sum over all tokens / (B * max_completion_length)      (Liu et al. 2025)
      'cispo'   dapo's sum, of -sg(min(ρ_it, 1+ε_high)) A_i log π_θ(o_it): the clipped ratio is a
                stop-gradient weight, so no token's gradient is dropped (MiniMax-M1, MiniMax 2025)
    importance_sampling='sequence' is GSPO (Zheng et al. 2025): one ratio per sequence,
    s_i = exp(1/|o_i| Σ_t log ρ_it), clipped per sequence (its paper's ε are ~3e-4/4e-4, not 0.2).
    max_completion_length defaults to T. Returns (loss, {'clip_frac', 'kl'}) with stats as detached token means."""
    m, mf = mask.bool(), mask.to(logps.dtype)                     # (B, T)
    old_logps = logps.detach() if old_logps is None else old_logps
    log_ratio = (logps - old_logps).masked_fill(~m, 0.0)          # padding: ρ = 1, never inf * 0
    if importance_sampling == "sequence":                         # (B, 1), broadcast over the tokens
        log_ratio = (log_ratio * mf).sum(1, keepdim=True) / mf.sum(1, keepdim=True).clamp(min=1)
    elif importance_sampling != "token":
        raise C.InputError(f"importance_sampling={importance_sampling!r}: choose token or sequence")
    ratio = log_ratio.exp()                                       # ρ_it (B, T), or s_i (B, 1)
    a = advantages[:, None].to(logps.dtype)                       # (B, 1): one advantage per sequence
    if loss_type == "cispo":
        per_token = -ratio.clamp(max=1 + eps_high).detach() * a * logps
    else:
        per_token = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if beta > 0:
        d = (ref_logps - logps).masked_fill(~m, 0.0)              # log π_ref/π_θ
        kl = d.exp() - d - 1                                       # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mf).sum(1) / mf.sum(1).clamp(min=1)).mean()
    elif loss_type in ("dapo", "cispo"):
        loss = (per_token * mf).sum() / mf.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * mf).sum() / (mf.shape[0] * (max_completion_length or mf.shape[1]))
    else:
        raise C.InputError(f"loss_type={loss_type!r}: choose grpo, dapo, dr_grpo or cispo")
    with torch.no_grad():  # the clip is active where it removed the gradient (PPO's pessimistic side)
        clipped = ((ratio > 1 + eps_high) if loss_type == "cispo" else   # cispo: where the weight was capped
                   ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0)))
        n = mf.sum().clamp(min=1)
        stats = {"clip_frac": (clipped & m).sum() / n, "kl": (kl * mf).sum() / n if beta > 0 else torch.zeros(())}
    return loss, stats


def rank_advantages(rewards, group_size, scale, estimator="grpo"):
    """This rank's advantages (B_local,) from its rewards, every group on one rank: the batch std needs
    all ranks' rewards, so they are gathered (rank order). Returns (advantages, global rewards)."""
    everything = torch.tensor(C.all_gather_list(rewards.tolist()), dtype=torch.float32)
    adv = group_advantages(everything, group_size, scale, estimator)
    n = rewards.numel()
    return adv[C.DIST.rank * n:(C.DIST.rank + 1) * n].to(rewards.device), everything


def batch_logprobs(model, ids, attn, n_completion, micro_batch):
    """log π (B, n_completion) without grad, micro_batch rows at a time (old / reference policy)."""
    return C.forward_chunks(lambda *a: C.token_logprobs(model, *a), ids, attn, n_completion, micro_batch)


def accumulate_policy_grads(model, ids, attn, loss_mask, adv, old_logps, ref_logps, micro_batch, step=0, amp=True,
                            **loss_kw):
    """Backward of grpo_loss over this rank's rollouts, micro_batch rows at a time. ids/attn (B, P+T) =
    [left-padded prompt | completion], loss_mask (B, T). Each micro-batch's loss is weighted by its share
    of the GLOBAL normaliser (sequences; dapo, cispo: tokens) times world_size, as DDP averages gradients
    over ranks: the result is one process's gradient on the global batch. Returns token-mean stats."""
    (B, T), W = loss_mask.shape, C.DIST.world_size
    by_token = loss_kw.get("loss_type") in ("dapo", "cispo")
    norm = C.all_reduce_mean(float(loss_mask.sum())) * W if by_token else B * W   # global tokens / sequences
    sums, n_tok = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0}, 0.0
    for rows in C.micro_batches(model, range(B), micro_batch, amp):  # DDP: one all-reduce, on the last
        sl = slice(rows[0], rows[-1] + 1)
        lp, ent = C.token_logprobs(model, ids[sl], attn[sl], T, entropy=True)
        loss, st = grpo_loss(lp, None if old_logps is None else old_logps[sl],
                             None if ref_logps is None else ref_logps[sl], adv[sl], loss_mask[sl], **loss_kw)
        k = float(loss_mask[sl].sum())
        share = (k if by_token else lp.shape[0]) / max(norm, 1.0) * W
        C.nan_guard(loss, step)
        (loss * share).backward()
        n_tok += k
        sums["loss"] += loss.item() * share  # rank-mean of these = the global loss
        sums["clip_frac"] += st["clip_frac"].item() * k
        sums["kl"] += st["kl"].item() * k
        sums["entropy"] += float((ent * loss_mask[sl]).sum())
    return {k: v if k == "loss" else v / max(n_tok, 1.0) for k, v in sums.items()}

# ----------------------------------------------------------------------------- flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GRPO: group-relative policy optimization with a verifier reward")
    p.add_argument("--model", default="tiny", help="'tiny' (built in), a local HF folder or a hub id")
    p.add_argument("--dataset", default=None, help="GSM8K/Countdown/MATH rows: hub id or local file (default: --task)")
    p.add_argument("--eval-dataset", default=None, help="held-out problems (default: the test split / last rows)")
    p.add_argument("--skip-bad-rows", action="store_true", help=C.SKIP_BAD_ROWS)
    p.add_argument("--task", default="arithmetic", help="built-in task: arithmetic, countdown or swaps (tiny-swaps)")
    p.add_argument("--difficulty", type=int, default=None, help="built-in task difficulty (digits / numbers / swaps)")
    p.add_argument("--train-n", type=int, default=None, help="training problems (default: 2000 built in, all rows)")
    p.add_argument("--eval-n", type=int, default=C.HELDOUT_N, help="held-out problems (built in: common.heldout)")
    C.add_run_flags(p, "grpo")  # --out, --seed, --device, --wandb, --trust-remote-code
    p.add_argument("--steps", type=int, default=200, help="rollout steps (generate, score, --num-iterations updates)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step, all ranks together")
    p.add_argument("--group-size", type=int, default=8, help="G: completions sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion budget; Dr. GRPO's constant normaliser")
    p.add_argument("--temperature", type=float, default=0.7, help="rollout sampling temperature (real models: 0.7-1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for rollouts")
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate (policy gradients: ~30x below SFT's)")
    p.add_argument("--warmup-steps", type=int, default=5, help="linear lr warmup (optimizer steps), then constant")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--beta", type=float, default=0.0, help="KL-to-reference weight; > 0 keeps a frozen reference copy")
    p.add_argument("--eps-low", type=float, default=0.2, help="ratio clip below: 1 - eps_low")
    p.add_argument("--eps-high", type=float, default=0.2, help="ratio clip above: 1 + eps_high (DAPO: 0.28)")
    p.add_argument("--loss-type", default="grpo", choices=["grpo", "dapo", "dr_grpo", "cispo"],
                   help="aggregation, or CISPO's weighted log-likelihood (grpo_loss)")
    p.add_argument("--importance-sampling", default="token", choices=["token", "sequence"],
                   help="one ratio per token, or per sequence (GSPO)")
    p.add_argument("--advantage", default="grpo", choices=["grpo", "rloo", "reinforce++"],
                   help="baseline: group mean, leave-one-out (RLOO) or batch mean (REINFORCE++)")
    p.add_argument("--scale-rewards", default=None, choices=["group", "batch", "none"], help="advantage std: per "
                   "group, over the batch or none (Dr. GRPO); default: group (grpo), none (rloo), batch (reinforce++)")
    p.add_argument("--num-iterations", type=int, default=1, help="updates per rollout batch (mu; > 1: the clip acts)")
    p.add_argument("--format-reward", type=float, default=0.0, help="reward for a well-formed answer (format_ok)")
    p.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut off (DAPO)")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per forward/backward (gradient accumulation)")
    p.add_argument("--grad-checkpointing", action="store_true", help="trade compute for activation memory")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 1 for tiny, whose ops are too small "
                   "to split, else torch's default)")
    p.add_argument("--no-autocast", action="store_true", help="fp32 forward passes on GPUs too (default: bf16)")
    p.add_argument("--eval-every", type=int, default=50, help="held-out greedy accuracy every N steps (0: at the ends)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out problem for pass@k (0: none)")
    p.add_argument("--pass-k", type=int, default=1, help="k for pass@k (with --eval-samples)")
    p.add_argument("--save-every", type=int, default=0, help="write <out>/checkpoint every N steps (0: on Ctrl-C only)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    args = p.parse_args(argv)
    C.check(args.group_size >= 2,
            f"--group-size must be >= 2: GRPO's advantages compare samples within a group, got {args.group_size}")
    C.check_flags(args, {"> 0": "lr grad_clip temperature", ">= 1": "steps prompts_per_step max_new_tokens "
                         "num_iterations micro_batch eval_n train_n", "in [0, 1)": "eps_low", "in (0, 1]": "top_p",
                         ">= 0": "warmup_steps threads eval_every eval_samples save_every beta weight_decay "
                         "format_reward eps_high"})
    C.check(args.pass_k >= 1 and (not args.eval_samples or args.pass_k <= args.eval_samples),
            f"--pass-k must be in [1, --eval-samples], got {args.pass_k}")
    args.model = C.task_model(args.model, args.task, args.dataset)  # tiny-<task> for a task tiny never saw
    args.scale_rewards = args.scale_rewards or dict(grpo="group", rloo="none").get(args.advantage, "batch")
    return args

# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    tiny = args.model in ("tiny", "tiny-untrained")  # one thread: its ops are too small to split
    d = C.setup(args.seed, args.device, out=args.out, threads=args.threads or int(tiny))
    C.check_ranks(args.prompts_per_step, "--prompts-per-step")  # every group on one rank
    t_start = time.time()

    # -- data: problems with a prompt (text or chat messages) and a checkable answer
    if args.dataset:
        train, test = C.train_test_problems(args.dataset, args.eval_dataset, args.train_n, args.eval_n,
                                            args.skip_bad_rows)
    else:
        train = C.make_task(args.task, args.train_n or 2000, args.seed, "train", args.difficulty)
        test = C.heldout(args.task, args.eval_n, args.difficulty)
    C.print0(f"[grpo] {len(train)} training problems, {len(test)} held out; {d.world_size} rank(s) on {d.device}")

    # -- models: the policy (fp32 master weights) and, only when beta > 0, a frozen reference
    model, tok = C.load_model(args.model, device=d.device, dtype=torch.float32,
                              trust_remote_code=args.trust_remote_code)
    C.warn_unknown_chars(tok, train + test, args.dataset)
    C.dropout_off(model)  # ρ must be exactly 1 on the first update
    ref = copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 else None
    autocast = lambda: C.autocast(enabled=not args.no_autocast)
    eval_kw = dict(samples=args.eval_samples, k=args.pass_k, temperature=args.temperature,
                   max_new_tokens=args.max_new_tokens)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    sched = C.lr_schedule(opt, args.warmup_steps + 1)
    ckpt, start = os.path.join(args.out, "checkpoint"), 0
    if args.resume:  # the checkpoint also restores the RNG: the next samples are the ones we would have drawn
        start, extra = C.load_checkpoint(ckpt, model, opt, sched)
        before = extra["before"]
        C.print0(f"[grpo] resumed from {ckpt} at step {start}")
    else:
        with autocast():  # plain floats: state.pt loads with weights_only
            before = {k: float(v) for k, v in C.evaluate(model, tok, test, **eval_kw).items()}
    C.print0(f"[grpo] held-out before: {before}")
    if args.grad_checkpointing:  # newer transformers renamed it: the old name warns there
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = C.ddp(model.train())
    logger = C.Logger(args.out, config=vars(args), wandb=args.wandb, resume_step=start - 1 if args.resume else None)
    G, micro = args.group_size, args.micro_batch
    loss_kw = dict(eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta, loss_type=args.loss_type,
                   max_completion_length=args.max_new_tokens, importance_sampling=args.importance_sampling)

    def save(step, rng=None):  # rng: the state at the start of an interrupted step, which --resume redoes
        C.save_checkpoint(ckpt, model, tok, step, opt, sched, extra={"before": before}, rng=rng)
        return f"[grpo] interrupted: checkpoint at step {step} in {ckpt}; continue with --resume"

    step, rng0 = start, None
    with C.ctrl_c(lambda: save(step, rng0)):
        for step in tqdm(range(start, args.steps), desc="grpo", disable=not d.master or None, initial=start,
                         total=args.steps):
            t0, rng0 = time.time(), C.rng_state()
            # -- 1. rollouts: G samples for each of this rank's prompts (rows grouped by prompt)
            problems = d.shard([train[i] for i in C.batch_indices(step, args.prompts_per_step, len(train), args.seed)])
            with autocast():
                roll = C.generate(policy, tok, [p["prompt"] for p in problems], n=G, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p)
            t_gen = time.time() - t0
            # -- 2. rewards: the verifier (+ optional format bonus) -> group-relative advantages
            correct = [float(C.verify(problems[i // G], t)) for i, t in enumerate(roll["texts"])]
            rewards = torch.tensor([c + args.format_reward * C.format_ok(problems[i // G], t)
                                    for i, (c, t) in enumerate(zip(correct, roll["texts"]))], device=d.device)
            adv, all_r = rank_advantages(rewards, G, args.scale_rewards, args.advantage)
            ids, attn, T = roll["ids"], roll["mask"], roll["completion_ids"].shape[1]   # (B, P+T), T new tokens
            loss_mask = roll["completion_mask"].float()                              # (B, T), incl. EOS
            if args.mask_truncated:  # no EOS: we do not know if the answer would have been right
                loss_mask = loss_mask * roll["has_eos"][:, None].float()
            # -- 3. old / reference log-probs, once per rollout (on-policy with 1 iteration: skipped)
            with autocast():
                old = batch_logprobs(model, ids, attn, T, micro) if args.num_iterations > 1 else None
                ref_lp = batch_logprobs(ref, ids, attn, T, micro) if ref is not None else None
            # -- 4. num_iterations AdamW updates on the same rollouts
            for _ in range(args.num_iterations):
                opt.zero_grad(set_to_none=True)
                st = accumulate_policy_grads(policy, ids, attn, loss_mask, adv, old, ref_lp, micro, step=step,
                                             amp=not args.no_autocast, **loss_kw)
                grad_norm = C.clip_grad(model, args.grad_clip)
                opt.step(); sched.step()
            # -- 5. metrics (global: rewards were gathered; the rest is averaged over ranks)
            m = dict(reward=all_r.mean().item(), reward_std=all_r.std().item(),
                     accuracy=C.all_reduce_mean(float(np.mean(correct))),
                     frac_zero_std=(all_r.view(-1, G).std(1) == 0).float().mean().item(),
                     **{k: C.all_reduce_mean(v) for k, v in st.items() if k != "kl" or args.beta > 0},
                     completion_len=C.all_reduce_mean(float(roll["completion_mask"].sum(1).float().mean())),
                     truncated=C.all_reduce_mean(float((~roll["has_eos"]).float().mean())), grad_norm=grad_norm,
                     lr=sched.get_last_lr()[0], gen_time=t_gen, step_time=time.time() - t0)
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                with autocast():
                    m["eval_accuracy"] = C.evaluate(model, tok, test, max_new_tokens=args.max_new_tokens)["accuracy"]
            logger.log(step, **m)
            if args.save_every and (step + 1) % args.save_every == 0:
                save(step + 1)

    # -- evaluation, summary, final model
    model.eval()
    with autocast():
        after = {k: float(v) for k, v in C.evaluate(model, tok, test, **eval_kw).items()}
    rows = C.read_metrics(args.out) if d.master else []
    avg = lambda k, rs: float(np.mean([r[k] for r in rs])) if rows else None  # over metrics rows
    summary = dict(model=args.model, dataset=args.dataset or args.task, steps=args.steps, world_size=d.world_size,
                   **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                   train_reward_first10=avg("reward", rows[:10]), train_reward_last10=avg("reward", rows[-10:]),
                   frac_zero_std_mean=avg("frac_zero_std", rows), sec_per_step=avg("step_time", rows),
                   wall_s=time.time() - t_start)
    C.plot_metrics(args.out, ["reward", "accuracy", "eval_accuracy", "frac_zero_std", "clip_frac", "kl", "entropy"],
                   "curves.png", title=f"GRPO on {args.dataset or args.task}")
    if d.master:
        C.save_pretrained_atomic(os.path.join(args.out, "model"), model, tok)
    C.write_summary(args.out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
