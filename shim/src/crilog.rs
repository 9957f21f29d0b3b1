//! The CRI log file: `<RFC3339Nano> <stdout|stderr> <P|F> <content>\n` per record.
//!
//! Lines longer than [`MAX_LINE`] are cut into partial (`P`) records followed by a final (`F`)
//! one, as containerd does; a last line without newline is written as `F` at end of stream.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest content of one record; longer lines are split (kubelet's and containerd's 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;

/// The CRI log file and its path (kept for [`CriLog::reopen`]).
#[derive(Debug)]
pub struct CriLog {
    path: PathBuf,
    file: File,
}

impl CriLog {
    /// Opens (creates, appends to) the log file.
    pub fn open(path: &Path) -> std::io::Result<CriLog> {
        Ok(CriLog {
            path: path.to_owned(),
            file: open_append(path)?,
        })
    }

    /// Reopens the path, for log rotation: records go to whatever file is there now.
    pub fn reopen(&mut self) -> std::io::Result<()> {
        self.file = open_append(&self.path)?;
        Ok(())
    }

    /// Writes one record stamped with the current time.
    fn record(&mut self, stream: &str, partial: bool, content: &[u8]) -> std::io::Result<()> {
        let mut rec = Vec::with_capacity(content.len() + 48);
        rec.extend_from_slice(rfc3339_nano(now_ns()).as_bytes());
        rec.push(b' ');
        rec.extend_from_slice(stream.as_bytes());
        rec.extend_from_slice(if partial { b" P " } else { b" F " });
        rec.extend_from_slice(content);
        rec.push(b'\n');
        self.file.write_all(&rec)
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// Splits one output stream of the container into CRI records.
#[derive(Debug)]
pub struct LineSplitter {
    stream: &'static str,
    pending: Vec<u8>,
}

impl LineSplitter {
    /// A splitter for the stream named `stream` (`stdout` or `stderr`).
    pub fn new(stream: &'static str) -> LineSplitter {
        LineSplitter {
            stream,
            pending: Vec::new(),
        }
    }

    /// Feeds bytes read from the stream, writing every complete record.
    pub fn feed(&mut self, log: &mut CriLog, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&data[..i]);
                    data = &data[i + 1..];
                    self.flush_partials(log)?;
                    log.record(self.stream, false, &self.pending)?;
                    self.pending.clear();
                }
                None => {
                    self.pending.extend_from_slice(data);
                    data = &[];
                    self.flush_partials(log)?;
                }
            }
        }
        // Don't keep a 16 KiB buffer around per idle stream.
        if self.pending.is_empty() && self.pending.capacity() > 4096 {
            self.pending = Vec::new();
        }
        Ok(())
    }

    /// End of stream: a last line without newline becomes a final record.
    pub fn finish(&mut self, log: &mut CriLog) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            log.record(self.stream, false, &self.pending)?;
        }
        self.pending = Vec::new();
        Ok(())
    }

    /// Emits `P` records while more than [`MAX_LINE`] bytes wait for their newline.
    fn flush_partials(&mut self, log: &mut CriLog) -> std::io::Result<()> {
        let mut start = 0;
        while self.pending.len() - start > MAX_LINE {
            log.record(self.stream, true, &self.pending[start..start + MAX_LINE])?;
            start += MAX_LINE;
        }
        self.pending.drain(..start);
        Ok(())
    }
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

pub use api::time::rfc3339_nano;

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> Vec<(String, String, String)> {
        std::fs::read_to_string(path)
            .expect("read log")
            .lines()
            .map(|l| {
                let mut p = l.splitn(4, ' ');
                let ts = p.next().expect("ts");
                assert_eq!(ts.len(), 30, "{ts}");
                (
                    p.next().expect("stream").to_owned(),
                    p.next().expect("tag").to_owned(),
                    p.next().expect("content").to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn splits_long_lines_and_flushes_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.log");
        let mut log = CriLog::open(&path).expect("open");
        let mut out = LineSplitter::new("stdout");
        let long = "x".repeat(40 * 1024);
        out.feed(&mut log, b"hel").expect("feed");
        out.feed(&mut log, b"lo\n\n").expect("feed");
        for chunk in format!("{long}\n").as_bytes().chunks(1000) {
            out.feed(&mut log, chunk).expect("feed");
        }
        out.feed(&mut log, &[b'y'; MAX_LINE]).expect("feed");
        out.feed(&mut log, b"\ntail").expect("feed");
        out.finish(&mut log).expect("finish");
        let r = records(&path);
        let tags: Vec<&str> = r.iter().map(|x| x.1.as_str()).collect();
        assert_eq!(tags, ["F", "F", "P", "P", "F", "F", "F"]);
        assert_eq!(r[0].2, "hello");
        assert_eq!(r[1].2, "");
        assert_eq!(format!("{}{}{}", r[2].2, r[3].2, r[4].2), long);
        assert_eq!(r[2].2.len(), MAX_LINE);
        assert_eq!(r[5].2.len(), MAX_LINE);
        assert_eq!(r[6].2, "tail");
        assert!(r.iter().all(|x| x.0 == "stdout"));
    }
}
