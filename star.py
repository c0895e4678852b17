"""star.py: STaR, the Self-Taught Reasoner: bootstrap reasoning by keeping only correct rationales.

STaR (Zelikman, Wu, Mu & Goodman 2022, "STaR: Bootstrapping Reasoning With Reasoning", arXiv:2203.14465) turns a model
that can sometimes reason into one that reasons more often, using nothing but final answers. Each outer iteration n:

  1. sample:        for every training problem x_i, sample a rationale + answer (r_i, y^_i) from M_{n-1};
  2. filter:        keep (x_i, r_i) when y^_i equals the known answer y_i;
  3. rationalize:   for the problems it failed, show the correct answer as a hint in the prompt,
                    sample again, and keep the rationale if it reaches y_i, stored as
                    (x_i WITHOUT the hint, r_i): the model learns to produce it unaided;
  4. fine-tune:     M_n = fine-tune the ORIGINAL model M on the kept set (not M_{n-1}: restarting
                    avoids overfitting to its own earlier samples), with 20% more steps each time;
  5. evaluate held-out accuracy; repeat with M_n as the sampler.

Steps 1-2 are a policy gradient with a 0/1 reward (paper eq. 1): the gradient of J = sum_i E[1(y^_i = y_i)] is sum_i
E[1(y^_i = y_i) grad log p_M(y^_i, r^_i | x_i)], and samples with reward 0 contribute nothing, so it is plain
supervised fine-tuning on the correct samples (`star_loss`). Rationalization (step 3) is the off-policy extra: it
rescues problems the model cannot solve yet, which a pure filter would never learn from.

Run:
    python star.py                                  # built-in arithmetic + the `tiny` model, CPU
    python star.py --no-rationalize                 # the ablation: filtering only
    python star.py --task countdown                 # tiny was never trained on it: nothing to bootstrap from
    # a real model on GSM8K (hub id, or a local .jsonl with question/answer rows):
    python star.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --train-n 2000 --eval-n 500 \\
        --iterations 3 --steps 40 --batch-size 32 --micro-batch-size 8 --lr 1e-5 --max-new-tokens 320 --temperature 0.7
    torchrun --nproc_per_node 4 star.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k ...   # multi-GPU
Outputs in --out (default out/star): metrics.jsonl, star.png (held-out accuracy and kept fractions per iteration),
summary.json (accuracy before, per iteration, after; kept counts), model/ (the last iteration's model, an HF folder),
checkpoint/ (--save-every N, or on Ctrl-C; --resume continues the same run exactly).

Simplified vs the paper: no few-shot prompt (the tiny model was SFT'd on the answer format, and chat models are told
to end with '####'); one rationale kept per problem from --samples draws; rationales that copy the hint marker are
dropped (a leak the paper did not filter); the paper stops when accuracy plateaus, here --iterations is fixed.

Results (`python star.py`, 256 training problems per iteration, the shared held-out set common.heldout()): mean
± sd over seeds in README 'Results', from `python tests/bench/cross_algorithm.py --seeds 0,1,2 --only star`.
Rationalization matters most for real chat models, which can read a hint; tiny never saw one in its SFT data.
"""
import argparse, math, os, random, time

import numpy as np
import torch
from tqdm.auto import tqdm

import common as C

HINT = "(answer: {})"     # the rationalization hint; "(answer:" must never reach the kept data
HINT_MARKER = "(answer:"

# ----------------------------------------------------------------------------- STaR pieces


def rationalize_prompt(prompt, answer):
    """The prompt with the correct answer given as a hint (paper section 3.2).
    A string prompt gets the hint at the end of the question, before its last line (the answer
    cue): "Q: 347+285\\nA: " -> "Q: 347+285 (answer: 632)\\nA: ". Chat messages get it appended
    to the last user turn. Pure: the input is never modified."""
    hint = HINT.format(answer)
    if isinstance(prompt, str):
        head, sep, cue = prompt.rpartition("\n")
        return f"{head} {hint}{sep}{cue}" if sep else f"{prompt} {hint}"
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    C.check(users, "rationalize_prompt: a chat prompt needs a user turn")
    msgs = [dict(m) for m in prompt]
    msgs[users[-1]]["content"] = f"{msgs[users[-1]]['content']}\n{hint}"
    return msgs


def filter_kept(problems, completions, hinted=False):
    """STaR's filter. completions[i] = the samples drawn for problems[i]. Returns (kept, failed):
    kept = [(original prompt, rationale)] with the first correct sample of each solved problem
    (one rationale per problem, as in the paper), failed = the problems with no correct sample.
    hinted=True (rationalization): the samples came from hinted prompts; the kept pair still
    uses the ORIGINAL prompt, and samples that copy the hint marker are dropped, so the model
    is never trained to expect or echo a hint."""
    kept, failed = [], []
    for p, samples in zip(problems, completions, strict=True):
        good = [c for c in samples if C.verify(p, c) and not (hinted and HINT_MARKER in c)]
        if good:
            kept.append((p["prompt"], good[0]))
        else:
            failed.append(p)
    return kept, failed


def star_loss(logps, mask):
    """Fine-tuning loss on the kept set: token-mean negative log-likelihood of the rationales.
    logps: (B, T) log p_M(token_t | x, tokens_<t) of the completion tokens, mask: (B, T) 1 for
    real completion tokens (incl. EOS), 0 for padding. Returns a scalar.
    This is paper eq. 1 with the 0/1 reward folded into the data: every kept row has reward 1,
    the dropped ones had reward 0 and so no gradient:  L = -sum_{b,t} m_bt logp_bt / sum m_bt."""
    return -(logps * mask).sum() / mask.sum().clamp(min=1)


def sample_and_filter(model, tok, problems, args):
    """Steps 1-3 on this rank's problems: direct samples, then hinted samples for the failures."""
    samples = lambda prompts: C.generate_groups(model, tok, prompts, args.samples, max_new_tokens=args.max_new_tokens,
                                                temperature=args.temperature, top_p=args.top_p)  # [--samples each]
    kept_direct, failed = filter_kept(problems, samples([p["prompt"] for p in problems]))
    hinted = [rationalize_prompt(p["prompt"], p["answer"]) for p in failed] if args.rationalize else []
    kept_rat = filter_kept(failed, samples(hinted), hinted=True)[0] if hinted else []
    return kept_direct, kept_rat

# ----------------------------------------------------------------------------- flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="built-in name (tiny, tiny-untrained), local HF folder or hub id")
    p.add_argument("--dataset", default=None, help="GSM8K/Countdown/MATH rows: hub id or local file (default: --task)")
    p.add_argument("--eval-dataset", default=None, help="held-out problems (default: the test split / last rows)")
    p.add_argument("--skip-bad-rows", action="store_true", help=C.SKIP_BAD_ROWS)
    p.add_argument("--task", default="arithmetic", help="built-in task: arithmetic, countdown or swaps (tiny-swaps)")
    p.add_argument("--difficulty", type=int, default=None, help="built-in task difficulty (digits / numbers / swaps)")
    p.add_argument("--train-n", type=int, default=256, help="training problems sampled each iteration")
    p.add_argument("--eval-n", type=int, default=C.HELDOUT_N, help="held-out problems (built in: common.heldout)")
    p.add_argument("--iterations", type=int, default=3, help="outer iterations (sample, filter, rationalize, tune)")
    p.add_argument("--samples", type=int, default=1, help="samples per problem per pass (the first correct is kept)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for rationales (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold for rationales")
    p.add_argument("--max-new-tokens", type=int, default=64, help="rationale length limit (GSM8K: ~300)")
    p.add_argument("--rationalize", action=argparse.BooleanOptionalAction, default=True,
                   help="rationalization with the answer as a hint (--no-rationalize: the ablation)")
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps in the first iteration")
    p.add_argument("--step-growth", type=float, default=1.2, help="steps grow by this factor each iteration (+20%%)")
    p.add_argument("--batch-size", type=int, default=32, help="kept pairs per optimizer step, over all ranks")
    p.add_argument("--micro-batch-size", type=int, default=0, help="pairs per forward pass per rank (0: all of them)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW lr (tiny: 1e-4..2e-4; 0.5B chat models: ~1e-5)")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of each iteration's steps (then cosine)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--log-every", type=int, default=10, help="log the training loss every N steps")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps and iteration (0: on Ctrl-C)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (same flags; more iterations)")
    C.add_run_flags(p, "star")  # --out, --seed, --device, --wandb, --trust-remote-code
    args = p.parse_args(argv)
    C.check_flags(args, {">= 1": "train_n eval_n iterations samples max_new_tokens steps step_growth batch_size "
                                 "log_every", ">= 0": "temperature micro_batch_size save_every", "> 0": "lr grad_clip",
                         "in (0, 1]": "top_p", "in [0, 1)": "warmup"})
    C.check(args.task in C.TASKS, f"--task {args.task!r}: choose {', '.join(C.TASKS)}")
    args.model = C.task_model(args.model, args.task, args.dataset)  # tiny-<task> for a task tiny never saw
    return args


def load_data(args):
    """(train, test) problem dicts: the built-in task, or GSM8K-style rows with chat prompts."""
    if args.dataset is None:
        return (C.make_task(args.task, args.train_n, args.seed, "train", args.difficulty),
                C.heldout(args.task, args.eval_n, args.difficulty))
    return C.train_test_problems(args.dataset, args.eval_dataset, args.train_n, args.eval_n, args.skip_bad_rows)

# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    d = C.setup(args.seed, args.device, out=args.out)
    C.check_ranks(args.batch_size)
    C.check(args.train_n >= d.world_size, f"--train-n {args.train_n} must be >= the {d.world_size} ranks")
    t0, ckpt = time.time(), os.path.join(args.out, "checkpoint")
    train, test = load_data(args)
    model, tok = C.load_model(args.model, device=d.device, trust_remote_code=args.trust_remote_code)
    C.warn_unknown_chars(tok, train + test, args.dataset)
    # STaR fine-tunes the ORIGINAL model every iteration: keep its weights (on the CPU, so a
    # real model does not take twice the accelerator memory) and copy them back in each time.
    original = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    ddp = C.ddp(model)
    # --resume: a checkpoint is taken mid fine-tuning (phase "train": the kept set, the batch order and
    # the optimizer travel with it) or after an iteration (phase "sample": M_n and the RNG, so the
    # next iteration samples exactly what the uninterrupted run would have).
    free = ("iterations", "save_every", "resume", "log_every", "out", "device", "wandb")  # may differ on --resume
    cfg = {k: v for k, v in vars(args).items() if k not in free}
    resume, gstep = C.checkpoint_state(ckpt)["extra"] if args.resume else None, 0
    if resume:
        C.check(resume["config"] == cfg, f"--resume: flags differ from the checkpoint's {resume['config']}")
        acc_before, table = resume["acc_before"], resume["table"]
        if resume["phase"] == "sample":
            gstep, _ = C.load_checkpoint(ckpt, model)
        C.print0(f"resumed from {ckpt}: iteration {resume['iteration']} ({resume['phase']})")
    else:
        acc_before, table = C.evaluate(model, tok, test, max_new_tokens=args.max_new_tokens)["accuracy"], []
    logger = C.Logger(args.out, config=vars(args), wandb=args.wandb, resume_step=resume and resume["gstep"] - 1)
    C.print0(f"held-out accuracy before STaR: {acc_before:.3f} ({len(test)} problems); {len(train)} training problems")
    mine = d.shard(train)             # this rank samples rationales for its share of the problems
    per_rank = args.batch_size // d.world_size
    micro = args.micro_batch_size or per_rank
    n_micro = math.ceil(per_rank / micro)  # the same on every rank: DDP needs equal backward counts

    def save(it, phase, opt=None, sched=None, rng=None, at=None, **state):  # at: the global step of `state`
        g = gstep if at is None else at
        C.save_checkpoint(ckpt, model, tok, g, opt, sched, rng=rng, extra=dict(
            config=cfg, iteration=it, phase=phase, gstep=g, acc_before=acc_before, table=table, **state))

    done = None  # mid fine-tuning: the state after the last finished step (what Ctrl-C saves)

    def interrupted():
        if done is None:
            return "interrupted while sampling or evaluating: no new checkpoint" + \
                " (--resume continues from the last one)" * bool(args.save_every)
        save(it, "train", opt, sched, **done)  # the interrupted step is redone on --resume
        return f"interrupted: checkpoint saved to {ckpt} (continue with --resume)"
    with C.ctrl_c(interrupted):
        for it in range(resume["iteration"] if resume else 1, args.iterations + 1):
            # -- 1-3. sample, filter, rationalize with M_{n-1}; every rank then holds the same kept set
            t_it, here = time.time(), resume if resume and resume["phase"] == "train" else None
            resume = None
            if here:
                kept_direct, kept_rat, t_sample = here["kept_direct"], here["kept_rat"], here["sample_s"]
            else:
                kept_direct, kept_rat = sample_and_filter(model, tok, mine, args)
                kept_direct, kept_rat = C.all_gather_list(kept_direct), C.all_gather_list(kept_rat)
                t_sample = time.time() - t_it
            kept = kept_direct + kept_rat

            # -- 4. fine-tune the original model on the kept set; steps grow 20% per iteration
            steps = round(args.steps * args.step_growth ** (it - 1))
            model.load_state_dict({k: v.to(d.device) for k, v in original.items()})
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
            warm = max(1, int(args.warmup * steps))  # linear warm-up, then cosine decay to 10% of lr
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (
                1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
            rng = random.Random(args.seed * 1000 + it)  # same stream on every rank: identical batches
            order, losses, first = [], [], 0
            if here:  # weights, AdamW, lr schedule and RNG as they were after step here["step"]
                gstep, _ = C.load_checkpoint(ckpt, model, opt, sched)
                order, losses, first = here["order"], here["losses"], here["step"]
                rng.setstate((here["batch_rng"][0], tuple(here["batch_rng"][1]), here["batch_rng"][2]))
            if not kept:
                C.print0(f"iteration {it}: nothing kept, the model stays the original one")
            model.train()
            snap = lambda step: dict(kept_direct=kept_direct, kept_rat=kept_rat, sample_s=t_sample, step=step,
                                     order=list(order), losses=list(losses), batch_rng=rng.getstate(),
                                     rng=C.rng_state(), at=gstep)
            done = snap(first)
            for step in tqdm(range(first, steps if kept else 0), desc=f"star iter {it}", disable=not d.master or None,
                             leave=False):
                batch = [kept[i] for i in C.take_batch(order, rng, len(kept), args.batch_size)]
                batch = d.shard(batch)            # this rank's per_rank pairs of the global batch
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for chunk in C.micro_batches(ddp, batch, micro):  # n_micro chunks on every rank
                    ids, mask, cmask = C.collate(tok, [b[0] for b in chunk], [b[1] for b in chunk], d.device)
                    logps = C.token_logprobs(ddp, ids, mask, cmask.shape[1])   # (B, T) completion log-probs
                    loss = star_loss(logps, cmask.float()) / n_micro
                    C.nan_guard(loss, gstep)
                    loss.backward(); loss_sum += loss.item()
                gnorm = C.clip_grad(model, args.grad_clip)
                opt.step(); sched.step(); gstep += 1
                losses.append(loss_sum)
                done = snap(step + 1)
                if step % args.log_every == 0 or step == steps - 1:
                    logger.log(gstep - 1, iteration=it, loss=C.all_reduce_mean(loss_sum),
                               grad_norm=float(gnorm), lr=sched.get_last_lr()[0])
                if args.save_every and gstep % args.save_every == 0 and step + 1 < steps:  # the last: after the eval
                    save(it, "train", opt, sched, **done)
            done = None

            # -- 5. held-out accuracy of M_n (M_n samples the next iteration's rationales)
            acc = C.evaluate(model, tok, test, max_new_tokens=args.max_new_tokens)["accuracy"]
            row = dict(iteration=it, kept_direct=len(kept_direct), kept_rationalized=len(kept_rat),
                       train_problems=len(train), steps=steps if kept else 0,
                       final_loss=float(np.mean(losses[-5:])) if losses else None,
                       heldout_accuracy=float(acc), sample_s=round(t_sample, 1),
                       iteration_s=round(time.time() - t_it, 1))
            table.append(row)
            logger.log(gstep - 1, **{k: v for k, v in row.items() if v is not None})  # after update gstep - 1
            if args.save_every:
                save(it + 1, "sample")

    # ----------------------------------------------------------------------------- report
    col = lambda k: [r[k] for r in table]
    C.print_table([dict(iteration="0 (start)", heldout_accuracy=acc_before)] + table, "iteration kept_direct "
                  "kept_rationalized steps heldout_accuracy", f"\nSTaR: kept (of {len(train)} training problems)")
    its = list(range(len(table) + 1))
    C.plot(args.out, {"held-out accuracy": (its, [acc_before] + col("heldout_accuracy")),
                      "kept by sampling / train": (its[1:], [k / len(train) for k in col("kept_direct")]),
                      "kept by rationalization / train": (its[1:], [k / len(train) for k in col("kept_rationalized")])},
           "star.png", "STaR iteration", "fraction", f"STaR on {args.dataset or args.task}")
    C.save_pretrained_atomic(os.path.join(args.out, "model"), model, tok)  # rank 0 writes
    summary = dict(model=args.model, dataset=args.dataset or args.task, rationalize=args.rationalize, seed=args.seed,
                   train_n=len(train), eval_n=len(test), accuracy_before=float(acc_before),
                   accuracy_per_iteration=col("heldout_accuracy"), accuracy_after=table[-1]["heldout_accuracy"],
                   kept_direct=col("kept_direct"), kept_rationalized=col("kept_rationalized"), steps=col("steps"),
                   wall_s=round(time.time() - t0, 1))
    C.write_summary(args.out, summary)
    C.cleanup()
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()
