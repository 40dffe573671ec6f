"""What the console shows: the job's own lines; Ray's go to a log file unless `--verbose`.

Left alone, Ray writes its own lines between the job's: the token-authentication warning, the
dashboard address, every actor's log lines prefixed with ``(EncodeActor pid=...)``, notices about
lines it deduplicated and, when an actor fails to start, its traceback and a C++ stack dump. By
default the command line keeps them off the console:

* the driver's ``ray`` logger writes to ``ray-driver-PID.log`` in the Ray session's log folder
  (``/tmp/ray/session_latest/logs/`` on the machine that runs the driver, by default); its ERROR
  lines still reach the console;
* actors' output is not forwarded to the driver (``ray.init(log_to_driver=False)``); it stays in
  the session's worker logs (``ray logs``, the dashboard). Whatever the job must show of an actor,
  a failed shard or a worker that cannot start, reaches the driver as an error, which prints it.

`--verbose` (`set_verbose(True)`) leaves Ray's output as Ray writes it. A program that calls
`ray.init` itself (a notebook, the tests) keeps its own settings: `init_ray` runs only when the
job starts Ray.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile

import ray

__all__ = ["init_ray", "set_verbose"]

log = logging.getLogger(__name__)

_verbose = False
# The "ray" logger's handlers as Ray set them up, restored for a verbose run after a quiet one.
_ray_handlers: list[logging.Handler] | None = None


def set_verbose(verbose: bool) -> None:
    """Show Ray's own output on the console (True) or route it to a log file (False, the default)."""
    global _verbose
    _verbose = verbose


class _HeldLog(logging.StreamHandler):
    """Keeps records in memory until the log file is known (Ray logs before its session exists)."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())

    def open(self, path: str) -> None:
        """Write what was held to `path` and every later record after it."""
        held = self.stream.getvalue()
        f = open(path, "a", encoding="utf-8")  # closed with the handler
        f.write(held)
        f.flush()
        self.setStream(f)

    def close(self) -> None:
        if not isinstance(self.stream, io.StringIO):
            self.stream.close()
        super().close()


def init_ray(address: str | None) -> None:
    """`ray.init(address)` with Ray's output routed as the module docstring says."""
    logger = logging.getLogger("ray")
    global _ray_handlers
    if _ray_handlers is None:
        _ray_handlers = list(logger.handlers)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if handler not in _ray_handlers:
            handler.close()
    if _verbose:
        for handler in _ray_handlers:
            logger.addHandler(handler)
        log.info("%s", _where(ray.init(address=address), address))
        return
    held = _HeldLog()
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    logger.addHandler(held)
    logger.addHandler(errors)
    where = _where(ray.init(address=address, log_to_driver=False), address)
    try:
        path = os.path.join(_node().get_logs_dir_path(), f"ray-driver-{os.getpid()}.log")
    except Exception:  # a ray:// client: no session folder on this machine
        path = os.path.join(tempfile.gettempdir(), f"ray-driver-{os.getpid()}.log")
    try:
        held.open(path)
    except OSError as e:
        log.info("%s; Ray's messages are dropped (cannot write %s: %s)", where, path, e)
        return
    log.info("%s; Ray's own messages: %s (--verbose shows them here)", where, path)


def _node():
    # Ray has no public accessor for its session folder or for whether ray.init started Ray.
    return getattr(ray._private.worker, "_global_node", None)


def _where(context, address: str | None) -> str:
    if getattr(_node(), "head", False):
        return "started a local Ray instance"
    return f"joined the Ray cluster at {context.address_info.get('gcs_address') or address}"
