"""The registry commands of the ``sandbox`` CLI: ``pull``, ``push``, ``login``, ``logout``.

Progress (rich bars on a terminal, one line per blob otherwise) goes to stderr; stdout gets
what scripts want: after a pull the digest and the full name, after a push the digest.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import click

from .errors import SpecError


class TransferView:
    """`TransferProgress` for a person: a bar per blob on a terminal, else status lines."""

    def __init__(self) -> None:
        from rich.console import Console  # noqa: PLC0415

        self.console = Console(stderr=True, highlight=False)
        self.bars: Any = None
        self.tasks: dict[str, Any] = {}
        self.lock = threading.Lock()
        if self.console.is_terminal:
            from rich.progress import (  # noqa: PLC0415
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(),
                                 TextColumn("{task.fields[status]}"), console=self.console)

    def __enter__(self) -> TransferView:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def _task(self, digest: str, size: int, status: str) -> Any:
        from .images.registry import short  # noqa: PLC0415

        with self.lock:
            if digest not in self.tasks:
                self.tasks[digest] = self.bars.add_task(short(digest), total=size,
                                                        status=status)
            return self.tasks[digest]

    def start(self, digest: str, size: int, action: str) -> None:
        if self.bars is not None:
            self.bars.update(self._task(digest, size, action), status=action)

    def advance(self, digest: str, n: int) -> None:
        if self.bars is not None and digest in self.tasks:
            self.bars.update(self.tasks[digest], advance=n)

    def finish(self, digest: str, status: str) -> None:
        from .images.registry import short  # noqa: PLC0415

        if self.bars is None:
            self.console.print(f"{short(digest)}: {status}", markup=False)
            return
        task = self._task(digest, 0, status)
        total = self.bars.tasks[task].total if task < len(self.bars.tasks) else None
        self.bars.update(task, completed=total, status=status)

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)


_insecure = click.option("--insecure", is_flag=True,
                         help="Skip TLS verification and allow plain HTTP (implied for "
                              "registries on loopback).")


@click.command("pull")
@_insecure
@click.option("-q", "--quiet", is_flag=True, help="Print only the image's full name.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: name, digest, id, downloaded.")
@click.argument("ref")
def pull_cmd(ref: str, insecure: bool, quiet: bool, as_json: bool) -> None:
    """Pull REF (name[:tag], name@sha256:..., host[:port]/path[:tag]) from its registry."""
    from .images import reference  # noqa: PLC0415
    from .images.pull import pull  # noqa: PLC0415
    from .images.store import Store  # noqa: PLC0415

    store = Store()
    name = reference.parse(ref).store_name
    before = store.find(name)
    with TransferView() as view:
        if not quiet:
            view.message(f"Pulling {name}")
        result = pull(ref, store=store, insecure=insecure, progress=view)
    fresh = before is None or before.manifest_digest != result.image.manifest_digest
    if as_json:
        click.echo(json.dumps({"name": result.name, "digest": result.digest,
                               "id": result.image.id, "downloaded": fresh}))
        return
    if not quiet:
        click.echo(f"Digest: {result.digest}")
        click.echo(f"Status: {'Downloaded newer image' if fresh else 'Image is up to date'} "
                   f"for {result.name}")
    click.echo(result.name)


@click.command("push")
@_insecure
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: ref, digest, uploaded, mounted, present.")
@click.argument("name")
@click.argument("ref", required=False)
def push_cmd(name: str, ref: str | None, insecure: bool, as_json: bool) -> None:
    """Push the image NAME to REF (default: NAME, which must then name a registry)."""
    from .images.push import push  # noqa: PLC0415

    with TransferView() as view:
        result = push(name, ref, insecure=insecure, progress=view)
        view.message(f"Pushed {result.ref}: {result.uploaded} uploaded, {result.mounted} "
                     f"mounted, {result.present} already there")
    if as_json:
        click.echo(json.dumps({"ref": str(result.ref), "digest": result.digest,
                               "uploaded": result.uploaded, "mounted": result.mounted,
                               "present": result.present}))
        return
    click.echo(result.digest)


@click.command("login")
@_insecure
@click.option("-u", "--username", help="User name (prompted for on a terminal).")
@click.option("-p", "--password", help="Password (visible in the process list: prefer "
              "--password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.argument("registry", required=False, default="docker.io")
def login_cmd(registry: str, username: str | None, password: str | None,
              password_stdin: bool, insecure: bool) -> None:
    """Check credentials against REGISTRY (default docker.io) and store them."""
    from .images import auth, reference, registry_config  # noqa: PLC0415
    from .images.registry import Client  # noqa: PLC0415

    host = reference.parse_registry(registry)
    if password_stdin:
        if password is not None:
            raise SpecError("--password and --password-stdin exclude each other")
        password = sys.stdin.readline().rstrip("\r\n")
    if username is None:
        if not sys.stdin.isatty():
            raise SpecError("no --username given (and no terminal to ask on)")
        username = click.prompt("Username")
    if password is None:
        if not sys.stdin.isatty():
            raise SpecError("no password given: use --password-stdin")
        password = click.prompt("Password", hide_input=True)
    if not username or not password:
        raise SpecError("empty user name or password")
    cfg = registry_config.load()
    creds = auth.Credentials(username, password, "the command line")
    with Client(cfg.endpoint(host, insecure=insecure), cfg, [], credentials=creds) as client:
        client.ping()
        client.send("GET", "/v2/", what=f"login to {host}")
    path = auth.save_credentials(host, username, password)
    click.echo(f"Login Succeeded (credentials stored in {path})")


@click.command("logout")
@click.argument("registry", required=False, default="docker.io")
def logout_cmd(registry: str) -> None:
    """Forget the stored credentials for REGISTRY (default docker.io)."""
    from .images import auth, reference  # noqa: PLC0415

    host = reference.parse_registry(registry)
    if auth.remove_credentials(host):
        click.echo(f"Removed login credentials for {host}")
    else:
        click.echo(f"Not logged in to {host}")


COMMANDS = (pull_cmd, push_cmd, login_cmd, logout_cmd)
