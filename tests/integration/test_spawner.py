"""The spawner process on its own: it leaves quietly whichever way its supervisor goes."""

from __future__ import annotations

import socket
import subprocess

from sandbox.config import PACKAGE_DIR, spawner_python
from sandbox.jail import wire

CODE = ("import sys; sys.path.insert(0, sys.argv[1]); "
        "from sandbox._spawner import main; main(int(sys.argv[2]))")


def _start() -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([spawner_python(), "-I", "-S", "-c", CODE, str(PACKAGE_DIR.parent),
                             str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    theirs.close()
    return proc, ours


def test_answers_ping_and_exits_at_hang_up() -> None:
    proc, sock = _start()
    wire.send(sock, {"id": 1, "op": "ping"})
    reply, _ = wire.recv(sock)
    assert reply == {"id": 1, "pong": proc.pid}
    sock.close()
    out, err = proc.communicate(timeout=10)
    assert (proc.returncode, out, err) == (0, b"", b"")


def test_a_supervisor_gone_with_a_reply_unread_is_no_traceback() -> None:
    """The supervisor dies between a request and its reply: the spawner's next read is a
    connection reset, which is a hang-up like any other."""
    proc, sock = _start()
    wire.send(sock, {"id": 1, "op": "ping"})
    wire.send(sock, {"id": 2, "op": "nonsense"})
    sock.close()
    out, err = proc.communicate(timeout=10)
    assert (proc.returncode, out, err) == (0, b"", b"")
