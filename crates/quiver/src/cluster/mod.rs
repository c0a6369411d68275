//! The cluster: every `quiver serve` node answers its clients and can run tasks for the
//! other nodes, on datafusion-distributed.
//!
//! ```text
//!  client ─▶ coordinator (any node): plans with query::distributed ─▶ stages, tasks
//!                 │ ClusterChannels: one HTTP/2 connection per worker, the shared secret
//!                 ▼ on every call
//!  worker port (--cluster-listen) ─▶ secret checked ─▶ TaskAdmission (a slot per query,
//!                 │ --max-cluster-queries; --max-cluster-message-size)
//!                 │   ─▶ datafusion-distributed's Worker (ended tasks released: worker.rs)
//!                 │ on the cluster runtime, with this node's runtime env (memory pool,
//!                 ▼ object stores) and functions
//!  ReinstallReaders: the plan's Parquet scans read through Quiver's reader (memory maps,
//!  the object cache, file identity), checked against this node's own listing
//! ```
//!
//! The worker protocol is datafusion-distributed's own gRPC service, on its own port;
//! nothing here is reachable from the Flight port. The port also answers gRPC health
//! checks, which the coordinator's probe (`Workers`) sends to learn each worker's Flight
//! URL: a result split over endpoints (`--endpoints-per-query`) has slices located at
//! the nodes, so clients pull them straight from the workers.

mod admission;
mod channels;
mod metrics;
mod worker;
mod workers;

pub use admission::{Admitted, TaskAdmission, TaskAdmissionOptions};
pub use channels::ClusterChannels;
pub use metrics::{ClusterMetrics, ClusterMetricsLayer};
pub use worker::{ReinstallReaders, worker_routes};
pub use workers::{WorkerSource, Workers};

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The header that carries the cluster secret on every call between nodes.
pub const SECRET_HEADER: &str = "x-quiver-cluster-secret";

/// The header in every answer of a worker port that carries where clients reach the
/// node's Flight port (`--advertise-url`): slices of split results are located there.
pub const FLIGHT_URL_HEADER: &str = "x-quiver-flight-url";

/// Shortest secret accepted: 128 bits of hex.
const MIN_SECRET_BYTES: usize = 32;

/// The secret every node of a cluster shares (`--cluster-secret-file`). Never printed.
#[derive(Clone)]
pub struct ClusterSecret(Arc<http::HeaderValue>);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// Reads the secret from `path`: its first line, at least 32 printable ASCII
    /// characters (`openssl rand -hex 32` makes one).
    pub fn from_file(path: &Path) -> Result<Self> {
        let config = |message: String| Error::Config {
            message: format!("--cluster-secret-file {}: {message}", path.display()),
        };
        let text = std::fs::read_to_string(path).map_err(|e| config(e.to_string()))?;
        let secret = text.lines().next().unwrap_or_default().trim();
        Self::new(secret).map_err(config)
    }

    /// The secret `secret`; see [`Self::from_file`].
    pub fn new(secret: &str) -> std::result::Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the secret must be at least {MIN_SECRET_BYTES} characters (openssl rand -hex 32 makes one)"
            ));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the secret must be printable ASCII without spaces".into());
        }
        let mut value = http::HeaderValue::from_str(secret).map_err(|e| e.to_string())?;
        value.set_sensitive(true);
        Ok(Self(Arc::new(value)))
    }

    /// Whether `presented` is the secret, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        presented.len() == expected.len()
            && presented
                .iter()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// The header value that carries it.
    pub(crate) fn header(&self) -> http::HeaderValue {
        http::HeaderValue::clone(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_printable_and_compared_whole() {
        assert!(ClusterSecret::new("short").is_err());
        assert!(ClusterSecret::new(&format!("{} x", "a".repeat(40))).is_err());
        let secret = ClusterSecret::new(&"ab".repeat(16)).unwrap();
        assert!(secret.matches("ab".repeat(16).as_bytes()));
        assert!(!secret.matches("ab".repeat(15).as_bytes()));
        assert!(!secret.matches(format!("{}ac", "ab".repeat(15)).as_bytes()));
        assert!(!format!("{secret:?}").contains("abab"));
    }
}
