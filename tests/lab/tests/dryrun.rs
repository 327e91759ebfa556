//! Lab acceptance test of the dry-run (`kupctl dry-run`, D-Bus `DryRun`): memcached is reported
//! restorable, restored on the target kernel in a throwaway VM (nested QEMU in the guest) with all
//! its keys (its health command there counts them), and a service holding an io_uring instance
//! (which CRIU cannot checkpoint) is not, with the reason; neither service is disturbed: same
//! PIDs, every key, no failed request from the host while it runs, a connection opened before it
//! still answers, nothing switched, nothing written to the disk by the VM.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Lab, NEW, OLD, free_port, memcached, vm_relay};

const KEYS: u32 = 20_000;

/// memcached's health command counts its items: in the throwaway VM it passes only if the restore
/// brought every key.
const CONFIG: &str = "[update]\ngrace = 2\n\n[[unit]]\nname = \"memcached.service\"\nhealth = \"printf 'stats\\\\r\\\\nquit\\\\r\\\\n' | nc -q1 127.0.0.1 11211 | grep -q 'curr_items 20000'\"\n\n[[unit]]\nname = \"kup-lab-uring.service\"\n";

const URING_UNIT: &str = "[Unit]\nDescription=kup lab: a service holding an io_uring instance\n\n[Service]\nExecStart=/usr/local/bin/kup-lab-uring\n";

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn dry_run_reports_each_unit_and_disturbs_none() {
    let tree = common::install_tree("dryrun", CONFIG);
    let bin = tree.join("usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_kup-lab-uring"),
        bin.join("kup-lab-uring"),
    )
    .unwrap();
    let units = tree.join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join("kup-lab-uring.service"), URING_UNIT).unwrap();
    // kup's throwaway VM runs on the host (common::vm_relay): nested in the guest's TCG it is far
    // too slow. The guest's root disk honours flushes, so the host reads what kup synced.
    vm_relay::install(&tree);
    let lab = Lab::new("dryrun");
    let port = free_port();
    lab.boot_old_flushing(&tree, port);
    lab.exec("systemctl daemon-reload && systemctl start kup-lab-uring");
    assert_eq!(lab.exec("systemctl is-active kup-lab-uring"), "active");
    memcached::load(port, KEYS).expect("load memcached from the host");
    let pid_m = lab.exec("systemctl show -p MainPID --value memcached");
    let pid_u = lab.exec("systemctl show -p MainPID --value kup-lab-uring");
    let mut kept = memcached::Kept::open(port).expect("connect a kept client");
    assert!(kept.get_matches(9).unwrap());

    // A host client asks memcached all along, each time on a new connection: not one request may
    // fail or come back wrong (a trial dump pauses memcached: answers come late, not never).
    let stop = Arc::new(AtomicBool::new(false));
    let (asked, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let slowest = Arc::new(AtomicU32::new(0));
    let probe = {
        let (stop, asked, failed, slowest) = (
            Arc::clone(&stop),
            Arc::clone(&asked),
            Arc::clone(&failed),
            Arc::clone(&slowest),
        );
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                asked.fetch_add(1, Ordering::SeqCst);
                let t = Instant::now();
                let ok = memcached::Kept::open(port)
                    .and_then(|mut c| c.get_matches(i % KEYS))
                    .unwrap_or(false);
                if !ok {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                let ms = u32::try_from(t.elapsed().as_millis()).unwrap_or(u32::MAX);
                slowest.fetch_max(ms, Ordering::SeqCst);
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let t = Instant::now();
    let finished = AtomicBool::new(false);
    let ((code, out, err), served) = std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            let r = lab.try_exec(&format!("kupctl dry-run --kernel {NEW}"));
            finished.store(true, Ordering::SeqCst);
            r
        });
        let served = vm_relay::serve(&lab, Duration::from_secs(900), &|| {
            finished.load(Ordering::SeqCst)
        });
        (run.join().unwrap(), served)
    });
    eprintln!(
        "kupctl dry-run (with the VM) took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let served = served.unwrap_or_else(|| panic!("kup started no throwaway VM:\n{out}{err}"));
    eprintln!(
        "the throwaway VM ran {:.1} s on the host and exited with {}",
        served.seconds, served.status
    );
    // What kup asked of QEMU: the target's kernel, no network card, TCG (the guest has no usable
    // KVM), the restore target and the dry-run's handoff on the command line.
    let args = served.args.join(" ");
    assert!(
        args.contains(&format!("-kernel /boot/vmlinuz-{NEW}")),
        "{args}"
    );
    assert!(
        args.contains("-nic none") && args.contains("-accel tcg"),
        "{args}"
    );
    assert!(
        args.contains("systemd.unit=kup-dry-run.target") && args.contains("kup.dryrun=1"),
        "{args}"
    );
    // The JSON form, without the VM this time (its own setting).
    lab.exec("mkdir -p /etc/kup/kup.d && printf '[update]\\ndry_run_vm_timeout = 0\\n' > /etc/kup/kup.d/50-no-vm.toml");
    let (jcode, json, _) = lab.try_exec(&format!("kupctl dry-run --kernel {NEW} --json"));
    lab.exec("rm /etc/kup/kup.d/50-no-vm.toml");
    stop.store(true, Ordering::SeqCst);
    probe.join().unwrap();
    eprintln!("{out}{err}");
    assert_eq!(
        code, 1,
        "a unit is not restorable: kupctl dry-run exits 1\n{out}{err}"
    );
    assert_eq!(jcode, 1, "{json}");
    assert!(
        out.contains(&format!("dry-run of an update to {NEW}")),
        "{out}"
    );
    let row = |unit: &str| {
        out.lines()
            .find(|l| l.starts_with(unit))
            .unwrap_or_else(|| panic!("no row for {unit} in:\n{out}"))
            .to_owned()
    };
    let m = row("memcached.service");
    assert!(m.split_whitespace().nth(1) == Some("yes"), "{m}");
    assert!(
        m.contains("checkpointed whole while it kept running"),
        "{m}"
    );
    // Restored on the target kernel in the throwaway VM, where its health command found every key.
    assert!(
        m.contains(&format!(
            "restored on {NEW} in a throwaway VM: active as PID {pid_m}, its health command passed"
        )),
        "{m}"
    );
    assert!(
        out.contains(&format!(
            "throwaway VM: {NEW} booted in a throwaway VM (TCG"
        )) && out.contains("it restored 1 of 1 unit(s)"),
        "{out}"
    );
    // The update would be refused before anything is frozen, naming the unit and the cause.
    assert!(
        out.contains("the update would be refused: kup-lab-uring.service cannot be checkpointed"),
        "{out}"
    );
    let u = row("kup-lab-uring.service");
    assert!(u.split_whitespace().nth(1) == Some("no"), "{u}");
    assert!(
        u.contains("holds an io_uring instance") && u.contains("which CRIU cannot checkpoint"),
        "{u}"
    );
    assert!(
        err.contains("1 of 2 unit(s) not restorable, and the update would be refused"),
        "{err}"
    );
    assert!(
        json.contains("\"restorable\": false") && json.contains("\"restorable\": true"),
        "{json}"
    );
    assert!(
        json.contains("\"vm\": \"none: dry_run_vm_timeout = 0\"")
            && !json.contains("\"restored_in_vm\": true"),
        "{json}"
    );
    eprintln!(
        "host client during the dry-runs: {} requests, {} failed, the slowest answered in {} ms",
        asked.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        slowest.load(Ordering::SeqCst)
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no request failed");

    // Nothing was disturbed, nothing switched, nothing left behind.
    assert_eq!(lab.exec("uname -r"), OLD);
    assert_eq!(
        lab.exec("systemctl show -p MainPID --value memcached"),
        pid_m
    );
    assert_eq!(
        lab.exec("systemctl show -p MainPID --value kup-lab-uring"),
        pid_u
    );
    assert_eq!(
        lab.exec("systemctl is-active memcached kup-lab-uring"),
        "active\nactive"
    );
    assert_eq!(memcached::verify(port, KEYS).unwrap(), (KEYS, 0));
    assert!(
        kept.get_matches(KEYS - 1).unwrap(),
        "the kept connection answers"
    );
    // The VM wrote only to its own snapshot: the dry-run's handoff it renamed in its view is gone
    // here only because the dry-run removed it, and no handoff appeared.
    assert_eq!(
        lab.exec("ls -A /var/lib/kup/images 2>/dev/null; test -e /var/lib/kup/handoff && echo handoff-left; test -e /var/lib/kup/dry-run && echo dry-run-left; test -e /var/lib/kup/last-handoff.json && echo outcome-written; true"),
        ""
    );
    let console = lab.exec("cat /var/log/kup/dry-run/vm-console.log");
    // The VM's console, kept for the administrator: it booted the restore's own target.
    assert!(
        console.contains("Reached target") && console.contains("kup-dry-run.target"),
        "{console}"
    );
    assert_eq!(lab.exec("nft list tables | grep -c CRIU || true"), "0");
    // CRIU's log of each trial is kept for the administrator.
    let logs = lab.exec("ls /var/log/kup/dry-run/*");
    assert!(logs.contains("dry-run.log"), "{logs}");
    // Only an administrator may run it.
    let (code, _, err) = lab.try_exec("useradd -m kupuser && runuser -u kupuser -- kupctl dry-run");
    assert_ne!(code, 0);
    assert!(err.contains("not authorized"), "{err}");
}
