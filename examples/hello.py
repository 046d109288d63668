"""A first sandboxed program: `sandbox exec --image py3 examples/hello.py`."""

import os
import platform
import sys

print(f"Hello from {platform.node()}: Python {sys.version.split()[0]}, uid {os.getuid()}, "
      f"pid {os.getpid()}, cwd {os.getcwd()}")
