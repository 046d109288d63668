"""The store under real use: crafted layers loaded and run, several builds at once, a
build and a run at once, prune while builds and jobs run, and the management commands."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Runner
from tests.integration.images.kit import (
    EXPECTED,
    VIEW,
    build,
    inspect,
    staging_left,
    store_home,
    write_recipe,
)
from tests.layertools import (
    Entry,
    directory,
    docker_archive,
    file,
    oci_archive,
    opaque,
    symlink,
    tar_bytes,
    whiteout,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

APPLETS = ("sh", "find", "sort", "cat", "ls", "echo", "sleep")


def crafted_layers() -> list[bytes]:
    """Five layers written the way other tools write them: OCI whiteouts and opaque markers
    in any order, a file deleted and re-added, a directory hidden and recreated."""
    busybox = Path("/bin/busybox").read_bytes()
    base: list[Entry] = [directory("bin"), file("bin/busybox", busybox, 0o755)]
    base += [symlink(f"bin/{name}", "busybox") for name in APPLETS]
    return [
        tar_bytes(base),
        tar_bytes([directory("data"), directory("data/keep"), file("data/keep/a", b"a\n"),
                   file("data/keep/x", b"x\n"), directory("data/gone"),
                   file("data/gone/b", b"b\n"), directory("data/opq"),
                   file("data/opq/old", b"old\n"), file("data/file", b"f\n")]),
        tar_bytes([directory("data"), whiteout("data/gone"), whiteout("data/file"),
                   directory("data/keep"), whiteout("data/keep/x")]),
        tar_bytes([file("data/opq/new", b"new\n"), opaque("data/opq"), directory("data/opq"),
                   directory("data")]),
        tar_bytes([directory("data"), file("data/file", b"again\n")]),
    ]


@pytest.mark.parametrize("compression", ["", "gzip", "zstd"])
@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_a_job_sees_exactly_the_merged_view_of_five_loaded_layers(
        store_runner: Runner, shared_tmp: Path, compression: str, fmt: str) -> None:
    data = (oci_archive(crafted_layers(), "localhost/crafted:5", compression) if fmt == "oci"
            else docker_archive(crafted_layers(), ["localhost/crafted:5"], compression))
    path = shared_tmp / "crafted.tar"
    path.write_bytes(data)
    path.chmod(0o644)
    proc = store_runner.run(["image", "load", "-i", str(path)], check=True)
    assert proc.stdout.decode() == "Loaded image: localhost/crafted:5\n"
    assert len(inspect(store_runner, "crafted:5")["layers"]) == 5
    r = store_runner.sh(VIEW, image="crafted:5")
    assert (r["status"], r["stdout"], r["stderr"]) == ("ok", EXPECTED, "")


def test_image_commands(store_runner: Runner, context: Path) -> None:
    write_recipe(context, "FROM tiny\nLABEL purpose=test\nRUN echo one > /one\n"
                 "RUN echo two > /two\n")
    build(store_runner, context, "app:1")
    tagged = store_runner.run(["image", "tag", "app:1", "app:stable"], check=True)
    assert tagged.stdout.decode().startswith("Tagged ")
    images = {i["name"]: i for i in json.loads(store_runner.run(["images", "--json"],
                                                                check=True).stdout)}
    assert set(images) == {"tiny:latest", "app:1", "app:stable"}
    app, tiny = images["app:1"], images["tiny:latest"]
    assert app["id"] == images["app:stable"]["id"] and app["layers"] == 4
    assert app["shared"] == tiny["size"] == tiny["shared"]  # tiny's layers are app's too
    assert app["unique"] == app["size"] - tiny["size"] > 0
    table = store_runner.run(["images"], check=True).stdout.decode().splitlines()
    assert table[0].split() == ["NAME", "ID", "LAYERS", "SIZE", "SHARED", "UNIQUE", "CREATED"]

    history = json.loads(store_runner.run(["image", "history", "app:1", "--json"],
                                          check=True).stdout)
    assert [h["created_by"] for h in history[:3]] == [
        "RUN echo two > /two", "RUN echo one > /one", "LABEL purpose=test"]
    assert history[0]["layer"] == inspect(store_runner, "app:1")["layers"][-1]["digest"]
    assert history[2]["layer"] is None and history[2]["size"] == 0
    text = store_runner.run(["image", "history", "app:1"], check=True).stdout.decode()
    assert "CREATED BY" in text.splitlines()[0] and "RUN echo two > /two" in text

    details = inspect(store_runner, "app:stable")
    assert details["config"]["config"]["Labels"] == {"purpose": "test"}
    assert (details["size"], details["shared"]) == (app["size"], app["shared"])

    layer_dirs = set((store_home(store_runner) / "layers").iterdir())
    assert store_runner.run(["image", "rm", "app:1"], check=True).stdout == (
        b"Untagged: app:1\n")
    pruned = store_runner.run(["image", "prune"], check=True).stdout.decode()
    assert pruned.startswith("Deleted 0 blobs")  # app:stable still names it all
    store_runner.run(["image", "rm", "app:stable"], check=True)
    pruned = store_runner.run(["image", "prune"], check=True).stdout.decode()
    assert pruned.startswith("Deleted 4 blobs") and ", 2 unpacked layers, 2 build-cache" in (
        pruned)
    assert len(layer_dirs) - len(set((store_home(store_runner) / "layers").iterdir())) == 2
    r = store_runner.sh("echo still fine", image="tiny")
    assert r["stdout"] == "still fine\n"


@pytest.mark.parametrize("args", [
    ["image", "inspect", "nope"], ["image", "tag", "nope", "x"], ["image", "history", "nope"],
    ["image", "rm", "nope"], ["image", "save", "nope", "-o", "/tmp/x.tar"],
    ["image", "load", "-i", "/nonexistent.tar"], ["image", "tag", "tiny", "Bad Name"],
    ["image", "save", "tiny", "-o", "/proc/x.tar"], ["build", "-t", "x", "/nonexistent"],
])
def test_bad_input_is_a_one_line_error(store_runner: Runner, args: list[str]) -> None:
    proc = store_runner.run(args)
    assert proc.returncode == 125, proc
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("sandbox: error: ", "Error: ")), lines


def test_concurrent_builds_share_layers_and_leave_nothing_half_done(store_runner: Runner,
                                                                    context: Path) -> None:
    recipes = {
        "a": "FROM tiny\nRUN echo a > /a && sleep 1\nRUN echo a2 > /a2\n",
        "b": "FROM tiny\nRUN echo b > /b && sleep 1\nCOPY f /f\n",
        "a-again": "FROM tiny\nRUN echo a > /a && sleep 1\nRUN echo a2 > /a2\n",
    }
    procs = {}
    for name, text in recipes.items():
        write_recipe(context / name, text, f=name)
        procs[name] = subprocess.Popen(
            store_runner.command(["build", "-t", name, str(context / name)]),
            env=_env(store_runner),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err.decode())
    for name, expect in (("a", "a\na2\n"), ("b", "b\nb"), ("a-again", "a\na2\n")):
        files = "/a /a2" if name != "b" else "/b /f"
        r = store_runner.sh(f"cat {files}", image=name)
        assert (r["status"], r["stdout"]) == ("ok", expect)
    a, again = inspect(store_runner, "a"), inspect(store_runner, "a-again")
    assert a["layers"][:2] == again["layers"][:2] == inspect(store_runner, "tiny")["layers"]
    assert staging_left(store_runner) == []


def test_prune_waits_for_a_build_and_a_job_runs_meanwhile(store_runner: Runner,
                                                          context: Path) -> None:
    write_recipe(context, "FROM tiny\nRUN echo slow > /slow && sleep 3\n")
    builder = subprocess.Popen(store_runner.command(["build", "-t", "slow", str(context)]),
                               env=_env(store_runner), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    assert builder.stderr is not None
    for line in builder.stderr:  # wait until the RUN step is under way
        if line.startswith(b"Step 2/2"):
            break
    r = store_runner.sh("echo a job during a build", image="tiny")
    assert r["stdout"] == "a job during a build\n"
    pruned = store_runner.run(["image", "prune"], check=True)
    assert b"waiting for running builds and loads to finish" in pruned.stderr
    _, rest = builder.communicate(timeout=120)
    assert builder.returncode == 0, rest.decode()
    r = store_runner.sh("cat /slow", image="slow")  # nothing of the build was swept
    assert (r["status"], r["stdout"]) == ("ok", "slow\n")


def test_prune_never_removes_the_layers_of_a_running_job(store_runner: Runner,
                                                         context: Path) -> None:
    write_recipe(context, "FROM tiny\nRUN echo precious > /precious\n")
    build(store_runner, context, "victim")
    top = inspect(store_runner, "victim")["layers"][-1]["diff_id"]
    layer_dir = store_home(store_runner) / "layers" / top[7:]
    job = subprocess.Popen(
        store_runner.command(["exec", "--image", "victim", "sh", "-c",
                              "echo ready; sleep 3; cat /precious"]),
        env=_env(store_runner), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert job.stdout is not None
    assert job.stdout.readline() == b"ready\n"
    store_runner.run(["image", "rm", "victim"], check=True)
    pruned = store_runner.run(["image", "prune"], check=True).stdout.decode()
    assert "Kept 1 unused layers that running sandboxes use" in pruned
    assert layer_dir.is_dir()
    out, err = job.communicate(timeout=60)
    assert (job.returncode, out) == (0, b"precious\n"), err
    pruned = store_runner.run(["image", "prune"], check=True).stdout.decode()
    assert ", 1 unpacked layers" in pruned and not layer_dir.exists()


def _env(runner: Runner) -> dict[str, str] | None:
    """The environment for a `Runner.command` started with Popen."""
    return None if runner.user else {**os.environ, **runner.env}
