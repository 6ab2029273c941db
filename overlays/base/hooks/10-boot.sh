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
cat > "$root/etc/crypttab" <<CRYPTTAB
# <name> <device>                                    <key file>                      <options>
root     UUID=$NCIMAGE_LUKS_UUID /etc/ncimage/keys/enroll.key luks,discard,initramfs
CRYPTTAB

# initramfs-tools cannot see the root device from a chroot: name the filesystem and include
# the crypttab entry explicitly (the `initramfs` option), with the key file.
cat > "$root/etc/initramfs-tools/conf.d/ncimage" <<'CONF'
# ncimage: no hibernation image to resume from; the root is ext4 inside LUKS2.
RESUME=none
FSTYPE=ext4
CONF
mkdir -p "$root/etc/cryptsetup-initramfs"
cat > "$root/etc/cryptsetup-initramfs/conf-hook" <<'CONF'
# ncimage: the enrollment key opens the root at first boot without a console (a later
# stage replaces it with per-instance keys). Key files are copied with a private umask.
KEYFILE_PATTERN="/etc/ncimage/keys/*.key"
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
# The key must be inside the initramfs, or first boot waits at a passphrase prompt.
chroot "$root" lsinitramfs "/boot/initrd.img-$kver" | grep -q 'cryptroot/keyfiles/root.key' \
  || { echo "ncimage hook: the initramfs lacks the root key file" >&2; exit 1; }
