"""`sandbox system setup --user NAME`: the one step that needs root, when nothing is
delegated yet. It only creates and chowns directories under our own subtree."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from . import cgroups
from .cgroups import v1
from .errors import CgroupError, SpecError

V2_DROPIN = Path("/etc/systemd/system/user@.service.d/sandbox-delegate.conf")
V2_CONTROLLERS = ("cpu", "memory", "pids")


def setup_user(user: str) -> list[str]:
    """Create NAME's cgroup subtree (v1: one per controller; v2: a systemd delegation
    drop-in). Returns what was done, one line each."""
    if os.geteuid() != 0:
        raise CgroupError("`sandbox system setup` must run as root")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SpecError(f"no such user {user!r}") from None
    done: list[str] = []
    hierarchies = cgroups.mounted_hierarchies()
    if all(c in hierarchies for c in v1.CONTROLLERS):
        for controller in v1.CONTROLLERS:
            path = hierarchies[controller] / v1.SUBTREE / user
            path.mkdir(parents=True, exist_ok=True)
            for target in (path, path / "cgroup.procs", path / "tasks"):
                os.chown(target, pw.pw_uid, pw.pw_gid)
            done.append(f"cgroup v1: {path} now belongs to {user}")
    elif "unified" in hierarchies:
        done.extend(_setup_v2(user, pw.pw_uid))
    else:
        raise CgroupError("no cgroup hierarchy is mounted")
    subuid = Path("/etc/subuid")
    if subuid.exists() and not any(line.split(":")[0] in (user, str(pw.pw_uid))
                                   for line in subuid.read_text().splitlines()):
        done.append(f"note: {user} has no /etc/subuid range (for rootless image builds and "
                    f"full id maps: usermod --add-subuids 100000-165535 "
                    f"--add-subgids 100000-165535 {user})")
    return done


def _setup_v2(user: str, uid: int) -> list[str]:
    """cgroup v2 under systemd: sandbox asks the user's systemd manager for a delegated
    scope, so all it needs is memory, pids and cpu delegated to user@UID.service (Debian 12
    and Ubuntu 24.04 do so already; older systemd delegates only memory and pids)."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    if shutil.which("systemctl") is None:
        return [f"cgroup v2 without systemd: give {user} a cgroup of its own (chown -R) and "
                "name it with SANDBOX_CGROUP"]
    unit = f"user@{uid}.service"
    shown = subprocess.run(["systemctl", "show", "--value", "-p", "DelegateControllers", unit],
                           capture_output=True, text=True, check=False).stdout.split()
    done: list[str] = []
    if all(c in shown for c in V2_CONTROLLERS):
        done.append(f"cgroup v2: {unit} already delegates {' '.join(V2_CONTROLLERS)}; "
                    f"sandbox asks {user}'s systemd user manager for a delegated scope")
    else:
        V2_DROPIN.parent.mkdir(parents=True, exist_ok=True)
        V2_DROPIN.write_text("[Service]\nDelegate=cpu cpuset io memory pids\n")
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        done.append(f"cgroup v2: wrote {V2_DROPIN} (systemd delegates cpu, memory and pids to "
                    f"every user's manager) and reloaded systemd; it applies from {user}'s "
                    f"next login (or `systemctl restart {unit}`)")
    lingering = Path(f"/var/lib/systemd/linger/{user}").exists()
    if not lingering and not Path(f"/run/user/{uid}/systemd/private").exists():
        done.append(f"note: {user} has no systemd user manager running (not logged in); "
                    "sandbox needs one: log in, or `loginctl enable-linger "
                    f"{user}` to keep one running")
    return done
