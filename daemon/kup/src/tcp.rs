//! Established TCP connections of a process tree, read from /proc at dump time: the connections the
//! next kernel must not reset before their process is restored (see [`crate::nft`]).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// One established connection, as the dumped process saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TcpConn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// `ESTABLISHED` in the `st` column of /proc/net/tcp.
const ESTABLISHED: &str = "01";

/// Parses an address column of /proc/net/tcp or tcp6 (`0F02000A:2BCB`): the address words are
/// printed in host byte order (little-endian here), the port in plain hex. IPv4-mapped IPv6
/// addresses come back as IPv4: that is what travels on the wire.
pub fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::from_be);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?.to_be_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?.to_be_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The established connections of a /proc/net/tcp{,6} text whose socket inode is in `inodes`.
pub fn parse_established(text: &str, inodes: &HashSet<u64>) -> Vec<TcpConn> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&ESTABLISHED) {
                return None;
            }
            let inode: u64 = f.get(9)?.parse().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            Some(TcpConn {
                local: parse_addr(f.get(1)?)?,
                remote: parse_addr(f.get(2)?)?,
            })
        })
        .collect()
}

/// The established TCP connections held by any of `pids` (a dumped tree, all in one network
/// namespace: that of `pids[0]`). Unreadable entries are skipped: a process that exits takes its
/// sockets with it.
pub fn established(pids: &[i32]) -> Vec<TcpConn> {
    let Some(first) = pids.first() else {
        return Vec::new();
    };
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Some(ino) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| crate::criu::parse_socket_inode(&l.to_string_lossy()))
            {
                inodes.insert(ino);
            }
        }
    }
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{first}/net/{table}")) {
            out.extend(parse_established(&text, &inodes));
        }
    }
    out.sort_by_key(|c| (c.local, c.remote));
    out.dedup();
    out
}

/// Takes every TCP socket of `pids` out of repair mode, as CRIU does when a dump fails: a CRIU that
/// died in the middle of a dump leaves its tree's established sockets in repair mode, where they
/// neither send nor acknowledge. Each socket is reached through the process's descriptor table
/// (`pidfd_getfd`); turning repair off sends a window probe, and the connection goes on. Returns how
/// many sockets were in repair mode.
pub fn leave_repair(pids: &[i32]) -> usize {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt::TcpRepair};
    use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};

    let mut seen = HashSet::new();
    let mut repaired = 0;
    for &pid in pids {
        let Some(pidfd) = Pid::from_raw(pid).and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Some(ino) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| crate::criu::parse_socket_inode(&l.to_string_lossy()))
            else {
                continue;
            };
            let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if !seen.insert(ino) {
                continue;
            }
            let Ok(sock) = pidfd_getfd(&pidfd, n, PidfdGetfdFlags::empty()) else {
                continue;
            };
            // Not a TCP socket: the option does not exist there.
            if getsockopt(&sock, TcpRepair) != Ok(1) {
                continue;
            }
            // TCP_REPAIR_OFF (0): leave repair mode and probe the peer's window.
            if setsockopt(&sock, TcpRepair, &0).is_ok() {
                repaired += 1;
            }
        }
    }
    repaired
}

/// The local addresses of `conns` this machine does not have (yet): binding a socket to one fails
/// with "cannot assign requested address" until the network configuration assigns it.
pub fn missing_local_addresses(conns: &[TcpConn]) -> Vec<IpAddr> {
    local_addresses(conns)
        .into_iter()
        .filter(|ip| std::net::TcpListener::bind(SocketAddr::new(*ip, 0)).is_err())
        .collect()
}

/// The distinct local addresses of `conns`, sorted.
pub fn local_addresses(conns: &[TcpConn]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = conns.iter().map(|c| c.local.ip()).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Waits up to `limit` until every local address of `conns` is assigned (a kept connection can only
/// be restored onto its own address); returns those still missing.
pub fn wait_local_addresses(conns: &[TcpConn], limit: std::time::Duration) -> Vec<IpAddr> {
    let t0 = std::time::Instant::now();
    loop {
        let missing = missing_local_addresses(conns);
        if missing.is_empty() || t0.elapsed() >= limit {
            return missing;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:2BCB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   104        0 5011 1 0000000000000000 100 0 0 10 0
   1: 0F02000A:2BCB 0202000A:D4F2 01 00000000:00000000 00:00000000 00000000   104        0 7711 1 0000000000000000 20 4 30 10 -1
   2: 0F02000A:1C84 0202000A:C8A0 01 00000000:00000000 00:00000000 00000000     0        0 9000 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000F02000A:2BCB 0000000000000000FFFF00000202000A:D4F4 01 00000000:00000000 00:00000000 00000000   104        0 7712 1 0000000000000000 20 4 30 10 -1
   1: 00000000000000000000000001000000:2BCB 00000000000000000000000001000000:A000 01 00000000:00000000 00:00000000 00000000   104        0 7713 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn reads_only_the_established_sockets_of_the_tree() {
        let inodes: HashSet<u64> = [5011, 7711].into();
        assert_eq!(
            parse_established(TCP, &inodes),
            [TcpConn {
                local: "10.0.2.15:11211".parse().unwrap(),
                remote: "10.0.2.2:54514".parse().unwrap(),
            }]
        );
    }

    #[test]
    fn ipv6_words_are_host_order_and_mapped_addresses_are_ipv4() {
        let inodes: HashSet<u64> = [7712, 7713].into();
        let conns = parse_established(TCP6, &inodes);
        assert_eq!(conns[0].local, "10.0.2.15:11211".parse().unwrap());
        assert_eq!(conns[0].remote, "10.0.2.2:54516".parse().unwrap());
        assert_eq!(conns[1].local, "[::1]:11211".parse().unwrap());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let inodes: HashSet<u64> = [1].into();
        assert!(parse_established("header\n 0: zz:1 00:2 01 x x x x x 1\n", &inodes).is_empty());
        assert_eq!(parse_addr("0100007F:0050"), "127.0.0.1:80".parse().ok());
        assert_eq!(parse_addr("7F:0050"), None);
    }

    #[test]
    fn loopback_is_assigned_and_a_foreign_address_is_not() {
        let c = |ip: &str| TcpConn {
            local: format!("{ip}:11211").parse().unwrap(),
            remote: "10.0.2.2:4000".parse().unwrap(),
        };
        assert!(missing_local_addresses(&[c("127.0.0.1")]).is_empty());
        // TEST-NET-3 (RFC 5737) is never assigned to a test machine.
        let far = c("203.0.113.77");
        assert_eq!(missing_local_addresses(&[far]), [far.local.ip()]);
        assert_eq!(
            wait_local_addresses(&[far], std::time::Duration::from_millis(120)),
            [far.local.ip()]
        );
    }

    #[test]
    fn this_process_sees_its_own_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, _) = l.accept().unwrap();
        let conns = established(&[std::process::id() as i32]);
        assert!(
            conns
                .iter()
                .any(|x| x.local == c.local_addr().unwrap() && x.remote == l.local_addr().unwrap())
        );
    }

    #[test]
    fn a_socket_left_in_repair_mode_is_taken_out_and_talks_again() {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt::TcpRepair};
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        // What a CRIU that died mid-dump leaves (needs CAP_NET_ADMIN: the tests run as root).
        setsockopt(&c, TcpRepair, &1).expect("TCP_REPAIR needs root");
        assert_eq!(leave_repair(&[std::process::id() as i32]), 1);
        assert_eq!(getsockopt(&c, TcpRepair), Ok(0));
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(leave_repair(&[std::process::id() as i32]), 0);
    }
}
