"""The raw file readers shared by the CLI and the engine adapters."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from eplb_jax._src import files
from eplb_jax.contrib import sglang


@pytest.mark.parametrize(
  ("source", "inline"),
  [
    ('{"logical_count": [[1]]}', True),
    ("  [[1, 2]]", True),
    ("loads.json", False),
    ("inline JSON.json", False),
    (pathlib.Path("{odd}.json"), False),
  ],
)
def test_inline_json_is_told_by_the_source(source, inline):
  assert files.is_inline_json(source) == inline
  assert (files.source_suffix(source) == "") == inline


def test_a_file_named_like_inline_json_is_read_as_a_file(tmp_path):
  # The name an error message would give inline text decides nothing.
  path = tmp_path / "inline JSON x.json"
  path.write_text('{"logical_count": [[1, 2]]}')
  np.testing.assert_array_equal(sglang.read_loads(str(path)), [[1, 2]])
  np.testing.assert_array_equal(sglang.read_loads('{"logical_count": [[3, 4]]}'), [[3, 4]])


@pytest.mark.parametrize(
  ("text", "message"), [("{not json", "not valid JSON"), ("[" * 100_000, "JSON nested too deeply")]
)
def test_bad_json_names_the_source(tmp_path, text, message):
  path = tmp_path / "bad.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=rf"bad\.json: {message}"):
    files.read_json(path)
  with pytest.raises(ValueError, match=f"^inline JSON .*: {message}"):
    files.read_json(text)


def test_missing_files(tmp_path):
  with pytest.raises(ValueError, match="no such file"):
    files.read_json(tmp_path / "absent.json")
  with pytest.raises(ValueError, match="no such file"):
    files.read_npy(tmp_path / "absent.npy", allow_pickle=False, what="loads")
  with pytest.raises(ValueError, match="no such file"):
    files.read_torch(tmp_path / "absent.pt")


def test_pickled_npy_needs_allow_pickle(tmp_path):
  path = tmp_path / "dict.npy"
  np.save(path, {"a": 1}, allow_pickle=True)
  assert files.npy_is_pickled(path)
  with pytest.raises(ValueError, match="allow_pickle=True"):
    files.read_npy(path, allow_pickle=False, what="a dict")
  assert files.read_npy(path, allow_pickle=True, what="a dict") == {"a": 1}
