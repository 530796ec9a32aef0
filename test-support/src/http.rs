//! Plain HTTP/1.0 requests to the aggregator's `/metrics`, `/livez` and `/readyz`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// `GET path` on `addr`: status code and body (off the runtime: it blocks).
pub async fn get(addr: SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || get_blocking(addr, path))
        .await
        .unwrap()
}

/// [`get`], or `None` if nothing answers at `addr` (a process that is gone, or between two
/// servers).
pub async fn try_get(addr: SocketAddr, path: &'static str) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || try_get_blocking(addr, path).ok())
        .await
        .unwrap()
}

fn get_blocking(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get_blocking(addr, path).unwrap()
}

fn try_get_blocking(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {response:?}")))?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((status, body))
}

pub async fn metric(addr: SocketAddr, series: &str) -> u64 {
    crate::metric_value(&get(addr, "/metrics").await.1, series)
}
