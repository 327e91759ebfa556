#!/bin/sh
# kup early boot (dracut pre-pivot hook): runs with the real root mounted at $NEWROOT, before systemd
# switches to it. Everything the restore needs from this stage is written to /run/kup (kept across the
# switch): `pending` (the handoff id) or `refused` (why the handoff cannot be restored here), and
# `resumed` when the boot was not made by kup (no kup.handoff= on the command line) but found an
# unfinished handoff: the machine lost power or crashed after the final dump, or the new kernel
# panicked, hung or never came up and the firmware booted the default kernel. The units were dumped
# and are not running anywhere, so they are restored on this boot.
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh

root=${NEWROOT:-/sysroot}
handoff=$root/var/lib/kup/handoff
# A dry-run's throwaway VM (kup.dryrun=1 beside kup.handoff=): its root is a copy-on-write view of
# the machine's disk (QEMU's snapshot=on), where the dry-run left its handoff in
# /var/lib/kup/dry-run. In this view only, that becomes the handoff to restore; the machine's own
# disk is never written by the VM.
if [ "$(getarg kup.dryrun=)" = 1 ]; then
    if [ -r "$root/var/lib/kup/dry-run/id" ]; then
        rm -rf "$handoff"
        mv "$root/var/lib/kup/dry-run" "$handoff"
        info "kup: dry-run VM: restoring the dry-run's checkpoints"
    else
        warn "kup: dry-run VM: no dry-run handoff in /var/lib/kup/dry-run"
    fi
fi
ondisk=$(cat "$handoff/id" 2>/dev/null)
# kup writes the manifest twice (manifest.json, then manifest.copy.json): either will do.
manifest=$handoff/manifest.json
[ -r "$manifest" ] || manifest=$handoff/manifest.copy.json
id=$(getarg kup.handoff=)
if [ -z "$id" ]; then
    if [ -z "$ondisk" ] || [ ! -r "$manifest" ]; then
        return 0 2>/dev/null || exit 0
    fi
    id=$ondisk
    mkdir -p /run/kup
    echo "$id" > /run/kup/resumed
    warn "kup: unfinished handoff $id found on a boot kup did not make (power loss, crash, panic or watchdog reset): restoring it here"
fi
mkdir -p /run/kup
refuse() {
    echo "$1" > /run/kup/refused
    warn "kup: handoff $id cannot be restored: $1"
}
# luo backend: the images are in RAM, handed over by the kernel (LUO); only a kexec keeps them. A
# boot through the firmware restores from the disk copy (luo_disk_copy), when the update made one.
luo=
grep -q '"backend": *"luo"' "$manifest" 2>/dev/null && luo=1
copy=
grep -q '"disk_copy": *"' "$manifest" 2>/dev/null && copy=1
if [ ! -r "$manifest" ]; then
    refuse "no manifest at /var/lib/kup/handoff/manifest.json nor its copy manifest.copy.json"
elif [ "$ondisk" != "$id" ]; then
    refuse "the manifest on disk belongs to handoff $ondisk, not $id"
elif [ -n "$luo" ] && [ -e /run/kup/resumed ] && [ -z "$copy" ]; then
    refuse "its images were kept in RAM only (backend \"luo\", luo_disk_copy = false) and a boot through the firmware does not keep RAM: the units start afresh (keep luo_disk_copy = true where a crash must not lose them)"
else
    if [ -n "$luo" ] && [ -e /run/kup/resumed ]; then
        warn "kup: handoff $id kept its images in RAM, lost with this boot through the firmware: kup-luo.service takes them from the disk copy"
    elif [ -n "$luo" ] && [ ! -c /dev/liveupdate ]; then
        if [ -n "$copy" ]; then
            warn "kup: handoff $id kept its images in RAM, but this kernel has no /dev/liveupdate (no LUO, or booted without kho=on liveupdate=on): kup-luo.service takes them from the disk copy"
        else
            warn "kup: handoff $id kept its images in RAM, but this kernel has no /dev/liveupdate (no LUO, or booted without kho=on liveupdate=on) and the update made no disk copy: kup-luo.service cannot take them back and the restore fails"
        fi
    fi
    # The restored processes need their old PIDs. Start every later process above the highest of them,
    # so nothing that boots from here on can take one (processes alive now are few and low).
    floor=$(cat "$handoff/pid-floor" 2>/dev/null)
    if [ -n "$floor" ] && [ -w /proc/sys/kernel/ns_last_pid ]; then
        echo "$floor" > /proc/sys/kernel/ns_last_pid
    fi
    echo "$id" > /run/kup/pending
    info "kup: handoff $id pending${luo:+ (images in RAM, LUO)}; PIDs from ${floor:-?} down kept free"
    # luo: the session is taken back here, before anything of the real root runs (a systemd that
    # opens /dev/liveupdate itself, a unit that needs the memory). A process of its own (`@` in
    # its name: the switch to the real root spares it; its PID is above the floor) holds it until
    # kup-luo.service takes it over. Where this cannot run (an initrd without kup-restore), or
    # fails, kup-luo.service takes the session itself.
    claim=/usr/lib/kup/kup-restore
    if [ -n "$luo" ] && [ ! -e /run/kup/resumed ] && [ -c /dev/liveupdate ] && [ -x "$claim" ]; then
        if said=$("$claim" luo-claim-early "$root" 2>&1); then
            info "$said"
        else
            warn "kup: the images kept in RAM were not taken back in the initramfs, kup-luo.service tries: $said"
        fi
    fi
fi
