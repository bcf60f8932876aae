"""``gam-yolo ARGS`` (or ``python -m gam_triton.yolo ARGS``): ultralytics' own command line, ``yolo ARGS``, running
gam_triton blocks (:mod:`gam_triton.ultralytics`).

``yolo train model=yolov8n-gam.yaml`` stops at ``KeyError: 'GAM_Attention'`` in a stock ultralytics: nothing has
imported the module that defines the name. ``gam-yolo train model=yolov8n-gam.yaml data=coco8.yaml`` registers the
GAM yaml names first, and every YOLO model the command builds is accelerated
(:func:`gam_triton.ultralytics.accelerate`): a fork's own GAM class runs as gam_triton blocks through training (DDP
workers too), validation, prediction and export, its checkpoints keeping the fork's class. Every argument is
ultralytics', passed on untouched. Checkpoints of registered blocks need no wrapper afterwards (unpickling one
imports the registration). Needs the ``[ultralytics]`` extra.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

try:
    import ultralytics
    from ultralytics.cfg import entrypoint
except ImportError as e:  # the [ultralytics] extra is not installed: main() says so
    ultralytics, entrypoint, _MISSING = None, None, e
else:
    from .ultralytics import accelerate  # registers GAM_Attention, GAMAttention and GAM on import

    class YOLO(ultralytics.YOLO):
        """ultralytics' ``YOLO``, accelerated (:func:`gam_triton.ultralytics.accelerate`) as it is built: what
        ``ultralytics.YOLO`` is while :func:`main` runs the CLI."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            accelerate(self)

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ultralytics' CLI on ``argv`` (default: the command line), the GAM yaml names registered and the YOLO
    models it builds accelerated."""
    if argv is not None and (isinstance(argv, (str, bytes)) or not all(isinstance(a, str) for a in argv)):
        raise TypeError(f"main expects a list of argument strings such as ['train', 'model=m.yaml'], got {argv!r}")
    if entrypoint is None:
        raise SystemExit(f"gam-yolo needs ultralytics: pip install 'gam_triton[ultralytics]' ({_MISSING})")
    if argv is not None:
        sys.argv[1:] = list(argv)  # ultralytics' entrypoint reads sys.argv
    stock = ultralytics.YOLO
    ultralytics.YOLO = YOLO  # the entrypoint imports YOLO from the package when it runs
    try:
        entrypoint()
    finally:
        ultralytics.YOLO = stock


if __name__ == "__main__":
    main()
