//! How the proxy proves itself to PostgreSQL when it logs in as a user.
//!
//! - With a plain-text password: cleartext, md5 or SCRAM-SHA-256, whichever the server asks
//!   for. For SCRAM the salted password (PBKDF2, 4,096 iterations by default: milliseconds of
//!   CPU) is derived once per (password, salt, iterations) and kept, so that opening many
//!   server connections, in a login storm or after a failover, does not derive it again each
//!   time.
//! - Without one (the proxy knows only the user's SCRAM verifier or md5 hash, from the
//!   configuration or `auth_query`): **passthrough**. When a client proves its password with
//!   SCRAM, its proof reveals the ClientKey (`ClientKey = ClientProof XOR ClientSignature`,
//!   checked by `H(ClientKey) = StoredKey`); the proxy keeps it with the verifier's ServerKey
//!   and answers the server's SCRAM challenge with them. That works when the server's
//!   verifier has the same salt and iteration count, i.e. is the same verifier (always the
//!   case with `auth_query`). An md5 hash logs in to a server that asks for md5 as the
//!   password would (the hash is what md5 authentication actually uses).
//!
//! The SCRAM client treats the server as untrusted input: its nonce must extend ours and is
//! bounded, salt and iteration count are bounded, and its signature is checked in constant
//! time before the login counts as done.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use postgres_protocol::message::frontend;
use rand::RngExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::protocol::messages::CStrings;
use crate::server::ServerError;

/// Highest iteration count accepted from a server (as the `postgres-protocol` driver): a
/// hostile server could otherwise make each login cost seconds of CPU.
pub const MAX_ITERATIONS: u32 = 100_000;
/// Longest server nonce and salt accepted, in bytes.
const MAX_NONCE: usize = 512;
const MAX_SALT: usize = 256;
/// Salted passwords kept at most; past it the cache starts again (it only saves work).
const MAX_SALTED: usize = 1024;
/// Users whose passthrough secret is kept at most; past it the oldest half is dropped.
const MAX_LEARNED: usize = 100_000;

/// The two keys that stand for a password in SCRAM-SHA-256.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramKeys(***)")
    }
}

/// What a client's login taught the proxy about logging in upstream as that user.
#[derive(Clone, PartialEq, Eq)]
pub enum Learned {
    /// SCRAM keys, valid with this salt and iteration count.
    Scram {
        salt: Vec<u8>,
        iterations: u32,
        keys: ScramKeys,
    },
    /// The md5 hash `md5…` (35 characters).
    Md5(String),
}

impl fmt::Debug for Learned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Learned::Scram { iterations, .. } => write!(f, "Learned::Scram(i={iterations}, ***)"),
            Learned::Md5(_) => f.write_str("Learned::Md5(***)"),
        }
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// SASLprep, as PostgreSQL and libpq apply it: when it fails (not UTF-8, prohibited
/// characters) the password's bytes are used as they are.
fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

/// PBKDF2-HMAC-SHA-256 with one block: SCRAM's `Hi()`.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed = Hmac::<Sha256>::new_from_slice(password).expect("HMAC takes keys of any size");
    let mut mac = keyed.clone();
    mac.update(salt);
    mac.update(&[0, 0, 0, 1]);
    let mut prev: [u8; 32] = mac.finalize().into_bytes().into();
    let mut out = prev;
    for _ in 1..iterations {
        let mut mac = keyed.clone();
        mac.update(&prev);
        prev = mac.finalize().into_bytes().into();
        for (o, p) in out.iter_mut().zip(prev) {
            *o ^= p;
        }
    }
    out
}

impl ScramKeys {
    /// Derives the keys from a plain-text password (the slow part: PBKDF2).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let salted = salted_password(&normalize(password), salt, iterations);
        ScramKeys {
            client_key: hmac(&salted, &[b"Client Key"]),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    pub fn stored_key(&self) -> [u8; 32] {
        Sha256::digest(self.client_key).into()
    }
}

type SaltedKey = (String, Vec<u8>, u32);

/// Upstream login secrets shared by every server connection of the proxy: salted passwords
/// and what clients' logins taught (passthrough). One per proxy; kept across reloads.
#[derive(Default)]
pub struct UpstreamKeys {
    salted: Mutex<HashMap<SaltedKey, ScramKeys>>,
    /// By (user, upstream `host:port`).
    learned: Mutex<HashMap<(String, String), Learned>>,
    derivations: AtomicU64,
    /// Upstreams (`host:port`) that refused the startup parameter `options` (a pooler in
    /// between): logins there go without it (see `server_tcp_keepalive`).
    refuse_options: Mutex<std::collections::HashSet<String>>,
}

impl fmt::Debug for UpstreamKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamKeys")
            .field("derivations", &self.derivations())
            .finish_non_exhaustive()
    }
}

impl UpstreamKeys {
    /// SCRAM keys for `password` with the server's salt and iteration count: derived the
    /// first time, then reused.
    pub fn for_password(&self, password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let key = (password.to_owned(), salt.to_vec(), iterations);
        if let Some(k) = self.lock_salted().get(&key) {
            return *k;
        }
        // Derived outside the lock; two logins racing for a new salt both derive it once.
        let keys = ScramKeys::from_password(password, salt, iterations);
        self.derivations.fetch_add(1, Ordering::Relaxed);
        let mut salted = self.lock_salted();
        if salted.len() >= MAX_SALTED {
            salted.clear();
        }
        salted.insert(key, keys);
        keys
    }

    /// PBKDF2 derivations done so far (each costs `iterations` HMACs).
    pub fn derivations(&self) -> u64 {
        self.derivations.load(Ordering::Relaxed)
    }

    /// Keeps what a client's login taught about logging in as `user` to the upstream server
    /// `upstream` (`host:port`): the same name may have another password, salt or
    /// iteration count on another server.
    pub fn learn(&self, user: &str, upstream: &str, learned: Learned) {
        let key = (user.to_owned(), upstream.to_owned());
        let mut map = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key) == Some(&learned) {
            return;
        }
        if map.len() >= MAX_LEARNED && !map.contains_key(&key) {
            // Bounded memory: forget half (those users' next logins teach it again).
            let drop: Vec<_> = map.keys().take(MAX_LEARNED / 2).cloned().collect();
            for k in drop {
                map.remove(&k);
            }
        }
        map.insert(key, learned);
    }

    /// What a login taught about logging in as `user` to `upstream` (`host:port`).
    pub fn learned(&self, user: &str, upstream: &str) -> Option<Learned> {
        self.learned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(user.to_owned(), upstream.to_owned()))
            .cloned()
    }

    /// True when the upstream `host:port` refused the startup parameter `options`.
    pub fn refuses_options(&self, upstream: &str) -> bool {
        let set = self
            .refuse_options
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        !set.is_empty() && set.contains(upstream)
    }

    /// Records that `upstream` refused `options`; true the first time.
    pub fn note_refuses_options(&self, upstream: &str) -> bool {
        let mut set = self
            .refuse_options
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.insert(upstream.to_owned())
    }

    fn lock_salted(&self) -> std::sync::MutexGuard<'_, HashMap<SaltedKey, ScramKeys>> {
        self.salted.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The client side of one SCRAM-SHA-256 exchange (no channel binding).
pub struct ScramClient {
    nonce: String,
    client_first_bare: String,
    /// Set once the client-final message is sent.
    server_signature: Option<[u8; 32]>,
    /// The server's salt and iteration count, from its first message.
    params: Option<(Vec<u8>, u32, String)>,
}

impl ScramClient {
    /// Starts an exchange; returns the client and the client-first message.
    pub fn start() -> (ScramClient, String) {
        let nonce = B64.encode(rand::rng().random::<[u8; 18]>());
        // The user name is empty: PostgreSQL takes it from the startup packet.
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}");
        (
            ScramClient {
                nonce,
                client_first_bare,
                server_signature: None,
                params: None,
            },
            first,
        )
    }

    /// Reads server-first-message; returns the salt and iteration count the keys need.
    pub fn server_first(&mut self, message: &[u8]) -> Result<(Vec<u8>, u32), String> {
        if message.len() > MAX_NONCE + MAX_SALT * 2 + 64 {
            return Err("SCRAM server-first message is too long".into());
        }
        let msg =
            std::str::from_utf8(message).map_err(|_| "SCRAM server-first message is not UTF-8")?;
        let mut parts = msg.split(',');
        let nonce = parts
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .ok_or("SCRAM server-first message has no nonce")?;
        if nonce.len() <= self.nonce.len()
            || nonce.len() > MAX_NONCE
            || !nonce.starts_with(&self.nonce)
            || !nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err("SCRAM server nonce does not extend the proxy's".into());
        }
        let salt = parts
            .next()
            .and_then(|p| p.strip_prefix("s="))
            .and_then(|s| B64.decode(s).ok())
            .filter(|s| !s.is_empty() && s.len() <= MAX_SALT)
            .ok_or("SCRAM server-first message has no valid salt")?;
        let iterations: u32 = parts
            .next()
            .and_then(|p| p.strip_prefix("i="))
            .and_then(|i| i.parse().ok())
            .filter(|&i| (1..=MAX_ITERATIONS).contains(&i))
            .ok_or_else(|| format!("SCRAM iteration count is missing or above {MAX_ITERATIONS}"))?;
        self.params = Some((salt.clone(), iterations, msg.to_owned()));
        Ok((salt, iterations))
    }

    /// The client-final message proving `keys`.
    pub fn client_final(&mut self, keys: &ScramKeys) -> Result<String, String> {
        let (_, _, server_first) = self
            .params
            .as_ref()
            .ok_or("SCRAM client-final before server-first")?;
        let nonce = server_first
            .split(',')
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .unwrap_or_default();
        // "biws" = base64("n,,"): no channel binding.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, server_first, without_proof
        );
        let signature = hmac(&keys.stored_key(), &[auth_message.as_bytes()]);
        let proof: Vec<u8> = keys
            .client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.server_signature = Some(hmac(&keys.server_key, &[auth_message.as_bytes()]));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final-message: the server proves it knew the verifier.
    pub fn server_final(&self, message: &[u8]) -> Result<(), String> {
        let expected = self
            .server_signature
            .ok_or("SCRAM server-final before client-final")?;
        let msg = std::str::from_utf8(message).map_err(|_| "SCRAM server-final is not UTF-8")?;
        if let Some(e) = msg.strip_prefix("e=") {
            return Err(format!(
                "server refused the SCRAM proof: {}",
                e.chars().take(100).collect::<String>()
            ));
        }
        let v = msg
            .split(',')
            .next()
            .and_then(|p| p.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or("SCRAM server-final has no signature")?;
        if v.len() != 32 || !bool::from(v.ct_eq(&expected)) {
            return Err(
                "the server's SCRAM signature is wrong: it does not know this user's verifier"
                    .into(),
            );
        }
        Ok(())
    }
}

/// `md5` + hex(md5(hex-hash + salt)): the md5 answer, from the stored `md5…` hash.
pub fn md5_answer(md5_hash: &str, salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(md5_hash.as_bytes().get(3..).unwrap_or_default());
    h.update(salt);
    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("md5{digest}")
}

/// One server login's authentication: answers each Authentication request.
pub struct UpstreamLogin<'a> {
    user: &'a str,
    password: Option<&'a str>,
    learned: Option<Learned>,
    keys: &'a UpstreamKeys,
    scram: Option<ScramClient>,
    /// The server's SCRAM signature was verified.
    done: bool,
    /// AuthenticationOk came.
    authenticated: bool,
}

impl<'a> UpstreamLogin<'a> {
    /// `learned` is what passthrough knows for `user` (used when `password` is `None`).
    pub fn new(
        user: &'a str,
        password: Option<&'a str>,
        learned: Option<Learned>,
        keys: &'a UpstreamKeys,
    ) -> Self {
        UpstreamLogin {
            user,
            password,
            learned,
            keys,
            scram: None,
            done: false,
            authenticated: false,
        }
    }

    /// The server said AuthenticationOk (after a verified SCRAM exchange, if one began).
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    fn no_secret(&self, asked: &str) -> ServerError {
        match &self.learned {
            None => ServerError::NoPassword(self.user.to_owned()),
            Some(Learned::Scram { .. }) => ServerError::UnsupportedAuth(format!(
                "the server asks for {asked}, but pgsluice knows only a SCRAM verifier for user \"{}\"; configure a plain password",
                self.user
            )),
            Some(Learned::Md5(_)) => ServerError::UnsupportedAuth(format!(
                "the server asks for {asked}, but pgsluice knows only an md5 hash for user \"{}\"; configure a plain password",
                self.user
            )),
        }
    }

    /// Answers an Authentication message (`code`, `data`) into `out`. Code 0 (Ok) is
    /// accepted only after a SCRAM exchange has been verified, if one started.
    pub fn answer(
        &mut self,
        code: i32,
        data: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), ServerError> {
        let proto = |e: String| ServerError::Protocol(e);
        let io = |e: std::io::Error| ServerError::Protocol(e.to_string());
        // Once SCRAM began, the server may not switch methods (a man in the middle who
        // cannot forge its signature would ask for the password in clear, or its md5
        // hash), nor repeat a step; after AuthenticationOk, nothing more is asked.
        let out_of_turn = self.authenticated
            || match code {
                3 | 5 | 10 => self.scram.is_some(),
                11 | 12 => self.done,
                _ => false,
            };
        if out_of_turn {
            return Err(proto(format!(
                "server sent authentication code {code} out of turn"
            )));
        }
        match code {
            0 => {
                if self.scram.is_some() && !self.done {
                    return Err(proto(
                        "server said AuthenticationOk before finishing SCRAM".into(),
                    ));
                }
                self.authenticated = true;
            }
            3 => {
                let pw = self
                    .password
                    .ok_or_else(|| self.no_secret("a cleartext password"))?;
                frontend::password_message(pw.as_bytes(), out).map_err(io)?;
            }
            5 => {
                let salt: [u8; 4] = data
                    .get(..4)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| proto("short md5 salt".into()))?;
                let answer = match (self.password, &self.learned) {
                    (Some(pw), _) => postgres_protocol::authentication::md5_hash(
                        self.user.as_bytes(),
                        pw.as_bytes(),
                        salt,
                    ),
                    (None, Some(Learned::Md5(hash))) => md5_answer(hash, salt),
                    _ => return Err(self.no_secret("md5")),
                };
                frontend::password_message(answer.as_bytes(), out).map_err(io)?;
            }
            10 => {
                let mut mechs = CStrings(data);
                let mut found = false;
                while let Some(m) = mechs.next_str() {
                    found |= m == b"SCRAM-SHA-256";
                }
                if !found {
                    return Err(ServerError::UnsupportedAuth(
                        "SASL without SCRAM-SHA-256".into(),
                    ));
                }
                if self.password.is_none() && !matches!(self.learned, Some(Learned::Scram { .. })) {
                    return Err(self.no_secret("SCRAM-SHA-256"));
                }
                let (client, first) = ScramClient::start();
                frontend::sasl_initial_response("SCRAM-SHA-256", first.as_bytes(), out)
                    .map_err(io)?;
                self.scram = Some(client);
            }
            11 => {
                let (salt, iterations) = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| proto("unexpected SASLContinue".into()))?
                    .server_first(data)
                    .map_err(proto)?;
                let keys = match (self.password, &self.learned) {
                    (Some(pw), _) => self.keys.for_password(pw, &salt, iterations),
                    (
                        None,
                        Some(Learned::Scram {
                            salt: s,
                            iterations: i,
                            keys,
                        }),
                    ) => {
                        if *s != salt || *i != iterations {
                            return Err(ServerError::UnsupportedAuth(format!(
                                "SCRAM passthrough for user \"{}\": the server's verifier has another salt or iteration count than the one pgsluice checked the client with; give pgsluice the server's verifier or a plain password",
                                self.user
                            )));
                        }
                        *keys
                    }
                    _ => return Err(self.no_secret("SCRAM-SHA-256")),
                };
                let client = self.scram.as_mut().expect("checked above");
                let fin = client.client_final(&keys).map_err(proto)?;
                frontend::sasl_response(fin.as_bytes(), out).map_err(io)?;
            }
            12 => {
                let client = self
                    .scram
                    .as_ref()
                    .ok_or_else(|| proto("unexpected SASLFinal".into()))?;
                client.server_final(data).map_err(proto)?;
                self.done = true;
            }
            other => return Err(ServerError::UnsupportedAuth(format!("code {other}"))),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::{self, Verifier};

    /// Once SCRAM began, a request for another method (the password in clear, md5, SASL
    /// again) is refused with nothing sent; so is AuthenticationOk before the server's
    /// signature, and any request after AuthenticationOk.
    #[test]
    fn a_server_cannot_switch_methods_once_scram_began() {
        let keys = UpstreamKeys::default();
        let mut login = UpstreamLogin::new("app", Some("pencil"), None, &keys);
        login
            .answer(10, b"SCRAM-SHA-256\0\0", &mut BytesMut::new())
            .unwrap();
        for code in [3, 5, 10, 0] {
            let mut out = BytesMut::new();
            assert!(
                login.answer(code, b"salt", &mut out).is_err(),
                "code {code}"
            );
            assert!(out.is_empty(), "code {code} was answered");
        }
        assert!(!login.authenticated());

        let mut trusted = UpstreamLogin::new("app", Some("pencil"), None, &keys);
        trusted.answer(0, b"", &mut BytesMut::new()).unwrap();
        assert!(trusted.authenticated());
        let mut out = BytesMut::new();
        assert!(trusted.answer(3, b"", &mut out).is_err());
        assert!(
            out.is_empty(),
            "the password went out after AuthenticationOk"
        );
    }

    /// Our SCRAM client against our SCRAM server, with keys from a password and from a
    /// client proof (passthrough).
    fn exchange(verifier: &Verifier, keys: &ScramKeys) -> Result<(), String> {
        let (mut client, first) = ScramClient::start();
        let ex = scram::client_first(first.as_bytes(), verifier).map_err(|e| e.to_string())?;
        let (salt, iterations) = client.server_first(ex.server_first().as_bytes())?;
        assert_eq!(
            (salt.as_slice(), iterations),
            (verifier.salt.as_slice(), verifier.iterations)
        );
        let fin = client.client_final(keys)?;
        let (server_final, client_key) =
            ex.client_final(fin.as_bytes()).map_err(|e| e.to_string())?;
        assert_eq!(
            client_key, keys.client_key,
            "the server recovers the ClientKey"
        );
        client.server_final(server_final.as_bytes())
    }

    #[test]
    fn keys_from_a_password_log_in() {
        let v = Verifier::from_password("pässword");
        let keys = ScramKeys::from_password("pässword", &v.salt, v.iterations);
        assert_eq!(keys.stored_key(), v.stored_key);
        assert_eq!(keys.server_key, v.server_key);
        exchange(&v, &keys).unwrap();
        let wrong = ScramKeys::from_password("password", &v.salt, v.iterations);
        assert!(exchange(&v, &wrong).is_err());
    }

    #[test]
    fn the_salted_password_is_derived_once() {
        let k = UpstreamKeys::default();
        let a = k.for_password("pw", b"salt-1", 4096);
        let b = k.for_password("pw", b"salt-1", 4096);
        assert_eq!(a, b);
        assert_eq!(k.derivations(), 1);
        k.for_password("pw", b"salt-2", 4096);
        k.for_password("other", b"salt-1", 4096);
        k.for_password("pw", b"salt-1", 4097);
        assert_eq!(k.derivations(), 4);
    }

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 §3: user "user", password "pencil".
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let keys = ScramKeys::from_password("pencil", &salt, 4096);
        let mut c = ScramClient {
            nonce: "rOprNGfwEbeRWgbNEkqO".into(),
            client_first_bare: "n=user,r=rOprNGfwEbeRWgbNEkqO".into(),
            server_signature: None,
            params: None,
        };
        c.server_first(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            c.client_final(&keys).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        c.server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(c
            .server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G5=")
            .is_err());
    }

    #[test]
    fn hostile_server_first_messages() {
        let (mut c, _) = ScramClient::start();
        let n = c.nonce.clone();
        let huge = format!("r={n}{},s=c2FsdA==,i=4096", "x".repeat(1 << 20));
        assert!(c.server_first(huge.as_bytes()).is_err());
        assert!(c.server_first(b"r=someone-else,s=c2FsdA==,i=4096").is_err());
        assert!(
            c.server_first(format!("r={n},s=c2FsdA==,i=4096").as_bytes())
                .is_err(),
            "nonce must grow"
        );
        assert!(c
            .server_first(format!("r={n}x,s=c2FsdA==,i=100001").as_bytes())
            .is_err());
        assert!(c
            .server_first(format!("r={n}x,s=c2FsdA==,i=0").as_bytes())
            .is_err());
        assert!(c
            .server_first(format!("r={n}x,s=!!,i=4096").as_bytes())
            .is_err());
        assert!(c
            .server_first(format!("r={n}x,s=c2FsdA==,i=4096").as_bytes())
            .is_ok());
    }

    #[test]
    fn md5_answer_matches_a_password_login() {
        let hash = postgres_protocol::password::md5(b"secret", "app");
        let salt = [1, 2, 3, 4];
        assert_eq!(
            md5_answer(&hash, salt),
            postgres_protocol::authentication::md5_hash(b"app", b"secret", salt)
        );
    }

    #[test]
    fn debug_hides_keys() {
        let k = ScramKeys::from_password("pw", b"s", 1);
        assert_eq!(format!("{k:?}"), "ScramKeys(***)");
        assert!(!format!("{:?}", Learned::Md5("md5abc".into())).contains("abc"));
    }
}
