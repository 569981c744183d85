"""Sphinx configuration of the eplb_jax documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html``; the examples of the guides and the
docstrings run with ``python -m sphinx -W -b doctest docs docs/_build/doctest``.
"""

import doctest
import os
import pathlib
import sys

# Before anything imports jax: 8 host CPU devices, so that the mesh examples run anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import eplb_jax  # noqa: E402

project = "eplb_jax"
author = "eplb_jax authors"
copyright = "eplb_jax authors"
release = eplb_jax.__version__
version = release

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.doctest",
  "sphinx.ext.napoleon",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
# bench/results/moe_layer.md, included as its script writes it, goes from "#" to "###".
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_title = f"eplb_jax {release}"

# The API pages list the public names; members in source order.
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# NamedTuple fields are described in "Attributes:"; as :ivar: they do not clash with autodoc's.
napoleon_use_ivar = True

# Every ``>>>`` block (docstrings included) and every ``{doctest}`` block is a test.
doctest_default_flags = (
  doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1
)
doctest_global_setup = """
import inspect

import jax
import jax.numpy as jnp
import numpy as np

import eplb_jax
from eplb_jax import metrics as _metrics

np.set_printoptions(precision=4, suppress=True)
# The docs show metrics.lower_bound(weight, topology); until the code takes a Topology there,
# the blocks that call it are skipped (":skipif: LOWER_BOUND_TAKES_SIZES").
LOWER_BOUND_TAKES_SIZES = "num_replicas" in inspect.signature(_metrics.lower_bound).parameters
"""
