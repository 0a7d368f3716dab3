"""Half precision across ops: float16 / bfloat16 keep their dtype, and sums run in float32.

New ops with a summing backward add an entry to HALF_PRECISION_OPS.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn.check import BFLOAT16_TOLERANCES

from conftest import IMPLS, sampled


# --------------------------------------------------------------------------------------------
# Dtypes kept, forward accumulated in float32.


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_keeps_dtype_and_accumulates_in_float32(dtype):
    rng = np.random.default_rng(0)
    x32 = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    k32 = (rng.normal(size=(3, 3, 3, 4)) / 5).astype(np.float32)
    x, k = jnp.asarray(x32, dtype), jnp.asarray(k32, dtype)
    for impl in IMPLS:
        z = jc.conv(x, k, padding="SAME", impl=impl)
        assert z.dtype == dtype
        dx, dk = jax.grad(lambda x, k: jnp.sum(jc.conv(x, k, impl=impl).astype(jnp.float32)),
                          argnums=(0, 1))(x, k)
        assert dx.dtype == dtype and dk.dtype == dtype
        ref = jc.conv(x.astype(np.float32), k.astype(np.float32), padding="SAME")
        # One rounding of a float32-accumulated result: within the half type's resolution.
        eps = float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(np.asarray(z, np.float32), ref, rtol=2 * eps, atol=2 * eps * 4)
        for op in (lambda v: jc.max_pool(v, 2, impl=impl), lambda v: jc.avg_pool(v, 2, impl=impl),
                   lambda v: jc.relu(v, impl=impl)):
            assert op(x).dtype == dtype


# --------------------------------------------------------------------------------------------
# Backward sums in float32, rounded to bfloat16 once.

# Ops whose backward sums several contributions per input element (overlapping windows, many
# taps, a contraction): each sum must run in float32 and be rounded to bfloat16 once.
HALF_PRECISION_OPS = {
    "conv 3x3 SAME": lambda x, k, impl: jc.conv(x, k, padding="SAME", impl=impl),
    "conv 3x3 stride 2 groups 2": lambda x, k, impl: jc.conv(
        x, k[:, :, :2], stride=2, padding=((1, 0), (0, 1)), groups=2, impl=impl),
    "max_pool 3/1": lambda x, k, impl: jc.max_pool(x, 3, stride=1, padding="SAME", impl=impl),
    "avg_pool 3/2": lambda x, k, impl: jc.avg_pool(x, 3, stride=2, padding=1, impl=impl),
    "dense": lambda x, k, impl: jc.dense(x, k.reshape(36, 4), impl=impl),
}


@pytest.mark.parametrize("name", sampled(list(HALF_PRECISION_OPS), 2, (0,)))
def test_bfloat16_backward_accumulates_in_float32(name):
    """On values bfloat16 holds exactly, every bfloat16 cotangent of the manual path is the
    float32 one rounded once: within eps/2 relative, element by element. A sum run in bfloat16
    rounds at every term and misses this. (lax meets it too, except max pooling with
    overlapping windows: its transpose, XLA's select_and_scatter, adds in bfloat16 on CPU.)"""
    op = HALF_PRECISION_OPS[name]
    rng = np.random.default_rng(1)
    bf16 = jnp.bfloat16
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), bf16)
    if name == "dense":
        x = jnp.asarray(rng.normal(size=(5, 36)), bf16)
    k = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) / 3, bf16)
    z32, vjp32 = jax.vjp(lambda x, k: op(x, k, "lax"), x.astype(np.float32), k.astype(np.float32))
    dz = jnp.asarray(rng.normal(size=z32.shape), bf16)
    want = vjp32(dz.astype(np.float32))
    tol = BFLOAT16_TOLERANCES["op"]
    for impl in ("manual",) if name.startswith("max_pool") else ("manual", "lax"):
        _, vjp = jax.vjp(lambda x, k: op(x, k, impl), x, k)
        for what, got, ref in zip(("dx", "dk"), vjp(dz), want):
            assert got.dtype == bf16, (impl, what, got.dtype)
            got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
            np.testing.assert_allclose(got, ref, rtol=tol["rtol"],
                                       atol=tol["atol"] * np.abs(ref).max(),
                                       err_msg=f"{name} {impl} {what}")
