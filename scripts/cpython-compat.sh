#!/bin/sh
# CPython's own regression suite, on this host and in a sandbox, and the modules whose
# outcome differs: what an ordinary program meets in a sandbox that it does not meet on a
# machine of its own. README ("Ordinary programs") records the last run.
#
#   ./scripts/cpython-compat.sh [REGRTEST-ARGS...]     (default: the whole suite, -j2)
#
# Needs Debian's libpython3.11-testsuite on the host (installed when missing, with sudo
# unless root) and builds an image `py3-testsuite` FROM py3 with the same package (network:
# Debian's archive). Takes about an hour on 2 CPUs (the suite runs twice). Output: the
# summary of each run in $OUT (default /var/tmp/cpython-compat), then the differences.
set -eu
cd "$(dirname "$0")/.."
S=.venv/bin/sandbox
OUT=${OUT:-/var/tmp/cpython-compat}
ARGS=${*:-"-j2 --timeout 900"}
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
mkdir -p "$OUT"

if ! dpkg-query -W -f='${Status}\n' libpython3.11-testsuite 2>/dev/null | grep -q ' installed$'; then
  echo "==> installing libpython3.11-testsuite on the host"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpython3.11-testsuite >/dev/null
fi

echo "==> the image py3-testsuite (FROM py3, with libpython3.11-testsuite)"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cat > "$ctx/Sandboxfile" <<'EOF'
FROM py3
RUN apt-get update -q && apt-get install -q -y libpython3.11-testsuite \
    && rm -rf /var/lib/apt/lists/*_* /var/cache/apt/archives/*.deb
EOF
$S build --network host -t py3-testsuite "$ctx" >/dev/null

echo "==> on the host: python3 -m test $ARGS (output in $OUT/host.txt)"
# As an unprivileged user, as the job runs (CPython's tests behave otherwise as root), with
# the environment variables a job gets.
AS=""
if [ "$(id -u)" = 0 ]; then
  id sandbox-test >/dev/null 2>&1 || useradd --create-home --shell /bin/sh sandbox-test
  AS="runuser -u sandbox-test --"
fi
mkdir -p "$OUT/home" && chmod 777 "$OUT/home"
# shellcheck disable=SC2086
(cd /tmp && $AS env -i PATH=/usr/bin:/bin HOME="$OUT/home" LANG=C.UTF-8 \
  /usr/bin/python3 -m test $ARGS > "$OUT/host.txt" 2>&1) || true

echo "==> in a sandbox: the same (output in $OUT/sandbox.txt)"
# shellcheck disable=SC2086
$S exec --image py3-testsuite --time 7200 --wall-time 7200 --memory 6G --pids 2048 \
  --disk 4G --output 64M python3 -m test $ARGS > "$OUT/sandbox.txt" 2>&1 || true

/usr/bin/python3 - "$OUT/host.txt" "$OUT/sandbox.txt" <<'PY'
import re, sys

def outcome(path):
    """module -> how it ended, from regrtest's summary ("N tests failed:" and the names
    indented below it)."""
    text = open(path, errors="replace").read()
    summary = text[text.rfind("== Tests result") if "== Tests result" in text else 0:]
    result, kind = {}, None
    for line in text.splitlines() if not summary else summary.splitlines():
        m = re.match(r"^(\d+ )?tests? (failed|skipped|altered the execution environment|"
                     r"failed again|omitted|crashed|run no tests|interrupted)", line.strip())
        if m and not line.startswith(" "):
            kind = m.group(2)
            continue
        if kind and line.startswith("    "):
            for name in line.split():
                result[name] = kind
        elif not line.startswith("    "):
            kind = None
    return result

host, box = outcome(sys.argv[1]), outcome(sys.argv[2])
bad = ("failed", "failed again", "crashed", "altered the execution environment")
only_box = sorted(m for m, k in box.items() if k in bad and host.get(m) not in bad)
only_host = sorted(m for m, k in host.items() if k in bad and box.get(m) not in bad)
skipped = sorted(m for m, k in box.items() if k == "skipped" and host.get(m) != "skipped")
for path in sys.argv[1:]:
    tail = [l for l in open(path, errors="replace").read().splitlines() if l.startswith(
        ("== Tests result", "Total duration", "Result:"))]
    print(f"{path}: {' | '.join(tail) or 'no summary (see the file)'}")
print(f"fail in the sandbox only ({len(only_box)}): {' '.join(only_box) or '-'}")
print(f"fail on the host only ({len(only_host)}): {' '.join(only_host) or '-'}")
print(f"skipped in the sandbox only ({len(skipped)}): {' '.join(skipped) or '-'}")
PY
