//! The offline dictionary attack on what a store keeps: a reader of a Redis dump or a database
//! backup who knows the user name, the route and the shape of the body, and has a dictionary
//! that holds the password (10⁴ words) and every 4-digit PIN (10⁴), tests each guess against
//! every digest in the dump, computed as the layer computed them before they were keyed: a
//! SHA-256 of the `Authorization` header (the scope) and a SHA-256 of the length-prefixed
//! method, path, query and body (the fingerprint).
//!
//! [`attack`] on [`unkeyed_dump`] (the digests as they were stored before) recovers both: the
//! control that the attack works, so that its failure on a store's contents means something.
#![allow(dead_code, unreachable_pub)]

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};
use tower_idempotency::RequestBody;

pub const USER: &str = "alice";
/// The size of each dictionary: passwords and PINs.
pub const WORDS: usize = 10_000;
/// Alice's password is the 7319th word of the dictionary.
pub const PASSWORD: usize = 7319;
/// The PIN in her request's body.
pub const PIN: usize = 4831;
pub const PATH: &str = "/transfers";

pub fn password(i: usize) -> String {
    format!("tulip-{i:04}")
}

pub fn credential(password: &str) -> String {
    format!("Basic {}", base64(format!("{USER}:{password}").as_bytes()))
}

pub fn body(pin: usize) -> String {
    format!(r#"{{"to":"bob","amount":25,"pin":"{pin:04}"}}"#)
}

/// Alice's request, with key `key`: her `Basic` credential, her PIN in the body.
pub fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post(PATH)
        .header("idempotency-key", key)
        .header("authorization", credential(&password(PASSWORD)))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body(PIN))))
        .unwrap()
}

/// A handler that counts its runs and answers `201` without echoing anything of the request.
pub fn handler(
    runs: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<RequestBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let mut response = Response::new(Full::new(Bytes::from(format!(r#"{{"transfer":"tr_{n}"}}"#))));
            *response.status_mut() = StatusCode::CREATED;
            Ok(response)
        }
    })
}

/// What the attack found.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered {
    pub password: Option<String>,
    pub pin: Option<String>,
}

/// Runs both dictionaries against every digest in `dump` (each element a key name, a value or
/// a column as stored): every 32-byte window, and every 64-hex-digit window decoded.
pub fn attack(dump: &[Vec<u8>]) -> Recovered {
    let mut digests = HashSet::new();
    for item in dump {
        for window in item.windows(32) {
            digests.insert(<[u8; 32]>::try_from(window).unwrap());
        }
        for window in item.windows(64) {
            if let Some(decoded) = unhex(window) {
                digests.insert(decoded);
            }
        }
    }
    let password = (0..WORDS).map(password).find(|p| digests.contains(&sha256(credential(p).as_bytes())));
    let pin = (0..WORDS).find(|&pin| digests.contains(&unkeyed_fingerprint(&body(pin)))).map(|pin| format!("{pin:04}"));
    Recovered { password, pin }
}

/// Whether `dump` holds the secrets in clear: the password, the credential, the PIN field.
pub fn in_clear(dump: &[Vec<u8>]) -> bool {
    let needles = [password(PASSWORD), credential(&password(PASSWORD)), format!(r#""pin":"{PIN:04}""#)];
    dump.iter().any(|item| needles.iter().any(|n| item.windows(n.len()).any(|w| w == n.as_bytes())))
}

/// What the store kept before the digests were keyed: the scope in hex (as in a Redis key
/// name) and the fingerprint's bytes.
pub fn unkeyed_dump() -> Vec<Vec<u8>> {
    let scope = sha256(credential(&password(PASSWORD)).as_bytes());
    let hex: String = scope.iter().map(|b| format!("{b:02x}")).collect();
    vec![format!("idem:{hex}:k1").into_bytes(), unkeyed_fingerprint(&body(PIN)).to_vec()]
}

/// The fingerprint as the layer computed it unkeyed: SHA-256 over the length-prefixed method,
/// path, query (none) and body.
fn unkeyed_fingerprint(body: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in [b"POST".as_slice(), PATH.as_bytes(), b"\x00none", body.as_bytes()] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn unhex(window: &[u8]) -> Option<[u8; 32]> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in window.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn the_attack_recovers_both_from_unkeyed_digests() {
    assert_eq!(base64(b"Aladdin:open sesame"), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    let found = attack(&unkeyed_dump());
    assert_eq!(found, Recovered { password: Some(password(PASSWORD)), pin: Some(format!("{PIN:04}")) });
}
