"""The shipped recipes (images/): py3 and cpp built on the shared base, small, and working.

Slow: this bootstraps Debian and downloads python3, gcc, g++ and make from Debian's archive
(about 150 MB) into a fresh store, as root and as the unprivileged test user.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.images.layers import read_merged, remove_tree
from sandbox.images.store import Store
from tests.conftest import NO_DAEMON, Runner
from tests.integration.images.conftest import store_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaks")]

PROGRAMS = {
    "hello.c": '#include <stdio.h>\nint main(void) { printf("c %d\\n", 6 * 7); return 0; }\n',
    "hello.cpp": ('#include <iostream>\n#include <vector>\n'
                  'int main() { std::vector<int> v{1, 2, 3};\n'
                  '  std::cout << "c++ " << v.size() << std::endl; }\n'),
    "Makefile": "all: hello-c hello-cpp\nhello-c: hello.c\n\tgcc -O2 -o $@ $<\n"
                "hello-cpp: hello.cpp\n\tg++ -O2 -o $@ $<\n",
}


@pytest.fixture(scope="module", params=["root", "user"])
def shipped(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """A fresh store where py3 and cpp were built from images/ (base along the way)."""
    base = (Runner(None, Path.home(), dict(NO_DAEMON)) if request.param == "root"
            else request.getfixturevalue("user_runner"))
    runner, home = store_of(base, None)
    try:
        for name in ("cpp", "py3", "busybox"):
            runner.run(["image", "build", name], check=True, timeout=1200)
        yield runner
    finally:
        remove_tree(home.parent)


def test_py3_and_cpp_share_the_base_and_stay_small(shipped: Runner) -> None:
    images = {i["name"]: i for i in json.loads(shipped.run(["images", "--json"],
                                                           check=True).stdout)}
    assert set(images) == {"base:latest", "py3:latest", "cpp:latest", "busybox:latest"}
    layers = {name: json.loads(shipped.run(["image", "inspect", name], check=True).stdout)
              ["layers"] for name in images}
    assert images["busybox:latest"]["size"] < 5_000_000
    base = layers["base:latest"]
    assert layers["py3:latest"][:len(base)] == layers["cpp:latest"][:len(base)] == base
    assert len(layers["py3:latest"]) == len(layers["cpp:latest"]) == len(base) + 1
    assert images["py3:latest"]["shared"] == images["base:latest"]["size"]
    assert images["cpp:latest"]["shared"] == images["base:latest"]["size"]
    assert images["base:latest"]["size"] < 80_000_000
    assert images["py3:latest"]["unique"] < 60_000_000
    assert images["cpp:latest"]["unique"] < 300_000_000


TRIMMED = ("find /usr/share/doc -type f ! -name copyright | wc -l; "
           "find /usr/share/man /usr/share/info -type f ! -name dir 2>/dev/null | wc -l; "
           "find /usr/share/locale -type f ! -name locale.alias 2>/dev/null | wc -l; "
           "ls /var/lib/apt/lists /var/cache/apt/archives | grep -c -e _ -e '[.]deb$'; "
           "test -e /etc/resolv.conf || echo no-resolv.conf")


def _image_file(runner: Runner, image: str, rel: str) -> str:
    """A file as the image has it (a job sees its own /etc/hostname, hosts, passwd)."""
    return read_merged(Store(runner.store()).resolve(image).lower_dirs(), rel)


@pytest.mark.parametrize("image", ["py3", "cpp"])
def test_no_docs_man_pages_locales_or_apt_caches(shipped: Runner, image: str) -> None:
    r = shipped.exec("sh", "-c", TRIMMED, image=image)
    assert r["stdout"].split() == ["0", "0", "0", "0", "no-resolv.conf"], r
    assert _image_file(shipped, image, "etc/hostname") == "localhost\n"


@pytest.mark.parametrize("image", ["busybox", "base"])
def test_bootstrapped_images_keep_no_host_files(shipped: Runner, image: str) -> None:
    # mmdebstrap copies the host's resolv.conf and hostname into what it bootstraps
    r = shipped.exec("sh", "-c", "test -e /etc/resolv.conf || echo none; cat /etc/hostname",
                     image=image)
    assert r["stdout"].split() == ["none", "sandbox"], r  # the job's own hostname file
    assert _image_file(shipped, image, "etc/hostname") == "localhost\n"


def test_cpp_compiles_and_runs_c_and_cpp(shipped: Runner, shared_tmp: Path) -> None:
    files = []
    for name, text in PROGRAMS.items():
        (shared_tmp / name).write_text(text)
        files += ["--file", str(shared_tmp / name)]
    r = shipped.exec(*files, "--memory", "1G", "--time", "60", "--wall-time", "120",
                     "sh", "-c", "make -s && ./hello-c && ./hello-cpp", image="cpp")
    assert (r["status"], r["stdout"]) == ("ok", "c 42\nc++ 3\n"), r


def test_py3_has_the_standard_library(shipped: Runner) -> None:
    r = shipped.exec("python3", "-c", "import ctypes, sqlite3, json, ssl, venv; print('py ok')",
                     image="py3")
    assert (r["status"], r["stdout"]) == ("ok", "py ok\n"), r
