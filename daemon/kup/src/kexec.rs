//! kexec: loading the target kernel with kexec_file_load (`kexec -s`, required for KHO/LUO and for
//! signed kernels) and asking systemd to switch to it.

use std::process::Command;

use crate::stage::Target;

/// Why the switch could not start.
#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    #[error("cannot run kexec: {0}; install kexec-tools")]
    Spawn(std::io::Error),
    #[error("kexec could not load {kernel}: {stderr}")]
    Load { kernel: String, stderr: String },
    #[error("systemd refused to kexec: {0}")]
    Switch(String),
}

/// `kexec -s -l` arguments for the target.
pub fn load_args(t: &Target) -> Vec<String> {
    vec![
        "-s".into(),
        "-l".into(),
        t.vmlinuz.display().to_string(),
        format!("--initrd={}", t.initrd.display()),
        format!("--command-line={}", t.cmdline),
    ]
}

/// Loads the target kernel.
pub fn load(t: &Target) -> Result<(), KexecError> {
    let out = Command::new("kexec")
        .args(load_args(t))
        .output()
        .map_err(KexecError::Spawn)?;
    if !out.status.success() {
        return Err(KexecError::Load {
            kernel: t.version.clone(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Unloads a loaded kernel (after a refusal, so a later reboot is an ordinary one).
pub fn unload() {
    let _ = Command::new("kexec").arg("-u").status();
}

/// Asks systemd to stop everything and kexec into the loaded kernel (returns at once). Kernel
/// `come_back_to` (where the handoff falls back) becomes the boot loader's one-shot next boot
/// ([`crate::bootloader::come_back_to`]). With `watchdog` seconds (0 = off), systemd first arms the
/// hardware watchdog for the kexec: the new kernel must take it over within that time, or the
/// machine resets into that one-shot entry (a hang; see [`crate::watchdog`]); not when kernel
/// `target` has no driver for it (it would reset the machine after a good switch).
pub fn switch(watchdog: u16, come_back_to: &str, target: &str) -> Result<(), KexecError> {
    match crate::bootloader::come_back_to(come_back_to) {
        Ok(what) => tracing::info!(kup_phase = "switch", "kup: {what}"),
        Err(e) => tracing::warn!(
            kup_phase = "switch",
            "kup: cannot set the firmware's next boot ({e}); after a panic, hang or power loss it boots the default entry"
        ),
    }
    if watchdog > 0 {
        match crate::watchdog::hang_protection()
            .or_else(|| crate::watchdog::target_cannot_drive(target))
        {
            None => match crate::systemd::set_kexec_watchdog(watchdog) {
                Ok(()) => tracing::info!(
                    kup_phase = "switch",
                    "kup: the hardware watchdog is armed for the switch: the new kernel has {watchdog} s to take it over"
                ),
                Err(e) => tracing::warn!(
                    kup_phase = "switch",
                    "kup: cannot arm the hardware watchdog for the switch ({e}); a new kernel that hangs needs a manual reset"
                ),
            },
            Some(why) => tracing::warn!(kup_phase = "switch", "kup: {why}"),
        }
    }
    crate::systemd::systemctl(&["kexec", "--no-block"])
        .map(|_| ())
        .map_err(|e| KexecError::Switch(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn loads_with_kexec_file_load_and_the_handoff_cmdline() {
        let t = Target {
            version: "6.12.117".into(),
            vmlinuz: PathBuf::from("/boot/vmlinuz-6.12.117"),
            initrd: PathBuf::from("/boot/initrd.img-6.12.117"),
            cmdline: "root=LABEL=r rw kup.handoff=1-a".into(),
        };
        assert_eq!(
            load_args(&t),
            [
                "-s",
                "-l",
                "/boot/vmlinuz-6.12.117",
                "--initrd=/boot/initrd.img-6.12.117",
                "--command-line=root=LABEL=r rw kup.handoff=1-a"
            ]
        );
    }
}
