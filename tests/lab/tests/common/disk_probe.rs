//! The disk-write probe: how many bytes the guest's root disk wrote from a marker to the very end of
//! a boot, read by the host afterwards although the kexec ends everything in the guest. The guest
//! logs the counter (field 7 of the root block device's stat, `/sys/dev/block/MAJ:MIN/stat`, sectors
//! written; the root disk is vdc under Debian's 6.12 and may be named otherwise on other kernels, as
//! the virtio disks probe) to the kernel log at crit level, which the kernel prints on the serial console, which QEMU writes to the run directory's
//! console.log on the host: a background loop every 0.2 s when the counter changed, and
//! systemd-shutdown's hook once more after the final sync and unmount, right before the kexec.
//! The host parses that log (`kup_lab::console::disk_writes_since`).

use kup_lab::console::{DiskWrites, MARK_PREFIX, WRITTEN_PREFIX, disk_writes_since};

use super::Lab;

/// A guest command that starts the probe on the running boot (again after each kexec): makes sure
/// /dev/kmsg writes are not rate-limited (`printk_devkmsg=on`; the kernel's default, `ratelimit`,
/// drops all but 10 lines per 5 s; the lab guest's is already `on`), writes the
/// loop and the systemd-shutdown hook, and starts the loop as a transient service without default
/// dependencies, so no shutdown transaction stops it: it logs until systemd-shutdown's killing spree.
pub fn start() -> String {
    format!(
        "set -e; test -r /sys/dev/block/$(mountpoint -d /)/stat; \
         echo on > /proc/sys/kernel/printk_devkmsg; mkdir -p /usr/lib/kup-lab /usr/lib/systemd/system-shutdown; \
         printf '%s\\n' '#!/bin/sh' '# kup lab: the root disk sectors written, to the console when it changes' \
           's=/sys/dev/block/$(mountpoint -d /)/stat' 'last=' 'while :; do' '  read -r _ _ _ _ _ _ w _ < $s' \
           '  if [ \"$w\" != \"$last\" ]; then echo \"<2>{WRITTEN_PREFIX} $w\" > /dev/kmsg; last=$w; fi' \
           '  sleep 0.2' 'done' > /usr/lib/kup-lab/root-probe; \
         printf '%s\\n' '#!/bin/sh' '# kup lab: the root disk sectors written, last line before the kexec or reboot' \
           'read -r _ _ _ _ _ _ w _ < /sys/dev/block/$(mountpoint -d /)/stat' 'echo \"<2>{WRITTEN_PREFIX} $w final $1\" > /dev/kmsg' \
           > /usr/lib/systemd/system-shutdown/kup-lab-root-probe; \
         chmod 755 /usr/lib/kup-lab/root-probe /usr/lib/systemd/system-shutdown/kup-lab-root-probe; \
         systemctl stop kup-lab-root-probe 2>/dev/null || true; \
         systemd-run --quiet --collect --unit=kup-lab-root-probe -p DefaultDependencies=no /usr/lib/kup-lab/root-probe"
    )
}

/// A guest command that logs the marker `label` with the counter now: [`writes_since`] counts from
/// here.
pub fn mark(label: &str) -> String {
    format!(
        "d=$(mountpoint -d /); read -r _ _ _ _ _ _ w _ < /sys/dev/block/$d/stat; \
         echo \"<2>{MARK_PREFIX} {label} $w $(basename $(readlink /sys/dev/block/$d))\" > /dev/kmsg; echo $w"
    )
}

/// From the host, after the boot the marker was logged in has ended (or while it runs): what the
/// root disk wrote from the marker `label` to that boot's last probe line.
pub fn writes_since(lab: &Lab, label: &str) -> DiskWrites {
    let console = lab.ok(&["console"]);
    disk_writes_since(&console, label)
        .unwrap_or_else(|| panic!("no disk-probe marker {label:?} on the serial console"))
}
