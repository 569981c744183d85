"""Import first: one CPU core for the timed calls of a benchmark.

Importing it gives XLA:CPU one intra-op thread (the flags must be set before
jax is imported). :func:`pinned` then pins the whole process, JAX's and
PyTorch's threads alike, to the last CPU while the timed calls run, so the
comparison is per core and the other cores' background work does not land
on it. Compilation runs outside it, on all cores, as it would for a user.
Pinning is Linux-only; elsewhere only the thread counts are limited.
:func:`report` prints and saves a benchmark's header and tables.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time
from collections.abc import Iterator

os.environ.setdefault(
  "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)


@contextlib.contextmanager
def pinned() -> Iterator[None]:
  """Runs the block with this process pinned to one CPU, then restores its CPUs."""
  if not hasattr(os, "sched_setaffinity"):
    yield
    return
  cpus = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {max(cpus)})
  try:
    yield
  finally:
    os.sched_setaffinity(0, cpus)


def interleaved_ms(calls: dict, rounds: int, repeats: int) -> dict:
  """Per key of ``calls`` (zero-argument callables), the milliseconds of each timed call.

  Every call runs once untimed (compiling it), then ``rounds`` rounds call each in turn
  ``repeats`` times on one pinned core, so that a slow phase of the machine lands on every
  call alike and their ratios are measured in one run.
  """
  import jax  # after the flags above

  times = {key: [] for key in calls}
  for call in calls.values():
    jax.block_until_ready(call())
  with pinned():
    for _ in range(rounds):
      for key, call in calls.items():
        for _ in range(repeats):
          start = time.perf_counter()
          jax.block_until_ready(call())
          times[key].append(1e3 * (time.perf_counter() - start))
  return times


def report(header: str, table: str, path: pathlib.Path | None) -> None:
  """Prints a benchmark's ``header`` and markdown ``table``, and writes both to ``path``."""
  print(header, table, sep="\n\n")
  if path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{header}\n\n{table}\n")
