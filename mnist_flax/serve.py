"""Command line: a local page where you draw a digit and watch the model read it, and its JSON API.

    python -m mnist_flax.serve CHECKPOINT_OR_DIR [--host 127.0.0.1] [--port 8000]

The page and the API are api.py's; this loads the checkpoint (a bad one is the project's
one-line error, before anything listens), compiles the model, opens the port and runs
uvicorn. It listens on 127.0.0.1 unless --host says otherwise, and warns when that is
reachable from other machines: there is no authentication. Needs the `serve` extra.
"""

import socket
import sys
import time
from collections.abc import Sequence

from mnist_flax import checkpoint, cli
from mnist_flax.errors import MnistFlaxError

SERVE_EXTRA = "pip install 'mnist-flax[serve]'"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that a busy port is one clear error before anything starts."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise MnistFlaxError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                             "or --host") from None
    sock.listen(128)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m mnist_flax.serve", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_DIR",
                   help="a .msgpack, or a directory such as the unpacked CI artifact (its newest one is used)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise cli.UsageError(f"--port {args.port} is not a port number (0-65535)")
    start = time.perf_counter()
    # The checkpoint first: a file that is no checkpoint is refused before JAX and the server load.
    path = checkpoint.find(args.checkpoint)
    variables, record = checkpoint.load_checkpoint(path)
    try:
        import uvicorn

        from mnist_flax import api
    except ImportError as e:
        raise MnistFlaxError(f"mnist_flax.serve needs the serve extra ({e.name} is not installed): "
                             f"{SERVE_EXTRA}") from None
    sock = listen(args.host, args.port)  # before compiling: a busy port fails at once
    if args.host not in LOOPBACK:
        print(f"mnist_flax: warning: listening on {args.host} makes the page and API reachable from other "
              "machines, with no authentication", file=sys.stderr)
    info = api.describe(path, record, variables)
    app = api.create_app(variables, info, checkpoint.network_for(record))
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving {info.checkpoint} at http://{url_host}:{port}/ (ready in {time.perf_counter() - start:.1f} s; "
          "Ctrl-C stops)", flush=True)
    # log_config=None: uvicorn keeps its hands off logging (its own config would hold on to this
    # stderr); its warnings and errors still reach stderr through Python's last-resort handler.
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly: a normal stop
        pass
    print("stopped", flush=True)
    return 0


def run() -> None:
    sys.exit(cli.run_main(main))


if __name__ == "__main__":
    run()
