"""Writing files so that a failure never leaves a partial one behind."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import stat
import tempfile
from collections.abc import Callable
from typing import IO


def _file_mode(path: pathlib.Path) -> int:
  """The permissions ``path`` gets, as ``open(path, "wb")`` would leave them.

  An existing file keeps its own, and must be writable: ``PermissionError``
  where ``open`` would raise it (a read-only file, for a user other than
  root). A new file gets ``0o666`` less the umask.
  """
  try:
    mode = stat.S_IMODE(os.stat(path).st_mode)
  except FileNotFoundError:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
  if not os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
  return mode


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> pathlib.Path:
  """Writes ``path`` through ``write(file)`` all at once, or not at all.

  ``write`` fills a temporary file in the same directory, which is then
  renamed onto ``path`` (``os.replace``, atomic on POSIX). If anything fails
  (a full disk, an error inside ``write``), the temporary file is removed and
  whatever was at ``path`` before is left as it was; the error propagates.
  As with a plain ``open(path, "wb")``, an existing file keeps its
  permission bits, and one the user may not write is refused
  (``PermissionError``) and left as it was.

  Returns:
    ``path``, exactly as given (no suffix is added).
  """
  path = pathlib.Path(path)
  mode = _file_mode(path)  # before the write: a read-only target is refused untouched
  descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(descriptor, "wb") as file:
      write(file)
      file.flush()
      os.fsync(file.fileno())
    os.chmod(temporary, mode)
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise
  return path
