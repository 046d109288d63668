"""The supervisor: turns a `JobSpec` into a `Result`.

It owns the spawner, the cgroup manager, the image store, the warm pool and admission
control. The daemon serves it over a socket; the CLI embeds it when no daemon runs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trio

from .. import cgroups, config, seccomp
from ..cgroups import JobCgroup
from ..errors import ImageError, SandboxError, SpecError
from ..images.layers import read_merged
from ..images.store import Image, Lease, Store
from ..jail import ops, plan
from ..profiles import Profile, load_profile
from ..spec import File, JobSpec, Limits, Result, Status
from . import job, program
from .admission import Admission
from .job import JobControl
from .pool import Pool, Sandbox, layer_ids
from .spawner import Spawner

ProgressCallback = Callable[[str], None]


@dataclass
class JobInfo:
    """A job as `sandbox daemon`'s list request shows it."""

    id: str
    image: str
    command: str
    submitted: float
    started: float | None = None
    owner: str = ""

    def to_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"id": self.id, "image": self.image, "command": self.command,
                "owner": self.owner, "waiting": round((self.started or now) - self.submitted, 3),
                "running": round(now - self.started, 3) if self.started else 0.0}


class Supervisor:
    """Runs jobs. Use as ``async with Supervisor() as sup: result = await sup.run(spec)``."""

    def __init__(self, store: Store | None = None, *, pool_size: int = 0,
                 max_running: int | None = None, fair: bool = False,
                 on_progress: ProgressCallback | None = None) -> None:
        self.store = store or Store()
        self.spawner = Spawner(on_start=lambda pid: self.cgroups.adopt(pid))
        self.max_running = max_running or os.cpu_count() or 1
        self.admission = Admission(self.max_running, fair=fair)
        self.pool = Pool(self, pool_size)
        self.on_progress = on_progress
        self._ids = itertools.count(1)
        self._cgroups: cgroups.Manager | None = None
        self._idmap: plan.IdMapping | None = None
        self._mount_point = ""
        self._build_locks: dict[str, trio.Lock] = {}
        self._plans: dict[tuple[plan.SandboxShape, plan.IdMapping],
                          tuple[str, list[dict[str, Any]]]] = {}
        self._image_cache: dict[str, tuple[int, Image, tuple[str, ...]]] = {}
        self._etc_cache: dict[tuple[str, str, int, int, str],
                              tuple[str, tuple[tuple[str, str], ...]]] = {}
        self._index_path = str(self.store.root / "index.json")
        self.queued: dict[str, JobInfo] = {}
        self.running: dict[str, JobInfo] = {}
        self._controls: dict[str, JobControl] = {}

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def start(self) -> None:
        """Check the host, start the spawner and clean up after a dead predecessor."""
        self._cgroups = cgroups.detect()
        self._cgroups.cleanup_stale()
        self._idmap = plan.detect_idmap(cgroups.user_name())
        mnt = config.runtime_dir() / "mnt"
        mnt.mkdir(exist_ok=True)
        self._mount_point = str(mnt)
        try:
            self.spawner.start()  # and placed where its inits can join job cgroups (adopt)
        except BaseException:
            self._cgroups.release()
            raise

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.pool.drain()
        self.spawner.close()
        if self._cgroups is not None:  # every job's cgroup is gone by now
            self._cgroups.release()

    @property
    def cgroups(self) -> cgroups.Manager:
        if self._cgroups is None:
            raise SandboxError("supervisor is not started")
        return self._cgroups

    @property
    def idmap(self) -> plan.IdMapping:
        if self._idmap is None:
            raise SandboxError("supervisor is not started")
        return self._idmap

    def idmap_for(self, upper_dir: str) -> plan.IdMapping:
        """Builds keep their overlay upper on disk, where we must be able to read and delete
        everything the RUN step wrote: without root, that takes a single mapping."""
        idmap = self.idmap
        if upper_dir and idmap.mode == "subuid":
            return plan.IdMapping("single", idmap.outside_uid, idmap.outside_gid)
        return idmap

    # -- images -------------------------------------------------------------------------

    async def image(self, ref: str, progress: ProgressCallback | None = None) -> Image:
        """Resolve ``ref`` in the store; on first use, build it from the shipped recipe of
        that name, or else pull it from its registry (like `docker run`). Shipped recipes are
        part of the tool: their RUN steps may use the network (to install packages)."""
        image = self._find(ref)
        if image is None:
            from ..images import build  # noqa: PLC0415
            from ..images.store import normalize_ref  # noqa: PLC0415

            recipe = build.shipped_recipe(ref)
            lock = self._build_locks.setdefault(normalize_ref(ref), trio.Lock())
            if lock.statistics().owner is trio.lowlevel.current_task():
                raise SpecError(f"image {ref!r}: its recipe builds FROM itself")
            async with lock:
                image = self.store.find(ref)
                if image is None and recipe is not None:
                    image = await build.build(self, recipe, ref,
                                              progress=progress or self.on_progress,
                                              network="host")
                elif image is None:
                    image = await self._pull(ref, progress or self.on_progress)
        if self._needs_unpacking(ref, image):
            await trio.to_thread.run_sync(self.store.ensure_unpacked, image)
        return image

    def _needs_unpacking(self, ref: str, image: Image) -> bool:
        hit = self._image_cache.get(ref)
        lower = hit[2] if hit is not None and hit[1] is image else image.lower_dirs()
        return not all(os.path.isdir(d) for d in lower)

    def _find(self, ref: str) -> Image | None:
        """`Store.find`, cached until index.json changes (it is on every job's path)."""
        try:
            stamp = os.stat(self._index_path).st_mtime_ns
        except FileNotFoundError:
            stamp = 0
        hit = self._image_cache.get(ref)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        image = self.store.find(ref)
        if image is not None:  # under the name asked for and the one `shape` looks up
            self._image_cache[ref] = self._image_cache[image.ref] = (
                stamp, image, tuple(image.lower_dirs()))
        return image

    async def _pull(self, ref: str, log: ProgressCallback | None) -> Image:
        from ..images import pull, reference  # noqa: PLC0415
        from ..images.registry import LineProgress  # noqa: PLC0415

        if os.environ.get("SANDBOX_PULL", "auto") == "never":
            raise SpecError(f"image {ref!r} not found (see `sandbox images`; SANDBOX_PULL=never "
                            "keeps it from being pulled)")
        try:
            full = reference.parse(ref)
        except ImageError:
            raise SpecError(f"image {ref!r} not found (see `sandbox images`)") from None
        if full.registry == "localhost":  # podman's name for a local image: no registry
            raise SpecError(f"image {ref!r} not found (see `sandbox images`; localhost/ names "
                            "are local images: `sandbox image load` one)")
        progress = LineProgress(log) if log else None
        if log:
            log(f"Pulling {full}")
        try:
            result = await trio.to_thread.run_sync(
                functools.partial(pull.pull, ref, store=self.store, progress=progress))
        except ImageError as e:
            raise ImageError(f"image {ref!r} is not in the store and pulling it failed: "
                             f"{e}") from None
        return result.image

    # -- sandboxes ----------------------------------------------------------------------

    def shape(self, image: Image, profile: Profile, limits: Limits, *,
              writable_root: bool = False, upper_dir: str = "",
              workdir: str | None = None, host_network: bool = False,
              resolv_conf: bool = False, ids: tuple[int, int] | None = None,
              etc: tuple[tuple[str, str], ...] = ()) -> plan.SandboxShape:
        workdir = workdir or profile.workdir
        uid, gid = ids or (profile.uid, profile.gid)
        hit = self._image_cache.get(image.ref)
        lower = hit[2] if hit is not None and hit[1] is image else tuple(image.lower_dirs())
        return plan.SandboxShape(
            lower=lower, disk=int(limits.disk or 0), workdir=workdir,
            uid=uid, gid=gid, hostname=profile.hostname,
            mount_point=self._mount_point, writable_root=writable_root, upper_dir=upper_dir,
            host_network=host_network, resolv_conf=resolv_conf, etc=etc)

    def _not_found_hint(self, result: Result, image: Image, name: str) -> Result:
        """A command that is not found but names an image (`sandbox exec busybox echo
        hi`): say what to type instead."""
        if result.exit_code != 127 or "/" in name or not result.message:
            return result
        from ..images.build import shipped_recipe  # noqa: PLC0415

        try:
            if self._find(name) is None and shipped_recipe(name) is None:
                return result
        except ImageError:  # not even a name an image could have
            return result
        hint = (f"{name}: command not found in the image {image.ref}; {name} is an image: "
                f"sandbox exec --image {name} COMMAND...")
        return dataclasses.replace(result, message=hint)

    def job_shape(self, image: Image, profile: Profile, limits: Limits,
                  job: program.Program | None = None, *, read_only: bool = False,
                  host_network: bool = False, resolv_conf: bool = False,
                  ) -> tuple[str, plan.SandboxShape]:
        """The job's user name and the shape of its sandbox (``job``: what the image's
        own config gives, for a daemon's ``--warm``): a writable root unless
        ``read_only``, and the files written over the image's (/etc/hosts, hostname,
        passwd, group), cached per image and identity, so a warm sandbox has them."""
        if job is None:
            job = program.resolve(JobSpec(image=image.ref, argv=("true",)), image, profile)
        key = (image.id, profile.hostname, job.uid, job.gid, job.workdir)
        hit = self._etc_cache.get(key)
        if hit is None:
            lower = image.lower_dirs()
            hit = self._etc_cache[key] = plan.etc_files(
                hostname=profile.hostname, uid=job.uid, gid=job.gid, home=job.workdir,
                passwd=read_merged(lower, "etc/passwd"), group=read_merged(lower, "etc/group"))
        user, etc = hit
        return user, self.shape(image, profile, limits, writable_root=not read_only,
                                workdir=job.workdir, host_network=host_network,
                                resolv_conf=resolv_conf, ids=(job.uid, job.gid), etc=etc)

    async def new_sandbox(self, shape: plan.SandboxShape) -> Sandbox:
        """Make a fresh cgroup, clone an init into new namespaces that joins it and builds a
        sandbox of ``shape``, and wait until it is ready. (init joins the cgroup itself: a
        cgroup v1 migration waits for an RCU grace period, which must not stall us.) The
        sandbox holds a lease on its layers until its init is closed (prune skips them)."""
        idmap = self.idmap_for(shape.upper_dir)
        layers = layer_ids(shape.lower)
        name = f"{os.getpid()}-{next(self._ids):x}"
        # A spawner that died is replaced before the cgroup is made: on cgroup v2 its
        # successor may get a new systemd scope, and job cgroups go where it is.
        self.spawner.ensure_running()
        # The lease may wait for a prune, and creating a cgroup can take milliseconds in the
        # kernel: both on a worker thread, never on the event loop.
        lease, cgroup, procs = await trio.to_thread.run_sync(self._lease_and_cgroup,
                                                             shape.lower, name)
        key = (shape, idmap)
        cached = self._plans.get(key)
        if cached is None:
            cached = self._plans[key] = (f"p{len(self._plans)}",
                                         ops.encode(plan.prepare(shape, idmap, len(procs))))
        try:
            init = await self.spawner.spawn(cached[0], cached[1], plan.clone_flags(shape),
                                            idmap.spawner_args(), procs)
        except BaseException:
            cgroup.remove()
            lease.close()
            raise
        finally:
            for fd in procs:
                os.close(fd)
        init.hold(lease)
        sandbox = Sandbox(init, cgroup, layers)
        try:
            await init.wait_ready()
        except BaseException:
            await sandbox.destroy()
            raise
        return sandbox

    def _lease_and_cgroup(self, lower: tuple[str, ...], name: str,
                          ) -> tuple[Lease, JobCgroup, list[int]]:
        """A lease on the layers, a new cgroup and its ``cgroup.procs`` files opened (for
        init to join): all or nothing. Blocking; runs on a worker thread."""
        lease = self.store.lease(lower)
        try:
            cgroup = self.cgroups.create(name)
        except BaseException:
            lease.close()
            raise
        try:
            procs = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup.procs_files()]
        except OSError as e:
            cgroup.remove()
            lease.close()
            raise SandboxError(f"cannot open the job's cgroup: {e.strerror}") from None
        return lease, cgroup, procs

    # -- jobs ---------------------------------------------------------------------------

    async def run(self, spec: JobSpec, on_output: job.OutputCallback | None = None, *,
                  control: JobControl | None = None, owner: str = "",
                  progress: ProgressCallback | None = None, image: Image | None = None,
                  writable_root: bool = False, upper_dir: str = "",
                  workdir: str | None = None, host_network: bool = False,
                  resolv_conf: bool = False, ids: tuple[int, int] | None = None) -> Result:
        """Run one job to completion. Bad input raises `SandboxError`; a sandbox that fails
        comes back as a `Result` with status ``internal_error``. ``control`` cancels the job
        or streams its stdin; ``image`` (instead of ``spec.image``), ``writable_root``,
        ``upper_dir``, ``workdir``, ``host_network`` (no network namespace; ``resolv_conf``
        binds the host's) and ``ids`` (the job's uid and gid instead of the profile's: a
        recipe's USER) serve image builds."""
        t0 = time.monotonic()
        profile = load_profile(spec.profile)
        limits = spec.limits.over(profile.limits)
        if image is None:
            image = await self.image(spec.image, progress)
        if upper_dir:  # a build's RUN step: the recipe's own WORKDIR and USER, no extras
            job = program.Program(spec.argv, spec.files, workdir or profile.workdir,
                                  *(ids or (profile.uid, profile.gid)))
            user = ""
            shape = self.shape(image, profile, limits, writable_root=writable_root,
                               upper_dir=upper_dir, workdir=job.workdir,
                               host_network=host_network, resolv_conf=resolv_conf,
                               ids=(job.uid, job.gid))
        else:
            job = program.resolve(spec, image, profile)
            user, shape = self.job_shape(image, profile, limits, job, read_only=spec.read_only,
                                         host_network=host_network, resolv_conf=resolv_conf)
        bpf = seccomp.compile_bpf(profile.seccomp)
        idmap = self.idmap_for(upper_dir)
        env = plan.job_env(path=profile.path_env, home=job.workdir, lang=profile.lang,
                           image_env=image.env, extra=spec.env, user=user)
        plan.check_exec_size(job.argv, env, profile.rlimits.get("stack", (8 << 20, 0))[0])
        launch = plan.Launch(argv=job.argv, env=env, files=[(f.name, f.mode) for f in job.files],
                             workdir=job.workdir, uid=job.uid, gid=job.gid,
                             rlimits=profile.rlimits, bpf=bpf)
        argv = job.argv
        control = control or JobControl()
        info = JobInfo(id=f"{os.getpid()}-{next(self._ids):x}", image=image.ref,
                       command=" ".join(argv)[:200], submitted=t0, owner=owner)
        self.queued[info.id] = info
        self._controls[info.id] = control
        try:
            async with self.admission.slot(owner):
                del self.queued[info.id]
                info.started = time.monotonic()
                self.running[info.id] = info
                if control.cancelled:
                    return Result(status=Status.SIGNALED, signal=9, message="cancelled")
                result = await self._run_in_sandbox(shape, limits, launch, idmap, job.files,
                                                     spec.stdin, t0, on_output, control)
                return self._not_found_hint(result, image, job.argv[0])
        finally:
            self.queued.pop(info.id, None)
            self.running.pop(info.id, None)
            self._controls.pop(info.id, None)

    def kill(self, job_id: str) -> None:
        """Kill the queued or running job ``job_id`` (the id `running`/`queued` show); its
        result says ``cancelled``. `SpecError` when there is no such job."""
        control = self._controls.get(job_id)
        if control is None:
            raise SpecError(f"no job {job_id!r} (see `sandbox ps`)")
        control.cancel()

    async def _run_in_sandbox(self, shape: plan.SandboxShape, limits: Limits,
                              launch: plan.Launch, idmap: plan.IdMapping,
                              files: tuple[File, ...], stdin: bytes | None, t0: float,
                              on_output: job.OutputCallback | None,
                              control: JobControl) -> Result:
        sandbox: Sandbox | None = None
        try:
            try:
                sandbox = await self.pool.take(shape)
                sandbox.cgroup.set_limits(memory=int(limits.memory or 0),
                                          pids=int(limits.pids or 1) + 1)
            except SandboxError as e:
                return Result(status=Status.INTERNAL_ERROR, message=str(e),
                              setup_time=time.monotonic() - t0)
            return await job.run(sandbox.init, sandbox.cgroup, limits, plan.go(launch, idmap),
                                 plan.launch_ops(launch, idmap), [f.data for f in files],
                                 stdin, on_output, t0, control)
        finally:
            if sandbox is not None:
                if self.pool.background is not None:  # the daemon: answer first
                    self.pool.background.start_soon(sandbox.destroy)
                    self.pool.warm(shape)  # then refill, off this job's path
                else:
                    await sandbox.destroy()
