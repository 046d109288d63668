"""What the caller's machine gives a job: PROGRAM (when it names a file here) and the
``--file`` files. Stdlib only: the CLI's fast path uses it too.

The rule's host half (the image half is `sandbox.supervisor.program`): an absolute PROGRAM
is sent along when it is a file here, with ``host_path`` saying so, and the image's own file
of that path wins; a relative PROGRAM that names a file here (``./x``, ``dir/x``, or a bare
``x`` in the current directory) is copied in and run as a script; ``./x`` may also name a
``--file``; a relative path with a ``/`` that names nothing is an error; a bare name that is
not a file here is a command looked up in the image.
"""

from __future__ import annotations

import os

from .errors import SpecError

TYPE_CHECKING = False  # not from typing: the CLI's fast path does not import it
if TYPE_CHECKING:
    from typing import Any


def job_program(program: str, args: list[str], extra: list[str]) -> dict[str, Any]:
    """``{"argv", "files", "entrypoint", "host_path"}`` of a JobSpec in wire form (files as
    ``{"name", "data", "mode"}``). Raises `SpecError` for a missing or unreadable file."""
    files: list[dict[str, Any]] = []
    sources: dict[str, str] = {}  # name -> real path of the file sent under it

    def add(path: str, what: str) -> str:
        name = os.path.basename(path)
        real = os.path.realpath(path)
        if name in sources:
            if sources[name] == real:
                return name  # `--file x` and PROGRAM ./x: one file
            raise SpecError(f"{what}: another file named {name!r} is copied in already")
        try:
            with open(path, "rb") as f:
                data = f.read()
            executable = os.access(path, os.X_OK)
        except OSError as e:
            raise SpecError(f"{what}: {e.strerror}") from None
        sources[name] = real
        files.append({"name": name, "data": data, "mode": 0o755 if executable else 0o644})
        return name

    argv = [program, *args]
    entrypoint = False
    host_path = ""
    extra_names = {os.path.basename(p) for p in extra}
    if program.startswith("/"):
        host_path = program
        if os.path.isfile(program):
            add(program, program)
            entrypoint = True
    elif os.path.isfile(program):
        argv[0] = add(program, program)
        entrypoint = True
    elif "/" in program:
        head, name = os.path.split(program)
        if head not in (".", "") or name not in extra_names:
            raise SpecError(f"{program}: no such file on this machine")
        argv[0] = name  # ./x names the --file x
        entrypoint = True
    for path in extra:
        if not os.path.isfile(path):
            raise SpecError(f"--file {path}: no such file")
        add(path, f"--file {path}")
    if entrypoint and not host_path:
        # the script first: it is what argv[0] names
        files.sort(key=lambda f: f["name"] != argv[0])
    return {"argv": argv, "files": files, "entrypoint": entrypoint, "host_path": host_path}
