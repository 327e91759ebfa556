//! Who may do what: the polkit check of each caller, behind a trait so tests run without polkit.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

/// A boxed, sendable future (what [`Authority`] methods return).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The answer to "may this caller do this action?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allowed,
    /// No, and authenticating would not change that.
    Denied,
    /// Authentication was required (e.g. an administrator password) and did not happen.
    NotAuthenticated,
}

/// The caller could not be checked at all (as opposed to being denied).
#[derive(Debug, thiserror::Error)]
#[error(
    "kupd could not ask polkit whether the caller may use {action} ({error}); \
     check that polkit runs: systemctl status polkit"
)]
pub struct AuthorityError {
    /// The action that was being checked.
    pub action: String,
    /// The bus error (already part of the message, so not a source).
    pub error: zbus::Error,
}

/// Decides whether a caller may perform an action.
pub trait Authority: Send + Sync + 'static {
    /// Checks `subject` (the caller, from its message header) for polkit `action`; may let polkit
    /// ask the user to authenticate.
    fn check<'a>(
        &'a self,
        subject: &'a Subject,
        action: &'a str,
    ) -> BoxFuture<'a, Result<Decision, AuthorityError>>;
}

/// The real [`Authority`]: `org.freedesktop.PolicyKit1` on the given (system) bus.
#[derive(Clone)]
pub struct PolkitAuthority {
    conn: Connection,
}

impl PolkitAuthority {
    /// Asks the polkit daemon reachable over `conn` (kupd's own system bus connection).
    #[must_use]
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }

    async fn ask(&self, subject: &Subject, action: &str) -> Result<Decision, zbus::Error> {
        let proxy = AuthorityProxy::builder(&self.conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let details: HashMap<&str, &str> = HashMap::new();
        let result = proxy
            .check_authorization(
                subject,
                action,
                &details,
                CheckAuthorizationFlags::ALLOW_USER_INTERACTION,
                "",
            )
            .await?;
        Ok(if result.is_authorized {
            Decision::Allowed
        } else if result.is_challenge {
            Decision::NotAuthenticated
        } else {
            Decision::Denied
        })
    }
}

impl fmt::Debug for PolkitAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolkitAuthority").finish_non_exhaustive()
    }
}

impl Authority for PolkitAuthority {
    fn check<'a>(
        &'a self,
        subject: &'a Subject,
        action: &'a str,
    ) -> BoxFuture<'a, Result<Decision, AuthorityError>> {
        Box::pin(async move {
            self.ask(subject, action)
                .await
                .map_err(|error| AuthorityError {
                    action: action.to_owned(),
                    error,
                })
        })
    }
}
