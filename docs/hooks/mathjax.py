"""mkdocs hook: MathJax 3 served from the site itself.

The docs build and their tests run without network beyond the package registries, so MathJax
cannot come from a CDN: its files come from the PyPI package `django-static-mathjax` (MathJax
3.2.2, the `docs` extra) and are copied into `site/javascripts/mathjax/` after each build.
`mkdocs.yml` loads `javascripts/mathjax-config.js` and then `javascripts/mathjax/tex-chtml.js`.
"""

import importlib.util
import shutil
from pathlib import Path

# what tex-chtml.js loads lazily (fonts, TeX extensions, the menu's parts); the speech rule
# engine, the SVG output and the other bundles are not used by the site
_IGNORE = shutil.ignore_patterns("sre", "svg", "*svg*.js", "*-full*.js", "mml-*.js", "node-main.js")


def mathjax_dir() -> Path:
    spec = importlib.util.find_spec("mathjax")  # django-static-mathjax (3.2.2.0: no __init__)
    if spec is None:
        raise RuntimeError("the docs need MathJax from the `docs` extra: pip install -e '.[docs]'")
    for folder in spec.submodule_search_locations or []:
        es5 = Path(folder) / "static" / "mathjax" / "es5"
        if (es5 / "tex-chtml.js").is_file():
            return es5
    raise RuntimeError(f"django-static-mathjax has no static/mathjax/es5/tex-chtml.js ({spec})")


def on_post_build(config, **kwargs):
    target = Path(config["site_dir"]) / "javascripts" / "mathjax"
    shutil.copytree(mathjax_dir(), target, ignore=_IGNORE, dirs_exist_ok=True)
