"""Perf sweep: gam_triton against eager PyTorch and torch.compile, written as CSV and drawn as PNGs.

    python perf/sweep.py                 # GPU: the full sweep; no GPU: the quick CPU sweep
    python perf/sweep.py --quick         # a small subset (any machine)
    python perf/sweep.py --out DIR --dtypes bf16 --modes forward --providers eager,gam_triton

Reads: nothing but an existing ``DIR/results.csv`` (rows already measured there are skipped, so an
interrupted sweep resumes). Writes into ``--out`` (default ``perf/results/<gpu name>/``, or
``perf/results/cpu/`` without a GPU): ``results.csv`` (one row per measurement, appended as it is
measured), ``env.json`` (machine, versions, date, arguments), the PNGs of ``plot.py`` and
``summary.md`` (geomean speedups and the GPU goals).

Rows: the whole GAM block (YOLO form) in ``forward`` (eval, no grad) and ``train`` (forward + backward)
modes, and the two fused components (channel gate, final gate) in forward mode, for every shape, dtype
and provider. Compile, JIT and autotuning time is the untimed first call, reported as ``compile_s``.
The providers of one shape are then timed together in interleaved rounds (:func:`measure_group`): the
speedups are medians of per-round ratios, and a row whose rounds disagree is flagged ``noisy``.
Without a GPU, every figure is a CPU figure (``note`` column) and says nothing about GPU performance.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
import results  # noqa: E402
from common import DTYPES, KINDS, MODES, PROVIDERS, Machine, Shape  # noqa: E402


# --- command line ----------------------------------------------------------------------------------------
def _list_of(choices: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}: choose from "
                                             f"{', '.join(choices)} (comma-separated)")
        return list(dict.fromkeys(items))
    return parse


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return values[0]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perf/sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small subset (the default without a GPU)")
    size.add_argument("--full", action="store_true", help="every shape (the default on a GPU)")
    p.add_argument("--out", help="output folder (default perf/results/<gpu name>/ or perf/results/cpu/)")
    p.add_argument("--dtypes", type=_list_of(list(DTYPES), "dtype"),
                   help="default bf16,fp16,fp32 on a GPU, fp32 on the CPU")
    p.add_argument("--modes", type=_list_of(MODES, "mode"), default=list(MODES))
    p.add_argument("--kinds", type=_list_of(KINDS, "kind"), default=list(KINDS),
                   help="gam (whole block), channel_gate, final_gate (components, forward only)")
    p.add_argument("--providers", type=_list_of(PROVIDERS, "provider"),
                   help="default: all on a GPU; eager,compile,gam_triton on the CPU")
    p.add_argument("--batches", type=_positive_ints, help="override the batch sizes, e.g. 1,16")
    p.add_argument("--channels", type=_positive_ints, help="override the channel widths (with --sizes)")
    p.add_argument("--sizes", type=_positive_ints, help="override the square map sizes (with --channels)")
    p.add_argument("--group", choices=["both", "grouped", "plain"], default="both",
                   help="grouped 7x7 convolutions, plain ones, or both (default)")
    p.add_argument("--rate", type=_positive_ints, default=[4], help="reduction rate (default 4)")
    p.add_argument("--budget-s", type=_positive_float, default=0.5,
                   help="CPU only: seconds of repetitions per row (default 0.5)")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU only: torch.set_num_threads (default: torch's; 1 is steadier on a busy machine)")
    p.add_argument("--retry-errors", action="store_true", help="measure again the rows that failed")
    p.add_argument("--no-plot", action="store_true", help="write the CSV only")
    p.add_argument("--dry-run", action="store_true", help="print the rows that would be measured and stop")
    return p


# --- the plan ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    kind: str
    shape: Shape
    dtype: str
    mode: str
    provider: str

    def key_fields(self, mach: Machine) -> dict:
        s = self.shape
        return dict(device=mach.device, torch=mach.torch, triton=mach.triton, dtype=self.dtype,
                    mode=self.mode, kind=self.kind, batch=s.batch, channels=s.channels, height=s.height,
                    width=s.width, rate=s.rate, group=str(s.group) if self.kind == "gam" else "",
                    provider=self.provider)

    def label(self) -> str:
        s = self.shape
        shape = s.label() if self.kind == "gam" else s.label()[:-2]
        return f"{self.dtype} {self.mode:<7} {self.kind:<12} {shape:<22} {self.provider:<20}"


def shapes_for(args, on_gpu: bool) -> list[Shape]:
    quick = args.quick or (not on_gpu and not args.full)
    if quick:
        pairs = common.QUICK_GPU_PAIRS if on_gpu else common.QUICK_CPU_PAIRS
        batches = common.QUICK_GPU_BATCHES if on_gpu else common.QUICK_CPU_BATCHES
    else:
        pairs, batches = common.yolo_pairs(), common.FULL_BATCHES
    if args.channels or args.sizes:
        if not (args.channels and args.sizes):
            raise SystemExit("perf/sweep.py: error: --channels and --sizes go together")
        pairs = [(c, s) for s in args.sizes for c in args.channels]
    batches = args.batches or batches
    groups = {"both": (True, False), "grouped": (True,), "plain": (False,)}[args.group]
    out = []
    for rate in args.rate:
        for c, s in pairs:
            for b in batches:
                for g in groups:
                    try:
                        out.append(Shape(b, c, s, s, rate, g))
                    except ValueError as e:
                        raise SystemExit(f"perf/sweep.py: error: {e}") from None
    return out


def plan(args, on_gpu: bool) -> list[Spec]:
    """Every row to measure, the providers of one shape next to each other.

    By default ``compile-max-autotune`` (GPU) runs on the whole block in forward mode only, where the
    goal compares against it: it tunes every shape anew, so everywhere it would take the sweep from
    hours to a day. Naming it in ``--providers`` puts it on every row.
    """
    quick = args.quick or (not on_gpu and not args.full)
    dtypes = args.dtypes or (["bf16"] if on_gpu and quick else ["bf16", "fp16", "fp32"] if on_gpu else ["fp32"])
    providers = args.providers or (list(PROVIDERS) if on_gpu else ["eager", "compile", "gam_triton"])
    shapes = shapes_for(args, on_gpu)

    def wanted(kind: str, mode: str) -> list[str]:
        if kind != "gam" or mode != "forward":  # eval-only providers: the whole block in forward mode
            return [p for p in wanted_all(kind, mode) if p not in common.EVAL_ONLY_PROVIDERS]
        return wanted_all(kind, mode)

    def wanted_all(kind: str, mode: str) -> list[str]:
        if args.providers or (kind == "gam" and mode == "forward"):
            return providers
        return [p for p in providers if p != "compile-max-autotune"]

    specs = []
    for dtype in dtypes:
        for mode in args.modes:
            if "gam" in args.kinds:
                specs += [Spec("gam", s, dtype, mode, p) for s in shapes for p in wanted("gam", mode)]
            if mode != "forward":
                continue
            plain = list(dict.fromkeys(Shape(s.batch, s.channels, s.height, s.width, s.rate, False)
                                       for s in shapes))
            for kind in ("channel_gate", "final_gate"):
                if kind in args.kinds:
                    specs += [Spec(kind, s, dtype, "forward", p) for s in plain for p in wanted(kind, mode)]
    return specs


# --- measuring the providers of one shape ------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("\r", " ")
    return text[:300]


def group_specs(specs: Sequence[Spec]) -> list[list[Spec]]:
    """The specs of one (kind, shape, dtype, mode) together, in plan order: they are measured in rounds."""
    groups: dict = {}
    for s in specs:
        groups.setdefault((s.kind, s.shape, s.dtype, s.mode), []).append(s)
    return list(groups.values())


def measure_group(specs: Sequence[Spec], mach: Machine, copy_gbps: float, budget_s: float) -> list[dict]:
    """Build every provider of one shape, run each once untimed (compile_s), time them interleaved in
    rounds (:func:`common.bench_interleaved`) and return their CSV rows (in ``specs`` order); a provider
    that fails gets its ``error`` and the others go on.

    Beyond the times: ``rounds``; ``vs_eager`` (and p20 / p80) and ``vs_compile``, the medians of the
    per-round ratios ms(eager) / ms(row) and ms(compile) / ms(row), so that a neighbour slowing a whole
    round cancels out; ``spread``, p80 / p20 across rounds of the ratio to eager (of the time itself for
    eager, or without an eager row); ``noisy`` when spread > ``common.NOISY_SPREAD``.
    """
    import torch._dynamo

    from cases import build_case

    device = "cuda" if mach.is_gpu else "cpu"
    mode = specs[0].mode
    grad = torch.no_grad() if mode == "forward" else contextlib.nullcontext()
    rows = {s.provider: dict(s.key_fields(mach), note=mach.note, date=mach.date, copy_gbps=copy_gbps)
            for s in specs}
    cases: dict = {}
    torch._dynamo.reset()  # once per shape: the compile providers of this shape stay compiled while timed
    try:
        with grad:
            for s in specs:
                try:
                    case = build_case(s.kind, s.shape, DTYPES[s.dtype], s.mode, s.provider, device,
                                      reset_dynamo=False)
                    rows[s.provider]["compile_s"] = common.timed_first_call(case.step, mach.is_gpu)
                    cases[s.provider] = case
                except Exception as e:  # one provider failing (compile error, OOM) must not stop the sweep
                    rows[s.provider]["error"] = _one_line(e)
            if cases:
                try:
                    res = common.bench_interleaved({p: (c.step, c.grads) for p, c in cases.items()}, mach.is_gpu,
                                                   budget_s=budget_s)
                except Exception as e:
                    for p in cases:
                        rows[p]["error"] = _one_line(e)
                    res = None
                if res is not None:
                    for p, case in cases.items():
                        common.fill_row(rows[p], p, case, res, copy_gbps)
                    if mach.is_gpu:
                        for p, case in cases.items():
                            try:
                                rows[p]["peak_mem_mb"] = common.peak_memory_mb(case.step, case.grads)
                            except Exception as e:
                                rows[p]["error"] = _one_line(e)
    finally:
        cases.clear()
        gc.collect()
        if mach.is_gpu:
            torch.cuda.empty_cache()
    return [rows[s.provider] for s in specs]


# --- the run -----------------------------------------------------------------------------------------------
def _configure(on_gpu: bool, threads: Optional[int]) -> None:
    if threads and not on_gpu:
        torch.set_num_threads(threads)
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # as the YOLO trainers run; the same for every provider
    else:
        # Inductor's background compile workers would compete with the timed calls for 2-4 cores.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1


def _result_text(row: dict) -> str:
    if row.get("error"):
        return f"FAILED  {row['error'][:120]}"
    text = f"{row['ms']:9.3f} ms"
    vs = row.get("vs_eager")
    if vs is not None and vs == vs:
        text += f"  x{vs:.2f} vs eager ({row['vs_eager_p20']:.2f}-{row['vs_eager_p80']:.2f})"
    if row.get("noisy") == "True":
        text += f"  NOISY (spread x{row['spread']:.2f})"
    return text + f"  (first call {row.get('compile_s', 0.0):.1f} s)"


def run(argv: Optional[Sequence[str]] = None) -> str:
    """Run the sweep; return the path of results.csv."""
    args = parser().parse_args(argv)
    mach = common.machine()
    _configure(mach.is_gpu, args.threads)
    out = args.out or mach.results_dir
    specs = plan(args, mach.is_gpu)
    csv_path = os.path.join(out, "results.csv")
    done = results.done_keys(csv_path, args.retry_errors)
    todo = [s for s in specs if results.row_key(s.key_fields(mach)) not in done]

    print(f"perf sweep on {mach.device} | torch {mach.torch} | triton {mach.triton} | {mach.date}")
    if mach.note:
        print(f"NOTE: {mach.note}.")
    print(f"{len(specs)} rows planned, {len(specs) - len(todo)} already in {csv_path}, {len(todo)} to measure")
    if args.dry_run:
        for s in todo:
            print("  " + s.label())
        return csv_path

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump({**mach.as_dict(), "argv": list(argv if argv is not None else sys.argv[1:])}, f, indent=2)

    copy_gbps = common.copy_bandwidth_gbps(mach.is_gpu) if todo else 0.0
    if todo:
        print(f"copy bandwidth (read + write): {copy_gbps:.1f} GB/s")
        print("providers of a shape are timed in interleaved rounds; 'vs eager' is the median of the per-round "
              f"ratios (p20-p80); NOISY: rounds disagree by more than x{common.NOISY_SPREAD}")
    todo_keys = {results.row_key(s.key_fields(mach)) for s in todo}
    start = time.perf_counter()
    i = noisy = 0
    width = len(str(len(todo)))
    with results.RowWriter(csv_path) as writer:
        # A shape with any row to measure is measured with all its planned providers (those already in the
        # CSV are timed again as references for the ratios, not written twice).
        todo_shapes = {(t.kind, t.shape, t.dtype, t.mode) for t in todo}
        for group in group_specs([s for s in specs if (s.kind, s.shape, s.dtype, s.mode) in todo_shapes]):
            for spec, row in zip(group, measure_group(group, mach, copy_gbps, args.budget_s)):
                if results.row_key(spec.key_fields(mach)) not in todo_keys:
                    continue
                writer.write(row)
                i += 1
                noisy += row.get("noisy") == "True"
                elapsed = time.perf_counter() - start
                eta = elapsed / i * (len(todo) - i)
                print(f"[{i:>{width}}/{len(todo)}] {spec.label()} {_result_text(row)}   "
                      f"[{elapsed:.0f} s, ~{eta:.0f} s left]", flush=True)
    if noisy:
        print(f"{noisy} row(s) flagged NOISY: the machine was busy; their ratios are not readable. Rerun them "
              "(e.g. into a fresh --out) on a quieter machine, or with --threads 1.")

    if not args.no_plot:
        import plot

        pngs = plot.plot_csv(csv_path, out)
        print(f"{len(pngs)} figure(s) in {out}")
    import summary

    text = summary.summarize(results.load(csv_path))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    if mach.note:
        print(f"NOTE: {mach.note}.")
    return csv_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(argv)
    except BrokenPipeError:  # output piped into `head`: stop quietly
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
