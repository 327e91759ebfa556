//! Lab acceptance test of the fault rows "CRIU killed mid pre-dump / mid dump" (docs/RELIABILITY.md):
//! CRIU is SIGKILLed while it holds memcached (failpoints `criu-kill-pre-dump`, `criu-kill-dump`).
//! A dead CRIU cleans nothing up: the kernel lets go of the traced tree, but its established
//! sockets stay in repair mode and CRIU's nftables lock stays, so the service would run with its
//! connections silent. kup must undo both and report; when CRIU died after the checkpoint was whole
//! and the tree gone, the update goes on from the images. Every check is made from the host.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Lab, NEW, OLD, free_port, memcached, up_line};

const KEYS: u32 = 20_000;

/// memcached marked, one pre-copy round (the row "mid pre-dump" needs one), restored eagerly.
const CONFIG: &str = "[update]\nprecopy_rounds = 1\nrestore = \"eager\"\ngrace = 2\n\n[[unit]]\nname = \"memcached.service\"\n";

#[test]
#[ignore = "lab: boots QEMU guests; run through tests/run"]
fn a_criu_killed_in_the_middle_loses_nothing() {
    let tree = common::install_tree("criu-killed", CONFIG);
    let lab = Lab::new("criu-killed");
    let port = free_port();
    lab.boot_old(&tree, port);
    memcached::load(port, KEYS).expect("load memcached from the host");
    let pid = lab.exec("systemctl show -p MainPID --value memcached");
    let mut kept = memcached::Kept::open(port).expect("connect a kept client");

    // An ordinary update to NEW arms the failpoints there (kupd reads them from its command line):
    // the first pre-dump is killed as soon as CRIU holds the tree, the first final dump at its
    // post-dump notification (dumped, images checked, sockets in repair mode, tree frozen), the
    // second final dump there too, with the tree killed as well.
    lab.begin_switch(&format!(
        "kupctl update --kernel {NEW} --append 'kup.failpoints=criu-kill-pre-dump=1*return(seized);criu-kill-dump=1*return(post-dump)->1*return(post-dump+tree)'"
    ));
    let (kernel, _) = up_line(&lab.ok(&["wait", "--timeout", "400"]));
    assert_eq!(kernel, NEW);
    common::assert_memcached_kept(&lab, port, &pid, KEYS, "the update to NEW");
    kept.assert_answers(1, "the update to NEW");

    // Rows "CRIU killed mid pre-dump" and "mid dump, the tree let go": the pre-copy round dies
    // (the update goes on without it), then the final dump dies after the checkpoint. The update
    // fails, nothing is switched, and memcached serves on, its connection included.
    let (code, out, err) = lab.try_exec(&format!("kupctl update --kernel {OLD}"));
    eprint!("{out}{err}");
    assert!(code != 0 && code != 255, "the update must fail: {out}{err}");
    assert!(err.contains("died before answering"), "{err}");
    assert!(err.contains("SIGKILL"), "{err}");
    assert!(err.contains("left running"), "{err}");
    assert_eq!(lab.exec("uname -r"), NEW, "nothing was switched");
    assert_eq!(
        lab.exec("systemctl show -p MainPID --value memcached"),
        pid,
        "memcached was never stopped"
    );
    kept.assert_answers(2, "a CRIU killed mid-dump");
    assert_eq!(memcached::verify(port, KEYS).unwrap(), (KEYS, 0));
    let journal = lab.exec("journalctl -b -u kupd -o cat --no-pager");
    assert!(
        journal.contains("pre-copy round failed") && journal.contains("SIGKILL"),
        "the journal says the pre-copy round died: {journal}"
    );
    assert!(
        journal.contains("socket(s) of memcached.service taken out of repair mode")
            && journal.contains("lock table(s) CRIU-"),
        "the journal says what kup undid: {journal}"
    );
    assert_eq!(
        lab.exec("nft list tables | grep -c CRIU- || true"),
        "0",
        "no CRIU lock table left"
    );
    assert_eq!(
        lab.exec("test -e /var/lib/kup/handoff && echo left || echo none"),
        "none"
    );
    assert_eq!(
        lab.exec("systemctl show -p DropInPaths --value memcached"),
        ""
    );

    // Row "CRIU killed after the tree was gone": the checkpoint was whole and checked, so the update
    // goes on from it, to OLD, where memcached comes back with every key on the same connection.
    lab.begin_switch(&format!("kupctl update --kernel {OLD}"));
    let (kernel, _) = up_line(&lab.ok(&["wait", "--timeout", "400"]));
    assert_eq!(kernel, OLD);
    common::assert_memcached_kept(&lab, port, &pid, KEYS, "a CRIU killed after the tree");
    kept.assert_answers(3, "a CRIU killed after the tree");
    kept.assert_answers(KEYS - 1, "a CRIU killed after the tree");
    let prev = lab.exec("journalctl -b -1 -u kupd -o cat --no-pager | grep 'going on' || true");
    assert!(
        prev.contains("going on from the checked images"),
        "the previous boot's journal says the update went on: {prev}"
    );
    let status = lab.exec("kupctl status --json");
    assert!(status.contains("\"result\": \"restored\""), "{status}");
}
