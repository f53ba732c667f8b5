"""Sphinx configuration: API reference of ms_syncbn built from its docstrings.

Build:  python -m sphinx -b html docs docs/_build/html
Formulas are written into the pages as MathML at build time (docs/_ext/mathml_math.py):
no JavaScript, no CDN, no network access needed to build or to read the pages.
"""
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))  # ms_syncbn from this work tree
sys.path.insert(0, os.path.join(DOCS, "_ext"))

project = "ms_syncbn"
author = "ms_syncbn developers"
copyright = "ms_syncbn developers"  # pylint: disable=redefined-builtin

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Args / Returns / Raises / Examples sections
    "mathml_math",
]
html_math_renderer = "mathml"

# MindSpore-style docstring sections besides napoleon's own.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Inputs", "Outputs", "Supported Platforms"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}

html_theme = "alabaster"
html_static_path: list = []
html_theme_options = {"fixed_sidebar": False}
exclude_patterns = ["_build"]


def _class_signature_from_init(app, what, name, obj, options, signature, return_annotation):
    """MindSpore Cells show as ``(*args, **kwargs)`` (Cell defines __new__): use __init__'s."""
    import inspect  # pylint: disable=import-outside-toplevel

    if what == "class" and signature == "(*args, **kwargs)":
        init = inspect.signature(obj.__init__)
        parameters = list(init.parameters.values())[1:]  # drop self
        return str(init.replace(parameters=parameters)), return_annotation
    return None


def setup(app):
    app.connect("autodoc-process-signature", _class_signature_from_init)
