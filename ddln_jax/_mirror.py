"""Mirror maps for every depth (docs/maths.md: mirror maps): theta = Psi(xi),
grad Q = Psi^{-1}, Q, D_Q.

Under Assumption (A) the flow is separable in the mirror coordinate: per coordinate,
dv1/dxi = s prod_{j>=2} sqrt(v1^2 + Delta_j) does not involve t, so
    xi(theta) = grad Q(theta) = s int_{a}^{v1(theta)} prod_{j>=2} (v^2 + Delta_j)^{-1/2} dv.
The integral is computed in the variable v = c sinh z (c^2 = min_j Delta_j), where the
integrand is analytic in the strip |Im z| < pi/2, with composite Gauss-Legendre (error far
below 1e-12). Psi inverts it with safeguarded Newton. The convex conjugate is exact:
Q*(xi) = int_0^xi Psi = (v1^2 - a^2) / 2, hence Q(theta) = theta xi - (v1^2 - a^2)/2
(normalised Q(theta0) = 0, grad Q(theta0) = 0).
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._network import check_assumption_a, metric_from_w, reduced_init, w_from_theta
from ._validate import check_layers, is_traced

_GL_X, _GL_W = np.polynomial.legendre.leggauss(12)
_PANELS = 64
_NEWTON_ITERS = 80


class AbstractMirrorMap(eqx.Module):
    """Interface of a separable mirror map; all methods act coordinate-wise on `(dim,)`
    arrays, except the potentials `q` and `bregman` which sum over coordinates."""

    @abc.abstractmethod
    def psi(self, xi):
        """theta = Psi(xi)."""

    @abc.abstractmethod
    def grad_q(self, theta):
        """grad Q(theta) = Psi^{-1}(theta)."""

    @abc.abstractmethod
    def q(self, theta):
        """The potential Q(theta) (a scalar)."""

    @abc.abstractmethod
    def metric(self, theta):
        """dPsi/dxi at xi = grad Q(theta): the diagonal of M (eq 11) as a function of theta."""

    @abc.abstractmethod
    def domain(self):
        """`(lo, hi)`: per-coordinate open interval of admissible xi (bounded for L >= 3)."""

    def psi_and_dual(self, xi, lo, hi):
        """`(Psi(xi), Q*(xi))` for `xi` inside the domain `(lo, hi)` (as `domain()` gives it):
        what the dual Newton of `dd.implicit_bias` evaluates at each trial point. Q*(xi) is
        `self.dual(xi)` where the map has one, else <xi, Psi(xi)> - Q(Psi(xi)). A map may
        share work between the two (`MirrorMap` solves for Psi once)."""
        theta = self.psi(xi)
        if hasattr(self, "dual"):
            return theta, self.dual(xi)
        return theta, jnp.sum(xi * theta) - self.q(theta)

    def bregman(self, theta, theta_ref):
        """D_Q(theta, theta_ref) = Q(theta) - Q(theta_ref) - <grad Q(theta_ref), theta - ref>."""
        return (
            self.q(theta)
            - self.q(theta_ref)
            - jnp.sum(self.grad_q(theta_ref) * (theta - theta_ref))
        )


def _integrate(log_h, z0, z1):
    """int_{z0}^{z1} exp(log_h(z)) dz, coordinate-wise, composite Gauss-Legendre."""
    edges = jnp.linspace(0.0, 1.0, _PANELS + 1)
    mids = 0.5 * (edges[1:] + edges[:-1])
    half = 0.5 / _PANELS
    s = (mids[:, None] + half * jnp.asarray(_GL_X)[None, :]).reshape(-1)
    w = jnp.tile(jnp.asarray(_GL_W), _PANELS) * half
    z = z0[None] + s[:, None] * (z1 - z0)[None]
    return (z1 - z0) * jnp.sum(w[:, None] * jnp.exp(log_h(z)), axis=0)


class MirrorMap(AbstractMirrorMap):
    """The mirror map of a DDLN of any depth from an initialization satisfying (A).

    Build with `MirrorMap.from_layers(layers0)`. Accurate to ~1e-12 relative in float64
    away from the edge of the domain (for L >= 3, Psi blows up at finite xi).
    """

    a: Float[Array, " dim"]
    deltas: Float[Array, "depth_1 dim"]
    s: Float[Array, " dim"]

    @classmethod
    def from_layers(cls, layers0) -> "MirrorMap":
        """**Raises:** `ValueError` if `layers0` violates Assumption (A)."""
        layers0 = check_layers(layers0)
        if not is_traced(layers0):
            try:
                check_assumption_a(layers0, strict=True)
            except ValueError as e:
                raise ValueError(f"`MirrorMap.from_layers` needs Assumption (A). {e}") from None
        red = reduced_init(layers0)
        return cls(a=red.a, deltas=red.deltas, s=red.s)

    @property
    def depth(self) -> int:
        return self.deltas.shape[0] + 1

    @property
    def _c(self):
        return jnp.sqrt(jnp.min(self.deltas, axis=0))

    def _v(self, z):
        return self._c * jnp.sinh(z)

    def _z(self, v):
        return jnp.arcsinh(v / self._c)

    def _log_h_nodes(self, z):
        c = self._c
        az = jnp.abs(z)
        log_cosh = az + jnp.log1p(jnp.exp(-2 * az)) - jnp.log(2.0)
        sh2 = (c * jnp.sinh(z)) ** 2  # (nodes, dim)
        terms = jnp.log(sh2[None] + self.deltas[:, None, :])
        return jnp.log(c) + log_cosh - 0.5 * jnp.sum(terms, axis=0)

    def _F(self, z):
        return _integrate(self._log_h_nodes, self._z(self.a), z)

    def _theta_of_v(self, v):
        return self.s * v * jnp.prod(jnp.sqrt(v**2 + self.deltas), axis=0)

    def _zmax(self):
        big = 1e4 * jnp.maximum(jnp.abs(self.a), jnp.sqrt(jnp.max(self.deltas, axis=0)))
        return self._z(big), big

    def _tail(self, big):
        # int_V^inf prod_j (v^2 + Delta_j)^{-1/2} dv = V^{-(L-2)}/(L-2) - S V^{-L}/(2L) + ...
        L = self.depth
        total = jnp.sum(self.deltas, axis=0)
        return big ** (-(L - 2)) / (L - 2) - total * big ** (-L) / (2 * L)

    @eqx.filter_jit
    def domain(self):
        if self.depth == 2:
            inf = jnp.full_like(self.a, jnp.inf)
            return -inf, inf
        zmax, big = self._zmax()
        z0 = self._z(self.a)
        # int_a^inf and int_-inf^a (by symmetry, int_-a^inf) as one quadrature over the
        # coordinates twice (one program part instead of two)
        twin = MirrorMap(
            a=jnp.tile(self.a, 2), deltas=jnp.tile(self.deltas, (1, 2)), s=jnp.tile(self.s, 2)
        )
        both = _integrate(twin._log_h_nodes, jnp.concatenate([z0, -z0]), jnp.tile(zmax, 2))
        d = self.a.shape[-1]
        up, down = both[:d] + self._tail(big), both[d:] + self._tail(big)
        lo = jnp.where(self.s > 0, -down, -up)
        hi = jnp.where(self.s > 0, up, down)
        return lo, hi

    @eqx.filter_jit
    def grad_q(self, theta):
        v = self._v1(theta)
        return self.s * self._F(self._z(v))

    def _v1(self, theta):
        return jnp.sign(theta) * self.s * jnp.sqrt(w_from_theta(theta, self.deltas))

    def _z_of_xi(self, xi):
        target = self.s * xi
        z0 = self._z(self.a)
        if self.depth == 2:
            return z0 + target
        # v up to e^40 times the scale of the initialization: every representable theta
        zmax = self._z(1e4 * jnp.maximum(jnp.abs(self.a), jnp.sqrt(jnp.max(self.deltas, 0)))) + 40
        lo0, hi0 = -zmax, zmax

        def body(carry):
            i, z, lo, hi, done = carry
            f = self._F(z) - target
            lo = jnp.where(f < 0, z, lo)
            hi = jnp.where(f > 0, z, hi)
            step = f / jnp.exp(self._log_h_nodes(z[None])[0])
            z_new = z - step
            # a step below the tolerance has converged, even where rounding puts it on the
            # bracket's edge (bisecting there restarted the search from the far end: ~50
            # iterations more for every coordinate)
            converged = (f == 0) | (jnp.abs(step) <= 1e-14 * (1 + jnp.abs(z)))
            inside = (z_new > lo) & (z_new < hi)
            z_new = jnp.where(inside | converged, z_new, 0.5 * (lo + hi))
            # a converged coordinate stays put: its value does not depend on the others'
            z_new = jnp.where(done, z, z_new)
            return i + 1, z_new, lo, hi, done | converged

        def cond(carry):
            i, _, _, _, done = carry
            return (i < _NEWTON_ITERS) & ~jnp.all(done)

        z_init = jnp.clip(z0 + target * jnp.exp(-self._log_h_nodes(z0[None])[0]), lo0, hi0)
        # safeguarded Newton: quadratic near the root, bisection when a step leaves [lo, hi]
        init = (0, z_init, lo0, hi0, jnp.zeros(z_init.shape, bool))
        _, z, _, _, _ = jax.lax.while_loop(cond, body, init)
        return z

    @eqx.filter_jit
    def psi(self, xi):
        xi = jnp.asarray(xi)
        z = self._z_of_xi(xi)
        theta = self._theta_of_v(self._v(z))
        if self.depth > 2:
            lo, hi = self.domain()
            theta = jnp.where(xi >= hi, jnp.inf, theta)
            theta = jnp.where(xi <= lo, -jnp.inf, theta)
        return theta

    @eqx.filter_jit
    def q(self, theta):
        v = self._v1(theta)
        xi = self.s * self._F(self._z(v))
        return jnp.sum(theta * xi - 0.5 * (v**2 - self.a**2))

    @eqx.filter_jit
    def dual(self, xi):
        """The convex conjugate Q*(xi) = (v1(xi)^2 - a^2)/2 (sum over coordinates), with
        grad Q* = Psi; +inf outside the domain."""
        v = self._v(self._z_of_xi(xi))
        val = jnp.sum(0.5 * (v**2 - self.a**2))
        if self.depth > 2:
            lo, hi = self.domain()
            val = jnp.where(jnp.any((xi >= hi) | (xi <= lo)), jnp.inf, val)
        return val

    def psi_and_dual(self, xi, lo, hi):
        # one solve for z(xi) serves both, and the domain is computed once by the caller:
        # the same operations as `psi` and `dual`, so the same values
        v = self._v(self._z_of_xi(xi))
        theta = self._theta_of_v(v)
        val = jnp.sum(0.5 * (v**2 - self.a**2))
        if self.depth > 2:
            theta = jnp.where(xi >= hi, jnp.inf, theta)
            theta = jnp.where(xi <= lo, -jnp.inf, theta)
            val = jnp.where(jnp.any((xi >= hi) | (xi <= lo)), jnp.inf, val)
        return theta, val

    @eqx.filter_jit
    def metric(self, theta):
        return metric_from_w(self._v1(theta) ** 2, self.deltas)


class ShallowMirrorMap(AbstractMirrorMap):
    """L = 2 in closed form (App. A.1-A.2, Woodworth et al. 2020): with Delta0 = |u0^2 - v0^2|
    and rho = log|(u0 + v0)/(u0 - v0)|,
    Psi(xi) = Delta0/2 sinh(2 xi + rho) (eq 16) and
    Q(theta) = 1/4 sum(2 theta asinh(2 theta/Delta0) - sqrt(4 theta^2 + Delta0^2) + Delta0)
               - 1/2 <rho, theta>   (eq 19 with the corrected prefactor 1/4)."""

    delta0: Float[Array, " dim"]
    rho: Float[Array, " dim"]

    @classmethod
    def from_layers(cls, layers0) -> "ShallowMirrorMap":
        layers0 = check_layers(layers0)
        if layers0.shape[0] != 2:
            raise ValueError(f"`layers0` must have depth 2, got {layers0.shape[0]}.")
        u, v = layers0
        return cls(delta0=jnp.abs(u**2 - v**2), rho=jnp.log(jnp.abs((u + v) / (u - v))))

    def psi(self, xi):
        return self.delta0 / 2 * jnp.sinh(2 * xi + self.rho)

    def grad_q(self, theta):
        return (jnp.arcsinh(2 * theta / self.delta0) - self.rho) / 2

    def q(self, theta):
        d = self.delta0
        per = 2 * theta * jnp.arcsinh(2 * theta / d) - jnp.sqrt(4 * theta**2 + d**2) + d
        return 0.25 * jnp.sum(per) - 0.5 * jnp.sum(self.rho * theta)

    def metric(self, theta):
        return jnp.sqrt(4 * theta**2 + self.delta0**2)

    def domain(self):
        inf = jnp.full_like(self.rho, jnp.inf)
        return -inf, inf


class TiedMirrorMap(AbstractMirrorMap):
    """The redundant network theta = u^{⊙L}, u0 > 0 (App. A.3, eq 27-30 corrected). For
    L >= 3: Psi(xi) = (u0^{-(L-2)} - L(L-2) xi)^{-L/(L-2)},
    Q(theta) = (<u0^{-(L-2)}, theta> - L/2 <1, theta^{2/L}>) / (L(L-2)).
    For L = 2 (theta' = -4 theta grad L): Psi(xi) = u0^2 exp(4 xi),
    Q(theta) = <1, theta log(theta / u0^2) - theta + u0^2> / 4 (the hyperbolic entropy)."""

    u0: Float[Array, " dim"]
    depth: int = eqx.field(static=True)

    def __init__(self, u0, depth: int):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise ValueError(f"`depth` must be an int >= 2 for the tied map, got {depth!r}.")
        u0 = jnp.asarray(u0, dtype=float)
        if not is_traced(u0) and not np.all(np.asarray(u0) > 0):
            raise ValueError("`u0` must be > 0 (the tied map needs theta > 0).")
        self.u0, self.depth = u0, depth

    def psi(self, xi):
        L = self.depth
        if L == 2:
            return self.u0**2 * jnp.exp(4 * xi)
        return (self.u0 ** (-(L - 2)) - L * (L - 2) * xi) ** (-L / (L - 2))

    def grad_q(self, theta):
        L = self.depth
        if L == 2:
            return jnp.log(theta / self.u0**2) / 4
        return (self.u0 ** (-(L - 2)) - theta ** (-(L - 2) / L)) / (L * (L - 2))

    def q(self, theta):
        L = self.depth
        if L == 2:
            t0 = self.u0**2
            return jnp.sum(theta * jnp.log(theta / t0) - theta + t0) / 4
        lin = jnp.sum(self.u0 ** (-(L - 2)) * theta)
        return (lin - L / 2 * jnp.sum(theta ** (2 / L))) / (L * (L - 2))

    def metric(self, theta):
        L = self.depth
        return L**2 * theta ** (2 * (L - 1) / L)

    def domain(self):
        L = self.depth
        if L == 2:
            return jnp.full_like(self.u0, -jnp.inf), jnp.full_like(self.u0, jnp.inf)
        return jnp.full_like(self.u0, -jnp.inf), self.u0 ** (-(L - 2)) / (L * (L - 2))


class YunMirrorMap(AbstractMirrorMap):
    """Closed forms for the Corollary 1 init (u^L(0) = 0, u^j(0) = alpha ubar), c = alpha ubar:
    L = 3: Psi = c^3 tan(c xi) sec^2(c xi);  L = 4: Psi = c^6 xi / (1 - c^4 xi^2)^2.
    grad Q inverts Psi by bisection (Psi is increasing on the bounded domain)."""

    c: Float[Array, " dim"]
    depth: int = eqx.field(static=True)

    def __init__(self, alpha, ubar, depth: int):
        if depth not in (3, 4):
            raise ValueError(f"`depth` must be 3 or 4 for the closed forms, got {depth!r}.")
        self.c, self.depth = jnp.abs(jnp.asarray(alpha) * jnp.asarray(ubar, dtype=float)), depth

    def psi(self, xi):
        c = self.c
        if self.depth == 3:
            return c**3 * jnp.tan(c * xi) / jnp.cos(c * xi) ** 2
        return c**6 * xi / (1 - c**4 * xi**2) ** 2

    def metric_xi(self, xi):
        """dPsi/dxi in closed form."""
        c = self.c
        if self.depth == 3:
            sec2 = 1 / jnp.cos(c * xi) ** 2
            return c**4 * sec2 * (sec2 + 2 * jnp.tan(c * xi) ** 2)
        den = 1 - c**4 * xi**2
        return c**6 * (1 + 3 * c**4 * xi**2) / den**3

    def grad_q(self, theta):
        lo, hi = self.domain()
        lo, hi = lo * (1 - 1e-15), hi * (1 - 1e-15)

        def body(_, lohi):
            a, b = lohi
            mid = 0.5 * (a + b)
            below = self.psi(mid) < theta
            return jnp.where(below, mid, a), jnp.where(below, b, mid)

        ones = jnp.ones_like(theta)
        a, b = jax.lax.fori_loop(0, 200, body, (lo * ones, hi * ones))
        return 0.5 * (a + b)

    def _v(self, xi):
        c = self.c
        if self.depth == 3:
            return c * jnp.tan(c * xi)
        return c**3 * xi / jnp.sqrt(1 - c**4 * xi**2)

    def q(self, theta):
        xi = self.grad_q(theta)
        return jnp.sum(theta * xi - 0.5 * self._v(xi) ** 2)

    def metric(self, theta):
        return self.metric_xi(self.grad_q(theta))

    def domain(self):
        half = jnp.pi / (2 * self.c) if self.depth == 3 else 1 / self.c**2
        return -half, half
