#!/bin/sh
# ncimage base hook, run on the build host while the root tree is bootstrapped (mmdebstrap
# --customize-hook). $1 is the tree. Its output is cached: keep it a function of its inputs.
# Inputs (environment): NCIMAGE_LUKS_UUID, NCIMAGE_BOOT_UUID, NCIMAGE_ENROLL_KEY (host path).
set -eu
root="$1"
: "${NCIMAGE_LUKS_UUID:?} ${NCIMAGE_BOOT_UUID:?} ${NCIMAGE_ENROLL_KEY:?}"

# The root is ext4 in LUKS2 (opened as /dev/mapper/root); /boot is its own ext4 partition
# that GRUB reads on both firmwares.
cat > "$root/etc/fstab" <<FSTAB
# <file system>               <mount point> <type> <options>                       <dump> <pass>
/dev/mapper/root              /             ext4   defaults,errors=remount-ro       0      1
UUID=$NCIMAGE_BOOT_UUID /boot         ext4   defaults,nodev,nosuid,noexec     0      2
FSTAB

install -d -m 0700 "$root/etc/ncimage/keys"
install -m 0400 "$NCIMAGE_ENROLL_KEY" "$root/etc/ncimage/keys/enroll.key"
# The machine's own crypttab: no key file. Its initramfs unlocks the root with clevis (TPM2,
# Tang) or the recovery key typed at the console, once first boot has bound them
# (ncimage rekey). /etc/ncimage/keys/enroll.key is read by ncimage rekey only.
cat > "$root/etc/crypttab" <<CRYPTTAB
# <name> <device>                                    <key file> <options>
root     UUID=$NCIMAGE_LUKS_UUID none       luks,discard,initramfs
CRYPTTAB

# initramfs-tools cannot see the root device from a chroot: name the filesystem and include
# the crypttab entry explicitly (the `initramfs` option).
cat > "$root/etc/initramfs-tools/conf.d/ncimage" <<'CONF'
# ncimage: no hibernation image to resume from; the root is ext4 inside LUKS2.
RESUME=none
FSTYPE=ext4
CONF
mkdir -p "$root/etc/cryptsetup-initramfs"
cat > "$root/etc/cryptsetup-initramfs/conf-hook" <<'CONF'
# ncimage: key files (none after first boot) are copied with a private umask.
UMASK=0077
CONF

# Kernel and initramfs under stable names in /boot, also after kernel upgrades.
cat > "$root/etc/kernel-img.conf" <<'CONF'
do_symlinks = yes
link_in_boot = yes
CONF
kver=$(ls "$root/lib/modules" | sort -V | tail -n1)
chroot "$root" update-initramfs -u -k "$kver" 2>&1 | grep -v -e "^update-initramfs: Generating" -e "Couldn.t determine root device" >&2 || true
test -s "$root/boot/initrd.img-$kver"
ln -sf "vmlinuz-$kver" "$root/boot/vmlinuz"
ln -sf "initrd.img-$kver" "$root/boot/initrd.img"
rm -f "$root/vmlinuz" "$root/vmlinuz.old" "$root/initrd.img" "$root/initrd.img.old"
# The initramfs carries no key: it must never open the root by itself.
if chroot "$root" lsinitramfs "/boot/initrd.img-$kver" | grep -q 'cryptroot/keyfiles'; then
  echo "ncimage hook: the initramfs carries a key file" >&2; exit 1
fi
chroot "$root" lsinitramfs "/boot/initrd.img-$kver" | grep -q 'clevis-luks-unlock' \
  || { echo "ncimage hook: the initramfs lacks clevis" >&2; exit 1; }

# First boot only: a small second initramfs (GRUB loads it after the main one when it exists;
# the kernel unpacks it over the main one) with the enrollment key and a crypttab naming it,
# so the image's first boot opens the root without a console. ncimage rekey deletes it once
# the machine has its own volume key and unlock methods, so no rebuild of the initramfs runs
# in the guest (minutes under TCG).
enroll=$(mktemp -d "$root/tmp/ncimage-enroll.XXXXXX")
trap 'rm -rf "$enroll"' EXIT
chroot "$root" unmkinitramfs "/boot/initrd.img-$kver" "/tmp/${enroll##*/}/x"
ct="$enroll/x/main/cryptroot/crypttab"
[ -f "$ct" ] || ct="$enroll/x/cryptroot/crypttab"
grep -q '^root ' "$ct" || { echo "ncimage hook: no root line in the initramfs crypttab" >&2; exit 1; }
mkdir -p "$enroll/c/cryptroot/keyfiles"
awk '$1 == "root" { $3 = "/cryptroot/keyfiles/root.key" } { print }' "$ct" > "$enroll/c/cryptroot/crypttab"
install -m 0400 "$NCIMAGE_ENROLL_KEY" "$enroll/c/cryptroot/keyfiles/root.key"
chmod 0700 "$enroll/c/cryptroot/keyfiles"
find "$enroll/c" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} +
(cd "$enroll/c" && find cryptroot | LC_ALL=C sort | chroot "$root" sh -c "cd /tmp/${enroll##*/}/c && cpio --quiet -o -H newc -R 0:0 --reproducible") > "$root/boot/ncimage-enroll.img"
chmod 0600 "$root/boot/ncimage-enroll.img"
chroot "$root" sh -c 'cpio --quiet -it < /boot/ncimage-enroll.img' | grep -q 'cryptroot/keyfiles/root.key' \
  || { echo "ncimage hook: the enrollment initramfs lacks the key" >&2; exit 1; }

# /etc and /var are as current as /usr: the packages' own scripts ran ldconfig and updated the
# journal's catalog when they were installed, and the image gives every file the time
# SOURCE_DATE_EPOCH. The stamps say so, so first boot skips ldconfig.service and
# systemd-journal-catalog-update.service (ConditionNeedsUpdate=; seconds each under TCG).
for d in etc var; do
  cat > "$root/$d/.updated" <<STAMP
# Written by the ncimage base hook, as systemd-update-done would: the modification time of
# /usr for which the most recent updates of /etc and /var have been applied.
TIMESTAMP_NSEC=${SOURCE_DATE_EPOCH:?}000000000
STAMP
done
