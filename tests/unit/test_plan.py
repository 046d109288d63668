"""The set-up plan: pure data, checked without privileges."""

from __future__ import annotations

import dataclasses

from sandbox.jail import ops as o
from sandbox.jail import plan

SHAPE = plan.SandboxShape(lower=("/store/layers/b", "/store/layers/a"), disk=1 << 20,
                          workdir="/work", uid=1000, gid=1000, hostname="sandbox",
                          mount_point="/run/user/1/sandbox/mnt")
SINGLE = plan.IdMapping("single", 1001, 1001)
SUBUID = plan.IdMapping("subuid", 1001, 1001, (100000, 65536), (100000, 65536))


def kinds(steps: list[o.Op]) -> list[str]:
    return [type(s).__name__ for s in steps]


def test_prepare_order() -> None:
    steps = plan.prepare(SHAPE, SINGLE)
    names = kinds(steps)
    assert names[0] == "SetIdMap" and names[1] == "MakeRootPrivate"
    assert names.index("MountTmpfs") < names.index("MountOverlay") < names.index("MountProc")
    assert names.index("MountProc") < names.index("PivotRoot")
    pivot = names.index("PivotRoot")
    assert steps[pivot + 1] == o.Remount("/", readonly=True)  # the root turns read-only
    assert names[-3:] == ["SetHostname", "LoopbackUp", "DropBoundingSet"]
    overlay = next(s for s in steps if isinstance(s, o.MountOverlay))
    assert overlay.lower == SHAPE.lower  # topmost layer first
    # /work and /tmp stay writable: bound onto themselves before the root turns read-only
    binds = [s.target for s in steps if isinstance(s, o.BindMount)]
    assert f"{SHAPE.mount_point}/root/work" in binds and f"{SHAPE.mount_point}/root/tmp" in binds
    # /dev nodes keep working, masks and everything else are nodev
    devs = [s for s in steps if isinstance(s, o.BindMount) and s.devices]
    assert sorted(s.source for s in devs) == sorted(f"/dev/{n}" for n in plan.DEV_NODES)


def test_subuid_waits_for_the_spawner() -> None:
    steps = plan.prepare(SHAPE, SUBUID)
    assert isinstance(steps[0], o.AwaitIdMap)
    args = SUBUID.spawner_args()
    assert args == {"uid": [[0, 1001, 1], [1, 100000, 65536]],
                    "gid": [[0, 1001, 1], [1, 100000, 65536]], "direct": False}
    assert SINGLE.spawner_args() is None


def test_launch_order_seccomp_last() -> None:
    launch = plan.Launch(argv=("python3", "x.py"), env={"PATH": "/bin"}, files=[("x.py", 0o644)],
                         workdir="/work", uid=1000, gid=1000, rlimits={"core": (0, 0)},
                         bpf=b"\x06\x00\x00\x00\x00\x00\xff\x7f")
    steps = plan.launch_ops(launch, SINGLE)
    names = kinds(steps)
    assert names[0] == "Chdir"
    assert names.index("SetIds") < names.index("ClearCapabilities") < names.index(
        "NoNewPrivs") < names.index("Seccomp")
    assert names[-2:] == ["Seccomp", "Spawn"]
    go = plan.go(launch, SINGLE)
    assert go == [o.WriteFile("/work/x.py", 3, 0o644, 1000, 1000)]


def test_prepare_ends_with_the_steps_no_job_changes() -> None:
    """The cgroup namespace (rooted at the cgroup init joined first thing) and the empty
    bounding set are the same for every job: a warm sandbox has them before a job comes."""
    steps = plan.prepare(SHAPE, SINGLE, cgroup_fds=3)
    names = kinds(steps)
    assert names[0] == "JoinCgroup"
    assert names[-2:] == ["UnshareCgroupNamespace", "DropBoundingSet"]
    assert names.index("PivotRoot") < names.index("DropBoundingSet")


def test_go_creates_parent_dirs_first() -> None:
    launch = plan.Launch(argv=("x",), env={}, files=[("a/b/c.txt", 0o644), ("a/d.txt", 0o600)],
                         workdir="/work", uid=1000, gid=1000, rlimits={}, bpf=b"")
    steps = plan.go(launch, SINGLE)
    assert steps[:2] == [o.MakeDir("/work/a", 0o755, 1000, 1000, "/work"),
                         o.MakeDir("/work/a/b", 0o755, 1000, 1000, "/work")]


def test_ops_round_trip_through_json() -> None:
    steps = plan.prepare(SHAPE, SINGLE)
    assert o.decode(o.encode(steps)) == steps


def test_environment_is_built_not_inherited() -> None:
    env = plan.job_env(path="/bin", home="/work", lang="C.UTF-8",
                       image_env={"PATH": "/usr/bin", "X": "1"}, extra={"X": "2"})
    assert env == {"PATH": "/usr/bin", "HOME": "/work", "LANG": "C.UTF-8", "X": "2"}


def test_host_network_keeps_the_hosts_namespace_and_resolv_conf() -> None:
    from sandbox import linux

    shape = dataclasses.replace(SHAPE, host_network=True, resolv_conf=True, writable_root=True)
    steps = plan.prepare(shape, SINGLE)
    names = kinds(steps)
    assert "LoopbackUp" not in names
    bind = o.BindMount("/etc/resolv.conf", f"{SHAPE.mount_point}/root/etc/resolv.conf",
                       readonly=True, create="file")
    assert names.index("PivotRoot") == steps.index(bind) + 1  # bound before the pivot
    assert plan.clone_flags(shape) & linux.CLONE_NEWNET == 0
    assert plan.clone_flags(SHAPE) & linux.CLONE_NEWNET
    assert "LoopbackUp" in kinds(plan.prepare(SHAPE, SINGLE))


def test_dirs_in_the_image_are_made_without_following_symlinks() -> None:
    shape = plan.SandboxShape(lower=("/l",), disk=1 << 20, workdir="/work", uid=1000,
                              gid=1000, hostname="h", mount_point="/m")
    idmap = plan.IdMapping("single", 1000, 1000)
    made = [op for op in plan.prepare(shape, idmap)
            if isinstance(op, o.MakeDir) and op.path.startswith("/m/root/")
            and op.path.count("/") == 3]
    assert {op.path for op in made} == {"/m/root/work", "/m/root/tmp", "/m/root/proc",
                                        "/m/root/dev"}
    assert all(op.beneath == "/m/root" for op in made)


def test_etc_files_name_the_job_and_the_host_on_loopback() -> None:
    passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false"
    name, files = plan.etc_files(hostname="box", uid=1000, gid=1000, home="/work",
                                 passwd=passwd, group="root:x:0:\n")
    text = dict(files)
    assert name == "sandbox"
    assert text["etc/hosts"] == ("127.0.0.1\tlocalhost box\n"
                                 "::1\tlocalhost ip6-localhost ip6-loopback\n")
    assert text["etc/hostname"] == "box\n"
    assert text["etc/passwd"] == passwd + "\nsandbox:x:1000:1000:sandbox job:/work:/bin/sh\n"
    assert text["etc/group"] == "root:x:0:\nsandbox:x:1000:\n"


def test_etc_files_keep_an_entry_the_image_has() -> None:
    passwd = "app:x:1000:1000::/home/app:/bin/sh\nsandbox:x:7:7::/:/bin/sh\n"
    group = "app:x:1000:\n"
    name, files = plan.etc_files(hostname="h", uid=1000, gid=1000, home="/work",
                                 passwd=passwd, group=group)
    assert name == "app" and dict(files)["etc/passwd"] == passwd
    assert dict(files)["etc/group"] == group
    name, files = plan.etc_files(hostname="h", uid=1001, gid=1001, home="/w", passwd=passwd,
                                 group="sandbox:x:5:\n")
    assert name == "u1001"  # "sandbox" is taken by another uid
    assert dict(files)["etc/group"] == "sandbox:x:5:\nu1001:x:1001:\n"


def test_etc_files_are_written_after_the_overlay_and_before_the_root_turns_read_only() -> None:
    shape = dataclasses.replace(SHAPE, etc=(("etc/hosts", "x\n"),))
    steps = plan.prepare(shape, SINGLE)
    names = kinds(steps)
    write = steps[names.index("WriteText")]
    assert write == o.WriteText(f"{SHAPE.mount_point}/root/etc/hosts", "x\n", 0o644,
                                beneath=f"{SHAPE.mount_point}/root")
    assert names.index("MountOverlay") < names.index("WriteText") < names.index("PivotRoot")


def test_a_writable_root_needs_no_binds_for_work_and_tmp() -> None:
    steps = plan.prepare(dataclasses.replace(SHAPE, writable_root=True), SINGLE)
    binds = [s.target for s in steps if isinstance(s, o.BindMount)]
    assert f"{SHAPE.mount_point}/root/work" not in binds
    assert o.Remount("/", readonly=True) not in steps


def test_the_job_gets_its_account_in_the_environment() -> None:
    env = plan.job_env(path="/bin", home="/work", lang="C.UTF-8", image_env={},
                       extra={"USER": "x"}, user="sandbox")
    assert env == {"PATH": "/bin", "HOME": "/work", "LANG": "C.UTF-8", "USER": "x",
                   "LOGNAME": "sandbox"}
