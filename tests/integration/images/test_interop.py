"""Interoperability with the real tools: archives we save load in podman and skopeo and keep
their names; archives podman and skopeo write load and run here.

podman and skopeo run as root with storage of their own in a temporary directory (podman
``--root``/``--runroot``/``--tmpdir``, the vfs driver: no mounts), inside a private mount
namespace where /var/lib/containers and /run/containers are empty tmpfs, so that their
global caches (blob-info-cache) are not touched either. Nothing here runs a container in
podman (that would need cgroups of the host): podman's view of an image is read from its
vfs directory, and podman builds with ``--isolation chroot``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox.images.layers import remove_tree
from tests.conftest import Runner, need
from tests.integration.images.conftest import store_of
from tests.integration.images.kit import (
    EXPECTED,
    FIVE_LAYERS,
    VIEW,
    build,
    inspect,
    store_home,
    write_recipe,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

PRIVATE = ("/var/lib/containers", "/run/containers")
# run "$@" with the tools' global state dirs replaced by empty tmpfs (private mounts)
WRAPPER = ('mount -t tmpfs none /var/lib/containers && mount -t tmpfs none /run/containers '
           '&& exec "$@"')


@dataclass
class Tools:
    """podman and skopeo confined to ``work`` (see the module doc)."""

    work: Path

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work),
               "TMPDIR": str(self.work / "tmp")}
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               WRAPPER, "sh", *argv], capture_output=True, text=True,
                              env=env, timeout=300, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv[:3])}... failed: {proc.stderr}")
        return proc

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(["podman", "--root", str(self.work / "root"), "--runroot",
                          str(self.work / "runroot"), "--tmpdir", str(self.work / "libpod"),
                          "--storage-driver", "vfs", "--events-backend", "none",
                          "--cgroup-manager", "cgroupfs", "--runtime", "runc", *args],
                         check=check)

    def skopeo(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(["skopeo", *args], check=check)

    def names(self) -> list[str]:
        out = self.podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
        return sorted(out.split())

    def image_dir(self, name: str) -> Path:
        """podman's view of an image: with vfs, `image mount` is a plain directory."""
        return Path(self.podman("image", "mount", name).stdout.strip())


@pytest.fixture
def tools() -> Iterator[Tools]:
    need(os.geteuid() == 0, "the interop tests run podman and skopeo as root")
    for tool in ("podman", "skopeo", "unshare"):
        need(shutil.which(tool) is not None, f"{tool} is not installed")
    created = [p for p in PRIVATE if not os.path.isdir(p)]
    for path in created:  # mount points for the private tmpfs; removed afterwards
        os.makedirs(path)
    work = Path(tempfile.mkdtemp(prefix="sandbox-interop-"))
    (work / "tmp").mkdir()
    try:
        yield Tools(work)
    finally:
        remove_tree(work)
        for path in created:
            shutil.rmtree(path, ignore_errors=True)


def merged_view(root: Path) -> dict[str, str]:
    """/data of an unpacked image root as `VIEW` would see it."""
    data = root / "data"
    return {str(p.relative_to(root)): p.read_text() if p.is_file() else "<dir>"
            for p in sorted(data.rglob("*"))} | {"data": "<dir>"}


FIVE_VIEW = {"data": "<dir>", "data/file": "again\n", "data/keep": "<dir>",
             "data/keep/a": "a\n", "data/opq": "<dir>", "data/opq/new": "new\n"}


def test_our_archives_load_in_podman_and_keep_their_names(root_store: Runner, context: Path,
                                                          tools: Tools) -> None:
    write_recipe(context, FIVE_LAYERS)
    build(root_store, context, "five")
    root_store.run(["image", "tag", "five", "team/five:docker"], check=True)
    oci, docker = tools.work / "five.oci.tar", tools.work / "five.docker.tar"
    root_store.run(["image", "save", "five", "-o", str(oci)], check=True)
    root_store.run(["image", "save", "team/five:docker", "-o", str(docker), "--format",
                    "docker"], check=True)
    assert "Loaded image: localhost/five:latest" in tools.podman("load", "-i", str(oci)).stdout
    tools.podman("load", "-i", str(docker))
    assert tools.names() == ["localhost/five:latest", "localhost/team/five:docker"]
    # podman applied our whiteouts and opaque directory as we do
    assert merged_view(tools.image_dir("localhost/five:latest")) == FIVE_VIEW
    assert merged_view(tools.image_dir("localhost/team/five:docker")) == FIVE_VIEW
    ours = inspect(root_store, "five")
    podman_id = tools.podman("image", "inspect", "--format", "{{.Id}}", "localhost/five").stdout
    assert podman_id.strip() == ours["id"][7:]  # the same image config


def test_skopeo_finds_our_archives_by_name(root_store: Runner, tools: Tools) -> None:
    oci, docker = tools.work / "tiny.oci.tar", tools.work / "tiny.docker.tar"
    root_store.run(["image", "save", "tiny", "-o", str(oci)], check=True)
    root_store.run(["image", "save", "tiny", "-o", str(docker), "--format", "docker"],
                   check=True)
    tools.skopeo("inspect", f"oci-archive:{oci}:localhost/tiny:latest")
    tools.skopeo("inspect", f"docker-archive:{docker}:localhost/tiny:latest")
    assert tools.skopeo("inspect", f"oci-archive:{oci}:localhost/other:latest",
                        check=False).returncode != 0
    assert tools.skopeo("inspect", f"docker-archive:{docker}:localhost/other:latest",
                        check=False).returncode != 0
    copied = tools.skopeo("copy", f"oci-archive:{oci}:localhost/tiny:latest",
                          f"oci:{tools.work / 'layout'}:copied")
    assert "Writing manifest" in copied.stderr + copied.stdout


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_archives_from_skopeo_load_and_run(root_store: Runner, tools: Tools,
                                           compression: str) -> None:
    # skopeo reads our store as the OCI image layout it is, and recompresses the layers
    out = tools.work / "from-skopeo.tar"
    tools.skopeo("copy", "--dest-compress", "--dest-compress-format", compression,
                 f"oci:{store_home(root_store)}:tiny:latest",
                 f"oci-archive:{out}:localhost/skopeo-made:{compression}")
    fresh, home = store_of(root_store, None)
    try:
        loaded = fresh.run(["image", "load", "-i", str(out)], check=True).stdout.decode()
        assert loaded == f"Loaded image: localhost/skopeo-made:{compression}\n"
        layers = inspect(fresh, f"skopeo-made:{compression}")["layers"]
        assert {x["mediaType"] for x in layers} == {
            f"application/vnd.oci.image.layer.v1.tar+{compression}"}
        r = fresh.sh("echo from skopeo", image=f"skopeo-made:{compression}")
        assert (r["status"], r["stdout"]) == ("ok", "from skopeo\n")
    finally:
        remove_tree(home.parent)


PODMAN_RECIPE = """\
FROM localhost/tiny:latest
RUN mkdir -p /data/keep /data/gone /data/opq && echo a > /data/keep/a \\
    && echo b > /data/gone/b && echo old > /data/opq/old && echo f > /data/file
RUN rm -r /data/gone /data/opq /data/file && mkdir /data/opq && echo new > /data/opq/new
RUN echo again > /data/file
"""


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_podman_built_images_load_and_run(root_store: Runner, tools: Tools, fmt: str) -> None:
    seed = tools.work / "tiny.tar"
    root_store.run(["image", "save", "tiny", "-o", str(seed)], check=True)
    tools.podman("load", "-i", str(seed))
    ctx = tools.work / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(PODMAN_RECIPE)
    tools.podman("build", "--isolation", "chroot", "-t", "localhost/podman-made:1", str(ctx))
    out = tools.work / "podman-made.tar"
    tools.podman("save", "--format", fmt, "-o", str(out), "localhost/podman-made:1")
    fresh, home = store_of(root_store, None)
    try:
        loaded = fresh.run(["image", "load", "-i", str(out)], check=True).stdout.decode()
        assert loaded == "Loaded image: localhost/podman-made:1\n"  # podman's name, kept
        assert len(inspect(fresh, "podman-made:1")["layers"]) == 5
        r = fresh.sh(VIEW, image="podman-made:1")
        assert (r["status"], r["stdout"]) == ("ok", EXPECTED)
    finally:
        remove_tree(home.parent)
