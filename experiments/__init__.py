"""Experiments: one script per figure or table, each `main(*, quick=False, out=...)`."""

from ._cli import early_help as _early_help

_early_help()  # `python -m experiments.<name> --help`: at once, before JAX is imported
