"""The fast path of `sandbox exec`: straight to a running daemon, without click, trio,
dataclasses, `contextlib` or even `typing` (importing them costs more than a whole
sandboxed job). It speaks the protocol on its framing layer (`framing.py`) with plain maps;
the daemon, run by the same user, is trusted to answer well-formed messages.

`run` returns None whenever it is not sure what to do (``--help``, an option it does not
know, a malformed value, no daemon): the full CLI in `cli.py` then handles the command, with
the same options and messages. `tests/unit/test_fastexec.py` checks that both accept the
same options. Once a job is submitted, the fast path sees it through.
"""

from __future__ import annotations

# `_socket`, not `socket`: the wrapper module builds its enums at import, which costs more
# (4 ms here) than a whole sandboxed job through the daemon.
import _socket
import os
import sys

from . import __version__, framing, runtime, verdict
from .errors import SpecError
from .hostfiles import job_program
from .units import parse_seconds, parse_size

PROTOCOL_VERSION = 1  # = protocol.PROTOCOL_VERSION (tests/unit/test_fastexec.py checks)

# option -> (key, kind); the same options as `sandbox exec` in cli.py
OPTIONS: dict[str, tuple[str, str]] = {
    "--image": ("image", "str"), "--profile": ("profile", "str"),
    "--time": ("time", "seconds"), "--wall-time": ("wall_time", "seconds"),
    "--memory": ("memory", "size"), "--pids": ("pids", "int"), "--output": ("output", "size"),
    "--disk": ("disk", "size"), "--stdin": ("stdin", "str"), "--env": ("env", "many"),
    "--file": ("file", "many"), "--json": ("json", "flag"),
    "-w": ("workdir", "str"), "--workdir": ("workdir", "str"),
    "-u": ("user", "str"), "--user": ("user", "str"), "--read-only": ("read_only", "flag"),
    "-i": ("interactive", "flag"), "--interactive": ("interactive", "flag"),
}
_PARSE: dict[str, Callable[[str], Any]] = {"str": str, "seconds": parse_seconds,
                                           "size": parse_size, "int": int}

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def parse(argv: list[str]) -> dict[str, Any] | None:
    """Options and PROGRAM ARGS of `sandbox exec`, or None if the full CLI should decide."""
    opts: dict[str, Any] = {"image": "py3", "profile": "default", "env": [], "file": [],
                            "json": False}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name not in OPTIONS:
            return None  # --help, --, an unknown option...
        key, kind = OPTIONS[name]
        if kind == "flag":
            if eq:
                return None
            opts[key] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        i += 1
        try:
            parsed = _PARSE["str" if kind == "many" else kind](value)
        except (SpecError, ValueError):
            return None
        if kind == "int" and parsed < 1:
            return None
        if kind == "many":
            opts[key].append(parsed)
        else:
            opts[key] = parsed
    if i >= len(argv) or any("=" not in e for e in opts["env"]):
        return None
    if opts.get("interactive") or opts.get("stdin") == "-":
        return None  # a stream: the full CLI feeds it as the job reads
    opts["argv"] = argv[i:]
    return opts


def spec_dict(opts: dict[str, Any]) -> dict[str, Any] | None:
    """The JobSpec in wire form (the daemon validates it), or None on a host-side problem
    the full CLI reports."""
    try:
        given = job_program(opts["argv"][0], opts["argv"][1:], opts["file"])
        stdin = None
        if opts.get("stdin") is not None:
            with open(opts["stdin"], "rb") as f:
                if os.fstat(f.fileno()).st_size > 16 << 20:  # = cli.INLINE_STDIN: streamed
                    return None
                stdin = f.read()
    except (OSError, SpecError):
        return None
    if sum(len(f["data"]) for f in given["files"]) > 16 << 20:  # = client.INLINE_FILES
        return None  # the full client sends large files in chunks
    limits = {k: opts[k] for k in ("time", "wall_time", "memory", "pids", "output", "disk")
              if k in opts}
    return {"image": opts["image"], **given, "stdin": stdin,
            "env": dict(e.split("=", 1) for e in opts["env"]), "limits": limits,
            "profile": opts["profile"], "workdir": opts.get("workdir"),
            "user": opts.get("user"), "read_only": opts.get("read_only", False)}


class _Daemon:
    def __init__(self, path: str) -> None:
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.frames = framing.FrameReader()

    def start(self, first: dict[str, Any]) -> None:
        """Send ``hello`` and ``first`` in one write, then check the ``welcome``: the daemon
        reads them in order and refuses everything after a ``hello`` it does not accept, so
        the job does not wait for a round trip."""
        self.sock.sendall(framing.encode({"t": "hello", "version": PROTOCOL_VERSION,
                                          "client": f"sandbox-cli {__version__}"})
                          + framing.encode(first))
        welcome = self.read()
        if welcome.get("t") != "welcome" or welcome.get("version") != PROTOCOL_VERSION:
            raise OSError("no handshake")

    def read(self) -> dict[str, Any]:
        while (message := self.frames.next()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                raise OSError("the daemon closed the connection")
            self.frames.feed(data)
        return message


def run(argv: list[str]) -> int | None:
    """Run `sandbox exec ARGV` through the daemon; None means "use the full CLI"."""
    if os.environ.get("SANDBOX_DAEMON", "auto") != "auto":
        return None
    opts = parse(argv)
    if opts is None:
        return None
    path = runtime.socket_path()
    if not os.path.exists(path):
        return None
    try:
        daemon = _Daemon(path)
    except OSError:
        return None
    spec = spec_dict(opts)
    if spec is None:
        daemon.sock.close()
        return None
    as_json = opts["json"]
    try:
        daemon.start({"t": "run", "id": 1, "spec": spec, "stream_output": not as_json,
                      "stdin_stream": False})
    except OSError:
        daemon.sock.close()
        return None  # another protocol version, a daemon going away: the full CLI decides
    try:
        while True:
            event = daemon.read()
            kind = event.get("t")
            if kind == "output":
                _write(str(event["stream"]), event["data"])
            elif kind == "progress":
                line = str(event["line"])
                if line.startswith(("Step ", " --->", "Successfully")):
                    _write("stderr", f"{line}\n".encode())
            elif kind == "result":
                result = event["result"]
                break
            elif kind == "error":
                return _error(str(event["message"]), as_json)
        if as_json:
            import json  # noqa: PLC0415 - only --json pays for it

            _write("stdout", json.dumps(verdict.json_view(result)).encode() + b"\n")
        elif result["status"] != "ok":
            _write("stderr", verdict.summary(result).encode() + b"\n")
    except _ReaderGone:  # `| head -1`: exit as if by SIGPIPE, quietly, as tools in a pipe do
        drop_unwritable_stdout()
        return 128 + 13
    except _Unwritable as e:  # closing the connection makes the daemon kill the job
        return _error(str(e), False)
    except (OSError, SpecError, KeyError) as e:
        return _error(f"lost the daemon: {e}", as_json)
    finally:
        daemon.sock.close()
    return verdict.cli_exit_code(result)


class _Unwritable(Exception):
    """Our own stdout or stderr cannot take the job's output (a full disk, a closed pipe)."""


class _ReaderGone(_Unwritable):
    """The reader of our stdout or stderr went away."""


def _write(stream: str, data: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    try:
        out.write(data)
        out.flush()
    except BrokenPipeError:
        raise _ReaderGone from None
    except OSError as e:
        raise _Unwritable(f"cannot write the job's {stream}: {e.strerror}") from None


def drop_unwritable_stdout() -> None:
    """Throw away what stdout cannot take, so that the interpreter's last flush does not
    turn our exit code into 120."""
    try:
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _error(message: str, as_json: bool) -> int:
    if as_json:
        import json  # noqa: PLC0415

        try:  # noqa: SIM105 - contextlib (and functools with it) costs this path 1 ms
            sys.stdout.write(json.dumps(verdict.internal_error(message)) + "\n")
        except OSError:
            pass
    drop_unwritable_stdout()
    try:
        sys.stderr.write(f"sandbox: error: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass
    return 125


def exit_now(code: int) -> None:
    """Flush what we wrote and leave without the interpreter's finalization (tearing down
    every module takes longer than the rest of a short `sandbox exec`). Nothing of ours
    needs it: the connection is closed and every write was flushed as it was made."""
    drop_unwritable_stdout()
    try:  # noqa: SIM105 - see _error
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)
