"""GPU check: the most evidence per minute of a short GPU lease, under a hard wall-clock budget.

    python perf/gpu_check.py                       # on a GPU: 480 s, into perf/results/<gpu name>/<date>/
    python perf/gpu_check.py --budget 300 --out DIR
    python perf/gpu_check.py --rehearse --out DIR  # any machine: every phase on the CPU, 60 s (not figures)
    make gpu-check [GPU_CHECK_BUDGET=480] [GPU_CHECK_ARGS="..."]

Needs only a ``python3`` with torch and Triton (and pandas, pytest) and the project installed
(``pip install --no-deps --no-build-isolation -e .``); no network.

Phases (:data:`PHASES`: name, share of the budget, function) run in order. Each gets a deadline fixed up front:
phase i may run until ``start + (share_0 + ... + share_i) * usable budget``, so time a phase leaves unused
passes to the phases after it and none can take the time of a later one. In-process phases check the clock
between measurements (an item that would not fit is skipped and recorded) and a SIGALRM at the deadline stops
whatever is still running (recorded as cut short); pytest runs in a subprocess killed at its deadline; a
watchdog thread ends the process at the budget whatever happens. Every phase writes its file as it goes and
``status.json`` is rewritten at each phase's start and end (``summary.md`` too, marked provisional until the
last phase), so a run killed at any moment keeps what it finished.

Output folder (at most 8 files): ``status.json`` (the plan, each phase's state and times), ``env.json``
(versions, GPU, clocks, memory, measured copy bandwidth and bf16 matmul rate), ``tests.txt`` (pytest output),
``tune.md`` (``python -m gam_triton.tune`` output, tuned-over-heuristic gain per kernel), ``timings.csv`` (the
sweep's columns, see ``perf/results.py``, plus ``form``, ``layout``, ``check``), ``model.csv`` (the detector
of ``perf/detector.py``), ``summary.md`` (geomeans, goals met or not), ``run.log`` (everything printed).

``--rehearse`` runs every phase on the CPU with the kernels in Triton's interpreter, tiny shapes and a 60 s
budget (torch.compile providers with ``backend="eager"``: Inductor on 2 CPU cores does not fit), and writes the
same files, each labelled at its top as a rehearsal whose numbers are not performance figures.
"""
from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here (imports included)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import datetime as _dt  # noqa: E402
import faulthandler  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PERF_DIR)
if PERF_DIR not in sys.path:
    sys.path.insert(0, PERF_DIR)

#: Every file the check may write (at most 8: the folder must travel back from a lent machine whole).
FILES = ("status.json", "env.json", "tests.txt", "tune.md", "timings.csv", "model.csv", "summary.md", "run.log")
assert len(FILES) <= 8

REHEARSAL_LABEL = ("REHEARSAL on the CPU with Triton's interpreter (TRITON_INTERPRET=1), tiny shapes: it checks "
                   "that every phase runs and writes its files. Its numbers are NOT performance figures.")
DEFAULT_BUDGET_S = {"gpu": 480.0, "rehearsal": 60.0}
#: Known ceilings (shared/GAM_NOTES.md), for reading the measured ones.
KNOWN_CEILINGS = {"H100": {"copy_gbps": 3000, "bf16_tflops": 798}, "H200": {"copy_gbps": 4300, "bf16_tflops": 785}}


# --- shapes and plans ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What the phases measure: the GPU plan, or the rehearsal's tiny one."""

    batch: int
    pairs: tuple            # (channels, square map size) of the whole-block rows (YOLOv8 neck: P3, P4, P5)
    dtypes: tuple           # (dtype name, channels_last), most valuable first
    model_batch: int
    model_size: int
    model_widths: Optional[tuple]  # the detector's widths (None: YOLOv8n's, perf/detector.py)
    model_eval_dtype: str   # the detector's eval dtype (model.to(dtype))
    model_amp: Optional[str]  # the detector's train step: fp32 weights under autocast(amp), or None (fp32)
    bench_budget_s: float   # CPU only: seconds per provider in bench_interleaved
    min_item_s: dict        # default estimate of one item's seconds, per kind, until one has been measured
    tests_reserve_s: float  # correctness: seconds kept for the second pytest run (the tuner's tests)
    max_autotune_min_s: float
    tconv: tuple = ("yolo", "paper")   # forms timed with the Triton convolutions (gam_triton-tconv)
    shares: Optional[dict] = None      # phase name -> share, replacing PHASES' (the rehearsal's CPU costs differ)
    cpu_rounds: Optional[int] = None   # CPU only: interleaved rounds (None: perf/common.py's default)


GPU_PLAN = Plan(batch=16, pairs=((128, 80), (256, 40), (512, 20)),
                dtypes=(("bf16", True), ("fp16", True), ("fp32", False)),
                model_batch=16, model_size=640, model_widths=None, model_eval_dtype="fp16", model_amp="fp16",
                bench_budget_s=0.5,
                min_item_s={"block": 8.0, "compile": 30.0, "component": 3.0, "tune": 8.0, "model": 20.0,
                            "max_autotune": 60.0},
                tests_reserve_s=30.0, max_autotune_min_s=40.0)
REHEARSAL_PLAN = Plan(batch=2, pairs=((16, 4),), dtypes=(("bf16", True), ("fp32", False)),
                      model_batch=2, model_size=32, model_widths=None, model_eval_dtype="fp32",
                      model_amp=None, bench_budget_s=0.02,
                      min_item_s={"block": 0.5, "compile": 2.0, "component": 0.3, "tune": 1.0, "model": 2.0,
                                  "max_autotune": 2.0},
                      tests_reserve_s=0.0, max_autotune_min_s=2.0,
                      # the interpreted 7x7 convolutions take seconds per call even here: the paper form's only
                      tconv=("paper",), cpu_rounds=1,
                      # on 2 CPU cores the interpreted detector costs more, the interpreted tuner less, than on a GPU
                      shares={"env": 0.04, "correctness": 0.25, "tune": 0.07, "headline": 0.31, "components": 0.05,
                              "model": 0.25, "max_autotune": 0.0, "summary": 0.03})

FORMS = ("yolo", "paper")   # YOLO grouped form (GAM_Attention(c1, c2, group=True)), the paper's form
FORM_LABEL = {"yolo": "YOLO form (grouped, no channel sigmoid, shuffle 4)", "paper": "paper form (sigmoid, plain)"}

#: pytest marker expression of the correctness phase: the marked selection plus tests/test_gpu.py (marked gpu).
TEST_MARKERS = "gpu_check or gpu"
#: Files with marked tests, most valuable first (any other file with a marked test follows).
TEST_PRIORITY = ("tests/test_gpu_check.py", "tests/test_gpu.py", "tests/test_train_kernels.py", "tests/test_compile.py",
                 "tests/test_ops.py", "tests/test_conv.py", "tests/test_gam_train.py", "tests/test_gam_forward.py")
#: The tests that need the tuner itself (run 2, autotuning on); run 1 runs with GAM_TRITON_AUTOTUNE=0.
TUNER_TESTS = "runs_on"
#: Rehearsal: the fast part of the selection under the interpreter (torch.compile on the CPU, the training
#: tests and the interpreted 7x7 convolutions take minutes there).
REHEARSAL_TESTS = ("not compile and not train_outputs and not steps_against and not autocast_training and not "
                   "triton_convs and not forward_half and not (block and not (fp32 and nchw))")


# --- the budget ---------------------------------------------------------------------------------------------
#: The SIGALRM comes this long after a phase's deadline: the phase's own checks stop it first where they can (a
#: pytest run is then still recorded), the alarm stops what they cannot reach.
ALARM_GRACE_S = 0.5
#: The last phase (the summary) may run until this long before the budget, whatever the phases before it left;
#: the watchdog ends the process WATCHDOG_S before the budget.
FINAL_END_S = 0.7
WATCHDOG_S = 0.3


class PhaseTimeout(BaseException):
    """The phase's deadline passed (SIGALRM). A BaseException, so that ``except Exception`` does not eat it."""


class InjectedFailure(RuntimeError):
    """``--fail-phase NAME`` / GAM_GPU_CHECK_FAIL: makes a phase fail (tests the recording of failures)."""


class Alarm:
    """SIGALRM at the phase's deadline, repeated every second until disarmed; never inside :meth:`critical`
    (a file being written), where it is held back until the block ends."""

    def __init__(self) -> None:
        self.armed = False
        self.crit = 0
        self.pending = False
        self.ok = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        if self.ok:
            signal.signal(signal.SIGALRM, self._handler)

    def _handler(self, signum, frame) -> None:
        if not self.armed:
            return
        if self.crit:
            self.pending = True
            return
        raise PhaseTimeout()

    def arm(self, deadline: float) -> None:
        self.pending = False
        self.armed = True
        if self.ok:
            signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline - time.monotonic()), 1.0)

    def disarm(self) -> None:
        self.armed = False
        self.pending = False
        if self.ok:
            signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def critical(self):
        self.crit += 1
        try:
            yield
        finally:
            self.crit -= 1
            if not self.crit and self.pending and self.armed:
                self.pending = False
                raise PhaseTimeout()


# --- phases as data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    name: str
    share: float        # of the usable budget; 0: runs only on time the earlier phases left over
    fn: Callable
    files: tuple
    what: str
    min_s: float = 0.0  # the last phase only: its window is at least this long (a short rehearsal budget)


@dataclass
class PhaseState:
    name: str
    share: float
    planned_s: float
    deadline_s: float   # seconds after the start
    what: str
    files: tuple
    state: str = "pending"   # pending, running, done, cut short, failed, skipped, not selected
    started_s: Optional[float] = None
    ended_s: Optional[float] = None
    note: str = ""
    error: str = ""
    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        ran = self.started_s is not None and self.ended_s is not None
        d["used_s"] = round(self.ended_s - self.started_s, 2) if ran else None
        for k in ("planned_s", "deadline_s", "started_s", "ended_s"):
            d[k] = None if d[k] is None else round(d[k], 2)
        return d


class Tee(io.TextIOBase):
    """stdout / stderr to the console and run.log."""

    def __init__(self, stream, log) -> None:
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):
            pass
        try:
            self.log.write(s)
            self.log.flush()
        except (OSError, ValueError):
            pass
        return len(s)

    def flush(self) -> None:
        for f in (self.stream, self.log):
            with contextlib.suppress(OSError, ValueError):
                f.flush()


class Csv:
    """A CSV whose first line is a '#' label, then the header; every row flushed and synced as it is written."""

    def __init__(self, path: str, label: str, columns: Sequence[str], alarm: Alarm) -> None:
        self.path, self.columns, self.alarm = path, list(columns), alarm
        with alarm.critical():
            fresh = not os.path.exists(path) or os.path.getsize(path) == 0
            self.file = open(path, "a", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
            if fresh:
                self.file.write(f"# {label}\n")
                self.writer.writeheader()
                self.file.flush()

    def write(self, row: dict) -> None:
        with self.alarm.critical():
            self.writer.writerow({c: _fmt(row.get(c, "")) for c in self.columns})
            self.file.flush()
            os.fsync(self.file.fileno())


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.6g}"
    return str(value).replace("\n", " ")


def read_csv_rows(path: str) -> list[dict]:
    """Rows of one of the check's CSVs (the '#' label line skipped)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        lines = [ln for ln in f if not ln.startswith("#")]
    return list(csv.DictReader(lines))


def load_timings(path: str):
    """timings.csv as the sweep's DataFrame (``results.load``: failed rows dropped, newest row per key)."""
    import results

    with open(path) as f:
        text = "".join(ln for ln in f if not ln.startswith("#"))
    return results.load(io.StringIO(text))


class Ctx:
    """What the phases share: arguments, plan, output folder, the clock, results of earlier phases."""

    def __init__(self, args, out: str, budget: float, rehearse: bool, alarm: Alarm) -> None:
        self.args, self.out, self.budget, self.rehearse, self.alarm = args, out, budget, rehearse, alarm
        self.plan = REHEARSAL_PLAN if rehearse else GPU_PLAN
        self.fail = set(args.fail_phase or []) | {p.strip() for p in os.environ.get("GAM_GPU_CHECK_FAIL", "").split(",")
                                                  if p.strip()}
        self.phase: Optional[PhaseState] = None
        self.deadline = T0 + budget
        self.states: list[PhaseState] = []
        self.results: dict = {}
        self.child: Optional[subprocess.Popen] = None
        self.status_lock = threading.Lock()
        self.finished = False
        self.rc = 0
        self.estimates: dict = {}
        self._timings: Optional[Csv] = None
        self.on_gpu = False
        self.device = "cpu"
        self.label = ""
        self.mach = None
        self.copy_gbps = float("nan")

    # clock
    def now(self) -> float:
        return time.monotonic() - T0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Between measurements: the injected failure, and the deadline if an exception hid the alarm."""
        if self.phase is not None and self.phase.name in self.fail:
            raise InjectedFailure(f"failure injected into phase {self.phase.name!r} "
                                  "(--fail-phase / GAM_GPU_CHECK_FAIL)")
        if self.remaining() <= 0:
            raise PhaseTimeout()

    def need(self, kind: str, what: str) -> bool:
        """True when an item of ``kind`` is expected to fit before the deadline; else it is recorded as skipped."""
        self.check()
        est = self.estimates.get(kind, self.plan.min_item_s.get(kind, 1.0))
        left = self.remaining()
        if left < est:
            self.phase.skipped.append(f"{what} (skipped for time: {left:.0f} s left, needs ~{est:.0f} s)")
            print(f"gpu_check: skipped for time: {what} ({left:.1f} s left, ~{est:.1f} s needed)", flush=True)
            return False
        return True

    @contextlib.contextmanager
    def item(self, kind: str, what: str):
        """Time one item; its duration becomes the estimate for the next item of that kind."""
        t = time.monotonic()
        yield
        self.estimates[kind] = time.monotonic() - t
        self.phase.done.append(what)

    def path(self, name: str) -> str:
        assert name in FILES, name
        return os.path.join(self.out, name)

    def timings(self) -> Csv:
        if self._timings is None:
            self._timings = Csv(self.path("timings.csv"), self.label, TIMING_COLUMNS, self.alarm)
        return self._timings

    # status
    def write_status(self, final: bool = False, timeout: Optional[float] = None) -> None:
        data = {"label": self.label, "rehearsal": self.rehearse, "budget_s": self.budget,
                "elapsed_s": round(self.now(), 2), "finished": final, "argv": sys.argv[1:],
                "python": sys.executable, "out": self.out,
                "phases": [s.as_dict() for s in self.states],
                "files": sorted(f for f in os.listdir(self.out) if f in FILES) if os.path.isdir(self.out) else []}
        if not self.status_lock.acquire(timeout=-1 if timeout is None else timeout):
            return
        try:
            write_text(self.path("status.json"), json.dumps(data, indent=2, default=str) + "\n", self.alarm)
        finally:
            self.status_lock.release()


def write_text(path: str, text: str, alarm: Optional[Alarm] = None) -> None:
    """Write a file whole (temporary file renamed over it): a reader never sees half of it."""
    with alarm.critical() if alarm else contextlib.nullcontext():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:400]


# --- phase: environment ----------------------------------------------------------------------------------------
def _nvidia_smi() -> dict:
    fields = ("name,driver_version,pstate,temperature.gpu,power.draw,power.limit,clocks.sm,clocks.max.sm,clocks.mem,"
              "clocks.max.mem,memory.total,memory.used,utilization.gpu")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True, text=True,
                             timeout=15)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": _one_line(e)}
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode or len(lines) < 2:
        return {"error": (out.stderr or out.stdout).strip()[:300]}
    keys = [k.strip() for k in lines[0].split(",")]
    return {"gpus": [dict(zip(keys, (v.strip() for v in ln.split(",")))) for ln in lines[1:]]}


def matmul_tflops(on_gpu: bool, n: Optional[int] = None) -> dict:
    """bf16 matmul rate (2 n^3 FLOP per product) on random data: the arithmetic ceiling."""
    import torch

    import common

    n = n or (8192 if on_gpu else 256)
    device = "cuda" if on_gpu else "cpu"
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    fn = lambda: a @ b  # noqa: E731
    common.timed_first_call(fn, on_gpu)
    t = common.bench(fn, on_gpu, budget_s=0.2, min_reps=3)
    return {"n": n, "dtype": "bf16", "ms": t.ms, "tflops": 2 * n**3 / (t.ms * 1e-3) / 1e12}


def _versions() -> dict:
    out = {}
    for name in ("numpy", "pandas", "matplotlib", "pytest", "xdist", "hypothesis"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - any import problem is a fact to record
            out[name] = f"missing ({type(e).__name__})"
    return out


def phase_env(ctx: Ctx) -> None:
    import torch

    import common

    info = {"label": ctx.label, **ctx.mach.as_dict(), "python_executable": sys.executable,
            "packages": _versions(), "budget_s": ctx.budget, "rehearsal": ctx.rehearse,
            "plan": {p.name: {"share": s.share, "planned_s": round(s.planned_s, 1), "what": p.what}
                     for p, s in zip(PHASES, ctx.states)},
            "env_vars": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "GAM_TRITON_CONV", "GAM_TRITON_AUTOTUNE",
                                                        "GAM_TRITON_CACHE_DIR", "CUDA_VISIBLE_DEVICES")},
            "cpu_count": os.cpu_count(), "mkldnn_enabled": torch.backends.mkldnn.enabled}

    ctx.results["env"] = info   # filled as it goes: a phase cut short still shows what it measured

    def save():
        write_text(ctx.path("env.json"), json.dumps(info, indent=2, default=str) + "\n", ctx.alarm)

    save()
    ctx.check()
    if ctx.on_gpu:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "multiprocessors": props.multi_processor_count,
                       "l2_cache_mb": getattr(props, "L2_cache_size", 0) / 2**20,
                       "memory_total_gib": total / 2**30, "memory_free_gib": free / 2**30,
                       "device_count": torch.cuda.device_count()}
        info["nvidia_smi_before"] = _nvidia_smi()
        known = [v for k, v in KNOWN_CEILINGS.items() if k in props.name]
        if known:
            info["known_ceilings_gam_notes"] = known[0]
        save()
    ctx.check()
    ctx.copy_gbps = common.copy_bandwidth_gbps(ctx.on_gpu)
    info["copy_gbps"] = ctx.copy_gbps
    info["copy_note"] = "device-to-device copy of 512 MiB, bytes read + written" if ctx.on_gpu else \
        "RAM copy of 64 MiB, bytes read + written (CPU)"
    print(f"gpu_check: copy bandwidth {ctx.copy_gbps:.1f} GB/s", flush=True)
    save()
    ctx.check()
    info["matmul"] = matmul_tflops(ctx.on_gpu)
    print(f"gpu_check: bf16 matmul {info['matmul']['tflops']:.3g} TFLOP/s (n={info['matmul']['n']})", flush=True)
    if ctx.on_gpu:
        info["nvidia_smi_after"] = _nvidia_smi()
    save()


# --- phase: correctness ----------------------------------------------------------------------------------------
_STATUS_RE = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_NODE_RE = re.compile(r"(tests/\S+::\S+)")
_SUMMARY_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def parse_pytest(text: str) -> dict:
    """Counts from pytest -v output: the closing line where it exists, else the per-test lines."""
    per_test: dict = {}
    for line in text.splitlines():
        m, n = _STATUS_RE.search(line), _NODE_RE.search(line)
        if m and n:
            node = n.group(1)
            status = m.group(1)
            if per_test.get(node) not in ("FAILED", "ERROR"):
                per_test[node] = status
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0}
    closing = [ln for ln in text.splitlines() if re.match(r"^=+ .* in [\d.]+s", ln.strip())]
    if closing:
        for num, word in _SUMMARY_RE.findall(closing[-1]):
            word = "errors" if word.startswith("error") else word
            if word in counts:
                counts[word] += int(num)
        counts["from"] = "closing line"
    else:
        for s in per_test.values():
            key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}.get(s)
            if key:
                counts[key] += 1
        counts["from"] = "per-test lines (no closing line: cut short)"
    counts["failures"] = sorted(n for n, s in per_test.items() if s in ("FAILED", "ERROR"))[:30]
    return counts


def _test_files() -> list[str]:
    """Test files holding a gpu / gpu_check mark, most valuable first."""
    found = []
    tests = os.path.join(REPO_DIR, "tests")
    for name in sorted(os.listdir(tests)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests, name)) as f:
                if "mark.gpu" in f.read():
                    found.append(f"tests/{name}")
    first = [f for f in TEST_PRIORITY if f in found]
    return first + [f for f in found if f not in first]


def _pytest_cmd(ctx: Ctx, files: Sequence[str], k: Optional[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--tb=short", "-rfE", "--durations=15",
           "--continue-on-collection-errors", "-m", TEST_MARKERS]
    if k:
        cmd += ["-k", k]
    workers = 0
    if not ctx.rehearse and importlib.util.find_spec("xdist") is not None:  # pytest-xdist: compile in parallel
        workers = max(0, min(8, (os.cpu_count() or 2) // 2))
    if workers >= 2:
        cmd += ["-n", str(workers)]
    return cmd + list(files)


def _run_pytest(ctx: Ctx, name: str, cmd: list[str], env: dict, until: float, log) -> dict:
    """Run pytest, streamed into tests.txt; killed (its whole process group) at ``until``."""
    with ctx.alarm.critical():   # the deadline is kept here (the group is killed at ``until``), not by the alarm
        return _run_pytest_inner(ctx, name, cmd, env, until, log)


def _run_pytest_inner(ctx: Ctx, name: str, cmd: list[str], env: dict, until: float, log) -> dict:
    log.write(f"\n===== {name}: {shlex.join(cmd)}\n")
    log.write("      env: " + " ".join(f"{k}={env.get(k, '(unset)')}" for k in
                                       ("TRITON_INTERPRET", "GAM_TRITON_AUTOTUNE", "GAM_TRITON_CACHE_DIR")) + "\n")
    log.flush()
    t = time.monotonic()
    start = log.tell()
    proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ctx.child = proc
    cut = False
    try:
        while True:
            try:
                proc.wait(timeout=max(0.05, min(1.0, until - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= until:
                    cut = True
                    break
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            cut = True
        else:  # workers or compile processes pytest left behind (its own process group, by id)
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
        ctx.child = None
    log.flush()
    wall = time.monotonic() - t
    with open(log.name) as f:
        f.seek(start)
        text = f.read()
    res = parse_pytest(text)
    res.update(rc=proc.returncode, cut_short=cut, wall_s=round(wall, 1), command=shlex.join(cmd))
    if not cut and res["from"] != "closing line" and proc.returncode not in (0, 5):
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["(no output)"]
        res["errors"] += 1   # pytest itself did not run (missing, or a crash): count it, show why
        res["failures"] = res["failures"] + [f"pytest did not finish (rc {proc.returncode}): {tail[0][:200]}"]
    if cut:
        log.write(f"\n===== {name}: CUT SHORT at its deadline after {wall:.0f} s (process group killed)\n")
    log.write(f"===== {name}: rc {proc.returncode}, {wall:.1f} s, " +
              ", ".join(f"{res[k]} {k}" for k in ("passed", "failed", "skipped", "errors")) + "\n")
    log.flush()
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    """End the pytest process started here and its workers (its own process group, by id)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def phase_correctness(ctx: Ctx) -> None:
    files = _test_files()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GAM_TRITON_CACHE_DIR", None)   # tests/conftest.py gives the tests a private cache
    env.pop("GAM_TRITON_CONV", None)
    if ctx.rehearse:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    runs = []
    main_k = f"not {TUNER_TESTS}"
    if ctx.rehearse:
        main_k = f"({REHEARSAL_TESTS}) and {main_k}"
    # Run 1: the selection with the tuner off (heuristic configs: tuning ~100 test shapes would take the phase;
    # the tuned configs are checked against eager where they are timed). Run 2: the tests of the tuner itself.
    runs.append(("run 1 (GAM_TRITON_AUTOTUNE=0)", _pytest_cmd(ctx, files, main_k), dict(env, GAM_TRITON_AUTOTUNE="0"),
                 ctx.plan.tests_reserve_s))
    runs.append(("run 2 (the tuner's tests, autotuning on)", _pytest_cmd(ctx, ["tests/test_gpu.py"], TUNER_TESTS),
                 dict(env), 0.0))
    with open(ctx.path("tests.txt"), "a") as log:
        log.write(f"# {ctx.label}\n# correctness: pytest -m '{TEST_MARKERS}' over {' '.join(files)}\n")
        log.flush()
        for name, cmd, run_env, reserve in runs:
            ctx.check()
            if ctx.remaining() < (3.0 if ctx.rehearse else 15.0):
                ctx.phase.skipped.append(f"{name} (skipped for time: {ctx.remaining():.0f} s left)")
                log.write(f"\n===== {name}: skipped for time ({ctx.remaining():.0f} s left)\n")
                continue
            res = _run_pytest(ctx, name, cmd, run_env, ctx.deadline - reserve, log)
            runs_done = ctx.results.setdefault("correctness", [])
            runs_done.append(dict(res, name=name))
            ctx.phase.done.append(f"{name}: {res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped, "
                                  f"{res['errors']} errors" + (" (cut short)" if res["cut_short"] else ""))
            print(f"gpu_check: tests {ctx.phase.done[-1]}", flush=True)
    out = ctx.results.get("correctness", [])
    if any(r["cut_short"] for r in out):
        ctx.phase.note = "pytest cut short at the deadline"


# --- phase: tuning ----------------------------------------------------------------------------------------------
def tune_items(plan: Plan) -> list[tuple[str, list[str]]]:
    """``python -m gam_triton.tune`` arguments, most valuable first: the headline shapes in bf16 channels_last
    (YOLO, then paper form, eval + train), the detector's GAM shapes, then fp16 and fp32."""
    import detector

    yolo = ["--group", "--no-sigmoid", "--shuffle", "4"]
    items = []

    def block(dtype, cl, form, c, s, train=True):
        layout = "channels_last" if cl else "nchw"
        argv = ["--channels", str(c), "--sizes", str(s), "--batch", str(plan.batch), "--dtype", dtype,
                "--layout", layout] + (yolo if form == "yolo" else []) + (["--train"] if train else [])
        return (f"{dtype} {layout} {form} C{c} {s}x{s} B{plan.batch}", argv)

    first_dtype, first_cl = plan.dtypes[0]
    for form in FORMS:
        items += [block(first_dtype, first_cl, form, c, s) for c, s in plan.pairs]
    for b, c, h, _ in detector.gam_shapes(plan.model_batch, plan.model_size, plan.model_widths or detector.WIDTHS):
        base = ["--channels", str(c), "--sizes", str(h), "--batch", str(b)] + yolo
        items.append((f"detector eval {plan.model_eval_dtype} nchw C{c} {h}x{h} B{b}",
                      base + ["--dtype", plan.model_eval_dtype]))
        if plan.model_amp:
            items.append((f"detector train amp {plan.model_amp} C{c} {h}x{h} B{b}",
                          base + ["--dtype", plan.model_amp, "--amp", "--train"]))
        else:
            items.append((f"detector train fp32 C{c} {h}x{h} B{b}", base + ["--dtype", "fp32", "--train"]))
    for dtype, cl in plan.dtypes[1:]:
        for form in FORMS:
            items += [block(dtype, cl, form, c, s) for c, s in plan.pairs]
    return items


_TABLE_HEAD = "| kernel | key |"


def parse_tune_table(text: str) -> list[dict]:
    """The rows of the markdown table ``python -m gam_triton.tune`` prints (tuned keys, gain over the heuristic)."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith(_TABLE_HEAD):
            inside = True
            continue
        if not inside:
            continue
        if not line.startswith("|"):
            inside = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 8 or set(cells[0]) <= {"-"}:
            continue

        def num(s: str) -> float:
            try:
                return float(s.rstrip("x"))
            except ValueError:
                return float("nan")

        rows.append({"kernel": cells[0], "key": cells[1].strip("`"), "config": cells[2], "heuristic_ms": num(cells[3]),
                     "tuned_ms": num(cells[4]), "gain": num(cells[5]), "tune_s": num(cells[6]), "configs": cells[7]})
    return rows


def kernel_gains(rows: Sequence[dict]) -> list[dict]:
    """Per kernel: tuned keys, geomean / min / max of tuned-over-heuristic gain, tuning seconds."""
    import results

    by: dict = {}
    for r in rows:
        by.setdefault(r["kernel"], []).append(r)
    out = []
    for k, rs in by.items():
        gains = [r["gain"] for r in rs if r["gain"] == r["gain"]]
        out.append({"kernel": k, "keys": len(rs), "geomean": results.geomean(gains) if gains else float("nan"),
                    "min": min(gains) if gains else float("nan"), "max": max(gains) if gains else float("nan"),
                    "tune_s": sum(r["tune_s"] for r in rs if r["tune_s"] == r["tune_s"])})
    return out


def _tune_md(ctx: Ctx, sections: list[str], rows: list[dict]) -> str:
    lines = [f"# {ctx.label}", "", "# Tuning (python -m gam_triton.tune, in process, cache "
             f"{os.environ.get('GAM_TRITON_CACHE_DIR')})", ""]
    if ctx.rehearse:
        lines += ["Rehearsal: under the interpreter the tuner only fills the cache with the heuristic configs; "
                  "nothing is timed, so there are no gains.", ""]
    lines += ["## Tuned over heuristic, per kernel", "",
              "| kernel | keys tuned | geomean gain | min | max | tuning s |", "|---|---|---|---|---|---|"]
    for g in kernel_gains(rows):
        lines.append(f"| {g['kernel']} | {g['keys']} | {_x(g['geomean'])} | {_x(g['min'])} | {_x(g['max'])} | "
                     f"{g['tune_s']:.1f} |")
    if not rows:
        lines.append("| (no tuned keys) | 0 | n/a | n/a | n/a | 0 |")
    lines += ["", "## Per shape (the command's output)", ""] + sections
    return "\n".join(lines) + "\n"


def phase_tune(ctx: Ctx) -> None:
    from gam_triton import tune

    sections: list[str] = []
    rows: list[dict] = []
    write_text(ctx.path("tune.md"), _tune_md(ctx, sections, rows), ctx.alarm)
    for what, argv in tune_items(ctx.plan):
        if not ctx.need("tune", what):
            sections.append(f"### {what}\n\nskipped for time\n")
            continue
        with ctx.item("tune", what):
            buf = io.StringIO()
            t = time.monotonic()
            rc: object = "cut short at the deadline"
            try:
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                    rc = tune.main(argv)
            except (Exception, SystemExit) as e:  # a failing shape is recorded; the next one is tried
                rc = f"error {_one_line(e)}"
            finally:   # also when the deadline stops it: what it printed so far is kept
                text = buf.getvalue()
                print(text, end="", flush=True)
                rows += parse_tune_table(text)
                sections.append(f"### {what}\n\n`python -m gam_triton.tune {shlex.join(argv)}`: exit {rc}, "
                                f"{time.monotonic() - t:.1f} s\n\n```\n{text.strip()}\n```\n")
                ctx.results["tune"] = kernel_gains(rows)
                write_text(ctx.path("tune.md"), _tune_md(ctx, sections, rows), ctx.alarm)


# --- timing: the whole block ---------------------------------------------------------------------------------
#: timings.csv: the sweep's columns (perf/results.py) and three more.
def _timing_columns() -> list[str]:
    import results

    return list(results.COLUMNS) + ["form", "layout", "check"]


TIMING_COLUMNS: list = []  # filled in main() (perf/results.py imports pandas lazily; the list is plain)


def _set_conv(mode: Optional[str]):
    """A context setting GAM_TRITON_CONV (the public switch) for the duration of a call."""
    @contextlib.contextmanager
    def ctxm():
        old = os.environ.get("GAM_TRITON_CONV")
        if mode is not None:
            os.environ["GAM_TRITON_CONV"] = mode
        try:
            yield
        finally:
            if mode is not None:
                if old is None:
                    os.environ.pop("GAM_TRITON_CONV", None)
                else:
                    os.environ["GAM_TRITON_CONV"] = old
    return ctxm


def make_reference(form: str, c: int):
    from gam_triton.reference import PaperGAM, YoloGAM

    return YoloGAM(c, c, group=True, rate=4) if form == "yolo" else PaperGAM(c, rate=4)


def block_case(form: str, c: int, size: int, batch: int, dtype_name: str, channels_last: bool, mode: str,
               provider: str, device: str):
    """(Case, probe) of one provider of the whole block: ``probe()`` returns the output (eval) or the input's
    gradient (train) on the first input set, to compare providers."""
    import torch

    import cases
    import common
    from gam_triton import GAM

    dtype = common.DTYPES[dtype_name]
    train = mode == "train"
    shape = common.Shape(batch, c, size, size, 4, form == "yolo")
    torch.manual_seed(0)
    ref = make_reference(form, c).to(device=device, dtype=dtype).train(train)
    conv = None
    if provider == "gam_triton":
        model = GAM.from_module(ref)
    elif provider == "gam_triton-tconv":
        model, conv = GAM.from_module(ref), "triton"
    elif provider == "eager":
        model = ref
    else:
        model = cases.compiled(ref, provider, reset_dynamo=False)
    conv_ctx = _set_conv(conv)
    nbytes = common.gam_bytes(shape, dtype, mode)
    n = common.rotation_count(nbytes, device != "cpu")
    size4 = (batch, c, size, size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(size4, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
          .requires_grad_(train) for _ in range(n)]
    gs = [torch.randn(size4, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
          for _ in range(n)] if train else []
    state = {"i": 0}

    def nxt() -> int:
        state["i"] = (state["i"] + 1) % n
        return state["i"]

    if train:
        def step():
            i = nxt()
            with conv_ctx():
                model(xs[i]).backward(gs[i])

        def probe():
            xs[0].grad = None
            with conv_ctx():
                model(xs[0]).backward(gs[0])
            g = xs[0].grad.detach().clone()
            xs[0].grad = None
            return g

        grads = xs + list(model.parameters())
    else:
        def step():
            with conv_ctx():
                return model(xs[nxt()])

        def probe():
            with conv_ctx():
                return model(xs[0]).detach().clone()

        grads = []
    return cases.Case(step, nbytes, common.gam_flops(shape, mode), grads), probe


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.norm().item()
    return float("nan") if not den == den else ((a - b).norm().item() / max(den, 1e-30))


def measure(ctx: Ctx, builders: dict, base_row: dict, mode: str, check: bool = True) -> dict:
    """Build every provider of one shape, run each once (untimed: ``compile_s``; that first call is the probe whose
    result is compared with eager's), time them interleaved (``common.bench_interleaved``) and fill their rows (the
    sweep's columns); a provider that fails gets its ``error`` and the others go on."""
    import torch
    import torch._dynamo

    import common

    rows = {p: dict(base_row, provider=p) for p in builders}
    built: dict = {}
    first: dict = {}
    torch._dynamo.reset()
    grad = torch.no_grad() if mode == "forward" else contextlib.nullcontext()
    try:
        with grad:
            for p, build in builders.items():
                ctx.check()
                try:
                    case, probe = build(p)
                    call = probe if (check and probe is not None) else case.step
                    out: list = []
                    rows[p]["compile_s"] = common.timed_first_call(lambda out=out, call=call: out.append(call()),
                                                                   ctx.on_gpu)
                    built[p] = case
                    if call is probe:
                        first[p] = out[0]
                except Exception as e:  # a provider failing (compile error, OOM) does not stop the others
                    rows[p]["error"] = _one_line(e)
                    print(f"gpu_check:   {p} FAILED: {rows[p]['error'][:200]}", flush=True)
            if "eager" in first:
                for p, got in first.items():
                    if p != "eager":
                        try:
                            rows[p]["check"] = rel_err(got, first["eager"])
                        except Exception as e:
                            rows[p]["check"] = f"check failed: {_one_line(e)}"
            first.clear()
            ctx.check()
            if built:
                try:
                    with _cpu_rounds(ctx):
                        res = common.bench_interleaved({p: (c.step, c.grads) for p, c in built.items()}, ctx.on_gpu,
                                                       budget_s=ctx.plan.bench_budget_s)
                except Exception as e:
                    for p in built:
                        rows[p]["error"] = _one_line(e)
                    res = None
                if res is not None:
                    for p, case in built.items():
                        common.fill_row(rows[p], p, case, res, ctx.copy_gbps)
                    if ctx.on_gpu:
                        for p, case in built.items():
                            ctx.check()
                            try:
                                rows[p]["peak_mem_mb"] = common.peak_memory_mb(case.step, case.grads)
                            except Exception as e:
                                rows[p]["error"] = _one_line(e)
    finally:
        built.clear()
        first.clear()
        gc.collect()
        if ctx.on_gpu:
            torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _cpu_rounds(ctx: Ctx):
    """Rehearsal: fewer interleaved CPU rounds (``perf/common.py``'s ROUNDS / MIN_ROUNDS), the numbers being no
    figures anyway; GPU runs keep the module's rounds."""
    import common

    n = ctx.plan.cpu_rounds
    if ctx.on_gpu or not n:
        yield
        return
    old = common.ROUNDS, common.MIN_ROUNDS
    common.ROUNDS = common.MIN_ROUNDS = n
    try:
        yield
    finally:
        common.ROUNDS, common.MIN_ROUNDS = old


def _base_row(ctx: Ctx, kind: str, dtype: str, mode: str, batch: int, c: int, size: int, group, form: str,
              layout: str) -> dict:
    m = ctx.mach
    note = FORM_LABEL.get(form, form) + f"; {layout}"
    if m.note:
        note += f"; {m.note}"
    if ctx.rehearse:
        note = "REHEARSAL, not performance figures; " + note
    return dict(device=m.device, torch=m.torch, triton=m.triton, dtype=dtype, mode=mode, kind=kind, batch=batch,
                channels=c, height=size, width=size, rate=4, group=group, note=note, date=m.date,
                copy_gbps=ctx.copy_gbps, form=form, layout=layout)


def _result_line(row: dict) -> str:
    if row.get("error"):
        return f"{row['provider']}: FAILED {str(row['error'])[:150]}"
    s = f"{row['provider']}: {row.get('ms', float('nan')):.4g} ms"
    if row.get("vs_eager") is not None:
        s += f" x{row['vs_eager']:.2f}"
    if isinstance(row.get("check"), float):
        s += f" (err {row['check']:.1e})"
    return s


def block_groups(plan: Plan, providers_a=("eager", "gam_triton", "gam_triton-tconv"),
                 providers_b=("eager", "compile")) -> list[dict]:
    """The whole-block groups, most valuable first: per (dtype, layout) pass A (eager, gam_triton, gam_triton with
    the Triton convolutions in eval) then, for the first dtype, pass B (torch.compile against eager); the compile
    passes of the other dtypes come last. Each group: one (form, shape, dtype, mode) timed together."""
    def groups(dtype, cl, providers, write, kind):
        out = []
        for form in FORMS:
            for c, s in plan.pairs:
                for mode in ("forward", "train"):
                    prov = [p for p in providers if not (p == "gam_triton-tconv" and (mode == "train" or
                                                                                      form not in plan.tconv))]
                    out.append(dict(form=form, c=c, size=s, dtype=dtype, cl=cl, mode=mode, providers=prov,
                                    write=[p for p in prov if p in write], kind=kind))
        return out

    first, rest = plan.dtypes[0], plan.dtypes[1:]
    out = groups(*first, providers_a, providers_a, "block") + groups(*first, providers_b, ("compile",), "compile")
    for dt in rest:
        out += groups(*dt, providers_a, providers_a, "block")
    for dt in rest:
        out += groups(*dt, providers_b, ("compile",), "compile")
    return out


def _group_label(g: dict, batch: int) -> str:
    layout = "channels_last" if g["cl"] else "nchw"
    return (f"{g['dtype']} {layout} {g['form']} {g['mode']} B{batch} C{g['c']} {g['size']}x{g['size']} "
            f"[{', '.join(g['providers'])}]")


def run_block_groups(ctx: Ctx, groups: Sequence[dict]) -> None:
    device = ctx.device
    for g in groups:
        what = _group_label(g, ctx.plan.batch)
        if not ctx.need(g["kind"], what):
            continue
        with ctx.item(g["kind"], what):
            layout = "channels_last" if g["cl"] else "nchw"
            base = _base_row(ctx, "gam", g["dtype"], g["mode"], ctx.plan.batch, g["c"], g["size"],
                             str(g["form"] == "yolo"), g["form"], layout)
            builders = {p: (lambda p, g=g: block_case(g["form"], g["c"], g["size"], ctx.plan.batch, g["dtype"], g["cl"],
                                                      g["mode"], p, device)) for p in g["providers"]}
            rows = measure(ctx, builders, base, g["mode"])
            for p in g["write"]:
                ctx.timings().write(rows[p])
            print(f"gpu_check: {what}: " + "; ".join(_result_line(rows[p]) for p in g["write"]), flush=True)


def _compile_context(ctx: Ctx):
    """Rehearsal: torch.compile with backend="eager" (dynamo traces, Inductor does not run: it does not fit the
    60 s on a CPU). On a GPU: torch.compile as it is."""
    if not ctx.rehearse:
        return contextlib.nullcontext()
    import torch

    real = torch.compile

    def eager_compile(model=None, *, mode=None, **kw):
        kw = {k: v for k, v in kw.items() if k in ("fullgraph", "dynamic")}
        return real(model, backend="eager", **kw)

    @contextlib.contextmanager
    def patched():
        torch.compile = eager_compile
        try:
            yield
        finally:
            torch.compile = real
    return patched()


def phase_headline(ctx: Ctx) -> None:
    ctx.timings()
    with _compile_context(ctx):
        run_block_groups(ctx, block_groups(ctx.plan))


def phase_max_autotune(ctx: Ctx) -> None:
    if ctx.remaining() < ctx.plan.max_autotune_min_s:
        ctx.phase.note = f"no time left ({ctx.remaining():.0f} s < {ctx.plan.max_autotune_min_s:.0f} s)"
        ctx.phase.skipped.append("torch.compile max-autotune (no time left over)")
        return
    dtype, cl = ctx.plan.dtypes[0]
    groups = []
    for form in FORMS:
        for c, s in ctx.plan.pairs:
            groups.append(dict(form=form, c=c, size=s, dtype=dtype, cl=cl, mode="forward",
                               providers=["eager", "gam_triton", "compile-max-autotune"],
                               write=["compile-max-autotune"], kind="max_autotune"))
    with _compile_context(ctx):
        run_block_groups(ctx, groups)


# --- timing: the fused components ----------------------------------------------------------------------------
def phase_components(ctx: Ctx) -> None:
    import cases
    import common

    if ctx.copy_gbps != ctx.copy_gbps:
        ctx.copy_gbps = common.copy_bandwidth_gbps(ctx.on_gpu)
    for dtype, _ in ctx.plan.dtypes[:2]:
        for kind in ("channel_gate", "final_gate"):
            for c, s in ctx.plan.pairs:
                what = f"{kind} {dtype} B{ctx.plan.batch} C{c} {s}x{s}"
                if not ctx.need("component", what):
                    continue
                with ctx.item("component", what):
                    shape = common.Shape(ctx.plan.batch, c, s, s, 4, False)
                    base = _base_row(ctx, kind, dtype, "forward", ctx.plan.batch, c, s, "", "yolo", "nchw")
                    base["note"] = base["note"].replace(FORM_LABEL["yolo"], f"{kind} alone (YOLO form)")
                    builders = {p: (lambda p, kind=kind, shape=shape, dtype=dtype: (
                        cases.build_case(kind, shape, common.DTYPES[dtype], "forward", p, ctx.device,
                                         reset_dynamo=False), None)) for p in ("eager", "gam_triton")}
                    rows = measure(ctx, builders, base, "forward", check=False)
                    for p in builders:
                        ctx.timings().write(rows[p])
                    r = rows["gam_triton"]
                    frac = r.get("roofline_frac")
                    print(f"gpu_check: {what}: {_result_line(r)}" +
                          (f", {frac:.0%} of copy bandwidth" if isinstance(frac, float) else ""), flush=True)


# --- the detector -----------------------------------------------------------------------------------------------
MODEL_COLUMNS = ["mode", "dtype", "amp", "provider", "batch", "size", "ms", "ms_p20", "ms_p80", "vs_eager",
                 "vs_eager_p20", "vs_eager_p80", "gam_share", "gam_ms", "peak_mem_mb", "compile_s", "params", "check",
                 "rounds", "noisy", "error", "note", "device", "torch", "triton", "date"]


def model_case(provider: str, mode: str, plan: Plan, device: str):
    """(Case, probe) of the detector: eager (reference GAMs), gam_triton (``gam_triton.convert``), no_gam (the
    GAMs replaced by nn.Identity: the share of the model's time the GAMs take)."""
    import torch

    import cases
    import common
    import detector
    import gam_triton

    torch.manual_seed(0)
    model = detector.Detector(widths=plan.model_widths or detector.WIDTHS)
    if provider == "gam_triton":
        model = gam_triton.convert(model)
    elif provider == "no_gam":
        model = detector.without_gam(model)
    train = mode == "train"
    if train:
        model = model.to(device).train()
        amp_dtype = common.DTYPES[plan.model_amp] if plan.model_amp else None
        in_dtype = torch.float32
    else:
        model = model.to(device=device, dtype=common.DTYPES[plan.model_eval_dtype]).eval()
        amp_dtype, in_dtype = None, common.DTYPES[plan.model_eval_dtype]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(plan.model_batch, 3, plan.model_size, plan.model_size, generator=gen).to(device=device,
                                                                                             dtype=in_dtype)
    amp = (lambda: torch.autocast(device.split(":")[0], dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    params = list(model.parameters())

    if train:
        def loss():
            with amp():
                outs = model(x)
            return sum(o.float().square().mean() for o in outs)

        def step():
            loss().backward()

        def probe():
            for p in params:
                p.grad = None
            val = loss()
            val.backward()
            return val.detach().reshape(1)
    else:
        def step():
            return model(x)

        def probe():
            return torch.cat([o.detach().flatten() for o in model(x)])
    return cases.Case(step, 0, 0, params if train else []), probe, detector.param_count(model)


def phase_model(ctx: Ctx) -> None:
    plan = ctx.plan
    m = ctx.mach
    out = Csv(ctx.path("model.csv"), ctx.label, MODEL_COLUMNS, ctx.alarm)
    results_rows = ctx.results.setdefault("model", [])
    for mode in ("forward", "train"):
        dtype = plan.model_eval_dtype if mode == "forward" else "fp32"
        amp = plan.model_amp if mode == "train" else ""
        what = f"detector {mode} B{plan.model_batch} {plan.model_size}x{plan.model_size} {dtype}" + \
            (f" autocast {amp}" if amp else "")
        if not ctx.need("model", what):
            continue
        with ctx.item("model", what):
            params: dict = {}

            def build(p, mode=mode, params=params):
                case, probe, n = model_case(p, mode, plan, ctx.device)
                params[p] = n
                return case, probe

            widths = "YOLOv8n widths" if not plan.model_widths else f"widths {plan.model_widths}"
            note = f"detector-like network (perf/detector.py, {widths}), YOLO-form GAM after P3/P4/P5; " + \
                ("eval, no_grad" if mode == "forward" else "train step: forward + backward of a stand-in loss")
            if ctx.rehearse:
                note = "REHEARSAL, not performance figures; " + note
            base = dict(mode=mode, dtype=dtype, amp=amp, batch=plan.model_batch, size=plan.model_size, note=note,
                        device=m.device, torch=m.torch, triton=m.triton, date=m.date)
            rows = measure(ctx, {p: build for p in ("eager", "gam_triton", "no_gam")}, base, mode)
            bare = rows["no_gam"].get("ms")
            for p in ("eager", "gam_triton", "no_gam"):
                r = rows[p]
                r["params"] = params.get(p, "")
                if p != "no_gam" and bare and r.get("ms"):
                    r["gam_ms"] = r["ms"] - bare
                    r["gam_share"] = 1 - bare / r["ms"]
                if p == "no_gam":
                    r.pop("check", None)
                out.write(r)
                results_rows.append(r)
            print(f"gpu_check: {what}: " + "; ".join(_result_line(rows[p]) for p in rows) +
                  "".join(f"; GAM share {p} {rows[p]['gam_share']:.0%}" for p in ("eager", "gam_triton")
                          if isinstance(rows[p].get("gam_share"), float)), flush=True)


# --- summary ------------------------------------------------------------------------------------------------------
def _x(v, pattern: str = "x{:.2f}") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    if v != v:
        return "n/a"
    if pattern == "x{:.2f}" and 0 < abs(v) < 0.1:
        pattern = "x{:.2g}"
    return pattern.format(v)


def _goal(ok: Optional[bool], rehearse: bool) -> str:
    if rehearse:
        return "not judged (rehearsal)"
    return {True: "MET", False: "NOT MET", None: "not measured"}[ok]


def build_summary(ctx: Ctx, final: bool) -> str:
    import results
    import summary as sweep_summary

    L = [f"# {ctx.label}", "", "# gpu-check summary", ""]
    if ctx.rehearse:
        L += [f"**{REHEARSAL_LABEL}**", ""]
    if not final:
        running = [s.name for s in ctx.states if s.state in ("pending", "running")]
        L += [f"**Provisional**: written after phase {ctx.phase.name if ctx.phase else '-'}; not finished yet: "
              f"{', '.join(running) or '-'}.", ""]
    L += [f"Budget {ctx.budget:.0f} s, elapsed {ctx.now():.1f} s. Command: `{shlex.join([sys.executable] + sys.argv)}`",
          "", "## Phases", "", "| phase | share | planned s | deadline s | used s | state | done | skipped | note |",
          "|---|---|---|---|---|---|---|---|---|"]
    for s in ctx.states:
        d = s.as_dict()
        note = "; ".join(x for x in (s.note, s.error) if x)
        if s.state == "running" and s.name == PHASES[-1].name:
            note = "writing this file"
        L.append(f"| {s.name} | {s.share:.0%} | {s.planned_s:.0f} | {s.deadline_s:.0f} | "
                 f"{'' if d['used_s'] is None else d['used_s']} | {s.state} | {len(s.done)} | {len(s.skipped)} | "
                 f"{note[:200]} |")
    env = ctx.results.get("env", {})
    L += ["", "## Ceilings measured in this run", ""]
    if env:
        mm = env.get("matmul", {})
        L.append(f"- copy bandwidth (read + written): {_x(env.get('copy_gbps'), '{:.1f}')} GB/s "
                 f"({env.get('copy_note', '')})")
        L.append(f"- bf16 matmul: {_x(mm.get('tflops'), '{:.3g}')} TFLOP/s (n = {mm.get('n')}, random data)")
        if env.get("known_ceilings_gam_notes"):
            k = env["known_ceilings_gam_notes"]
            L.append(f"- GAM_NOTES for this card: copy ~{k['copy_gbps']} GB/s, bf16 ~{k['bf16_tflops']} TFLOP/s")
    else:
        L.append("not measured (the env phase did not finish)")
    L += ["", "## Correctness (" + ("interpreter, fast part of the selection" if ctx.rehearse else
                                    "kernels compiled for real") + f", pytest -m '{TEST_MARKERS}')", ""]
    runs = ctx.results.get("correctness", [])
    if not runs:
        L.append("not run")
    for r in runs:
        L.append(f"- {r['name']}: {r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped, "
                 f"{r['errors']} errors in {r['wall_s']} s (rc {r['rc']}" + (", CUT SHORT" if r["cut_short"] else "") +
                 ")")
        for f in r.get("failures", [])[:15]:
            L.append(f"  - FAILED {f}")

    df = None
    tpath = ctx.path("timings.csv")
    if os.path.exists(tpath):
        try:
            df = load_timings(tpath)
        except Exception as e:  # an empty or half-written file: say so
            L += ["", f"timings.csv could not be read: {_one_line(e)}"]
    goals: list[tuple[str, Optional[bool], str]] = []
    L += ["", f"## Whole block, B{ctx.plan.batch}, YOLOv8 neck shapes: geomean speedups of gam_triton", ""]
    if df is not None and not df.empty and (df["kind"] == "gam").any():
        L += ["| dtype | layout | form | mode | shapes | gam_triton vs eager | gam_triton-tconv vs eager | "
              "gam_triton vs compile | gam_triton vs max-autotune | peak mem gam_triton / eager |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        gam = df[df["kind"] == "gam"]
        for dtype, cl in ctx.plan.dtypes:
            for form in FORMS:
                d = gam[(gam["dtype"] == dtype) & (gam["form"] == form)]
                for mode in ("forward", "train"):
                    dm = d[d["mode"] == mode]
                    if dm.empty:
                        continue
                    sp = {b: sweep_summary.speedups(d, "gam", dtype, mode, b) for b in
                          ("eager", "compile", "compile-max-autotune")}
                    tc = sweep_summary.speedups(d, "gam", dtype, mode, "eager", "gam_triton-tconv")
                    e = dm[dm["provider"] == "eager"].set_index("channels")["peak_mem_mb"]
                    o = dm[dm["provider"] == "gam_triton"].set_index("channels")["peak_mem_mb"]
                    both = e.index.intersection(o.index)
                    mem = results.geomean(list((o.loc[both] / e.loc[both]).dropna())) if len(both) else float("nan")
                    g = {b: results.geomean(v) for b, v in sp.items()}
                    L.append(f"| {dtype} | {'channels_last' if cl else 'nchw'} | {form} | {mode} | "
                             f"{len(sp['eager'])} | {_x(g['eager'])} | {_x(results.geomean(tc))} | "
                             f"{_x(g['compile'])} | {_x(g['compile-max-autotune'])} | {_x(mem, '{:.2f}')} |")
        for dtype in [d for d, _ in ctx.plan.dtypes]:
            for mode, target in (("forward", 1.5), ("train", 1.3)):
                sp = sweep_summary.speedups(gam, "gam", dtype, mode, "eager")
                g = results.geomean(sp)
                goals.append((f"whole GAM {mode} {dtype} (geomean over the forms and shapes measured): "
                              f"gam_triton >= x{target} eager"
                              + (" (aim x2)" if mode == "forward" else ""), None if g != g else g >= target, _x(g)))
            m = results.geomean(sweep_summary.speedups(gam, "gam", dtype, "forward", "compile-max-autotune"))
            goals.append((f"whole GAM forward {dtype}: ahead of torch.compile max-autotune", None if m != m else m > 1,
                          _x(m)))
        L += ["", "| dtype | form | mode | shape | provider | ms | x eager (p20-p80) | check vs eager | peak MB |",
              "|---|---|---|---|---|---|---|---|---|"]
        for _, r in gam.iterrows():
            chk = r.get("check", "")
            try:
                chk = "" if r["provider"] == "eager" else f"{float(chk):.1e}"
            except (TypeError, ValueError):
                chk = str(chk or "")
            L.append(f"| {r['dtype']} | {r['form']} | {r['mode']} | C{int(r['channels'])} {int(r['height'])}x"
                     f"{int(r['width'])} | {r['provider']} | {_x(r['ms'], '{:.4g}')} | "
                     f"{_x(r['vs_eager'])} ({_x(r['vs_eager_p20'], '{:.2f}')}-{_x(r['vs_eager_p80'], '{:.2f}')}) | "
                     f"{chk} | {_x(r['peak_mem_mb'], '{:.0f}')} |")
    else:
        L.append("no whole-block rows measured")
    L += ["", "## Fused components alone: fraction of the measured copy bandwidth", ""]
    comp = df[(df["kind"] != "gam")] if df is not None and not df.empty else None
    if comp is not None and not comp.empty:
        L += ["| kind | dtype | shape | eager ms | gam_triton ms | gam_triton GB/s | of copy bandwidth |",
              "|---|---|---|---|---|---|---|"]
        for (kind, dtype, c), d in comp.groupby(["kind", "dtype", "channels"], sort=False):
            e, o = d[d["provider"] == "eager"], d[d["provider"] == "gam_triton"]
            if o.empty:
                continue
            r = o.iloc[0]
            L.append(f"| {kind} | {dtype} | C{c} {int(r['height'])}x{int(r['width'])} | "
                     f"{_x(e['ms'].iloc[0] if len(e) else float('nan'), '{:.4g}')} | {_x(r['ms'], '{:.4g}')} | "
                     f"{_x(r['gbps'], '{:.4g}')} | {_x(r['roofline_frac'], '{:.1%}')} |")
        cg = comp[(comp["kind"] == "channel_gate") & (comp["provider"] == "gam_triton") & (comp["dtype"] == "bf16")
                  & (comp["channels"] >= 128)]["roofline_frac"].dropna()
        goals.insert(0, ("channel gate bf16, C >= 128: >= 85% of the copy bandwidth at every shape",
                         None if cg.empty else bool(cg.min() >= 0.85), _x(cg.min() if len(cg) else float("nan"),
                                                                          "min {:.0%}")))
    else:
        L.append("no component rows measured")
        goals.insert(0, ("channel gate bf16, C >= 128: >= 85% of the copy bandwidth at every shape", None, "n/a"))
    L += ["", "## Model level: the detector of perf/detector.py (what a user measures)", ""]
    mrows = read_csv_rows(ctx.path("model.csv"))
    if mrows:
        L += ["| mode | dtype | provider | ms | x eager (p20-p80) | GAM share of the model's time | peak MB | error |",
              "|---|---|---|---|---|---|---|---|"]
        for r in mrows:
            dt = r["dtype"] + (f" (autocast {r['amp']})" if r.get("amp") else "")
            L.append(f"| {r['mode']} | {dt} | {r['provider']} | {_x(r['ms'], '{:.4g}')} | {_x(r['vs_eager'])} "
                     f"({_x(r['vs_eager_p20'], '{:.2f}')}-{_x(r['vs_eager_p80'], '{:.2f}')}) | "
                     f"{_x(r['gam_share'], '{:.0%}')} | {_x(r['peak_mem_mb'], '{:.0f}')} | {r.get('error', '')[:80]} |")
    else:
        L.append("not measured")
    L += ["", "## Tuning: tuned over heuristic, per kernel (tune.md)", ""]
    gains = ctx.results.get("tune")
    if gains:
        L += ["| kernel | keys | geomean | min | max |", "|---|---|---|---|---|"]
        L += [f"| {g['kernel']} | {g['keys']} | {_x(g['geomean'])} | {_x(g['min'])} | {_x(g['max'])} |"
              for g in gains]
    else:
        L.append("no tuned keys" + (" (the interpreter fills the cache with heuristic configs)" if ctx.rehearse
                                    else ""))
    L += ["", "## Performance goals (issue 4)", "", "| goal | measured | verdict |", "|---|---|---|"]
    L += [f"| {name} | {val} | {_goal(ok, ctx.rehearse)} |" for name, ok, val in goals]
    return "\n".join(L) + "\n"


def phase_summary(ctx: Ctx) -> None:
    write_text(ctx.path("summary.md"), build_summary(ctx, final=True), ctx.alarm)


PHASES = [
    Phase("env", 0.04, phase_env, ("env.json",),
          "versions, GPU, clocks, memory; copy bandwidth and bf16 matmul rate measured"),
    Phase("correctness", 0.25, phase_correctness, ("tests.txt",),
          "pytest -m 'gpu_check or gpu': tests/test_gpu.py + the marked selection, kernels compiled for real"),
    Phase("tune", 0.12, phase_tune, ("tune.md",),
          "python -m gam_triton.tune at the headline and detector shapes: tuned over heuristic per kernel "
          "(fills the cache the timings then use)"),
    Phase("headline", 0.36, phase_headline, ("timings.csv",),
          "whole block, eval and train step, B16 YOLOv8 neck shapes, YOLO and paper forms; bf16 channels_last, "
          "then fp16, fp32; eager, gam_triton, gam_triton-tconv, torch.compile; peak memory"),
    Phase("components", 0.05, phase_components, ("timings.csv",),
          "channel gate and final gate alone: GB/s as a fraction of the measured copy bandwidth"),
    Phase("model", 0.15, phase_model, ("model.csv",),
          "YOLOv8n-sized detector, eval and train step, eager vs converted, share of time in the GAM blocks"),
    Phase("max_autotune", 0.0, phase_max_autotune, ("timings.csv",),
          "torch.compile max-autotune, whole block eval, only on time left over"),
    Phase("summary", 0.03, phase_summary, ("summary.md",), "geomeans, goals met or not", min_s=4.0),
]
assert abs(sum(p.share for p in PHASES) - 1.0) < 1e-9


# --- the run ---------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perf/gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, help="hard wall-clock budget in seconds (default 480; rehearsal 60)")
    p.add_argument("--out", help="output folder (default perf/results/<gpu name>/<date>/, rehearsal "
                                 "perf/results/cpu-rehearsal/<date>/)")
    p.add_argument("--rehearse", action="store_true",
                   help="every phase on the CPU: kernels in the interpreter, tiny shapes (not performance figures)")
    p.add_argument("--phases", help="comma-separated subset of the phases to run (the others: 'not selected'): "
                                    + ",".join(ph.name for ph in PHASES))
    p.add_argument("--fail-phase", action="append", metavar="NAME",
                   help="make phase NAME fail at its first check (tests that a failure is recorded); repeatable; "
                        "also GAM_GPU_CHECK_FAIL=a,b")
    p.add_argument("--cache-dir", help="GAM_TRITON_CACHE_DIR for the run (default: a fresh temporary folder, so the "
                                       "tuning starts cold as on a first run)")
    return p


def default_out(rehearse: bool, device_name: str) -> str:
    import common

    date = _dt.date.today().isoformat()
    root = os.path.join(PERF_DIR, "results", "cpu-rehearsal" if rehearse else common.sanitize(device_name))
    out, n = os.path.join(root, date), 2
    while os.path.exists(out) and os.listdir(out):
        out, n = os.path.join(root, f"{date}-{n}"), n + 1
    return out


def plan_states(budget: float, selected: set, start: float = 0.0, shares: Optional[dict] = None) -> list[PhaseState]:
    """The deadlines fixed up front: the usable budget (less a margin) left at ``start`` (seconds after the
    process started: imports) is shared out; phase i ends at most at the cumulative share of it. ``shares``
    (phase name -> share) replaces the phases' own."""
    share = {ph.name: ph.share for ph in PHASES} | (shares or {})
    assert abs(sum(share.values()) - 1.0) < 1e-9 and set(share) == {ph.name for ph in PHASES}, share
    usable = budget - FINAL_END_S
    span = max(0.0, usable - start)
    last = PHASES[-1]
    last_s = min(span, max(share[last.name] * span, last.min_s))
    scale = (span - last_s) / (1.0 - share[last.name])   # seconds per unit of share before the last phase
    cum, out = 0.0, []
    for ph in PHASES:
        planned = last_s if ph is last else share[ph.name] * scale
        cum += planned
        st = PhaseState(ph.name, share[ph.name], planned, start + cum, ph.what, ph.files)
        if ph.name not in selected:
            st.state = "not selected"
        out.append(st)
    return out


def _watchdog(ctx: Ctx) -> None:
    """At the budget: record the phase as cut short, kill a running pytest, end the process (exit 124); after the
    last phase (Python's own shutdown hanging), end it with the run's exit status."""
    if ctx.finished:
        os._exit(ctx.rc)
    with contextlib.suppress(Exception):
        if ctx.phase is not None and ctx.phase.state == "running":
            ctx.phase.state = "cut short"
            ctx.phase.note = "stopped by the budget watchdog"
            ctx.phase.ended_s = ctx.now()
        if ctx.child is not None and ctx.child.poll() is None:
            _kill_group(ctx.child)
        ctx.write_status(final=False, timeout=1.0)
        print(f"\ngpu_check: budget of {ctx.budget:.0f} s reached: stopped by the watchdog", flush=True)
    os._exit(124)


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    rehearse = args.rehearse
    budget = args.budget or DEFAULT_BUDGET_S["rehearsal" if rehearse else "gpu"]
    if budget <= 10:
        parser().error("--budget must be more than 10 s")
    selected = {ph.name for ph in PHASES}
    if args.phases:
        want = {p.strip() for p in args.phases.split(",") if p.strip()}
        bad = want - selected
        if bad:
            parser().error(f"unknown phase(s) {', '.join(sorted(bad))}: choose from "
                           f"{', '.join(ph.name for ph in PHASES)}")
        selected = want
    # Before gam_triton is imported: it reads the interpreter switch at import.
    if rehearse:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    import torch

    on_gpu = torch.cuda.is_available() and not rehearse
    if not rehearse and not on_gpu:
        print("gpu_check: no CUDA GPU visible to this Python; on a machine without a GPU run the rehearsal: "
              "python perf/gpu_check.py --rehearse --out DIR", file=sys.stderr)
        return 2
    if args.out and os.path.isdir(args.out) and set(os.listdir(args.out)) & set(FILES):
        print(f"gpu_check: {args.out} already holds a run ({', '.join(sorted(set(os.listdir(args.out)) & set(FILES)))})"
              ": give another --out (the default is a fresh folder)", file=sys.stderr)
        return 2
    # gam_triton reads its tuning cache folder at the first kernel call: a fresh one, so the tuning starts cold.
    own_cache = None if args.cache_dir else tempfile.mkdtemp(prefix="gam_gpu_check_cache_")
    os.environ["GAM_TRITON_CACHE_DIR"] = args.cache_dir or own_cache
    import common

    TIMING_COLUMNS[:] = _timing_columns()
    mach = common.machine()
    out = os.path.abspath(args.out or default_out(rehearse, mach.device))
    os.makedirs(out, exist_ok=True)
    extra = sorted(set(os.listdir(out)) - {f + ".tmp" for f in FILES})
    if extra:
        print(f"gpu_check: note: {out} already holds other files ({', '.join(extra[:5])}); the check adds its "
              f"{len(FILES)} files", file=sys.stderr)
    alarm = Alarm()
    ctx = Ctx(args, out, budget, rehearse, alarm)
    ctx.on_gpu, ctx.device, ctx.mach = on_gpu, "cuda" if on_gpu else "cpu", mach
    if rehearse:
        ctx.label = f"{REHEARSAL_LABEL} | torch {mach.torch} | triton {mach.triton} | {mach.date}"
    else:
        ctx.label = (f"gam_triton gpu-check on {mach.device} | torch {mach.torch} (CUDA {torch.version.cuda}) | "
                     f"triton {mach.triton} | {mach.date} | commit {mach.commit or '?'}")
    log = open(ctx.path("run.log"), "a")
    log.write(f"# {ctx.label}\n")
    log.flush()
    faulthandler.enable(file=log)   # a crash in native code leaves its Python stack in run.log
    import pandas  # noqa: F401  (imported now, not inside the summary's short slot)
    sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
    if on_gpu:
        torch.backends.cudnn.benchmark = True   # as the sweep and the YOLO trainers run; same for every provider
    else:
        # Rehearsal: oneDNN's first calls of each convolution shape took ~2 s here (4 calls of the detector before
        # it ran in 20 ms); PyTorch's own CPU convolutions do not warm up. CPU numbers are no figures anyway.
        torch.backends.mkldnn.enabled = False
    ctx.states = plan_states(budget, selected, ctx.now(), ctx.plan.shares)
    watchdog = threading.Timer(max(0.1, T0 + budget - WATCHDOG_S - time.monotonic()), _watchdog, args=(ctx,))
    watchdog.daemon = True
    watchdog.start()
    print(f"gpu_check: {ctx.label}\ngpu_check: budget {budget:.0f} s (started {ctx.now():.1f} s ago), out {out}")
    print("gpu_check: plan: " + ", ".join(f"{s.name} {s.share:.0%} (until {s.deadline_s:.0f} s)"
                                          for s in ctx.states if s.state != "not selected"), flush=True)
    ctx.write_status()
    failed = False
    for ph, st in zip(PHASES, ctx.states):
        if st.state == "not selected":
            continue
        ctx.phase = st
        ctx.deadline = T0 + st.deadline_s
        st.state, st.started_s = "running", ctx.now()
        ctx.write_status()
        print(f"\ngpu_check: === phase {ph.name} ({st.share:.0%}: {ctx.remaining():.0f} s until its deadline) "
              f"{ph.what}", flush=True)
        if ph is PHASES[-1]:   # the summary: no alarm (it is short); the watchdog still ends the run at the budget
            ctx.deadline = max(ctx.deadline, T0 + budget - FINAL_END_S)
        else:
            alarm.arm(ctx.deadline + ALARM_GRACE_S)
        try:
            ph.fn(ctx)
            if ph.name in ctx.fail:   # the phase made no check(): fail it now
                ctx.check()
            st.state = "cut short" if st.note.startswith("pytest cut short") else "done"
        except PhaseTimeout:
            alarm.disarm()
            st.state = "cut short"
            st.note = (st.note + "; " if st.note else "") + "deadline reached"
        except Exception as e:  # a failing phase is recorded and the next one runs
            alarm.disarm()
            st.state, st.error = "failed", _one_line(e)
            failed = True
            print(f"gpu_check: phase {ph.name} FAILED: {st.error}\n{traceback.format_exc()}", flush=True)
        finally:
            alarm.disarm()
        st.ended_s = ctx.now()
        if st.skipped and st.state == "done":
            st.state = "done (items skipped for time)"
        print(f"gpu_check: phase {ph.name}: {st.state} in {st.ended_s - st.started_s:.1f} s", flush=True)
        ctx.write_status()
        if ph.name != "summary":
            try:  # a provisional summary after every phase: a kill leaves one
                write_text(ctx.path("summary.md"), build_summary(ctx, final=False), alarm)
            except Exception as e:
                print(f"gpu_check: provisional summary failed: {_one_line(e)}", flush=True)
    ctx.finished = True
    ctx.phase = None
    ctx.write_status(final=True)
    tests_failed = any(r["failed"] or r["errors"] for r in ctx.results.get("correctness", []))
    ctx.rc = 1 if failed or tests_failed else 0
    print(f"\ngpu_check: finished in {ctx.now():.1f} s of {budget:.0f} s; files in {out}: "
          f"{', '.join(sorted(f for f in os.listdir(out) if f in FILES))}", flush=True)
    if ctx.rehearse:
        print(f"gpu_check: {REHEARSAL_LABEL}")
    sys.stdout.flush()
    if own_cache:
        shutil.rmtree(own_cache, ignore_errors=True)
    return ctx.rc


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return run(argv)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
