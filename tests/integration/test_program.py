"""First try, right: the image's config is the job's config, one rule for PROGRAM, and what
ordinary programs expect of a machine (/etc/hosts, an account, services, venv, inode
numbers that agree). Each test here failed on the code before it, as root and as an
unprivileged user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Runner, exec_result


def _build(runner: Runner, shared_tmp: Path, name: str, recipe: str) -> str:
    ctx = shared_tmp / f"ctx-{name}"
    ctx.mkdir()
    (ctx / "Sandboxfile").write_text(recipe)
    ctx.chmod(0o755)
    (ctx / "Sandboxfile").chmod(0o644)
    runner.run(["build", "-t", name, str(ctx)], check=True, timeout=300)
    return name


CONFIGURED = """FROM busybox
RUN echo 'app:x:4242:4243:app:/app:/bin/sh' >> /etc/passwd && echo 'app:x:4243:' >> /etc/group
WORKDIR /app
ENV GREETING=hi
USER app
LABEL sandbox.script-runner='["sh", "-e"]'
"""


def test_the_images_workdir_env_and_user_apply(runner: Runner, shared_tmp: Path) -> None:
    image = _build(runner, shared_tmp, "sbx-configured", CONFIGURED)
    (shared_tmp / "data.txt").write_text("x\n")
    (shared_tmp / "data.txt").chmod(0o644)
    script = "pwd; echo $GREETING; id -u; id -g; id -un; echo $HOME $USER; ls"
    r = runner.sh(script, "--file", str(shared_tmp / "data.txt"), image=image)
    assert r["stdout"].split() == ["/app", "hi", "4242", "4243", "app", "/app", "app",
                                   "data.txt"], r
    # exec's options win over the image's config
    r = runner.sh("pwd; id -u; id -un", "-w", "/elsewhere", "-u", "1000", image=image)
    assert r["stdout"].split() == ["/elsewhere", "1000", "sandbox"], r
    r = runner.sh("id -u", "--user", "root", image=image)
    assert r["stdout"] == "1000\n", r  # never root, not even inside: the default uid
    r = runner.sh("true", "-u", "nobody-here", image=image)
    assert r["status"] == "internal_error" and "no such user" in r["message"], r


def test_an_absolute_program_in_the_image_is_the_images(runner: Runner) -> None:
    # the host has a /bin/sh too (dash); the image's is busybox
    r = runner.exec("/bin/sh", "-c", "readlink /proc/$$/exe")
    assert (r["status"], r["stdout"]) == ("ok", "/bin/busybox\n"), r


def test_an_absolute_host_file_the_image_lacks_is_copied_in(runner: Runner, shared_tmp: Path,
                                                            probe: Path) -> None:
    script = shared_tmp / "hello.sh"
    script.write_text("#!/bin/sh\necho \"script $0 $1\"\n")
    script.chmod(0o755)
    r = runner.exec(str(script), "arg")
    assert (r["status"], r["stdout"]) == ("ok", "script ./hello.sh arg\n"), r
    r = runner.exec(str(probe), "write", "/tmp/x")  # an ELF binary runs directly
    assert (r["status"], r["exit_code"]) == ("ok", 0), r


def test_an_absolute_path_in_neither_place_is_125(runner: Runner) -> None:
    proc = runner.run(["exec", "--image", "busybox", "/no/such/program"])
    err = proc.stderr.decode()
    assert proc.returncode == 125 and len(err.strip().splitlines()) == 1, err
    assert "/no/such/program: no such file in the image busybox:latest, nor on this " \
           "machine" in err, err


def test_a_missing_host_file_is_125_a_missing_command_127(runner: Runner) -> None:
    proc = runner.run(["exec", "--image", "busybox", "./missing.py"])
    assert proc.returncode == 125, proc.stderr
    assert b"./missing.py: no such file on this machine" in proc.stderr
    proc = runner.run(["exec", "--image", "busybox", "no-such-command"])
    assert proc.returncode == 127
    assert proc.stderr.decode().strip() == "sandbox: no-such-command: command not found"
    proc = runner.run(["exec", "--image", "busybox", "no such:command"])  # no image's name
    assert proc.returncode == 127, proc.stderr


def test_an_image_given_as_program_says_what_to_type(runner: Runner) -> None:
    proc = runner.run(["exec", "--image", "busybox", "py3", "-c", "pass"])
    assert proc.returncode == 127
    assert proc.stderr.decode().strip() == (
        "sandbox: py3: command not found in the image busybox:latest; py3 is an image: "
        "sandbox exec --image py3 COMMAND..."), proc.stderr


def test_file_and_program_naming_one_file(runner: Runner, shared_tmp: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (shared_tmp / "run.sh").write_text("#!/bin/sh\necho one file\n")
    (shared_tmp / "run.sh").chmod(0o755)
    monkeypatch.chdir(shared_tmp)
    r = runner.exec("--file", "run.sh", "./run.sh")
    assert (r["status"], r["stdout"]) == ("ok", "one file\n"), r


def test_how_a_copied_script_runs(runner: Runner, shared_tmp: Path) -> None:
    plain = shared_tmp / "plain.txt"  # no #!, not ELF
    plain.write_text("echo through $0\n")
    plain.chmod(0o644)
    shebang = shared_tmp / "bang.sh"
    shebang.write_text("#!/bin/sh\necho direct $0\n")
    shebang.chmod(0o755)
    image = _build(runner, shared_tmp, "sbx-runner", CONFIGURED)  # runner: sh -e
    r = runner.exec(str(plain), image=image)
    assert (r["status"], r["stdout"]) == ("ok", "through plain.txt\n"), r
    r = runner.exec(str(shebang), image=image)
    assert (r["status"], r["stdout"]) == ("ok", "direct ./bang.sh\n"), r
    entry = _build(runner, shared_tmp, "sbx-entry", 'FROM busybox\nENTRYPOINT ["sh"]\n')
    r = runner.exec(str(plain), image=entry)  # no label: the ENTRYPOINT
    assert (r["status"], r["stdout"]) == ("ok", "through plain.txt\n"), r
    r = runner.exec(str(plain))  # busybox: neither: ./plain.txt, not executable
    assert (r["status"], r["exit_code"], r["cli_exit"]) == ("nonzero_exit", 126, 126), r


def test_py3_runs_scripts_through_python3_and_commands_as_given(runner_py3: Runner,
                                                               shared_tmp: Path) -> None:
    script = shared_tmp / "s.py"
    script.write_text("import sys; print(sys.argv)\n")
    script.chmod(0o644)
    r = runner_py3.exec(str(script), "a", image="py3")
    assert r["stdout"] == "['s.py', 'a']\n", r
    r = runner_py3.exec("sh", "-c", "echo shell", image="py3")
    assert r["stdout"] == "shell\n", r
    inspect = json.loads(runner_py3.run(["image", "inspect", "py3"], check=True).stdout)
    config = inspect["config"]["config"]
    assert (config.get("Entrypoint"), config["Cmd"]) == (None, ["python3"]), config
    assert config["Labels"]["sandbox.script-runner"] == '["python3"]'


LOOKUPS = """
import os, pathlib, pwd, grp, socket
socket.socket().bind(("localhost", 0))
print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))
print(pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name, pathlib.Path.home())
print(socket.getservbyname("http"), os.environ["USER"], os.environ["LOGNAME"])
print(open("/etc/hostname").read().strip())
"""


def test_what_ordinary_programs_expect(runner_py3: Runner) -> None:
    r = runner_py3.exec("python3", "-c", LOOKUPS, image="py3")
    assert r["stdout"].splitlines() == ["sandbox 127.0.0.1", "sandbox sandbox /work",
                                        "80 sandbox sandbox", "sandbox"], r


def test_venv_works_in_py3(runner_py3: Runner) -> None:
    r = runner_py3.sh("python3 -m venv /tmp/v && /tmp/v/bin/python -m pip --version",
                      image="py3")
    assert r["status"] == "ok" and r["stdout"].startswith("pip "), r


def test_readdir_and_stat_agree_on_inode_numbers(runner_py3: Runner) -> None:
    """On the overlay, a merged directory's readdir d_ino must be stat's st_ino (xino)."""
    code = ("import os\nbad = [(d, e.name) for d in ('/', '/etc', '/usr', '/usr/lib')"
            " for e in os.scandir(d) if not os.path.ismount(e.path)"
            " and e.inode() != os.lstat(e.path).st_ino]\nprint(bad)")
    r = runner_py3.exec("python3", "-c", code, image="py3")
    assert (r["status"], r["stdout"]) == ("ok", "[]\n"), r


def test_a_localhost_name_is_local_never_pulled(root_runner: Runner) -> None:
    proc = root_runner.run(["exec", "--image", "localhost/not-here:1", "true"],
                           extra_env={"SANDBOX_PULL": "auto"})
    err = proc.stderr.decode()
    assert proc.returncode == 125 and "localhost/ names are local images" in err, err


def test_the_job_sees_only_its_own_etc_files(runner: Runner) -> None:
    r = runner.sh("cat /etc/hosts; id")
    assert r["stdout"] == ("127.0.0.1\tlocalhost sandbox\n"
                           "::1\tlocalhost ip6-localhost ip6-loopback\n"
                           "uid=1000(sandbox) gid=1000(sandbox)\n"), r
    r = exec_result(runner.run(["exec", "--json", "--image", "busybox", "cat", "/etc/passwd"]))
    assert r["stdout"].endswith("sandbox:x:1000:1000:sandbox job:/work:/bin/sh\n"), r

