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
# Seeded learning tests must measure the same run on every machine: pin ATen, MKL and oneDNN to
# their AVX2 code paths (read when torch loads, so before the import; subprocesses inherit them).
# Without this, AVX-512 and AVX2 machines round differently and the runs diverge (common.py,
# PORTABLE_NUMERICS, has the measurement).
# A value already in the environment wins (e.g. ATEN_CPU_CAPABILITY=avx512 to run the suite unpinned).
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # == common.PORTABLE_NUMERICS
if __import__("platform").machine().lower() in ("x86_64", "amd64"):
    for k, v in PINS.items():
        os.environ.setdefault(k, v)
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_sessionstart(session):
    """Build (or find) the cached `tiny` and `tiny-swaps` once, before any test runs: a build takes ~3 min on one core,
    longer on a loaded machine, and must not count against a subprocess test's timeout."""
    import subprocess
    import common
    # the two builds run side by side on 2 cores: tiny-swaps (the logic puzzle's start, tests/test_swaps.py) in
    # a child process (loading models from threads is not safe in transformers), tiny here; the lock and the
    # cache marker make the second load_model("tiny-swaps") a plain load
    child = subprocess.Popen([sys.executable, "-c", "import common, torch; common.load_model('tiny-swaps', "
                              "device=torch.device('cpu'))"], cwd=ROOT)
    common.load_model("tiny", device=torch.device("cpu"))
    child.wait()
    common.load_model("tiny-swaps", device=torch.device("cpu"))


def kill_at_first_checkpoint(script, argv, out, timeout=300):
    """Run `python <script> <argv> --out <out>` and SIGKILL it (no cleanup at all) as soon as its first
    checkpoint (<out>/checkpoint/state.pt) exists; returns that file's path."""
    import signal, subprocess, time
    p = subprocess.Popen([sys.executable, script, *argv, "--out", out], cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, t0 = os.path.join(out, "checkpoint", "state.pt"), time.time()
    while p.poll() is None and not os.path.exists(state) and time.time() - t0 < timeout:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return state
