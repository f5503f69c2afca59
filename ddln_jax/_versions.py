"""`show_versions`: what a bug report needs (as `xarray.show_versions()`)."""

import importlib.metadata
import platform
import sys

_PACKAGES = ("ddln_jax", "jax", "jaxlib", "diffrax", "equinox", "optax", "lineax",
             "optimistix", "jaxtyping", "numpy", "scipy", "matplotlib")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Python, the platform, each dependency's version, JAX's devices, the x64 flag and the
    XLA compiler options this process probed (`name=value: used`), as strings."""
    import jax

    from ._xla import applied_options

    out = {"python": sys.version.replace("\n", " "), "platform": platform.platform(),
           "machine": platform.machine()}
    out.update({name: _version(name) for name in _PACKAGES})
    try:
        devices = jax.devices()
        out["devices"] = ", ".join(f"{d.platform}:{d.id} {d.device_kind}" for d in devices)
    except RuntimeError as e:  # a backend that failed to start: say so, don't crash
        out["devices"] = f"unavailable ({e})"
    out["default backend"] = jax.default_backend()
    out["jax_enable_x64"] = str(bool(jax.config.jax_enable_x64))
    probed = applied_options()
    out["xla options probed"] = "; ".join(
        f"{p}: " + ", ".join(f"{k} {'used' if ok else 'refused'}" for k, ok in opts.items())
        for p, opts in probed.items()) or "none yet"
    return out


def show_versions(file=None) -> None:
    """Print Python, jax, jaxlib, diffrax, equinox, optax, numpy (and the other
    dependencies), the devices, the x64 flag and the XLA compiler options in use: what a
    bug report needs. `file`: where to print (default `sys.stdout`)."""
    info = versions()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}} : {v}", file=file or sys.stdout)
