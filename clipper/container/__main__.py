"""``python -m clipper.container ENTRY --name N --version V [--frontend ADDR ...] [--credentials FILE]``.

Credentials come from ``--credentials FILE``, else from the environment:
``CLIPPER_CREDENTIALS_FILE`` (a path) or ``CLIPPER_CREDENTIALS`` (the JSON
itself, how the local manager hands them to its children). Both variables are
removed from the environment once read, so the model's code and the
processes it starts do not inherit them.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time

from ..errors import ClipperError
from ..rpc import messages as m
from ..security.container_keys import ContainerCredentials
from .runtime import ContainerRuntime, LoadError, load_predictor, split_frontends


class StopServing(BaseException):
    """Raised by the SIGTERM/SIGINT handler to leave the serving loop at once."""


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the frontend) dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(m.EXIT_FRONTEND_LOST)
    except OSError:
        pass


def _credentials(path: str | None) -> ContainerCredentials | None:
    """The credentials this container presents, from the file given or the environment."""
    inline = os.environ.pop("CLIPPER_CREDENTIALS", None)
    env_file = os.environ.pop("CLIPPER_CREDENTIALS_FILE", None)
    if path:
        return ContainerCredentials.load(path)
    if env_file:
        return ContainerCredentials.load(env_file)
    if inline:
        return ContainerCredentials.loads(inline)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipper.container", description="Serve a model to a Clipper frontend.")
    p.add_argument("entry", help="module:function, module:Class, or path/to/file.py:function")
    p.add_argument("--name", required=True, help="model name as deployed in the frontend")
    p.add_argument("--version", required=True, help="model version as deployed in the frontend")
    p.add_argument("--frontend", action="append", default=None,
                   help="the frontend's container RPC address (default: the credentials' frontend, else "
                        "$CLIPPER_FRONTEND, else tcp://127.0.0.1:7000); repeat it, or separate addresses with "
                        "commas, to serve several frontends of one system (sharing a state store) at once")
    p.add_argument("--credentials", default=None,
                   help="container credentials file (from `clipper container-credentials NAME [VERSION]`)")
    p.add_argument("--input-dtype", default=None, help="the input dtype this model expects (checked at handshake)")
    p.add_argument("--input-shape", default=None, help="the input shape, comma separated, e.g. 784 or 28,28")
    p.add_argument("--exit-on-frontend-loss", action="store_true",
                   help="exit instead of reconnecting when the frontend goes silent")
    p.add_argument("--die-with-parent", action="store_true", help="exit when the parent process dies (managers)")
    p.add_argument("--log-level", default=os.environ.get("CLIPPER_LOG_LEVEL", "WARNING"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.die_with_parent:
        _die_with_parent()
    shape = None
    if args.input_shape:
        try:
            shape = [int(d) for d in args.input_shape.split(",") if d.strip()]
        except ValueError:
            p.error(f"--input-shape {args.input_shape!r} is not a comma-separated list of integers")
    try:
        credentials = _credentials(args.credentials)
    except ClipperError as exc:
        print(f"clipper container {args.name}:{args.version}: {exc.message}", file=sys.stderr, flush=True)
        return m.EXIT_REJECTED
    if credentials is not None and (credentials.model != args.name
                                    or credentials.version not in (None, args.version)):
        print(f"clipper container {args.name}:{args.version}: its credentials were issued for model "
              f"{credentials.model}{'' if credentials.version is None else ':' + credentials.version}",
              file=sys.stderr, flush=True)
        return m.EXIT_REJECTED
    frontend = (args.frontend or (credentials.frontend if credentials is not None else None)
                or os.environ.get("CLIPPER_FRONTEND") or "tcp://127.0.0.1:7000")
    try:
        frontend = split_frontends(frontend)
    except ValueError as exc:
        p.error(f"--frontend: {exc}")
    t0 = time.perf_counter()
    try:
        predict = load_predictor(args.entry)
    except LoadError as exc:
        print(f"clipper container {args.name}:{args.version}: cannot load {args.entry!r}: {exc}",
              file=sys.stderr, flush=True)
        return m.EXIT_LOAD_FAILED
    from ..gctune import settle_heap

    settle_heap()  # the model is loaded: the collector need not traverse it again
    rt = ContainerRuntime(predict, args.name, args.version, frontend, input_dtype=args.input_dtype,
                          input_shape=shape, exit_on_frontend_loss=args.exit_on_frontend_loss,
                          credentials=credentials, load_ms=(time.perf_counter() - t0) * 1000)
    def on_signal(signum, frame):
        rt.stop()
        raise StopServing  # interrupts the poll; run() says goodbye to the frontend on the way out

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return rt.run()
    except StopServing:
        return m.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
