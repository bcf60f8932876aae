"""Pre-tuning command: fill the tuning cache ahead of training or serving.

    python -m gam_triton.tune --channels 128 256 512 --sizes 80 40 20 --batch 16 \\
        --dtype bf16 --layout channels_last --rate 4 [--group | --groups G] [--no-sigmoid] [--shuffle 4] [--train]

For every channel count, size (``80`` or ``80x64``), batch, dtype and layout it builds a
:class:`gam_triton.GAM` of that form and runs it on random input: an eval-mode forward (channel gate and
final gate), and with ``--train`` also a train-mode forward + backward (adds the training kernels:
BatchNorm-ReLU, the BatchNorm reductions, the channel-gate backward; the reductions keep their heuristic
tiles). Each kernel launch met with a new shape key tunes it (or reads it from the cache), exactly as in the real run;
``--amp`` runs an fp32 module under ``torch.autocast(dtype)`` instead of converting it. One line per shape
shows the time taken and, per kernel, the config chosen and where it came from.

Without a GPU: under ``TRITON_INTERPRET=1`` it runs on the CPU through the interpreter and fills the cache
with the heuristic configs (no timing is possible there; useful to check the machinery); otherwise it
refuses with exit status 2. With ``GAM_TRITON_AUTOTUNE=0`` there is nothing to do: it exits with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from typing import Optional, Sequence

import torch

from .module import GAM
from .ops._runtime import HAS_TRITON, INTERPRET

if HAS_TRITON:
    from .ops import _autotune

__all__ = ["main", "parse_args"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_LAYOUTS = {"nchw": False, "contiguous": False, "channels_last": True, "nhwc": True}


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected a size like 80 or 80x64, got {text!r}")
    h, w = (_positive(p) for p in (parts * 2)[:2])
    return h, w


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gam_triton.tune",
        description="Tune gam_triton's kernels for the given shapes and store the results in the cache "
                    "($GAM_TRITON_CACHE_DIR, default ~/.cache/gam_triton), so that training starts tuned.")
    p.add_argument("--channels", type=_positive, nargs="+", required=True, help="channel counts C")
    p.add_argument("--sizes", type=_size, nargs="+", required=True,
                   help="feature-map sizes: 80 (80x80) or 80x64 (H x W)")
    p.add_argument("--batch", type=_positive, nargs="+", default=[16], help="batch sizes (default 16)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), nargs="+", default=["fp32"], metavar="DTYPE",
                   help="dtypes of module and input: fp32 (default), fp16, bf16")
    p.add_argument("--layout", choices=sorted(_LAYOUTS), nargs="+", default=["nchw"], metavar="LAYOUT",
                   help="input memory layouts: nchw (default), channels_last")
    p.add_argument("--rate", type=_positive, default=4, help="reduction rate r (default 4)")
    p.add_argument("--group", action="store_true", help="grouped convolutions, groups = rate (the YOLO form)")
    p.add_argument("--groups", type=_positive, metavar="G",
                   help="the convolutions' group count when it is not the rate (e.g. 4 with --rate 8)")
    p.add_argument("--sigmoid", action=argparse.BooleanOptionalAction, default=True,
                   help="sigmoid on the channel branch (paper: yes; YOLO and seed forms: --no-sigmoid)")
    p.add_argument("--shuffle", type=int, default=0, metavar="G",
                   help="channel shuffle groups of the spatial map (the YOLO form uses 4; 0: none)")
    p.add_argument("--train", action="store_true",
                   help="also run a train-mode forward and backward (tunes the training kernels too)")
    p.add_argument("--amp", action="store_true",
                   help="fp32 module under torch.autocast(--dtype) instead of a module in --dtype")
    p.add_argument("--cache-dir", help="cache directory (sets GAM_TRITON_CACHE_DIR for this run)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the arguments (argparse errors, exit status 2, for anything invalid)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.shuffle < 0:
        parser.error(f"--shuffle must be >= 0, got {args.shuffle}")
    if args.amp and all(_DTYPES[d] == torch.float32 for d in args.dtype):
        parser.error("--amp needs --dtype fp16 or bf16")
    for c in args.channels:  # let GAM's own checks reject impossible forms before anything runs
        try:
            _gam(args, c)
        except (TypeError, ValueError) as e:
            parser.error(str(e))
    return args


def _gam(args, c: int) -> GAM:
    return GAM(c, rate=args.rate, group=args.group or None, groups=args.groups, channel_sigmoid=args.sigmoid,
               shuffle_groups=args.shuffle or None)


def _describe(records) -> str:
    parts = []
    for r in records:
        s = f"{r.op} {_autotune.describe(r.choice)} ({r.source}"
        if r.source == "tuned" and r.tune_s is not None:
            s += f", {r.candidates} cfgs in {r.tune_s:.2f} s"
            if r.speedup:
                s += f", {r.speedup:.2f}x vs heuristic"
        parts.append(s + ")")
    return "; ".join(parts) if parts else "all kernels already resolved (same bucket as an earlier shape)"


def _run_shape(c, hw, b, dtype, channels_last, args, device) -> None:
    gam = _gam(args, c).to(device)
    if not args.amp:
        gam = gam.to(dtype)
    x = torch.randn(b, c, *hw, device=device, dtype=torch.float32 if args.amp else dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, dtype=dtype) if args.amp else contextlib.nullcontext()
    with amp:
        with torch.no_grad():
            gam.eval()(x)
        if args.train:
            gam.train()(x.requires_grad_()).float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status."""
    args = parse_args(argv)
    if args.cache_dir:
        os.environ["GAM_TRITON_CACHE_DIR"] = args.cache_dir
    if not HAS_TRITON:
        print("gam_triton.tune: Triton is not installed: nothing to tune", file=sys.stderr)
        return 2
    _autotune.reset()  # pick up --cache-dir and the environment as they are now
    if not _autotune.enabled():
        print("gam_triton.tune: autotuning is off (GAM_TRITON_AUTOTUNE=0): nothing to tune", file=sys.stderr)
        return 2
    if torch.cuda.is_available() and not INTERPRET:
        device = torch.device("cuda")
        print(f"gam_triton.tune: tuning on {torch.cuda.get_device_name()}")
    elif INTERPRET:
        device = torch.device("cpu")
        print("gam_triton.tune: no GPU in use (TRITON_INTERPRET=1): filling the cache with the heuristic "
              "configs through the interpreter; nothing is timed (tuning needs a GPU)")
    else:
        print("gam_triton.tune: no CUDA GPU: nothing to tune. Run it on the GPU that will train, or set "
              "TRITON_INTERPRET=1 to exercise the cache with heuristic configs on the CPU.", file=sys.stderr)
        return 2
    print(f"gam_triton.tune: cache file {_autotune.cache_file()}")
    shapes = list(itertools.product(args.channels, args.sizes, args.batch, args.dtype, args.layout))
    t_all = time.perf_counter()
    _autotune.drain_log()
    tuned = []
    for i, (c, hw, b, dname, layout) in enumerate(shapes, 1):
        t0 = time.perf_counter()
        _run_shape(c, hw, b, _DTYPES[dname], _LAYOUTS[layout], args, device)
        dt = time.perf_counter() - t0
        records = _autotune.drain_log()
        tuned += [r for r in records if r.source == "tuned"]
        amp = " amp" if args.amp else ""
        print(f"[{i}/{len(shapes)}] C={c} r={args.rate} {hw[0]}x{hw[1]} B={b} {dname}{amp} {layout}: "
              f"{dt:.2f} s; {_describe(records)}", flush=True)
    print(f"gam_triton.tune: {len(shapes)} shape(s) in {time.perf_counter() - t_all:.1f} s; "
          f"cache {_autotune.cache_file()}")
    if tuned:
        print(_table(tuned))
    return 0


def _table(records) -> str:
    """The tuned keys as a markdown table: chosen config, heuristic and tuned times, gain, tuning time."""
    rows = ["| kernel | key | tuned config | heuristic ms | tuned ms | gain | tuning s | configs |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        h = f"{r.heuristic_ms:.4f}" if r.heuristic_ms else "-"
        t = f"{r.ms:.4f}" if r.ms else "-"
        g = f"{r.speedup:.2f}x" if r.speedup else "-"
        rows.append(f"| {r.op} | `{r.key}` | {_autotune.describe(r.choice)} | {h} | {t} | {g} | {r.tune_s or 0:.2f} | "
                    f"{r.candidates} ({r.failed} failed) |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
