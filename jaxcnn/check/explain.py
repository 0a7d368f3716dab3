"""The lecture's worked example with numbers (``python -m jaxcnn.check --explain``).

Convolution with stride 1 and 2, max pooling and average pooling, each on a matrix small enough
to follow by hand: the forward, then every gradient written out as the chain rule sums it, then
as the one operation the lecture derives (``dL/dK = X ⋆ dL/dZ``, ``dL/dX = pad(dilate(dL/dZ))
⋆ rot180(K)``, the max routes, the mean spreads), each number marked ✓ when it equals
``jax.grad`` through ``impl="lax"``. Indices are 1-based, as in the lecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..convolution import conv
from ..pooling import avg_pool, max_pool


def explain(out: Callable[[str], Any] = print) -> bool:
    """Print the lecture's worked example with numbers; True when every ✓ holds."""
    page = _Page(out)
    page.say("The lecture's worked example, every number checked against jax.grad",
             "(1-based indices as in the lecture; ⋆ is cross-correlation, what CNNs call "
             "convolution; jax.grad differentiates impl=\"lax\", the reference).", "")
    page.say("1. Convolution, stride 1: X 3×3, K 2×2, bias B, Z = X ⋆ K + B is 2×2.")
    _explain_conv(page, [[1, 2, 0], [3, 1, 2], [0, 1, 3]], [[1, -1], [2, 0]], 1.0, 1)
    page.say("2. Convolution, stride 2: X 5×5, K 2×2, B; dL/dZ is dilated before the full "
             "convolution.")
    _explain_conv(page, [[1, 0, 2, 1, 3], [0, 1, 1, 2, 0], [2, 1, 0, 1, 1], [1, 3, 1, 0, 2],
                         [0, 1, 2, 1, 1]], [[1, -1], [2, 0]], 1.0, 2)
    pool_x = [[1, 7, 2, 0], [3, 5, 4, 6], [8, 2, 0, 4], [9, 1, 3, 5]]
    page.say("3. Max pooling, 2×2 window, stride 2: the gradient goes to the max of each "
             "window.")
    _explain_pool(page, pool_x, "max")
    page.say("4. Average pooling, 2×2 window, stride 2: the gradient is spread evenly, 1/4 "
             "each.")
    _explain_pool(page, pool_x, "avg")
    page.say("All hand-derived numbers agree with jax.grad." if page.all_ok else
             "Some hand-derived numbers DISAGREE with jax.grad (✗ above).")
    return page.all_ok


# --------------------------------------------------------------------------------------------
# Printing numbers and matrices, and checking them.


def _number(v) -> str:
    """A number as printed: integers without a decimal point, others in ``%g``."""
    v = float(v)
    return str(int(round(v))) if abs(v - round(v)) < 1e-12 else f"{v:g}"


def _factor(v) -> str:
    """A number as a factor of a product: negative numbers in parentheses."""
    s = _number(v)
    return f"({s})" if s.startswith("-") else s


def _matrix_lines(m, indent="    ") -> list:
    """A matrix as lines ``[ a  b  c ]``, its columns right-aligned."""
    cells = [[_number(v) for v in row] for row in np.asarray(m)]
    w = max(len(c) for row in cells for c in row)
    return [indent + "[ " + "  ".join(c.rjust(w) for c in row) + " ]" for row in cells]


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


class _Page:
    """The printed explanation: says lines, and checks every hand-computed number against
    jax.grad (``all_ok`` turns False at the first disagreement)."""

    def __init__(self, out):
        self.out = out
        self.all_ok = True

    def say(self, *lines):
        for line in lines:
            self.out(line)

    def check(self, hand, by_jax) -> str:
        ok = bool(np.allclose(np.asarray(hand, np.float64), np.asarray(by_jax, np.float64),
                              rtol=1e-12, atol=1e-12))
        self.all_ok &= ok
        return _mark(ok)

    def matrix_check(self, title, hand, by_jax, who="jax.grad"):
        """The hand-computed matrix beside ``who``'s, with one ✓ or ✗ for all of it."""
        mark = self.check(hand, by_jax)
        left, right = _matrix_lines(hand, ""), _matrix_lines(by_jax, "")
        w = max(len(s) for s in left)
        self.say(f"  {title}" + " " * max(1, w + 6 - len(title)) + f"{who} gives:")
        for i, (a, b) in enumerate(zip(left, right)):
            tail = f"   {mark}" if i == len(left) // 2 else ""
            self.say("    " + a.ljust(w) + "    " + b + tail)


# --------------------------------------------------------------------------------------------
# Convolution: Z = X ⋆ K + B, one channel, square kernel, stride s, loss L = ½ Σ z².


@dataclasses.dataclass
class _ConvExample:
    """The sizes of one worked convolution and the input index each product reads."""

    X: np.ndarray
    K: np.ndarray
    B: float
    s: int

    def __post_init__(self):
        self.H, self.W = self.X.shape
        self.k = self.K.shape[0]
        self.oh = (self.H - self.k) // self.s + 1
        self.ow = (self.W - self.k) // self.s + 1
        self.r = (self.H - self.k) % self.s          # the stride remainder

    def x_at(self, i, j, m, n):
        """0-based index of the input that K_mn multiplies in z_ij."""
        return (self.s * i + m, self.s * j + n)

    def dilate(self, dZ):
        """dL/dZ with s - 1 zeros between its entries (the stride)."""
        D = np.zeros(((self.oh - 1) * self.s + 1, (self.ow - 1) * self.s + 1))
        D[::self.s, ::self.s] = dZ
        return D


def _conv_grads(X, K, B, stride, impl="lax"):
    """jax.grad of L = ½ Σ z² for the 2-D single-channel convolution, and Z."""
    def loss(x, k, b):
        z = conv(x[None, :, :, None], k[:, :, None, None], b[None], stride=stride, impl=impl)
        return 0.5 * jnp.sum(z ** 2), z[0, :, :, 0]
    (_, z), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(X, jnp.float64), jnp.asarray(K, jnp.float64), jnp.asarray(B, jnp.float64))
    return np.asarray(z), [np.asarray(v) for v in g]


def _explain_conv(page: _Page, X, K, B, s: int):
    cx = _ConvExample(np.asarray(X, np.float64), np.asarray(K, np.float64), B, s)
    z_jax, (gx, gk, gb) = _conv_grads(cx.X, cx.K, B, s)
    _, (mx, mk, mb) = _conv_grads(cx.X, cx.K, B, s, impl="manual")
    dZ = _explain_conv_forward(page, cx, z_jax)
    _explain_kernel_grad(page, cx, dZ, gk)
    dB = dZ.sum()
    page.say("", "  dL/dB = Σ_ij dL/dz_ij · ∂z_ij/∂B = Σ_ij dL/dz_ij · 1 = "
             + " + ".join(_factor(v) for v in dZ.ravel())
             + f" = {_number(dB)}      jax.grad: {_number(gb)}  {page.check(dB, gb)}", "")
    _explain_input_grad(page, cx, dZ, gx)
    ok = page.check(np.concatenate([mx.ravel(), mk.ravel(), mb.ravel()]),
                    np.concatenate([gx.ravel(), gk.ravel(), gb.ravel()]))
    page.say(f'  The registered backward (impl="manual", jax.custom_vjp) gives the same dL/dX, '
             f"dL/dK, dL/dB: {ok}", "")


def _explain_conv_forward(page: _Page, cx: _ConvExample, z_jax):
    """Z by hand, product by product; returns dL/dZ (= Z for L = ½ Σ z²)."""
    X, K, B, s, k = cx.X, cx.K, cx.B, cx.s, cx.k
    Z = np.array([[sum(X[cx.x_at(i, j, m, n)] * K[m, n] for m in range(k) for n in range(k))
                   + B for j in range(cx.ow)] for i in range(cx.oh)])
    page.say("  X =", *_matrix_lines(X), "  K =", *_matrix_lines(K), f"  B = {_number(B)}", "")
    page.say(f"  Forward, Z = X ⋆ K + B (stride {s}): z_ij = Σ_mn x_{_x_subscript(s)} · K_mn "
             "+ B")
    if s > 1:
        page.say(f"  Output size: floor(({cx.H} - {k}) / {s}) + 1 = {cx.oh}; the stride "
                 f"remainder r = ({cx.H} - {k}) mod {s} = {cx.r}: the last {cx.r} row(s) and "
                 f"column(s) of X are read by no window.")
    for i in range(cx.oh):
        for j in range(cx.ow):
            terms = " + ".join(f"{_factor(X[cx.x_at(i, j, m, n)])}·{_factor(K[m, n])}"
                               for m in range(k) for n in range(k))
            page.say(f"    z_{i + 1}{j + 1} = {terms} + {_factor(B)} = {_number(Z[i, j])}")
    page.matrix_check("Z =", Z, z_jax, who='impl="lax" forward')
    page.say("", "  Loss: L = ½ Σ_ij z_ij², so dL/dz_ij = z_ij:", "  dL/dZ =",
             *_matrix_lines(Z), "")
    return Z


def _x_subscript(s: int) -> str:
    """The subscript of the input read by z_ij and K_mn, in the lecture's 1-based notation."""
    return "(i+m-1)(j+n-1)" if s == 1 else f"({s}(i-1)+m)({s}(j-1)+n)"


def _explain_kernel_grad(page: _Page, cx: _ConvExample, dZ, gk):
    """dL/dK_mn = Σ_ij dL/dz_ij · x_(read by K_mn in z_ij), written out for every K_mn."""
    X, k, s, r = cx.X, cx.k, cx.s, cx.r
    page.say("  dL/dK_mn = Σ_ij dL/dz_ij · ∂z_ij/∂K_mn, and ∂z_ij/∂K_mn = x_"
             + _x_subscript(s) + " (the input that K_mn multiplies in z_ij):")
    dK = np.zeros_like(cx.K)
    windows = [(i, j) for i in range(cx.oh) for j in range(cx.ow)]
    for m in range(k):
        for n in range(k):
            sym = " + ".join(f"dL/dz_{i + 1}{j + 1}·∂z_{i + 1}{j + 1}/∂K_{m + 1}{n + 1}"
                             for i, j in windows)
            xs = " + ".join(f"dL/dz_{i + 1}{j + 1}·x_{cx.x_at(i, j, m, n)[0] + 1}"
                            f"{cx.x_at(i, j, m, n)[1] + 1}" for i, j in windows)
            dK[m, n] = sum(dZ[i, j] * X[cx.x_at(i, j, m, n)] for i, j in windows)
            nums = " + ".join(f"{_factor(dZ[i, j])}·{_factor(X[cx.x_at(i, j, m, n)])}"
                              for i, j in windows)
            page.say(f"    dL/dK_{m + 1}{n + 1} = {sym}",
                     f"             = {xs}",
                     f"             = {nums} = {_number(dK[m, n])}"
                     f"      jax.grad: {_number(gk[m, n])}  {page.check(dK[m, n], gk[m, n])}")
    if s > 1:
        page.say(f"  In one line: dL/dK = X' ⋆ dilate(dL/dZ), where dilate puts {s - 1} "
                 f"zero(s) between the entries of dL/dZ (the stride) and X' is X without its "
                 f"last {r} row(s) and column(s) (the remainder, which no window reads):",
                 *_matrix_lines(cx.dilate(dZ)))
    page.matrix_check("dL/dK =", dK, gk)


def _explain_input_grad(page: _Page, cx: _ConvExample, dZ, gx):
    """dL/dX = pad(dilate(dL/dZ)) ⋆ rot180(K), element by element."""
    K, k, s, H, W = cx.K, cx.k, cx.s, cx.H, cx.W
    R = K[::-1, ::-1]                                   # rot180(K)
    page.say("  dL/dx_pq = Σ_ij dL/dz_ij · ∂z_ij/∂x_pq: x_pq meets K_mn in every window that "
             "covers it. Written as one operation, that sum is the full convolution of the "
             "zero-padded dL/dZ with K rotated by 180°:")
    page.say("  rot180(K) (flip rows and columns):", *_matrix_lines(R))
    what = "dL/dZ"
    if s > 1:
        page.say(f"  Stride {s}: first dilate dL/dZ with {s - 1} zero(s) between entries:",
                 *_matrix_lines(cx.dilate(dZ)))
        what = "the dilated dL/dZ"
    lo, hi = k - 1, k - 1 + cx.r
    P = np.pad(cx.dilate(dZ), ((lo, hi), (lo, hi)))     # the padded (dilated) dL/dZ
    pad_txt = f"{lo} zero(s) on every side" if lo == hi else (
        f"{lo} zero(s) before and {hi} = k-1+r after (the remainder row/column gets gradient 0)")
    page.say(f"  Zero-pad {what} by k-1 = {lo}: {pad_txt}:", *_matrix_lines(P))
    dX = np.array([[sum(P[p + m, q + n] * R[m, n] for m in range(k) for n in range(k))
                    for q in range(W)] for p in range(H)])
    page.say("  dL/dx_pq = Σ_mn padded[p+m-1, q+n-1] · rot180(K)_mn  (a 2×2 window of the "
             "padded dL/dZ, slid with stride 1):")
    shown = ([(p, q) for p in range(H) for q in range(W)] if s == 1 else
             [(0, 0), (1, 2), (H - 1, W - 1)])
    if s > 1:
        page.say(f"  (three of the {H * W} elements; the whole matrix follows)")
    for p, q in shown:
        nums = " + ".join(f"{_factor(P[p + m, q + n])}·{_factor(R[m, n])}"
                          for m in range(k) for n in range(k))
        page.say(f"    dL/dx_{p + 1}{q + 1} = {nums} = {_number(dX[p, q])}"
                 f"      jax.grad: {_number(gx[p, q])}  {page.check(dX[p, q], gx[p, q])}")
    if s > 1:
        page.say(f"  Row {H} and column {W} are the stride remainder: no window read them, so "
                 "their gradient is 0.")
    else:
        _explain_chain_rule(page, cx, dZ, gx)
    page.matrix_check("dL/dX =", dX, gx)


def _explain_chain_rule(page: _Page, cx: _ConvExample, dZ, gx):
    """One element of dL/dX by the chain rule directly: the centre, covered by every window."""
    K, k = cx.K, cx.k
    c = (1, 1)
    covering = [(i, j, c[0] - i, c[1] - j) for i in range(cx.oh) for j in range(cx.ow)
                if 0 <= c[0] - i < k and 0 <= c[1] - j < k]
    chain = sum(dZ[i, j] * K[m, n] for i, j, m, n in covering)
    page.say("  Check one by the chain rule directly: x_22 is covered by all four windows,",
             "    dL/dx_22 = " + " + ".join(f"dL/dz_{i + 1}{j + 1}·K_{m + 1}{n + 1}"
                                            for i, j, m, n in covering)
             + " = " + " + ".join(f"{_factor(dZ[i, j])}·{_factor(K[m, n])}"
                                  for i, j, m, n in covering)
             + f" = {_number(chain)}      jax.grad: {_number(gx[c])}  {page.check(chain, gx[c])}")


# --------------------------------------------------------------------------------------------
# Pooling: 2×2 window, stride 2; the max routes, the mean spreads.


def _explain_pool(page: _Page, X, kind: str):
    X = np.asarray(X, np.float64)
    op = max_pool if kind == "max" else avg_pool

    def loss(x, impl):
        z = op(x[None, :, :, None], 2, impl=impl)   # 2×2 window, stride 2 (the default)
        return 0.5 * jnp.sum(z ** 2), z[0, :, :, 0]

    (_, z_jax), gx = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(X), "lax")
    mx = jax.grad(lambda x: loss(x, "manual")[0])(jnp.asarray(X))
    H, W = X.shape
    Z = np.zeros((H // 2, W // 2))
    dX = np.zeros_like(X)
    page.say("  X =", *_matrix_lines(X))
    word = "max" if kind == "max" else "mean"
    page.say(f"  Z_ij = {word} of window ij (2×2, stride 2); L = ½ Σ z_ij², so dL/dz_ij = "
             "z_ij.")
    for i in range(H // 2):
        for j in range(W // 2):
            win = X[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            cells = [(2 * i + a, 2 * j + b) for a in range(2) for b in range(2)]
            names = ", ".join(f"x_{p + 1}{q + 1}={_number(X[p, q])}" for p, q in cells)
            if kind == "max":
                p, q = cells[int(np.argmax(win.ravel()))]
                Z[i, j] = X[p, q]
                dX[p, q] += Z[i, j]
                page.say(f"    window {i + 1}{j + 1} ({names}): z_{i + 1}{j + 1} = "
                         f"{_number(Z[i, j])}, the max is x_{p + 1}{q + 1}, so "
                         f"dL/dx_{p + 1}{q + 1} = dL/dz_{i + 1}{j + 1} = {_number(Z[i, j])}; "
                         f"the other three get 0")
            else:
                Z[i, j] = win.mean()
                for p, q in cells:
                    dX[p, q] += Z[i, j] / 4
                page.say(f"    window {i + 1}{j + 1} ({names}): z_{i + 1}{j + 1} = "
                         f"({' + '.join(_factor(v) for v in win.ravel())}) / 4 = "
                         f"{_number(Z[i, j])}; each of the four gets dL/dz_{i + 1}{j + 1} / 4 "
                         f"= {_number(Z[i, j] / 4)}")
    page.matrix_check("Z =", Z, z_jax, who='impl="lax" forward')
    page.matrix_check("dL/dX =", dX, gx)
    page.say(f'  The registered backward (impl="manual") gives the same dL/dX: '
             f"{page.check(mx, gx)}", "")
