"""What the ``clipper`` command line needs to fail in one clear line: a cause and a hint, no traceback."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

__all__ = ["CliError", "explain", "check_ports_free", "parse_json_arg", "read_input_file"]

# (config attribute, host attribute, what it is, its option): the ports `clipper start` binds
_PORTS = (("query_port", "host", "msgpack queries", "--query-port"),
          ("rest_port", "host", "REST queries", "--rest-port"),
          ("admin_port", "admin_host", "the admin API", "--admin-port"),
          ("metrics_port", "host", "metrics", "--metrics-port"),
          ("rpc_port", "rpc_host", "container RPC", "--rpc-port"))


class CliError(Exception):
    """A command-line failure whose message is the whole story (printed as one line)."""


def check_ports_free(cfg) -> None:
    """Raise CliError naming the first of the frontend's ports that cannot be bound (before anything,
    such as the state file, is touched). Port 0 and unset ports are not checked."""
    for attr, host_attr, what, option in _PORTS:
        port = getattr(cfg, attr, None)
        if not port:
            continue
        host = getattr(cfg, host_attr, None) or "127.0.0.1"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise CliError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from None
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            if getattr(cfg, "reuse_port", False) and attr in ("query_port", "rest_port", "admin_port"):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # a --workers worker: shared ports
            try:
                s.bind(addr)
            except OSError as exc:
                why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
                raise CliError(f"port {port} on {host} ({what}) {why}: is another clipper running? Stop it, or "
                               f"choose another port with {option} (0 picks a free one)") from None


def parse_json_arg(text: str, what: str):
    """A JSON command-line value, or CliError saying how to write it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise CliError(f"{what} {shown!r} is not JSON ({exc.msg}); write a string input as JSON, quoted "
                       f"('\"{shown}\"'), or read a file with @file.json / @file.npy") from None


def read_input_file(path: str):
    """The input in ``@path``: a .npy array or a JSON document; CliError when it cannot be read."""
    try:
        if path.endswith(".npy"):
            import numpy as np

            return np.load(path)
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read the input file {path!r}: {exc.strerror or exc}") from None
    except ValueError as exc:  # numpy: not an .npy file
        raise CliError(f"cannot read the input file {path!r}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"the input file {path!r} is not JSON: {exc.msg} at line {exc.lineno} column "
                       f"{exc.colno}") from None


def explain(args, exc: BaseException) -> str:
    """One line for a failure the CLI did not expect to be a ClipperError: its cause and a hint."""
    if isinstance(exc, CliError):
        return str(exc)
    if isinstance(exc, ConnectionRefusedError):
        host, port = getattr(args, "host", "127.0.0.1"), getattr(args, "port", None)
        where = f"{host}:{port}" if port is not None else host
        return (f"cannot connect to a Clipper frontend at {where}: connection refused; is one running? "
                f"Start one with `clipper start` (or scripts/quickstart.sh), or pass --host/--port")
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return f"{type(exc).__name__}: {exc}"
