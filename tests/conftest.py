"""Shared test setup: repo root on sys.path, offline hub, one cached built-in `tiny` model."""
import os, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# The built-in `tiny` model is built once (seeded, deterministic) and shared by every test.
os.environ.setdefault("TINY_CACHE", os.path.join(ROOT, "out", "_cache", "tiny"))
REALDATA = os.path.join(os.path.dirname(ROOT), "shared", "realdata")

# The tiny model's ops are too small to split across threads: one thread per process is faster,
# and subprocess tests (torchrun) then do not oversubscribe the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
