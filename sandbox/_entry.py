"""The `sandbox` console script. `sandbox exec` with a daemon running takes the fast path
(`_fastexec`); everything else goes to the click CLI in `cli.py`."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "exec":
        from ._fastexec import exit_now, run  # noqa: PLC0415 - lazy: the fast path stays light

        try:
            code = run(sys.argv[2:])
        except KeyboardInterrupt:
            sys.stderr.write("sandbox: interrupted\n")
            sys.exit(130)
        if code is not None:
            exit_now(code)
    from .cli import main as cli_main  # noqa: PLC0415 - click only when needed

    cli_main()
