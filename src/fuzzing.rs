//! Entry points for the fuzz targets in `tests/fuzz/` and for `tests/fuzz_corpus.rs`, which
//! replays their corpus in every `cargo test`. Each takes arbitrary bytes and drives one of
//! the parsers that read bytes from the network, without sockets. A panic (or a failed
//! assertion here) is a finding. Not an API: hidden from the docs and may change at will.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use crate::protocol::{frame, startup};

/// A fuzz target: the name of its corpus directory and cargo-fuzz binary, and the function.
pub type Target = (&'static str, fn(&[u8]));

/// The fuzz targets.
pub const TARGETS: [Target; 6] = [
    ("frame", frame),
    ("startup", startup),
    ("relay", relay),
    ("scram", scram),
    ("admin", admin),
    ("sql", sql),
];

/// Polls a future that never waits (its reads come from a byte slice).
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a read from a byte slice waited"),
    }
}

/// The frame splitter ([`frame::header`]) over a stream, and the readers of whole backend
/// messages the proxy uses outside the relay (ErrorResponse fields, DataRow, C strings).
pub fn frame(data: &[u8]) {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let limit = [16, 4096, 1 << 20, 0x3fff_ffff][(pick & 3) as usize];
    let whole = pick & 4 != 0;
    while let Ok(Some((tag, total))) = frame::header(rest, limit) {
        assert!(
            (frame::HEADER_LEN..=limit + 1).contains(&total),
            "header gave {total} bytes with limit {limit}"
        );
        if rest.len() < total {
            break;
        }
        let body = &rest[frame::HEADER_LEN..total];
        if whole {
            match tag {
                b'E' | b'N' => {
                    crate::protocol::messages::ErrorFields::parse(body);
                }
                b'D' => {
                    let _ = crate::server::parse_data_row(body);
                }
                _ => {
                    let mut strings = crate::protocol::messages::CStrings(body);
                    while strings.next_str().is_some() {}
                }
            }
        }
        rest = &rest[total..];
    }
}

/// The untagged packets a client sends first: the length word and buffered read
/// ([`startup::read_packet`]), StartupMessage / SSLRequest / GSSENCRequest / CancelRequest
/// ([`startup::parse_packet`]) and the `options` parameter ([`startup::parse_options`]).
pub fn startup(data: &[u8]) {
    let mut wire = data;
    let mut input = crate::protocol::login_input::LoginInput::new();
    let read = block_on(startup::read_packet(&mut wire, &mut input));
    if read.is_ok() {
        let len = i32::from_be_bytes(data[..4].try_into().expect("4 bytes were read")) as usize;
        // What was read past the packet stays buffered, in order: nothing is lost.
        let rest = [input.buffered(), wire].concat();
        assert_eq!(
            &rest[..],
            &data[len..],
            "read_packet lost or reordered bytes"
        );
    }
    if let Ok(startup::StartupPacket::Startup(s)) = startup::parse_packet(data) {
        if let Some(options) = s.get("options") {
            let _ = startup::parse_options(options);
        }
    }
    let _ = startup::parse_options(&String::from_utf8_lossy(data));
}

/// The relay's reading of both streams: client → server scanning with the prepared
/// statement rewriting, server → client reply matching and splicing
/// ([`crate::relay::fuzzing`]).
pub fn relay(data: &[u8]) {
    crate::relay::fuzzing::run(data)
}

/// SCRAM-SHA-256 messages. First byte even: the proxy as SCRAM server (client-first, then
/// client-final after a newline; `%n` in the client-final stands for the exchange's nonce,
/// which the fuzzer cannot guess) and the stored-verifier format. `1` in the low two bits:
/// the proxy as SCRAM client of an upstream (server-first, then server-final after a
/// newline; `%n` in the server-first stands for the client's nonce). `3`: a whole upstream
/// login's Authentication messages ([`upstream_login`]).
pub fn scram(data: &[u8]) {
    use crate::auth::scram::{client_first, Verifier};
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (first, last) = match memchr::memchr(b'\n', rest) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    if pick & 1 == 0 {
        let _ = Verifier::parse(&String::from_utf8_lossy(rest));
        // A cheap verifier (one iteration): the parsing is under test, not PBKDF2.
        let verifier = Verifier {
            iterations: 1,
            salt: b"salt".to_vec(),
            stored_key: [7; 32],
            server_key: [9; 32],
        };
        let Ok(exchange) = client_first(first, &verifier) else {
            return;
        };
        let nonce = exchange
            .server_first()
            .strip_prefix("r=")
            .and_then(|s| s.split(',').next())
            .expect("server-first starts with the nonce")
            .to_owned();
        let last = replace(last, b"%n", nonce.as_bytes());
        let _ = exchange.client_final(&last);
    } else if pick & 2 == 0 {
        upstream_scram(first, last);
    } else {
        upstream_login(rest, pick & 4 != 0);
    }
}

/// What `server.rs` does with an upstream's SASLContinue and SASLFinal: the proxy's own
/// SCRAM client ([`crate::auth::upstream::ScramClient`]).
fn upstream_scram(server_first: &[u8], server_final: &[u8]) {
    use crate::auth::upstream::{ScramClient, ScramKeys};
    let (mut client, first_message) = ScramClient::start();
    // `%n` stands for the client's nonce, which the fuzzer cannot guess.
    let nonce = first_message.rsplit("r=").next().unwrap_or_default();
    let server_first = replace(server_first, b"%n", nonce.as_bytes());
    if client.server_first(&server_first).is_ok() {
        // Keys stand in for a password: the parsing is under test, not PBKDF2.
        let keys = ScramKeys {
            client_key: [3; 32],
            server_key: [5; 32],
        };
        if client.client_final(&keys).is_ok() {
            let _ = client.server_final(server_final);
        }
    }
}

/// What a server login does with the upstream's Authentication messages
/// ([`crate::auth::upstream::UpstreamLogin::answer`]): `data` holds messages separated by
/// newlines, each a code selector byte and the message data; `%n` in the data stands for
/// the proxy's client nonce. `passthrough`: no password, keys a client's login taught (salt
/// `salt`, 4 iterations), else the password `pencil`.
fn upstream_login(data: &[u8], passthrough: bool) {
    use crate::auth::upstream::{Learned, ScramKeys, UpstreamKeys, UpstreamLogin};
    const CODES: [i32; 8] = [0, 3, 5, 10, 11, 12, 7, -1];
    let keys = UpstreamKeys::default();
    let (password, learned) = if passthrough {
        let learned = Learned::Scram {
            salt: b"salt".to_vec(),
            iterations: 4,
            keys: ScramKeys {
                client_key: [3; 32],
                server_key: [5; 32],
            },
        };
        (None, Some(learned))
    } else {
        (Some("pencil"), None)
    };
    let mut login = UpstreamLogin::new("app", password, learned, &keys);
    let mut nonce = Vec::new();
    for line in data.split(|&b| b == b'\n').take(16) {
        let Some((&pick, body)) = line.split_first() else {
            continue;
        };
        let code = CODES[(pick & 7) as usize];
        let body = replace(body, b"%n", &nonce);
        // PBKDF2 for the password: past 1,000 iterations it only costs time.
        if code == 11 && !passthrough {
            let digits = memchr::memmem::find(&body, b",i=")
                .map(|i| {
                    body[i + 3..]
                        .iter()
                        .take_while(|b| b.is_ascii_digit())
                        .count()
                })
                .unwrap_or(0);
            if digits > 3 {
                return;
            }
        }
        let mut out = bytes::BytesMut::new();
        if login.answer(code, &body, &mut out).is_err() {
            return;
        }
        if let Some(i) = memchr::memmem::find(&out, b"n,,n=,r=") {
            nonce = out[i + 8..].to_vec();
        }
    }
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(i) = memchr::memmem::find(rest, from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// The admin console's command parser ([`crate::admin::parse_command`]), on the text of a
/// Query message as the console reads it.
pub fn admin(data: &[u8]) {
    let body = data.strip_suffix(&[0]).unwrap_or(data);
    let sql = String::from_utf8_lossy(body);
    let _ = crate::admin::parse_command(sql.trim());
    let _ = crate::admin::parse_command(&sql);
}

/// The SQL lexer and classifier ([`crate::sql::classify`], [`crate::sql::deallocate`]).
pub fn sql(data: &[u8]) {
    let mut effects = crate::sql::SessionEffects::default();
    let refusal = crate::sql::classify(data, true, false, &mut effects);
    let mut session_effects = crate::sql::SessionEffects::default();
    assert_eq!(
        crate::sql::classify(data, false, false, &mut session_effects),
        None,
        "session mode refuses nothing"
    );
    assert_eq!(
        effects, session_effects,
        "effects do not depend on the mode"
    );
    let _ = refusal;
    let _ = crate::sql::deallocate(data);
}
