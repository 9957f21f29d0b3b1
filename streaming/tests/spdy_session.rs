//! SPDY sessions end to end: two `Session`s over `tokio::io::duplex` and over TCP loopback, and
//! a session against a hand-driven peer that behaves like moby/spdystream (no flow control).
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use berth_streaming::spdy::frame::{
    Decoder, Encoder, Frame, GoAwayStatus, Headers, RstStatus, SETTINGS_INITIAL_WINDOW_SIZE,
};
use berth_streaming::spdy::{Config, Error, Session, Stream};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};

const DUPLEX_BUF: usize = 64 * 1024;

/// Fails the test instead of hanging it.
async fn within<T>(what: &str, secs: u64, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: still pending after {secs}s"),
    }
}

fn config(window: u32) -> Config {
    let mut c = Config::default();
    c.initial_window = window;
    c
}

fn pair(client: Config, server: Config) -> (Session, Session) {
    let (a, b) = tokio::io::duplex(DUPLEX_BUF);
    (Session::client(a, client), Session::server(b, server))
}

async fn tcp_pair(client: Config, server: Config) -> (Session, Session) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (
        Session::client(connected.unwrap(), client),
        Session::server(accepted.unwrap().0, server),
    )
}

/// Accepts every stream, replies with `echo: <name header>`, and echoes its bytes until EOF.
fn spawn_echo(server: Session) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let name = incoming.headers().get("name").unwrap_or("").to_owned();
            let stream = incoming.reply(Headers::new().with("echo", name)).unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(stream);
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    })
}

/// Opens a stream from `client` and accepts it on `server`: (client side, server side).
async fn open_pair(client: &Session, server: &Session) -> (Stream, Stream) {
    let opener = {
        let client = client.clone();
        tokio::spawn(async move { client.open(Headers::new()).await })
    };
    let incoming = within("accept", 5, server.accept()).await.unwrap();
    let server_side = incoming.reply(Headers::new()).unwrap();
    let client_side = within("open", 5, opener).await.unwrap().unwrap();
    (client_side, server_side)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// Writes `data` and shuts down while reading everything back; returns what came back.
async fn round_trip(stream: Stream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    drop(writer.await.unwrap());
    back
}

async fn concurrent_echo(client: Session, server: Session) {
    let echo = spawn_echo(server);
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let stream = client
                .open(Headers::new().with("name", format!("s{i}")))
                .await
                .unwrap();
            assert_eq!(stream.headers().get("echo"), Some(format!("s{i}").as_str()));
            assert_eq!(stream.id() % 2, 1, "client streams are odd");
            let data = pattern(200_000 + usize::from(i) * 1000, i);
            let back = round_trip(stream, data.clone()).await;
            assert!(back == data, "stream {i} echoed wrong bytes");
        }));
    }
    for task in tasks {
        within("echo stream", 60, task).await.unwrap();
    }
    client.goaway();
    within("client close", 10, client.closed()).await.unwrap();
    within("echo server", 10, echo).await.unwrap();
}

#[tokio::test]
async fn concurrent_streams_echo_over_duplex() {
    let (client, server) = pair(Config::default(), Config::default());
    concurrent_echo(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_echo_over_tcp() {
    let (client, server) = tcp_pair(config(128 * 1024), config(32 * 1024)).await;
    concurrent_echo(client, server).await;
}

#[tokio::test]
async fn half_close_each_direction() {
    let (client, server) = pair(Config::default(), Config::default());
    let server_task = tokio::spawn(async move {
        // Stream 1: the client finishes first; we answer after its EOF.
        let mut s1 = server
            .accept()
            .await
            .unwrap()
            .reply(Headers::new())
            .unwrap();
        let mut got = Vec::new();
        s1.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"question");
        s1.write_all(b"answer").await.unwrap();
        s1.shutdown().await.unwrap();
        // Stream 3: we finish first; the client keeps writing and we keep reading.
        let mut s3 = server
            .accept()
            .await
            .unwrap()
            .reply(Headers::new())
            .unwrap();
        s3.write_all(b"bye").await.unwrap();
        s3.shutdown().await.unwrap();
        let err = s3.write_all(b"more").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        let mut got = Vec::new();
        s3.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"still talking");
        (s1, s3)
    });
    let mut s1 = client.open(Headers::new()).await.unwrap();
    s1.write_all(b"question").await.unwrap();
    s1.shutdown().await.unwrap();
    let mut got = Vec::new();
    s1.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"answer");

    let mut s3 = client.open(Headers::new()).await.unwrap();
    let mut got = Vec::new();
    s3.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
    s3.write_all(b"still talking").await.unwrap();
    s3.shutdown().await.unwrap();
    within("server", 10, server_task).await.unwrap();
}

/// Sends 20 MB through one stream to a slow reader; asserts that the receiver never buffers
/// more than its window and (when `lead_bound` is given) that the writer is held back.
async fn slow_reader(client: Session, server: Session, window: u32, lead_bound: Option<usize>) {
    const TOTAL: usize = 20 * 1024 * 1024;
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let written = Arc::clone(&written);
        tokio::spawn(async move {
            let mut stream = client.open(Headers::new()).await.unwrap();
            let chunk = pattern(30_000, 7);
            let mut sent = 0;
            while sent < TOTAL {
                let n = chunk.len().min(TOTAL - sent);
                stream.write_all(&chunk[..n]).await.unwrap();
                sent += n;
                written.store(sent, Ordering::SeqCst);
            }
            stream.shutdown().await.unwrap();
            (client, stream)
        })
    };
    let mut stream = server
        .accept()
        .await
        .unwrap()
        .reply(Headers::new())
        .unwrap();
    let expected = pattern(30_000, 7);
    let mut buf = vec![0u8; 8 * 1024];
    let mut read = 0;
    let mut max_buffered = 0;
    let mut max_lead = 0;
    loop {
        let buffered = stream.recv_buffered();
        assert!(
            buffered <= window as usize,
            "buffered {buffered} bytes, beyond the {window} window"
        );
        max_buffered = max_buffered.max(buffered);
        let n = within("slow read", 30, stream.read(&mut buf))
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(
                *b,
                expected[(read + i) % expected.len()],
                "byte {}",
                read + i
            );
        }
        read += n;
        let lead = written.load(Ordering::SeqCst).saturating_sub(read);
        max_lead = max_lead.max(lead);
        if read % (1024 * 1024) < n {
            // Slow: the writer keeps filling the window meanwhile.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(read, TOTAL);
    assert!(
        max_buffered > window as usize / 2,
        "window never filled: {max_buffered}"
    );
    if let Some(bound) = lead_bound {
        assert!(max_lead <= bound, "writer ran {max_lead} bytes ahead");
    }
    let (_client, _stream) = within("writer", 10, writer).await.unwrap();
}

#[tokio::test]
async fn slow_reader_back_pressure_within_window() {
    const WINDOW: u32 = 64 * 1024;
    let (client, server) = pair(Config::default(), config(WINDOW));
    // Window + writer queue (256 KiB) + transport buffer + one chunk in flight.
    let bound = WINDOW as usize + 256 * 1024 + DUPLEX_BUF + 100_000 + 64 * 1024;
    slow_reader(client, server, WINDOW, Some(bound)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_over_tcp() {
    // The kernel's socket buffers hold an unknown amount: only the window is asserted here.
    const WINDOW: u32 = 256 * 1024;
    let (client, server) = tcp_pair(Config::default(), config(WINDOW)).await;
    slow_reader(client, server, WINDOW, None).await;
}

#[tokio::test]
async fn reset_fails_reads_and_writes_on_the_other_side() {
    let (client, server) = pair(Config::default(), Config::default());
    // Refusing an incoming stream fails the opener.
    let opener = {
        let client = client.clone();
        tokio::spawn(async move { client.open(Headers::new().with("a", "b")).await })
    };
    let incoming = server.accept().await.unwrap();
    assert_eq!(incoming.headers().get("a"), Some("b"));
    incoming.reset(RstStatus::REFUSED_STREAM);
    match within("open", 5, opener).await.unwrap() {
        Err(Error::ResetByPeer { status, .. }) => assert_eq!(status, RstStatus::REFUSED_STREAM),
        other => panic!("open was not refused: {other:?}"),
    }

    // A reset of an open stream fails the peer's pending read, and later writes.
    let opened = tokio::spawn({
        let client = client.clone();
        async move { client.open(Headers::new()).await.unwrap() }
    });
    let server_stream = server
        .accept()
        .await
        .unwrap()
        .reply(Headers::new())
        .unwrap();
    let mut client_stream = opened.await.unwrap();
    let pending_read = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        let err = client_stream.read(&mut buf).await.unwrap_err();
        (client_stream, err)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    server_stream.reset(RstStatus::CANCEL);
    let (mut client_stream, err) = within("reset read", 5, pending_read).await.unwrap();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let source = err.get_ref().unwrap().downcast_ref::<Error>().unwrap();
    assert!(
        matches!(source, Error::ResetByPeer { status, .. } if *status == RstStatus::CANCEL),
        "{source}"
    );
    let err = client_stream.write_all(b"x").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);

    // Dropping an unfinished stream resets it for the peer.
    let opened = tokio::spawn({
        let client = client.clone();
        async move { client.open(Headers::new()).await.unwrap() }
    });
    let mut server_stream = server
        .accept()
        .await
        .unwrap()
        .reply(Headers::new())
        .unwrap();
    drop(opened.await.unwrap());
    let err = within("read after drop", 5, server_stream.read(&mut [0u8; 4]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // The session itself is unharmed.
    within("ping", 5, client.ping()).await.unwrap();
}

#[tokio::test]
async fn ping_round_trips_both_ways() {
    let (client, server) = pair(Config::default(), Config::default());
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await.is_none() }
    });
    for _ in 0..3 {
        within("client ping", 5, client.ping()).await.unwrap();
        within("server ping", 5, server.ping()).await.unwrap();
    }
    client.goaway();
    assert!(within("accept after goaway", 5, accept).await.unwrap());
    within("client closed", 5, client.closed()).await.unwrap();
    within("server closed", 5, server.closed()).await.unwrap();
    assert!(matches!(client.ping().await, Err(Error::Closed(_))));
}

#[tokio::test]
async fn goaway_stops_new_streams_and_closes_when_streams_finish() {
    let (client, server) = pair(Config::default(), Config::default());
    let (mut stream, server_stream) = open_pair(&client, &server).await;
    server.goaway();
    // The peer learns about it and refuses to open more (a SYN_STREAM that crossed our GOAWAY
    // is refused by us).
    within("open after goaway", 5, async {
        loop {
            match client.open(Headers::new()).await {
                Err(Error::GoneAway) => break,
                Err(Error::ResetByPeer { status, .. }) if status == RstStatus::REFUSED_STREAM => {}
                Ok(_) => panic!("opened a stream after GOAWAY"),
                Err(e) => panic!("unexpected: {e}"),
            }
        }
    })
    .await;
    assert!(within("server accept", 5, server.accept()).await.is_none());
    assert!(matches!(
        server.open(Headers::new()).await,
        Err(Error::GoingAway)
    ));
    // The open stream still works both ways; the connection closes once it is done.
    let echo = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(server_stream);
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    within("write", 5, stream.write_all(b"last words"))
        .await
        .unwrap();
    within("shutdown", 5, stream.shutdown()).await.unwrap();
    let mut back = Vec::new();
    within("read back", 5, stream.read_to_end(&mut back))
        .await
        .unwrap();
    assert_eq!(back, b"last words");
    within("echo", 5, echo).await.unwrap();
    within("server closed", 5, server.closed()).await.unwrap();
    within("client closed", 5, client.closed()).await.unwrap();
}

#[tokio::test]
async fn idle_timeout_closes_the_connection() {
    let mut server_config = Config::default();
    server_config.idle_timeout = Some(Duration::from_millis(200));
    let (client, server) = pair(Config::default(), server_config);
    let started = tokio::time::Instant::now();
    let err = within("idle server", 5, server.closed()).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    let Error::Closed(cause) = err else {
        panic!("{err}")
    };
    assert!(matches!(*cause, Error::IdleTimeout(_)), "{cause}");
    // The idle side said GOAWAY before leaving, so the client's end is a graceful one.
    within("client", 5, client.closed()).await.unwrap();
    assert!(client.accept().await.is_none());
    no_tasks_left().await;
}

#[tokio::test]
async fn traffic_keeps_an_idle_timeout_at_bay() {
    let mut server_config = Config::default();
    server_config.idle_timeout = Some(Duration::from_millis(800));
    let (client, server) = pair(Config::default(), server_config);
    // 2 s of traffic, never 800 ms apart.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        within("ping", 5, client.ping()).await.unwrap();
    }
    server.goaway();
    within("server", 5, server.closed()).await.unwrap();
}

#[tokio::test]
async fn peer_vanishing_ends_pending_reads_and_writes() {
    // Over duplex: the client side is aborted while the server reads and writes.
    let (client, server) = pair(Config::default(), config(16 * 1024));
    let (client_stream, server_stream) = open_pair(&client, &server).await;
    let (mut r, mut w) = tokio::io::split(server_stream);
    let reader = tokio::spawn(async move { r.read(&mut [0u8; 16]).await });
    // The client never reads, so this write stalls on its window.
    let writer = tokio::spawn(async move { w.write_all(&vec![1u8; 4 << 20]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!writer.is_finished(), "the write should be held back");
    client.abort();
    let err = within("pending read", 5, reader)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    let err = within("pending write", 5, writer)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    assert!(matches!(
        within("server closed", 5, server.closed()).await,
        Err(Error::Closed(_))
    ));
    assert!(server.accept().await.is_none());
    drop(client_stream);
    // The sessions' tasks are gone, although `client` and `server` handles still exist.
    no_tasks_left().await;
}

/// Waits until no task is alive on this runtime any more.
async fn no_tasks_left() {
    let metrics = tokio::runtime::Handle::current().metrics();
    within("tasks to end", 5, async {
        while metrics.num_alive_tasks() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_vanishing_over_tcp() {
    let (client, server) = tcp_pair(Config::default(), Config::default()).await;
    let (mut client_stream, mut server_stream) = open_pair(&client, &server).await;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let err = server_stream.read_to_end(&mut got).await.unwrap_err();
        (got, err)
    });
    client_stream.write_all(b"partial").await.unwrap();
    client_stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.abort();
    let (got, err) = within("pending read", 5, reader).await.unwrap();
    assert_eq!(got, b"partial");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    let Err(Error::Closed(cause)) = within("server", 5, server.closed()).await else {
        panic!("server closed cleanly")
    };
    assert!(matches!(*cause, Error::PeerClosed), "{cause}");
    drop(client_stream);
    no_tasks_left().await;
}

#[tokio::test]
async fn dropping_every_handle_closes_the_connection() {
    let (client, server) = pair(Config::default(), Config::default());
    let accept = tokio::spawn(async move {
        let none = server.accept().await.is_none();
        (server, none)
    });
    let second = client.clone();
    drop(client);
    // One handle left: still open.
    within("ping", 5, second.ping()).await.unwrap();
    drop(second);
    let (server, none) = within("server accept", 5, accept).await.unwrap();
    assert!(none, "the server saw GOAWAY and stopped accepting");
    within("server", 5, server.closed()).await.unwrap();
}

/// A peer driven frame by frame.
struct RawPeer {
    io: DuplexStream,
    encoder: Encoder,
    decoder: Decoder,
    buf: BytesMut,
}

impl RawPeer {
    fn new(io: DuplexStream) -> Self {
        Self {
            io,
            encoder: Encoder::new(),
            decoder: Decoder::new(),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        self.encoder.encode(&frame, &mut out).unwrap();
        self.io.write_all(&out).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// The next frame; `None` at EOF.
    async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf).unwrap() {
                return Some(frame);
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Skips WINDOW_UPDATEs and SETTINGS, which spdystream ignores too.
    async fn recv_significant(&mut self) -> Option<Frame> {
        loop {
            match self.recv().await? {
                Frame::WindowUpdate { .. } | Frame::Settings { .. } => {}
                frame => return Some(frame),
            }
        }
    }
}

fn syn_stream(id: u32, headers: Headers) -> Frame {
    Frame::SynStream {
        stream_id: id,
        associated_to: 0,
        priority: 0,
        slot: 0,
        fin: false,
        unidirectional: false,
        headers,
    }
}

fn raw_server(server_config: Config) -> (RawPeer, Session) {
    let (a, b) = tokio::io::duplex(DUPLEX_BUF);
    (RawPeer::new(a), Session::server(b, server_config))
}

#[tokio::test]
async fn first_frames_announce_flow_control() {
    let (mut peer, _server) = raw_server(config(100_000));
    assert_eq!(
        peer.recv().await.unwrap(),
        Frame::Settings {
            clear: false,
            settings: vec![berth_streaming::spdy::frame::Setting {
                flags: 0,
                id: SETTINGS_INITIAL_WINDOW_SIZE,
                value: 100_000
            }]
        }
    );
    assert_eq!(
        peer.recv().await.unwrap(),
        Frame::WindowUpdate {
            stream_id: 0,
            delta: 0x7fff_ffff - 65536
        }
    );
}

/// A peer like spdystream: no SETTINGS, no WINDOW_UPDATE, DATA far beyond our window without
/// waiting, and it never returns credit for what we send. Neither side may stall, and our
/// buffer stays within a window plus one frame.
#[tokio::test]
async fn spdystream_like_peer_without_flow_control() {
    const WINDOW: usize = 64 * 1024;
    const FRAME: usize = 32 * 1024;
    const TOTAL: usize = 2 * 1024 * 1024;
    let (mut peer, server) = raw_server(config(WINDOW as u32));
    let app = tokio::spawn(async move {
        let incoming = server.accept().await.unwrap();
        assert_eq!(incoming.headers().get("streamtype"), Some("stdin"));
        let mut stream = incoming.reply(Headers::new()).unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 4096];
        let mut max_buffered = 0;
        loop {
            max_buffered = max_buffered.max(stream.recv_buffered());
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(buf[..n].iter().all(|b| *b == 0x5a));
            got += n;
            if got % (256 * 1024) < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        assert_eq!(got, TOTAL);
        assert!(max_buffered <= WINDOW + FRAME, "buffered {max_buffered}");
        // Now write more than any window to a peer that never sends WINDOW_UPDATE.
        stream.write_all(&vec![0xa5; TOTAL]).await.unwrap();
        stream.shutdown().await.unwrap();
        (server, stream)
    });
    peer.send(syn_stream(1, Headers::new().with("streamType", "stdin")))
        .await;
    match peer.recv_significant().await.unwrap() {
        Frame::SynReply { stream_id: 1, .. } => {}
        other => panic!("expected SYN_REPLY, got {other:?}"),
    }
    let chunk = Bytes::from(vec![0x5a; FRAME]);
    for i in 0..TOTAL / FRAME {
        peer.send(Frame::Data {
            stream_id: 1,
            fin: i + 1 == TOTAL / FRAME,
            data: chunk.clone(),
        })
        .await;
    }
    let mut got = 0;
    loop {
        match within("server data", 30, peer.recv_significant())
            .await
            .unwrap()
        {
            Frame::Data {
                stream_id: 1,
                fin,
                data,
            } => {
                assert!(data.iter().all(|b| *b == 0xa5));
                got += data.len();
                if fin {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, TOTAL);
    let (server, _stream) = within("app", 30, app).await.unwrap();
    // spdystream's Close: GOAWAY, then the connection goes once the streams are done.
    peer.send(Frame::GoAway {
        last_good_stream_id: 0,
        status: GoAwayStatus::OK,
    })
    .await;
    drop(peer);
    within("server", 5, server.closed()).await.unwrap();
}

#[tokio::test]
async fn peer_pings_are_echoed_and_unknown_frames_skipped() {
    let (mut peer, _server) = raw_server(Config::default());
    // A CREDENTIAL frame (type 10), which we do not implement, then a client PING.
    peer.send_raw(&[0x80, 3, 0, 10, 0, 0, 0, 3, 1, 2, 3]).await;
    peer.send(Frame::Ping { id: 7 }).await;
    assert_eq!(peer.recv_significant().await, Some(Frame::Ping { id: 7 }));
}

async fn expect_protocol_goaway(mut peer: RawPeer, server: Session) {
    loop {
        match within("goaway", 5, peer.recv()).await {
            Some(Frame::GoAway { status, .. }) => {
                assert_eq!(status, GoAwayStatus::PROTOCOL_ERROR);
                break;
            }
            Some(_) => {}
            None => panic!("connection closed without GOAWAY"),
        }
    }
    assert_eq!(within("eof", 5, peer.recv()).await, None);
    let err = within("server", 5, server.closed()).await.unwrap_err();
    assert!(matches!(err, Error::Closed(_)), "{err}");
}

#[tokio::test]
async fn protocol_violations_close_only_that_connection() {
    // A stream id of the server's parity.
    let (mut peer, server) = raw_server(Config::default());
    peer.send(syn_stream(2, Headers::new())).await;
    expect_protocol_goaway(peer, server).await;

    // Stream ids going backwards.
    let (mut peer, server) = raw_server(Config::default());
    peer.send(syn_stream(5, Headers::new())).await;
    peer.send(syn_stream(3, Headers::new())).await;
    expect_protocol_goaway(peer, server).await;

    // A SPDY/2 frame.
    let (mut peer, server) = raw_server(Config::default());
    peer.send_raw(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1])
        .await;
    expect_protocol_goaway(peer, server).await;

    // A header block that is not zlib.
    let (mut peer, server) = raw_server(Config::default());
    peer.send_raw(&[
        0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
    ])
    .await;
    expect_protocol_goaway(peer, server).await;

    // A header bomb.
    let (mut peer, server) = raw_server(Config::default());
    let mut headers = Headers::new();
    headers.append("x", "y".repeat(300 * 1024));
    peer.send(syn_stream(1, headers)).await;
    expect_protocol_goaway(peer, server).await;

    // Meanwhile another connection is unaffected.
    let (client, server) = pair(Config::default(), Config::default());
    let echo = spawn_echo(server);
    let stream = client.open(Headers::new()).await.unwrap();
    assert_eq!(round_trip(stream, b"fine".to_vec()).await, b"fine");
    client.goaway();
    within("client", 5, client.closed()).await.unwrap();
    within("echo", 5, echo).await.unwrap();
}

#[tokio::test]
async fn truncated_connection_is_not_a_panic() {
    let (mut peer, server) = raw_server(Config::default());
    let mut out = BytesMut::new();
    Encoder::new()
        .encode(&syn_stream(1, Headers::new().with("a", "b")), &mut out)
        .unwrap();
    peer.send_raw(&out[..out.len() - 3]).await;
    drop(peer);
    let err = within("server", 5, server.closed()).await.unwrap_err();
    let Error::Closed(cause) = err else {
        panic!("{err}")
    };
    assert!(matches!(*cause, Error::PeerClosed), "{cause}");
}

#[tokio::test]
async fn forbidden_headers_are_refused_before_sending() {
    let (client, server) = pair(Config::default(), Config::default());
    let err = client
        .open(Headers::new().with("Connection", "close"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::HeaderNotAllowed { .. }), "{err}");
    let opener = tokio::spawn({
        let client = client.clone();
        async move { client.open(Headers::new()).await.map(|s| s.id()) }
    });
    let incoming = server.accept().await.unwrap();
    let incoming_id = incoming.id();
    // Dropping the unanswered stream refuses it.
    drop(incoming);
    match within("open", 5, opener).await.unwrap() {
        Err(Error::ResetByPeer { id, status }) => {
            assert_eq!(id, incoming_id);
            assert_eq!(status, RstStatus::REFUSED_STREAM);
        }
        other => panic!("{other:?}"),
    }
}

fn _assert_stream_is_io<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static>() {}
const _: fn() = _assert_stream_is_io::<Stream>;

#[tokio::test]
async fn dropping_a_stream_after_its_fin_keeps_what_the_peer_has_not_read() {
    let (client, server) = pair(Config::default(), Config::default());
    let serving = tokio::spawn(async move {
        let incoming = server.accept().await.unwrap();
        let mut stream = incoming.reply(Headers::new()).unwrap();
        stream.write_all(&pattern(30_000, 7)).await.unwrap();
        stream.shutdown().await.unwrap();
        // Dropped while the client has not finished its side (and not read a byte yet).
        drop(stream);
        server
    });
    let mut stream = within("open", 5, client.open(Headers::new()))
        .await
        .unwrap();
    let server = within("serve", 5, serving).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut got = Vec::new();
    within("read", 5, stream.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, pattern(30_000, 7));
    // Writing on after the peer forgot the stream does no harm to the session.
    let _ = stream.write_all(b"late").await;
    let (other, accepted) = within("another stream", 5, async {
        tokio::join!(client.open(Headers::new()), async {
            server
                .accept()
                .await
                .unwrap()
                .reply(Headers::new())
                .unwrap()
        })
    })
    .await;
    let mut other = other.unwrap();
    drop(accepted);
    let _ = other.shutdown().await;
}
