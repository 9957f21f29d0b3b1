//! A container's output as `docker logs` shows it, read back from its CRI log file
//! (`<RFC3339Nano> <stream> <P|F> <msg>`): the stream, the time, and the bytes with the newline a
//! full line ends in.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

/// Longest CRI log record read back; longer ones are cut (the shim writes at most 16 KiB).
const MAX_RECORD: usize = 1 << 20;
/// How often a followed log is looked at for more.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// Which stream a log entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output (and a terminal's output).
    Stdout,
    /// Standard error.
    Stderr,
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its stream.
    pub stream: Stream,
    /// When it was written, ns since the epoch.
    pub time_ns: i64,
    /// The bytes, with `\n` when the record ends a line.
    pub bytes: Vec<u8>,
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// Entries of stdout.
    pub stdout: bool,
    /// Entries of stderr.
    pub stderr: bool,
    /// Only entries at or after this time.
    pub since_ns: Option<i64>,
    /// Only entries before this time.
    pub until_ns: Option<i64>,
    /// Only the last N lines (of the streams asked for); `None`: all.
    pub tail: Option<usize>,
    /// Keep reading as the container writes.
    pub follow: bool,
}

/// Parses one record; `None` for a malformed line.
pub fn parse_record(line: &[u8]) -> Option<Entry> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let tag = parts.next()?;
    let mut bytes = parts.next().unwrap_or_default().to_vec();
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    if tag.first() != Some(&b'P') {
        bytes.push(b'\n');
    }
    Some(Entry {
        stream,
        time_ns: api::time::parse_rfc3339(time)?,
        bytes,
    })
}

fn wanted(e: &Entry, o: &LogOptions) -> bool {
    let stream = match e.stream {
        Stream::Stdout => o.stdout,
        Stream::Stderr => o.stderr,
    };
    stream && o.since_ns.is_none_or(|s| e.time_ns >= s) && o.until_ns.is_none_or(|u| e.time_ns < u)
}

/// Reads complete records from `reader`, leaving a partial last line unread (its writer is
/// still writing it). Returns the entries and how many bytes were consumed.
fn read_records(reader: &mut impl BufRead) -> std::io::Result<(Vec<Entry>, u64)> {
    let mut out = Vec::new();
    let mut used = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(MAX_RECORD as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') && n < MAX_RECORD {
            return Ok((out, used));
        }
        used += n as u64;
        if let Some(e) = parse_record(&line) {
            out.push(e);
        }
    }
}

/// Streams the log at `path` as `opts` asks. With `follow`, keeps reading until `running`
/// says the container stopped (and what it wrote is read) or the receiver is dropped.
pub fn stream(
    path: PathBuf,
    opts: LogOptions,
    running: impl Fn() -> bool + Send + 'static,
) -> mpsc::Receiver<std::io::Result<Entry>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = pump(&path, &opts, &running, &tx) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

fn pump(
    path: &Path,
    opts: &LogOptions,
    running: &dyn Fn() -> bool,
    tx: &mpsc::Sender<std::io::Result<Entry>>,
) -> std::io::Result<()> {
    let mut offset = 0u64;
    let mut first = true;
    loop {
        // Asked before reading: whatever was written before it stopped is then read.
        let still_running = opts.follow && running();
        let entries = match std::fs::File::open(path) {
            Ok(mut f) => {
                if f.metadata()?.len() < offset {
                    // Truncated under us (log reopen after rotation): start over.
                    offset = 0;
                }
                f.seek(SeekFrom::Start(offset))?;
                let (entries, used) = read_records(&mut BufReader::new(f))?;
                offset += used;
                entries
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut entries: Vec<Entry> = entries.into_iter().filter(|e| wanted(e, opts)).collect();
        if first {
            first = false;
            if let Some(n) = opts.tail {
                let lines_from = tail_start(&entries, n);
                entries.drain(..lines_from);
            }
        }
        for e in entries {
            if tx.blocking_send(Ok(e)).is_err() {
                return Ok(());
            }
        }
        if !still_running || opts.until_ns.is_some_and(|u| u <= crate::sandbox::now_ns()) {
            return Ok(());
        }
        if tx.is_closed() {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// Index of the first entry of the last `n` lines (a line may span partial records).
fn tail_start(entries: &[Entry], n: usize) -> usize {
    if n == 0 {
        return entries.len();
    }
    let mut lines = 0;
    for (i, e) in entries.iter().enumerate().rev() {
        if e.bytes.last() == Some(&b'\n') {
            lines += 1;
            if lines > n {
                return i + 1;
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(stream: Stream, t: i64, s: &str) -> Entry {
        Entry {
            stream,
            time_ns: t,
            bytes: s.as_bytes().to_vec(),
        }
    }

    #[test]
    fn records_parse_with_their_line_ends() {
        let full = parse_record(b"2016-10-06T00:17:09.669794202Z stdout F hello\n").expect("full");
        assert_eq!(full.stream, Stream::Stdout);
        assert_eq!(full.time_ns, 1_475_713_029_669_794_202);
        assert_eq!(full.bytes, b"hello\n");
        let part = parse_record(b"2016-10-06T00:17:09.669794202Z stderr P hel\n").expect("part");
        assert_eq!(
            (part.stream, &part.bytes[..]),
            (Stream::Stderr, &b"hel"[..])
        );
        let empty = parse_record(b"2016-10-06T00:17:09.669794202Z stdout F \n").expect("empty");
        assert_eq!(empty.bytes, b"\n");
        assert!(parse_record(b"garbage\n").is_none());
        assert!(parse_record(b"2016-10-06T00:17:09Z stdin F x\n").is_none());
    }

    #[test]
    fn tail_counts_lines_not_records() {
        let v = vec![
            e(Stream::Stdout, 1, "a\n"),
            e(Stream::Stdout, 2, "b"),
            e(Stream::Stdout, 3, "c\n"),
            e(Stream::Stdout, 4, "d\n"),
        ];
        assert_eq!(tail_start(&v, 1), 3);
        assert_eq!(tail_start(&v, 2), 1);
        assert_eq!(tail_start(&v, 10), 0);
        assert_eq!(tail_start(&v, 0), 4);
    }

    #[tokio::test]
    async fn a_partial_last_line_waits_for_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(
            &path,
            "2016-10-06T00:17:09Z stdout F one\n2016-10-06T00:17:10Z stderr F two\n2016-10-06T00:17:11Z stdout F thr",
        )
        .expect("write");
        let opts = LogOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let mut rx = stream(path.clone(), opts.clone(), || false);
        let mut got = Vec::new();
        while let Some(e) = rx.recv().await {
            got.push(e.expect("entry"));
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].stream, Stream::Stderr);
        let only_out = LogOptions {
            stderr: false,
            since_ns: Some(1_475_713_029_500_000_000),
            ..opts
        };
        let mut rx = stream(path, only_out, || false);
        assert!(
            rx.recv().await.is_none(),
            "stdout before `since` is skipped"
        );
    }
}
