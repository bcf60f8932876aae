"""The GAM module: a drop-in for the GAM blocks of public code, running the fused Triton kernels.

Parameters and buffers carry the names of the common nn.Sequential forms (``channel_attention.0``/``.2``,
``spatial_attention.0``/``.1``/``.3``/``.4``), so existing checkpoints load with ``strict=True``; the seed
form's names (``fc1``, ``fc2``, ``conv1``, ``bn``, ``conv2``, ``bn1``) are renamed on load.

Forward (per pixel p; see ``shared/GAM_NOTES.md``)::

    x1  = x * g(W2 relu(W1 x + b1) + b2)          channel gate kernel
    z1  = relu(BN1(conv1(x1)))                    conv1, BN1 folded (running stats) or the bn_relu kernel
    out = x1 * shuffle(sigmoid(BN2(conv2(z1))))   conv2 + the final gate kernel (BN2 and shuffle folded in)

:class:`TailedGAM` is a GAM followed by another module of the block it replaces (the adaptive form's 1x1 Conv +
BN + SiLU to c2 channels), which runs as it is.

:meth:`GAM._plan` is the one place that decides how a call runs (:class:`Plan`); :meth:`GAM.forward` follows
it down one of six paths: the layer path (an inner layer carries a hook, or a global module hook is registered:
each layer is called as in the public forms, so thop, Grad-CAM or feature hooks fire), the plain graph
(deployment capture, or a BatchNorm that is not nn.BatchNorm2d on batch statistics, e.g. SyncBatchNorm), the
PyTorch path (CPU without the interpreter, float64), the fused train block (both BatchNorms on batch
statistics), the fused eval branch (both on running statistics, no autocast: Triton convolutions or cuDNN,
``GAM_TRITON_CONV``), and the generic Triton path for everything else (mixed BatchNorm modes, autocast in
eval): cuDNN convolutions between the kernels, gradients from the ops' registered formulas.
"""
from __future__ import annotations

import logging
import numbers
import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from . import forms, reference
from .deploy import deploying
from .ops import _runtime, channel_gate, conv, elementwise, train_block
from .reference import bn_scale_shift, conv_like, fold_conv_bn, gate_multiply, uses_batch_stats

__all__ = ["GAM", "TailedGAM", "Plan", "x1_channels_last"]


def x1_channels_last(in_channels_last: bool, is_cuda: bool, dtype: torch.dtype,
                     amp: Optional[torch.dtype] = None) -> bool:
    """Whether the block writes x1 (and the convolutions' tensors) channels_last: for a channels_last input, and
    for fp16/bf16 or autocast on CUDA (cuDNN runs those fastest NHWC)."""
    return in_channels_last or (is_cuda and (dtype != torch.float32 or amp is not None))

log = logging.getLogger("gam_triton")

#: The hook tables of nn.Module that make a layer's call observable (the with_kwargs/always_called tables are
#: keyed by the entries of these); torch's global module hooks (``register_module_forward_hook`` & co.) too.
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_layers_notice_given = False  # the layer path says once per process that it runs, and why


def _batch_stats(bn: nn.Module) -> bool:
    """True when ``bn`` normalises with the batch's statistics, as nn.BatchNorm2d decides (the rule of
    ``reference.uses_batch_stats``, asked here on every call without leaving the module)."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


class Plan(NamedTuple):
    """How one call runs, decided once by :meth:`GAM._plan`: the path, and for the Triton paths their settings."""

    amp: Optional[torch.dtype]  #: autocast dtype (the MLP's dots and the convolutions run in it), or None
    x1_cl: bool                 #: x1 written channels_last (the convolutions' fast layout on CUDA)
    out_cl: bool                #: the output in channels_last (the input's layout)
    stats1: bool                #: BatchNorm1 on batch statistics
    stats2: bool                #: BatchNorm2 on batch statistics
    fused_eval: bool            #: both on running statistics, no autocast, zero padding: the fused eval branch
    fused_train: bool           #: both on batch statistics, zero padding: the fused train block
    conv: str                   #: its convolutions: "auto", "triton" or "cudnn" (GAM_TRITON_CONV, if they can)
    path: str = "triton"        #: "layers" (hooks), "plain" (capture, foreign BatchNorm), "torch" or "triton"


_LAYERS, _PLAIN, _TORCH = (Plan(None, False, False, False, False, False, False, "cudnn", p)
                           for p in ("layers", "plain", "torch"))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"GAM: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"GAM: {name} must be >= {minimum}, got {value}")
    return int(value)


def _check_groups(group: Optional[bool], groups, c: int, cr: int, rate: int) -> tuple[bool, int]:
    """(group, groups) of a GAM: ``groups`` from ``group`` when not given; both given must agree."""
    if groups is None:
        groups = rate if group else 1
        if group and (c % groups or cr % groups):
            raise ValueError(f"GAM: group=True needs in_channels ({c}) and in_channels // rate ({cr}) "
                             f"divisible by rate ({rate})")
        return bool(group), groups
    groups = _check_int("groups", groups, 1)
    if (group is True and groups != rate) or (group is False and groups == rate and groups > 1):
        raise ValueError(f"GAM: group={group} and groups={groups} disagree (group=True means groups == rate, "
                         f"rate={rate}): give one of them")
    if c % groups or cr % groups:
        raise ValueError(f"GAM: groups ({groups}) must divide in_channels ({c}) and in_channels // rate ({cr})")
    return (groups > 1 and groups == rate) if group is None else group, groups


class GAM(nn.Module):
    """Global Attention Mechanism block (Liu et al. 2021) with fused Triton kernels.

    Args:
        in_channels: channels C of the input.
        out_channels: must equal ``in_channels`` (the output gates the input); None means the same.
        rate: reduction rate r; the hidden width is C // r.
        kernel_size: odd size of both spatial convolutions (padding kernel_size // 2).
        group: grouped convolutions with ``groups=rate`` (the YOLO form's default); None (default): as
            ``groups`` says, ungrouped when it is None too.
        channel_sigmoid: sigmoid on the channel branch (paper); False multiplies by the MLP output as
            the YOLO and seed forms do.
        shuffle_groups: shuffle the spatial map's channels in this many groups after its sigmoid (the
            YOLO form uses 4); None for no shuffle.
        groups: the group count of both convolutions, any divisor of C and C // rate (a fork's
            ``groups=4`` with ``rate=8``); None: ``rate`` if ``group`` else 1. Given with ``group``, the two
            must agree (``group=True`` means ``groups == rate``, ``group=False`` means ``groups != rate``).
        padding_mode: how both convolutions pad, as ``nn.Conv2d``'s: "zeros" (the public forms), "replicate"
            (dengbuqi/GAM_Pytorch), "reflect" or "circular". Modes other than zeros run the convolutions on
            cuDNN / PyTorch, with the channel gate, BatchNorm + ReLU and final gate kernels around them (the
            Triton convolutions and the fused train block pad with zeros).

    Defaults are the paper's form. :meth:`from_module` builds one from any of the public forms.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, rate: int = 4,
                 kernel_size: int = 7, group: Optional[bool] = None, channel_sigmoid: bool = True,
                 shuffle_groups: Optional[int] = None, groups: Optional[int] = None,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        c = _check_int("in_channels", in_channels, 1)
        if out_channels is not None and _check_int("out_channels", out_channels, 1) != c:
            raise ValueError(f"GAM: out_channels ({out_channels}) must equal in_channels ({c}): "
                             "the output is a gate over the input")
        rate = _check_int("rate", rate, 1)
        k = _check_int("kernel_size", kernel_size, 1)
        if k % 2 == 0:
            raise ValueError(f"GAM: kernel_size must be odd (padding kernel_size // 2 keeps H x W), got {k}")
        for name, flag in (("group", group), ("channel_sigmoid", channel_sigmoid)):
            if not isinstance(flag, bool) and not (name == "group" and flag is None):
                raise TypeError(f"GAM: {name} must be a bool, got {type(flag).__name__}")
        cr = c // rate
        if cr == 0:
            raise ValueError(f"GAM: in_channels // rate is 0 (in_channels={c}, rate={rate}): "
                             "the channel MLP would have no hidden unit")
        group, groups = _check_groups(group, groups, c, cr, rate)
        if not isinstance(padding_mode, str):
            raise TypeError(f"GAM: padding_mode must be a str, got {type(padding_mode).__name__}")
        if padding_mode not in reference.PADDING_MODES:
            raise ValueError(f"GAM: padding_mode must be one of {', '.join(reference.PADDING_MODES)}, got "
                             f"{padding_mode!r}")
        if shuffle_groups is not None:
            shuffle_groups = _check_int("shuffle_groups", shuffle_groups, 1)
            if c % shuffle_groups:
                raise ValueError(f"GAM: shuffle_groups ({shuffle_groups}) must divide in_channels ({c})")
        self.in_channels = c
        self.rate = rate
        self.kernel_size = k
        self.group = group
        self.groups = groups
        self.channel_sigmoid = channel_sigmoid
        self.shuffle_groups = shuffle_groups
        self.channel_attention = nn.Sequential(nn.Linear(c, cr), nn.ReLU(inplace=True), nn.Linear(cr, c))
        self.spatial_attention = nn.Sequential(
            nn.Conv2d(c, cr, k, padding=k // 2, groups=groups, padding_mode=padding_mode),
            nn.BatchNorm2d(cr),
            nn.ReLU(inplace=True),
            nn.Conv2d(cr, c, k, padding=k // 2, groups=groups, padding_mode=padding_mode),
            nn.BatchNorm2d(c),
        )
        self._eval_cache: dict = {}  # name -> (key, value): eval-mode constants, see _cached
        for form, table in reference.KEY_PREFIXES.items():  # other forms' checkpoints load too
            self._register_load_state_dict_pre_hook(reference.rename_seed_keys if form == "seed"
                                                    else reference.KeyMap(table))

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def padding_mode(self) -> str:
        """How the convolutions pad (conv1's ``padding_mode``, which conv2 shares)."""
        return self.spatial_attention[0].padding_mode

    def extra_repr(self) -> str:
        pad = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (f"in_channels={self.in_channels}, rate={self.rate}, kernel_size={self.kernel_size}, "
                f"group={self.group}, groups={self.groups}, channel_sigmoid={self.channel_sigmoid}, "
                f"shuffle_groups={self.shuffle_groups}{pad}")

    @classmethod
    def from_module(cls, module: nn.Module, share: bool = False) -> "GAM":
        """A GAM computing the same function as ``module`` (any of the public forms), same weights.

        Weights, statistics, BatchNorm settings, requires_grad flags, device and dtype are those of
        ``module``, and so are the modes: the block's own training flag, and each layer's (fc1, fc2, conv1,
        bn1, conv2, bn2 and the two branches) its counterpart's, so a BatchNorm frozen with ``.eval()`` in a
        training block stays frozen. The layers are found by :func:`gam_triton.forms.structure` (any of
        the layouts it lists), the form by :func:`gam_triton.forms.detect_form` (ValueError naming the
        first mismatch when it is none that gam_triton computes). A layout with other parameter names
        (conv+BatchNorm wrappers) gets a load-state-dict pre-hook renaming its checkpoints' keys. A block with
        a tail (a module after GAM, :attr:`gam_triton.forms.Structure.tail`) gives a :class:`TailedGAM`
        holding that very module (``share``) or a copy of it without its hooks, under the same name.

        ``share`` (what :func:`gam_triton.convert` uses): hold ``module``'s own Parameter and buffer objects
        instead of copies. The plain attributes ``module`` carries (e.g. ultralytics' ``f``/``i``/``type``/
        ``np``) are copied; its hooks are not: ``module`` still exists and keeps them, and a copy would make
        each hook fire for two blocks (``convert``, which replaces the block, moves them). With ``share``, the
        hooks on ``module``'s six layers and two branches move to their counterparts here (the same hook
        tables, so a handle the user holds still removes its hook); while any is there, the block runs the
        layer path (:meth:`_plan`), which calls them.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"from_module expects an nn.Module, got {type(module).__name__}")
        found = forms.structure(module)
        sigmoid, shuffle = forms.detect_form(module, found)
        if found.tail is None:  # TailedGAM.from_module of a block without a tail: a plain GAM
            kind, more = (GAM if issubclass(cls, TailedGAM) else cls), {}
        else:  # the tail itself is put in after the layers (to_empty would empty it)
            kind, more = TailedGAM, dict(tail=nn.Identity(), tail_name=found.tail)
        with torch.device("meta"):  # every tensor comes from ``module``: no allocation, no random init (which
            gam = kind(**found.args, channel_sigmoid=sigmoid, shuffle_groups=shuffle, **more)  # moves the RNG)
        gam._take_layers(found.layers, share)
        if found.tail is not None:  # the very module (share), or a copy without its hooks; its own modes
            theirs = module.get_submodule(found.tail)
            gam._modules[found.tail] = theirs if share else forms.copy_without_hooks(theirs)
        ca, sa = (module._modules.get(n) for n in ("channel_attention", "spatial_attention"))
        for mine, theirs in ((gam.channel_attention, ca), (gam.spatial_attention, sa)):
            theirs = module if theirs is None else theirs  # the flat layout: the block holds the layers itself
            for m in mine.children():
                if type(m) is nn.ReLU:  # no counterpart in every layout: the branch's flag
                    m.training = theirs.training
            mine.training = theirs.training
        if share:
            pairs = zip((*gam._layers(), gam.channel_attention, gam.spatial_attention), (*found.layers, ca, sa))
            for mine, theirs in pairs:
                if theirs is None:  # no branch in the flat layout (the block's own hooks stay the block's)
                    continue
                for name in _HOOK_TABLES + ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                            "_forward_pre_hooks_with_kwargs"):
                    if getattr(theirs, name, None):
                        object.__setattr__(mine, name, getattr(theirs, name))
                if getattr(theirs, "_is_full_backward_hook", None) is not None:
                    mine._is_full_backward_hook = theirs._is_full_backward_hook
        table = forms.key_table(found.names, found.aliases)
        if table:  # this block's own names, renamed before the default seed and wrapper tables see them
            handle = gam._register_load_state_dict_pre_hook(reference.KeyMap(table))
            gam._load_state_dict_pre_hooks.move_to_end(handle.id, last=False)
        return forms.carry_over(module, gam, hooks=False)

    def _take_layers(self, theirs_all: tuple, share: bool) -> None:
        """Take the weights, statistics, BatchNorm settings and training flags of (fc1, fc2, conv1, bn1,
        conv2, bn2): the very Parameter and buffer objects (``share``) or copies of them."""
        ref = theirs_all[0].weight
        if any(t.is_meta for t in (*self.parameters(), *self.buffers())):  # built empty by from_module
            self.to_empty(device=ref.device)
        self.to(device=ref.device, dtype=ref.dtype)
        for mine, theirs in zip(self._layers(), theirs_all):
            mine.training = theirs.training
            if getattr(theirs, "bias", True) is None:
                mine.bias = None
            if isinstance(theirs, nn.BatchNorm2d):
                mine.eps, mine.momentum = theirs.eps, theirs.momentum
                mine.affine, mine.track_running_stats = theirs.affine, theirs.track_running_stats
                for name in ("weight", "bias"):
                    if getattr(theirs, name) is None:
                        setattr(mine, name, None)
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    if getattr(theirs, name) is None:
                        mine.register_buffer(name, None)
            if share:
                for name, p in theirs.named_parameters(recurse=False):
                    setattr(mine, name, p)
                for name, b in theirs.named_buffers(recurse=False):
                    setattr(mine, name, b)
                continue
            mine.load_state_dict(theirs.state_dict(), strict=True)
            for (_, p_mine), (_, p_theirs) in zip(mine.named_parameters(), theirs.named_parameters()):
                p_mine.requires_grad_(p_theirs.requires_grad)

    def _layers(self) -> tuple:
        """(fc1, fc2, conv1, bn1, conv2, bn2)."""
        ca, sa = self.channel_attention._modules, self.spatial_attention._modules
        return ca["0"], ca["2"], sa["0"], sa["1"], sa["3"], sa["4"]

    def to_reference(self) -> nn.Module:
        """A plain PyTorch module computing what this GAM computes, of the public form its configuration
        names (what :func:`gam_triton.revert` puts in its place).

        YOLO form (identity channel gate, shuffle 4, 7x7) -> :class:`~gam_triton.reference.YoloGAM`; paper
        form -> ``PaperGAM``; identity gate without shuffle or grouping -> ``SeedGAM`` (the seed's children
        names ``fc1``...); anything else (a padding mode other than zeros too) -> ``PlainGAM``. The new module
        SHARES this GAM's layers (the same Linear, Conv2d and BatchNorm objects: parameters, buffers, BN
        settings, hooks on them) and, as :func:`gam_triton.convert` does the other way
        (:func:`~gam_triton.forms.carry_over`), takes its mode, its hook tables (the same dict objects, so
        handles still remove hooks; GAM's own checkpoint-name renamers excepted) and the instance attributes
        GAM itself does not define (e.g. the ``f``, ``i``, ``type`` a YOLO parser sets). Each layer keeps its own
        training flag (they are the same objects); the seed form's branch modules take the flags of this GAM's
        branches.
        """
        ref = self._reference_form()
        ca, sa = self.channel_attention, self.spatial_attention
        if isinstance(ref, reference.SeedGAM):
            for name, layer in (("fc1", ca[0]), ("fc2", ca[2])):
                setattr(ref.channel_attention, name, layer)
            for name, i in (("conv1", 0), ("bn", 1), ("conv2", 3), ("bn1", 4)):
                setattr(ref.spatial_attention, name, sa[i])
            shared = {id(m) for m in self._layers()}
            for mine, theirs in ((ca, ref.channel_attention), (sa, ref.spatial_attention)):
                for m in theirs.modules():
                    if id(m) not in shared:
                        m.training = mine.training
        else:
            ref.channel_attention, ref.spatial_attention = ca, sa
        before = set(vars(ref))
        forms.carry_over(self, ref)  # what convert() carried from the original block, carried back
        for name in _OWN_STATE & (set(vars(ref)) - before):  # GAM's own configuration and cache stay here
            delattr(ref, name)
        table = ref._load_state_dict_pre_hooks
        if any(_is_rename_hook(h) for h in table.values()):  # GAM's checkpoint-name renamers stay with GAM
            object.__setattr__(ref, "_load_state_dict_pre_hooks",
                               type(table)((k, h) for k, h in table.items() if not _is_rename_hook(h)))
        return ref

    def _reference_form(self) -> nn.Module:
        """An empty-layered instance of the public form with this configuration (PlainGAM if none fits)."""
        c, r, k = self.in_channels, self.rate, self.kernel_size
        sig, shuffle, g, pad = self.channel_sigmoid, self.shuffle_groups, self.groups, self.padding_mode
        with torch.device("meta"):  # the layers are replaced by this GAM's own right after: allocate nothing
            if pad != "zeros":
                return reference.PlainGAM(c, rate=r, kernel_size=k, channel_sigmoid=sig, shuffle_groups=shuffle,
                                          groups=g, padding_mode=pad)
            if k == 7 and not sig and shuffle == 4 and g in (1, r):
                return reference.YoloGAM(c, c, group=g > 1, rate=r)
            if k == 7 and sig and shuffle is None and g == 1:
                return reference.PaperGAM(c, rate=r)
            if k == 7 and not sig and shuffle is None and g == 1:
                return reference.SeedGAM(c, c, ratio=r)
            return reference.PlainGAM(c, rate=r, kernel_size=k, group=g > 1 and g == r, channel_sigmoid=sig,
                                      shuffle_groups=shuffle, groups=g)

    def __getstate__(self) -> dict:
        """Copies and pickles do not carry the eval-constant cache (its keys are this process's pointers)."""
        state = super().__getstate__()
        if "_eval_cache" in state:
            state["_eval_cache"] = {}
        return state

    # -- input checks and the plan ---------------------------------------------------------------------
    def _check_input(self, x) -> None:
        """The only check of x on a call: ValueError/TypeError naming the problem."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"GAM: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"GAM: expected a 4-D input (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"GAM: expected {self.in_channels} channels, got input shape {tuple(x.shape)}")
        mode = self.spatial_attention._modules["0"].padding_mode
        if mode in ("reflect", "circular") and min(x.shape[2], x.shape[3]) < reference.min_map_size(
                mode, self.kernel_size):
            raise ValueError(f"GAM: padding_mode {mode!r} needs H and W of at least "
                             f"{reference.min_map_size(mode, self.kernel_size)} with kernel_size {self.kernel_size}, "
                             f"got input shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"GAM: input must be a floating-point tensor, got {x.dtype}")
        w = self.channel_attention[0].weight
        if x.device != w.device:
            raise ValueError(f"GAM: input is on {x.device} but the module's parameters are on {w.device}")
        if x.dtype != w.dtype and _runtime.autocast_dtype(x.device.type) is None:
            raise TypeError(f"GAM: input dtype {x.dtype} differs from the parameters' {w.dtype} "
                            "(convert the module with .to(dtype) or run under torch.autocast)")

    def _foreign_batchnorm(self) -> bool:
        """True when a BatchNorm that uses batch statistics is not a plain ``nn.BatchNorm2d`` (e.g. after
        ``nn.SyncBatchNorm.convert_sync_batchnorm``): only the module itself knows how to normalise then, so
        the plain forward, which calls it, runs."""
        layers = self.spatial_attention._modules  # indexing the Sequential costs microseconds per call
        return any(type(layers[k]) is not nn.BatchNorm2d and _batch_stats(layers[k]) for k in ("1", "4"))

    def _hooked_layer(self) -> Optional[str]:
        """Where a hook would miss a call of the fused paths: "every module" while a global module hook is
        registered, else the name of the first inner module (a branch or one of its layers) carrying a forward,
        forward-pre or backward hook; None when there is none. Runs on every call (about a microsecond)."""
        g = _torch_module
        if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks or \
                g._global_backward_pre_hooks:
            return "every module (a global module hook)"
        for name in ("channel_attention", "spatial_attention"):  # not a tail: it runs as a module anyway
            branch = self._modules[name]
            if _has_hooks(branch):
                return name
            for child, m in branch._modules.items():
                if _has_hooks(m):
                    return f"{name}.{child}"
        return None

    def _plan(self, x: torch.Tensor) -> Plan:
        """How a call on ``x`` runs: the path, then on the Triton path autocast, layouts, BatchNorm modes and
        the convolutions.

        Paths, first match: "layers" while an inner layer carries a hook (thop/``get_flops``, Grad-CAM, feature
        visualisation; said once per process): every layer is called, as in the public forms, so each hook fires
        and BatchNorm moves its statistics itself; "plain" under a deployment capture or with a BatchNorm on
        batch statistics that is not nn.BatchNorm2d (SyncBatchNorm); "torch" where the kernels do not run
        (CPU without the interpreter, float64); else "triton".

        x1 is written channels_last for fp16/bf16 and autocast on CUDA (cuDNN runs those fastest NHWC); the
        output keeps x's layout. The Triton convolutions need both BatchNorms on running statistics, no
        autocast and no gradient; ``GAM_TRITON_CONV`` is read here, once per call, and only then. The fused eval
        branch and the fused train block pad with zeros: another padding mode runs the generic Triton path
        (the convolutions on cuDNN, padded as the layers say).
        """
        hooked = self._hooked_layer()
        if hooked is not None:
            global _layers_notice_given
            if not _layers_notice_given and not torch.compiler.is_compiling():
                _layers_notice_given = True
                log.warning("gam_triton.GAM: %s carries hooks: while an inner layer of a GAM has hooks, the block "
                            "calls its layers one by one (PyTorch, as the public forms do) so that they fire, "
                            "instead of the fused kernels (said once per process)", hooked)
            return _LAYERS
        if deploying() or self._foreign_batchnorm():
            return _PLAIN
        if not _runtime.use_triton(x):
            return _TORCH
        in_cl = _runtime.is_channels_last(x)
        amp = _runtime.autocast_dtype(x.device.type)
        x1_cl = x1_channels_last(in_cl, x.is_cuda, x.dtype, amp)
        layers = self.spatial_attention._modules
        stats1, stats2 = _batch_stats(layers["1"]), _batch_stats(layers["4"])
        zeros = layers["0"].padding_mode == "zeros"
        fused_eval = zeros and amp is None and not stats1 and not stats2
        grad = fused_eval and torch.is_grad_enabled() and (
            x.requires_grad or any(t.requires_grad for t in self.parameters()))
        return Plan(amp, x1_cl, in_cl, stats1, stats2, fused_eval, zeros and stats1 and stats2,
                    conv.conv_mode() if fused_eval and not grad else "cudnn")

    # -- constants, cached while nothing they depend on changes ---------------------------------------------
    def _cached(self, name: str, tensors: list, extra: tuple, compute):
        """``compute()``, memoised on the identity and version counters of ``tensors`` and on ``extra``.

        Not cached while autograd needs the result (it must be differentiable) or under torch.compile
        (which traces the computation instead).
        """
        tensors = [t for t in tensors if t is not None]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if needs_grad or torch.compiler.is_compiling():
            return compute()
        try:
            key = (extra, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return compute()
        hit = self._eval_cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, compute())
            self._eval_cache[name] = hit
        return hit[1]

    @staticmethod
    def _bn_tensors(bn: nn.BatchNorm2d) -> list:
        return [bn.weight, bn.bias, bn.running_mean, bn.running_var]

    def _linear(self, amp: Optional[torch.dtype]) -> tuple:
        """(w1, b1, w2, b2) as the channel gate op takes them: contiguous, absent biases as zeros, in the
        autocast dtype under autocast (the op sits outside autocast's casts; nn.Linear would run there)."""
        fc1, fc2 = self.channel_attention[0], self.channel_attention[2]

        def make() -> tuple:
            w1, b1, w2, b2 = (None if t is None else t.to(amp) if amp else t
                              for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias))
            b1 = w1.new_zeros(w1.shape[0]) if b1 is None else b1
            b2 = w2.new_zeros(w2.shape[0]) if b2 is None else b2
            return tuple(t.contiguous() for t in (w1, b1, w2, b2))

        return self._cached("linear", [fc1.weight, fc1.bias, fc2.weight, fc2.bias], (amp,), make)

    def _fold1(self) -> tuple:
        """conv1 with BatchNorm1's running statistics folded in: (weight, bias)."""
        conv1, bn1 = self.spatial_attention[0], self.spatial_attention[1]
        return self._cached("conv1_bn1", [conv1.weight, conv1.bias, *self._bn_tensors(bn1)], (bn1.eps,),
                            lambda: fold_conv_bn(conv1.weight, conv1.bias, bn1))

    def _eval_constants(self, dtype: torch.dtype, packed: bool) -> tuple:
        """(w1, b1, w2, b2, scale2, shift2, packed weights or None) of the fused eval branch: BN1 folded
        into conv1, BN2 as an fp32 scale/shift, the weights in the Triton kernels' layout when they may run."""
        conv2, bn2 = self.spatial_attention[3], self.spatial_attention[4]
        w1, b1 = self._fold1()

        def make() -> tuple:
            scale2, shift2 = bn_scale_shift(bn2, w1)
            b2 = None if conv2.bias is None else conv2.bias.contiguous()
            pk = conv.pack_spatial(w1, b1, conv2.weight, conv2.groups) if packed else None
            return (w1, b1.contiguous(), conv2.weight, b2, scale2.contiguous(), shift2.contiguous(), pk)

        tensors = [w1, b1, conv2.weight, conv2.bias, *self._bn_tensors(bn2)]
        return self._cached("eval_constants", tensors, (bn2.eps, dtype, packed), make)

    @staticmethod
    def _bn_args(bn: nn.BatchNorm2d, device) -> train_block.BNArgs:
        update = bool(bn.training and bn.track_running_stats and bn.running_mean is not None)
        running = (bn.running_mean, bn.running_var, bn.num_batches_tracked) if update else \
            tuple(torch.empty(0, device=device) for _ in range(3))
        return train_block.BNArgs(bn.weight, bn.bias, running, float(bn.eps),
                                  -1.0 if bn.momentum is None else float(bn.momentum), update)

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            with warnings.catch_warnings():  # the channel count is fixed by the weights: a constant in a trace
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self._check_input(x)
        else:
            self._check_input(x)
        p = self._plan(x)
        if p.path == "layers":  # hooks on inner layers: call them
            return reference.layer_forward(self.channel_attention, self.spatial_attention, self.channel_sigmoid,
                                           self.shuffle_groups, x)
        if p.path == "plain":  # TorchScript / ONNX graph, or e.g. SyncBatchNorm
            return reference.plain_forward(self._layers(), self.channel_sigmoid, self.shuffle_groups, x)
        if x.shape[0] == 0:
            return torch.empty_like(x)
        if p.path == "torch":
            return self._forward_torch(x)
        lin = self._linear(p.amp)
        shuffle = self.shuffle_groups or 0
        conv1, bn1, conv2, bn2 = (self.spatial_attention[i] for i in (0, 1, 3, 4))
        if p.fused_train:  # train mode: forward and backward in fused kernels
            return self._train_block(x, lin, p)
        x1 = channel_gate.run(x, *lin, self.channel_sigmoid, p.x1_cl)
        if p.fused_eval:
            *consts, packed = self._eval_constants(x1.dtype, p.conv != "cudnn")
            return conv.spatial_run(x1, *consts, packed, conv1.groups, shuffle, p.out_cl, p.conv)
        if p.stats1:
            y1 = conv_like(conv1, x1, conv1.weight, conv1.bias)
            z1 = elementwise.run_bn_relu(y1, *bn_scale_shift(bn1, y1))
        else:
            w1, b1 = self._fold1()
            z1 = torch.relu_(conv_like(conv1, x1, w1, b1))
        y2 = conv_like(conv2, z1, conv2.weight, conv2.bias)
        if p.stats2:
            scale2, shift2 = bn_scale_shift(bn2, y2)
        else:  # BN2 is applied inside the final-gate kernel, for free
            scale2, shift2 = self._cached("bn2", self._bn_tensors(bn2), (bn2.eps, y2.dtype),
                                          lambda: bn_scale_shift(bn2, y2))
        return elementwise.run_final_gate(x1, y2, scale2, shift2, shuffle, p.out_cl)

    def _train_block(self, x: torch.Tensor, lin: tuple, p: Plan) -> torch.Tensor:
        """The fused train block: both BatchNorms on batch statistics (ValueError for one value per channel
        in training, as nn.BatchNorm2d)."""
        conv1, bn1, conv2, bn2 = (self.spatial_attention[i] for i in (0, 1, 3, 4))
        if x.shape[0] * x.shape[2] * x.shape[3] <= 1 and (bn1.training or bn2.training):
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{tuple(x.shape)}")
        convs = (conv1.weight, conv1.bias, conv2.weight, conv2.bias)
        if p.amp is not None and p.amp != conv1.weight.dtype:  # the convolutions run in the autocast dtype
            convs = tuple(None if t is None else t.to(p.amp) for t in convs)
        return train_block.apply(x, lin, convs, self._bn_args(bn1, x.device), self._bn_args(bn2, x.device),
                                 self.channel_sigmoid, conv1.padding[0], conv1.groups, self.shuffle_groups or 0,
                                 p.x1_cl, p.out_cl)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The PyTorch path (CPU without the interpreter, float64): BatchNorms on running statistics folded
        into the convolutions, nn.BatchNorm2d itself on batch statistics, no permute copies."""
        fc1, fc2 = self.channel_attention[0], self.channel_attention[2]
        conv1, bn1, conv2, bn2 = (self.spatial_attention[i] for i in (0, 1, 3, 4))
        x1 = channel_gate.torch_forward(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.channel_sigmoid)
        fmt = torch.channels_last if _runtime.is_channels_last(x) else torch.contiguous_format
        x1 = x1 if x1.is_contiguous(memory_format=fmt) else x1.contiguous(memory_format=fmt)
        if uses_batch_stats(bn1):
            z1 = torch.relu(bn1(conv_like(conv1, x1, conv1.weight, conv1.bias)))
        else:
            w1, b1 = self._fold1()
            z1 = torch.relu_(conv_like(conv1, x1, w1, b1))
        shuffle = self.shuffle_groups or 0
        if uses_batch_stats(bn2):
            y2 = conv_like(conv2, z1, conv2.weight, conv2.bias)
            return gate_multiply(x1, torch.sigmoid(bn2(y2)), shuffle)
        w2, b2 = self._cached("conv2_bn2", [conv2.weight, conv2.bias, *self._bn_tensors(bn2)], (bn2.eps,),
                              lambda: fold_conv_bn(conv2.weight, conv2.bias, bn2))
        return gate_multiply(x1, conv_like(conv2, z1, w2, b2).sigmoid_(), shuffle)


class TailedGAM(GAM):
    """A :class:`GAM` whose output then runs through one more module, its tail: what
    :meth:`GAM.from_module` (and so :func:`gam_triton.convert`) makes of a block holding a module after GAM,
    such as a fork's adaptive ``GAMAttention(c1, c2)`` with c2 != c1 and its ``channel_adjust`` (a 1x1 Conv +
    BN + SiLU to c2 channels).

    The GAM runs gam_triton's kernels; the tail is called as the module it is (PyTorch, its own hooks,
    modes and export). It is registered under ``tail_name``, the block's own child name, so checkpoints keep
    their keys. :meth:`to_reference` gives a :class:`gam_triton.reference.PlainTailedGAM`. The other arguments
    are :class:`GAM`'s.
    """

    def __init__(self, in_channels: int, tail: nn.Module, tail_name: str = "tail", **kwargs) -> None:
        if not isinstance(tail, nn.Module):
            raise TypeError(f"TailedGAM: tail must be an nn.Module, got {type(tail).__name__}")
        if not isinstance(tail_name, str):
            raise TypeError(f"TailedGAM: tail_name must be a str, got {type(tail_name).__name__}")
        super().__init__(in_channels, **kwargs)
        if not tail_name.isidentifier() or hasattr(self, tail_name):
            raise ValueError(f"TailedGAM: tail_name {tail_name!r} is not a free attribute name of the block")
        self.tail_name = tail_name
        self.add_module(tail_name, tail)

    @property
    def out_channels(self) -> Optional[int]:
        """None: the output has the tail's channels, which only the tail knows."""
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tail_name={self.tail_name!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[self.tail_name](super().forward(x))

    def to_reference(self) -> nn.Module:
        """:meth:`GAM.to_reference`, as a :class:`~gam_triton.reference.PlainTailedGAM` holding this tail."""
        ref = super().to_reference()
        ref._modules[self.tail_name] = self._modules[self.tail_name]
        return ref

    def _reference_form(self) -> nn.Module:
        with torch.device("meta"):
            return reference.PlainTailedGAM(self.in_channels, nn.Identity(), self.tail_name, rate=self.rate,
                                            kernel_size=self.kernel_size, channel_sigmoid=self.channel_sigmoid,
                                            shuffle_groups=self.shuffle_groups, groups=self.groups,
                                            padding_mode=self.padding_mode)


#: Instance attributes every GAM has (nn.Module internals and its configuration): what to_reference leaves.
_OWN_STATE = frozenset(vars(GAM(16)))


def _is_rename_hook(hook) -> bool:
    """One of GAM's own checkpoint-name renamers (the seed form's, a key map of another layout's)."""
    fn = getattr(hook, "hook", hook)
    return fn is reference.rename_seed_keys or isinstance(fn, reference.KeyMap)
