"""Writing files so that a failure never leaves a partial one behind."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import IO


def _file_mode() -> int:
  """The permissions a new file gets (``0o666`` less the umask), as ``open`` would give it."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> pathlib.Path:
  """Writes ``path`` through ``write(file)`` all at once, or not at all.

  ``write`` fills a temporary file in the same directory, which is then
  renamed onto ``path`` (``os.replace``, atomic on POSIX). If anything fails
  (a full disk, an error inside ``write``), the temporary file is removed and
  whatever was at ``path`` before is left as it was; the error propagates.

  Returns:
    ``path``, exactly as given (no suffix is added).
  """
  path = pathlib.Path(path)
  descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(descriptor, "wb") as file:
      write(file)
      file.flush()
      os.fsync(file.fileno())
    os.chmod(temporary, _file_mode())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise
  return path
