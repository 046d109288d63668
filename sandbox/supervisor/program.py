"""What a job runs, and as whom and where: the image's config (WORKDIR, USER, ENV,
ENTRYPOINT, CMD and the ``sandbox.script-runner`` label) under the spec's overrides, and
one rule for PROGRAM. Host-side and pure but for reading the image's unpacked layers.

The PROGRAM rule (the CLI marks how PROGRAM was given; see `JobSpec`):

* an absolute path that exists in the image (resolved inside the image's root, following
  the image's own symlinks there, never the host's) is the image's program, even when the
  caller's machine has a file of that name too (the copy the CLI sent is dropped);
* an absolute path that is not in the image but was a file on the caller's machine, or a
  relative path that names one, was copied in: it runs as a script (below);
* anything else is a command looked up in the image's PATH (127 when absent); an absolute
  path in neither place is refused (125), naming both.

A copied-in script that is an ELF binary or starts with ``#!`` runs directly (``./NAME``);
any other runs through the image's script runner: the label ``sandbox.script-runner`` (a
JSON array, the argv to put before the script), else the ENTRYPOINT, else ``./NAME``.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from ..errors import SpecError
from ..images import layers, users
from ..images.store import Image
from ..profiles import Profile
from ..spec import File, JobSpec

SCRIPT_RUNNER_LABEL = "sandbox.script-runner"


@dataclass(frozen=True, slots=True)
class Program:
    argv: tuple[str, ...]
    files: tuple[File, ...]
    workdir: str
    uid: int
    gid: int


def resolve(spec: JobSpec, image: Image, profile: Profile) -> Program:
    lower = image.lower_dirs()
    files = spec.files
    argv = list(spec.argv)
    if spec.host_path.startswith("/"):
        if in_image(lower, spec.host_path):
            # the image's program: drop the copy of the caller's file of that name
            name = posixpath.basename(spec.host_path)
            files = tuple(f for f in files if not (spec.entrypoint and f.name == name))
            argv[0] = spec.host_path
        elif not spec.entrypoint:
            raise SpecError(f"{spec.host_path}: no such file in the image {image.ref}, nor "
                            "on this machine")
        else:
            argv = _script(argv, files, image)
    elif spec.entrypoint:
        argv = _script(argv, files, image)
    if not argv:
        argv = image.entrypoint + image.cmd
    if not argv:
        raise SpecError(f"nothing to run: image {image.ref} has no entry point or command")
    workdir = spec.workdir or image.workdir
    if workdir in ("", "/"):
        workdir = profile.workdir
    uid, gid = user_ids(spec.user or str(image.runtime.get("User") or ""), lower, image.ref,
                        (profile.uid, profile.gid))
    return Program(tuple(argv), files, workdir, uid, gid)


def _script(argv: list[str], files: tuple[File, ...], image: Image) -> list[str]:
    name = posixpath.basename(argv[0]) if argv else ""
    script = next((f for f in files if f.name == name), None)
    if script is None:
        raise SpecError(f"{argv[0] if argv else 'PROGRAM'}: not among the job's files")
    direct = [f"./{name}", *argv[1:]]
    if script.data.startswith((b"\x7fELF", b"#!")):
        return direct
    runner = script_runner(image)
    if runner is not None:
        return [*runner, name, *argv[1:]]
    if image.entrypoint:
        return [*image.entrypoint, name, *argv[1:]]
    return direct


def script_runner(image: Image) -> list[str] | None:
    """The image's ``sandbox.script-runner`` label as an argv prefix (None without one)."""
    labels = image.runtime.get("Labels") or {}
    raw = labels.get(SCRIPT_RUNNER_LABEL) if isinstance(labels, dict) else None
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        value = None
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise SpecError(f"image {image.ref}: label {SCRIPT_RUNNER_LABEL} must be a JSON array "
                        f"of strings, not {raw!r}")
    return value


def in_image(lower: list[str], path: str) -> bool:
    """Whether ``path`` names something other than a directory in the image, resolving
    the image's symlinks inside the image (``/bin`` -> ``usr/bin``...)."""
    found = layers.resolve_in_image(lower, path)
    return found is not None and not found[1]


def user_ids(user: str, lower: list[str], ref: str, default: tuple[int, int],
             ) -> tuple[int, int]:
    """USER as ids in the image (`images.users.lookup`). root and 0 give ``default``: a
    job never runs as root, not even inside its user namespace (as root, uid 0 inside is
    the host's)."""
    if not user:
        return default
    try:
        uid, gid = users.lookup(lower, user)
    except users.NoSuchUser as e:
        raise SpecError(f"user {user!r}: {e} (image {ref})") from None
    if uid == 0:
        return default
    if not (0 < uid < 65536 and 0 <= gid < 65536):
        raise SpecError(f"user {user!r}: ids must be below 65536 (the sandbox maps 65536)")
    return uid, gid
