"""What every command-line entry point shares: XLA flags, the allocator's settings, exit codes
and one-line errors.

Exit codes: 0 success, 1 runtime failure (bad data, bad file, no network),
2 usage error (argparse's own convention), 130 interrupted by the user.
"""

import argparse
import atexit
import ctypes
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn

from mnist_flax.errors import MnistFlaxError

EXIT_FAILURE = 1
EXIT_USAGE = 2

# XLA:CPU runs small convolutions' weight gradients (a 24x24-window convolution for conv2)
# much faster through Eigen than through YNNPACK, its default. LLVM's -O2 instead of -O3 cuts
# the four-step program's compile by 40% and compiles the same arithmetic: the epoch's
# checkpoint is byte-identical and the step no slower. docs/performance.md has both.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
                 "--xla_backend_optimization_level=2")


# Programs that run once per process over a few thousand numbers (the init, the data order):
# their compile, not their run, is what a first run waits for. Unoptimised and through XLA's
# older fusion emitters, the init program (threefry rounds) compiles in 0.4 s instead of 1.0 s
# and still runs in about a millisecond. Not for the step: it would compile faster but run
# slower. These programs are integer arithmetic and exact float steps, so their numbers do not
# depend on the options (tests/test_step.py compares them with the default compile).
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def add_xla_flags() -> None:
    """Adds the project's XLA flags to $XLA_FLAGS unless it names them already.

    Every command sets them before JAX starts (set_up_process), so that training, evaluation
    and prediction run the same kernels and agree on every prediction.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed large blocks mapped instead of returning them to the kernel.

    XLA:CPU allocates the temporaries of each call of a compiled program as one block of tens
    of MiB and frees it after the call. glibc serves a block that large with mmap, or from a
    new per-thread heap that it unmaps as soon as it is empty, so every call would page-fault
    the whole block back in (docs/performance.md). A 64 MiB mmap threshold, a 1 GiB trim
    threshold and a 64 MiB top pad (glibc keeps an emptied heap when the one before it has
    less room than that) keep it mapped. A single arena would too, but its lock is contended.
    Every command sets them (set_up_process): the training step and the evaluation of the test set
    in batches of 1,000 both allocate such blocks on every call.
    Returns False where the C library has no mallopt (macOS) or ignores it (musl).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, 64 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    return all([mallopt(parameter, value) == 1 for parameter, value in settings])


def set_up_process() -> None:
    """What every command sets before JAX computes: the XLA flags and the allocator's settings.

    run_main calls it; scripts and tests that compute in-process as the commands do call it too.
    """
    add_xla_flags()
    keep_freed_memory()


class UsageError(MnistFlaxError):
    """A flag value that parsed but makes no sense (batch size 0, say)."""


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
    set_up_process()  # before anything starts JAX
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


def exit_process(code: int) -> NoReturn:
    """Ends a command that has finished its work: sys.exit(code) without the interpreter's teardown.

    Tearing down frees every module and each of jaxlib's compiled programs one by one (its cost
    after a training run is in docs/performance.md), for memory the OS takes back at once.
    What an exit must do still happens: the atexit handlers run and both standard streams are
    flushed. While another non-daemon thread runs, it exits the ordinary way, which waits for it.
    """
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    flush_standard_streams()
    os._exit(code)


def flush_standard_streams() -> None:
    """Flushes stdout and stderr before an `os._exit`, which would drop what they buffer."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, or a closed stream: nothing to save
            pass
