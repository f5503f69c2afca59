"""The experiments' command lines, without JAX: every parser is built here, so that
`python -m experiments.<name> --help` answers at once. The package's `__init__` (imported
before the module, which imports JAX) calls `early_help`: with `-h`/`--help` it reads the
module's docstring and constants from its source (`ast`, nothing is imported) and prints the
help the module itself would.
"""

import argparse
import ast
import sys
from pathlib import Path

# Quick-run times (s) of `python -m experiments.paper` on 2 CPU cores shared with other jobs
# (an upper bound: 7 min 57 s in all, the first including JAX's start-up), measured at commit
# c56584b; `--help` states them next to `--full`.
QUICK_SECONDS = {
    "fig3_node_dynamics": 73,
    "fig4_init_scale": 45,
    "rates": 44,
    "implicit_bias": 57,
    "conservation_accuracy": 36,
    "flow_vs_gd": 56,
    "stochastic_bias": 60,
    "conservation_laws": 42,
    "saddle_to_saddle": 65,
    "paper": 477,
}


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks (usage examples) and shows the defaults."""


def parser(doc: str, name: str, full_estimate: str, default_out: str) -> argparse.ArgumentParser:
    """The experiment CLIs' shared options: `--full` and `--out`."""
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}", description=doc, formatter_class=Formatter
    )
    quick = QUICK_SECONDS.get(name)
    quick = "" if quick is None else f"; the quick run took {quick:.0f} s"
    p.add_argument(
        "--full",
        action="store_true",
        help=f"paper sizes instead of the quick sizes ({full_estimate} on 2 CPU cores{quick})",
    )
    p.add_argument("--out", default=default_out, help="output folder")
    return p


def _positive(kind, minimum, strict: bool, what: str):
    def convert(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (v > minimum if strict else v >= minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum} ({what}), got {text}"
            )
        return v

    convert.__name__ = kind.__name__
    return convert


def sweep_parser(doc: str, quick: dict, full: dict, full_estimate: str):
    """`python -m experiments.sweep`: an explicit value is used (or refused), never replaced
    by the default of the size."""
    p = parser(doc, "sweep", full_estimate, "results/sweep")
    none = "%(default).0s"  # these defaults depend on --full: said in the text, not "None"
    p.add_argument(
        "--depths",
        type=_positive(int, 2, False, "a network has two layers or more"),
        nargs="+",
        help=f"depths (default: {quick['depths']}, --full {full['depths']}){none}",
    )
    p.add_argument(
        "--scales",
        type=_positive(float, 0.0, False, "an init scale"),
        nargs="+",
        help=f"init scales (default: {quick['scales']}, --full {full['scales']}){none}",
    )
    p.add_argument(
        "--seeds",
        type=_positive(int, 1, False, "a number of seeds"),
        help=f"number of seeds n: seeds 0..n-1 (default: {quick['seeds']}, --full "
        f"{full['seeds']}){none}",
    )
    p.add_argument(
        "--t1",
        type=_positive(float, 0.0, True, "the final time"),
        help=f"final time (default: {quick['t1']:g}, --full {full['t1']:g}){none}",
    )
    p.add_argument(
        "--init", default="gaussian", choices=["gaussian", "zero_first"], help="initialization"
    )
    p.add_argument(
        "--max-chunk",
        type=_positive(int, 1, False, "grid points"),
        default=256,
        help="grid points per chunk: the unit of work, of writing and of resume",
    )
    p.add_argument(
        "--lease-timeout",
        type=_positive(float, 0.0, True, "seconds"),
        default=120.0,
        help="seconds after which the chunks of a process that died are taken over",
    )
    p.add_argument(
        "--load",
        action="store_true",
        help="only summarise the results in --out (complete or partial)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (auto-detects SLURM, Open MPI, ...)",
    )
    p.add_argument(
        "--coordinator", help="HOST:PORT of process 0: jax.distributed.initialize by hand" + none
    )
    p.add_argument(
        "--num-processes", type=int, help="number of processes (with --coordinator)" + none
    )
    p.add_argument(
        "--process-id", type=int, help="this process's index, 0..N-1 (with --coordinator)" + none
    )
    return p


def bench_parser(doc: str, full_estimate: str):
    p = parser(doc, "bench", full_estimate, "results/bench")
    p.add_argument(
        "--solver",
        default=None,
        metavar="NAME",
        help="also run the B rows with dd.sweep(..., solver=NAME); without it only "
        "the fused fast path runs",
    )
    return p


def device_bench_parser(doc: str):
    p = argparse.ArgumentParser(
        prog="python -m experiments.device_bench", description=doc, formatter_class=Formatter
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated B values (default: 1e4,1e5,1e6 on an accelerator, 256,1024 on a CPU)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds after which no further row starts (projected from the last row's rate)",
    )
    p.add_argument(
        "--check", type=int, default=4, help="grid points per row checked against dd.gradient_flow"
    )
    p.add_argument("--out", default="results/device_bench", help="output folder")
    return p


def module_parser(name: str, doc: str, consts: dict) -> argparse.ArgumentParser | None:
    """The parser of `experiments/<name>.py` from its docstring and constants (None: a module
    without a command line)."""
    estimate = consts.get("FULL_ESTIMATE", "time not measured")
    if name == "sweep":
        return sweep_parser(doc, consts["QUICK"], consts["FULL"], estimate)
    if name == "bench":
        return bench_parser(doc, estimate)
    if name == "device_bench":
        return device_bench_parser(doc)
    if name == "paper":
        return parser(doc, "paper", PAPER_ESTIMATE, "results")
    if name in QUICK_SECONDS or consts.get("_uses_cli"):
        return parser(doc, name, estimate, f"results/{name}")
    return None


PAPER_ESTIMATE = "~25 min"


def _literal(node):
    """`ast.literal_eval`, and `dict(key=literal, ...)`."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "dict"
        and not node.args
    ):
        return {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    return ast.literal_eval(node)


def _source_facts(path: Path) -> tuple[str, dict]:
    """A module's docstring and its module-level literal constants, read without importing."""
    tree = ast.parse(path.read_text())
    consts = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            try:
                consts[node.targets[0].id] = _literal(node.value)
            except ValueError:
                pass
    # a module run by `_common.cli(main, __doc__, "results/<name>")`: the shared parser
    consts["_uses_cli"] = any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "cli"
        for n in ast.walk(tree)
    )
    return ast.get_docstring(tree, clean=False) or "", consts


def early_help(argv=None) -> None:
    """With `python -m experiments.<name> ... -h`: print the module's help and exit, before
    anything imports JAX. Does nothing otherwise (or if the module is not known here)."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    if "-m" not in argv:
        return
    i = argv.index("-m")
    if i + 1 >= len(argv) or not argv[i + 1].startswith("experiments."):
        return
    rest = argv[i + 2 :]
    if not {"-h", "--help"} & set(rest):
        return
    name = argv[i + 1].split(".", 1)[1]
    path = Path(__file__).with_name(f"{name}.py")
    if not path.exists():
        return
    try:
        doc, consts = _source_facts(path)
        p = module_parser(name, doc, consts)
    except Exception:  # (a module this reader does not understand: its own parser answers)
        return
    if p is not None:
        p.parse_args(rest)  # prints the help and exits
