"""``gam-yolo ARGS`` (or ``python -m gam_triton.yolo ARGS``): ultralytics' own command line, ``yolo ARGS``, with
gam_triton's GAM yaml names registered first (:mod:`gam_triton.ultralytics`).

``yolo train model=yolov8n-gam.yaml`` stops at ``KeyError: 'GAM_Attention'`` in a stock ultralytics: nothing has
imported the module that defines the name. ``gam-yolo train model=yolov8n-gam.yaml data=coco8.yaml`` builds,
trains (DDP workers too), validates and exports gam_triton blocks; every argument is ultralytics', passed on
untouched. Checkpoints of these blocks need no wrapper afterwards: unpickling one imports the registration, so
``yolo val model=best.pt`` works as well. Needs the ``[ultralytics]`` extra.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

try:
    from ultralytics.cfg import entrypoint
except ImportError as e:  # the [ultralytics] extra is not installed: main() says so
    entrypoint, _MISSING = None, e
else:
    from . import ultralytics as _registration  # noqa: F401 - registers GAM_Attention, GAMAttention and GAM

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ultralytics' CLI on ``argv`` (default: the command line), the GAM yaml names registered."""
    if entrypoint is None:
        raise SystemExit(f"gam-yolo needs ultralytics: pip install 'gam_triton[ultralytics]' ({_MISSING})")
    if argv is not None:
        sys.argv[1:] = list(argv)  # ultralytics' entrypoint reads sys.argv
    entrypoint()


if __name__ == "__main__":
    main()
