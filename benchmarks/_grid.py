"""The per-op benchmark grid of ``benchmarks/ops.py``: which shapes, and why.

A deliberate sample, not the full product (issue 9 §2): every spatial rank (1-, 2-, 3-D),
kernels 1, 3, 5, 7, 11 and long 1-D ones (33, 129), channels from 1 and 3 up to 256 in and
out (narrow outputs such as 6 and 16, wide ones such as 256), strides 1, 2 and 4 (with and
without a stride remainder), kernel dilation, groups (2, 4) and depthwise (multiplier 1 and
2), explicit uneven padding, batch 1, 32 and 128; every layer of LeNet-5, of the CIFAR stack
and of ``jaxcnn.models.small_cnn``; max and average pooling, overlapping and not, 1- to 3-D, a
7×7 window; dense layers and the dense + cross-entropy head. Sizes are chosen so that lax's
forward takes roughly 0.3-30 ms on a 2-core CPU: up to about 1,000 million multiply-adds for
dense channels, far fewer for grouped and depthwise convolutions, which XLA:CPU runs at a
small fraction of its matrix rate (measured on a loaded 2-core VM: a 3-D depthwise 3×3×3
convolution of 113 million multiply-adds took lax 3 s).
Where this jaxcnn has them, ``conv_transpose`` (a few conv cases, transposed) and global /
adaptive pooling are added; without them the script runs as before.

A case is ``op(x, *params, impl=...)`` with the shapes of ``x`` and the params. ``quick``
marks the subset of ``--quick``. With ``smoke=True`` every case keeps its name (so
``--filter`` and ``--quick`` select the same cases) but runs on tiny shapes: batch 2, a few
positions per spatial dim, at most 4 channels per group and 2 groups.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple

import jax.numpy as jnp

import jaxcnn as jc


class Case(NamedTuple):
    section: str
    name: str
    op: Callable            # op(x, *params, impl=...) -> array (or a scalar loss)
    shapes: tuple           # shapes of (x, *params)
    macs: int               # multiply-adds of the forward at full size (0: not a product)
    quick: bool = False


def cases(smoke: bool = False) -> list[Case]:
    """Every case of the grid, in the order of the report."""
    g = _Builder(smoke)
    _conv_cases(g)
    _conv_transpose_cases(g)
    _pool_cases(g)
    _global_pool_cases(g)
    _dense_cases(g)
    return g.cases


def missing_ops() -> list[str]:
    """Ops the grid would cover that this jaxcnn does not have yet (their cases are skipped)."""
    names = ("conv_transpose", "global_avg_pool", "global_max_pool", "adaptive_avg_pool",
             "adaptive_max_pool")
    return [n for n in names if not hasattr(jc, n)]


# --------------------------------------------------------------------------------------------
# The cases.


def _conv_cases(g):
    """The convolution rows, one call per case (a long list on purpose: it is the grid)."""
    c = g.conv
    # Every conv layer of the three networks (batch 128).
    c(2, 128, 28, 1, 6, 5, net="LeNet-5", quick=True)
    c(2, 128, 14, 6, 16, 5, padding="VALID", net="LeNet-5", quick=True)
    c(2, 128, 32, 3, 32, 3, net="CIFAR")
    c(2, 128, 16, 32, 64, 3, net="CIFAR", quick=True)
    c(2, 128, 8, 64, 128, 3, net="CIFAR")
    c(2, 128, 28, 1, 32, 3, net="small_cnn")
    c(2, 128, 28, 32, 32, 3, net="small_cnn")
    c(2, 128, 14, 32, 64, 3, net="small_cnn")
    c(2, 128, 14, 64, 64, 3, net="small_cnn")
    # 2-D: kernel sizes, channels, batch 1.
    c(2, 32, 28, 64, 256, 1)
    c(2, 32, 14, 256, 64, 1)
    c(2, 1, 224, 3, 16, 3)
    c(2, 1, 14, 256, 256, 3)
    c(2, 32, 8, 128, 256, 3)
    c(2, 128, 64, 1, 1, 3)
    c(2, 32, 16, 256, 6, 3)
    c(2, 128, 32, 3, 6, 5, padding="VALID")
    c(2, 32, 28, 7, 32, 5)       # both sides of the old 8-channel threshold
    c(2, 32, 28, 8, 32, 5)
    c(2, 32, 28, 32, 32, 5)
    c(2, 32, 17, 64, 64, (1, 7))  # a rectangular (Inception-style) kernel
    c(2, 32, 20, 16, 16, 11)
    # 2-D: strides (with and without a stride remainder), explicit uneven padding.
    c(2, 32, 56, 16, 32, 7, stride=2, quick=True)
    c(2, 1, 224, 3, 64, 7, stride=2)
    c(2, 1, 224, 3, 64, 11, stride=4, padding="VALID")
    c(2, 128, 32, 32, 64, 3, stride=2)
    c(2, 32, 64, 16, 32, 3, stride=4)
    c(2, 128, 16, 64, 128, 1, stride=2)
    c(2, 32, 30, 16, 16, 3, stride=2, padding=((2, 1), (0, 2)))
    # 2-D: kernel dilation, groups, depthwise.
    c(2, 32, 32, 32, 32, 3, dilation=2, quick=True)
    c(2, 32, 32, 16, 16, 3, dilation=4)
    c(2, 32, 32, 64, 64, 3, stride=2, dilation=2)
    c(2, 32, 16, 64, 64, 3, groups=2)
    c(2, 32, 8, 128, 128, 3, groups=4, quick=True)
    c(2, 32, 16, 64, 64, 3, groups=64, quick=True)
    c(2, 32, 16, 32, 64, 3, groups=32)
    c(2, 32, 16, 128, 128, 5, stride=2, groups=128)
    c(2, 1, 28, 256, 256, 7, groups=256)
    # 1-D: short, long, strided, dilated kernels.
    c(1, 32, 256, 128, 128, 1)
    c(1, 32, 256, 64, 64, 3)
    c(1, 128, 1024, 1, 16, 5)
    c(1, 32, 512, 32, 64, 7, stride=2)
    c(1, 32, 4096, 1, 32, 11, stride=4)
    c(1, 32, 1024, 16, 16, 33, quick=True)
    c(1, 32, 512, 16, 16, 129, quick=True)
    c(1, 1, 16384, 1, 8, 129)
    c(1, 32, 256, 64, 64, 33, groups=64)
    c(1, 32, 1024, 32, 32, 3, dilation=4)
    # 3-D.
    c(3, 32, 12, 1, 8, 3)
    c(3, 32, 8, 16, 32, 3)
    c(3, 1, 16, 32, 32, 3)
    c(3, 32, 16, 16, 32, 3, stride=2, quick=True)
    c(3, 1, 32, 3, 16, 7, stride=2)
    c(3, 32, 10, 8, 8, 5, padding="VALID")
    c(3, 32, 8, 64, 64, 1)
    c(3, 1, 16, 16, 16, 3, groups=16)


# conv cases (by name) that also run transposed: a 3x3 layer, 2x upsampling by a strided
# 3x3 and 7x7, a long 1-D kernel, a strided 3-D kernel.
_TRANSPOSED = (
    "2-D 3x3 32->64 SAME 16x16 N128 [CIFAR]",
    "2-D 3x3 32->64 s2 SAME 32x32 N128",
    "2-D 7x7 16->32 s2 SAME 56x56 N32",
    "1-D 33 16->16 SAME 1024 N32",
    "3-D 3x3x3 16->32 s2 SAME 16x16x16 N32",
)


def _conv_transpose_cases(g):
    sources = [c for c in g.cases if c.section == "conv" and c.name in _TRANSPOSED]
    if len(sources) != len(_TRANSPOSED):  # a conv case was renamed: keep the two in step
        missing = set(_TRANSPOSED) - {c.name for c in sources}
        raise RuntimeError(f"benchmarks/_grid.py: _TRANSPOSED names no conv case: {missing}")
    if not hasattr(jc, "conv_transpose"):
        return
    for case in sources:
        g.transpose(case, quick=case.name.startswith("2-D 3x3 32->64 s2"))


def _pool_cases(g):
    p = g.pool
    p("max", 2, 128, 28, 6, 2, net="LeNet-5")
    p("max", 2, 128, 10, 16, 2, net="LeNet-5")
    p("max", 2, 128, 32, 32, 2, net="CIFAR", quick=True)
    p("max", 2, 128, 16, 64, 2, net="CIFAR")
    p("max", 2, 128, 8, 128, 2, net="CIFAR")
    p("max", 2, 32, 56, 64, 3, stride=2, padding="SAME", quick=True)
    p("max", 2, 32, 28, 32, 3, stride=1, padding="SAME")
    p("max", 2, 32, 32, 16, 7, stride=2, padding="SAME")
    p("max", 2, 1, 112, 128, 2)
    p("max", 1, 32, 1024, 64, 2)
    p("max", 3, 32, 16, 16, 2)
    p("avg", 2, 128, 28, 1, 2)
    p("avg", 2, 128, 28, 6, 2)
    p("avg", 2, 32, 28, 32, 3, stride=1, padding="SAME", quick=True)
    p("avg", 2, 32, 28, 32, 3, stride=1, padding="SAME", count_include_pad=False)
    p("avg", 2, 32, 32, 64, 3, stride=2)
    p("avg", 2, 128, 7, 64, 7)
    p("avg", 1, 32, 1024, 32, 3, stride=1, padding="SAME")
    p("avg", 3, 32, 16, 8, 3, stride=2)


def _global_pool_cases(g):
    if hasattr(jc, "global_avg_pool"):
        g.other("global pool", "global_avg_pool 7x7x64 N128", jc.global_avg_pool,
                (128, 7, 7, 64), quick=True)
    if hasattr(jc, "global_max_pool"):
        g.other("global pool", "global_max_pool 14x14x256 N32", jc.global_max_pool,
                (32, 14, 14, 256))
    if hasattr(jc, "adaptive_avg_pool"):
        g.other("global pool", "adaptive_avg_pool 14x14x64 -> 3x3 N32",
                partial(jc.adaptive_avg_pool, output_size=3), (32, 14, 14, 64))
    if hasattr(jc, "adaptive_max_pool"):
        g.other("global pool", "adaptive_max_pool 13x13x32 -> 4x4 N32",
                partial(jc.adaptive_max_pool, output_size=4), (32, 13, 13, 32))


def _dense_cases(g):
    d = g.dense
    d(128, 400, 120, net="LeNet-5")
    d(128, 84, 10, head=True, net="LeNet-5", quick=True)
    d(128, 2048, 10, head=True, net="CIFAR")
    d(128, 3136, 256, net="small_cnn", quick=True)
    d(32, 1024, 1024)
    d(1, 2048, 2048)
    g.other("dense", "relu 28x28x6 N128 [LeNet-5]", jc.relu, (128, 28, 28, 6))


# --------------------------------------------------------------------------------------------
# Building the cases (full size or smoke size).


class _Builder:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.cases: list[Case] = []

    def conv(self, nd, batch, size, c_in, c_out, window, *, stride=1, padding="SAME",
             dilation=1, groups=1, net="", quick=False):
        k = _tuple(window, nd)
        spatial = _tuple(size, nd)
        cfg = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        name = _conv_name(nd, batch, spatial, c_in, c_out, k, cfg, net)
        macs = (batch * math.prod(_out_spatial(spatial, k, cfg)) * math.prod(k)
                * (c_in // groups) * c_out)
        if self.smoke:
            batch, spatial, c_in, c_out, cfg = _small_conv(spatial, c_in, c_out, k, cfg)
        op = partial(_conv_op, **cfg)
        shapes = ((batch, *spatial, c_in), (*k, c_in // cfg["groups"], c_out), (c_out,))
        self.cases.append(Case("conv", name, op, shapes, macs, quick))

    def transpose(self, conv_case: Case, quick=False):
        """``conv_transpose`` with the conv case's kernel, from its output back to its input."""
        x_shape, k_shape, _ = conv_case.shapes
        cfg = conv_case.op.keywords
        y_shape = (x_shape[0], *_out_spatial(x_shape[1:-1], k_shape[:-2], cfg), k_shape[-1])
        op = partial(_conv_transpose_op, **cfg)
        self.cases.append(Case("conv_transpose", "T " + conv_case.name, op, (y_shape, k_shape),
                               conv_case.macs, quick))

    def pool(self, kind, nd, batch, size, channels, window, *, stride=None, padding="VALID",
             count_include_pad=True, net="", quick=False):
        spatial = _tuple(size, nd)
        w = "x".join([str(window)] * nd)
        s = f" s{stride}" if stride is not None else f" /{window}"
        extra = "" if count_include_pad else " count_include_pad=False"
        name = (f"{kind}_pool {nd}-D {w}{s} {padding}{extra} "
                f"{'x'.join(map(str, spatial))}x{channels} N{batch}" + (f" [{net}]" if net else ""))
        if self.smoke:
            batch, channels = 2, min(channels, 4)
            spatial = tuple(min(n, 8 if nd > 1 else 24) for n in spatial)
            spatial = tuple(max(n, window) for n in spatial)
        opts = dict(stride=stride, padding=padding)
        if kind == "avg":
            opts["count_include_pad"] = count_include_pad
        op = partial(jc.max_pool if kind == "max" else jc.avg_pool, window=window, **opts)
        self.cases.append(Case("pool", name, op, ((batch, *spatial, channels),), 0, quick))

    def dense(self, batch, d_in, d_out, *, head=False, net="", quick=False):
        name = (f"dense {d_in}->{d_out}{' + cross_entropy' if head else ''} N{batch}"
                + (f" [{net}]" if net else ""))
        macs = batch * d_in * d_out
        if self.smoke:
            batch, d_in, d_out = 2, min(d_in, 16), min(d_out, 16)
        op = partial(_dense_head_op, batch=batch) if head else jc.dense
        self.cases.append(Case("dense", name, op, ((batch, d_in), (d_in, d_out), (d_out,)),
                               macs, quick))

    def other(self, section, name, op, x_shape, *, quick=False):
        """A parameterless op of ``x`` alone (relu, global and adaptive pooling)."""
        if self.smoke:
            x_shape = (2, *(min(n, 8) for n in x_shape[1:-1]), min(x_shape[-1], 4))
        self.cases.append(Case(section, name, op, (tuple(x_shape),), 0, quick))


def _conv_op(x, kernel, bias, *, impl, **cfg):
    return jc.conv(x, kernel, bias, impl=impl, **cfg)


def _conv_transpose_op(y, kernel, *, impl, **cfg):
    return jc.conv_transpose(y, kernel, impl=impl, **cfg)


def _dense_head_op(x, w, b, *, impl, batch):
    labels = jnp.arange(batch) % w.shape[1]
    return jc.cross_entropy(jc.dense(x, w, b, impl=impl), labels, impl=impl)


def _small_conv(spatial, c_in, c_out, k, cfg):
    """The smoke-size version of a conv case: batch 2, <= 2 groups of <= 4 channels each way,
    a few positions per dim (at least the dilated window where the padding is VALID)."""
    groups = cfg["groups"]
    g = min(groups, 2)
    c_in_g, c_out_g = min(c_in // groups, 4), min(c_out // groups, 4)
    nd = len(spatial)
    k_eff = [(kk - 1) * _tuple(cfg["dilation"], nd)[i] + 1 for i, kk in enumerate(k)]
    small = [min(n, 8 if nd > 1 else 24) for n in spatial]
    if cfg["padding"] == "VALID":
        small = [max(n, ke) for n, ke in zip(small, k_eff)]
    return 2, tuple(small), g * c_in_g, g * c_out_g, {**cfg, "groups": g}


def _out_spatial(spatial, k, cfg):
    nd = len(spatial)
    s, d = _tuple(cfg["stride"], nd), _tuple(cfg["dilation"], nd)
    out = []
    for i, n in enumerate(spatial):
        k_eff = (k[i] - 1) * d[i] + 1
        if cfg["padding"] == "SAME":
            out.append(-(-n // s[i]))
            continue
        lo, hi = (0, 0) if cfg["padding"] == "VALID" else cfg["padding"][i]
        out.append((n + lo + hi - k_eff) // s[i] + 1)
    return out


def _conv_name(nd, batch, spatial, c_in, c_out, k, cfg, net):
    parts = [f"{nd}-D", "x".join(map(str, k)), f"{c_in}->{c_out}"]
    if cfg["stride"] != 1:
        parts.append(f"s{cfg['stride']}")
    if cfg["dilation"] != 1:
        parts.append(f"d{cfg['dilation']}")
    if cfg["groups"] == c_in and c_in > 1:
        parts.append("depthwise" + (f" x{c_out // c_in}" if c_out != c_in else ""))
    elif cfg["groups"] != 1:
        parts.append(f"g{cfg['groups']}")
    pad = cfg["padding"]
    parts.append(pad if isinstance(pad, str) else "pad" + str(pad).replace(" ", ""))
    parts += ["x".join(map(str, spatial)), f"N{batch}"]
    return " ".join(parts) + (f" [{net}]" if net else "")


def _tuple(v, nd):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd
