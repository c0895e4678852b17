"""ppo_lm.py: PPO for language models with a value head and a KL penalty (RLHF step 3), from scratch.

RLHF (Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano, Irving 2019, "Fine-Tuning Language Models from Human
Preferences", arXiv:1909.08593; Stiennon et al. 2020; InstructGPT, Ouyang et al. 2022, eq. 2) fine-tunes a policy π_θ,
initialised from the SFT model π_ref, to maximise E[r(x, y)] - β KL(π_θ(·|x) || π_ref(·|x)). Each generated token is
one action of an episode that ends at EOS, rewarded r_t = -β (log π_old(y_t) - log π_ref(y_t)) (k1; --kl-estimator
k3), plus the reward model's score(x, y) on the last token. A value head V(s_t) turns these into per-token
advantages with GAE (Schulman et al. 2016), and PPO (Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal
Policy Optimization Algorithms", arXiv:1707.06347) takes --ppo-epochs passes of clipped policy + value updates over
minibatches of each rollout. β is fixed, or adaptive (Ziegler et al. 2019 sec. 2.2: nudged towards --kl-target).
V is a Linear on the policy's last hidden states (TRL's AutoModelForCausalLMWithValueHead), not a critic made from
the RM (which may use another tokenizer): one policy-sized model in memory; the value loss also moves the trunk.

Run:
    python ppo_lm.py                         # tiny model, verifier reward (1/0) on 3-digit addition, CPU
    python reward_model.py && python ppo_lm.py --reward-model out/reward_model/model    # SFT -> RM -> PPO
    python ppo_lm.py --task reviews          # positive movie reviews, a sentiment RM (README 'The reviews world')
    python tests/bench/kl_sweep.py --seeds 0,1,2      # the reviews world at several β: the alignment tax
    python reward_model.py --train-n 64 --out out/rm_weak && \\
        python ppo_lm.py --reward-model out/rm_weak/model --overopt --steps 40   # overoptimization (Gao et al. 2022)
    python ppo_lm.py --model lvwerra/gpt2-imdb --reward-model lvwerra/distilbert-imdb --dataset stanfordnlp/imdb \\
        --max-new-tokens 16 --batch-size 256 --mini-batch 64 --micro-batch 64 --lr 1.41e-5 --init-kl-coef 0.2 \\
        --kl-target 6 --ppo-epochs 4 --steps 100 --eval-n 256   # TRL's old gpt2-sentiment notebook
    torchrun --nproc_per_node 4 ppo_lm.py --model ... --batch-size 256    # rollouts sharded over ranks
Outputs in --out: metrics.jsonl, curves.png, summary.json (before/after), model/ (+ value_head.pt), checkpoint/.
Simplified vs the papers: one sample per prompt, a fixed completion budget, no reward normalisation, no PPO-ptx
pretraining mix, no value warm-up, a constant lr; a completion cut off by the budget counts as finished (no bootstrap).
"""
import argparse, copy, os, random, time

import numpy as np
import torch
from tqdm.auto import tqdm

import common as C

# ----------------------------------------------------------------------------- the pieces of PPO-RLHF


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation over the tokens of each completion (Schulman et al. 2016, eq. 16).
    rewards, values, mask: (B, T); mask 1 = a real token (an action). Masked positions are skipped as if absent
    (their rewards and values are never read); after a row's last real token V = 0.
        delta_t = r_t + gamma V(s_t+1) - V(s_t),   A_t = delta_t + gamma lam A_t+1,   R_t = A_t + V(s_t)
    Returns advantages, returns: (B, T), 0 at masked positions."""
    m, adv = mask.bool(), torch.zeros_like(rewards)
    last_adv, next_v = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        a = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last_adv
        last_adv = torch.where(m[:, t], a, last_adv)            # a masked position leaves the recursion alone
        next_v = torch.where(m[:, t], values[:, t], next_v)
        adv[:, t] = torch.where(m[:, t], a, torch.zeros_like(a))
    return adv, torch.where(m, adv + values, torch.zeros_like(adv))


def ppo_loss(logprobs, old_logprobs, values, old_values, advantages, returns, mask, clip_eps=0.2, vf_clip=0.2,
             vf_coef=0.1):
    """Clipped PPO loss to minimise (Schulman et al. 2017, eq. 7 and 9), a token mean over `mask`.
    All (B, T): log π_θ(y_t) (with grad), log π_old(y_t) (rollout), V_θ(s_t) (with grad), V_old(s_t),
    advantages A_t (whitened), returns R_t = A_t + V_old(s_t), mask (1 = real token).
        ρ_t = exp(log π_θ - log π_old),   L_pg = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1 - ε, 1 + ε))
        L_vf = mean_t 1/2 max((V - R)^2, (V_old + clip(V - V_old, -ε_v, ε_v) - R)^2)   (vf_clip=None: no clip)
        loss = L_pg + vf_coef * L_vf
    Returns (loss, stats: pg_loss, vf_loss, clip_frac, vf_clip_frac, approx_kl), stats detached."""
    m = mask.bool()
    n = m.sum().clamp(min=1)
    mean = lambda x: torch.where(m, x, torch.zeros_like(x)).sum() / n
    log_ratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))  # padding: ρ = 1
    ratio = log_ratio.exp()
    pg1, pg2 = -advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    vf1 = (values - returns) ** 2
    vf2 = vf1 if vf_clip is None else (old_values + (values - old_values).clamp(-vf_clip, vf_clip) - returns) ** 2
    pg_loss, vf_loss = mean(torch.max(pg1, pg2)), 0.5 * mean(torch.max(vf1, vf2))
    with torch.no_grad():  # approx_kl: k3 of KL(π_old || π_θ)
        stats = dict(pg_loss=pg_loss.detach(), vf_loss=vf_loss.detach(), clip_frac=mean((pg2 > pg1).float()),
                     vf_clip_frac=mean((vf2 > vf1).float()), approx_kl=mean(ratio - 1 - log_ratio))
    return pg_loss + vf_coef * vf_loss, stats


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1"):
    """Per-token rewards (Ziegler et al. 2019 eq. 2): r_t = -β KL_t, plus the score on the last real token.
    scores (B,); logprobs, ref_logprobs, mask (B, T). KL_t per sampled token:
        k1 = log π_old(y_t) - log π_ref(y_t)           (unbiased for KL(π||π_ref), can be < 0)
        k3 = e^(-k1) + k1 - 1                          (unbiased too, always >= 0, lower variance)
    Returns rewards (B, T), kl (B, T), both 0 at masked positions."""
    d = logprobs - ref_logprobs
    kl = (d if estimator == "k1" else (-d).exp() + d - 1) * mask
    rewards = -kl_coef * kl
    last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(1)   # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the real tokens of all ranks (TRL's masked_whiten); 0 at masked positions."""
    m = mask.float()
    n, s, ss = C.all_reduce_mean(torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()]).double()).tolist()
    var = (ss / n - (s / n) ** 2) * n / max(n - 1, 1)               # unbiased, like TRL
    return (x - s / n) / (max(var, 0.0) + eps) ** 0.5 * m


class AdaptiveKLController:
    """β of the KL penalty (Ziegler et al. 2019, sec. 2.2). target=None: fixed β. Otherwise a
    proportional controller: e = clip(KL / target - 1, -0.2, 0.2),  β <- β (1 + e n_steps / horizon)."""

    def __init__(self, init_kl_coef, target=None, horizon=10000):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        if self.target:
            self.value *= 1 + float(np.clip(current_kl / self.target - 1, -0.2, 0.2)) * n_steps / self.horizon

# ----------------------------------------------------------------------------- flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="PPO-RLHF: a policy with a value head, a KL penalty and a reward model")
    p.add_argument("--model", default="tiny", help="the SFT policy: 'tiny' (built in), a local HF folder or a hub id")
    p.add_argument("--dataset", default=None, help="hub id or file of `text` or GSM8K-style rows (default: --task)")
    p.add_argument("--skip-bad-rows", action="store_true", help=C.SKIP_BAD_ROWS)
    p.add_argument("--task", default="arithmetic", help="built-in task: arithmetic, countdown, swaps or reviews")
    p.add_argument("--reward", default=None, choices=["verifier", "model"], help="default: model with --reward-model")
    p.add_argument("--reward-model", default=None, help="a classifier: reward_model.py's <out>/model or a hub id")
    p.add_argument("--reward-label", type=int, default=None, help="its reward logit (default: 0; 2 labels: 1)")
    p.add_argument("--missing-eos-penalty", type=float, default=0.0, help="minus this for a completion without EOS")
    p.add_argument("--train-n", type=int, default=None, help="training prompts (default: 2000; texts 5000; all rows)")
    p.add_argument("--eval-n", type=int, default=C.HELDOUT_N, help="held-out prompts (built in: common.heldout)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps too (0: at the ends)")
    C.add_run_flags(p, "ppo_lm")  # --out, --seed, --device, --wandb, --trust-remote-code
    p.add_argument("--steps", type=int, default=60, help="PPO iterations (rollouts, rewards, GAE, updates)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts (= completions) per rollout, all ranks")
    p.add_argument("--mini-batch", type=int, default=32, help="completions per optimizer step, all ranks")
    p.add_argument("--micro-batch", type=int, default=32, help="completions per forward/backward on one rank")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout batch (TRL: 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion budget (default 40; reviews 64)")
    p.add_argument("--temperature", type=float, default=None, help="rollouts' π = softmax(logits / T) (1; reviews 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for rollouts (1.0: off)")
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate of the policy")
    p.add_argument("--vf-lr", type=float, default=1e-3, help="AdamW learning rate of the (new) value head")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--init-kl-coef", type=float, default=None, help="β, the KL penalty's weight (0.05; reviews 0.2)")
    p.add_argument("--kl-target", type=float, default=None, help="adaptive β: target KL per completion (TRL: 6)")
    p.add_argument("--kl-horizon", type=float, default=10000, help="adaptive β: controller horizon (completions)")
    p.add_argument("--kl-estimator", default="k1", choices=["k1", "k3"], help="per-token KL in the reward")
    p.add_argument("--gamma", type=float, default=1.0, help="discount over tokens")
    p.add_argument("--lam", type=float, default=0.95, help="GAE λ (1 = Monte Carlo returns minus V)")
    p.add_argument("--clip-eps", type=float, default=0.2, help="policy ratio clip ε")
    p.add_argument("--vf-clip", type=float, default=0.2, help="value clip around the rollout's values (0 = none)")
    p.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
    p.add_argument("--overopt", action="store_true", help="proxy score and gold accuracy against KL (a weak RM)")
    p.add_argument("--no-autocast", action="store_true", help="fp32 forward passes on GPUs too (default: bf16)")
    p.add_argument("--save-every", type=int, default=0, help="write <out>/checkpoint every N steps (0: on Ctrl-C)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    args = p.parse_args(argv)
    reviews = args.task == "reviews" and not args.dataset  # week 3's world: its sentiment RM is built in
    for k, v in dict(max_new_tokens=(64, 40), temperature=(0.7, 1.0), init_kl_coef=(0.2, 0.05)).items():  # README
        setattr(args, k, v[not reviews] if getattr(args, k) is None else getattr(args, k))   # 'The reviews world'
    if reviews and args.reward != "verifier":
        args.reward_model = args.reward_model or C.REVIEWS_RM
    C.check_flags(args, {">= 1": "steps batch_size mini_batch micro_batch ppo_epochs max_new_tokens eval_n "
                                 "eval_samples", "> 0": "lr vf_lr grad_clip temperature kl_horizon kl_target",
                         ">= 0": "init_kl_coef missing_eos_penalty vf_clip vf_coef eval_every save_every",
                         "in (0, 1]": "top_p", "in (0, 1)": "clip_eps", "in [0, 1]": "gamma lam"})
    C.check(args.batch_size % args.mini_batch == 0,
            f"--batch-size {args.batch_size} must be divisible by --mini-batch {args.mini_batch}")
    args.reward = args.reward or ("model" if args.reward_model else "verifier")
    C.check(args.reward == "verifier" or args.reward_model, "--reward model needs --reward-model <folder or hub id>")
    C.check(not args.overopt or args.reward == "model", "--overopt needs a (weak) --reward-model, e.g. "
            "`python reward_model.py --train-n 64 --out out/rm_weak` then --reward-model out/rm_weak/model")
    args.eval_every = args.eval_every or (max(1, args.steps // 10) if args.overopt else 0)
    args.model = C.task_model(args.model, args.task, args.dataset)  # tiny-<task> for a task tiny never saw
    return args

# ----------------------------------------------------------------------------- rewards, data, rollouts


def load_data(args, tok):
    """(train, test) problems: the built-in task, GSM8K/Countdown/MATH rows (verifiable), or rows with a `text`
    field (C.text_prompts: review prefixes, no verifier). A local file holds out its last --eval-n rows."""
    if not args.dataset:
        return C.make_task(args.task, args.train_n or 2000, args.seed, "train"), C.heldout(args.task, args.eval_n)
    rows = C.read_rows(args.dataset, "train")
    C.check(rows, f"--dataset {args.dataset}: no rows")
    C.warn_unknown_chars(tok, rows, args.dataset)
    if "text" in rows[0]:
        return C.text_prompts(args.dataset, rows, tok, args.train_n or 5000, args.eval_n, args.seed)
    return C.train_test_problems(args.dataset, None, args.train_n, args.eval_n, args.skip_bad_rows)


@torch.no_grad()
def rollout(ac, ref, tok, problems, score_fn, args, n=1):
    """n samples per problem at the rollout temperature, scored, with their log-probs under π and π_ref:
    (generate()'s dict, ids and attn (B, P+T) = [left-padded prompt | completion], completion mask (B, T)
    (incl. EOS), scores (B,), log π (B, T), V (B, T), entropy (B, T), log π_ref (B, T)), B = n x problems."""
    with C.autocast(enabled=not args.no_autocast):
        roll = C.generate(ac.lm, tok, [p["prompt"] for p in problems], n=n, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p)
        ids = torch.cat([roll["prompt_ids"], roll["completion_ids"]], 1)
        attn = torch.cat([roll["prompt_mask"], roll["completion_mask"]], 1)
        T, mask = roll["completion_ids"].shape[1], roll["completion_mask"].float()
        scores = score_fn([p for p in problems for _ in range(n)], roll["texts"])
        lp, v, ent = C.forward_chunks(ac, ids, attn, T, args.micro_batch)
        ref_lp = C.forward_chunks(lambda *a: C.lm_forward(ref, None, *a, args.temperature), ids, attn, T,
                                  args.micro_batch)[0]
    return roll, ids, attn, mask, scores, lp, v, ent, ref_lp


def evaluate_policy(ac, ref, tok, test, score_fn, args, has_gold):
    """Held-out, sharded over ranks: --eval-samples samples per prompt -> mean proxy score, KL(π||π_ref) per
    completion (k1 summed over tokens), gold accuracy of the samples (verifier; reviews: the positive share),
    diversity (per-token entropy, token distinct-2, the share of distinct samples per prompt, C.diversity's word
    distinct-1/2 and self-similarity); plus greedy gold accuracy."""
    mine, k, mean = C.DIST.shard(test), args.eval_samples, C.all_reduce_mean
    roll, _, _, mask, scores, lp, _, ent, ref_lp = rollout(ac, ref, tok, mine, score_fn, args, n=k)
    toks = C.all_gather_list([c[r.bool()].tolist() for c, r in zip(roll["completion_ids"], roll["completion_mask"])])
    texts = C.all_gather_list(roll["texts"])
    res = dict(score=mean(scores.mean().item()), kl=mean(((lp - ref_lp) * mask).sum(1).mean().item()),
               entropy=mean(((ent * mask).sum() / mask.sum()).item()), distinct_2=C.distinct_n(toks, 2),
               unique=float(np.mean([len(set(texts[i:i + k])) / k for i in range(0, len(texts), k)])),
               length=mean(mask.sum(1).mean().item()), **{f"words_{name}": v for name, v in C.diversity(texts).items()})
    if has_gold:
        res["gold_sampled"] = mean(float(np.mean([C.verify(mine[i // k], t) for i, t in enumerate(roll["texts"])])))
        with C.autocast(enabled=not args.no_autocast):
            res["gold_accuracy"] = C.evaluate(ac.lm, tok, test, max_new_tokens=args.max_new_tokens)["accuracy"]
    return res

# ----------------------------------------------------------------------------- main: one PPO-RLHF run


def main(argv=None) -> dict:
    args = parse_args(argv)
    d, t_start = C.setup(args.seed, args.device, out=args.out), time.time()
    W, out, ckpt, start = d.world_size, args.out, os.path.join(args.out, "checkpoint"), 0
    C.check_ranks(args.batch_size); C.check_ranks(args.mini_batch, "--mini-batch")
    # -- models: policy + value head (fp32 master weights), frozen reference, reward
    model, tok = C.load_model(args.model, device=d.device, dtype=torch.float32,
                              trust_remote_code=args.trust_remote_code)
    C.dropout_off(model)  # ρ must be exactly 1 on the first update
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    ac = C.PolicyWithValue(model, args.temperature).to(d.device)  # V: a Linear on the last hidden states
    train, test = load_data(args, tok)
    has_gold = test[0]["answer"] is not None
    C.check(args.reward == "model" or has_gold, f"--dataset {args.dataset}: no answers to verify; pass --reward-model")
    C.check(has_gold or not args.overopt, f"--overopt needs a gold verifier: --dataset {args.dataset} has no answers")
    C.check(len(train) >= args.batch_size, f"{len(train)} training prompts, fewer than --batch-size {args.batch_size}")
    C.print0(f"[ppo_lm] {len(train)} training prompts, {len(test)} held out; reward: "
             f"{args.reward_model or 'verifier'}; {W} rank(s) on {d.device}")
    score_fn = C.scorer(args.reward_model if args.reward == "model" else None, args.reward_label, d.device,
                        args.micro_batch, args.trust_remote_code)  # the verifier, or the RM's logit --reward-label
    evaluate = lambda: evaluate_policy(ac, ref, tok, test, score_fn, args, has_gold)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": args.lr},
                             {"params": ac.v_head.parameters(), "lr": args.vf_lr}], weight_decay=0.0)
    kl_ctl = AdaptiveKLController(args.init_kl_coef, args.kl_target, args.kl_horizon)
    if args.resume:  # weights, AdamW, RNG; the value head and β travel in `extra`
        start, extra = C.load_checkpoint(ckpt, model, opt)
        ac.v_head.load_state_dict(extra["v_head"]); kl_ctl.value, before = extra["kl_coef"], extra["before"]
        C.print0(f"[ppo_lm] resumed from {ckpt} at step {start}")
    else:
        before = evaluate()
    C.print0(f"[ppo_lm] held-out before: {before}")
    policy, B, mb = C.ddp(ac), args.batch_size // W, args.mini_batch // W
    logger = C.Logger(out, config=vars(args), wandb=args.wandb, resume_step=start - 1 if args.resume else None)
    def save(done, rng=None):  # rng: the state at the start of an interrupted step, which --resume redoes
        C.save_checkpoint(ckpt, model, tok, done, opt, rng=rng, extra={
            "v_head": ac.v_head.state_dict(), "kl_coef": kl_ctl.value, "before": before})
        return f"[ppo_lm] interrupted: checkpoint at step {done} in {ckpt}; continue with --resume"

    step, rng0 = start, None
    with C.ctrl_c(lambda: save(step, rng0)):
        for step in tqdm(range(start, args.steps), desc="ppo", disable=not d.master or None, initial=start,
                         total=args.steps):
            t0, rng0 = time.time(), C.rng_state()
            # -- 1. rollouts, one completion per prompt (the prompts: a function of seed and step), scored;
            # old log-probs / values and reference log-probs, once per batch
            pick = random.Random(args.seed * 1_000_003 + step).sample(range(len(train)), args.batch_size)
            problems = d.shard([train[i] for i in pick])
            roll, ids, attn, mask, raw, old_lp, old_v, ent, ref_lp = rollout(ac, ref, tok, problems, score_fn, args)
            scores = raw - args.missing_eos_penalty * (~roll["has_eos"]).float()
            # -- 2. per-token rewards (KL penalty + score at the last token) -> GAE -> whitened advantages
            rewards, kl = token_rewards(scores, old_lp, ref_lp, mask, kl_ctl.value, args.kl_estimator)
            adv, returns = gae(rewards, old_v, mask, args.gamma, args.lam)
            adv = masked_whiten(adv, mask)
            # -- 3. PPO: --ppo-epochs passes over shuffled minibatches; every rank runs the same number of updates
            sums, n_upd = {}, 0
            for _ in range(args.ppo_epochs):
                perm = torch.randperm(B, device=d.device)
                for i in range(0, B, mb):
                    idx = perm[i:i + mb]                                        # this rank's minibatch rows
                    n_glob = C.all_reduce_mean(float(mask[idx].sum())) * W  # token mean over the global minibatch
                    opt.zero_grad(set_to_none=True)
                    for j in C.micro_batches(policy, idx, args.micro_batch, amp=not args.no_autocast):
                        lp, v, _ = policy(ids[j], attn[j], mask.shape[1])
                        loss, st = ppo_loss(lp, old_lp[j], v, old_v[j], adv[j], returns[j], mask[j], args.clip_eps,
                                            args.vf_clip or None, args.vf_coef)
                        C.nan_guard(loss, step)
                        (loss * float(mask[j].sum()) / n_glob * W).backward()  # DDP averages over ranks
                        for k, val in st.items():
                            sums[k] = sums.get(k, 0.0) + val.item() * float(mask[j].sum()) / float(mask[idx].sum())
                    grad_norm = C.clip_grad(ac, args.grad_clip)
                    opt.step(); n_upd += 1
            # -- 4. adapt β to the batch's KL (per completion, global), log
            kl_seq = C.all_reduce_mean(kl.sum(1).mean().item())
            kl_ctl.update(kl_seq, args.batch_size)
            g, real = lambda x: C.all_reduce_mean(float(x)), mask.bool()
            m = dict(score=g(raw.mean()), reward=g((rewards * mask).sum(1).mean()), kl=kl_seq, kl_coef=kl_ctl.value,
                     **{k: g(v / n_upd) for k, v in sums.items()}, entropy=g((ent * mask).sum() / mask.sum()),
                     value=g((old_v * mask).sum() / mask.sum()), grad_norm=grad_norm,
                     explained_var=g(1 - (returns - old_v)[real].var() / returns[real].var().clamp(min=1e-8)),
                     completion_len=g(mask.sum(1).mean()), truncated=g((~roll["has_eos"]).float().mean()),
                     step_time=time.time() - t0)
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                m.update({f"eval_{k}": v for k, v in evaluate().items()})
            logger.log(step, **m)
            if args.save_every and (step + 1) % args.save_every == 0:
                save(step + 1)

    # -- evaluation, summary, final model (a plain causal-LM folder + value_head.pt)
    after, rows = evaluate(), C.read_metrics(out) if d.master else []
    avg = lambda rs: float(np.mean([r["score"] for r in rs])) if rows else None
    curve = [dict(step=-1, **before)] + [dict(step=r["step"], **{k[5:]: v for k, v in r.items() if k[:5] == "eval_"})
                                         for r in rows if "eval_score" in r] + [dict(step=args.steps - 1, **after)]
    summary = dict(model=args.model, reward=args.reward_model or "verifier", dataset=args.dataset or args.task,
                   steps=args.steps, kl_coef=args.init_kl_coef, kl_coef_final=kl_ctl.value, world_size=W,
                   **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                   train_score_first10=avg(rows[:10]), train_score_last10=avg(rows[-10:]), curve=curve,
                   wall_s=time.time() - t_start)
    C.plot_metrics(out, ["score", "kl", "entropy", "clip_frac", "explained_var"], "curves.png",
                   title=f"PPO on {args.dataset or args.task}")
    if d.master:
        C.save_pretrained_atomic(os.path.join(out, "model"), model, tok)
        torch.save(ac.v_head.state_dict(), os.path.join(out, "model", "value_head.pt"))
    if args.overopt:  # Gao et al. 2022: the proxy keeps rising with KL; does gold rise, then fall?
        gold = [p["gold_accuracy"] for p in curve]
        peak = int(np.argmax(gold))
        C.plot_twin(out, [p["kl"] for p in curve], {"proxy score (RM)": [p["score"] for p in curve]},
                    {"gold accuracy (verifier, greedy)": gold}, "overopt.png", "Overoptimization: proxy vs gold",
                    xlabel="KL(π || π_ref) per completion (nats)")
        summary["overopt"] = dict(gold_start=gold[0], gold_peak=gold[peak], kl_at_peak=curve[peak]["kl"],
                                  gold_end=gold[-1], proxy_start=curve[0]["score"], proxy_end=curve[-1]["score"],
                                  rises_then_falls=bool(gold[peak] > gold[0] + 0.03 and gold[-1] < gold[peak] - 0.03))
    C.write_summary(out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
