//! The guest side: a small TCP server (one thread per connection) that runs the host's commands as
//! root through `sh -c`, streaming stdio both ways and returning the exit status.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::proto::{Kind, Welcome, read_frame, write_frame};

/// Serves forever on `0.0.0.0:port`, accepting only clients that present `token`.
pub fn serve(port: u16, token: String) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("cannot listen on port {port}"))?;
    let token = Arc::new(token);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let token = Arc::clone(&token);
        thread::spawn(move || {
            if let Err(e) = handle(conn, &token) {
                eprintln!("kup-lab-agent: connection ended: {e:#}");
            }
        });
    }
    Ok(())
}

/// What the guest looks like right now.
pub fn welcome() -> Welcome {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let multi_user = Command::new("systemctl")
        .args(["is-active", "--quiet", "multi-user.target"])
        .status()
        .is_ok_and(|s| s.success());
    Welcome {
        boot_id: read("/proc/sys/kernel/random/boot_id"),
        kernel: read("/proc/sys/kernel/osrelease"),
        multi_user,
        uptime_s: read("/proc/uptime")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0),
    }
}

fn handle(mut conn: TcpStream, token: &str) -> Result<()> {
    conn.set_nodelay(true)?;
    match read_frame(&mut conn)? {
        Some((Kind::Hello, t)) if t == token.as_bytes() => {}
        _ => {
            write_frame(
                &mut conn,
                Kind::Error,
                b"bad token: this guest belongs to another lab run",
            )?;
            return Ok(());
        }
    }
    write_frame(&mut conn, Kind::Welcome, &serde_json::to_vec(&welcome())?)?;
    let cmd = match read_frame(&mut conn)? {
        Some((Kind::Exec, c)) => String::from_utf8(c).context("command is not UTF-8")?,
        _ => return Ok(()), // a hello-only probe
    };
    let mut child = Command::new("/bin/sh")
        .args(["-c", &cmd])
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .current_dir("/root")
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start /bin/sh")?;
    let pgid = Pid::from_raw(child.id() as i32);
    let out = Arc::new(Mutex::new(conn.try_clone()?));

    let pumps: Vec<_> = [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            Kind::Stdout,
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            Kind::Stderr,
        ),
    ]
    .into_iter()
    .filter_map(|(src, kind)| src.map(|s| (s, kind)))
    .map(|(mut src, kind)| {
        let out = Arc::clone(&out);
        thread::spawn(move || {
            let mut buf = [0u8; 32 * 1024];
            loop {
                match src.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let Ok(mut w) = out.lock() else { break };
                        if write_frame(&mut *w, kind, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    })
    .collect();

    // stdin: forward until the client closes it; if the client goes away, end the command.
    let mut stdin = child.stdin.take();
    let mut reader = conn.try_clone()?;
    let finished = Arc::new(AtomicBool::new(false));
    let finished_r = Arc::clone(&finished);
    thread::spawn(move || {
        loop {
            match read_frame(&mut reader) {
                Ok(Some((Kind::Stdin, data))) => {
                    if let Some(s) = stdin.as_mut()
                        && s.write_all(&data).is_err()
                    {
                        stdin = None;
                    }
                }
                Ok(Some((Kind::StdinEof, _))) => stdin = None,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    // Only a command still running is ended; what it left in the background stays.
                    if !finished_r.load(Ordering::SeqCst) {
                        let _ = killpg(pgid, Signal::SIGTERM);
                    }
                    break;
                }
            }
        }
    });

    let status = child.wait()?;
    finished.store(true, Ordering::SeqCst);
    for p in pumps {
        let _ = p.join();
    }
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let mut w = out
        .lock()
        .map_err(|_| anyhow::anyhow!("output lock poisoned"))?;
    write_frame(&mut *w, Kind::Exit, &code.to_be_bytes())?;
    Ok(())
}
