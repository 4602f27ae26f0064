"""What every command-line entry point shares: parsing, exit codes and one-line errors.

Exit codes: 0 success, 1 runtime failure (bad data, bad file, no network),
2 usage error (argparse's own convention), 130 interrupted by the user.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from mnist_flax import runtime
from mnist_flax.errors import MnistFlaxError, UsageError

EXIT_FAILURE = 1
EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block), like run_main's errors."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"mnist_flax: usage error: {message}; see {self.prog} --help\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)`, turning expected failures into one line on stderr.

    `main` parses its own arguments; `--debug` anywhere in argv re-raises instead.
    """
    runtime.set_up_process()  # before anything starts JAX
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    prog = "mnist_flax"
    try:
        return main(argv)
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: usage error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MnistFlaxError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def run(main: Callable[[Sequence[str] | None], int]) -> NoReturn:
    """A command's entry point: `main` on the process's arguments, then its exit status."""
    runtime.exit_process(run_main(main))
