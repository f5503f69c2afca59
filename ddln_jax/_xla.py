"""XLA compiler options, applied only where the running jaxlib accepts them.

A jaxlib release may drop a compiler option without notice (jaxlib 0.11 removed
`xla_cpu_use_fusion_emitters`, and passing it then fails every compile with
`INVALID_ARGUMENT: No such compile option`). Options here are speed-ups only, never needed
for a result: each is probed once per process and platform, by compiling a one-op program
with it, and left out where it is refused. `applied_options()` says which were kept
(`dd.show_versions()` prints it).
"""

import functools
import threading

import equinox as eqx
import jax
import numpy as np

# (platform, name, value) -> whether this process's jaxlib compiled a probe with it
_ACCEPTED: dict[tuple[str, str, object], bool] = {}


def _probe(x):
    return x + 1


def accepts(platform: str, name: str, value) -> bool:
    """Whether the running jaxlib compiles a program for `platform` with the compiler
    option `name=value` (probed once per process; False where `platform` has no device)."""
    key = (platform, name, value)
    if key not in _ACCEPTED:
        try:
            device = jax.devices(platform)[0]
        except RuntimeError:  # no such backend in this process
            _ACCEPTED[key] = False
            return False
        x = jax.device_put(np.float32(0), device)
        try:
            jax.jit(_probe).lower(x).compile(compiler_options={name: value})
            _ACCEPTED[key] = True
        except jax.errors.JaxRuntimeError:
            _ACCEPTED[key] = False
    return _ACCEPTED[key]


def accepted_options(options: dict, platform: str) -> dict:
    """The items of `options` that the running jaxlib accepts for `platform`."""
    return {k: v for k, v in options.items() if accepts(platform, k, v)}


def applied_options() -> dict[str, dict[str, bool]]:
    """For each probed platform, each probed option (`name=value`) and whether it is used."""
    out: dict[str, dict[str, bool]] = {}
    for (platform, name, value), ok in _ACCEPTED.items():
        out.setdefault(platform, {})[f"{name}={value}"] = ok
    return out


class OptionJit:
    """`eqx.filter_jit(fun)` compiled with those of `options` that the running jaxlib
    accepts for `platform` (None: JAX's default backend), decided at the first call (no
    probe at import). `__wrapped__` is `fun`, as for `eqx.filter_jit`."""

    def __init__(self, fun, options: dict, platform: str | None = None):
        functools.update_wrapper(self, fun)
        self.options, self.platform = dict(options), platform
        self._jitted, self._lock = None, threading.Lock()  # the sweep's threads share it

    @property
    def jitted(self):
        with self._lock:
            if self._jitted is None:
                kept = accepted_options(self.options, self.platform or jax.default_backend())
                self._jitted = eqx.filter_jit(
                    self.__wrapped__, **({"compiler_options": kept} if kept else {}))
            return self._jitted

    def __call__(self, *args, **kwargs):
        return self.jitted(*args, **kwargs)
