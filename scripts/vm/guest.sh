#!/bin/sh
# Inside the pure cgroup v2 guest; scripts/test-cgroup2-vm.sh runs each step over ssh, as a
# fresh login session of the user named:
#   setup       (root)   tester's checkout, pip offline
#   install     (tester) scripts/install.sh, the README's first command (offline: the apt
#                        packages are in the image, wheels and images were carried in)
#   images      (root)   root's image store and the test user's, from the carried-in
#                        archives (root uses tester's checkout and venv: a second install
#                        would only cost time)
#   test [ARGS] (either) doctor, the hello, then the tests that matter on cgroup v2
#   leftovers   (root)   no cgroup, unit, process or mount of ours left anywhere
set -u
P=/opt/sbvm
cmd=${1:-}; [ $# -gt 0 ] && shift

# The tests run here are those marked `cgroups` (pyproject.toml): what depends on the cgroup
# backend. The rest (isolation, images, registries...) is the same on v1 and v2 and runs on
# the host; under TCG programs run several times slower than on the host.

case "$cmd" in
setup)
  printf '[global]\nno-index = true\nfind-links = %s/wheels\n' "$P" > /etc/pip.conf
  chmod -R a+rX "$P"
  rm -rf /home/tester/sandbox
  cp -r "$P/src" /home/tester/sandbox
  chown -R tester:tester /home/tester/sandbox
  ;;
install)
  cd ~/sandbox || exit 1
  PIP_CONSTRAINT=$P/wheels/constraints.txt SANDBOX_IMAGES_FROM=$P/images exec ./scripts/install.sh
  ;;
images)
  # root's store, and that of the unprivileged user the tests create (tests/conftest.py),
  # made here so that it need not build py3 (the guest has no network)
  S=/home/tester/sandbox/.venv/bin/sandbox
  id sandbox-test >/dev/null 2>&1 || useradd --create-home --shell /bin/sh sandbox-test
  for archive in "$P"/images/*.tar; do
    $S image load -i "$archive" || exit 1
    runuser -u sandbox-test -- env -i HOME=/home/sandbox-test PATH=/usr/bin:/bin \
      $S image load -i "$archive" || exit 1
  done
  ;;
test)
  cd /home/tester/sandbox || exit 1
  export PYTHONDONTWRITEBYTECODE=1
  rc=0
  echo "--- $(id -un), $(systemctl --version | head -1), cgroup $(cat /proc/self/cgroup)"
  echo "--- sandbox doctor"
  .venv/bin/sandbox doctor || rc=1
  echo "--- the hello, in-process and through a daemon started on demand"
  .venv/bin/sandbox exec --image py3 examples/hello.py || rc=1
  SANDBOX_DAEMON=start .venv/bin/sandbox exec --image py3 examples/hello.py || rc=1
  .venv/bin/sandbox ps >/dev/null || rc=1
  if [ "$(id -u)" = 0 ]; then systemctl stop sandbox-daemon.service || rc=1
  else systemctl --user stop sandbox-daemon.service || rc=1; fi
  echo "--- pytest"
  # shellcheck disable=SC2086
  .venv/bin/pytest -p no:cacheprovider -q --durations=15 -m cgroups ${*:-tests} || rc=1
  exit $rc
  ;;
leftovers)
  rc=0
  left=$(find /sys/fs/cgroup -type d \( -name 'sandbox-*' -o -regex '.*/[0-9]+-[0-9a-z]+' \) 2>/dev/null)
  [ -z "$left" ] || { echo "cgroups left:"; echo "$left"; rc=1; }
  units=$(systemctl list-units --all --plain --no-legend 'sandbox-*')
  [ -z "$units" ] || { echo "system units left:"; echo "$units"; rc=1; }
  for u in tester sandbox-test; do
    uid=$(id -u "$u" 2>/dev/null) || continue
    [ -S "/run/user/$uid/systemd/private" ] || continue
    units=$(runuser -u "$u" -- env XDG_RUNTIME_DIR="/run/user/$uid" \
            systemctl --user list-units --all --plain --no-legend 'sandbox-*')
    [ -z "$units" ] || { echo "$u's units left:"; echo "$units"; rc=1; }
  done
  procs=$(ps -eo pid=,user=,args= | grep -e sandbox-init -e '_spawner' -e 'sandbox daemon' | grep -v grep)
  [ -z "$procs" ] || { echo "processes left:"; echo "$procs"; rc=1; }
  mounts=$(grep -e ' overlay ' /proc/self/mounts)
  [ -z "$mounts" ] || { echo "mounts left:"; echo "$mounts"; rc=1; }
  [ "$rc" = 0 ] && echo "nothing left: no cgroup, unit, process or mount of ours"
  exit $rc
  ;;
*)
  echo "usage: guest.sh setup|install|images|test [PYTEST-ARGS]|leftovers" >&2
  exit 2
  ;;
esac
