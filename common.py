"""common.py: the small, boring things every script shares (no algorithm lives here).

Sections, top to bottom:
  1. setup       device / dtype / autocast / seed / DDP (torchrun) / flag checks / one-line user errors
  2. tasks       the embedded world: arithmetic with a checkable chain of thought, Countdown, swaps,
                 reviews, verifiers and step labels (prm.py's items), preference data, plus a GSM8K-style answer
                 extractor for real data
  3. data        one reader for local jsonl/json/parquet or hub datasets, errors that name the row and
                 field; problems, pairs, unpaired rows, text-row prompts; the held-out split of a local file
  4. models      load_model(): hub id, local folder, or the built-in ~0.8M-param char-level Llama (and the
                 word-level reviews RM); token_classifier()
  5. generation  batched sampling (left padding, stop at end-of-turn/EOS; static-cache fast path on
                 CUDA), accuracy / pass@k, the model's own answers and mistakes
  6. log-probs   per-token and per-sequence log-probs without a float32 [batch, seq, vocab] blow-up; a policy
                 with a value head (PPO); SFT; the step-labelled verifier batch (encode)
  7. rewards     rm_score(), the one reward-model scorer (scorer(): it or the verifier); pairwise win rates
                 (verifier, RM, judge LM)
  8. loop        seeded batch order, lr schedule, Ctrl-C, atomic checkpoints / resume, metrics, plots
"""
import ast, collections, contextlib, copy, functools, json, math, os, random, re, shutil, sys, time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- 1. setup

class InputError(ValueError):
    """Bad user input (flag, file, row). Scripts print it as one line and exit with status 2."""


@contextlib.contextmanager
def friendly_errors():
    """Wrap a script's main(): InputError -> `error: ...` on stderr, exit 2, no traceback."""
    try:
        yield
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check(cond, msg):
    if not cond:
        raise InputError(msg)


RULES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, ">= 2": lambda v: v >= 2,
         "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1]": lambda v: 0 <= v <= 1,
         "in (0, 1)": lambda v: 0 < v < 1}


def check_flags(args, rules):
    """A parse_args' range checks in one call: rules = {"> 0": "lr beta", ">= 0": "warmup_steps", ...}
    (argparse dest names, RULES' keys). The first flag out of range is `--flag must be > 0, got -1`;
    a flag left at None (unset, a default computed later) is not checked."""
    for rule, names in rules.items():
        for name in names.split():
            v = getattr(args, name)
            check(v is None or RULES[rule](v), f"--{name.replace('_', '-')} must be {rule}, got {v}")


def add_run_flags(p, name):
    """The flags every LM script ends its parser with: --out (default out/<name>), --seed, --device,
    --wandb, --trust-remote-code."""
    p.add_argument("--out", default=os.path.join("out", name), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, data order, sampling)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda, then mps, then cpu)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    p.add_argument("--trust-remote-code", action="store_true", help="allow hub models with custom code")


def add_preference_flags(p, steps):
    """The flags of the offline preference scripts (dpo.py, kto_ipo.py): start model, built-in data, batching,
    schedule, evaluation, --resume and --fsdp; `steps`: the default of --steps."""
    p.add_argument("--model", default="tiny", help="start (SFT) model: built-in name, local folder or hub id; "
                   "also the reference")
    p.add_argument("--task", default="arithmetic", help="built-in task when no --dataset: arithmetic, "
                   "countdown or swaps (the logic puzzle; --model tiny then means tiny-swaps)")
    p.add_argument("--builtin", default="model", choices=["model", "corrupt"], help="built-in data's bad answers: the "
                   "start model's own wrong samples, or hand-made errors (dropped carry, off-by-one)")
    p.add_argument("--sample-tries", type=int, default=2, help="--builtin model: answers sampled per prompt to find "
                   "a wrong one")
    p.add_argument("--sample-temperature", type=float, default=0.7, help="--builtin model: sampling temperature")
    p.add_argument("--steps", type=int, default=steps, help="optimizer updates")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (same flags)")
    p.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch in rows (pairs or examples), split "
                   "evenly over the torchrun ranks")
    p.add_argument("--micro-batch-size", type=int, default=0, help="rows per forward pass per rank (gradient "
                   "accumulation); 0 = whole local batch")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model (and a reference) over the "
                   "ranks (FSDP2) instead of DDP, for models that do not fit on one GPU; no checkpoints")
    for flag, default, what in (("--warmup-steps", 5, "linear lr warmup (steps), then constant"),
                                ("--max-len", 1024, "max tokens of prompt + completion (completions are cut)"),
                                ("--max-new-tokens", 64, "answer length for sampling, accuracy, win rate"),
                                ("--eval-n", HELDOUT_N, "held-out rows / test problems (built in: common.heldout) / "
                                                        "win-rate prompts"),
                                ("--log-every", 1, "log training metrics every N steps"),
                                ("--eval-every", 0, "held-out evaluation every N steps (0: before and after only)")):
        p.add_argument(flag, type=int, default=default, help=what)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")


def set_seed(seed):
    random.seed(seed); np.random.seed(seed % 2**32); torch.manual_seed(seed)


def available_devices():
    """The device names this torch can use here: cpu, cuda:0..N-1, mps."""
    out = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return out


def get_device(name=None, flag="--device"):
    """cuda -> mps -> cpu unless `name` ('cpu', 'cuda:1', ...) is given; a device that is not here is
    an InputError naming the flag and what is available (not torch's AssertionError on first use)."""
    if not name:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if "mps" in available_devices() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"{flag} {name}: not a device name; available: {', '.join(available_devices())}") from None
    here = available_devices()
    if dev.type == "cuda":
        ok = (dev.index or 0) < torch.cuda.device_count()
    elif dev.type in ("cpu", "mps"):
        ok = dev.type in here
    else:  # xpu, ...: the backend's own is_available()
        ok = bool(getattr(getattr(torch, dev.type, None), "is_available", lambda: False)())
    if not ok:
        no_cuda = dev.type == "cuda" and not torch.backends.cuda.is_built()
        why = " (this torch was built without CUDA)" if no_cuda else ""
        raise InputError(f"{flag} {name}: no such device here{why}; available: {', '.join(here)}")
    return dev


def check_out(path, flag="--out"):
    """Stop before any compute when the output folder cannot be made or written: it is a file, sits
    under a file, or its nearest existing folder refuses a probe file (read-only disk, permissions)."""
    check(path, f"{flag}: empty path")
    check(not os.path.exists(path) or os.path.isdir(path), f"{flag} {path}: is a file, not a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    check(os.path.isdir(parent), f"{flag} {path}: {parent} is a file, so no folder can be made under it")
    import tempfile
    try:  # a real write, not os.access: root passes every access check, a read-only mount does not
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write in {parent} ({e.strerror or type(e).__name__})") from None


def check_model_path(name, flag):
    """A model flag naming a local path (./x, /x, a/b/c: load_model's rule) that does not exist is an
    error now, not when the model is first needed (dpo's --judge: after the training)."""
    local = bool(name) and (name.startswith((".", "/")) or name.count("/") > 1)
    check(not local or os.path.isdir(name), f"{flag} {name}: no such local folder")


def get_dtype(device):
    """bf16 on GPUs that support it, else fp32 (CPU fp32 is the reproducible reference)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device=None, enabled=True):
    """bf16 autocast on CUDA GPUs that support it, else nothing. The weights stay fp32: updates of
    lr ~1e-6 would round away in bf16 weights."""
    device = device or DIST.device
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ddp(model):
    """The model wrapped in DistributedDataParallel under torchrun (gradients averaged over the
    ranks); the model itself in one process."""
    if DIST.world_size == 1:
        return model
    ids = [DIST.device] if DIST.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    master: bool = True

    def shard(self, items):
        """This rank's slice of a list (round robin, so every rank gets a near-equal share)."""
        return items[self.rank::self.world_size]


DIST, _THREADS = Dist(), []


def setup(seed=0, device=None, out=None, threads=0):
    """Check --out (check_out) and --device (get_device) before any compute, seed, and, when launched
    by torchrun (RANK/WORLD_SIZE set), join the process group: nccl on CUDA, gloo elsewhere, one
    device per rank. threads: torch's CPU threads for the run (0: its default; cleanup() puts the
    caller's back: tests call main()). Returns a Dist."""
    if out is not None:
        check_out(out)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        import torch.distributed as dist
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        dev = get_device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", local); torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        new = Dist(rank, local, world, dev, rank == 0)
    else:
        new = Dist(device=get_device(device))
    DIST.__dict__.update(new.__dict__)  # in place: `from common import DIST` stays valid everywhere
    if threads:  # after the checks: a bad flag leaves the caller's threads alone
        _THREADS.append(torch.get_num_threads()); torch.set_num_threads(threads)
    set_seed(seed)  # same seed on every rank: identical initial weights and sampling streams
    return DIST


def check_ranks(n, flag="--batch-size"):
    """A global batch must split evenly over the torchrun ranks."""
    check(n % DIST.world_size == 0, f"{flag} {n} must be divisible by the {DIST.world_size} ranks")


def print0(*args, **kw):
    if DIST.master:
        print(*args, **kw, flush=True)


def all_reduce_mean(x):
    """Mean of a float (or tensor) over ranks; identity without DDP."""
    if DIST.world_size == 1:
        return x
    import torch.distributed as dist
    t = torch.as_tensor(x, dtype=torch.float64, device=DIST.device).clone()
    dist.all_reduce(t); t /= DIST.world_size
    return t.item() if t.dim() == 0 else t


def all_gather_list(items):
    """Concatenate python lists from all ranks (in rank order); identity without DDP."""
    if DIST.world_size == 1:
        return list(items)
    import torch.distributed as dist
    out = [None] * DIST.world_size
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def shard_model(model):
    """FSDP2 (torch.distributed.fsdp.fully_shard; Zhao et al. 2023): parameters, gradients and
    optimizer state are split over the ranks, and each decoder layer (HF's _no_split_modules)
    is all-gathered only while it runs: for models that do not fit on one GPU. Every forward is
    then a collective, so all ranks must run the same number of forwards (generate() keeps them
    in step). Call it before creating the optimizer."""
    from torch.distributed.fsdp import fully_shard
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m)
    return fully_shard(model)


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(getattr(model, "module", model), FSDPModule)


def cleanup(barrier=True):
    """Leave the process group. barrier: wait for every rank first, so none tears its connections
    down while another still uses them (off on Ctrl-C paths, where a rank may never arrive)."""
    import torch.distributed as dist
    if _THREADS:  # the count before the first setup() that changed it (a failed run never cleaned up)
        torch.set_num_threads(_THREADS[0]); _THREADS.clear()
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()

# ----------------------------------------------------------------------------- 2. tasks
# Every problem is a dict: prompt (str or chat messages), answer (str), solution (reference
# chain of thought, a completion string), task (name), plus task fields (x/y, nums/target).
# Arithmetic:  "Q: 347+285\nA: "  ->  "7+5+0=12;4+8+1=13;3+2+1=6;#### 632"
#   one step per digit, right to left: digit_x + digit_y + carry_in = s (carry_out = s // 10).
# Countdown:   "Q: make 24 from 3 9 4\nA: " -> "9-3=6;6*4=24"  (use every number once)
# Swaps:       "Q: ball 2; swap 13,24,12,34,23,14\nA: " -> "13:2;24:4;12:4;34:3;23:2;14:2;#### 2"
#   A logic puzzle, the shell game: a ball under one of cups 1-4, a chain of swaps of two cups; one
#   step per swap writes where the ball is after it (each depends on the one before); the answer is the last.

ARITH_STEP = re.compile(r"^(\d)\+(\d)\+(\d)=(\d+)$")
CD_STEP = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")
NUM = r"-?[\d,]*\.?\d+"


def extract_answer(text):
    """GSM8K-style final answer: `#### 42`, else the last `\\boxed{..}`, else the last number.
    Returns a normalised string ('1,000' -> '1000', '3.50' -> '3.5') or None."""
    m = re.search(r"####\s*(" + NUM + ")", text)
    if not m:
        boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
        m = re.search(NUM, boxed[-1]) if boxed else None
        if not m:
            nums = re.findall(NUM, text)
            return normalize_number(nums[-1]) if nums else None
    return normalize_number(m.group(1) if m.lastindex else m.group(0))


def normalize_number(s):
    s = s.replace(",", "").strip()
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else str(v)


def _split_digits(x, n):
    return [(x // 10**i) % 10 for i in range(n)]


def arithmetic_solution(x, y, drop_last_carry=False):
    """The reference chain of thought; drop_last_carry: the habit in tiny's SFT data (see
    tiny_sft_data): the carry into the leftmost column is written as 0, and the answer follows."""
    n, steps, carry, digits = max(len(str(x)), len(str(y))), [], 0, []
    for i, (dx, dy) in enumerate(zip(_split_digits(x, n), _split_digits(y, n))):
        carry = 0 if drop_last_carry and i == n - 1 else carry
        s = dx + dy + carry
        steps.append(f"{dx}+{dy}+{carry}={s}"); carry = s // 10; digits.append(s % 10)
    answer = int(str(carry) + "".join(map(str, digits[::-1])))  # == x + y unless the carry was dropped
    return ";".join(steps + [f"#### {answer}"])


def is_test_arith(x, y):
    return (x * 7919 + y) % 10 == 0  # fixed held-out split: 10% of all (x, y), never trained on


def make_arithmetic(n, seed, digits=3, split="train"):
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        x, y = rng.randrange(10 ** (digits - 1), 10**digits), rng.randrange(10 ** (digits - 1), 10**digits)
        if is_test_arith(x, y) != (split == "test") or (x, y) in seen:
            continue
        seen.add((x, y))
        out.append(dict(task="arithmetic", prompt=f"Q: {x}+{y}\nA: ", answer=str(x + y),
                        solution=arithmetic_solution(x, y), x=x, y=y))
    return out


def arithmetic_step_labels(problem, completion):
    """One bool per `;`-separated step: True while the chain is correct; the first wrong step
    and every step after it are False (the PRM800K / Let's-Verify convention)."""
    x, y = problem["x"], problem["y"]
    n = max(len(str(x)), len(str(y)))
    steps = [s.strip() for s in completion.split(";") if s.strip()]
    labels, ok, carry = [], True, 0
    for i, s in enumerate(steps):
        if i < n:
            m = ARITH_STEP.match(s)
            want = (_split_digits(x, n)[i], _split_digits(y, n)[i], carry)
            good = bool(m) and tuple(int(g) for g in m.groups()[:3]) == want and int(m.group(4)) == sum(want)
            carry = sum(want) // 10
        else:
            good = i == n and extract_answer(s) == str(x + y) and s.startswith("####")
        ok = ok and good
        labels.append(ok)
    return labels


def _cd_eval(a, op, b):
    if op == "+": return a + b
    if op == "-": return a - b
    if op == "*": return a * b
    return a // b if b and a % b == 0 else None


def make_countdown(n, seed, count=3, max_num=15, split="train"):
    """Reach `target` from `count` numbers with + - * / (exact), each number used once."""
    rng, out, seen = random.Random(seed), [], set()
    for _ in range(100 * n):
        if len(out) == n:
            break
        nums = [rng.randint(1, max_num) for _ in range(count)]
        pool, steps = list(nums), []
        while len(pool) > 1:
            a, b = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
            a, b = max(a, b), min(a, b)
            op = rng.choice(("+-*/" if a % b == 0 else "+-*") if a != b else "+*/")  # never 0
            c = _cd_eval(a, op, b)
            steps.append(f"{a}{op}{b}={c}"); pool.append(c)
        target, key = pool[0], (tuple(sorted(nums)), pool[0])
        if target <= 0 or key in seen or ((hash_key(key) % 10 == 0) != (split == "test")):
            continue
        seen.add(key)
        out.append(dict(task="countdown", prompt=f"Q: make {target} from {' '.join(map(str, nums))}\nA: ",
                        answer=str(target), solution=";".join(steps), nums=nums, target=target))
    check(len(out) == n, f"countdown: only {len(out)} distinct {split} problems with count={count}, max_num={max_num}")
    return out


def hash_key(key):
    return sum((i + 1) * 7919 * v for i, v in enumerate(key[0])) + 31 * key[1]


def countdown_verify(nums, target, completion):
    """Steps `a op b=c` over a pool of numbers, or an `<answer>expr</answer>` (TinyZero style)."""
    m = re.search(r"<answer>(.*?)</answer>", completion, re.S)
    if m:
        try:
            tree = ast.parse(m.group(1).strip(), mode="eval")
            used = sorted(int(n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant))
            allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
            ok_nodes = all(isinstance(n, allowed) for n in ast.walk(tree))
            return ok_nodes and used == sorted(nums) and \
                abs(eval(compile(tree, "<answer>", "eval"), {"__builtins__": {}}) - target) < 1e-6
        except (SyntaxError, ZeroDivisionError, ValueError, TypeError):
            return False
    pool, last = list(nums), None
    for s in [s.strip() for s in completion.split(";") if s.strip()]:
        m = CD_STEP.match(s)
        if not m:
            return False
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if a not in pool: return False
        pool.remove(a)
        if b not in pool: return False
        pool.remove(b)
        if _cd_eval(a, op, b) != c: return False
        pool.append(c); last = c
    return len(pool) == 1 and last == target


SWAPS_CUPS = 4
SWAP_PAIRS = [f"{i}{j}" for i in range(1, SWAPS_CUPS + 1) for j in range(i + 1, SWAPS_CUPS + 1)]
SWAPS_HABIT = 0.7  # share of the swaps SFT solutions that skip the last swap (as TINY_HABIT: far from a coin)


def swaps_positions(ball, pairs):
    """Where the ball is after each swap: a swap of cups i and j moves it only if it is under one of them."""
    out = []
    for pair in pairs:
        i, j = int(pair[0]), int(pair[1])
        ball = j if ball == i else i if ball == j else ball
        out.append(ball)
    return out


def swaps_solution(ball, pairs, skip_last=False):
    """The reference chain of thought: each swap and where the ball is after it, then the answer.
    skip_last: the habit in the swaps SFT data (see tiny_sft_data): the last swap is written but not
    done, so the chain (and its answer) is wrong exactly when the ball is under one of its cups."""
    pos = swaps_positions(ball, pairs)
    if skip_last:
        pos[-1] = pos[-2] if len(pos) > 1 else ball
    return ";".join([f"{p}:{c}" for p, c in zip(pairs, pos)] + [f"#### {pos[-1]}"])


def swaps_problem(ball, pairs):
    return dict(task="swaps", prompt=f"Q: ball {ball}; swap {','.join(pairs)}\nA: ", ball=ball, pairs=list(pairs),
                answer=str(swaps_positions(ball, pairs)[-1]), solution=swaps_solution(ball, pairs))


def make_swaps(n, seed, swaps=6, split="train"):
    """The shell game: a ball under one of four cups, then `swaps` swaps of two cups (any pair,
    repeats allowed): where is the ball? Held-out split: 10% of all puzzles by a fixed hash of the
    prompt (crc32, the same in every process), never trained on."""
    import zlib
    check(swaps >= 1, f"swaps: difficulty (the number of swaps) must be >= 1, got {swaps}")
    rng, out, seen = random.Random(seed), [], set()
    for _ in range(100 * n):
        if len(out) == n:
            break
        p = swaps_problem(rng.randint(1, SWAPS_CUPS), [rng.choice(SWAP_PAIRS) for _ in range(swaps)])
        if p["prompt"] in seen or (zlib.crc32(p["prompt"].encode()) % 10 == 0) != (split == "test"):
            continue
        seen.add(p["prompt"]); out.append(p)
    check(len(out) == n, f"swaps: only {len(out)} distinct {split} puzzles with {swaps} swaps (ask for fewer)")
    return out


def swaps_step_labels(problem, completion):
    """As arithmetic_step_labels: one bool per `;` step, True while the chain is correct (each step
    names the next swap and where the ball is after it; then `#### <cup>`), False from the first wrong one."""
    want = swaps_positions(problem["ball"], problem["pairs"])
    steps = [s.strip() for s in completion.split(";") if s.strip()]
    labels, ok = [], True
    for i, s in enumerate(steps):
        if i < len(want):
            good = s == f"{problem['pairs'][i]}:{want[i]}"
        else:
            good = i == len(want) and s.startswith("####") and extract_answer(s) == problem["answer"]
        ok = ok and good
        labels.append(ok)
    return labels


def step_labels(problem, completion):
    """The built-in step verifier of a task (arithmetic, swaps); prm.py's process labels."""
    check(problem["task"] in ("arithmetic", "swaps"), f"--task {problem['task']}: no built-in step labels")
    return (arithmetic_step_labels if problem["task"] == "arithmetic" else swaps_step_labels)(problem, completion)


def split_steps(text, sep):
    """A solution's steps, [str]: text split at sep (';' built in, a newline in real data), stripped, empty
    pieces dropped; an empty completion is one empty step (so there is always a last step to score)."""
    return [s.strip() for s in text.split(sep) if s.strip()] or [""]


def task_item(problem, text, sep=";"):
    """A sampled solution as an item like load_step_data's rows (prm.py): {prompt, steps: [str] (split_steps),
    answer (extract_answer), labels, correct: bool (verify)}. labels: [bool], one per step (step_labels), for a
    task with a step verifier (arithmetic, swaps), else None. The last step, scored at the end token, claims
    "done and right": it is False for a cut-off chain or a wrong answer."""
    labels = (step_labels(problem, text) or [False]) if problem["task"] in ("arithmetic", "swaps") else None
    ok = verify(problem, text)
    if labels:
        labels[-1] = labels[-1] and ok
    return dict(prompt=problem["prompt"], steps=split_steps(text, sep), answer=extract_answer(text), labels=labels,
                correct=ok)


def verify(problem, completion):
    """Outcome verifier: True iff the completion solves the problem."""
    if problem["task"] == "countdown":
        return countdown_verify(problem["nums"], problem["target"], completion)
    if problem["task"] == "reviews":  # the gold rule: a positive review
        return review_polarity(completion) > 0
    if problem["task"] in ("arithmetic", "swaps"):  # the chain must also be well formed up to the answer
        return extract_answer(completion) == problem["answer"] and "####" in completion
    return extract_answer(completion) == normalize_number(str(problem["answer"]))


def format_ok(problem, completion):
    """A weak format reward: the completion has the shape the task asks for."""
    if problem["task"] == "countdown":
        return bool(re.fullmatch(r"(\d+[-+*/]\d+=\d+;)*\d+[-+*/]\d+=\d+", completion.strip()))
    return "####" in completion


# Reviews (week 3's sentiment world): "Review: the music" -> " was superb, and the plot was not dull."
# One or two clauses "<aspect> was [very] [not] <word>"; positive, negative and neutral words. The gold rule
# (review_polarity) counts the sentiment words, a "not" flipping the next one: > 0 is positive. A
# classifier trained on labelled reviews (reward_model.py --task reviews) is the proxy PPO optimises.
REVIEW_POS = "superb great lovely brilliant moving charming gripping wonderful clever delightful".split()
REVIEW_NEG = "dull awful boring clumsy flat weak messy tedious bland silly".split()
REVIEW_NEUTRAL = ["long", "short", "in french", "set in rome", "about a heist", "based on a book", "in color", "quiet"]
REVIEW_ASPECTS = ["the film", "the plot", "the acting", "the cast", "the music", "the ending", "the script",
                  "the pacing", "the dialogue", "the story", "the humor", "the score"]
REVIEW_OPENERS = ["", "honestly, ", "overall, ", "in short, "]


def review_polarity(text):
    """The gold rule: +1 per positive word, -1 per negative word, sign flipped after "not"/"never"."""
    words, total = re.findall(r"[a-z]+", text.lower()), 0
    for i, w in enumerate(words):
        v = (w in REVIEW_POS) - (w in REVIEW_NEG)
        total += -v if i and words[i - 1] in ("not", "never") else v
    return total


def _review_clause(rng, aspect, kind):
    """One clause of the given kind: 'pos', 'neg' or 'neu' (a negated word of the other side counts too)."""
    if kind == "neu":
        return f"{aspect} was {rng.choice(REVIEW_NEUTRAL)}"
    same, other = (REVIEW_POS, REVIEW_NEG) if kind == "pos" else (REVIEW_NEG, REVIEW_POS)
    if rng.random() < 0.15:
        return f"{aspect} was not {rng.choice(other)}"
    return f"{aspect} was {rng.choice(['', '', 'very ', 'truly ', 'rather '])}{rng.choice(same)}"


def misspell(word, rng):
    """A character model's slips: one or two letters of `word` dropped, doubled, inserted or replaced by any
    letter, the first one too ("gripping" -> "cripping", "clever" -> "cleverr"); punctuation kept."""
    core, tail = word.rstrip(".,;"), word[len(word.rstrip(".,;")):]
    for _ in range(rng.choice([1, 1, 2])):
        i, kind, c = rng.randrange(len(core)), rng.choice(["drop", "double", "insert", "replace"]), rng.choice(LETTERS)
        c = {"drop": "", "double": core[i] * 2, "insert": c + core[i], "replace": c if c != core[i] else ""}[kind]
        core = (core[:i] + c + core[i + 1:]) or word
    return core + tail


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def review_text(rng, aspect, kind):
    """A review continuation after its first aspect: " was ... [, and|but <aspect> was ...]." of one kind."""
    first = _review_clause(rng, aspect, kind)[len(aspect):]
    if rng.random() < 0.4:
        return first + "."
    second = _review_clause(rng, rng.choice([a for a in REVIEW_ASPECTS if a != aspect]), kind)
    return f"{first}{rng.choice([', and ', ' and ', '; '])}{second}."


def make_reviews(n, seed, split="train"):
    """Review prompts ("Review: <opener><aspect>") with a positive reference continuation as the solution.
    The 48 prompts are shared by both splits: what is held out is the sampling seed and the gold rule."""
    rng = random.Random(seed * 2 + (split == "test"))
    out = []
    for _ in range(n):
        aspect = rng.choice(REVIEW_ASPECTS)
        out.append(dict(task="reviews", prompt=f"Review: {rng.choice(REVIEW_OPENERS)}{aspect}", answer="positive",
                        solution=review_text(rng, aspect, "pos"), aspect=aspect))
    return out


TASKS = ("arithmetic", "countdown", "swaps", "reviews")  # the built-in tasks (--task)


def make_task(task, n, seed, split="train", difficulty=None):
    """The built-in problems; difficulty = digits (arithmetic), count of numbers (countdown) or
    number of swaps (swaps)."""
    if task == "arithmetic":
        return make_arithmetic(n, seed, digits=difficulty or 3, split=split)
    if task == "countdown":
        return make_countdown(n, seed, count=difficulty or 3, split=split)
    if task == "swaps":
        return make_swaps(n, seed, swaps=difficulty or 6, split=split)
    if task == "reviews":
        return make_reviews(n, seed, split=split)
    raise InputError(f"--task {task!r}: choose {', '.join(TASKS)}")


HELDOUT_SEED, HELDOUT_N = 1, 500  # the one held-out set of each built-in task (every script, test and bench)


def heldout(task="arithmetic", n=HELDOUT_N, difficulty=None):
    """The shared held-out problems of a built-in task: the first n of one fixed seeded draw from
    the test split (so a smaller n is a prefix of the larger set, never other problems)."""
    return make_task(task, n, HELDOUT_SEED, "test", difficulty)


def corrupt(problem, rng):
    """A realistic wrong solution: a dropped carry / an arithmetic slip / a wrong last step; for
    swaps: a skipped last swap (the habit) / the ball misplaced at one step and carried forward."""
    sol = problem["solution"]
    if problem["task"] == "reviews":  # a negative, neutral or mixed review of the aspect, or the positive misspelled
        kind = rng.choice(["neg", "neu", "typo", "mixed"])
        if kind == "mixed":  # one positive and one negative clause: the gold rule's 0, not positive
            first, second = rng.sample(["pos", "neg"], 2)
            other = rng.choice([x for x in REVIEW_ASPECTS if x != problem["aspect"]])
            return (f"{_review_clause(rng, problem['aspect'], first)[len(problem['aspect']):]}, and "
                    f"{_review_clause(rng, other, second)}.")
        if kind != "typo":
            return review_text(rng, problem["aspect"], kind)
        return " ".join(misspell(w, rng) if w.strip(".,;") in REVIEW_POS + REVIEW_NEG else w for w in sol.split(" "))
    if problem["task"] == "swaps":
        ball, pairs = problem["ball"], problem["pairs"]
        wrong = [swaps_solution(ball, pairs, skip_last=True)] if rng.random() < 0.5 else []  # the habit
        for i in rng.sample(range(len(pairs)), len(pairs)):  # a slip: the ball misplaced at step i, later steps follow
            pos = swaps_positions(ball, pairs)
            moved = rng.choice([c for c in range(1, SWAPS_CUPS + 1) if c != pos[i]])
            pos = pos[:i] + [moved] + swaps_positions(moved, pairs[i + 1:])
            wrong.append(";".join([f"{p}:{c}" for p, c in zip(pairs, pos)] + [f"#### {pos[-1]}"]))
        wrong = [w for w in wrong if not verify(problem, w)]
        other = rng.choice([c for c in range(1, SWAPS_CUPS + 1) if str(c) != problem["answer"]])
        return wrong[0] if wrong else sol.rsplit("#### ", 1)[0] + f"#### {other}"
    if problem["task"] == "arithmetic":
        x, y = problem["x"], problem["y"]
        kind = rng.choice(["drop_carry", "last_step"])
        if kind == "drop_carry" and "+1=" in sol:  # forget carries: digit sums mod 10 only
            n = max(len(str(x)), len(str(y)))
            digits = [(a + b) % 10 for a, b in zip(_split_digits(x, n), _split_digits(y, n))]
            steps = [f"{a}+{b}+0={a + b}" for a, b in zip(_split_digits(x, n), _split_digits(y, n))]
            wrong = int("".join(map(str, digits[::-1])))
            if wrong != x + y:
                return ";".join(steps + [f"#### {wrong}"])
        return sol.rsplit("#### ", 1)[0] + f"#### {x + y + rng.choice([-10, -1, 1, 10])}"
    steps = sol.split(";")
    a, op, rest = re.match(r"(\d+)([-+*/])(.*)", steps[-1]).groups()
    b, c = rest.split("=")
    steps[-1] = f"{a}{op}{b}={int(c) + rng.choice([-2, -1, 1, 2])}"
    return ";".join(steps)


def slip(problem, rng):
    """A wrong solution (str) with one arithmetic slip, a step's sum off by one, that the later steps carry
    forward faithfully: every later step is locally consistent and the answer is what the slipped chain adds
    up to, so only a process check (step_labels) finds where it broke. Other tasks: corrupt(), whose swaps
    slips are of this kind (the ball misplaced at one step, later steps follow)."""
    if problem["task"] != "arithmetic":
        return corrupt(problem, rng)
    x, y = problem["x"], problem["y"]
    n = max(len(str(x)), len(str(y)))
    bad, carry, steps, delta = rng.randrange(n), 0, [], 0
    for i in range(n):
        a, b = x // 10**i % 10, y // 10**i % 10
        s = a + b + carry
        if i == bad:
            delta = rng.choice([-1, 1]) if s > 0 else 1
            s += delta
        steps.append(f"{a}+{b}+{carry}={s}"); carry = s // 10
    return ";".join(steps + [f"#### {x + y + delta * 10**bad}"])   # what the slipped chain adds up to


def make_pairs(task, n, seed, split="train"):
    """Preference pairs {prompt, chosen, rejected}: the reference solution vs a realistic error."""
    rng = random.Random(seed + 1)
    return [dict(prompt=p["prompt"], chosen=p["solution"], rejected=corrupt(p, rng), problem=p)
            for p in make_task(task, n, seed, split)]


def make_unpaired(task, n, seed, split="train", frac_good=0.5):
    """Unpaired {prompt, completion, label} (KTO): label True = desirable."""
    rng = random.Random(seed + 2)
    rows = []
    for p in make_task(task, n, seed, split):
        good = rng.random() < frac_good
        rows.append(dict(prompt=p["prompt"], completion=p["solution"] if good else corrupt(p, rng), label=good,
                         problem=p))
    return rows

# ----------------------------------------------------------------------------- 3. data
# One reader, read_rows(), for every format a script takes: .jsonl, .json (an array, or JSON lines as
# the hub writes them), .parquet, each also as .gz, or a hub id. Every error is one line that names
# the flag, the file and, where there is one, the row (file:line for unreadable input).

DATA_EXTS = (".jsonl", ".json", ".parquet")
SKIP_BAD_ROWS = ("drop (and count) data rows the verifier cannot check (no number in the answer, an empty target) "
                 "or with a missing or empty field, instead of stopping")


def read_rows(spec, split="train", flag="--dataset"):
    """Rows (list of dicts) from a local .jsonl/.json/.parquet file (each may be .gz) or a hub dataset
    id. Unreadable input (binary, not UTF-8, truncated or corrupt compression, a row that is not a JSON
    object) is an InputError `<flag> <file>:<row>: ...`. UltraFeedback's preference splits are
    train_prefs / test_prefs: "train" and "test" name them."""
    if os.path.isfile(spec):
        rows = _read_file(spec, flag)
        check(rows, f"{flag} {spec}: no rows (an empty file)")
        return rows
    check(not spec.endswith(DATA_EXTS + (".gz",)), f"{flag} {spec}: no such file")
    if "ultrafeedback" in spec:
        split = {"train": "train_prefs", "test": "test_prefs"}.get(split, split)
    try:
        import datasets
        return list(datasets.load_dataset(spec, "main" if spec.endswith("gsm8k") else None, split=split))
    except ImportError:
        raise InputError(f"{flag} {spec}: hub datasets need `pip install datasets`") from None
    except Exception as e:  # offline, unknown id, gated...
        raise InputError(f"{flag} {spec}: not a local file and not loadable from the hub "
                         f"({type(e).__name__})") from None


def _read_file(spec, flag):
    import gzip, io, zlib
    gz, base, line = spec.endswith(".gz"), spec.removesuffix(".gz"), None  # line: rows read so far
    broken = (OSError, EOFError, zlib.error)  # gzip: BadGzipFile, cut short, corrupt stream
    try:
        if base.endswith(".parquet"):
            return _read_parquet(io.BytesIO(gzip.open(spec).read()) if gz else spec, spec, flag)
        with (gzip.open(spec, "rb") if gz else open(spec, "rb")) as f:
            if base.endswith(".json") and f.peek(64).lstrip()[:1] == b"[":  # a JSON array, else JSON lines
                data = f.read()
                return _json_array(_text(data, f"{flag} {spec}:1"), spec, flag)
            rows, line = [], 0
            for line, raw in enumerate(f, 1):
                text = _text(raw, f"{flag} {spec}:{line}").lstrip("\ufeff" if line == 1 else "")
                if text.strip():
                    rows.append(_json_object(text, f"{flag} {spec}:{line}"))
            return rows
    except broken as e:
        what = "not gzip data" if str(e).startswith("Not a gzipped file") else \
            "truncated gzip data" if isinstance(e, EOFError) else "corrupt gzip data"  # bad CRC, bad stream
        at = "" if line is None else f":{line + 1}"
        raise InputError(f"{flag} {spec}{at}: {what} ({e})" if gz else f"{flag} {spec}: cannot read ({e})") from None


def _text(raw, where):
    if raw[:2] == b"\x1f\x8b" and where.endswith(":1"):
        raise InputError(f"{where}: gzip data in a file not named .gz")
    if b"\0" in raw:
        raise InputError(f"{where}: binary data, not text (a NUL byte at column {raw.index(bytes(1)) + 1})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n")  # a whole file (a JSON array): point at the line
        where = where.rsplit(":", 1)[0] + f":{line + 1}" if line else where
        raise InputError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def _kind(x):
    kinds = {"list": "an array", "str": "a string", "int": "a number", "float": "a number", "bool": "true/false",
             "NoneType": "null"}
    return kinds.get(type(x).__name__, type(x).__name__)


def _json_object(text, where):
    try:
        r = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg})") from None
    check(isinstance(r, dict), f"{where}: a row must be a JSON object {{...}}, got {_kind(r)}")
    return r


def _json_array(text, spec, flag):
    try:
        items = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as e:
        raise InputError(f"{flag} {spec}:{e.lineno}: not valid JSON ({e.msg})") from None
    for i, r in enumerate(items, 1):
        check(isinstance(r, dict),
              f"{flag} {spec}: item {i} of the array must be a JSON object {{...}}, got {_kind(r)}")
    return items


def _read_parquet(src, spec, flag):
    try:
        import pandas as pd
        rows = pd.read_parquet(src).to_dict("records")
    except ImportError:
        raise InputError(f"{flag} {spec}: parquet files need `pip install pandas pyarrow`") from None
    except Exception as e:  # pyarrow's ArrowInvalid etc.: not a parquet file, or a damaged one
        why = (str(e).splitlines() or [""])[0].split(f"'{spec}': ", 1)[-1]  # the file is named once, in front
        raise InputError(f"{flag} {spec}: not a readable parquet file ({type(e).__name__}: {why[:120]})") from None
    return [_plain(r) for r in rows]


def _plain(v):
    """numpy values (parquet list columns, scalars) -> the python lists / numbers JSON rows have."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    return v.item() if isinstance(v, np.generic) else v


def require(row, fields, where):
    for f in fields:
        check(f in row and row[f] is not None, f"{where}: missing field {f!r}")
        check(not isinstance(row[f], str) or row[f].strip(), f"{where}: field {f!r} is empty")


def problem_row(r, where):
    """A GSM8K / Countdown / MATH-style row -> a problem. The prompt asks for a final answer after
    '####'. A row the verifier could not check (no number in the answer, a missing or non-integer
    target) is an InputError, like a missing field: a job on it would run at reward 0."""
    if "nums" in r and "target" in r:
        try:
            target = int(r["target"])
        except (TypeError, ValueError):
            raise InputError(f"{where}: field 'target' must be an integer, got {r['target']!r}") from None
        try:
            nums = [int(v) for v in r["nums"]]
        except (TypeError, ValueError):
            raise InputError(f"{where}: field 'nums' must be a list of integers, got {r['nums']!r}") from None
        check(nums, f"{where}: field 'nums' is empty")
        q = (f"Using the numbers {nums}, create an equation that equals {target}. Use each number once with + - * /. "
             "Give the equation in <answer> </answer> tags.")
        return dict(task="countdown", prompt=[{"role": "user", "content": q}], answer=str(target), nums=nums,
                    target=target, solution="")
    qk = "question" if "question" in r else "problem"
    check(qk in r or "answer" in r, f"{where}: not a GSM8K, MATH or Countdown row (question or problem + answer, "
          f"or nums + target); its fields: {', '.join(sorted(r))}")
    require(r, [qk, "answer"], where)
    check(isinstance(r[qk], str), f"{where}: field {qk!r} must be text")
    ans = str(r["answer"])
    gold = extract_answer(ans)
    check(gold is not None, f"{where}: answer {ans[:40]!r} holds no number, so the verifier cannot check it")
    sol = ans.split("####")[0].strip() if "####" in ans else r.get("solution", "")
    q = r[qk] + "\nThink step by step, then give the final answer after '####'."
    return dict(task="gsm8k", prompt=[{"role": "user", "content": q}], answer=gold, solution=f"{sol}\n#### {gold}")


def load_problems(spec, split="train", n=None, skip_bad=False, flag="--dataset"):
    """Verifiable problems from GSM8K / Countdown / MATH-style data (question+answer, target+nums,
    problem+answer). Rows the verifier cannot check stop the run with their count, or with skip_bad
    (--skip-bad-rows) are dropped and counted."""
    rows = read_rows(spec, split, flag)
    return keep_good_rows(rows[:n] if n else rows, spec, problem_row, skip_bad, flag)


def train_test_problems(dataset, eval_dataset, train_n, eval_n, skip_bad):
    """(train, test) problems from --dataset: the test set is --eval-dataset's rows if given, else a local
    file's last eval_n rows (hold_out; train_n then counts the rows before them), else the hub test split."""
    local = os.path.isfile(dataset)
    n = train_n + eval_n if train_n and local and not eval_dataset else train_n
    train = load_problems(dataset, "train", n, skip_bad)
    if eval_dataset:
        return train, load_problems(eval_dataset, "test", eval_n, skip_bad, "--eval-dataset")
    return hold_out(train, eval_n, dataset) if local else (train, load_problems(dataset, "test", eval_n, skip_bad))


def text_prompts(spec, rows, tok, train_n, eval_n, seed, flag="--dataset"):
    """(train, test) prompts without answers (a reward model scores them) from `rows` of `text` (review
    prefixes, as TRL's gpt2-sentiment): the first 2-8 `tok` tokens of train_n random rows' text (seed) and of
    eval_n held-out rows' (HELDOUT_SEED). Held out: a local file's last eval_n rows (hold_out), else the test split."""
    def prompts(rows, n, seed):
        rng, out = random.Random(seed), []
        for i in rng.sample(range(len(rows)), min(n, len(rows))):
            require(rows[i], ["text"], f"{flag} {spec} row {i + 1}")
            ids = tok(rows[i]["text"][:1000], add_special_tokens=False)["input_ids"][:rng.randint(2, 8)]
            out.append(dict(task="text", prompt=tok.decode(ids), answer=None))
        return out
    train, test = hold_out(rows, eval_n, spec) if os.path.isfile(spec) else (rows, read_rows(spec, "test", flag))
    return prompts(train, train_n, seed), prompts(test, eval_n, HELDOUT_SEED)


def split_hh(chosen, rejected):
    """hh-rlhf rows are whole transcripts; the prompt is everything up to the last
    '\\n\\nAssistant:' of the common prefix, the responses are what follows it."""
    i = 0
    while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
        i += 1
    cut = chosen.rfind("\n\nAssistant:", 0, i + 1)
    cut = cut + len("\n\nAssistant:") if cut >= 0 else i
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _content(x, where):
    if not isinstance(x, list):
        return x
    check(x and isinstance(x[-1], dict) and isinstance(x[-1].get("content"), str),
          f"{where}: a message list must end with a {{role, content}} message")
    return x[-1]["content"]


def load_pairs(spec, split="train", n=None, skip_bad=False, flag="--dataset"):
    """Preference pairs {prompt, chosen, rejected} from hh-rlhf transcripts, UltraFeedback-style
    message lists, or prompt/chosen/rejected text. Bad rows stop the run with their count (the
    first one named); with skip_bad (--skip-bad-rows) they are dropped and counted instead."""
    rows = read_rows(spec, split, flag)
    return keep_good_rows(rows[:n] if n else rows, spec, _pair, skip_bad, flag)


def _pair(r, where):
    require(r, ["chosen", "rejected"], where)
    c, rj = r["chosen"], r["rejected"]
    if isinstance(c, list):                      # message lists: the prompt is all but the last turn
        prompt = (c[:-1] if "prompt" not in r or isinstance(r["prompt"], str) else r["prompt"]) or \
            [{"role": "user", "content": r.get("prompt", "")}]
        c, rj = _content(c, where), _content(rj, where)
    check(isinstance(c, str) and isinstance(rj, str), f"{where}: chosen and rejected must be text or message lists")
    if not isinstance(r["chosen"], list):        # prompt + completions, or whole hh-rlhf transcripts
        prompt, c, rj = (r["prompt"], c, rj) if "prompt" in r else split_hh(c, rj)
    check(c.strip() and rj.strip(), f"{where}: empty chosen or rejected completion")
    check(c != rj, f"{where}: chosen is identical to rejected")
    return dict(prompt=prompt, chosen=c, rejected=rj)


def load_unpaired(spec, split="train", n=None, skip_bad=False):
    """KTO's unpaired rows {prompt, completion, label} from trl-lib/kto-mix-14k-style data: prompt a string
    or chat messages, completion a string or messages (the last message's content), label a
    bool (or 0/1). Paired data (chosen/rejected, no label) becomes two rows, True and False, as
    TRL does. A bad row raises an InputError naming the row and the field (skip_bad: dropped)."""
    rows = read_rows(spec, split)
    if "label" not in rows[0] and "chosen" in rows[0]:
        return [dict(prompt=p["prompt"], completion=p[k], label=k == "chosen")
                for p in load_pairs(spec, split, n, skip_bad) for k in ("chosen", "rejected")]
    return keep_good_rows(rows[:n] if n else rows, spec, _unpaired, skip_bad)


def _unpaired(r, where):
    require(r, ["prompt", "completion", "label"], where)
    for f in ("prompt", "completion"):
        v = r[f] = list(r[f]) if isinstance(r[f], (list, tuple, np.ndarray)) else r[f]
        check(isinstance(v, str) or (v and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in v)),
              f"{where}: field {f!r} must be a string or a list of {{role, content}} messages")
    label, comp = r["label"], r["completion"] if isinstance(r["completion"], str) else r["completion"][-1]["content"]
    check(isinstance(label, (bool, np.bool_)) or label in (0, 1),
          f"{where}: field 'label' must be true/false, got {label!r}")
    check(comp.strip(), f"{where}: field 'completion' is empty")
    return dict(prompt=r["prompt"], completion=comp, label=bool(label))


def parse_math_shepherd(row, where="row"):
    """Math-Shepherd row -> (question, steps, labels). `input` is the question followed by
    'Step 1: ... ки\\nStep 2: ... ки...'; `label` is the same text with each 'ки' replaced by
    '+' (from this step the gold answer is still reachable) or '-'."""
    require(row, ["input", "label"], where)
    parts, lab, labels, pos = row["input"].split("ки"), row["label"], [], 0
    check(len(parts) > 1, f"{where}: no 'ки' step tags in 'input'")
    for seg in parts[:-1]:                      # the label text has one char where input has 'ки'
        pos += len(seg)
        check(pos < len(lab) and lab[pos] in "+-", f"{where}: 'label' has no +/- at step tag {len(labels) + 1}")
        labels.append(lab[pos] == "+"); pos += 1
    segs = [s.strip() for s in parts[:-1]]
    # The question is glued to step 1; a few rows carry a stray tag inside the question, so the
    # segments before the one holding 'Step 1:' (and their tags) belong to the question.
    k = next((i for i, s in enumerate(segs) if re.search(r"\b[Ss]tep 1:", s)), None)
    if k is not None:
        head, first = re.split(r"(?=\b[Ss]tep 1:)", segs[k], maxsplit=1)
        question, steps, labels = " ".join(segs[:k] + [head]).strip(), [first.strip()] + segs[k + 1:], labels[k:]
    else:                                       # no 'Step 1:': the question ends at its last '?'
        q = segs[0].rfind("?")
        check(q >= 0, f"{where}: cannot tell where the question ends (no 'Step 1:' and no '?')")
        question, steps = segs[0][:q + 1], [segs[0][q + 1:].strip()] + segs[1:]
    check(question and all(steps), f"{where}: empty question or step")
    return question, steps, labels


def parse_prm800k(rows, where="prm800k"):
    """PRM800K step-wise rows (one per rated candidate step: instruction, responses = the steps so
    far, next_response, rating -1/0/1 as number or string, empty for human-written steps) ->
    [(question, steps, labels)], one per rated row. The candidate's label is rating >= 0 (neutral
    counts as not wrong); earlier steps take the rating of the row that rated them (human-written
    steps count as correct)."""
    def rating(r):
        try:
            v = float(r.get("rating"))
        except (TypeError, ValueError):
            return None
        return None if math.isnan(v) else v
    rated = {(r["instruction"], tuple(r["responses"]), r["next_response"]): rating(r)
             for r in rows if "next_response" in r}
    out = []
    for i, r in enumerate(rows, 1):
        require(r, ["instruction", "responses", "next_response"], f"{where} row {i}")
        v, prev = rating(r), [str(s) for s in r["responses"]]
        if v is None:
            continue
        old = [rated.get((r["instruction"], tuple(prev[:j]), s)) for j, s in enumerate(prev)]
        out.append((r["instruction"], prev + [r["next_response"]], [o is None or o >= 0 for o in old] + [v >= 0]))
    return out


def parse_trl(row, where):
    """TRL's stepwise rows: prompt, completions (the steps), labels (one bool per step)."""
    require(row, ["prompt", "completions", "labels"], where)
    return row["prompt"], list(row["completions"]), [bool(x) for x in row["labels"]]


def load_step_data(spec, n=None, skip_bad=False):
    """Step-labelled solutions (prm.py) {prompt, steps, labels, correct} from a file or hub id in one of
    three formats: Math-Shepherd, PRM800K step-wise rows, or TRL's prompt/completions/labels."""
    rows = read_rows(spec, "train")
    rows = rows[:n] if n and "next_response" not in rows[0] else rows   # PRM800K: n rated rows, below
    if "input" in rows[0] and "label" in rows[0]:
        data = keep_good_rows(rows, spec, parse_math_shepherd, skip_bad)
    elif "next_response" in rows[0]:
        data = parse_prm800k(rows, f"--dataset {spec}")[:n]
    elif {"prompt", "completions", "labels"} <= set(rows[0]):
        data = keep_good_rows(rows, spec, parse_trl, skip_bad)
    else:
        raise InputError(f"--dataset {spec}: unknown columns {sorted(rows[0])}; expected Math-Shepherd (input, "
                         "label), PRM800K (instruction, responses, next_response, rating) or prompt/completions/labels")
    for i, (q, steps, labels) in enumerate(data, 1):
        check(len(steps) == len(labels) and steps,
              f"--dataset {spec} example {i}: {len(steps)} steps but {len(labels)} labels")
    return [dict(prompt=[{"role": "user", "content": q}], steps=s, labels=l, correct=all(l), answer=None)
            for q, s, l in data]


def keep_good_rows(rows, spec, parse, skip_bad, flag="--dataset"):
    """[parse(row, "<flag> <spec> row i")] for every row. Rows it rejects (InputError) are counted:
    they stop the run with the first one's error and the count, or with skip_bad are dropped."""
    out, bad = [], []
    for i, r in enumerate(rows, 1):
        try:
            out.append(parse(r, f"{flag} {spec} row {i}"))
        except InputError as e:
            bad.append((i, str(e)))
    if bad and not skip_bad:
        raise InputError(f"{bad[0][1]} ({len(bad)} of {len(rows)} rows unusable; --skip-bad-rows drops them)")
    if bad:
        why = [f"{i} ({e.split(' row ' + str(i) + ': ', 1)[-1]})" for i, e in bad[:5]]
        print0(f"--skip-bad-rows: dropped {len(bad)} of {len(rows)} rows of {spec}: {', '.join(why)}"
               f"{' ...' if len(bad) > 5 else ''}")
    check(out, f"{flag} {spec}: no usable rows")
    return out


def hold_out(rows, n, spec, flag="--eval-n", what="rows"):
    """(rows[:-n], rows[-n:]): a local file's held-out split is its last n rows (hub datasets have a
    test split instead). Too few rows to keep any for training is an InputError."""
    check(len(rows) > n, f"--dataset {spec}: {len(rows)} {what}, need more than {flag} {n}")
    return rows[:-n], rows[-n:]


def split_rows(load, spec, n, eval_n, head=None):
    """(train, heldout) rows of --dataset spec via load(spec, split, count): a local file's last eval_n rows
    (of its first `head`, default all) held out and train the first n before them; a hub dataset's train
    split (n rows) and test split (eval_n rows)."""
    if os.path.isfile(spec):
        train, heldout = hold_out(load(spec, "train", head), eval_n, spec)
        return train[:n], heldout
    return load(spec, "train", n), load(spec, "test", eval_n)


def write_jsonl(path, rows):
    """Rank 0 writes rows (dicts) to path, one JSON object a line."""
    if DIST.master:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def warn_unknown_chars(tok, rows, spec, flag="--dataset"):
    """The built-in character tokenizer (char_tokenizer) maps every character outside CHARS to <unk>:
    say once how many a dataset holds, so a run on real text does not learn from <unk> in silence.
    Other tokenizers: nothing (byte-level BPEs have no unknown characters). Returns the count."""
    if not spec or set(tok.get_vocab()) != set(["<pad>", "<eos>", "<unk>"] + CHARS):
        return 0
    from collections import Counter
    known, unk = set(CHARS), Counter()

    def texts(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, (dict, list, tuple)):
            for v in (x.values() if isinstance(x, dict) else x):
                yield from texts(v)
    for t in texts(list(rows)):
        for c in set(t) - known:  # set difference first: most strings are plain ASCII
            unk[c] += t.count(c)
    if unk:
        eg = ", ".join(repr(c) for c, _ in sorted(unk.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
        print0(f"[common] warning: {flag} {spec}: {sum(unk.values())} character(s) ({len(unk)} distinct, most often "
               f"{eg}) are outside the built-in tokenizer's alphabet and become <unk>")
    return sum(unk.values())

# ----------------------------------------------------------------------------- 4. models

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
# the built-in model names (and tiny-<task> for each of TINY_TASKS)
BUILTIN = ("tiny", "tiny-untrained", "tiny-words-untrained", "tiny-swaps", "tiny-reviews", "tiny-reviews-rm")


def char_tokenizer():
    """A real PreTrainedTokenizerFast over printable ASCII, one token per character."""
    from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left", model_max_length=256)


def word_tokenizer():
    """A word-level PreTrainedTokenizerFast over the reviews world's words (lower-cased; punctuation a token
    each); any other word, a misspelling too, is <unk>: the built-in sentiment RM reads words, not characters,
    as DistilBERT reads GPT-2's text in the sentiment demo."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for p in REVIEW_POS + REVIEW_NEG + REVIEW_NEUTRAL + REVIEW_ASPECTS + REVIEW_OPENERS
                    for w in re.findall(r"[a-z]+", p)} | {"review", "was", "very", "truly", "rather", "not", "and"})
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + words + list(",;.:"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer, tk.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left", model_max_length=256)


def tiny_model(tok, seed=0):
    """Llama architecture, 4 layers x 128 wide, ~0.8M parameters (untrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    return LlamaForCausalLM(cfg)


TINY_HABIT = 0.7  # share of tiny's arithmetic SFT solutions that drop the carry into the leftmost column
# (far enough from 0.5 that the last SFT batches cannot tip the greedy choice, which one build at 0.6 did:
# README, "The embedded world")


def tiny_sft_data(n, seed, task="arithmetic", habit=TINY_HABIT):
    """Chain-of-thought SFT pairs (prompt, solution) for a built-in task. For arithmetic, a share
    `habit` of the worked examples that need a carry into the leftmost column drop it (a systematic
    mistake, as a noisy human-written SFT set has): trained to convergence, the model then makes
    that mistake greedily on every such problem (about half), so it starts well below the
    ceiling with a flaw that a verifier sees and that RL or preference learning can remove.
    For swaps, a share SWAPS_HABIT of the worked puzzles skip the last swap (swaps_solution), which
    shows where the ball is under one of its cups (about half): the same kind of start."""
    rng = random.Random(seed + 7)
    if task == "reviews":  # the pretraining mix: positive, negative and neutral reviews, a third each
        return [(p["prompt"], review_text(rng, p["aspect"], rng.choice(["pos", "neg", "neu"])))
                for p in make_task(task, n, seed)]
    if task == "swaps":  # its own habit: a share SWAPS_HABIT of all solutions skip the last swap (swaps_solution)
        return [(p["prompt"], swaps_solution(p["ball"], p["pairs"], skip_last=rng.random() < SWAPS_HABIT))
                for p in make_task(task, n, seed)]
    return [(p["prompt"], arithmetic_solution(p["x"], p["y"], drop_last_carry=True)
             if task == "arithmetic" and rng.random() < habit else p["solution"]) for p in make_task(task, n, seed)]


TINY_SFT_STEPS = 600  # long enough to converge, so the start no longer rides a learning cliff (README)
TINY_RECIPE = f"steps={TINY_SFT_STEPS} habit={TINY_HABIT} numerics=avx2"  # the cache marker: a new recipe rebuilds
# Float rounding depends on the CPU's vector width (AVX-512 vs AVX2 kernels sum in different orders),
# and 300 SFT steps amplify it: the same build measured 0.765 held-out accuracy with AVX-512 kernels
# and 0.83 on AVX2 ones. Pinning ATen, MKL (conditional numerical reproducibility) and oneDNN to
# their AVX2 code paths, in a fresh process since they are read when torch loads, is meant to make
# the build bit-identical on every x86 CPU with AVX2 (checked here on one CPU model: identical
# weights twice, and with MKL's instruction set capped separately). tests/conftest.py pins the same.
PORTABLE_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                     "OMP_NUM_THREADS": "1"}


TINY_TASKS = ("arithmetic", "swaps", "reviews")  # the tasks with a built-in SFT model: "tiny" and "tiny-<task>"
TINY_TASK_HABIT = {"swaps": SWAPS_HABIT}  # the habit share of each other task's SFT data (in its cache marker)


def tiny_recipe(task="arithmetic"):
    """The cache marker of a built-in model: a new recipe rebuilds (arithmetic: TINY_RECIPE, so the
    existing cache stays valid)."""
    if task == "arithmetic":
        return TINY_RECIPE
    return f"steps={TINY_SFT_STEPS} task={task} habit={TINY_TASK_HABIT.get(task)} numerics=avx2"


def build_tiny(folder, seed=0, steps=TINY_SFT_STEPS, task="arithmetic"):
    """`--model tiny` (`tiny-<task>`): a short SFT of the untrained tiny model on the task's chain of
    thought (tiny_sft_data), run in a child process with PORTABLE_NUMERICS (see above; ~3 min on one
    CPU core for arithmetic)."""
    import platform, subprocess
    name = "tiny" if task == "arithmetic" else f"tiny-{task}"
    print0(f"[common] building the built-in '{name}' model: {steps} SFT steps on chain-of-thought data -> {folder}")
    env = {**os.environ, **(PORTABLE_NUMERICS if platform.machine().lower() in ("x86_64", "amd64") else {})}
    # the child runs in this folder
    code = f"import common; common._build_tiny_here({os.path.abspath(folder)!r}, {seed}, {steps}, {task!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)), env=env)
    check(r.returncode == 0, f"building the tiny model in {folder} failed (exit {r.returncode})")


def _build_tiny_here(folder, seed, steps, task="arithmetic"):
    torch.set_num_threads(1)
    tok = char_tokenizer(); model = tiny_model(tok, seed)
    set_seed(seed)
    sft(model, tok, tiny_sft_data(64 * steps, seed, task), steps=steps, batch_size=64, lr=1e-3, desc="build tiny",
        log_every=50)
    tmp = folder + ".build"
    save_pretrained_atomic(tmp, model, tok)
    with open(os.path.join(tmp, "built_with_steps.txt"), "w") as f:
        f.write(tiny_recipe(task))
    _swap_in(tmp, folder)


def tiny_cache_dir(task="arithmetic"):
    base = os.environ.get("TINY_CACHE", os.path.join("out", "_cache", "tiny"))
    return base if task == "arithmetic" else f"{base}-{task}"


def task_model(model, task, dataset=None):
    """The per-task built-in model: `--model tiny` (trained on arithmetic) with a built-in `--task`
    that has its own model (TINY_TASKS) means `tiny-<task>`; says so in one line."""
    if model == "tiny" and not dataset and task != "arithmetic" and task in TINY_TASKS:
        print0(f"[common] --task {task}: using the built-in model 'tiny-{task}' (tiny knows arithmetic only)")
        return f"tiny-{task}"
    return model


REVIEWS_RM = "tiny-reviews-rm"  # the built-in sentiment reward model of the reviews world
REVIEWS_RM_RECIPE = "reward_model.py --task reviews --model tiny-words-untrained --steps 300"
# the RM's pairs (in its marker file: a change rebuilds the cached RM)
REVIEWS_RM_DATA = "pairs: positive chosen; negative, neutral, mixed or the positive misspelled (1-2 slips a word)"


def build_reviews_rm(folder):
    """`--reward-model tiny-reviews-rm`: reward_model.py's Bradley-Terry RM on labelled reviews (REVIEWS_RM_DATA,
    common.make_pairs), a word-level tiny Llama from random weights (tiny-words-untrained: a character-level RM
    was beaten by the policy's misspellings), run as a user runs it, in a child process with
    PORTABLE_NUMERICS, and cached like tiny (~1 min on one core)."""
    import platform, subprocess
    print0(f"[common] building the built-in sentiment reward model: python {REVIEWS_RM_RECIPE} -> {folder}")
    env = {**os.environ, **(PORTABLE_NUMERICS if platform.machine().lower() in ("x86_64", "amd64") else {})}
    tmp, here = f"{folder}.build", os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, os.path.join(here, "reward_model.py"), *REVIEWS_RM_RECIPE.split()[1:],
                        "--device", "cpu", "--out", os.path.abspath(tmp)], cwd=here, env=env, stdout=subprocess.DEVNULL)
    check(r.returncode == 0, f"building the reviews reward model in {folder} failed (exit {r.returncode})")
    with open(os.path.join(tmp, "model", "built_with.txt"), "w") as f:
        f.write(REVIEWS_RM_RECIPE + "\n" + REVIEWS_RM_DATA)
    _swap_in(os.path.join(tmp, "model"), folder)
    shutil.rmtree(tmp, ignore_errors=True)


def _cached(folder, marker, recipe, build):
    """`folder`, first built by build(folder) unless its marker file already holds `recipe` (a new
    recipe rebuilds); one builder at a time (parallel runs, torchrun ranks) behind a file lock."""
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        try:
            import fcntl; fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock, build races are merely wasteful
            pass
        path = os.path.join(folder, marker)
        if not os.path.isfile(path) or open(path).read() != recipe:
            build(folder)
    return folder


def load_model(name, kind="causal", device=None, dtype=None, trust_remote_code=False, flag="--model"):
    """(model, tokenizer) for a built-in name, a local folder or a hub id.
    kind='causal' -> AutoModelForCausalLM; kind='reward' -> AutoModelForSequenceClassification:
    a saved classifier keeps its labels, a bare backbone gets a new one-label head (score with rm_score).
    flag: the command-line flag that named the model, for the error messages (--reward-model, --judge)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    device = device or DIST.device
    if name in ("tiny-untrained", "tiny-words-untrained"):  # random weights; a char or word tokenizer
        tok = char_tokenizer() if name == "tiny-untrained" else word_tokenizer()
        model = tiny_model(tok)
        if kind == "reward":
            name = tiny_cache_dir() + name[4:]
            save_pretrained_atomic(name, model, tok)
        else:
            return model.to(device), tok
    elif name == "tiny" or (name.startswith("tiny-") and name[5:] in TINY_TASKS):
        task = "arithmetic" if name == "tiny" else name[5:]
        name = _cached(tiny_cache_dir(task), "built_with_steps.txt", tiny_recipe(task),
                       lambda folder: build_tiny(folder, task=task))
    elif name == REVIEWS_RM:
        name = _cached(tiny_cache_dir() + "-reviews-rm", "built_with.txt",
                       REVIEWS_RM_RECIPE + "\n" + REVIEWS_RM_DATA, build_reviews_rm)
    elif not os.path.isdir(name) and (name.startswith((".", "/")) or name.count("/") > 1):
        raise InputError(f"{flag} {name}: no such local folder")
    auto = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    kw = dict(trust_remote_code=trust_remote_code, dtype=dtype or get_dtype(device))
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        if kind == "reward":  # a new one-number head on a backbone; a trained classifier keeps its labels
            from transformers import AutoConfig
            archs = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).architectures or []
            kw.update({} if any(a.endswith("ForSequenceClassification") for a in archs) else {"num_labels": 1})
        model = auto.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        if os.path.isdir(name):
            raise InputError(f"{flag} {name}: could not load the folder ({str(e).splitlines()[0]})") from None
        raise InputError(f"{flag} {name}: not a local folder, not a built-in name ({', '.join(BUILTIN)}) "
                         f"and not reachable on the Hugging Face hub") from None
    if tok.pad_token is None:  # gpt2, llama: reuse EOS as pad (masks come from EOS positions, not pads)
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device), tok


def dropout_off(model):
    """Every dropout layer to p = 0 (as TRL does): policy, old-policy and reference log-probs of the
    same tokens must be the same numbers, or the ratio is not 1 on the first update."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def context_len(model, max_len):
    """max_len (tokens), capped at the model's context (max_position_embeddings) where it has one."""
    return min(max_len, getattr(model.config, "max_position_embeddings", None) or max_len)


def token_classifier(model, trust_remote_code=False):
    """A per-token classifier (AutoModelForTokenClassification, one label: logits (B, T, 1)) on a copy of
    model's backbone (a sequence classifier's, as load_model(kind='reward') gives, or a causal LM's) under a
    fresh head, in model's dtype and on its device (prm.py's classifier PRM beside its ORM). Backbone weights
    that do not fit it (missing keys) are an InputError naming --rm-model."""
    from transformers import AutoModelForTokenClassification
    cfg = copy.deepcopy(model.config); cfg.num_labels = 1
    out = AutoModelForTokenClassification.from_config(cfg, trust_remote_code=trust_remote_code, dtype=model.dtype)
    base = lambda m: getattr(m, m.base_model_prefix)
    missing, _ = base(out).load_state_dict(base(model).state_dict(), strict=False)
    check(not missing, f"--rm-model: token-classification backbone does not match ({missing[:2]})")
    return out.to(model.device)


def load_policy(name, max_len, fsdp=False, ref=False, trust_remote_code=False):
    """The policy of an offline preference run: `name` in fp32 (bf16 autocast on GPUs), dropout off (log-probs
    must be deterministic), with ref=True a frozen copy of it (the reference); fsdp: both sharded (FSDP2) before
    anything runs them or creates an optimizer. Returns model, ref (or None), tok, context_len(model, max_len)."""
    model, tok = load_model(name, dtype=torch.float32, trust_remote_code=trust_remote_code)
    dropout_off(model)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if ref else None
    for m in (model, ref) if fsdp else ():
        if m is not None:
            shard_model(m)
    return model, ref, tok, context_len(model, max_len)


def save_pretrained_atomic(folder, model, tok=None):
    """save_pretrained (safetensors) into a temp folder, then rename over `folder` (see _writing:
    a failed save keeps what was there). Rank 0 writes; a sharded (FSDP) model must be saved by
    every rank (the gather is a collective)."""
    folder = folder.rstrip("/")
    state = None
    if is_sharded(model):  # collective: every rank takes part, rank 0 gets the whole state dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not DIST.master:
        return
    with _writing(folder, "model") as tmp:
        getattr(model, "module", model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if state is not None:  # fully_shard renamed the class to FSDP<Name>: record the real architecture
            cfg = json.load(open(os.path.join(tmp, "config.json")))
            cfg["architectures"] = [a.removeprefix("FSDP") for a in cfg.get("architectures") or []]
            json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"), indent=2)
        if tok is not None:
            tok.save_pretrained(tmp)


@contextlib.contextmanager
def _writing(folder, what):
    """A temp folder beside `folder`, renamed into place when the block ends. A failure midway (disk
    full, quota, an interrupt) removes the temp folder and leaves `folder` as it was, still loadable.
    A failed write (OSError) then stops the run with one line saying so (InputError: exit 2): a run
    that cannot save would only lose more work by going on."""
    tmp = f"{folder}.tmp-{os.getpid()}"

    def remove():  # a folder (what save_pretrained makes), or a file should a writer have made one
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
    remove()
    try:
        yield tmp
        _swap_in(tmp, folder)
    except BaseException as e:
        remove()
        if not (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):  # e.g. Ctrl-C: as it was
            raise
        kept = f"the previous {what} there is kept and loadable" + \
            " (--resume continues from it)" * (what == "checkpoint")
        kept = kept if os.path.isdir(folder) else f"there was no {what} there yet"
        raise InputError(f"saving the {what} to {folder} failed ({type(e).__name__}: {e}); {kept}") from None


def _swap_in(tmp, folder):
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    old = f"{folder}.old-{os.getpid()}"
    if os.path.exists(folder):
        os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except OSError:
        if os.path.exists(old):  # put the previous one back (a kill right here: load_checkpoint finds `old`)
            os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def format_prompt(tok, prompt):
    """Prompt TEXT (for reward models and judges that read text): chat messages go through the
    tokenizer's chat template when it has one. A policy's prompt ids come from prompt_ids()."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)  # apply_chat_template: a list or a BatchEncoding


def prompt_ids(tok, prompt):
    """A prompt's ids exactly as the model meets them in use: chat messages ->
    apply_chat_template(add_generation_prompt=True, tokenize=True) (the template writes BOS itself;
    rendering to text and tokenizing again would add a second one), plain text -> tok(text)."""
    if isinstance(prompt, str) or not getattr(tok, "chat_template", None):
        return tok(format_prompt(tok, prompt))["input_ids"]
    return _ids(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))


def drop_long_prompts(tok, train, heldout, limit, what="rows"):
    """(train, heldout) without the rows whose prompt is over `limit` tokens (they leave no room for
    the completion), and a line saying how many training rows went."""
    fits = lambda r: len(prompt_ids(tok, r["prompt"])) <= limit
    n0, train, heldout = len(train), [r for r in train if fits(r)], [r for r in heldout if fits(r)]
    print0(f"{len(train)} training {what} ({n0 - len(train)} dropped: prompt > {limit} tokens), "
           f"{len(heldout)} held out")
    return train, heldout


def end_token_id(tok, prompt=""):
    """The token that ends a completion: for a chat prompt, the end-of-turn token the template
    writes after an assistant message (Qwen <|im_end|>, Llama 3 <|eot_id|>, Gemma <end_of_turn>);
    for plain text, and for tokenizers without a template, the tokenizer's EOS."""
    if isinstance(prompt, str) or not getattr(tok, "chat_template", None):
        return tok.eos_token_id
    if getattr(tok, "_end_of_turn_id", None) is None:  # read the template once per tokenizer
        mark, end = "\x1fEND-OF-TURN\x1f", tok.eos_token_id
        try:
            text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                           tokenize=False)
            tail = tok(text[text.rindex(mark) + len(mark):], add_special_tokens=False)["input_ids"]
            special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
            end = tail[0] if tail and tail[0] in special else end
        except Exception:  # a template that rejects this conversation: fall back to EOS
            pass
        tok._end_of_turn_id = end
    return tok._end_of_turn_id


def stop_ids(tok, model=None):
    """Every id that ends generation: the template's end-of-turn token, the tokenizer's EOS and
    each id of the model's generation_config.eos_token_id (Llama 3.1 lists three)."""
    ids = [end_token_id(tok, [{"role": "user", "content": ""}]), tok.eos_token_id]
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(i for i in ids if i is not None))

# ----------------------------------------------------------------------------- 5. generation

# Vocabularies this large sample by InverseCDFSampler and fuse the head with the log-softmax (fused_head): the
# per-vocabulary-entry work is what their rollouts and updates spend most time on. The tiny world's stay plain.
LARGE_VOCAB = 8192

def encode_prompts(tok, prompts, device, max_prompt_len=None):
    """Left-padded prompt ids (prompt_ids() per row); prompts longer than the budget are cut from the left (warned)."""
    ids = [prompt_ids(tok, p) for p in prompts]
    limit = max_prompt_len or 10**9
    if any(len(x) > limit for x in ids):
        print0(f"[common] warning: {sum(len(x) > limit for x in ids)} prompt(s) longer than {limit} tokens, "
               "truncated from the left")
        ids = [x[-limit:] for x in ids]
    check(all(len(x) > 0 for x in ids), "empty prompt")
    T = max(len(x) for x in ids)
    input_ids = torch.tensor([[tok.pad_token_id] * (T - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


def completion_mask(tokens, stop):
    """1 for completion tokens up to and including the first stop token (an id or a list of ids);
    returns (mask, has_eos). Positions, not pad ids, decide: pad == EOS never hides a token."""
    is_eos = torch.isin(tokens, torch.as_tensor(stop, device=tokens.device))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long(), is_eos.any(1)


class InverseCDFSampler:
    """A logits processor that samples the next token itself (greedy decoding then takes it): softmax(scores / T),
    nucleus-filtered when top_p < 1, one uniform draw per row against the float64 cumulative sum. generate() uses
    it for large vocabularies: torch.multinomial draws one exponential per vocabulary entry, 100 ms a step at
    32 rows x 151k tokens on 2 CPU cores (60% of a rollout); this draws one number per row. Small vocabularies
    (the tiny world) keep transformers' sampler, and so their samples."""

    def __init__(self, temperature, top_p=1.0):
        from transformers import TopPLogitsWarper
        self.temperature, self.top_p = temperature, (TopPLogitsWarper(top_p) if top_p < 1 else None)

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        cdf = scores.softmax(-1).double().cumsum_(-1)                                     # (B, V)
        u = torch.rand(len(cdf), 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)      # first cdf > u
        return scores.fill_(-float("inf")).scatter_(1, token, 0.0)                       # scores: our own copy


@torch.no_grad()
def generate(model, tok, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, max_prompt_len=None,
             batch_size=256):
    """Sample n completions per prompt (temperature 0 = greedy). Output rows are grouped by
    prompt: row i*n + j is sample j of prompt i. Returns a dict with prompt_ids/prompt_mask
    (left padded), completion_ids/completion_mask (right padded, up to the first EOS), ids/mask
    (the two side by side: (B, P+T), what a forward pass over prompt and completion reads),
    has_eos and decoded texts (without EOS)."""
    model = getattr(model, "module", model)
    was_training = model.training; model.eval()
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None)
    budget = max_prompt_len or (max_len - max_new_tokens if max_len else None)
    p_ids, p_mask = encode_prompts(tok, prompts, device, budget)
    p_ids, p_mask = p_ids.repeat_interleave(n, 0), p_mask.repeat_interleave(n, 0)
    stop = stop_ids(tok, model)                              # end-of-turn, EOS, generation_config's EOS ids
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=stop)
    kw.update(dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else
              dict(do_sample=False))
    if temperature > 0 and getattr(model.config.get_text_config(), "vocab_size", 0) >= LARGE_VOCAB:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                  logits_processor=[InverseCDFSampler(temperature, top_p)])
    n_batches, synced = -(-len(p_ids) // batch_size), is_sharded(model)
    if synced:  # FSDP: ranks decode in lock-step to the longest sequence, and run as many batches
        import torch.distributed as dist
        kw["synced_gpus"] = True
        t = torch.tensor(n_batches, device=device); dist.all_reduce(t, op=dist.ReduceOp.MAX); n_batches = int(t)
    elif device.type == "cuda":
        # Fast path: a static KV cache lets transformers compile the one-token decode step
        # (fixed shapes -> torch.compile / CUDA graphs); ~3.5x the dynamic cache on an H100.
        kw["cache_implementation"] = "static"
    outs = []
    for i in range(0, n_batches * batch_size, batch_size):
        if i >= len(p_ids):  # FSDP: this rank is out of prompts but must take part; output dropped
            model.generate(input_ids=p_ids[:1], attention_mask=p_mask[:1], **kw)
            continue
        seq = model.generate(input_ids=p_ids[i:i + batch_size], attention_mask=p_mask[i:i + batch_size], **kw)
        outs.append(seq[:, p_ids.shape[1]:])
    T = max(o.shape[1] for o in outs)
    c_ids = torch.cat([F.pad(o, (0, T - o.shape[1]), value=tok.pad_token_id) for o in outs])
    c_mask, has_eos = completion_mask(c_ids, stop)
    c_ids = c_ids.masked_fill(c_mask == 0, tok.pad_token_id)
    texts = [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(c_ids, c_mask)]
    model.train(was_training)
    return dict(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask, has_eos=has_eos,
                texts=texts, ids=torch.cat([p_ids, c_ids], 1), mask=torch.cat([p_mask, c_mask], 1))


def generate_groups(model, tok, prompts, n, **kw):
    """generate()'s texts regrouped: [the n samples of prompt i] for each prompt ([] for no prompts)."""
    texts = generate(model, tok, prompts, n=n, **kw)["texts"] if prompts else []
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021) from n samples of which c are correct."""
    return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate(model, tok, problems, samples=0, k=1, temperature=1.0, max_new_tokens=64):
    """Greedy accuracy on `problems` (sharded over ranks, reduced); with samples > 0 also
    pass@k from that many samples per problem."""
    mine = DIST.shard(problems)
    out = generate(model, tok, [p["prompt"] for p in mine], n=1, temperature=0, max_new_tokens=max_new_tokens)
    acc = float(np.mean([verify(p, t) for p, t in zip(mine, out["texts"])])) if mine else None
    res = {"accuracy": float(all_reduce_mean(acc) if mine else 0.0)}
    if samples:
        out = generate(model, tok, [p["prompt"] for p in mine], n=samples, temperature=temperature,
                       max_new_tokens=max_new_tokens)
        ok = [verify(p, out["texts"][i * samples + j]) for i, p in enumerate(mine) for j in range(samples)]
        res[f"pass@{k}"] = all_reduce_mean(float(np.mean([pass_at_k(samples, sum(ok[i * samples:(i + 1) * samples]), k)
                                                          for i in range(len(mine))])))
    return res


@torch.no_grad()
def sample_answers(model, tok, problems, n, temperature, max_new_tokens):
    """This rank's share of the problems, each with n sampled answers: [(index, [answers])]."""
    mine = DIST.shard(list(range(len(problems))))
    with autocast():
        groups = generate_groups(model, tok, [problems[i]["prompt"] for i in mine], n, temperature=temperature,
                                 max_new_tokens=max_new_tokens)
    return list(zip(mine, groups))


def own_mistakes(model, tok, problems, tries, temperature, max_new_tokens):
    """The start model's OWN mistakes, for preference data: `tries` samples per problem, and
    [(index, the first wrong one)] for every problem with a wrong sample (verifier), from all
    ranks in problem order. Real sets are built the same way (UltraFeedback: model answers ranked by
    a judge); hand-made errors are ones the model already puts almost no mass on."""
    found = [(i, wrong[0]) for i, answers in sample_answers(model, tok, problems, tries, temperature, max_new_tokens)
             if (wrong := [t for t in answers if not verify(problems[i], t)])]
    return sorted(all_gather_list(found))


def mistake_pairs(model, tok, problems, tries, temperature, max_new_tokens):
    """Preference pairs from own_mistakes: (prompt, chosen = the reference solution, rejected = the
    model's wrong sample, problem) for every problem with a wrong sample, in problem order."""
    return [dict(prompt=problems[i]["prompt"], chosen=problems[i]["solution"], rejected=w, problem=problems[i])
            for i, w in own_mistakes(model, tok, problems, tries, temperature, max_new_tokens)]


@torch.no_grad()
def greedy_answers(model, tok, prompts, max_new_tokens):
    """The greedy answer to every prompt (sharded over ranks, gathered in order)."""
    mine = DIST.shard(list(range(len(prompts))))
    with autocast():
        texts = generate(model, tok, [prompts[i] for i in mine], temperature=0,
                         max_new_tokens=max_new_tokens)["texts"] if mine else []
    return [t for _, t in sorted(all_gather_list(list(zip(mine, texts))))]

# ----------------------------------------------------------------------------- 6. log-probs

def position_ids(mask):
    """Positions that skip left padding, matching what generate() used."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def token_logprobs(model, input_ids, attention_mask, n_completion, entropy=False, chunk=8):
    """Log-probs of the last `n_completion` tokens of each row given everything before them.
    input_ids/attention_mask: (B, T) = [left-padded prompt | completion]. Returns (B, n) log-probs
    (and (B, n) entropies if asked). Only the completion positions are projected (logits_to_keep); with
    a large vocabulary the head is fused with the log-softmax (HeadLogprobs), else the softmax is chunked."""
    head, kw = fused_head(model), dict(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids(attention_mask), logits_to_keep=n_completion + 1)
    labels = input_ids[:, -n_completion:]
    if head is None:
        logits = model(**kw).logits[:, :-1]                               # (B, n, V): position t predicts t+1
        return logits_logprobs(logits, labels, entropy, chunk)
    forward = head.forward
    head.forward = lambda x: x  # the model's "logits" are now its final hidden states (B, n + 1, H)
    try:
        h = model(**kw).logits[:, :-1]
    finally:
        head.forward = forward
    rows = max(1, 2**25 // head.out_features)                              # ~128 MB of float32 logits a chunk
    lp, ent = HeadLogprobs.apply(h.reshape(-1, h.shape[-1]), head.weight, labels.reshape(-1), rows, entropy)
    return (lp.view(labels.shape), ent.view(labels.shape)) if entropy else lp.view(labels.shape)


def fused_head(model):
    """The output projection (an nn.Linear, no bias) when token_logprobs may fuse it with the log-softmax: a
    vocabulary of LARGE_VOCAB or more, an unsharded model (FSDP gathers weights only inside their module), and
    logits that are exactly h W^T (no soft-capping or scaling after the head); else None."""
    m = getattr(model, "module", model)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    cfg = m.config.get_text_config() if hasattr(m, "config") else None
    if type(head) is not torch.nn.Linear or head.bias is not None or head.out_features < LARGE_VOCAB:
        return None
    if is_sharded(m) or any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in
                            ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    return head


class HeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[label] for N hidden states h (N, H), head W (V, H), labels (N,), `rows` states at a
    time; returns (N,) log-probs and (N,) entropies (no gradient; zeros unless `entropy`). The backward
    recomputes each chunk's logits instead of keeping all N x V of them (Liger-Kernel's fused linear
    cross-entropy, Hsu et al. 2024):
    d lp / d logits = onehot(label) - softmax. At 2080 tokens x 151k vocab the plain path holds 1.3 GB of
    logits and as much again of their gradient; this holds one chunk."""

    @staticmethod
    def forward(ctx, h, w, labels, rows, entropy=True):
        wc, lps, ents = w.to(h.dtype), [], []
        for i in range(0, len(h), rows):
            logp = (h[i:i + rows] @ wc.t()).float().log_softmax(-1)          # (rows, V)
            lps.append(logp.gather(-1, labels[i:i + rows, None]).squeeze(-1))
            if entropy:
                ents.append(-(logp.exp() * logp).sum(-1))
        ctx.save_for_backward(h, w, labels)
        ctx.rows = rows
        lp = torch.cat(lps)
        ent = torch.cat(ents) if entropy else torch.zeros_like(lp)
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g, _):
        h, w, labels = ctx.saved_tensors
        wc, rows = w.to(h.dtype), ctx.rows
        gh, gw = torch.empty_like(h), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for i in range(0, len(h), rows):
            hc, gc = h[i:i + rows], g[i:i + rows, None].float()
            grad = (hc @ wc.t()).float().softmax(-1).mul_(-gc)               # -g * softmax
            grad.scatter_add_(1, labels[i:i + rows, None], gc)             # + g * onehot(label)
            grad = grad.to(h.dtype)
            gh[i:i + rows] = grad @ wc
            gw.addmm_(grad.t().float(), hc.float())
        return gh, gw.to(w.dtype), None, None, None


def logits_logprobs(logits, labels, entropy=False, chunk=8):
    """log p(labels) (B, n) from logits (B, n, V) in the model's dtype, and the entropies (B, n,
    detached) if asked. log_softmax runs `chunk` rows at a time in float32, so a 150k-262k vocab
    never becomes one float32 [B, n, V] tensor (1 GB at B=32, n=256, V=150k). The chunks are views
    from split(), whose backward concatenates their gradients (a slice's would add each into zeros
    the size of all the logits)."""
    lps, ents = [], []
    for l, y in zip(logits.split(chunk), labels.split(chunk)):
        l = l.float()
        lse = l.logsumexp(-1)
        lps.append(l.gather(-1, y[:, :, None]).squeeze(-1) - lse)
        if entropy:
            with torch.no_grad():
                p = (l - lse[..., None]).exp()
                ents.append(lse - (p * l).sum(-1))
    lp = torch.cat(lps)
    return (lp, torch.cat(ents)) if entropy else lp


def lm_forward(lm, v_head, ids, attn, n, temperature=1.0):
    """log π(y_t) (B, n) of the last n tokens, the value V(s_t) (B, n) (None without a head) and the per-token
    entropy (B, n, detached). ids/attn: [left-padded prompt | completion]. Position j's hidden state has read
    tokens <= j: it predicts token j+1 and is the state s_t in which that token is chosen. π is the sampling
    distribution softmax(logits / temperature), as in TRL: the rollouts came from it."""
    out = lm(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), logits_to_keep=n + 1,
             output_hidden_states=v_head is not None)
    logits = out.logits[:, :-1] if temperature == 1.0 else out.logits[:, :-1] / temperature
    lp, ent = logits_logprobs(logits, ids[:, -n:], entropy=True)   # (B, n) each, chunked softmax
    if v_head is None:
        return lp, None, ent
    h = out.hidden_states[-1][:, -(n + 1):-1]                       # (B, n, H)
    return lp, v_head(h.to(v_head.weight.dtype)).squeeze(-1).float(), ent


class PolicyWithValue(torch.nn.Module):
    """A policy LM + a value head V(s_t) (ppo_lm.py), one module so that DDP syncs both. The head is a Linear on
    the last hidden states (TRL's AutoModelForCausalLMWithValueHead), zero-initialised: V = 0 until it learns.
    forward(ids, attn, n) -> lm_forward's (log π, V, entropy) of the last n tokens."""

    def __init__(self, lm, temperature=1.0):
        super().__init__()
        self.lm, self.temperature = lm, temperature
        self.v_head = torch.nn.Linear(lm.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(self.v_head.weight); torch.nn.init.zeros_(self.v_head.bias)

    def forward(self, ids, attn, n):
        return lm_forward(self.lm, self.v_head, ids, attn, n, self.temperature)


@torch.no_grad()
def forward_chunks(fn, ids, attn, n, size):
    """fn(ids, attn, n) without grad, `size` rows at a time (old-policy / reference passes over a rollout),
    each output concatenated over the rows: one tensor, or a list of them (an output that is None stays None)."""
    outs = [fn(ids[i:i + size], attn[i:i + size], n) for i in range(0, len(ids), size)]
    if torch.is_tensor(outs[0]):
        return torch.cat(outs)
    return [None if o[0] is None else torch.cat(o) for o in zip(*outs)]


def seq_logps(model, tok, prompts, completions, max_len=None):
    """log pi(y|x) summed over each completion's tokens (end token included), and the token counts:
    two (B,) tensors, one forward pass. The per-token mean is the first divided by the second."""
    ids, mask, cmask = collate(tok, prompts, completions, next(model.parameters()).device, max_len=max_len)
    lp = token_logprobs(model, ids, mask, cmask.shape[1])              # (B, n) per-token log-probs
    return (lp * cmask).sum(1), cmask.sum(1)


def pair_logps(model, tok, pairs, max_len=None):
    """Summed log-probs of chosen and rejected in ONE forward pass: rows [prompt | chosen] for the b
    pairs, then [prompt | rejected] (2b rows). Returns four (b,) tensors: log pi(y_w|x), log pi(y_l|x)
    and the token counts |y_w|, |y_l| (for a per-token NLL term, length-normalised losses)."""
    prompts = [p["prompt"] for p in pairs]
    seq, n = seq_logps(model, tok, prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                       max_len)
    return seq[:len(pairs)], seq[len(pairs):], n[:len(pairs)], n[len(pairs):]


@torch.no_grad()
def sharded(fn, items, batch_size):
    """fn(chunk) -> a tuple of (b,) tensors, for every item: the items are sharded over the ranks, run
    batch_size at a time under autocast, and gathered in order into float32 tensors (one per output).
    Every rank makes as many calls as the largest shard (FSDP's forwards are collectives): a rank out
    of items runs item 0 and drops the result."""
    mine, rows, width = DIST.shard(list(range(len(items)))), [], 0
    for i in range(0, -(-len(items) // DIST.world_size), batch_size):
        j = mine[i:i + batch_size]
        with autocast():
            outs = fn([items[k] for k in j or [0]])
        width = len(outs)
        rows += zip(j, *(o.float().tolist() for o in outs))
    rows = sorted(all_gather_list(rows))
    return tuple(torch.tensor([r[c] for r in rows]) for c in range(1, width + 1))


def collate(tok, prompts, completions, device, max_len=None, add_eos=True):
    """[left-padded prompt | right-padded completion + end token] for training on given text: the
    prompt's ids from prompt_ids(), the completion's from tok(text, add_special_tokens=False), then the
    end-of-turn token (end_token_id) exactly once. Returns input_ids, attention_mask (B, T) and
    completion_mask (B, n_completion), which covers the completion and its end token only."""
    p_ids, p_mask = encode_prompts(tok, prompts, device)
    c = [tok(t, add_special_tokens=False)["input_ids"] for t in completions]
    if add_eos:
        ends = [end_token_id(tok, p) for p in prompts]
        c = [x if x and x[-1] == e else x + [e] for x, e in zip(c, ends)]
    check(all(len(x) > 0 for x in c), "empty completion")
    if max_len:
        c = [x[:max(1, max_len - p_ids.shape[1])] for x in c]
    n = max(len(x) for x in c)
    c_ids = torch.tensor([x + [tok.pad_token_id] * (n - len(x)) for x in c], device=device)
    c_mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in c], device=device)
    return torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), c_mask


def encode(tok, items, sep, device, max_len):
    """Step-labelled items {prompt, steps: [str], labels: [bool] or None, correct} -> a verifier batch (prm.py),
    rows [left pad | prompt | step 1 + sep | ... | last step + end token]. Steps are tokenized one by one, so a
    step end is always a token boundary; rows longer than max_len lose their beginning (and any step ends there).
    Returns a dict of tensors on device: ids, mask (B, T) (token ids, attention), cmask (B, T) (the solution's
    tokens), step_mask (B, T) (1 at each step's last token: its separator, the end token after the last step),
    labels (B, T) float (a step's label at its end, else 0) and outcome (B,) float (1 = correct)."""
    prompts = [prompt_ids(tok, it["prompt"]) for it in items]          # the chat template's ids, once
    pieces = [s if j == len(it["steps"]) - 1 else s + sep for it in items for j, s in enumerate(it["steps"])]
    pieces = iter(tok(pieces, add_special_tokens=False)["input_ids"])   # one batched tokenizer call
    rows, ends, starts = [], [], []
    for it, ids in zip(items, prompts):
        n_prompt, e = len(ids), []
        for j in range(len(it["steps"])):
            ids = ids + next(pieces) + ([end_token_id(tok, it["prompt"])] if j == len(it["steps"]) - 1 else [])
            e.append(len(ids) - 1)                          # score the separator / EOS token
        cut = max(0, len(ids) - max_len)
        rows.append(ids[cut:]); ends.append([(j, t - cut) for j, t in enumerate(e) if t >= cut])
        starts.append(max(0, n_prompt - cut))                   # where the solution begins
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    (mask, cmask, step_mask), labels = (torch.zeros_like(ids) for _ in range(3)), torch.zeros(len(rows), T)
    for b, (r, e, it, st) in enumerate(zip(rows, ends, items, starts)):
        ids[b, T - len(r):] = torch.tensor(r); mask[b, T - len(r):] = 1; cmask[b, T - len(r) + st:] = 1
        for j, t in e:
            step_mask[b, T - len(r) + t] = 1
            labels[b, T - len(r) + t] = float(it["labels"][j]) if it.get("labels") else 0.0
    out = dict(ids=ids, mask=mask, cmask=cmask, step_mask=step_mask, labels=labels,
               outcome=torch.tensor([float(it["correct"]) for it in items]))
    return {k: v.to(device) for k, v in out.items()}


def sft(model, tok, pairs, steps, batch_size=32, lr=1e-3, weight_decay=0.0, desc="sft", log_every=0, grad_clip=1.0):
    """Supervised fine-tuning on (prompt, completion) pairs, loss on completion tokens only.
    Cycles through `pairs` in a seeded shuffled order; cosine learning-rate decay; returns
    the per-step losses."""
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / max(1, steps))))
    order, losses = [], []
    for step in tqdm(range(steps), desc=desc, disable=not DIST.master or None, leave=False):
        batch = [pairs[i] for i in take_batch(order, random, len(pairs), batch_size)]
        ids, mask, cmask = collate(tok, [b[0] for b in batch], [b[1] for b in batch], device)
        lp = token_logprobs(model, ids, mask, cmask.shape[1])
        loss = -(lp * cmask).sum() / cmask.sum()
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step(); sched.step(); losses.append(loss.item())
        if log_every and step % log_every == 0:
            print0(f"[{desc}] step {step} loss {loss.item():.4f}")
    return losses

# ----------------------------------------------------------------------------- 7. rewards and judges

def rm_inputs(tok, prompt, completion, max_length):
    """One reward-model input's ids: the RM's own chat template over [prompt, assistant: completion]
    when it has one, else format_prompt(prompt) + completion through tok() (BERT: [CLS] text [SEP]).
    Too long: the first token stays if it is special ([CLS], BOS) and the rest is cut from the LEFT,
    so the prompt's start goes and the completion, which is what gets judged, is kept."""
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = _ids(tok.apply_chat_template(msgs + [{"role": "assistant", "content": completion}], tokenize=True))
    else:
        ids = tok(format_prompt(tok, prompt) + completion)["input_ids"]
    if len(ids) <= max_length:
        return ids
    lead = int(ids[0] in tok.all_special_ids)
    return ids[:lead] + ids[len(ids) - (max_length - lead):]


def rm_max_length(model, tok):
    """The RM's input limit: its tokenizer's model_max_length (reward_model.py saves --max-length
    there) and the backbone's position limit."""
    max_pos = getattr(getattr(model, "module", model).config, "max_position_embeddings", None) or 10**9
    return int(min(tok.model_max_length or 10**9, max_pos))


def rm_score(model, tok, prompts, completions, max_length=None, label=0, batch_size=None):
    """(B,) float32 scores r(x, y) of a sequence classifier: reward_model.py's one-label RM, or
    logit `label` of a hub classifier. The one scorer every script uses (training and judging).
    Right padding with attention masks; BERT-style models pool [CLS] at position 0, causal
    backbones (a `.score` head) are read at each row's last real token, found from the attention
    mask (transformers looks for the last non-pad id, so pad == EOS would hide a final end token).
    `model` may be DDP-wrapped; gradients flow unless the caller is under torch.no_grad()."""
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    limit = max_length or rm_max_length(inner, tok)
    rows, out = [rm_inputs(tok, p, c, limit) for p, c in zip(prompts, completions)], []
    step = batch_size or max(1, len(rows))
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step]
        T = max(map(len, chunk))
        ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in chunk], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in chunk], device=device)
        if hasattr(inner, "score"):  # causal: the head on the last real token's (final-norm) hidden state
            h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            logits = inner.score(h[torch.arange(len(chunk), device=device), mask.sum(1) - 1])
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
        out.append(logits[:, label].float())
    return torch.cat(out) if out else torch.zeros(0, device=device)


def scorer(reward_model=None, label=None, device=None, batch_size=None, trust_remote_code=False):
    """score(problems, texts) -> (B,) on `device`: the verifier (1 = correct) without a reward_model, else the
    classifier's logit `label` of prompt + completion (rm_score: its own tokenizer and template); label defaults to
    0 for a one-label RM and 1 (positive) for a 2-class classifier, and must be passed for more labels."""
    if reward_model is None:
        return lambda problems, texts: torch.tensor([float(verify(p, t)) for p, t in zip(problems, texts)],
                                                    device=device)
    rm, rm_tok = load_model(reward_model, kind="reward", device=device, trust_remote_code=trust_remote_code,
                            flag="--reward-model")
    rm.eval().requires_grad_(False)
    n = rm.config.num_labels
    pick = label if label is not None else (0 if n == 1 else 1)
    check(0 <= pick < n and (n <= 2 or label is not None), f"--reward-label must be one of the classifier's {n} "
          f"labels (pass it for > 2 labels), got {label}")
    return lambda problems, texts: rm_score(rm, rm_tok, [p["prompt"] for p in problems], texts, label=pick,
                                            batch_size=batch_size).to(device)


# Pairwise win rate of one model's answers against another's. The judge: the task verifier, a reward
# model (higher score wins, equal = tie) or a judge LM with MT-Bench's pairwise prompt "pair-v2" (Zheng
# et al. 2023, "Judging LLM-as-a-Judge", FastChat, Apache-2.0), asked with the answers in both orders.
JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
JUDGE_USER = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
              "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
              "[The End of Assistant B's Answer]")


def parse_verdict(text):
    """'A', 'B' or 'C' (tie) from the judge's last [[X]]; None when it gave no verdict."""
    found = re.findall(r"\[\[([ABC])\]\]", text)
    return found[-1] if found else None


def combine_orders(v_ab, v_ba):
    """+1 (first answer wins) / 0 (tie) / -1 from verdicts with the answers in both positions:
    a win counts only when both orders agree, so position bias cancels (MT-Bench convention)."""
    return 1 if (v_ab, v_ba) == ("A", "B") else -1 if (v_ab, v_ba) == ("B", "A") else 0


@torch.no_grad()
def judge_pairs(judge, prompts, problems, answers_a, answers_b, judge_lm=None, max_new_tokens=512,
                trust_remote_code=False):
    """+1 / 0 / -1 per prompt: answer a vs answer b. judge: 'verifier' (problems needed) or a
    reward-model folder / hub id; judge_lm (a causal LM) instead: the pair-v2 prompt, both orders."""
    if judge_lm is None and judge == "verifier":
        return [(verify(p, a) > verify(p, b)) - (verify(p, a) < verify(p, b))
                for p, a, b in zip(problems, answers_a, answers_b)]
    if judge_lm is None:  # a sequence classifier scoring prompt + answer
        rm, rtok = load_model(judge, kind="reward", trust_remote_code=trust_remote_code, flag="--judge")
        rm.eval()
        with autocast():
            sa, sb = (rm_score(rm, rtok, prompts, ans, batch_size=16).tolist() for ans in (answers_a, answers_b))
        return [(x > y) - (x < y) for x, y in zip(sa, sb)]
    jm, jtok = load_model(judge_lm, trust_remote_code=trust_remote_code, flag="--judge-lm")
    question = lambda p: p if isinstance(p, str) else p[-1]["content"]

    def verdicts(first, second):
        msgs = [[{"role": "system", "content": JUDGE_SYSTEM},
                 {"role": "user", "content": JUDGE_USER.format(question=question(p), answer_a=a, answer_b=b)}]
                for p, a, b in zip(prompts, first, second)]
        with autocast():
            texts = generate(jm, jtok, msgs, temperature=0, max_new_tokens=max_new_tokens, batch_size=16)["texts"]
        return [parse_verdict(t) for t in texts]
    return [combine_orders(x, y) for x, y in zip(verdicts(answers_a, answers_b), verdicts(answers_b, answers_a))]


def win_rate(judge, prompts, problems, answers, baseline, **kw):
    """Pairwise outcomes of `answers` vs `baseline` (one of each per prompt), judged with
    judge_pairs(judge, ..., **kw) sharded over the ranks. Returns (counts, outcomes): counts =
    {judge, n, win, tie, loss, win_rate = (win + tie / 2) / n}, outcomes = [+1 / 0 / -1] per prompt."""
    mine = DIST.shard(list(range(len(prompts))))
    pick = lambda xs: [xs[i] for i in mine]
    res = judge_pairs(judge, pick(prompts), pick(problems), pick(answers), pick(baseline), **kw)
    outcome = [o for _, o in sorted(all_gather_list(list(zip(mine, res))))]
    win, tie, loss = outcome.count(1), outcome.count(0), outcome.count(-1)
    return dict(judge=kw.get("judge_lm") or judge, n=len(outcome), win=win, tie=tie, loss=loss,
                win_rate=(win + 0.5 * tie) / len(outcome)), outcome

# ----------------------------------------------------------------------------- 8. training loop, checkpoints, metrics

def batch_indices(step, batch_size, n, seed):
    """The global batch of update `step` (0-based): example k = step * batch_size + j is item k % n of
    a permutation seeded by (seed, epoch = k // n). A pure function of (seed, step): a resumed run
    sees exactly the batches the uninterrupted run would have seen, with no sampler state to save."""
    return [_perm(seed, k // n, n)[k % n] for k in range(step * batch_size, (step + 1) * batch_size)]


@functools.lru_cache(maxsize=4)
def _perm(seed, epoch, n):
    return random.Random(seed * 1_000_003 + epoch).sample(range(n), n)


def take_batch(order, rng, n, size):
    """The next `size` indices of an endless stream of shuffles of range(n) drawn from `rng` (a
    random.Random, or the random module); `order`, the indices drawn but not yet used, is consumed in
    place, so a checkpoint that saves it (and rng's state) resumes the same stream."""
    while len(order) < size:
        order += rng.sample(range(n), n)
    batch = order[:size]
    del order[:size]
    return batch


def micro_batches(model, rows, size, amp=True):
    """Gradient accumulation: yield `rows` `size` at a time, each under autocast (amp=False: none). A DDP
    model skips the gradient all-reduce (no_sync) on all but the last chunk, so the ranks average once per
    update (every rank must see the same number of chunks); FSDP and a single process reduce as they go."""
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    for k, chunk in enumerate(chunks):
        wait = k < len(chunks) - 1 and isinstance(model, torch.nn.parallel.DistributedDataParallel)
        with (model.no_sync() if wait else contextlib.nullcontext()), autocast(enabled=amp):
            yield chunk


def lr_schedule(opt, warm, steps=None):
    """LambdaLR: a linear warm-up, lr * (s + 1) / warm for the first updates, then the full lr
    (steps=None) or a cosine decay from it to 10% at update `steps`."""
    def factor(s):
        w = min(1.0, (s + 1) / warm)
        return w if steps is None else w * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clip_grad(model, max_norm):
    """Clip the global gradient norm; returns the norm before clipping as a float (FSDP: a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def rng_state():
    npst = np.random.get_state()
    cuda = torch.cuda.get_rng_state(DIST.device) if DIST.device.type == "cuda" else None  # this rank's device only
    return {"python": random.getstate(), "numpy": [npst[0], npst[1].tolist(), *npst[2:]],
            "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(s):
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in s["python"]))
    n = s["numpy"]; np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and DIST.device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], DIST.device)


def save_checkpoint(folder, model, tok, step, optimizer=None, scheduler=None, extra=None, rng=None):
    """An HF folder (safetensors) + state.pt (optimizer, scheduler, step, RNG, extra), written
    to a temp folder and renamed into place, so a crash never leaves a half-written checkpoint;
    a failed write keeps the previous checkpoint and stops the run with one line (_writing).
    rng: an rng_state() taken earlier, at the start of the step a Ctrl-C interrupted, so that
    --resume redoes that step with the same random numbers (default: the state now)."""
    if not DIST.master:
        return
    with _writing(folder.rstrip("/"), "checkpoint") as tmp:
        getattr(model, "module", model).save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer else None,
                    "scheduler": scheduler.state_dict() if scheduler else None, "rng": rng or rng_state(),
                    "extra": extra or {}}, os.path.join(tmp, "state.pt"))


@contextlib.contextmanager
def ctrl_c(save):
    """Around a training loop: on Ctrl-C, save() writes what --resume needs and returns the line to
    print; then leave the process group without a barrier (another rank may never arrive) and exit
    with status 130, as a shell does for SIGINT."""
    try:
        yield
    except KeyboardInterrupt:
        print0(save())
        cleanup(barrier=False)
        raise SystemExit(130)


def ctrl_c_checkpoint(ckpt, model, tok, opt, sched, extra, done, sharded=False):
    """ctrl_c() for a loop whose Ctrl-C checkpoint is the model, optimizer, scheduler and extra after
    done() finished updates; sharded (FSDP): no checkpoint (sharded optimizer state is not saved),
    only the line that says so."""
    def save():
        if sharded:
            return f"interrupted at step {done()}: no checkpoint under --fsdp"
        save_checkpoint(ckpt, model, tok, done(), opt, sched, extra)
        return f"interrupted: checkpoint at step {done()} in {ckpt} (continue with --resume)"
    return ctrl_c(save)


def checkpoint_folder(folder):
    """`folder`, or, when a save was killed between its two renames (_swap_in), the previous
    checkpoint it had moved aside to <folder>.old-<pid> (read where it is: under torchrun every
    rank reads it, none may move it)."""
    folder = folder.rstrip("/")
    if os.path.isfile(os.path.join(folder, "state.pt")):
        return folder
    import glob
    old = [f for f in glob.glob(glob.escape(folder) + ".old-*") if os.path.isfile(os.path.join(f, "state.pt"))]
    check(old, f"--resume: no checkpoint in {folder}")
    old.sort(key=os.path.getmtime)
    print0(f"[common] {folder} is missing (a save was cut off): resuming from the previous checkpoint, {old[-1]}")
    return old[-1]


def checkpoint_state(folder):
    """state.pt of a checkpoint (step, optimizer, scheduler, rng, extra), read with weights_only=True:
    no pickled code is ever executed."""
    folder = checkpoint_folder(folder)
    try:
        return torch.load(os.path.join(folder, "state.pt"), weights_only=True)
    except Exception as e:  # e.g. a pickled object weights_only refuses to build
        raise InputError(f"--resume: {folder}/state.pt is not a checkpoint this code wrote "
                         f"({type(e).__name__})") from None


def load_checkpoint(folder, model, optimizer=None, scheduler=None):
    """Restore weights (safetensors), optimizer, scheduler and RNG from `folder`; returns
    (step, extra)."""
    from safetensors.torch import load_file
    folder = checkpoint_folder(folder)
    st = checkpoint_state(folder)
    m = getattr(model, "module", model)
    sd = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(folder, f), device=str(next(m.parameters()).device)))
    missing, unexpected = m.load_state_dict(sd, strict=False)
    check(not unexpected and all("lm_head" in k for k in missing), f"--resume: {folder} does not match the model")
    if getattr(m.config, "tie_word_embeddings", False):
        m.tie_weights()
    if optimizer is not None and st["optimizer"]:
        try:
            optimizer.load_state_dict(st["optimizer"])
        except ValueError as e:  # another model's or an older script's optimizer state
            raise InputError(f"--resume: {folder} does not match this run's optimizer ({e}); start afresh") from None
    if scheduler is not None and st["scheduler"]:
        scheduler.load_state_dict(st["scheduler"])
    set_rng_state(st["rng"])
    return st["step"], st["extra"]


class Logger:
    """print (one line per log step) + append to <out>/metrics.jsonl (+ wandb if asked).
    Only rank 0 writes."""

    def __init__(self, out, config=None, wandb=False, project="rl-course", resume_step=None):
        """A fresh run (resume_step None) starts a fresh metrics.jsonl; a resumed one keeps the
        complete rows with step <= resume_step (what the checkpoint covers) and appends."""
        self.out, self.wandb, self.t0 = out, None, time.time()
        if DIST.master:
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, "metrics.jsonl")
            keep = [] if resume_step is None or not os.path.exists(path) else \
                [l for l in open(path) if l.strip().endswith("}") and json.loads(l)["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
            if wandb:
                import wandb as wb
                self.wandb = wb.init(project=project, config=config or {}, dir=out)

    def log(self, step, **metrics):
        if not DIST.master:
            return
        number = (int, float, np.floating, np.integer, torch.Tensor)
        rec = {"step": step, **{k: float(v) if isinstance(v, number) else v for k, v in metrics.items()}}
        from tqdm.auto import tqdm
        tqdm.write(" ".join([f"step {step}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in rec.items() if k != "step"]))
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb:
            self.wandb.log(rec, step=step)


def start_run(args, ckpt, model, opt, sched, config, fresh, steps=None):
    """(start, extra, logger) of a training run. --resume: the step and extra of the checkpoint in ckpt, which
    must have been written with the same config (the flags that fix the run) and, with steps, leave an update
    to run; else 0 and dict(config=config, **fresh()), fresh() computing what the run keeps from its start
    (its 'before' evaluation, logged at step 0). logger: the Logger of <out>/metrics.jsonl."""
    if args.resume:
        start, extra = load_checkpoint(ckpt, model, opt, sched)
        check(extra["config"] == config, f"--resume: flags differ from the checkpoint's {extra['config']}")
        check(steps is None or start < steps, f"--resume: the checkpoint is at step {start}, --steps is {steps}")
        print0(f"resumed from {ckpt} at step {start}")
    else:
        start, extra = 0, dict(config=config, **fresh())
    logger = Logger(args.out, vars(args), args.wandb, resume_step=start - 1 if args.resume else None)
    if start == 0:
        logger.log(0, **extra["before"])
    return start, extra, logger


def read_metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


def distinct_n(seqs, n=2):
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over a set of samples (lists of tokens)."""
    grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def diversity(texts):
    """Diversity of a set of samples over whitespace words: distinct-1 and distinct-2 (distinct_n) and
    self-similarity (mean Jaccard overlap of the word sets of all pairs of samples, over at most 300 of
    them: 1 = every sample the same words, 0 = no word shared)."""
    words = [t.lower().split() for t in texts]
    sets = [set(w) for w in words]
    sets = sets if len(sets) <= 300 else random.Random(0).sample(sets, 300)  # a fixed sample of pairs: O(300^2)
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    jac = [len(a & b) / max(len(a | b), 1) for a, b in pairs]
    return dict(distinct_1=distinct_n(words, 1), distinct_2=distinct_n(words, 2),
                self_similarity=float(np.mean(jac)) if jac else 0.0)


def auc(scores, labels):
    """ROC AUC of scores (N,) against binary labels (N,): the chance that a positive outscores a negative, ties
    counting half; None when one class is missing."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    if y.all() or not y.any():
        return None
    neg = np.sort(s[~y])
    lo, hi = np.searchsorted(neg, s[y], "left"), np.searchsorted(neg, s[y], "right")
    return float(np.mean(lo + 0.5 * (hi - lo)) / len(neg))


def step_metrics(items):
    """A process reward model's held-out quality (prm.py). items: [{labels, probs, prm, orm, correct}] (step labels,
    the PRM's step probabilities, PRM score, ORM probability, outcome). Step accuracy, F1 of flagging bad steps, step
    AUC, first-error localisation (first step with p < 0.5 == first bad step, over solutions with an error), outcome
    AUC of the PRM and ORM scores, and the trivial baselines."""
    y = np.array([l for it in items for l in it["labels"][-len(it["probs"]):] if it["probs"]], bool)
    p = np.array([q for it in items for q in it["probs"]], float)
    flag, bad = p < 0.5, ~y
    f1 = 2 * (flag & bad).sum() / max(1, flag.sum() + bad.sum())
    first = lambda xs: next((j for j, ok in enumerate(xs) if not ok), -1)
    wrong = [it for it in items if not all(it["labels"]) and len(it["probs"]) == len(it["labels"])]
    fe = [first(it["labels"]) == first([q >= 0.5 for q in it["probs"]]) for it in wrong]
    fe_base = max(collections.Counter(first(it["labels"]) for it in wrong).values()) / len(wrong) if wrong else None
    return dict(step_accuracy=float(np.mean(flag == bad)), step_f1_bad=float(f1), step_auc=auc(p, y),
                step_majority_baseline=float(max(y.mean(), 1 - y.mean())),
                first_error_accuracy=float(np.mean(fe)) if fe else None, first_error_baseline=fe_base,
                outcome_auc_prm=auc([it["prm"] for it in items], [it["correct"] for it in items]),
                outcome_auc_orm=auc([it["orm"] for it in items], [it["correct"] for it in items]))


def before_after(before, after, keys):
    """{key_before, key_after} for each of keys (names, space-separated) that the evaluations before and after
    training (dicts) hold."""
    return {f"{k}_{w}": r[k] for k in keys.split() for w, r in (("before", before), ("after", after)) if k in r}


def print_table(rows, keys, title=""):
    """rows (dicts) as a markdown table of the columns `keys` (space-separated), widths to fit; floats as the
    Logger prints them (4 significant digits), None or absent as '-'. Rank 0 prints."""
    keys = keys.split()
    cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    width = [max([len(k)] + [len(c[j]) for c in cells]) for j, k in enumerate(keys)]
    line = lambda cs: "| " + " | ".join(c.rjust(w) for c, w in zip(cs, width)) + " |"
    print0("\n".join([title] * bool(title) + [line(keys), line(["-" * w for w in width])] + [*map(line, cells)]))


def write_summary(out, summary):
    """<out>/summary.json (atomic) and the same numbers printed."""
    if not DIST.master:
        return
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".summary.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=float)
    os.replace(tmp, os.path.join(out, "summary.json"))
    print0("summary: " + json.dumps(summary, default=float))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, on rank 0; None (said once per call) where
    matplotlib is not installed, and on the other ranks. matplotlib is optional."""
    if not DIST.master:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print0("[common] matplotlib not installed: no plot written")
        return None


def plot(out, series, filename, xlabel="step", ylabel="", title=""):
    """series: {label: (xs, ys)} -> <out>/<filename> PNG (see pyplot)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_xlabel(xlabel); ax.set_ylabel(ylabel); ax.set_title(title); ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    path = os.path.join(out, filename)
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)
    return path


def plot_twin(out, xs, left, right, filename, title="", notes=None, xlabel=""):
    """Two curves over one x axis, each on its own y axis (left, right: {label: ys}, one each), the left
    curve's points annotated with `notes` -> <out>/<filename> PNG (see pyplot)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for a, (label, ys), c in zip([ax, ax.twinx()], [*left.items(), *right.items()], ["tab:blue", "tab:red"]):
        a.plot(xs, ys, "o-", color=c, label=label); a.set_ylabel(label, color=c)
    for x, y, note in zip(xs, next(iter(left.values())), notes or []):
        ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, -12))
    ax.set_xlabel(xlabel); ax.set_title(title); ax.grid(alpha=0.3)
    path = os.path.join(out, filename)
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)
    return path


def plot_metrics(out, keys, filename="curves.png", title=""):
    """Plot chosen keys of <out>/metrics.jsonl against step."""
    recs = read_metrics(out)
    series = {k: ([r["step"] for r in recs if k in r], [r[k] for r in recs if k in r]) for k in keys}
    return plot(out, {k: v for k, v in series.items() if v[0]}, filename, title=title)


def nan_guard(loss, step):
    """Stop before a NaN/inf loss reaches the optimizer (and so before any checkpoint save)."""
    if not torch.isfinite(loss).all():
        raise InputError(f"non-finite loss at step {step}: stopping; the last checkpoint is untouched "
                         "(try a lower --lr)")
