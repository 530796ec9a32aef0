//! The aggregator's configuration file, in HCL. It accepts the block users of Mermin already
//! know, verbatim — including its one-line form, whose object items are separated by spaces only
//! (strict HCL wants commas or newlines there; see [`parse_lenient`], which the static metadata
//! file shares):
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
//!
//! # Names for both ends of every flow (see the metadata module).
//! metadata {
//!   attribute_names = "seed"            # source.pod.name ...; "mermin": source.k8s.pod.name ...
//!   static_file     = "/etc/mermin/endpoints.hcl"
//!   labels          = ["app", "team"]   # pod and namespace labels copied to spans
//!   deleted_grace   = "5m"              # deleted pods still name late flows this long
//!   kubernetes      = true              # watch the API server (in-cluster or kubeconfig)
//! }
//! ```
//!
//! Every key is known: anything else, and any bad value, is an error that names the file and line.

use std::{net::SocketAddr, path::Path, time::Duration};

use crate::{export::OtlpProtocol, metadata::AttributeNaming, store::WhenFull};
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
    pub metadata: FileMetadata,
}

/// The `metadata { ... }` block; `None` where it is silent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileMetadata {
    pub attribute_names: Option<AttributeNaming>,
    pub static_file: Option<String>,
    pub labels: Option<Vec<String>>,
    pub deleted_grace: Option<Duration>,
    pub kubernetes: Option<bool>,
}

const METADATA_KEYS: &str = "attribute_names, static_file, labels, deleted_grace, kubernetes";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

const TOP_LEVEL: &str = "listen, data_dir, settle, grace, outbox_max_bytes, outbox_when_full, metadata, export \"traces\"";

pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    parse(&path.display().to_string(), &read(path)?)
}

/// An HCL file's text, or an error naming the file that could not be read.
pub(crate) fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: 0,
        message: e.to_string(),
    })
}

pub fn parse(file: &str, text: &str) -> Result<FileConfig, ConfigError> {
    let parsed = parse_lenient(file, text)?;
    let at = |offset: usize, message: String| parsed.error(file, offset, message);
    let mut config = FileConfig::default();
    for structure in parsed.body.iter() {
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
                if block.ident.as_str() == "metadata" && labels.is_empty() {
                    config.metadata = metadata(&block.body, &at)?;
                    continue;
                }
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

/// The `metadata` block: where the names of a flow's ends come from (see `FileMetadata`).
fn metadata(
    body: &Body,
    at: &dyn Fn(usize, String) -> ConfigError,
) -> Result<FileMetadata, ConfigError> {
    let mut metadata = FileMetadata::default();
    for structure in body.iter() {
        let offset = structure.span().map_or(0, |s| s.start);
        let Structure::Attribute(attribute) = structure else {
            return Err(at(
                offset,
                format!("metadata holds only attributes ({METADATA_KEYS})"),
            ));
        };
        let key = attribute.key.as_str();
        let value = &attribute.value;
        let expected = |what: &str| at(offset, format!("metadata.{key} must be {what}"));
        match key {
            "attribute_names" => {
                let name = string(value).ok_or_else(|| expected("a string"))?;
                metadata.attribute_names = Some(AttributeNaming::from_name(name).ok_or_else(|| {
                    at(
                        offset,
                        format!("metadata.attribute_names = {name:?}: expected \"seed\" or \"mermin\""),
                    )
                })?);
            }
            "static_file" => {
                metadata.static_file = Some(
                    string(value)
                        .ok_or_else(|| expected("a string"))?
                        .to_owned(),
                )
            }
            "labels" => {
                let Expression::Array(items) = value else {
                    return Err(expected("a list of strings"));
                };
                metadata.labels = Some(
                    items
                        .iter()
                        .map(|item| string(item).map(str::to_owned))
                        .collect::<Option<_>>()
                        .ok_or_else(|| expected("a list of strings"))?,
                );
            }
            "deleted_grace" => {
                let text = string(value).ok_or_else(|| expected("a duration such as \"5m\""))?;
                metadata.deleted_grace = Some(duration(text).map_err(|why| {
                    at(offset, format!("metadata.deleted_grace = {text:?}: {why}"))
                })?);
            }
            "kubernetes" => {
                let Expression::Bool(on) = value else {
                    return Err(expected("true or false"));
                };
                metadata.kubernetes = Some(*on.value());
            }
            other => {
                return Err(at(
                    offset,
                    format!("unknown key `{other}` in metadata (known: {METADATA_KEYS})"),
                ));
            }
        }
    }
    Ok(metadata)
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

/// HCL parsed by [`parse_lenient`], which knows the original line of every offset in it.
pub(crate) struct Lenient {
    pub(crate) body: Body,
    /// The text parsed: the original with separators inserted.
    text: String,
    /// Where newlines were inserted into `text`, ascending.
    inserted_newlines: Vec<usize>,
}

impl Lenient {
    /// An error at `offset` of the parsed body, on its line in the original text.
    pub(crate) fn error(&self, file: &str, offset: usize, message: String) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            line: line_of(&self.text, &self.inserted_newlines, offset),
            message,
        }
    }
}

fn line_of(text: &str, inserted_newlines: &[usize], offset: usize) -> usize {
    let offset = offset.min(text.len());
    text[..offset].matches('\n').count() + 1 - inserted_newlines.partition_point(|&at| at < offset)
}

/// Parses HCL `text` (the contents of `file`), accepting the one-line forms users paste, whose
/// items are separated by spaces only: `{ a = "x" b = "y" }` as an object (strict HCL wants
/// commas or newlines) and as a block body (strict HCL wants each item on its own line). Where
/// the parser wants a separator, one is inserted (a comma in an object, a newline in a block)
/// and the text parsed again; lines in errors are those of the original text. Each insertion
/// re-parses the whole text: fine for files of a few hundred one-line blocks; larger files
/// should put one item per line (parsed in one pass).
pub(crate) fn parse_lenient(file: &str, text: &str) -> Result<Lenient, ConfigError> {
    let mut text = text.to_owned();
    let mut inserted_newlines: Vec<usize> = Vec::new();
    // Each insertion separates two items, so there are fewer than half as many as characters.
    let most = text.len() / 2 + 1;
    for _ in 0..=most {
        let err = match hcl_edit::parser::parse_body(&text) {
            Ok(body) => {
                return Ok(Lenient {
                    body,
                    text,
                    inserted_newlines,
                });
            }
            Err(err) => err,
        };
        let offset = err.location().offset();
        let message = err.message();
        let insertion = if offset >= text.len() {
            None
        } else if message.contains("expected `}`, `,` or newline") {
            // Object items on one line: `{ a = "x" b = "y" }`.
            Some((offset, ','))
        } else if message.contains("expected `}`, newline or identifier") {
            // A second item in a one-line block: put the items below its `{`.
            innermost_open_brace(&text, offset)
                .filter(|brace| !text[brace + 1..].starts_with('\n'))
                .map(|brace| (brace + 1, '\n'))
        } else if message.contains("expected newline or eof") {
            // The next item (or the `}`) of a block whose items are on one line.
            Some((offset, '\n'))
        } else {
            None
        };
        let Some((at, separator)) = insertion else {
            return Err(ConfigError {
                file: file.to_owned(),
                line: line_of(&text, &inserted_newlines, offset),
                message: message.to_owned(),
            });
        };
        for inserted in inserted_newlines.iter_mut().filter(|i| **i >= at) {
            *inserted += 1;
        }
        if separator == '\n' {
            let position = inserted_newlines.partition_point(|&i| i < at);
            inserted_newlines.insert(position, at);
        }
        text.insert(at, separator);
    }
    Err(ConfigError {
        file: file.to_owned(),
        line: 0,
        message: "too many items without separators".into(),
    })
}

/// The last `{` before `offset` on its line that is still open there (outside strings).
fn innermost_open_brace(text: &str, offset: usize) -> Option<usize> {
    let line_start = text[..offset].rfind('\n').map_or(0, |at| at + 1);
    let mut open = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    for (at, c) in text[line_start..offset].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '{' if !in_string => open.push(line_start + at),
            '}' if !in_string => {
                open.pop();
            }
            _ => {}
        }
    }
    open.pop()
}

pub(crate) fn string(expr: &Expression) -> Option<&str> {
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

    #[test]
    fn the_metadata_block() {
        let text = "metadata {\n  attribute_names = \"mermin\"\n  static_file = \"/etc/m.hcl\"\n  labels = [\"app\", \"team\"]\n  deleted_grace = \"2m\"\n  kubernetes = false\n}\n";
        let config = parse("a.hcl", text).unwrap();
        assert_eq!(
            config.metadata,
            FileMetadata {
                attribute_names: Some(AttributeNaming::Mermin),
                static_file: Some("/etc/m.hcl".into()),
                labels: Some(vec!["app".into(), "team".into()]),
                deleted_grace: Some(Duration::from_secs(120)),
                kubernetes: Some(false),
            }
        );
        assert_eq!(
            error("metadata {\n  attribute_names = \"otel\"\n}\n"),
            "mermin.hcl:2: metadata.attribute_names = \"otel\": expected \"seed\" or \"mermin\""
        );
        assert_eq!(
            error("metadata {\n  kubernetes = true\n  labels = \"app\"\n}\n"),
            "mermin.hcl:3: metadata.labels must be a list of strings"
        );
        assert_eq!(
            error("metadata {\n  label = [\"app\"]\n}\n"),
            "mermin.hcl:2: unknown key `label` in metadata (known: attribute_names, static_file, labels, deleted_grace, kubernetes)"
        );
    }

    fn error(text: &str) -> String {
        parse("mermin.hcl", text).unwrap_err().to_string()
    }

    #[test]
    fn items_on_one_line_keep_the_lines_of_later_errors() {
        let text = "listen = \"127.0.0.1:4600\" settle = \"2s\"\n\ngrace = \"1m\" bogus = \"1\"\n";
        assert_eq!(
            error(text),
            format!("mermin.hcl:3: unknown key `bogus` (known: {TOP_LEVEL})")
        );
        let config = parse(
            "mermin.hcl",
            "listen = \"127.0.0.1:4600\" settle = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(config.settle, Some(Duration::from_secs(2)));
    }

    #[test]
    fn mistakes_point_at_file_and_line() {
        assert_eq!(
            error("listen = \"0.0.0.0:4600\"\n\nlisten_addr = \"x\"\n"),
            "mermin.hcl:3: unknown key `listen_addr` (known: listen, data_dir, settle, grace, outbox_max_bytes, outbox_when_full, metadata, export \"traces\")"
        );
        assert_eq!(
            error("settle = \"soon\"\n"),
            "mermin.hcl:1: settle = \"soon\": expected number at 0"
        );
        assert_eq!(
            error("export \"logs\" {\n}\n"),
            "mermin.hcl:1: unknown block `export \"logs\"` (known: listen, data_dir, settle, grace, outbox_max_bytes, outbox_when_full, metadata, export \"traces\")"
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
