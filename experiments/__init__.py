"""Experiments: one script per figure or table, each `main(*, quick=False, out=...)`."""
