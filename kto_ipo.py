"""kto_ipo.py: three offline preference losses past DPO (IPO, KTO, ORPO), plus dataset engineering.

All three train a policy pi on fixed data, like DPO (see dpo.py), and differ in what the data
must be and what the loss asks for. h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)].
  * IPO (Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos 2023, "A General Theoretical
    Paradigm to Understand Learning from Human Preferences", arXiv:2310.12036, eq. 17):
        L = (h - 1/(2 tau))^2
    DPO's -log sigma(beta h) keeps pushing h -> infinity on pairs that are always preferred
    (deterministic preferences), i.e. it overfits and drifts from pi_ref whatever beta is.
    IPO regresses h onto a finite target 1/(2 tau): overshooting is penalised like undershooting.
  * KTO (Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", arXiv:2402.01306): learns from *unpaired* binary labels ("this answer
    is good / bad"), which are far cheaper to collect than pairs. Kahneman-Tversky value of an
    answer relative to a reference point z0 = KL(pi || pi_ref), r = log pi(y|x)/pi_ref(y|x):
        v = lam_D sigma(beta (r - z0))  if y desirable,   lam_U sigma(beta (z0 - r))  if undesirable
        L = E[lam_y - v]
  * ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv:2403.07691, eq. 6-7): SFT and preference in one stage, no reference model:
        L = NLL(y_w) + lam * -log sigma( log odds(y_w) - log odds(y_l) ),  odds(y) = p / (1 - p)
    with p = exp(mean per-token log-prob of y).

Dataset engineering (the week's assignment): --make-dataset samples K completions per task prompt
from the current model, labels them with the task verifier (or a reward model, --judge), and writes
<out>/pairs.jsonl (best vs worst answer per prompt: chosen / rejected) and <out>/kto.jsonl (every
distinct answer: completion + label), then trains on them; KTO's lam_D / lam_U come from the
label imbalance (see kto_weights).

Run (measured results, mean ± sd over seeds on the shared held-out set common.heldout(): README
'Results', `python tests/bench/cross_algorithm.py --seeds 0,1,2 --only kto,ipo,orpo`):
    python kto_ipo.py                             # KTO on built-in unpaired rows
    python kto_ipo.py --loss ipo                  # IPO on built-in pairs
    python kto_ipo.py --loss orpo                 # ORPO on the same pairs, no reference model
    python kto_ipo.py --make-dataset              # the assignment: 512 prompts x 8 samples at T=1, verifier labels, KTO
    python kto_ipo.py --make-dataset --judge out/reward_model/model      # labels from a reward model instead
    python kto_ipo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/kto-mix-14k --beta 0.1 \\
        --nll-weight 0 --lr 5e-7 --steps 400 --batch-size 32 --micro-batch-size 4 --max-len 1024
    python kto_ipo.py --loss orpo --model Qwen/Qwen2.5-0.5B --dataset HuggingFaceH4/ultrafeedback_binarized \\
        --lam 0.1 --lr 8e-6 --steps 600 --batch-size 32 --micro-batch-size 4 --max-len 1024
    python kto_ipo.py --make-dataset --model Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset ../shared/realdata/gsm8k/train.jsonl --n-prompts 2000 --samples 8 --max-new-tokens 256 \\
        --nll-weight 1 --lr 5e-7 --steps 200 --micro-batch-size 4
    torchrun --nproc_per_node=2 kto_ipo.py ...    # same flags; --batch-size stays the global batch
    torchrun --nproc_per_node=8 kto_ipo.py --fsdp ...   # FSDP2: policy and reference sharded (no checkpoints)
Outputs in --out (default out/kto_ipo): metrics.jsonl, rewards.png, health.png, summary.json
(held-out task accuracy and implicit-reward accuracy/margin before and after), model/,
pairs.jsonl + kto.jsonl (with --make-dataset), checkpoint/ on Ctrl-C (--resume continues).

The built-in data (--builtin model): 4096 training prompts, 2 samples each at T=0.7 from the start
model; every prompt with a wrong sample gives a pair (reference solution, that wrong answer), and for
KTO one of the two, chosen by a seeded coin (own_mistakes). What was observed on the earlier start
model (the NLL term, IPO's tau, hand-made errors, --make-dataset's label imbalance): README 'Results'.

Simplified vs the papers / TRL: AdamW with linear warmup then a constant lr; the reference is a
frozen copy of the start model kept in memory (IPO, KTO); KTO's z0 is estimated on the current
global batch only (the paper: same, "mismatched pairs in the batch"); with --make-dataset one
pair per prompt (best vs worst) and duplicate answers are dropped; --resume cannot re-make a
data set (pass the written file as --dataset instead).
"""
import argparse, copy, functools, json, os, random, time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C

# ----------------------------------------------------------------------------- the losses


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, tau=0.5):
    """Per-pair IPO loss (Azar et al. 2023, eq. 17 with the sampled empirical h):
        h    = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
        loss = (h - 1/(2 tau))^2
    Inputs (B,). Here the log-probs are AVERAGED per completion token (as TRL's IPO does): the
    target 1/(2 tau) is a fixed number, and with summed log-probs h grows with the length of the
    answers, so one tau would mean a weak leash on long pairs and a strong one on short ones.
    (The paper writes sequence probabilities; with sums tau must be rescaled by the length.)
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)) with reward = log pi/pi_ref
    of each answer, detached (for logging)."""
    chosen = policy_chosen_logps - ref_chosen_logps                  # (B,)
    rejected = policy_rejected_logps - ref_rejected_logps            # (B,)
    losses = (chosen - rejected - 1 / (2 * tau)) ** 2                # squared error to the target margin
    return losses, chosen.detach(), rejected.detach()


def kto_loss(policy_logps, ref_logps, desirable, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example KTO loss (Ethayarajh et al. 2024, eq. 7-8 of arXiv:2402.01306).
    policy_logps, ref_logps: (B,) log pi(y|x) SUMMED over completion tokens (as the paper's code
    and TRL); desirable: (B,) bool; kl: scalar estimate of KL(pi || pi_ref) from mismatched pairs.
        r  = log pi(y|x) - log pi_ref(y|x)
        z0 = max(0, kl), no gradient (a reference point, not something to optimise)
        v  = lam_D sigma(beta (r - z0)) if desirable,  lam_U sigma(beta (z0 - r)) if undesirable
        loss = lam_y - v   (in [0, lam_y]; 1 - sigmoid is the saturating Kahneman-Tversky value)
    Returns (losses (B,), rewards (B,) = beta r, detached)."""
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    r = policy_logps - ref_logps                                      # (B,) implicit reward / beta
    lam = torch.where(desirable, torch.as_tensor(desirable_weight, dtype=r.dtype, device=r.device),
                      torch.as_tensor(undesirable_weight, dtype=r.dtype, device=r.device))
    v = lam * torch.sigmoid(beta * torch.where(desirable, r - z0, z0 - r))   # gains above z0, losses below it
    return lam - v, (beta * r).detach()


def orpo_loss(chosen_logps_mean, rejected_logps_mean, chosen_nll, lam=0.1):
    """Per-pair ORPO loss (Hong et al. 2024, eq. 6-7), no reference model.
    Inputs (B,): mean per-token log-probs of y_w and y_l, and the SFT loss of y_w (its mean
    per-token NLL, i.e. -chosen_logps_mean unless the caller normalises differently).
        log odds(y) = log p - log(1 - p),   p = exp(mean per-token log-prob)
        loss = NLL(y_w) + lam * -log sigma( log odds(y_w) - log odds(y_l) )
    Returns (losses (B,), chosen log odds (B,), rejected log odds (B,)), the odds detached."""
    def log_odds(lp):  # log(1 - exp(lp)) via expm1: exact for lp near 0 (p near 1); lp < 0 kept finite
        lp = lp.clamp(max=-1e-6)
        return lp - torch.log(-torch.expm1(lp))
    lo_c, lo_r = log_odds(chosen_logps_mean), log_odds(rejected_logps_mean)
    losses = chosen_nll - lam * F.logsigmoid(lo_c - lo_r)            # (B,)
    return losses, lo_c.detach(), lo_r.detach()


def kto_weights(n_desirable, n_undesirable, desirable_weight=None, undesirable_weight=1.0):
    """(lam_D, lam_U) for an imbalanced unpaired set. Ethayarajh et al. 2024 (arXiv:2402.01306,
    sec. 4.2; the bound TRL's KTOTrainer cites as their eq. 8) recommend
        lam_D n_D / (lam_U n_U)  in  [1, 4/3]
    (n_D, n_U = number of desirable / undesirable examples): the desirable side's total weight
    should match, or slightly exceed, the undesirable side's. Default: keep lam_U and set
    lam_D = lam_U n_U / n_D, the low end (ratio 1; on balanced data this is the paper's
    lam_D = lam_U = 1). A given lam_D is clipped into the recommended interval."""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    lo, hi = undesirable_weight * n_u / n_d, 4 / 3 * undesirable_weight * n_u / n_d
    lam_d = lo if desirable_weight is None else min(max(desirable_weight, lo), hi)
    if desirable_weight is not None and lam_d != desirable_weight:
        C.print0(f"[kto] --desirable-weight {desirable_weight} clipped to {lam_d:.4g}: "
                 "lam_D n_D / (lam_U n_U) must be in [1, 4/3]")
    return lam_d, undesirable_weight


def shift_completions(completions):
    """KTO's mismatched pairs: prompt i gets completion i-1 (row 0 gets the last one). The answer
    is then (almost surely) unrelated to the prompt, so E[log pi/pi_ref] over such pairs estimates
    KL(pi || pi_ref) without being driven by the labels of the matched answers."""
    return completions[-1:] + completions[:-1]


@torch.no_grad()
def kl_estimate(policy, ref, tok, prompts, completions, micro, max_len):
    """KTO's KL reference point before the clamp, over a GLOBAL batch (every rank passes the same
    lists): mean_i [log pi(y_{i-1}|x_i) - log pi_ref(y_{i-1}|x_i)], summed log-probs."""
    shifted, mine, tot = shift_completions(list(completions)), C.DIST.shard(list(range(len(prompts)))), 0.0
    for i in range(0, len(mine), micro):
        x, y = [prompts[k] for k in mine[i:i + micro]], [shifted[k] for k in mine[i:i + micro]]
        with C.autocast():
            diff = C.seq_logps(policy, tok, x, y, max_len)[0] - C.seq_logps(ref, tok, x, y, max_len)[0]
            tot += diff.float().sum().item()
    return C.all_reduce_mean(tot / len(mine))  # equal shards: the mean of rank means = the global mean

# ----------------------------------------------------------------------------- data


@torch.no_grad()
def make_dataset(model, tok, problems, args, judge=None):
    """Dataset engineering: --samples answers per problem from the current model, scored by the
    verifier (1 = correct) or a reward model, then (pairs, unpaired): per prompt the best vs the worst
    answer when their scores differ, and every distinct answer labelled score > threshold (verifier:
    correct; reward model: --judge-threshold, default the median score)."""
    cand = [(i, t) for i, answers in C.sample_answers(model, tok, problems, args.samples, args.temperature,
                                                      args.max_new_tokens)
            for t in dict.fromkeys(answers) if t.strip()]  # this rank's distinct non-empty answers
    if judge is None:
        scores = [float(C.verify(problems[i], t)) for i, t in cand]
    else:  # reward_model.py's contract: common.rm_score (right padding, prompt + completion, one logit)
        rm, rtok = judge
        with C.autocast():
            scores = C.rm_score(rm, rtok, [problems[i]["prompt"] for i, _ in cand], [t for _, t in cand],
                                batch_size=32).tolist()
    scored = sorted(C.all_gather_list([(i, t, s) for (i, t), s in zip(cand, scores)]))
    median = float(np.median([s for _, _, s in scored] or [0]))
    thr = 0.5 if judge is None else args.judge_threshold if args.judge_threshold is not None else median
    pairs, unpaired, by_prompt = [], [], {}
    for i, t, s in scored:
        by_prompt.setdefault(i, []).append((s, t))
        unpaired.append(dict(prompt=problems[i]["prompt"], completion=t, label=s > thr))
    for i, group in sorted(by_prompt.items()):
        best, worst = max(group, key=lambda g: g[0]), min(group, key=lambda g: g[0])
        if best[0] > worst[0]:
            pairs.append(dict(prompt=problems[i]["prompt"], chosen=best[1], rejected=worst[1]))
    return pairs, unpaired


def own_mistakes(model, tok, problems, args, paired, seed):
    """The built-in data (--builtin model): common.own_mistakes, each wrong sample paired with the
    reference solution. Unpaired (KTO): each such problem gives ONE row, the solution (desirable) or
    the wrong answer (undesirable) by a seeded coin, so no prompt has both labels and the classes are
    balanced. Same recipe as dpo.py."""
    found = C.own_mistakes(model, tok, problems, args.sample_tries, args.sample_temperature, args.max_new_tokens)
    rng = random.Random(seed + 2)
    row = lambda i, c, label: dict(prompt=problems[i]["prompt"], completion=c, label=label)
    if paired:
        return [dict(prompt=problems[i]["prompt"], chosen=problems[i]["solution"], rejected=w) for i, w in found]
    return [row(i, problems[i]["solution"], True) if rng.random() < 0.5 else row(i, w, False) for i, w in found]


def write_jsonl(path, rows, keys):
    if C.DIST.master:
        with open(path, "w") as f:
            f.writelines(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows)

# ----------------------------------------------------------------------------- main


# Tiny-model learning rates. KTO and IPO have no saturation that protects the shared, already
# likely tokens of good and bad answers, so they need ~10-40x less than ORPO (whose NLL term is SFT).
LR = dict(kto=2e-5, ipo=2e-5, orpo=2e-4)
NLL = dict(kto=16.0, ipo=8.0)


def parse_args(argv):
    p = argparse.ArgumentParser(description="IPO / KTO / ORPO preference training + preference-data engineering")
    p.add_argument("--loss", default="kto", choices=["kto", "ipo", "orpo"], help="kto (unpaired labels), ipo, orpo")
    p.add_argument("--model", default="tiny", help="start model (built-in name, folder or hub id); the reference too")
    p.add_argument("--dataset", default=None, help="kto: unpaired rows (kto-mix-14k style) or pairs; ipo/orpo: pairs "
                   "(UltraFeedback, hh-rlhf, prompt/chosen/rejected); with --make-dataset: problems (GSM8K/Countdown/"
                   "MATH rows). Default: built-in task")
    p.add_argument("--task", default="arithmetic", help="built-in task when no --dataset: arithmetic, "
                   "countdown or swaps (the logic puzzle; --model tiny then means tiny-swaps)")
    p.add_argument("--make-dataset", action="store_true", help="sample answers from --model, label them, write "
                   "<out>/pairs.jsonl + kto.jsonl, train on them")
    p.add_argument("--n-prompts", type=int, default=512, help="--make-dataset: training prompts to sample on")
    p.add_argument("--samples", type=int, default=8, help="--make-dataset: answers sampled per prompt (K)")
    p.add_argument("--temperature", type=float, default=1.0, help="--make-dataset: sampling temperature")
    p.add_argument("--judge", default=None, help="--make-dataset: reward model to label with (default: the verifier)")
    p.add_argument("--judge-threshold", type=float, default=None, help="reward-model score above which an answer is "
                   "desirable (default: the median score)")
    p.add_argument("--builtin", default="model", choices=["model", "corrupt"], help="built-in data's bad answers: the "
                   "start model's own wrong samples, or hand-made errors (dropped carry, off-by-one)")
    p.add_argument("--sample-tries", type=int, default=2, help="--builtin model: tries per prompt")
    p.add_argument("--sample-temperature", type=float, default=0.7, help="--builtin model: sampling temperature")
    p.add_argument("--skip-bad-rows", action="store_true", help="--dataset: drop (and count) rows with a missing "
                   "field, empty text or chosen == rejected (with --make-dataset: problems the verifier cannot check) "
                   "instead of stopping")
    p.add_argument("--n-train", type=int, default=4096, help="training rows at most (--builtin model: prompts "
                   "sampled; rows = those with a wrong answer)")
    p.add_argument("--steps", type=int, default=160, help="optimizer updates (0: only make/evaluate)")
    p.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch in rows (pairs or examples), over ranks")
    p.add_argument("--micro-batch-size", type=int, default=0, help="rows per forward pass per rank (gradient "
                   "accumulation); 0 = whole local batch")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default per loss, tuned on tiny: "
                   f"{LR}; real models ~5e-7, ORPO ~8e-6)")
    p.add_argument("--warmup-steps", type=int, default=5, help="linear lr warmup, then constant")
    p.add_argument("--beta", type=float, default=0.1, help="KTO: beta of sigma(beta (r - z0)) (paper: 0.1)")
    p.add_argument("--tau", type=float, default=1.0, help="IPO: tau; the target log-ratio margin is 1/(2 tau) per "
                   "token (TRL's beta=0.1 means 5 nats/token: it lowered the earlier start model's accuracy)")
    p.add_argument("--lam", type=float, default=0.1, help="ORPO: lambda, weight of the odds-ratio term (paper: 0.1)")
    p.add_argument("--nll-weight", type=float, default=None, help="ipo/kto: weight of the per-token NLL of the chosen "
                   "/ desirable answer added to the loss (RPO-style, Pang et al. 2024); default per loss, tuned on "
                   f"tiny: {NLL}; ORPO has its own NLL term")
    p.add_argument("--desirable-weight", type=float, default=None, help="KTO lam_D (default: kto_weights)")
    p.add_argument("--undesirable-weight", type=float, default=1.0, help="KTO lam_U")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--max-len", type=int, default=1024, help="max tokens of prompt + completion (completions are cut)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length for sampling and accuracy")
    p.add_argument("--eval-n", type=int, default=C.HELDOUT_N, help="held-out problems (common.heldout) / rows")
    p.add_argument("--log-every", type=int, default=1, help="log training metrics every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: at the ends only)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (same flags)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the policy and the reference over the "
                   "ranks (FSDP2) instead of DDP; no checkpoints")
    C.add_run_flags(p, "kto_ipo")  # --out, --seed, --device, --wandb, --trust-remote-code
    a = p.parse_args(argv)
    a.lr = LR[a.loss] if a.lr is None else a.lr
    a.nll_weight = NLL.get(a.loss, 0.0) if a.nll_weight is None else a.nll_weight
    C.check_flags(a, {"> 0": "n_prompts samples sample_tries sample_temperature n_train batch_size max_len "
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


def load_data(args, model, tok, paired):
    """(train, heldout, problems, made): rows made from the model's own samples (--make-dataset), the
    built-in task's rows, or --dataset rows; problems: the accuracy set (None for --dataset rows)."""
    problems, made = None, None
    if args.make_dataset:
        if args.dataset is None:
            train_p, problems = C.make_task(args.task, args.n_prompts, args.seed), C.heldout(args.task, args.eval_n)
        else:
            rows = C.load_problems(args.dataset, skip_bad=args.skip_bad_rows)
            train_p, problems = C.hold_out(rows, args.eval_n, args.dataset, what="problems")
            train_p = train_p[:args.n_prompts]
        judge = None if args.judge is None else \
            C.load_model(args.judge, kind="reward", trust_remote_code=args.trust_remote_code, flag="--judge")
        (pairs, unpaired), (h_pairs, h_unpaired) = (make_dataset(model, tok, ps, args, judge)
                                                    for ps in (train_p, problems))  # held out: answers to test prompts
        if C.DIST.master:
            os.makedirs(args.out, exist_ok=True)
        write_jsonl(os.path.join(args.out, "pairs.jsonl"), pairs, ("prompt", "chosen", "rejected"))
        write_jsonl(os.path.join(args.out, "kto.jsonl"), unpaired, ("prompt", "completion", "label"))
        n_d = sum(r["label"] for r in unpaired)
        made = dict(prompts=len(train_p), samples=args.samples, pairs=len(pairs), unpaired=len(unpaired), desirable=n_d,
                    undesirable=len(unpaired) - n_d, desirable_frac=round(n_d / max(1, len(unpaired)), 4))
        C.print0(f"made dataset: {len(pairs)} pairs -> {args.out}/pairs.jsonl, {len(unpaired)} labelled answers "
                 f"({n_d} desirable / {len(unpaired) - n_d} undesirable = {made['desirable_frac']:.1%} desirable) -> "
                 f"{args.out}/kto.jsonl")
        train, heldout = (pairs, h_pairs) if paired else (unpaired, h_unpaired)
        return train[:args.n_train], heldout, problems, made
    if args.dataset is None:  # built-in: bad answers are the start model's own mistakes, or hand-made errors
        problems = C.heldout(args.task, args.eval_n)  # accuracy: the shared test set
        if args.builtin == "corrupt":
            make = C.make_pairs if paired else C.make_unpaired
            train = make(args.task, args.n_train, args.seed)
            return train, make(args.task, args.eval_n, C.HELDOUT_SEED, split="test"), problems, None
        train = own_mistakes(model, tok, C.make_task(args.task, args.n_train, args.seed), args, paired, args.seed)
        return train, own_mistakes(model, tok, problems, args, paired, 1), problems, None
    load = functools.partial(C.load_pairs if paired else C.load_unpaired, skip_bad=args.skip_bad_rows)
    if os.path.isfile(args.dataset):  # a local file: its first n-train + eval-n rows, the last eval-n held out
        train, heldout = C.hold_out(load(args.dataset, "train", args.n_train + args.eval_n), args.eval_n, args.dataset)
        return train[:args.n_train], heldout, None, None
    return load(args.dataset, "train", args.n_train), load(args.dataset, "test", args.eval_n), None, None


def main(argv=None):
    args = parse_args(argv)
    d = C.setup(args.seed, args.device, out=args.out)
    C.check_ranks(args.batch_size)
    t0, ckpt, kto, paired = time.time(), os.path.join(args.out, "checkpoint"), args.loss == "kto", args.loss != "kto"
    model, tok = C.load_model(args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    C.dropout_off(model)  # log-probs of policy and reference must be deterministic
    ref = None if args.loss == "orpo" else copy.deepcopy(model).eval().requires_grad_(False)  # frozen start model
    fsdp = args.fsdp and d.world_size > 1
    if fsdp:  # both sharded (FSDP2), before anything runs them or creates the optimizer
        C.shard_model(model)
        ref = ref if ref is None else C.shard_model(ref)
    max_len = min(args.max_len, getattr(model.config, "max_position_embeddings", None) or args.max_len)

    # ---- data: made from the model's own samples, the built-in task, or --dataset rows
    train, heldout, problems, made = load_data(args, model, tok, paired)
    C.warn_unknown_chars(tok, train + heldout, args.dataset)
    fits = lambda r: len(C.prompt_ids(tok, r["prompt"])) <= max_len // 2
    n0, train, heldout = len(train), [r for r in train if fits(r)], [r for r in heldout if fits(r)]
    C.print0(f"{len(train)} training rows ({n0 - len(train)} dropped: prompt > {max_len // 2} tokens), "
             f"{len(heldout)} held out")
    C.check(len(train) >= args.batch_size and heldout,
            f"too few rows: {len(train)} to train (need --batch-size {args.batch_size}), {len(heldout)} held out")
    lam_d = lam_u = None
    if kto:  # lam_D, lam_U from the training set's label balance
        n_d = sum(r["label"] for r in train)
        lam_d, lam_u = kto_weights(n_d, len(train) - n_d, args.desirable_weight, args.undesirable_weight)
        C.print0(f"kto: {n_d} desirable / {len(train) - n_d} undesirable -> lam_D {lam_d:.4g}, lam_U {lam_u:.4g} "
                 f"(lam_D n_D / lam_U n_U = {lam_d * max(n_d, 1) / (lam_u * max(len(train) - n_d, 1)):.3f})")
    micro = args.micro_batch_size or args.batch_size // d.world_size  # rows per forward pass

    def all_logps(m, prompts, completions):
        """(sum, mean) log-probs of every (prompt, completion), sharded over ranks, gathered in order."""
        def fn(chunk):
            s, n = C.seq_logps(m, tok, [x for x, _ in chunk], [y for _, y in chunk], max_len)
            return s, s / n
        return C.sharded(fn, list(zip(prompts, completions)), micro)

    def heldout_eval():
        """Implicit-reward accuracy/margin on held-out rows (+ greedy task accuracy if known). Pairs: the
        share with reward(chosen) > reward(rejected); unpaired (KTO): the same over all (desirable,
        undesirable) couples, i.e. the AUC of the implicit reward, ties counting 1/2."""
        b, x = len(heldout), [r["prompt"] for r in heldout]
        x, y = (x * 2, [r["chosen"] for r in heldout] + [r["rejected"] for r in heldout]) if paired else \
            (x, [r["completion"] for r in heldout])
        ps, pm = all_logps(model, x, y)
        if args.loss == "orpo":
            _, c, r = orpo_loss(pm[:b], pm[b:], -pm[:b], args.lam)
        elif paired:
            rs, rm = all_logps(ref, x, y)
            _, c, r = ipo_loss(pm[:b], pm[b:], rm[:b], rm[b:], args.tau)
        else:
            rs, _ = all_logps(ref, x, y)
            lab, rew = torch.tensor([r["label"] for r in heldout]), args.beta * (ps - rs)
            c, r = rew[lab], rew[~lab]
        tie = 1e-6  # float32 noise: policy = reference at the start gives differences of ~1e-9, not 0
        if paired:
            res = dict(heldout_reward_acc=(c - r > tie).float().mean().item(),
                       heldout_reward_margin=(c - r).mean().item())
        elif len(c) and len(r):
            diff = c[:, None] - r[None, :]
            res = dict(heldout_reward_acc=((diff > tie).float() + 0.5 * (diff.abs() <= tie).float()).mean().item(),
                       heldout_reward_margin=(c.mean() - r.mean()).item())
        else:
            res = dict(heldout_reward_acc=float("nan"), heldout_reward_margin=float("nan"))
        if problems is not None:  # float(): np.float64 would not load with torch.load(weights_only=True)
            res["accuracy"] = float(C.evaluate(model, tok, problems, max_new_tokens=args.max_new_tokens)["accuracy"])
        return res

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = C.lr_schedule(opt, args.warmup_steps + 1)
    cfg = dict(loss=args.loss, seed=args.seed, batch_size=args.batch_size, n_train=len(train), model=args.model,
               dataset=args.dataset, builtin=args.builtin)
    if args.resume:  # ref was copied above from the START model, as it must be
        start, extra = C.load_checkpoint(ckpt, model, opt, sched)
        C.check(extra["config"] == cfg, f"--resume: flags differ from the checkpoint's {extra['config']}")
        C.print0(f"resumed from {ckpt} at step {start}")
    else:
        start, extra = 0, dict(config=cfg, before=heldout_eval())
    logger = C.Logger(args.out, vars(args), args.wandb, resume_step=start - 1 if args.resume else None)
    if start == 0:
        logger.log(0, **extra["before"])
    ddp = model if fsdp else C.ddp(model)

    # ---- training: one flat loop over 0-based updates; this rank's rows = shard of the global batch
    model.train()
    done, last = start, {}  # updates finished (what a Ctrl-C checkpoint saves), the last logged metrics
    with C.ctrl_c_checkpoint(ckpt, model, tok, opt, sched, extra, lambda: done, sharded=fsdp):
        for step in tqdm(range(start, args.steps), desc=args.loss, disable=not d.master or None, initial=start,
                         total=args.steps):
            g = C.batch_indices(step, args.batch_size, len(train), args.seed)
            rows = [train[i] for i in d.shard(g)]
            kl = 0.0
            if kto:  # z0 from the mismatched pairs (x_i, y_{i-1}) of the global batch, at the current weights
                kl = kl_estimate(model, ref, tok, [train[i]["prompt"] for i in g], [train[i]["completion"] for i in g],
                                 micro, max_len)
            opt.zero_grad(set_to_none=True)
            stats = torch.zeros(7, dtype=torch.float64)  # sums: loss, correct, r_c, r_r, n_c, n_r, aux (h / nll)
            for chunk in C.micro_batches(ddp, rows, micro):  # the same count on every rank
                x = [r["prompt"] for r in chunk]
                if paired:  # chosen and rejected of b pairs in ONE forward pass (2b rows)
                    b, x, y = len(chunk), x + x, [r["chosen"] for r in chunk] + [r["rejected"] for r in chunk]
                else:
                    y = [r["completion"] for r in chunk]
                ps, n_tok = C.seq_logps(ddp, tok, x, y, max_len)
                ps, pm = ps.float(), (ps / n_tok).float()                             # sum, per-token mean
                if ref is not None:
                    with torch.no_grad():
                        rs, n_tok = C.seq_logps(ref, tok, x, y, max_len)
                        rs, rm = rs.float(), (rs / n_tok).float()
                if args.loss == "ipo":
                    losses, c, r = ipo_loss(pm[:b], pm[b:], rm[:b], rm[b:], args.tau)
                    losses = losses - args.nll_weight * pm[:b]                        # + alpha NLL(y_w), per token
                    correct, aux = (c > r).sum(), (c - r).sum()                       # aux: h
                elif args.loss == "orpo":
                    losses, c, r = orpo_loss(pm[:b], pm[b:], -pm[:b], args.lam)
                    correct, aux = (c > r).sum(), -pm[:b].detach().sum()              # aux: NLL of chosen
                else:
                    lab = torch.tensor([r["label"] for r in chunk], device=ps.device)
                    losses, rew = kto_loss(ps, rs, lab, kl, args.beta, lam_d, lam_u)
                    losses = losses - args.nll_weight * pm * lab                      # + alpha NLL(desirable y)
                    c, r = rew[lab], rew[~lab]
                    # v > lam/2 <=> the example is on its correct side of the reference point beta z0
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
                m["reward_margin"] = m["chosen_reward"] - m["rejected_reward"]  # KTO: mean desirable - mean undesirable
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
                   **{f"{k}_{w}": r[k] for k in ("accuracy", "heldout_reward_acc", "heldout_reward_margin")
                      for w, r in (("before", extra["before"]), ("after", after)) if k in r},
                   **{f"last_{k}": v for k, v in last.items()
                      if k in ("loss", "reward_acc", "reward_margin", "kl", "z0", "h", "nll")})
    if kto:
        summary.update(desirable_weight=lam_d, undesirable_weight=lam_u)
    if made:
        summary["made_dataset"] = made
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
