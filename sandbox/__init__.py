"""sandbox: run untrusted code rootless, fast, with judge-grade results.

The public API is re-exported here lazily, so that importing the package (as the spawner
does) costs nothing::

    from sandbox import Client, JobSpec, Limits
    result = Client().run(JobSpec(image="py3", argv=["python3", "-c", "print(1)"],
                                  limits=Limits(time=1, memory="256M")))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "JobSpec": "spec", "Limits": "spec", "File": "spec", "Result": "spec", "Status": "spec",
    "SandboxError": "errors", "Client": "client", "AsyncClient": "client",
}

if TYPE_CHECKING:
    from .client import AsyncClient as AsyncClient
    from .client import Client as Client
    from .errors import SandboxError as SandboxError
    from .spec import File as File
    from .spec import JobSpec as JobSpec
    from .spec import Limits as Limits
    from .spec import Result as Result
    from .spec import Status as Status


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - lazy on purpose: the spawner imports this package

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = sorted(_EXPORTS)
