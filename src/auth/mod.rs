//! Client authentication: who may log in to the proxy, and how they prove it.
//!
//! Methods: `scram-sha-256` (default), `md5`, `trust`. Unknown users go through the same
//! exchange as known ones and fail the same way, so a client cannot probe which users exist.

pub mod scram;

use std::collections::HashMap;

use bytes::BytesMut;
use md5::{Digest, Md5};
use rand::RngExt;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{is_md5_hash, is_plain_password, AuthType, Config};
use crate::protocol::{frontend, messages};
use scram::Verifier;

/// Largest authentication message accepted (PostgreSQL's `PG_MAX_AUTH_TOKEN_LENGTH`).
pub const MAX_AUTH_MESSAGE: usize = 65_535;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("role \"{0}\" is not configured in pgsluice")]
    UnknownUser(String),
    #[error("{0}")]
    Protocol(String),
    #[error("connection closed during authentication")]
    Io(#[from] std::io::Error),
}

impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::Failed(_) => "28P01",
            AuthError::UnknownUser(_) => "28000",
            AuthError::Protocol(_) | AuthError::Io(_) => "08P01",
        }
    }
}

/// What the proxy knows to check one user's password.
#[derive(Debug, Clone)]
struct Secret {
    method: AuthType,
    scram: Option<Verifier>,
    /// `md5` + hex(md5(password + user)), as PostgreSQL stores it.
    md5: Option<String>,
}

/// The users clients may log in as.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    users: HashMap<String, Secret>,
    default_method: Option<AuthType>,
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Credentials {
    /// Prepares verifiers from the config (plain passwords are hashed here, once).
    pub fn from_config(config: &Config) -> Credentials {
        let mut users = HashMap::new();
        for (name, u) in &config.users {
            let method = u.auth_type.unwrap_or(config.auth_type);
            let pw = u.password.as_deref();
            let scram = match (method, pw) {
                (AuthType::ScramSha256, Some(p)) if is_plain_password(p) => {
                    Some(Verifier::from_password(p))
                }
                (AuthType::ScramSha256, Some(p)) => Verifier::parse(p),
                _ => None,
            };
            let md5 = match (method, pw) {
                (AuthType::Md5, Some(p)) if is_md5_hash(p) => Some(p.to_owned()),
                (AuthType::Md5, Some(p)) => {
                    Some(format!("md5{}", md5_hex(&[p.as_bytes(), name.as_bytes()])))
                }
                _ => None,
            };
            users.insert(name.clone(), Secret { method, scram, md5 });
        }
        Credentials {
            users,
            default_method: Some(config.auth_type),
        }
    }

    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }
}

/// Runs the authentication exchange for `user`; on success the caller sends AuthenticationOk.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    creds: &Credentials,
    user: &str,
) -> Result<(), AuthError> {
    let secret = creds.users.get(user);
    let method = secret
        .map(|s| s.method)
        .or(creds.default_method)
        .unwrap_or(AuthType::ScramSha256);
    match method {
        AuthType::Trust => secret
            .map(|_| ())
            .ok_or_else(|| AuthError::UnknownUser(user.to_owned())),
        AuthType::Md5 => md5_exchange(stream, secret.and_then(|s| s.md5.as_deref()), user).await,
        AuthType::ScramSha256 => {
            let verifier = secret.and_then(|s| s.scram.clone());
            let known = verifier.is_some();
            scram_exchange(stream, verifier.unwrap_or_else(Verifier::impossible), user).await?;
            // Only reachable with a real verifier; kept explicit for clarity.
            if known {
                Ok(())
            } else {
                Err(AuthError::Failed(user.to_owned()))
            }
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, buf: BytesMut) -> Result<(), AuthError> {
    stream.write_all(&buf).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one PasswordMessage-family message with exact reads; returns its body.
async fn read_password_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, AuthError> {
    let mut hdr = [0u8; 5];
    stream.read_exact(&mut hdr).await?;
    if hdr[0] != frontend::PASSWORD {
        return Err(AuthError::Protocol(format!(
            "expected a password message, got message type {:?}",
            hdr[0] as char
        )));
    }
    let len = i32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
    if !(4..=MAX_AUTH_MESSAGE as i32).contains(&len) {
        return Err(AuthError::Protocol(format!(
            "invalid password message length {len}"
        )));
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

async fn md5_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    stored: Option<&str>,
    user: &str,
) -> Result<(), AuthError> {
    let salt: [u8; 4] = rand::rng().random();
    let mut buf = BytesMut::new();
    messages::auth_md5(&mut buf, salt);
    send(stream, buf).await?;
    let body = read_password_message(stream).await?;
    let given = body.strip_suffix(&[0]).unwrap_or(&body);
    let stored = stored.unwrap_or("md5-no-such-user-00000000000000000");
    let expected = format!(
        "md5{}",
        md5_hex(&[stored.as_bytes().get(3..).unwrap_or_default(), &salt])
    );
    if bool::from(given.ct_eq(expected.as_bytes())) && stored.len() == 35 {
        Ok(())
    } else {
        Err(AuthError::Failed(user.to_owned()))
    }
}

async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    verifier: Verifier,
    user: &str,
) -> Result<(), AuthError> {
    let mut buf = BytesMut::new();
    messages::auth_sasl(&mut buf, &[scram::MECHANISM]);
    send(stream, buf).await?;

    // SASLInitialResponse: mechanism\0, i32 length, data.
    let body = read_password_message(stream).await?;
    let mut strings = messages::CStrings(&body);
    let mechanism = strings
        .next_str()
        .ok_or_else(|| AuthError::Protocol("malformed SASLInitialResponse".into()))?;
    if mechanism != scram::MECHANISM.as_bytes() {
        return Err(AuthError::Protocol(format!(
            "SASL mechanism {:?} is not supported; use SCRAM-SHA-256",
            String::from_utf8_lossy(mechanism)
        )));
    }
    let rest = strings.0;
    if rest.len() < 4 {
        return Err(AuthError::Protocol("malformed SASLInitialResponse".into()));
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if len < 0 || len as usize != rest.len() - 4 {
        return Err(AuthError::Protocol("malformed SASLInitialResponse".into()));
    }
    let (server_first, exchange) = scram::client_first(&rest[4..], verifier)
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
    let mut buf = BytesMut::new();
    messages::auth_sasl_continue(&mut buf, server_first.as_bytes());
    send(stream, buf).await?;

    let body = read_password_message(stream).await?;
    let server_final = exchange.client_final(&body).map_err(|e| match e {
        scram::ScramError::WrongPassword => AuthError::Failed(user.to_owned()),
        e => AuthError::Protocol(e.to_string()),
    })?;
    let mut buf = BytesMut::new();
    messages::auth_sasl_final(&mut buf, server_final.as_bytes());
    send(stream, buf).await
}
