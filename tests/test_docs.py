"""The Sphinx API reference builds, and every formula of the docstrings is rendered in it.

The build runs with no network at all where the machine allows it (``unshare -n``).
Every ``.. math::`` block and ``:math:`` role of the documented docstrings must appear
in the HTML as MathML: a non-empty ``<math>`` element whose structure matches the
LaTeX (``\\frac`` -> ``<mfrac>``, ``\\sqrt`` -> ``<msqrt>``, Greek letters as symbols),
with no raw LaTeX left anywhere in the page, and the pages load no external script,
stylesheet, font or image.
"""
import html
import inspect
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import ms_syncbn

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

GREEK = {"epsilon": "ϵ", "gamma": "γ", "beta": "β", "mu": "μ", "sigma": "σ"}
STRUCTURE = {"frac": "mfrac", "sqrt": "msqrt"}


def documented_objects():
    """The entries api.rst documents: ms_syncbn.__all__ (checked against api.rst), and
    SyncBatchNorm.convert_sync_batchnorm, the same function again under its PyTorch name."""
    return [getattr(ms_syncbn, name) for name in ms_syncbn.__all__] + \
        [ms_syncbn.SyncBatchNorm.convert_sync_batchnorm]


def docstring_formulas():
    """(latex, is_display) of every formula in the documented docstrings."""
    formulas = []
    for obj in documented_objects():
        doc = inspect.getdoc(obj) or ""
        for match in re.finditer(r"^( *)\.\. math::\n((?:\1 +.*\n|\s*\n)+)", doc + "\n", re.M):
            body = "\n".join(line.strip() for line in match.group(2).splitlines()).strip()
            formulas.extend((eq.strip(), True) for eq in body.split("\n\n") if eq.strip())
        formulas.extend((m.group(1), False) for m in re.finditer(r":math:`([^`]+)`", doc))
    return formulas


class MathCollector(HTMLParser):
    """Every <math> element: its display attribute, the tags inside and its text."""

    def __init__(self):
        super().__init__()
        self.elements = []
        self._current = None

    def handle_starttag(self, tag, attrs):
        if tag == "math":
            self._current = {"display": dict(attrs).get("display"), "tags": [], "text": ""}
        elif self._current is not None:
            self._current["tags"].append(tag)

    def handle_endtag(self, tag):
        if tag == "math" and self._current is not None:
            self.elements.append(self._current)
            self._current = None

    def handle_data(self, data):
        if self._current is not None:
            self._current["text"] += data.strip()


def expected_features(latex):
    """What the MathML of ``latex`` must contain: structural tags and symbols."""
    tags = {tag for cmd, tag in STRUCTURE.items() if f"\\{cmd}" in latex}
    symbols = {sym for cmd, sym in GREEK.items() if re.search(rf"\\{cmd}(?![a-zA-Z])", latex)}
    plain = re.sub(r"\\[a-zA-Z]+", " ", latex)
    symbols |= set(re.findall(r"[A-Za-z0-9]", plain))
    return tags, symbols


@pytest.fixture(scope="module")
def built_html(tmp_path_factory):
    try:
        import sphinx  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        pytest.fail("Sphinx is not installed: bash launch/install.sh --tests (the tests' tools, "
                    "requirements-docs.txt among them)")
    out = tmp_path_factory.mktemp("docs_html")
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q",
           str(DOCS), str(out)]
    offline = shutil.which("unshare") and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0
    if offline:
        cmd = ["unshare", "-n"] + cmd  # a network namespace with no interface up
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, f"sphinx-build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return out


def test_api_reference_documents_every_public_name(built_html):
    api = (DOCS / "api.rst").read_text()
    page = (built_html / "api.html").read_text()
    for name in ms_syncbn.__all__:
        assert re.search(rf"auto(class|function):: {name}\b", api), f"api.rst misses {name}"
        assert f'id="ms_syncbn.{name}"' in page, f"api.html misses {name}"
    assert 'id="ms_syncbn.SyncBatchNorm.convert_sync_batchnorm"' in page
    assert "SyncBatchNorm(num_features" in html.unescape(re.sub(r"<[^>]+>", "", page))
    for section in ("Inputs", "Outputs", "Raises", "Supported Platforms", "Examples"):
        assert section in page, section


def test_every_docstring_formula_is_rendered_as_mathml(built_html):
    formulas = docstring_formulas()
    assert sum(display for _, display in formulas) >= 4  # the layer, convert (x2), revert
    page = (built_html / "api.html").read_text()
    collector = MathCollector()
    collector.feed(page)
    elements = collector.elements
    for element in elements:
        assert element["text"], f"an empty <math> element: {element}"
    displays = [e for e in elements if e["display"] == "block"]
    inlines = [e for e in elements if e["display"] != "block"]
    assert len(displays) == sum(display for _, display in formulas)
    assert len(inlines) == sum(not display for _, display in formulas)
    for latex, display in formulas:
        tags, symbols = expected_features(latex)
        candidates = displays if display else inlines
        assert any(tags <= set(e["tags"]) and symbols <= set(e["text"]) for e in candidates), \
            f"formula {latex!r} is not rendered (expected tags {tags}, symbols {symbols})"
    # No LaTeX left in the page text: no raw \frac, \sqrt, \mathrm, \epsilon ...
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    leftovers = re.findall(r"\\(?:frac|sqrt|mathrm|epsilon|gamma|beta)\b", text)
    assert not leftovers, f"raw LaTeX in api.html: {leftovers}"


def test_pages_load_nothing_from_the_network(built_html):
    for page in built_html.glob("*.html"):
        source = page.read_text()
        external = re.findall(r"<(?:script|img|iframe)[^>]*\bsrc=\"(?:https?:)?//[^\"]+\"", source)
        external += re.findall(r"<link[^>]*\bhref=\"(?:https?:)?//[^\"]+\"", source)
        external += re.findall(r"@import\s+url\((?:https?:)?//", source)
        assert not external, f"{page.name} loads {external}"
        assert "mathjax" not in source.lower(), page.name
    index = (built_html / "index.html").read_text()
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">' in index
