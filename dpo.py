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
DPO vs PPO (ppo_lm.py): both optimise eq. 3, PPO on-policy with a reward model, a critic and fresh
samples; DPO offline, at supervised cost, with the policy's own log-ratio as the reward model. The
price: it learns only from the responses in the data (no exploration).

Run:
    python dpo.py                                    # built-in arithmetic pairs, tiny model, CPU
    python dpo.py --eval-winrate                     # + win/tie/loss of DPO vs start, verifier as judge
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset HuggingFaceH4/ultrafeedback_binarized \\
        --train-n 20000 --steps 600 --batch-size 64 --micro-batch-size 4 --lr 5e-7 --warmup-steps 60 --rpo-alpha 0 \\
        --max-len 1024 --eval-winrate --eval-prompts mt_bench__question.jsonl \\
        --judge-lm Qwen/Qwen2.5-7B-Instruct --max-new-tokens 512
    torchrun --nproc_per_node=8 dpo.py ...           # same flags; --batch-size stays the global batch
    torchrun --nproc_per_node=8 dpo.py --fsdp ...    # FSDP2: the model sharded over the ranks (no checkpoints)
    python dpo.py --save-every 50 ...; python dpo.py --resume ...   # resume is exact on CPU
Outputs in --out (default out/dpo): metrics.jsonl, rewards.png, loss.png, logps.png, winrate.jsonl,
model/ (HF folder), checkpoint/ (with --save-every or Ctrl-C), summary.json.

The built-in pairs (--builtin model): 4096 training prompts, 2 samples each at T=0.7 from the start
model; every prompt with a wrong sample gives (reference solution, that wrong answer), so the
rejected answers are the model's own mistakes (common.own_mistakes). Measured results and the
ablations (the RPO NLL term, plain DPO, hand-made errors): README 'Results',
`python tests/bench/cross_algorithm.py --seeds 0,1,2 --only dpo`.

Variants (dpo_loss): --loss-type sigmoid_norm (length-normalised DPO) and simpo (SimPO, no reference, margin
--simpo-gamma); both want a larger --beta (per-token margins are small); README 'Preference-loss variants'.
IPO, KTO and ORPO are in kto_ipo.py.

Simplified vs the paper / TRL's DPOTrainer (beta 0.1, sigmoid loss): AdamW (paper: RMSprop, lr 1e-6) with
linear warmup then a constant lr; pairs with over-long prompts are dropped and completions truncated to
--max-len; cDPO label smoothing (Mitchell 2023) but not TRL's other loss types; no padding-free packing, no
PEFT. The win rate (common.win_rate) uses greedy answers and judges only the first MT-Bench turn.
"""
import argparse, functools, os, time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             label_smoothing=0.0, loss_type="sigmoid", chosen_lengths=None, rejected_lengths=None, gamma=0.0):
    """Per-pair DPO loss (Rafailov et al. 2023, eq. 7), with cDPO label smoothing, and two variants.

    Inputs: (B,) log pi(y|x) summed over each completion's tokens, for the policy and the
    reference on the chosen (y_w) and rejected (y_l) completions.
        h      = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
        loss   = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    eps = label_smoothing is the assumed probability that a label is flipped (conservative DPO);
    eps = 0 is plain DPO. loss_type (TRL's names), with chosen/rejected_lengths (B,) the token counts:
      'sigmoid_norm'  every log-prob divided by its completion's length (length-normalised DPO, TRL
                      sigmoid_norm; Tulu 3, Lambert et al. 2024): h = [log pi(y_w) - log pi_ref(y_w)] / |y_w| - ...
      'simpo'         no reference, a target margin gamma (SimPO, Meng, Xia, Chen 2024):
                      h = log pi(y_w) / |y_w| - log pi(y_l) / |y_l| - gamma / beta  (the ref inputs are unused)
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards are the implicit
    rewards beta * log(pi / pi_ref) (eq. 5 without beta log Z(x), which cancels in the difference; per
    token for the variants, SimPO's beta * mean log pi), detached: they are for logging only."""
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if loss_type in ("sigmoid_norm", "simpo"):
        C.check(chosen_lengths is not None and rejected_lengths is not None, f"{loss_type} needs the lengths")
        pc, pr = pc / chosen_lengths, pr / rejected_lengths
        rc, rr = (rc / chosen_lengths, rr / rejected_lengths) if loss_type == "sigmoid_norm" else (0.0, 0.0)
    elif loss_type != "sigmoid":
        raise C.InputError(f"loss_type={loss_type!r}: choose sigmoid, sigmoid_norm or simpo")
    pi_logratios = pc - pr                                            # log pi(y_w)/pi(y_l)
    ref_logratios = rc - rr                                           # same under the reference
    h = pi_logratios - ref_logratios - (gamma / beta if loss_type == "simpo" else 0.0)   # (B,)
    # log sigma via logsigmoid: stable for large |beta h| (no log(0))
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards, rejected_rewards = beta * (pc - rc).detach(), beta * (pr - rr).detach()   # eq. 5, logging only
    return losses, chosen_rewards, rejected_rewards


def parse_args(argv):
    p = argparse.ArgumentParser(description="Direct Preference Optimization (Rafailov et al. 2023) + win rate")
    p.add_argument("--dataset", default=None, help="preference pairs: hub id (UltraFeedback binarized, hh-rlhf) or "
                   "local .jsonl/.json/.parquet (or .gz); default: built-in task pairs")
    p.add_argument("--skip-bad-rows", action="store_true", help="--dataset: drop (and count) rows with a missing "
                   "field, empty text or chosen == rejected instead of stopping")
    p.add_argument("--train-n", type=int, default=4096, help="training pairs at most (rows of --dataset; --builtin "
                   "model: prompts sampled, pairs = those with a wrong answer)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (real models: ~5e-7)")
    p.add_argument("--beta", type=float, default=0.1, help="KL strength beta of eq. 3 (TRL's default)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO: assumed label-flip probability in [0, .5)")
    p.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "sigmoid_norm", "simpo"], help="DPO, "
                   "length-normalised DPO or SimPO (dpo_loss; the normalised ones want a larger --beta, e.g. 2)")
    p.add_argument("--simpo-gamma", type=float, default=0.5, help="SimPO's target reward margin gamma")
    p.add_argument("--rpo-alpha", type=float, default=8.0, help="weight of the chosen answer's per-token NLL (RPO, "
                   "Pang et al. 2024, use 1; TRL rpo_alpha); 0 = plain DPO (README: it collapses the tiny task)")
    p.add_argument("--max-prompt-len", type=int, default=512, help="pairs whose prompt is longer (tokens) are dropped")
    p.add_argument("--ref-on-the-fly", action="store_true", help="keep the reference model and compute its log-probs "
                   "every step (default: precompute once, no second model)")
    p.add_argument("--eval-winrate", action="store_true", help="win/tie/loss of greedy answers vs the start model")
    p.add_argument("--eval-prompts", default=None, help="win-rate prompts: 'task' (built-in test prompts), 'heldout' "
                   "(held-out pair prompts) or a jsonl (MT-Bench questions: first turn)")
    p.add_argument("--judge", default=None, help="'verifier' (built-in task; the default there) or a reward-model "
                   "folder/hub id (higher score wins)")
    p.add_argument("--judge-lm", default=None, help="judge LM (hub id/folder): MT-Bench pairwise prompt, both orders")
    p.add_argument("--judge-max-new-tokens", type=int, default=512, help="judge LM's budget for explanation + verdict")
    p.add_argument("--save-every", type=int, default=0, help="write <out>/checkpoint every N steps (0 = never)")
    C.add_preference_flags(p, steps=120)  # --model, --task, --builtin, --batch-size, --eval-n, --fsdp, ...
    C.add_run_flags(p, "dpo")  # --out, --seed, --device, --wandb, --trust-remote-code
    args = p.parse_args(argv)
    C.check_flags(args, {"> 0": "train_n sample_tries steps batch_size max_len max_prompt_len log_every eval_n "
                                "max_new_tokens judge_max_new_tokens lr beta sample_temperature",
                         ">= 0": "micro_batch_size warmup_steps eval_every save_every rpo_alpha simpo_gamma"})
    C.check(0 <= args.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    C.check(not (args.judge and args.judge_lm), "give --judge or --judge-lm, not both")
    C.check(not (args.fsdp and (args.save_every or args.resume)),
            "--fsdp: checkpoints of sharded optimizer state are not implemented; drop --save-every/--resume")
    args.judge = args.judge or (None if args.judge_lm else "verifier" if args.dataset is None else None)
    C.check(not args.eval_winrate or args.judge or args.judge_lm,
            "--eval-winrate on a --dataset needs --judge <reward model> or --judge-lm <model>")
    args.model = C.task_model(args.model, args.task, args.dataset)  # tiny-<task> for a task tiny never saw
    return args


def eval_prompts(args, heldout, problems):
    """Win-rate prompts (+ problems for the verifier): the task's test prompts, the held-out
    pairs' prompts, or a jsonl (MT-Bench `turns`: the first turn; else `prompt`/`instruction`)."""
    spec = args.eval_prompts or ("task" if args.dataset is None else "heldout")
    if spec == "task":
        C.check(problems, "--eval-prompts task needs the built-in task (no --dataset)")
        return [p["prompt"] for p in problems], problems
    if spec == "heldout":
        return [p["prompt"] for p in heldout], [p.get("problem") for p in heldout]
    prompts = []
    for i, r in enumerate(C.read_rows(spec, flag="--eval-prompts")[:args.eval_n], 1):
        where = f"--eval-prompts {spec} row {i}"
        if "turns" in r:
            C.check(isinstance(r["turns"], list) and r["turns"] and isinstance(r["turns"][0], str),
                    f"{where}: field 'turns' must be a non-empty list of text")
            prompts.append([{"role": "user", "content": r["turns"][0]}])
        else:
            key = next((k for k in ("prompt", "instruction", "question") if k in r), "prompt")
            C.require(r, [key], where)
            chat = isinstance(r[key], str) and args.dataset is not None  # a real model: as a user turn
            prompts.append([{"role": "user", "content": r[key]}] if chat else r[key])
    C.check(prompts, f"--eval-prompts {spec}: no rows")
    return prompts, [None] * len(prompts)


def main(argv=None):
    args = parse_args(argv)
    d = C.setup(args.seed, args.device, out=args.out)
    for flag, name in (("--judge", args.judge), ("--judge-lm", args.judge_lm)):  # loaded after the training
        C.check_model_path(name, flag)
    C.check_ranks(args.batch_size)
    t0, ckpt = time.time(), os.path.join(args.out, "checkpoint")

    # ---- model: fp32 master weights (bf16 autocast on GPU), dropout off
    fsdp = args.fsdp and d.world_size > 1  # FSDP2: sharded before anything runs the model
    model, _, tok, max_len = C.load_policy(args.model, args.max_len, fsdp, trust_remote_code=args.trust_remote_code)

    # ---- data: built-in pairs (chosen = reference solution, rejected = the start model's own
    # mistake, or a hand-made error with --builtin corrupt) or real pairs. `problems`: accuracy set.
    problems = None
    if args.dataset is None:
        problems = C.heldout(args.task, args.eval_n)  # the shared test set, the same for every --seed
        if args.builtin == "corrupt":
            train = C.make_pairs(args.task, args.train_n, args.seed)
            heldout = C.make_pairs(args.task, args.eval_n, C.HELDOUT_SEED, split="test")
        else:
            sample = lambda probs: C.mistake_pairs(model, tok, probs, args.sample_tries, args.sample_temperature,
                                                   args.max_new_tokens)
            train, heldout = sample(C.make_task(args.task, args.train_n, args.seed)), sample(problems)
    else:  # a local file: the last --eval-n rows are held out; a hub dataset: its test split
        load = functools.partial(C.load_pairs, skip_bad=args.skip_bad_rows)
        train, heldout = C.split_rows(load, args.dataset, args.train_n, args.eval_n)
    C.warn_unknown_chars(tok, train + heldout, args.dataset)
    train, heldout = C.drop_long_prompts(tok, train, heldout, min(args.max_prompt_len, max_len // 2), what="pairs")
    more = ", --sample-tries" if args.dataset is None and args.builtin == "model" else ""
    C.check(len(train) >= args.batch_size and heldout, f"{len(train)} training / {len(heldout)} held-out pairs: "
            f"need >= --batch-size {args.batch_size} and >= 1 (raise --train-n / --eval-n{more})")
    micro = args.micro_batch_size or args.batch_size // d.world_size  # pairs per forward pass

    ref = None
    if args.ref_on_the_fly:  # a frozen copy of the start model (memory: a second model)
        ref, _ = C.load_model(args.model, trust_remote_code=args.trust_remote_code)
        ref.eval().requires_grad_(False)
    all_logps = lambda m, pairs: C.sharded(lambda chunk: C.pair_logps(m, tok, chunk, max_len), pairs, micro)
    loss_fn = lambda pc, pr, rc, rr, n_c, n_r: dpo_loss(pc, pr, rc, rr, args.beta, args.label_smoothing,
                                                        args.loss_type, n_c, n_r, args.simpo_gamma)

    def heldout_eval(ref_c, ref_r, n_c, n_r):
        """Held-out preference metrics (+ verifier accuracy on the built-in task)."""
        pc, pr = all_logps(model, heldout)[:2]
        _, cr, rr = loss_fn(pc, pr, ref_c, ref_r, n_c, n_r)
        res = dict(heldout_reward_acc=(cr > rr).float().mean().item(), heldout_reward_margin=(cr - rr).mean().item(),
                   heldout_likelihood_acc=(pc > pr).float().mean().item(),  # pi(y_w) > pi(y_l): needs no reference
                   heldout_logp_chosen=pc.mean().item(), heldout_logp_rejected=pr.mean().item())
        if problems:
            res["accuracy"] = C.evaluate(model, tok, problems, max_new_tokens=args.max_new_tokens)["accuracy"]
        return res

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = C.lr_schedule(opt, args.warmup_steps + 1)
    win_prompts, win_problems = eval_prompts(args, heldout, problems) if args.eval_winrate else ([], [])
    cfg = dict(seed=args.seed, batch_size=args.batch_size, n_train=len(train), model=args.model, dataset=args.dataset,
               builtin=args.builtin)

    def fresh():
        """Reference log-probs: the reference IS the start model, so precompute them with the policy
        before its first update; no second model is ever held in memory (unless --ref-on-the-fly)."""
        heldout_ref = all_logps(ref or model, heldout)
        simpo = args.loss_type == "simpo"  # reference-free: no reference log-probs to train with
        return dict(heldout_ref=heldout_ref, train_ref=None if ref or simpo else all_logps(model, train),
                    before=heldout_eval(*heldout_ref),
                    start_answers=C.greedy_answers(model, tok, win_prompts, args.max_new_tokens))
    start, extra, logger = C.start_run(args, ckpt, model, opt, sched, cfg, fresh, steps=args.steps)
    ddp = model if fsdp else C.ddp(model)

    # ---- training: one flat loop over 0-based updates; this rank's pairs = shard of the global batch
    model.train()
    done = start  # updates finished (what a Ctrl-C checkpoint saves)
    with C.ctrl_c_checkpoint(ckpt, model, tok, opt, sched, extra, lambda: done, sharded=fsdp):
        for step in tqdm(range(start, args.steps), desc="dpo", disable=not d.master or None, initial=start,
                         total=args.steps):
            t_step = time.time()
            idx = d.shard(C.batch_indices(step, args.batch_size, len(train), args.seed))  # B / world_size pairs
            opt.zero_grad(set_to_none=True)
            stats = torch.zeros(7, dtype=torch.float64)
            for chunk in C.micro_batches(ddp, idx, micro):  # the same count on every rank
                pairs = [train[i] for i in chunk]
                pc, pr, n_c, n_r = C.pair_logps(ddp, tok, pairs, max_len)
                if args.loss_type == "simpo":  # reference-free
                    rc = rr = torch.zeros_like(pc)
                elif ref is not None:
                    with torch.no_grad():
                        rc, rr = C.pair_logps(ref, tok, pairs, max_len)[:2]
                else:
                    rc, rr = (t[chunk].to(pc.device) for t in extra["train_ref"][:2])
                losses, c_rew, r_rew = loss_fn(pc.float(), pr.float(), rc.float(), rr.float(), n_c, n_r)
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
            grad_norm = C.clip_grad(model, args.grad_clip)
            opt.step(); sched.step(); done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                s = C.all_reduce_mean(stats / len(idx)).tolist()  # equal local batches: mean of means = global mean
                logger.log(step, loss=s[0], reward_acc=s[1], reward_margin=s[2], chosen_reward=s[3],
                           rejected_reward=s[4], logp_chosen=s[5], logp_rejected=s[6], grad_norm=grad_norm,
                           lr=sched.get_last_lr()[0], step_time=time.time() - t_step)
            if args.eval_every and done % args.eval_every == 0 and done != args.steps:
                logger.log(step, **heldout_eval(*extra["heldout_ref"]))
            if args.save_every and done % args.save_every == 0:
                C.save_checkpoint(ckpt, model, tok, done, opt, sched, extra)

    # ---- evaluation and summary
    after = heldout_eval(*extra["heldout_ref"])
    logger.log(args.steps - 1, **after)
    before = extra["before"]
    summary = dict(steps=args.steps, train_pairs=len(train), wall_s=round(time.time() - t0, 1),
                   heldout_reward_acc=after["heldout_reward_acc"], heldout_reward_margin=after["heldout_reward_margin"],
                   **C.before_after(before, after, "heldout_likelihood_acc heldout_logp_chosen heldout_logp_rejected "
                                                   "accuracy"))
    if args.eval_winrate:
        answers = C.greedy_answers(model, tok, win_prompts, args.max_new_tokens)
        summary["winrate"], outcome = C.win_rate(args.judge, win_prompts, win_problems, answers, extra["start_answers"],
                                                 judge_lm=args.judge_lm, max_new_tokens=args.judge_max_new_tokens,
                                                 trust_remote_code=args.trust_remote_code)
        word = {1: "win", 0: "tie", -1: "loss"}
        C.write_jsonl(os.path.join(args.out, "winrate.jsonl"), [dict(prompt=p, dpo=a, start=b, outcome=word[o])
                      for p, a, b, o in zip(win_prompts, answers, extra["start_answers"], outcome)])
    C.save_pretrained_atomic(os.path.join(args.out, "model"), model, tok)  # rank 0 writes (FSDP: all ranks gather)
    C.plot_metrics(args.out, ["chosen_reward", "rejected_reward", "reward_margin"], "rewards.png",
                   title="DPO implicit rewards")
    C.plot_metrics(args.out, ["loss", "reward_acc"], "loss.png", title="DPO loss and reward accuracy")
    C.plot_metrics(args.out, ["logp_chosen", "logp_rejected"], "logps.png", title="policy log-probs (chosen falls too)")
    C.write_summary(args.out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
