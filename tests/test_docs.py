"""The README and the getting-started page as a reader meets them: size, and code that runs.

Every ```python block runs as written, in order, the blocks of one page sharing a namespace (as a
reader follows them). A ```text block right after a python block is the output it prints, and
must match. The guides' and docstrings' examples run with Sphinx's doctest builder instead
(``python -m sphinx -W -b doctest docs <out>``, in CI).
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ("README.md", "docs/getting_started.md")
README_LIMIT = 10_000

# A fenced block: its language and its text; (?ms) so that ^ anchors at line starts.
_FENCE = re.compile(r"(?ms)^```(\w*)[^\n]*\n(.*?)^```[ \t]*$")


def blocks(text: str) -> list[tuple[str, str, str]]:
  """``(code, printed, where)`` per python block; ``printed``: the text block after it, or None."""
  fences = list(_FENCE.finditer(text))
  out = []
  for i, fence in enumerate(fences):
    if fence.group(1) != "python":
      continue
    printed = None
    after = fences[i + 1] if i + 1 < len(fences) else None
    if after and after.group(1) == "text" and not text[fence.end() : after.start()].strip():
      printed = after.group(2)
    out.append((fence.group(2), printed, f"line {text.count(chr(10), 0, fence.start()) + 1}"))
  return out


def _lines(text: str) -> list[str]:
  return [line.rstrip() for line in text.strip().splitlines()]


def test_readme_fits_one_screen_of_api():
  size = len((ROOT / "README.md").read_text(encoding="utf-8"))
  assert size <= README_LIMIT, f"README.md has {size} characters, more than {README_LIMIT}"


def test_blocks_are_found():
  text = "```python\nx = 1\nprint(x)\n```\n\n```text\n1\n```\n```python\ny = 2\n```\n"
  assert blocks(text) == [("x = 1\nprint(x)\n", "1\n", "line 1"), ("y = 2\n", None, "line 9")]


@pytest.mark.parametrize("page", PAGES)
def test_code_blocks_run_as_written(page):
  found = blocks((ROOT / page).read_text(encoding="utf-8"))
  assert found, f"{page} has no python block"
  namespace = {"__name__": "__main__"}
  for code, printed, where in found:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(code, f"{page}, {where}", "exec"), namespace)
    if printed is not None:
      assert _lines(out.getvalue()) == _lines(printed), f"{page}, {where}: printed output differs"
