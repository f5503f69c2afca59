"""`dd.show_versions()`: what a bug report needs."""

import importlib.metadata
import io
import sys

import jax

import ddln_jax as dd


def test_show_versions_names_python_jax_the_devices_and_x64():
    buf = io.StringIO()
    dd.show_versions(file=buf)
    text = buf.getvalue()
    lines = dict(line.split(" : ", 1) for line in text.splitlines())
    lines = {k.strip(): v for k, v in lines.items()}
    assert lines["python"].startswith(sys.version.split()[0])
    for name in ("jax", "jaxlib", "diffrax", "equinox", "optax", "numpy"):
        assert lines[name] == importlib.metadata.version(name)
    assert lines["jax"] == jax.__version__
    assert all(f"{d.platform}:{d.id}" in lines["devices"] for d in jax.devices())
    assert lines["jax_enable_x64"] == str(bool(jax.config.jax_enable_x64))  # True in tests
    assert "xla options probed" in lines
