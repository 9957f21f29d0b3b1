//! Byte streams between async tasks and the blocking threads that read or write files: the
//! blocking side reads or writes plain `std::io`, the async side sends or receives chunks.

use std::io::{Read, Write};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Reads the chunks an async task sends (a download, a request body) on a blocking thread.
pub struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl ChannelReader {
    /// Reads what arrives on `rx` until it closes (end of file) or carries an error.
    pub fn new(rx: mpsc::Receiver<std::io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Chunk size of a [`ChannelWriter`].
const CHUNK: usize = 64 * 1024;

/// Writes from a blocking thread into chunks an async task receives (a response body). A
/// receiver that went away (the client hung up) fails the writes with `BrokenPipe`.
pub struct ChannelWriter {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    /// Sends to `tx` in chunks of 64 KiB; the channel's bound is the back-pressure.
    pub fn new(tx: mpsc::Sender<std::io::Result<Bytes>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        let _ = self.send();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cross_in_order_and_a_gone_reader_breaks_the_pipe() {
        let (tx, mut rx) = mpsc::channel(4);
        let writer = std::thread::spawn(move || {
            let mut w = ChannelWriter::new(tx);
            for i in 0..200_000u32 {
                w.write_all(&i.to_le_bytes()).expect("write");
            }
        });
        let (tx2, rx2) = mpsc::channel(4);
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            ChannelReader::new(rx2).read_to_end(&mut all).expect("read");
            all
        });
        while let Some(chunk) = rx.blocking_recv() {
            tx2.blocking_send(chunk).expect("forward");
        }
        drop(tx2);
        writer.join().expect("writer");
        let all = reader.join().expect("reader");
        assert_eq!(all.len(), 800_000);
        assert_eq!(&all[4..8], &1u32.to_le_bytes());

        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut w = ChannelWriter::new(tx);
        let err = w.write_all(&[0; CHUNK]).expect_err("nobody reads");
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    }
}
