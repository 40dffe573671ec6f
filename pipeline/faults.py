"""Test-only fault injection: crash or hang on purpose, switched on by environment variables.

The tests of retries and of the decode pool need a worker that dies mid-shard, and a decode
process that dies or hangs on one sample, in real processes (Ray actors, decode children). Each
hook is read from the environment once, when its owner starts, and is a no-op object when its
variables are unset, so production runs only ever call an empty method. The driver forwards the
variables that are set to its actors (`ENV_VARS`), which may run on other machines.

    LATENT_FAULT_KILL_AFTER=N + LATENT_FAULT_MARKER=PATH   SIGKILL the encode worker's process
        after N encoded rows of a shard, once per marker file (see `KillAfterRows`)
    LATENT_FAULT_CRASH_KEY=KEY   a decode process dies on the sample KEY (a decoder crash)
    LATENT_FAULT_HANG_KEY=KEY    a decode process hangs on the sample KEY (a decoder loop)
"""

from __future__ import annotations

import logging
import os
import signal
import time

__all__ = ["ENV_VARS", "KILL_AFTER", "MARKER", "CRASH_KEY", "HANG_KEY", "kill_after_rows", "decode_fault"]

log = logging.getLogger(__name__)

KILL_AFTER = "LATENT_FAULT_KILL_AFTER"
MARKER = "LATENT_FAULT_MARKER"
CRASH_KEY = "LATENT_FAULT_CRASH_KEY"
HANG_KEY = "LATENT_FAULT_HANG_KEY"
#: Every variable above: what the driver passes on to its actors.
ENV_VARS = (KILL_AFTER, MARKER, CRASH_KEY, HANG_KEY)


class NoFault:
    """The hook when its variables are unset: every check does nothing."""

    def check(self, _: object) -> None:
        pass


class KillAfterRows:
    """SIGKILL this process once a shard has `after` encoded rows, once per marker file.

    The first worker to get there creates `marker` (atomically) and kills itself; later attempts
    see the file and carry on, so the retry succeeds.
    """

    def __init__(self, after: int, marker: str):
        self.after = after
        self.marker = marker

    def check(self, rows: int) -> None:
        if rows < self.after or os.path.exists(self.marker):
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"killed pid {os.getpid()} after {rows} rows\n".encode())
        os.close(fd)
        log.warning("fault hook: killing worker process %d after %d rows", os.getpid(), rows)
        os.kill(os.getpid(), signal.SIGKILL)


class DecodeFault:
    """In a decode process: die (exit code 70) on the sample `crash`, hang on the sample `hang`."""

    def __init__(self, crash: str | None, hang: str | None):
        self.crash = crash
        self.hang = hang

    def check(self, key: str) -> None:
        if key == self.crash:
            os._exit(70)
        if key == self.hang:
            time.sleep(1e6)


def kill_after_rows() -> KillAfterRows | NoFault:
    """The encode worker's hook: active when both LATENT_FAULT_KILL_AFTER and _MARKER are set."""
    after, marker = os.environ.get(KILL_AFTER), os.environ.get(MARKER)
    return KillAfterRows(int(after), marker) if after and marker else NoFault()


def decode_fault() -> DecodeFault | NoFault:
    """A decode process's hook: active when LATENT_FAULT_CRASH_KEY or _HANG_KEY is set."""
    crash, hang = os.environ.get(CRASH_KEY), os.environ.get(HANG_KEY)
    return DecodeFault(crash, hang) if crash is not None or hang is not None else NoFault()
