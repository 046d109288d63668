"""Clients of the supervisor: `run_job` for the CLI (embedded supervisor for now)."""

from __future__ import annotations

from collections.abc import Callable

from .errors import SandboxError
from .spec import JobSpec, Result

OutputSink = Callable[[str, bytes], None]


def run_job(spec: JobSpec, *, on_output: OutputSink | None = None,
            on_progress: Callable[[str], None] | None = None) -> Result:
    """Run ``spec`` to completion, streaming output to ``on_output`` as it arrives."""
    import trio  # noqa: PLC0415 - clients of a daemon never pay for trio

    from .supervisor.core import Supervisor  # noqa: PLC0415

    async def forward(stream: str, chunk: bytes) -> None:
        if on_output is not None:
            # In a thread: a reader that stalls (a full pipe) must not stop the event loop,
            # whose watchdogs enforce the job's time limits.
            await trio.to_thread.run_sync(on_output, stream, chunk)

    async def main() -> Result:
        async with Supervisor(on_progress=on_progress) as sup:
            return await sup.run(spec, forward if on_output else None)

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:  # trio nurseries wrap what a task raised
        if (error := _first_sandbox_error(group)) is not None:
            raise error from None
        raise


def _first_sandbox_error(group: BaseExceptionGroup[BaseException]) -> SandboxError | None:
    for exc in group.exceptions:
        if isinstance(exc, SandboxError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first_sandbox_error(exc)):
            return found
    return None
