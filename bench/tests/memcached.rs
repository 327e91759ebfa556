//! Against a real memcached on this host (skipped when /usr/bin/memcached is missing;
//! tests/setup-host installs it): a simulated outage (SIGSTOP for 1.5 s) is measured as such, no
//! answer is wrong, a `Keep` connection survives it, and the report and plot come out.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kup_bench::{Analysis, Kind, Load, LoadConfig, Mode, Table, Variant};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const MEMCACHED: &str = "/usr/bin/memcached";

struct Memcached {
    child: Child,
    port: u16,
}

impl Memcached {
    fn start() -> Memcached {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // `-u nobody` only matters when running as root, where memcached insists on it.
        let child = Command::new(MEMCACHED)
            .args([
                "-l",
                "127.0.0.1",
                "-U",
                "0",
                "-m",
                "64",
                "-t",
                "2",
                "-u",
                "nobody",
            ])
            .arg("-p")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("starting memcached");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !kup_bench::answers(port) {
            assert!(
                Instant::now() < deadline,
                "memcached on {port} never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Memcached { child, port }
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).expect("signalling memcached");
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_stopped_memcached_is_measured_as_an_outage() {
    if !Path::new(MEMCACHED).exists() {
        eprintln!("skipped: no {MEMCACHED} (tests/setup-host installs it)");
        return;
    }
    let mc = Memcached::start();
    let n = 3000;
    let bytes = kup_bench::load_keys(mc.port, n).unwrap();
    assert_eq!(bytes, kup_bench::working_set_bytes(n));

    let reconnect = Load::start(LoadConfig::new(mc.port, n)).unwrap();
    let mut keep_cfg = LoadConfig::new(mc.port, n);
    keep_cfg.threads = 2;
    keep_cfg.mode = Mode::Keep;
    // Shorter than the outage, so the kept connections do time out and must ride it out.
    keep_cfg.timeout = Duration::from_millis(500);
    let keep = Load::start(keep_cfg).unwrap();

    std::thread::sleep(Duration::from_millis(1500));
    reconnect.mark("update-start");
    keep.mark("update-start");
    mc.signal(Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    mc.signal(Signal::SIGCONT);
    reconnect.mark("restored");
    keep.mark("restored");
    // Long enough after the outage for the recovery measure (1 s window held 1 s).
    std::thread::sleep(Duration::from_millis(3000));
    let progress = reconnect.progress();
    let reconnect = reconnect.stop();
    let keep = keep.stop();
    assert!(progress.ok > 0);

    let analysis = Analysis::default();
    let m = analysis.metrics(&reconnect);
    eprintln!("reconnect: {m:?}");
    assert!(
        (1.3..=2.5).contains(&m.downtime_s),
        "downtime {} s for a 1.5 s outage",
        m.downtime_s
    );
    assert!(m.outage_end_s.is_some());
    assert_eq!(m.wrong, 0);
    assert!(m.ok > 0);

    let k = analysis.metrics(&keep);
    eprintln!("keep: {k:?} {:?}", keep.connections);
    assert!(
        (1.3..=2.5).contains(&k.downtime_s),
        "keep: downtime {} s for a 1.5 s outage",
        k.downtime_s
    );
    assert_eq!(k.wrong, 0);
    assert_eq!(k.connections_survived, Some(true), "{:?}", keep.connections);
    assert!(keep.connections.iter().all(|c| c.connects == 1));

    assert_eq!(kup_bench::verify_keys(mc.port, n).unwrap(), (n, 0));

    let dir = tempfile::tempdir().unwrap();
    let variants = vec![
        Variant::new("reconnect", Kind::Kup, bytes, reconnect),
        Variant::new("keep", Kind::Switch, bytes, keep),
    ];
    let table = Table::new(&variants, &analysis);
    table.write(dir.path()).unwrap();
    let md = std::fs::read_to_string(dir.path().join("table.md")).unwrap();
    assert!(md.contains("D_kup/D_switch"), "{md}");
    let png = dir.path().join("throughput.png");
    kup_bench::plot(&png, "memcached, SIGSTOP 1.5 s", &variants).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
}
