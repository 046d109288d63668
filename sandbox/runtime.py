"""Where the per-user runtime state lives (the daemon socket, the sandboxes' mount point).
Only `os`: the CLI's fast path uses it.

The place depends on the uid alone, never on whether ``$XDG_RUNTIME_DIR`` happens to be set:
a daemon started by systemd, a login shell, `sudo -u` and `runuser` all agree on it.
"""

from __future__ import annotations

import os


def runtime_dir_path() -> str:
    """``/run/sandbox`` for root; ``/run/user/UID/sandbox`` where systemd made
    ``/run/user/UID`` for the user; else ``/tmp/sandbox-UID`` (not created here)."""
    uid = os.getuid()
    if uid == 0:
        return "/run/sandbox" if os.access("/run", os.W_OK) else "/tmp/sandbox-0"
    base = f"/run/user/{uid}"
    try:
        st = os.stat(base)
    except OSError:
        return f"/tmp/sandbox-{uid}"
    return f"{base}/sandbox" if st.st_uid == uid else f"/tmp/sandbox-{uid}"


def default_socket_path() -> str:
    return os.path.join(runtime_dir_path(), "sandbox.sock")


def socket_path() -> str:
    """The daemon's socket: ``$SANDBOX_SOCKET``, else ``sandbox.sock`` in the runtime dir."""
    return os.environ.get("SANDBOX_SOCKET") or default_socket_path()
