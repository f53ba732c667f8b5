"""Sphinx math renderer that writes MathML into the HTML at build time.

Every ``.. math::`` block and ``:math:`` role is converted from LaTeX to MathML with
docutils' own converter (``docutils.utils.math.latex2mathml``, part of docutils, which
Sphinx depends on). Browsers render MathML natively: the pages need no JavaScript,
no web fonts and no network access (no MathJax, no CDN). A formula the converter
cannot handle stops the build with an error naming it, instead of showing up blank.

Enable with ``extensions = ["mathml_math"]`` and ``html_math_renderer = "mathml"``.
"""
from docutils import nodes
from docutils.utils.math import latex2mathml
from sphinx.errors import ExtensionError
from sphinx.util.math import get_node_equation_number


def latex_to_mathml(latex: str, block: bool) -> str:
    """LaTeX -> a ``<math>`` element (``display="block"`` for display math)."""
    try:
        try:
            return latex2mathml.tex2mathml(latex, as_block=block)  # docutils >= 0.20
        except TypeError:
            return latex2mathml.tex2mathml(latex, inline=not block)  # docutils 0.18-0.19
    except Exception as err:  # the converter raises SyntaxError and others
        raise ExtensionError(f"mathml_math: cannot convert the formula {latex!r} to MathML: "
                             f"{err}") from err


def visit_math_html(self, node):
    self.body.append(self.starttag(node, "span", "", CLASS="math notranslate"))
    self.body.append(latex_to_mathml(node.astext(), block=False))
    self.body.append("</span>")
    raise nodes.SkipNode


def visit_displaymath_html(self, node):
    self.body.append(self.starttag(node, "div", CLASS="math notranslate"))
    if node["number"]:
        number = get_node_equation_number(self, node)
        self.body.append(f'<span class="eqno">({number})')
        self.add_permalink_ref(node, "Link to this equation")
        self.body.append("</span>")
    # A math directive may hold several equations separated by blank lines.
    for equation in node.astext().split("\n\n"):
        if equation.strip():
            self.body.append(latex_to_mathml(equation.strip(), block=True))
    self.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer("mathml", (visit_math_html, None), (visit_displaymath_html, None))
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
