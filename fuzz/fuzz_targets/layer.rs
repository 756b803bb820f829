//! The whole layer fed arbitrary request heads and bodies (method, path, header bytes including
//! `Idempotency-Key` and `Authorization`, body sizes and chunking, response sizes), each sent
//! twice: no panic, every response has a valid status, every answer the layer makes itself is
//! a static problem+json, a recorded response is replayed faithfully. The checks live in
//! `tests/common/inputs.rs`, which CI also runs through proptest.
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
    };
    runtime.block_on(inputs::check_layer(&svc, &raw));
});
