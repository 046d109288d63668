"""A profile's seccomp policy -> a BPF program, compiled with libseccomp (pyseccomp).

Compiled once per profile in the supervisor; the job process only loads the bytes (see
`linux.load_seccomp`), as its very last step before execve. Only the native ABI is allowed:
calls through another ABI (i386 ``int 0x80``; x32 numbers on x86_64) kill the process.
"""

from __future__ import annotations

import errno as errno_mod
import os
import tempfile

import pyseccomp as sc

from .errors import ProfileError
from .profiles import SeccompPolicy

_cache: dict[SeccompPolicy, bytes] = {}


def _resolve(name: str) -> None:
    if sc.resolve_syscall(sc.Arch.NATIVE, name) == -1:
        raise ProfileError(f"seccomp: unknown system call {name!r}")


def build_filter(policy: SeccompPolicy) -> sc.SyscallFilter:
    """The libseccomp filter for ``policy`` (not yet loaded or exported)."""
    fail = sc.ERRNO(policy.errno)
    default = {"allow": sc.ALLOW, "errno": fail, "kill": sc.KILL_PROCESS}[policy.default]
    flt = sc.SyscallFilter(default)
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    try:
        for name in policy.allow:
            _resolve(name)
            flt.add_rule(sc.ALLOW, name)
        if default != sc.ALLOW:
            return flt
        for name in policy.deny:
            _resolve(name)
            flt.add_rule(fail, name)
        for name in policy.enosys:
            _resolve(name)
            flt.add_rule(sc.ERRNO(errno_mod.ENOSYS), name)
        for rule in policy.rules:
            _resolve(rule.syscall)
            if rule.syscall in policy.deny:
                raise ProfileError(f"seccomp: {rule.syscall} is both denied and in a rule")
            for mask, value in rule.matches:
                flt.add_rule(fail, rule.syscall, sc.Arg(rule.arg, sc.MASKED_EQ, mask, value))
    except OSError as e:
        raise ProfileError(f"seccomp: libseccomp refused the policy: {e}") from None
    return flt


def compile_bpf(policy: SeccompPolicy) -> bytes:
    """The BPF program (an array of ``struct sock_filter``) for ``policy``; cached."""
    if (hit := _cache.get(policy)) is not None:
        return hit
    flt = build_filter(policy)
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        bpf = f.read()
    _cache[policy] = bpf
    return bpf


def pfc(policy: SeccompPolicy) -> str:
    """libseccomp's pseudo-C rendering of the filter (for `sandbox profile show`)."""
    flt = build_filter(policy)
    with tempfile.TemporaryFile("w+") as f:
        flt.export_pfc(f)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        return f.read()
