"""Transient systemd units over D-Bus, for a delegated cgroup v2 subtree (jeepney).

On a host run by systemd, a login shell's cgroup (``session-N.scope``) belongs to systemd
and is not ours to write, and a process can only be moved into a cgroup of the user's by
systemd itself. So, as podman and crun do, we ask systemd for a transient unit with
``Delegate=yes``: a scope around our spawner (`start_scope`), or a service for a daemon
started on demand (`start_service`).

We talk to the manager's private socket (``/run/systemd/private`` for root's system manager,
``/run/user/UID/systemd/private`` for a user's), which every systemd has and which, unlike
the per-user bus, needs no bus daemon (servers have none: no dbus-user-session), and fall
back to the buses. The paths are derived from the uid, never from ``$XDG_RUNTIME_DIR``,
so that `sudo -u`, `runuser` and services see the same manager a login shell does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import CgroupError

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
TIMEOUT = 30.0  # a job of systemd's; under heavy load (or emulation) it can take seconds


def running() -> bool:
    """systemd is the init system here (sd_booted(3))."""
    return os.path.isdir("/run/systemd/system")


def _endpoints(uid: int) -> list[tuple[str, bool]]:
    """``(socket path, is a bus)`` in the order we try them."""
    if uid == 0:
        return [("/run/systemd/private", False), ("/run/dbus/system_bus_socket", True)]
    out = [(f"/run/user/{uid}/systemd/private", False)]
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS", "")
    if address.startswith("unix:path="):
        out.append((address[len("unix:path="):].split(",")[0], True))
    out.append((f"/run/user/{uid}/bus", True))
    return out


def manager_name(uid: int | None = None) -> str:
    uid = os.getuid() if uid is None else uid
    return "the system manager" if uid == 0 else f"your systemd user manager (uid {uid})"


class Connection:
    """One connection to a systemd manager: method calls and the JobRemoved signal."""

    def __init__(self, uid: int | None = None, timeout: float = TIMEOUT) -> None:
        from jeepney.io.blocking import prep_socket  # noqa: PLC0415
        from jeepney.low_level import Parser  # noqa: PLC0415

        self.uid = os.getuid() if uid is None else uid
        self.timeout = timeout
        self._parser = Parser()
        self._serial = 0
        self._pending: list[Any] = []
        errors = []
        for path, is_bus in _endpoints(self.uid):
            if not os.path.exists(path):
                continue
            try:
                self._sock: socket.socket = prep_socket(path, timeout=timeout)
            except OSError as e:
                errors.append(f"{path}: {e.strerror or e}")
                continue
            self._is_bus = is_bus
            break
        else:
            why = "; ".join(errors) or ("none of " + ", ".join(
                p for p, _ in _endpoints(self.uid)) + " exists")
            raise CgroupError(f"cannot reach {manager_name(self.uid)} ({why})",
                              fix=_no_manager_fix(self.uid))
        if not self._is_bus:
            self._first_ping()
        if self._is_bus:
            from jeepney.bus_messages import MatchRule, message_bus  # noqa: PLC0415

            self._call_msg(message_bus.Hello())
            rule = MatchRule(type="signal", interface=MANAGER_IFACE, member="JobRemoved")
            self._call_msg(message_bus.AddMatch(rule))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages -------------------------------------------------------------------

    def _first_ping(self) -> None:
        """Ping until the manager answers. systemd 252's sd-bus server does not look at
        bytes that came in the same read as the authentication's BEGIN until more arrive
        (seen in the guest: no answer until we hung up), so we send more until it does."""
        from jeepney import DBusAddress, HeaderFields, new_method_call  # noqa: PLC0415

        peer = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD_BUS_NAME,
                           interface="org.freedesktop.DBus.Peer")
        deadline = time.monotonic() + self.timeout
        sent: set[int] = set()
        wait = 0.02
        while True:
            sent.add(self._send(new_method_call(peer, "Ping")))
            try:
                reply = self._receive(min(time.monotonic() + wait, deadline))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise self._timed_out() from None
                wait = min(wait * 2, 0.5)
                continue
            if reply.header.fields.get(HeaderFields.reply_serial) in sent:
                break
        # answers to the other pings may follow: _call_msg skips what it did not ask for

    def _send(self, msg: Any) -> int:
        self._serial += 1
        self._sock.sendall(msg.serialise(serial=self._serial))
        return self._serial

    def _receive(self, deadline: float) -> Any:
        while True:
            msg = self._parser.get_next_message()
            if msg is not None:
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise CgroupError(f"lost {manager_name(self.uid)}: {e.strerror or e}") from None
            if not data:
                raise CgroupError(f"{manager_name(self.uid)} closed the connection")
            self._parser.add_data(data)

    def _call_msg(self, msg: Any) -> tuple[Any, ...]:
        from jeepney import HeaderFields, MessageType  # noqa: PLC0415

        serial = self._send(msg)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                reply = self._receive(deadline)
            except TimeoutError:
                raise self._timed_out() from None
            if reply.header.fields.get(HeaderFields.reply_serial) != serial:
                self._pending.append(reply)  # a signal that came first
                continue
            if reply.header.message_type == MessageType.error:
                name = reply.header.fields.get(HeaderFields.error_name, "error")
                text = reply.body[0] if reply.body else name
                raise DBusError(str(name), str(text))
            return tuple(reply.body)

    def call(self, method: str, signature: str | None, body: tuple[Any, ...]) -> tuple[Any, ...]:
        from jeepney import DBusAddress, new_method_call  # noqa: PLC0415

        manager = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD_BUS_NAME, interface=MANAGER_IFACE)
        return self._call_msg(new_method_call(manager, method, signature, body))

    def get_property(self, path: str, interface: str, name: str) -> object:
        from jeepney import DBusAddress, Properties  # noqa: PLC0415

        unit = DBusAddress(path, bus_name=SYSTEMD_BUS_NAME, interface=interface)
        ((_signature, value),) = self._call_msg(Properties(unit).get(name))
        return value

    def _timed_out(self) -> CgroupError:
        return CgroupError(f"{manager_name(self.uid)} did not answer within "
                           f"{self.timeout:.0f} s")

    def _signals(self, deadline: float) -> Iterator[Any]:
        while self._pending:
            yield self._pending.pop(0)
        while True:
            try:
                yield self._receive(deadline)
            except TimeoutError:
                raise self._timed_out() from None

    def start_unit(self, name: str, properties: list[tuple[str, tuple[str, Any]]], *,
                   exists_ok: bool = False) -> None:
        """StartTransientUnit, then wait for its job: `CgroupError` unless it is done (or,
        with ``exists_ok``, the unit is there already)."""
        from jeepney import HeaderFields  # noqa: PLC0415

        self.call("Subscribe", None, ())  # for JobRemoved
        try:
            (job,) = self.call("StartTransientUnit", "ssa(sv)a(sa(sv))",
                               (name, "fail", properties, []))
        except DBusError as e:
            if exists_ok and e.name == "org.freedesktop.systemd1.UnitExists":
                return
            raise CgroupError(f"{manager_name(self.uid)} refused to start {name}: "
                              f"{e.text}", fix=_refused_fix(e)) from None
        deadline = time.monotonic() + self.timeout
        for msg in self._signals(deadline):
            if (msg.header.fields.get(HeaderFields.member) == "JobRemoved"
                    and len(msg.body) == 4 and msg.body[1] == job):
                result = msg.body[3]
                if result != "done":
                    raise CgroupError(f"{manager_name(self.uid)} could not start {name} "
                                      f"(job {result}; see journalctl"
                                      f"{'' if self.uid == 0 else ' --user'} -u {name})")
                return


class DBusError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


def _no_manager_fix(uid: int) -> str:
    if uid == 0:
        return "start sandbox where systemd runs, or set SANDBOX_CGROUP to a cgroup of yours"
    from . import user_name  # noqa: PLC0415

    return (f"log in with a session (ssh, a console) or, as root, `loginctl enable-linger "
            f"{user_name(uid)}` (starts your systemd user manager); or set SANDBOX_CGROUP to "
            "a cgroup delegated to you")


def _refused_fix(e: DBusError) -> str:
    if e.name.endswith("AccessDenied"):
        return "set SANDBOX_CGROUP to a cgroup delegated to you"
    return ""


def scope_properties(pids: Sequence[int], description: str) -> list[tuple[str, tuple[str, Any]]]:
    return [("PIDs", ("au", list(pids))), ("Delegate", ("b", True)),
            ("CollectMode", ("s", "inactive-or-failed")),
            ("Description", ("s", description))]


def unit_delegated(unit: str) -> bool:
    """Does our manager say ``unit`` has ``Delegate=yes``? False when it cannot tell."""
    kind = unit.rpartition(".")[2]
    if kind not in ("scope", "service"):
        return False
    try:
        with Connection(timeout=10) as conn:
            (path,) = conn.call("GetUnit", "s", (unit,))
            return bool(conn.get_property(str(path), f"{SYSTEMD_BUS_NAME}.{kind.title()}",
                                          "Delegate"))
    except (CgroupError, DBusError):
        return False


def start_scope(pid: int, name: str, description: str) -> None:
    """Have systemd move ``pid`` into a new scope ``name`` delegated to us, and wait for
    it. The scope goes when its last process does (systemd removes its cgroup tree)."""
    with Connection() as conn:
        conn.start_unit(name, scope_properties([pid], description))


def start_service(name: str, argv: Sequence[str], env: dict[str, str], *, log: str,
                  description: str) -> None:
    """A transient service running ``argv`` with ``Delegate=yes``, its output appended to
    ``log``; returns once systemd has started it."""
    props: list[tuple[str, tuple[str, Any]]] = [
        ("ExecStart", ("a(sasb)", [(argv[0], list(argv), False)])),
        ("Delegate", ("b", True)),
        ("CollectMode", ("s", "inactive-or-failed")),
        ("Description", ("s", description)),
        ("Environment", ("as", [f"{k}={v}" for k, v in env.items()])),
        ("StandardOutputFileToAppend", ("s", log)),
        ("StandardErrorFileToAppend", ("s", log)),
    ]
    with Connection() as conn:
        conn.start_unit(name, props, exists_ok=True)  # (there: a daemon of ours is starting)

