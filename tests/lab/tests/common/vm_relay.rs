//! The dry-run's throwaway VM, run one level up. kup in the guest starts QEMU itself; nested under
//! the guest's own TCG that is 50-100 times too slow (seen: 153 s to the VM's initrd, whose
//! services then timed out). So the test installs [`WRAPPER`] as `qemu-system-x86_64` in the
//! guest: it hands kup's exact arguments to the host and waits; [`serve`] runs them on the host
//! with only the host's paths for the guest's files (the target's kernel and initrd copied out of
//! the guest, the guest's root disk read through the lab's overlay file with `snapshot=on`), and
//! gives back what the VM wrote on its serial ports and its exit status. Everything kup does, and
//! everything the VM boots, is real; only where QEMU runs differs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Lab;

/// Where the wrapper and the host exchange files in the guest.
const DIR: &str = "/run/kup-lab/vm";

/// The stand-in for QEMU in the guest (`/usr/local/bin/qemu-system-x86_64`, ahead of /usr/bin on
/// kupd's PATH).
pub const WRAPPER: &str = r#"#!/bin/sh
# kup lab: runs kup's throwaway VM on the host (tests/lab/tests/common/vm_relay.rs).
d=/run/kup-lab/vm
rm -rf "$d"; mkdir -p "$d"
for a in "$@"; do printf '%s\0' "$a"; done > "$d/args.tmp" && mv "$d/args.tmp" "$d/args"
while [ ! -e "$d/done" ]; do sleep 0.5; done
n=0
for a in "$@"; do
    case "$a" in
        file:*) cp "$d/serial$n" "${a#file:}" 2>/dev/null; n=$((n + 1)) ;;
    esac
done
cat "$d/stderr" >&2 2>/dev/null
exit "$(cat "$d/done")"
"#;

/// Installs [`WRAPPER`] into the payload `tree`.
pub fn install(tree: &Path) {
    let bin = tree.join("usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = bin.join("qemu-system-x86_64");
    std::fs::write(&path, WRAPPER).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A VM run on the host for kup in the guest.
#[derive(Debug)]
pub struct Served {
    /// kup's QEMU arguments, as it gave them.
    pub args: Vec<String>,
    pub seconds: f64,
    pub status: i32,
}

/// Waits (up to `limit`) for kup in the guest to start its VM, runs it on the host, hands back the
/// serial ports and the status. `None` when kup started none before `limit` or `done()` said so.
pub fn serve(lab: &Lab, limit: Duration, done: &dyn Fn() -> bool) -> Option<Served> {
    let t0 = Instant::now();
    let args = loop {
        let (code, out, _) = lab.try_exec(&format!("base64 -w0 {DIR}/args 2>/dev/null"));
        if code == 0 && !out.trim().is_empty() {
            let raw = decode(out.trim());
            break raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>();
        }
        if done() || t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let host = lab.run.join("throwaway-vm");
    let _ = std::fs::remove_dir_all(&host);
    std::fs::create_dir_all(&host).unwrap();
    let mut serials = Vec::new();
    let mut out_args = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        out_args.push(a.clone());
        let Some(v) = (match a.as_str() {
            "-kernel" | "-initrd" | "-drive" | "-serial" => it.next(),
            _ => None,
        }) else {
            continue;
        };
        let mapped = match a.as_str() {
            // The target's files, as they are in the guest (kup's initrd hook was added there).
            "-kernel" | "-initrd" => copy_out(lab, v, &host),
            // The guest's root disk: the lab's overlay file, read-only under a snapshot.
            "-drive" => {
                assert!(
                    v.starts_with("file=/dev/") && v.contains("snapshot=on"),
                    "kup gives its VM the root device under a snapshot: {v}"
                );
                format!(
                    "file={},format=qcow2,if=virtio,snapshot=on,file.locking=off",
                    lab.run.join("overlay.qcow2").display()
                )
            }
            "-serial" => {
                let p = host.join(format!("serial{}", serials.len()));
                serials.push(p.clone());
                format!("file:{}", p.display())
            }
            _ => unreachable!(),
        };
        out_args.push(mapped);
    }
    eprintln!(
        "vm_relay: kup's VM on the host: qemu-system-x86_64 {}",
        out_args.join(" ")
    );
    let t = Instant::now();
    let out = std::process::Command::new("qemu-system-x86_64")
        .args(&out_args)
        .env("TMPDIR", &host)
        .output()
        .expect("run qemu-system-x86_64 on the host");
    let seconds = t.elapsed().as_secs_f64();
    let status = out.status.code().unwrap_or(1);
    for (n, p) in serials.iter().enumerate() {
        // The console's end is what matters; the exec's command line has a size limit.
        let bytes = std::fs::read(p).unwrap_or_default();
        let keep = &bytes[bytes.len().saturating_sub(48 * 1024)..];
        put(lab, &format!("{DIR}/serial{n}"), keep);
    }
    put(lab, &format!("{DIR}/stderr"), &out.stderr);
    lab.exec(&format!(
        "echo {status} > {DIR}/done.tmp && mv {DIR}/done.tmp {DIR}/done"
    ));
    Some(Served {
        args,
        seconds,
        status,
    })
}

/// Copies the guest's file `path` into `dir`; returns the host path.
fn copy_out(lab: &Lab, path: &str, dir: &Path) -> String {
    let data = decode(&lab.exec(&format!("base64 -w0 {path}")));
    let to: PathBuf = dir.join(Path::new(path).file_name().unwrap());
    std::fs::write(&to, data).unwrap();
    to.display().to_string()
}

/// Writes `data` to `path` in the guest.
fn put(lab: &Lab, path: &str, data: &[u8]) {
    lab.exec(&format!("echo {} | base64 -d > {path}", encode(data)));
}

/// base64 through the host's coreutils (the guest's side uses the same command).
fn base64(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("base64")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run base64");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "base64 {args:?}");
    out.stdout
}

fn decode(text: &str) -> Vec<u8> {
    base64(&["-d"], text.trim().as_bytes())
}

fn encode(data: &[u8]) -> String {
    String::from_utf8(base64(&["-w0"], data)).unwrap()
}
