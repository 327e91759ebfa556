//! Phase names of an update (`Update1.Phase`, `Progress(phase, ...)`).
//!
//! The engine reports its own stage names (the brief's stages: `stage`, `preflight`,
//! `pre-copy`, `dump`, `switch`); kupd adds the first and the two terminal ones.

/// The update was accepted and planned; the engine has not reported yet.
pub const PLANNED: &str = "planned";
/// Resolving and validating the target kernel.
pub const STAGE: &str = "stage";
/// Checks that run before any service is touched.
pub const PREFLIGHT: &str = "preflight";
/// Iterative pre-dumps while services keep running.
pub const PRE_COPY: &str = "pre-copy";
/// Freeze and final dump.
pub const DUMP: &str = "dump";
/// Loading the kernel and asking systemd to kexec: the machine goes away during this phase,
/// so a client that loses kupd now is watching a success in progress.
pub const SWITCH: &str = "switch";
/// Terminal: the engine returned success (`Finished(true, ...)`).
pub const DONE: &str = "done";
/// Terminal: the update failed before the switch (`Finished(false, ...)`); services run on.
pub const FAILED: &str = "failed";

/// Terminal: a caller cancelled the update before the switch (`Finished(false, ...)`); services
/// run on.
pub const CANCELLED: &str = "cancelled";

/// Whether `phase` is one an update never leaves.
#[must_use]
pub fn is_terminal(phase: &str) -> bool {
    phase == DONE || phase == FAILED || phase == CANCELLED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_done_and_failed_are_terminal() {
        assert!(is_terminal(DONE));
        assert!(is_terminal(FAILED));
        assert!(is_terminal(CANCELLED));
        for phase in [PLANNED, STAGE, PREFLIGHT, PRE_COPY, DUMP, SWITCH] {
            assert!(!is_terminal(phase), "{phase}");
        }
    }
}
