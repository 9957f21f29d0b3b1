//! berthd: the core of berth and its CRI front door.
