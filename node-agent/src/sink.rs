//! Where flow records go: JSON lines (a file or standard output) here, the gRPC stream to the
//! aggregator in `grpc_sink`. The collector builds each scan's records into buffers it reuses and
//! lends them to the sink, which copies what it keeps (the gRPC sink: their encoding).

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::Path,
};

use mermin_protocol::flow::v1::FlowRecord;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("opening {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("writing records: {0}")]
    Write(#[from] io::Error),
    /// The agent is stopping and the buffer stayed full: the last `unsent` records were not
    /// taken (those before them were).
    #[error("stopping with the buffer full: {unsent} records not sent")]
    GaveUp { unsent: usize },
}

impl SinkError {
    /// How many of the `sent` records given to the failed `send` were lost.
    pub fn lost(&self, sent: usize) -> usize {
        match self {
            SinkError::GaveUp { unsent } => *unsent,
            _ => sent,
        }
    }
}

pub trait RecordSink: Send {
    /// Delivers `records`; on error none of them may be assumed delivered, but for
    /// [`SinkError::GaveUp`], which says how many were not.
    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError>;
}

/// One JSON object per line; flushed after every batch, so readers see whole records promptly.
pub struct JsonLines<W: Write + Send> {
    out: BufWriter<W>,
}

impl JsonLines<File> {
    /// Appends to `path`, creating it if needed.
    pub fn create(path: &Path) -> Result<Self, SinkError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| SinkError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self::new(file))
    }
}

impl<W: Write + Send> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            out: BufWriter::new(out),
        }
    }
}

impl<W: Write + Send> RecordSink for JsonLines<W> {
    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        for record in records {
            serde_json::to_writer(&mut self.out, record).map_err(io::Error::from)?;
            self.out.write_all(b"\n")?;
        }
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_line_per_record() {
        let mut buf = Vec::new();
        {
            let mut sink = JsonLines::new(&mut buf);
            let records = [
                FlowRecord {
                    delta_octets: 1500,
                    ..FlowRecord::default()
                },
                FlowRecord {
                    delta_packets: 3,
                    ..FlowRecord::default()
                },
            ];
            sink.send(&records).unwrap();
        }
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["delta_octets"], 1500);
        assert_eq!(lines[1]["delta_packets"], 3);
    }
}
