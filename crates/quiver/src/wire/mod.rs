//! The shape batches take on their way to the network: string views expanded to the
//! types clients expect ([`views`]), batches framed as gRPC `FlightData` messages made of
//! shared buffers ([`frames`]), and pinned batches held as their messages ([`pinned`]).
//! Used by the catalog (pinning) and the Flight send path alike.

pub mod frames;
pub mod pinned;
pub mod views;
