"""Convolution: the public op, the lax forward, the manual forward, the hand-derived backward.

``Z = X ⋆ K + B`` (cross-correlation, as in every deep-learning library).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _shapes, _windows, padding as _padding
from ._shapes import WindowConfig


def conv(x, kernel, bias=None, *, stride=1, padding="VALID", dilation=1, groups=1,
         padding_mode="zeros", impl="lax"):
    """N-d convolution (cross-correlation) ``Z = X ⋆ K + B``, channels-last.

    Args:
      x: ``(N, *spatial, C_in)``, 1, 2 or 3 spatial dims.
      kernel: ``(*window, C_in // groups, C_out)``; its rank sets the number of spatial dims.
      bias: ``(C_out,)`` or None.
      stride: an int or one int per spatial dim (positions skipped between windows).
      padding: ``"VALID"`` (none), ``"SAME"`` (output ``ceil(in / stride)``, the odd extra pad
        at the end, as in lax), an int, or one ``(low, high)`` pair per spatial dim.
      dilation: kernel dilation, an int or one per spatial dim (``d - 1`` holes between taps).
      groups: channel groups; ``groups == C_in`` with ``C_out = C_in * mult`` is depthwise.
      padding_mode: ``"zeros"`` (default), ``"reflect"``, ``"replicate"`` or ``"circular"``:
        PyTorch's; any mode but zeros pads ``x`` with :func:`jaxcnn.pad` (same ``impl``), then
        convolves with no padding.
      impl: ``"lax"`` (``lax.conv_general_dilated``, JAX's autodiff) or ``"manual"`` (explicit
        patches, the lecture's backward registered with ``jax.custom_vjp``).

    Returns:
      ``(N, *out_spatial, C_out)``, with the output-size rule of :mod:`jaxcnn._shapes`:
      ``out = floor((n + lo + hi - k_eff) / s) + 1``, ``k_eff = (k - 1) * d + 1``.

    float16 / bfloat16 inputs accumulate in float32 and return their own dtype.
    """
    fn = "conv"
    impl = _shapes.check_impl(fn, impl)
    x_shape = _shapes.check_array(fn, "x", x)
    k_shape = _shapes.check_array(fn, "kernel", kernel)
    b_shape = None if bias is None else _shapes.check_array(fn, "bias", bias)
    cfg = _shapes.conv_config(x_shape, k_shape, b_shape, stride=stride, padding=padding,
                              dilation=dilation, groups=groups)
    if _shapes.check_padding_mode(fn, padding_mode, cfg.padding, x_shape) != "zeros":
        x = _padding.pad(x, cfg.padding, mode=padding_mode, impl=impl)
        cfg = cfg._replace(padding=((0, 0),) * cfg.ndim)
    return _conv_jit(x, kernel, bias, cfg=cfg, groups=int(groups), impl=impl)


@partial(jax.jit, static_argnames=("cfg", "groups", "impl"))
def _conv_jit(x, kernel, bias, *, cfg, groups, impl):
    dtype = jnp.result_type(x, kernel, *(() if bias is None else (bias,)))
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    bias = None if bias is None else bias.astype(dtype)
    if impl == "lax":
        return _conv_lax(x, kernel, bias, cfg, groups)
    return _windows.layer_boundary(_conv_manual, x, kernel, bias, cfg, groups)


# --------------------------------------------------------------------------------------------
# The lax forward: the reference. Gradients come from JAX's own autodiff.


def _conv_lax(x, kernel, bias, cfg: WindowConfig, groups: int):
    nd = cfg.ndim
    spatial = tuple(range(1, nd + 1))
    dn = lax.ConvDimensionNumbers(lhs_spec=(0, nd + 1, *spatial),
                                  rhs_spec=(nd + 1, nd, *range(nd)),
                                  out_spec=(0, nd + 1, *spatial))
    z = lax.conv_general_dilated(
        x, kernel, window_strides=cfg.stride, padding=cfg.padding, rhs_dilation=cfg.dilation,
        dimension_numbers=dn, feature_group_count=groups,
        preferred_element_type=_windows.accum_dtype(x.dtype))
    if bias is not None:
        z = z + bias.astype(z.dtype)
    return z.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# The manual forward, written out: Z_i = Σ_m Xpad[i * s + m * d] · K_m  (+ B).


# Up to this many multiply-adds per output position and group (taps × C_in/G × C_out/G) the
# sum is written as broadcast multiply-adds, which XLA fuses into one loop over the output;
# above it, as one patch-matrix product. Same sum, two orders; the threshold is a speed choice:
# benchmarks/ops.py found the fused loop far faster for a lone tiny layer, but inside whole
# networks XLA's layout choices make it slower than the product from a few hundred terms on.
_FUSED_MACS = 32


def _correlate(x, kernel, cfg: WindowConfig, groups: int):
    """``Z = X ⋆ K`` (no bias); see :func:`_correlate_patches`."""
    return _correlate_patches(x, kernel, cfg, groups)[0]


def _correlate_patches(x, kernel, cfg: WindowConfig, groups: int):
    """``Z[n, i, co] = Σ_{m, ci} Xpad[n, i * s + m * d, ci] · K[m, ci, co]``, per group.

    Tap ``m`` is the strided slice ``Xpad[:, m * d : m * d + (out - 1) * s + 1 : s, :]``
    (:func:`jaxcnn._windows.taps`), so ``tap_m[i] = Xpad[i * s + m * d]``. Small layers sum
    ``tap_m[..., ci] · K[m, ci, :]`` term by term (one fused loop); larger ones stack the taps
    into the patch matrix ``P: (N, *out, T · C_in)`` and multiply it by the kernel flattened to
    ``(T · C_in / G, C_out)``, group by group. No ``conv_general_dilated``.

    Returns ``(Z, P)``; ``P`` is None on the term-by-term path. The backward reuses ``P``
    (kept as a residual: memory ``T`` times the layer's input, traded for one product in ``dK``).
    """
    out = _windows.out_shape(x.shape, cfg)
    t, ci, co, g = int(np.prod(cfg.window)), kernel.shape[-2], kernel.shape[-1], groups
    acc = _windows.accum_dtype(x.dtype)
    k = kernel.reshape(t, ci, g, co // g).astype(acc)          # (T, C_in/G, G, C_out/G)
    fused = t * ci * (co // g) <= _FUSED_MACS
    if fused:
        # Materialize the input and (below) the sum: otherwise XLA fuses the producer of x
        # (say a max-pool) into every one of the T·C_in terms, or the whole chain into every
        # consumer of z, and recomputes it there.
        x = lax.optimization_barrier(x)
    taps = _windows.taps(_windows.pad(x, cfg.padding), cfg, out)
    if fused:
        z = None
        for m, tap in enumerate(taps):
            tap = tap.astype(acc).reshape(*tap.shape[:-1], g, ci)      # (N, *out, G, C_in/G)
            for c in range(ci):
                term = tap[..., c:c + 1] * k[m, c]                     # (N, *out, G, C_out/G)
                z = term if z is None else z + term
        z = lax.optimization_barrier(z)
        p = None
    else:
        p = lax.optimization_barrier(_patch_matrix(taps))             # (N, *out, T * C_in)
        if g == 1:      # one plain matrix product (an einsum with a unit group axis is slower)
            z = jnp.matmul(p.reshape(-1, t * ci), k.reshape(t * ci, co),
                           preferred_element_type=acc).reshape(*p.shape[:-1], 1, co)
        else:
            z = jnp.einsum("...tgc,tcgo->...go", p.reshape(*p.shape[:-1], t, g, ci), k,
                           preferred_element_type=acc)
    return z.reshape(*z.shape[:-2], co), p


# Taps with fewer channels than this are put side by side with a concatenate, wider ones as a
# sum of channel-padded taps: XLA's CPU backend is fast at one and slow at the other depending
# on the width of the pieces (measured with benchmarks/ops.py).
_CONCAT_BELOW = 8


def _patch_matrix(taps):
    """``P[..., m * C + c] = tap_m[..., c]``: the taps side by side along the channel axis."""
    t, c = len(taps), taps[0].shape[-1]
    if c < _CONCAT_BELOW:
        return jnp.concatenate(taps, axis=-1)
    nd = taps[0].ndim
    total = None
    for m, tap in enumerate(taps):
        placed = lax.pad(tap, jnp.zeros((), tap.dtype),
                         [(0, 0, 0)] * (nd - 1) + [(m * c, (t - 1 - m) * c, 0)])
        total = placed if total is None else total + placed
    return total


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_manual(x, kernel, bias, cfg: WindowConfig, groups: int):
    """The manual convolution; its backward is :func:`_conv_bwd` (the lecture's formulas)."""
    return _conv_manual_forward(x, kernel, bias, cfg, groups)


def _conv_manual_forward(x, kernel, bias, cfg: WindowConfig, groups: int):
    """``Z = X ⋆ K + B`` through :func:`_correlate`, without the custom VJP (plain autodiff)."""
    return _add_bias(_correlate(x, kernel, cfg, groups), bias, x.dtype)


def _add_bias(z, bias, dtype):
    if bias is not None:
        z = z + bias.astype(z.dtype)
    return z.astype(dtype)


# --------------------------------------------------------------------------------------------
# The backward: the lecture's three formulas.


def _conv_fwd(x, kernel, bias, cfg, groups):
    """The forward, keeping the patch matrix ``P`` (when it was built) for ``dK = Pᵀ · dZ``."""
    z, patches = _correlate_patches(x, kernel, cfg, groups)
    return _add_bias(z, bias, x.dtype), (x, kernel, bias is not None, patches)


def _conv_bwd(cfg: WindowConfig, groups: int, res, dz):
    """Backward of ``Z = X ⋆ K + B`` for ``L(Z)``, with ``dZ = dL/dZ``:

    - ``dK = X ⋆ dZ``: ``dK_m = Σ_{n,i} Xpad[n, i * s + m * d] · dZ[n, i]`` for each kernel
      offset ``m`` (the chain rule ``dL/dK_m = Σ_i dL/dz_i · ∂z_i/∂K_m`` with
      ``∂z_i/∂K_m = Xpad[i * s + m * d]``). With stride ``s`` the correlation steps through
      ``X`` in jumps of ``s`` (``dZ`` dilated by ``s - 1`` zeros); the stride-remainder rows
      the forward dropped are never read. With groups, per group. (:func:`_conv_kernel_grad`)
    - ``dB = Σ_{n,i} dZ[n, i]``.
    - ``dX = pad(dilate_s(dZ)) ⋆ rot180(K)ᵀ``: the full convolution of the zero-padded,
      stride-dilated ``dZ`` with the kernel rotated by 180° and its in/out channels swapped
      (per group), with the forward's kernel dilation ``d``; paddings from
      :func:`jaxcnn._shapes.conv_input_grad_padding` (negative = crop). That gather form is
      :func:`_conv_input_grad_gather`; what runs here is :func:`_conv_input_grad_scatter`, the
      same sum in the other order (derived in its docstring), which benchmarks/ops.py measured
      to be several times faster on CPU. The tests check that both forms agree.
    """
    x, kernel, has_bias, patches = res
    # Materialize the operands of the products below: XLA's CPU backend otherwise fuses their
    # elementwise producers into each product and falls back to a slow naive loop.
    x, dz = lax.optimization_barrier((x, dz))
    dk = _conv_kernel_grad(x, dz, cfg, groups, kernel.shape, patches)
    db = None
    if has_bias:
        db = jnp.sum(dz, axis=tuple(range(dz.ndim - 1)), dtype=_windows.accum_dtype(dz.dtype))
    dx = _conv_input_grad_scatter(dz, kernel, x.shape, cfg, groups)
    return dx.astype(x.dtype), dk.astype(kernel.dtype), None if db is None else db.astype(dz.dtype)


def _conv_kernel_grad(x, dz, cfg: WindowConfig, groups: int, k_shape, patches=None):
    """``dK = X ⋆ dZ``: ``dK[m, c, g, o] = Σ_{n,i} tap_m[n, i, g, c] · dZ[n, i, g, o]``.

    ``tap_m[i] = Xpad[i * s + m * d]`` are the forward's own taps, so the stride steps through
    ``X`` (``dZ`` acts as a kernel dilated by ``s``), the kernel dilation ``d`` spaces the
    offsets ``m``, and the stride-remainder rows are never read. With the forward's patch matrix
    ``P`` (its taps side by side) this is one product ``Pᵀ · dZ`` contracting over every batch
    and output position, group by group; without it, one product per offset ``m``.
    """
    acc = _windows.accum_dtype(x.dtype)
    g, ci, co = groups, x.shape[-1] // groups, dz.shape[-1]
    d = dz.reshape(-1, g, co // g)                                     # (N·out, G, C_out/G)
    if patches is not None:
        t = patches.shape[-1] // (g * ci)
        p = patches.reshape(-1, t, g, ci)                              # (N·out, T, G, C_in/G)
        return jnp.einsum("ptgc,pgo->tcgo", p, d, preferred_element_type=acc).reshape(k_shape)
    taps = _windows.taps(_windows.pad(x, cfg.padding), cfg, dz.shape[1:-1])
    taps = lax.optimization_barrier(taps)
    dk = [jnp.einsum("pgc,pgo->cgo", tap.reshape(-1, g, ci), d, preferred_element_type=acc)
          for tap in taps]
    return jnp.stack(dk).reshape(k_shape)


def _rot180_swap(kernel, groups: int):
    """``rot180(K)`` with in/out channels swapped per group: ``(*w, C_in/G, C_out)`` →
    ``(*w, C_out/G, C_in)``. ``rot180`` flips every spatial axis (a 180° turn in 2-D)."""
    nd = kernel.ndim - 2
    w, ci, co = kernel.shape[:nd], kernel.shape[-2], kernel.shape[-1]
    k = jnp.flip(kernel, axis=tuple(range(nd)))
    k = k.reshape(*w, ci, groups, co // groups)                # (*w, C_in/G, G, C_out/G)
    k = jnp.moveaxis(k, -3, -1)                                 # (*w, G, C_out/G, C_in/G)
    k = jnp.swapaxes(k, -3, -2)                                 # (*w, C_out/G, G, C_in/G)
    return k.reshape(*w, co // groups, groups * ci)


def _conv_input_grad_gather(dz, kernel, x_shape, cfg: WindowConfig, groups: int):
    """Gather form: ``dX = pad(dilate_s(dZ)) ⋆ rot180(K)ᵀ`` at stride 1, kernel dilation ``d``.

    ``dilate_s`` inserts ``s - 1`` zeros between the entries of ``dZ``; ``pad`` uses
    ``low = k_eff - 1 - lo``, ``high = k_eff - 1 - hi + r`` (``r`` the stride remainder),
    negative values cropping. The convolution is the manual one (:func:`_conv_manual`, so
    grad-of-grad again uses the hand-derived rule): backprop through a conv is a conv.
    """
    spatial = x_shape[1:-1]
    dz_dil = _windows.pad(dz, ((0, 0),) * cfg.ndim, interior=tuple(s - 1 for s in cfg.stride))
    back = WindowConfig(cfg.window, (1,) * cfg.ndim,
                        _shapes.conv_input_grad_padding(spatial, cfg), cfg.dilation)
    return _conv_manual(dz_dil, _rot180_swap(kernel, groups), None, back, groups)


def _conv_input_grad_scatter(dz, kernel, x_shape, cfg: WindowConfig, groups: int):
    """Scatter form of the same ``dX``: ``dX = Σ_m place_m(dZ · K_mᵀ)``.

    Each output ``z_i`` received ``Σ_m Xpad[i s + m d] K_m``, so ``∂L/∂Xpad[p] =
    Σ_{(i, m): i s + m d = p} dZ_i K_mᵀ``: compute ``dZ · K_mᵀ`` for every offset ``m`` (one
    matrix product), put it back at positions ``i s + m d`` (:func:`_windows.overlap_add`,
    which also crops the forward padding) and sum over ``m``. Substituting ``m' = k - 1 - m``
    (rot180) and ``p = j + m' d - (k_eff - 1)`` shows that this is the gather form's full
    convolution with the terms summed in the other order: for every ``p`` both sum
    ``dZ_i K_mᵀ`` over the same pairs ``(i, m)``.

    Half-precision ``dZ`` (float16 / bfloat16): the products and the overlap-add both run in
    float32; the caller rounds ``dX`` once, at the end.
    """
    t = int(np.prod(cfg.window))
    ci, co = kernel.shape[-2], kernel.shape[-1]
    acc = _windows.accum_dtype(dz.dtype)
    k = kernel.reshape(t, ci, groups, co // groups)             # (T, C_in/G, G, C_out/G)
    d = dz.reshape(*dz.shape[:-1], groups, co // groups)        # (N, *out, G, C_out/G)
    if groups == 1:     # one product dZ · [K_0 … K_T-1]ᵀ, then the slice of each offset
        c = jnp.matmul(dz.reshape(-1, co), kernel.reshape(t * ci, co).T,
                       preferred_element_type=acc)
        c = lax.optimization_barrier(c.reshape(*dz.shape[:-1], t * ci))
        contribs = [c[..., m * ci:(m + 1) * ci] for m in range(t)]
    else:
        contribs = [jnp.einsum("...go,cgo->...gc", d, k[m], preferred_element_type=acc)
                    .reshape(*dz.shape[:-1], groups * ci) for m in range(t)]
    return _windows.overlap_add(contribs, x_shape[1:-1], cfg)


_conv_manual.defvjp(_conv_fwd, _conv_bwd)
