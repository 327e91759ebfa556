//! Reading the guest's serial console log: finding kernel crashes, cutting excerpts for errors, and
//! reading the disk-write probe's lines (what the guest's root disk wrote up to a kexec).

/// Markers of a kernel crash on the console.
const CRASH_MARKERS: [&str; 4] = ["Kernel panic", "Oops", "BUG:", "double fault"];

/// The first crash in `log`, as an excerpt of the lines around it; `None` when there is none.
pub fn find_crash(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().collect();
    let at = lines
        .iter()
        .position(|l| CRASH_MARKERS.iter().any(|m| l.contains(m)))?;
    let start = at.saturating_sub(3);
    let end = (at + 25).min(lines.len());
    Some(lines[start..end].join("\n"))
}

/// The last `n` lines of the log.
pub fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The kernel-log line of the disk-write probe: `kup-lab-root-written N [...]`, N the sectors the
/// root filesystem's block device has written (field 7 of its `stat` in sysfs, 512-byte units).
pub const WRITTEN_PREFIX: &str = "kup-lab-root-written";
/// The probe's marker line: `kup-lab-root-mark LABEL N [DISK]`.
pub const MARK_PREFIX: &str = "kup-lab-root-mark";
/// The first console line of a (new) boot.
const BOOT_BANNER: &str = "Linux version ";

/// What the guest's root block device wrote between a probe marker and the end of that boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrites {
    /// The block device, as the marker names it (`vdc`).
    pub disk: String,
    /// Sectors written when the marker was logged.
    pub at_mark: u64,
    /// Sectors written at the boot's last probe line (the last one before the kexec or reboot).
    pub last: u64,
    /// Probe lines after the marker in that boot.
    pub samples: usize,
    /// The last line was the system-shutdown hook's (written after the final sync and unmount).
    pub final_seen: bool,
}

impl DiskWrites {
    /// Bytes written since the marker.
    pub fn bytes(&self) -> u64 {
        self.last.saturating_sub(self.at_mark) * 512
    }
}

/// The words after `prefix` on a console line (`[ 12.3] prefix a b`), if the line has it.
fn after<'a>(line: &'a str, prefix: &str) -> Option<Vec<&'a str>> {
    let at = line.find(prefix)?;
    Some(line[at + prefix.len()..].split_whitespace().collect())
}

/// The disk writes from the probe marker `label` to the last probe line of the same boot (the
/// boot ends at the next kernel's `Linux version` banner); `None` when the marker is not in `log`.
/// With no probe line after the marker, `last` is the marker's own count.
pub fn disk_writes_since(log: &str, label: &str) -> Option<DiskWrites> {
    let mut lines = log.lines();
    let (at_mark, disk) = lines.by_ref().find_map(|l| {
        let w = after(l, MARK_PREFIX)?;
        if w.first() != Some(&label) {
            return None;
        }
        Some((
            w.get(1)?.parse::<u64>().ok()?,
            w.get(2).unwrap_or(&"").to_string(),
        ))
    })?;
    let mut writes = DiskWrites {
        disk,
        at_mark,
        last: at_mark,
        samples: 0,
        final_seen: false,
    };
    for l in lines.take_while(|l| !l.contains(BOOT_BANNER)) {
        let Some(w) = after(l, WRITTEN_PREFIX) else {
            continue;
        };
        let Some(n) = w.first().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        writes.last = n;
        writes.samples += 1;
        writes.final_seen = w.get(1) == Some(&"final");
    }
    Some(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_oops_and_panics_with_context() {
        let log = "a\nb\nc\nd\n[ 4.7] Oops: double fault: 0000 [#1]\nRIP: x\n";
        let ex = find_crash(log).unwrap();
        assert!(ex.starts_with("b\n"), "{ex}");
        assert!(ex.contains("RIP: x"));
        assert!(find_crash("[ 9.1] Kernel panic - not syncing: VFS").is_some());
        assert!(find_crash("[ 1.0] BUG: kernel NULL pointer dereference").is_some());
    }

    #[test]
    fn a_clean_boot_is_not_a_crash() {
        assert_eq!(
            find_crash("Run /init as init process\nkup-lab login:\n"),
            None
        );
        assert_eq!(last_lines("1\n2\n3\n", 2), "2\n3");
    }

    #[test]
    fn disk_writes_from_the_marker_to_the_end_of_that_boot() {
        let log = "[ 1.0] kup-lab-root-written 10\n\
                   [ 2.0] kup-lab-root-mark hop1 100 vdc\r\n\
                   [ 2.2] kup-lab-root-written 180\n\
                   [ 3.0] kup-lab-root-written 2148\n\
                   [ 3.5] kup-lab-root-written 2200 final kexec\n\
                   [ 3.6] kexec_core: Starting new kernel\n\
                   [ 0.0] Linux version 7.2.13-kup\n\
                   [ 9.0] kup-lab-root-written 7\n\
                   [ 9.1] kup-lab-root-mark hop2 50\n";
        let w = disk_writes_since(log, "hop1").unwrap();
        assert_eq!(
            w,
            DiskWrites {
                disk: "vdc".into(),
                at_mark: 100,
                last: 2200,
                samples: 3,
                final_seen: true
            }
        );
        assert_eq!(w.bytes(), 2100 * 512);
        let w = disk_writes_since(log, "hop2").unwrap();
        assert_eq!((w.at_mark, w.last, w.samples, w.bytes()), (50, 50, 0, 0));
        assert!(!w.final_seen);
        assert_eq!(disk_writes_since(log, "hop3"), None);
        assert_eq!(disk_writes_since(log, "hop"), None);
    }
}
