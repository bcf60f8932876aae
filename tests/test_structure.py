"""The package's shape, measured: no import cycle, no function-level import of a package module, no shipped
table of generated facts, few files on the hot path of one eval forward.
"""
import ast
import os
import pickle
import pickletools
import sys

import pytest
import torch

import gam_triton
from gam_triton.ops._runtime import INTERPRET

PACKAGE = os.path.dirname(os.path.abspath(gam_triton.__file__))
KERNELS = os.path.dirname(os.path.abspath(gam_triton.kernels.__file__)) if hasattr(gam_triton, "kernels") else \
    os.path.join(os.path.dirname(PACKAGE), "kernels")


def _modules() -> dict:
    """{dotted module name: path} of every .py file of the package (gam_triton.kernels included)."""
    out = {}
    for root, name in ((PACKAGE, "gam_triton"), (KERNELS, "gam_triton.kernels")):
        for folder, _, files in os.walk(root):
            if "__pycache__" in folder:
                continue
            rel = os.path.relpath(folder, root)
            prefix = name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}"
            for f in files:
                if f.endswith(".py"):
                    mod = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                    if not (name == "gam_triton" and mod.startswith("gam_triton.kernels")):
                        out[mod] = os.path.join(folder, f)
    return out


def _imports(path: str, module: str) -> list[tuple[str, bool]]:
    """(imported package module, at module level?) for each import of the package in one file."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    top = set(id(n) for n in tree.body)
    for n in tree.body:  # `if HAS_TRITON:` blocks at module level count as module level
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(m) for m in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("gam_triton"):
                out.append((name, id(node) in top))
    return out


def test_no_import_cycle_and_no_function_level_package_import():
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        deps = set()
        for name, at_top in _imports(path, mod):
            assert at_top, f"{mod} imports {name} inside a function"
            if name in mods and name != mod:
                deps.add(name)
        graph[mod] = deps
    # a package imports its own submodules in its __init__: parent -> child edges are not cycles
    for mod in graph:
        graph[mod] = {d for d in graph[mod] if not d.startswith(mod + ".")}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])
    assert "gam_triton.reference" in graph and not {d for d in graph["gam_triton.reference"]}, "reference is a leaf"
    assert graph["gam_triton.forms"] == {"gam_triton.reference"}, "forms reads blocks with reference alone"
    assert not graph["gam_triton.deploy"], "deploy is a leaf"


def test_no_generated_table_ships_in_the_package():
    for folder in (PACKAGE, KERNELS):
        for root, _, files in os.walk(folder):
            for f in files:
                if not f.endswith((".py", ".pyc")):
                    path = os.path.join(root, f)
                    with open(path, "rb") as fh:
                        lines = fh.read().count(b"\n")
                    assert lines <= 500, f"{path}: {lines} lines of data in the package"


@pytest.mark.skipif(not INTERPRET, reason="counts the files of the Triton path as the interpreter runs it")
def test_one_eval_forward_passes_through_at_most_six_library_files(monkeypatch):
    """Steady state (constants cached, choices tuned), eval, Triton convolutions: the package files whose code
    runs, the jit kernels (device code, one file per op family) apart."""
    monkeypatch.setenv("GAM_TRITON_CONV", "triton")
    gam = gam_triton.GAM(16, group=True, channel_sigmoid=False, shuffle_groups=4).eval()
    x = torch.randn(1, 16, 3, 4)
    with torch.no_grad():
        gam(x)
        seen = set()

        def profile(frame, event, arg):
            if event == "call":
                seen.add(frame.f_code.co_filename)

        sys.setprofile(profile)
        try:
            gam(x)
        finally:
            sys.setprofile(None)
    files = sorted(os.path.relpath(f, PACKAGE) for f in seen if f.startswith(PACKAGE + os.sep))
    assert len(files) <= 6, files
    assert {"module.py", os.path.join("ops", "conv.py"), os.path.join("ops", "channel_gate.py")} <= set(files)


def test_a_pickled_gam_refers_only_to_names_that_stay_put():
    """torch.save of a model (ultralytics' checkpoints) pickles GAM and the load-state-dict hooks it registers by
    module and name: moving any of them breaks every checkpoint saved before. These are the names it may use."""
    gam = gam_triton.GAM.from_module(gam_triton.reference.PaperGAM(16))  # with a block key map of its own
    tailed = gam_triton.TailedGAM(16, torch.nn.Identity())
    found = set()
    for m in (gam, tailed, gam_triton.GAM(16, padding_mode="replicate")):
        for op, arg, _ in pickletools.genops(pickle.dumps(m, protocol=2)):
            if op.name == "GLOBAL" and arg.startswith("gam_triton"):
                found.add(tuple(arg.split(" ")))
    assert found == {("gam_triton.module", "GAM"), ("gam_triton.module", "TailedGAM"),
                     ("gam_triton.reference", "KeyMap"), ("gam_triton.reference", "rename_seed_keys")}, found
