//! Logging of kup's programs (kupd, kup-restore): structured records to the journal, or plain lines
//! on stderr without a journal.
//!
//! Every field kup logs is named `kup_*` (journal: `KUP_*`, e.g. KUP_PHASE=, KUP_UPDATE_ID=,
//! KUP_TARGET=, KUP_CALLER=), or `unit` (UNIT=) for a systemd unit, so none collides with the
//! journal's own fields (MESSAGE=, TARGET= of tracing, CODE_*).

use std::io::IsTerminal as _;
use std::path::Path;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Environment variable holding a tracing filter (e.g. `kupd=debug,zbus=info`); default `info`.
pub const LOG_ENV: &str = "KUP_LOG";

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where the records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// The systemd journal, with structured fields.
    Journal,
    /// Standard error.
    Stderr,
}

/// Installs the global subscriber (once; later calls change nothing) with `identifier` as the
/// journal's SYSLOG_IDENTIFIER=, and says where logs go.
pub fn init(identifier: &str) -> LogTarget {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = if Path::new(JOURNAL_SOCKET).exists() {
        tracing_journald::layer()
            .ok()
            // Fields go to the journal under their own names (KUP_PHASE=, KUP_UPDATE_ID=,
            // KUP_TARGET=, UNIT=...), so `journalctl -u kupd KUP_PHASE=dump` finds them.
            .map(|layer| {
                layer
                    .with_syslog_identifier(identifier.to_owned())
                    .with_field_prefix(None)
            })
    } else {
        None
    };
    let target = if journald.is_some() {
        LogTarget::Journal
    } else {
        LogTarget::Stderr
    };
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
    });
    // Fails only when a subscriber is already installed, which is then kept.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init();
    target
}
