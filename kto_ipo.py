"""kto_ipo.py: three offline preference losses past DPO (IPO, KTO, ORPO), plus dataset engineering.

Each trains a policy on fixed data like DPO (dpo.py) but asks for something else (equations: each loss).
  * IPO (Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", arXiv:2310.12036): a finite target for the log-ratio margin h,
    where DPO's -log sigma(beta h) pushes h to infinity on pairs that are always preferred.
  * KTO (Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", arXiv:2402.01306): unpaired good/bad labels, far cheaper than pairs.
  * ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691): SFT and an odds-ratio preference term in one stage, no reference model.
Data (load_data): the built-in task's rows, --dataset rows, or the assignment, --make-dataset (make_dataset).

Run (results and observations: README 'Results', `python tests/bench/cross_algorithm.py --only kto,ipo,orpo`):
    python kto_ipo.py                             # KTO on built-in unpaired rows, tiny model, CPU
    python kto_ipo.py --loss ipo                  # IPO on built-in pairs (--loss orpo: ORPO, no reference)
    python kto_ipo.py --make-dataset [--judge out/reward_model/model]  # 512 prompts x 8 samples at T=1, KTO
    python kto_ipo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/kto-mix-14k --beta 0.1 \\
        --nll-weight 0 --lr 5e-7 --steps 400 --batch-size 32 --micro-batch-size 4 --max-len 1024
    python kto_ipo.py --make-dataset --dataset ../shared/realdata/gsm8k/train.jsonl --n-prompts 2000 --samples 8 \\
        --model Qwen/Qwen2.5-0.5B-Instruct --max-new-tokens 256 --nll-weight 1 --lr 5e-7 --steps 200 \\
        --micro-batch-size 4
    torchrun --nproc_per_node=8 kto_ipo.py [--fsdp] ...  # --batch-size stays global; FSDP2 shards policy + reference
Outputs in --out (default out/kto_ipo): metrics.jsonl, rewards.png, health.png, summary.json (held-out accuracy
and implicit-reward accuracy/margin, before and after), model/, pairs.jsonl + kto.jsonl, checkpoint/ on Ctrl-C.
Simplified vs the papers / TRL: AdamW, linear warmup then a constant lr; the reference is a frozen in-memory
copy of the start model; KTO's z0 comes from the current global batch only (as the paper); --make-dataset
keeps one pair per prompt and drops duplicate answers, and --resume cannot re-make it.
"""
import argparse, functools, os, random, time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, tau=0.5):
    """Per-pair IPO loss (Azar et al. 2023, eq. 17 with the sampled empirical h), inputs (B,):
        h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)],   loss = (h - 1/(2 tau))^2
    Log-probs AVERAGED per completion token (as TRL's IPO): with sums, h and so the pull of one fixed target
    grow with the answers' length. Returns (losses, chosen_rewards, rejected_rewards), (B,) each, detached."""
    chosen = policy_chosen_logps - ref_chosen_logps                  # (B,)
    rejected = policy_rejected_logps - ref_rejected_logps            # (B,)
    losses = (chosen - rejected - 1 / (2 * tau)) ** 2                # squared error to the target margin
    return losses, chosen.detach(), rejected.detach()


def kto_loss(policy_logps, ref_logps, desirable, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example KTO loss (Ethayarajh et al. 2024, eq. 7-8). policy_logps, ref_logps: (B,) log pi(y|x) SUMMED
    over completion tokens (as the paper's code and TRL); desirable: (B,) bool; kl: scalar KL(pi || pi_ref).
        r = log pi(y|x) - log pi_ref(y|x),   z0 = max(0, kl), no gradient (a reference point, not a target)
        v = lam_D sigma(beta (r - z0)) if desirable, lam_U sigma(beta (z0 - r)) if undesirable
        loss = lam_y - v   (in [0, lam_y]; 1 - sigmoid is the saturating Kahneman-Tversky value)
    Returns (losses (B,), rewards (B,) = beta r, detached)."""
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    r = policy_logps - ref_logps                                      # (B,) implicit reward / beta
    lam = torch.where(desirable, *torch.tensor([desirable_weight, undesirable_weight], dtype=r.dtype, device=r.device))
    v = lam * torch.sigmoid(beta * torch.where(desirable, r - z0, z0 - r))   # gains above z0, losses below it
    return lam - v, (beta * r).detach()


def orpo_loss(chosen_logps_mean, rejected_logps_mean, chosen_nll, lam=0.1):
    """Per-pair ORPO loss (Hong et al. 2024, eq. 6-7), no reference model. Inputs (B,): mean per-token
    log-probs of y_w and y_l, and the SFT loss of y_w (its mean per-token NLL, -chosen_logps_mean here).
        log odds(y) = log p - log(1 - p),  p = exp(mean per-token log-prob)
        loss = NLL(y_w) + lam * -log sigma( log odds(y_w) - log odds(y_l) )
    Returns (losses (B,), chosen log odds (B,), rejected log odds (B,)), the odds detached."""
    def log_odds(lp):  # log(1 - exp(lp)) via expm1: exact for lp near 0 (p near 1); lp < 0 kept finite
        lp = lp.clamp(max=-1e-6)
        return lp - torch.log(-torch.expm1(lp))
    lo_c, lo_r = log_odds(chosen_logps_mean), log_odds(rejected_logps_mean)
    losses = chosen_nll - lam * F.logsigmoid(lo_c - lo_r)            # (B,)
    return losses, lo_c.detach(), lo_r.detach()


def kto_weights(n_desirable, n_undesirable, desirable_weight=None, undesirable_weight=1.0):
    """(lam_D, lam_U) for an imbalanced unpaired set: Ethayarajh et al. 2024 (sec. 4.2; TRL's KTOTrainer cites
    it as eq. 8) recommend  lam_D n_D / (lam_U n_U) in [1, 4/3]  (n_D, n_U: desirable / undesirable examples).
    Default lam_D = lam_U n_U / n_D (ratio 1; balanced: the paper's lam_D = lam_U); a given one is clipped."""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    lo, hi = undesirable_weight * n_u / n_d, 4 / 3 * undesirable_weight * n_u / n_d
    lam_d = lo if desirable_weight is None else min(max(desirable_weight, lo), hi)
    if desirable_weight is not None and lam_d != desirable_weight:
        C.print0(f"[kto] --desirable-weight {desirable_weight} clipped to {lam_d:.4g}: "
                 "lam_D n_D / (lam_U n_U) must be in [1, 4/3]")
    C.print0(f"kto: {n_desirable} desirable / {n_undesirable} undesirable -> lam_D {lam_d:.4g}, lam_U "
             f"{undesirable_weight:.4g} (lam_D n_D / lam_U n_U = {lam_d * n_d / (undesirable_weight * n_u):.3f})")
    return lam_d, undesirable_weight


def shift_completions(completions):
    """KTO's mismatched pairs: prompt i gets completion i-1 (row 0 the last one), an answer unrelated to it."""
    return completions[-1:] + completions[:-1]


@torch.no_grad()
def kl_estimate(policy, ref, tok, prompts, completions, micro, max_len):
    """KTO's KL reference point before the clamp, over a GLOBAL batch (every rank passes the same lists):
    mean_i [log pi(y_{i-1}|x_i) - log pi_ref(y_{i-1}|x_i)], summed log-probs."""
    shifted, mine, tot = shift_completions(list(completions)), C.DIST.shard(list(range(len(prompts)))), 0.0
    for i in range(0, len(mine), micro):
        x, y = [prompts[k] for k in mine[i:i + micro]], [shifted[k] for k in mine[i:i + micro]]
        with C.autocast():
            diff = C.seq_logps(policy, tok, x, y, max_len)[0] - C.seq_logps(ref, tok, x, y, max_len)[0]
            tot += diff.float().sum().item()
    return C.all_reduce_mean(tot / len(mine))  # equal shards: the mean of rank means = the global mean


@torch.no_grad()
def make_dataset(model, tok, problems, args, judge=None):
    """(pairs, unpaired) from --samples answers per problem of the current model, scored by the verifier
    (1 = correct) or a reward model (judge): per prompt the best vs the worst answer when their scores differ,
    and every distinct answer labelled score > threshold (--judge: --judge-threshold, default the median)."""
    sampled = C.sample_answers(model, tok, problems, args.samples, args.temperature, args.max_new_tokens)
    cand = [(i, t) for i, answers in sampled for t in dict.fromkeys(answers) if t.strip()]  # distinct, non-empty
    with C.autocast():  # a judge: reward_model.py's contract, common.rm_score (prompt + completion, one logit)
        scores = [float(C.verify(problems[i], t)) for i, t in cand] if judge is None else \
            C.rm_score(*judge, [problems[i]["prompt"] for i, _ in cand], [t for _, t in cand], batch_size=32).tolist()
    scored = sorted(C.all_gather_list([(i, t, s) for (i, t), s in zip(cand, scores)]))
    median = float(np.median([s for _, _, s in scored] or [0]))
    thr = 0.5 if judge is None else args.judge_threshold if args.judge_threshold is not None else median
    groups, score = {}, lambda e: e[0]
    for i, t, s in scored:  # in problem order
        groups.setdefault(i, []).append((s, t))
    ends = {i: (max(g, key=score), min(g, key=score)) for i, g in groups.items()}  # (best, worst) per prompt
    return ([dict(prompt=problems[i]["prompt"], chosen=b[1], rejected=w[1]) for i, (b, w) in ends.items()
             if b[0] > w[0]], [dict(prompt=problems[i]["prompt"], completion=t, label=s > thr) for i, t, s in scored])


def builtin_rows(model, tok, problems, args, paired, seed):
    """--builtin model: common.mistake_pairs; unpaired (KTO), ONE row per pair, the solution (desirable) or the
    wrong answer by a seeded coin, so no prompt has both labels and the classes are balanced."""
    pairs = C.mistake_pairs(model, tok, problems, args.sample_tries, args.sample_temperature, args.max_new_tokens)
    rng = random.Random(seed + 2)
    return pairs if paired else [dict(prompt=p["prompt"], completion=p["chosen"], label=True) if rng.random() < 0.5
                                 else dict(prompt=p["prompt"], completion=p["rejected"], label=False) for p in pairs]


def load_data(args, model, tok, paired):
    """(train, heldout, problems, made): rows made from the model's own samples (--make-dataset), the built-in
    task's rows, or --dataset rows; problems: the accuracy set (None for --dataset rows); made: the counts."""
    if args.make_dataset:
        train_p, problems = (C.make_task(args.task, args.n_prompts, args.seed), C.heldout(args.task, args.eval_n)) \
            if args.dataset is None else C.hold_out(C.load_problems(args.dataset, skip_bad=args.skip_bad_rows),
                                                    args.eval_n, args.dataset, what="problems")
        train_p = train_p[:args.n_prompts]  # a --dataset's first n-prompts problems
        judge = None if args.judge is None else \
            C.load_model(args.judge, kind="reward", trust_remote_code=args.trust_remote_code, flag="--judge")
        (pairs, unpaired), (h_pairs, h_unpaired) = (make_dataset(model, tok, ps, args, judge)
                                                    for ps in (train_p, problems))  # held out: answers to test prompts
        C.write_jsonl(os.path.join(args.out, "pairs.jsonl"), pairs)
        C.write_jsonl(os.path.join(args.out, "kto.jsonl"), unpaired)
        n, n_d = len(unpaired), sum(r["label"] for r in unpaired)
        made = dict(prompts=len(train_p), samples=args.samples, pairs=len(pairs), unpaired=n, desirable=n_d,
                    undesirable=n - n_d, desirable_frac=round(n_d / max(1, n), 4))
        C.print0(f"made dataset: {len(pairs)} pairs -> {args.out}/pairs.jsonl, {n} labelled answers ({n_d} desirable "
                 f"/ {n - n_d} undesirable = {made['desirable_frac']:.1%} desirable) -> {args.out}/kto.jsonl")
        train, heldout = (pairs, h_pairs) if paired else (unpaired, h_unpaired)
        return train[:args.train_n], heldout, problems, made
    if args.dataset is None:  # built-in: bad answers are the start model's own mistakes, or hand-made errors
        problems = C.heldout(args.task, args.eval_n)  # accuracy: the shared test set
        if args.builtin == "corrupt":
            make = C.make_pairs if paired else C.make_unpaired
            train = make(args.task, args.train_n, args.seed)
            return train, make(args.task, args.eval_n, C.HELDOUT_SEED, split="test"), problems, None
        train = builtin_rows(model, tok, C.make_task(args.task, args.train_n, args.seed), args, paired, args.seed)
        return train, builtin_rows(model, tok, problems, args, paired, 1), problems, None
    load = functools.partial(C.load_pairs if paired else C.load_unpaired, skip_bad=args.skip_bad_rows)
    return (*C.split_rows(load, args.dataset, args.train_n, args.eval_n, head=args.train_n + args.eval_n), None, None)


def texts(rows, paired):
    """(prompts, completions) of rows; b pairs as 2b rows, [prompt | chosen] then [prompt | rejected]."""
    x = [r["prompt"] for r in rows]
    return (x + x, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]) if paired else \
        (x, [r["completion"] for r in rows])


LR, NLL = dict(kto=2e-5, ipo=2e-5, orpo=2e-4), dict(kto=16.0, ipo=8.0)  # defaults per loss, tuned on tiny (README)


def parse_args(argv):
    p = argparse.ArgumentParser(description="IPO / KTO / ORPO preference training + preference-data engineering")
    p.add_argument("--loss", default="kto", choices=["kto", "ipo", "orpo"], help="kto (unpaired labels), ipo, orpo")
    p.add_argument("--dataset", default=None, help="kto: unpaired rows (kto-mix-14k style) or pairs; ipo/orpo: pairs "
                   "(UltraFeedback, hh-rlhf); --make-dataset: problems (GSM8K/Countdown/MATH). Default: built-in task")
    p.add_argument("--make-dataset", action="store_true", help="sample + label answers: <out>/pairs.jsonl, kto.jsonl")
    p.add_argument("--n-prompts", type=int, default=512, help="--make-dataset: training prompts to sample on")
    p.add_argument("--samples", type=int, default=8, help="--make-dataset: answers sampled per prompt (K)")
    p.add_argument("--temperature", type=float, default=1.0, help="--make-dataset: sampling temperature")
    p.add_argument("--judge", default=None, help="--make-dataset: reward model to label with (default: the verifier)")
    p.add_argument("--judge-threshold", type=float, default=None, help="--judge: label = score > this (default median)")
    p.add_argument("--skip-bad-rows", action="store_true", help="--dataset: drop (and count) rows with a missing "
                   "field, empty text or chosen == rejected (--make-dataset: problems the verifier cannot check)")
    p.add_argument("--train-n", type=int, default=4096, help="training rows at most (--builtin model: prompts sampled)")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default per loss, tuned on tiny: "
                   f"{LR}; real models ~5e-7, ORPO ~8e-6)")
    p.add_argument("--beta", type=float, default=0.1, help="KTO: beta of sigma(beta (r - z0)) (paper: 0.1)")
    p.add_argument("--tau", type=float, default=1.0, help="IPO: the target log-ratio margin is 1/(2 tau) per token")
    p.add_argument("--lam", type=float, default=0.1, help="ORPO: lambda, weight of the odds-ratio term (paper: 0.1)")
    p.add_argument("--nll-weight", type=float, default=None, help="ipo/kto: weight of the chosen / desirable answer's "
                   f"per-token NLL added to the loss (RPO-style, Pang et al. 2024); default tuned on tiny: {NLL}")
    p.add_argument("--desirable-weight", type=float, default=None, help="KTO lam_D (default: kto_weights)")
    p.add_argument("--undesirable-weight", type=float, default=1.0, help="KTO lam_U")
    C.add_preference_flags(p, steps=160)  # --model, --task, --builtin, --batch-size, --eval-n, --fsdp, ...
    C.add_run_flags(p, "kto_ipo")  # --out, --seed, --device, --wandb, --trust-remote-code
    a = p.parse_args(argv)
    a.lr = LR[a.loss] if a.lr is None else a.lr
    a.nll_weight = NLL.get(a.loss, 0.0) if a.nll_weight is None else a.nll_weight
    C.check_flags(a, {"> 0": "n_prompts samples sample_tries sample_temperature train_n batch_size max_len "
                             "max_new_tokens eval_n log_every lr beta tau lam undesirable_weight grad_clip "
                             "desirable_weight",
                      ">= 0": "steps micro_batch_size warmup_steps temperature eval_every nll_weight"})
    C.check(a.loss != "kto" or a.batch_size >= 2 and a.micro_batch_size != 1,
            "kto: --batch-size and --micro-batch-size must be >= 2 (z0 needs mismatched pairs)")
    C.check(a.judge is None or a.make_dataset, "--judge labels answers for --make-dataset; add --make-dataset")
    C.check(not (a.fsdp and a.resume), "--fsdp: checkpoints of sharded optimizer state are not implemented; "
            "drop --resume")
    C.check(not (a.resume and a.make_dataset),
            "--resume cannot re-make the data: pass <out>/kto.jsonl or pairs.jsonl as --dataset")
    a.model = C.task_model(a.model, a.task, a.dataset)  # tiny-<task> for a task tiny never saw
    return a


def main(argv=None):
    args = parse_args(argv)
    d = C.setup(args.seed, args.device, out=args.out)
    C.check_ranks(args.batch_size)
    t0, ckpt, kto, paired = time.time(), os.path.join(args.out, "checkpoint"), args.loss == "kto", args.loss != "kto"
    fsdp = args.fsdp and d.world_size > 1
    model, ref, tok, max_len = C.load_policy(args.model, args.max_len, fsdp, ref=args.loss != "orpo",  # ORPO: none
                                             trust_remote_code=args.trust_remote_code)  # ref: the START model, always

    # ---- data: made from the model's own samples, the built-in task, or --dataset rows
    train, heldout, problems, made = load_data(args, model, tok, paired)
    C.warn_unknown_chars(tok, train + heldout, args.dataset)
    train, heldout = C.drop_long_prompts(tok, train, heldout, max_len // 2)
    C.check(len(train) >= args.batch_size and heldout,
            f"too few rows: {len(train)} to train (need --batch-size {args.batch_size}), {len(heldout)} held out")
    n_d = sum(r["label"] for r in train) if kto else 0  # KTO: lam_D, lam_U from the training set's label balance
    lam_d, lam_u = kto_weights(n_d, len(train) - n_d, args.desirable_weight, args.undesirable_weight) if kto else \
        (None, None)
    micro = args.micro_batch_size or args.batch_size // d.world_size  # rows per forward pass

    def logps(m, x, y):
        """log pi(y|x) summed over the completion, and its per-token mean: two float32 (B,) tensors."""
        s, n = C.seq_logps(m, tok, x, y, max_len)
        return s.float(), (s / n).float()

    def heldout_eval():
        """Implicit-reward accuracy/margin on the held-out rows (+ greedy task accuracy if known). Pairs: the share
        with reward(chosen) > reward(rejected); KTO: the AUC over (desirable, undesirable) couples, ties 1/2."""
        b, (x, y) = len(heldout), texts(heldout, paired)
        every = lambda m: C.sharded(lambda ch: logps(m, [p for p, _ in ch], [c for _, c in ch]), list(zip(x, y)), micro)
        (ps, pm), (rs, rm) = every(model), every(ref) if ref is not None else (None, None)
        tie = 1e-6  # float32 noise: policy = reference at the start gives differences of ~1e-9, not 0
        if paired:
            _, c, r = orpo_loss(pm[:b], pm[b:], -pm[:b], args.lam) if args.loss == "orpo" else \
                ipo_loss(pm[:b], pm[b:], rm[:b], rm[b:], args.tau)
            res = dict(heldout_reward_acc=(c - r > tie).float().mean().item(),
                       heldout_reward_margin=(c - r).mean().item())
        else:
            lab, rew = torch.tensor([r["label"] for r in heldout]), args.beta * (ps - rs)
            c, r = rew[lab], rew[~lab]
            diff = c[:, None] - r[None, :]  # (n_desirable, n_undesirable)
            res = dict(heldout_reward_acc=((diff > tie).float() + 0.5 * (diff.abs() <= tie).float()).mean().item(),
                       heldout_reward_margin=(c.mean() - r.mean()).item())
        if problems is not None:  # float(): np.float64 would not load with torch.load(weights_only=True)
            res["accuracy"] = float(C.evaluate(model, tok, problems, max_new_tokens=args.max_new_tokens)["accuracy"])
        return res

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = C.lr_schedule(opt, args.warmup_steps + 1)
    cfg = dict(loss=args.loss, seed=args.seed, batch_size=args.batch_size, n_train=len(train), model=args.model,
               dataset=args.dataset, builtin=args.builtin)
    start, extra, logger = C.start_run(args, ckpt, model, opt, sched, cfg, lambda: dict(before=heldout_eval()))
    ddp = model if fsdp else C.ddp(model)

    # ---- training: one flat loop over 0-based updates; this rank's rows = shard of the global batch
    model.train()
    done, last = start, {}  # updates finished (what a Ctrl-C checkpoint saves), the last logged metrics
    with C.ctrl_c_checkpoint(ckpt, model, tok, opt, sched, extra, lambda: done, sharded=fsdp):
        for step in tqdm(range(start, args.steps), desc=args.loss, disable=not d.master or None, initial=start,
                         total=args.steps):
            g = [train[i] for i in C.batch_indices(step, args.batch_size, len(train), args.seed)]  # global batch
            rows = d.shard(g)  # KTO: z0 from the mismatched pairs (x_i, y_{i-1}) of g, at the current weights
            kl = kl_estimate(model, ref, tok, *texts(g, False), micro, max_len) if kto else 0.0
            opt.zero_grad(set_to_none=True)
            stats = torch.zeros(7, dtype=torch.float64)  # sums: loss, correct, r_c, r_r, n_c, n_r, aux (h / nll)
            for chunk in C.micro_batches(ddp, rows, micro):  # the same count on every rank
                b, (x, y) = len(chunk), texts(chunk, paired)  # pairs: chosen and rejected in ONE forward pass
                ps, pm = logps(ddp, x, y)
                with torch.no_grad():
                    rs, rm = logps(ref, x, y) if ref is not None else (None, None)
                if args.loss == "ipo":  # + alpha NLL(y_w), per token; aux: the margin h
                    losses, c, r = ipo_loss(pm[:b], pm[b:], rm[:b], rm[b:], args.tau)
                    losses, correct, aux = losses - args.nll_weight * pm[:b], (c > r).sum(), (c - r).sum()
                elif args.loss == "orpo":  # aux: the NLL of the chosen answer
                    losses, c, r = orpo_loss(pm[:b], pm[b:], -pm[:b], args.lam)
                    correct, aux = (c > r).sum(), -pm[:b].detach().sum()
                else:  # + alpha NLL(desirable y); correct: v > lam/2, i.e. on its side of the reference point beta z0
                    lab = torch.tensor([r["label"] for r in chunk], device=ps.device)
                    losses, rew = kto_loss(ps, rs, lab, kl, args.beta, lam_d, lam_u)
                    losses, c, r = losses - args.nll_weight * pm * lab, rew[lab], rew[~lab]
                    correct, aux = ((rew > args.beta * max(kl, 0.0)) == lab).sum(), torch.zeros(())
                loss = losses.sum() / len(rows)  # DDP averages ranks' gradients -> mean over the global batch
                C.nan_guard(loss, step)
                loss.backward()
                stats += torch.tensor([losses.detach().sum().item(), correct.item(), c.sum().item(), r.sum().item(),
                                       len(c), len(r), aux.item()], dtype=torch.float64)
            grad_norm = C.clip_grad(model, args.grad_clip)
            opt.step(); sched.step(); done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                s = C.all_reduce_mean(stats).tolist()  # means of per-rank sums: their ratios are global ratios
                n = s[4] + s[5] if kto else s[4]       # examples (KTO) or pairs
                m = dict(loss=s[0] / n, reward_acc=s[1] / n, chosen_reward=s[2] / max(s[4], 1e-9),
                         rejected_reward=s[3] / max(s[5], 1e-9), grad_norm=grad_norm, lr=sched.get_last_lr()[0])
                m["reward_margin"] = m["chosen_reward"] - m["rejected_reward"]  # KTO: mean desirable - undesirable
                m.update({"kto": dict(kl=kl, z0=max(kl, 0.0)), "ipo": dict(h=s[6] / n, h_target=1 / (2 * args.tau)),
                          "orpo": dict(nll=s[6] / n)}[args.loss])
                logger.log(step, **m); last = m
            if args.eval_every and done % args.eval_every == 0 and done != args.steps:
                logger.log(step, **heldout_eval())

    # ---- evaluation and summary
    after = heldout_eval()
    logger.log(max(args.steps - 1, 0), **after)
    summary = dict(loss=args.loss, steps=args.steps, train_rows=len(train), world_size=d.world_size,
                   wall_s=round(time.time() - t0, 1),
                   **C.before_after(extra["before"], after, "accuracy heldout_reward_acc heldout_reward_margin"),
                   **{f"last_{k}": last[k] for k in "loss reward_acc reward_margin kl z0 h nll".split() if k in last},
                   **(dict(desirable_weight=lam_d, undesirable_weight=lam_u) if kto else {}),
                   **(dict(made_dataset=made) if made else {}))
    C.save_pretrained_atomic(os.path.join(args.out, "model"), model, tok)  # rank 0 writes (FSDP: all ranks gather)
    C.plot_metrics(args.out, ["chosen_reward", "rejected_reward", "reward_margin"], "rewards.png",
                   title=f"{args.loss}: implicit rewards (chosen/desirable vs rejected/undesirable)")
    C.plot_metrics(args.out, ["loss", "reward_acc"] + {"kto": ["z0"], "ipo": ["h"], "orpo": ["nll"]}[args.loss],
                   "health.png", title=f"{args.loss}: health")
    C.write_summary(args.out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
