"""`python -m pipeline {run,encode,qa,make-shards,inspect}`: the command line.

    run CONFIG [key.sub=value ...]      encode, then QA (--force: take over another job's lease)
    encode CONFIG [key.sub=value ...]   the encode stage only (--force as for run)
    qa CONFIG [key.sub=value ...]       the QA stage only (on what is committed)
    make-shards ...                     images -> WebDataset shards (see its --help)
    inspect OUTPUT [--verify|--reindex] summarize and validate an output; --reindex rebuilds OUTPUT/index

Exit codes: 0 success; 1 failed shards or a failed QA verdict; 2 bad command line, config,
inputs or a manifest mismatch (nothing was done); 130 interrupted (rerun to resume). A second job
on an OUTPUT that another job holds the lease of exits 1 naming the holder.
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
    "inspect": ("pipeline.inspect", "summarize and validate an output (OUTPUT [--verify] [--reindex])"),
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
            p.add_argument("--force", action="store_true",
                           help="take over the OUTPUT's lease from another job (one that crashed or hangs)")
        p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show Ray's own output on the console (otherwise in a log file in Ray's session folder)")
    for name, (_, text) in _DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _load_delegate(command: str) -> Callable[[list[str]], int]:
    # Imported on use: `make-shards` and `inspect` need neither Ray nor the encoder.
    return importlib.import_module(_DELEGATED[command][0]).main


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
        return int(_load_delegate(argv[0])(argv[1:]) or 0)
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
    from .console import set_verbose

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return EXIT_USAGE
    set_verbose(args.verbose)
    try:
        if args.command == "qa":
            return _qa(config)
        if args.dry_run:
            return _dry_run(config)
        return _encode_and_qa(config, with_qa=args.command == "run", force=args.force)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _encode_and_qa(config, with_qa: bool, force: bool = False) -> int:
    import ray

    from . import driver
    from .config import ConfigError
    from .lease import LeaseError, LeaseHeld
    from .manifest import ManifestError
    from .plan import PlanError

    # Shut Ray down at the end only if this command started it (an embedding program may own it).
    owned = not ray.is_initialized()
    try:
        if config.outputs:  # several outputs from one read
            from .multi_driver import run_outputs

            summaries = run_outputs(config, force=force)
        else:
            summaries = [driver.run_encode(config, force=force)]
        for summary in summaries:
            print(summary.render())
        code = max(summary.exit_code for summary in summaries)  # interrupted (130) > failed (1) > ok
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
    except OSError as e:  # OUTPUT cannot be written (the lease, the manifest): before any shard
        print(f"error: output.path: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LeaseError as e:
        # Another job holds OUTPUT: 1, as a failed run (it may finish, or --force takes over). A
        # lease that cannot be written or read: OUTPUT is unusable and nothing was done: 2.
        if isinstance(e, LeaseHeld):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(f"error: output.path: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if owned and ray.is_initialized():
            ray.shutdown()


def _qa(config) -> int:
    from .qa import run_qa

    # Each output has its own QA report; the worst verdict is the exit code.
    return max(int(run_qa(job)) for job in config.output_jobs())


def _dry_run(config) -> int:
    from . import storage
    from .config import ConfigError
    from .plan import PlanError, make_plan
    from .preflight import check_job

    plans = []
    try:
        for job in config.output_jobs():
            check_job(job)
            plans.append(make_plan(job.input.urls, job.output.path, job.input.storage_options,
                                   job.output.storage_options))
    except (PlanError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"config {config.source}: valid")
    for job, plan in zip(config.output_jobs(), plans):
        print(f"input: {len(plan.shards)} shard(s); output {storage.redact(job.output.path)}: "
              f"{len(plan.done)} committed, {len(plan.todo)} to do")
        for task in plan.todo[:10]:
            print(f"  {task.name} <- {storage.redact(task.url)}")
        if len(plan.todo) > 10:
            print(f"  ... and {len(plan.todo) - 10} more")
    return EXIT_OK
