//! nftables, the network lock across the switch: from the moment the new kernel configures its
//! network until a unit is restored, packets of the unit's established connections are dropped, so
//! the peer retransmits instead of receiving a reset (the connections then go on, unbroken).

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::tcp::TcpConn;

/// Where nft is installed.
pub const NFT: &str = "nft";

/// Why the lock could not be set.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {NFT}: {0}; install nftables (the kup package depends on it)")]
    Spawn(std::io::Error),
    #[error("nft refused the lock of {unit}'s connections: {stderr}")]
    Failed { unit: String, stderr: String },
}

/// The nftables table holding `unit`'s lock: `kup_` and the unit name, non-alphanumerics as `_`.
pub fn table_name(unit: &str) -> String {
    let mut s = String::from("kup_");
    s.extend(
        unit.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    s
}

fn matcher(src: &SocketAddr, dst: &SocketAddr) -> String {
    let fam = if src.is_ipv4() { "ip" } else { "ip6" };
    format!(
        "{fam} saddr {} tcp sport {} {fam} daddr {} tcp dport {}",
        src.ip(),
        src.port(),
        dst.ip(),
        dst.port()
    )
}

/// The ruleset that locks `conns`: both directions dropped before anything else sees them.
pub fn lock_ruleset(unit: &str, conns: &[TcpConn]) -> String {
    let t = table_name(unit);
    let mut input = String::new();
    let mut output = String::new();
    for c in conns {
        input.push_str(&format!("    {} drop\n", matcher(&c.remote, &c.local)));
        output.push_str(&format!("    {} drop\n", matcher(&c.local, &c.remote)));
    }
    format!(
        "table inet {t} {{\n  chain input {{\n    type filter hook input priority -400; policy accept;\n{input}  }}\n  chain output {{\n    type filter hook output priority -400; policy accept;\n{output}  }}\n}}\n"
    )
}

/// Locks `conns` of `unit` (nothing to do when there are none).
pub fn lock(unit: &str, conns: &[TcpConn]) -> Result<(), NftError> {
    if conns.is_empty() {
        return Ok(());
    }
    let mut child = Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(lock_ruleset(unit, conns).as_bytes())
            .map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            unit: unit.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Lifts `unit`'s lock; a lock that is not there is not an error.
pub fn unlock(unit: &str) {
    delete_table(&table_name(unit));
}

/// The tables CRIU's own network lock left in `listing` (`nft list tables` output): CRIU names them
/// `CRIU-<run id>` in the `inet` family and deletes them when it finishes, unless it died first.
pub fn parse_criu_tables(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .map(str::trim)
        .filter(|name| name.starts_with("CRIU-"))
        .map(str::to_owned)
        .collect()
}

/// CRIU's network-lock tables present now (none when nft cannot be run).
pub fn criu_tables() -> Vec<String> {
    Command::new(NFT)
        .args(["list", "tables"])
        .stderr(Stdio::null())
        .output()
        .map(|o| parse_criu_tables(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

/// Deletes the `inet` table `name`; one that is not there is not an error.
pub fn delete_table(name: &str) {
    let _ = Command::new(NFT)
        .args(["delete", "table", "inet", name])
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_lock_tables_a_dead_criu_left() {
        let listing = "table inet kup_memcached_service\ntable inet CRIU-3f1c9a0e\ntable ip filter\ntable ip CRIU-no\n";
        assert_eq!(parse_criu_tables(listing), ["CRIU-3f1c9a0e"]);
        assert!(parse_criu_tables("").is_empty());
    }

    #[test]
    fn table_names_are_nft_identifiers() {
        assert_eq!(table_name("memcached.service"), "kup_memcached_service");
        assert_eq!(table_name("a@b-1.service"), "kup_a_b_1_service");
    }

    #[test]
    fn ruleset_drops_both_directions_of_each_connection() {
        let c = TcpConn {
            local: "10.0.2.15:11211".parse().unwrap(),
            remote: "10.0.2.2:54514".parse().unwrap(),
        };
        let r = lock_ruleset("memcached.service", &[c]);
        assert!(r.starts_with("table inet kup_memcached_service {"));
        assert!(
            r.contains("ip saddr 10.0.2.2 tcp sport 54514 ip daddr 10.0.2.15 tcp dport 11211 drop")
        );
        assert!(
            r.contains("ip saddr 10.0.2.15 tcp sport 11211 ip daddr 10.0.2.2 tcp dport 54514 drop")
        );
        let v6 = TcpConn {
            local: "[::1]:80".parse().unwrap(),
            remote: "[::1]:4000".parse().unwrap(),
        };
        assert!(lock_ruleset("x", &[v6]).contains("ip6 saddr ::1 tcp sport 4000"));
    }
}
