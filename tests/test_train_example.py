"""Runs a short version of examples/train_moe.py (8 host devices, in a subprocess)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "train_moe.py"


@pytest.mark.heavy
def test_short_training_run_rebalances_without_changing_the_loss():
  proc = subprocess.run(
    [sys.executable, str(EXAMPLE), "--steps", "30", "--rebalance-every", "10", "--window", "10"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert "OK: rebalancing left the losses unchanged" in proc.stdout, proc.stdout
  rebalances = re.findall(r"rebalance; .* ([\d.]+) -> ([\d.]+)", proc.stdout)
  assert len(rebalances) == 3, proc.stdout
  for before, after in rebalances:
    assert float(after) <= float(before), proc.stdout
  # The uniform initial placement is badly skewed; the first rebalance fixes most of it.
  before, after = map(float, rebalances[0])
  assert after < 0.6 * before, proc.stdout
  measured = re.search(
    r"max/mean: ([\d.]+) before the first rebalance, ([\d.]+) after", proc.stdout
  )
  assert measured and float(measured[2]) < float(measured[1]), proc.stdout
