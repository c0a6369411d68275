//! TLS for the Flight port: rustls with TLS 1.3 only by default, ALPN `h2`, optional
//! client certificates, and certificates reloaded without a restart.
//!
//! tonic's `ServerTlsConfig` always allows TLS 1.2, cannot reload and has no client
//! certificate policy, so Quiver builds the rustls `ServerConfig` itself and swaps it
//! whole on reload. Every config shares one session cache and one ticketer, so a client
//! resumes its session across a reload.

use parking_lot::{Mutex, RwLock};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use prometheus::IntGauge;
use rustls::crypto::CryptoProvider;
use rustls::server::{
    ProducesTickets, ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier,
};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Sessions remembered for resumption by session ID (TLS 1.2); TLS 1.3 uses tickets.
const SESSION_CACHE_SIZE: usize = 4096;

/// Lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsVersion {
    /// TLS 1.2 (AEAD cipher suites only: rustls implements no others) and 1.3.
    #[value(name = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    V1_3,
}

/// Whether clients must present a certificate signed by `--tls-client-ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// Handshakes without a valid client certificate fail.
    Required,
    /// Clients may connect without a certificate; one they present must be valid.
    Optional,
}

/// Where the TLS material is and how it is used.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
    /// CA bundle for client certificates, PEM.
    pub client_ca: Option<PathBuf>,
    /// Required or optional client certificates (with `client_ca`).
    pub client_auth: ClientAuth,
    /// Lowest version accepted.
    pub min_version: TlsVersion,
}

/// The current rustls config, rebuilt when its files change.
pub struct TlsReloader {
    settings: TlsSettings,
    provider: Arc<CryptoProvider>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions>,
    current: RwLock<Arc<ServerConfig>>,
    /// Modification times and sizes of the files the current config was built from.
    loaded_from: Mutex<Vec<Option<(SystemTime, u64)>>>,
    /// `quiver_tls_certificate_expiry_timestamp_seconds`: the serving certificate's
    /// notAfter, so alerts can fire before it lapses.
    expiry: IntGauge,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Loads the material; fails with a message naming the bad file.
    pub fn new(settings: TlsSettings) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ticketer =
            rustls::crypto::ring::Ticketer::new().context("creating the TLS session ticketer")?;
        let sessions: Arc<dyn StoresServerSessions> =
            ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
        let stamps = stamps(&settings);
        let (config, not_after) = build(&settings, &provider, &ticketer, &sessions)?;
        let expiry = IntGauge::new(
            "quiver_tls_certificate_expiry_timestamp_seconds",
            "When the serving TLS certificate expires (its notAfter), in Unix seconds.",
        )?;
        expiry.set(not_after);
        Ok(Self {
            settings,
            provider,
            ticketer,
            sessions,
            current: RwLock::new(config),
            loaded_from: Mutex::new(stamps),
            expiry,
        })
    }

    /// The certificate expiry gauge, to register with the server's metrics.
    pub fn expiry_gauge(&self) -> IntGauge {
        self.expiry.clone()
    }

    /// An acceptor for one handshake with the current config.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current.read()))
    }

    /// Rebuilds the config from the files. A file that fails to load keeps the old
    /// config in use and is logged; open connections are never touched.
    pub fn reload(&self) -> bool {
        let stamps = stamps(&self.settings);
        match build(
            &self.settings,
            &self.provider,
            &self.ticketer,
            &self.sessions,
        ) {
            Ok((config, not_after)) => {
                *self.current.write() = config;
                self.expiry.set(not_after);
                *self.loaded_from.lock() = stamps;
                tracing::info!(cert = %self.settings.cert.display(), "TLS material reloaded");
                true
            }
            Err(e) => {
                // Remember the stamps anyway: the bad files are reported once, not on
                // every poll, and a fix (a new write) is picked up.
                *self.loaded_from.lock() = stamps;
                tracing::error!(
                    error = format!("{e:#}"),
                    "TLS reload failed; keeping the previous certificate"
                );
                false
            }
        }
    }

    /// Reloads if any of the files changed since the last load.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.settings);
        if *self.loaded_from.lock() == now {
            return false;
        }
        self.reload()
    }
}

/// A rustls config from the files in `s`, and the leaf certificate's notAfter.
fn build(
    s: &TlsSettings,
    provider: &Arc<CryptoProvider>,
    ticketer: &Arc<dyn ProducesTickets>,
    sessions: &Arc<dyn StoresServerSessions>,
) -> anyhow::Result<(Arc<ServerConfig>, i64)> {
    {
        let certs = read_certs(&s.cert)?;
        let (_, leaf) = x509_parser::parse_x509_certificate(certs[0].as_ref())
            .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", s.cert.display()))?;
        let not_after = leaf.validity().not_after.timestamp();
        let key = PrivateKeyDer::from_pem_file(&s.key).with_context(|| {
            format!(
                "--tls-key {}: no PEM private key could be read",
                s.key.display()
            )
        })?;
        let versions: &[&rustls::SupportedProtocolVersion] = match s.min_version {
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
            TlsVersion::V1_2 => &[&rustls::version::TLS12, &rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(Arc::clone(provider))
            .with_protocol_versions(versions)
            .context("TLS protocol versions")?;
        let builder = match &s.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(ca)? {
                    roots.add(cert).with_context(|| {
                        format!("--tls-client-ca {}: invalid CA certificate", ca.display())
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(provider),
                );
                let verifier = match s.client_auth {
                    ClientAuth::Required => verifier,
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .with_context(|| format!("--tls-client-ca {}", ca.display()))?,
                )
            }
        };
        let mut config = builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "--tls-cert {} / --tls-key {}: the key does not match the certificate, or one is invalid",
                s.cert.display(),
                s.key.display()
            )
        })?;
        // gRPC C++ clients (pyarrow) refuse a server that does not select h2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.ticketer = Arc::clone(ticketer);
        config.session_storage = Arc::clone(sessions);
        Ok((Arc::new(config), not_after))
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{}: cannot read PEM certificates", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: malformed PEM certificate", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate found (expected PEM \"BEGIN CERTIFICATE\")",
        path.display()
    );
    Ok(certs)
}

/// Modification time and size of each file, `None` where it cannot be read. Follows
/// symlinks, so a Kubernetes secret volume (which swaps a `..data` symlink) counts as
/// changed.
fn stamps(s: &TlsSettings) -> Vec<Option<(SystemTime, u64)>> {
    [Some(&s.cert), Some(&s.key), s.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// The subject of a DER client certificate, e.g. `CN=alice,O=Example`.
pub fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.subject().to_string())
}
