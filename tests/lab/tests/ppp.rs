//! Lab test of kup's kernel patch for persistent physical pages
//! (`kernel-patches/patches/0001-memfd-luo-ppp.patch`): a process's anonymous memory, more than half
//! of the guest's RAM, kept in place across kexec by preserving its pidfd in a LUO session, in both
//! directions between kup's two kernels (7.2.13-kup -> 7.3.4-kup -> 7.2.13-kup). The checks are
//! `kernel-patches/ppp-smoke.c`'s (TAP), run in a throw-away guest by `kernel-patches/boot-check`
//! (the lab image, the kernel booted with `-kernel`, commands on systemd's debug shell).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::kup_kernels::{self, KUP_72, KUP_73};

/// Guest memory.
const MEM_MIB: u32 = 2048;
/// The process's memory: more than half of the guest's RAM, so that a second copy cannot fit.
const PROCESS_MIB: u32 = 1100;

/// On the running kernel: the child fills its memory and its pidfd is preserved (ppp-smoke waits
/// until it says ready or failed), then the kernel `next` is loaded with `kexec_file_load`.
fn preserve_then_load(next: &str) -> [String; 2] {
    [
        format!(
            "setsid /run/boot-check/ppp-smoke preserve s {PROCESS_MIB} >/run/s.log 2>&1 & \
             for i in $(seq 900); do grep -q '^# ready\\|^Bail\\|^# FAILED' /run/s.log && break; sleep 1; done; \
             cat /run/s.log; dmesg | grep 'ppp:'; grep -q '^# PASSED so far' /run/s.log"
        ),
        format!("kexec -s -l /run/boot-check/vmlinuz-{next} --reuse-cmdline"),
    ]
}

/// On the new kernel: the files again (a new /run), then the memory back from the session.
fn retrieve() -> String {
    format!(
        "uname -r; mkdir -p /run/boot-check && tar -xf /dev/vdb -C /run/boot-check && \
         /run/boot-check/ppp-smoke retrieve s {PROCESS_MIB}"
    )
}

fn build_smoke(repo: &Path, out: &Path) -> PathBuf {
    let bin = out.join("ppp-smoke");
    let st = Command::new("gcc")
        .args(["-O2", "-Wall", "-static", "-o"])
        .arg(&bin)
        .arg(repo.join("kernel-patches/ppp-smoke.c"))
        .status()
        .expect("run gcc");
    assert!(
        st.success(),
        "gcc -static kernel-patches/ppp-smoke.c failed"
    );
    bin
}

#[test]
#[ignore = "boots kup's kernels under QEMU; run with --include-ignored"]
fn ppp_keeps_a_process_memory_in_place() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let smoke = build_smoke(&repo, tmp.path());
    let debs = kup_kernels::kup_kernel_debs();
    let vmlinuz = |deb: &Path, v: &str| deb.parent().unwrap().join(format!("vmlinuz-{v}"));
    let (v72, v73) = (vmlinuz(&debs[0], KUP_72), vmlinuz(&debs[1], KUP_73));
    let image = Command::new(env!("CARGO_BIN_EXE_kup-lab"))
        .arg("image")
        .output()
        .expect("run kup-lab image");
    assert!(image.status.success(), "kup-lab image failed");
    let image = PathBuf::from(String::from_utf8_lossy(&image.stdout).trim()).join("root.img");

    let mut cmds = vec!["uname -r".to_owned()];
    cmds.extend(preserve_then_load(KUP_73));
    cmds.push("@kexec kexec -e".into());
    cmds.push(retrieve());
    cmds.extend(preserve_then_load(KUP_72));
    cmds.push("@kexec kexec -e".into());
    cmds.push(retrieve());
    let log = tmp.path().join("console.log");
    let out = Command::new(repo.join("kernel-patches/boot-check"))
        .arg("--deb")
        .arg(&debs[0])
        .arg("--image")
        .arg(&image)
        .args(["--mem", &MEM_MIB.to_string(), "--file"])
        .arg(&smoke)
        .arg("--file")
        .arg(&v73)
        .arg("--file")
        .arg(&v72)
        .arg("--log")
        .arg(&log)
        .arg("--")
        .args(&cmds)
        .output()
        .expect("run kernel-patches/boot-check");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!("console:\n{}", kup_lab::console::last_lines(&console, 60));
    }
    // Both directions: preserved in place on each kernel, every check passed on the other.
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("in place took"))
        .collect();
    assert_eq!(kept.len(), 2, "one preservation on each kernel:\n{text}");
    for l in &kept {
        assert!(l.starts_with("ok "), "{l}");
    }
    assert_eq!(
        text.lines().filter(|l| *l == "# PASSED").count(),
        2,
        "the memory came back whole on {KUP_73} and on {KUP_72}:\n{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("not ok") || l.starts_with("Bail")),
        "{text}"
    );
    assert!(
        out.status.success(),
        "boot-check failed ({}); see the output above",
        out.status
    );
}
