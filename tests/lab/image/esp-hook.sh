#!/bin/bash
# mmdebstrap customize hook: installs systemd-boot into ROOT/boot/efi (a tmpfs here, copied into the
# FAT32 partition of ESP_IMG at the end with mtools: no loop device needed) with one Boot Loader
# Specification entry per kernel, made by kernel-install from the image's own kernels and dracut
# initrds. ROOT/boot/efi stays in the root file system as the empty mount point.
# Usage: esp-hook.sh ROOT KERNEL...   (the first kernel is the default entry; KERNEL_CMDLINE,
# ENTRY_TOKEN and ESP_IMG, as mtools names the partition (FILE@@OFFSET), in the environment)
set -euo pipefail
root=${1:?usage: esp-hook.sh ROOT KERNEL...}
shift
default=${1:?esp-hook.sh: no kernels given}
: "${KERNEL_CMDLINE:?}" "${ENTRY_TOKEN:?}" "${ESP_IMG:?}"

mkdir -p "$root/etc/kernel" "$root/boot/efi"
printf '%s\n' "$KERNEL_CMDLINE" > "$root/etc/kernel/cmdline"
printf '%s\n' "$ENTRY_TOKEN" > "$root/etc/kernel/entry-token"
printf 'layout=bls\n' > "$root/etc/kernel/install.conf"

# /boot/efi is not a FAT partition here: relax bootctl's and kernel-install's ESP checks for the build
# only (in the guest it is a real GPT ESP, found without them). They still want a file system of its
# own (kernel-install writes the entries' paths relative to its mount point): a tmpfs.
export SYSTEMD_RELAX_ESP_CHECKS=1
mount -t tmpfs -o mode=0700 kup-lab-esp "$root/boot/efi"
trap 'umount "$root/boot/efi"' EXIT
# No NVRAM entries (the firmware boots EFI/BOOT/BOOTX64.EFI, the removable path) and no random seed
# (one image serves every guest).
chroot "$root" bootctl install --no-variables --random-seed=no --esp-path=/boot/efi
for k in "$@"; do
  chroot "$root" kernel-install --esp-path=/boot/efi add "$k" "/boot/vmlinuz-$k" "/boot/initrd.img-$k"
done
# The lab writes its own loader.conf per guest (the kernel it boots); this one is the image's default.
printf 'timeout 0\ndefault %s-%s.conf\neditor no\n' "$ENTRY_TOKEN" "$default" > "$root/boot/efi/loader/loader.conf"

esp="$root/boot/efi"
[ -s "$esp/EFI/BOOT/BOOTX64.EFI" ] || { echo "esp-hook: bootctl left no EFI/BOOT/BOOTX64.EFI in the ESP" >&2; exit 1; }
for k in "$@"; do
  e="$esp/loader/entries/$ENTRY_TOKEN-$k.conf"
  [ -s "$e" ] || { echo "esp-hook: kernel-install wrote no entry $e; entries: $(ls "$esp/loader/entries")" >&2; exit 1; }
  for key in linux initrd options; do
    grep -q "^$key " "$e" || { echo "esp-hook: $e has no '$key' line:" >&2; cat "$e" >&2; exit 1; }
  done
done
echo "esp-hook: ESP contents:"
(cd "$esp" && find . -type f -printf '%s\t%p\n' | sort -k2)
for e in "$esp"/loader/entries/*.conf; do echo "--- $e"; cat "$e"; done
MTOOLS_SKIP_CHECK=1 mcopy -s -Q -i "$ESP_IMG" "$esp"/* ::/
