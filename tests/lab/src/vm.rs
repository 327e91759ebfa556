//! One running guest: QEMU under TCG booting a fresh copy-on-write overlay of the cached image with
//! the project's build handed in on a payload disk; its state lives in a run directory so that
//! separate `lab` invocations (and tests) can find it. Two boot modes: QEMU loads the kernel itself
//! (`-kernel`, the default), or UEFI firmware (OVMF) boots systemd-boot from the guest's ESP disk.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::client::{self, ClientError};
use crate::console;
use crate::image::Image;
use crate::proto::Welcome;

/// What `lab start` boots.
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub kernel: String,
    pub mem_mib: u32,
    pub cpus: u32,
    /// (host port on 127.0.0.1, guest port)
    pub forwards: Vec<(u16, u16)>,
    /// A tree copied over the guest's / on first boot (the project's install tree).
    pub payload_tree: Option<PathBuf>,
    pub boot_timeout: Duration,
    /// Boot through UEFI firmware and systemd-boot (with `kernel`'s entry the default) instead of
    /// QEMU's `-kernel`.
    pub firmware: bool,
    /// The root overlay honours the guest's flushes (cache=writeback, not unsafe).
    pub disk_flush: bool,
}

/// The saved state of the running guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub qemu_pid: i32,
    pub agent_port: u16,
    pub token: String,
    pub forwards: Vec<(u16, u16)>,
    pub kernel: String,
    pub boot_id: String,
    /// Length of the console log when the current boot was last seen up: crashes are looked for after it.
    pub console_offset: usize,
    /// Booted through the firmware (OVMF, systemd-boot): a reset boots systemd-boot's default (or
    /// one-shot) entry; otherwise QEMU's `-kernel` again.
    #[serde(default)]
    pub firmware: bool,
}

/// How a successful wait went.
#[derive(Debug, Clone)]
pub struct Up {
    pub welcome: Welcome,
    /// Seconds from the start of the wait to the first answer of the new boot.
    pub answered_after: f64,
    /// Seconds from the start of the wait to multi-user.target.
    pub multi_user_after: f64,
}

impl Up {
    /// The contract line tests and people read.
    pub fn line(&self) -> String {
        format!(
            "lab: up kernel={} boot={}",
            self.welcome.kernel, self.welcome.boot_id
        )
    }
}

/// The directory of the (single) guest of this lab: `$KUP_LAB_RUN_DIR`, else `<cache>/run`.
pub fn run_dir() -> PathBuf {
    std::env::var_os("KUP_LAB_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::image::cache_root().join("run"))
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn console_path(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// The running guest's state; a clear error when there is none.
pub fn load(dir: &Path) -> Result<State> {
    let text = std::fs::read_to_string(state_path(dir)).map_err(|_| {
        anyhow::anyhow!(
            "no guest is running (in {}); start one with `lab start`",
            dir.display()
        )
    })?;
    let st: State = serde_json::from_str(&text)
        .context("the lab state file is corrupt; run `lab stop` and start again")?;
    if !alive(st.qemu_pid) {
        let tail = console::last_lines(&read_console(dir), 12);
        bail!(
            "the guest's QEMU (pid {}) is gone; run `lab stop` to clean up. Last console lines:\n{tail}",
            st.qemu_pid
        );
    }
    Ok(st)
}

fn save(dir: &Path, st: &State) -> Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)?;
    std::fs::rename(&tmp, state_path(dir))?;
    Ok(())
}

/// The console log so far (lossy UTF-8).
pub fn read_console(dir: &Path) -> String {
    std::fs::read(console_path(dir))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Parses `HOSTPORT:GUESTPORT`.
pub fn parse_forward(s: &str) -> Result<(u16, u16)> {
    let (h, g) = s.split_once(':').with_context(|| {
        format!("--forward {s:?}: expected HOSTPORT:GUESTPORT, e.g. 11211:11211")
    })?;
    let port = |p: &str| -> Result<u16> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("--forward {s:?}: {p:?} is not a port number (1-65535)"),
        }
    };
    Ok((port(h)?, port(g)?))
}

/// Boots a guest and waits for multi-user.target.
pub fn start(dir: &Path, image: &Image, opts: &StartOptions) -> Result<Up> {
    if let Ok(text) = std::fs::read_to_string(state_path(dir))
        && let Ok(st) = serde_json::from_str::<State>(&text)
        && alive(st.qemu_pid)
    {
        bail!(
            "a guest is already running (QEMU pid {}, kernel {}); stop it with `lab stop` first",
            st.qemu_pid,
            st.kernel
        );
    }
    let (vmlinuz, initrd) = image.kernel(&opts.kernel)?;
    let esp_img = image.esp_img()?;
    let extra_append = std::env::var("KUP_LAB_APPEND").ok();
    let ovmf = if opts.firmware {
        if let Some(extra) = &extra_append {
            bail!(
                "KUP_LAB_APPEND ({extra:?}) cannot apply to a firmware boot: the command line comes from the ESP's boot entries (/etc/kernel/cmdline in the image); unset it, or boot without --firmware"
            );
        }
        Some(crate::firmware::ovmf()?)
    } else {
        None
    };
    for (h, _) in &opts.forwards {
        TcpListener::bind(("127.0.0.1", *h)).map_err(|e| {
            anyhow::anyhow!(
                "host port {h} cannot be forwarded: 127.0.0.1:{h} is already in use ({e}); pick another HOSTPORT for --forward or stop what holds it (a leftover guest: `lab stop`)"
            )
        })?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot clean the old run directory {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let overlay = dir.join("overlay.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(image.root_img())
        .arg(&overlay)
        .status()
        .context("cannot run qemu-img: install qemu-utils (tests/setup-host does)")?;
    if !st.success() {
        bail!(
            "qemu-img could not create the overlay {}",
            overlay.display()
        );
    }
    // The guest's own ESP: a raw sparse copy (mtools edits it; the guest may write it: bootctl,
    // kernel-install), attached in both modes so the guest's layout is the same.
    let esp = dir.join("esp.img");
    let st = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(&esp_img)
        .arg(&esp)
        .status()
        .context("cannot run cp")?;
    if !st.success() {
        bail!(
            "cannot copy the ESP disk {} to {}",
            esp_img.display(),
            esp.display()
        );
    }
    let ovmf_vars = dir.join("OVMF_VARS.fd");
    if let Some((_, vars)) = &ovmf {
        crate::firmware::set_default(&esp, &opts.kernel)?;
        std::fs::copy(vars, &ovmf_vars).with_context(|| {
            format!(
                "cannot copy the OVMF variable store {} to {}",
                vars.display(),
                ovmf_vars.display()
            )
        })?;
    }
    let token: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let payload = dir.join("payload.tar");
    write_payload(&payload, &token, opts.payload_tree.as_deref())?;

    let agent_port = free_port()?;
    let mut netdev = format!(
        "user,id=n0,hostfwd=tcp:127.0.0.1:{agent_port}-:{}",
        crate::AGENT_PORT
    );
    for (h, g) in &opts.forwards {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"));
    }
    let thread = std::env::var("KUP_LAB_TCG_THREAD").unwrap_or_else(|_| "multi".into());
    // The boot loader's command line (recipe::CMDLINE, also in the ESP's entries).
    let mut append = crate::recipe::CMDLINE.to_owned();
    if let Some(extra) = &extra_append {
        append.push(' ');
        append.push_str(extra);
    }
    let net_device = if opts.firmware {
        "virtio-net-pci,netdev=n0,romfile="
    } else {
        "virtio-net-pci,netdev=n0"
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        &format!("tcg,thread={thread}"),
        "-cpu",
        "max",
        "-machine",
        "q35",
    ])
    .args([
        "-m",
        &opts.mem_mib.to_string(),
        "-smp",
        &opts.cpus.to_string(),
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none"])
    .args([
        "-chardev",
        &format!("file,id=con0,path={}", console_path(dir).display()),
        "-serial",
        "chardev:con0",
    ])
    .args([
        "-drive",
        &format!(
            "file={},if=virtio,format=qcow2,cache={},discard=unmap",
            overlay.display(),
            if opts.disk_flush {
                "writeback"
            } else {
                "unsafe"
            }
        ),
    ])
    .args([
        "-drive",
        &format!(
            "file={},if=none,id=payload,format=raw,readonly=on",
            payload.display()
        ),
    ])
    .args(["-device", "virtio-blk-pci,drive=payload,serial=kup-payload"])
    .args([
        "-drive",
        &format!(
            "file={},if=none,id=esp,format=raw,cache=unsafe",
            esp.display()
        ),
    ])
    // In firmware mode without iPXE's option ROM: the firmware never tries the network (saves
    // seconds of PXE under TCG).
    .args(["-netdev", &netdev, "-device", net_device])
    .args(["-device", "virtio-rng-pci"])
    // A hardware watchdog (Intel 6300ESB; Debian's cloud kernels have its driver): when it runs out
    // the machine resets, and the firmware boots the default kernel (systemd-boot's default or
    // one-shot entry; in -kernel mode the lab's -kernel again).
    .args(["-device", "i6300esb", "-action", "watchdog=reset"]);
    match &ovmf {
        Some((code, _)) => {
            qemu.args([
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    code.display()
                ),
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", ovmf_vars.display()),
            ])
            // The firmware boots the ESP disk first (bootindex: QEMU's boot order for OVMF).
            .args([
                "-device",
                "virtio-blk-pci,drive=esp,serial=kup-esp,bootindex=0",
            ]);
        }
        None => {
            qemu.arg("-kernel")
                .arg(&vmlinuz)
                .arg("-initrd")
                .arg(&initrd)
                .args(["-append", &append])
                .args(["-device", "virtio-blk-pci,drive=esp,serial=kup-esp"]);
        }
    }
    qemu.args([
        "-pidfile",
        &dir.join("qemu.pid").display().to_string(),
        "-daemonize",
    ]);
    let out = qemu.output().context(
        "cannot run qemu-system-x86_64: install qemu-system-x86 (tests/setup-host does)",
    )?;
    if !out.status.success() {
        bail!(
            "QEMU did not start: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))?
        .trim()
        .parse()
        .context("QEMU wrote no pid")?;
    let mut state = State {
        qemu_pid: pid,
        agent_port,
        token,
        forwards: opts.forwards.clone(),
        kernel: opts.kernel.clone(),
        boot_id: String::new(),
        console_offset: 0,
        firmware: opts.firmware,
    };
    save(dir, &state)?;
    match wait_for_boot(dir, &mut state, opts.boot_timeout, false) {
        Ok(up) => Ok(up),
        Err(e) => {
            // A guest that never came up is of no use to anyone: do not leave it holding the ports.
            let _ = stop(dir);
            Err(e)
        }
    }
}

/// Waits for a boot other than `state.boot_id` to answer and reach multi-user.target.
fn wait_for_boot(dir: &Path, state: &mut State, timeout: Duration, crash_ok: bool) -> Result<Up> {
    let t0 = Instant::now();
    let mut answered_after = None;
    loop {
        if !alive(state.qemu_pid) {
            bail!(
                "QEMU exited while waiting for the guest. Last console lines:\n{}",
                console::last_lines(&read_console(dir), 20)
            );
        }
        let raw = std::fs::read(console_path(dir)).unwrap_or_default();
        let log =
            String::from_utf8_lossy(raw.get(state.console_offset..).unwrap_or(&raw)).into_owned();
        if let Some(crash) = console::find_crash(&log).filter(|_| !crash_ok) {
            bail!(
                "the guest kernel crashed (seen on the serial console; if it recurs under TCG, try KUP_LAB_TCG_THREAD=single):\n{crash}"
            );
        }
        match client::hello(state.agent_port, &state.token) {
            Ok(w) if w.boot_id != state.boot_id => {
                let answered = *answered_after.get_or_insert(t0.elapsed().as_secs_f64());
                if w.multi_user {
                    let up = Up {
                        welcome: w.clone(),
                        answered_after: answered,
                        multi_user_after: t0.elapsed().as_secs_f64(),
                    };
                    state.boot_id = w.boot_id;
                    state.kernel = w.kernel;
                    state.console_offset = raw.len();
                    save(dir, state)?;
                    return Ok(up);
                }
            }
            Ok(_)
            | Err(ClientError::NoAnswer)
            | Err(ClientError::Io(_))
            | Err(ClientError::Lost) => {}
            Err(e @ ClientError::Refused(_)) => return Err(e.into()),
        }
        if t0.elapsed() > timeout {
            bail!(
                "the guest did not come up within {} s. Last console lines:\n{}",
                timeout.as_secs(),
                console::last_lines(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until the guest answers again from a new boot (after kexec or reboot). With `crash_ok`, a
/// kernel crash on the console on the way (a fault test's panic) is not an error.
pub fn wait(dir: &Path, timeout: Duration, crash_ok: bool) -> Result<Up> {
    let mut state = load(dir)?;
    wait_for_boot(dir, &mut state, timeout, crash_ok)
}

/// Powers the guest off and removes its run directory. `Ok(false)` when no guest was there.
pub fn stop(dir: &Path) -> Result<bool> {
    let Ok(text) = std::fs::read_to_string(state_path(dir)) else {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        return Ok(false);
    };
    if let Ok(st) = serde_json::from_str::<State>(&text) {
        let pid = Pid::from_raw(st.qemu_pid);
        if alive(st.qemu_pid) {
            let _ = kill(pid, Signal::SIGTERM);
            let t0 = Instant::now();
            while alive(st.qemu_pid) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive(st.qemu_pid) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(true)
}

/// Writes the payload disk: the agent, the token, an id, and the project's install tree.
fn write_payload(path: &Path, token: &str, tree: Option<&Path>) -> Result<()> {
    let agent = std::env::current_exe()?.with_file_name("kup-lab-agent");
    if !agent.is_file() {
        bail!(
            "{} is missing: build the lab with `cargo build --release -p kup-lab`",
            agent.display()
        );
    }
    let mut b = tar::Builder::new(std::fs::File::create(path)?);
    b.follow_symlinks(false);
    let add_bytes =
        |b: &mut tar::Builder<std::fs::File>, name: &str, mode: u32, data: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, data)?;
            Ok(())
        };
    add_bytes(
        &mut b,
        "./usr/local/sbin/kup-lab-agent",
        0o755,
        &std::fs::read(&agent)?,
    )?;
    add_bytes(&mut b, "./etc/kup-lab/token", 0o600, token.as_bytes())?;
    let id: u64 = rand::rng().random();
    add_bytes(
        &mut b,
        "./etc/kup-lab/payload-id",
        0o644,
        format!("{id:016x}\n").as_bytes(),
    )?;
    if let Some(tree) = tree {
        b.append_dir_all(".", tree)
            .with_context(|| format!("cannot pack the install tree {}", tree.display()))?;
    }
    let mut f = b.into_inner()?;
    // The guest reads the tar stream straight off a block device: pad to whole sectors.
    let len = f.metadata()?.len();
    f.write_all(&vec![0u8; ((512 - len % 512) % 512) as usize + 8192])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_and_bad_ones_name_the_problem() {
        assert_eq!(parse_forward("11211:11211").unwrap(), (11211, 11211));
        assert!(
            parse_forward("11211")
                .unwrap_err()
                .to_string()
                .contains("HOSTPORT:GUESTPORT")
        );
        assert!(
            parse_forward("x:1")
                .unwrap_err()
                .to_string()
                .contains("\"x\"")
        );
        assert!(
            parse_forward("0:1")
                .unwrap_err()
                .to_string()
                .contains("not a port")
        );
    }
}
