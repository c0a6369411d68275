//! The shape batches take on their way to the network: string views expanded to the
//! types clients expect ([`views`]), and pinned batches laid out so each message body is
//! one contiguous, shared range ([`contiguous`]). Used by the catalog (pinning) and the
//! Flight send path alike.

pub mod contiguous;
pub mod views;
