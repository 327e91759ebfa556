//! redis from the host for the lab tests: a minimal RESP client that loads keys (the benchmark's
//! key/value scheme, `kup:NNNNNNN` -> `value(i)`) with pipelined SETs and reads them back with MGET.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kup_bench::{key, value};

fn connect(port: u16) -> std::io::Result<(BufReader<TcpStream>, TcpStream)> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok((BufReader::new(s.try_clone()?), s))
}

fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

fn line(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut l = String::new();
    r.read_line(&mut l)?;
    if l.is_empty() {
        return Err(std::io::Error::other("redis closed the connection"));
    }
    Ok(l.trim_end().to_owned())
}

/// Sets keys 0..n; returns the bytes of values written.
pub fn load(port: u16, n: u32) -> std::io::Result<u64> {
    let (mut r, mut w) = connect(port)?;
    let mut total = 0;
    for start in (0..n).step_by(500) {
        let end = start.saturating_add(500).min(n);
        let mut out = Vec::new();
        for i in start..end {
            let v = value(i);
            total += v.len() as u64;
            out.extend_from_slice(b"*3\r\n");
            bulk(&mut out, b"SET");
            bulk(&mut out, key(i).as_bytes());
            bulk(&mut out, &v);
        }
        w.write_all(&out)?;
        for _ in start..end {
            let reply = line(&mut r)?;
            if reply != "+OK" {
                return Err(std::io::Error::other(format!("SET answered {reply:?}")));
            }
        }
    }
    Ok(total)
}

/// Reads keys 0..n back; returns (present and identical, missing or different).
pub fn verify(port: u16, n: u32) -> std::io::Result<(u32, u32)> {
    let (mut r, mut w) = connect(port)?;
    let (mut good, mut bad) = (0, 0);
    for start in (0..n).step_by(100) {
        let end = start.saturating_add(100).min(n);
        let mut out = format!("*{}\r\n", end - start + 1).into_bytes();
        bulk(&mut out, b"MGET");
        for i in start..end {
            bulk(&mut out, key(i).as_bytes());
        }
        w.write_all(&out)?;
        let head = line(&mut r)?;
        if head != format!("*{}", end - start) {
            return Err(std::io::Error::other(format!("MGET answered {head:?}")));
        }
        for i in start..end {
            let len: i64 = line(&mut r)?
                .strip_prefix('$')
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| std::io::Error::other("MGET: not a bulk string"))?;
            if len < 0 {
                bad += 1;
                continue;
            }
            let mut data = vec![0; len as usize + 2];
            r.read_exact(&mut data)?;
            data.truncate(len as usize);
            if data == value(i) {
                good += 1;
            } else {
                bad += 1;
            }
        }
    }
    Ok((good, bad))
}
