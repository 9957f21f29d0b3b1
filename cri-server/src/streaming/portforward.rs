//! The Kubernetes portforward protocol, transport-neutral parts.
//!
//! - Over SPDY (`portforward.k8s.io`): the client opens a pair of streams per connection it
//!   forwards, `streamType: error` and `streamType: data`, both with the `port` and a shared
//!   `requestID` header.
//! - Over WebSocket (`v4.channel.k8s.io`, `v4.base64.channel.k8s.io`, or no subprotocol): the
//!   ports are the `port` query parameters; port *i* gets data channel `2i` and error channel
//!   `2i+1`, and the server's first message on each is the port as two little-endian bytes.
//!
//! Either way an error (nothing listening, say) is written as text to the error stream.

/// portforward protocols over SPDY.
pub const SPDY_PROTOCOLS: [&str; 1] = ["portforward.k8s.io"];

/// portforward protocols over WebSocket, most preferred first.
pub const WS_PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"];
