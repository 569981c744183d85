"""Reading and writing files: the formats' raw readers, and writes that never leave a partial file.

The readers (JSON, ``.npy``, torch's ``.pt``) raise ``ValueError`` whose
message starts with the source's name; what a file must hold is the caller's
to check (:mod:`eplb_jax.cli`, :mod:`eplb_jax.contrib.sglang`). A JSON source
is a path or, as SGLang takes it, the JSON text itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import stat
import tempfile
from collections.abc import Callable
from typing import IO
from typing import Any

import numpy as np

Source = str | os.PathLike


def is_inline_json(source: Source) -> bool:
  """Whether ``source`` is JSON text rather than a path: a str starting with ``{`` or ``[``."""
  return not isinstance(source, os.PathLike) and str(source).lstrip().startswith(("{", "["))


def source_name(source: Source) -> str:
  """How an error message names ``source``: its path, or the start of its inline JSON text."""
  text = str(source)
  if is_inline_json(source):
    return f"inline JSON {text if len(text) <= 40 else text[:37] + '...'!r}"
  return text


def source_suffix(source: Source) -> str:
  """The suffix of ``source``'s path as written (``""`` for inline JSON text)."""
  return "" if is_inline_json(source) else pathlib.Path(source).suffix


def read_json(source: Source) -> Any:
  """The value of a JSON file, or of inline JSON text (:func:`is_inline_json`)."""
  where = source_name(source)
  if is_inline_json(source):
    text = str(source)
  else:
    path = pathlib.Path(source)
    if not path.is_file():
      raise ValueError(f"{where}: no such file")
    try:
      text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
      raise ValueError(f"{where}: cannot read the file as text ({error})") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise ValueError(f"{where}: not valid JSON ({error})") from None
  except RecursionError:
    raise ValueError(f"{where}: JSON nested too deeply") from None


def npy_is_pickled(path: pathlib.Path) -> bool:
  """Whether a ``.npy`` file holds an object (pickled) array, read from its header alone."""
  try:
    with path.open("rb") as file:
      version = np.lib.format.read_magic(file)
      if version == (1, 0):
        _, _, dtype = np.lib.format.read_array_header_1_0(file)
      else:
        _, _, dtype = np.lib.format.read_array_header_2_0(file)
  except Exception as error:  # short reads, bad magic, unparsable headers: several types
    raise ValueError(f"{path}: not a NumPy .npy file ({error})") from None
  return dtype.hasobject


def read_npy(path: pathlib.Path, allow_pickle: bool, what: str) -> Any:
  """A ``.npy`` file's array, or the object a pickled 0-d array holds (``what``, for the
  message that asks for ``allow_pickle``)."""
  if not path.is_file():
    raise ValueError(f"{path}: no such file")
  if npy_is_pickled(path) and not allow_pickle:
    raise ValueError(
      f"{path}: holds a pickled object ({what}); loading it runs code from the file, "
      "so pass allow_pickle=True (eplb-jax plan: --allow-pickle) if you trust it"
    )
  try:
    array = np.load(path, allow_pickle=allow_pickle)
  except Exception as error:  # truncated data, bad pickles: many types
    raise ValueError(
      f"{path}: cannot load the .npy file ({type(error).__name__}: {error})"
    ) from None
  if array.dtype.hasobject and array.ndim == 0:
    return array.item()
  return array


def read_torch(path: pathlib.Path) -> Any:
  """A ``torch.save`` file of tensors and plain containers (``weights_only``); needs torch."""
  if not path.is_file():
    raise ValueError(f"{path}: no such file")
  try:
    import torch
  except ImportError:
    raise ImportError(f"{path}: reading .pt files needs torch (pip install torch)") from None
  try:
    # weights_only: tensors, numbers, strings and containers; no arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises many types on corrupt or unsafe files
    raise ValueError(
      f"{path}: not a torch.save file of tensors and plain containers "
      f"(torch.load with weights_only=True failed: {type(error).__name__}: {error})"
    ) from None


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
