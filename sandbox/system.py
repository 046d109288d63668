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
        V2_DROPIN.parent.mkdir(parents=True, exist_ok=True)
        V2_DROPIN.write_text("[Service]\nDelegate=cpu cpuset io memory pids\n")
        done.append(f"cgroup v2: wrote {V2_DROPIN} (systemd delegates memory, pids and cpu to "
                    "every user); run `systemctl daemon-reload` and log in again, then "
                    "`sandbox` runs itself under `systemd-run --user --scope`")
    else:
        raise CgroupError("no cgroup hierarchy is mounted")
    subuid = Path("/etc/subuid")
    if subuid.exists() and not any(line.split(":")[0] in (user, str(pw.pw_uid))
                                   for line in subuid.read_text().splitlines()):
        done.append(f"note: {user} has no /etc/subuid range (for rootless image builds and "
                    f"full id maps: usermod --add-subuids 100000-165535 "
                    f"--add-subgids 100000-165535 {user})")
    return done
