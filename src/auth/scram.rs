//! Server side of SCRAM-SHA-256 (RFC 5802, RFC 7677), as PostgreSQL speaks it.
//!
//! The proxy keeps only verifiers (`SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`, the format
//! of `pg_authid.rolpassword`); a plain-text password in the config is turned into one at
//! load. Channel binding (`-PLUS`) is not offered: it needs TLS on the client side.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

pub const MECHANISM: &str = "SCRAM-SHA-256";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported without TLS")]
    ChannelBinding,
    #[error("password does not match")]
    WrongPassword,
}

/// What the proxy stores to check a password without knowing it.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier(i={}, ***)", self.iterations)
    }
}

impl Verifier {
    /// Parses the `pg_authid` format.
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iter.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A verifier for a plain-text password (random salt, 4096 iterations, SASLprep applied).
    pub fn from_password(password: &str) -> Verifier {
        let s = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Verifier::parse(&s).expect("postgres-protocol produces well-formed verifiers")
    }

    /// A verifier nothing matches, for a user that does not exist: the exchange then looks
    /// the same from outside whether the user exists or not (PostgreSQL's mock
    /// authentication). Its salt is the same at every attempt for one name (an HMAC of the
    /// name under a key drawn at start), as a real user's is: a salt that changed from one
    /// attempt to the next would tell that the user does not exist.
    pub fn impossible(user: &str) -> Verifier {
        static MOCK_KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let key = MOCK_KEY.get_or_init(|| rand::rng().random());
        let mut rng = rand::rng();
        Verifier {
            iterations: 4096,
            salt: hmac(key, &[user.as_bytes()])[..16].to_vec(),
            stored_key: rng.random(),
            server_key: rng.random(),
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

/// The exchange after the server-first message was made.
///
/// One string holds the AuthMessage as it grows: client-first-message-bare, `,`,
/// server-first-message, then (at the client's final message) `,` and
/// client-final-message-without-proof. Built once per login, without `format!`.
#[derive(Debug)]
pub struct Exchange {
    stored_key: [u8; 32],
    server_key: [u8; 32],
    auth_message: String,
    /// Where the server-first message is in `auth_message`.
    server_first: std::ops::Range<usize>,
    /// Where the combined nonce (client's, then the proxy's) is in `auth_message`.
    nonce: std::ops::Range<usize>,
    /// The `c=` the client-final message must carry: its first message's GS2 header in
    /// base64 (`biws` for `n,,`, `eSws` for `y,,`).
    binding: &'static str,
}

/// Handles client-first-message; returns the exchange, whose
/// [`Exchange::server_first`] is the message to send.
pub fn client_first(message: &[u8], verifier: &Verifier) -> Result<Exchange, ScramError> {
    let msg = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    // gs2-header: cbind-flag "," [authzid] ","
    let (flag, rest) = msg
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    let binding = match flag {
        "n" => "biws",
        "y" => "eSws",
        f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("bad channel binding flag")),
    };
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    if !authzid.is_empty() {
        return Err(ScramError::Malformed(
            "authorization identity is not supported",
        ));
    }
    let mut client_nonce = None;
    for attr in bare.split(',') {
        if let Some(r) = attr.strip_prefix("r=") {
            client_nonce = Some(r);
        } else if attr.starts_with("m=") {
            return Err(ScramError::Malformed(
                "mandatory extensions are not supported",
            ));
        }
    }
    let client_nonce = client_nonce
        .filter(|n| !n.is_empty())
        .ok_or(ScramError::Malformed("no client nonce"))?;
    if !client_nonce
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
    {
        return Err(ScramError::Malformed("bad client nonce"));
    }
    // bare "," "r=" nonce "," "s=" salt "," "i=" iterations, then room for the client's
    // final message without its proof (c=biws,r=nonce: about the nonce again).
    let nonce_len = client_nonce.len() + 24;
    let mut auth = String::with_capacity(bare.len() + 2 * nonce_len + verifier.salt.len() * 2 + 40);
    auth.push_str(bare);
    auth.push(',');
    let first_start = auth.len();
    auth.push_str("r=");
    let nonce_start = auth.len();
    auth.push_str(client_nonce);
    B64.encode_string(rand::rng().random::<[u8; 18]>(), &mut auth);
    let nonce = nonce_start..auth.len();
    auth.push_str(",s=");
    B64.encode_string(&verifier.salt, &mut auth);
    auth.push_str(",i=");
    let mut digits = [0u8; 10];
    auth.push_str(decimal(verifier.iterations, &mut digits));
    Ok(Exchange {
        stored_key: verifier.stored_key,
        server_key: verifier.server_key,
        server_first: first_start..auth.len(),
        auth_message: auth,
        nonce,
        binding,
    })
}

/// `n` in decimal, in `buf`.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

impl Exchange {
    /// The server-first message to send.
    pub fn server_first(&self) -> &str {
        &self.auth_message[self.server_first.clone()]
    }

    /// Handles client-final-message; when the proof is right, returns server-final-message
    /// and the ClientKey the proof revealed (`ClientProof XOR ClientSignature`), which lets
    /// the proxy log in upstream as the client (passthrough).
    pub fn client_final(mut self, message: &[u8]) -> Result<(String, [u8; 32]), ScramError> {
        let msg = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        // The GS2 header of the first message again, in base64: no channel binding data,
        // and the same flag (a changed flag is what a downgrade would look like).
        match channel {
            Some(c) if c == self.binding => {}
            Some("biws" | "eSws") => {
                return Err(ScramError::Malformed(
                    "channel binding flag differs from the first message",
                ))
            }
            _ => return Err(ScramError::ChannelBinding),
        }
        if nonce != Some(&self.auth_message[self.nonce.clone()]) {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        // 32 bytes are 44 base64 characters; the decoder wants room for its estimate.
        let mut proof_bytes = [0u8; 36];
        let proof = match B64.decode_slice(proof, &mut proof_bytes) {
            Ok(32) => &proof_bytes[..32],
            Ok(_) | Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
                return Err(ScramError::Malformed("proof has the wrong length"))
            }
            Err(_) => return Err(ScramError::Malformed("proof is not base64")),
        };
        self.auth_message.push(',');
        self.auth_message.push_str(without_proof);
        let auth_message = self.auth_message.as_bytes();
        let signature = hmac(&self.stored_key, &[auth_message]);
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(signature)) {
            *k = p ^ s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(stored.ct_eq(&self.stored_key)) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.server_key, &[auth_message]);
        let mut server_final = String::with_capacity(46);
        server_final.push_str("v=");
        B64.encode_string(server_signature, &mut server_final);
        Ok((server_final, client_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// A full exchange against the SCRAM client PostgreSQL drivers in Rust use.
    fn round_trip(stored_password: &str, client_password: &str) -> Result<(), ScramError> {
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let first = client.message().to_vec();
        let ex = client_first(&first, &Verifier::from_password(stored_password))?;
        client
            .update(ex.server_first().as_bytes())
            .expect("client accepts server-first");
        let fin = client.message().to_vec();
        let (server_final, _) = ex.client_final(&fin)?;
        client
            .finish(server_final.as_bytes())
            .expect("client verifies the server signature");
        Ok(())
    }

    #[test]
    fn right_and_wrong_password() {
        assert_eq!(round_trip("s3cret", "s3cret"), Ok(()));
        assert_eq!(
            round_trip("s3cret", "guess"),
            Err(ScramError::WrongPassword)
        );
    }

    /// A client that supports channel binding but was not offered it (`y,,`) logs in; a
    /// final message whose `c=` does not repeat the first message's flag is refused.
    #[test]
    fn the_binding_flag_must_match_the_first_message() {
        let v = Verifier::from_password("s3cret");
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unrequested());
        let ex = client_first(client.message(), &v).unwrap();
        client.update(ex.server_first().as_bytes()).unwrap();
        let fin = client.message().to_vec();
        assert!(fin.starts_with(b"c=eSws,"));
        ex.client_final(&fin).expect("y,, then c=eSws");

        for (first, binding) in [(b"n,,n=,r=abc", "eSws"), (b"y,,n=,r=abc", "biws")] {
            let ex = client_first(first, &v).unwrap();
            let nonce = ex.server_first()[2..].split(',').next().unwrap().to_owned();
            let proof = B64.encode([0u8; 32]);
            assert_eq!(
                ex.client_final(format!("c={binding},r={nonce},p={proof}").as_bytes())
                    .unwrap_err(),
                ScramError::Malformed("channel binding flag differs from the first message")
            );
        }
    }

    #[test]
    fn impossible_verifier_rejects() {
        let mut client = ScramSha256::new(b"anything", ChannelBinding::unsupported());
        let ex = client_first(client.message(), &Verifier::impossible("nobody")).unwrap();
        client.update(ex.server_first().as_bytes()).unwrap();
        assert_eq!(
            ex.client_final(client.message()).unwrap_err(),
            ScramError::WrongPassword
        );
    }

    /// An unknown user's salt does not change from one attempt to the next (a real user's
    /// does not either), and differs between names.
    #[test]
    fn an_unknown_users_salt_is_stable() {
        let a = Verifier::impossible("ghost");
        assert_eq!(a.salt, Verifier::impossible("ghost").salt);
        assert_eq!(a.salt.len(), 16);
        assert_ne!(a.salt, Verifier::impossible("phantom").salt);
    }

    /// RFC 7677 §3's verifier parsed from the pg_authid form.
    #[test]
    fn parses_pg_authid_form() {
        let v = Verifier::parse("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=").unwrap();
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt.len(), 16);
        assert!(Verifier::parse("SCRAM-SHA-256$x:salt$a:b").is_none());
        assert!(Verifier::parse("md5abc").is_none());
    }

    #[test]
    fn malformed_messages() {
        let v = &Verifier::impossible("nobody");
        assert!(client_first(b"", v).is_err());
        assert!(client_first(b"n,,n=,", v).is_err());
        assert_eq!(
            client_first(b"p=tls-server-end-point,,n=,r=abc", v).unwrap_err(),
            ScramError::ChannelBinding
        );
        assert!(client_first(b"n,a=bob,n=,r=abc", v).is_err());
        let ex = client_first(b"n,,n=,r=abc", v).unwrap();
        assert!(ex.client_final(b"c=biws,r=wrong,p=AAAA").is_err());
        assert!(client_first(&[0xff, 0xfe], v).is_err());
    }

    /// The proof must be 32 bytes of base64; the nonce the combined one.
    #[test]
    fn proofs_of_the_wrong_form() {
        let v = &Verifier::impossible("nobody");
        let fin = |proof: &str| {
            let ex = client_first(b"n,,n=,r=abc", v).unwrap();
            let nonce = ex.server_first()[2..].split(',').next().unwrap().to_owned();
            ex.client_final(format!("c=biws,r={nonce},p={proof}").as_bytes())
        };
        let b64 = |n: usize| B64.encode(vec![1u8; n]);
        assert_eq!(
            fin(&b64(31)).unwrap_err(),
            ScramError::Malformed("proof has the wrong length")
        );
        assert_eq!(
            fin(&b64(33)).unwrap_err(),
            ScramError::Malformed("proof has the wrong length")
        );
        assert_eq!(
            fin(&b64(64)).unwrap_err(),
            ScramError::Malformed("proof has the wrong length")
        );
        assert_eq!(
            fin("!!!!").unwrap_err(),
            ScramError::Malformed("proof is not base64")
        );
        assert_eq!(fin(&b64(32)).unwrap_err(), ScramError::WrongPassword);
    }

    /// server-first-message: the client's nonce extended by 24 base64 characters, the
    /// salt, the iterations in decimal.
    #[test]
    fn server_first_form() {
        let v = Verifier {
            iterations: 4096,
            salt: b"0123456789abcdef".to_vec(),
            stored_key: [1; 32],
            server_key: [2; 32],
        };
        let ex = client_first(b"n,,n=,r=clientnonce", &v).unwrap();
        let first = ex.server_first();
        let (nonce, rest) = first
            .strip_prefix("r=clientnonce")
            .unwrap()
            .split_once(',')
            .unwrap();
        assert_eq!(nonce.len(), 24, "{first}");
        assert_eq!(
            rest,
            format!("s={},i=4096", B64.encode(b"0123456789abcdef"))
        );
        let mut digits = [0; 10];
        for n in [0, 1, 9, 10, 4096, 99_999, u32::MAX] {
            assert_eq!(decimal(n, &mut digits), n.to_string());
        }
    }
}
