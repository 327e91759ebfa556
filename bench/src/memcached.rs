//! The memcached side of the benchmark: the deterministic key/value scheme (the one source of truth
//! for every test that stores data in memcached and checks it afterwards), a text-protocol
//! connection whose reads survive timeouts without losing bytes, and the bulk `load_keys` /
//! `verify_keys` helpers.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::Error;

/// The value stored under key number `i`: 100..~5000 bytes of `a..z`, derived from `i` alone
/// (xorshift32 seeded from `i`), so any reader can check it without a copy.
pub fn value(i: u32) -> Vec<u8> {
    let mut x = i.wrapping_mul(2_654_435_761).wrapping_add(12345) | 1;
    let len = 100 + (x % 4900) as usize;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            b'a' + (x % 26) as u8
        })
        .collect()
}

/// The key of number `i`: `kup:0000042`.
pub fn key(i: u32) -> String {
    format!("kup:{i:07}")
}

/// The bytes `load_keys(port, n)` stores: the sum of the values' lengths (the working set).
pub fn working_set_bytes(n: u32) -> u64 {
    (0..n).map(|i| value(i).len() as u64).sum()
}

/// One reply of memcached's text protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `VALUE ...` blocks up to `END` (empty: every key missed).
    Values(Vec<(String, Vec<u8>)>),
    /// `STORED`
    Stored,
    /// `VERSION x`
    Version(String),
}

/// Parses one complete reply at the start of `buf`: `Ok(None)` while it is incomplete,
/// `Ok(Some((reply, bytes consumed)))`, or `Err(line)` for an error reply or garbage.
pub(crate) fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let mut pos = 0;
    let mut values = Vec::new();
    loop {
        let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
            if buf.len() - pos > 1024 {
                return Err(String::from_utf8_lossy(&buf[pos..pos + 64]).into_owned());
            }
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&buf[pos..pos + eol]).into_owned();
        let after = pos + eol + 2;
        if let Some(rest) = line.strip_prefix("VALUE ") {
            let parts: Vec<&str> = rest.split(' ').collect();
            let len: usize = match parts.get(2).map(|l| l.parse()) {
                Some(Ok(len)) if parts.len() >= 3 => len,
                _ => return Err(line),
            };
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            if &buf[after + len..after + len + 2] != b"\r\n" {
                return Err(line);
            }
            values.push((parts[0].to_owned(), buf[after..after + len].to_vec()));
            pos = after + len + 2;
            continue;
        }
        if !values.is_empty() && line != "END" {
            return Err(line);
        }
        return match line.as_str() {
            "END" => Ok(Some((Reply::Values(values), after))),
            "STORED" => Ok(Some((Reply::Stored, after))),
            _ => match line.strip_prefix("VERSION ") {
                Some(v) => Ok(Some((Reply::Version(v.to_owned()), after))),
                None => Err(line),
            },
        };
    }
}

/// Why no reply came.
#[derive(Debug)]
pub(crate) enum WaitError {
    /// The deadline passed; the connection is intact and may be waited on again.
    Timeout,
    /// The caller's stop flag was raised.
    Stopped,
    /// The peer closed the connection.
    Closed,
    Io(std::io::Error),
    /// An error reply (`SERVER_ERROR ...`) or bytes that are no reply.
    Protocol(String),
}

/// A persistent text-protocol connection with its own receive buffer, so a read that times out
/// loses nothing and the same reply can be waited for again.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// How long one read blocks before the deadline and the stop flag are looked at again.
const POLL: Duration = Duration::from_millis(20);

impl Conn {
    pub(crate) fn connect(port: u16, timeout: Duration) -> std::io::Result<Conn> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    pub(crate) fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Waits for the next complete reply until `deadline` or until `stop` is raised.
    pub(crate) fn wait_reply(
        &mut self,
        deadline: Instant,
        stop: &AtomicBool,
    ) -> Result<Reply, WaitError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(line) => {
                    self.buf.clear();
                    return Err(WaitError::Protocol(line));
                }
            }
            if stop.load(Ordering::Relaxed) {
                return Err(WaitError::Stopped);
            }
            if Instant::now() >= deadline {
                return Err(WaitError::Timeout);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(WaitError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(WaitError::Io(e)),
            }
        }
    }
}

/// How long the bulk helpers wait for one reply.
const BULK_TIMEOUT: Duration = Duration::from_secs(60);

fn wait(conn: &mut Conn, port: u16, context: &'static str) -> Result<Reply, Error> {
    let never = AtomicBool::new(false);
    conn.wait_reply(Instant::now() + BULK_TIMEOUT, &never)
        .map_err(|e| match e {
            WaitError::Io(source) => Error::Io { port, source },
            WaitError::Protocol(reply) => Error::Protocol {
                port,
                context,
                reply,
            },
            WaitError::Closed => Error::Protocol {
                port,
                context,
                reply: "(connection closed)".into(),
            },
            WaitError::Timeout | WaitError::Stopped => Error::Protocol {
                port,
                context,
                reply: format!("(nothing in {} s)", BULK_TIMEOUT.as_secs()),
            },
        })
}

fn connect(port: u16) -> Result<Conn, Error> {
    Conn::connect(port, Duration::from_secs(5)).map_err(|source| Error::Io { port, source })
}

/// Stores keys `0..n` with their values (pipelined `set ... noreply`, then one `version` round
/// trip so everything was processed); returns the bytes of values stored.
pub fn load_keys(port: u16, n: u32) -> Result<u64, Error> {
    let mut conn = connect(port)?;
    let mut total = 0u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for i in 0..n {
        let v = value(i);
        total += v.len() as u64;
        buf.extend_from_slice(format!("set {} 0 0 {} noreply\r\n", key(i), v.len()).as_bytes());
        buf.extend_from_slice(&v);
        buf.extend_from_slice(b"\r\n");
        if buf.len() > (1 << 20) {
            conn.send(&buf)
                .map_err(|source| Error::Io { port, source })?;
            buf.clear();
        }
    }
    buf.extend_from_slice(b"version\r\n");
    conn.send(&buf)
        .map_err(|source| Error::Io { port, source })?;
    match wait(&mut conn, port, "after the load")? {
        Reply::Version(_) => Ok(total),
        other => Err(Error::Protocol {
            port,
            context: "after the load",
            reply: format!("{other:?}"),
        }),
    }
}

/// Reads keys `0..n` back with multi-gets of 100 keys; returns (present and identical, missing or
/// different).
pub fn verify_keys(port: u16, n: u32) -> Result<(u32, u32), Error> {
    let mut conn = connect(port)?;
    let (mut good, mut bad) = (0, 0);
    for start in (0..n).step_by(100) {
        let end = start.saturating_add(100).min(n);
        let keys: Vec<String> = (start..end).map(key).collect();
        conn.send(format!("get {}\r\n", keys.join(" ")).as_bytes())
            .map_err(|source| Error::Io { port, source })?;
        let Reply::Values(got) = wait(&mut conn, port, "to a multi-get")? else {
            return Err(Error::Protocol {
                port,
                context: "to a multi-get",
                reply: "(not VALUE/END)".into(),
            });
        };
        let got: std::collections::HashMap<String, Vec<u8>> = got.into_iter().collect();
        for i in start..end {
            if got.get(&key(i)).is_some_and(|v| *v == value(i)) {
                good += 1;
            } else {
                bad += 1;
            }
        }
    }
    Ok((good, bad))
}

/// One `version` request on a fresh connection (500 ms to connect and answer): true when
/// memcached answered. For readiness probes.
pub fn answers(port: u16) -> bool {
    let timeout = Duration::from_millis(500);
    let Ok(mut conn) = Conn::connect(port, timeout) else {
        return false;
    };
    if conn.send(b"version\r\n").is_err() {
        return false;
    }
    let never = AtomicBool::new(false);
    matches!(
        conn.wait_reply(Instant::now() + timeout, &never),
        Ok(Reply::Version(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_is_the_labs() {
        // Pinned so the lab tests and the benchmark keep agreeing on the stored data.
        assert_eq!(key(42), "kup:0000042");
        let v = value(0);
        assert_eq!(v.len(), 100 + (12345 % 4900));
        assert!(v.iter().all(|b| b.is_ascii_lowercase()));
        assert_eq!(value(7), value(7));
        assert_ne!(value(7), value(8));
        for i in 0..1000 {
            let len = value(i).len();
            assert!((100..5000).contains(&len), "{i}: {len}");
        }
    }

    #[test]
    fn parses_replies_whole_or_not_yet() {
        let full =
            b"VALUE kup:0000001 0 3\r\nabc\r\nVALUE kup:0000002 0 2\r\nde\r\nEND\r\nSTORED\r\n";
        let (reply, used) = parse_reply(full).unwrap().unwrap();
        assert_eq!(
            reply,
            Reply::Values(vec![
                ("kup:0000001".into(), b"abc".to_vec()),
                ("kup:0000002".into(), b"de".to_vec())
            ])
        );
        assert_eq!(
            parse_reply(&full[used..]).unwrap().unwrap().0,
            Reply::Stored
        );
        for cut in 0..used {
            assert_eq!(parse_reply(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(
            parse_reply(b"END\r\n").unwrap().unwrap(),
            (Reply::Values(vec![]), 5)
        );
        assert_eq!(
            parse_reply(b"VERSION 1.6.18\r\n").unwrap().unwrap().0,
            Reply::Version("1.6.18".into())
        );
        assert!(parse_reply(b"SERVER_ERROR out of memory\r\n").is_err());
        assert!(parse_reply(b"VALUE k 0 3\r\nabcd\r\nEND\r\n").is_err());
    }
}
