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

fn get_blocking(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

pub async fn metric(addr: SocketAddr, series: &str) -> u64 {
    crate::metric_value(&get(addr, "/metrics").await.1, series)
}
