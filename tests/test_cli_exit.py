"""runtime.exit_process: a finished command exits without the interpreter's teardown, and loses nothing."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_exit_handlers_run_buffered_output_is_written_and_the_code_is_kept():
    result = run_python(
        "import atexit, sys\n"
        "from mnist_flax import runtime\n"
        "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
        "print('x' * 100_000, end='')\n"  # a pipe's stdout is block-buffered: this sits in the buffer
        "sys.stderr.write('no newline, unflushed')\n"
        "runtime.exit_process(3)\n"
        "print('never printed')\n")
    assert result.returncode == 3
    assert result.stdout == "x" * 100_000
    assert result.stderr == "no newline, unflushedhandler ran\n"


def test_teardown_is_skipped():
    """What the interpreter's teardown would run (a finalizer left to module cleanup) does not run."""
    result = run_python(
        "from mnist_flax import runtime\n"
        "class Noisy:\n"
        "    def __del__(self):\n"
        "        print('torn down')\n"
        "kept = Noisy()\n"
        "runtime.exit_process(0)\n")
    assert (result.returncode, result.stdout) == (0, "")


def test_a_running_thread_is_waited_for(tmp_path):
    done = tmp_path / "done"
    result = run_python(
        "import threading, time\n"
        "from pathlib import Path\n"
        "from mnist_flax import runtime\n"
        f"threading.Thread(target=lambda: (time.sleep(0.5), Path({str(done)!r}).write_text('ok'))).start()\n"
        "runtime.exit_process(4)\n")
    assert result.returncode == 4
    assert done.read_text() == "ok"


def test_a_closed_stdout_is_no_error():
    """`mnist-flax-... | head -c 1`: the reader is gone before the exit flushes."""
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys, time\nfrom mnist_flax import runtime\nprint('y' * 100_000, end='')\n"
                             "time.sleep(0.5)\nruntime.exit_process(0)\n"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and stderr == b""
