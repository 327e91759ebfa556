//! The firmware's boot loader: which kernel the machine boots when a kernel kup switched to dies
//! (panic, watchdog reset, power loss). A kexec never changes the default entry, and on Debian the
//! default is usually the newest kernel, i.e. the one being tried. So for every switch kup makes the
//! kernel the handoff comes back to (the one the update started from) the **one-shot** next boot,
//! and clears that once the new kernel is blessed (optionally making it the default then).
//!
//! systemd-boot (BLS type #1 entries, `bootctl`) is supported: it is detected by the `LoaderInfo`
//! EFI variable it sets at boot. With GRUB or no EFI boot loader, kup says that a firmware reboot
//! boots the loader's default entry. Parsers take text and do no I/O.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `LoaderInfo` in systemd's loader vendor namespace: set by systemd-boot on the firmware boot.
const LOADER_INFO: &str =
    "/sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// Why the boot loader could not be told.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot run bootctl: {0}; install systemd-boot's tools (package systemd-boot)")]
    Spawn(std::io::Error),
    #[error("bootctl {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("cannot read bootctl's list of boot entries: {0}")]
    Parse(String),
    #[error(
        "systemd-boot has no entry for kernel {0}, so a firmware reboot could not come back to it; fix: kernel-install add {0} /boot/vmlinuz-{0} /boot/initrd.img-{0}"
    )]
    NoEntry(String),
}

/// One boot loader entry, as `bootctl list --json=short` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    /// The kernel version, when the entry says.
    pub version: Option<String>,
    /// The kernel image, relative to the partition the entry is on.
    pub linux: Option<String>,
    /// The initrds, relative to that partition.
    pub initrd: Vec<String>,
    /// The partition the entry is on (the ESP or XBOOTLDR), when bootctl says.
    pub root: Option<String>,
    pub is_default: bool,
}

/// The entries of `bootctl list --json=short` output.
pub fn parse_entries(json: &str) -> Result<Vec<Entry>, BootError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| BootError::Parse(e.to_string()))?;
    let list = v
        .as_array()
        .ok_or_else(|| BootError::Parse("not a JSON list".into()))?;
    let text =
        |e: &serde_json::Value, k: &str| e.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    Ok(list
        .iter()
        .filter_map(|e| {
            Some(Entry {
                id: text(e, "id")?,
                version: text(e, "version"),
                linux: text(e, "linux"),
                initrd: match e.get("initrd") {
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect(),
                    Some(serde_json::Value::String(s)) => vec![s.clone()],
                    _ => Vec::new(),
                },
                root: text(e, "root"),
                is_default: e
                    .get("isDefault")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false),
            })
        })
        .collect())
}

/// The entry that boots kernel `version`: its `version` field, else a kernel path naming it.
pub fn entry_for<'a>(entries: &'a [Entry], version: &str) -> Option<&'a Entry> {
    entries
        .iter()
        .find(|e| e.version.as_deref() == Some(version))
        .or_else(|| {
            entries.iter().find(|e| {
                e.linux.as_deref().is_some_and(|l| {
                    l.split('/')
                        .any(|part| part == version || part == format!("vmlinuz-{version}"))
                })
            })
        })
}

/// Whether this boot came through systemd-boot (a firmware boot; a kexec keeps the variable).
pub fn systemd_boot() -> bool {
    Path::new(LOADER_INFO).exists()
}

fn bootctl(args: &[&str]) -> Result<String, BootError> {
    run("bootctl", args)
}

/// Runs `program ARGS` (bootctl, kernel-install), returning its stdout.
fn run(program: &str, args: &[&str]) -> Result<String, BootError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(BootError::Spawn)?;
    if !out.status.success() {
        let args = args.join(" ");
        return Err(BootError::Failed {
            args: if program == "bootctl" {
                args
            } else {
                format!("({program}) {args}")
            },
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// systemd-boot's entries on this machine.
pub fn entries() -> Result<Vec<Entry>, BootError> {
    parse_entries(&bootctl(&["list", "--json=short", "--no-pager"])?)
}

/// systemd-boot's entry for kernel `version`.
fn entry(version: &str) -> Result<Entry, BootError> {
    entry_for(&entries()?, version)
        .cloned()
        .ok_or_else(|| BootError::NoEntry(version.to_owned()))
}

/// The initrd files (absolute paths) the firmware boots kernel `version` with; `Ok(None)` when the
/// machine does not boot through systemd-boot (the initrd in /boot is what counts then).
pub fn firmware_initrds(version: &str) -> Result<Option<Vec<PathBuf>>, BootError> {
    if !systemd_boot() {
        return Ok(None);
    }
    let e = entry(version)?;
    let root = match &e.root {
        Some(r) => PathBuf::from(r),
        None => PathBuf::from(bootctl(&["--print-esp-path"])?.trim()),
    };
    Ok(Some(
        e.initrd
            .iter()
            .map(|i| root.join(i.trim_start_matches('/')))
            .collect(),
    ))
}

/// For a switch: makes kernel `version` (the one the handoff falls back to) the firmware's one-shot
/// next boot, so that a panic, hang or power loss of the new kernel lands there, whatever the
/// default entry is. Says what it did, or why nothing could be done.
pub fn come_back_to(version: &str) -> Result<String, BootError> {
    if !systemd_boot() {
        return Ok(no_loader_note());
    }
    let e = entry(version)?;
    bootctl(&["set-oneshot", &e.id])?;
    Ok(format!(
        "the firmware's next boot is {} ({version}), once, should this switch not come through",
        e.id
    ))
}

/// For a blessed handoff on kernel `version`: clears the one-shot next boot the switch set, and with
/// `make_default` makes `version`'s entry the default. Says what it did.
pub fn blessed(version: &str, make_default: bool) -> Result<String, BootError> {
    if !systemd_boot() {
        return Ok(no_loader_note());
    }
    bootctl(&["set-oneshot", ""])?;
    if !make_default {
        return Ok("the one-shot next boot is cleared".into());
    }
    let e = entry(version)?;
    bootctl(&["set-default", &e.id])?;
    Ok(format!(
        "the one-shot next boot is cleared and {} ({version}) is the default entry",
        e.id
    ))
}

/// After kup rebuilt `/boot/initrd.img-VERSION`: the copy systemd-boot boots from the ESP is
/// refreshed too (`kernel-install add`), else a firmware boot would miss kup's hook. Nothing to do
/// without systemd-boot or without an entry for `version`. Says what it did.
pub fn sync_initrd(version: &str) -> Result<Option<String>, BootError> {
    if !systemd_boot() {
        return Ok(None);
    }
    if entry_for(&entries()?, version).is_none() {
        return Ok(None);
    }
    let (vmlinuz, initrd) = (
        format!("/boot/vmlinuz-{version}"),
        format!("/boot/initrd.img-{version}"),
    );
    run("kernel-install", &["add", version, &vmlinuz, &initrd])?;
    Ok(Some(format!(
        "systemd-boot's copy of {version}'s initrd refreshed (kernel-install add)"
    )))
}

fn no_loader_note() -> String {
    "this machine did not boot through systemd-boot: after a panic, hang or power loss the firmware boots its boot loader's default entry, which must be a kernel with kup's hook (GRUB: kup does not set grub-reboot yet)".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like systemd 257's `bootctl list --json=short`.
    const LIST: &str = r#"[
      {"type":"type1","source":"esp","id":"kup-lab-6.12.107+deb13-cloud-amd64.conf","root":"/boot/efi",
       "version":"6.12.107+deb13-cloud-amd64","linux":"/kup-lab/6.12.107+deb13-cloud-amd64/linux",
       "initrd":["/kup-lab/6.12.107+deb13-cloud-amd64/initrd.img-6.12.107+deb13-cloud-amd64"],
       "isDefault":false,"isSelected":true},
      {"type":"type1","source":"esp","id":"kup-lab-7.3.4+deb13-cloud-amd64.conf",
       "linux":"/kup-lab/7.3.4+deb13-cloud-amd64/linux","initrd":"/kup-lab/7.3.4+deb13-cloud-amd64/initrd",
       "isDefault":true},
      {"type":"loader","id":"auto-reboot-to-firmware-setup"}
    ]"#;

    #[test]
    fn entries_are_found_by_version_or_kernel_path() {
        let es = parse_entries(LIST).unwrap();
        assert_eq!(es.len(), 3);
        let old = entry_for(&es, "6.12.107+deb13-cloud-amd64").unwrap();
        assert_eq!(old.id, "kup-lab-6.12.107+deb13-cloud-amd64.conf");
        assert_eq!(old.root.as_deref(), Some("/boot/efi"));
        assert_eq!(old.initrd.len(), 1);
        assert!(!old.is_default);
        // No version field: the kernel's path names it.
        let major = entry_for(&es, "7.3.4+deb13-cloud-amd64").unwrap();
        assert!(major.is_default);
        assert_eq!(major.initrd, ["/kup-lab/7.3.4+deb13-cloud-amd64/initrd"]);
        assert!(entry_for(&es, "6.12.117+deb13-cloud-amd64").is_none());
        assert!(entry_for(&es, "6.12").is_none());
    }

    #[test]
    fn unreadable_lists_are_errors() {
        assert!(parse_entries("{}").is_err());
        assert!(parse_entries("not json").is_err());
        assert!(parse_entries("[]").unwrap().is_empty());
    }
}
