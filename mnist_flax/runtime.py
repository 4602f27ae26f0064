"""The process, set up before JAX computes: XLA's flags and compiler options, the allocator, the
compilation cache, and the exit that skips the interpreter's teardown.

Every command runs `set_up_process` first (cli.run_main), and so do the scripts and tests that
compute in-process as the commands do. Nothing here imports JAX at module level: a command's
`--help` and its bad flags answer without it.
"""

import atexit
import ctypes
import os
import sys
import threading
from typing import NoReturn

# XLA:CPU runs small convolutions' weight gradients (a 24x24-window convolution for conv2)
# faster through Eigen than through YNNPACK, its default. LLVM's -O2 instead of -O3 compiles the
# four-step program sooner and to the same arithmetic: the epoch's checkpoint is byte-identical
# and the step no slower. docs/performance.md has both.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
                 "--xla_backend_optimization_level=2")


# Programs that run once per process over a few thousand numbers (the init, the data order):
# their compile, not their run, is what a first run waits for. Unoptimised and through XLA's
# older fusion emitters, the init program (threefry rounds) compiles in a fraction of the time
# and still runs in no time that matters. Not for the step: it would compile faster but run
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


COMPILATION_CACHE_ENV = "MNIST_FLAX_COMPILATION_CACHE"


def default_compilation_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mnist_flax", "jax")


def enable_compilation_cache() -> str | None:
    """Keeps compiled XLA programs on disk, so that a second run skips compiling them.

    The directory is $MNIST_FLAX_COMPILATION_CACHE (empty or "off": no cache), else
    JAX's own $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/mnist_flax/jax.
    Returns the directory used, or None. Every program is cached, however quick to
    compile: together the small ones (init, step, evaluation) are most of start-up.
    A cached program is the one XLA would compile (the key covers the HLO, the flags
    and the jaxlib version), so results, and resumed runs, are unchanged.
    """
    import jax

    path = os.environ.get(COMPILATION_CACHE_ENV)
    if path is None:
        path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_compilation_cache_dir()
    if path.strip().lower() in ("", "off", "0", "none"):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


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
