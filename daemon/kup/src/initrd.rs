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

/// The Debian packages of the generators, in the order [`Generator::from_dpkg`] prefers them.
const PACKAGES: [(&str, Generator); 2] = [
    ("initramfs-tools", Generator::InitramfsTools),
    ("dracut", Generator::Dracut),
];

impl Generator {
    /// The generator this machine's kernel packages use.
    ///
    /// On Debian and its derivatives dpkg says: the `dracut` and `initramfs-tools` packages
    /// conflict, so one of them is installed. The commands do not tell: a switch from dracut to
    /// initramfs-tools (`apt install initramfs-tools`) leaves dracut-core, with `/usr/bin/dracut`
    /// and `lsinitrd`, installed until an autoremove. Without dpkg (or with neither package), the
    /// commands: dracut, then update-initramfs.
    #[must_use]
    pub fn detect() -> Option<Self> {
        let names: Vec<&str> = PACKAGES.iter().map(|(name, _)| *name).collect();
        // dpkg-query exits 1 when one of the names is unknown; it still prints the others.
        let dpkg = Command::new("dpkg-query")
            .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\\n"])
            .args(&names)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .and_then(|out| Self::from_dpkg(&String::from_utf8_lossy(&out.stdout)));
        dpkg.or_else(|| {
            if which("dracut") {
                Some(Self::Dracut)
            } else if which("update-initramfs") {
                Some(Self::InitramfsTools)
            } else {
                None
            }
        })
    }

    /// The generator whose package is installed, from `dpkg-query -W -f '${Package}
    /// ${db:Status-Abbrev}\n' initramfs-tools dracut`: `None` unless exactly one is (its files
    /// are there: unpacked, half-configured, awaiting or pending triggers, or installed). Pure.
    #[must_use]
    pub fn from_dpkg(listing: &str) -> Option<Self> {
        let mut installed = listing.lines().filter_map(|line| {
            let mut words = line.split_whitespace();
            let (name, status) = (words.next()?, words.next()?);
            let state = status.chars().nth(1)?;
            let generator = PACKAGES.iter().find(|(n, _)| *n == name)?.1;
            matches!(state, 'U' | 'F' | 'W' | 't' | 'i').then_some(generator)
        });
        let first = installed.next()?;
        installed.all(|g| g == first).then_some(first)
    }

    /// The command that rebuilds the initrd of kernel `version` (shown in messages).
    #[must_use]
    pub fn rebuild_command(self, version: &str) -> String {
        match self {
            Self::Dracut => format!("dracut -f --kver {version}"),
            Self::InitramfsTools => format!("update-initramfs -u -k {version}"),
        }
    }

    /// The command that lists the files of an initrd made by this generator.
    #[must_use]
    pub fn lister(self) -> &'static str {
        match self {
            Self::Dracut => "lsinitrd",
            Self::InitramfsTools => "lsinitramfs",
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
    #[error(
        "cannot list {initrd} with {tool}: {reason}; check that the file is an initrd (rebuild it with {fix})"
    )]
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
    #[error(
        "rebuilding the initrd of kernel {version} failed ({command}: {reason}); run `{command}` by hand and fix what it reports"
    )]
    Rebuild {
        version: String,
        command: String,
        reason: String,
    },
}

/// The names of the files in `initrd` (with the installed generator's lister, lsinitrd or
/// lsinitramfs, else the other one).
///
/// # Errors
/// [`InitrdError`] when no lister is installed or the file cannot be listed.
pub fn list(initrd: &Path) -> Result<String, InitrdError> {
    let shown = initrd.display().to_string();
    let generator = Generator::detect();
    // The generator's own lister first (either reads the other's initrds).
    let mut tools = vec!["lsinitrd", "lsinitramfs"];
    if let Some(g) = generator {
        tools.retain(|t| *t != g.lister());
        tools.insert(0, g.lister());
    }
    let Some(tool) = tools.into_iter().find(|t| which(t)) else {
        return Err(InitrdError::NoLister { initrd: shown });
    };
    let fix = generator.map_or_else(
        || "dracut or update-initramfs".to_owned(),
        |g| g.rebuild_command("VERSION"),
    );
    let out = Command::new(tool)
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

/// Whether `initrd` carries kup's early-boot hook; `false` when it cannot be read.
///
/// Reads the initrd itself (uncompressed cpio segments such as early microcode, then the main
/// archive through zstd, gzip, xz, lz4 or bzip2): a second under TCG where lsinitrd takes ten.
/// Falls back to lsinitrd/lsinitramfs for a layout it does not know.
#[must_use]
pub fn has_module(initrd: &Path) -> bool {
    match std::fs::read(initrd) {
        Ok(bytes) => match scan(&bytes, &decompress) {
            Some(found) => found,
            None => list(initrd).is_ok_and(|listing| listing_has_hook(&listing)),
        },
        Err(_) => false,
    }
}

/// The decompressor for a compressed segment starting with these bytes.
fn compressor(bytes: &[u8]) -> Option<&'static str> {
    const MAGICS: [(&[u8], &str); 5] = [
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (&[0x1f, 0x8b], "gzip"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
        (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
        (b"BZh", "bzip2"),
    ];
    MAGICS
        .iter()
        .find(|(magic, _)| bytes.starts_with(magic))
        .map(|(_, tool)| *tool)
}

/// `tool -dc` over `bytes` (a compressed segment and whatever follows it).
fn decompress(tool: &str, bytes: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = Command::new(tool)
        .args(["-dcq"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let input = bytes.to_vec();
    // Feed from a thread so a full stdout pipe cannot deadlock the write.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().ok()?;
    let _ = feeder.join();
    // Trailing padding after the stream makes some tools complain; what came out still counts.
    (!out.stdout.is_empty()).then_some(out.stdout)
}

/// Decompresses a segment with the named tool.
type Unpack<'a> = dyn Fn(&str, &[u8]) -> Option<Vec<u8>> + 'a;

/// Whether the cpio archive(s) in `bytes` hold a file named `*kup-handoff.sh`: `None` when the
/// layout is not one this reader knows. `unpack(tool, rest)` decompresses a compressed segment.
fn scan(bytes: &[u8], unpack: &Unpack<'_>) -> Option<bool> {
    let mut at = 0;
    loop {
        while bytes.get(at) == Some(&0) {
            at += 1;
        }
        let rest = bytes.get(at..)?;
        if rest.is_empty() {
            return Some(false);
        }
        if rest.starts_with(b"07070") {
            let (found, len) = cpio_names(rest)?;
            if found {
                return Some(true);
            }
            at += len;
            continue;
        }
        let tool = compressor(rest)?;
        let plain = unpack(tool, rest)?;
        // A compressed segment is the last one (the kernel reads no further, nor does dracut).
        return Some(cpio_names(&plain).is_some_and(|(found, _)| found));
    }
}

/// Walks one newc cpio archive: (whether a name ends in kup-handoff.sh, bytes up to its trailer).
fn cpio_names(bytes: &[u8]) -> Option<(bool, usize)> {
    let hex = |from: usize| -> Option<usize> {
        let field = std::str::from_utf8(bytes.get(from..from + 8)?).ok()?;
        usize::from_str_radix(field, 16).ok()
    };
    let pad4 = |n: usize| (n + 3) & !3;
    let mut at = 0;
    loop {
        if !bytes.get(at..)?.starts_with(b"07070") {
            return None;
        }
        let size = hex(at + 54)?;
        let namesize = hex(at + 94)?;
        let name = bytes.get(at + 110..at + 110 + namesize.saturating_sub(1))?;
        let next = pad4(at + 110 + namesize);
        if name == b"TRAILER!!!" {
            return Some((false, next));
        }
        if name.ends_with(HOOK_FILE.as_bytes()) {
            return Some((true, next));
        }
        at = pad4(next + size);
    }
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
    match crate::bootloader::sync_initrd(version) {
        Ok(Some(what)) => tracing::info!("kup: {what}"),
        Ok(None) => {}
        Err(e) => {
            return Err(InitrdError::Rebuild {
                version: version.to_owned(),
                command: format!(
                    "kernel-install add {version} /boot/vmlinuz-{version} /boot/initrd.img-{version}"
                ),
                reason: e.to_string(),
            });
        }
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
        let initramfs_tools =
            "scripts\nscripts/init-bottom\nscripts/init-bottom/kup\nscripts/kup-handoff.sh\n";
        assert!(listing_has_hook(initramfs_tools));
        assert!(!listing_has_hook(
            "scripts/init-bottom/udev\nusr/bin/kup-handoff.sh.orig\n"
        ));
    }

    fn newc(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut entry = |name: &str, data: &[u8]| {
            out.extend_from_slice(
                format!(
                    "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                    1, 0o100_644, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
                )
                .as_bytes(),
            );
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out.extend_from_slice(data);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        };
        for (name, data) in files {
            entry(name, data);
        }
        entry("TRAILER!!!", b"");
        out
    }

    #[test]
    fn plain_and_early_cpio_archives_are_read() {
        let no_unpack = |_: &str, _: &[u8]| -> Option<Vec<u8>> { None };
        let with = newc(&[("scripts", b""), ("scripts/kup-handoff.sh", b"#!/bin/sh\n")]);
        assert_eq!(scan(&with, &no_unpack), Some(true));
        let without = newc(&[("scripts/init-bottom/udev", b"x")]);
        assert_eq!(scan(&without, &no_unpack), Some(false));
        // Early microcode cpio, padding, then the main archive.
        let mut both = newc(&[("kernel/x86/microcode/GenuineIntel.bin", b"ucode")]);
        both.extend_from_slice(&[0; 512]);
        both.extend_from_slice(&with);
        assert_eq!(scan(&both, &no_unpack), Some(true));
        assert_eq!(scan(b"not an initrd", &no_unpack), None);
    }

    #[test]
    fn a_compressed_main_archive_goes_through_its_decompressor() {
        let main = newc(&[("usr/lib/dracut/hooks/pre-pivot/90-kup-handoff.sh", b"x")]);
        let mut initrd = newc(&[("early", b"")]);
        initrd.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]);
        let seen = std::cell::RefCell::new(String::new());
        let unpack = |tool: &str, rest: &[u8]| {
            seen.replace(format!("{tool} {}", rest.len()));
            Some(main.clone())
        };
        assert_eq!(scan(&initrd, &unpack), Some(true));
        assert_eq!(seen.borrow().as_str(), "zstd 7");
    }

    #[test]
    fn a_real_gzip_initrd_is_read_when_gzip_is_there() {
        use std::io::Write as _;
        use std::process::Stdio;
        let archive = newc(&[("scripts/kup-handoff.sh", b"x")]);
        let Ok(mut gzip) = Command::new("gzip")
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        else {
            panic!("gzip is part of every Debian system; install it");
        };
        gzip.stdin
            .take()
            .expect("stdin")
            .write_all(&archive)
            .expect("write");
        let compressed = gzip.wait_with_output().expect("gzip").stdout;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("initrd.img");
        std::fs::write(&path, &compressed).expect("write");
        assert!(has_module(&path));
        std::fs::write(&path, newc(&[("init", b"x")])).expect("write");
        assert!(!has_module(&path));
    }

    #[test]
    fn dpkg_says_which_generator_is_installed() {
        // After `apt install initramfs-tools` on a dracut machine: dracut removed, its conffiles
        // kept ("rc"); dracut-core (not asked about) still has /usr/bin/dracut.
        assert_eq!(
            Generator::from_dpkg("initramfs-tools ii \ndracut rc \n"),
            Some(Generator::InitramfsTools)
        );
        assert_eq!(
            Generator::from_dpkg("dracut ii \n"),
            Some(Generator::Dracut)
        );
        // initramfs-tools being configured by the same dpkg run (unpacked, triggers pending).
        assert_eq!(
            Generator::from_dpkg("initramfs-tools iU \ndracut un \n"),
            Some(Generator::InitramfsTools)
        );
        assert_eq!(
            Generator::from_dpkg("initramfs-tools it \n"),
            Some(Generator::InitramfsTools)
        );
        // Neither, both (a broken system) or no dpkg: the caller falls back to the commands.
        assert_eq!(
            Generator::from_dpkg("dracut rc \ninitramfs-tools pn \n"),
            None
        );
        assert_eq!(
            Generator::from_dpkg("dracut ii \ninitramfs-tools ii \n"),
            None
        );
        assert_eq!(Generator::from_dpkg(""), None);
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
