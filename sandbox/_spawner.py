"""The spawner: a small, single-threaded, stdlib-only fork server.

Started once per supervisor as ``python -I -S -c ...`` with its control socket's number
as an argument.
For each ``spawn`` request it clones a sandbox init straight into fresh namespaces (one
clone(2) with CLONE_PIDFD, so the pidfd can never name a recycled pid) and hands back the
init's pid, its pidfd and one end of a socketpair to talk to it. It never runs Python code
of the supervisor's (trio, msgpack and friends are never imported here) and it is never a
fork of a multi-threaded process.

Requests (JSON over SOCK_SEQPACKET, see `jail.wire`); descriptors sent with a spawn request
(the job cgroup's ``cgroup.procs`` files) are inherited by the init, which joins the cgroup
itself (`JoinCgroup`), so the slow cgroup migration never blocks the supervisor::

    {"id": N, "op": "spawn", "flags": CLONE_FLAGS, "plan_id": ID, "prepare": [ops...],
     "idmap": null | {"uid": [[inside, outside, count], ...], "gid": [...], "direct": bool}}

With an idmap the spawner writes the maps (itself when ``direct``, being root; else with
newuidmap/newgidmap) and then releases the init, which waits for that in `AwaitIdMap`.
    {"id": N, "op": "ping"}

``prepare`` is sent with the first request of a ``plan_id`` only; the spawner keeps the
decoded plan. Replies: ``{"id": N, "pid": PID}`` with descriptors ``[pidfd, socket]``, or
``{"id": N, "error": "..."}``. Exited inits are reaped by the kernel (SIGCHLD ignored);
the supervisor learns of an exit from the pidfd.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import time

from . import linux
from .jail import init, ops, wire


def _write_idmaps(pid: int, idmap: dict[str, list[list[int]]]) -> None:
    if idmap.get("direct"):  # we are root: write the maps ourselves
        for key in ("uid", "gid"):
            lines = "".join(f"{a} {b} {c}\n" for a, b, c in idmap[key])
            linux.write_file(f"/proc/{pid}/{key}_map", lines)
        return
    for tool, key in (("newuidmap", "uid"), ("newgidmap", "gid")):
        output = _run_tool([tool, str(pid), *(str(x) for t in idmap[key] for x in t)])
        # SIGCHLD is ignored here, so no exit status comes back: the map itself tells.
        with open(f"/proc/{pid}/{key}_map") as f:
            if not f.read().strip():
                detail = output.decode(errors="replace").strip().splitlines()[-1:]
                raise OSError(f"{tool} failed: {detail[0] if detail else 'no map written'}")


def _run_tool(argv: list[str], timeout: float = 10.0) -> bytes:
    """Run ``argv`` (stdin from /dev/null) and return its output once it has exited, or
    kill it after ``timeout`` seconds. posix_spawn, not subprocess: the spawner never
    imports threading, whose fork handler every init would pay for."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_DUP2, w, 2)])
    except OSError:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # already exited (and reaped by the kernel)
        pidfd = -1
    output = bytearray()
    try:
        poller = select.poll()
        poller.register(r, select.POLLIN)
        deadline = time.monotonic() + timeout
        while len(output) < 65536:  # EOF once the tool (and anything it forked) is gone
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                if pidfd >= 0:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                raise OSError(f"{argv[0]} did not finish in {timeout:g} s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            output += chunk
    finally:
        os.close(r)
        if pidfd >= 0:
            os.close(pidfd)
    return bytes(output)


_plans: dict[str, list[ops.Op]] = {}
_argv_area = (0, 0)  # our command line in memory, which each init overwrites in its copy
_reset: tuple[int, ...] = ()  # signals each init resets to their default


def _spawn(ctl: socket.socket, msg: dict[str, object], lifeline: tuple[int, int],
           fds: list[int]) -> None:
    # A plan comes once with its id; later requests for the same shape name only the id.
    plan_id = str(msg["plan_id"])
    if "prepare" in msg:
        _plans[plan_id] = ops.decode(msg["prepare"])  # type: ignore[arg-type]
    prepare = _plans.get(plan_id)
    if prepare is None:
        raise KeyError(f"unknown plan {plan_id}")
    flags = int(msg["flags"])  # type: ignore[call-overload]
    idmap = msg.get("idmap")
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    idmap_r, idmap_w = os.pipe() if idmap else (-1, -1)
    try:
        pid, pidfd = linux.clone(flags)
        if pid == 0:  # the sandbox's init
            parent_end.close()
            if idmap_w >= 0:
                os.close(idmap_w)
            init.run(child_end, prepare, lifeline, idmap_r, fds, _argv_area, _reset)
        try:
            if idmap:
                ok = b"0"
                try:
                    _write_idmaps(pid, idmap)  # type: ignore[arg-type]
                    ok = b"1"
                finally:
                    os.write(idmap_w, ok)
            wire.send(ctl, {"id": msg["id"], "pid": pid}, [pidfd, parent_end.fileno()])
        finally:
            os.close(pidfd)
    finally:
        parent_end.close()
        child_end.close()
        for fd in (idmap_r, idmap_w):
            if fd >= 0:
                os.close(fd)


def main(ctl_fd: int) -> None:
    """Serve spawn requests on ``ctl_fd`` until the supervisor hangs up."""
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # our supervisor is already gone
        sys.exit(0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps exited inits
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # ^C goes to the supervisor, which decides
    global _argv_area, _reset
    _argv_area = linux.argv_area()
    _reset = init.not_at_default()
    ctl = socket.socket(fileno=ctl_fd)
    lifeline = os.pipe()
    # Every init is a fork of this process and shares its pages copy-on-write: keep the
    # collector away from what exists now, so that no collection (here or in an init,
    # which disables it) writes to those objects and copies their pages.
    gc.collect()
    gc.freeze()
    while True:
        try:
            if not _serve_one(ctl, lifeline):
                return
        except (BrokenPipeError, ConnectionResetError):  # the supervisor is gone
            return


def _serve_one(ctl: socket.socket, lifeline: tuple[int, int]) -> bool:
    """Answer one request; False once the supervisor has hung up."""
    msg, fds = wire.recv(ctl)
    if msg is None:
        return False
    try:
        if msg.get("op") == "spawn":
            _spawn(ctl, msg, lifeline, fds)
        elif msg.get("op") == "ping":
            wire.send(ctl, {"id": msg.get("id"), "pong": os.getpid()})
        else:
            wire.send(ctl, {"id": msg.get("id"), "error": f"unknown op {msg.get('op')!r}"})
    except (BrokenPipeError, ConnectionResetError):
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        wire.send(ctl, {"id": msg.get("id"), "error": str(exc)})
    finally:
        for fd in fds:  # the init got its copies (its cgroup.procs files)
            os.close(fd)
    return True


if __name__ == "__main__":
    main(int(sys.argv[1]))
