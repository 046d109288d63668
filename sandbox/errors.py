"""The exception tree. Every error carries a one-line message meant for the user.

```
SandboxError                 (CLI exit 125)
├── SpecError                bad user input: sizes, options, unknown profile, missing file
├── ProfileError             a profile file that does not parse or validate
├── ImageError               unknown image, broken store, failed build
│   ├── UnsafeLayerError     a layer tar that tries to write outside its target
│   └── RegistryError        a registry refused, failed or sent something we refuse
├── CgroupError              no usable cgroup subtree, or a limit that cannot be enforced
├── SetupError               the child failed while building the sandbox (step, errno)
├── ProtocolError            a peer broke the wire protocol
└── DaemonError              the daemon is unreachable or answered with an error
```
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every error the tool reports; ``str(err)`` is a one-line message."""

    def __str__(self) -> str:
        text = super().__str__()
        return " ".join(text.split()) or type(self).__name__


class SpecError(SandboxError):
    """The request itself is wrong (a malformed size, an unknown option value...)."""


class ProfileError(SandboxError):
    """A profile is missing, does not parse, or asks for something invalid."""


class ImageError(SandboxError):
    """An image is unknown, or the store or a build failed."""


class UnsafeLayerError(ImageError):
    """A layer archive tried to write outside its target or contained forbidden entries."""


class RegistryError(ImageError):
    """A registry could not be reached, refused a request, or sent something we refuse."""


class CgroupError(SandboxError):
    """No usable cgroup subtree, or a limit that cannot be enforced here. ``fix`` is what
    to do about it on this host (`sandbox doctor` prints it on a line of its own)."""

    def __init__(self, detail: str, *, fix: str = "", errno: int = 0) -> None:
        self.detail = detail
        self.fix = fix
        self.errno = errno
        super().__init__(f"{detail} (fix: {fix})" if fix else detail)


class SetupError(SandboxError):
    """A step of the child-side set-up failed before the program could start."""

    def __init__(self, step: str, err: int, detail: str) -> None:
        self.step = step
        self.errno = err
        self.detail = detail
        super().__init__(f"sandbox set-up failed at {step}: {detail}")


class ProtocolError(SandboxError):
    """A peer sent something the protocol does not allow."""


class DaemonError(SandboxError):
    """The daemon could not be reached or reported an error."""
