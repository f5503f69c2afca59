// MathJax 3 for pymdownx.arithmatex (generic mode): only the spans and divs it marks are
// typeset. Loaded before javascripts/mathjax/tex-chtml.js, which the docs hook copies in.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
