"""Benchmark: grpo.py and dpo.py against TRL's GRPOTrainer and DPOTrainer, in one process.

Not collected by pytest (the file name does not start with test_). TRL is a benchmark-only
dependency: `pip install trl==1.16.0` (on an offline GPU machine, carry its wheel and those of
accelerate and psutil). Both sides load the same random-weight model folder, read the same prompts
(random weights: every completion runs to the token budget), sample at the same temperature, and
are timed per optimizer step; each number is the median of --steps steps after one warm-up step.
Prints, as JSON:
  * GRPO: seconds per step (rollout + update) of TRL vs grpo.py and their ratio; grpo.py's step
    split into generation and the rest; peak GPU memory of each (CUDA only)
  * rollouts: common.generate tokens/s and, on CUDA, the fraction of the memory-bandwidth bound
    (every decode step reads all weights once: bound = batch * bandwidth / weight bytes)
  * DPO: seconds per step of TRL vs dpo.py (reference log-probs precomputed, its default) and vs
    `dpo.py --ref-on-the-fly` (a reference forward every step, as TRL does)

    python tests/bench/bench_vs_trl.py                       # CPU, built-in tiny model, arithmetic prompts
    python tests/bench/bench_vs_trl.py --shape qwen3-42m --threads 2   # the CPU setting (README 'Speed')
    python tests/bench/bench_vs_trl.py --shape qwen2-0.5b --device cuda --prompts 8 \\
        --max-new-tokens 256 --dpo-max-len 384                         # the GPU setting (H100 anchors)
`--shape qwen3-42m`: a random-weight Qwen3 (4 layers, 256 wide, tied embeddings, 42M parameters, most
of them the 151669-token embedding) with the real Qwen3 tokenizer and chat template from --realdata;
its prompts are GSM8K questions (chat messages, as grpo.py builds them from GSM8K rows) and its pairs
hh-rlhf transcripts. `--shape qwen2-0.5b`: Qwen2-0.5B's shape (24 layers, 896 wide, vocab 151936) with
the built-in character tokenizer and built-in data, so no hub access is needed.
"""
import argparse, json, os, random, statistics, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

import common as C


def make_model(args, folder):
    """The model folder both sides load: the built-in tiny model, a random Qwen3-42M or Qwen2-0.5B shape."""
    if args.shape == "tiny":
        m, tok = C.load_model("tiny", device=torch.device("cpu"))
    elif args.shape == "qwen3-42m":
        from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
        tok = AutoTokenizer.from_pretrained(os.path.join(args.realdata, "tokenizers", "qwen3"))
        cfg = Qwen3Config(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, vocab_size=len(tok), max_position_embeddings=2048,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=None)
        torch.manual_seed(0)
        m = Qwen3ForCausalLM(cfg)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        tok = C.char_tokenizer()
        cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=2048,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=None)
        torch.manual_seed(0)
        m = Qwen2ForCausalLM(cfg)
    C.save_pretrained_atomic(folder, m, tok)
    return sum(p.numel() for p in m.parameters()), tok


def grpo_rows(args, n):
    """n GSM8K-style rows {question, answer}: real GSM8K for qwen3-42m, built-in arithmetic otherwise."""
    if args.shape == "qwen3-42m":
        return C.read_rows(os.path.join(args.realdata, "gsm8k", "train.jsonl"))[:n]
    return [dict(question=p["prompt"], answer="#### " + p["answer"]) for p in C.make_task("arithmetic", n, 0)]


def dpo_pairs(args, tok, n):
    """n pairs {prompt, chosen, rejected} that fit --dpo-max-len untruncated, none of them dropped by dpo.py
    (a prompt over half of it), hh-rlhf for qwen3-42m."""
    if args.shape != "qwen3-42m":
        rng = random.Random(0)
        text = lambda k: "".join(rng.choice("0123456789+=;# ") for _ in range(k))
        return [dict(prompt=text(args.dpo_max_len // 3), chosen=text(args.dpo_max_len // 2),
                     rejected=text(args.dpo_max_len // 2)) for _ in range(n)]
    rows = C.load_pairs(os.path.join(args.realdata, "hh-rlhf", "harmless-base", "test.jsonl.gz"), skip_bad=True)
    n_tok = lambda text: len(tok(text)["input_ids"])
    size = lambda r: n_tok(r["prompt"]) + max(n_tok(r["chosen"]), n_tok(r["rejected"]))
    fits = lambda r: n_tok(r["prompt"]) <= args.dpo_max_len // 2 and size(r) + 2 <= args.dpo_max_len  # dpo.py's limits
    return [r for r in rows if fits(r)][:n]


def peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()


def peak_gb(dev):
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_after_warmup(times):
    return statistics.median(times[1:])  # step 0 is warm-up (allocator, compilation, lazy imports)


def trl_timer(dev, times):
    """A TRL callback appending each optimizer step's wall time to `times`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(dev); self.t = time.time()

        def on_step_end(self, *a, **k):
            sync(dev); times.append(time.time() - self.t)
    return Timer()


def trl_config(args, dev):
    return dict(output_dir=tempfile.mkdtemp(), max_steps=args.steps + 1, learning_rate=1e-6, logging_steps=1,
                report_to="none", save_strategy="no", bf16=dev.type == "cuda", use_cpu=dev.type == "cpu",
                disable_tqdm=True, seed=0)


def trl_grpo(args, folder, dev, rows):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    times = []

    def reward(completions, answer, **kw):  # chat completions arrive as message lists
        text = lambda c: c[-1]["content"] if isinstance(c, list) else c
        return [float(C.extract_answer(text(c)) == a) for c, a in zip(completions, answer)]

    problems = [C.problem_row(r, "row") for r in rows]  # the prompts grpo.py builds from the same rows
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ds = Dataset.from_list([dict(prompt=p["prompt"], answer=p["answer"]) for p in problems])
    cfg = GRPOConfig(per_device_train_batch_size=args.prompts * args.group_size, num_generations=args.group_size,
                     max_completion_length=args.max_new_tokens, beta=0.0, num_iterations=1,
                     temperature=args.temperature, **trl_config(args, dev))
    peak_reset(dev)
    GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                callbacks=[trl_timer(dev, times)]).train()
    return median_after_warmup(times), peak_gb(dev)


def ours_grpo(args, folder, dev, rows):
    import grpo
    out = tempfile.mkdtemp()
    data = os.path.join(out, "problems.jsonl")
    C.write_jsonl(data, rows + rows[:8])  # the last 8 rows are grpo.py's held-out set
    peak_reset(dev)
    grpo.main(["--model", folder, "--dataset", data, "--eval-n", "8", "--eval-samples", "0", "--eval-every", "0",
               "--steps", str(args.steps + 1), "--prompts-per-step", str(args.prompts), "--group-size",
               str(args.group_size), "--max-new-tokens", str(args.max_new_tokens), "--temperature",
               str(args.temperature), "--micro-batch", str(args.micro_batch), "--lr", "1e-6", "--threads",
               str(torch.get_num_threads()),
               "--device", str(dev), "--out", out])
    rows = C.read_metrics(out)
    step, gen = median_after_warmup([r["step_time"] for r in rows]), median_after_warmup([r["gen_time"] for r in rows])
    return step, gen, peak_gb(dev)


def rollout_speed(args, folder, dev, n_params, rows):
    model, tok = C.load_model(folder, device=dev)
    prompts = [C.problem_row(r, "row")["prompt"] for r in rows[:args.prompts]]
    kw = dict(n=args.group_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    C.generate(model, tok, prompts, **kw)  # warm-up / compile
    sync(dev); t = time.time()
    out = C.generate(model, tok, prompts, **kw)
    sync(dev)
    tps = out["completion_mask"].sum().item() / (time.time() - t)
    bytes_per = 2 if dev.type == "cuda" else 4
    bound = args.prompts * args.group_size * args.bandwidth_gbs * 1e9 / (n_params * bytes_per)
    return tps, bound


def trl_dpo(args, folder, dev, pairs):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    times = []
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    cfg = DPOConfig(per_device_train_batch_size=args.dpo_batch, max_length=args.dpo_max_len, beta=0.1,
                    **trl_config(args, dev))
    peak_reset(dev)
    DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok,
               callbacks=[trl_timer(dev, times)]).train()
    return median_after_warmup(times), peak_gb(dev)


def ours_dpo(args, folder, dev, pairs, extra=()):
    import dpo
    out = tempfile.mkdtemp()
    data = os.path.join(out, "pairs.jsonl")
    C.write_jsonl(data, pairs + pairs[:8])  # the last 8 rows are dpo.py's held-out set
    peak_reset(dev)
    dpo.main(["--model", folder, "--dataset", data, "--eval-n", "8", "--steps", str(args.steps + 1), "--batch-size",
              str(args.dpo_batch), "--max-len", str(args.dpo_max_len), "--lr", "1e-6", "--device", str(dev),
              "--out", out, *extra])
    return median_after_warmup([r["step_time"] for r in C.read_metrics(out) if "step_time" in r]), peak_gb(dev)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-42m", "qwen2-0.5b"],
                   help="model both sides train")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, both sides (0: torch's default)")
    p.add_argument("--realdata", default=os.path.join(ROOT, "..", "shared", "realdata"),
                   help="folder with tokenizers/qwen3, gsm8k/ and hh-rlhf/ (--shape qwen3-42m)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step); the median")
    p.add_argument("--prompts", type=int, default=4, help="GRPO prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="GRPO completion length")
    p.add_argument("--temperature", type=float, default=1.0, help="GRPO sampling temperature, both sides")
    p.add_argument("--micro-batch", type=int, default=64, help="grpo.py rows per forward/backward")
    p.add_argument("--dpo-batch", type=int, default=8, help="DPO pairs per step")
    p.add_argument("--dpo-max-len", type=int, default=256, help="DPO prompt + completion tokens (pairs that fit)")
    p.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="GPU memory bandwidth (H100 SXM: 3350 GB/s)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: grpo,trl,rollout,dpo")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, skip = torch.device(args.device), args.skip.split(",")
    folder = os.path.join(tempfile.mkdtemp(), "model")
    n_params, tok = make_model(args, folder)
    rows = grpo_rows(args, args.prompts * (args.steps + 1) + 8)
    res = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", shape=args.shape, params=n_params,
               threads=torch.get_num_threads(), torch=torch.__version__, steps=args.steps)
    if "grpo" not in skip:
        t_ours, gen, m_ours = ours_grpo(args, folder, dev, rows[:-8])
        res.update(grpo_ours_s=t_ours, grpo_ours_generation_s=gen, grpo_ours_update_s=t_ours - gen)
        if "trl" not in skip:
            t_trl, m_trl = trl_grpo(args, folder, dev, rows[:-8])
            res.update(grpo_trl_s=t_trl, grpo_speedup=t_trl / t_ours, grpo_peak_trl_gb=m_trl, grpo_peak_ours_gb=m_ours,
                       grpo_peak_ratio=m_ours / m_trl if dev.type == "cuda" else None)
    if "rollout" not in skip:
        tps, bound = rollout_speed(args, folder, dev, n_params, rows)
        res.update(rollout_tokens_per_s=tps, rollout_bound_tokens_per_s=bound if dev.type == "cuda" else None,
                   rollout_fraction_of_bound=tps / bound if dev.type == "cuda" else None)
    if "dpo" not in skip:
        pairs = dpo_pairs(args, tok, args.dpo_batch * (args.steps + 1))
        res.update(dpo_ours_s=ours_dpo(args, folder, dev, pairs)[0],
                   dpo_ours_ref_on_the_fly_s=ours_dpo(args, folder, dev, pairs, ["--ref-on-the-fly"])[0])
        if "trl" not in skip:
            res["dpo_trl_s"] = trl_dpo(args, folder, dev, pairs)[0]
            res.update(dpo_speedup=res["dpo_trl_s"] / res["dpo_ours_s"],
                       dpo_speedup_ref_on_the_fly=res["dpo_trl_s"] / res["dpo_ours_ref_on_the_fly_s"])
    print(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
