"""The ``sandbox`` command.

Exit codes: ``exec`` returns the program's exit code, 128+N when it was killed by signal N
(limits included) and 125 when the sandbox itself failed or the command line was wrong.
Every other command returns 0 on success and 125 on error. Errors are one line on stderr,
never a traceback.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from . import cli_registry
from ._fastexec import drop_unwritable_stdout as _drop_unwritable_stdout
from .errors import SandboxError, SpecError

EXIT_SANDBOX = 125


def fail(message: str) -> NoReturn:
    click.echo(f"sandbox: error: {message}", err=True)
    _drop_unwritable_stdout()
    sys.exit(EXIT_SANDBOX)


class _Progress:
    """Build and pull output for a person: step lines printed, noisy lines in a spinner
    (rich) that is shown only while there is progress to show, and cleared for good before
    a job's first byte of output."""

    def __init__(self) -> None:
        from rich.console import Console  # noqa: PLC0415

        self.console = Console(stderr=True, highlight=False, emoji=False)
        self.status: Any = None
        self.output_started = False

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __call__(self, line: str) -> None:
        shown = ("Step ", " --->", "Successfully", "     ")
        if line.startswith(shown[:3]) or not self.console.is_terminal:
            if line.startswith(shown):
                self.console.print(line, markup=False, soft_wrap=True)
        elif not self.output_started:
            if self.status is None:
                self.status = self.console.status(line[:100])
                self.status.start()
            self.status.update(line[:100])

    def output(self, stream: str, chunk: bytes) -> None:
        """A job's output, passed through as it comes (the spinner gone first)."""
        if not self.output_started:
            self.output_started = True
            self.stop()
        out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        try:
            out.write(chunk)
            out.flush()
        except BrokenPipeError:  # `sandbox exec ... | head -1`: the reader is done
            raise OutputClosed(f"the job's {stream} was closed by its reader") from None
        except OSError as e:  # a full disk: the job is killed, we say why
            raise SandboxError(f"cannot write the job's {stream}: {e.strerror}") from None


class OutputClosed(SandboxError):
    """Our stdout or stderr has no reader any more: exit as a pipeline expects (SIGPIPE)."""


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from .units import parse_size  # noqa: PLC0415

    try:
        return parse_size(value)
    except SpecError as e:
        raise click.BadParameter(str(e)) from None


def _seconds(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    from .units import parse_seconds  # noqa: PLC0415

    try:
        return parse_seconds(value)
    except SpecError as e:
        raise click.BadParameter(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sandbox", prog_name="sandbox")
def cli() -> None:
    """Run untrusted code rootless: namespaces, seccomp, cgroups, overlayfs over images."""


# ---------------------------------------------------------------------------- exec


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--image", default="py3", show_default=True, help="Image to run in.")
@click.option("--profile", default="default", show_default=True,
              help="Policy from profiles/ (limits, seccomp, uid).")
@click.option("--time", "time_", callback=_seconds, metavar="SECONDS",
              help="CPU time of the whole job (all processes and threads).")
@click.option("--wall-time", callback=_seconds, metavar="SECONDS", help="Real time.")
@click.option("--memory", callback=_size, metavar="SIZE", help="Memory, swap included (K/M/G).")
@click.option("--pids", type=click.IntRange(1, 1 << 20), metavar="N",
              help="Processes and threads of the whole job.")
@click.option("--output", callback=_size, metavar="SIZE", help="stdout + stderr together.")
@click.option("--disk", callback=_size, metavar="SIZE",
              help="Everything the job may write (work dir, /tmp, /dev/shm).")
@click.option("--stdin", "stdin_path", metavar="FILE",
              help="The job's stdin: a copy of FILE (streamed when over 16 MiB), or '-': "
                   "this command's stdin, streamed as the job reads it.")
@click.option("-i", "--interactive", is_flag=True,
              help="Stream this command's stdin to the job (the same as --stdin -).")
@click.option("--env", "env_items", multiple=True, metavar="K=V", help="Set a variable.")
@click.option("--file", "extra_files", multiple=True, metavar="PATH",
              help="Also copy PATH into the work dir (repeatable).")
@click.option("-w", "--workdir", metavar="DIR",
              help="The work dir: the job's cwd, where files land (default: the image's "
                   "WORKDIR, else /work).")
@click.option("-u", "--user", metavar="USER[:GROUP]",
              help="Run as this user of the image (name or uid; default: the image's USER, "
                   "else uid 1000; never root).")
@click.option("--read-only", is_flag=True,
              help="A read-only root (the work dir, /tmp and /dev/shm stay writable).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON result object.")
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def exec_cmd(image: str, profile: str, time_: float | None, wall_time: float | None,
             memory: int | None, pids: int | None, output: int | None, disk: int | None,
             stdin_path: str | None, interactive: bool, env_items: tuple[str, ...],
             extra_files: tuple[str, ...],
             workdir: str | None, user: str | None, read_only: bool,
             as_json: bool, program: str, args: tuple[str, ...]) -> None:
    """Run PROGRAM in a fresh sandbox.

    PROGRAM is, in this order: an absolute path that exists in the image (the image's own
    program); a file on this machine (an absolute path the image lacks, a relative path,
    a name in the current directory), copied into the work dir and run as a script (an
    ELF binary or a #! script directly, any other file through the image's script runner:
    in py3, python3 PROGRAM ARGS...); otherwise a command looked up in the image.
    """
    from .hostfiles import job_program  # noqa: PLC0415
    from .spec import File, JobSpec, Limits, parse_env  # noqa: PLC0415

    try:
        given = job_program(program, list(args), list(extra_files))
    except SandboxError as e:
        fail(str(e))
    files = [File(**f) for f in given["files"]]
    if interactive and stdin_path not in (None, "-"):
        fail("-i streams this command's stdin: it does not go with --stdin FILE")
    stdin, stdin_fd = _job_stdin("-" if interactive else stdin_path)
    spec = JobSpec(image=image, argv=tuple(given["argv"]), files=tuple(files), stdin=stdin,
                   env=parse_env(env_items), profile=profile, entrypoint=given["entrypoint"],
                   host_path=given["host_path"], workdir=workdir, user=user,
                   read_only=read_only,
                   limits=Limits(time=time_, wall_time=wall_time, memory=memory, pids=pids,
                                 output=output, disk=disk))
    from .client import run_job  # noqa: PLC0415

    try:
        with _Progress() as progress:
            result = run_job(spec, on_output=None if as_json else progress.output,
                             on_progress=progress, stdin_fd=stdin_fd)
    except OutputClosed:
        _drop_unwritable_stdout()
        sys.exit(128 + 13)  # as if killed by SIGPIPE, quietly, as other tools in a pipe are
    except KeyboardInterrupt:  # (before click's own handler, which prints an empty line)
        _interrupted()
    except SandboxError as e:
        if as_json:  # scripts still get their one object
            from .verdict import internal_error  # noqa: PLC0415

            click.echo(json.dumps(internal_error(str(e))))
        fail(str(e))
    try:
        if as_json:
            click.echo(json.dumps(result.to_json()))
        elif result.status.value != "ok":
            click.echo(result.summary(), err=True)
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_unwritable_stdout()
        sys.exit(128 + 13)
    except OSError as e:
        fail(f"cannot write the result: {e.strerror}")
    sys.exit(result.cli_exit_code)


INLINE_STDIN = 16 << 20  # a --stdin FILE up to this size is copied; a larger one streams


def _job_stdin(path: str | None) -> tuple[bytes | None, int | None]:
    """The job's stdin: ``(a copy, None)``, or ``(None, a descriptor to stream from)``."""
    if path is None:
        return None, None
    if path == "-":
        return None, sys.stdin.fileno()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_size > INLINE_STDIN or not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, fd
        with os.fdopen(fd, "rb") as f:
            return f.read(), None
    except OSError as e:
        fail(f"--stdin {path}: {e.strerror}")


# ---------------------------------------------------------------------------- images


def _store() -> Any:
    from .images.store import Store  # noqa: PLC0415

    return Store()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


@cli.command("images")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object each.")
def images_cmd(as_json: bool) -> None:
    """List the images in the store with their sizes (SHARED: bytes in layers another image
    uses too; UNIQUE: what removing only this image and pruning would free)."""
    from .images import gc  # noqa: PLC0415

    rows = sorted(gc.usage(_store()), key=lambda u: u.image.ref)
    if as_json:
        click.echo(json.dumps([{"name": u.image.ref, "id": u.image.id, "size": u.size,
                                "shared": u.shared, "unique": u.unique,
                                "layers": len(u.image.layers), "created": u.image.created}
                               for u in rows]))
        return
    click.echo(f"{'NAME':28} {'ID':12} {'LAYERS':>6} {'SIZE':>9} {'SHARED':>9} {'UNIQUE':>9}"
               "  CREATED")
    for u in rows:
        click.echo(f"{u.image.ref:28} {u.image.id[7:19]:12} {len(u.image.layers):>6} "
                   f"{_human(u.size):>9} {_human(u.shared):>9} {_human(u.unique):>9}  "
                   f"{u.image.created}")


@cli.group("image")
def image_group() -> None:
    """Build, inspect and remove images."""


@image_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object each.")
@click.pass_context
def image_ls(ctx: click.Context, as_json: bool) -> None:
    """List images (same as `sandbox images`)."""
    ctx.invoke(images_cmd, as_json=as_json)


@image_group.command("build")
@click.argument("name")
@click.option("--no-cache", is_flag=True, help="Rebuild every step.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the new image as one JSON object (steps still go to stderr).")
def image_build(name: str, no_cache: bool, as_json: bool) -> None:
    """Build a shipped image (a recipe in images/NAME), e.g. `sandbox image build py3`."""
    from .images.build import shipped_recipe  # noqa: PLC0415

    recipe = shipped_recipe(name)
    if recipe is None:
        from . import config  # noqa: PLC0415

        shipped = sorted(p.name for p in config.recipes_dir().iterdir() if p.is_dir())
        fail(f"no shipped recipe {name!r} (shipped: {', '.join(shipped)}); use "
             "`sandbox build -t NAME DIR` for your own")
    _build(recipe, name, no_cache, network="host", as_json=as_json)  # (they install packages)


@cli.command("build")
@click.option("-t", "--tag", "tag", required=True, metavar="NAME[:TAG]",
              help="The new image's name (checked before the first step).")
@click.option("-f", "--file", "recipe_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Recipe file (default: DIR/Sandboxfile or DIR/Dockerfile).")
@click.option("--no-cache", is_flag=True, help="Rebuild every step.")
@click.option("--build-arg", "build_args", multiple=True, metavar="K=V",
              help="A value for the recipe's ARG K (repeatable).")
@click.option("--network", type=click.Choice(["none", "host"]), default="none",
              show_default=True, help="Network of RUN steps: none, or the host's.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the new image as one JSON object (steps still go to stderr).")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def build_cmd(tag: str, recipe_file: Path | None, no_cache: bool, build_args: tuple[str, ...],
              network: str, as_json: bool, directory: Path) -> None:
    """Build an image from DIR/Sandboxfile (a Dockerfile subset)."""
    from .spec import parse_env  # noqa: PLC0415

    _build(directory, tag, no_cache, recipe_file, parse_env(build_args), network, as_json)


def _build(directory: Path, tag: str, no_cache: bool, recipe_file: Path | None = None,
           build_args: dict[str, str] | None = None, network: str = "none",
           as_json: bool = False) -> None:
    import trio  # noqa: PLC0415

    from .images import build  # noqa: PLC0415
    from .supervisor.core import Supervisor  # noqa: PLC0415

    async def main(progress: Callable[[str], None]) -> Any:
        async with Supervisor(on_progress=progress) as sup:
            return await build.build(sup, directory, tag, progress=progress,
                                     no_cache=no_cache, recipe_file=recipe_file,
                                     build_args=build_args, network=network)

    with _Progress() as progress:
        image = trio.run(main, progress)
    if as_json:
        click.echo(json.dumps(_image_json(image)))


def _image_json(image: Any) -> dict[str, Any]:
    return {"name": image.ref, "id": image.id, "digest": image.manifest_digest,
            "layers": len(image.layers), "size": image.size}


@image_group.command("rm")
@click.argument("names", nargs=-1, required=True)
def image_rm(names: tuple[str, ...]) -> None:
    """Untag images (their layers go with `sandbox image prune`)."""
    store = _store()
    for name in names:
        click.echo(f"Untagged: {store.remove(name)}")


@image_group.command("tag")
@click.argument("source")
@click.argument("target")
def image_tag(source: str, target: str) -> None:
    """Give the image SOURCE the additional name TARGET (NAME[:TAG])."""
    image = _store().tag(source, target)
    click.echo(f"Tagged {image.id[7:19]} as {image.ref}")


def _usage_of(image: Any) -> Any:
    from .images import gc  # noqa: PLC0415

    return next(u for u in gc.usage(_store()) if u.image.ref == image.ref)


@image_group.command("inspect")
@click.argument("name")
def image_inspect(name: str) -> None:
    """Print an image's manifest digest, config, layers, history and sizes as JSON."""
    image = _store().resolve(name)
    use = _usage_of(image)
    click.echo(json.dumps({
        "name": image.ref, "id": image.id, "manifest": image.manifest_digest,
        "created": image.created, "size": use.size, "shared": use.shared, "unique": use.unique,
        "config": image.config,
        "layers": [{"digest": x.digest, "diff_id": x.diff_id, "size": x.size,
                    "mediaType": x.media_type} for x in image.layers],
        "history": [{"created": h.created, "created_by": h.created_by,
                     "layer": h.layer.digest if h.layer else None,
                     "size": h.layer.size if h.layer else 0} for h in image.history()],
    }, indent=2))


@image_group.command("history")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, newest first.")
@click.option("--no-trunc", is_flag=True, help="Do not shorten the instructions.")
def image_history(name: str, as_json: bool, no_trunc: bool) -> None:
    """Show how an image was made: one row per instruction, newest first, with the layer
    it added and that layer's size."""
    rows = list(reversed(_store().resolve(name).history()))
    if as_json:
        click.echo(json.dumps([{"created": h.created, "created_by": h.created_by,
                                "layer": h.layer.digest if h.layer else None,
                                "size": h.layer.size if h.layer else 0} for h in rows]))
        return
    click.echo(f"{'LAYER':12}  {'CREATED':20}  {'SIZE':>9}  CREATED BY")
    for h in rows:
        by = h.created_by if no_trunc or len(h.created_by) <= 70 else h.created_by[:67] + "..."
        layer = h.layer.digest[7:19] if h.layer else "-"
        click.echo(f"{layer:12}  {h.created:20}  {_human(h.layer.size if h.layer else 0):>9}"
                   f"  {by}")


@image_group.command("prune")
def image_prune() -> None:
    """Remove blobs, unpacked layers and build-cache entries no image uses. Layers that
    running sandboxes use stay (a later prune takes them)."""
    from .images import gc  # noqa: PLC0415

    report = gc.prune(_store(), on_wait=lambda msg: click.echo(msg, err=True))
    click.echo(f"Deleted {report.blobs} blobs ({_human(report.blob_bytes)}), "
               f"{report.layers} unpacked layers, {report.cache_entries} build-cache entries")
    if report.in_use:
        click.echo(f"Kept {len(report.in_use)} unused layers that running sandboxes use")


@image_group.command("save")
@click.argument("name")
@click.option("-o", "--output", "output", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Archive to write.")
@click.option("--format", "fmt", type=click.Choice(["oci", "docker"]), default="oci",
              show_default=True, help="oci: an OCI archive; docker: a docker-archive.")
def image_save(name: str, output: Path, fmt: str) -> None:
    """Write an image to an archive that podman, skopeo and docker can load."""
    from .images import archive  # noqa: PLC0415

    image = archive.save(_store(), name, output, fmt)
    click.echo(f"Saved {image.ref} to {output} ({fmt} archive)")


@image_group.command("load")
@click.option("-i", "--input", "input_", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Archive to read.")
@click.option("-t", "--tag", "tag", metavar="NAME[:TAG]",
              help="Name the image (for an archive that names none, or to rename it).")
def image_load(input_: Path, tag: str | None) -> None:
    """Load an OCI archive or a docker-archive (plain, gzip or zstd; any layer compression)."""
    from .images import archive  # noqa: PLC0415

    with _Progress() as progress:
        images = archive.load(_store(), input_, tag, progress)
    for image in images:
        click.echo(f"Loaded image: {image.ref}")


# ---------------------------------------------------------------------------- profiles


@cli.group("profile")
def profile_group() -> None:
    """See the policies jobs run under."""


@profile_group.command("list")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON array: name, description, path of each.")
def profile_list(as_json: bool) -> None:
    """List the profiles on the search path."""
    from .profiles import list_profiles, load_profile  # noqa: PLC0415

    rows = [(path.stem, load_profile(path.stem).description, str(path))
            for path in list_profiles()]
    if as_json:
        click.echo(json.dumps([{"name": n, "description": d, "path": p} for n, d, p in rows]))
        return
    click.echo(f"{'NAME':12} DESCRIPTION  (PATH)")
    for name, description, path in rows:
        click.echo(f"{name:12} {description}  ({path})")


@profile_group.command("show")
@click.argument("name")
@click.option("--bpf", is_flag=True, help="Also print the compiled seccomp filter (PFC).")
def profile_show(name: str, bpf: bool) -> None:
    """Print a profile (and its compiled seccomp filter)."""
    from .profiles import find_profile, load_profile  # noqa: PLC0415

    profile = load_profile(name)
    click.echo(find_profile(name).read_text(), nl=False)
    if bpf:
        from .seccomp import pfc  # noqa: PLC0415

        click.echo(pfc(profile.seccomp))


# ---------------------------------------------------------------------------- daemon


@cli.command("daemon")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="Unix socket (default: $SANDBOX_SOCKET, else /run/user/UID/sandbox/"
                   "sandbox.sock; /run/sandbox/sandbox.sock for root).")
@click.option("--pool", "pool_size", type=click.IntRange(0, 1024), default=4,
              show_default=True, help="Warm sandboxes kept ready per image and profile.")
@click.option("--warm", multiple=True, metavar="IMAGE[@PROFILE]",
              help="Fill the pool for this image at start (repeatable).")
@click.option("--max-running", type=click.IntRange(1, 100000),
              help="Jobs running at once (default: the number of CPUs); the rest queue.")
@click.option("--max-queued", type=click.IntRange(0, 1000000), default=4096,
              show_default=True, help="Jobs that may wait for a slot; more are refused.")
@click.option("--fair", is_flag=True,
              help="Queued jobs take turns between connections (default: arrival order).")
@click.option("--max-jobs-per-connection", type=click.IntRange(1, 1000000), default=1024,
              show_default=True, help="Jobs one connection may have queued or running.")
@click.option("--max-upload", callback=_size, default="1G", show_default=True,
              help="Largest total of one job's files sent in pieces (held in memory).")
@click.option("--max-message", callback=_size, default="64M", show_default=True,
              help="Largest protocol message accepted.")
@click.option("--idle-timeout", type=float, metavar="SECONDS",
              help="Exit after this long with no client and no job.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="The least important log line shown.")
def daemon_cmd(socket_path: Path | None, pool_size: int, warm: tuple[str, ...],
               max_running: int | None, max_queued: int, fair: bool,
               max_jobs_per_connection: int, max_upload: int, max_message: int,
               idle_timeout: float | None, log_level: str) -> None:
    """Serve the supervisor on a unix socket; `sandbox exec` and the Python API use it
    when it runs (SIGTERM stops it cleanly)."""
    from .server import DaemonConfig, run_daemon  # noqa: PLC0415

    cfg = DaemonConfig(pool_size=pool_size, max_queued=max_queued,
                       max_jobs_per_connection=max_jobs_per_connection,
                       max_message=max_message, max_upload=max_upload,
                       idle_timeout=idle_timeout, warm=warm, fair=fair)
    if socket_path is not None:
        cfg.socket_path = socket_path.absolute()
    if max_running is not None:
        cfg.max_running = max_running
    run_daemon(cfg, log_level)


@cli.command("ps")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: running, queued, limits, pool.")
def ps_cmd(as_json: bool) -> None:
    """Show the daemon's running and queued jobs, its limits and its warm pool."""
    from .client import Client  # noqa: PLC0415

    with Client(mode="daemon") as client:
        jobs = client.list_jobs()
    if as_json:
        click.echo(json.dumps(jobs))
        return
    limits, pool = jobs["limits"], jobs["pool"]
    order = "taking turns" if limits.get("fair") else "in arrival order"
    click.echo(f"running {len(jobs['running'])}/{limits['max_running']}, queued "
               f"{len(jobs['queued'])}/{limits['max_queued']} ({order}), warm sandboxes "
               f"{pool.get('idle', 0)} (hits {pool.get('warm_hits', 0)}, cold "
               f"{pool.get('cold_starts', 0)})")
    click.echo(f"{'ID':16} {'STATE':8} {'OWNER':5} {'IMAGE':24} {'TIME':>9}  COMMAND")
    for state in ("running", "queued"):
        for j in jobs[state]:
            click.echo(f"{j['id']:16} {state:8} {j['owner']:5} {j['image']:24} "
                       f"{j['running'] if state == 'running' else j['waiting']:>8.3f}s  "
                       f"{j['command']}")


@cli.command("kill")
@click.argument("jobs", nargs=-1, required=True, metavar="JOB...")
def kill_cmd(jobs: tuple[str, ...]) -> None:
    """Kill the daemon's jobs (the IDs `sandbox ps` shows): their results say cancelled."""
    from .client import Client  # noqa: PLC0415

    failed = False
    with Client(mode="daemon") as client:
        for job in jobs:
            try:
                client.kill(job)
            except SandboxError as e:
                click.echo(f"sandbox: error: {e}", err=True)
                failed = True
            else:
                click.echo(job)
    sys.exit(EXIT_SANDBOX if failed else 0)


# ---------------------------------------------------------------------------- host


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: ok, and each check's name, ok, detail and fix.")
def doctor_cmd(as_json: bool) -> None:
    """Check that this host can run sandboxes with limits; print each problem's fix."""
    from .doctor import checks_json, run_checks  # noqa: PLC0415

    if as_json:
        report = checks_json()
        click.echo(json.dumps(report))
        sys.exit(0 if report["ok"] else 1)
    sys.exit(run_checks(click.echo))


@cli.group("system")
def system_group() -> None:
    """Host set-up that needs root (once)."""


@system_group.command("setup")
@click.option("--user", "user", required=True, help="User who will run sandboxes.")
def system_setup(user: str) -> None:
    """Prepare a cgroup subtree that USER owns (the one step that needs root)."""
    from .system import setup_user  # noqa: PLC0415

    for line in setup_user(user):
        click.echo(line)


for _command in cli_registry.COMMANDS:  # pull, push, login, logout
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and exit code 125, never a traceback."""
    try:
        cli.main(args=argv, prog_name="sandbox", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:  # Ctrl-C elsewhere (click printed a newline already)
        _interrupted()
    except click.ClickException as e:
        click.echo(f"sandbox: error: {e.format_message()}", err=True)
        sys.exit(EXIT_SANDBOX)
    except SandboxError as e:
        fail(str(e))
    except OSError as e:  # an environment problem we did not foresee: still one line
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        fail(f"{e.strerror or e}{where}")
    except KeyboardInterrupt:
        _interrupted()
    except BrokenPipeError:
        sys.exit(EXIT_SANDBOX)
    except BaseExceptionGroup as group:  # what trio's nurseries wrapped (a build's, a pull's)
        from .client import _unwrap  # noqa: PLC0415

        error = _unwrap(group)
        if isinstance(error, KeyboardInterrupt):
            _interrupted()
        if isinstance(error, SandboxError):
            fail(str(error))
        raise
    sys.exit(0)


def _interrupted() -> NoReturn:
    """Ctrl-C: the job (killed with its supervisor, or by the daemon when we hang up) and
    everything it had are gone; one line, and 130 as a shell reports it."""
    click.echo("sandbox: interrupted", err=True)
    _drop_unwritable_stdout()
    sys.exit(130)


if __name__ == "__main__":
    main()
