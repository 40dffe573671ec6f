"""`python -m pipeline {run,encode,qa,make-shards,inspect}`: the command line.

    run CONFIG [key.sub=value ...]      encode, then QA
    encode CONFIG [key.sub=value ...]   the encode stage only
    qa CONFIG [key.sub=value ...]       the QA stage only (on what is committed)
    make-shards ...                     images -> WebDataset shards (see its --help)
    inspect OUTPUT [--verify]           summarize and validate an output

Exit codes: 0 success; 1 failed shards or a failed QA verdict; 2 bad command line, config,
inputs or a manifest mismatch (nothing was done); 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Callable

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("pipeline")

# Commands implemented by other modules; they parse their own arguments.
_DELEGATED = {
    "make-shards": ("pipeline.make_shards", "turn a folder of images (or the bundled photos) into WebDataset shards"),
    "inspect": ("pipeline.inspect", "summarize and validate an output (OUTPUT [--verify])"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Precompute VAE latents from WebDataset shards on Ray, and check them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (
        ("run", "encode, then QA"),
        ("encode", "encode input shards into latent shards"),
        ("qa", "decode a sample of the latents and write the QA report"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="job config (YAML)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config keys, e.g. ray.workers=8")
        if name != "qa":
            p.add_argument("--dry-run", action="store_true", help="validate the config and show the plan, then stop")
        p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    for name, (_, text) in _DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _load_delegate(command: str) -> Callable[[list[str]], int] | None:
    module_name = _DELEGATED[command][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        print(f"error: the '{command}' command is not available: {module_name} cannot be imported ({e})", file=sys.stderr)
        return None
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"error: the '{command}' command is not available: {module_name} has no main()", file=sys.stderr)
        return None
    return entry


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _sigterm_as_interrupt() -> object:
    """`ray job stop` and schedulers send SIGTERM: stop as cleanly as on Ctrl-C.

    Returns the previous handler (restored when `main` returns), or None off the main thread.
    """

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use)
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        entry = _load_delegate(argv[0])
        return EXIT_USAGE if entry is None else int(entry(argv[1:]) or 0)
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.quiet)
    previous = _sigterm_as_interrupt()
    try:
        return _command(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _command(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "qa":
            return _qa(config)
        if args.dry_run:
            return _dry_run(config)
        return _encode_and_qa(config, with_qa=args.command == "run")
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _encode_and_qa(config, with_qa: bool) -> int:
    from .config import ConfigError
    from .manifest import ManifestError
    from .plan import PlanError

    try:
        from . import driver
    except ImportError as e:
        print(f"error: the encode stage cannot be loaded: {e}", file=sys.stderr)
        return EXIT_USAGE
    import ray

    # Shut Ray down at the end only if this command started it (an embedding program may own it).
    owned = not ray.is_initialized()
    try:
        summary = driver.run_encode(config)
        print(summary.render())
        code = summary.exit_code
        if code == EXIT_INTERRUPTED or not with_qa:
            return code
        qa_code = _qa(config)
        return code or qa_code
    except (ConfigError, PlanError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectionError as e:
        print(f"error: cannot connect to the Ray cluster (ray.address / RAY_ADDRESS): {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if owned and ray.is_initialized():
            ray.shutdown()


def _qa(config) -> int:
    try:
        from .qa import run_qa
    except ImportError as e:
        print(f"error: the 'qa' stage is not available: pipeline.qa cannot be imported ({e})", file=sys.stderr)
        return EXIT_USAGE
    return int(run_qa(config))


def _dry_run(config) -> int:
    from . import storage
    from .plan import PlanError, make_plan

    try:
        plan = make_plan(config.input.urls, config.output.path, config.input.storage_options,
                         config.output.storage_options)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"config {config.source}: valid")
    print(f"input: {len(plan.shards)} shard(s); output {storage.redact(config.output.path)}: "
          f"{len(plan.done)} committed, {len(plan.todo)} to do")
    for task in plan.todo[:10]:
        print(f"  {task.name} <- {storage.redact(task.url)}")
    if len(plan.todo) > 10:
        print(f"  ... and {len(plan.todo) - 10} more")
    return EXIT_OK
