#!/bin/bash
# Builds the lab guest image from Debian's packages: OUT/root.img (ext4, no partition table),
# OUT/esp.img (a GPT disk with one EFI System Partition, FAT32 labelled KUP-ESP: systemd-boot and one
# BLS entry per kernel, for firmware boots; esp-hook.sh) and OUT/kernels/{vmlinuz,initrd.img}-VERSION
# for direct boot. Called by `lab image` with the effective
# pinned versions in the environment (see versions.env); MIRROR is read from this machine's apt config.
set -euo pipefail
out=${1:?usage: build-image.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
# kup's dracut module goes into the initrds as they are made (dracut runs natively here, in seconds,
# rather than in the guest under TCG); the lab's cache key covers it.
repo=$(cd "$here/../../.." && pwd)
: "${SUITE:?}" "${KERNELS:?}" "${CRIU_VERSION:?}" "${CRIU_SUITE:?}" "${PACKAGES:?}"
# The kernel command line of the BLS entries (the lab passes the same one with -append) and their
# entry token: given by the lab (kup_lab::recipe), covered by its cache key.
: "${KERNEL_CMDLINE:?}" "${ENTRY_TOKEN:?}"
for tool in sfdisk mkfs.vfat mcopy; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool is missing: run tests/setup-host (fdisk, dosfstools, mtools)" >&2; exit 1; }
done

# The Debian mirror this machine already uses (never written into the repository).
mirror=${KUP_LAB_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$( { grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
              grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'; } |
            grep -E '/debian/?$' | head -n1 || true)
fi
[ -n "$mirror" ] || { echo "build-image: no Debian mirror found in /etc/apt; set KUP_LAB_MIRROR=<debian mirror URI>" >&2; exit 1; }
security=${KUP_LAB_SECURITY_MIRROR:-${mirror%/debian}/debian-security}
echo "build-image: mirror $mirror"

includes=()
for p in $PACKAGES; do includes+=("$p"); done
includes+=("criu=$CRIU_VERSION")
for p in ${CRIU_DEPS:-}; do includes+=("$p/$CRIU_SUITE"); done
for k in $KERNELS; do
  s=$SUITE
  for pair in ${KERNEL_SUITES:-}; do [ "${pair%%=*}" = "$k" ] && s=${pair#*=}; done
  if [ "$s" != "$SUITE" ]; then includes+=("linux-base/$s" "linux-image-$k/$s"); else includes+=("linux-image-$k"); fi
done

root="$out/root"
rm -rf "$out"; mkdir -p "$out/kernels"
# The ESP: a GPT disk (so bootctl and kernel-install in the guest find it without relaxed checks)
# with one EFI System Partition from 1 MiB to the end, FAT32; esp-hook.sh fills it.
esp_mib=${ESP_SIZE_MIB:-512}
truncate -s "${esp_mib}M" "$out/esp.img"
printf 'label: gpt\nstart=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="KUP-ESP"\n' |
  sfdisk -q "$out/esp.img"
sectors=$(sfdisk -d "$out/esp.img" | sed -n 's/.*start= *2048, size= *\([0-9]*\).*/\1/p')
[ -n "$sectors" ] || { echo "build-image: cannot read the ESP partition's size back from sfdisk" >&2; exit 1; }
mkfs.vfat -F 32 -n KUP-ESP --offset 2048 "$out/esp.img" $((sectors / 2))
# shellcheck disable=SC2016
mmdebstrap --variant=apt --format=directory \
  --aptopt='APT::Default-Release "'"$SUITE"'"' \
  --aptopt='APT::Install-Recommends "false"' \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --dpkgopt='path-exclude=/usr/share/{doc,man,locale,info}/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --setup-hook='mkdir -p "$1/etc/dracut.conf.d" && cp '"$here"'/overlay/etc/dracut.conf.d/* "$1/etc/dracut.conf.d/"' \
  --setup-hook='mkdir -p "$1/usr/lib/dracut/modules.d" && cp -r '"$repo"'/dracut-module/90kup "$1/usr/lib/dracut/modules.d/"' \
  --essential-hook='mkdir -p "$1/etc/default" && echo "LOAD_KEXEC=false" > "$1/etc/default/kexec"' \
  --customize-hook='cp -a '"$here"'/overlay/. "$1/"' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd kup-lab-payload.service kup-lab-agent.service' \
  --customize-hook='chroot "$1" systemctl mask ndctl-monitor.service apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer systemd-networkd-wait-online.service kexec-load.service' \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook='sed -i -e "s/^-l 127.0.0.1/-l 0.0.0.0/" -e "s/^-m 64/-m 1024/" "$1/etc/memcached.conf"' \
  --customize-hook='sed -i -e "s/^bind 127.0.0.1 -::1/bind 0.0.0.0/" -e "s/^protected-mode yes/protected-mode no/" "$1/etc/redis/redis.conf"' \
  --customize-hook='sed -i "s/^LOAD_KEXEC=.*/LOAD_KEXEC=false/" "$1/etc/default/kexec"' \
  --customize-hook='for f in "$1"/boot/vmlinuz-* "$1"/boot/initrd.img-*; do cp "$f" '"$out"'/kernels/; done' \
  --customize-hook='KERNEL_CMDLINE="'"$KERNEL_CMDLINE"'" ENTRY_TOKEN='"$ENTRY_TOKEN"' ESP_IMG='"$out"'/esp.img@@1M '"$here"'/esp-hook.sh "$1" '"$KERNELS"'' \
  --customize-hook='mkdir -p "$1/var/cache/kup-lab/debs/partial" && chroot "$1" apt-get -y -q --download-only -o Dir::Cache::Archives=/var/cache/kup-lab/debs/ install '"${LOCAL_DEBS:-}"' && rm -rf "$1/var/cache/kup-lab/debs/partial" "$1/var/cache/kup-lab/debs/lock"' \
  --include="$(IFS=,; echo "${includes[*]}")" \
  "$SUITE" "$root" \
  "deb $mirror $SUITE main" "deb $mirror $SUITE-updates main" "deb $security $SUITE-security main" \
  "deb $mirror $SUITE-backports main" "deb $mirror $CRIU_SUITE main"

for k in $KERNELS; do
  for f in vmlinuz initrd.img; do
    [ -s "$out/kernels/$f-$k" ] || { echo "build-image: $f-$k missing after install" >&2; exit 1; }
  done
done
# LOCAL_DEBS, each with what it needs beyond the image, as .debs for offline installs in the guest.
for p in ${LOCAL_DEBS:-}; do
  ls "$root/var/cache/kup-lab/debs/${p}_"*.deb >/dev/null 2>&1 ||
    { echo "build-image: $p is missing from /var/cache/kup-lab/debs after apt-get --download-only (see above)" >&2; exit 1; }
done
# Guest services listen on the guest's address so the host reaches them through forwarded ports.
grep -q '^-l 0.0.0.0' "$root/etc/memcached.conf" && grep -q '^bind 0.0.0.0' "$root/etc/redis/redis.conf" ||
  { echo "build-image: could not make memcached/redis listen on 0.0.0.0 (their config format changed?)" >&2; exit 1; }
# The guest keeps its apt sources (the local package cache is used by later tests) but never
# reaches the network: drop the lists to keep the image small.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
echo "build-image: ESP: $(MTOOLS_SKIP_CHECK=1 minfo -i "$out/esp.img@@1M" :: | grep -m1 "disk label" || true), $(du -sh "$out/esp.img" | cut -f1) used"
mkfs.ext4 -q -L kup-lab-root -d "$root" -E lazy_itable_init=0 "$out/root.img" "${IMAGE_SIZE:-8G}"
rm -rf "$root"
echo "build-image: done: root $(du -sh --apparent-size "$out/root.img" | cut -f1) virtual, $(du -sh "$out/root.img" | cut -f1) allocated; esp $(du -sh "$out/esp.img" | cut -f1) allocated"
