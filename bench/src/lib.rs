//! kup's downtime benchmark, host side: a memcached load generator whose every answer is checked
//! against a deterministic key/value scheme, the timeline it records (100 ms buckets, marks), the
//! measures taken from it (downtime, time back to 90 % of the baseline throughput), a results table
//! with the ratios between variants (markdown + JSON) and a throughput plot (PNG).
//!
//! The lab orchestration drives it: [`load_keys`], [`Load::start`], [`LoadHandle::mark`] around the
//! update, [`LoadHandle::stop`] -> [`Timeline`] -> [`Variant`] -> [`Table::new`], [`plot::plot`].
//! Definitions of every measure: [`timeline`].

pub mod lab;
pub mod load;
pub mod memcached;
pub mod plot;
pub mod report;
pub mod timeline;

use std::path::{Path, PathBuf};

pub use load::{Load, LoadConfig, LoadHandle, Progress};
pub use memcached::{answers, key, load_keys, value, verify_keys, working_set_bytes};
pub use plot::plot;
pub use report::{Analysis, Kind, Metrics, Ratio, Row, Table, Variant};
pub use timeline::{Bucket, Gap, Mark, Mode, Outage, Outcome, Timeline};

/// What can go wrong in the benchmark library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("memcached at 127.0.0.1:{port}: {source}")]
    Io {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("memcached at 127.0.0.1:{port} answered {reply:?} {context}")]
    Protocol {
        port: u16,
        context: &'static str,
        reply: String,
    },
    #[error("starting a load thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("plotting {}: {message}", path.display())]
    Plot { path: PathBuf, message: String },
}

pub(crate) fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_owned(),
        source,
    })?;
    std::fs::write(path, text).map_err(|source| Error::File {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::File {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_owned(),
        source,
    })
}
