"""`sandbox build` for real: RUN steps in sandboxes, the cache, step output, errors,
USER, networks, and what a job sees on an image of five layers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.images.layers import remove_tree
from tests.conftest import Runner
from tests.integration.images.conftest import store_of
from tests.integration.images.kit import (
    EXPECTED,
    FIVE_LAYERS,
    VIEW,
    build,
    inspect,
    layer_names,
    outcomes,
    staging_left,
    store_home,
    write_recipe,
)

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_run_steps_make_layers_and_hit_the_cache(store_runner: Runner, context: Path) -> None:
    recipe = ("FROM tiny\nRUN echo one > /one\nCOPY f.txt /f.txt\nENV GREETING=hi\n"
              "RUN cat /f.txt > /copy && echo $GREETING >> /copy\n")
    write_recipe(context, recipe, **{"f.txt": "first\n"})
    first = build(store_runner, context, "app")
    err = first.stderr.decode()
    assert "Step 1/5 : FROM tiny" in err and "Step 5/5 : RUN cat /f.txt" in err
    assert outcomes(first.stderr) == ["done"] * 5
    assert f"Successfully built {inspect(store_runner, 'app')['id'][7:19]} as app:latest" in err
    layers = inspect(store_runner, "app")["layers"]
    assert len(layers) == 2 + 3  # tiny's two, then RUN, COPY, RUN

    again = build(store_runner, context, "app")
    assert outcomes(again.stderr) == ["done", "CACHED", "CACHED", "done", "CACHED"]
    assert inspect(store_runner, "app")["layers"] == layers

    (context / "f.txt").write_text("second\n")  # COPY's input changed: it and what follows
    changed = build(store_runner, context, "app")
    assert outcomes(changed.stderr) == ["done", "CACHED", "done", "done", "done"]
    assert inspect(store_runner, "app")["layers"][:3] == layers[:3]

    rebuilt = build(store_runner, context, "app", "--no-cache")
    assert "CACHED" not in outcomes(rebuilt.stderr)
    r = store_runner.sh("cat /one /copy", image="app")
    assert (r["status"], r["stdout"]) == ("ok", "one\nsecond\nhi\n")
    assert staging_left(store_runner) == []


def test_unsupported_instruction_is_a_one_line_error(store_runner: Runner,
                                                     context: Path) -> None:
    write_recipe(context, "FROM tiny\n# ports\nEXPOSE 8080\n")
    proc = build(store_runner, context, "bad", check=False)
    assert proc.returncode == 125
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert lines[0].startswith(f"sandbox: error: {context}/Sandboxfile:3: unsupported "
                               "instruction 'EXPOSE'")


def test_a_failing_run_names_its_line_and_leaves_nothing(store_runner: Runner,
                                                         context: Path) -> None:
    write_recipe(context, "FROM tiny\nRUN echo partial > /p\nRUN echo out; exit 3\n")
    proc = build(store_runner, context, "broken", check=False)
    assert proc.returncode == 125
    assert proc.stderr.decode().splitlines()[-1] == (
        f"sandbox: error: {context}/Sandboxfile:3: RUN failed (nonzero_exit: exit code 3)")
    assert "     out" in proc.stderr.decode()  # the step's output is shown
    assert store_runner.run(["image", "inspect", "broken"]).returncode == 125
    assert staging_left(store_runner) == []


def test_run_steps_run_as_the_recipes_user(store_runner: Runner, context: Path) -> None:
    write_recipe(context, "FROM tiny\n"
                 "RUN mkdir /etc && echo 'app:x:1234:1234::/:/bin/sh' > /etc/passwd"
                 " && echo 'staff:x:50:' > /etc/group\n"
                 "USER app\nRUN echo \"ids $(id -u):$(id -g)\"\n"
                 "USER 4321:staff\nRUN echo \"ids $(id -u):$(id -g)\"\n"
                 "USER root\nRUN echo \"ids $(id -u):$(id -g)\"\n")
    err = build(store_runner, context, "users").stderr.decode()
    assert [line.split()[-1] for line in err.splitlines() if line.startswith("     ids")] == [
        "1234:1234", "4321:50", "0:0"]
    assert inspect(store_runner, "users")["config"]["config"]["User"] == "root"
    write_recipe(context, "FROM tiny\nUSER nobody\nRUN true\n")
    proc = build(store_runner, context, "nouser", check=False)
    assert proc.returncode == 125
    assert "Sandboxfile:3: USER nobody: no such user in the image's /etc/passwd" in (
        proc.stderr.decode())


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on the host's loopback; yields its port and what it received."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                received.append(conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    server.close()
    thread.join(5)


def test_run_has_no_network_unless_the_build_asks(store_runner: Runner, context: Path,
                                                  listener: tuple[int, list[bytes]]) -> None:
    port, received = listener
    write_recipe(context, f"FROM tiny\nRUN echo hello | nc 127.0.0.1 {port}\n")
    proc = build(store_runner, context, "net", check=False)
    assert proc.returncode == 125 and "Sandboxfile:2: RUN failed" in proc.stderr.decode()
    assert received == []  # its own loopback has no listener

    build(store_runner, context, "net", "--network", "host")
    assert received == [b"hello\n"]

    # RUN --network=none opts a step out even then
    write_recipe(context, f"FROM tiny\nRUN --network=none echo again | nc 127.0.0.1 {port}\n")
    proc = build(store_runner, context, "net2", "--network", "host", check=False)
    assert proc.returncode == 125 and received == [b"hello\n"]


def test_host_network_shows_the_hosts_resolv_conf_but_keeps_it_out(store_runner: Runner,
                                                                  context: Path) -> None:
    write_recipe(context, "FROM tiny\nRUN mkdir /etc\n"
                 "RUN cat /etc/resolv.conf > /resolv.copy\n")
    build(store_runner, context, "dns", "--network", "host")
    top = inspect(store_runner, "dns")["layers"][-1]["digest"]
    assert "resolv.copy" in layer_names(store_runner, top)
    assert not any("resolv.conf" in n for n in layer_names(store_runner, top))
    r = store_runner.sh("cat /resolv.copy; ls /etc", image="dns")
    # (and /etc holds only the files every job gets)
    assert r["stdout"] == Path("/etc/resolv.conf").read_text() + "group\nhostname\nhosts\npasswd\n"


def test_a_job_sees_exactly_the_merged_view_of_five_built_layers(store_runner: Runner,
                                                                 context: Path,
                                                                 tiny_archive: Path,
                                                                 shared_tmp: Path) -> None:
    write_recipe(context / "five", FIVE_LAYERS)
    build(store_runner, context / "five", "five")
    layers = inspect(store_runner, "five")["layers"]
    assert len(layers) == 5
    deleted = layer_names(store_runner, layers[3]["digest"])
    assert {"data/.wh.gone", "data/.wh.file", "data/keep/.wh.x"} <= set(deleted)
    assert "data/opq/.wh..wh..opq" in layer_names(store_runner, layers[4]["digest"])
    r = store_runner.sh(VIEW, image="five")
    assert (r["status"], r["stdout"]) == ("ok", EXPECTED)

    # the same view after a round trip through each archive format into another store
    (shared_tmp / "out").mkdir(mode=0o777)
    (shared_tmp / "out").chmod(0o777)
    for fmt in ("oci", "docker"):
        out = shared_tmp / "out" / f"five-{fmt}.tar"
        store_runner.run(["image", "save", "five", "-o", str(out), "--format", fmt],
                         check=True)
        other, home = store_of(store_runner, None)
        try:
            loaded = other.run(["image", "load", "-i", str(out)], check=True)
            assert loaded.stdout.decode() == "Loaded image: five:latest\n"
            r = other.sh(VIEW, image="five")
            assert (r["status"], r["stdout"]) == ("ok", EXPECTED)
        finally:
            remove_tree(home.parent)
    assert store_home(store_runner).is_dir()


COPY_RULES = """FROM tiny
RUN mkdir -p /existing/dir /usr/local/bin
WORKDIR /app
COPY f.txt .
COPY f.txt /existing/dir
COPY f.txt /made/
COPY f.txt /renamed.txt
COPY tool /usr/local/bin
COPY tree /tree
COPY f.txt tool /both/
COPY t*.txt /glob/
"""


def test_copy_follows_dockers_rules(store_runner: Runner, context: Path) -> None:
    """Docker's COPY rules, one line each: DEST . or an existing directory or a trailing /
    takes the file inside; other DEST names the file; a directory's contents are copied,
    not the directory; several sources need a directory; wildcards expand."""
    write_recipe(context, COPY_RULES, **{"f.txt": "f\n", "tool": "t\n", "t1.txt": "1\n",
                                         "t2.txt": "2\n"})
    (context / "tree" / "sub").mkdir(parents=True)
    (context / "tree" / "sub" / "leaf").write_text("leaf\n")
    for p in (context / "tree", context / "tree" / "sub"):
        p.chmod(0o755)
    (context / "tree" / "sub" / "leaf").chmod(0o644)
    build(store_runner, context, "copies")
    r = store_runner.sh("cd /; for p in app/f.txt existing/dir/f.txt made/f.txt renamed.txt "
                        "usr/local/bin/tool tree/sub/leaf both/f.txt both/tool glob/t1.txt "
                        "glob/t2.txt; do test -f $p && echo $p; done; test -d usr/local/bin "
                        "&& echo bin-is-a-dir", image="copies")
    assert r["stdout"].split() == [
        "app/f.txt", "existing/dir/f.txt", "made/f.txt", "renamed.txt", "usr/local/bin/tool",
        "tree/sub/leaf", "both/f.txt", "both/tool", "glob/t1.txt", "glob/t2.txt",
        "bin-is-a-dir"], r


def test_dockerignore_and_its_exceptions(store_runner: Runner, context: Path) -> None:
    write_recipe(context, "FROM tiny\nCOPY . /ctx/\n", **{
        ".dockerignore": "*.log\n!keep.log\nsecret/\n", "a.log": "x\n", "keep.log": "k\n",
        "ok.txt": "ok\n"})
    (context / "secret").mkdir(mode=0o755)
    (context / "secret" / "key").write_text("k\n")
    (context / "secret" / "key").chmod(0o644)
    build(store_runner, context, "ignoring")
    r = store_runner.sh("cd /ctx && ls -A", image="ignoring")
    assert r["stdout"].split() == [".dockerignore", "Sandboxfile", "keep.log", "ok.txt"], r
    write_recipe(context, "FROM tiny\nCOPY a.log /\n")
    proc = build(store_runner, context, "ignoring2", check=False)
    assert proc.returncode == 125 and b"excluded by the build context's ignore file" in \
        proc.stderr, proc.stderr


def test_the_image_name_is_checked_before_the_first_step(store_runner: Runner,
                                                         context: Path) -> None:
    write_recipe(context, "FROM tiny\nRUN echo never > /x\n")
    proc = build(store_runner, context, "Bad Name!", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 125 and "invalid image name" in err and "Step 1/" not in err, err
