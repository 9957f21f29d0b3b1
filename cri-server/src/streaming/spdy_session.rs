//! Sessions over SPDY/3.1: one SPDY stream per channel, named by its `streamType` header.
//!
//! The client negotiates the protocol with `X-Stream-Protocol-Version` headers in its upgrade
//! request (its preference order); no header is a Kubernetes 1.0 client speaking v1.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use ::streaming::spdy::{Headers, IncomingStream, Session, Stream};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::StdStreams;
use super::remotecommand::{Outcome, Protocol, ResizeDecoder, status_message};
use crate::container::stream::StreamOpts as Opts;
use crate::error::Result;

/// The header clients name the protocol versions they speak in.
pub const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
/// How long the client may take to open all the streams of a session (kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages in flight per channel between the socket and the process.
const DEPTH: usize = 4;
/// Bytes read per chunk.
const CHUNK: usize = 32 * 1024;

/// The first of the client's `offered` protocols that `supported` has (kubelet negotiates in
/// the client's order). `Ok(None)`: the client offered none. `Err`: no common one.
pub fn negotiate<'a>(
    offered: &[&str],
    supported: &[&'a str],
) -> std::result::Result<Option<&'a str>, String> {
    if offered.is_empty() {
        return Ok(None);
    }
    offered
        .iter()
        .find_map(|o| supported.iter().find(|s| *s == o).copied())
        .map(Some)
        .ok_or_else(|| {
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {supported:?}"
            )
        })
}

/// Copies `rx` into `stream`, then half-closes it.
async fn pump<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Bytes>, mut stream: W) {
    while let Some(data) = rx.recv().await {
        if stream.write_all(&data).await.is_err() {
            return;
        }
    }
    let _ = stream.shutdown().await;
}

/// Feeds `stream`'s data into `tx` until the client's FIN (then `tx` is dropped: end of file),
/// and answers that FIN with ours: nothing flows our way on an input stream, and closing it
/// both ways spares the client a reset while it may still be finishing its side.
async fn feed(mut stream: Stream, tx: mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Err(_) => return,
            Ok(n) => {
                if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
    drop(tx);
    let _ = stream.shutdown().await;
}

/// The streams of a remotecommand session, as the client opened them.
#[derive(Default)]
struct Opened {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

/// Accepts the session's streams until all `opts` asks for are there.
async fn open_streams(session: &Session, opts: Opts, proto: Protocol) -> Option<Opened> {
    let want_resize = opts.tty && proto.resizes();
    let mut o = Opened::default();
    let complete = |o: &Opened| {
        o.error.is_some()
            && (!opts.stdin || o.stdin.is_some())
            && (!opts.stdout || o.stdout.is_some())
            && (!opts.stderr || o.stderr.is_some())
            && (!want_resize || o.resize.is_some())
    };
    let accepting = async {
        while !complete(&o) {
            let incoming: IncomingStream = session.accept().await?;
            let kind = incoming.headers().get("streamtype").unwrap_or_default();
            let slot = match kind {
                "error" => &mut o.error,
                "stdin" => &mut o.stdin,
                "stdout" => &mut o.stdout,
                "stderr" => &mut o.stderr,
                "resize" => &mut o.resize,
                other => {
                    tracing::debug!(
                        stream_type = other,
                        "SPDY stream of an unknown type refused"
                    );
                    drop(incoming);
                    continue;
                }
            };
            *slot = Some(incoming.reply(Headers::new()).ok()?);
        }
        Some(())
    };
    match tokio::time::timeout(STREAM_CREATION_TIMEOUT, accepting).await {
        Ok(Some(())) => Some(o),
        _ => {
            tracing::debug!("streaming client did not open its streams in time");
            None
        }
    }
}

/// Serves an exec or attach session over SPDY; see `ws_session::remotecommand`.
pub async fn remotecommand<F, Fut>(session: Session, proto: Protocol, opts: Opts, run: F)
where
    F: FnOnce(StdStreams) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let Some(opened) = open_streams(&session, opts, proto).await else {
        session.abort();
        return;
    };
    let Some(error) = opened.error else {
        return;
    };
    let mut tasks = Vec::new();
    let stdin = opened.stdin.map(|s| {
        let (tx, rx) = mpsc::channel(DEPTH);
        tasks.push(tokio::spawn(feed(s, tx)));
        rx
    });
    let mut pumps = Vec::new();
    let mut output = |s: Option<Stream>| {
        s.map(|s| {
            let (tx, rx) = mpsc::channel(DEPTH);
            pumps.push(tokio::spawn(pump(rx, s)));
            tx
        })
    };
    let (stdout, stderr) = (output(opened.stdout), output(opened.stderr));
    let resize = opened.resize.map(|mut s| {
        let (tx, rx) = mpsc::channel(DEPTH);
        tasks.push(tokio::spawn(async move {
            let mut sizes = ResizeDecoder::default();
            let mut buf = vec![0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                for size in sizes.push(&buf[..n]) {
                    if tx.send(size).await.is_err() {
                        return;
                    }
                }
            }
        }));
        rx
    });
    let streams = StdStreams {
        stdin,
        stdout,
        stderr,
        resize,
    };
    let outcome = tokio::select! {
        outcome = run(streams) => Some(outcome),
        _ = session.closed() => None,
    };
    if let Some(outcome) = outcome {
        for p in pumps {
            let _ = p.await;
        }
        let mut error = error;
        if let Some(status) = status_message(&outcome, proto) {
            let _ = error.write_all(&status).await;
        }
        let _ = error.shutdown().await;
        // The client closes the connection once it has read the status.
        let _ = tokio::time::timeout(Duration::from_secs(5), session.closed()).await;
    } else {
        tracing::debug!("streaming client went away: session ended");
    }
    for t in tasks {
        t.abort();
    }
    session.abort();
}

/// One forwarded connection's two streams, paired by their `requestID`.
#[derive(Default)]
struct Pair {
    port: u16,
    data: Option<Stream>,
    error: Option<Stream>,
}

/// Serves a portforward session: each stream pair the client opens is a connection to its
/// `port`, made with `dial`, for as long as either side keeps it.
pub async fn portforward<F, Fut>(session: Session, dial: F)
where
    F: Fn(u16) -> Fut,
    Fut: Future<Output = Result<TcpStream>> + Send + 'static,
{
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut tasks = Vec::new();
    while let Some(incoming) = session.accept().await {
        let h = incoming.headers();
        let (kind, id) = (
            h.get("streamtype").unwrap_or_default().to_owned(),
            h.get("requestid").unwrap_or_default().to_owned(),
        );
        let Some(port) = h.get("port").and_then(|p| p.parse::<u16>().ok()) else {
            tracing::debug!("port-forward stream without a valid port refused");
            drop(incoming);
            continue;
        };
        let Ok(stream) = incoming.reply(Headers::new()) else {
            continue;
        };
        let pair = pairs.entry(id.clone()).or_default();
        pair.port = port;
        match kind.as_str() {
            "data" => pair.data = Some(stream),
            "error" => pair.error = Some(stream),
            _ => continue,
        }
        if pair.data.is_none() || pair.error.is_none() {
            continue;
        }
        let Some(Pair {
            port,
            data: Some(mut data),
            error: Some(mut error),
        }) = pairs.remove(&id)
        else {
            continue;
        };
        let conn = dial(port);
        tasks.push(tokio::spawn(async move {
            match conn.await {
                Err(e) => {
                    let _ = error
                        .write_all(format!("error forwarding port {port}: {e}").as_bytes())
                        .await;
                    // Half-close the data stream, as kubelet's deferred Close does; dropping it
                    // open would reset it, and a client that has not yet written its first bytes
                    // (the dial can fail before it gets to) would see its write fail with that
                    // reset instead of going on to read the error stream.
                    let _ = data.shutdown().await;
                }
                Ok(conn) => {
                    let (mut cr, mut cw) = conn.into_split();
                    let (mut dr, mut dw) = tokio::io::split(data);
                    let up = async {
                        let _ = tokio::io::copy(&mut dr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut cr, &mut dw).await;
                        let _ = dw.shutdown().await;
                    };
                    tokio::pin!(up, down);
                    // The pod's side ending ends the forwarded connection (as kubelet); the
                    // client's FIN only ends what goes to the pod.
                    tokio::select! {
                        () = &mut up => down.await,
                        () = &mut down => {}
                    }
                }
            }
            let _ = error.shutdown().await;
        }));
        tasks.retain(|t| !t.is_finished());
    }
    for t in tasks {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ::streaming::spdy::{Config, Headers, Session};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::portforward;
    use crate::error::Error;

    /// A connection that cannot be made: the error stream says why, and the data stream is
    /// half-closed rather than reset, so a client slower than the failed dial still gets to
    /// write its request and then read the error (kubectl and our tests do it in that order).
    #[tokio::test]
    async fn failed_dial_half_closes_the_data_stream() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = Session::client(a, Config::default());
        let serving = tokio::spawn(portforward(
            Session::server(b, Config::default()),
            |port| async move { Err(Error::NotFound(format!("nothing listens on {port}"))) },
        ));
        let headers = |kind: &str| {
            Headers::new()
                .with("streamtype", kind)
                .with("port", "8081")
                .with("requestid", "1")
        };
        let within = |secs| Duration::from_secs(secs);
        let mut error = client.open(headers("error")).await.expect("error stream");
        let mut data = client.open(headers("data")).await.expect("data stream");
        // The server is done with the connection before the client writes anything.
        let mut msg = String::new();
        tokio::time::timeout(within(10), error.read_to_string(&mut msg))
            .await
            .expect("error stream ends")
            .expect("error stream read");
        assert!(msg.contains("8081"), "{msg:?}");
        let mut rest = Vec::new();
        tokio::time::timeout(within(10), data.read_to_end(&mut rest))
            .await
            .expect("data stream ends")
            .expect("data stream ends with a FIN, not a reset");
        assert!(rest.is_empty(), "{rest:?}");
        data.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .await
            .expect("writing after the server's FIN");
        data.flush().await.expect("flush");
        drop((data, error, client));
        tokio::time::timeout(within(10), serving)
            .await
            .expect("port-forward session ends with the client")
            .expect("port-forward task");
    }
}
