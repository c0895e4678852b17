"""Benchmark: grpo.py and dpo.py against TRL's GRPOTrainer and DPOTrainer, in one process.

Not collected by pytest (the file name does not start with test_). TRL is a benchmark-only
dependency: `pip install trl==1.16.0` (on an offline GPU machine, carry its wheel and those of
accelerate and psutil). Prints, for identical settings:
  * GRPO: seconds per optimizer step (rollout + update) of TRL vs grpo.py, their ratio, and peak
    GPU memory of each (CUDA only)
  * rollouts: common.generate tokens/s and, on CUDA, the fraction of the memory-bandwidth bound
    (every decode step reads all weights once: bound = batch * bandwidth / weight bytes)
  * DPO: seconds per optimizer step of TRL vs dpo.py and the ratio

    python tests/bench/bench_vs_trl.py                                   # CPU, tiny model: ratios only
    python tests/bench/bench_vs_trl.py --shape qwen2-0.5b --device cuda \\
        --max-new-tokens 256 --dpo-prompt-len 128 --dpo-completion-len 256    # the issue's H100 setting
`--shape qwen2-0.5b` builds a random-weight model of Qwen2-0.5B's shape (24 layers, 896 wide,
vocab 151936) with the built-in character tokenizer, so no hub access is needed.
"""
import argparse, json, os, random, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

import common as C


def make_model(args, folder):
    """The model folder both sides load: the built-in tiny model or a random Qwen2-0.5B shape."""
    if args.shape == "tiny":
        m, tok = C.load_model("tiny", device=torch.device("cpu"))
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        tok = C.char_tokenizer()
        cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=2048, tie_word_embeddings=True,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
        torch.manual_seed(0)
        m = Qwen2ForCausalLM(cfg)
    C.save_pretrained_atomic(folder, m, tok)
    return sum(p.numel() for p in m.parameters())


def peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()


def peak_gb(dev):
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")


def trl_grpo(args, folder, dev, problems):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if dev.type == "cuda": torch.cuda.synchronize()
            self.t = time.time()

        def on_step_end(self, *a, **k):
            if dev.type == "cuda": torch.cuda.synchronize()
            times.append(time.time() - self.t)

    def reward(completions, answer, **kw):
        return [float(C.extract_answer(c) == a) for c, a in zip(completions, answer)]

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ds = Dataset.from_list([dict(prompt=p["prompt"], answer=p["answer"]) for p in problems])
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.group_size,
                     num_generations=args.group_size, max_completion_length=args.max_new_tokens, max_steps=args.steps + 1,
                     learning_rate=1e-6, beta=0.0, num_iterations=1, temperature=1.0, logging_steps=1, report_to="none",
                     save_strategy="no", bf16=dev.type == "cuda", use_cpu=dev.type == "cpu", disable_tqdm=True, seed=0)
    peak_reset(dev)
    GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()]).train()
    return float(np.mean(times[1:])), peak_gb(dev)  # step 1 is warm-up (compilation, allocator)


def ours_grpo(args, folder, dev, problems):
    import grpo
    out = tempfile.mkdtemp()
    data = os.path.join(out, "problems.jsonl")
    with open(data, "w") as f:
        for p in problems:
            f.write(json.dumps(dict(question=p["prompt"], answer="#### " + p["answer"])) + "\n")
    peak_reset(dev)
    grpo.main(["--model", folder, "--dataset", data, "--eval-n", "8", "--steps", str(args.steps + 1), "--prompts-per-step",
               str(args.prompts), "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
               "--micro-batch", str(args.micro_batch), "--lr", "1e-6", "--threads", str(torch.get_num_threads()),
               "--device", str(dev), "--out", out])
    rows = C.read_metrics(out)
    return float(np.mean([r["step_time"] for r in rows[1:]])), peak_gb(dev)


def rollout_speed(args, folder, dev, n_params):
    model, tok = C.load_model(folder, device=dev)
    prompts = [f"Q: {random.randint(100, 999)}+{random.randint(100, 999)}\nA: " for _ in range(args.prompts)]
    C.generate(model, tok, prompts, n=args.group_size, max_new_tokens=args.max_new_tokens)  # warm-up / compile
    if dev.type == "cuda": torch.cuda.synchronize()
    t = time.time()
    out = C.generate(model, tok, prompts, n=args.group_size, max_new_tokens=args.max_new_tokens)
    if dev.type == "cuda": torch.cuda.synchronize()
    tps = out["completion_mask"].sum().item() / (time.time() - t)
    bytes_per = 2 if dev.type == "cuda" else 4
    bound = args.prompts * args.group_size * args.bandwidth_gbs * 1e9 / (n_params * bytes_per)
    return tps, bound


def dpo_pairs(args, n):
    rng = random.Random(0)
    text = lambda k: "".join(rng.choice("0123456789+=;# ") for _ in range(k))
    return [dict(prompt=text(args.dpo_prompt_len), chosen=text(args.dpo_completion_len), rejected=text(args.dpo_completion_len)) for _ in range(n)]


def trl_dpo(args, folder, dev, pairs):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if dev.type == "cuda": torch.cuda.synchronize()
            self.t = time.time()

        def on_step_end(self, *a, **k):
            if dev.type == "cuda": torch.cuda.synchronize()
            times.append(time.time() - self.t)

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.dpo_batch, max_steps=args.steps + 1,
                    max_length=args.dpo_prompt_len + args.dpo_completion_len + 2, learning_rate=1e-6, beta=0.1,
                    logging_steps=1, report_to="none", save_strategy="no", bf16=dev.type == "cuda",
                    use_cpu=dev.type == "cpu", disable_tqdm=True, seed=0)
    peak_reset(dev)
    DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok, callbacks=[Timer()]).train()
    return float(np.mean(times[1:])), peak_gb(dev)


def ours_dpo(args, folder, dev, pairs):
    import dpo
    out = tempfile.mkdtemp()
    data = os.path.join(out, "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs + pairs[:8])  # the last 8 rows are dpo.py's held-out set
    peak_reset(dev)
    dpo.main(["--model", folder, "--dataset", data, "--eval-n", "8", "--steps", str(args.steps + 1), "--batch-size",
              str(args.dpo_batch), "--max-len", str(args.dpo_prompt_len + args.dpo_completion_len + 2), "--lr", "1e-6",
              "--device", str(dev), "--out", out])
    rows = [r for r in C.read_metrics(out) if "step_time" in r]
    return float(np.mean([r["step_time"] for r in rows[1:]])), peak_gb(dev)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "qwen2-0.5b"], help="model both sides train")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="GRPO completion length")
    p.add_argument("--micro-batch", type=int, default=64, help="grpo.py rows per forward/backward")
    p.add_argument("--dpo-batch", type=int, default=8, help="DPO pairs per step")
    p.add_argument("--dpo-prompt-len", type=int, default=32, help="DPO prompt length (characters = tokens)")
    p.add_argument("--dpo-completion-len", type=int, default=64, help="DPO completion length")
    p.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="GPU memory bandwidth (H100 SXM: 3350 GB/s)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: grpo,rollout,dpo")
    args = p.parse_args()
    dev = torch.device(args.device)
    folder = os.path.join(tempfile.mkdtemp(), "model")
    n_params = make_model(args, folder)
    problems = C.make_task("arithmetic", args.prompts * (args.steps + 2), 0)
    res = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", shape=args.shape, params=n_params)
    if "grpo" not in args.skip:
        (t_trl, m_trl), (t_ours, m_ours) = trl_grpo(args, folder, dev, problems), ours_grpo(args, folder, dev, problems)
        res.update(grpo_trl_s=t_trl, grpo_ours_s=t_ours, grpo_speedup=t_trl / t_ours, grpo_peak_trl_gb=m_trl,
                   grpo_peak_ours_gb=m_ours, grpo_peak_ratio=m_ours / m_trl if dev.type == "cuda" else None)
    if "rollout" not in args.skip:
        tps, bound = rollout_speed(args, folder, dev, n_params)
        res.update(rollout_tokens_per_s=tps, rollout_bound_tokens_per_s=bound if dev.type == "cuda" else None,
                   rollout_fraction_of_bound=tps / bound if dev.type == "cuda" else None)
    if "dpo" not in args.skip:
        pairs = dpo_pairs(args, args.dpo_batch * (args.steps + 2))
        (t_trl, _), (t_ours, _) = trl_dpo(args, folder, dev, pairs), ours_dpo(args, folder, dev, pairs)
        res.update(dpo_trl_s=t_trl, dpo_ours_s=t_ours, dpo_speedup=t_trl / t_ours)
    print(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
