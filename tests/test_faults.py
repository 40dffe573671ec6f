"""Fault hooks: off unless their variables are set; the kill hook kills once per marker file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline import faults

ROOT = Path(__file__).resolve().parent.parent

_KILL = "from pipeline.faults import kill_after_rows\nh = kill_after_rows()\nh.check(1)\nh.check(3)\nprint('alive')"


def test_hooks_are_no_ops_when_unset(monkeypatch):
    for name in faults.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert isinstance(faults.kill_after_rows(), faults.NoFault)
    assert isinstance(faults.decode_fault(), faults.NoFault)
    monkeypatch.setenv(faults.KILL_AFTER, "3")  # without a marker file the kill hook stays off
    assert isinstance(faults.kill_after_rows(), faults.NoFault)
    monkeypatch.setenv(faults.HANG_KEY, "k")
    hook = faults.decode_fault()
    assert isinstance(hook, faults.DecodeFault) and hook.hang == "k" and hook.crash is None
    hook.check("another key")


def test_kill_hook_kills_the_process_once(tmp_path):
    marker = tmp_path / "marker"
    env = dict(os.environ, **{faults.KILL_AFTER: "3", faults.MARKER: str(marker)})
    first = subprocess.run([sys.executable, "-c", _KILL], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == -signal.SIGKILL and "after 3 rows" in marker.read_text()
    again = subprocess.run([sys.executable, "-c", _KILL], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == "alive"
