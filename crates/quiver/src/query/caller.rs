//! Who is calling: one value per request, made by the Flight service when it
//! authenticates the call, and carried to everything that asks (table access, listing
//! and cancelling queries, prepared statements, deadlines, the audit log).

use std::sync::Arc;
use std::time::Duration;

use super::access::TableAccess;
use super::active::ActiveQuery;
use crate::audit::Origin;

/// The caller of one request.
///
/// `Caller::default()` is an unauthenticated caller with no deadline who may read every
/// table: what every call is when authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The user or token name from the auth file; `None` when authentication is off.
    pub user: Option<Arc<str>>,
    /// May list and cancel every user's queries (`admin = true` in the auth file).
    pub admin: bool,
    /// The tables the caller may read (`tables = [...]` in the auth file).
    pub tables: Arc<TableAccess>,
    /// The RPC and where it came from, for the audit log.
    pub origin: Origin,
    /// The client's own deadline (`grpc-timeout`).
    pub client_timeout: Option<Duration>,
}

impl Caller {
    /// The user's name, when authentication is on.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Whether the caller may see and cancel `query`: their own, or every query for an
    /// admin or when authentication is off.
    pub(crate) fn may_see(&self, query: &ActiveQuery) -> bool {
        match &self.user {
            None => true,
            Some(_) if self.admin => true,
            Some(name) => query.user() == Some(&**name),
        }
    }

    /// Whose tickets an early cancel voids: the caller's own, or anyone's (`None`) for
    /// an admin or when authentication is off.
    pub(crate) fn cancels_for(&self) -> Option<String> {
        match &self.user {
            Some(name) if !self.admin => Some(name.to_string()),
            _ => None,
        }
    }

    /// How messages name the caller.
    pub(crate) fn name(&self) -> &str {
        self.user().unwrap_or("a client")
    }
}
