//! The hardware watchdog (Linux's `/dev/watchdog` API), kup's guard against a new kernel that hangs.
//!
//! For the switch, kup has systemd arm the watchdog (`KExecWatchdogSec=`, set at run time by
//! [`crate::systemd::set_kexec_watchdog`]): systemd-shutdown leaves it running through the kexec,
//! provided the kernel being left keeps it running (`watchdog.stop_on_reboot=0`; most drivers stop it
//! at any reboot, kexec included). On the new kernel, `kup-watchdog.service` ([`feed_until_stopped`])
//! takes it over as soon as its driver has loaded and feeds it until kup-restore-finish has decided
//! (blessed, fallen back or given up), then disarms it (the magic close). A kernel or boot that hangs
//! before stops feeding it and the machine resets into the firmware's default kernel, whose early
//! boot restores the unfinished handoff (docs/RELIABILITY.md).

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// The watchdog systemd and kup use (systemd's default `WatchdogDevice=`).
pub const DEVICE: &str = "/dev/watchdog0";
/// The watchdog core's policy at reboot and kexec: -1 = the driver's choice, 0 = keep running.
pub const STOP_ON_REBOOT: &str = "/sys/module/watchdog/parameters/stop_on_reboot";
/// The kernel argument that keeps the watchdog running through the next kexec; kup gives it to every
/// kernel it starts when `kexec_watchdog` is on.
pub const KEEP_RUNNING_ARG: &str = "watchdog.stop_on_reboot=0";

/// Why the watchdog could not be fed.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("cannot handle SIGTERM (signalfd): {0}")]
    Signal(nix::Error),
    #[error("cannot open the watchdog {DEVICE}: {0}")]
    Open(std::io::Error),
    #[error(
        "cannot feed the watchdog {DEVICE}: {0}; the machine resets when it runs out (into the firmware's default kernel, which restores the handoff)"
    )]
    Feed(std::io::Error),
}

/// Why a hang of the new kernel would not reset this machine, from what the running kernel says:
/// `device` (whether [`DEVICE`] exists) and `stop_on_reboot` (the text of [`STOP_ON_REBOOT`]);
/// `None` when it would.
pub fn no_hang_protection(device: bool, stop_on_reboot: Option<&str>) -> Option<String> {
    if !device {
        return Some(format!(
            "this machine has no hardware watchdog ({DEVICE}), so a new kernel that hangs needs a manual reset"
        ));
    }
    match stop_on_reboot.map(str::trim) {
        Some("0") => None,
        _ => Some(format!(
            "the running kernel stops the watchdog at kexec, so a new kernel that hangs needs a manual reset; fix: boot it with {KEEP_RUNNING_ARG} (kup gives that to the kernels it starts)"
        )),
    }
}

/// The kernel module of the running watchdog's driver (`i6300esb`), when it has one.
pub fn driver_module() -> Option<String> {
    let link = std::fs::read_link("/sys/class/watchdog/watchdog0/device/driver/module").ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Whether a kernel's `modules.builtin` and `modules.dep` texts (from `/lib/modules/VER`) carry
/// `module` (`-` and `_` are the same in module names).
pub fn kernel_has_module(builtin: &str, dep: &str, module: &str) -> bool {
    let want = module.replace('-', "_");
    builtin.lines().chain(dep.lines()).any(|l| {
        let path = l.split(':').next().unwrap_or_default();
        let name = path.rsplit('/').next().unwrap_or_default();
        let stem = name.split(".ko").next().unwrap_or_default();
        !stem.is_empty() && name.contains(".ko") && stem.replace('-', "_") == want
    })
}

/// Why kernel `version` could not take the running watchdog over (no driver for it), so arming it
/// for the switch would reset the machine once that kernel is up; `None` when it can, or when
/// that cannot be told.
pub fn target_cannot_drive(version: &str) -> Option<String> {
    let module = driver_module()?;
    let dir = Path::new("/lib/modules").join(version);
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let dep = std::fs::read_to_string(dir.join("modules.dep")).ok()?;
    (!kernel_has_module(&builtin, &dep, &module)).then(|| {
        format!(
            "the new kernel {version} has no driver for this machine's watchdog ({module}), so the watchdog is not armed for the switch (it would reset the machine once {version} is up); a new kernel that hangs needs a manual reset"
        )
    })
}

/// [`no_hang_protection`] for this machine.
pub fn hang_protection() -> Option<String> {
    no_hang_protection(
        Path::new(DEVICE).exists(),
        std::fs::read_to_string(STOP_ON_REBOOT).ok().as_deref(),
    )
}

/// `kup-restore watchdog`: waits up to `wait` for the watchdog's driver to load, then feeds it every
/// `period` until SIGTERM or SIGINT (kup-restore-finish stops the service once it has decided, and
/// so does a shutdown), and disarms it then. Says what it did.
pub fn feed_until_stopped(wait: Duration, period: Duration) -> Result<String, WatchdogError> {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};

    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().map_err(WatchdogError::Signal)?;
    let signals =
        SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK).map_err(WatchdogError::Signal)?;
    let stopped = || matches!(signals.read_signal(), Ok(Some(_)));
    let tick = Duration::from_millis(200);

    let t0 = Instant::now();
    while !Path::new(DEVICE).exists() {
        if stopped() {
            return Ok("stopped before any watchdog appeared".into());
        }
        if t0.elapsed() > wait {
            return Ok(format!(
                "no watchdog ({DEVICE}) appeared within {} s: a hang of this boot needs a manual reset",
                wait.as_secs()
            ));
        }
        std::thread::sleep(tick);
    }
    let mut dev = match std::fs::OpenOptions::new().write(true).open(DEVICE) {
        Ok(f) => f,
        // One opener at a time: systemd's own RuntimeWatchdogSec= feeds it then.
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
            return Ok(format!(
                "{DEVICE} is held by another program (systemd's RuntimeWatchdogSec=?), which feeds it"
            ));
        }
        Err(e) => return Err(WatchdogError::Open(e)),
    };
    tracing::info!(
        kup_phase = "watchdog",
        "kup: feeding {DEVICE} until the restore is decided"
    );
    loop {
        dev.write_all(b"\0").map_err(WatchdogError::Feed)?;
        let fed = Instant::now();
        while fed.elapsed() < period {
            if stopped() {
                // The magic close: 'V', then close, and the watchdog stops.
                dev.write_all(b"V").map_err(WatchdogError::Feed)?;
                drop(dev);
                return Ok(format!("{DEVICE} disarmed"));
            }
            std::thread::sleep(tick);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_carries_a_watchdog_driver_built_in_or_as_a_module() {
        let dep = "kernel/drivers/watchdog/i6300esb.ko.xz: kernel/drivers/watchdog/watchdog.ko.xz\nkernel/drivers/watchdog/watchdog.ko.xz:\n";
        assert!(kernel_has_module("", dep, "i6300esb"));
        assert!(kernel_has_module(
            "kernel/drivers/watchdog/i6300esb.ko\n",
            "",
            "i6300esb"
        ));
        assert!(kernel_has_module(
            "",
            "kernel/drivers/watchdog/sp5100_tco.ko:\n",
            "sp5100-tco"
        ));
        // kup's lab kernels: every lab module built in, no watchdog driver among them.
        assert!(!kernel_has_module(
            "kernel/drivers/block/virtio_blk.ko\n",
            "",
            "i6300esb"
        ));
        assert!(!kernel_has_module("", dep, "i6300"));
    }

    #[test]
    fn hang_protection_needs_a_device_that_survives_kexec() {
        assert!(
            no_hang_protection(false, Some("0"))
                .unwrap()
                .contains("no hardware watchdog")
        );
        for param in [Some("-1\n"), Some("1"), None] {
            assert!(
                no_hang_protection(true, param)
                    .unwrap()
                    .contains("watchdog.stop_on_reboot=0"),
                "{param:?}"
            );
        }
        assert_eq!(no_hang_protection(true, Some("0\n")), None);
    }
}
