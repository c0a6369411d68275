//! Deadlines that say where they came from.
//!
//! A query has one overall deadline (the client's `grpc-timeout` or `--query-timeout`,
//! whichever comes first) and stage limits inside it (`--planning-timeout`,
//! `--first-batch-timeout`). Each is a [`Deadline`]; when one expires the error names
//! the stage and the limit, so a client can tell its own timeout from the server's.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

/// A point in time, or none, with the limit it came from.
#[derive(Debug, Clone)]
pub struct Deadline {
    at: Option<Instant>,
    limit: Duration,
    source: String,
}

impl Deadline {
    /// No deadline.
    pub fn none() -> Self {
        Self {
            at: None,
            limit: Duration::ZERO,
            source: String::new(),
        }
    }

    /// `limit` after `start`, set by `source` (a flag, or the client); zero means none.
    pub fn after(start: Instant, limit: Duration, source: impl Into<String>) -> Self {
        if limit.is_zero() {
            return Self::none();
        }
        Self {
            at: start.checked_add(limit),
            limit,
            source: source.into(),
        }
    }

    /// Whichever of the two expires first.
    pub fn earliest(self, other: Self) -> Self {
        match (self.at, other.at) {
            (Some(a), Some(b)) if b < a => other,
            (None, Some(_)) => other,
            _ => self,
        }
    }

    /// The error for `stage` running out of this deadline.
    pub fn error(&self, stage: &'static str) -> Error {
        Error::DeadlineExceeded {
            stage,
            limit: self.limit,
            source_of_limit: self.source.clone(),
        }
    }

    /// Completes when the deadline passes; never, if there is none.
    pub async fn expired(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Runs `future` for `stage` within the deadline.
    pub async fn run<T>(
        &self,
        stage: &'static str,
        future: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match self.at {
            Some(at) => tokio::time::timeout_at(at, future)
                .await
                .unwrap_or_else(|_elapsed| Err(self.error(stage))),
            None => future.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_earliest_wins_and_names_its_source() {
        let now = Instant::now();
        let client = Deadline::after(now, Duration::from_millis(50), "the client's grpc-timeout");
        let server = Deadline::after(now, Duration::from_secs(60), "--query-timeout");
        let d = server.clone().earliest(client.clone());
        let err = d
            .run("the query", std::future::pending::<Result<()>>())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            err.to_string(),
            "the query exceeded its deadline of 50ms (the client's grpc-timeout)"
        );
        assert!(now.elapsed() >= Duration::from_millis(50));
        // Zero means no limit.
        let off = Deadline::after(now, Duration::ZERO, "--query-timeout");
        assert_eq!(off.clone().earliest(server.clone()).source, server.source);
        assert_eq!(server.earliest(off).source, "--query-timeout");
        assert_eq!(Deadline::none().run("x", async { Ok(7) }).await.unwrap(), 7);
    }
}
