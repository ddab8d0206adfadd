//! Client authentication: who may log in to the proxy, and how they prove it.
//!
//! Methods: `scram-sha-256` (default), `md5`, `trust`. The password a user is checked against
//! comes from `[users.NAME]`, else `auth_file` ([`auth_file`]), else an `auth_query` lookup
//! on the upstream ([`query`]). Unknown users go through the same exchange as known ones and
//! fail the same way, so a client cannot probe which users exist. Every comparison of a
//! password, proof or key is constant-time. When the proxy knows only a verifier or hash,
//! a successful login teaches it how to log in upstream as that user ([`upstream`]).

pub mod auth_file;
pub mod query;
pub mod rate_limit;
pub mod scram;
pub mod upstream;

use std::fmt;
use std::sync::Arc;

use bytes::BytesMut;
use md5::{Digest, Md5};
use rand::RngExt;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::{is_md5_hash, is_plain_password, AuthType, Config};
use crate::protocol::login_input::LoginInput;
use crate::protocol::{frontend, messages};
use crate::secrets::Password;
use scram::Verifier;
use upstream::{Learned, ScramKeys};

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
    /// The gate refused to check the password (`login_rate_limit` reached meanwhile).
    #[error("too many failed logins")]
    Limited,
}

impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::Failed(_) => "28P01",
            AuthError::UnknownUser(_) => "28000",
            AuthError::Protocol(_) | AuthError::Io(_) => "08P01",
            AuthError::Limited => "53300",
        }
    }
}

/// What the proxy knows to check one user's password.
#[derive(Clone)]
pub struct Secret {
    method: AuthType,
    scram: Option<Verifier>,
    /// `md5` + hex(md5(password + user)), as PostgreSQL stores it.
    md5: Option<String>,
    /// The secret is a hash or verifier, not the password: a successful login teaches the
    /// proxy how to log in upstream as the user (passthrough).
    passthrough: bool,
    /// What it was made from (to keep a derived verifier across reloads).
    source: Option<Password>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("method", &self.method)
            .field("scram", &self.scram.is_some())
            .field("md5", &self.md5.is_some())
            .field("passthrough", &self.passthrough)
            .finish()
    }
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Secret {
    /// A secret from a stored password (plain text, `md5…` hash or `SCRAM-SHA-256$…`
    /// verifier; `None` for a trust user without one) checked with `method`. A plain-text
    /// password is turned into what the method needs here, once (PBKDF2 for SCRAM).
    pub fn new(user: &str, stored: Option<&Password>, method: AuthType) -> Secret {
        let pw = stored.map(|p| p.expose()).filter(|p| !p.is_empty());
        let plain = pw.is_some_and(is_plain_password);
        let scram = match pw {
            Some(p) if plain && method == AuthType::ScramSha256 => Some(Verifier::from_password(p)),
            Some(p) if !plain => Verifier::parse(p),
            _ => None,
        };
        let md5 = match pw {
            Some(p) if is_md5_hash(p) => Some(p.to_ascii_lowercase()),
            Some(p) if plain && method == AuthType::Md5 => {
                Some(format!("md5{}", md5_hex(&[p.as_bytes(), user.as_bytes()])))
            }
            _ => None,
        };
        Secret {
            method,
            scram,
            md5,
            passthrough: pw.is_some() && !plain,
            source: stored.cloned(),
        }
    }

    /// True when the secret can check a password at all (else only `trust` lets it in).
    pub fn usable(&self) -> bool {
        self.scram.is_some() || self.md5.is_some()
    }
}

/// The users listed in the configuration (`[users]` and `auth_file`) and their secrets.
#[derive(Debug, Clone)]
pub struct Credentials {
    users: crate::Map<String, Arc<Secret>>,
    default_method: AuthType,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            users: crate::Map::default(),
            default_method: AuthType::ScramSha256,
        }
    }
}

impl Credentials {
    /// Prepares each listed user's secret. A user whose password and method did not change
    /// since `previous` keeps its secret, so a reload derives no verifier again.
    pub fn from_config(config: &Config, previous: Option<&Credentials>) -> Credentials {
        let mut users = crate::Map::default();
        let names = config.users.keys().chain(config.auth_file_users.keys());
        for name in names {
            let method = config.auth_type_of(name);
            let stored = config.user_password(name);
            if stored.is_none() && method != AuthType::Trust {
                // Listed for its settings only: its password comes from auth_query.
                continue;
            }
            let kept = previous
                .and_then(|p| p.users.get(name))
                .filter(|s| s.method == method && s.source.as_ref() == stored);
            let secret = match kept {
                Some(s) => s.clone(),
                None => Arc::new(Secret::new(name, stored, method)),
            };
            users.insert(name.clone(), secret);
        }
        Credentials {
            users,
            default_method: config.auth_type,
        }
    }

    /// The secret of a listed user.
    pub fn get(&self, user: &str) -> Option<Arc<Secret>> {
        self.users.get(user).cloned()
    }

    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// The method for users with no secret of their own.
    pub fn default_method(&self) -> AuthType {
        self.default_method
    }
}

/// Runs the authentication exchange for `user` against `secret` (`None`: an unknown user,
/// who gets the same exchange as a known one with `default_method` and fails). The client's
/// messages are read through `input`. On success the exchange's last message (SASLFinal),
/// if any, is left in `last` unsent: the caller sends it with AuthenticationOk, in one
/// write. The result is what passthrough learned, if anything. `may_check` is asked just
/// before the client's password or proof is checked (`login_rate_limit`: many logins
/// started at once from one address must not all get their guess checked); when it says
/// no, the exchange ends with [`AuthError::Limited`] and nothing is checked.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &mut LoginInput,
    last: &mut BytesMut,
    secret: Option<&Secret>,
    default_method: AuthType,
    user: &str,
    may_check: &(dyn Fn() -> bool + Sync),
) -> Result<Option<Learned>, AuthError> {
    let method = secret.map(|s| s.method).unwrap_or(default_method);
    let verifier = secret.and_then(|s| s.scram.as_ref());
    let md5 = secret.and_then(|s| s.md5.as_deref());
    let passthrough = secret.is_some_and(|s| s.passthrough);
    match method {
        AuthType::Trust => secret
            .map(|_| None)
            .ok_or_else(|| AuthError::UnknownUser(user.to_owned())),
        // As PostgreSQL: md5 with a SCRAM verifier stored runs SCRAM.
        AuthType::Md5 if md5.is_none() && verifier.is_some() => {
            scram_exchange(stream, input, last, verifier, user, passthrough, may_check).await
        }
        AuthType::Md5 => {
            md5_exchange(stream, input, md5, user, may_check).await?;
            Ok(md5
                .filter(|_| passthrough)
                .map(|h| Learned::Md5(h.to_owned())))
        }
        AuthType::ScramSha256 => {
            scram_exchange(stream, input, last, verifier, user, passthrough, may_check).await
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, buf: BytesMut) -> Result<(), AuthError> {
    stream.write_all(&buf).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one PasswordMessage-family message through `input` and returns its body (the
/// message stays buffered until [`LoginInput::consume`]: `5 + body.len()` bytes). The tag
/// and length are checked before the body is waited for.
async fn read_password_message<'a, S: AsyncRead + Unpin>(
    stream: &mut S,
    input: &'a mut LoginInput,
) -> Result<&'a [u8], AuthError> {
    input.fill(stream, 5).await?;
    let hdr = input.buffered();
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
    let total = len as usize + 1;
    input.fill(stream, total).await?;
    Ok(&input.buffered()[5..total])
}

async fn md5_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &mut LoginInput,
    stored: Option<&str>,
    user: &str,
    may_check: &(dyn Fn() -> bool + Sync),
) -> Result<(), AuthError> {
    let salt: [u8; 4] = rand::rng().random();
    let mut buf = BytesMut::new();
    messages::auth_md5(&mut buf, salt);
    send(stream, buf).await?;
    let body = read_password_message(stream, input).await?;
    let n = 5 + body.len();
    if !may_check() {
        return Err(AuthError::Limited);
    }
    let given = body.strip_suffix(&[0]).unwrap_or(body);
    // An unknown user is checked against a hash nothing matches, at the same cost.
    let known = stored.is_some();
    let stored = stored.unwrap_or("md500000000000000000000000000000000");
    let expected = upstream::md5_answer(stored, salt);
    let right = bool::from(given.ct_eq(expected.as_bytes()));
    input.consume(n);
    if right && known {
        Ok(())
    } else {
        Err(AuthError::Failed(user.to_owned()))
    }
}

async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &mut LoginInput,
    last: &mut BytesMut,
    verifier: Option<&Verifier>,
    user: &str,
    passthrough: bool,
    may_check: &(dyn Fn() -> bool + Sync),
) -> Result<Option<Learned>, AuthError> {
    let known = verifier.is_some();
    let impossible;
    let verifier = match verifier {
        Some(v) => v,
        None => {
            impossible = Verifier::impossible(user);
            &impossible
        }
    };
    let mut buf = BytesMut::new();
    messages::auth_sasl(&mut buf, &[scram::MECHANISM]);
    send(stream, buf).await?;

    // SASLInitialResponse: mechanism\0, i32 length, data.
    let body = read_password_message(stream, input).await?;
    let n = 5 + body.len();
    let mut strings = messages::CStrings(body);
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
    let exchange = scram::client_first(&rest[4..], verifier)
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
    input.consume(n);
    let mut buf = BytesMut::new();
    messages::auth_sasl_continue(&mut buf, exchange.server_first().as_bytes());
    send(stream, buf).await?;

    let body = read_password_message(stream, input).await?;
    let n = 5 + body.len();
    if !may_check() {
        return Err(AuthError::Limited);
    }
    let (server_final, client_key) = exchange.client_final(body).map_err(|e| match e {
        scram::ScramError::WrongPassword => AuthError::Failed(user.to_owned()),
        e => AuthError::Protocol(e.to_string()),
    })?;
    input.consume(n);
    if !known {
        // Unreachable in practice: nothing matches the impossible verifier.
        return Err(AuthError::Failed(user.to_owned()));
    }
    messages::auth_sasl_final(last, server_final.as_bytes());
    Ok(passthrough.then(|| Learned::Scram {
        salt: verifier.salt.clone(),
        iterations: verifier.iterations,
        keys: ScramKeys {
            client_key,
            server_key: verifier.server_key,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_by_stored_form_and_method() {
        let plain = Password::new("pw");
        let s = Secret::new("u", Some(&plain), AuthType::ScramSha256);
        assert!(s.scram.is_some() && s.md5.is_none() && !s.passthrough);
        let s = Secret::new("u", Some(&plain), AuthType::Md5);
        assert_eq!(
            s.md5.as_deref(),
            Some(postgres_protocol::password::md5(b"pw", "u").as_str())
        );
        let v = Password::new(postgres_protocol::password::scram_sha_256(b"pw"));
        let s = Secret::new("u", Some(&v), AuthType::Md5);
        assert!(s.scram.is_some() && s.md5.is_none() && s.passthrough);
        let h = Password::new(
            postgres_protocol::password::md5(b"pw", "u")
                .to_uppercase()
                .replacen("MD5", "md5", 1),
        );
        let s = Secret::new("u", Some(&h), AuthType::ScramSha256);
        assert!(s.scram.is_none() && s.md5.is_some() && s.passthrough);
        assert!(!Secret::new("u", None, AuthType::Trust).usable());
        assert!(!Secret::new("u", Some(&Password::new("")), AuthType::ScramSha256).usable());
    }

    #[test]
    fn debug_shows_no_secret() {
        let s = Secret::new("u", Some(&Password::new("hunter2")), AuthType::Md5);
        let d = format!("{s:?}");
        assert!(
            !d.contains("hunter2") && !d.contains(s.md5.as_deref().unwrap()),
            "{d}"
        );
    }
}
