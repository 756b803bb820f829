//! The whole layer fed arbitrary request heads and bodies (method, path, header bytes including
//! `Idempotency-Key` and `Authorization`, body sizes and chunking) and arbitrary response shapes
//! (size; in memory or streamed in frames that may be pending first; with or without
//! `Content-Length`; with or without trailers), read by a "server" to the end or like hyper
//! (stopping at `Content-Length` or the trailers and dropping the body), each sent twice: no
//! panic, every response has a valid status, every answer the layer makes itself is a static
//! problem+json, a recordable response received whole is replayed faithfully (body and
//! trailers) by the next request. The checks live in `tests/common/inputs.rs`, which CI also
//! runs through proptest.
#![no_main]

#[path = "../../tests/common/inputs.rs"]
mod inputs;

use std::sync::OnceLock;

use arbitrary::Arbitrary;

#[derive(Debug, Arbitrary)]
struct Input {
    method: Vec<u8>,
    path: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    keys: Vec<Vec<u8>>,
    authorization: Option<Vec<u8>>,
    /// The body: `body` repeated `repeat` times, so sizes around the 512-byte limit are common.
    body: Vec<u8>,
    repeat: u8,
    chunks: u8,
    response_len: u16,
    /// The response: in memory (0) or in this many frames (mod 8).
    response_chunks: u8,
    response_sized: bool,
    response_trailers: bool,
    response_yields: bool,
    read_like_hyper: bool,
}

thread_local! {
    // One layer and store for the whole run: state carries over between inputs, as in a server.
    static SVC: inputs::Layered = inputs::layered();
}

libfuzzer_sys::fuzz_target!(|input: Input| {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());
    let svc = SVC.with(Clone::clone);
    let body = input.body.repeat(usize::from(input.repeat % 64).max(1));
    let raw = inputs::RawRequest {
        method: input.method,
        path: input.path,
        headers: input.headers,
        keys: input.keys,
        authorization: input.authorization,
        body,
        chunks: input.chunks,
        response_len: input.response_len % 1024,
        response_chunks: input.response_chunks % 8,
        response_sized: input.response_sized,
        response_trailers: input.response_trailers,
        response_yields: input.response_yields,
        read_like_hyper: input.read_like_hyper,
    };
    runtime.block_on(inputs::check_layer(&svc, &raw));
});
