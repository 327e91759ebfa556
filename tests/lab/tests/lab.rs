//! Lab acceptance tests: boot real Debian kernels under QEMU and check from the host.
//! They need QEMU and the cached image (`tests/run` sets both up), so they are `#[ignore]`d in a
//! plain `cargo test` and run with `--include-ignored`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::net::TcpListener;
use std::process::Output;
use std::time::Instant;

use common::{Lab, NEW, OLD, free_port, memcached, up_line};

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
    assert!(
        memcached::answers(port),
        "memcached answers on the host port"
    );

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
        memcached::answers(port),
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
