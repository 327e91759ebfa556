//! Stage 1 of an update: find the installed kernels, pick the target, check that its image really is
//! that Linux kernel, and build the command line the new kernel boots with (`kup.handoff=<id>`).
//!
//! Parsers ([`parse_boot_dir`], [`parse_bls_entry`], [`bzimage_version`], [`uki_sections`],
//! [`handoff_cmdline`], [`compare_kernel_versions`]) are pure; [`installed_kernels`],
//! [`resolve_kernel`] and [`resolve_target`] read `/boot`.

use std::cmp::Ordering;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The kernel command-line key that marks a boot that must restore.
pub const HANDOFF_KEY: &str = "kup.handoff";
/// Default directory of kernels and initrds.
pub const BOOT_DIR: &str = "/boot";

/// Offset of the boot-sector signature 0x55 0xAA.
const BOOT_FLAG: usize = 0x1FE;
/// Offset of the setup header magic "HdrS".
const HEADER_MAGIC: usize = 0x202;
/// Offset of the u16 `kernel_version` field (pointer to the version string, minus 0x200).
const KERNEL_VERSION: usize = 0x20E;
/// Bytes of an image read to find its version string (the string is within the first 64 KiB + 0x200).
const HEADER_READ: u64 = 0x10200 + 0x100;

/// Why a kernel could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The bytes are not an x86 bzImage (also raised for EFI-stub kernels whose bzImage header is bad).
    #[error("not a Linux kernel image ({reason})")]
    NotKernelImage { reason: String },
    /// The bytes are not a unified kernel image.
    #[error("not a unified kernel image ({reason}); give a UKI built by ukify or dracut --uefi")]
    NotUki { reason: String },
    /// The requested kernel has no vmlinuz in the boot directory.
    #[error("kernel {version} is not installed: {} missing; installed: {}; install linux-image-{version}", missing.display(), list(installed))]
    NotInstalled {
        version: String,
        missing: PathBuf,
        installed: Vec<String>,
    },
    /// The requested kernel has a vmlinuz but no initrd.
    #[error("kernel {version} has no initrd: {} exists but neither initrd.img-{version} nor initramfs-{version}.img does; build it with `update-initramfs -c -k {version}` (or `dracut --kver {version}`)", vmlinuz.display())]
    NoInitrd { version: String, vmlinuz: PathBuf },
    /// No kernel with an initrd was found at all.
    #[error("no installed kernel found in {}: no vmlinuz-VERSION with a matching initrd.img-VERSION or initramfs-VERSION.img, and no usable BLS entry; install a kernel package", boot_dir.display())]
    NoKernels { boot_dir: PathBuf },
    /// The requested version string cannot be a kernel version.
    #[error(
        "{version:?} is not a kernel version; write it as `uname -r` prints it, e.g. 6.12.117+deb13-cloud-amd64"
    )]
    BadVersion { version: String },
    /// The image file is not the kernel it claims to be.
    #[error("{} is not a Linux kernel image of {version}: {reason}; reinstall linux-image-{version}", path.display())]
    BadImage {
        path: PathBuf,
        version: String,
        reason: String,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}; check that it exists and is readable by root", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn list(versions: &[String]) -> String {
    if versions.is_empty() {
        "none".to_string()
    } else {
        versions.join(", ")
    }
}

/// An installed kernel. Paths are relative to the boot directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    /// `uname -r` of the kernel.
    pub version: String,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

/// Finds kernels among the file names of a boot directory: `vmlinuz-VER` with `initrd.img-VER`
/// (Debian) or `initramfs-VER.img` (Fedora, dracut). Kernels without an initrd and rescue kernels
/// are left out. Sorted oldest first ([`compare_kernel_versions`]).
pub fn parse_boot_dir(names: &[String]) -> Vec<KernelEntry> {
    let has = |n: &str| names.iter().any(|x| x == n);
    let mut out: Vec<KernelEntry> = names
        .iter()
        .filter_map(|name| {
            let version = name.strip_prefix("vmlinuz-")?;
            if version.is_empty() || version.contains("-rescue-") {
                return None;
            }
            let initrd = [
                format!("initrd.img-{version}"),
                format!("initramfs-{version}.img"),
            ]
            .into_iter()
            .find(|n| has(n))?;
            Some(KernelEntry {
                version: version.to_string(),
                vmlinuz: PathBuf::from(name),
                initrd: PathBuf::from(initrd),
            })
        })
        .collect();
    out.sort_by(|a, b| compare_kernel_versions(&a.version, &b.version));
    out.dedup_by(|a, b| a.version == b.version);
    out
}

/// A Boot Loader Specification type #1 entry (`/boot/loader/entries/*.conf`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlsEntry {
    pub title: Option<String>,
    pub version: Option<String>,
    /// Kernel path, relative to the root of the partition holding the entries.
    pub linux: Option<String>,
    /// Initrd paths in order (several `initrd` lines are allowed).
    pub initrd: Vec<String>,
    /// All `options` lines joined by a space.
    pub options: String,
    /// EFI program (a UKI) instead of `linux`, if given.
    pub efi: Option<String>,
}

/// Parses a BLS entry. Unknown keys, blank lines and `#` comments are ignored.
pub fn parse_bls_entry(text: &str) -> BlsEntry {
    let mut entry = BlsEntry::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(|c: char| c.is_whitespace()) {
            Some((k, v)) => (k, v.trim()),
            None => (line, ""),
        };
        match key {
            "title" => entry.title = Some(value.to_string()),
            "version" => entry.version = Some(value.to_string()),
            "linux" => entry.linux = Some(value.to_string()),
            "efi" => entry.efi = Some(value.to_string()),
            "initrd" => entry
                .initrd
                .extend(value.split_whitespace().map(str::to_string)),
            "options" if !value.is_empty() => {
                if !entry.options.is_empty() {
                    entry.options.push(' ');
                }
                entry.options.push_str(value);
            }
            _ => {}
        }
    }
    entry
}

/// Orders kernel versions the way dpkg orders versions: runs of digits compare numerically,
/// other characters compare with letters before non-letters and `~` before everything
/// (so `6.12.107+deb13-cloud-amd64` < `6.12.117+deb13-cloud-amd64` < `7.3.4+deb13-cloud-amd64`).
pub fn compare_kernel_versions(a: &str, b: &str) -> Ordering {
    fn weight(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(c) => i32::from(c) + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // Non-digit prefix.
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let ca = a.get(i).copied().filter(|c| !c.is_ascii_digit());
            let cb = b.get(j).copied().filter(|c| !c.is_ascii_digit());
            match weight(ca).cmp(&weight(cb)) {
                Ordering::Equal => {}
                other => return other,
            }
            if ca.is_some() {
                i += 1;
            }
            if cb.is_some() {
                j += 1;
            }
        }
        // Digit run, compared numerically (leading zeros skipped, then length, then digits).
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let si = i;
        while a.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let sj = j;
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        let (da, db) = (&a[si..i], &b[sj..j]);
        match da.len().cmp(&db.len()).then_with(|| da.cmp(db)) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    Ordering::Equal
}

/// The newest of `entries` by [`compare_kernel_versions`].
pub fn newest(entries: &[KernelEntry]) -> Option<&KernelEntry> {
    entries
        .iter()
        .max_by(|a, b| compare_kernel_versions(&a.version, &b.version))
}

/// Reads the version of an x86 bzImage (also an EFI-stub kernel, whose PE header wraps the same
/// setup header): checks the 0x55AA boot signature at 0x1FE and `HdrS` at 0x202, follows the u16
/// `kernel_version` at 0x20E (+0x200) to the NUL-terminated version string and returns its first
/// word, e.g. `6.12.107+deb13-cloud-amd64`. The first 0x10300 bytes of the file are enough.
pub fn bzimage_version(bytes: &[u8]) -> Result<String, StageError> {
    let fail = |reason: String| Err(StageError::NotKernelImage { reason });
    if bytes.len() < KERNEL_VERSION + 2 {
        return fail(format!(
            "no bzImage header: only {} bytes, a kernel has at least {}",
            bytes.len(),
            KERNEL_VERSION + 2
        ));
    }
    if bytes[BOOT_FLAG..BOOT_FLAG + 2] != [0x55, 0xAA] {
        return fail("no bzImage header: no 0x55AA boot signature at 0x1FE".to_string());
    }
    if &bytes[HEADER_MAGIC..HEADER_MAGIC + 4] != b"HdrS" {
        return fail("no bzImage header: no \"HdrS\" magic at 0x202".to_string());
    }
    let ptr = u16::from_le_bytes([bytes[KERNEL_VERSION], bytes[KERNEL_VERSION + 1]]);
    if ptr == 0 {
        return fail("the bzImage header has no kernel_version string".to_string());
    }
    let start = usize::from(ptr) + 0x200;
    let Some(rest) = bytes.get(start..) else {
        return fail(format!(
            "the kernel_version string at {start:#x} lies beyond the {} bytes given",
            bytes.len()
        ));
    };
    let rest = &rest[..rest.len().min(512)];
    let Some(end) = rest.iter().position(|&b| b == 0) else {
        return fail(format!(
            "the kernel_version string at {start:#x} is not NUL-terminated"
        ));
    };
    let text = std::str::from_utf8(&rest[..end]).map_err(|_| StageError::NotKernelImage {
        reason: format!("the kernel_version string at {start:#x} is not text"),
    })?;
    match text.split_whitespace().next() {
        Some(v) if v.bytes().all(|b| b.is_ascii_graphic()) => Ok(v.to_string()),
        _ => fail(format!(
            "the kernel_version string at {start:#x} is empty or not printable"
        )),
    }
}

/// Where the parts of a unified kernel image lie in its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uki {
    /// The `.linux` section: the kernel (a bzImage).
    pub linux: Range<usize>,
    /// The `.initrd` section.
    pub initrd: Option<Range<usize>>,
    /// The `.cmdline` section as text, trailing NULs and whitespace removed.
    pub cmdline: Option<String>,
    /// The `.uname` section (`uname -r` of the kernel), trimmed.
    pub uname: Option<String>,
}

/// Finds the `.linux`, `.initrd`, `.cmdline` and `.uname` sections of a UKI (a PE/COFF file).
pub fn uki_sections(bytes: &[u8]) -> Result<Uki, StageError> {
    let pe = goblin::pe::PE::parse(bytes).map_err(|e| StageError::NotUki {
        reason: format!("not a PE/COFF file: {e}"),
    })?;
    let mut linux = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut uname = None;
    for section in &pe.sections {
        let raw_name = section.name;
        let end = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        let name = &raw_name[..end];
        let slot = match name {
            b".linux" => &mut linux,
            b".initrd" => &mut initrd,
            b".cmdline" => &mut cmdline,
            b".uname" => &mut uname,
            _ => continue,
        };
        let start = section.pointer_to_raw_data as usize;
        let raw = section.size_of_raw_data as usize;
        let virt = section.virtual_size as usize;
        // The raw size is padded to the file alignment; the virtual size is the real one.
        let len = if virt > 0 && virt <= raw { virt } else { raw };
        let range = start..start.saturating_add(len);
        if range.end > bytes.len() {
            return Err(StageError::NotUki {
                reason: format!(
                    "section {} ({:#x}..{:#x}) extends past the end of the file ({:#x} bytes)",
                    String::from_utf8_lossy(name),
                    range.start,
                    range.end,
                    bytes.len()
                ),
            });
        }
        *slot = Some(range);
    }
    let text = |r: Option<Range<usize>>| {
        r.map(|r| {
            String::from_utf8_lossy(&bytes[r])
                .trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string()
        })
    };
    let Some(linux) = linux else {
        return Err(StageError::NotUki {
            reason: "no .linux section".to_string(),
        });
    };
    Ok(Uki {
        linux,
        initrd,
        cmdline: text(cmdline),
        uname: text(uname),
    })
}

/// Splits a kernel command line into words, keeping double-quoted spaces inside a word.
fn cmdline_words(cmdline: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in cmdline.char_indices() {
        if c == '"' {
            quoted = !quoted;
        }
        if c.is_whitespace() && !quoted {
            if let Some(s) = start.take() {
                words.push(&cmdline[s..i]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        words.push(&cmdline[s..]);
    }
    words
}

fn word_key(word: &str) -> &str {
    word.split_once('=').map_or(word, |(k, _)| k)
}

/// Builds the new kernel's command line from the current one: drops `BOOT_IMAGE=`, `initrd=` and
/// any `kup.handoff=`, then appends `kup.handoff=<id>` and `extra`. Arguments after a lone `--`
/// (for init, not the kernel) stay after it.
pub fn handoff_cmdline(current: &str, handoff_id: &str, extra: &str) -> String {
    let words = cmdline_words(current);
    let split = words.iter().position(|w| *w == "--");
    let (kernel, init) = match split {
        Some(i) => (&words[..i], Some(&words[i + 1..])),
        None => (&words[..], None),
    };
    let mut out: Vec<String> = kernel
        .iter()
        .filter(|w| !matches!(word_key(w), "BOOT_IMAGE" | "initrd" | HANDOFF_KEY))
        .map(|w| (*w).to_string())
        .collect();
    out.push(format!("{HANDOFF_KEY}={handoff_id}"));
    out.extend(
        cmdline_words(extra)
            .into_iter()
            .filter(|w| word_key(w) != HANDOFF_KEY)
            .map(str::to_string),
    );
    if let Some(init) = init {
        out.push("--".to_string());
        out.extend(init.iter().map(|w| (*w).to_string()));
    }
    out.join(" ")
}

/// The handoff id on a kernel command line (`kup.handoff=<id>`, before any `--`); the last one wins.
pub fn handoff_id_from_cmdline(cmdline: &str) -> Option<&str> {
    cmdline_words(cmdline)
        .into_iter()
        .take_while(|w| *w != "--")
        .filter_map(|w| w.strip_prefix("kup.handoff="))
        .last()
        .filter(|id| !id.is_empty())
}

/// A kernel that was found and whose image was checked. Paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

/// What the switch stage loads: the checked kernel and its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

impl KernelImage {
    /// The target with the command line [`handoff_cmdline`] builds.
    pub fn into_target(self, current_cmdline: &str, handoff_id: &str, extra: &str) -> Target {
        Target {
            cmdline: handoff_cmdline(current_cmdline, handoff_id, extra),
            version: self.version,
            vmlinuz: self.vmlinuz,
            initrd: self.initrd,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StageError {
    let path = path.to_path_buf();
    move |source| StageError::Io { path, source }
}

/// A BLS path (relative to the root of the partition holding the entries) inside `boot_dir`:
/// `/vmlinuz-X` when /boot is its own partition, `/boot/vmlinuz-X` when it is not.
fn bls_path(boot_dir: &Path, path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    let direct = PathBuf::from(rel);
    if boot_dir.join(&direct).exists() {
        return direct;
    }
    match rel.strip_prefix("boot/") {
        Some(inner) if boot_dir.join(inner).exists() => PathBuf::from(inner),
        _ => direct,
    }
}

/// Kernels installed in `boot_dir`: `vmlinuz-VER` + initrd files ([`parse_boot_dir`]) and BLS
/// entries in `boot_dir/loader/entries` that name a version, a kernel and an initrd (for several
/// initrds, the last one, the main one after any microcode, is taken). Oldest first.
pub fn installed_kernels(boot_dir: &Path) -> Result<Vec<KernelEntry>, StageError> {
    let names: Vec<String> = std::fs::read_dir(boot_dir)
        .map_err(io_err(boot_dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let mut entries = parse_boot_dir(&names);

    let bls_dir = boot_dir.join("loader/entries");
    if let Ok(dir) = std::fs::read_dir(&bls_dir) {
        let mut files: Vec<PathBuf> = dir
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(io_err(&file))?;
            let bls = parse_bls_entry(&text);
            let (Some(version), Some(linux), Some(initrd)) =
                (bls.version, bls.linux, bls.initrd.last())
            else {
                continue;
            };
            if entries.iter().any(|e| e.version == version) {
                continue;
            }
            entries.push(KernelEntry {
                vmlinuz: bls_path(boot_dir, &linux),
                initrd: bls_path(boot_dir, initrd),
                version,
            });
        }
        entries.sort_by(|a, b| compare_kernel_versions(&a.version, &b.version));
    }
    Ok(entries)
}

/// Picks the kernel `wanted` (or the newest installed one) in `boot_dir` and checks that its image
/// is a Linux kernel of that version and that its initrd is there.
pub fn resolve_kernel(boot_dir: &Path, wanted: Option<&str>) -> Result<KernelImage, StageError> {
    if let Some(v) = wanted
        && (v.is_empty()
            || v.starts_with('.')
            || v.chars()
                .any(|c| c == '/' || c.is_whitespace() || c.is_control()))
    {
        return Err(StageError::BadVersion {
            version: v.to_string(),
        });
    }
    let entries = installed_kernels(boot_dir)?;
    let entry = match wanted {
        Some(v) => match entries.iter().find(|e| e.version == v) {
            Some(e) => e,
            None => {
                let vmlinuz = boot_dir.join(format!("vmlinuz-{v}"));
                if vmlinuz.is_file() {
                    return Err(StageError::NoInitrd {
                        version: v.to_string(),
                        vmlinuz,
                    });
                }
                return Err(StageError::NotInstalled {
                    version: v.to_string(),
                    missing: vmlinuz,
                    installed: entries.iter().map(|e| e.version.clone()).collect(),
                });
            }
        },
        None => newest(&entries).ok_or_else(|| StageError::NoKernels {
            boot_dir: boot_dir.to_path_buf(),
        })?,
    };

    let vmlinuz = boot_dir.join(&entry.vmlinuz);
    let initrd = boot_dir.join(&entry.initrd);
    let mut head = Vec::new();
    std::fs::File::open(&vmlinuz)
        .and_then(|f| f.take(HEADER_READ).read_to_end(&mut head))
        .map_err(io_err(&vmlinuz))?;
    let bad = |reason: String| StageError::BadImage {
        path: vmlinuz.clone(),
        version: entry.version.clone(),
        reason,
    };
    match bzimage_version(&head) {
        Ok(found) if found == entry.version => {}
        Ok(found) => {
            return Err(bad(format!("its header says it is kernel {found}")));
        }
        Err(e) => return Err(bad(e.to_string())),
    }
    let meta = std::fs::metadata(&initrd).map_err(io_err(&initrd))?;
    if !meta.is_file() || meta.len() == 0 {
        return Err(StageError::NoInitrd {
            version: entry.version.clone(),
            vmlinuz,
        });
    }
    Ok(KernelImage {
        version: entry.version.clone(),
        vmlinuz,
        initrd,
    })
}

/// [`resolve_kernel`], then the command line from `current_cmdline` (normally `/proc/cmdline`)
/// with `kup.handoff=<handoff_id>` and `extra` ([`handoff_cmdline`]).
pub fn resolve_target(
    boot_dir: &Path,
    wanted: Option<&str>,
    current_cmdline: &str,
    handoff_id: &str,
    extra: &str,
) -> Result<Target, StageError> {
    Ok(resolve_kernel(boot_dir, wanted)?.into_target(current_cmdline, handoff_id, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic bzImage: boot signature, HdrS, kernel_version pointer, version string.
    fn bzimage(version_string: &str) -> Vec<u8> {
        let mut b = vec![0u8; 0x4000];
        b[0] = b'M';
        b[1] = b'Z';
        b[0x1FE] = 0x55;
        b[0x1FF] = 0xAA;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
        let at = 0x3000usize;
        b[0x20E..0x210].copy_from_slice(&((at - 0x200) as u16).to_le_bytes());
        b[at..at + version_string.len()].copy_from_slice(version_string.as_bytes());
        b
    }

    const V107: &str = "6.12.107+deb13-cloud-amd64";
    const V117: &str = "6.12.117+deb13-cloud-amd64";
    const V734: &str = "7.3.4+deb13-cloud-amd64";

    #[test]
    fn bzimage_version_reads_first_word() {
        let img = bzimage(&format!(
            "{V107} (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.12.107-1"
        ));
        assert_eq!(bzimage_version(&img).unwrap(), V107);
    }

    #[test]
    fn bzimage_version_errors() {
        let good = bzimage(V107);
        let msg = |b: &[u8]| bzimage_version(b).unwrap_err().to_string();

        assert!(msg(&[0u8; 100]).starts_with("not a Linux kernel image (no bzImage header"));
        let mut b = good.clone();
        b[0x1FF] = 0;
        assert!(msg(&b).contains("no 0x55AA boot signature"), "{}", msg(&b));
        let mut b = good.clone();
        b[0x203] = b'x';
        assert!(msg(&b).contains("no \"HdrS\""), "{}", msg(&b));
        let mut b = good.clone();
        b[0x20E..0x210].copy_from_slice(&[0, 0]);
        assert!(msg(&b).contains("no kernel_version"), "{}", msg(&b));
        let mut b = good.clone();
        b[0x20E..0x210].copy_from_slice(&0xFF00u16.to_le_bytes());
        assert!(msg(&b).contains("beyond"), "{}", msg(&b));
        let mut b = good.clone();
        b.truncate(0x3000 + 5);
        assert!(msg(&b).contains("not NUL-terminated"), "{}", msg(&b));
        let b = bzimage("   ");
        assert!(msg(&b).contains("empty"), "{}", msg(&b));
        assert!(msg(b"").starts_with("not a Linux kernel image"));
    }

    #[test]
    fn version_ordering_is_numeric() {
        assert_eq!(compare_kernel_versions(V107, V117), Ordering::Less);
        assert_eq!(compare_kernel_versions(V117, V734), Ordering::Less);
        assert_eq!(compare_kernel_versions(V734, V107), Ordering::Greater);
        assert_eq!(compare_kernel_versions(V117, V117), Ordering::Equal);
        assert_eq!(
            compare_kernel_versions("6.12.9-amd64", "6.12.10-amd64"),
            Ordering::Less
        );
        assert_eq!(compare_kernel_versions("6.9", "6.10"), Ordering::Less);
        assert_eq!(compare_kernel_versions("6.1", "6.1.0"), Ordering::Less);
        assert_eq!(compare_kernel_versions("6.01", "6.1"), Ordering::Equal);
        assert_eq!(compare_kernel_versions("6.13~rc1", "6.13"), Ordering::Less);
        assert_eq!(
            compare_kernel_versions("6.12.0-55.el10.x86_64", "6.12.0-124.el10.x86_64"),
            Ordering::Less
        );
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn boot_dir_debian_and_fedora() {
        let n = names(&[
            "config-6.12.107+deb13-cloud-amd64",
            &format!("vmlinuz-{V734}"),
            &format!("initrd.img-{V734}"),
            &format!("vmlinuz-{V117}"),
            &format!("initrd.img-{V117}"),
            &format!("vmlinuz-{V107}"),
            &format!("initrd.img-{V107}"),
            "vmlinuz-6.13.0-nodisk", // no initrd: left out
            "vmlinuz-6.14.1-300.fc42.x86_64",
            "initramfs-6.14.1-300.fc42.x86_64.img",
            "vmlinuz-0-rescue-0123456789abcdef",
            "initramfs-0-rescue-0123456789abcdef.img",
            "vmlinuz.old",
            "System.map-6.12.107+deb13-cloud-amd64",
        ]);
        let entries = parse_boot_dir(&n);
        let versions: Vec<_> = entries.iter().map(|e| e.version.as_str()).collect();
        assert_eq!(versions, [V107, V117, "6.14.1-300.fc42.x86_64", V734]);
        assert_eq!(entries[0].vmlinuz, PathBuf::from(format!("vmlinuz-{V107}")));
        assert_eq!(
            entries[0].initrd,
            PathBuf::from(format!("initrd.img-{V107}"))
        );
        assert_eq!(
            entries[2].initrd,
            PathBuf::from("initramfs-6.14.1-300.fc42.x86_64.img")
        );
        assert_eq!(newest(&entries).unwrap().version, V734);
        assert_eq!(newest(&[]), None);
    }

    #[test]
    fn bls_entry() {
        let text = "# comment\n\
            title Fedora Linux (6.14.1-300.fc42.x86_64) 42 (Server Edition)\n\
            version 6.14.1-300.fc42.x86_64\n\
            linux /vmlinuz-6.14.1-300.fc42.x86_64\n\
            initrd /intel-ucode.img\n\
            initrd /initramfs-6.14.1-300.fc42.x86_64.img\n\
            options root=UUID=abc ro\n\
            options rhgb quiet\n\
            grub_users $grub_users\n\
            \n";
        let e = parse_bls_entry(text);
        assert_eq!(
            e.title.as_deref(),
            Some("Fedora Linux (6.14.1-300.fc42.x86_64) 42 (Server Edition)")
        );
        assert_eq!(e.version.as_deref(), Some("6.14.1-300.fc42.x86_64"));
        assert_eq!(e.linux.as_deref(), Some("/vmlinuz-6.14.1-300.fc42.x86_64"));
        assert_eq!(
            e.initrd,
            ["/intel-ucode.img", "/initramfs-6.14.1-300.fc42.x86_64.img"]
        );
        assert_eq!(e.options, "root=UUID=abc ro rhgb quiet");
        assert_eq!(e.efi, None);
        assert_eq!(parse_bls_entry(""), BlsEntry::default());
    }

    #[test]
    fn cmdline_drops_and_appends() {
        let cur = "BOOT_IMAGE=/boot/vmlinuz-6.12.107+deb13-cloud-amd64 root=UUID=1 ro initrd=\\initrd.img kup.handoff=old console=ttyS0";
        assert_eq!(
            handoff_cmdline(cur, "1767225600-3f9a2c1b", "quiet  loglevel=3"),
            "root=UUID=1 ro console=ttyS0 kup.handoff=1767225600-3f9a2c1b quiet loglevel=3"
        );
        assert_eq!(handoff_cmdline("", "x", ""), "kup.handoff=x");
        assert_eq!(handoff_cmdline("  ro\n", "x", " "), "ro kup.handoff=x");
    }

    #[test]
    fn cmdline_keeps_quotes_and_init_args() {
        let cur = "root=/dev/vda1 dyndbg=\"file foo.c +p\" -- single extra";
        assert_eq!(
            handoff_cmdline(cur, "id-1", "kup.handoff=evil panic=10"),
            "root=/dev/vda1 dyndbg=\"file foo.c +p\" kup.handoff=id-1 panic=10 -- single extra"
        );
    }

    #[test]
    fn cmdline_handoff_id() {
        assert_eq!(
            handoff_id_from_cmdline("ro kup.handoff=abc-1 quiet"),
            Some("abc-1")
        );
        assert_eq!(
            handoff_id_from_cmdline("kup.handoff=a kup.handoff=b"),
            Some("b")
        );
        assert_eq!(handoff_id_from_cmdline("ro -- kup.handoff=a"), None);
        assert_eq!(handoff_id_from_cmdline("ro kup.handoff="), None);
        assert_eq!(handoff_id_from_cmdline("ro"), None);
        let built = handoff_cmdline("BOOT_IMAGE=x ro", "17-ab", "");
        assert_eq!(handoff_id_from_cmdline(&built), Some("17-ab"));
    }

    /// A minimal PE32+ file with the given sections (name, data).
    fn pe(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[0..2].copy_from_slice(b"MZ");
        b[0x3C..0x40].copy_from_slice(&0x40u32.to_le_bytes());
        b[0x40..0x44].copy_from_slice(b"PE\0\0");
        let coff = 0x44;
        b[coff..coff + 2].copy_from_slice(&0x8664u16.to_le_bytes());
        b[coff + 2..coff + 4].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        b[coff + 16..coff + 18].copy_from_slice(&0xF0u16.to_le_bytes());
        b[coff + 18..coff + 20].copy_from_slice(&0x0022u16.to_le_bytes());
        let opt = coff + 20;
        b[opt..opt + 2].copy_from_slice(&0x20Bu16.to_le_bytes());
        b[opt + 32..opt + 36].copy_from_slice(&0x1000u32.to_le_bytes()); // section alignment
        b[opt + 36..opt + 40].copy_from_slice(&0x200u32.to_le_bytes()); // file alignment
        b[opt + 60..opt + 64].copy_from_slice(&0x400u32.to_le_bytes()); // size of headers
        b[opt + 68..opt + 70].copy_from_slice(&10u16.to_le_bytes()); // EFI application
        b[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes()); // data directories
        let mut table = opt + 0xF0;
        let mut va = 0x1000u32;
        for (name, data) in sections {
            let raw_ptr = b.len();
            let raw_size = data.len().div_ceil(0x200) * 0x200;
            b[table..table + name.len()].copy_from_slice(name.as_bytes());
            b[table + 8..table + 12].copy_from_slice(&(data.len() as u32).to_le_bytes());
            b[table + 12..table + 16].copy_from_slice(&va.to_le_bytes());
            b[table + 16..table + 20].copy_from_slice(&(raw_size as u32).to_le_bytes());
            b[table + 20..table + 24].copy_from_slice(&(raw_ptr as u32).to_le_bytes());
            b[table + 36..table + 40].copy_from_slice(&0x4000_0040u32.to_le_bytes());
            b.extend_from_slice(data);
            b.resize(raw_ptr + raw_size, 0);
            table += 40;
            va += (raw_size as u32).div_ceil(0x1000) * 0x1000;
        }
        let size_of_image = va;
        b[opt + 56..opt + 60].copy_from_slice(&size_of_image.to_le_bytes());
        b
    }

    #[test]
    fn uki_sections_found() {
        let kernel = bzimage(V117);
        let initrd = b"070701initrd-cpio".as_slice();
        let img = pe(&[
            (".osrel", b"ID=debian\n"),
            (".cmdline", b"root=/dev/vda1 ro\n\0"),
            (".uname", V117.as_bytes()),
            (".linux", &kernel),
            (".initrd", initrd),
        ]);
        let uki = uki_sections(&img).unwrap();
        assert_eq!(&img[uki.linux.clone()], kernel.as_slice());
        assert_eq!(bzimage_version(&img[uki.linux]).unwrap(), V117);
        assert_eq!(&img[uki.initrd.unwrap()], initrd);
        assert_eq!(uki.cmdline.as_deref(), Some("root=/dev/vda1 ro"));
        assert_eq!(uki.uname.as_deref(), Some(V117));
    }

    #[test]
    fn uki_errors() {
        let err = uki_sections(&pe(&[(".text", b"code")])).unwrap_err();
        assert!(err.to_string().contains("no .linux section"), "{err}");
        let err = uki_sections(b"not a pe file at all").unwrap_err();
        assert!(
            err.to_string().starts_with("not a unified kernel image"),
            "{err}"
        );
        // An EFI-stub kernel is a PE file and a bzImage at once, but not a UKI.
        let mut stub = pe(&[(".text", b"code")]);
        let bz = bzimage(V107);
        stub[0x1FE..0x210].copy_from_slice(&bz[0x1FE..0x210]);
        stub.resize(0x4000, 0);
        stub[0x3000..0x3000 + V107.len()].copy_from_slice(V107.as_bytes());
        assert_eq!(bzimage_version(&stub).unwrap(), V107);
        assert!(uki_sections(&stub).is_err());
    }

    fn boot_with(files: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
        dir
    }

    #[test]
    fn resolve_newest_and_wanted() {
        let boot = boot_with(&[
            (&format!("vmlinuz-{V107}"), bzimage(V107)),
            (&format!("initrd.img-{V107}"), b"cpio".to_vec()),
            (&format!("vmlinuz-{V117}"), bzimage(V117)),
            (&format!("initrd.img-{V117}"), b"cpio".to_vec()),
        ]);
        let k = resolve_kernel(boot.path(), None).unwrap();
        assert_eq!(k.version, V117);
        assert_eq!(k.vmlinuz, boot.path().join(format!("vmlinuz-{V117}")));
        assert_eq!(k.initrd, boot.path().join(format!("initrd.img-{V117}")));

        let t = resolve_target(boot.path(), Some(V107), "BOOT_IMAGE=x ro", "id-1", "").unwrap();
        assert_eq!(t.version, V107);
        assert_eq!(t.cmdline, "ro kup.handoff=id-1");
    }

    #[test]
    fn resolve_not_installed() {
        let boot = boot_with(&[
            (&format!("vmlinuz-{V107}"), bzimage(V107)),
            (&format!("initrd.img-{V107}"), b"cpio".to_vec()),
            (&format!("vmlinuz-{V117}"), bzimage(V117)),
            (&format!("initrd.img-{V117}"), b"cpio".to_vec()),
        ]);
        let err = resolve_kernel(boot.path(), Some(V734)).unwrap_err();
        let msg = err.to_string();
        let expected = format!(
            "kernel {V734} is not installed: {}/vmlinuz-{V734} missing; installed: {V107}, {V117}; install linux-image-{V734}",
            boot.path().display()
        );
        assert_eq!(msg, expected);

        let empty = boot_with(&[]);
        let err = resolve_kernel(empty.path(), None).unwrap_err();
        assert!(matches!(err, StageError::NoKernels { .. }), "{err:?}");
        let err = resolve_kernel(empty.path(), Some("../../etc")).unwrap_err();
        assert!(matches!(err, StageError::BadVersion { .. }), "{err:?}");
        let err = resolve_kernel(&empty.path().join("nope"), None).unwrap_err();
        assert!(matches!(err, StageError::Io { .. }), "{err:?}");
    }

    #[test]
    fn resolve_missing_initrd() {
        let boot = boot_with(&[(&format!("vmlinuz-{V117}"), bzimage(V117))]);
        let err = resolve_kernel(boot.path(), Some(V117)).unwrap_err();
        assert!(matches!(err, StageError::NoInitrd { .. }), "{err:?}");
        assert!(err.to_string().contains("update-initramfs -c -k"), "{err}");
    }

    #[test]
    fn resolve_rejects_wrong_or_missing_header() {
        let boot = boot_with(&[
            // A 6.12.107 image installed under the 6.12.117 name.
            (&format!("vmlinuz-{V117}"), bzimage(V107)),
            (&format!("initrd.img-{V117}"), b"cpio".to_vec()),
            (
                &format!("vmlinuz-{V734}"),
                b"#!/bin/sh\necho not a kernel\n".to_vec(),
            ),
            (&format!("initrd.img-{V734}"), b"cpio".to_vec()),
        ]);
        let err = resolve_kernel(boot.path(), Some(V117)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "is not a Linux kernel image of {V117}: its header says it is kernel {V107}"
            )),
            "{msg}"
        );
        let err = resolve_kernel(boot.path(), None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "vmlinuz-{V734} is not a Linux kernel image of {V734}"
            )),
            "{msg}"
        );
        assert!(msg.contains("no bzImage header"), "{msg}");
        assert!(
            msg.ends_with(&format!("reinstall linux-image-{V734}")),
            "{msg}"
        );
    }

    #[test]
    fn resolve_from_bls_entry() {
        let v = "6.14.1-300.fc42.x86_64";
        let boot = boot_with(&[
            (&format!("{v}/linux"), bzimage(v)),
            (&format!("{v}/initrd"), b"cpio".to_vec()),
            (
                "loader/entries/abc-6.14.1.conf",
                format!("title Fedora\nversion {v}\nlinux /boot/{v}/linux\ninitrd /boot/{v}/initrd\noptions ro\n").into_bytes(),
            ),
            ("loader/entries/uki.conf", b"title UKI\nefi /EFI/Linux/x.efi\n".to_vec()),
        ]);
        let k = resolve_kernel(boot.path(), None).unwrap();
        assert_eq!(k.version, v);
        assert_eq!(k.vmlinuz, boot.path().join(format!("{v}/linux")));
        assert_eq!(k.initrd, boot.path().join(format!("{v}/initrd")));
    }
}
