"""mkdocs hook: MathJax 3 served from the site itself.

The docs build and their tests run without network beyond the package registries, so MathJax
cannot come from a CDN: its files come from the PyPI package `django-static-mathjax` (MathJax
3.2.2, the `docs` extra) and are copied into `site/javascripts/mathjax/` after each build.
`mkdocs.yml` loads `javascripts/mathjax-config.js` and then `javascripts/mathjax/tex-chtml.js`.
"""

import shutil
from pathlib import Path

# what tex-chtml.js loads lazily (fonts, TeX extensions, the menu's parts); the speech rule
# engine, the SVG output and the other bundles are not used by the site
_IGNORE = shutil.ignore_patterns("sre", "svg", "*svg*.js", "*-full*.js", "mml-*.js", "node-main.js")


def mathjax_dir() -> Path:
    try:
        import mathjax  # django-static-mathjax
    except ImportError as e:
        raise RuntimeError(
            "the docs need MathJax from the `docs` extra: pip install -e '.[docs]'"
        ) from e
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (es5 / "tex-chtml.js").is_file():
        raise RuntimeError(f"django-static-mathjax has no es5/tex-chtml.js under {es5}")
    return es5


def on_post_build(config, **kwargs):
    target = Path(config["site_dir"]) / "javascripts" / "mathjax"
    shutil.copytree(mathjax_dir(), target, ignore=_IGNORE, dirs_exist_ok=True)
