"""What the ultralytics tests build: a YOLOv8 yaml with GAM rows, a tiny synthetic detection data set, the
offline settings, and the arguments of a one-epoch CPU training."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

# Before ultralytics is imported: no downloads or update checks, and its settings file and DDP launch files in a
# folder of this test session, not the user's ~/.config/Ultralytics.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="gam_triton_ultralytics_"))

#: YOLOv8 with three GAM rows: after SPPF (layer 10), after the P3 C2f (17) and after the P4 C2f (21); the
#: other rows are ultralytics' yolov8.yaml with the indices moved. ``{gam10}`` etc. are the module and args.
_YAML = """\
nc: 2
scales:
  n: [0.33, 0.25, 1024]
  s: [0.33, 0.50, 1024]
backbone:
  - [-1, 1, Conv, [64, 3, 2]]
  - [-1, 1, Conv, [128, 3, 2]]
  - [-1, 3, C2f, [128, True]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [-1, 6, C2f, [256, True]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [-1, 6, C2f, [512, True]]
  - [-1, 1, Conv, [1024, 3, 2]]
  - [-1, 3, C2f, [1024, True]]
  - [-1, 1, SPPF, [1024, 5]]
  - {gam10}
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 6], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 4], 1, Concat, [1]]
  - [-1, 3, C2f, [256]]
  - {gam17}
  - [-1, 1, Conv, [256, 3, 2]]
  - [[-1, 13], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - {gam21}
  - [-1, 1, Conv, [512, 3, 2]]
  - [[-1, 10], 1, Concat, [1]]
  - [-1, 3, C2f, [1024]]
  - [[17, 21, 24], 1, Detect, [nc]]
"""

#: The registration route's rows: the three names and the three argument lists forks use.
REGISTERED = {"gam10": "[-1, 1, GAM_Attention, [1024, 1024]]", "gam17": "[-1, 1, GAMAttention, []]",
              "gam21": "[-1, 1, GAM, [512, 512, True, 4]]"}
#: The GAM layers and their channel counts at scales n and s.
GAM_LAYERS = {"n": {10: 256, 17: 64, 21: 128}, "s": {10: 512, 17: 128, 21: 256}}
#: A fork's rows: its own GAM_Attention gets the yaml's numbers literally, written for scale n.
FORK = {"gam10": "[-1, 1, GAM_Attention, [256, 256]]", "gam17": "[-1, 1, GAM_Attention, [64, 64]]",
        "gam21": "[-1, 1, GAM_Attention, [128, 128, True, 4]]"}


def model_yaml(folder: Path, scale: str = "n", rows: dict = REGISTERED, name: str = "gam") -> Path:
    """Write ``yolov8{scale}-{name}.yaml`` (ultralytics reads the scale from the file name) and return it."""
    path = Path(folder) / f"yolov8{scale}-{name}.yaml"
    path.write_text(_YAML.format(**rows))
    return path


def dataset(folder: Path, n_images: int = 4, size: int = 64, seed: int = 0) -> Path:
    """A detection data set of ``n_images`` random ``size`` x ``size`` images, each with one to three random
    boxes of two classes, used for train and val; returns its data yaml."""
    import cv2  # an ultralytics dependency (opencv-python)

    rng = np.random.default_rng(seed)
    root = Path(folder) / "data"
    for sub in ("images/train", "labels/train"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k in range(n_images):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        rows = []
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.uniform(0.2, 0.6, 2)
            cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
            cls = int(rng.integers(0, 2))
            x0, y0, x1, y1 = (int(v * size) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
            img[y0:y1, x0:x1] = (255, 0, 0) if cls else (0, 255, 0)  # something learnable inside each box
            rows.append(f"{cls} {cx:.4f} {cy:.4f} {w:.4f} {h:.4f}")
        cv2.imwrite(str(root / "images/train" / f"im{k}.png"), img)
        (root / "labels/train" / f"im{k}.txt").write_text("\n".join(rows) + "\n")
    data = Path(folder) / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames:\n  0: a\n  1: b\n")
    return data


def train_args(folder: Path, data: Path, name: str, **kw) -> dict:
    """One epoch on the CPU at 64 x 64, small batches, no plots, no worker processes, no AMP check."""
    args = dict(data=str(data), epochs=1, imgsz=64, batch=2, workers=0, device="cpu", plots=False, amp=False,
                project=str(folder), name=name, exist_ok=True, verbose=False, seed=0, deterministic=True,
                mosaic=0.0, warmup_epochs=0)
    args.update(kw)
    return args
