//! Reading the guest's serial console log: finding kernel crashes and cutting excerpts for errors.

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
}
