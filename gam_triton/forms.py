"""Reading the GAM blocks of public code: where a block holds GAM's six layers (:func:`structure`), what it
computes (:func:`detect_form`), the names its checkpoints use (:func:`key_table`), and what a
replacement block takes over from it (:func:`carry_over`). What :func:`gam_triton.convert`,
:meth:`gam_triton.GAM.from_module` and the ultralytics integration need; the forms themselves and the math are
in :mod:`gam_triton.reference`, which this module builds on.

Recognising a block: forms 1 and 2 have identical layers, so the structure gives the weights but not the
function. :func:`structure` finds the six layers (fc1, fc2, conv1, bn1, conv2, bn2) in the layouts public code
holds them in (the Sequentials, with or without a trailing Sigmoid; conv+BatchNorm wrappers; the seed's names;
the layers as the block's own children), a tail run after GAM, and refuses, naming the first mismatch, anything
else (another activation or norm, extra layers, convolutions padded differently). The function is found by
experiment: a float64 copy of the block, with random parameters and statistics (no trained weight can hide a
difference), is run in eval and in train mode on two probe inputs and compared, output and running statistics,
with each candidate configuration computed from the same copy. The block itself is never run.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn

from .reference import SEQUENTIAL_PATHS, min_map_size, shuffle

__all__ = ["Structure", "layers", "structure", "key_table", "looks_like_gam", "PROBE_SHAPES", "detect_form",
           "HOOK_TABLES", "carry_over", "copy_without_hooks"]


# --- recognising a GAM block ---------------------------------------------------------------------------------
class Structure(NamedTuple):
    """What the layers of a GAM-shaped block say: the layers, whether it is the seed form, the
    :class:`gam_triton.GAM` constructor arguments (in_channels, rate, kernel_size, group, groups,
    padding_mode), where
    the six layers sit in the block (their paths, e.g. ``spatial_attention.0.conv``), the other paths a
    layer is registered under too ((alias, path) pairs) and the name of the block's tail, if it has one: the
    one child that holds every parameter and buffer outside the six layers (a fork's adaptive
    ``GAMAttention(c1, c2)`` with c2 != c1 appends ``channel_adjust``, a 1x1 Conv + BN + SiLU).
    :func:`detect_form` then checks that the block computes ``tail(GAM(x))``."""

    layers: tuple
    seed: bool
    args: dict
    names: tuple = SEQUENTIAL_PATHS
    aliases: tuple = ()
    tail: Optional[str] = None


_CHANNEL_SEQ = "Linear, ReLU, Linear (optionally then Sigmoid)"
_SPATIAL_SEQ = ("Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, or conv+BatchNorm, ReLU, conv+BatchNorm "
                "(optionally then Sigmoid)")
#: Leaf modules a GAM block may hold: the six layers' kinds, its two activations, no-ops and empty containers.
_LEAVES = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Sigmoid, nn.Identity, nn.Sequential, nn.ModuleList,
           nn.ModuleDict)


def _kinds(items) -> str:
    return ", ".join(type(m).__name__ for _, m in items) or "nothing"


def _expect(where: str, name: str, m, kind: type) -> None:
    if type(m) is not kind:
        raise ValueError(f"{where}[{name}] is {type(m).__name__}, expected {kind.__name__}")


def _child(parent: nn.Module, name: str):
    m = parent._modules.get(name)
    return m if isinstance(m, nn.Module) else None


def _channel_layers(ca: nn.Module) -> tuple[tuple, tuple, bool]:
    """(fc1, fc2), their paths, seed form? of a channel_attention; ValueError naming the first mismatch."""
    if isinstance(ca, nn.Sequential):
        items = list(ca._modules.items())
        body = items[:3] if len(items) == 4 and type(items[3][1]) is nn.Sigmoid else items
        if len(body) != 3:
            raise ValueError(f"channel_attention has {len(items)} entries ({_kinds(items)}): expected "
                             f"{_CHANNEL_SEQ}")
        for (name, m), kind in zip(body, (nn.Linear, nn.ReLU, nn.Linear)):
            _expect("channel_attention", name, m, kind)
        return (body[0][1], body[2][1]), (f"channel_attention.{body[0][0]}", f"channel_attention.{body[2][0]}"), False
    found = [_child(ca, n) for n in ("fc1", "fc2")]
    if any(m is None for m in found):
        raise ValueError(f"channel_attention ({type(ca).__name__}) is neither an nn.Sequential ({_CHANNEL_SEQ}) "
                         "nor a module holding the seed form's fc1 and fc2")
    for n, m in zip(("fc1", "fc2"), found):
        if type(m) is not nn.Linear:
            raise ValueError(f"channel_attention.{n} is {type(m).__name__}, expected Linear")
    return tuple(found), ("channel_attention.fc1", "channel_attention.fc2"), True


def _conv_bn_pair(where: str, m: nn.Module) -> list:
    kids = list(m._modules.items())
    if len(kids) != 2 or type(kids[0][1]) is not nn.Conv2d or type(kids[1][1]) is not nn.BatchNorm2d:
        desc = ", ".join(f"{n} ({type(k).__name__})" for n, k in kids) or "none"
        raise ValueError(f"{where} ({type(m).__name__}) has children {desc}: expected Conv2d and BatchNorm2d, or a "
                         "conv+BatchNorm wrapper holding exactly a Conv2d then a BatchNorm2d")
    return kids


def _spatial_layers(sa: nn.Module) -> tuple[tuple, tuple]:
    """(conv1, bn1, conv2, bn2) and their paths of a spatial_attention; ValueError naming the first mismatch."""
    if isinstance(sa, nn.Sequential):
        items = list(sa._modules.items())
        body = items[:-1] if len(items) in (4, 6) and type(items[-1][1]) is nn.Sigmoid else items
        if len(body) == 5:
            for (name, m), kind in zip(body, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d)):
                _expect("spatial_attention", name, m, kind)
            picked = [body[i] for i in (0, 1, 3, 4)]
            return tuple(m for _, m in picked), tuple(f"spatial_attention.{n}" for n, _ in picked)
        if len(body) == 3:
            (n1, w1), (nr, relu), (n2, w2) = body
            first = _conv_bn_pair(f"spatial_attention[{n1}]", w1)
            _expect("spatial_attention", nr, relu, nn.ReLU)
            second = _conv_bn_pair(f"spatial_attention[{n2}]", w2)
            paths = [f"spatial_attention.{n}.{k}" for n, pair in ((n1, first), (n2, second)) for k, _ in pair]
            return tuple(m for pair in (first, second) for _, m in pair), tuple(paths)
        raise ValueError(f"spatial_attention has {len(items)} entries ({_kinds(items)}): expected {_SPATIAL_SEQ}")
    names = ("conv1", "bn", "conv2", "bn1")
    found = [_child(sa, n) for n in names]
    if any(m is None for m in found):
        raise ValueError(f"spatial_attention ({type(sa).__name__}) is neither an nn.Sequential ({_SPATIAL_SEQ}) "
                         "nor a module holding the seed form's conv1, bn, conv2 and bn1")
    for n, m, kind in zip(names, found, (nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d)):
        if type(m) is not kind:
            raise ValueError(f"spatial_attention.{n} is {type(m).__name__}, expected {kind.__name__}")
    return tuple(found), tuple(f"spatial_attention.{n}" for n in names)


def _tail(module: nn.Module, found: tuple, extra: list) -> Optional[str]:
    """The name of the one direct child holding every tensor of ``extra`` (named parameters and buffers
    outside the six layers) and none of the six layers or the two branches; None when there is none."""
    heads = {n.split(".", 1)[0] for n in extra}
    if len(heads) != 1:
        return None
    name = heads.pop()
    child = _child(module, name)
    if child is None or name in ("channel_attention", "spatial_attention"):
        return None
    gam = {id(m) for m in (*found, module.channel_attention, module.spatial_attention)}
    return None if any(id(m) in gam for m in child.modules()) else name


_FLAT_KINDS = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)


def _flat_layers(module: nn.Module) -> Optional[tuple[tuple, tuple]]:
    """(fc1, fc2, conv1, bn1, conv2, bn2) and their names when they are ``module``'s own children, two of each
    kind, taken in the order the block registers them (dengbuqi/GAM_Pytorch's ``linear1``, ``linear2``,
    ``conv1``, ``conv2``, ``norm1``, ``norm2``); None otherwise."""
    kids = [(n, m) for n, m in module._modules.items() if m is not None]
    picked = {kind: [(n, m) for n, m in kids if type(m) is kind] for kind in _FLAT_KINDS}
    if any(len(v) != 2 for v in picked.values()) or any(isinstance(m, nn.Module) and m._modules for _, m in kids):
        return None
    (l1, l2), (c1, c2), (b1, b2) = (picked[k] for k in _FLAT_KINDS)
    order = (l1, l2, c1, b1, c2, b2)
    return tuple(m for _, m in order), tuple(n for n, _ in order)


def _find(module: nn.Module) -> tuple[tuple, tuple, bool, Optional[str]]:
    """(six layers, their paths, seed form?, tail); ValueError (the first mismatch) for anything else."""
    name = type(module).__name__
    ca, sa = _child(module, "channel_attention"), _child(module, "spatial_attention")
    flat = _flat_layers(module) if ca is None and sa is None and "GAM" in name else None
    if flat is not None:  # the six layers as the block's own children: no branches, no tail
        found, paths = flat
        return found, paths, False, _check_rest(module, name, found, flat=True)
    if ca is None or sa is None:
        missing = " and ".join(n for n, m in (("channel_attention", ca), ("spatial_attention", sa)) if m is None)
        raise ValueError(f"{name} is not a GAM block: it has no child {missing} (expected children "
                         f"channel_attention ({_CHANNEL_SEQ}) and spatial_attention ({_SPATIAL_SEQ}), or the seed "
                         "form's fc1/fc2 and conv1/bn/conv2/bn1, or, in a block named GAM, the six layers as its "
                         "own children: two Linear, two Conv2d and two BatchNorm2d)")
    try:
        (fc1, fc2), cpaths, seed = _channel_layers(ca)
        spatial, spaths = _spatial_layers(sa)
    except ValueError as e:
        raise ValueError(f"{name} is not a GAM block gam_triton computes: {e}") from None
    found = (fc1, fc2, *spatial)
    if len({id(m) for m in found}) != 6:
        raise ValueError(f"{name}: one layer is used in two places of the block; GAM has six distinct layers")
    return found, cpaths + spaths, seed, _check_rest(module, name, found)


def _check_rest(module: nn.Module, name: str, found: tuple, flat: bool = False) -> Optional[str]:
    """The tail's name (None without one) once nothing but the six layers, a tail (not in a ``flat`` block,
    whose layers are its own children) and no-op leaves holds anything; ValueError naming what else is there."""
    own = {id(t) for m in found for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    extra = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if id(t) not in own]
    tail = _tail(module, found, extra) if extra and not flat else None
    if extra and tail is None:  # before the leaves: weights outside the six layers are named as such
        shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
        raise ValueError(f"{name}: {shown} outside GAM's six layers (Linear, Linear, Conv2d, BatchNorm2d, Conv2d, "
                         "BatchNorm2d) and not in one child of the block (a tail run after GAM): gam_triton would "
                         "drop them")
    for path, m in module.named_modules():
        if tail is not None and path.split(".", 1)[0] == tail:  # the tail runs as it is: any modules
            continue
        if m is not module and not m._modules and type(m) not in _LEAVES:
            raise ValueError(f"{name}: {path} is {type(m).__name__}, which gam_triton does not compute (a GAM "
                             "block holds Linear, Conv2d, BatchNorm2d, ReLU and Sigmoid only)")
    return tail


def layers(module: nn.Module) -> Optional[tuple[tuple, bool]]:
    """((fc1, fc2, conv1, bn1, conv2, bn2), seed form?) of a GAM-shaped module, None for anything else."""
    try:
        found, _, seed, _ = _find(module)
    except ValueError:
        return None
    return found, seed


def _pads_same(cv: nn.Conv2d, k: int) -> bool:
    if cv.padding == "same":
        return True
    if cv.padding == "valid":
        return k == 1
    return tuple(cv.padding) == (k // 2, k // 2)


def structure(module: nn.Module) -> Structure:
    """The :class:`Structure` of a GAM block; ValueError naming the first mismatch for anything else.

    Layouts recognised (each only a way of holding the same six layers; :func:`detect_form` then checks the
    function): ``channel_attention`` an ``nn.Sequential`` (Linear, ReLU, Linear [, Sigmoid]) or a module with
    ``fc1``/``fc2``; ``spatial_attention`` an ``nn.Sequential`` (Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d
    [, Sigmoid]), an ``nn.Sequential`` (wrapper, ReLU, wrapper [, Sigmoid]) whose wrappers hold exactly a Conv2d
    then a BatchNorm2d, or a module with ``conv1``/``bn``/``conv2``/``bn1``; or, in a block whose class name
    contains "GAM" and that has neither branch, the six layers as its own children (two Linear, two Conv2d, two
    BatchNorm2d, each pair in registration order, besides ReLU/Sigmoid leaves: dengbuqi/GAM_Pytorch's
    ``linear1``/``linear2``/``conv1``/``conv2``/``norm1``/``norm2``). A tail (one more child holding every
    parameter and buffer outside the six layers, e.g. a 1x1 Conv + BN + SiLU; not in the flat layout) may hold
    any modules: it runs as it is, after GAM. Both convolutions pad alike, in any ``nn.Conv2d`` padding mode
    (zeros, replicate, reflect, circular). Refused: any other leaf module (SiLU, InstanceNorm2d, Dropout,
    ...), parameters or buffers outside the six layers and not all in one child, convolutions that are not
    same-size odd square kernels with stride 1, no dilation and same-size padding (``padding='same'`` or
    ``k // 2``), a hidden width that is no ``C // rate``.
    """
    found_layers, names, seed, tail = _find(module)
    name = type(module).__name__
    fc1, fc2, conv1, bn1, conv2, bn2 = found_layers
    c, cr = fc1.in_features, fc1.out_features
    k = conv1.kernel_size[0]
    where = dict(zip(("fc1", "fc2", "conv1", "bn1", "conv2", "bn2"), names))
    shapes = [("fc2", fc2.in_features == cr and fc2.out_features == c, f"Linear({fc2.in_features}, "
               f"{fc2.out_features}), expected Linear({cr}, {c})"),
              ("conv1", conv1.in_channels == c and conv1.out_channels == cr,
               f"{conv1.in_channels} -> {conv1.out_channels} channels, expected {c} -> {cr}"),
              ("bn1", bn1.num_features == cr, f"{bn1.num_features} features, expected {cr}"),
              ("conv2", conv2.in_channels == cr and conv2.out_channels == c,
               f"{conv2.in_channels} -> {conv2.out_channels} channels, expected {cr} -> {c}"),
              ("bn2", bn2.num_features == c, f"{bn2.num_features} features, expected {c}")]
    for layer, ok, what in shapes:
        if not ok:
            raise ValueError(f"{name} has GAM's layers but not GAM's shapes: {where[layer]} has {what}")
    for layer, cv in (("conv1", conv1), ("conv2", conv2)):
        problem = None
        if cv.kernel_size != (k, k) or k % 2 == 0:
            problem = (f"kernel {tuple(cv.kernel_size)} (gam_triton supports odd square kernels, the same in both "
                       f"convolutions; conv1 has {tuple(conv1.kernel_size)})")
        elif cv.stride != (1, 1):
            problem = f"stride {cv.stride}, expected 1"
        elif cv.dilation != (1, 1):
            problem = f"dilation {cv.dilation}, expected 1"
        elif cv.padding_mode != conv1.padding_mode:
            problem = (f"padding_mode {cv.padding_mode!r} and conv1 {conv1.padding_mode!r}: gam_triton pads both "
                       "convolutions alike")
        elif not _pads_same(cv, k):
            problem = f"padding {cv.padding}, expected {k // 2} or 'same' (the output keeps H x W)"
        if problem:
            raise ValueError(f"{name}: {where[layer]} has {problem}")
    if conv1.groups != conv2.groups:
        raise ValueError(f"{name}: the convolutions have different group counts ({conv1.groups} and "
                         f"{conv2.groups}); gam_triton uses one for both")
    groups = conv1.groups
    rate = groups if groups > 1 and c // groups == cr else max(1, c // max(cr, 1))
    if cr == 0 or c // rate != cr:
        raise ValueError(f"{name}: hidden width {cr} is not in_channels // rate for any rate gam_triton can express "
                         f"(C={c}, groups={groups})")
    args = dict(in_channels=c, rate=rate, kernel_size=k, group=groups > 1 and groups == rate, groups=groups,
                padding_mode=conv1.padding_mode)
    return Structure(found_layers, seed, args, names, _aliases(module, found_layers, names), tail)


def key_table(names: tuple, aliases: tuple = ()) -> dict:
    """{prefix in the block: prefix in the Sequential forms} for six layer paths (``Structure.names``), the
    paths the Sequential forms share left out, and for the other paths a layer is registered under
    (``Structure.aliases``: a checkpoint holds a layer's tensors under each; they load into the one layer).
    Applied before :func:`gam_triton.reference.rename_seed_keys` (a Sequential whose entries are named
    ``conv1``, ``bn1``, ... must not get the seed form's meaning of ``bn1``)."""
    ours = dict(zip(names, SEQUENTIAL_PATHS))
    table = {theirs + ".": mine + "." for theirs, mine in ours.items() if theirs != mine}
    return {**table, **{alias + ".": ours[primary] + "." for alias, primary in aliases}}


def _aliases(module: nn.Module, found: tuple, names: tuple) -> tuple:
    """((other path, path in ``names``), ...) for each of the six layers that ``module`` also registers under
    another name (a fork keeping ``self.conv1`` beside ``spatial_attention``)."""
    primary = {id(m): n for m, n in zip(found, names)}
    return tuple((path, primary[id(m)]) for path, m in module.named_modules(remove_duplicate=False)
                 if id(m) in primary and path != primary[id(m)])


def _looks_like_gam(module: nn.Module) -> bool:
    """True when ``module`` has children ``channel_attention`` and ``spatial_attention`` arranged like GAM's: a
    Linear (or convolution) from C channels in the first, at least two convolutions in the second, from C
    channels and back to C. A CBAM, whose spatial attention is one convolution from 2 channels, is not."""
    ca, sa = _child(module, "channel_attention"), _child(module, "spatial_attention")
    if ca is None or sa is None:
        return False
    mlp = [m for m in ca.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    convs = [m for m in sa.modules() if isinstance(m, nn.Conv2d)]
    if not mlp or len(convs) < 2:
        return False
    c = mlp[0].in_features if isinstance(mlp[0], nn.Linear) else mlp[0].in_channels
    return convs[0].in_channels == c and convs[-1].out_channels == c


def looks_like_gam(module: nn.Module) -> bool:
    """Whether :func:`gam_triton.convert` should tell the user when it leaves ``module`` alone: its class name
    contains "GAM", or it has GAM-like ``channel_attention`` and ``spatial_attention`` children (see
    :func:`_looks_like_gam`; a CBAM that merely shares the child names is not GAM-like)."""
    return "GAM" in type(module).__name__ or _looks_like_gam(module)


# (channel_sigmoid, shuffle_groups), most common first.
_SEQUENTIAL_FORMS = [(False, 4), (True, None), (False, None), (True, 4)]
_SEED_FORMS = [(False, None), (True, None), (False, 4), (True, 4)]
#: Probe inputs (batch, H, W): batch >= 2 for batch statistics, the second map non-square and odd.
PROBE_SHAPES = ((2, 5, 6), (3, 7, 3))
_PROBE_SEED = 1234


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.5)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)


def copy_without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` and its submodules without their hooks. The hook tables are not even copied
    (an empty table stands in for each in the deepcopy memo): ``module`` is only read."""
    memo: dict = {}
    for m in module.modules():
        for table in HOOK_TABLES:
            hooks = getattr(m, table, None)
            if hooks:
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(module, memo)


def _probe_copy(module: nn.Module) -> nn.Module:
    """A float64 CPU copy of ``module`` with no hook (the block's own function)."""
    return copy_without_hooks(module).to(device="cpu", dtype=torch.float64)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread while the probe runs: its tensors are tiny, and fanning each op out to a thread pool
    costs more than the op (tens of ms per convolution on a loaded machine, against 0.3 ms on one thread)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _buffers(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.named_buffers()}


def _restore(module: nn.Module, saved: dict) -> None:
    with torch.no_grad():
        for k, v in module.named_buffers():
            v.copy_(saved[k])


def _candidate_outputs(probe_layers: tuple, sigmoid: bool, shuffles: list, x: torch.Tensor) -> dict:
    """{shuffle_groups: output} of GAM with this channel gate, computed with the probe copy's own layers (so
    their modes, BatchNorm settings and running-statistics updates are the source's)."""
    fc1, fc2, conv1, bn1, conv2, bn2 = probe_layers
    a = fc2(torch.relu(fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
    x1 = x * (torch.sigmoid(a) if sigmoid else a)
    s = torch.sigmoid(bn2(conv2(torch.relu(bn1(conv1(x1))))))
    return {g: x1 * shuffle(s, g or 0) for g in shuffles}


def _form_name(form: tuple) -> str:
    sigmoid, groups = form
    return f"channel {'sigmoid' if sigmoid else 'identity'}, {f'shuffle {groups}' if groups else 'no shuffle'}"


def _probe(src: nn.Module, probe_layers: tuple, tail: Optional[nn.Module], forms: list, x: torch.Tensor,
           where: str, name: str) -> list:
    """The forms of ``forms`` that compute what ``src`` computes on ``x`` (output and buffers moved): GAM's
    output, run through ``tail`` when the block has one (each candidate from the same statistics and random
    state, as the block runs it)."""
    before = _buffers(src)
    versions = [p._version for p in src.parameters()]
    torch.default_generator.manual_seed(_PROBE_SEED)  # the CPU generator only: fork_rng restores it
    try:
        want = src(x)
    except Exception as e:  # the source's own forward failed: nothing to compare against
        raise ValueError(f"{name}: running it on a probe input failed ({where}: {e!r})") from e
    if not isinstance(want, torch.Tensor) or (tail is None and want.shape != x.shape):
        raise ValueError(f"{name} returns {getattr(want, 'shape', type(want))} for input {tuple(x.shape)}: "
                         "not a GAM block")
    if [p._version for p in src.parameters()] != versions:
        raise ValueError(f"{name}: its forward modifies its own parameters ({where}); GAM's does not")
    want_bufs = _buffers(src)
    _restore(src, before)
    alive, closest, moved = [], (float("inf"), None), None
    for sigmoid in dict.fromkeys(s for s, _ in forms):
        torch.default_generator.manual_seed(_PROBE_SEED)
        outs = _candidate_outputs(probe_layers, sigmoid, [g for s, g in forms if s == sigmoid], x)
        mid, rng = _buffers(src), torch.default_generator.get_state()
        for groups, out in outs.items():
            if tail is not None:  # each candidate through the tail from the same statistics and random state
                _restore(src, mid)
                torch.default_generator.set_state(rng)
                out = tail(out)
            got_bufs = _buffers(src)
            bad_buf = next((k for k, v in want_bufs.items()
                            if not torch.allclose(got_bufs[k].double(), v.double(), rtol=1e-9, atol=1e-10)), None)
            if out.shape != want.shape:
                continue
            diff = (out - want).abs().max().item() if out.numel() else 0.0
            if torch.allclose(out, want, rtol=1e-9, atol=1e-10):
                if bad_buf is None:
                    alive.append((sigmoid, groups))
                else:
                    moved = bad_buf
            elif not diff >= closest[0]:  # NaN-safe
                closest = (diff, (sigmoid, groups))
        _restore(src, before)
    if alive:
        return [f for f in forms if f in alive]
    if moved is not None:
        raise ValueError(f"{name} computes GAM's output but moves its buffers differently ({where}: {moved} "
                         "differs afterwards): refusing to convert it into a different function")
    near = f"; closest: {_form_name(closest[1])}, max |difference| {closest[0]:.2e}" if closest[1] else ""
    raise ValueError(f"{name} has GAM's layers but computes none of the GAM forms gam_triton implements ({where}"
                     f"{near}): refusing to convert it into a different function")


def detect_form(module: nn.Module, found: Optional[Structure] = None) -> tuple[bool, Optional[int]]:
    """(channel_sigmoid, shuffle_groups) of the GAM block ``module``, found by experiment; ValueError when its
    function is none of the forms gam_triton computes (followed by its tail, :attr:`Structure.tail`).

    The probe runs on a float64 CPU copy of ``module`` without hooks, its parameters and BatchNorm statistics
    randomised (no trained weight can hide a difference), in eval mode and in train mode (every layer; and in
    the block's own per-layer modes when they are mixed), on inputs of :data:`PROBE_SHAPES` (maps enlarged to
    :func:`min_map_size` where reflect or circular padding needs it): the block's output
    and the buffers it moves (BatchNorm running statistics, ``num_batches_tracked``) are compared with each
    candidate form's, computed with the copy's own layers from the same starting statistics. A form is kept
    only if every probe agrees. The random state is forked (``torch.random.fork_rng``) and seeded before each
    forward, so a block using randomness (dropout) is refused deterministically and the caller's RNG state is
    left as it was; ``module`` itself is only read (no forward, no copy of its hooks). The probe runs on one
    intra-op thread (restored afterwards).
    """
    found = found or structure(module)
    name = type(module).__name__
    c = found.args["in_channels"]
    forms = [f for f in (_SEED_FORMS if found.seed else _SEQUENTIAL_FORMS) if not (f[1] and c % f[1])]
    flags = [m.training for m in module.modules()]
    least = min_map_size(found.args["padding_mode"], found.args["kernel_size"])
    modes = [("eval", False), ("train", True)] + ([("own per-layer", None)] if len(set(flags)) > 1 else [])
    # inference_mode(False): the probe copy holds ordinary tensors (version counters, see _probe) when the
    # caller converts inside torch.inference_mode, as ultralytics' predictor and validator run
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.no_grad(), _one_thread():
        src = _probe_copy(module)
        gen = torch.Generator().manual_seed(_PROBE_SEED)
        _randomise(src, gen)
        probe_layers = tuple(src.get_submodule(p) for p in found.names)
        tail = None if found.tail is None else src.get_submodule(found.tail)
        for mode, flag in modes:
            if flag is None:
                for m, f in zip(src.modules(), flags):
                    m.training = f
            else:
                src.train(flag)
            for b, h, w in PROBE_SHAPES:
                h, w = max(h, least), max(w, least)
                x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
                forms = _probe(src, probe_layers, tail, forms, x, f"{mode}-mode probe at input {(b, c, h, w)}",
                               name)
    return forms[0]


# --- what a replacement block takes over -----------------------------------------------------------------
#: Hook tables of nn.Module that move with a layer when a block is replaced. A table the new block does not
#: use itself is shared (the same dict object, so a RemovableHandle the user holds still removes the hook);
#: one the block fills in its own constructor gets the old entries added in front of its own.
HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_is_full_backward_hook"}


def _plain_attributes(old: nn.Module, new: nn.Module) -> dict:
    """The instance attributes of ``old`` that a framework or user set on it: not nn.Module's internals,
    not attributes the new block defines itself (its own construction, its class's attributes and properties;
    nn.Module's method names such as ``type`` stay free, as they were on ``old``)."""
    mine = set(vars(new))
    for cls in type(new).__mro__:
        if cls is nn.Module:
            break
        mine.update(vars(cls))
    return {k: v for k, v in vars(old).items() if k not in _MODULE_INTERNALS and k not in mine}


def carry_over(old: nn.Module, new: nn.Module, hooks: bool = True) -> nn.Module:
    """Give ``new`` what ``old`` held beyond its parameters and buffers; return ``new``.

    Copied: the plain instance attributes (by reference, see :func:`_plain_attributes`: ultralytics' ``f``,
    ``i``, ``type``, ``np``, names, pruning or quantisation flags), the training flag and, with ``hooks``,
    every hook table in :data:`HOOK_TABLES` (and whether backward hooks are "full"). Not copied: attributes
    the new block defines itself (``in_channels``, ``rate``, ...), class-level monkeypatches of ``type(old)``,
    and hooks registered globally (``nn.modules.module.register_module_*`` apply to every module anyway).

    The training flag copied is ``old``'s own, onto ``new`` alone (not ``new.train(...)``, which would reset
    every layer below): the layers keep their own flags, which :meth:`gam_triton.GAM.from_module` takes from
    the source layer for layer (a BatchNorm frozen with ``.eval()`` inside a training block stays frozen).
    """
    if not isinstance(old, nn.Module) or not isinstance(new, nn.Module):
        raise TypeError(f"carry_over expects two nn.Modules, got {type(old).__name__} and {type(new).__name__}")
    for k, v in _plain_attributes(old, new).items():
        object.__setattr__(new, k, v)
    if hooks:
        for table in HOOK_TABLES:
            theirs = getattr(old, table, None)
            if theirs is None:  # older torch without this table
                continue
            own = getattr(new, table)
            if not own:
                object.__setattr__(new, table, theirs)
            elif theirs:
                merged = type(own)(theirs)
                merged.update(own)
                object.__setattr__(new, table, merged)
        if getattr(old, "_is_full_backward_hook", None) is not None:
            new._is_full_backward_hook = old._is_full_backward_hook
    new.training = old.training
    return new
