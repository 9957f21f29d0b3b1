//! SPDY/3.1 sessions: streams multiplexed over one connection, both roles.
//!
//! A [`Session`] owns two tasks: a reader that decodes frames and updates the shared state, and
//! a writer that drains one FIFO queue of outgoing frames (so a stream's frames keep their
//! order: SYN_STREAM or SYN_REPLY, DATA, FIN, RST). Application handles ([`Stream`],
//! [`IncomingStream`]) only touch the shared state under a short lock and wake the tasks.
//!
//! Flow control, and why it is lenient: moby/spdystream, the SPDY implementation of kubectl,
//! kubelet and crictl, does no flow control at all: it never sends SETTINGS or WINDOW_UPDATE,
//! ignores both, and writes each `Write` as one DATA frame; its back-pressure is TCP's. So:
//! - we honour the peer's per-stream windows only once it has shown that it does flow control
//!   (a SETTINGS with INITIAL_WINDOW_SIZE, or any stream WINDOW_UPDATE), and the SPDY/3.1
//!   session window only once it sent a WINDOW_UPDATE for stream 0. A peer that never does
//!   gets unlimited writes, bounded by our writer queue and TCP, and never a deadlock;
//! - we announce our window with SETTINGS, open the session window wide (memory is bounded per
//!   stream) and send WINDOW_UPDATEs as the application reads. When a peer that ignores the
//!   window overruns a stream's buffer, the reader stops reading the connection until the
//!   application drains that stream: at most a window plus one frame is buffered per stream,
//!   and the overrun is tolerated, not punished.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use super::error::{Error, Result};
use super::frame::{
    Decoder, Encoder, Frame, GoAwayStatus, Headers, MAX_STREAM_ID, MAX_WINDOW, RstStatus,
    SETTINGS_INITIAL_WINDOW_SIZE, Setting,
};

/// The window SPDY/3 assumes before any SETTINGS, and SPDY/3.1's initial session window.
const SPDY_DEFAULT_WINDOW: u32 = 64 * 1024;
/// Largest DATA payload we send in one frame.
const MAX_DATA_FRAME: usize = 16 * 1024;
/// Bytes of DATA queued for (or being written by) the writer before writers wait.
const MAX_QUEUED_DATA: usize = 256 * 1024;
/// Control frames queued in answer to the peer (PING echoes, refusals) before we give up on a
/// peer that sends but does not read.
const MAX_QUEUED_CONTROL: usize = 1024;
/// Most open streams per connection (each may buffer a window).
const MAX_STREAMS: usize = 1024;
/// Consumed bytes after which we return session window credit to the peer.
const SESSION_CREDIT_THRESHOLD: u64 = 1024 * 1024;
/// Bytes the writer puts into one write call.
const WRITE_BATCH: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// How long the last frames (GOAWAY) may take to write, and how long we keep reading after our
/// side closed, so that closing does not turn into a TCP reset that eats the peer's last bytes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of a session.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Receive window per stream, in bytes (1 to 2^31-1), announced to the peer with SETTINGS.
    /// At most this much is buffered per stream for a peer that honours flow control; for one
    /// that does not (moby/spdystream), the window plus one DATA frame.
    pub initial_window: u32,
    /// Close the connection when no frame went either way (and the application consumed no
    /// data) for this long; `None`: never.
    pub idle_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            initial_window: SPDY_DEFAULT_WINDOW,
            idle_timeout: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

impl Role {
    /// Parity of the stream and ping ids this side initiates: odd for the client.
    fn parity(self) -> u32 {
        match self {
            Role::Client => 1,
            Role::Server => 0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Reset {
    Local(RstStatus),
    Remote(RstStatus),
}

impl Reset {
    fn error(self, id: u32) -> Error {
        match self {
            Reset::Local(status) => Error::ResetLocally { id, status },
            Reset::Remote(status) => Error::ResetByPeer { id, status },
        }
    }
}

struct StreamState {
    recv_buf: VecDeque<Bytes>,
    recv_buffered: usize,
    /// Bytes the application read that we have not yet returned to the peer's window.
    recv_unacked: usize,
    remote_fin: bool,
    send_window: i64,
    local_fin: bool,
    /// Bytes of this stream's DATA queued for or being written by the writer.
    queued: usize,
    reset: Option<Reset>,
    /// The pending `open()` waiting for SYN_REPLY.
    reply: Option<oneshot::Sender<Result<Headers>>>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    flush_waker: Option<Waker>,
}

impl StreamState {
    fn new(send_window: u32) -> Self {
        Self {
            recv_buf: VecDeque::new(),
            recv_buffered: 0,
            recv_unacked: 0,
            remote_fin: false,
            send_window: i64::from(send_window),
            local_fin: false,
            queued: 0,
            reset: None,
            reply: None,
            read_waker: None,
            write_waker: None,
            flush_waker: None,
        }
    }

    /// Both directions are over: the stream does not keep the session alive any more.
    fn done(&self) -> bool {
        self.reset.is_some() || (self.local_fin && self.remote_fin)
    }

    fn wake_all(&mut self) {
        for waker in [
            self.read_waker.take(),
            self.write_waker.take(),
            self.flush_waker.take(),
        ]
        .into_iter()
        .flatten()
        {
            waker.wake();
        }
    }
}

struct State {
    role: Role,
    /// Our receive window per stream.
    window: u32,
    idle_timeout: Option<Duration>,
    streams: HashMap<u32, StreamState>,
    /// Peer-initiated streams not yet accepted.
    incoming: VecDeque<(u32, Headers)>,
    next_local_id: u32,
    last_peer_id: u32,
    out: VecDeque<Frame>,
    out_data: usize,
    out_control: usize,
    blocked_writers: Vec<Waker>,
    peer_initial_window: u32,
    enforce_stream_windows: bool,
    session_send_window: i64,
    enforce_session_window: bool,
    session_unacked: u64,
    next_ping_id: u32,
    pings: HashMap<u32, oneshot::Sender<()>>,
    goaway_sent: bool,
    goaway_received: Option<u32>,
    /// GOAWAY is in effect and all streams are done: the writer drains and closes.
    finishing: bool,
    /// The writer has stopped; nothing more can be sent.
    write_closed: bool,
    dead: Option<Arc<Error>>,
    graceful: bool,
    /// Live `Session` handles; none left means no stream can be opened or accepted any more.
    sessions: usize,
    tasks: usize,
    last_activity: Instant,
    reader_paused: bool,
}

struct Shared {
    state: Mutex<State>,
    writer_wake: Notify,
    reader_wake: Notify,
    accept_wake: Notify,
    /// Set to true to stop both tasks at once.
    abort: watch::Sender<bool>,
    /// Set to true when both tasks have ended.
    done: watch::Sender<bool>,
}

fn io_error(kind: io::ErrorKind, error: Error) -> io::Error {
    io::Error::new(kind, error)
}

fn closed_io(cause: &Arc<Error>) -> io::Error {
    io_error(
        io::ErrorKind::ConnectionAborted,
        Error::Closed(Arc::clone(cause)),
    )
}

fn register(wakers: &mut Vec<Waker>, waker: &Waker) {
    if !wakers.iter().any(|w| w.will_wake(waker)) {
        wakers.push(waker.clone());
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame for the writer; dropped once nothing can be written any more.
    fn queue(&self, st: &mut State, frame: Frame) {
        if st.dead.is_some() || st.write_closed {
            return;
        }
        match &frame {
            Frame::Data { data, .. } => st.out_data += data.len(),
            _ => st.out_control += 1,
        }
        st.out.push_back(frame);
        self.writer_wake.notify_one();
    }

    /// Queues a control frame the peer provoked, refusing to buffer without bound for a peer
    /// that does not read.
    fn queue_for_peer(&self, st: &mut State, frame: Frame) -> Result<()> {
        if st.out_control >= MAX_QUEUED_CONTROL {
            return Err(Error::PeerNotReading);
        }
        self.queue(st, frame);
        Ok(())
    }

    fn credit_session(&self, st: &mut State, n: usize) {
        st.session_unacked += n as u64;
        if st.session_unacked >= SESSION_CREDIT_THRESHOLD {
            let delta = st.session_unacked.min(u64::from(MAX_WINDOW));
            st.session_unacked -= delta;
            // delta is at most MAX_WINDOW.
            self.queue(
                st,
                Frame::WindowUpdate {
                    stream_id: 0,
                    delta: delta as u32,
                },
            );
        }
    }

    fn wake_writers(&self, st: &mut State) {
        for waker in st.blocked_writers.drain(..) {
            waker.wake();
        }
    }

    /// Marks a stream reset: buffered data is dropped, pending operations fail, and its queued
    /// DATA is not sent.
    fn reset_stream(&self, st: &mut State, id: u32, reset: Reset) {
        let Some(s) = st.streams.get_mut(&id) else {
            return;
        };
        if s.reset.is_some() {
            return;
        }
        s.reset = Some(reset);
        s.recv_buf.clear();
        let buffered = std::mem::take(&mut s.recv_buffered);
        s.queued = 0;
        if let Some(reply) = s.reply.take() {
            let _ = reply.send(Err(reset.error(id)));
        }
        s.wake_all();
        self.credit_session(st, buffered);
        let mut purged = 0;
        st.out.retain(|frame| match frame {
            Frame::Data {
                stream_id, data, ..
            } if *stream_id == id => {
                purged += data.len();
                false
            }
            _ => true,
        });
        st.out_data = st.out_data.saturating_sub(purged);
        self.wake_writers(st);
        // Nobody holds a not yet accepted stream: forget it.
        if let Some(pos) = st.incoming.iter().position(|(i, _)| *i == id) {
            st.incoming.remove(pos);
            st.streams.remove(&id);
        }
        if st.reader_paused {
            self.reader_wake.notify_one();
        }
    }

    /// Ends the connection: pending and future operations fail with `cause` (unless
    /// `graceful`), both tasks stop; with `goaway`, the writer first sends a last GOAWAY.
    fn terminate(
        &self,
        st: &mut State,
        cause: Error,
        goaway: Option<GoAwayStatus>,
        graceful: bool,
    ) {
        if st.dead.is_some() {
            return;
        }
        tracing::debug!(role = ?st.role, error = %cause, "spdy connection ends");
        st.out.clear();
        st.out_data = 0;
        st.out_control = 0;
        let last_goaway = match goaway {
            Some(status) if !st.goaway_sent && !st.write_closed => {
                st.goaway_sent = true;
                st.out.push_back(Frame::GoAway {
                    last_good_stream_id: st.last_peer_id,
                    status,
                });
                true
            }
            _ => false,
        };
        st.dead = Some(Arc::new(cause));
        st.graceful = graceful;
        self.wake_everything(st);
        if !last_goaway {
            self.abort.send_replace(true);
        }
    }

    fn wake_everything(&self, st: &mut State) {
        for s in st.streams.values_mut() {
            s.reply.take();
            s.wake_all();
        }
        for (id, _) in std::mem::take(&mut st.incoming) {
            st.streams.remove(&id);
        }
        st.pings.clear();
        self.wake_writers(st);
        self.accept_wake.notify_waiters();
        self.reader_wake.notify_one();
        self.writer_wake.notify_one();
    }

    /// Starts the graceful close once GOAWAY is in effect (sent, received, or no session handle
    /// left) and no stream is active any more.
    fn maybe_finish(&self, st: &mut State) {
        if st.dead.is_some() || st.finishing {
            return;
        }
        if st.sessions == 0 {
            for (id, _) in std::mem::take(&mut st.incoming) {
                st.streams.remove(&id);
                self.queue(
                    st,
                    Frame::RstStream {
                        stream_id: id,
                        status: RstStatus::REFUSED_STREAM,
                    },
                );
            }
        }
        if !(st.goaway_sent || st.goaway_received.is_some() || st.sessions == 0) {
            return;
        }
        if st.streams.values().any(|s| !s.done()) {
            return;
        }
        st.finishing = true;
        if !st.goaway_sent && st.goaway_received.is_none() {
            st.goaway_sent = true;
            let last_good_stream_id = st.last_peer_id;
            self.queue(
                st,
                Frame::GoAway {
                    last_good_stream_id,
                    status: GoAwayStatus::OK,
                },
            );
        }
        self.writer_wake.notify_one();
        self.accept_wake.notify_waiters();
    }

    fn closed_error(&self) -> Error {
        let st = self.lock();
        match &st.dead {
            Some(cause) => Error::Closed(Arc::clone(cause)),
            None => Error::Closed(Arc::new(Error::Aborted)),
        }
    }

    fn idle_deadline(&self) -> Option<Instant> {
        let st = self.lock();
        st.idle_timeout.map(|t| st.last_activity + t)
    }

    fn check_idle(&self) -> Result<()> {
        let st = self.lock();
        match st.idle_timeout {
            Some(t) if st.last_activity.elapsed() >= t => Err(Error::IdleTimeout(t)),
            _ => Ok(()),
        }
    }

    fn task_done(&self) {
        let mut st = self.lock();
        st.tasks -= 1;
        if st.tasks == 0 {
            if st.dead.is_none() {
                st.dead = Some(Arc::new(Error::Aborted));
            }
            self.done.send_replace(true);
        }
    }

    /// Applies one received frame; returns the stream whose buffer the peer overran (the
    /// reader then waits until the application drains it).
    fn handle_frame(&self, frame: Frame) -> Result<Option<u32>> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.last_activity = Instant::now();
        if st.dead.is_some() || st.write_closed {
            return Ok(None);
        }
        let mut overrun = None;
        match frame {
            Frame::SynStream {
                stream_id,
                fin,
                unidirectional,
                headers,
                ..
            } => self.on_syn_stream(st, stream_id, fin, unidirectional, headers)?,
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            } => {
                // Like spdystream, a reply for an unknown or already answered stream is ignored.
                if let Some(s) = st.streams.get_mut(&stream_id)
                    && let Some(reply) = s.reply.take()
                {
                    let _ = reply.send(Ok(headers));
                    s.remote_fin |= fin;
                }
            }
            Frame::Headers { stream_id, fin, .. } => {
                if fin && let Some(s) = st.streams.get_mut(&stream_id) {
                    s.remote_fin = true;
                    s.wake_all();
                }
            }
            Frame::RstStream { stream_id, status } => {
                self.reset_stream(st, stream_id, Reset::Remote(status));
            }
            Frame::Settings { settings, .. } => {
                for setting in settings {
                    if setting.id == SETTINGS_INITIAL_WINDOW_SIZE {
                        self.on_initial_window(st, setting.value)?;
                    }
                }
            }
            Frame::Ping { id } => {
                if id % 2 == st.role.parity() {
                    if let Some(pong) = st.pings.remove(&id) {
                        let _ = pong.send(());
                    }
                } else {
                    self.queue_for_peer(st, Frame::Ping { id })?;
                }
            }
            Frame::GoAway {
                last_good_stream_id,
                ..
            } => self.on_goaway(st, last_good_stream_id),
            Frame::WindowUpdate { stream_id, delta } => {
                self.on_window_update(st, stream_id, delta)?;
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => overrun = self.on_data(st, stream_id, fin, data),
        }
        self.maybe_finish(st);
        Ok(overrun)
    }

    fn on_syn_stream(
        &self,
        st: &mut State,
        id: u32,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    ) -> Result<()> {
        if id % 2 == st.role.parity() {
            return Err(Error::Protocol("SYN_STREAM with a stream id of our parity"));
        }
        if id <= st.last_peer_id {
            return Err(Error::Protocol("SYN_STREAM stream id does not increase"));
        }
        st.last_peer_id = id;
        if st.goaway_sent || st.finishing || st.sessions == 0 || st.streams.len() >= MAX_STREAMS {
            tracing::debug!(stream_id = id, "spdy stream refused");
            return self.queue_for_peer(
                st,
                Frame::RstStream {
                    stream_id: id,
                    status: RstStatus::REFUSED_STREAM,
                },
            );
        }
        let mut s = StreamState::new(st.peer_initial_window);
        s.remote_fin = fin;
        s.local_fin = unidirectional;
        st.streams.insert(id, s);
        st.incoming.push_back((id, headers));
        self.accept_wake.notify_one();
        Ok(())
    }

    fn on_initial_window(&self, st: &mut State, value: u32) -> Result<()> {
        if value > MAX_WINDOW {
            return Err(Error::Protocol("initial window beyond 2^31-1"));
        }
        let delta = i64::from(value) - i64::from(st.peer_initial_window);
        st.peer_initial_window = value;
        st.enforce_stream_windows = true;
        for s in st.streams.values_mut() {
            s.send_window += delta;
            if let Some(waker) = s.write_waker.take() {
                waker.wake();
            }
        }
        Ok(())
    }

    fn on_goaway(&self, st: &mut State, last_good: u32) {
        if st.goaway_received.is_some() {
            return;
        }
        st.goaway_received = Some(last_good);
        let parity = st.role.parity();
        let unseen: Vec<u32> = st
            .streams
            .keys()
            .copied()
            .filter(|id| id % 2 == parity && *id > last_good)
            .collect();
        for id in unseen {
            if let Some(reply) = st.streams.get_mut(&id).and_then(|s| s.reply.take()) {
                let _ = reply.send(Err(Error::GoneAway));
            }
            self.reset_stream(st, id, Reset::Remote(RstStatus::REFUSED_STREAM));
        }
        self.accept_wake.notify_waiters();
    }

    fn on_window_update(&self, st: &mut State, id: u32, delta: u32) -> Result<()> {
        if delta == 0 {
            return Ok(());
        }
        if id == 0 {
            st.enforce_session_window = true;
            st.session_send_window += i64::from(delta);
            if st.session_send_window > i64::from(MAX_WINDOW) {
                return Err(Error::Protocol("session window beyond 2^31-1"));
            }
            self.wake_writers(st);
            return Ok(());
        }
        st.enforce_stream_windows = true;
        let Some(s) = st.streams.get_mut(&id) else {
            return Ok(());
        };
        s.send_window += i64::from(delta);
        if let Some(waker) = s.write_waker.take() {
            waker.wake();
        }
        if s.send_window > i64::from(MAX_WINDOW) && s.reset.is_none() {
            let status = RstStatus::FLOW_CONTROL_ERROR;
            self.reset_stream(st, id, Reset::Local(status));
            self.queue_for_peer(
                st,
                Frame::RstStream {
                    stream_id: id,
                    status,
                },
            )?;
        }
        Ok(())
    }

    fn on_data(&self, st: &mut State, id: u32, fin: bool, data: Bytes) -> Option<u32> {
        let window = st.window as usize;
        let len = data.len();
        let Some(s) = st.streams.get_mut(&id) else {
            // A stream we dropped or reset: its data only returns session credit.
            self.credit_session(st, len);
            return None;
        };
        if s.reset.is_some() || s.remote_fin {
            self.credit_session(st, len);
            return None;
        }
        if len > 0 {
            s.recv_buffered += len;
            s.recv_buf.push_back(data);
        }
        if fin {
            s.remote_fin = true;
        }
        if let Some(waker) = s.read_waker.take() {
            waker.wake();
        }
        (s.recv_buffered > window).then_some(id)
    }
}

enum ReadEnd {
    /// Our side closed gracefully: keep reading a little so the close stays clean.
    Linger,
    /// Stop now.
    Stop,
    /// The peer closed the connection.
    Eof,
}

async fn run_reader<R: AsyncRead + Unpin>(shared: Arc<Shared>, mut io: R) {
    let mut abort = shared.abort.subscribe();
    match read_frames(&shared, &mut io, &mut abort).await {
        Ok(ReadEnd::Linger) => linger(&mut io, &mut abort).await,
        Ok(ReadEnd::Stop) => {}
        Ok(ReadEnd::Eof) => {
            let mut st = shared.lock();
            let graceful = st.finishing || st.goaway_sent || st.goaway_received.is_some();
            shared.terminate(&mut st, Error::PeerClosed, None, graceful);
        }
        Err(e) => {
            let goaway = match e {
                Error::Read(_) => None,
                Error::IdleTimeout(_) => Some(GoAwayStatus::OK),
                _ => Some(GoAwayStatus::PROTOCOL_ERROR),
            };
            let mut st = shared.lock();
            shared.terminate(&mut st, e, goaway, false);
        }
    }
    shared.task_done();
}

async fn read_frames<R: AsyncRead + Unpin>(
    shared: &Shared,
    io: &mut R,
    abort: &mut watch::Receiver<bool>,
) -> Result<ReadEnd> {
    let mut decoder = Decoder::new();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        while let Some(frame) = decoder.decode(&mut buf)? {
            if let Some(id) = shared.handle_frame(frame)?
                && !wait_for_room(shared, id, abort).await?
            {
                return Ok(ReadEnd::Stop);
            }
        }
        {
            let st = shared.lock();
            if st.write_closed {
                return Ok(ReadEnd::Linger);
            }
            if st.dead.is_some() || *abort.borrow() {
                return Ok(ReadEnd::Stop);
            }
        }
        let idle = shared.idle_deadline();
        buf.reserve(READ_CHUNK);
        tokio::select! {
            read = io.read_buf(&mut buf) => match read {
                Ok(0) => return Ok(ReadEnd::Eof),
                Ok(_) => {}
                Err(e) => return Err(Error::Read(e)),
            },
            () = sleep_until(idle) => shared.check_idle()?,
            _ = abort.changed() => return Ok(ReadEnd::Stop),
            () = shared.reader_wake.notified() => {}
        }
    }
}

/// Waits until the application drained the overrun stream to within its window; false when
/// the connection ended meanwhile.
async fn wait_for_room(
    shared: &Shared,
    id: u32,
    abort: &mut watch::Receiver<bool>,
) -> Result<bool> {
    loop {
        let notified = shared.reader_wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut st = shared.lock();
            if st.dead.is_some() {
                return Ok(false);
            }
            let window = st.window as usize;
            let overrun = st
                .streams
                .get(&id)
                .is_some_and(|s| s.reset.is_none() && s.recv_buffered > window);
            st.reader_paused = overrun;
            if !overrun {
                return Ok(true);
            }
        }
        let idle = shared.idle_deadline();
        tokio::select! {
            () = notified => {}
            () = sleep_until(idle) => shared.check_idle()?,
            _ = abort.changed() => return Ok(false),
        }
    }
}

async fn linger<R: AsyncRead + Unpin>(io: &mut R, abort: &mut watch::Receiver<bool>) {
    let mut scratch = vec![0u8; READ_CHUNK];
    let drain = async {
        loop {
            tokio::select! {
                read = io.read(&mut scratch) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = abort.changed() => return,
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
}

enum WriteEnd {
    /// GOAWAY was sent and all streams are done: close our side cleanly.
    Finished,
    /// The connection ended (possibly after a last GOAWAY was written).
    Stopped,
}

async fn run_writer<W: AsyncWrite + Unpin>(shared: Arc<Shared>, mut io: W) {
    let mut abort = shared.abort.subscribe();
    let end = write_frames(&shared, &mut io, &mut abort).await;
    match end {
        Ok(WriteEnd::Finished) => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, io.shutdown()).await;
            let mut st = shared.lock();
            st.write_closed = true;
            if st.dead.is_none() {
                tracing::debug!(role = ?st.role, "spdy connection finished");
                st.dead = Some(Arc::new(Error::Finished));
                st.graceful = true;
                shared.wake_everything(&mut st);
            }
            shared.reader_wake.notify_one();
        }
        Ok(WriteEnd::Stopped) => {
            if !*abort.borrow() {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, io.shutdown()).await;
            }
            shared.lock().write_closed = true;
        }
        Err(e) => {
            let mut st = shared.lock();
            st.write_closed = true;
            shared.terminate(&mut st, e, None, false);
        }
    }
    shared.task_done();
}

async fn write_frames<W: AsyncWrite + Unpin>(
    shared: &Shared,
    io: &mut W,
    abort: &mut watch::Receiver<bool>,
) -> Result<WriteEnd> {
    let mut encoder = Encoder::new();
    let mut buf = BytesMut::with_capacity(WRITE_BATCH + MAX_DATA_FRAME);
    let mut written: Vec<(u32, usize)> = Vec::new();
    loop {
        let (frames, last) = {
            let mut st = shared.lock();
            if st.out.is_empty() {
                if st.dead.is_some() {
                    return Ok(WriteEnd::Stopped);
                }
                if st.finishing {
                    return Ok(WriteEnd::Finished);
                }
                (Vec::new(), false)
            } else {
                let mut frames = Vec::new();
                let mut bytes = 0;
                while bytes < WRITE_BATCH {
                    let Some(frame) = st.out.pop_front() else {
                        break;
                    };
                    match &frame {
                        Frame::Data { data, .. } => bytes += 8 + data.len(),
                        _ => {
                            bytes += 64;
                            st.out_control = st.out_control.saturating_sub(1);
                        }
                    }
                    frames.push(frame);
                }
                (frames, st.dead.is_some())
            }
        };
        if frames.is_empty() {
            tokio::select! {
                () = shared.writer_wake.notified() => {}
                _ = abort.changed() => return Ok(WriteEnd::Stopped),
            }
            continue;
        }
        buf.clear();
        written.clear();
        for frame in &frames {
            if let Frame::Data {
                stream_id, data, ..
            } = frame
            {
                written.push((*stream_id, data.len()));
            }
            encoder.encode(frame, &mut buf)?;
        }
        let write = async {
            io.write_all(&buf).await?;
            io.flush().await
        };
        let result = if last {
            // The last GOAWAY after a fatal error: bounded, since the peer may not read.
            tokio::time::timeout(CLOSE_TIMEOUT, write)
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
        } else {
            tokio::select! {
                result = write => result,
                _ = abort.changed() => return Ok(WriteEnd::Stopped),
            }
        };
        result.map_err(Error::Write)?;
        let mut guard = shared.lock();
        let st = &mut *guard;
        st.last_activity = Instant::now();
        for &(id, n) in &written {
            st.out_data = st.out_data.saturating_sub(n);
            if let Some(s) = st.streams.get_mut(&id) {
                s.queued = s.queued.saturating_sub(n);
                if s.queued == 0
                    && let Some(waker) = s.flush_waker.take()
                {
                    waker.wake();
                }
            }
        }
        shared.wake_writers(st);
    }
}

/// A SPDY/3.1 session over one connection (after the HTTP `Upgrade: SPDY/3.1` exchange, or
/// any byte stream).
///
/// Cloning gives another handle to the same session. When the last handle is dropped, no
/// stream can be opened or accepted any more: the session sends GOAWAY and closes once its
/// streams are done. Both tasks end when the connection ends, whatever the peer does.
pub struct Session {
    shared: Arc<Shared>,
}

impl Session {
    /// Starts the server side of a session on `io`: it accepts client streams (odd ids).
    /// Must be called within a Tokio runtime (it spawns the session's reader and writer).
    pub fn server<T>(io: T, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Self::start(io, config, Role::Server)
    }

    /// Starts the client side of a session on `io`: it opens streams with odd ids.
    /// Must be called within a Tokio runtime.
    pub fn client<T>(io: T, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Self::start(io, config, Role::Client)
    }

    fn start<T>(io: T, config: Config, role: Role) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let window = config.initial_window.clamp(1, MAX_WINDOW);
        let mut state = State {
            role,
            window,
            idle_timeout: config.idle_timeout,
            streams: HashMap::new(),
            incoming: VecDeque::new(),
            next_local_id: if role == Role::Client { 1 } else { 2 },
            last_peer_id: 0,
            out: VecDeque::new(),
            out_data: 0,
            out_control: 0,
            blocked_writers: Vec::new(),
            peer_initial_window: SPDY_DEFAULT_WINDOW,
            enforce_stream_windows: false,
            session_send_window: i64::from(SPDY_DEFAULT_WINDOW),
            enforce_session_window: false,
            session_unacked: 0,
            next_ping_id: if role == Role::Client { 1 } else { 2 },
            pings: HashMap::new(),
            goaway_sent: false,
            goaway_received: None,
            finishing: false,
            write_closed: false,
            dead: None,
            graceful: false,
            sessions: 1,
            tasks: 2,
            last_activity: Instant::now(),
            reader_paused: false,
        };
        // Our window, which also tells the peer that we do flow control; then the SPDY/3.1
        // session window opened wide, since memory is bounded per stream. spdystream parses
        // and ignores both.
        state.out.push_back(Frame::Settings {
            clear: false,
            settings: vec![Setting {
                flags: 0,
                id: SETTINGS_INITIAL_WINDOW_SIZE,
                value: window,
            }],
        });
        state.out.push_back(Frame::WindowUpdate {
            stream_id: 0,
            delta: MAX_WINDOW - SPDY_DEFAULT_WINDOW,
        });
        state.out_control = 2;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            writer_wake: Notify::new(),
            reader_wake: Notify::new(),
            accept_wake: Notify::new(),
            abort: watch::channel(false).0,
            done: watch::channel(false).0,
        });
        let (reader, writer) = tokio::io::split(io);
        tokio::spawn(run_reader(Arc::clone(&shared), reader));
        tokio::spawn(run_writer(Arc::clone(&shared), writer));
        Session { shared }
    }

    /// The next stream the peer opened; `None` once no more can come (the connection ended,
    /// or GOAWAY was sent or received and the already announced streams were taken).
    pub async fn accept(&self) -> Option<IncomingStream> {
        loop {
            let notified = self.shared.accept_wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.shared.lock();
                if let Some((id, headers)) = st.incoming.pop_front() {
                    return Some(IncomingStream {
                        handle: StreamHandle {
                            id,
                            shared: Arc::clone(&self.shared),
                            drop_status: RstStatus::REFUSED_STREAM,
                        },
                        headers,
                    });
                }
                if st.dead.is_some()
                    || st.finishing
                    || st.goaway_sent
                    || st.goaway_received.is_some()
                {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Opens a stream with `headers` (SYN_STREAM) and waits for the peer's SYN_REPLY; the
    /// returned stream's [`Stream::headers`] are the reply's. Fails when the peer resets the
    /// stream instead, after GOAWAY, or when the connection ends.
    pub async fn open(&self, headers: Headers) -> Result<Stream> {
        headers.validate()?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let handle = {
            let mut guard = self.shared.lock();
            let st = &mut *guard;
            if let Some(cause) = &st.dead {
                return Err(Error::Closed(Arc::clone(cause)));
            }
            if st.goaway_received.is_some() {
                return Err(Error::GoneAway);
            }
            if st.goaway_sent || st.finishing {
                return Err(Error::GoingAway);
            }
            let id = st.next_local_id;
            if id > MAX_STREAM_ID {
                return Err(Error::StreamIdsExhausted);
            }
            st.next_local_id += 2;
            let mut s = StreamState::new(st.peer_initial_window);
            s.reply = Some(reply_tx);
            st.streams.insert(id, s);
            self.shared.queue(
                st,
                Frame::SynStream {
                    stream_id: id,
                    associated_to: 0,
                    priority: 0,
                    slot: 0,
                    fin: false,
                    unidirectional: false,
                    headers,
                },
            );
            // Dropping the handle (this future cancelled, or failed) resets the stream.
            StreamHandle {
                id,
                shared: Arc::clone(&self.shared),
                drop_status: RstStatus::CANCEL,
            }
        };
        match reply_rx.await {
            Ok(Ok(headers)) => Ok(Stream { handle, headers }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.shared.closed_error()),
        }
    }

    /// Sends a PING and waits for its echo; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration> {
        let (pong_tx, pong_rx) = oneshot::channel();
        let id = {
            let mut guard = self.shared.lock();
            let st = &mut *guard;
            if let Some(cause) = &st.dead {
                return Err(Error::Closed(Arc::clone(cause)));
            }
            let id = st.next_ping_id;
            st.next_ping_id = match id.checked_add(2) {
                Some(next) if next <= MAX_STREAM_ID => next,
                _ => 2 - st.role.parity(),
            };
            st.pings.insert(id, pong_tx);
            self.shared.queue(st, Frame::Ping { id });
            id
        };
        let _forget = PingGuard {
            shared: &self.shared,
            id,
        };
        let start = Instant::now();
        match pong_rx.await {
            Ok(()) => Ok(start.elapsed()),
            Err(_) => Err(self.shared.closed_error()),
        }
    }

    /// Sends GOAWAY: no new streams either way; the connection closes once the open streams
    /// are done. Note that spdystream stops reading at a GOAWAY and closes the connection, so
    /// towards it, send GOAWAY (or drop the last handle) only once the streams are finished.
    pub fn goaway(&self) {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if st.dead.is_some() || st.goaway_sent {
            return;
        }
        st.goaway_sent = true;
        let last_good_stream_id = st.last_peer_id;
        self.shared.queue(
            st,
            Frame::GoAway {
                last_good_stream_id,
                status: GoAwayStatus::OK,
            },
        );
        self.shared.accept_wake.notify_waiters();
        self.shared.maybe_finish(st);
    }

    /// Closes the connection now; pending and later operations on its streams fail.
    pub fn abort(&self) {
        let mut st = self.shared.lock();
        self.shared.terminate(&mut st, Error::Aborted, None, false);
    }

    /// Waits until the connection has ended and both of its tasks have stopped. `Ok` when it
    /// ended gracefully (after GOAWAY), otherwise why it ended.
    pub async fn closed(&self) -> Result<()> {
        let mut done = self.shared.done.subscribe();
        let _ = done.wait_for(|done| *done).await;
        let st = self.shared.lock();
        match &st.dead {
            _ if st.graceful => Ok(()),
            Some(cause) => Err(Error::Closed(Arc::clone(cause))),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Session")
            .field("role", &st.role)
            .field("streams", &st.streams.len())
            .field("closed", &st.dead.is_some())
            .finish_non_exhaustive()
    }
}

impl Clone for Session {
    fn clone(&self) -> Self {
        self.shared.lock().sessions += 1;
        Session {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        st.sessions -= 1;
        self.shared.maybe_finish(st);
    }
}

struct PingGuard<'a> {
    shared: &'a Shared,
    id: u32,
}

impl Drop for PingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pings.remove(&self.id);
    }
}

/// The application's hold on a stream; dropping it forgets the stream, resetting it when it is
/// not done.
struct StreamHandle {
    id: u32,
    shared: Arc<Shared>,
    drop_status: RstStatus,
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let shared = &self.shared;
        let mut guard = shared.lock();
        let st = &mut *guard;
        if let Some(s) = st.streams.remove(&self.id) {
            // Once our FIN is out, the peer has all we will send: a reset now could only
            // destroy data it has not read yet. What it still sends is dropped as data for an
            // unknown stream.
            if !s.done() && !s.local_fin {
                shared.queue(
                    st,
                    Frame::RstStream {
                        stream_id: self.id,
                        status: self.drop_status,
                    },
                );
            }
            shared.credit_session(st, s.recv_buffered);
        }
        if st.reader_paused {
            shared.reader_wake.notify_one();
        }
        shared.maybe_finish(st);
    }
}

/// A stream the peer opened, not yet answered.
///
/// Answer with [`IncomingStream::reply`] or [`IncomingStream::reset`]; dropping it refuses the
/// stream (RST_STREAM REFUSED_STREAM). spdystream discards DATA that arrives before SYN_REPLY,
/// which is why a [`Stream`] only exists after the reply.
pub struct IncomingStream {
    handle: StreamHandle,
    headers: Headers,
}

impl fmt::Debug for IncomingStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingStream")
            .field("id", &self.handle.id)
            .field("headers", &self.headers)
            .finish()
    }
}

impl IncomingStream {
    /// The stream id (odd when the client opened it).
    pub fn id(&self) -> u32 {
        self.handle.id
    }

    /// The headers of the peer's SYN_STREAM.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Accepts the stream with SYN_REPLY carrying `headers`.
    pub fn reply(mut self, headers: Headers) -> Result<Stream> {
        headers.validate()?;
        let shared = Arc::clone(&self.handle.shared);
        let mut guard = shared.lock();
        let st = &mut *guard;
        if let Some(cause) = &st.dead {
            return Err(Error::Closed(Arc::clone(cause)));
        }
        let id = self.handle.id;
        let Some(s) = st.streams.get(&id) else {
            return Err(Error::Closed(Arc::new(Error::Finished)));
        };
        if let Some(reset) = s.reset {
            return Err(reset.error(id));
        }
        shared.queue(
            st,
            Frame::SynReply {
                stream_id: id,
                fin: false,
                headers,
            },
        );
        drop(guard);
        self.handle.drop_status = RstStatus::CANCEL;
        Ok(Stream {
            handle: self.handle,
            headers: self.headers,
        })
    }

    /// Refuses the stream with RST_STREAM carrying `status`.
    pub fn reset(self, status: RstStatus) {
        reset_handle(&self.handle, status);
    }
}

fn reset_handle(handle: &StreamHandle, status: RstStatus) {
    let shared = &handle.shared;
    let mut guard = shared.lock();
    let st = &mut *guard;
    let Some(s) = st.streams.get(&handle.id) else {
        return;
    };
    if s.reset.is_some() {
        return;
    }
    let send = !s.done();
    shared.reset_stream(st, handle.id, Reset::Local(status));
    if send {
        shared.queue(
            st,
            Frame::RstStream {
                stream_id: handle.id,
                status,
            },
        );
    }
    shared.maybe_finish(st);
}

/// An open SPDY stream: an `AsyncRead + AsyncWrite` byte stream (`tokio::io::split` works).
///
/// Reads return the peer's DATA and EOF after its FIN; `shutdown()` sends FIN (a half-close:
/// reading goes on). A reset by the peer fails reads and writes with
/// `io::ErrorKind::ConnectionReset` (the source is [`Error::ResetByPeer`]); the end of the
/// connection fails them with `ConnectionAborted` once buffered data is read. Writes wait for
/// flow-control credit and queue space, so a slow peer slows the writer down. Dropping the
/// stream before both directions are finished resets it (RST_STREAM CANCEL).
pub struct Stream {
    handle: StreamHandle,
    headers: Headers,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.handle.id)
            .field("headers", &self.headers)
            .finish()
    }
}

impl Stream {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.handle.id
    }

    /// The peer's headers: its SYN_STREAM's for a stream it opened, its SYN_REPLY's for one
    /// we opened.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Bytes received on this stream and not yet read by the application.
    pub fn recv_buffered(&self) -> usize {
        let st = self.handle.shared.lock();
        st.streams
            .get(&self.handle.id)
            .map_or(0, |s| s.recv_buffered)
    }

    /// Aborts the stream with RST_STREAM carrying `status`; later reads and writes fail.
    pub fn reset(&self, status: RstStatus) {
        reset_handle(&self.handle, status);
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let id = self.handle.id;
        let shared = &self.handle.shared;
        let mut guard = shared.lock();
        let st = &mut *guard;
        let window = st.window as usize;
        let Some(s) = st.streams.get_mut(&id) else {
            return Poll::Ready(Err(io_error(io::ErrorKind::NotConnected, Error::Finished)));
        };
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(front) = s.recv_buf.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                s.recv_buf.pop_front();
            }
            s.recv_buffered -= n;
            let mut update = None;
            if !s.remote_fin && s.reset.is_none() {
                s.recv_unacked += n;
                if s.recv_unacked >= (window / 2).max(1) {
                    update = Some(s.recv_unacked.min(MAX_WINDOW as usize));
                    s.recv_unacked = 0;
                }
            }
            if let Some(delta) = update {
                // delta is at most MAX_WINDOW.
                shared.queue(
                    st,
                    Frame::WindowUpdate {
                        stream_id: id,
                        delta: delta as u32,
                    },
                );
            }
            shared.credit_session(st, n);
            st.last_activity = Instant::now();
            if st.reader_paused {
                shared.reader_wake.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(reset) = s.reset {
            return Poll::Ready(Err(io_error(
                io::ErrorKind::ConnectionReset,
                reset.error(id),
            )));
        }
        if s.remote_fin {
            return Poll::Ready(Ok(()));
        }
        s.read_waker = Some(cx.waker().clone());
        if let Some(cause) = &st.dead {
            return Poll::Ready(Err(closed_io(cause)));
        }
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let id = self.handle.id;
        let shared = &self.handle.shared;
        let mut guard = shared.lock();
        let st = &mut *guard;
        let Some(s) = st.streams.get_mut(&id) else {
            return Poll::Ready(Err(io_error(io::ErrorKind::NotConnected, Error::Finished)));
        };
        if let Some(reset) = s.reset {
            return Poll::Ready(Err(io_error(
                io::ErrorKind::ConnectionReset,
                reset.error(id),
            )));
        }
        if let Some(cause) = &st.dead {
            return Poll::Ready(Err(closed_io(cause)));
        }
        if s.local_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("spdy stream {id} is closed for writing"),
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut n = data.len().min(MAX_DATA_FRAME);
        if st.enforce_stream_windows {
            if s.send_window <= 0 {
                s.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            n = n.min(s.send_window as usize);
        }
        if st.out_data >= MAX_QUEUED_DATA
            || (st.enforce_session_window && st.session_send_window <= 0)
        {
            register(&mut st.blocked_writers, cx.waker());
            return Poll::Pending;
        }
        if st.enforce_session_window {
            n = n.min(st.session_send_window as usize);
        }
        s.send_window -= n as i64;
        s.queued += n;
        st.session_send_window -= n as i64;
        shared.queue(
            st,
            Frame::Data {
                stream_id: id,
                fin: false,
                data: Bytes::copy_from_slice(&data[..n]),
            },
        );
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.handle.id;
        let mut guard = self.handle.shared.lock();
        let st = &mut *guard;
        let Some(s) = st.streams.get_mut(&id) else {
            return Poll::Ready(Err(io_error(io::ErrorKind::NotConnected, Error::Finished)));
        };
        if let Some(reset) = s.reset {
            return Poll::Ready(Err(io_error(
                io::ErrorKind::ConnectionReset,
                reset.error(id),
            )));
        }
        if s.queued == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(cause) = &st.dead {
            return Poll::Ready(Err(closed_io(cause)));
        }
        s.flush_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let id = self.handle.id;
            let shared = &self.handle.shared;
            let mut guard = shared.lock();
            let st = &mut *guard;
            let Some(s) = st.streams.get_mut(&id) else {
                return Poll::Ready(Err(io_error(io::ErrorKind::NotConnected, Error::Finished)));
            };
            if !s.local_fin {
                if let Some(reset) = s.reset {
                    return Poll::Ready(Err(io_error(
                        io::ErrorKind::ConnectionReset,
                        reset.error(id),
                    )));
                }
                if let Some(cause) = &st.dead {
                    return Poll::Ready(Err(closed_io(cause)));
                }
                s.local_fin = true;
                shared.queue(
                    st,
                    Frame::Data {
                        stream_id: id,
                        fin: true,
                        data: Bytes::new(),
                    },
                );
                shared.maybe_finish(st);
            }
        }
        self.as_mut().poll_flush(cx)
    }
}
