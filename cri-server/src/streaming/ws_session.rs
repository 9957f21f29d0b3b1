//! Sessions over WebSocket: remotecommand and portforward channels in messages, the channel
//! number first (binary) or as an ASCII digit before base64 data (text, the `base64` variants).

use std::future::Future;

use ::streaming::ws::{Message, WebSocket, WsWriter, close_code};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::StdStreams;
use super::remotecommand::{Outcome, Protocol, ResizeDecoder, channel, status_message};
use crate::container::stream::StreamOpts as Opts;
use crate::error::Result;

/// Messages in flight per channel between the socket and the process.
const DEPTH: usize = 4;
/// Bytes read from a forwarded connection per message.
const CHUNK: usize = 32 * 1024;

fn encode(ch: u8, data: &[u8], base64: bool) -> Message {
    if base64 {
        let mut text = String::with_capacity(1 + data.len().div_ceil(3) * 4);
        text.push(char::from(b'0' + ch));
        BASE64.encode_string(data, &mut text);
        Message::Text(text)
    } else {
        let mut buf = Vec::with_capacity(1 + data.len());
        buf.push(ch);
        buf.extend_from_slice(data);
        Message::Binary(buf.into())
    }
}

/// The channel and data of a data message; None for control messages and garbage.
fn decode(msg: Message, base64: bool) -> Option<(u8, Bytes)> {
    match msg {
        Message::Binary(b) if !base64 && !b.is_empty() => Some((b[0], b.slice(1..))),
        Message::Text(t) if base64 && !t.is_empty() => {
            let ch = t.as_bytes()[0].checked_sub(b'0')?;
            BASE64.decode(&t[1..]).ok().map(|d| (ch, d.into()))
        }
        _ => None,
    }
}

/// Copies `rx` to channel `ch` until `rx` ends or the socket fails.
async fn pump(mut rx: mpsc::Receiver<Bytes>, writer: WsWriter, ch: u8, base64: bool) {
    while let Some(data) = rx.recv().await {
        if writer.send(encode(ch, &data, base64)).await.is_err() {
            return;
        }
    }
}

/// Serves an exec or attach session: `run` gets the process side and returns how it ended.
/// A client that goes away drops `run`'s future (which kills an exec'd process).
pub async fn remotecommand<F, Fut>(ws: WebSocket<TcpStream>, proto: Protocol, opts: Opts, run: F)
where
    F: FnOnce(StdStreams) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let base64 = proto.base64;
    let (mut reader, writer) = ws.split();
    let (stdin_tx, stdin_rx) = opts.stdin.then(|| mpsc::channel(DEPTH)).unzip();
    let (resize_tx, resize_rx) = opts.tty.then(|| mpsc::channel(DEPTH)).unzip();
    let (stdout_tx, stdout_rx) = opts.stdout.then(|| mpsc::channel(DEPTH)).unzip();
    let (stderr_tx, stderr_rx) = opts.stderr.then(|| mpsc::channel(DEPTH)).unzip();
    // As kubelet: an empty message on the first output channel tells the client it is set up.
    let first = match (opts.stdout, opts.stderr) {
        (true, _) => channel::STDOUT,
        (false, true) => channel::STDERR,
        _ => channel::ERROR,
    };
    if writer.send(encode(first, &[], base64)).await.is_err() {
        return;
    }
    let mut pumps = Vec::new();
    for (ch, rx) in [(channel::STDOUT, stdout_rx), (channel::STDERR, stderr_rx)] {
        if let Some(rx) = rx {
            pumps.push(tokio::spawn(pump(rx, writer.clone(), ch, base64)));
        }
    }
    let streams = StdStreams {
        stdin: stdin_rx,
        stdout: stdout_tx,
        stderr: stderr_tx,
        resize: resize_rx,
    };
    let reading = async {
        let mut stdin_tx: Option<mpsc::Sender<Bytes>> = stdin_tx;
        let mut sizes = ResizeDecoder::default();
        while let Ok(Some(msg)) = reader.recv().await {
            let Some((ch, data)) = decode(msg, base64) else {
                continue;
            };
            match ch {
                channel::STDIN => {
                    if let Some(tx) = &stdin_tx
                        && !data.is_empty()
                        && tx.send(data).await.is_err()
                    {
                        stdin_tx = None;
                    }
                }
                channel::RESIZE => {
                    if let Some(tx) = &resize_tx {
                        for size in sizes.push(&data) {
                            let _ = tx.send(size).await;
                        }
                    }
                }
                channel::CLOSE if proto.version >= 5 && data.first() == Some(&channel::STDIN) => {
                    stdin_tx = None;
                }
                _ => {}
            }
        }
    };
    let outcome = tokio::select! {
        outcome = run(streams) => outcome,
        () = reading => {
            tracing::debug!("streaming client went away: session ended");
            return;
        }
    };
    for p in pumps {
        let _ = p.await;
    }
    if let Some(status) = status_message(&outcome, proto) {
        let _ = writer.send(encode(channel::ERROR, &status, base64)).await;
    }
    let _ = writer.close(close_code::NORMAL, "").await;
}

/// Serves a portforward session: one connection per port, made with `dial`, for as long as the
/// client stays.
pub async fn portforward<F, Fut>(ws: WebSocket<TcpStream>, base64: bool, ports: Vec<u16>, dial: F)
where
    F: Fn(u16) -> Fut,
    Fut: Future<Output = Result<TcpStream>> + Send + 'static,
{
    let (mut reader, writer) = ws.split();
    if ports.is_empty() {
        let _ = writer
            .close(
                close_code::POLICY_VIOLATION,
                "query parameter \"port\" is required",
            )
            .await;
        return;
    }
    let mut to_conn: Vec<Option<mpsc::Sender<Bytes>>> = Vec::new();
    let mut tasks = Vec::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let (data_ch, err_ch) = ((2 * i) as u8, (2 * i + 1) as u8);
        for ch in [data_ch, err_ch] {
            if writer
                .send(encode(ch, &port.to_le_bytes(), base64))
                .await
                .is_err()
            {
                return;
            }
        }
        let (tx, mut rx) = mpsc::channel::<Bytes>(DEPTH);
        to_conn.push(Some(tx));
        let writer = writer.clone();
        let conn = dial(port);
        tasks.push(tokio::spawn(async move {
            let conn = match conn.await {
                Ok(c) => c,
                Err(e) => {
                    let _ = writer
                        .send(encode(err_ch, e.to_string().as_bytes(), base64))
                        .await;
                    return;
                }
            };
            let (mut r, mut w) = conn.into_split();
            let upstream = async {
                while let Some(data) = rx.recv().await {
                    if w.write_all(&data).await.is_err() {
                        break;
                    }
                }
                let _ = w.shutdown().await;
            };
            let downstream = async {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if writer
                                .send(encode(data_ch, &buf[..n], base64))
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                }
            };
            tokio::join!(upstream, downstream);
        }));
    }
    while let Ok(Some(msg)) = reader.recv().await {
        let Some((ch, data)) = decode(msg, base64) else {
            continue;
        };
        let i = usize::from(ch / 2);
        if ch % 2 == 0
            && let Some(slot) = to_conn.get_mut(i)
            && let Some(tx) = slot
            && tx.send(data).await.is_err()
        {
            *slot = None;
        }
    }
    // The client is gone: so are its connections.
    for t in tasks {
        t.abort();
    }
}
