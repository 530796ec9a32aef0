//! HCL as Mermin's files are written: the lenient parser that accepts the one-line forms users
//! paste (see [`parse_lenient`]), shared by the configuration file and the static metadata file,
//! and [`ConfigError`], the `file:line: message` error both report.
//!
//! The lenient parser recognises where hcl-edit wants a separator by its error messages, so
//! hcl-edit is pinned to one exact release in the workspace; the tests of the one-line forms
//! (here and in `config` and `metadata::static_file`) fail if a release changes those messages.

use std::path::Path;

use hcl_edit::{expr::Expression, structure::Body};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// An HCL file's text, or an error naming the file that could not be read.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: 0,
        message: e.to_string(),
    })
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
    /// The line of the original text that `offset` of the parsed body is on.
    pub(crate) fn line(&self, offset: usize) -> usize {
        line_of(&self.text, &self.inserted_newlines, offset)
    }

    /// An error at `offset` of the parsed body, on its line in the original text.
    pub(crate) fn error(&self, file: &str, offset: usize, message: String) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            line: self.line(offset),
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
