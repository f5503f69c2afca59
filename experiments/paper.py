"""The main job: every experiment (quick sizes by default, `--full` for paper sizes), with a
progress bar, and `results/index.md` listing each figure with a caption and key numbers.

    python -m experiments.paper [--full] [--out results]
"""


import importlib
import time
from pathlib import Path

from tqdm.auto import tqdm

from ._cli import PAPER_ESTIMATE, parser
from ._common import setup

# Run order of the main job. Each module owns `main(*, quick, out)` and `caption(summary)`.
EXPERIMENTS = (
    "fig3_node_dynamics",
    "fig4_init_scale",
    "rates",
    "implicit_bias",
    "conservation_accuracy",
    "flow_vs_gd",
    "stochastic_bias",
    "conservation_laws",
    "saddle_to_saddle",
    "discrete_bias",
    "margins",
)


def main(*, quick: bool = True, out="results", progress: bool = True) -> dict:
    out = setup(out)
    results, timings = {}, {}
    modules = {name: importlib.import_module(f"experiments.{name}") for name in EXPERIMENTS}
    bar = tqdm(modules.items(), desc="experiments", disable=not progress)
    for name, module in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        results[name] = module.main(quick=quick, out=out / name)
        timings[name] = time.perf_counter() - start
    lines = [
        "# ddln_jax results",
        "",
        f"Mode: {'quick' if quick else 'full'}. Regenerate with `python -m experiments.paper`"
        + ("" if quick else " --full") + ".",
        "",
    ]
    for name, summary in results.items():
        png = Path(name) / f"{name}.png"
        lines += [f"## {name}", "", f"![{name}]({png.as_posix()})", ""]
        lines += modules[name].caption(summary)
        lines += ["", f"Data: `{name}/` (json, npz). Run time {timings[name]:.1f} s.", ""]
    (out / "index.md").write_text("\n".join(lines))
    return {"index": str(out / "index.md"), "results": results, "timings": timings}


if __name__ == "__main__":
    args = parser(__doc__, "paper", PAPER_ESTIMATE, "results").parse_args()
    res = main(quick=not args.full, out=args.out)
    print(f"wrote {res['index']}")
    for k, v in res["timings"].items():
        print(f"  {k}: {v:.1f} s")
