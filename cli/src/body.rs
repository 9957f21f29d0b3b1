//! Request bodies streamed from blocking readers and writers (a file, stdin, a tar being
//! built from the host's tree), so nothing large is ever held in memory whole.

use std::io::{Read, Write};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

/// Chunks sent per message; a few of them are in flight at most.
const CHUNK: usize = 64 * 1024;

/// One chunk of a body, or the failure that ended it.
pub type Chunk = std::io::Result<Bytes>;

/// A body being produced on a blocking thread.
pub type BodyStream = futures::stream::BoxStream<'static, Chunk>;

/// A blocking [`Write`] whose bytes become the chunks of an async body stream. Dropping it
/// sends what is buffered.
pub struct ChannelWriter {
    tx: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
    /// The stream's reader went away (the request ended).
    closed: bool,
}

impl ChannelWriter {
    fn send_buffered(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            self.closed = true;
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the daemon stopped reading")
        })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffered()
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        let _ = self.send_buffered();
    }
}

/// Runs `produce` on a blocking thread with a writer whose bytes come out of the returned
/// stream as they are written. A failure of `produce` ends the stream with an error (so an
/// upload fails rather than sending a cut archive) and is what the task yields; one caused by
/// the stream's reader going away is not (the request's own error says why it ended).
pub fn produced<F>(produce: F) -> (BodyStream, tokio::task::JoinHandle<anyhow::Result<()>>)
where
    F: FnOnce(&mut ChannelWriter) -> anyhow::Result<()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Chunk>(4);
    let task = tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let mut w = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            closed: false,
        };
        let result = produce(&mut w).and_then(|()| Ok(w.flush()?));
        let closed = w.closed;
        drop(w);
        match result {
            Err(_) if closed => Ok(()),
            Err(e) => {
                let _ = err_tx.blocking_send(Err(std::io::Error::other(format!("{e:#}"))));
                Err(e)
            }
            Ok(()) => Ok(()),
        }
    });
    (
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed(),
        task,
    )
}

/// The bytes of `r` (a file, stdin) as a body stream, read on a blocking thread.
pub fn read_stream(
    mut r: impl Read + Send + 'static,
) -> (BodyStream, tokio::task::JoinHandle<anyhow::Result<()>>) {
    produced(move |w| {
        std::io::copy(&mut r, w)?;
        Ok(())
    })
}

/// A blocking [`Read`] of chunks sent from async code (a download being extracted).
pub struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl ChannelReader {
    /// A reader and the sender that feeds it; dropping the sender ends the input.
    pub fn new() -> (mpsc::Sender<Bytes>, ChannelReader) {
        let (tx, rx) = mpsc::channel(4);
        (
            tx,
            ChannelReader {
                rx,
                cur: Bytes::new(),
            },
        )
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn a_reader_streams_in_chunks_and_a_failure_ends_the_stream() {
        let data: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| i as u8).collect();
        let (mut s, task) = read_stream(std::io::Cursor::new(data.clone()));
        let mut got = Vec::new();
        let mut chunks = 0;
        while let Some(c) = s.next().await {
            got.extend_from_slice(&c.expect("chunk"));
            chunks += 1;
        }
        assert_eq!(got, data);
        assert_eq!(chunks, 4);
        task.await.expect("task").expect("read");
        let (mut s, task) = produced(|w| {
            w.write_all(b"partial")?;
            anyhow::bail!("disk on fire")
        });
        let mut items = Vec::new();
        while let Some(c) = s.next().await {
            items.push(c);
        }
        assert!(items.last().expect("items").is_err());
        assert!(task.await.expect("task").is_err());
        // The consumer going away is not the producer's failure.
        let (s, task) = read_stream(std::io::repeat(7));
        drop(s);
        task.await.expect("task").expect("stopped quietly");
    }
}
