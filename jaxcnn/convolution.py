"""Convolution and its transpose: public ops, lax forwards, manual forwards, hand-derived
backwards, registrations.

``Z = X ⋆ K + B`` (cross-correlation, as in every deep-learning library), and
``conv_transpose``, its exact adjoint in ``X``.

Understanding the two ops together. For a fixed kernel, ``conv`` is a linear map ``A_K: X ↦
X ⋆ K``. The lecture's backward of ``conv`` is three sums over the pairs ``(i, m)`` of an
output position and a kernel tap (``p = i · s + m · d`` the padded input position they meet):

    Z_i  = Σ_m Xpad_p · K_m                (forward:          A_K X)
    dK_m = Σ_i Xpad_p · dZ_i               (kernel gradient:  X ⋆ dZ)
    dX_p = Σ_{(i, m) → p} dZ_i · K_mᵀ      (input gradient:   A_Kᵀ dZ)

``conv_transpose(Y, K)`` *is* ``A_Kᵀ Y``: its forward is the third line with ``dZ := Y``. Its
backward is the other two lines with the roles swapped: ``dY = A_K dX = dX ⋆ K`` (conv's
forward) and ``dK_m = Σ_i dXpad_p · Y_i`` (conv's kernel gradient with ``X := dX``,
``dZ := Y``). So the three products of :mod:`jaxcnn._patches` serve both ops, and each op's
backward calls the other op's forward.

Where a dim's stride and dilation share a factor ``g`` (stride 2, dilation 2), ``p = i · s +
m · d`` is a multiple of ``g``: the manual ``conv`` reads only every ``g``-th input position
there, so it convolves those, ``x[r::g]``, with stride ``s/g`` and dilation ``d/g``
(:func:`jaxcnn._shapes.conv_phase`): the same sums over ``g`` times less input per such dim.
The slice's gradient (zeros between the positions read) is JAX's. Measured, 3x3 64->64
stride 2 dilation 2 at 32x32, batch 32, manual / lax: forward 1.91 -> 0.80, forward+backward
0.72 -> 0.37.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from . import _patches, _shapes, _windows, _xla_cpu, padding as _padding
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
    phase = _shapes.conv_phase(x.shape[1:-1], cfg)
    if phase is not None:   # stride and dilation share a factor: read only what is read
        x = lax.slice(_xla_cpu.unit_scale(x), (0, *phase.start, 0),
                      (x.shape[0], *phase.limit, x.shape[-1]), (1, *phase.step, 1))
        cfg = phase.cfg
    return _conv_manual(x, kernel, bias, cfg, groups)


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
    return _add_bias(z, bias, x.dtype)


# --------------------------------------------------------------------------------------------
# The manual forward, written out: Z_i = Σ_m Xpad[i * s + m * d] · K_m  (+ B).


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_manual(x, kernel, bias, cfg: WindowConfig, groups: int):
    """The manual convolution; its backward is :func:`_conv_bwd` (the lecture's formulas).
    Each of the three runs as a layer apart (:func:`jaxcnn._windows.layer_boundary`)."""
    return _windows.layer_boundary(_conv_manual_forward, x, kernel, bias, cfg, groups)


def _conv_manual_forward(x, kernel, bias, cfg: WindowConfig, groups: int):
    """``Z = X ⋆ K + B``: ``Z[n, i, co] = Σ_{m, ci} Xpad[n, i * s + m * d, ci] · K[m, ci, co]``
    per group, as the product ``Z = P · K`` of the patch matrix ``P`` (row ``i`` = the window of
    output ``i``) with the kernel flattened to ``(T · C_in / G, C_out)``
    (:func:`jaxcnn._patches.correlate`, tile by tile). No ``conv_general_dilated``."""
    return _add_bias(_patches.correlate(x, kernel, cfg, groups), bias, x.dtype)


def _add_bias(z, bias, dtype):
    if bias is not None:
        z = z + bias.astype(z.dtype)
    return z.astype(dtype)


# --------------------------------------------------------------------------------------------
# The backward: the lecture's three formulas.


def _conv_fwd(x, kernel, bias, cfg, groups):
    """The forward, keeping only ``X`` and ``K`` (the patches are rebuilt, tile by tile)."""
    return _conv_manual_forward(x, kernel, bias, cfg, groups), (x, kernel, bias is not None)


def _conv_bwd(cfg: WindowConfig, groups: int, res, dz):
    """Backward of ``Z = X ⋆ K + B`` for ``L(Z)``, with ``dZ = dL/dZ``:

    - ``dK = X ⋆ dZ``: ``dK_m = Σ_{n,i} Xpad[n, i * s + m * d] · dZ[n, i]`` for each kernel
      offset ``m`` (the chain rule ``dL/dK_m = Σ_i dL/dz_i · ∂z_i/∂K_m`` with
      ``∂z_i/∂K_m = Xpad[i * s + m * d]``): the product ``dK = Pᵀ · dZ`` with the forward's
      patch matrix, which contracts over every batch and output position. The stride steps
      through ``X`` in jumps of ``s`` (``dZ`` acts as a kernel dilated by ``s``); the
      stride-remainder rows the forward dropped are never read. Per group.
    - ``dB = Σ_{n,i} dZ[n, i]``.
    - ``dX``: the lecture's ``dX = pad(dilate_s(dZ)) ⋆ rot180(K)ᵀ``, the full convolution of
      the zero-padded, stride-dilated ``dZ`` with the kernel rotated by 180° and its in/out
      channels swapped per group (:func:`_conv_input_grad_gather`; paddings from
      :func:`jaxcnn._shapes.conv_input_grad_padding`). That is what runs when every stride is
      1: backprop through a convolution is a convolution, on the same engine as the forward.
      With a stride the dilated ``dZ`` is mostly zeros, so the same sum runs in the scatter
      order instead: output ``z_i`` received ``Σ_m Xpad[i s + m d] K_m``, so ``∂L/∂Xpad[p] =
      Σ_{(i, m): i s + m d = p} dZ_i K_mᵀ``: one product ``dZ · Kᵀ`` gives every
      ``dZ_i K_mᵀ``, column block ``m`` is put back at the positions ``i s + m d`` that tap
      ``m`` read, summed where windows overlap, and the forward padding is cropped away
      (``dX = col2im(dZ · Kᵀ)``, :func:`_conv_input_grad_scatter`). Substituting
      ``m' = k - 1 - m`` and ``p = j + m' d - (k_eff - 1)`` shows that both orders sum
      ``dZ_i K_mᵀ`` over the same pairs for every ``p``; the tests check both at every stride.

    Each product accumulates in float32 for half precision and is rounded once. ``dX`` starts
    after ``dK`` is done (:func:`jaxcnn._xla_cpu.after`: on CPU the two ran side by side and
    slowed each other down more than twofold).
    """
    x, kernel, has_bias = res
    dk = _patches.kernel_grad(x, dz, kernel.shape, cfg, groups)
    db = None
    if has_bias:
        db = jnp.sum(dz, axis=tuple(range(dz.ndim - 1)), dtype=_windows.accum_dtype(dz.dtype))
    dx = _xla_cpu.after(dk, lambda dz, kernel: _conv_input_grad(dz, kernel, x.shape, cfg,
                                                                 groups), dz, kernel)
    return dx.astype(x.dtype), dk.astype(kernel.dtype), None if db is None else db.astype(dz.dtype)


_windows.defvjp_apart(_conv_manual, _conv_fwd, _conv_bwd)


def _conv_input_grad(dz, kernel, x_shape, cfg: WindowConfig, groups: int):
    """``dX``, in the order that costs no more than the forward (see :func:`_conv_bwd`): the
    lecture's gather order when every stride is 1 (then nothing is dilated), the scatter order
    otherwise (the gather order would multiply the ``s - 1`` zeros between dilated rows)."""
    if all(s == 1 for s in cfg.stride):
        return _conv_input_grad_gather(dz, kernel, x_shape, cfg, groups)
    return _conv_input_grad_scatter(dz, kernel, x_shape, cfg, groups)


def _conv_input_grad_scatter(dz, kernel, x_shape, cfg: WindowConfig, groups: int):
    """``dX = col2im(dZ · Kᵀ)`` (the scatter order; see :func:`_conv_bwd`)."""
    return _patches.input_grad(dz, kernel, x_shape, cfg, groups)


def _conv_input_grad_gather(dz, kernel, x_shape, cfg: WindowConfig, groups: int):
    """Gather order: ``dX = pad(dilate_s(dZ)) ⋆ rot180(K)ᵀ`` at stride 1, kernel dilation ``d``.

    ``dilate_s`` inserts ``s - 1`` zeros between the entries of ``dZ``; ``pad`` uses
    ``low = k_eff - 1 - lo``, ``high = k_eff - 1 - hi + r`` (``r`` the stride remainder;
    :func:`jaxcnn._shapes.conv_input_grad_padding`), negative values cropping. The convolution is
    the manual one: backprop through a conv is a conv. The lecture's form, kept as the reference
    that the scatter order runs against in the tests and in ``--explain``.
    """
    spatial = x_shape[1:-1]
    dz_dil = _windows.pad(dz, ((0, 0),) * cfg.ndim, interior=tuple(s - 1 for s in cfg.stride))
    back = WindowConfig(cfg.window, (1,) * cfg.ndim,
                        _shapes.conv_input_grad_padding(spatial, cfg), cfg.dilation)
    dz_dil = _windows.pad(dz_dil, tuple((min(lo, 0), min(hi, 0)) for lo, hi in back.padding))
    back = back._replace(padding=tuple((max(lo, 0), max(hi, 0)) for lo, hi in back.padding))
    return _conv_manual_forward(dz_dil, _rot180_swap(kernel, groups), None, back, groups)


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


# ============================================================================================
# conv_transpose: X = A_Kᵀ Y, the exact adjoint of conv in its input.


def conv_transpose(y, kernel, bias=None, *, stride=1, padding="VALID", dilation=1, groups=1,
                   output_padding=0, impl="lax"):
    """Transposed convolution: the adjoint of :func:`conv` in its input, channels-last.

    ``kernel`` is the very array :func:`conv` would use to map the result back to ``y``, with
    the same ``stride``, ``padding``, ``dilation`` and ``groups``: for every ``x`` and ``y``,
    ``⟨conv(x, K), y⟩ = ⟨x, conv_transpose(y, K)⟩`` (``x`` of the result's shape). This is
    PyTorch's ``ConvTranspose`` (whose ``padding`` is the padding of the convolution it
    transposes) and the gradient of a convolution with respect to its input.

    Args:
      y: ``(N, *spatial, C_in)``, 1, 2 or 3 spatial dims; ``C_in = kernel.shape[-1]``.
      kernel: ``(*window, C_out // groups, C_in)``: the kernel of the convolution from the
        result (``C_out`` channels) to ``y``.
      bias: ``(C_out,)`` or None.
      stride, dilation, groups: those of the convolution being transposed.
      padding: that convolution's padding: ``"VALID"``, an int, ``(low, high)`` pairs, or
        ``"SAME"`` (the result has spatial size ``in * stride``).
      output_padding: an int or one per spatial dim, ``0 <= output_padding < max(stride,
        dilation)``: extra rows at the end of the result, choosing among the input sizes that a
        strided convolution maps to the same output size (as in PyTorch).
      impl: ``"lax"`` (the transpose of ``lax.conv_general_dilated`` derived by
        ``jax.linear_transpose``, JAX's autodiff) or ``"manual"`` (the lecture's ``dX``
        formula as the forward, :func:`_conv_transpose_bwd` as the backward).

    Returns:
      ``(N, *out_spatial, C_out)`` with ``out = (in - 1) * s - lo - hi + k_eff +
      output_padding`` (:func:`jaxcnn._shapes.conv_transpose_config`).

    Padding modes other than zeros do not apply: the transpose of reflect/replicate/circular
    padding would fold values back onto the border, which no framework's transposed
    convolution does (PyTorch's ``ConvTranspose`` accepts only ``padding_mode="zeros"``).
    """
    fn = "conv_transpose"
    impl = _shapes.check_impl(fn, impl)
    y_shape = _shapes.check_array(fn, "y", y)
    k_shape = _shapes.check_array(fn, "kernel", kernel)
    b_shape = None if bias is None else _shapes.check_array(fn, "bias", bias)
    cfg, x_shape = _shapes.conv_transpose_config(
        y_shape, k_shape, b_shape, stride=stride, padding=padding, dilation=dilation,
        groups=groups, output_padding=output_padding)
    return _conv_transpose_jit(y, kernel, bias, cfg=cfg, groups=int(groups), x_shape=x_shape,
                               impl=impl)


@partial(jax.jit, static_argnames=("cfg", "groups", "x_shape", "impl"))
def _conv_transpose_jit(y, kernel, bias, *, cfg, groups, x_shape, impl):
    dtype = jnp.result_type(y, kernel, *(() if bias is None else (bias,)))
    y, kernel = y.astype(dtype), kernel.astype(dtype)
    bias = None if bias is None else bias.astype(dtype)
    if impl == "lax":
        return _conv_transpose_lax(y, kernel, bias, cfg, groups, x_shape)
    return _conv_transpose_manual(y, kernel, bias, cfg, groups, x_shape)


def _conv_transpose_lax(y, kernel, bias, cfg: WindowConfig, groups: int, x_shape):
    """``A_Kᵀ Y`` as JAX derives it: the linear transpose of the lax convolution (a
    ``conv_general_dilated`` with input dilation), differentiated by JAX's autodiff."""
    acc = _windows.accum_dtype(y.dtype)
    x_spec = jax.ShapeDtypeStruct(x_shape, acc)
    crop = tuple(slice(0, n) for n in y.shape[1:-1])

    def conv_cropped(x):      # the convolution cut to y's size (see transpose_extra_rows)
        return _conv_lax(x, kernel.astype(acc), None, cfg, groups)[(slice(None), *crop)]

    (x,) = jax.linear_transpose(conv_cropped, x_spec)(y.astype(acc))
    return _add_bias(x, bias, y.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_transpose_manual(y, kernel, bias, cfg: WindowConfig, groups: int, x_shape):
    """The manual transposed convolution; backward :func:`_conv_transpose_bwd`."""
    return _windows.layer_boundary(_conv_transpose_manual_forward, y, kernel, bias, cfg, groups,
                                   x_shape)


def _conv_transpose_manual_forward(y, kernel, bias, cfg: WindowConfig, groups: int, x_shape):
    """``X = A_Kᵀ Y + B``: conv's input gradient with ``dZ := Y`` (:func:`_conv_input_grad`:
    the lecture's ``pad(dilate_s(Y)) ⋆ rot180(K)ᵀ`` at stride 1, ``col2im(Y · Kᵀ)`` otherwise).
    Where an ``output_padding`` at or above the stride gives the convolution more output rows
    than ``y`` has, ``y`` is extended with zero rows (no entry of ``y`` reaches them)."""
    extra = _shapes.transpose_extra_rows(y.shape, x_shape, cfg)
    if any(extra):
        y = _windows.pad(y, tuple((0, e) for e in extra))
    return _add_bias(_conv_input_grad(y, kernel, x_shape, cfg, groups), bias, y.dtype)


def _conv_transpose_fwd(y, kernel, bias, cfg, groups, x_shape):
    out = _conv_transpose_manual_forward(y, kernel, bias, cfg, groups, x_shape)
    return out, (y, kernel, bias is not None)


def _conv_transpose_bwd(cfg: WindowConfig, groups: int, x_shape, res, dx):
    """Backward of ``X = A_Kᵀ Y + B`` for ``L(X)``, with ``dX = dL/dX``: conv's other two
    formulas with the roles swapped (see the module docstring).

    - ``dY = A_K dX = dX ⋆ K``: conv's forward applied to ``dX``
      (``dY_i = Σ_m dXpad[i * s + m * d] · K_m``; :func:`_conv_manual_forward`), cut to
      ``y``'s size where the forward extended ``y``.
    - ``dK = dX ⋆ Y``: conv's kernel gradient with ``X := dX`` and ``dZ := Y``
      (``dK_m = Σ_i dXpad[i * s + m * d] · Y_iᵀ``; :func:`jaxcnn._patches.kernel_grad`).
    - ``dB = Σ_{n,p} dX[n, p]``.

    ``dY`` starts after ``dK`` is done, as in :func:`_conv_bwd`.
    """
    y, kernel, has_bias = res
    extra = _shapes.transpose_extra_rows(y.shape, x_shape, cfg)
    dk = _patches.kernel_grad(dx, _windows.pad(y, tuple((0, e) for e in extra)), kernel.shape,
                              cfg, groups)
    dy = _xla_cpu.after(dk, lambda dx, kernel: _conv_manual_forward(dx, kernel, None, cfg,
                                                                     groups), dx, kernel)
    if any(extra):
        dy = dy[(slice(None), *(slice(0, n) for n in y.shape[1:-1]))]
    db = None
    if has_bias:
        db = jnp.sum(dx, axis=tuple(range(dx.ndim - 1)), dtype=_windows.accum_dtype(dx.dtype))
    return dy.astype(y.dtype), dk.astype(kernel.dtype), None if db is None else db.astype(dx.dtype)


_windows.defvjp_apart(_conv_transpose_manual, _conv_transpose_fwd, _conv_transpose_bwd)
