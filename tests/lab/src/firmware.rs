//! Firmware boots: the guest's copy of the ESP disk (GPT, one FAT32 EFI System Partition with
//! systemd-boot) and OVMF, the UEFI firmware from the host's Debian `ovmf` package.
//!
//! The ESP is changed from the host with mtools (no loop device, no root needed): `lab start
//! --firmware --kernel VER` writes a `loader/loader.conf` whose `default` is VER's entry.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::recipe;

/// OVMF's code (read-only pflash unit 0), 4 MiB build, no Secure Boot: Debian's `ovmf` package.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's variable store template; each guest boots a writable copy (pflash unit 1).
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The OVMF code and variables template: `$KUP_LAB_OVMF_CODE`/`$KUP_LAB_OVMF_VARS`, else Debian's
/// files; an error naming the missing one and the package that has it.
pub fn ovmf() -> Result<(PathBuf, PathBuf)> {
    let pick = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let code = pick("KUP_LAB_OVMF_CODE", OVMF_CODE);
    let vars = pick("KUP_LAB_OVMF_VARS", OVMF_VARS);
    for f in [&code, &vars] {
        if !f.is_file() {
            bail!(
                "the UEFI firmware {} is missing: install Debian's ovmf package (tests/setup-host does), or point KUP_LAB_OVMF_CODE/KUP_LAB_OVMF_VARS at an OVMF 4M build",
                f.display()
            );
        }
    }
    Ok((code, vars))
}

/// Byte offset of the first partition of the GPT disk image `disk` (the ESP).
pub fn esp_offset(disk: &Path) -> Result<u64> {
    let mut head = vec![0u8; 34 * 512];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(disk)
            .with_context(|| format!("cannot open the ESP disk {}", disk.display()))?;
        f.read_exact(&mut head).with_context(|| {
            format!(
                "the ESP disk {} is too short for a GPT; rebuild the image (`lab image`)",
                disk.display()
            )
        })?;
    }
    first_partition_offset(&head).with_context(|| {
        format!(
            "the ESP disk {} has no usable GPT; rebuild the image (`lab image`)",
            disk.display()
        )
    })
}

/// The first partition's byte offset from the first 34 sectors of a GPT disk (512-byte sectors).
fn first_partition_offset(head: &[u8]) -> Result<u64> {
    let u64_at = |o: usize| -> Result<u64> {
        let b = head.get(o..o + 8).context("GPT header out of range")?;
        Ok(u64::from_le_bytes(b.try_into()?))
    };
    if head.get(512..520) != Some(b"EFI PART".as_slice()) {
        bail!("no \"EFI PART\" signature in sector 1");
    }
    let entries_lba = usize::try_from(u64_at(512 + 72)?)?;
    let first_lba = u64_at(entries_lba * 512 + 32)?;
    if first_lba == 0 {
        bail!("the first partition entry is empty");
    }
    Ok(first_lba * 512)
}

/// The mtools image argument of the ESP partition in `disk` (`FILE@@OFFSET`).
fn mtools_image(disk: &Path) -> Result<String> {
    Ok(format!("{}@@{}", disk.display(), esp_offset(disk)?))
}

fn mtools(tool: &str, disk: &Path, args: &[&str]) -> Result<std::process::Output> {
    Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(mtools_image(disk)?)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {tool}: install mtools (tests/setup-host does)"))
}

/// The boot entries (file names in `loader/entries`) on the ESP of `disk`.
pub fn entries(disk: &Path) -> Result<Vec<String>> {
    let out = mtools("mdir", disk, &["-b", "::/loader/entries"])?;
    if !out.status.success() {
        bail!(
            "cannot list loader/entries on the ESP {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().rsplit('/').next().map(str::to_owned))
        .filter(|n| n.ends_with(".conf"))
        .collect())
}

/// The `loader/loader.conf` that boots `version`'s entry at once: no menu, no editor.
pub fn loader_conf(version: &str) -> String {
    format!(
        "timeout 0\ndefault {}\neditor no\n",
        recipe::entry_id(version)
    )
}

/// Makes `version`'s entry the default of systemd-boot on the ESP of `disk` (a guest's own copy).
pub fn set_default(disk: &Path, version: &str) -> Result<()> {
    let id = recipe::entry_id(version);
    let have = entries(disk)?;
    if !have.contains(&id) {
        bail!(
            "the ESP {} has no boot entry {id} for kernel {version}; entries: {}; add the kernel to KERNELS in tests/lab/image/versions.env and rebuild the image",
            disk.display(),
            have.join(", ")
        );
    }
    let conf = disk.with_file_name("loader.conf");
    std::fs::write(&conf, loader_conf(version))?;
    let out = mtools(
        "mcopy",
        disk,
        &["-o", &conf.display().to_string(), "::/loader/loader.conf"],
    )?;
    if !out.status.success() {
        bail!(
            "cannot write loader/loader.conf on the ESP {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_partition_of_a_gpt() {
        let mut head = vec![0u8; 34 * 512];
        head[512..520].copy_from_slice(b"EFI PART");
        head[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        head[1024 + 32..1024 + 40].copy_from_slice(&2048u64.to_le_bytes());
        assert_eq!(first_partition_offset(&head).unwrap(), 1 << 20);
        head[1024 + 32..1024 + 40].copy_from_slice(&0u64.to_le_bytes());
        assert!(
            first_partition_offset(&head)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        head[512] = b'X';
        assert!(
            first_partition_offset(&head)
                .unwrap_err()
                .to_string()
                .contains("EFI PART")
        );
    }

    #[test]
    fn loader_conf_boots_the_entry_at_once() {
        let c = loader_conf("6.12.107+deb13-cloud-amd64");
        assert!(c.contains("timeout 0\n"), "{c}");
        assert!(
            c.contains("default kup-lab-6.12.107+deb13-cloud-amd64.conf\n"),
            "{c}"
        );
    }
}
