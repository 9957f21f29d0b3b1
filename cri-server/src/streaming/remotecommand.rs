//! The Kubernetes remotecommand protocol (exec and attach), transport-neutral parts: protocol
//! versions, the status written to the error channel, resize messages.
//!
//! Versions, as kubelet's streaming server speaks them:
//! - `channel.k8s.io` (v1), `v2.channel.k8s.io`: stdin, stdout, stderr and an error channel
//!   that carries a failure's message as text (nothing on success);
//! - `v3.channel.k8s.io`: adds the resize channel (JSON `{"Width":80,"Height":24}` objects);
//! - `v4.channel.k8s.io`: the error channel carries a `metav1.Status` object, with the exit code
//!   of a failed command in its details;
//! - `v5.channel.k8s.io` (WebSocket only): adds the close signal, a message on channel 255
//!   naming a channel the client is done writing (stdin's end of file).

use serde::Deserialize;
use serde_json::json;

use crate::error::Error;

/// WebSocket channel numbers (SPDY names its streams instead).
pub mod channel {
    /// Client to process.
    pub const STDIN: u8 = 0;
    /// Process to client.
    pub const STDOUT: u8 = 1;
    /// Process to client.
    pub const STDERR: u8 = 2;
    /// The status of the whole session, written last.
    pub const ERROR: u8 = 3;
    /// Terminal size changes, client to process.
    pub const RESIZE: u8 = 4;
    /// v5's close signal: the one byte of data names the channel the client closed.
    pub const CLOSE: u8 = 255;
}

/// remotecommand protocols over SPDY, most preferred first.
pub const SPDY_PROTOCOLS: [&str; 4] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// remotecommand protocols over WebSocket, most preferred first.
pub const WS_PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// What a negotiated protocol name means for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    /// 1 to 5.
    pub version: u8,
    /// WebSocket text frames with base64 data.
    pub base64: bool,
}

impl Protocol {
    /// The protocol named `name`; a missing name is v1 (clients that predate negotiation).
    pub fn parse(name: Option<&str>) -> Self {
        let name = name.unwrap_or("channel.k8s.io");
        let base64 = name.contains("base64");
        let version = match name.split('.').next() {
            Some("v5") => 5,
            Some("v4") => 4,
            Some("v3") => 3,
            Some("v2") => 2,
            _ => 1,
        };
        Protocol { version, base64 }
    }

    /// Whether the protocol has a resize channel.
    pub fn resizes(self) -> bool {
        self.version >= 3
    }
}

/// A terminal size from the resize channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TerminalSize {
    /// Columns.
    #[serde(rename = "Width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height")]
    pub height: u16,
}

/// How a session ended, for the error channel: an exit code, or an error.
pub type Outcome = Result<i32, Error>;

/// What the error channel carries for `outcome` in `protocol`: a `metav1.Status` (v4+) as
/// kubelet writes it, or (v1-v3) the failure's message alone; None when nothing is written.
pub fn status_message(outcome: &Outcome, protocol: Protocol) -> Option<Vec<u8>> {
    let status = match outcome {
        Ok(0) => json!({"metadata": {}, "status": "Success"}),
        Ok(code) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(e) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("Internal error occurred: {e}"),
            "reason": "InternalError",
            "details": {"causes": [{"message": e.to_string()}]},
            "code": 500,
        }),
    };
    if protocol.version >= 4 {
        return Some(status.to_string().into_bytes());
    }
    match outcome {
        Ok(0) => None,
        _ => status["message"].as_str().map(|m| m.as_bytes().to_vec()),
    }
}

/// Splits the resize stream into sizes: concatenated JSON objects, possibly cut anywhere.
#[derive(Debug, Default)]
pub struct ResizeDecoder {
    buf: Vec<u8>,
}

/// A resize message longer than this is garbage: dropped.
const MAX_RESIZE_MESSAGE: usize = 4096;

impl ResizeDecoder {
    /// Feeds `data`; returns the sizes completed by it. Malformed input is skipped.
    pub fn push(&mut self, data: &[u8]) -> Vec<TerminalSize> {
        self.buf.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut consumed = 0;
        let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<TerminalSize>();
        loop {
            match it.next() {
                Some(Ok(size)) => {
                    sizes.push(size);
                    consumed = it.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    tracing::debug!("malformed resize message dropped");
                    consumed = self.buf.len();
                    break;
                }
                None => {
                    consumed = self.buf.len();
                    break;
                }
            }
        }
        self.buf.drain(..consumed);
        if self.buf.len() > MAX_RESIZE_MESSAGE {
            self.buf.clear();
        }
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names() {
        assert_eq!(
            Protocol::parse(Some("v5.channel.k8s.io")),
            Protocol {
                version: 5,
                base64: false
            }
        );
        assert_eq!(
            Protocol::parse(Some("v4.base64.channel.k8s.io")),
            Protocol {
                version: 4,
                base64: true
            }
        );
        assert_eq!(Protocol::parse(Some("base64.channel.k8s.io")).version, 1);
        assert_eq!(Protocol::parse(None).version, 1);
        assert!(Protocol::parse(Some("v3.channel.k8s.io")).resizes());
        assert!(!Protocol::parse(Some("v2.channel.k8s.io")).resizes());
    }

    #[test]
    fn statuses_as_kubelet_writes_them() {
        let v4 = Protocol::parse(Some("v4.channel.k8s.io"));
        let ok: serde_json::Value =
            serde_json::from_slice(&status_message(&Ok(0), v4).expect("v4 success")).expect("json");
        assert_eq!(ok, json!({"metadata": {}, "status": "Success"}));
        let failed: serde_json::Value =
            serde_json::from_slice(&status_message(&Ok(3), v4).expect("v4 failure")).expect("json");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let v2 = Protocol::parse(Some("v2.channel.k8s.io"));
        assert_eq!(status_message(&Ok(0), v2), None);
        let text = status_message(&Err(Error::NotFound("no such container".into())), v2)
            .expect("v2 error text");
        assert!(
            String::from_utf8_lossy(&text).contains("no such container"),
            "{text:?}"
        );
    }

    #[test]
    fn resize_messages_split_anywhere() {
        let mut d = ResizeDecoder::default();
        assert!(d.push(br#"{"Width":80,"#).is_empty());
        assert_eq!(
            d.push(br#""Height":24}{"Width":1,"Height":2}"#),
            [
                TerminalSize {
                    width: 80,
                    height: 24
                },
                TerminalSize {
                    width: 1,
                    height: 2
                }
            ]
        );
        assert!(d.push(b"garbage").is_empty());
        assert_eq!(d.push(br#" {"Width":3,"Height":4}"#).len(), 1);
    }
}
