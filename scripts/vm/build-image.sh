#!/bin/sh
# Build the pure cgroup v2 guest used by scripts/test-cgroup2-vm.sh: Debian 12 (bookworm)
# with systemd, its stock kernel and every package scripts/install.sh installs, as a sparse
# raw ext4 image, plus the kernel, the initrd and an ssh key to log in with.
#
# usage: build-image.sh OUTDIR        (as root; about 2 minutes with a warm mirror)
#
# The guest is what a Debian 12 server looks like: systemd 252, a pure cgroup v2 hierarchy,
# logins through pam_systemd (a login shell sits in session-N.scope, the user's manager in
# user@UID.service), dbus for the system bus and no per-user bus (no dbus-user-session), a
# user "tester" (uid 1000) with password-less sudo. Nothing of the project is in it: the
# harness carries the checkout in at every run.
set -eu
OUT=$1
SOURCES=${SOURCES:-$(ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1)}
INSTALL_PKGS=$(sed -n 's/^APT_PACKAGES="\(.*\)"$/\1/p' "$(dirname "$0")/../install.sh")
[ -n "$INSTALL_PKGS" ] || { echo "build-image.sh: no APT_PACKAGES line in scripts/install.sh" >&2; exit 1; }
GUEST_PKGS="systemd-sysv systemd dbus libpam-systemd linux-image-amd64 openssh-server sudo \
procps kmod less"
PKGS=$(echo $GUEST_PKGS $INSTALL_PKGS | tr ' ' ',')
mkdir -p "$OUT"
tmp=$(mktemp -d "$OUT/build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
ssh-keygen -q -t ed25519 -N '' -C sandbox-vm -f "$tmp/id_vm"
# Check-Valid-Until off: the mirror may serve a snapshot whose Release file has expired.
mmdebstrap --mode=root --variant=apt --include="$PKGS" \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --customize-hook='echo sbvm > "$1/etc/hostname"' \
  --customize-hook='printf "127.0.0.1 localhost\n127.0.1.1 sbvm\n::1 localhost ip6-localhost\n" > "$1/etc/hosts"' \
  --customize-hook='printf "/dev/vda / ext4 rw,relatime 0 1\n" > "$1/etc/fstab"' \
  --customize-hook='printf "[Match]\nName=en*\n[Network]\nDHCP=yes\n" > "$1/etc/systemd/network/10-en.network"' \
  --customize-hook='printf "nameserver 10.0.2.3\n" > "$1/etc/resolv.conf"' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd ssh' \
  --customize-hook='for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer docker-registry.service podman-auto-update.timer podman-restart.service podman-clean-transient.service systemd-networkd-wait-online.service; do chroot "$1" systemctl mask $u >/dev/null 2>&1 || true; done' \
  --customize-hook='chroot "$1" passwd -d root >/dev/null' \
  --customize-hook='chroot "$1" useradd -m -s /bin/bash -u 1000 tester' \
  --customize-hook='echo "tester ALL=(ALL) NOPASSWD:ALL" > "$1/etc/sudoers.d/tester"' \
  --customize-hook='mkdir -p "$1/root/.ssh" "$1/home/tester/.ssh"' \
  --customize-hook="cp $tmp/id_vm.pub \"\$1/root/.ssh/authorized_keys\"" \
  --customize-hook="cp $tmp/id_vm.pub \"\$1/home/tester/.ssh/authorized_keys\"" \
  --customize-hook='chroot "$1" chown -R tester:tester /home/tester/.ssh' \
  --customize-hook='printf "[Journal]\nStorage=volatile\n" > "$1/etc/systemd/journald.conf.d/volatile.conf" 2>/dev/null || { mkdir -p "$1/etc/systemd/journald.conf.d"; printf "[Journal]\nStorage=volatile\n" > "$1/etc/systemd/journald.conf.d/volatile.conf"; }' \
  bookworm "$tmp/rootfs" "$SOURCES"
cp -L "$tmp/rootfs/vmlinuz" "$tmp/vmlinuz"
cp -L "$tmp/rootfs/initrd.img" "$tmp/initrd.img"
truncate -s 12G "$tmp/disk.img"
mkfs.ext4 -q -L root -d "$tmp/rootfs" "$tmp/disk.img"
rm -rf "$tmp/rootfs"
for f in id_vm id_vm.pub vmlinuz initrd.img disk.img; do mv "$tmp/$f" "$OUT/$f"; done
echo "guest image in $OUT: $(du -sh "$OUT/disk.img" | cut -f1) on disk"
