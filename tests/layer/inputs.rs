//! Arbitrary input, in CI: the checks the fuzz targets (`fuzz/`) run, driven by proptest
//! (`tests/common/inputs.rs` says what they check).
//!
//! `PROPTEST_CASES=N cargo test --test layer inputs::` runs more cases (default 512 for the key parser,
//! 256 for the layer).

#[path = "../common/inputs.rs"]
mod checks;

use checks::{MAX_RECORD, MAX_REQUEST_BODY, RawRequest, check_key, check_layer, layered};
use proptest::prelude::*;

fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(default);
    let persistence =
        proptest::test_runner::FileFailurePersistence::Direct("tests/layer/proptest-regressions/inputs.txt");
    ProptestConfig { cases, failure_persistence: Some(Box::new(persistence)), ..ProptestConfig::default() }
}

/// Key-like bytes: mostly near the valid set (visible ASCII, quotes, backslashes, the length
/// limit), some anything at all.
fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(0x20u8..=0x7f, 0..300),
        2 => proptest::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), Just(b'a'), Just(b' '), any::<u8>()], 0..12),
        2 => "[!-~]{250,260}".prop_map(String::into_bytes),
        2 => "\"([ !#-\\[\\]-~]|\\\\\"|\\\\\\\\){0,260}\"".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
    ]
}

fn raw_request() -> impl Strategy<Value = RawRequest> {
    let method = prop_oneof![
        4 => Just(b"POST".to_vec()),
        2 => Just(b"PATCH".to_vec()),
        1 => Just(b"GET".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..8),
    ];
    let path = prop_oneof![
        3 => Just(b"/orders".to_vec()),
        2 => "/[a-z]{0,5}(\\?[a-z=&]{0,8})?".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..16),
    ];
    let header = (
        prop_oneof![
            Just(b"x-status".to_vec()),
            Just(b"idempotency-key".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..8)
        ],
        prop_oneof![Just(b"500".to_vec()), Just(b"200".to_vec()), proptest::collection::vec(any::<u8>(), 0..8)],
    );
    (
        method,
        path,
        proptest::collection::vec(header, 0..3),
        proptest::collection::vec(key_bytes(), 0..3),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(Just(b'b'), MAX_REQUEST_BODY - 2..MAX_REQUEST_BODY + 3),
        ],
        1u8..5,
        prop_oneof![0u16..64, (MAX_RECORD as u16 - 2)..(MAX_RECORD as u16 + 3), 0u16..2048],
        // The response's shape (in memory or in frames, length, trailers, pending frames) and
        // how the server reads it.
        (prop_oneof![Just(0u8), 1u8..5], any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(|(method, path, headers, keys, authorization, body, chunks, response_len, shape)| {
            let (response_chunks, response_sized, response_trailers, response_yields, read_like_hyper) = shape;
            RawRequest {
                method,
                path,
                headers,
                keys,
                authorization,
                body,
                chunks,
                response_len,
                response_chunks,
                response_sized,
                response_trailers,
                response_yields,
                read_like_hyper,
            }
        })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn key_parser_accepts_only_valid_keys_and_both_forms_agree(data in key_bytes()) {
        check_key(&data);
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn the_layer_answers_arbitrary_requests_with_valid_responses(raw in raw_request()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(check_layer(&layered(), &raw));
    }
}

/// The key parser's edge cases, by name.
#[test]
fn key_parser_edges() {
    for input in [
        &b""[..],
        b"\"",
        b"\"\"",
        b"\"\\\"\"",
        b"\"\\\\\"",
        b"\"a\\\"",
        b"\"\"\"",
        b"a\"",
        b"\"a\" ",
        &[b'k'; 255],
        &[b'k'; 256],
        b"\x00",
        b"\xff\xfe",
        // Found by the fuzzer: a key that is a substring of `IdempotencyKey(..)`, which an
        // earlier "Debug does not contain the key" check mistook for a leak.
        b"\"mpotencyKey\"",
    ] {
        check_key(input);
    }
    // A key that starts with a quote can only be sent quoted: bare, it reads as a quoted string.
    let key = tower_idempotency::IdempotencyKey::parse(br#""\"abc""#).unwrap();
    assert_eq!(key.as_str(), "\"abc");
    assert!(tower_idempotency::IdempotencyKey::parse(b"\"abc").is_err());
}
