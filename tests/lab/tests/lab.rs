//! Lab acceptance tests: boot real Debian kernels under QEMU and check from the host.
//! They need QEMU and the cached image (`tests/run` sets both up), so they are `#[ignore]`d in a
//! plain `cargo test` and run with `--include-ignored`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const OLD: &str = "6.12.107+deb13-cloud-amd64";
const NEW: &str = "6.12.117+deb13-cloud-amd64";

/// A lab with its own run directory, stopped when dropped.
struct Lab {
    run: PathBuf,
}

impl Lab {
    fn new(name: &str) -> Self {
        let run = std::env::temp_dir().join(format!("kup-lab-test-{name}-{}", std::process::id()));
        let lab = Lab { run };
        lab.cmd(&["stop"]);
        lab
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kup-lab"))
            .args(args)
            .env("KUP_LAB_RUN_DIR", &self.run)
            .output()
            .expect("run kup-lab")
    }

    /// Runs a lab verb that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprint!("{stderr}");
        assert!(
            out.status.success(),
            "lab {args:?} failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        stdout
    }

    fn exec(&self, cmd: &str) -> String {
        self.ok(&["exec", "--", cmd]).trim().to_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.cmd(&["stop"]);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asks memcached on the host port for its version: a check from outside the guest.
fn memcached_version(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"version\r\n")?;
    let mut buf = [0u8; 128];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

fn up_line(stdout: &str) -> (String, String) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("lab: up "))
        .unwrap_or_else(|| panic!("no up line in {stdout:?}"));
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .to_owned()
    };
    (field("kernel="), field("boot="))
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn kexec_switches_to_the_new_kernel_and_services_answer() {
    let lab = Lab::new("kexec");
    let port = free_port();
    let started = lab.ok(&[
        "start",
        "--kernel",
        OLD,
        "--forward",
        &format!("{port}:11211"),
    ]);
    let (kernel, boot) = up_line(&started);
    assert_eq!(kernel, OLD);
    assert_eq!(lab.exec("uname -r"), OLD);
    assert_eq!(lab.exec("systemctl is-active memcached"), "active");
    assert!(memcached_version(port).unwrap().starts_with("VERSION "));

    let t0 = Instant::now();
    lab.exec(&format!(
        "kexec -s -l /boot/vmlinuz-{NEW} --initrd=/boot/initrd.img-{NEW} --reuse-cmdline && systemctl kexec --no-block"
    ));
    let waited = lab.ok(&["wait", "--timeout", "300"]);
    let switch = t0.elapsed();
    let (kernel2, boot2) = up_line(&waited);
    assert_eq!(kernel2, NEW);
    assert_ne!(boot2, boot, "the boot id must change across kexec");
    assert_eq!(lab.exec("uname -r"), NEW);
    assert_eq!(lab.exec("cat /proc/sys/kernel/random/boot_id"), boot2);
    assert!(
        memcached_version(port).unwrap().starts_with("VERSION "),
        "memcached answers on the new kernel"
    );
    eprintln!(
        "kernel switch (systemctl kexec call -> guest at multi-user again): {:.1} s",
        switch.as_secs_f64()
    );
}

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn bad_use_gives_a_one_line_error_naming_the_fix() {
    let lab = Lab::new("baduse");
    let one_line_error = |out: &Output, want: &[&str]| {
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("lab: "), "{err}");
        for w in want {
            assert!(last.contains(w), "{w:?} not in {last:?}");
        }
    };

    let out = lab.cmd(&["exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    one_line_error(&out, &["no guest is running", "lab start"]);

    let out = lab.cmd(&["start", "--kernel", "9.9.9-nonexistent"]);
    one_line_error(
        &out,
        &["no kernel \"9.9.9-nonexistent\"", OLD, "versions.env"],
    );

    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let out = lab.cmd(&["start", "--forward", &format!("{taken}:11211")]);
    one_line_error(
        &out,
        &[&format!("host port {taken}"), "already in use", "--forward"],
    );

    let out = lab.cmd(&["start", "--forward", "11211"]);
    one_line_error(&out, &["HOSTPORT:GUESTPORT"]);

    // Nothing was left running by the refused starts.
    let out = lab.cmd(&["exec", "--", "true"]);
    one_line_error(&out, &["no guest is running"]);
}
