"""Writes notebooks/explore.ipynb (run it after editing the cells here: python notebooks/make_explore.py).

The notebook is executed by tests/test_notebook.py, so every cell must run on a CPU-only machine
under TRITON_INTERPRET=1 in a few seconds.
"""
from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# Exploring gam_triton\n\n"
        "Swap a GAM block for gam_triton's, check it computes the same thing, look at what it runs.\n\n"
        "On a GPU the channel gate and the final gate are fused Triton kernels. On a CPU-only machine "
        "with `TRITON_INTERPRET=1` the same kernels run in Triton's interpreter (correct, slow); without "
        "it a PyTorch path runs. **Timings printed below are only performance numbers on a GPU**: on the "
        "CPU they are CPU figures, and under the interpreter they measure the interpreter."),
    nbf.v4.new_code_cell(
        "import time\n"
        "import torch\n"
        "import gam_triton\n"
        "from gam_triton.reference import YoloGAM\n"
        "from gam_triton._runtime import INTERPRET, use_triton\n"
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
    nbf.v4.new_markdown_cell("## 4. A quick timing (read the label)"),
    nbf.v4.new_code_cell(
        "def wall_ms(fn, n=5):\n"
        "    fn()\n"
        "    t = []\n"
        "    for _ in range(n):\n"
        "        if device == 'cuda': torch.cuda.synchronize()\n"
        "        t0 = time.perf_counter(); fn()\n"
        "        if device == 'cuda': torch.cuda.synchronize()\n"
        "        t.append((time.perf_counter() - t0) * 1e3)\n"
        "    return sorted(t)[len(t) // 2]\n"
        "old.eval(); new.eval()\n"
        "with torch.no_grad():\n"
        "    te, tg = wall_ms(lambda: old(x)), wall_ms(lambda: new(x))\n"
        "label = ('GPU' if device == 'cuda' else\n"
        "         'INTERPRETER - not a performance number' if INTERPRET else 'CPU figures')\n"
        "print(f'[{label}] eager {te:.2f} ms, gam_triton {tg:.2f} ms')"),
    nbf.v4.new_markdown_cell("## 5. Sweep results\nIf a perf sweep has been run (`make sweep`), its CSV is "
                             "read here; GPU results are committed under `perf/results/<gpu-name>/`."),
    nbf.v4.new_code_cell(
        "from pathlib import Path\n"
        "import pandas as pd\n"
        "root = Path.cwd().parent if Path.cwd().name == 'notebooks' else Path.cwd()\n"
        "csvs = sorted(root.glob('perf/results/*/results.csv'))\n"
        "for csv in csvs:\n"
        "    df = pd.read_csv(csv)\n"
        "    print(csv.parent.name, len(df), 'rows')\n"
        "    print(df.groupby(['provider', 'mode'])['ms'].median() if 'ms' in df else df.head())\n"
        "if not csvs:\n"
        "    print('no sweep results yet: run `make sweep`')"),
]
nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
Path(__file__).with_name("explore.ipynb").write_text(nbf.writes(nb))
