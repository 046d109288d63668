"""Where things live: the image store, the runtime dir, the shipped profiles and recipes."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    """``profiles/`` and ``images/`` sit next to the package in a checkout (editable install)
    and inside it (``sandbox/_data``) in a wheel."""
    beside = PACKAGE_DIR.parent / name
    return beside if beside.is_dir() else PACKAGE_DIR / "_data" / name


def spawner_python() -> str:
    """The interpreter that creates namespaces: ``python-sandbox`` beside ours when the
    installer made one (Ubuntu's AppArmor allows user namespaces to that copy only), else
    ours."""
    import sys  # noqa: PLC0415

    candidate = Path(sys.executable).parent / "python-sandbox"
    return str(candidate) if os.access(candidate, os.X_OK) else sys.executable


def sandbox_home() -> Path:
    """The image store: ``$SANDBOX_HOME``, else ``$XDG_DATA_HOME/sandbox``, else
    ``~/.local/share/sandbox``."""
    if env := os.environ.get("SANDBOX_HOME"):
        return Path(env).absolute()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "sandbox"


def runtime_dir() -> Path:
    """Per-user runtime state (the daemon socket, the sandboxes' mount point):
    ``$XDG_RUNTIME_DIR/sandbox``, else ``/tmp/sandbox-UID``. Created 0700 and checked to be
    ours, since other users may share /tmp."""
    from .runtime import runtime_dir_path  # noqa: PLC0415

    path = Path(runtime_dir_path())
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if st.st_uid != os.getuid() or not path.is_dir() or path.is_symlink():
        from .errors import SandboxError  # noqa: PLC0415

        raise SandboxError(f"runtime directory {path} is not a directory owned by you")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sandbox"


def profile_dirs() -> list[Path]:
    """Profile search path: the user's own first, then the shipped ones."""
    return [config_dir() / "profiles", _shipped("profiles")]


def recipes_dir() -> Path:
    return _shipped("images")


DEFAULT_MAX_LAYER_SIZE = 16 << 30


def max_layer_bytes() -> int:
    """The bound on what one layer (or one image archive member) may unpack to:
    ``$SANDBOX_MAX_LAYER_SIZE`` (``512M``, ``20G``...), default 16 GiB."""
    value = os.environ.get("SANDBOX_MAX_LAYER_SIZE")
    if not value:
        return DEFAULT_MAX_LAYER_SIZE
    from .units import parse_size  # noqa: PLC0415

    return parse_size(value)
