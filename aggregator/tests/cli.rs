//! The binary's configuration handling: the seed's HCL block accepted as pasted, mistakes
//! refused with file:line before anything starts.

use std::process::Command;

fn run(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mermin.hcl");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mermin-aggregator"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "mermin.hcl");
    (out.status.code(), stderr)
}

#[test]
fn a_bad_key_is_refused_with_file_and_line() {
    let (code, stderr) = run(
        "listen = \"127.0.0.1:0\"\nexport \"traces\" { otlp = { endpoint = \"http://tempo:4317\" protocol = \"grpc\" } }\nbogus = \"1\"\n",
    );
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr.trim_end(),
        "error: mermin.hcl:3: unknown key `bogus` (known: listen, metrics_listen, data_dir, log_format, print_flows, settle, grace, checkpoint_interval, outbox_max_bytes, outbox_when_full, export \"traces\", metadata, agents, admin, tls, replication)"
    );
}

#[test]
fn a_bad_endpoint_is_refused_before_starting() {
    let (code, stderr) =
        run("export \"traces\" {\n  otlp = {\n    endpoint = \"tempo:4317\"\n  }\n}\n");
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr.trim_end(),
        "error: mermin.hcl:3: endpoint = \"tempo:4317\": must start with http:// or https://"
    );
}

#[test]
fn check_config_prints_the_effective_settings_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mermin.hcl");
    std::fs::write(
        &path,
        "export \"traces\" { otlp = { endpoint = \"http://tempo:4317\" protocol = \"grpc\" } }\nmetadata {\n  attribute_names = \"mermin\"\n}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mermin-aggregator"))
        .arg("--config")
        .arg(&path)
        .args(["--settle", "1s", "--tls-mode=disabled", "--check-config"])
        .env_remove("MERMIN_OTLP_ENDPOINT")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["export"]["traces"]["otlp"]["endpoint"],
        "http://tempo:4317"
    );
    assert_eq!(json["metadata"]["attribute_names"], "mermin");
    assert_eq!(json["settle"], "1s");
    assert_eq!(json["grace"], "1m");
    assert_eq!(json["listen"], "0.0.0.0:4600");
    assert_eq!(json["tls"]["mode"], "disabled");
}

#[test]
fn tls_is_required_unless_disabled_explicitly() {
    let (code, stderr) = run("listen = \"127.0.0.1:0\"\n");
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr.trim_end(),
        "error: TLS is required (tls.mode) but --tls-cert, --tls-key and --tls-client-ca are not all given; give them, or --tls-mode=disabled for plaintext"
    );
}
