//! Test harness for the capture tests: the namespaces, veth pairs and threads inside them of
//! `mermin_test_support::netns` (re-exported here), the agent binary as a child process, its
//! JSON-lines records, and TCP exchanges whose counts follow from first principles.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod aggregator;
pub mod cluster;
pub mod frames;
pub mod otlp;
pub mod system;

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

pub use mermin_test_support::netns::*;
use serde::Deserialize;

/// A free TCP port on loopback (for the agent's metrics endpoint).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP GET on loopback; returns (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

/// The agent binary running as a child process; killed on drop if still running.
pub struct Agent {
    child: Option<Child>,
    pub port: u16,
    pub output: PathBuf,
    _dir: tempfile::TempDir,
}

pub const AGENT: &str = env!("CARGO_BIN_EXE_mermin-agent");

impl Agent {
    /// Starts the agent in `ns` with the given extra arguments and waits until it is ready.
    pub fn start(ns: &Netns, interfaces: &str, extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("records.jsonl");
        let port = free_port();
        let mut args = vec![
            "--node-name".to_owned(),
            "test-node".to_owned(),
            "--netns".to_owned(),
            ns.name.clone(),
            "--interfaces".to_owned(),
            interfaces.to_owned(),
            "--output".to_owned(),
            output.display().to_string(),
            "--metrics-listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--scan-interval".to_owned(),
            "200ms".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(AGENT)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut agent = Agent {
            child: Some(child),
            port,
            output,
            _dir: dir,
        };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some((200, _)) = http_get(self.port, "/readyz") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited during start-up: {status}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready within 20 s");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The value of an unlabelled metric, or of one labelled series (`name{label="x"}`).
    pub fn metric(&self, series: &str) -> Option<u64> {
        let (_, body) = http_get(self.port, "/metrics")?;
        body.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Records written so far.
    pub fn records(&self) -> Vec<Record> {
        let text = fs::read_to_string(&self.output).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    /// Polls until `done(records)` holds, at most `timeout`.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.records();
            if done(&records) || Instant::now() >= deadline {
                return records;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait (at most 10 s), and return every record written.
    pub fn stop(mut self) -> (ExitStatus, Vec<Record>) {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("agent did not stop within 10 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        };
        (status, self.records())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One JSON-lines record, as the agent writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Record {
    pub node_name: String,
    pub interface_name: String,
    pub interface_index: u32,
    pub direction: String,
    pub source_address: String,
    pub destination_address: String,
    pub source_port: u32,
    pub destination_port: u32,
    pub ip_protocol: u32,
    pub icmp_type: u32,
    pub icmp_code: u32,
    pub delta_packets: u64,
    pub delta_octets: u64,
    pub first_seen_unix_nanos: u64,
    pub last_seen_unix_nanos: u64,
    pub flow_start_unix_nanos: u64,
    pub tcp_flags: u32,
    pub first_tcp_flags: u32,
    pub end_reason: String,
    pub record_sequence: u64,
}

impl Record {
    pub fn is(&self, interface: &str, direction: &str) -> bool {
        self.interface_name == interface && self.direction == direction
    }
}

/// Sum of (packets, bytes) over records.
pub fn totals<'a>(records: impl IntoIterator<Item = &'a Record>) -> (u64, u64) {
    records.into_iter().fold((0, 0), |(p, b), r| {
        (p + r.delta_packets, b + r.delta_octets)
    })
}

pub const ETH_HLEN: u64 = 14;

/// Asserts that the records of `interface` account for exactly the packets and bytes the kernel
/// counted on it (sysfs counts Ethernet frames; records count IP bytes).
pub fn assert_matches_interface(records: &[Record], interface: &str, delta: &IfCounters) {
    let (tx_p, tx_b) = totals(
        records
            .iter()
            .filter(|r| r.is(interface, "DIRECTION_EGRESS")),
    );
    let (rx_p, rx_b) = totals(
        records
            .iter()
            .filter(|r| r.is(interface, "DIRECTION_INGRESS")),
    );
    assert_eq!(tx_p, delta.tx_packets, "{interface} egress packets");
    assert_eq!(
        tx_b + ETH_HLEN * tx_p,
        delta.tx_bytes,
        "{interface} egress bytes"
    );
    assert_eq!(rx_p, delta.rx_packets, "{interface} ingress packets");
    assert_eq!(
        rx_b + ETH_HLEN * rx_p,
        delta.rx_bytes,
        "{interface} ingress bytes"
    );
}

/// What the TCP stack itself counted for one side of a connection (TCP_INFO), read after the
/// side's last segment went out.
#[derive(Debug, Clone, Copy)]
pub struct TcpSide {
    /// Every segment this side put on the wire.
    pub segments: u64,
    pub bytes_retrans: u64,
}

fn tcp_side(stream: &TcpStream) -> TcpSide {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    TcpSide {
        segments: u64::from(info.tcpi_segs_out),
        bytes_retrans: info.tcpi_bytes_retrans,
    }
}

/// One finished TCP exchange.
pub struct TcpExchange {
    pub client: SocketAddr,
    pub client_side: TcpSide,
    pub server_side: TcpSide,
}

/// A TCP exchange: the client sends `upload` bytes, the server answers `download` bytes, both
/// close. Each side's TCP_INFO is read once it has sent its last segment: the client's after it
/// read the server's FIN (acknowledged at once), the server's after the client got that FIN.
pub fn tcp_exchange(
    client_ns: &Netns,
    server_ns: &Netns,
    server: SocketAddr,
    upload: usize,
    download: usize,
) -> TcpExchange {
    tcp_conversation(client_ns, server_ns, server, &[upload], download, |_| {})
}

/// [`tcp_exchange`] with the upload in parts and quiet pauses between them: after part `i`
/// (except the last) the server answers one byte, and once the client has it — no packet of the
/// connection is in flight — `between(i)` runs on the calling thread before the next part.
pub fn tcp_conversation(
    client_ns: &Netns,
    server_ns: &Netns,
    server: SocketAddr,
    uploads: &[usize],
    download: usize,
    mut between: impl FnMut(usize),
) -> TcpExchange {
    let parts = uploads.to_vec();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let server_thread = server_ns.spawn({
        let parts = parts.clone();
        move || {
            let listener = TcpListener::bind(server).unwrap();
            bound_tx.send(()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            for (index, part) in parts.iter().enumerate() {
                let mut received = vec![0u8; *part];
                conn.read_exact(&mut received).unwrap();
                if index + 1 < parts.len() {
                    conn.write_all(&[0]).unwrap();
                }
            }
            conn.write_all(&vec![7u8; download]).unwrap();
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
            conn
        }
    });
    bound_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let (paused_tx, paused_rx) = std::sync::mpsc::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    let client_thread = client_ns.spawn(move || {
        let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let local = conn.local_addr().unwrap();
        for (index, part) in parts.iter().enumerate() {
            conn.write_all(&vec![1u8; *part]).unwrap();
            if index + 1 < parts.len() {
                conn.read_exact(&mut [0]).unwrap();
                // Let the last ACK leave before the pause.
                thread::sleep(Duration::from_millis(100));
                paused_tx.send(index).unwrap();
                resume_rx.recv_timeout(Duration::from_secs(60)).unwrap();
            }
        }
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).unwrap();
        assert_eq!(answer.len(), download);
        (local, tcp_side(&conn))
    });
    for _ in 1..uploads.len() {
        let index = paused_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        between(index);
        resume_tx.send(()).unwrap();
    }
    let (client, client_side) = client_thread.join().unwrap();
    let mut server_side = tcp_side(&server_thread.join().unwrap());
    // The SYN-ACK goes out from the listener's request socket, not the accepted socket whose
    // TCP_INFO this is.
    server_side.segments += 1;
    TcpExchange {
        client,
        client_side,
        server_side,
    }
}

/// TCP connections one after another from the same client address and port to the same server:
/// the 5-tuple is reused. In each, the client sends `upload`, the server answers `download` and
/// closes first (so the TIME_WAIT is the server's, which accepts the next SYN on the tuple at
/// once), then the client closes. Each side's TCP_INFO is read after its last segment.
pub fn tcp_reused_tuple(
    client_ns: &Netns,
    server_ns: &Netns,
    client: SocketAddr,
    server: SocketAddr,
    sizes: &[(usize, usize)],
) -> Vec<TcpExchange> {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let server_thread = server_ns.spawn({
        let sizes = sizes.to_vec();
        move || {
            let listener = TcpListener::bind(server).unwrap();
            bound_tx.send(()).unwrap();
            for (upload, download) in sizes {
                let (mut conn, _) = listener.accept().unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                closed_tx.send(serve(&mut conn, upload, download)).unwrap();
            }
        }
    });
    bound_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let client_thread = client_ns.spawn({
        let sizes = sizes.to_vec();
        move || {
            let mut exchanges = Vec::new();
            for (upload, download) in sizes {
                if !exchanges.is_empty() {
                    // The server's TIME_WAIT takes a SYN on the tuple only with a newer TCP
                    // timestamp (millisecond clock); a refused SYN would be traffic of its own.
                    thread::sleep(Duration::from_millis(50));
                }
                let mut conn = connect_from(client, server);
                conn.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                conn.write_all(&vec![1u8; upload]).unwrap();
                let mut answer = Vec::new();
                conn.read_to_end(&mut answer).unwrap();
                assert_eq!(answer.len(), download);
                conn.shutdown(std::net::Shutdown::Write).unwrap();
                let server_side = closed_rx.recv_timeout(Duration::from_secs(30)).unwrap();
                exchanges.push(TcpExchange {
                    client,
                    client_side: tcp_side(&conn),
                    server_side,
                });
            }
            exchanges
        }
    });
    let exchanges = client_thread.join().unwrap();
    server_thread.join().unwrap();
    exchanges
}

/// The server's part of an exchange on an accepted connection: read `upload` bytes, answer
/// `download`, close, wait for the client's close; the server side's TCP_INFO.
fn serve(conn: &mut TcpStream, upload: usize, download: usize) -> TcpSide {
    conn.read_exact(&mut vec![0u8; upload]).unwrap();
    conn.write_all(&vec![7u8; download]).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let mut side = tcp_side(conn);
    side.segments += 1; // the SYN-ACK, see `tcp_conversation`
    side
}

/// One client of [`tcp_exchanges`]: from a namespace (and a fixed address, if given) to the
/// address it dials, which may be translated on the way.
pub struct Dial<'a> {
    pub from: &'a Netns,
    pub bind: Option<SocketAddr>,
    pub to: SocketAddr,
    /// At least 8 bytes (the first 8 tell the server the sizes); distinct among the dials.
    pub upload: usize,
    pub download: usize,
}

/// One connection of [`tcp_exchanges`].
pub struct Served {
    pub exchange: TcpExchange,
    /// The client as the server saw it (after any SNAT).
    pub peer: SocketAddr,
}

/// Concurrent TCP exchanges of every dial with one server listening on `listen`: each client
/// sends its upload, the server answers its download and closes, then the client closes; each
/// side's TCP_INFO is read after its last segment. Results in the order of `dials`.
pub fn tcp_exchanges(server_ns: &Netns, listen: SocketAddr, dials: &[Dial]) -> Vec<Served> {
    let count = dials.len();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let server_thread = server_ns.spawn(move || {
        let listener = TcpListener::bind(listen).unwrap();
        bound_tx.send(()).unwrap();
        let handlers: Vec<_> = (0..count)
            .map(|_| {
                let (mut conn, peer) = listener.accept().unwrap();
                thread::spawn(move || {
                    conn.set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    let mut sizes = [0u8; 8];
                    conn.read_exact(&mut sizes).unwrap();
                    let upload = u32::from_le_bytes(sizes[..4].try_into().unwrap()) as usize;
                    let download = u32::from_le_bytes(sizes[4..].try_into().unwrap()) as usize;
                    (upload, peer, serve(&mut conn, upload - 8, download))
                })
            })
            .collect();
        handlers
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    bound_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let clients: Vec<_> = dials
        .iter()
        .map(|dial| {
            let (bind, to, upload, download) = (dial.bind, dial.to, dial.upload, dial.download);
            assert!(upload >= 8);
            dial.from.spawn(move || {
                let mut conn = match bind {
                    Some(bind) => connect_from(bind, to),
                    None => TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap(),
                };
                conn.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let mut message = vec![1u8; upload];
                message[..4].copy_from_slice(&(upload as u32).to_le_bytes());
                message[4..8].copy_from_slice(&(download as u32).to_le_bytes());
                conn.write_all(&message).unwrap();
                // The whole answer first: the server then waits for this FIN only after it
                // sent everything (its TCP_INFO is final).
                let mut answer = Vec::new();
                conn.read_to_end(&mut answer).unwrap();
                assert_eq!(answer.len(), download);
                conn.shutdown(std::net::Shutdown::Write).unwrap();
                conn
            })
        })
        .collect();
    let clients: Vec<TcpStream> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let served = server_thread.join().unwrap();
    // Every server got its client's FIN: the clients' TCP_INFO is final too.
    dials
        .iter()
        .zip(clients)
        .map(|(dial, conn)| {
            let (client, client_side) = (conn.local_addr().unwrap(), tcp_side(&conn));
            let (_, peer, server_side) = served
                .iter()
                .find(|(upload, _, _)| *upload == dial.upload)
                .copied()
                .unwrap();
            Served {
                exchange: TcpExchange {
                    client,
                    client_side,
                    server_side,
                },
                peer,
            }
        })
        .collect()
}

/// Connects from the fixed address `client`, waiting (bounded) while the previous connection
/// on the tuple is still finishing its close.
fn connect_from(client: SocketAddr, server: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(client),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        socket.set_reuse_address(true).unwrap();
        let attempt = socket
            .bind(&client.into())
            .and_then(|()| socket.connect_timeout(&server.into(), Duration::from_secs(5)));
        match attempt {
            Ok(()) => return socket.into(),
            Err(err) if Instant::now() < deadline => {
                eprintln!("connect {client} -> {server}: {err}; retrying");
                assert!(
                    matches!(
                        err.raw_os_error(),
                        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
                    ),
                    "connecting {client} -> {server}: {err}"
                );
                thread::sleep(Duration::from_millis(20));
            }
            Err(err) => panic!("connecting {client} -> {server}: {err}"),
        }
    }
}

/// Asserts that a record of one TCP direction counts exactly what that side's stack sent: its
/// segments, and its payload (plus retransmissions) with 20 + 40 header bytes on the SYN and
/// 20 + 32 (timestamps option) on every other segment — `ip_header` 20 for IPv4, 40 for IPv6.
pub fn assert_tcp_side(record: &Record, side: &TcpSide, payload: usize, ip_header: u64) {
    let flow = format!(
        "{} {} {}:{} -> {}:{}",
        record.interface_name,
        record.direction,
        record.source_address,
        record.source_port,
        record.destination_address,
        record.destination_port
    );
    assert_eq!(
        record.delta_packets, side.segments,
        "{flow}: segments vs TCP_INFO"
    );
    let expected = payload as u64
        + side.bytes_retrans
        + (ip_header + 40)
        + (record.delta_packets - 1) * (ip_header + 32);
    assert_eq!(
        record.delta_octets, expected,
        "{flow}: bytes vs first principles ({side:?})"
    );
}
