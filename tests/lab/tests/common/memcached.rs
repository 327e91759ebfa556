//! memcached from the host for the lab tests: the key/value scheme, loading and checking are
//! kup-bench's (one source of truth with the benchmark); [`Kept`] is a connection kept across an update,
//! [`Outage`] the downtime the host sees during one.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use kup_bench::{answers, key, value};

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Stores keys 0..n; returns the bytes of values stored.
pub fn load(port: u16, n: u32) -> Result<u64, kup_bench::Error> {
    kup_bench::load_keys(port, n)
}

/// Loads keys 0..n from the host, says how much in how long, and checks every key reads back;
/// returns the bytes of values loaded.
pub fn load_checked(port: u16, n: u32) -> u64 {
    let t = std::time::Instant::now();
    let bytes = load(port, n).expect("load memcached from the host");
    eprintln!(
        "loaded {n} keys, {} MiB of values, in {:.1} s",
        bytes >> 20,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(verify(port, n).expect("read memcached back"), (n, 0));
    bytes
}

/// Reads keys 0..n back; returns (present and identical, missing or different).
pub fn verify(port: u16, n: u32) -> Result<(u32, u32), kup_bench::Error> {
    kup_bench::verify_keys(port, n)
}

/// One client connection kept open across an update: the same TCP connection must answer after it.
pub struct Kept {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    local: std::net::SocketAddr,
}

impl Kept {
    pub fn open(port: u16) -> std::io::Result<Kept> {
        let stream = connect(port)?;
        // Long enough for a whole kernel switch plus the peer's retransmission backoff.
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        let local = stream.local_addr()?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Kept {
            stream,
            reader,
            local,
        })
    }

    /// The client side's address: unchanged means the same connection.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local
    }

    /// Asserts that key `i` comes back right on this very connection after `across` (e.g. "the
    /// update").
    pub fn assert_answers(&mut self, i: u32, across: &str) {
        let right = self.get_matches(i).unwrap_or_else(|e| {
            panic!(
                "the connection from {} kept across {across} broke: {e}",
                self.local
            )
        });
        assert!(
            right,
            "the connection kept across {across} answered key {i} wrongly"
        );
    }

    /// `get` of key number `i` on this connection: whether it came back with its exact value.
    pub fn get_matches(&mut self, i: u32) -> std::io::Result<bool> {
        self.stream
            .write_all(format!("get {}\r\n", key(i)).as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let parts: Vec<&str> = line.trim_end().split(' ').collect();
        if parts.first() == Some(&"END") {
            return Ok(false);
        }
        if parts.len() < 4 || parts[0] != "VALUE" {
            return Err(std::io::Error::other(format!("unexpected reply {line:?}")));
        }
        let len: usize = parts[3].parse().map_err(std::io::Error::other)?;
        let mut data = vec![0u8; len + 2];
        self.reader.read_exact(&mut data)?;
        data.truncate(len);
        let mut end = String::new();
        self.reader.read_line(&mut end)?;
        Ok(end.trim_end() == "END" && data == value(i))
    }
}

/// Polls memcached from the host every 50 ms; reports the outage (first failed request to the first
/// successful one after it).
pub struct Outage {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Option<Duration>>,
}

impl Outage {
    pub fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut down_since: Option<Instant> = None;
            let mut outage = None;
            while !s.load(Ordering::SeqCst) {
                let ok = answers(port);
                match (ok, down_since) {
                    (false, None) => down_since = Some(Instant::now()),
                    (true, Some(t)) => {
                        outage = Some(t.elapsed());
                        down_since = None;
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            outage
        });
        Outage { stop, handle }
    }

    /// Stops polling; the last outage seen, if any.
    pub fn finish(self) -> Option<Duration> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("outage probe thread")
    }
}
