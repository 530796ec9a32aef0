//! The aggregator's configuration file, in HCL. It accepts the block users of Mermin already
//! know, verbatim — including its one-line form, whose object items are separated by spaces only
//! (strict HCL wants commas or newlines there; see [`parse_lenient`]):
//!
//! ```hcl
//! listen   = "0.0.0.0:4600"
//! data_dir = "/var/lib/mermin"
//! settle   = "3s"
//! grace    = "60s"
//!
//! # The durable export queue: its size, and what happens when it is full ("backpressure":
//! # agents wait, nothing is lost; "drop_oldest": the oldest spans go, counted).
//! outbox_max_bytes = 1073741824
//! outbox_when_full = "backpressure"
//!
//! # protocol: "grpc" (port 4317) or "http/protobuf" (port 4318).
//! export "traces" { otlp = { endpoint = "http://tempo:4317" protocol = "grpc" } }
//! ```
//!
//! Every key is known: anything else, and any bad value, is an error that names the file and line.

use std::{net::SocketAddr, path::Path, time::Duration};

use crate::{export::OtlpProtocol, store::WhenFull};
use hcl_edit::{
    Span,
    expr::{Expression, ObjectKey},
    structure::{BlockLabel, Body, Structure},
};

/// What the file sets; `None` where it is silent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<String>,
    pub settle: Option<Duration>,
    pub grace: Option<Duration>,
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: Option<OtlpProtocol>,
    pub outbox_max_bytes: Option<u64>,
    pub outbox_when_full: Option<WhenFull>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

const TOP_LEVEL: &str =
    "listen, data_dir, settle, grace, outbox_max_bytes, outbox_when_full, export \"traces\"";

pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: 0,
        message: e.to_string(),
    })?;
    parse(&path.display().to_string(), &text)
}

pub fn parse(file: &str, text: &str) -> Result<FileConfig, ConfigError> {
    let at = |offset: usize, message: String| ConfigError {
        file: file.to_owned(),
        line: text[..offset.min(text.len())].matches('\n').count() + 1,
        message,
    };
    let body = parse_lenient(text).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: e.location().line(),
        message: e.message().to_owned(),
    })?;
    let mut config = FileConfig::default();
    for structure in body.iter() {
        let offset = structure.span().map_or(0, |s| s.start);
        match structure {
            Structure::Attribute(attribute) if attribute.key.as_str() == "outbox_max_bytes" => {
                config.outbox_max_bytes = Some(
                    unsigned(&attribute.value)
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            at(
                                offset,
                                "outbox_max_bytes must be a positive whole number of bytes".into(),
                            )
                        })?,
                );
            }
            Structure::Attribute(attribute) => {
                let key = attribute.key.as_str();
                let value = string(&attribute.value)
                    .ok_or_else(|| at(offset, format!("{key} must be a string")))?;
                let bad = |why: String| at(offset, format!("{key} = {value:?}: {why}"));
                match key {
                    "listen" => {
                        config.listen = Some(value.parse().map_err(|e| bad(format!("{e}")))?)
                    }
                    "data_dir" => config.data_dir = Some(value.to_owned()),
                    "settle" => config.settle = Some(duration(value).map_err(bad)?),
                    "grace" => config.grace = Some(duration(value).map_err(bad)?),
                    "outbox_when_full" => {
                        config.outbox_when_full = Some(value.parse().map_err(bad)?)
                    }
                    other => {
                        return Err(at(
                            offset,
                            format!("unknown key `{other}` (known: {TOP_LEVEL})"),
                        ));
                    }
                }
            }
            Structure::Block(block) => {
                let labels: Vec<&str> = block
                    .labels
                    .iter()
                    .map(|l| match l {
                        BlockLabel::String(s) => s.value().as_str(),
                        BlockLabel::Ident(i) => i.as_str(),
                    })
                    .collect();
                if block.ident.as_str() != "export" || labels != ["traces"] {
                    return Err(at(
                        offset,
                        format!(
                            "unknown block `{} {}` (known: {TOP_LEVEL})",
                            block.ident.as_str(),
                            labels
                                .iter()
                                .map(|l| format!("{l:?}"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        ),
                    ));
                }
                let (endpoint, protocol) = export_traces(&block.body, &at)?;
                config.otlp_endpoint = Some(endpoint);
                config.otlp_protocol = protocol;
            }
        }
    }
    Ok(config)
}

/// The `export "traces"` block: `otlp = { endpoint = "...", protocol = "grpc" }`.
fn export_traces(
    body: &Body,
    at: &dyn Fn(usize, String) -> ConfigError,
) -> Result<(String, Option<OtlpProtocol>), ConfigError> {
    let mut endpoint = None;
    let mut protocol = None;
    for structure in body.iter() {
        let offset = structure.span().map_or(0, |s| s.start);
        let Structure::Attribute(attribute) = structure else {
            return Err(at(
                offset,
                "export \"traces\" holds only `otlp = { ... }`".into(),
            ));
        };
        if attribute.key.as_str() != "otlp" {
            return Err(at(
                offset,
                format!(
                    "unknown key `{}` in export \"traces\" (known: otlp)",
                    attribute.key.as_str()
                ),
            ));
        }
        let Expression::Object(object) = &attribute.value else {
            return Err(at(
                offset,
                "otlp must be an object: { endpoint = \"...\" }".into(),
            ));
        };
        for (key, value) in object.iter() {
            let offset = value.expr().span().map_or(offset, |s| s.start);
            let key = match key {
                ObjectKey::Ident(ident) => ident.as_str().to_owned(),
                ObjectKey::Expression(expr) => string(expr).unwrap_or_default().to_owned(),
            };
            let text = string(value.expr())
                .ok_or_else(|| at(offset, format!("otlp.{key} must be a string")))?;
            match key.as_str() {
                "endpoint" => {
                    if !(text.starts_with("http://") || text.starts_with("https://")) {
                        return Err(at(
                            offset,
                            format!(
                                "otlp.endpoint = {text:?}: must start with http:// or https://"
                            ),
                        ));
                    }
                    endpoint = Some(text.to_owned());
                }
                "protocol" => {
                    protocol = Some(text.parse().map_err(|why: String| {
                        at(offset, format!("otlp.protocol = {text:?}: {why}"))
                    })?);
                }
                other => {
                    return Err(at(
                        offset,
                        format!("unknown key `{other}` in otlp (known: endpoint, protocol)"),
                    ));
                }
            }
        }
    }
    let endpoint = endpoint.ok_or_else(|| {
        at(
            0,
            "export \"traces\" needs otlp = { endpoint = \"...\" }".into(),
        )
    })?;
    Ok((endpoint, protocol))
}

/// Parses HCL, accepting object items separated by spaces only, as in the one-line form users
/// paste: where the parser wants a separator inside an object, a comma is inserted (same line,
/// so line numbers of later errors are unchanged), at most a few dozen times.
fn parse_lenient(text: &str) -> Result<Body, hcl_edit::parser::Error> {
    let mut text = text.to_owned();
    for _ in 0..64 {
        match hcl_edit::parser::parse_body(&text) {
            Ok(body) => return Ok(body),
            Err(err)
                if err.message().contains("expected `}`, `,` or newline")
                    && err.location().offset() < text.len() =>
            {
                text.insert(err.location().offset(), ',');
            }
            Err(err) => return Err(err),
        }
    }
    hcl_edit::parser::parse_body(&text)
}

fn string(expr: &Expression) -> Option<&str> {
    match expr {
        Expression::String(s) => Some(s.value().as_str()),
        _ => None,
    }
}

fn unsigned(expr: &Expression) -> Option<u64> {
    match expr {
        Expression::Number(n) => n.value().as_u64(),
        _ => None,
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_block_works_as_users_paste_it() {
        let one_line =
            r#"export "traces" { otlp = { endpoint = "http://tempo:4317" protocol = "grpc" } }"#;
        let config = parse("mermin.hcl", one_line).unwrap();
        assert_eq!(config.otlp_endpoint.as_deref(), Some("http://tempo:4317"));
        let multi_line = "export \"traces\" {\n  otlp = {\n    endpoint = \"http://tempo:4317\"\n    protocol = \"grpc\"\n  }\n}\n";
        assert_eq!(parse("mermin.hcl", multi_line).unwrap(), config);
        assert_eq!(config.otlp_protocol, Some(OtlpProtocol::Grpc));
        let http = r#"export "traces" { otlp = { endpoint = "http://tempo:4318" protocol = "http/protobuf" } }"#;
        let config = parse("mermin.hcl", http).unwrap();
        assert_eq!(config.otlp_protocol, Some(OtlpProtocol::HttpProtobuf));
    }

    #[test]
    fn every_setting() {
        let text = "listen = \"127.0.0.1:4600\"\ndata_dir = \"/var/lib/mermin\"\nsettle = \"2s\"\ngrace = \"1m\"\noutbox_max_bytes = 5000000\noutbox_when_full = \"drop_oldest\"\n";
        let config = parse("a.hcl", text).unwrap();
        assert_eq!(config.outbox_max_bytes, Some(5_000_000));
        assert_eq!(config.outbox_when_full, Some(WhenFull::DropOldest));
        assert_eq!(config.listen, Some("127.0.0.1:4600".parse().unwrap()));
        assert_eq!(config.data_dir.as_deref(), Some("/var/lib/mermin"));
        assert_eq!(config.settle, Some(Duration::from_secs(2)));
        assert_eq!(config.grace, Some(Duration::from_secs(60)));
        assert_eq!(config.otlp_endpoint, None);
    }

    fn error(text: &str) -> String {
        parse("mermin.hcl", text).unwrap_err().to_string()
    }

    #[test]
    fn mistakes_point_at_file_and_line() {
        assert_eq!(
            error("listen = \"0.0.0.0:4600\"\n\nlisten_addr = \"x\"\n"),
            "mermin.hcl:3: unknown key `listen_addr` (known: listen, data_dir, settle, grace, outbox_max_bytes, outbox_when_full, export \"traces\")"
        );
        assert_eq!(
            error("settle = \"soon\"\n"),
            "mermin.hcl:1: settle = \"soon\": expected number at 0"
        );
        assert_eq!(
            error("export \"logs\" {\n}\n"),
            "mermin.hcl:1: unknown block `export \"logs\"` (known: listen, data_dir, settle, grace, outbox_max_bytes, outbox_when_full, export \"traces\")"
        );
        assert_eq!(
            error("export \"traces\" {\n  otlp = {\n    endpoint = \"tempo:4317\"\n  }\n}\n"),
            "mermin.hcl:3: otlp.endpoint = \"tempo:4317\": must start with http:// or https://"
        );
        assert_eq!(
            error(
                "export \"traces\" {\n  otlp = {\n    endpoint = \"http://t:4318\"\n    protocol = \"http\"\n  }\n}\n"
            ),
            "mermin.hcl:4: otlp.protocol = \"http\": unknown OTLP protocol \"http\"; expected \"grpc\" or \"http/protobuf\""
        );
        assert_eq!(
            error("grace = \"1m\"\noutbox_max_bytes = \"1GB\"\n"),
            "mermin.hcl:2: outbox_max_bytes must be a positive whole number of bytes"
        );
        assert_eq!(
            error("outbox_when_full = \"block\"\n"),
            "mermin.hcl:1: outbox_when_full = \"block\": unknown policy \"block\"; expected \"backpressure\" or \"drop_oldest\""
        );
        assert_eq!(
            error("listen = \n"),
            "mermin.hcl:1: invalid expression; expected `\"`, `[`, `{`, `-`, `!`, `(`, `_`, `<`, letter or digit"
        );
    }
}
