"""The spawner process on its own: it leaves quietly whichever way its supervisor goes."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess

import pytest

from sandbox import linux
from sandbox.config import PACKAGE_DIR, spawner_python
from sandbox.jail import ops, plan, wire
from tests.conftest import Runner

CODE = ("import sys; sys.path.insert(0, sys.argv[1]); "
        "from sandbox._spawner import main; main(int(sys.argv[2]))")


def _start(user: str | None = None) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    as_user = []
    if user is not None:
        pw = pwd.getpwnam(user)
        as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                   "--reset-env"]
    proc = subprocess.Popen([*as_user, spawner_python(), "-I", "-S", "-c", CODE,
                             str(PACKAGE_DIR.parent), str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
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


def _spawn_awaiting_idmap(sock: socket.socket, uid: list[list[int]], gid: list[list[int]],
                          ) -> dict[str, object]:
    """Ask for an init in a new user namespace that only waits for its id maps."""
    wire.send(sock, {"id": 1, "op": "spawn", "flags": linux.CLONE_NEWUSER, "plan_id": "p",
                     "prepare": ops.encode([ops.AwaitIdMap()]),
                     "idmap": {"uid": uid, "gid": gid, "direct": False}})
    reply, fds = wire.recv(sock)
    assert reply is not None
    if fds:
        pidfd, init = fds
        with socket.socket(fileno=init) as init_sock:
            event, _ = wire.recv(init_sock)
            assert event is not None and event["event"] == "ready", event
        os.close(pidfd)
    return reply


@pytest.mark.parametrize("allowed", [True, False])
def test_newuidmap_as_an_unprivileged_user(user_runner: Runner, allowed: bool) -> None:
    """The spawner runs newuidmap/newgidmap for a user with a subuid range. A range that is
    not the user's is refused by newuidmap, and the spawner says so (it cannot learn an
    exit status: it ignores SIGCHLD; the map it reads back tells)."""
    assert user_runner.user is not None
    pw = pwd.getpwnam(user_runner.user)
    sub = plan.read_subids("/etc/subuid", pw.pw_name, pw.pw_uid)
    subg = plan.read_subids("/etc/subgid", pw.pw_name, pw.pw_gid)
    assert sub is not None and subg is not None
    first_uid = sub[0] if allowed else 0  # host root's uid is never the user's to map
    proc, sock = _start(user_runner.user)
    try:
        reply = _spawn_awaiting_idmap(sock, [[0, pw.pw_uid, 1], [1, first_uid, 1000]],
                                      [[0, pw.pw_gid, 1], [1, subg[0], 1000]])
    finally:
        sock.close()
        out, err = proc.communicate(timeout=10)
    if allowed:
        assert "pid" in reply, reply
    else:
        assert str(reply.get("error", "")).startswith("newuidmap failed: "), reply
    assert (proc.returncode, out, err) == (0, b"", b"")
