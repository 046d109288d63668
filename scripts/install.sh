#!/bin/sh
# From a fresh Debian 12 / Ubuntu 24.04 machine to a sandboxed hello:
#   apt packages, a venv at .venv, cgroup delegation for you, the py3 image, and a first job.
# Run it as the user who will use sandbox (it asks sudo for the few steps that need root),
# or as root. Safe to run again.
set -eu
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
USER_NAME="$(id -un)"

# What the tool needs (libseccomp2, uidmap, mmdebstrap, busybox-static...) and what the tests
# start for real (bwrap, a registry, skopeo, podman). scripts/vm/build-image.sh reads this line.
APT_PACKAGES="python3 python3-venv libseccomp2 uidmap mmdebstrap busybox-static ca-certificates debian-archive-keyring gcc libc6-dev util-linux iproute2 bubblewrap docker-registry skopeo podman runc umoci apache2-utils"

echo "==> apt packages"
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    $missing >/dev/null
else
  echo "    all installed"
fi

echo "==> virtual environment in .venv"
# Debian's python3 (not a per-user build under /root or ~): the unprivileged test user and
# the spawner must be able to execute it.
if [ ! -x .venv/bin/python ]; then /usr/bin/python3 -m venv .venv; fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]' --config-settings editable_mode=compat  # a plain .pth: fast start-up
# Byte-compile now: with PYTHONDONTWRITEBYTECODE set, every start would compile from source.
.venv/bin/python -m compileall -q sandbox >/dev/null

if [ "$(cat /proc/sys/kernel/apparmor_restrict_unprivileged_userns 2>/dev/null || echo 0)" = 1 ]; then
  echo "==> AppArmor: allow user namespaces for the sandbox's interpreter only"
  # Ubuntu 23.10+ confines unprivileged user namespaces. Rather than turning that off for
  # the whole machine, give a private copy of the interpreter (used by the spawner) a
  # profile that allows them, as Ubuntu does for bwrap.
  cp -f "$(readlink -f .venv/bin/python)" .venv/bin/python-sandbox
  $SUDO tee /etc/apparmor.d/sandbox-python >/dev/null <<PROFILE
abi <abi/4.0>,
include <tunables/global>
profile sandbox-python $(pwd)/.venv/bin/python-sandbox flags=(unconfined) {
  userns,
}
PROFILE
  $SUDO apparmor_parser -r /etc/apparmor.d/sandbox-python
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "==> subordinate ids and a cgroup subtree for $USER_NAME"
  grep -q "^$USER_NAME:" /etc/subuid 2>/dev/null || \
    $SUDO usermod --add-subuids 1000000-1065535 --add-subgids 1000000-1065535 "$USER_NAME"
  $SUDO .venv/bin/sandbox system setup --user "$USER_NAME"
fi

echo "==> checking the host"
.venv/bin/sandbox doctor

if [ -n "${SANDBOX_IMAGES_FROM:-}" ]; then
  # A machine without network: images saved elsewhere (`sandbox image save py3 -o py3.tar`).
  echo "==> images from $SANDBOX_IMAGES_FROM"
  for archive in "$SANDBOX_IMAGES_FROM"/*.tar; do .venv/bin/sandbox image load -i "$archive"; done
else
  echo "==> the py3 image (Debian bookworm + python3, built rootless with mmdebstrap)"
  .venv/bin/sandbox image build py3
fi

echo "==> a sandboxed hello"
.venv/bin/sandbox exec --image py3 examples/hello.py
