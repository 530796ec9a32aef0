//! The agent refuses bad invocations with a clear message and a distinct exit code, before it
//! loads or attaches anything.

mod support;

use std::process::Command;

use support::AGENT;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(AGENT)
        .args(args)
        .args(["--metrics-listen", "127.0.0.1:0", "--node-name", "n"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_interface_pattern() {
    let (code, stderr) = run(&["--interfaces", "eth0,veth[a"]);
    assert_eq!(code, 2);
    assert_eq!(
        stderr.trim_end(),
        "error: invalid interface pattern \"veth[a\": invalid range pattern"
    );
}

#[test]
fn missing_network_namespace() {
    let (code, stderr) = run(&["--netns", "mermin-no-such-ns"]);
    assert_eq!(code, 2);
    assert_eq!(
        stderr.trim_end(),
        "error: network namespace \"mermin-no-such-ns\" not found (looked for /run/netns/mermin-no-such-ns)"
    );
}

#[test]
fn unknown_option_is_a_usage_error() {
    let (code, stderr) = run(&["--interface-patterns", "eth0"]);
    assert_eq!(code, 2);
    assert!(
        stderr.starts_with("error: unexpected argument '--interface-patterns' found"),
        "{stderr}"
    );
}

#[test]
fn without_privileges_names_the_capability() {
    // Same binary, run as nobody with every capability dropped.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            AGENT,
            "--metrics-listen",
            "127.0.0.1:0",
            "--node-name",
            "n",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "error: missing capability CAP_BPF (needed to load eBPF programs and create maps); run as root or grant it to the agent"
    );
}
