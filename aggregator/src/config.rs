//! The aggregator's configuration file, in HCL: read into a flat list of `path = value` settings
//! with the line each came from. What the settings mean, their defaults and their validation live
//! in [`crate::settings`]; this module only knows the file's shape. It accepts the block users of
//! Mermin already know, verbatim — including its one-line form (see [`crate::hcl`]):
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
//! A setting's path joins block names, block labels and object keys with dots
//! (`export.traces.otlp.endpoint`). Every path must be one the caller knows: anything else is an
//! error that names the file and line.

use std::path::Path;

use hcl_edit::{
    Span,
    expr::{Expression, ObjectKey},
    structure::{BlockLabel, Body, Structure},
};

pub use crate::hcl::ConfigError;
use crate::hcl::{Lenient, parse_lenient, read};

/// One setting as the file gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSetting {
    /// Dotted path: `listen`, `metadata.labels`, `export.traces.otlp.endpoint`.
    pub path: String,
    /// The value as text: strings as written, numbers and booleans as HCL writes them, lists of
    /// strings joined with commas, maps of strings as `name=value`s joined with commas.
    pub value: String,
    /// Whether the value was a string in the file (for messages: `settle = "soon"`).
    pub quoted: bool,
    pub line: usize,
}

impl FileSetting {
    /// `path = value` as the file wrote it, for error messages.
    pub fn written(&self) -> String {
        let key = self.path.rsplit('.').next().unwrap_or(&self.path);
        if self.quoted {
            format!("{key} = {:?}", self.value)
        } else {
            format!("{key} = {}", self.value)
        }
    }
}

/// Reads `path`; `known` lists every setting path the file may hold.
pub fn load(path: &Path, known: &[&str]) -> Result<Vec<FileSetting>, ConfigError> {
    parse(&path.display().to_string(), &read(path)?, known)
}

/// Parses the text of `file` (see [`load`]).
pub fn parse(file: &str, text: &str, known: &[&str]) -> Result<Vec<FileSetting>, ConfigError> {
    let parsed = parse_lenient(file, text)?;
    let mut walk = Walk {
        file,
        parsed: &parsed,
        known,
        out: Vec::new(),
    };
    walk.body(&parsed.body, "", "")?;
    Ok(walk.out)
}

struct Walk<'a> {
    file: &'a str,
    parsed: &'a Lenient,
    known: &'a [&'a str],
    out: Vec<FileSetting>,
}

impl Walk<'_> {
    fn error(&self, offset: usize, message: String) -> ConfigError {
        self.parsed.error(self.file, offset, message)
    }

    /// The names directly under `prefix` (a group path ending in `.`, or `""` for the top), as
    /// a message lists them: `listen, metadata, export "traces"`.
    fn known_under(&self, prefix: &str) -> String {
        let mut names: Vec<String> = Vec::new();
        for path in self.known.iter().filter_map(|p| p.strip_prefix(prefix)) {
            let name = match path.split_once('.') {
                // A labelled block (`export.traces...`) is shown as HCL writes it.
                Some(("export", rest)) if prefix.is_empty() => {
                    format!("export {:?}", rest.split('.').next().unwrap_or(rest))
                }
                Some((group, _)) => group.to_owned(),
                None => path.to_owned(),
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.join(", ")
    }

    fn is_group(&self, path: &str) -> bool {
        let prefix = format!("{path}.");
        self.known.iter().any(|p| p.starts_with(&prefix))
    }

    /// `where_` names the enclosing group in messages (`""` at the top: ` in metadata`).
    fn body(&mut self, body: &Body, prefix: &str, where_: &str) -> Result<(), ConfigError> {
        for structure in body.iter() {
            let offset = structure.span().map_or(0, |s| s.start);
            match structure {
                Structure::Attribute(attribute) => self.value(
                    attribute.key.as_str(),
                    &attribute.value,
                    prefix,
                    where_,
                    offset,
                )?,
                Structure::Block(block) => {
                    let mut path = format!("{prefix}{}", block.ident.as_str());
                    let mut shown = block.ident.as_str().to_owned();
                    for label in &block.labels {
                        let label = match label {
                            BlockLabel::String(s) => s.value().as_str(),
                            BlockLabel::Ident(i) => i.as_str(),
                        };
                        path = format!("{path}.{label}");
                        shown = format!("{shown} {label:?}");
                    }
                    if !self.is_group(&path) {
                        return Err(self.error(
                            offset,
                            format!(
                                "unknown block `{shown}`{where_} (known: {})",
                                self.known_under(prefix)
                            ),
                        ));
                    }
                    self.body(&block.body, &format!("{path}."), &format!(" in {shown}"))?;
                }
            }
        }
        Ok(())
    }

    fn value(
        &mut self,
        key: &str,
        value: &Expression,
        prefix: &str,
        where_: &str,
        offset: usize,
    ) -> Result<(), ConfigError> {
        let path = format!("{prefix}{key}");
        if let Expression::Object(object) = value
            && self.is_group(&path)
        {
            for (item, value) in object.iter() {
                let offset = value.expr().span().map_or(offset, |s| s.start);
                let item = match item {
                    ObjectKey::Ident(ident) => ident.as_str().to_owned(),
                    ObjectKey::Expression(expr) => {
                        crate::hcl::string(expr).unwrap_or_default().to_owned()
                    }
                };
                self.value(
                    &item,
                    value.expr(),
                    &format!("{path}."),
                    &format!(" in {key}"),
                    offset,
                )?;
            }
            return Ok(());
        }
        if !self.known.contains(&path.as_str()) {
            return Err(self.error(
                offset,
                format!(
                    "unknown key `{key}`{where_} (known: {})",
                    self.known_under(prefix)
                ),
            ));
        }
        let (text, quoted) = match value {
            Expression::String(s) => (s.value().as_str().to_owned(), true),
            Expression::Number(n) => (n.value().to_string(), false),
            Expression::Bool(b) => (b.value().to_string(), false),
            Expression::Array(items) => {
                let items: Option<Vec<&str>> = items.iter().map(crate::hcl::string).collect();
                let items = items.ok_or_else(|| {
                    self.error(offset, format!("{key} must be a list of strings"))
                })?;
                (items.join(","), false)
            }
            // A map of strings (`headers = { "X-Scope-OrgID" = "dev" }`): `name=value`s.
            Expression::Object(object) => {
                let entries: Option<Vec<(&str, &str)>> = object
                    .iter()
                    .map(|(name, value)| {
                        let name = match name {
                            ObjectKey::Ident(ident) => ident.as_str(),
                            ObjectKey::Expression(expr) => crate::hcl::string(expr)?,
                        };
                        Some((name, crate::hcl::string(value.expr())?))
                    })
                    .collect();
                let entries = entries.ok_or_else(|| {
                    self.error(offset, format!("{key} must map names to strings"))
                })?;
                // The entries travel joined by commas (as a list does).
                if let Some((name, _)) = entries.iter().find(|(_, value)| value.contains(',')) {
                    return Err(self.error(
                        offset,
                        format!(
                            "{key}: the value of {name:?} holds a comma, which a map value cannot"
                        ),
                    ));
                }
                let entries: Vec<String> = entries
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect();
                (entries.join(","), false)
            }
            _ => {
                return Err(self.error(
                    offset,
                    format!(
                        "{key} must be a string, a number, true/false, a list of strings or a map of strings"
                    ),
                ));
            }
        };
        let line = self.parsed.line(offset);
        self.out.push(FileSetting {
            path,
            value: text,
            quoted,
            line,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &[
        "listen",
        "settle",
        "metadata.labels",
        "metadata.kubernetes",
        "export.traces.otlp.endpoint",
        "export.traces.otlp.protocol",
    ];

    fn settings(text: &str) -> Vec<(String, String, usize)> {
        parse("mermin.hcl", text, KNOWN)
            .unwrap()
            .into_iter()
            .map(|s| (s.path, s.value, s.line))
            .collect()
    }

    fn error(text: &str) -> String {
        parse("mermin.hcl", text, KNOWN).unwrap_err().to_string()
    }

    fn owned(items: &[(&str, &str, usize)]) -> Vec<(String, String, usize)> {
        items
            .iter()
            .map(|(p, v, l)| (p.to_string(), v.to_string(), *l))
            .collect()
    }

    #[test]
    fn the_seed_block_works_as_users_paste_it() {
        let one_line =
            r#"export "traces" { otlp = { endpoint = "http://tempo:4317" protocol = "grpc" } }"#;
        let expected = owned(&[
            ("export.traces.otlp.endpoint", "http://tempo:4317", 1),
            ("export.traces.otlp.protocol", "grpc", 1),
        ]);
        assert_eq!(settings(one_line), expected);
        let multi_line = "export \"traces\" {\n  otlp = {\n    endpoint = \"http://tempo:4317\"\n    protocol = \"grpc\"\n  }\n}\n";
        let lines: Vec<usize> = settings(multi_line).iter().map(|s| s.2).collect();
        assert_eq!(lines, [3, 4]);
    }

    #[test]
    fn values_of_every_type_become_text_with_their_line() {
        let text = "listen = \"127.0.0.1:4600\"\n\nmetadata {\n  labels = [\"app\", \"team\"]\n  kubernetes = false\n}\nsettle = 3\n";
        assert_eq!(
            settings(text),
            owned(&[
                ("listen", "127.0.0.1:4600", 1),
                ("metadata.labels", "app,team", 4),
                ("metadata.kubernetes", "false", 5),
                ("settle", "3", 7),
            ])
        );
    }

    #[test]
    fn items_on_one_line_keep_the_lines_of_later_errors() {
        let text = "listen = \"127.0.0.1:4600\" settle = \"2s\"\n\nbogus = \"1\"\n";
        assert_eq!(
            error(text),
            "mermin.hcl:3: unknown key `bogus` (known: listen, settle, metadata, export \"traces\")"
        );
    }

    #[test]
    fn unknown_names_are_refused_with_what_is_known_there() {
        assert_eq!(
            error("export \"logs\" {\n}\n"),
            "mermin.hcl:1: unknown block `export \"logs\"` (known: listen, settle, metadata, export \"traces\")"
        );
        assert_eq!(
            error("metadata {\n  label = [\"app\"]\n}\n"),
            "mermin.hcl:2: unknown key `label` in metadata (known: labels, kubernetes)"
        );
        assert_eq!(
            error("export \"traces\" {\n  otlp = {\n    endpont = \"http://t:4317\"\n  }\n}\n"),
            "mermin.hcl:3: unknown key `endpont` in otlp (known: endpoint, protocol)"
        );
        assert_eq!(
            error("metadata {\n  labels = [1]\n}\n"),
            "mermin.hcl:2: labels must be a list of strings"
        );
        assert_eq!(
            error("listen = \n"),
            "mermin.hcl:1: invalid expression; expected `\"`, `[`, `{`, `-`, `!`, `(`, `_`, `<`, letter or digit"
        );
    }
}
