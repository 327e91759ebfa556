//! The host side of the agent protocol: probe the guest (`hello`) and run commands in it (`exec`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use thiserror::Error;

use crate::proto::{Kind, Welcome, read_frame, write_frame};

/// Why talking to the agent failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("the guest agent does not answer (guest still booting, switching kernel, or down)")]
    NoAnswer,
    #[error("the guest agent refused us: {0}")]
    Refused(String),
    #[error("the guest went away before the command finished (kexec, reboot or crash?)")]
    Lost,
    #[error("talking to the guest agent: {0}")]
    Io(#[from] std::io::Error),
}

fn connect(port: u16, token: &str, timeout: Duration) -> Result<(TcpStream, Welcome), ClientError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|_| ClientError::NoAnswer)?;
    s.set_nodelay(true)?;
    // QEMU's user network accepts on the host side even when nothing listens in the guest: only an
    // answer to our hello shows the agent is there.
    s.set_read_timeout(Some(timeout))?;
    write_frame(&mut s, Kind::Hello, token.as_bytes()).map_err(|_| ClientError::NoAnswer)?;
    match read_frame(&mut s) {
        Ok(Some((Kind::Welcome, body))) => {
            let w: Welcome = serde_json::from_slice(&body).map_err(|e| {
                ClientError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })?;
            s.set_read_timeout(None)?;
            Ok((s, w))
        }
        Ok(Some((Kind::Error, msg))) => Err(ClientError::Refused(
            String::from_utf8_lossy(&msg).into_owned(),
        )),
        _ => Err(ClientError::NoAnswer),
    }
}

/// Asks the agent how the guest is; fails fast when it does not answer.
pub fn hello(port: u16, token: &str) -> Result<Welcome, ClientError> {
    connect(port, token, Duration::from_secs(5)).map(|(_, w)| w)
}

/// Runs `cmd` through `sh -c` in the guest, copying `stdin` to it and its output to `stdout` and
/// `stderr`. Returns the command's exit status.
pub fn exec(
    port: u16,
    token: &str,
    cmd: &str,
    stdin: Option<Box<dyn Read + Send>>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32, ClientError> {
    let (mut s, _) = connect(port, token, Duration::from_secs(10))?;
    write_frame(&mut s, Kind::Exec, cmd.as_bytes())?;
    let mut w = s.try_clone()?;
    match stdin {
        Some(mut input) => {
            std::thread::spawn(move || {
                let mut buf = [0u8; 32 * 1024];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if write_frame(&mut w, Kind::Stdin, &buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = write_frame(&mut w, Kind::StdinEof, b"");
            });
        }
        None => write_frame(&mut w, Kind::StdinEof, b"")?,
    }
    loop {
        match read_frame(&mut s) {
            Ok(Some((Kind::Stdout, d))) => {
                stdout.write_all(&d)?;
                stdout.flush()?;
            }
            Ok(Some((Kind::Stderr, d))) => {
                stderr.write_all(&d)?;
                stderr.flush()?;
            }
            Ok(Some((Kind::Exit, d))) if d.len() == 4 => {
                return Ok(i32::from_be_bytes([d[0], d[1], d[2], d[3]]));
            }
            Ok(Some((Kind::Error, msg))) => {
                return Err(ClientError::Refused(
                    String::from_utf8_lossy(&msg).into_owned(),
                ));
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return Err(ClientError::Lost),
        }
    }
}
