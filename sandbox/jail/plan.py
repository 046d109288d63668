"""JobSpec + Profile + Image -> the ordered set-up operations (pure: no syscalls here).

`prepare` builds the sandbox (run by its init right after clone, possibly long before a job
arrives); `go` and `launch` are per job. Read `ARCHITECTURE.md` for why each step is where
it is; `sandbox exec --dry-run` prints a plan.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import ops as o

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"),
             ("/proc/self/fd/1", "stdout"), ("/proc/self/fd/2", "stderr"),
             ("pts/ptmx", "ptmx"))
DEV_SIZE = 64 * 1024
# Like Docker's defaults: kernel knobs read-only, kernel internals masked (with /dev/null).
# /proc/pressure's files are world-writable on the host: a write there creates a PSI
# trigger that polls the whole host's pressure, a kernel resource outside the job's limits.
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs", "pressure")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "kallsyms",
               "kpagecount", "kpageflags", "kpagecgroup", "config.gz")
# Directories of hardware detail, hidden under an empty read-only tmpfs (as Docker does).
PROC_MASKED_DIRS = ("acpi", "scsi", "asound")


@dataclass(frozen=True, slots=True)
class IdMapping:
    """How the sandbox's ids map to the caller's.

    ``single``: the caller's uid/gid appear as the job's uid/gid (1000); nothing else is
    mapped; init and job share that uid (init keeps capabilities, the job none).
    ``subuid``: 0 -> the caller, 1..count -> the caller's /etc/subuid range, written by
    newuidmap; init runs as 0, the job as its own uid, which owns nothing of the image.
    ``root``: the same shape when the caller is root, written directly by the spawner: the
    job never runs as host uid 0 (which passes every DAC check on root-owned files, such as
    /proc/sys, even without capabilities), but as an unused high uid.
    """

    mode: str  # "single" | "subuid" | "root"
    outside_uid: int
    outside_gid: int
    sub_uid: tuple[int, int] = (0, 0)  # (start, count)
    sub_gid: tuple[int, int] = (0, 0)

    def spawner_args(self) -> dict[str, object] | None:
        """What the spawner must write for this mapping (None: init writes its own)."""
        if self.mode == "single":
            return None
        return {"uid": [[0, self.outside_uid, 1], [1, self.sub_uid[0], self.sub_uid[1]]],
                "gid": [[0, self.outside_gid, 1], [1, self.sub_gid[0], self.sub_gid[1]]],
                "direct": self.mode == "root"}

    def init_ids(self, job_uid: int, job_gid: int) -> tuple[int, int]:
        """The uid/gid init runs as inside (and thus owns what it creates)."""
        return (job_uid, job_gid) if self.mode == "single" else (0, 0)


@dataclass(frozen=True, slots=True)
class SandboxShape:
    """Everything `prepare` depends on: equal shapes make interchangeable warm sandboxes."""

    lower: tuple[str, ...]     # unpacked layer dirs, topmost first
    disk: int                  # bytes for everything writable
    workdir: str
    uid: int
    gid: int
    hostname: str
    mount_point: str           # an existing empty host dir (per user) to build the root on
    writable_root: bool = False
    upper_dir: str = ""        # for builds: keep the overlay upper in this host dir
    host_network: bool = False  # for builds that ask for it: no new net namespace
    resolv_conf: bool = False  # with host_network: bind the host's /etc/resolv.conf (ro)
    etc: tuple[tuple[str, str], ...] = ()  # files written over the image's (`etc_files`)


def prepare(shape: SandboxShape, idmap: IdMapping, cgroup_fds: int = 0) -> list[o.Op]:
    """The ops init runs right after clone (pid 1 in fresh user, mount, pid, net, ipc, uts
    namespaces): join the job's cgroup (``cgroup_fds`` cgroup.procs files came with the
    spawn request), build the root, then wait for a job."""
    m = shape.mount_point
    root = f"{m}/root"
    upper, ovl_work = (f"{m}/upper", f"{m}/ovlwork")
    if shape.upper_dir:
        upper, ovl_work = f"{shape.upper_dir}/upper", f"{shape.upper_dir}/work"
    uid, gid = shape.uid, shape.gid
    steps: list[o.Op] = [o.JoinCgroup(tuple(range(cgroup_fds)))] if cgroup_fds else []
    if idmap.mode == "single":
        steps.append(o.SetIdMap(uid, idmap.outside_uid, gid, idmap.outside_gid))
    else:
        steps.append(o.AwaitIdMap())
    own_uid, own_gid = idmap.init_ids(uid, gid)
    steps += [
        o.MakeRootPrivate(),
        o.MountTmpfs(m, shape.disk, 0o755),
        o.MakeDir(f"{m}/root", 0o755, beneath=m),
        o.MakeDir(f"{m}/shm", 0o1777, own_uid, own_gid, beneath=m),
    ]
    if not shape.upper_dir:
        steps += [o.MakeDir(upper, 0o755, beneath=m), o.MakeDir(ovl_work, 0o700, beneath=m)]
    # Below `root` is the image, attacker-controlled: MakeDir never follows a symlink there.
    steps += [
        o.MountOverlay(shape.lower, upper, ovl_work, root),
        *[o.WriteText(f"{root}/{rel}", text, 0o644, beneath=root) for rel, text in shape.etc],
        o.MakeDir(root + shape.workdir, 0o755, uid, gid, beneath=root),
        o.MakeDir(f"{root}/tmp", 0o1777, beneath=root),
        o.MakeDir(f"{root}/proc", 0o555, beneath=root),
        o.MakeDir(f"{root}/dev", 0o755, beneath=root),
    ]
    if not shape.writable_root and shape.workdir != "/":
        steps += [o.BindMount(f"{root}/tmp", f"{root}/tmp"),
                  o.BindMount(root + shape.workdir, root + shape.workdir)]
    steps += [
        o.MountProc(f"{root}/proc"),
        *[o.BindMount(f"{root}/proc/{p}", f"{root}/proc/{p}", readonly=True, create="skip")
          for p in PROC_READONLY],
        *[o.BindMount("/dev/null", f"{root}/proc/{p}", readonly=True, create="skip")
          for p in PROC_MASKED],
        *[o.MountTmpfs(f"{root}/proc/{p}", 4096, 0o555, noexec=True, readonly=True,
                       optional=True) for p in PROC_MASKED_DIRS],
        o.MountTmpfs(f"{root}/dev", DEV_SIZE, 0o755, noexec=True),
        *[o.BindMount(f"/dev/{n}", f"{root}/dev/{n}", create="file", devices=True)
          for n in DEV_NODES],
        o.MakeDir(f"{root}/dev/pts", 0o755, beneath=f"{root}/dev"),
        o.MountDevpts(f"{root}/dev/pts"),
        o.MakeDir(f"{root}/dev/shm", 0o1777, beneath=f"{root}/dev"),
        o.BindMount(f"{m}/shm", f"{root}/dev/shm"),
        *[o.Symlink(target, f"{root}/dev/{name}") for target, name in DEV_LINKS],
        o.Remount(f"{root}/dev", readonly=True, noexec=True),
    ]
    if shape.host_network and shape.resolv_conf:
        steps.append(o.BindMount("/etc/resolv.conf", f"{root}/etc/resolv.conf", readonly=True,
                                 create="file"))
    steps.append(o.PivotRoot(root))
    if not shape.writable_root:
        steps.append(o.Remount("/", readonly=True))
    steps.append(o.SetHostname(shape.hostname))
    if not shape.host_network:
        steps.append(o.LoopbackUp())
    # Not per job, so not on its path: the job's cgroup namespace is rooted at the cgroup
    # init joined above, and the bounding set only matters at execve (init keeps its
    # effective capabilities for the go ops).
    if cgroup_fds:
        steps.append(o.UnshareCgroupNamespace())
    steps.append(o.DropBoundingSet())
    return steps


@dataclass(frozen=True, slots=True)
class Launch:
    """What `go` and `launch` depend on (per job)."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    files: Sequence[tuple[str, int]]          # (relative name, mode); fds follow stdio
    workdir: str
    uid: int
    gid: int
    rlimits: Mapping[str, tuple[int, int]]
    bpf: bytes


MAX_ARG_STRLEN = 32 * 4096  # the kernel's bound on one argument or NAME=value


def check_exec_size(argv: Sequence[str], env: Mapping[str, str], stack: int) -> None:
    """Refuse, naming the limit, a command line the kernel's execve would refuse (E2BIG):
    every string at most `MAX_ARG_STRLEN` bytes, all of them (and their pointers) at most
    a quarter of the job's stack limit (``stack``, bytes; negative: unlimited)."""
    from ..errors import SpecError  # noqa: PLC0415

    strings = [a.encode() for a in argv] + [f"{k}={v}".encode() for k, v in env.items()]
    longest = max((len(x) for x in strings), default=0)
    if longest + 1 > MAX_ARG_STRLEN:
        raise SpecError(f"an argument or environment variable of {longest} bytes: the "
                        f"kernel's limit is {MAX_ARG_STRLEN - 1} bytes each")
    total = sum(len(x) + 1 for x in strings) + 8 * (len(strings) + 2)
    limit = stack // 4 if stack > 0 else 6 << 20
    if total > limit:
        raise SpecError(f"the command line and environment take {total} bytes: the kernel's "
                        f"limit for this job is {limit} (a quarter of its stack limit)")


def go(launch: Launch, idmap: IdMapping) -> list[o.Op]:
    """Ops init runs when a job arrives: copy its files in (descriptors 3.. of the go
    message, after stdio)."""
    dirs: set[str] = set()
    writes: list[o.Op] = []
    for index, (name, mode) in enumerate(launch.files):
        path = posixpath.join(launch.workdir, name)
        parent = posixpath.dirname(path)
        while parent != launch.workdir and parent.startswith(launch.workdir + "/"):
            dirs.add(parent)
            parent = posixpath.dirname(parent)
        writes.append(o.WriteFile(path, 3 + index, mode, launch.uid, launch.gid))
    made = [o.MakeDir(d, 0o755, launch.uid, launch.gid, beneath=launch.workdir)
            for d in sorted(dirs, key=lambda d: (d.count("/"), d))]
    return [*made, *writes]


def launch_ops(launch: Launch, idmap: IdMapping) -> list[o.Op]:
    """Ops init applies to itself before it spawns the job, which inherits the result:
    nothing runs in the job's process before execve. (The bounding set was emptied at the
    end of `prepare`.) Seccomp is loaded last."""
    return [
        o.Chdir(launch.workdir),
        o.SetRlimits({k: [v[0], v[1]] for k, v in launch.rlimits.items()}),
        o.SetIds(launch.uid, launch.gid, setgroups=idmap.mode != "single"),
        o.ClearCapabilities(),
        o.NoNewPrivs(),
        o.Seccomp(launch.bpf.hex()),
        o.Spawn(tuple(launch.argv), dict(launch.env), (0, 1, 2)),
    ]


def job_env(*, path: str, home: str, lang: str, image_env: Mapping[str, str],
            extra: Mapping[str, str], user: str = "") -> dict[str, str]:
    """The job's whole environment: ours (with the job's account: HOME, USER, LOGNAME),
    then the image's, then the caller's ``--env``. Nothing of the caller's own
    environment comes in."""
    env = {"PATH": path, "HOME": home, "LANG": lang}
    if user:
        env.update(USER=user, LOGNAME=user)
    env.update(image_env)
    env.update(extra)
    return env


def etc_files(*, hostname: str, uid: int, gid: int, home: str, passwd: str,
              group: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The job's user name, and the files every job gets over the image's, as Docker
    writes them: /etc/hosts (localhost and the hostname on loopback), /etc/hostname, and
    the image's /etc/passwd and /etc/group with an entry for the job's uid and gid where
    they have none (home: the work dir)."""
    users = [line.split(":") for line in passwd.splitlines() if line.count(":") >= 6]
    name = next((u[0] for u in users if u[2] == str(uid)), "")
    if not name:
        name = "sandbox" if "sandbox" not in {u[0] for u in users} else f"u{uid}"
        passwd = _append(passwd, f"{name}:x:{uid}:{gid}:sandbox job:{home}:/bin/sh")
    groups = [line.split(":") for line in group.splitlines() if line.count(":") >= 3]
    if not any(g[2] == str(gid) for g in groups):
        taken = {g[0] for g in groups}
        group = _append(group, f"{name if name not in taken else f'g{gid}'}:x:{gid}:")
    hosts = (f"127.0.0.1\tlocalhost {hostname}\n"
             "::1\tlocalhost ip6-localhost ip6-loopback\n")
    return name, (("etc/hosts", hosts), ("etc/hostname", hostname + "\n"),
                  ("etc/passwd", passwd), ("etc/group", group))


def _append(text: str, line: str) -> str:
    return (text if not text or text.endswith("\n") else text + "\n") + line + "\n"


def clone_flags(shape: SandboxShape | None = None) -> int:
    """Namespaces to clone into: all of them, but the network one when the shape shares
    the host's network (builds started with ``--network host``)."""
    from .. import linux  # noqa: PLC0415

    flags = (linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWNET
             | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
    if shape is not None and shape.host_network:
        flags &= ~linux.CLONE_NEWNET
    return flags


def read_subids(path: str, user: str, uid: int) -> tuple[int, int] | None:
    """The first range of at least 65536 ids for ``user`` (or ``uid``) in /etc/sub[ug]id."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (user, str(uid)):
                    start, count = int(parts[1]), int(parts[2])
                    if count >= 65536:
                        return start, count
    except (OSError, ValueError):
        return None
    return None


# Host ids for root's jobs when root has no /etc/subuid range: outside what useradd hands
# out (SUB_UID_MAX is 600100000 by default), so no user's containers share them.
ROOT_JOB_IDS = 2_147_483_648


def detect_idmap(user: str) -> IdMapping:
    """As root: ``root`` mode (root's /etc/subuid range, else `ROOT_JOB_IDS`). Otherwise
    subuid when /etc/subuid and /etc/subgid have a range for us and newuidmap exists (or
    ``SANDBOX_IDMAP=subuid``); else a single mapping. ``SANDBOX_IDMAP=single`` forces it."""
    import shutil  # noqa: PLC0415

    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        root_u = read_subids("/etc/subuid", user, uid) or (ROOT_JOB_IDS, 65536)
        root_g = read_subids("/etc/subgid", user, gid) or (ROOT_JOB_IDS, 65536)
        return IdMapping("root", 0, 0, (root_u[0], 65536), (root_g[0], 65536))
    single = IdMapping("single", uid, gid)
    choice = os.environ.get("SANDBOX_IDMAP", "auto")
    if choice == "single":
        return single
    subu = read_subids("/etc/subuid", user, uid)
    subg = read_subids("/etc/subgid", user, gid)
    tools = shutil.which("newuidmap") and shutil.which("newgidmap")
    if subu and subg and tools:
        return IdMapping("subuid", uid, gid, (subu[0], min(subu[1], 65536)),
                         (subg[0], min(subg[1], 65536)))
    if choice == "subuid":
        from ..errors import SpecError  # noqa: PLC0415

        raise SpecError(f"SANDBOX_IDMAP=subuid, but {user} has no /etc/subuid and "
                        "/etc/subgid range or newuidmap is missing")
    return single
