"""The `metacompress` command. Each sub-command module exposes ``register(subparsers)``; a list is the registry."""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.env import apply_defaults

# Modules stay light at import time: heavy libraries are imported inside the command functions.
COMMAND_MODULES = ["pipeline.commands.demo", "pipeline.commands.run", "pipeline.commands.chat", "pipeline.commands.bench", "pipeline.commands.data", "pipeline.commands.analyze", "pipeline.commands.reference", "pipeline.commands.submit", "pipeline.commands.plan", "pipeline.commands.judge"]


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (docs/design.md §8), with where to find the usage; exit 2 as argparse does."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="metacompress",
        description="Learned visual-token compression for multi-turn VQA: data, stages, training, evaluation.",
        epilog="Global flags (anywhere on the line): --debug prints the traceback of an error; --verbose copies the "
               "full log (otherwise only in <work_dir>/logs/) to the console.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


# Errors that mean "the input or the environment is wrong", not "the code is wrong" (docs/design.md §8): one line,
# exit 2. ValueError covers ConfigError, DialogueFormatError, IncompatibleOutput, CorruptShard, JSON and decoding
# errors; OSError covers missing files, permissions, a full disk and refused connections.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
VERBOSE_ENV = "METACOMPRESS_VERBOSE"
TRACEBACK_LOGGER = "metacompress.traceback"  # pipeline.env's quiet console leaves it to the log file


def _causes(err: BaseException):
    """``err`` and what it wraps: Python's cause/context chain, Ray's task errors (``.cause``), Ray Train's worker
    failures, in order, each once."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.append(getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else None)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(v for _, v in sorted(failures.items()) if isinstance(v, BaseException))
        controller = getattr(e, "controller_failure", None)
        if isinstance(controller, BaseException):
            todo.append(controller)
        todo.extend([e.__cause__, e.__context__])


def user_error(err: BaseException) -> BaseException | None:
    """The user error behind ``err`` (possibly raised in a Ray actor or a Ray Train worker), or None."""
    import yaml

    for e in _causes(err):
        if isinstance(e, (*USER_ERRORS, yaml.YAMLError)) and str(e):
            return e
        if type(e).__name__ in ("StageFailed", "CheckpointRefused", "LeaseHeld"):
            return e
    return None


def one_line(err: BaseException) -> str:
    """The error as one line: its message (Ray prefixes stripped), or the exception type when it has none."""
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {err.filename}" if err.filename else ""
        return f"no space left on the device{where}; free space or point work_dir at a larger disk"
    if isinstance(err, ConnectionError) or (isinstance(err, OSError) and err.errno == errno.ECONNREFUSED):
        return f"cannot connect ({err}); check the address and that the server is running"
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(err).__name__]
    # Ray puts the remote traceback in the message; the last line is the error itself
    if len(lines) > 1 and any(ln.startswith("Traceback") for ln in lines):
        lines = [lines[-1].split(": ", 1)[-1]]
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if "--verbose" in argv:  # everything on the console too (pipeline/logs.py); a global flag, anywhere
        import os

        argv = [a for a in argv if a != "--verbose"]
        os.environ[VERBOSE_ENV] = "1"
    apply_defaults()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # usage error (one line, see _Parser) or -h
        return done.code if isinstance(done.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"metacompress {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into exit codes
        if debug:
            import traceback

            traceback.print_exc()
        import logging

        # the traceback goes to the run's log file when there is one (the quiet console skips this logger)
        if any(getattr(h, "_metacompress", False) for h in logging.getLogger().handlers):
            logging.getLogger(TRACEBACK_LOGGER).error("metacompress %s failed", args.command, exc_info=True)
        found = user_error(err)
        if found is not None:
            print(f"metacompress {args.command}: error: {one_line(found)}", file=sys.stderr)
            return 2
        print(f"metacompress {args.command}: internal error: {type(err).__name__}: {one_line(err)} (run again "
              "with --debug for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
