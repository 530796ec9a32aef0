//! Network namespaces and veth pairs a test creates — and always deletes, also on failure (a
//! namespace is deleted when its handle drops; deleting it deletes its interfaces and the veth
//! ends paired with them) — threads that run inside one, and the interfaces' kernel counters.

use std::{
    fs,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call, usable for namespaces and interfaces (≤ 15).
pub fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    #[expect(
        clippy::new_without_default,
        reason = "creating a namespace is an effect, not a default value"
    )]
    pub fn new() -> Self {
        let name = unique("mrm");
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // Uniform TCP headers (no SACK blocks), so the byte counts the tests derive from first
        // principles hold; retransmissions are accounted from TCP_INFO.
        for key in ["tcp_sack", "tcp_dsack"] {
            ns.sysctl(&format!("net.ipv4.{key}"), "0");
        }
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Runs `f` on a new thread that has entered this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let file = fs::File::open(&path).unwrap();
            // SAFETY: valid fd; moves only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Kernel counters of an interface in this namespace.
    pub fn counters(&self, interface: &str) -> IfCounters {
        let read = |what: &str| -> u64 {
            self.exec(&[
                "cat",
                &format!("/sys/class/net/{interface}/statistics/{what}"),
            ])
            .trim()
            .parse()
            .unwrap()
        };
        IfCounters {
            rx_packets: read("rx_packets"),
            rx_bytes: read("rx_bytes"),
            tx_packets: read("tx_packets"),
            tx_bytes: read("tx_bytes"),
        }
    }

    pub fn ifindex(&self, interface: &str) -> u32 {
        self.exec(&["cat", &format!("/sys/class/net/{interface}/ifindex")])
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IfCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl IfCounters {
    pub fn since(&self, before: &IfCounters) -> IfCounters {
        IfCounters {
            rx_packets: self.rx_packets - before.rx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            tx_packets: self.tx_packets - before.tx_packets,
            tx_bytes: self.tx_bytes - before.tx_bytes,
        }
    }
}

/// One end of a veth link.
pub struct End<'a> {
    pub ns: &'a Netns,
    pub name: String,
    pub mac: String,
}

/// Options for [`link`].
#[derive(Clone, Copy)]
pub struct LinkOptions {
    /// Keep IPv6 on (otherwise disabled, so no NDP/MLD chatter reaches the counters).
    pub ipv6: bool,
    /// One segment per skb: the stack does no GSO, so skb counters equal wire packets.
    pub no_gso: bool,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            ipv6: false,
            no_gso: true,
        }
    }
}

/// Creates a veth pair `a_name` (in `a`) ↔ `b_name` (in `b`), both down.
pub fn link<'a>(
    a: &'a Netns,
    a_name: &str,
    b: &'a Netns,
    b_name: &str,
    options: LinkOptions,
) -> (End<'a>, End<'a>) {
    sh(&[
        "ip", "link", "add", "name", a_name, "netns", &a.name, "type", "veth", "peer", "name",
        b_name, "netns", &b.name,
    ]);
    (prepare(a, a_name, options), prepare(b, b_name, options))
}

fn prepare<'a>(ns: &'a Netns, name: &str, options: LinkOptions) -> End<'a> {
    if options.no_gso {
        ns.ip(&["link", "set", "dev", name, "gso_max_segs", "1"]);
    }
    if options.ipv6 {
        // No link-local address (no router solicitations), no DAD.
        ns.ip(&["link", "set", "dev", name, "addrgenmode", "none"]);
        ns.sysctl(&format!("net.ipv6.conf.{name}.accept_dad"), "0");
    } else {
        ns.sysctl(&format!("net.ipv6.conf.{name}.disable_ipv6"), "1");
    }
    let mac = ns.exec(&["cat", &format!("/sys/class/net/{name}/address")]);
    End {
        ns,
        name: name.to_owned(),
        mac: mac.trim().to_owned(),
    }
}

/// A veth pair between `a` and `b` with an address on each end (`a_cidr`, `b_cidr`), permanent
/// neighbour entries for each other, and both ends up.
pub fn point_to_point(
    (a, a_name, a_cidr): (&Netns, &str, &str),
    (b, b_name, b_cidr): (&Netns, &str, &str),
) {
    let (end_a, end_b) = link(a, a_name, b, b_name, LinkOptions::default());
    end_a.addr(a_cidr);
    end_b.addr(b_cidr);
    let host = |cidr: &str| cidr.split('/').next().unwrap_or(cidr).to_owned();
    end_a.neighbour(&host(b_cidr), &end_b.mac);
    end_b.neighbour(&host(a_cidr), &end_a.mac);
    end_a.up();
    end_b.up();
}

impl End<'_> {
    pub fn addr(&self, cidr: &str) {
        let mut args = vec!["addr", "add", cidr, "dev", &self.name];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ns.ip(&args);
    }

    pub fn up(&self) {
        self.ns.ip(&["link", "set", "dev", &self.name, "up"]);
    }

    /// A permanent neighbour entry, so no ARP/NDP crosses the link.
    pub fn neighbour(&self, ip: &str, mac: &str) {
        self.ns.ip(&[
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            &self.name,
            "nud",
            "permanent",
        ]);
    }
}
