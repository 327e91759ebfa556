//! The host <-> agent wire protocol: length-prefixed frames over one TCP connection per command.
//!
//! A frame is `kind: u8`, `len: u32` (big endian), then `len` bytes. The client opens with
//! [`Kind::Hello`] (the token), the agent answers [`Kind::Welcome`] (a JSON [`Welcome`]); a client
//! that wants to run something then sends [`Kind::Exec`] and streams stdin; the agent streams
//! stdout/stderr and ends with [`Kind::Exit`].

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Largest frame either side accepts (stdio is sent in much smaller chunks).
pub const MAX_FRAME: usize = 1 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// client -> agent: the shared token.
    Hello = 1,
    /// agent -> client: JSON [`Welcome`].
    Welcome = 2,
    /// client -> agent: a shell command line (UTF-8), run with `sh -c`.
    Exec = 3,
    /// client -> agent: bytes for the command's stdin.
    Stdin = 4,
    /// client -> agent: stdin is closed.
    StdinEof = 5,
    /// agent -> client: bytes the command wrote to stdout.
    Stdout = 6,
    /// agent -> client: bytes the command wrote to stderr.
    Stderr = 7,
    /// agent -> client: the exit status, `i32` big endian (128 + signal when killed).
    Exit = 8,
    /// agent -> client: the request was refused or failed (UTF-8 message).
    Error = 9,
}

impl TryFrom<u8> for Kind {
    type Error = io::Error;
    fn try_from(b: u8) -> io::Result<Self> {
        Ok(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Exec,
            4 => Kind::Stdin,
            5 => Kind::StdinEof,
            6 => Kind::Stdout,
            7 => Kind::Stderr,
            8 => Kind::Exit,
            9 => Kind::Error,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown frame kind {b}"),
                ));
            }
        })
    }
}

/// What the agent tells about the guest when a client connects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// `/proc/sys/kernel/random/boot_id`: changes with every kexec and reboot.
    pub boot_id: String,
    /// `uname -r`.
    pub kernel: String,
    /// Whether multi-user.target is active.
    pub multi_user: bool,
    /// Seconds since this kernel booted (`/proc/uptime`).
    pub uptime_s: f64,
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(Kind, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let kind = Kind::try_from(head[0])?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_order() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Exec, b"echo hi").unwrap();
        write_frame(&mut buf, Kind::StdinEof, b"").unwrap();
        write_frame(&mut buf, Kind::Exit, &7i32.to_be_bytes()).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((Kind::Exec, b"echo hi".to_vec()))
        );
        assert_eq!(read_frame(&mut r).unwrap(), Some((Kind::StdinEof, vec![])));
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((Kind::Exit, 7i32.to_be_bytes().to_vec()))
        );
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn truncated_and_unknown_frames_are_errors() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"abcdef").unwrap();
        let mut short = &buf[..buf.len() - 2];
        assert!(read_frame(&mut short).is_err());
        let mut unknown: &[u8] = &[42, 0, 0, 0, 0];
        assert!(read_frame(&mut unknown).is_err());
        let mut huge: &[u8] = &[6, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut huge).is_err());
    }
}
