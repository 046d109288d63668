"""How a result is shown: the ``--json`` object, the one-line summary and the CLI's exit
code, computed from a result in wire form (a plain dict, as `Result.to_dict` and the daemon
give it). Stdlib only and cheap to import: the CLI's fast path uses it."""

from __future__ import annotations

from .units import format_size

TYPE_CHECKING = False  # not from typing: the CLI's fast path does not import it
if TYPE_CHECKING:
    from typing import Any

LIMITS = ("time_limit", "memory_limit", "output_limit")


def cli_exit_code(result: dict[str, Any]) -> int:
    """The program's exit code; 128+N when it was killed by signal N (limits included); 125
    when the sandbox itself failed. A limit verdict is never 0 (a job that exited 0 just
    past its CPU limit gives 1)."""
    if result["status"] == "internal_error":
        return 125
    if result.get("signal") is not None:
        return 128 + int(result["signal"])
    code = result.get("exit_code")
    code = 125 if code is None else int(code)
    return 1 if code == 0 and result["status"] in LIMITS else code


def summary(result: dict[str, Any]) -> str:
    """One line for a person (printed when the status is not ``ok``): what the program
    could not do (``NAME: command not found``), else the verdict and the accounting."""
    if result["status"] == "nonzero_exit" and result.get("message"):
        return f"sandbox: {result['message']}"
    what = {
        "ok": "ok",
        "nonzero_exit": f"exited with code {result.get('exit_code')}",
        "signaled": f"killed by signal {result.get('signal')}",
        "time_limit": "time limit exceeded",
        "memory_limit": "memory limit exceeded",
        "output_limit": "output limit exceeded",
        "internal_error": f"internal error: {result.get('message', '')}",
    }[result["status"]]
    memory = int(result.get("memory") or 0)
    return (f"sandbox: {what} (cpu {float(result.get('cpu_time', 0)):.3f}s, wall "
            f"{float(result.get('wall_time', 0)):.3f}s, memory "
            f"{format_size(memory) if memory else 0})")


def json_view(result: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` object: output as text where it is UTF-8, else base64, as
    ``stdout_encoding``/``stderr_encoding`` (``utf-8`` or ``base64``) say; times rounded to
    the microsecond."""
    d = dict(result)
    for stream in ("stdout", "stderr"):
        value = d.get(stream, b"")
        encoding = "utf-8"
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                import base64  # noqa: PLC0415 - only for output that is not text

                value, encoding = base64.b64encode(value).decode("ascii"), "base64"
        d[stream] = value
        d[f"{stream}_encoding"] = encoding
    for key in ("cpu_time", "wall_time", "setup_time"):
        d[key] = round(float(d.get(key, 0.0)), 6)
    return d


def internal_error(message: str) -> dict[str, Any]:
    """The result shown for a job the sandbox refused or could not run."""
    return {"status": "internal_error", "exit_code": None, "signal": None, "cpu_time": 0.0,
            "wall_time": 0.0, "memory": 0, "stdout": "", "stderr": "", "message": message,
            "stdout_encoding": "utf-8", "stderr_encoding": "utf-8"}
