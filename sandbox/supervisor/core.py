"""The supervisor: turns a `JobSpec` into a `Result`.

It owns the spawner, the cgroup manager, the image store, the warm pool and admission
control. The daemon serves it over a socket; the CLI embeds it when no daemon runs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable
from types import TracebackType

import trio

from .. import cgroups, config, seccomp
from ..errors import SandboxError, SpecError
from ..images.store import Image, Store
from ..jail import plan
from ..profiles import Profile, load_profile
from ..spec import JobSpec, Limits, Result, Status
from . import job
from .pool import Pool
from .spawner import InitHandle, Spawner

ProgressCallback = Callable[[str], None]


class Supervisor:
    """Runs jobs. Use as ``async with Supervisor() as sup: result = await sup.run(spec)``."""

    def __init__(self, store: Store | None = None, *, pool_size: int = 0,
                 max_running: int | None = None,
                 on_progress: ProgressCallback | None = None) -> None:
        self.store = store or Store()
        self.spawner = Spawner()
        self.max_running = max_running or os.cpu_count() or 1
        self.admission = trio.Semaphore(self.max_running)
        self.pool = Pool(self, pool_size)
        self.on_progress = on_progress
        self._ids = itertools.count(1)
        self._cgroups: cgroups.Manager | None = None
        self._idmap: plan.IdMapping | None = None
        self._mount_point = ""
        self._build_locks: dict[str, trio.Lock] = {}
        self.running: dict[str, JobSpec] = {}

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
        self.spawner.start()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.pool.drain()
        self.spawner.close()

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

    async def image(self, ref: str) -> Image:
        """Resolve ``ref`` in the store; build it from the shipped recipe of that name on
        first use (like `docker run` pulls). Shipped recipes are part of the tool: their
        RUN steps may use the network (to install packages)."""
        image = self.store.find(ref)
        if image is None:
            from ..images import build  # noqa: PLC0415
            from ..images.store import normalize_ref  # noqa: PLC0415

            recipe = build.shipped_recipe(ref)
            if recipe is None:
                raise SpecError(f"image {ref!r} not found (see `sandbox images`)")
            lock = self._build_locks.setdefault(normalize_ref(ref), trio.Lock())
            if lock.statistics().owner is trio.lowlevel.current_task():
                raise SpecError(f"image {ref!r}: its recipe builds FROM itself")
            async with lock:
                image = self.store.find(ref)
                if image is None:
                    image = await build.build(self, recipe, ref, progress=self.on_progress,
                                              network="host")
        await trio.to_thread.run_sync(self.store.ensure_unpacked, image)
        return image

    # -- sandboxes ----------------------------------------------------------------------

    def shape(self, image: Image, profile: Profile, limits: Limits, *,
              writable_root: bool = False, upper_dir: str = "",
              workdir: str | None = None, host_network: bool = False,
              resolv_conf: bool = False, ids: tuple[int, int] | None = None,
              ) -> plan.SandboxShape:
        workdir = workdir or profile.workdir
        uid, gid = ids or (profile.uid, profile.gid)
        return plan.SandboxShape(
            lower=tuple(image.lower_dirs()), disk=int(limits.disk or 0), workdir=workdir,
            uid=uid, gid=gid, hostname=profile.hostname,
            mount_point=self._mount_point, writable_root=writable_root, upper_dir=upper_dir,
            host_network=host_network, resolv_conf=resolv_conf)

    async def new_sandbox(self, shape: plan.SandboxShape) -> InitHandle:
        """Clone an init that builds a sandbox of ``shape``, and wait until it is ready.
        The sandbox holds a lease on its layers until it is closed (prune skips them)."""
        idmap = self.idmap_for(shape.upper_dir)
        lease = await trio.to_thread.run_sync(self.store.lease, shape.lower)
        try:
            init = await self.spawner.spawn(plan.prepare(shape, idmap),
                                            plan.clone_flags(shape), idmap.spawner_args())
        except BaseException:
            lease.close()
            raise
        init.hold(lease)
        try:
            await init.wait_ready()
        except BaseException:
            await init.discard()
            raise
        return init

    # -- jobs ---------------------------------------------------------------------------

    async def run(self, spec: JobSpec, on_output: job.OutputCallback | None = None, *,
                  image: Image | None = None, writable_root: bool = False,
                  upper_dir: str = "", workdir: str | None = None, host_network: bool = False,
                  resolv_conf: bool = False, ids: tuple[int, int] | None = None) -> Result:
        """Run one job to completion. Bad input raises `SandboxError`; a sandbox that fails
        comes back as a `Result` with status ``internal_error``. ``image`` (instead of
        ``spec.image``), ``writable_root``, ``upper_dir``, ``workdir``, ``host_network``
        (no network namespace; ``resolv_conf`` binds the host's), and ``ids`` (the job's
        uid and gid instead of the profile's: a recipe's USER) serve builds."""
        t0 = time.monotonic()
        profile = load_profile(spec.profile)
        limits = spec.limits.over(profile.limits)
        if image is None:
            image = await self.image(spec.image)
        argv = list(spec.argv)
        if spec.entrypoint:
            if image.entrypoint:
                argv = image.entrypoint + argv
            elif argv and "/" not in argv[0]:
                argv[0] = f"./{argv[0]}"  # a copied-in program runs from the work dir
        if not argv:
            argv = image.entrypoint + image.cmd
        if not argv:
            raise SpecError(f"nothing to run: image {image.ref} has no entry point or command")
        bpf = seccomp.compile_bpf(profile.seccomp)
        idmap = self.idmap_for(upper_dir)
        workdir = workdir or profile.workdir
        uid, gid = ids or (profile.uid, profile.gid)
        env = plan.job_env(path=profile.path_env, home=workdir, lang=profile.lang,
                           image_env=image.env, extra=spec.env)
        launch = plan.Launch(argv=tuple(argv), env=env,
                             files=[(f.name, f.mode) for f in spec.files],
                             workdir=workdir, uid=uid, gid=gid,
                             rlimits=profile.rlimits, bpf=bpf)
        shape = self.shape(image, profile, limits, writable_root=writable_root,
                           upper_dir=upper_dir, workdir=workdir, host_network=host_network,
                           resolv_conf=resolv_conf, ids=ids)
        job_id = f"{os.getpid()}-{next(self._ids):x}"
        async with self.admission:
            self.running[job_id] = spec
            try:
                return await self._run_in_sandbox(job_id, shape, limits, launch, idmap, spec, t0,
                                                   on_output)
            finally:
                del self.running[job_id]

    async def _run_in_sandbox(self, job_id: str, shape: plan.SandboxShape, limits: Limits,
                              launch: plan.Launch, idmap: plan.IdMapping, spec: JobSpec,
                              t0: float, on_output: job.OutputCallback | None) -> Result:
        init: InitHandle | None = None
        cgroup: cgroups.JobCgroup | None = None
        try:
            try:
                init = await self.pool.take(shape)
                cgroup = self.cgroups.create(job_id)
                cgroup.set_limits(memory=int(limits.memory or 0), pids=int(limits.pids or 1) + 1)
                cgroup.add(init.pid)
            except SandboxError as e:
                return Result(status=Status.INTERNAL_ERROR, message=str(e),
                              setup_time=time.monotonic() - t0)
            return await job.run(init, cgroup, limits, plan.go(launch, idmap),
                                 plan.launch_ops(launch, idmap), [f.data for f in spec.files],
                                 spec.stdin, on_output, t0)
        finally:
            with trio.CancelScope(shield=True):
                if init is not None:
                    init.kill()
                    await init.wait_dead()
                    init.close()
                if cgroup is not None:
                    with contextlib.suppress(SandboxError):
                        cgroup.remove()
