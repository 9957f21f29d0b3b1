//! An open WebSocket: the reader (in the caller's task) and the writer task.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::debug;

use super::frame::{self, MAX_CONTROL_PAYLOAD, MAX_HEADER, OpCode, Violation, violation};
use super::{CloseFrame, Config, Error, Message, Role, close_code};

/// Least and most buffer space offered to one read of the stream.
const READ_MIN: usize = 8 << 10;
const READ_MAX: usize = 256 << 10;

/// An open WebSocket connection over `S`.
///
/// Send with [`send`](Self::send) (or a [`WsWriter`] from [`writer`](Self::writer)), receive
/// with [`recv`](Self::recv), or [`split`](Self::split) it for two tasks. See the module docs for
/// how writing and closing work.
pub struct WebSocket<S> {
    reader: WsReader<S>,
    writer: WsWriter,
}

/// The receiving half of a [`WebSocket`].
///
/// Pings are answered by the writer task even while nobody holds a [`WsWriter`]; dropping the
/// reader stops that.
pub struct WsReader<S> {
    io: ReadHalf<S>,
    buf: BytesMut,
    role: Role,
    max_message_size: usize,
    idle_timeout: Option<Duration>,
    /// The data message being reassembled from its fragments.
    partial: Option<(OpCode, BytesMut)>,
    /// No more messages: a Close was received or the connection failed.
    done: bool,
    shared: Arc<Shared>,
}

/// The sending half of a [`WebSocket`]; clones send over the same connection.
#[derive(Clone)]
pub struct WsWriter {
    tx: mpsc::Sender<Command>,
}

struct Command {
    msg: Message,
    done: oneshot::Sender<Result<(), Error>>,
}

/// What the reader hands to the writer task, and what the two know of each other.
struct Shared {
    state: Mutex<SharedState>,
    /// Wakes the writer task when `state` has something for it.
    wake: Notify,
    /// Set when the connection is dead: the writer task drops whatever it is writing and ends.
    abort: watch::Sender<bool>,
}

#[derive(Default)]
struct SharedState {
    /// Payload of the latest ping not yet answered.
    pong: Option<Bytes>,
    /// A Close to send (a reply, or the answer to a protocol breach), then end.
    close: Option<Option<CloseFrame>>,
    /// A Close frame was (or is being) written; nothing more may be sent.
    close_sent: bool,
    reader_gone: bool,
}

enum Control {
    Close(Option<CloseFrame>),
    Pong(Bytes),
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, SharedState> {
        // The state stays consistent under every panic point (plain field stores).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue_pong(&self, payload: Bytes) {
        self.state().pong = Some(payload);
        self.wake.notify_one();
    }

    /// Queues a Close unless one was sent already.
    fn queue_close(&self, frame: Option<CloseFrame>) {
        {
            let mut s = self.state();
            if s.close_sent || s.close.is_some() {
                return;
            }
            s.close = Some(frame);
        }
        self.wake.notify_one();
    }

    fn fail(&self) {
        self.abort.send_replace(true);
    }

    fn take_control(&self) -> Option<Control> {
        let mut s = self.state();
        if let Some(frame) = s.close.take() {
            s.close_sent = true;
            s.pong = None;
            return Some(Control::Close(frame));
        }
        s.pong.take().map(Control::Pong)
    }
}

impl<S> WebSocket<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// Wraps a stream on which the handshake is done, as `role`. `leftover` holds bytes already
    /// read from the stream past the handshake (they are the start of the first frame).
    ///
    /// Spawns the connection's writer task, so it must be called within a Tokio runtime.
    pub fn from_upgraded(io: S, role: Role, config: Config, leftover: Bytes) -> Self {
        let (rd, wr) = tokio::io::split(io);
        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState::default()),
            wake: Notify::new(),
            abort: watch::Sender::new(false),
        });
        let (tx, rx) = mpsc::channel(1);
        let out = Output {
            io: wr,
            buf: BytesMut::new(),
            role,
            abort: shared.abort.subscribe(),
        };
        tokio::spawn(write_loop(out, rx, Arc::clone(&shared), config.clone()));
        Self {
            reader: WsReader {
                io: rd,
                buf: BytesMut::from(&leftover[..]),
                role,
                max_message_size: config.max_message_size,
                idle_timeout: config.idle_timeout,
                partial: None,
                done: false,
                shared,
            },
            writer: WsWriter { tx },
        }
    }
}

impl<S: AsyncRead> WebSocket<S> {
    /// Receives the next message; see [`WsReader::recv`].
    pub async fn recv(&mut self) -> Result<Option<Message>, Error> {
        self.reader.recv().await
    }

    /// Sends a message; see [`WsWriter::send`].
    pub async fn send(&self, msg: Message) -> Result<(), Error> {
        self.writer.send(msg).await
    }

    /// Sends a Close frame; see [`WsWriter::close`].
    pub async fn close(&self, code: u16, reason: &str) -> Result<(), Error> {
        self.writer.close(code, reason).await
    }

    /// A sender over this connection.
    pub fn writer(&self) -> WsWriter {
        self.writer.clone()
    }

    /// Splits into the receiving and the sending half.
    pub fn split(self) -> (WsReader<S>, WsWriter) {
        (self.reader, self.writer)
    }
}

impl<S: AsyncRead> WsReader<S> {
    /// Receives the next message, answering pings and closes on the way.
    ///
    /// `Ok(None)` once the connection is over: after a [`Message::Close`] or an error was
    /// returned. Text is checked to be UTF-8; fragments are reassembled; pings and pongs are
    /// returned too (a ping is already answered). Cancel-safe: a dropped `recv` loses nothing.
    pub async fn recv(&mut self) -> Result<Option<Message>, Error> {
        if self.done {
            return Ok(None);
        }
        match self.next_message().await {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => {
                self.done = true;
                self.partial = None;
                match &e {
                    Error::Protocol { code, reason } => {
                        debug!(code, reason = %reason, "websocket peer broke the protocol");
                        self.shared.queue_close(Some(CloseFrame {
                            code: *code,
                            reason: reason.clone(),
                        }));
                    }
                    _ => self.shared.fail(),
                }
                Err(e)
            }
        }
    }

    async fn next_message(&mut self) -> Result<Message, Error> {
        loop {
            let (header, payload) = self.next_frame().await?;
            match header.opcode {
                OpCode::Ping => {
                    let payload = payload.freeze();
                    self.shared.queue_pong(payload.clone());
                    return Ok(Message::Ping(payload));
                }
                OpCode::Pong => return Ok(Message::Pong(payload.freeze())),
                OpCode::Close => {
                    let frame = frame::parse_close(&payload)?;
                    self.done = true;
                    self.partial = None;
                    // Echo the code, without the reason, as gorilla/websocket does.
                    self.shared.queue_close(frame.as_ref().map(|f| CloseFrame {
                        code: f.code,
                        reason: String::new(),
                    }));
                    return Ok(Message::Close(frame));
                }
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Err(violation(
                            close_code::PROTOCOL_ERROR,
                            "new data frame inside a fragmented message",
                        )
                        .into());
                    }
                    if header.fin {
                        return finish(header.opcode, payload);
                    }
                    self.partial = Some((header.opcode, payload));
                }
                OpCode::Continuation => {
                    let Some((opcode, mut whole)) = self.partial.take() else {
                        return Err(violation(
                            close_code::PROTOCOL_ERROR,
                            "continuation frame without a message to continue",
                        )
                        .into());
                    };
                    whole.extend_from_slice(&payload);
                    if header.fin {
                        return finish(opcode, whole);
                    }
                    self.partial = Some((opcode, whole));
                }
            }
        }
    }

    /// Reads one whole frame, unmasked.
    async fn next_frame(&mut self) -> Result<(frame::Header, BytesMut), Error> {
        loop {
            let missing = match frame::parse_header(&self.buf)? {
                Some(header) => {
                    let len = self.check(&header)?;
                    if self.buf.len() >= header.size + len {
                        self.buf.advance(header.size);
                        let mut payload = self.buf.split_to(len);
                        if let Some(key) = header.mask {
                            frame::apply_mask(&mut payload, key);
                        }
                        return Ok((header, payload));
                    }
                    header.size + len - self.buf.len()
                }
                None => MAX_HEADER,
            };
            // Room for what the frame still lacks, capped, so a claimed length is never
            // allocated before the bytes arrive.
            self.buf.reserve(missing.clamp(READ_MIN, READ_MAX));
            let read = self.io.read_buf(&mut self.buf);
            let n = match self.idle_timeout {
                Some(limit) => tokio::time::timeout(limit, read)
                    .await
                    .map_err(|_| Error::IdleTimeout(limit))?,
                None => read.await,
            }
            .map_err(|source| Error::Io { op: "read", source })?;
            if n == 0 {
                return Err(Error::AbnormalClosure);
            }
        }
    }

    /// Checks masking and size of a frame against role and limits; returns its length.
    fn check(&self, header: &frame::Header) -> Result<usize, Violation> {
        match (self.role, header.mask) {
            (Role::Server, None) => {
                return Err(violation(
                    close_code::PROTOCOL_ERROR,
                    "unmasked frame from a client",
                ));
            }
            (Role::Client, Some(_)) => {
                return Err(violation(
                    close_code::PROTOCOL_ERROR,
                    "masked frame from a server",
                ));
            }
            _ => {}
        }
        let so_far = match (header.opcode, &self.partial) {
            (OpCode::Continuation, Some((_, whole))) => whole.len() as u64,
            _ => 0,
        };
        let limit = self.max_message_size as u64;
        match so_far.checked_add(header.len) {
            Some(total) if total <= limit => Ok(header.len as usize),
            _ => Err(violation(
                close_code::MESSAGE_TOO_BIG,
                format!(
                    "message of at least {} bytes exceeds the limit of {limit}",
                    so_far.saturating_add(header.len)
                ),
            )),
        }
    }
}

fn finish(opcode: OpCode, payload: BytesMut) -> Result<Message, Error> {
    if opcode == OpCode::Text {
        let text = String::from_utf8(Vec::from(payload)).map_err(|_| {
            Error::from(violation(
                close_code::INVALID_PAYLOAD,
                "text message is not valid UTF-8",
            ))
        })?;
        Ok(Message::Text(text))
    } else {
        Ok(Message::Binary(payload.freeze()))
    }
}

impl<S> Drop for WsReader<S> {
    fn drop(&mut self) {
        self.shared.state().reader_gone = true;
        self.shared.wake.notify_one();
    }
}

impl WsWriter {
    /// Sends `msg` and returns once it is written to the stream (back-pressure: a peer that does
    /// not read makes this wait). [`Error::Closed`] after a Close was sent or the connection
    /// failed; [`Error::Io`] when the write itself failed.
    ///
    /// Not cancel-safe: a `send` dropped midway may still send its message, or part of it.
    pub async fn send(&self, msg: Message) -> Result<(), Error> {
        let (done, result) = oneshot::channel();
        self.tx
            .send(Command { msg, done })
            .await
            .map_err(|_| Error::Closed)?;
        result.await.map_err(|_| Error::Closed)?
    }

    /// Sends a Close frame with `code` and `reason` and shuts the write side down; the peer's
    /// Close still arrives through the reader.
    pub async fn close(&self, code: u16, reason: &str) -> Result<(), Error> {
        self.send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.to_owned(),
        })))
        .await
    }
}

/// The write half and what writing needs.
struct Output<W> {
    io: W,
    buf: BytesMut,
    role: Role,
    abort: watch::Receiver<bool>,
}

impl<W: AsyncWrite + Unpin> Output<W> {
    /// Writes one frame and flushes it; fails at once when the connection is aborted.
    async fn frame(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) -> std::io::Result<()> {
        let Self {
            io,
            buf,
            role,
            abort,
        } = self;
        buf.clear();
        let mask = match role {
            Role::Client => Some(rand::random::<[u8; 4]>()),
            Role::Server => None,
        };
        frame::encode_frame(buf, fin, opcode, payload, mask);
        let write = async {
            io.write_all(buf).await?;
            io.flush().await
        };
        tokio::select! {
            r = write => r,
            _ = aborted(abort) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "websocket connection failed",
            )),
        }
    }

    /// Writes a Close frame and shuts the write side down, giving up after `limit`.
    async fn close(&mut self, frame: Option<&CloseFrame>, limit: Duration) -> std::io::Result<()> {
        let payload = frame::close_payload(frame);
        let work = async {
            self.frame(true, OpCode::Close, &payload).await?;
            self.io.shutdown().await
        };
        tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "peer does not read the close frame",
            ))
        })
    }
}

/// The writer task: sends queued messages, pongs, pings and closes until the connection ends.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut out: Output<W>,
    mut rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    config: Config,
) {
    let mut pings = config.ping_interval.map(|period| {
        let mut t = tokio::time::interval_at(Instant::now() + period, period);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    });
    let mut rx_open = true;
    loop {
        match shared.take_control() {
            Some(Control::Close(frame)) => {
                if let Err(error) = out.close(frame.as_ref(), config.close_timeout).await {
                    debug!(%error, "websocket close frame not sent");
                }
                return;
            }
            Some(Control::Pong(payload)) => {
                if out.frame(true, OpCode::Pong, &payload).await.is_err() {
                    return;
                }
                continue;
            }
            None => {}
        }
        if !rx_open && shared.state().reader_gone {
            return;
        }
        tokio::select! {
            biased;
            _ = aborted(&mut out.abort) => return,
            _ = shared.wake.notified() => {}
            cmd = rx.recv(), if rx_open => match cmd {
                None => rx_open = false,
                Some(Command { msg, done }) => {
                    let (result, end) = write_message(&mut out, &shared, msg, &config).await;
                    let _ = done.send(result);
                    if end {
                        return;
                    }
                }
            },
            _ = tick(&mut pings) => {
                if out.frame(true, OpCode::Ping, &[]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Resolves once the connection is aborted.
async fn aborted(abort: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens with the connection.
    let _ = abort.wait_for(|dead| *dead).await;
}

async fn tick(pings: &mut Option<Interval>) {
    match pings {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Writes one message; the flag says whether the writer task must end.
async fn write_message<W: AsyncWrite + Unpin>(
    out: &mut Output<W>,
    shared: &Shared,
    msg: Message,
    config: &Config,
) -> (Result<(), Error>, bool) {
    let io_err = |source| {
        (
            Err(Error::Io {
                op: "write",
                source,
            }),
            true,
        )
    };
    match msg {
        Message::Text(text) => write_data(out, shared, OpCode::Text, text.as_bytes(), config).await,
        Message::Binary(data) => write_data(out, shared, OpCode::Binary, &data, config).await,
        Message::Ping(p) | Message::Pong(p) if p.len() > MAX_CONTROL_PAYLOAD => (
            Err(Error::InvalidMessage(format!(
                "control frame payload of {} bytes exceeds 125",
                p.len()
            ))),
            false,
        ),
        Message::Ping(p) => match out.frame(true, OpCode::Ping, &p).await {
            Ok(()) => (Ok(()), false),
            Err(e) => io_err(e),
        },
        Message::Pong(p) => match out.frame(true, OpCode::Pong, &p).await {
            Ok(()) => (Ok(()), false),
            Err(e) => io_err(e),
        },
        Message::Close(frame) => {
            if let Some(f) = &frame
                && !frame::is_valid_close_code(f.code)
            {
                return (
                    Err(Error::InvalidMessage(format!(
                        "close code {} may not be sent",
                        f.code
                    ))),
                    false,
                );
            }
            {
                let mut s = shared.state();
                if s.close_sent {
                    return (Err(Error::Closed), true);
                }
                s.close_sent = true;
                s.close = None;
            }
            match out.close(frame.as_ref(), config.close_timeout).await {
                Ok(()) => (Ok(()), true),
                Err(e) => io_err(e),
            }
        }
    }
}

/// Writes a data message as one or more frames, with pending pongs between them.
async fn write_data<W: AsyncWrite + Unpin>(
    out: &mut Output<W>,
    shared: &Shared,
    opcode: OpCode,
    payload: &[u8],
    config: &Config,
) -> (Result<(), Error>, bool) {
    let step = config.write_fragment_size.max(1);
    let mut start = 0;
    loop {
        // A Close waiting to go out ends the message here; the loop sends the Close next.
        let pong = {
            let mut s = shared.state();
            if s.close.is_some() || s.close_sent {
                return (Err(Error::Closed), false);
            }
            s.pong.take()
        };
        if let Some(p) = pong
            && let Err(source) = out.frame(true, OpCode::Pong, &p).await
        {
            return (
                Err(Error::Io {
                    op: "write",
                    source,
                }),
                true,
            );
        }
        let end = payload.len().min(start + step);
        let fin = end == payload.len();
        let op = if start == 0 {
            opcode
        } else {
            OpCode::Continuation
        };
        if let Err(source) = out.frame(fin, op, &payload[start..end]).await {
            return (
                Err(Error::Io {
                    op: "write",
                    source,
                }),
                true,
            );
        }
        if fin {
            return (Ok(()), false);
        }
        start = end;
    }
}
