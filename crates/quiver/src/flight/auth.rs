//! Who may call: users with argon2id passwords and static API tokens, from a TOML file.
//!
//! ```text
//!  Handshake  authorization: Basic b64(user:password) ──▶ argon2id verify
//!             ◀── authorization: Bearer <session token>  (random, --session-ttl)
//!  any call   authorization: Bearer <session or static token> ──▶ query::Caller
//! ```
//!
//! Only SHA-256 digests of tokens are kept (the file holds digests of static tokens; the
//! server holds digests of the session tokens it issued), so neither the file nor a
//! memory dump hands out working credentials. An unknown user name is verified against a
//! dummy hash, so a wrong name and a wrong password take the same time.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use super::login::{FailureReason, LoginThrottle};
use crate::error::{Error, Result};
use crate::query::{Caller, TableAccess};

pub use super::login::LoginLimits;

/// Base64 of Basic credentials, padded or not: Go's Flight client (ADBC's Flight SQL
/// driver) sends them without padding.
const BASIC: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Bytes of entropy in a session token.
const TOKEN_BYTES: usize = 32;

/// Who is on the other end of a connection: set by the server's listener as the
/// connection info, so handlers find it in every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: Option<std::net::SocketAddr>,
    /// Subject of the verified client certificate (mutual TLS), e.g. `CN=alice`.
    pub client_subject: Option<Arc<str>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    users: Vec<UserEntry>,
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    /// argon2id PHC string (`quiver auth hash-password`).
    password: String,
    #[serde(default)]
    admin: bool,
    /// Glob patterns of the tables the user may read; absent: all.
    tables: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    /// Hex SHA-256 of the token.
    sha256: String,
    #[serde(default)]
    admin: bool,
    /// Glob patterns of the tables the token may read; absent: all.
    tables: Option<Vec<String>>,
}

#[derive(Debug)]
struct Session {
    identity: Caller,
    expires: Instant,
}

/// Checks credentials and issues session tokens.
#[derive(Debug)]
pub struct Authenticator {
    /// User name to PHC string (validated at load) and who the user is once verified.
    users: HashMap<String, (String, Caller)>,
    /// Token digest to token name.
    tokens: HashMap<[u8; 32], Caller>,
    /// Session token digest to session.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    ttl: Duration,
    /// Verified against when the user name is unknown.
    dummy_hash: String,
    /// Bounds on password checks, and the failure records.
    throttle: LoginThrottle,
}

/// Most live sessions one user may hold; a new login beyond it ends the oldest.
const MAX_SESSIONS_PER_USER: usize = 256;

impl Authenticator {
    /// Reads an auth file; see the README for the format.
    pub fn load(path: &Path, session_ttl: Duration, limits: LoginLimits) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_toml(&text, session_ttl, limits).map_err(|e| Error::Config {
            message: format!("auth file {}: {e}", path.display()),
        })
    }

    /// Parses an auth file's contents.
    pub fn from_toml(
        text: &str,
        session_ttl: Duration,
        limits: LoginLimits,
    ) -> Result<Self, String> {
        let file: AuthFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut users = HashMap::new();
        for user in file.users {
            let hash = PasswordHash::new(&user.password)
                .map_err(|e| format!("user '{}': password is not a PHC string ({e}); create one with `quiver auth hash-password`", user.name))?;
            if hash.algorithm.as_str() != "argon2id" {
                return Err(format!(
                    "user '{}': password hash uses {}, expected argon2id",
                    user.name, hash.algorithm
                ));
            }
            let identity = Caller {
                user: Some(user.name.as_str().into()),
                admin: user.admin,
                tables: Arc::new(
                    TableAccess::from_patterns(user.tables.as_deref())
                        .map_err(|e| format!("user '{}': {e}", user.name))?,
                ),
                ..Caller::default()
            };
            if users
                .insert(user.name.clone(), (user.password, identity))
                .is_some()
            {
                return Err(format!("user '{}' is listed twice", user.name));
            }
        }
        let mut tokens = HashMap::new();
        for token in file.tokens {
            let digest = parse_hex_digest(&token.sha256).ok_or_else(|| {
                format!(
                    "token '{}': sha256 must be 64 hex digits (e.g. `printf %s TOKEN | sha256sum`)",
                    token.name
                )
            })?;
            let tables = TableAccess::from_patterns(token.tables.as_deref())
                .map_err(|e| format!("token '{}': {e}", token.name))?;
            tokens.insert(
                digest,
                Caller {
                    user: Some(token.name.into()),
                    admin: token.admin,
                    tables: Arc::new(tables),
                    ..Caller::default()
                },
            );
        }
        if users.is_empty() && tokens.is_empty() {
            return Err("no [[users]] and no [[tokens]]: nobody could connect".into());
        }
        Ok(Self {
            users,
            tokens,
            sessions: Mutex::default(),
            ttl: session_ttl,
            dummy_hash: hash_password("quiver-dummy-password"),
            throttle: LoginThrottle::new(limits),
        })
    }

    /// Adds `quiver_auth_failures_total` to `registry`.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> Result<()> {
        registry
            .register(Box::new(self.throttle.counter().clone()))
            .map_err(|e| Error::Internal(format!("registering auth metrics: {e}")))
    }

    /// Checks Basic credentials from a Handshake (from `peer`) and issues a session
    /// token. Password checks are bounded and failures back off (see `flight::login`).
    pub async fn handshake(
        self: &Arc<Self>,
        metadata: &MetadataMap,
        peer: Option<IpAddr>,
    ) -> Result<(Caller, String)> {
        let (user, password) = basic_credentials(metadata).inspect_err(|_| {
            self.throttle.count(FailureReason::Malformed);
        })?;
        self.throttle.check_backoff(&user)?;
        let known = self.users.contains_key(&user);
        let permit = self.throttle.permit(&user, known).await?;
        // argon2 is deliberately slow: keep it off the async workers.
        let this = Arc::clone(self);
        let checked_user = user.clone();
        let verified = tokio::task::spawn_blocking(move || {
            let (hash, identity) = match this.users.get(&checked_user) {
                Some((h, identity)) => (h.as_str(), Some(identity.clone())),
                None => (this.dummy_hash.as_str(), None),
            };
            let ok = PasswordHash::new(hash)
                .map(|h| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                })
                .unwrap_or(false);
            identity.filter(|_| ok)
        })
        .await
        .map_err(|e| Error::Internal(format!("password check failed: {e}")))?;
        drop(permit);
        let Some(identity) = verified else {
            let delay = self.throttle.failed(&user, peer);
            tokio::time::sleep(delay).await;
            return Err(unauthenticated("wrong user name or password"));
        };
        self.throttle.succeeded(&user);

        let mut bytes = [0u8; TOKEN_BYTES];
        OsRng.fill_bytes(&mut bytes);
        let token = URL_SAFE_NO_PAD.encode(bytes);
        let now = Instant::now();
        let mut sessions = self.sessions.lock();
        sessions.retain(|_, s| s.expires > now);
        let mine: Vec<([u8; 32], Instant)> = sessions
            .iter()
            .filter(|(_, s)| s.identity.user == identity.user)
            .map(|(d, s)| (*d, s.expires))
            .collect();
        if mine.len() >= MAX_SESSIONS_PER_USER
            && let Some((oldest, _)) = mine.iter().min_by_key(|(_, expires)| *expires)
        {
            sessions.remove(oldest);
        }
        sessions.insert(
            digest(&token),
            Session {
                identity: identity.clone(),
                expires: now + self.ttl,
            },
        );
        Ok((identity, token))
    }

    /// The caller of a request carrying `authorization: Bearer <token>`.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller> {
        self.bearer(metadata).map_err(|(reason, e)| {
            self.throttle.count(reason);
            e
        })
    }

    /// The caller, or why not (for `quiver_auth_failures_total`) and the error.
    fn bearer(&self, metadata: &MetadataMap) -> Result<Caller, (FailureReason, Error)> {
        let token = header(metadata, "Bearer ").map_err(|e| (FailureReason::Malformed, e))?;
        let digest = digest(token);
        if let Some(identity) = self.tokens.get(&digest) {
            return Ok(identity.clone());
        }
        let mut sessions = self.sessions.lock();
        match sessions.get(&digest) {
            Some(s) if s.expires > Instant::now() => Ok(s.identity.clone()),
            Some(_) => {
                sessions.remove(&digest);
                Err((
                    FailureReason::ExpiredToken,
                    unauthenticated("the session token expired; call Handshake again"),
                ))
            }
            None => Err((
                FailureReason::UnknownToken,
                unauthenticated("unknown bearer token"),
            )),
        }
    }
}

/// The user name a Handshake's Basic credentials claim, for the audit log (never the
/// password); `None` when they cannot be read.
pub fn claimed_user(metadata: &MetadataMap) -> Option<String> {
    basic_credentials(metadata).ok().map(|(user, _)| user)
}

/// User name and password from `authorization: Basic ...`.
fn basic_credentials(metadata: &MetadataMap) -> Result<(String, String)> {
    let credentials = header(metadata, "Basic ")?;
    let decoded = BASIC
        .decode(credentials)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| unauthenticated("the Basic credentials are not base64 of user:password"))?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or_else(|| unauthenticated("the Basic credentials are not base64 of user:password"))?;
    Ok((user.to_owned(), password.to_owned()))
}

/// An argon2id PHC string for `password`, with a random salt and the crate's default
/// (OWASP-recommended) cost.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters cannot fail")
        .to_string()
}

fn unauthenticated(reason: &str) -> Error {
    Error::Unauthenticated {
        reason: reason.into(),
    }
}

/// The value of the `authorization` header after `scheme`.
fn header<'a>(metadata: &'a MetadataMap, scheme: &str) -> Result<&'a str> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| {
            unauthenticated(&format!(
                "missing 'authorization' header: send '{scheme}...' (pyarrow: authenticate_basic_token, then pass its header in FlightCallOptions)"
            ))
        })?
        .to_str()
        .map_err(|_| unauthenticated("the 'authorization' header is not ASCII"))?;
    value
        .strip_prefix(scheme)
        .or_else(|| {
            // Schemes are case-insensitive (RFC 9110).
            let (s, rest) = value.split_at_checked(scheme.len())?;
            s.eq_ignore_ascii_case(scheme).then_some(rest)
        })
        .ok_or_else(|| unauthenticated(&format!("expected 'authorization: {scheme}...'")))
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    fn meta(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[tokio::test]
    async fn basic_then_bearer_static_tokens_and_expiry() {
        let file = format!(
            "[[users]]\nname = \"alice\"\npassword = \"{}\"\n[[tokens]]\nname = \"ci\"\nsha256 = \"{}\"\n",
            hash_password("s3cret"),
            hex(&Sha256::digest(b"tok-123"))
        );
        let auth = Arc::new(
            Authenticator::from_toml(&file, Duration::from_millis(300), LoginLimits::default())
                .unwrap(),
        );
        let basic =
            |u: &str, p: &str| meta(&format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))));

        let (who, token) = auth
            .handshake(&basic("alice", "s3cret"), None)
            .await
            .unwrap();
        assert_eq!(who.user(), Some("alice"));
        assert_eq!(
            auth.authenticate(&meta(&format!("Bearer {token}")))
                .unwrap()
                .user(),
            Some("alice")
        );
        assert_eq!(
            auth.authenticate(&meta("bearer tok-123")).unwrap().user(),
            Some("ci")
        );

        for (m, needle) in [
            (basic("alice", "wrong"), "wrong user name or password"),
            (basic("mallory", "s3cret"), "wrong user name or password"),
            (meta("Basic !!!"), "not base64"),
            (MetadataMap::new(), "missing 'authorization'"),
        ] {
            let err = auth.handshake(&m, None).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            assert!(err.to_string().contains(needle), "{err}");
        }
        let err = auth.authenticate(&meta("Bearer nope")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        std::thread::sleep(Duration::from_millis(400));
        let err = auth
            .authenticate(&meta(&format!("Bearer {token}")))
            .unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn bad_files_say_what_to_fix() {
        for (file, needle) in [
            ("", "nobody could connect"),
            (
                "[[users]]\nname = \"a\"\npassword = \"plain\"\n",
                "hash-password",
            ),
            (
                "[[tokens]]\nname = \"t\"\nsha256 = \"abc\"\n",
                "64 hex digits",
            ),
            ("[[user]]\nname = \"a\"\n", "unknown field"),
        ] {
            let err =
                Authenticator::from_toml(file, Duration::from_secs(1), LoginLimits::default())
                    .unwrap_err();
            assert!(err.contains(needle), "{file:?}: {err}");
        }
    }
}
