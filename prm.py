"""prm.py: process vs outcome reward models, compared by best-of-N selection (week 9).

An outcome reward model (ORM; Cobbe, Kosaraju, Bavarian et al. 2021, "Training Verifiers to Solve Math Word
Problems", arXiv:2110.14168) reads a whole solution and predicts whether its final answer is right; a process reward
model (PRM; Lightman, Kosaraju, Burda, Edwards, Baker, Lee, Leike, Schulman, Sutskever, Cobbe 2023, "Let's Verify
Step by Step", arXiv:2305.20050) predicts after every step whether the solution is still correct. Either picks the
best of N sampled solutions (the paper, MATH, best-of-1860: PRM 78.2% > ORM 72.4% > majority vote 69.6%). Here both
start from one backbone and see the SAME solutions (built in: policy samples, the reference, a common.corrupt() and
a common.slip() error; --dataset: Math-Shepherd / PRM800K / TRL step rows); only the supervision differs: one label
per solution (ORM, at its last token) vs one per step (PRM, at each step's last token). --head logratio: the
implicit reward of a causal LM against its frozen start (Yuan, Li, Chen, Cui, Ding, Zhang, Zhou, Liu, Peng 2024,
"Free Process Rewards without Process Labels", arXiv:2412.01981; verifier_logits); classifier: a one-logit head.

Run (results, and how each head did on tiny: README 'Results', `python tests/bench/cross_algorithm.py --only prm`):
    python prm.py                                # built-in arithmetic (--task swaps: the shell game), CPU
    python prm.py --prm-agg min --max-n 16       # Math-Shepherd's min-aggregation, smaller N
    torchrun --nproc_per_node=2 prm.py           # data-parallel (gloo on CPU, nccl on GPUs)
    python prm.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset peiyi9979/Math-Shepherd \\
        --train-n 20000 --problems openai/gsm8k --eval-n 200 --max-n 16 --max-new-tokens 384 \\
        --batch-size 8 --lr 1e-5 --steps 2000          # real model: steps = lines of the answer
Outputs in --out (default out/prm): metrics.jsonl, curves.png, best_of_n.png, summary.json (best-of-N accuracy per
method and N, step accuracy/F1/AUC, first-error localisation, before and after), model/ and orm/ (HF folders),
checkpoint/ (--save-every N or Ctrl-C: both verifiers, the optimizer and batch order; --resume is exact).
Simplified vs the paper: tiny models, a synthetic task, labels from a checker (not humans), no active learning;
Lightman et al. supervise only up to the first wrong step (we label later ones bad too: min/prod treat them alike).
"""
import argparse, collections, math, os, random, time, zlib

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C

METHODS = ("prm", "orm", "majority", "prm_vote", "orm_vote", "random", "oracle")  # oracle = pass@N

# ----------------------------------------------------------------------------- losses

def prm_loss(logits, labels, mask):
    """Process supervision (Lightman et al. 2023; Math-Shepherd, Wang et al. 2024, sums it over a solution's steps):
        L = -1/|S| sum_{(b,t) in S} [ y log s(z) + (1 - y) log(1 - s(z)) ],   S = {mask = 1}, s the sigmoid
    logits z (B, T): one log-odds per token; labels y (B, T): 1 = still correct at this step, 0 = this or an earlier
    step is wrong; mask (B, T): 1 at step ends (the separator after a step, EOS after the last)."""
    m = mask.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    return (bce * m).sum() / m.sum().clamp(min=1)   # every step weighs the same


def orm_loss(logits, labels):
    """Outcome supervision: logits (B,) one per solution, labels (B,) 1 = final answer correct.
    L = -1/B sum_b [ y_b log s(z_b) + (1 - y_b) log(1 - s(z_b)) ]   (Cobbe et al. 2021)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

# ----------------------------------------------------------------------------- verifiers

def logprobs(model, b):
    """(B, T) log pi(token_t | tokens_<t) (0 at t = 0), via common.token_logprobs (chunked)."""
    return F.pad(C.token_logprobs(model, b["ids"], b["mask"], b["ids"].shape[1] - 1), (1, 0))


def verifier_logits(model, b, outcome, beta=None, ref_lp=None):
    """Verifier log-odds: (B, T) one per token (PRM) or, with outcome=True, (B,) one per solution. Classifier head
    (ref_lp None): the model's one-label head. Logratio head: the implicit reward of Yuan et al. 2024 (eq. 2/3),
        q_t = beta * sum_{i <= t, i in solution} log pi(y_i | y_<i) / pi_ref(y_i | y_<i),
    pi_ref the frozen initial LM; the ORM reads q at the last token (EOS)."""
    if ref_lp is None:
        out = model(input_ids=b["ids"], attention_mask=b["mask"], position_ids=C.position_ids(b["mask"]),
                    output_hidden_states=outcome)
        if outcome and hasattr(getattr(model, "module", model), "score"):  # read the last column, the end token:
            return getattr(model, "module", model).score(out.hidden_states[-1][:, -1])[:, 0]  # pad == EOS can't hide it
        return out.logits[..., 0]                         # (B, T) token head; (B,) sequence head
    q = beta * ((logprobs(model, b) - ref_lp) * b["cmask"]).cumsum(1)
    return q[:, -1] if outcome else q                     # left padding: column -1 is every row's EOS

# ----------------------------------------------------------------------------- selection, metrics

def aggregate(step_probs, how):
    """A solution's PRM score: the product (Lightman et al.: P(every step correct); favours short solutions) or
    the min (Math-Shepherd) of its step probabilities."""
    return min(step_probs) if how == "min" else math.prod(step_probs)


def best_of_n(candidates, scores, answers, method, rng=None):
    """The chosen one of N candidates. 'prm'/'orm': the highest score; 'majority': the most common extracted
    answer; 'prm_vote'/'orm_vote': the answer with the largest summed score (weighted voting, Uesato et al. 2022);
    ties go to the answer seen first, None answers do not vote (none at all: the top score, or a uniform pick);
    'random': a uniform pick."""
    tally = collections.defaultdict(float)
    for a, s in zip(answers, [1.0] * len(answers) if scores is None else scores):
        if a is not None and (method == "majority" or method.endswith("_vote")):
            tally[a] += s
    if tally:
        return candidates[answers.index(max(tally, key=tally.get))]   # first maximum in order of appearance
    return candidates[int(np.argmax(scores))] if scores is not None and method != "random" else \
        (rng or random).choice(candidates)


def bon_table(records, ns, subsets, seed):
    """Accuracy of each method for each N: `subsets` random N-subsets of each problem's samples (drawn once),
    averaged over problems. records: [{correct, answers, prm, orm}] per problem."""
    rng, table = random.Random(seed), {m: [] for m in METHODS}
    for n in ns:
        hits = collections.defaultdict(list)
        for r in records:
            for _ in range(subsets):
                idx = rng.sample(range(len(r["correct"])), n)
                for m in METHODS[:-1]:
                    key = m.split("_")[0]
                    scores = [r[key][i] for i in idx] if key in r else None
                    pick = best_of_n(idx, scores, [r["answers"][i] for i in idx], m, rng)
                    hits[m].append(r["correct"][pick])
                hits["oracle"].append(any(r["correct"][i] for i in idx))
        for m in METHODS:
            table[m].append(float(np.mean(hits[m])))
    return table


@torch.no_grad()
def evaluate(prm, orm, ref, tok, cands, heldout, sep, max_len, args, ns):
    """Score this rank's candidates and held-out labelled solutions (step probabilities, PRM score, ORM
    probability), gather, and compute the best-of-N table and the step metrics on every rank."""
    prm, orm = getattr(prm, "module", prm), getattr(orm, "module", orm)
    prm.eval(); orm.eval()
    flat, n = [c for group in cands for c in group], args.batch_size * 4
    for chunk in [(flat + heldout)[i:i + n] for i in range(0, len(flat + heldout), n)]:
        b = C.encode(tok, chunk, sep, C.DIST.device, max_len)
        ref_lp = logprobs(ref, b) if ref is not None else None
        p = torch.sigmoid(verifier_logits(prm, b, False, args.beta, ref_lp).float())
        o = torch.sigmoid(verifier_logits(orm, b, True, args.beta, ref_lp).float())
        for r, it in enumerate(chunk):
            it["probs"] = p[r][b["step_mask"][r].bool()].tolist()
            it["prm"], it["orm"] = aggregate(it["probs"] or [0.0], args.prm_agg), o[r].item()
    prm.train(); orm.train()
    keep = lambda it: {k: it[k] for k in ("labels", "probs", "prm", "orm", "correct")}
    records = C.all_gather_list([dict(correct=[c["correct"] for c in g], answers=[c["answer"] for c in g],
                                      prm=[c["prm"] for c in g], orm=[c["orm"] for c in g]) for g in cands])
    labelled = C.all_gather_list([keep(it) for it in (heldout or [c for c in flat if c.get("labels")])])
    return dict(best_of_n=dict(N=ns, **bon_table(records, ns, args.subsets, args.seed)) if records else None,
                **(C.step_metrics(labelled) if labelled else {}))

# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="policy that samples the candidate solutions (hub id, folder, tiny)")
    p.add_argument("--rm-model", default=None, help="backbone of both verifiers (default: --model)")
    p.add_argument("--dataset", default="", help="Math-Shepherd/PRM800K/TRL step rows (file, hub id); default: --task")
    p.add_argument("--problems", default="", help="--dataset: held-out GSM8K/MATH problems for best-of-N")
    p.add_argument("--skip-bad-rows", action="store_true", help=C.SKIP_BAD_ROWS)
    p.add_argument("--task", default="arithmetic", help="built-in task: arithmetic or swaps (tiny then: tiny-swaps)")
    p.add_argument("--train-n", type=int, default=1024, help="training problems (built-in) / labelled solutions")
    p.add_argument("--samples-per-problem", type=int, default=2, help="policy samples per training problem (built-in)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the policy")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length limit of a sampled solution")
    p.add_argument("--max-len", type=int, default=1024, help="verifier input limit in tokens (left-truncated)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (each trains the PRM and the ORM)")
    p.add_argument("--batch-size", type=int, default=64, help="labelled solutions per step per rank")
    p.add_argument("--head", default="logratio", choices=["logratio", "classifier"], help="verifier head (docstring)")
    p.add_argument("--beta", type=float, default=0.5, help="log-ratio scale of the logratio head")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW lr of both verifiers (~1e-3: --head classifier, tiny)")
    p.add_argument("--eval-n", type=int, default=40, help="held-out problems for best-of-N")
    p.add_argument("--max-n", type=int, default=64, help="samples per held-out problem; N = 1, 2, 4, ..., max-n")
    p.add_argument("--subsets", type=int, default=8, help="random N-subsets averaged per problem and N")
    p.add_argument("--prm-agg", default="min", choices=["min", "prod"], help="PRM score: min or product of step probs")
    p.add_argument("--log-every", type=int, default=25, help="log every this many steps")
    p.add_argument("--save-every", type=int, default=0, help="write <out>/checkpoint every N steps (0: only on Ctrl-C)")
    p.add_argument("--resume", action="store_true", help="resume training from <out>/checkpoint (same flags; exact)")
    C.add_run_flags(p, "prm")  # --out, --seed, --device, --wandb, --trust-remote-code
    a = p.parse_args(argv)
    C.check_flags(a, {">= 1": "train_n samples_per_problem max_new_tokens max_len steps batch_size eval_n max_n "
                              "subsets log_every", ">= 0": "save_every", "> 0": "lr beta temperature"})
    C.check(a.task in ("arithmetic", "swaps") or a.dataset, f"--task {a.task}: built-in step labels exist for "
            "arithmetic and swaps only")
    C.check(not a.problems or a.dataset,
            "--problems needs --dataset (a verifier trained on the built-in task cannot judge them)")
    a.model = C.task_model(a.model, a.task, a.dataset)  # tiny-<task> for a task tiny never saw
    return a


def main(argv=None):
    args, t0 = parse_args(argv), time.time()
    d = C.setup(args.seed, args.device, out=args.out)
    builtin, sep = not args.dataset, ";" if not args.dataset else "\n"  # built in: ';'-separated steps

    # ---- models: the policy (frozen) and two verifiers on the same pretrained backbone
    trc, backbone = args.trust_remote_code, args.rm_model or args.model
    policy, ptok = C.load_model(args.model, trust_remote_code=trc) if builtin or args.problems else (None, None)
    kw = dict(trust_remote_code=trc, flag="--rm-model" if args.rm_model else "--model")
    if args.head == "logratio":     # two trainable copies of the LM and the frozen original
        (prm, tok), (orm, _) = [C.load_model(backbone, **kw) for _ in range(2)]
        ref = policy if policy is not None and backbone == args.model else C.load_model(backbone, **kw)[0]
        ref.eval().requires_grad_(False)
    else:
        orm, tok = C.load_model(backbone, kind="reward", **kw)
        prm, ref = C.token_classifier(orm, trc), None
    max_len = C.context_len(orm, args.max_len)

    # ---- data: labelled training solutions, held-out candidates (sampled once)
    rng = random.Random(args.seed + 1000 * d.rank)
    sample = lambda problems, n: C.generate_groups(policy, ptok, [p["prompt"] for p in problems], n,
                                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if builtin:
        mine = d.shard(C.make_task(args.task, args.train_n, args.seed, "train"))
        train, heldout = [C.task_item(p, t) for p, texts in zip(mine, sample(mine, args.samples_per_problem))
                          for t in texts + [p["solution"], C.corrupt(p, rng), C.slip(p, rng)]], []
    else:
        data = C.load_step_data(args.dataset, args.train_n, args.skip_bad_rows)
        C.warn_unknown_chars(tok, data, args.dataset)
        test = lambda it: zlib.crc32(it["prompt"][0]["content"].encode()) % 10 == 0   # 10% of prompts
        train, heldout = d.shard([it for it in data if not test(it)]), d.shard([it for it in data if test(it)])
    C.check(train, "no training solutions on this rank (more --train-n than ranks, please)")
    probs = (C.heldout(args.task, args.eval_n) if builtin else
             C.load_problems(args.problems, "test", args.eval_n, args.skip_bad_rows, "--problems") if args.problems
             else [])
    C.warn_unknown_chars(ptok, probs, args.problems, "--problems")
    mine = d.shard(probs)   # --max-n candidates per held-out problem, sampled once
    cands = [[C.task_item(p, t, sep) for t in texts] for p, texts in zip(mine, sample(mine, args.max_n))]
    ns = sorted({2**i for i in range(int(math.log2(args.max_n)) + 1)} | {args.max_n})
    frac = lambda xs: C.all_reduce_mean(float(np.mean(xs)) if xs else 0.0)
    C.print0(f"[prm] {len(train)} training solutions/rank ({frac([it['correct'] for it in train]):.0%} correct, "
             f"{frac([l for it in train for l in it['labels']]):.0%} good steps); {len(probs)} held-out problems x "
             f"{args.max_n} samples")
    before = evaluate(prm, orm, ref, tok, cands, heldout, sep, max_len, args, ns)

    # ---- training: one loop, both verifiers, the same batch. One checkpoint holds both (the ORM inside state.pt)
    # and every rank's batch order and RNG, so --resume continues the same run.
    prm, orm = C.ddp(prm), C.ddp(orm)
    opt = torch.optim.AdamW([*prm.parameters(), *orm.parameters()], lr=args.lr, weight_decay=0.0)  # per weight
    sched = C.lr_schedule(opt, max(1, args.steps // 20), args.steps)  # warm-up, cosine to 10%
    ckpt, start, order = os.path.join(args.out, "checkpoint"), 0, []
    if args.resume:
        start, extra = C.load_checkpoint(ckpt, prm, opt, sched)
        getattr(orm, "module", orm).load_state_dict(extra["orm"])
        order, st = extra["ranks"][d.rank]
        rng.setstate((st[0], tuple(st[1]), st[2]))
        C.print0(f"[prm] resumed from {ckpt} at step {start}")
    logger = C.Logger(args.out, vars(args), args.wandb, resume_step=start - 1 if args.resume else None)

    def save(step, ranks, rng=None):  # ranks: every rank's batch order and RNG
        C.save_checkpoint(ckpt, prm, tok, step, opt, sched, rng=rng,
                          extra=dict(orm=getattr(orm, "module", orm).state_dict(), ranks=ranks))
        return f"[prm] interrupted at step {step}: checkpoint in {ckpt}; --resume continues"

    step, at = start, (list(order), rng.getstate(), C.rng_state())
    with C.ctrl_c(lambda: save(step, [at[:2]] * d.world_size, at[2])):  # no collective: exact for one process
        for step in tqdm(range(start, args.steps), desc="prm+orm", disable=not d.master or None):
            at = (list(order), rng.getstate(), C.rng_state())   # this step's start: a Ctrl-C redoes it from here
            batch = [train[i] for i in C.take_batch(order, rng, len(train), args.batch_size)]
            b = C.encode(tok, batch, sep, d.device, max_len)
            with torch.no_grad():
                ref_lp = logprobs(ref, b) if ref is not None else None
            z_step = verifier_logits(prm, b, False, args.beta, ref_lp)       # (B, T)
            z_out = verifier_logits(orm, b, True, args.beta, ref_lp)         # (B,)
            l_prm, l_orm = prm_loss(z_step, b["labels"], b["step_mask"]), orm_loss(z_out, b["outcome"])
            C.nan_guard(l_prm + l_orm, step)
            opt.zero_grad(set_to_none=True)
            (l_prm + l_orm).backward()                                       # two separate graphs
            C.clip_grad(prm, 1.0); C.clip_grad(orm, 1.0)                     # each verifier's own norm
            opt.step(); sched.step()
            if step % args.log_every == 0 or step == args.steps - 1:
                sm, mean = b["step_mask"].bool(), lambda x: C.all_reduce_mean(x.float().mean().item())  # batch, ranks
                logger.log(step, prm_loss=mean(l_prm), orm_loss=mean(l_orm), prm_step_acc=mean((z_step[sm] > 0) ==
                           (b["labels"][sm] > 0.5)), orm_acc=mean((z_out > 0) == (b["outcome"] > 0.5)),
                           good_step_frac=mean(b["labels"][sm]), lr=sched.get_last_lr()[0])
            if args.save_every and (step + 1) % args.save_every == 0:
                save(step + 1, C.all_gather_list([(order, rng.getstate())]))

    # ---- evaluation: best-of-N and step-level metrics, before vs after
    after = evaluate(prm, orm, ref, tok, cands, heldout, sep, max_len, args, ns)
    C.save_pretrained_atomic(os.path.join(args.out, "model"), prm, tok)  # rank 0 writes
    C.save_pretrained_atomic(os.path.join(args.out, "orm"), orm, tok)
    bon, bon_before = after.pop("best_of_n"), before.pop("best_of_n")
    summary = dict(dataset=args.dataset or args.task, head=args.head, beta=args.beta, reference_model=backbone,
                   prm_agg=args.prm_agg, train_solutions=len(train) * d.world_size, eval_problems=len(probs),
                   samples_per_problem=args.max_n, **after, before=before)
    if bon:
        at = {m: bon[m][-1] for m in METHODS}
        ranked = sorted(("prm", "orm", "majority"), key=lambda m: -at[m])
        C.print_table([dict(method=m, **{f"N={n}": v for n, v in zip(ns, bon[m])}) for m in METHODS],
                      "method " + " ".join(f"N={n}" for n in ns),
                      f"best-of-N accuracy on {len(probs)} held-out problems (PRM score: {args.prm_agg} of step probs)")
        C.plot(args.out, {m: ([math.log2(n) for n in ns], bon[m]) for m in METHODS}, "best_of_n.png",
               xlabel="log2 N (samples per problem)", ylabel="accuracy", title="best-of-N: PRM vs ORM vs majority")
        summary.update(best_of_n=bon, before_best_of_n={m: bon_before[m][-1] for m in ("prm", "orm")},
                       policy_sample_accuracy=bon["random"][0], **{f"{m}_at_max_n": at[m] for m in METHODS},
                       ordering=" > ".join(f"{m} {at[m]:.3f}" for m in ranked),
                       reproduces_paper_ordering=ranked == ["prm", "orm", "majority"],
                       paper_ordering="prm 0.782 > orm 0.724 > majority 0.696 (Lightman et al. 2023, MATH, "
                                      "best-of-1860)")
    C.plot_metrics(args.out, ["prm_loss", "orm_loss", "prm_step_acc", "orm_acc"], "curves.png")
    summary["wall_s"] = round(time.time() - t0, 1)
    C.write_summary(args.out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
