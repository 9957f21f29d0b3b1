//! SPDY/3.1 framing and sessions (to be written).
