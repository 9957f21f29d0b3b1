//! WebSocket framing and handshakes (to be written).
