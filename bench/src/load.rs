//! The load generator: N threads, each with its own persistent TCP connection to memcached, doing a
//! get/set mix over the keys `0..keys` loaded beforehand ([`crate::load_keys`]), every reply checked
//! against the deterministic scheme, outcomes counted into a [`Timeline`].
//!
//! ```no_run
//! # fn main() -> Result<(), kup_bench::Error> {
//! use kup_bench::{Load, LoadConfig};
//! kup_bench::load_keys(11211, 10_000)?;
//! let handle = Load::start(LoadConfig::new(11211, 10_000))?;
//! std::thread::sleep(std::time::Duration::from_secs(5));
//! handle.mark("update-start");
//! // ... the update ...
//! handle.mark("restored");
//! let timeline = handle.stop();
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Error;
use crate::memcached::{Conn, Reply, WaitError, key, value};
use crate::timeline::{ConnectionReport, Mark, Mode, Outcome, Recorder, Timeline};

/// How a load runs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// memcached at 127.0.0.1:port.
    pub port: u16,
    /// Requests go to keys `0..keys`, which must have been loaded.
    pub keys: u32,
    /// Client threads, one connection each (default 4).
    pub threads: usize,
    /// Percentage of requests that are sets (default 10); the rest are gets.
    pub set_percent: u8,
    /// A request without a reply after this long is an error (default 2 s); also the connect
    /// timeout.
    pub timeout: Duration,
    /// What a thread does after an error (default [`Mode::Reconnect`]).
    pub mode: Mode,
    /// Wait between a failed request and the next connection attempt (default 50 ms).
    pub backoff: Duration,
    /// Bucket width of the timeline (default 100 ms).
    pub bucket: Duration,
    /// After a get misses, set the key (the cache-aside pattern, so a cold cache refills) (default
    /// true).
    pub set_on_miss: bool,
    /// Seeds the threads' choice of keys and operations.
    pub seed: u64,
}

impl LoadConfig {
    pub fn new(port: u16, keys: u32) -> LoadConfig {
        LoadConfig {
            port,
            keys,
            threads: 4,
            set_percent: 10,
            timeout: Duration::from_secs(2),
            mode: Mode::Reconnect,
            backoff: Duration::from_millis(50),
            bucket: Duration::from_millis(100),
            set_on_miss: true,
            seed: 0x6b75_7062_656e_6368,
        }
    }
}

/// Counts so far, for watching a running load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub ok: u64,
    pub miss: u64,
    pub wrong: u64,
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    ok: AtomicU64,
    miss: AtomicU64,
    wrong: AtomicU64,
    errors: AtomicU64,
}

/// Starts loads.
#[derive(Debug)]
pub struct Load;

/// A running load: mark events on its clock, then stop it for the [`Timeline`].
#[derive(Debug)]
pub struct LoadHandle {
    start: Instant,
    mode: Mode,
    shared: Arc<Shared>,
    marks: Mutex<Vec<Mark>>,
    threads: Vec<JoinHandle<(Recorder, ConnectionReport)>>,
}

impl Load {
    /// Starts the threads; each connects on its own (a failed connect is an error in the timeline,
    /// not here). Keys must be loaded ([`crate::load_keys`]).
    pub fn start(cfg: LoadConfig) -> Result<LoadHandle, Error> {
        let start = Instant::now();
        let shared = Arc::new(Shared::default());
        let cfg = Arc::new(cfg);
        let mut threads = Vec::with_capacity(cfg.threads);
        for t in 0..cfg.threads.max(1) {
            let (cfg, shared) = (Arc::clone(&cfg), Arc::clone(&shared));
            let handle = std::thread::Builder::new()
                .name(format!("kup-bench-load-{t}"))
                .spawn(move || worker(t, &cfg, &shared, start))
                .map_err(Error::Spawn)?;
            threads.push(handle);
        }
        Ok(LoadHandle {
            start,
            mode: cfg.mode,
            shared,
            marks: Mutex::new(Vec::new()),
            threads,
        })
    }
}

impl LoadHandle {
    /// Records a named event at the current time.
    pub fn mark(&self, label: &str) {
        let at_us = micros(self.start.elapsed());
        if let Ok(mut marks) = self.marks.lock() {
            marks.push(Mark {
                label: label.to_owned(),
                at_us,
            });
        }
    }

    /// Time since the load started (the timeline's clock).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Counts so far over all threads.
    pub fn progress(&self) -> Progress {
        let s = &self.shared;
        Progress {
            ok: s.ok.load(Ordering::Relaxed),
            miss: s.miss.load(Ordering::Relaxed),
            wrong: s.wrong.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops the threads (each finishes or abandons its request within ~20 ms) and returns what
    /// they recorded.
    pub fn stop(self) -> Timeline {
        self.shared.stop.store(true, Ordering::Relaxed);
        let duration_us = micros(self.start.elapsed());
        let mut recorders = Vec::new();
        let mut connections = Vec::new();
        for (t, h) in self.threads.into_iter().enumerate() {
            match h.join() {
                Ok((rec, conn)) => {
                    recorders.push(rec);
                    connections.push(conn);
                }
                // A panicked thread (a bug) leaves its counts out; its connection counts as lost.
                Err(_) => connections.push(ConnectionReport {
                    thread: t,
                    ..ConnectionReport::default()
                }),
            }
        }
        let marks = self.marks.into_inner().unwrap_or_default();
        Timeline::from_recorders(recorders, duration_us, self.mode, marks, connections)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// xorshift64*: the threads' choice of operations and keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

enum Op {
    Get(u32),
    Set(u32),
}

fn request(op: &Op) -> Vec<u8> {
    match *op {
        Op::Get(i) => format!("get {}\r\n", key(i)).into_bytes(),
        Op::Set(i) => {
            let v = value(i);
            let mut req = format!("set {} 0 0 {}\r\n", key(i), v.len()).into_bytes();
            req.extend_from_slice(&v);
            req.extend_from_slice(b"\r\n");
            req
        }
    }
}

/// Judges a reply to `op`.
fn judge(op: &Op, reply: &Reply) -> Outcome {
    match (op, reply) {
        (Op::Set(_), Reply::Stored) => Outcome::Ok,
        (Op::Get(_), Reply::Values(v)) if v.is_empty() => Outcome::Miss,
        (Op::Get(i), Reply::Values(v)) => {
            if v.len() == 1 && v[0].0 == key(*i) && v[0].1 == value(*i) {
                Outcome::Ok
            } else {
                Outcome::Wrong
            }
        }
        _ => Outcome::Wrong,
    }
}

fn worker(
    t: usize,
    cfg: &LoadConfig,
    shared: &Shared,
    start: Instant,
) -> (Recorder, ConnectionReport) {
    let mut rec = Recorder::new(t, micros(cfg.bucket).max(1));
    let mut report = ConnectionReport {
        thread: t,
        ..ConnectionReport::default()
    };
    let mut rng = Rng(cfg.seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut conn: Option<Conn> = None;
    let mut pending_set: Option<u32> = None;
    let now_us = || micros(start.elapsed());
    let record = |rec: &mut Recorder, outcome: Outcome| {
        rec.record(now_us(), outcome);
        let counter = match outcome {
            Outcome::Ok => &shared.ok,
            Outcome::Miss => &shared.miss,
            Outcome::Wrong => &shared.wrong,
            Outcome::Error => &shared.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    };
    let stopped = || shared.stop.load(Ordering::Relaxed);
    let backoff = |d: Duration| {
        let until = Instant::now() + d;
        while !stopped() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5).min(d));
        }
    };
    'run: while !stopped() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None if cfg.mode == Mode::Keep && report.connects > 0 => {
                // The original connection is gone and Keep never reconnects: idle till the end.
                backoff(Duration::from_millis(50));
                continue;
            }
            None => match Conn::connect(cfg.port, cfg.timeout) {
                Ok(c) => {
                    report.connects += 1;
                    report.original_open = report.connects == 1;
                    conn.insert(c)
                }
                Err(_) => {
                    record(&mut rec, Outcome::Error);
                    backoff(cfg.backoff);
                    continue;
                }
            },
        };
        let keys = cfg.keys.max(1);
        let op = match pending_set.take() {
            Some(i) => Op::Set(i),
            None => {
                let r = rng.next();
                let i = ((r >> 32) % u64::from(keys)) as u32;
                if r % 100 < u64::from(cfg.set_percent) {
                    Op::Set(i)
                } else {
                    Op::Get(i)
                }
            }
        };
        let failed = match c.send(&request(&op)) {
            Err(_) => true,
            Ok(()) => {
                let mut deadline = Instant::now() + cfg.timeout;
                let mut timed_out = false;
                loop {
                    match c.wait_reply(deadline, &shared.stop) {
                        Ok(reply) => {
                            let outcome = judge(&op, &reply);
                            if timed_out {
                                report.late_replies += 1;
                            }
                            if outcome == Outcome::Miss && cfg.set_on_miss {
                                if let Op::Get(i) = op {
                                    pending_set = Some(i);
                                }
                            }
                            record(&mut rec, outcome);
                            break false;
                        }
                        Err(WaitError::Stopped) => break 'run,
                        Err(WaitError::Timeout) if cfg.mode == Mode::Keep => {
                            // One error per request; then keep waiting on the same connection.
                            if !timed_out {
                                record(&mut rec, Outcome::Error);
                                timed_out = true;
                            }
                            deadline = Instant::now() + cfg.timeout;
                        }
                        Err(_) => break true,
                    }
                }
            }
        };
        if failed {
            record(&mut rec, Outcome::Error);
            conn = None;
            if cfg.mode == Mode::Keep {
                report.original_open = false;
            } else {
                backoff(cfg.backoff);
            }
        }
    }
    report.original_open = report.original_open && conn.is_some();
    report.last_error_us = rec.last_error_us();
    report.last_answer_us = rec.last_answer_us();
    (rec, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_judged_against_the_scheme() {
        let good = Reply::Values(vec![(key(3), value(3))]);
        assert_eq!(judge(&Op::Get(3), &good), Outcome::Ok);
        assert_eq!(judge(&Op::Get(4), &good), Outcome::Wrong);
        let mut bad = value(3);
        bad[10] ^= 1;
        assert_eq!(
            judge(&Op::Get(3), &Reply::Values(vec![(key(3), bad)])),
            Outcome::Wrong
        );
        assert_eq!(judge(&Op::Get(3), &Reply::Values(vec![])), Outcome::Miss);
        assert_eq!(judge(&Op::Set(3), &Reply::Stored), Outcome::Ok);
        assert_eq!(judge(&Op::Set(3), &good), Outcome::Wrong);
    }

    #[test]
    fn a_set_request_carries_the_value() {
        let req = request(&Op::Set(5));
        let v = value(5);
        let head = format!("set kup:0000005 0 0 {}\r\n", v.len());
        assert!(req.starts_with(head.as_bytes()));
        assert_eq!(&req[head.len()..head.len() + v.len()], &v[..]);
        assert!(req.ends_with(b"\r\n"));
    }

    #[test]
    fn nothing_listening_is_errors_not_a_failure_to_start() {
        // A port nobody listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = LoadConfig::new(port, 10);
        cfg.threads = 2;
        let h = Load::start(cfg).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        h.mark("x");
        let tl = h.stop();
        let t = tl.totals();
        assert_eq!(t.answers(), 0);
        assert!(t.errors >= 2, "{t:?}");
        assert_eq!(tl.threads, 2);
        assert!(tl.mark("x").is_some());
        assert_eq!(tl.downtime(0.0, tl.duration_s()).end_s, None);
    }
}
