//! Capture benchmarks (BENCHMARKS.md has the figures and the commands):
//!
//! - `per-packet`: mean cost of the programs per packet for several shapes, measured by the kernel
//!   with BPF_PROG_TEST_RUN (established-flow path: lookup + atomic adds), the least of five
//!   rounds; beside them, an empty program's on the same frame (the harness's own cost), and
//!   after them bare programs on the floor under them: one hash-map lookup alone (48- and
//!   24-byte keys), and with the counts (directly and through an array of maps).
//! - `throughput`: TCP bulk and small-UDP packet rates over a veth pair, without and with the
//!   agent attached, alternating runs.
//! - `agent-load`: the agent's CPU and memory while it evicts 10k new flows per second.
//! - `connections`: short TCP connections between pods on two nodes at fixed rates: spans made,
//!   CPU per connection of each process, peak RSS.
//! - `latency`: with default settings, from a cleanly closed connection's last packet to its
//!   span's acceptance by the OTLP endpoint.
//! - `tracker`: the flow tracker alone (one core, no I/O), the CPU time of each 1 s scan: a node
//!   with 100k long-lived connections and 1,000 short ones per second; and a node with 5,000
//!   short connections per second, each closed with a full FIN exchange (the `connections`
//!   bench's agent work at 5k/s without the kernel and the stream).
//!
//! Run as root: `cargo bench -p mermin-node-agent --bench capture -- [per-packet|throughput|agent-load|connections|latency|tracker]`.
//! Every loop is bounded in time; every namespace is removed on exit.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mermin_aggregator::{
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig},
};
use mermin_node_agent::capture::{self, Hook};
use support::{Agent, LinkOptions, Netns, frames::*, link};

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = which.is_empty();
    let wants = |name: &str| all || which.iter().any(|w| w == name);
    if wants("per-packet") {
        per_packet();
    }
    if wants("throughput") {
        throughput();
    }
    if wants("agent-load") {
        agent_load();
    }
    if wants("connections") {
        // Rates given after the name (`connections 5000`) replace the default ones.
        let rates: Vec<u64> = which.iter().filter_map(|w| w.parse().ok()).collect();
        connections(&rates);
    }
    if wants("latency") {
        latency();
    }
    if wants("tracker") {
        tracker(TrackerLoad {
            long: 100_000,
            short_per_scan: 1_000,
            fast_close: false,
        });
        tracker(TrackerLoad {
            long: 0,
            short_per_scan: 5_000,
            fast_close: true,
        });
    }
}

/// What the `tracker` bench feeds the tracker each 1 s scan.
struct TrackerLoad {
    /// Long-lived TCP connections (both directions tracked; each sends every 10 s, so a tenth
    /// of them are absorbed per scan).
    long: u32,
    /// Short connections per scan, each seen on two interfaces in both directions, opened and
    /// closed within the scan.
    short_per_scan: u32,
    /// Whether their close completes within the scan (the final ACK seen: reported at the next
    /// scan) or is left to the close timeout.
    fast_close: bool,
}

/// The tracker's cost per scan under `load`: default timeouts; 60 scans measured after 30 of
/// warm-up.
fn tracker(load: TrackerLoad) {
    use mermin_node_agent::flows::{FlowTracker, Timeouts};
    use node_common::{FlowKey, FlowStats, direction, tcp_flags};
    const WARMUP: u64 = 30;
    const MEASURED: u64 = 60;
    const S: u64 = 1_000_000_000;
    let timeouts = Timeouts {
        active: Duration::from_secs(60),
        tcp_close: Duration::from_secs(5),
        tcp_idle: Duration::from_secs(20),
        udp_idle: Duration::from_secs(60),
        icmp_idle: Duration::from_secs(10),
        other_idle: Duration::from_secs(60),
    };
    let key = |client: u32, port: u16, ifindex: u32, outbound: bool| {
        let (client, server) = (client.to_be_bytes(), [10, 0, 255, 1]);
        let (src, dst) = if outbound {
            (client, server)
        } else {
            (server, client)
        };
        let mut k = FlowKey {
            src_port: if outbound { port } else { 443 },
            dst_port: if outbound { 443 } else { port },
            ifindex,
            ip_version: 4,
            protocol: 6,
            direction: if outbound {
                direction::EGRESS
            } else {
                direction::INGRESS
            },
            ..FlowKey::default()
        };
        k.src_addr[..4].copy_from_slice(&src);
        k.dst_addr[..4].copy_from_slice(&dst);
        k
    };
    let stats = |at: u64, first: u32, flags: u32| FlowStats {
        packets: 3,
        bytes: 300,
        first_seen_ns: at,
        last_seen_ns: at,
        tcp_flags: u64::from(flags),
        first_tcp_flags: first,
        segments: 0,
    };
    let mut tracker = FlowTracker::new(timeouts, 262_144);
    let mut entries = Vec::new();
    let mut out = Vec::new();
    let mut spent = Duration::ZERO;
    let mut reports = 0;
    let ack = tcp_flags::ACK | tcp_flags::PSH;
    let (syn, syn_ack) = (tcp_flags::SYN, tcp_flags::SYN | tcp_flags::ACK);
    let closed = tcp_flags::SYN
        | tcp_flags::ACK
        | tcp_flags::FIN
        | if load.fast_close {
            tcp_flags::ACK_AFTER_FIN
        } else {
            0
        };
    for scan in 0..WARMUP + MEASURED {
        let now = (scan + 1) * S;
        entries.clear();
        for c in (0..load.long).filter(|c| u64::from(*c) % 10 == scan % 10) {
            let client = 0x0a01_0000 + c / 60_000;
            let port = 1024 + (c % 60_000) as u16;
            let (first_out, first_in) = if scan < 10 {
                (syn, syn_ack)
            } else {
                (ack, ack)
            };
            entries.push((
                key(client, port, 3, true),
                stats(now - S / 2, first_out, ack | first_out),
            ));
            entries.push((
                key(client, port, 3, false),
                stats(now - S / 2, first_in, ack | first_in),
            ));
        }
        for j in 0..load.short_per_scan {
            // A new client address every scan: no 5-tuple is reused within the close timeout.
            let client = 0x0a02_0000 + scan as u32;
            let port = 1024 + j as u16;
            for ifindex in [4, 5] {
                entries.push((
                    key(client, port, ifindex, true),
                    stats(now - S / 4, syn, closed),
                ));
                entries.push((
                    key(client, port, ifindex, false),
                    stats(now - S / 4, syn_ack, closed),
                ));
            }
        }
        out.clear();
        let start = Instant::now();
        tracker.absorb_interval(&entries, &mut out);
        tracker.evict(now, &mut out);
        if scan >= WARMUP {
            spent += start.elapsed();
            reports += out.len();
        }
    }
    println!(
        "| {} long-lived connections, {} short per scan{} | value |\n|---|---:|",
        load.long,
        load.short_per_scan,
        if load.fast_close {
            " (closed within it)"
        } else {
            ""
        }
    );
    println!(
        "| flows tracked at the end (live / tombstones) | {} / {} |",
        tracker.len(),
        tracker.tombstones()
    );
    println!(
        "| records reported per scan | {} |",
        reports as u64 / MEASURED
    );
    println!(
        "| CPU per 1 s scan (absorb + evict) | {:.0} µs |",
        spent.as_secs_f64() * 1e6 / MEASURED as f64
    );
    println!(
        "| share of one core | {:.2}% |",
        spent.as_secs_f64() * 100.0 / MEASURED as f64
    );
}

/// Connections closed with a FIN exchange, one every 50 ms, with every setting at its default
/// (agent scan 1 s — given, as the harness's agents scan every 200 ms —, aggregator settle 3 s
/// as the upper bound) and both pods' nodes known from a
/// static metadata file: the time from each connection's last packet (its span's end) to the
/// OTLP endpoint's acceptance of the request that carried it.
fn latency() {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use support::{
        aggregator::AggregatorProcess,
        cluster::cluster,
        otlp::{Receiver, serve},
    };
    const CONNECTIONS: usize = 200;
    let c = cluster();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let receiver = Receiver::default();
    let otlp = serve(&receiver, &runtime);
    let data = tempfile::tempdir().unwrap();
    let endpoints = data.path().join("endpoints.hcl");
    std::fs::write(
        &endpoints,
        r#"
endpoint "10.90.1.2" { pod = "client-0" namespace = "a" node = "node-a" }
endpoint "10.90.2.2" { pod = "server-0" namespace = "b" node = "node-b" }
"#,
    )
    .unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let file = endpoints.display().to_string();
    let aggregator = AggregatorProcess::start_with(
        listen,
        otlp,
        &data.path().join("store"),
        &["--metadata-file", &file],
    );
    let endpoint = format!("http://{listen}");
    let args = |node: &str| {
        [
            "--aggregator",
            &endpoint,
            "--node-name",
            node,
            "--scan-interval",
            "1s",
        ]
        .map(str::to_owned)
    };
    let (args_a, args_b) = (args("node-a"), args("node-b"));
    let agent_a = Agent::start(&c.node_a, "veth*,eth0", &as_str(&args_a));
    let agent_b = Agent::start(&c.node_b, "veth*,eth0", &as_str(&args_b));
    for _ in 0..CONNECTIONS {
        support::tcp_exchange(&c.a1, &c.b1, "10.90.2.2:8080".parse().unwrap(), 100, 200);
        thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let clients = || {
        let accepted = receiver.accepted.lock().unwrap();
        let at = receiver.accepted_at.lock().unwrap();
        accepted
            .iter()
            .zip(at.iter())
            .flat_map(|(request, at)| {
                request
                    .resource_spans
                    .iter()
                    .flat_map(|r| &r.scope_spans)
                    .flat_map(|s| &s.spans)
                    .filter(|s| s.kind == SpanKind::Client as i32)
                    .map(move |s| at.saturating_sub(s.end_time_unix_nano))
            })
            .collect::<Vec<u64>>()
    };
    while clients().len() < CONNECTIONS && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let mut latencies = clients();
    latencies.sort_unstable();
    let ms = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1e6
    };
    println!("| connections | CLIENT spans | min ms | p50 ms | p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {CONNECTIONS} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        latencies.len(),
        ms(0.0),
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
    drop(agent_a.stop());
    drop(agent_b.stop());
    drop(aggregator);
    drop(runtime);
}

fn per_packet() {
    const REPEAT: u32 = 1_000_000;
    // The least of several rounds: this shared VM's steal time only ever adds.
    const ROUNDS: usize = 5;
    let shapes: Vec<(&str, Vec<u8>)> = vec![
        (
            "IPv4 TCP, 64 B payload",
            ethernet(
                &[],
                ETH_P_IP,
                &ipv4(6, V4_A, V4_B, &[], 0, &tcp(40000, 443, 0x10, 64)),
            ),
        ),
        (
            "IPv4 TCP, 1448 B payload",
            ethernet(
                &[],
                ETH_P_IP,
                &ipv4(6, V4_A, V4_B, &[], 0, &tcp(40000, 443, 0x10, 1448)),
            ),
        ),
        (
            "IPv4 UDP in 802.1Q VLAN",
            ethernet(
                &[(ETH_P_8021Q, 42)],
                ETH_P_IP,
                &ipv4(17, V4_A, V4_B, &[], 0, &udp(53, 53, 100)),
            ),
        ),
        (
            "IPv6 TCP",
            ethernet(
                &[],
                ETH_P_IPV6,
                &ipv6(6, V6_A, V6_B, &[], &tcp(40000, 443, 0x10, 64)),
            ),
        ),
        (
            "IPv6 TCP behind hop-by-hop header",
            ethernet(
                &[],
                ETH_P_IPV6,
                &ipv6(
                    0,
                    V6_A,
                    V6_B,
                    &[6, 0, 0, 0, 0, 0, 0, 0],
                    &tcp(40000, 443, 0x10, 64),
                ),
            ),
        ),
        (
            "ICMP echo",
            ethernet(&[], ETH_P_IP, &ipv4(1, V4_A, V4_B, &[], 0, &icmp(8, 0, 56))),
        ),
        (
            "ARP (not IP: counted and skipped)",
            ethernet(&[], ETH_P_ARP, &[0; 28]),
        ),
    ];
    let mut capture = capture::load(65_536).expect("load (run as root)");
    let floor = BareClassifier::empty();
    println!(
        "| packet shape | ns per packet (egress) | ns per packet (ingress) | an empty program on the same frame (the harness's own cost) |"
    );
    println!("|---|---:|---:|---:|");
    for (name, frame) in &shapes {
        let mut cost = |hook| {
            // Warm up (creates the flow entry), then measure the established-flow path.
            capture.programs.test_run(hook, frame, 1000).unwrap();
            (0..ROUNDS)
                .map(|_| {
                    capture
                        .programs
                        .test_run(hook, frame, REPEAT)
                        .unwrap()
                        .as_nanos()
                })
                .min()
                .unwrap()
        };
        let egress = cost(Hook::Egress);
        let ingress = cost(Hook::Ingress);
        let harness = (0..ROUNDS)
            .map(|_| floor.test_run(frame, REPEAT))
            .min()
            .unwrap();
        println!("| {name} | {egress} | {ingress} | {harness} |");
    }
    // The floor under the figures above: the harness alone, then the harness and one lookup
    // in a hash map, of the flow key's 48 bytes and of the 24 an IPv4-only key would take.
    let frame = &shapes[0].1;
    println!("\n| bare classifier on the IPv4 TCP frame | ns per run |\n|---|---:|");
    for (name, classifier) in [
        ("empty (the harness)", floor),
        (
            "one hash lookup, 48-byte key",
            BareClassifier::hash_lookup(48),
        ),
        (
            "one hash lookup, 24-byte key",
            BareClassifier::hash_lookup(24),
        ),
        (
            "one hash lookup, 48-byte key, then two locked adds and the coarse clock",
            BareClassifier::hash_lookup_and_count(48, false),
        ),
        (
            "the same, the table reached through an array of maps (as the programs do)",
            BareClassifier::hash_lookup_and_count(48, true),
        ),
    ] {
        classifier.test_run(frame, 1000);
        let least = (0..ROUNDS)
            .map(|_| classifier.test_run(frame, REPEAT))
            .min()
            .unwrap();
        println!("| {name} | {least} |");
    }
}

/// A classifier written as raw BPF instructions and loaded with the `bpf(2)` call, run the way
/// the programs above are: what BPF_PROG_TEST_RUN costs per run with no program work
/// ([`BareClassifier::empty`]: copying the frame into an skb, the run loop, the clock reads),
/// and what one hash-map lookup adds ([`BareClassifier::hash_lookup`]), so the figures above can
/// be read as harness + program and the program against its floor.
struct BareClassifier {
    program: std::os::fd::OwnedFd,
    /// The maps the program reads, kept open as long as the program.
    _maps: Vec<std::os::fd::OwnedFd>,
}

/// One BPF instruction: opcode, destination and source registers, offset, immediate.
fn bpf_insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst | src << 4) << 8
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// `bpf(cmd, attr)`, the new descriptor it returns (or 0) checked.
fn bpf_call<T>(cmd: libc::c_long, attr: &mut T, what: &str) -> i32 {
    // SAFETY: `attr` is the `union bpf_attr` prefix `cmd` reads, and what it points to outlives
    // the call; the size is its own.
    let done = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    assert!(done >= 0, "{what}: {}", std::io::Error::last_os_error());
    done as i32
}

impl BareClassifier {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
    /// `r0 = -1` (TC_ACT_UNSPEC); `exit`.
    const RETURN_UNSPEC: [u64; 2] = [0xb7 | (u32::MAX as u64) << 32, 0x95];

    /// `r0 = -1; exit`.
    fn empty() -> Self {
        Self::load(&Self::RETURN_UNSPEC, Vec::new())
    }

    /// Looks up an all-zero key of `key_bytes` (a multiple of 8) in a hash map holding it with
    /// a flow entry's 48-byte value, as the programs look a packet's flow up (the verifier
    /// inlines the lookup of a map it knows, as it does for the programs' inner tables).
    fn hash_lookup(key_bytes: i16) -> Self {
        Self::with_flow_entry(key_bytes, &[], false)
    }

    /// [`Self::hash_lookup`], then what the programs do to a flow entry found: two locked adds
    /// (packets, bytes) and the tick-resolution clock stored as its last-seen time.
    fn hash_lookup_and_count(key_bytes: i16, nested: bool) -> Self {
        let count = [
            bpf_insn(0xbf, 6, 0, 0, 0),   // r6 = the entry
            bpf_insn(0xb7, 1, 0, 0, 1),   // r1 = 1
            bpf_insn(0xdb, 6, 1, 0, 0),   // lock *(u64 *)(r6 + 0) += r1
            bpf_insn(0xb7, 1, 0, 0, 64),  // r1 = 64
            bpf_insn(0xdb, 6, 1, 8, 0),   // lock *(u64 *)(r6 + 8) += r1
            bpf_insn(0x85, 0, 0, 0, 160), // call bpf_ktime_get_coarse_ns
            bpf_insn(0x7b, 6, 0, 24, 0),  // *(u64 *)(r6 + 24) = r0
        ];
        Self::with_flow_entry(key_bytes, &count, nested)
    }

    /// The lookup of [`Self::hash_lookup`], then `found` on the entry (in r0) when there is one.
    /// `nested`: the hash map is reached as the programs reach their flow table, through slot 0
    /// of an array of maps (looked up first, then the table it holds).
    fn with_flow_entry(key_bytes: i16, found: &[u64], nested: bool) -> Self {
        let table = Self::create_map(Self::BPF_MAP_TYPE_HASH, key_bytes as u32, 48, None);
        Self::update(&table, &vec![0u8; key_bytes as usize], &[0u8; 48]);
        let fd = |map: &std::os::fd::OwnedFd| std::os::fd::AsRawFd::as_raw_fd(map);
        // The key zeroed on the stack a word at a time (below it, slot 0's index when nested).
        let below_key = -i32::from(key_bytes);
        let mut program: Vec<u64> = (1..=key_bytes / 8)
            .map(|word| bpf_insn(0x7a, 10, 0, -8 * word, 0))
            .collect();
        let mut maps = vec![];
        if nested {
            let slots = Self::create_map(Self::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, Some(fd(&table)));
            Self::update(&slots, &0u32.to_ne_bytes(), &fd(&table).to_ne_bytes());
            let lookup_table = 4;
            program.extend([
                bpf_insn(0x7a, 10, 0, (below_key - 8) as i16, 0),
                bpf_insn(0x18, 1, 1, 0, fd(&slots)),
                0,
                bpf_insn(0xbf, 2, 10, 0, 0),
                bpf_insn(0x07, 2, 0, 0, below_key - 8),
                bpf_insn(0x85, 0, 0, 0, 1),
                // if r0 == 0 skip the rest; r1 = the table slot 0 holds
                bpf_insn(0x15, 0, 0, (lookup_table + 1 + found.len()) as i16, 0),
                bpf_insn(0xbf, 1, 0, 0, 0),
            ]);
            maps.push(slots);
        } else {
            program.extend([bpf_insn(0x18, 1, 1, 0, fd(&table)), 0]);
        }
        // r2 = the key; call bpf_map_lookup_elem; `found` if there is an entry.
        program.extend([
            bpf_insn(0xbf, 2, 10, 0, 0),
            bpf_insn(0x07, 2, 0, 0, below_key),
            bpf_insn(0x85, 0, 0, 0, 1),
            bpf_insn(0x15, 0, 0, found.len() as i16, 0),
        ]);
        program.extend(found);
        program.extend(Self::RETURN_UNSPEC);
        maps.push(table);
        Self::load(&program, maps)
    }

    fn create_map(
        map_type: u32,
        key_size: u32,
        value_size: u32,
        inner_map_fd: Option<i32>,
    ) -> std::os::fd::OwnedFd {
        #[repr(C)]
        #[derive(Default)]
        struct MapCreate {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
            inner_map_fd: u32,
            zero: [u64; 12],
        }
        let mut create = MapCreate {
            map_type,
            key_size,
            value_size,
            max_entries: if inner_map_fd.is_some() { 1 } else { 1024 },
            inner_map_fd: inner_map_fd.unwrap_or(0) as u32,
            ..MapCreate::default()
        };
        let map = bpf_call(Self::BPF_MAP_CREATE, &mut create, "creating a map");
        // SAFETY: a new descriptor that nothing else owns.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(map) }
    }

    fn update(map: &std::os::fd::OwnedFd, key: &[u8], value: &[u8]) {
        #[repr(C)]
        struct Update {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut update = Update {
            map_fd: std::os::fd::AsRawFd::as_raw_fd(map) as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: 0,
        };
        bpf_call(Self::BPF_MAP_UPDATE_ELEM, &mut update, "updating a map");
    }

    fn load(instructions: &[u64], maps: Vec<std::os::fd::OwnedFd>) -> Self {
        let license = c"GPL";
        #[repr(C)]
        struct Load {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            /// The rest of `union bpf_attr` as the kernel reads it for a load: all zero.
            zero: [u64; 16],
        }
        let mut attr = Load {
            prog_type: Self::BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: instructions.len() as u32,
            insns: instructions.as_ptr() as u64,
            license: license.as_ptr() as u64,
            zero: [0; 16],
        };
        let fd = bpf_call(Self::BPF_PROG_LOAD, &mut attr, "loading a bare classifier");
        Self {
            // SAFETY: a new descriptor that nothing else owns.
            program: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) },
            _maps: maps,
        }
    }

    /// The kernel's mean ns per run over `repeat` runs on `frame`.
    fn test_run(&self, frame: &[u8], repeat: u32) -> u32 {
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            zero: [u64; 8],
        }
        let mut attr = TestRun {
            prog_fd: std::os::fd::AsRawFd::as_raw_fd(&self.program) as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ..TestRun::default()
        };
        bpf_call(
            Self::BPF_PROG_TEST_RUN,
            &mut attr,
            "running a bare classifier",
        );
        assert_eq!(attr.retval, u32::MAX, "TC_ACT_UNSPEC");
        attr.duration
    }
}

/// Client 10.77.0.1 (c0) ↔ server 10.77.0.2 (s0); 10.77.0.3 resolves to s0 but nobody owns it.
fn pair(options: LinkOptions) -> (Netns, Netns) {
    let client = Netns::new();
    let server = Netns::new();
    {
        let (c, s) = link(&client, "c0", &server, "s0", options);
        c.addr("10.77.0.1/24");
        s.addr("10.77.0.2/24");
        c.neighbour("10.77.0.2", &s.mac);
        c.neighbour("10.77.0.3", &s.mac);
        s.neighbour("10.77.0.1", &c.mac);
        c.up();
        s.up();
    }
    (client, server)
}

const RUN: Duration = Duration::from_secs(4);

/// Bytes per second of one TCP stream client → server.
fn tcp_rate(client: &Netns, server: &Netns) -> f64 {
    let listener = server
        .spawn(|| TcpListener::bind("10.77.0.2:7001").unwrap())
        .join()
        .unwrap();
    let receiver = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let start = Instant::now();
    client
        .spawn(|| {
            let mut conn = TcpStream::connect("10.77.0.2:7001").unwrap();
            let buf = vec![0u8; 1 << 20];
            let start = Instant::now();
            while start.elapsed() < RUN {
                conn.write_all(&buf).unwrap();
            }
        })
        .join()
        .unwrap();
    let total = receiver.join().unwrap();
    total as f64 / start.elapsed().as_secs_f64()
}

/// Datagrams per second received, one sender of 64-byte UDP payloads.
fn udp_rate(client: &Netns, server: &Netns) -> f64 {
    let socket = server
        .spawn(|| {
            let s = UdpSocket::bind("10.77.0.2:7002").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        })
        .join()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (done, received) = (done.clone(), received.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let start = Instant::now();
    client
        .spawn(|| {
            let s = UdpSocket::bind("10.77.0.1:0").unwrap();
            s.connect("10.77.0.2:7002").unwrap();
            let start = Instant::now();
            let payload = [0u8; 64];
            while start.elapsed() < RUN {
                for _ in 0..64 {
                    let _ = s.send(&payload);
                }
            }
        })
        .join()
        .unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    received.load(Ordering::Relaxed) as f64 / elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (run count, total run time) of every loaded mermin program, from the kernel's BPF statistics.
fn program_stats() -> (u64, Duration) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| info.name_as_str().is_some_and(|n| n.starts_with("mermin_")))
        .fold((0, Duration::ZERO), |(count, time), info| {
            (count + info.run_count(), time + info.run_time())
        })
}

fn throughput() {
    let (client, server) = pair(LinkOptions {
        no_gso: false,
        ..LinkOptions::default()
    });
    // Per-program run counts and times, to report the cost per packet under real traffic.
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").unwrap();
    println!(
        "| traffic (one sender, veth pair) | without agent | with agent | change | program runs/s | ns per run (bpf_stats) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    type Rate = fn(&Netns, &Netns) -> f64;
    let cases: [(&str, Rate, f64, &str); 2] = [
        ("TCP bulk", tcp_rate, 1e9 / 8.0, "Gbit/s"),
        ("UDP 64 B datagrams", udp_rate, 1e3, "k datagrams/s"),
    ];
    for (name, rate, unit, unit_name) in cases {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        let (mut runs, mut run_time, mut seconds) = (0, Duration::ZERO, 0.0);
        for _ in 0..3 {
            off.push(rate(&client, &server));
            let agent = Agent::start(&client, "c0", &[]);
            let (count0, time0) = program_stats();
            let start = Instant::now();
            on.push(rate(&client, &server));
            seconds += start.elapsed().as_secs_f64();
            let (count1, time1) = program_stats();
            runs += count1 - count0;
            run_time += time1 - time0;
            drop(agent.stop());
        }
        let (off, on) = (median(off), median(on));
        println!(
            "| {name} | {:.2} {unit_name} | {:.2} {unit_name} | {:+.1}% | {:.0} k | {} |",
            off / unit,
            on / unit,
            (on - off) / off * 100.0,
            runs as f64 / seconds / 1e3,
            run_time.as_nanos() / u128::from(runs.max(1)),
        );
    }
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0").unwrap();
}

/// CPU time of a process so far (every thread, ended ones too), to the nanosecond: its CPU-time
/// clock, where /proc's utime + stime count whole clock ticks (10 ms).
fn cpu_ns(pid: u32) -> u64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: valid out-pointers; the pid is a child of this process.
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe {
        assert_eq!(libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock), 0);
        assert_eq!(libc::clock_gettime(clock, &mut now), 0);
    }
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn agent_load() {
    // The production path: records streamed to an aggregator (in this process, on loopback).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let aggregator = runtime.block_on(async {
        Aggregator::start(AggregatorConfig {
            settle: Duration::from_secs(1),
            grace: Duration::from_secs(5),
            ..AggregatorConfig::loopback(
                data.path().to_owned(),
                // Nothing listens there: spans stay in the outbox; the agent is what is measured.
                ExportConfig::new("http://127.0.0.1:9"),
            )
        })
        .await
        .unwrap()
    });
    let endpoint = format!("http://{}", aggregator.local_addr);
    println!("| measure | JSON lines to a file | gRPC stream to the aggregator |");
    println!("|---|---:|---:|");
    let json = agent_load_with(&[]);
    let grpc = agent_load_with(&["--aggregator", &endpoint]);
    for (name, a, b) in [
        (
            "new flows generated per second",
            json.generated,
            grpc.generated,
        ),
        ("records emitted per second", json.records, grpc.records),
    ] {
        println!("| {name} | {a:.0} | {b:.0} |");
    }
    println!(
        "| agent CPU, share of one core | {:.2}% | {:.2}% |",
        json.cpu, grpc.cpu
    );
    println!(
        "| agent RSS at the end / peak | {:.1} / {:.1} MB | {:.1} / {:.1} MB |",
        json.rss_mb, json.peak_mb, grpc.rss_mb, grpc.peak_mb
    );
    println!(
        "| packets lost by the kernel | {} | {} |",
        json.lost, grpc.lost
    );
    runtime.block_on(aggregator.shutdown());
}

struct Load {
    generated: f64,
    records: f64,
    cpu: f64,
    rss_mb: f64,
    peak_mb: f64,
    lost: u64,
}

/// The agent evicting 10k new flows per second, with `sink` arguments; CPU over 20 s.
fn agent_load_with(sink: &[&str]) -> Load {
    const FLOWS_PER_SEC: u64 = 10_000;
    const WARMUP: Duration = Duration::from_secs(5);
    const MEASURE: Duration = Duration::from_secs(20);
    let (client, _server) = pair(LinkOptions::default());
    let mut args = vec!["--scan-interval", "1s", "--udp-idle-timeout", "2s"];
    args.extend_from_slice(sink);
    let agent = Agent::start(&client, "c0", &args);
    let pid = agent.pid();
    let generator = client.spawn(move || {
        // One datagram per flow to an address that resolves but is not owned: no replies.
        let s = UdpSocket::bind("10.77.0.1:0").unwrap();
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < WARMUP + MEASURE {
            let due = (start.elapsed().as_secs_f64() * FLOWS_PER_SEC as f64) as u64;
            while sent < due {
                let port = 1024 + (sent % 60_000) as u16;
                let _ = s.send_to(&[0u8; 32], ("10.77.0.3", port));
                sent += 1;
            }
            thread::sleep(Duration::from_millis(2));
        }
        sent
    });
    thread::sleep(WARMUP);
    let emitted = || agent.metric("mermin_agent_records_emitted_total{reason=\"idle_timeout\"}");
    let (t0, c0, r0) = (Instant::now(), cpu_ns(pid), emitted());
    thread::sleep(MEASURE);
    let (t1, c1, r1) = (Instant::now(), cpu_ns(pid), emitted());
    let rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");
    let sent = generator.join().unwrap();
    let lost = agent
        .metric("mermin_agent_kernel_dropped_packets_total{reason=\"overflow_ring_full\"}")
        .unwrap_or(0);
    drop(agent.stop());
    let secs = (t1 - t0).as_secs_f64();
    Load {
        generated: sent as f64 / (WARMUP + MEASURE).as_secs_f64(),
        records: (r1.unwrap_or(0) - r0.unwrap_or(0)) as f64 / secs,
        cpu: (c1 - c0) as f64 / 1e9 / secs * 100.0,
        rss_mb: rss as f64 / 1024.0,
        peak_mb: hwm as f64 / 1024.0,
        lost,
    }
}

/// Short TCP connections between a client pod on node-a and a server pod on node-b, through the
/// whole system as deployed: an agent process per node (gRPC sink), the aggregator binary, an
/// OTLP receiver in this process. CPU of each process per connection, peak RSS, and how many
/// connections became exactly one span.
fn connections(rates: &[u64]) {
    println!(
        "| connections/s asked / made | connections | CLIENT spans | traces | 5-tuples | client→server packets: spans / wire | kernel merged a / b | agent node-a µs/conn | agent node-b µs/conn | aggregator µs/conn | peak RSS agent a / b / aggregator |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let runs: Vec<(u64, u64)> = if rates.is_empty() {
        vec![(1_000, 10), (5_000, 4), (10_000, 4)]
    } else {
        // Runs stay capped at 40k connections (the client's port search, see BENCHMARKS.md).
        rates
            .iter()
            .map(|&r| (r, (40_000 / r).clamp(1, 10)))
            .collect()
    };
    for (rate, seconds) in runs {
        connections_at(rate, Duration::from_secs(seconds));
    }
}

fn as_str(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn connections_at(rate: u64, duration: Duration) {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use support::{
        aggregator::AggregatorProcess,
        cluster::cluster,
        otlp::{Receiver, int, serve, text},
    };
    const SERVER: &str = "10.90.2.2:8080";
    let c = cluster();
    // Ports reused as a busy client's kernel reuses them: two seconds' worth of ports, and
    // TIME_WAIT reuse (the client closes first) — every 5-tuple carries several connections.
    let ports = 2 * rate;
    c.a1.sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("20000 {}", 20_000 + ports - 1),
    );
    c.a1.sysctl("net.ipv4.tcp_tw_reuse", "1");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let receiver = Receiver::default();
    let otlp = serve(&receiver, &runtime);
    let data = tempfile::tempdir().unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let aggregator = AggregatorProcess::start(listen, otlp, data.path());
    let endpoint = format!("http://{listen}");
    // The agents scan at the default interval, as deployed (the harness's agents scan every
    // 200 ms, for quick tests).
    let agent_args = |name: &'static str| {
        [
            "--aggregator".to_owned(),
            endpoint.clone(),
            "--node-name".to_owned(),
            name.to_owned(),
            "--scan-interval".to_owned(),
            "1s".to_owned(),
        ]
    };
    let args_a = agent_args("node-a");
    let args_b = agent_args("node-b");
    let agent_a = Agent::start(&c.node_a, "veth*,eth0", &as_str(&args_a));
    let agent_b = Agent::start(&c.node_b, "veth*,eth0", &as_str(&args_b));
    let pids = [agent_a.pid(), agent_b.pid(), aggregator.pid()];
    let total = rate * duration.as_secs();
    // The server runs until the client is done (then woken by a connection over its own
    // loopback, which no agent sees); it is listening before the client starts.
    let done = Arc::new(AtomicBool::new(false));
    let (bound, listening) = std::sync::mpsc::channel();
    let server = {
        let done = done.clone();
        c.b1.spawn(move || {
            let listener = TcpListener::bind(SERVER).unwrap();
            bound.send(()).unwrap();
            let mut buf = [0u8; 100];
            while let Ok((mut s, _)) = listener.accept() {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                if s.read_exact(&mut buf).is_ok() {
                    let _ = s.write_all(&[2u8; 200]);
                    let _ = s.read(&mut buf); // the client's FIN
                }
            }
        })
    };
    listening.recv_timeout(Duration::from_secs(5)).unwrap();
    let before: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect();
    let started = Instant::now();
    // One client thread per 5k connections/s, each paced on its own.
    let threads = rate.div_ceil(5_000);
    let clients: Vec<_> = (0..threads)
        .map(|_| {
            c.a1.spawn(move || {
                let start = Instant::now();
                let mut made = 0u64;
                let mut buf = [0u8; 200];
                let (total, rate) = (total / threads, rate / threads);
                for i in 0..total {
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let Ok(mut s) = std::net::TcpStream::connect(SERVER) else {
                        continue;
                    };
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    if s.write_all(&[1u8; 100]).is_ok() && s.read_exact(&mut buf).is_ok() {
                        made += 1;
                    }
                }
                made
            })
        })
        .collect();
    let made: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    done.store(true, Ordering::SeqCst);
    c.b1.spawn(|| drop(TcpStream::connect(SERVER)))
        .join()
        .unwrap();
    let elapsed = started.elapsed();
    // Every connection reported (close timeout + scan + settle + export), bounded.
    let spans = || {
        receiver
            .spans_with_service()
            .into_iter()
            .filter(|(_, s)| {
                s.kind == SpanKind::Client as i32 && int(s, "destination.port") == 8080
            })
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while (spans().len() as u64) < made && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    let after: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect();
    let peaks: Vec<u64> = pids.iter().map(|p| status_kib(*p, "VmHWM:")).collect();
    let spans = spans();
    for span in &spans {
        assert_eq!(text(span, "source.address"), "10.90.1.2");
    }
    // One span per connection with every packet counted once: the spans' client→server packets
    // add up to what the client pod's veth received from it.
    let sent_packets: i64 = spans.iter().map(|s| int(s, "flow.packets.sent")).sum();
    let wire = c.node_a.counters("vetha1");
    let traces: std::collections::HashSet<&[u8]> =
        spans.iter().map(|s| s.trace_id.as_slice()).collect();
    let tuples: std::collections::HashSet<i64> =
        spans.iter().map(|s| int(s, "source.port")).collect();
    let merged = |agent: &Agent| {
        agent
            .metric("mermin_agent_kernel_connections_merged_total")
            .unwrap_or(0)
    };
    let per_conn = |i: usize| (after[i] - before[i]) as f64 / 1e3 / made.max(1) as f64;
    println!(
        "| {rate} / {:.0} | {made} | {} | {} | {} | {sent_packets} / {} | {} / {} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} / {:.1} MB |",
        made as f64 / elapsed.as_secs_f64(),
        spans.len(),
        traces.len(),
        tuples.len(),
        wire.rx_packets,
        merged(&agent_a),
        merged(&agent_b),
        per_conn(0),
        per_conn(1),
        per_conn(2),
        peaks[0] as f64 / 1024.0,
        peaks[1] as f64 / 1024.0,
        peaks[2] as f64 / 1024.0,
    );
    let _ = server.join();
    drop(agent_a.stop());
    drop(agent_b.stop());
    drop(aggregator);
    drop(runtime);
}
