"""Authentication: htpasswd Basic, the Bearer token flow, `sandbox login` / `logout`, and
Docker's config.json."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from .conftest import USERS, Cli, skopeo_copy, skopeo_digest
from .servers import Registry, TokenServer


@pytest.fixture(scope="module")
def basic_image(basic_registry: Registry, local_busybox: str) -> str:
    ref = f"{basic_registry.host}/private/bb:1"
    skopeo_copy(f"oci:{local_busybox}:busybox:latest", f"docker://{ref}",
                "--dest-creds", "alice:secret")
    return ref


@pytest.fixture(scope="module")
def token_image(token_registry: Registry, local_busybox: str) -> str:
    ref = f"{token_registry.host}/public/bb:1"
    skopeo_copy(f"oci:{local_busybox}:busybox:latest", f"docker://{ref}",
                "--dest-creds", "alice:secret")
    return ref


def _login(cli: Cli, host: str, password: str) -> None:
    cli.ok("login", "-u", "alice", "--password-stdin", host, input=password + "\n")


def test_basic_auth_login_pull_logout(cli: Cli, basic_registry: Registry,
                                      basic_image: str) -> None:
    host = basic_registry.host
    err = cli.fails("pull", basic_image)
    assert "requires authentication" in err and f"sandbox login {host}" in err
    err = cli.fails("login", "-u", "alice", "--password-stdin", host, input="wrong\n")
    assert "refused the credentials of 'alice'" in err
    assert not (cli.config / "sandbox" / "auth.toml").exists()
    _login(cli, host, USERS["alice"])
    auth_file = cli.config / "sandbox" / "auth.toml"
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    assert "secret" in auth_file.read_text()
    proc = cli.ok("pull", basic_image)
    assert proc.stdout.splitlines()[-1] == basic_image
    assert "Removed login credentials" in cli.ok("logout", host).stdout
    assert "secret" not in auth_file.read_text()
    assert "Not logged in" in cli.ok("logout", host).stdout
    cli.ok("image", "rm", basic_image)
    assert "requires authentication" in cli.fails("pull", basic_image)


def test_login_needs_a_password_without_a_terminal(cli: Cli, basic_registry: Registry) -> None:
    assert "--password-stdin" in cli.fails("login", "-u", "alice", basic_registry.host,
                                           input="")
    assert "--username" in cli.fails("login", basic_registry.host, input="")


def test_docker_config_credentials_are_used(cli: Cli, basic_image: str,
                                            basic_registry: Registry) -> None:
    docker = Path(cli.env["DOCKER_CONFIG"])
    docker.mkdir()
    auth = base64.b64encode(b"alice:secret").decode()
    (docker / "config.json").write_text(json.dumps(
        {"auths": {f"https://{basic_registry.host}": {"auth": auth}}}))
    cli.ok("pull", basic_image)
    (docker / "config.json").write_text(json.dumps(
        {"auths": {basic_registry.host: {"auth": base64.b64encode(b"alice:nope").decode()}}}))
    cli.ok("image", "rm", basic_image)
    err = cli.fails("pull", basic_image)
    assert "refused the credentials of 'alice'" in err and "config.json" in err


def test_token_flow_anonymous_pull(cli: Cli, token_registry: Registry, token_image: str,
                                   token_server: TokenServer) -> None:
    token_server.requests.clear()
    proc = cli.ok("pull", token_image)
    assert proc.stdout.splitlines()[-1] == token_image
    assert token_server.requests
    assert all(r["user"] is None and r["service"] == "test-registry"
               for r in token_server.requests)
    assert ["repository:public/bb:pull"] in [r["scopes"] for r in token_server.requests]
    assert skopeo_digest(token_image) == cli.inspect(token_image)["manifest"]


def test_token_flow_push_needs_login_and_mounts_with_scopes(
        cli: Cli, token_registry: Registry, token_image: str,
        token_server: TokenServer) -> None:
    host = token_registry.host
    cli.ok("pull", token_image)  # remembers that public/bb holds these blobs
    err = cli.fails("push", token_image, f"{host}/mine/bb:1")
    assert f"sandbox login {host}" in err
    err = cli.fails("login", "-u", "alice", "--password-stdin", host, input="wrong\n")
    assert "refused the credentials of 'alice'" in err
    _login(cli, host, USERS["alice"])
    token_server.requests.clear()
    proc = cli.ok("push", token_image, f"{host}/mine/bb:1")
    assert "3 mounted" in proc.stderr  # from public/bb, which the token also covers
    scopes = [s for r in token_server.requests for s in r["scopes"]]
    assert "repository:mine/bb:pull,push" in scopes and "repository:public/bb:pull" in scopes
    assert all(r["user"] == "alice" for r in token_server.requests)
    assert skopeo_digest(f"{host}/mine/bb:1") == proc.stdout.strip()


def test_auth_file_location_can_be_overridden(cli: Cli, basic_registry: Registry,
                                              basic_image: str) -> None:
    target = cli.config / "elsewhere.toml"
    env = {"SANDBOX_AUTH_FILE": str(target)}
    cli.ok("login", "-u", "alice", "--password-stdin", basic_registry.host,
           input="secret\n", extra_env=env)
    assert target.exists() and not (cli.config / "sandbox" / "auth.toml").exists()
    cli.ok("pull", basic_image, extra_env=env)
    assert oct(os.stat(target).st_mode & 0o777) == "0o600"
