//! A small memcached text-protocol client for checking data from the host: deterministic values of
//! varied sizes, loaded pipelined, read back with multi-gets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The value stored under key number `i`: 100..~5000 bytes, derived from `i` alone.
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

pub fn key(i: u32) -> String {
    format!("kup:{i:07}")
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Stores keys 0..n; returns the bytes of values stored.
pub fn load(port: u16, n: u32) -> std::io::Result<u64> {
    let mut s = connect(port)?;
    let mut total = 0u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for i in 0..n {
        let v = value(i);
        total += v.len() as u64;
        buf.extend_from_slice(format!("set {} 0 0 {} noreply\r\n", key(i), v.len()).as_bytes());
        buf.extend_from_slice(&v);
        buf.extend_from_slice(b"\r\n");
        if buf.len() > (1 << 20) {
            s.write_all(&buf)?;
            buf.clear();
        }
    }
    buf.extend_from_slice(b"version\r\n");
    s.write_all(&buf)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if !line.starts_with("VERSION") {
        return Err(std::io::Error::other(format!(
            "memcached answered {line:?} after the load"
        )));
    }
    Ok(total)
}

/// Reads keys 0..n back; returns (present and identical, missing or different).
pub fn verify(port: u16, n: u32) -> std::io::Result<(u32, u32)> {
    let s = connect(port)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let (mut good, mut bad) = (0, 0);
    for start in (0..n).step_by(100) {
        let end = (start + 100).min(n);
        let keys: Vec<String> = (start..end).map(key).collect();
        w.write_all(format!("get {}\r\n", keys.join(" ")).as_bytes())?;
        let mut got = std::collections::HashMap::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let line = line.trim_end();
            if line == "END" {
                break;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() < 4 || parts[0] != "VALUE" {
                return Err(std::io::Error::other(format!("unexpected reply {line:?}")));
            }
            let len: usize = parts[3].parse().map_err(std::io::Error::other)?;
            let mut data = vec![0u8; len + 2];
            r.read_exact(&mut data)?;
            data.truncate(len);
            got.insert(parts[1].to_owned(), data);
        }
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

/// One request, for the downtime probe: true when memcached answered `version`.
pub fn answers(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"version\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"VERSION"))
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
