//! kup's early-boot hook in initrds, for both generators: dracut (module 90kup) and Debian's
//! initramfs-tools (hook `kup`, boot script `init-bottom/kup`). Both put the same handoff script,
//! `kup-handoff.sh`, into the initrd; that file is what [`has_module`] looks for.

use std::path::Path;
use std::process::Command;

/// The file every initrd made with kup's hook contains (dracut: `.../pre-pivot/90-kup-handoff.sh`,
/// initramfs-tools: `scripts/kup-handoff.sh`).
pub const HOOK_FILE: &str = "kup-handoff.sh";

/// The initrd generator installed on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// dracut (Fedora, RHEL, SUSE; optional on Debian).
    Dracut,
    /// initramfs-tools (Debian's and Ubuntu's default).
    InitramfsTools,
}

impl Generator {
    /// The generator found in `PATH` (dracut first, as `/etc/kernel/postinst.d` would run it).
    #[must_use]
    pub fn detect() -> Option<Self> {
        if which("dracut") {
            Some(Self::Dracut)
        } else if which("update-initramfs") {
            Some(Self::InitramfsTools)
        } else {
            None
        }
    }

    /// The command that rebuilds the initrd of kernel `version` (shown in messages).
    #[must_use]
    pub fn rebuild_command(self, version: &str) -> String {
        match self {
            Self::Dracut => format!("dracut -f --kver {version}"),
            Self::InitramfsTools => format!("update-initramfs -u -k {version}"),
        }
    }
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|dir| Path::new(dir).join(tool).is_file())
}

/// Why an initrd could not be checked or rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error(
        "cannot list {initrd}: neither lsinitrd (dracut) nor lsinitramfs (initramfs-tools) is installed; install dracut or initramfs-tools"
    )]
    NoLister { initrd: String },
    #[error("cannot list {initrd} with {tool}: {reason}; check that the file is an initrd (rebuild it with {fix})")]
    List {
        initrd: String,
        tool: &'static str,
        reason: String,
        fix: String,
    },
    #[error(
        "cannot rebuild the initrd of kernel {version}: neither dracut nor initramfs-tools is installed; install one of them"
    )]
    NoGenerator { version: String },
    #[error("rebuilding the initrd of kernel {version} failed ({command}: {reason}); run `{command}` by hand and fix what it reports")]
    Rebuild {
        version: String,
        command: String,
        reason: String,
    },
}

/// The names of the files in `initrd` (lsinitrd, or lsinitramfs where dracut is not installed).
///
/// # Errors
/// [`InitrdError`] when no lister is installed or the file cannot be listed.
pub fn list(initrd: &Path) -> Result<String, InitrdError> {
    let shown = initrd.display().to_string();
    let (tool, args): (&'static str, &[&str]) = if which("lsinitrd") {
        ("lsinitrd", &[])
    } else if which("lsinitramfs") {
        ("lsinitramfs", &[])
    } else {
        return Err(InitrdError::NoLister { initrd: shown });
    };
    let fix = Generator::detect().map_or_else(
        || "dracut or update-initramfs".to_owned(),
        |g| g.rebuild_command("VERSION"),
    );
    let out = Command::new(tool)
        .args(args)
        .arg(initrd)
        .output()
        .map_err(|e| InitrdError::List {
            initrd: shown.clone(),
            tool,
            reason: e.to_string(),
            fix: fix.clone(),
        })?;
    if !out.status.success() {
        return Err(InitrdError::List {
            initrd: shown,
            tool,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            fix,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a listing of an initrd shows kup's hook. Pure.
#[must_use]
pub fn listing_has_hook(listing: &str) -> bool {
    listing
        .lines()
        .any(|line| line.trim_end().ends_with(HOOK_FILE))
}

/// Whether `initrd` carries kup's early-boot hook; `false` when it cannot be listed.
#[must_use]
pub fn has_module(initrd: &Path) -> bool {
    list(initrd).is_ok_and(|listing| listing_has_hook(&listing))
}

/// Rebuilds the initrd of kernel `version` with the installed generator (which adds kup's hook,
/// since the package installs it for both generators).
///
/// # Errors
/// [`InitrdError`] when no generator is installed or it fails.
pub fn rebuild(version: &str) -> Result<Generator, InitrdError> {
    let generator = Generator::detect().ok_or_else(|| InitrdError::NoGenerator {
        version: version.to_owned(),
    })?;
    let command = generator.rebuild_command(version);
    let mut words = command.split_whitespace();
    let program = words.next().unwrap_or_default();
    let out = Command::new(program)
        .args(words)
        .output()
        .map_err(|e| InitrdError::Rebuild {
            version: version.to_owned(),
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(InitrdError::Rebuild {
            version: version.to_owned(),
            command,
            reason: format!("{}: {}", out.status, last.unwrap_or("no message").trim()),
        });
    }
    Ok(generator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_generators_listings_are_recognized() {
        let dracut = "drwxr-xr-x 2 root root 0 Nov 25 usr/lib/dracut/hooks/pre-pivot\n\
            -rwxr-xr-x 1 root root 1540 Nov 25 usr/lib/dracut/hooks/pre-pivot/90-kup-handoff.sh\n";
        assert!(listing_has_hook(dracut));
        let initramfs_tools = "scripts\nscripts/init-bottom\nscripts/init-bottom/kup\nscripts/kup-handoff.sh\n";
        assert!(listing_has_hook(initramfs_tools));
        assert!(!listing_has_hook("scripts/init-bottom/udev\nusr/bin/kup-handoff.sh.orig\n"));
    }

    #[test]
    fn rebuild_commands_name_the_kernel() {
        assert_eq!(
            Generator::Dracut.rebuild_command("6.12.117"),
            "dracut -f --kver 6.12.117"
        );
        assert_eq!(
            Generator::InitramfsTools.rebuild_command("6.12.117"),
            "update-initramfs -u -k 6.12.117"
        );
    }
}
