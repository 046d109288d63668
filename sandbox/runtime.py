"""Where the per-user runtime state lives (the daemon socket, the sandboxes' mount point).
Only `os`: the CLI's fast path uses it."""

from __future__ import annotations

import os


def runtime_dir_path() -> str:
    """``$XDG_RUNTIME_DIR/sandbox``, else ``/tmp/sandbox-UID`` (not created here)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "sandbox")
    return f"/tmp/sandbox-{os.getuid()}"


def socket_path() -> str:
    """The daemon's socket: ``$SANDBOX_SOCKET``, else ``sandbox.sock`` in the runtime dir."""
    return os.environ.get("SANDBOX_SOCKET") or os.path.join(runtime_dir_path(), "sandbox.sock")
