//! Connecting to a Quiver server: the gRPC channel (plain or TLS), logging in, and
//! errors that say what to check.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{FlightClient, HandshakeRequest};
use base64::Engine;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::cli::ClientArgs;

/// A Flight client for `args`, logged in when credentials are given.
pub(super) async fn connect(args: &ClientArgs) -> anyhow::Result<FlightClient> {
    let channel = channel(args).await?;
    let inner = FlightServiceClient::new(channel.clone())
        .max_decoding_message_size(args.max_message_size.0);
    let mut client = FlightClient::new_from_inner(inner);
    if let Some(token) = &args.token {
        client.add_header("authorization", &format!("Bearer {token}"))?;
    } else if let Some(user) = &args.user {
        let password = password(user)?;
        let token = handshake(channel, args, user, &password).await?;
        client.add_header("authorization", &format!("Bearer {token}"))?;
    }
    Ok(client)
}

/// The gRPC channel to `args.server`, connected.
pub(super) async fn channel(args: &ClientArgs) -> anyhow::Result<Channel> {
    let (tls, authority) = match args.server.split_once("://") {
        Some(("grpc" | "http", rest)) => (false, rest),
        Some(("grpc+tls" | "https", rest)) => (true, rest),
        _ => bail!(
            "--server {}: use grpc://HOST:PORT (plain) or grpc+tls://HOST:PORT (TLS)",
            args.server
        ),
    };
    let scheme = if tls { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))
        .with_context(|| format!("--server {} is not a valid address", args.server))?
        .connect_timeout(args.connect_timeout)
        .tcp_nodelay(true);
    if tls {
        endpoint = endpoint.tls_config(tls_config(args)?)?;
    } else if args.tls_ca.is_some() || args.client_cert.is_some() {
        bail!(
            "TLS options were given but --server {} is plain gRPC: use grpc+tls://",
            args.server
        );
    }
    endpoint.connect().await.map_err(|e| {
        let hint = if tls {
            "is Quiver listening there with TLS, and does --tls-ca hold the CA that signed its certificate?"
        } else {
            "is Quiver listening there without TLS? (use grpc+tls:// for a TLS server)"
        };
        anyhow::anyhow!(
            "cannot connect to {}: {} ({hint})",
            args.server,
            error_chain(&e)
        )
    })
}

fn tls_config(args: &ClientArgs) -> anyhow::Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new();
    config = match &args.tls_ca {
        Some(path) => config.ca_certificate(Certificate::from_pem(read(path, "--tls-ca")?)),
        None => config.with_native_roots(),
    };
    if let Some(name) = &args.tls_server_name {
        config = config.domain_name(name.clone());
    }
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        config = config.identity(Identity::from_pem(
            read(cert, "--client-cert")?,
            read(key, "--client-key")?,
        ));
    }
    Ok(config)
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

/// The password of `user`: $QUIVER_PASSWORD, or else the first line of stdin.
fn password(user: &str) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("QUIVER_PASSWORD") {
        return Ok(password);
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password for {user}: ");
    }
    let mut line = String::new();
    stdin.read_line(&mut line).context("reading the password")?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        bail!("no password for --user {user}: set QUIVER_PASSWORD or pipe it on stdin");
    }
    Ok(password)
}

/// Basic handshake; returns the bearer token the server answers with.
async fn handshake(
    channel: Channel,
    args: &ClientArgs,
    user: &str,
    password: &str,
) -> anyhow::Result<String> {
    let mut client =
        FlightServiceClient::new(channel).max_decoding_message_size(args.max_message_size.0);
    let mut request = tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    request
        .metadata_mut()
        .insert("authorization", format!("Basic {basic}").parse()?);
    let response = client
        .handshake(request)
        .await
        .map_err(|e| anyhow::anyhow!("logging in as {user} failed: {}", describe_status(&e)))?;
    let token = response
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    token.ok_or_else(|| {
        anyhow::anyhow!("the server accepted the login but sent no bearer token to use")
    })
}

/// An error from a call, with the status code and what to check.
pub(super) fn call_error(what: &str, error: arrow_flight::error::FlightError) -> anyhow::Error {
    match error {
        arrow_flight::error::FlightError::Tonic(status) => {
            anyhow::anyhow!("{what} failed: {}", describe_status(&status))
        }
        other => anyhow::anyhow!("{what} failed: {other}"),
    }
}

pub(super) fn describe_status(status: &Status) -> String {
    // tonic enforces the request's own `grpc-timeout` on the client side too, and reports
    // it as a cancellation.
    if status.code() == Code::Cancelled && status.message() == "Timeout expired" {
        return "DeadlineExceeded: --timeout expired before the result was complete".into();
    }
    let hint = match status.code() {
        Code::Unauthenticated => " (log in with --user, or pass --token)",
        Code::PermissionDenied => " (this user may not do that)",
        Code::Unavailable => " (the server is unreachable, shutting down or overloaded: retry)",
        Code::DeadlineExceeded => " (a time limit expired: see --timeout and the server's)",
        _ => "",
    };
    let message = status.message();
    let message = if message.is_empty() {
        error_chain(status)
    } else {
        message.to_string()
    };
    format!("{:?}: {message}{hint}", status.code())
}

/// `error` and each of its causes, joined.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// `grpc-timeout` header value for `d` (milliseconds, at most 8 digits).
pub(super) fn grpc_timeout(d: Duration) -> String {
    let ms = d.as_millis().clamp(1, 99_999_999);
    format!("{ms}m")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_fit_the_header() {
        assert_eq!(grpc_timeout(Duration::from_secs(2)), "2000m");
        assert_eq!(grpc_timeout(Duration::from_micros(10)), "1m");
        assert_eq!(grpc_timeout(Duration::from_secs(10_000_000)), "99999999m");
    }
}
