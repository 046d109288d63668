#!/bin/sh
# The pure cgroup v2 test: boot a Debian 12 guest (systemd, pure cgroup v2, as most users'
# hosts are) under QEMU, install this checkout in it as the README's first command does,
# and run doctor, the hello and the v2-relevant tests, as a user and as root, each from a
# plain ssh login session. Exits non-zero on any failure; prints a summary.
#
#   ./scripts/test-cgroup2-vm.sh [--keep] [-- PYTEST-ARGS...]
#
# As root (or a user with sudo); run scripts/install.sh first (the host's venv gives the
# pinned wheels and the images the offline guest needs). Installs qemu-system-x86 and
# mmdebstrap when missing. The guest image is built once and cached under
# $SANDBOX_VM_CACHE (default ~/.cache/sandbox/vm), keyed on its inputs; each run boots it
# with a throw-away overlay (QEMU -snapshot), so every run starts from the same guest.
# QEMU runs with TCG: nested KVM hangs on the CI machines. The guest has no network (QEMU's
# user network with restrict=on: only the forwarded ssh port). --keep leaves the guest running
# (its ssh command is printed) instead of stopping it by its pid.
set -eu
cd "$(dirname "$0")/.."
REPO=$(pwd)
KEEP=0
[ "${1:-}" = --keep ] && { KEEP=1; shift; }
[ "${1:-}" = -- ] && shift
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
CACHE=${SANDBOX_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandbox/vm}
T0=$(date +%s)
SUMMARY=""
FAILED=0
note() { echo "==> [$(( $(date +%s) - T0 ))s] $*"; }
record() {  # record NAME RC SECONDS
  SUMMARY="$SUMMARY$(printf '%-44s %s  %4ss' "$1" "$([ "$2" = 0 ] && echo ok || echo "FAIL (rc=$2)")" "$3")
"
  [ "$2" = 0 ] || FAILED=1
}

# -- host tools ------------------------------------------------------------------------
need=""
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
command -v mmdebstrap >/dev/null || need="$need mmdebstrap"
command -v mkfs.ext4 >/dev/null || need="$need e2fsprogs"
command -v ssh >/dev/null || need="$need openssh-client"
if [ -n "$need" ]; then
  note "installing$need"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
[ -x .venv/bin/sandbox ] || { echo "run ./scripts/install.sh first (the guest gets its wheels and images from it)" >&2; exit 1; }

# -- the guest image (cached) -----------------------------------------------------------
SOURCES=$(ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1)
KEY=$(cat scripts/vm/build-image.sh "$SOURCES" | cat - scripts/install.sh | grep -v '^#' \
      | sha256sum | cut -c1-16)
IMAGE=$CACHE/guest-$KEY
if [ ! -f "$IMAGE/disk.img" ]; then
  note "building the guest image (cached as $IMAGE)"
  $SUDO mkdir -p "$CACHE"
  for old in "$CACHE"/guest-*; do [ -d "$old" ] && $SUDO rm -rf "$old"; done  # one at a time
  t=$(date +%s); rc=0
  $SUDO env SOURCES="$SOURCES" sh scripts/vm/build-image.sh "$IMAGE" || rc=$?
  record "guest image built" $rc $(( $(date +%s) - t ))
  [ "$rc" = 0 ] || { printf '%s' "$SUMMARY"; exit 1; }
else
  note "guest image $IMAGE (cached)"
fi

# -- what the offline guest needs: wheels, images, the checkout ---------------------------
RUN=$(mktemp -d /var/tmp/sandbox-vm.XXXXXX)
QEMU_PID=""
cleanup() {
  if [ -n "$QEMU_PID" ] && [ "$KEEP" = 0 ]; then kill "$QEMU_PID" 2>/dev/null || true; fi
  if [ "$KEEP" = 0 ]; then rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$RUN/payload/images" "$RUN/payload/src"
.venv/bin/pip freeze --exclude-editable | grep -v -e '^#' -e '^-e' > "$RUN/constraints.txt"
WKEY=$(sha256sum < "$RUN/constraints.txt" | cut -c1-16)
WHEELS=$CACHE/wheels-$WKEY
if [ ! -d "$WHEELS" ]; then
  note "downloading the wheels the guest installs (cached as $WHEELS)"
  $SUDO mkdir -p "$WHEELS.tmp"; $SUDO chown "$(id -u)" "$WHEELS.tmp"
  .venv/bin/pip download -q -d "$WHEELS.tmp" --only-binary=:all: -r "$RUN/constraints.txt" \
    'setuptools>=68' pip wheel
  cp "$RUN/constraints.txt" "$WHEELS.tmp/constraints.txt"
  for old in "$CACHE"/wheels-*; do [ -d "$old" ] && [ "$old" != "$WHEELS.tmp" ] && $SUDO rm -rf "$old"; done
  mv "$WHEELS.tmp" "$WHEELS"
fi
cp -r "$WHEELS" "$RUN/payload/wheels"
note "saving the py3 and busybox images from this host's store"
for img in py3 busybox; do
  .venv/bin/sandbox images --json | grep -q "\"$img:latest\"" || .venv/bin/sandbox image build "$img" >/dev/null
  .venv/bin/sandbox image save "$img" -o "$RUN/payload/images/$img.tar"
done
# the working tree as it is (tracked and new files, uncommitted changes included)
git ls-files -z --cached --others --exclude-standard | xargs -0 tar -c -f - --ignore-failed-read 2>/dev/null \
  | tar -x -f - -C "$RUN/payload/src"
tar -c -f "$RUN/payload.tar" -C "$RUN/payload" .

# -- boot ---------------------------------------------------------------------------------
PORT=${SANDBOX_VM_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
ACCEL="-accel tcg,thread=multi -cpu max"
[ "${SANDBOX_VM_ACCEL:-tcg}" = kvm ] && ACCEL="-enable-kvm -cpu host"
note "booting the guest (TCG, 2 vCPUs, 4 GiB; ssh on 127.0.0.1:$PORT)"
t=$(date +%s)
# shellcheck disable=SC2086
qemu-system-x86_64 $ACCEL -m 4G -smp 2 -nodefaults \
  -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img" \
  -append 'root=/dev/vda rw console=ttyS0 mitigations=off' \
  -drive "file=$IMAGE/disk.img,if=virtio,format=raw,snapshot=on,cache=unsafe" \
  -drive "file=$RUN/payload.tar,if=virtio,format=raw,readonly=on" \
  -netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$PORT-:22" -device virtio-net-pci,netdev=n0 \
  -display none -serial "file:$RUN/console.log" -monitor none \
  -daemonize -pidfile "$RUN/qemu.pid"
QEMU_PID=$(cat "$RUN/qemu.pid")
vssh() {
  u=$1; shift
  ssh -q -i "$IMAGE/id_vm" -p "$PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o BatchMode=yes -o ConnectTimeout=5 -o ServerAliveInterval=15 "$u@127.0.0.1" "$@"
}
up=0
while [ $(( $(date +%s) - t )) -lt 600 ]; do
  if vssh root true 2>/dev/null; then up=1; break; fi
  kill -0 "$QEMU_PID" 2>/dev/null || break
  sleep 2
done
record "guest booted (ssh up)" $(( 1 - up )) $(( $(date +%s) - t ))
if [ "$up" = 0 ]; then tail -20 "$RUN/console.log" >&2; printf '\n%s' "$SUMMARY"; exit 1; fi

step() {  # step NAME USER TIMEOUT COMMAND...: a command in a fresh ssh login session
  name=$1 user=$2 limit=$3; shift 3
  note "$name"
  t=$(date +%s); rc=0
  timeout "$limit" ssh -q -i "$IMAGE/id_vm" -p "$PORT" -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o ServerAliveInterval=15 \
    "$user@127.0.0.1" "$@" || rc=$?
  record "$name" "$rc" $(( $(date +%s) - t ))
}
PYTEST_ARGS="$*"
step "carry the checkout in" root 300 sh -c "'mkdir -p /opt/sbvm && tar -x -f /dev/vdb -C /opt/sbvm && sh /opt/sbvm/src/scripts/vm/guest.sh setup'"
step "install as tester (README's first command)" tester 1200 sh /opt/sbvm/src/scripts/vm/guest.sh install
step "tests as tester, login session" tester 1500 sh /opt/sbvm/src/scripts/vm/guest.sh test "$PYTEST_ARGS"
step "root's images" root 600 sh /opt/sbvm/src/scripts/vm/guest.sh images
step "tests as root, login session" root 1500 sh /opt/sbvm/src/scripts/vm/guest.sh test "$PYTEST_ARGS"
step "nothing left behind in the guest" root 120 sh /opt/sbvm/src/scripts/vm/guest.sh leftovers

if [ "$KEEP" = 1 ]; then
  echo "guest kept running (qemu pid $QEMU_PID): ssh -i $IMAGE/id_vm -p $PORT tester@127.0.0.1; run dir $RUN"
fi
printf '\n==> summary (pure cgroup v2 guest, %ss in all)\n%s' "$(( $(date +%s) - T0 ))" "$SUMMARY"
exit "$FAILED"
