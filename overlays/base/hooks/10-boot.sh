#!/bin/sh
# ncimage base hook, run on the build host while the root tree is bootstrapped (mmdebstrap
# --customize-hook). $1 is the tree. Its output is cached: keep it a function of its inputs.
# Inputs (environment): NCIMAGE_LUKS_UUID, NCIMAGE_BOOT_UUID, NCIMAGE_ENROLL_KEY (host path),
# NCIMAGE_REENCRYPT_ARGS and NCIMAGE_OWN_KEY_MARK (first boot's re-encryption, from rekey.rs).
set -eu
root="$1"
: "${NCIMAGE_LUKS_UUID:?} ${NCIMAGE_BOOT_UUID:?} ${NCIMAGE_ENROLL_KEY:?}"
: "${NCIMAGE_REENCRYPT_ARGS:?} ${NCIMAGE_OWN_KEY_MARK:?}"

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
# It also re-encrypts the root under a fresh volume key before cryptroot opens it: offline,
# with no mapping active (no device-mapper reloads, udev events or stalled I/O in the booted
# system, as an online re-encryption makes for every hot zone), and resumed the same way after
# a power loss. The header's subsystem then says so, and ncimage rekey (first boot, in the
# booted system) takes the figures from /run and does the rest; if this fails, the root opens
# with the image's key as before and ncimage rekey re-encrypts it online.
main="$enroll/x/main"
[ -d "$main/scripts" ] || main="$enroll/x"
order="$main/scripts/local-top/ORDER"
grep -q '^/scripts/local-top/cryptroot ' "$order" || { echo "ncimage hook: cryptroot is not in $order" >&2; exit 1; }
mkdir -p "$enroll/c/scripts/local-top"
# The script reads the ext4 superblock with busybox's dd and od (initramfs-tools copies
# busybox in; klibc's tools have no od).
for t in dd od; do
  [ -x "$main/bin/$t" ] || [ -x "$main/usr/bin/$t" ] || { echo "ncimage hook: the initramfs has no $t (install busybox): first boot could not re-encrypt the root offline" >&2; exit 1; }
done
# The same ORDER without clevis: the enrollment key opens the root at first boot, and clevis's
# local-top loop (ps, awk and cut ten times a second until cryptroot asks for a passphrase)
# would take half the CPU of a TCG guest from the re-encryption.
grep -q '^/scripts/local-top/clevis ' "$order" || { echo "ncimage hook: clevis is not in $order" >&2; exit 1; }
awk '/^\/scripts\/local-top\/clevis / { skip = 2 } skip > 0 { skip--; next }
     /^\/scripts\/local-top\/cryptroot / { print "/scripts/local-top/ncimage-reencrypt \"$@\""; print "[ -e /conf/param.conf ] && . /conf/param.conf" } { print }' "$order" > "$enroll/c/scripts/local-top/ORDER"
grep -q '^/scripts/local-top/clevis ' "$enroll/c/scripts/local-top/ORDER" && { echo "ncimage hook: clevis is still in the first-boot ORDER" >&2; exit 1; }
cat > "$enroll/c/scripts/local-top/ncimage-reencrypt" <<SCRIPT
#!/bin/sh
# ncimage, first boot only (in /boot/ncimage-enroll.img, which ncimage rekey deletes): the root
# re-encrypted offline under a fresh volume key before cryptroot opens it with the enrollment
# key (written by overlays/base/hooks/10-boot.sh; parameters from rekey.rs).
case "\$1" in prereqs) exit 0 ;; esac
key=/cryptroot/keyfiles/root.key
mark='$NCIMAGE_OWN_KEY_MARK'
[ -r "\$key" ] || exit 0
uuid=\$(awk '\$1 == "root" { sub(/^UUID=/, "", \$2); print \$2 }' /cryptroot/crypttab)
dev=/dev/disk/by-uuid/\$uuid
i=0
while [ ! -b "\$dev" ] && [ \$i -lt 180 ]; do sleep 1; i=\$((i + 1)); done
say() { echo "ncimage-reencrypt: \$*"; }
[ -b "\$dev" ] || { say "no device with UUID \$uuid after 180 s: the booted system re-encrypts"; exit 0; }
dump=\$(cryptsetup luksDump "\$dev") || exit 0
[ "\$(echo "\$dump" | sed -n 's/^Subsystem:[[:space:]]*//p')" = "\$mark" ] && exit 0
read t0 _ < /proc/uptime
resumed=0
if echo "\$dump" | grep -q 'online-reencrypt'; then
  say "resuming the interrupted re-encryption of the root"
  resumed=1
  cryptsetup reencrypt --batch-mode --force-offline-reencrypt --key-file "\$key" --resume-only "\$dev" || { say "resuming failed: the booted system resumes online"; exit 0; }
  bytes=null
else
  # The image's filesystem only: its size from the ext4 superblock, through a read-only mapping.
  cryptsetup open --readonly --key-file "\$key" "\$dev" ncimage-probe || exit 0
  set -- \$(dd if=/dev/mapper/ncimage-probe bs=1024 skip=1 count=1 2>/dev/null | od -An -tu4 -v)
  # udev probes the new mapping; closed before that has finished, it would stay open, and an
  # active mapping would make cryptsetup re-encrypt online through it.
  udevadm settle --timeout=30 2>/dev/null
  cryptsetup close ncimage-probe
  [ -e /dev/mapper/ncimage-probe ] && { say "the probe mapping stayed open: the booted system re-encrypts"; exit 0; }
  if [ \$# -ne 256 ] || [ \$((\${15} & 65535)) -ne 61267 ]; then say "no ext4 superblock on the root: the booted system re-encrypts"; exit 0; fi
  # cryptsetup moves an inactive device to 4 KiB sectors only when told the data allows it
  # (--force-offline-reencrypt): ext4 with 4 KiB blocks does, and no mapping is active.
  [ "\$7" = 2 ] || { say "the root's ext4 blocks are not 4 KiB: the booted system re-encrypts"; exit 0; }
  bytes=\$(( (\${85} * 4294967296 + \$2) * (1024 << \$7) ))
  say "re-encrypting the root (\$((bytes >> 20)) MiB) under a fresh volume key"
  cryptsetup reencrypt --batch-mode --force-offline-reencrypt --key-file "\$key" --device-size "\$bytes" $NCIMAGE_REENCRYPT_ARGS "\$dev" || { say "re-encryption failed: the booted system resumes or re-encrypts online"; exit 0; }
fi
cryptsetup config --subsystem "\$mark" "\$dev" || exit 0
read t1 _ < /proc/uptime
secs=\$(awk -v a="\$t0" -v b="\$t1" 'BEGIN { printf "%.1f", b - a }')
echo "{\"seconds\": \$secs, \"bytes\": \$bytes, \"resumed\": \$resumed}" > /run/ncimage-reencrypt.json
say "done in \$secs s"
SCRIPT
chmod 0755 "$enroll/c/scripts/local-top/ncimage-reencrypt"
find "$enroll/c" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} +
(cd "$enroll/c" && find cryptroot scripts | LC_ALL=C sort | chroot "$root" sh -c "cd /tmp/${enroll##*/}/c && cpio --quiet -o -H newc -R 0:0 --reproducible") > "$root/boot/ncimage-enroll.img"
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
