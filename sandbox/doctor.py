"""`sandbox doctor`: check what the host needs, print each problem with its fix.

Exit 0 only when `sandbox exec` will work with limits: user namespaces (Ubuntu's AppArmor
restriction included), overlayfs inside them, a usable cgroup subtree, libseccomp. Missing
subuid ranges or mmdebstrap are warnings (they matter for building images).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import cgroups
from .cgroups import v1
from .config import PACKAGE_DIR, spawner_python
from .errors import CgroupError, SandboxError


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    fix: str = ""
    required: bool = True


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


_PROBE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from sandbox import linux
d, uid, gid = sys.argv[2], os.getuid(), os.getgid()
step = "unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWIPC|CLONE_NEWUTS)"
try:
    linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWNET
                  | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
    step = "writing uid_map/gid_map"
    linux.write_file("/proc/self/setgroups", "deny")
    linux.write_file("/proc/self/uid_map", f"0 {uid} 1")
    linux.write_file("/proc/self/gid_map", f"0 {gid} 1")
    step = "mounting tmpfs in the user namespace"
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("tmpfs", d, "tmpfs", 0, "size=1m")
    for sub in ("lower", "lower/dir", "upper", "work", "merged"):
        os.mkdir(f"{d}/{sub}")
    open(f"{d}/lower/dir/file", "w").close()
    step = "mounting overlayfs (userxattr) in the user namespace"
    linux.mount("overlay", f"{d}/merged", "overlay", 0,
                f"lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/work,userxattr")
    step = "creating an overlay whiteout"
    os.unlink(f"{d}/merged/dir/file")
    step = "bringing loopback up"
    linux.loopback_up()
    step = "unshare(CLONE_NEWPID|CLONE_NEWCGROUP)"
    linux.unshare(linux.CLONE_NEWPID | linux.CLONE_NEWCGROUP)
except OSError as e:
    print(f"{step}: {e.strerror or e}")
    sys.exit(1)
print("ok")
"""


def check_userns() -> Check:
    name = "user namespaces, overlayfs and mounts inside them"
    if (_read("/proc/sys/user/max_user_namespaces") or "1") == "0":
        return Check(name, False, "user.max_user_namespaces is 0",
                     "sysctl -w user.max_user_namespaces=15000 (and persist in /etc/sysctl.d)")
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0" and os.geteuid() != 0:
        return Check(name, False, "kernel.unprivileged_userns_clone is 0",
                     "sysctl -w kernel.unprivileged_userns_clone=1")
    apparmor = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1"
    with tempfile.TemporaryDirectory(prefix="sandbox-doctor-") as d:
        proc = subprocess.run([spawner_python(), "-I", "-S", "-c", _PROBE, str(PACKAGE_DIR.parent),
                               d], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode == 0:
        return Check(name, True, "unshare, id maps, tmpfs, overlayfs+userxattr, whiteouts, lo")
    detail = (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1:] or ["failed"])
    fix = "a kernel with unprivileged user namespaces and overlayfs in them (Linux >= 5.11)"
    if apparmor:
        fix = ("Ubuntu restricts unprivileged user namespaces through AppArmor: "
               "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or install an "
               f"AppArmor profile granting 'userns,' to {sys.executable}")
    text = detail if isinstance(detail, str) else detail[0]
    return Check(name, False, text, fix)


def check_cgroups() -> Check:
    """What a supervisor does, for real: find (or, on a systemd host, ask for) our subtree,
    place a stand-in for the spawner in it, make a job cgroup, limit it, move the stand-in
    into it as a sandbox's init moves itself, read it, and remove everything again."""
    name = "cgroups (memory, pids, cpu accounting) in a subtree of our own"
    manager: cgroups.Manager | None = None
    helper = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"],
                              stdin=subprocess.DEVNULL)
    try:
        manager = cgroups.detect()
        manager.adopt(helper.pid)
        probe = manager.create(f"{os.getpid()}-doctor")
        try:
            probe.set_limits(memory=64 << 20, pids=16)
            probe.add(helper.pid)
            probe.cpu_time()
            probe.stats()
        finally:
            helper.kill()
            helper.wait()
            probe.remove()
    except SandboxError as e:
        if isinstance(e, CgroupError):
            detail, fix = e.detail, e.fix
        else:
            detail, fix = str(e), ""
        if not fix and cgroups.mounted_hierarchies().keys() >= set(v1.CONTROLLERS):
            fix = f"as root: sandbox system setup --user {cgroups.user_name()}"
        return Check(name, False, detail, fix)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        if manager is not None:
            manager.release()
    return Check(name, True, manager.describe())


def check_seccomp() -> Check:
    name = "seccomp (libseccomp via pyseccomp)"
    try:
        from .profiles import load_profile  # noqa: PLC0415
        from .seccomp import compile_bpf  # noqa: PLC0415

        bpf = compile_bpf(load_profile("default").seccomp)
    except (ImportError, OSError, SandboxError) as e:
        return Check(name, False, str(e), "apt install libseccomp2; pip install pyseccomp")
    return Check(name, True, f"default profile compiles to {len(bpf) // 8} BPF instructions")


def check_subuid() -> Check:
    from .jail.plan import read_subids  # noqa: PLC0415

    user = cgroups.user_name()
    name = "subordinate ids (full id maps, rootless mmdebstrap)"
    has_tools = shutil.which("newuidmap") and shutil.which("newgidmap")
    subu = read_subids("/etc/subuid", user, os.getuid())
    if os.geteuid() == 0:
        return Check(name, True, "running as root: single mapping, mmdebstrap --mode=root",
                     required=False)
    if not has_tools:
        return Check(name, False, "newuidmap/newgidmap missing", "apt install uidmap",
                     required=False)
    if not subu:
        return Check(name, False, f"no range for {user} in /etc/subuid",
                     f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}",
                     required=False)
    return Check(name, True, f"{user}: {subu[0]}+{subu[1]}", required=False)


def check_mmdebstrap() -> Check:
    ok = shutil.which("mmdebstrap") is not None
    return Check("mmdebstrap (builds debian-based images such as py3)", ok,
                 "" if ok else "not installed", "apt install mmdebstrap", required=False)


def all_checks() -> list[Check]:
    return [check_userns(), check_cgroups(), check_seccomp(), check_subuid(),
            check_mmdebstrap()]


def checks_json() -> dict[str, object]:
    """``{"ok": exec will work with limits, "checks": [{name, ok, required, detail,
    fix}...]}``."""
    checks = all_checks()
    return {"ok": all(c.ok for c in checks if c.required),
            "checks": [dataclasses.asdict(c) for c in checks]}


def run_checks(echo: Callable[[str], None]) -> int:
    """Print every check; return 0 when exec will work with limits, else 1."""
    checks = all_checks()
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        echo(f"{mark} {c.name}" + (f": {c.detail}" if c.detail else ""))
        if not c.ok and c.fix:
            echo(f"     fix: {c.fix}")
    failed = [c for c in checks if c.required and not c.ok]
    echo("sandbox exec will work here." if not failed else
         f"{len(failed)} problem(s) must be fixed before sandbox exec can run.")
    return 1 if failed else 0
