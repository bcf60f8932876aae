"""Writes notebooks/explore.ipynb (run it after editing the cells here: python notebooks/make_explore.py).

The notebook is executed by tests/test_notebook.py, so every cell must run on a CPU-only machine
under TRITON_INTERPRET=1 in a few seconds (the quick CPU sweep of section 5: 10-20 s). Every figure is one
call of perf/report.py: keep the logic there, not in the cells. Committed without outputs.
"""
from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# Exploring gam_triton\n\n"
        "Swap a GAM block for gam_triton's, check it computes the same thing, then look, in pictures, at "
        "where eager's bytes and launches go, where each kernel sits under the GPU roofs, how fast it is "
        "against eager and torch.compile, which tile each shape gets and what the block computes.\n\n"
        "On a GPU the channel gate and the final gate are fused Triton kernels. On a CPU-only machine "
        "with `TRITON_INTERPRET=1` the same kernels run in Triton's interpreter (correct, slow); without "
        "it a PyTorch path runs. Every figure says where its numbers come from, as the sweep does: "
        "**computed** (traffic model), **CPU figures** (never GPU performance), **interpreter** (never a "
        "performance figure) or **GPU** (the card is named). The figures are drawn by `perf/report.py`."),
    nbf.v4.new_code_cell(
        "%matplotlib inline\n"
        "import sys\n"
        "import tempfile\n"
        "from pathlib import Path\n"
        "import torch\n"
        "import gam_triton\n"
        "from gam_triton.reference import YoloGAM\n"
        "from gam_triton.ops._runtime import INTERPRET, use_triton\n"
        "root = Path.cwd().parent if Path.cwd().name == 'notebooks' else Path.cwd()\n"
        "sys.path.insert(0, str(root / 'perf'))\n"
        "import report  # noqa: E402 - perf/ is put on the path just above\n"
        "from bench import Shape  # noqa: E402\n"
        "device = 'cuda' if torch.cuda.is_available() and not INTERPRET else 'cpu'\n"
        "print('device:', device, '| interpreter:', INTERPRET, '| torch', torch.__version__)"),
    nbf.v4.new_markdown_cell(
        "## 1. Convert an existing block\n"
        "`GAM.from_module` reads the weights and finds the form (YOLO: identity channel gate, shuffled "
        "spatial map; paper: sigmoid gates) by running a randomised float64 copy of the source."),
    nbf.v4.new_code_cell(
        "torch.manual_seed(0)\n"
        "old = YoloGAM(32, 32, group=True).to(device).eval()\n"
        "new = gam_triton.GAM.from_module(old)\n"
        "print(new)\n"
        "x = torch.randn(2, 32, 10, 12, device=device)\n"
        "with torch.no_grad():\n"
        "    err = (new(x) - old(x)).abs().max().item()\n"
        "print('max |gam_triton - reference| =', err)\n"
        "assert err < 1e-4\n"
        "print('Triton kernels used for this input:', use_triton(x))"),
    nbf.v4.new_markdown_cell("## 2. Layouts and dtypes\nchannels_last inputs are read in place (no permute copies), "
                             "and the output keeps the input's layout."),
    nbf.v4.new_code_cell(
        "xc = x.contiguous(memory_format=torch.channels_last)\n"
        "with torch.no_grad():\n"
        "    out = new(xc)\n"
        "print('output channels_last:', out.is_contiguous(memory_format=torch.channels_last))\n"
        "half = torch.float16\n"
        "with torch.no_grad():\n"
        "    err16 = (new.to(half)(x.to(half)).float() - old(x)).abs().max().item()\n"
        "new.float()\n"
        "print('fp16 max error:', err16)"),
    nbf.v4.new_markdown_cell("## 3. Training\nTrain mode uses batch statistics and updates the running ones "
                             "exactly like `nn.BatchNorm2d`; gradients match the reference."),
    nbf.v4.new_code_cell(
        "old.train(); new.train()\n"
        "xt = torch.randn(2, 32, 6, 6, device=device)\n"
        "old(xt).square().mean().backward(); new(xt).square().mean().backward()\n"
        "g_old = old.channel_attention[0].weight.grad\n"
        "g_new = new.channel_attention[0].weight.grad\n"
        "print('grad error:', (g_new - g_old).abs().max().item())\n"
        "print('running means agree:', torch.allclose(old.spatial_attention[1].running_mean,\n"
        "                                             new.spatial_attention[1].running_mean, atol=1e-5))"),
    nbf.v4.new_markdown_cell(
        "## 4. Where eager's bytes and launches go\n"
        "Pick a shape (YOLO at 640: P3 80x80 with C = 64..320, P4 40x40 with 128..640, P5 20x20 with "
        "256..1024; batch 16 in training) and a dtype; the figures below use them. The bars are counted by "
        "`perf/traffic.py` on meta tensors: compulsory bytes per op, computed, not measured."),
    nbf.v4.new_code_cell("shape = Shape(batch=16, channels=256, height=40, width=40, rate=4, group=True)\n"
                         "dtype = 'bf16'"),
    nbf.v4.new_code_cell("report.traffic_figure(shape, dtype)"),
    nbf.v4.new_markdown_cell(
        "## 5. Roofline\n"
        "Each kernel and the whole block by arithmetic intensity under the H100 and H200 ceilings "
        "(GAM_NOTES), with the measured points of the newest committed GPU results on top; without GPU "
        "results a tiny CPU sweep runs here (CPU figures; under the interpreter gam_triton's points are "
        "interpreter times, not performance)."),
    nbf.v4.new_code_cell("csv = report.results_or_quick_sweep(tempfile.mkdtemp(prefix='gam_sweep_'))\n"
                         "print('results:', csv)\n"
                         "report.roofline_figure([shape], dtype, csv)"),
    nbf.v4.new_markdown_cell("## 6. Speedup over eager and torch.compile\nPer shape, from the same results."),
    nbf.v4.new_code_cell("report.speedup_figure(csv)"),
    nbf.v4.new_markdown_cell(
        "## 7. The autotuner\n"
        "The tile each YOLO shape gets per kernel: the heuristic, or the tuned tile where this machine's "
        "tuning cache has one (`python -m gam_triton.tune ...`); below, registers, spills and warps per SM of "
        "those tiles per GPU architecture once `perf/compile/report.csv` exists."),
    nbf.v4.new_code_cell("report.autotune_figure(report.yolo_shapes(shape.batch), dtype)"),
    nbf.v4.new_markdown_cell(
        "## 8. What the block computes\n"
        "The channel gate and the spatial map of a YOLO GAM block on a synthetic image (a disc, a square, "
        "a ring, gradients, stripes mixed over 16 channels), before conversion (the reference module) and "
        "after (`GAM.from_module`), and their difference: conversion changes nothing. The maps come from "
        "`gam_triton.inspect.attention_maps`."),
    nbf.v4.new_code_cell("torch.manual_seed(0)\n"
                         "report.attention_figure(YoloGAM(16, 16), report.synthetic_input(16, 48), device)"),
]
nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
Path(__file__).with_name("explore.ipynb").write_text(nbf.writes(nb))
