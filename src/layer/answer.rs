//! The layer's own answers (`400`, `409`, `413`, `422`, `503`): a [`Problem`] rendered by the
//! configured renderer (or as a gRPC status for a gRPC request), with the retry hints,
//! `Cache-Control: no-store` and the [`Outcome`](crate::Outcome).

use std::time::Duration;

use http::{HeaderMap, Response};
use http_body::Body;

use crate::{
    layer::{
        body::ResponseBody,
        config::{Answers, Config},
    },
    problem::{Problem, ProblemKind},
    secret::Refused,
};

/// The layer's own answer to a request with headers `request`: rendered by the configured
/// renderer, or as a gRPC status for a gRPC request.
pub(crate) fn problem_response<B: Body>(
    answers: &Answers,
    request: &HeaderMap,
    kind: ProblemKind,
    retry_after: Option<Duration>,
) -> Response<ResponseBody<B>> {
    problem_answer(answers, request, Problem::new(kind, retry_after))
}

/// The layer's own answer `problem` to a request with headers `request` (one that says more
/// than its kind: where the route reads a missing key, the rule an invalid key broke, the
/// limit a body passed).
pub(crate) fn problem_answer<B: Body>(
    answers: &Answers,
    request: &HeaderMap,
    problem: Problem,
) -> Response<ResponseBody<B>> {
    let (head, body) = answers.render(problem, crate::grpc::is_grpc(request));
    Response::from_parts(head, ResponseBody::full(body, None))
}

/// The answer to a guarded request the layer refuses for want of a secret the store's other
/// users share: `503` (whatever the store-failure mode: running the request unprotected could
/// run it twice), with an error log naming the cause and the fix.
pub(crate) fn refused_response<B: http_body::Body>(
    config: &Config,
    request: &http::HeaderMap,
    refused: &Refused,
) -> Response<ResponseBody<B>> {
    match refused {
        Refused::NoSecret => tracing::error!(
            "idempotency: refusing the request with 503: the store outlives the process (it is shared by \
             replicas and kept across restarts) and no secret was set. Set the same secret on every \
             replica with `IdempotencyLayer::with_secret(Secret::new(..)?)`"
        ),
        Refused::OtherSecret => tracing::error!(
            key = crate::secret::CHECK_KEY,
            "idempotency: refusing the request with 503: the store was set up with another secret (its \
             secret-check record does not match this layer's). Another replica, or an earlier deployment, \
             uses a different `IdempotencyLayer::with_secret`: give every replica the same secret, or, \
             rotating on purpose with no traffic in flight, delete the check record (see the \
             `tower_idempotency::secret` docs)"
        ),
        Refused::Store(error) => tracing::warn!(%error, "idempotency store failed during the secret check"),
    }
    let retry_after = Some(config.unavailable_retry_after());
    problem_response(&config.answers, request, ProblemKind::StoreUnavailable, retry_after)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{header, response};

    use super::*;
    use crate::Outcome;

    fn render(kind: ProblemKind, retry_after: Option<Duration>) -> (response::Parts, Bytes) {
        Answers::default().render(Problem::new(kind, retry_after), false)
    }

    #[test]
    fn retry_after_headers_round_up_and_saturate() {
        // The rounding itself is `problem`'s (tested there): here, that the headers carry it.
        let cases =
            [(Duration::ZERO, 1, 0), (Duration::from_millis(1500), 2, 1500), (Duration::MAX, u64::MAX, u64::MAX)];
        for (after, secs, ms) in cases {
            let (head, _) = render(ProblemKind::InFlight, Some(after));
            assert_eq!(head.headers[header::RETRY_AFTER], secs.to_string().as_str(), "{after:?}");
            assert_eq!(head.headers[crate::hints::RETRY_AFTER_MS], ms.to_string().as_str(), "{after:?}");
        }
    }

    #[test]
    fn bodies_are_valid_problem_json() {
        for &kind in ProblemKind::ALL {
            let (head, body) = render(kind, None);
            assert_eq!(head.status, kind.status());
            assert_eq!(head.headers[header::CONTENT_TYPE], "application/problem+json");
            assert_eq!(head.headers[header::CACHE_CONTROL], "no-store");
            assert_eq!(head.extensions.get::<Outcome>(), Some(&kind.outcome()));
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["status"], head.status.as_u16());
            assert_eq!(json["type"], kind.type_uri());
            assert!(kind.type_uri().ends_with(&format!("#{}", kind.slug())));
            assert_eq!(json["title"], kind.title());
            assert_eq!(json["detail"], kind.detail());
            assert_eq!(json.as_object().unwrap().len(), 4);
        }
    }

    /// The default bodies are byte for byte those of the releases before renderers existed.
    #[test]
    fn the_default_body_is_unchanged() {
        let (_, body) = render(ProblemKind::InFlight, Some(Duration::from_secs(1)));
        assert_eq!(
            body,
            concat!(
                r#"{"type":"https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html#in-flight","#,
                r#""title":"Request in flight","status":409,"#,
                r#""detail":"A request with this idempotency key is still being processed. Retry later."}"#
            )
        );
    }

    #[test]
    fn hints_by_kind() {
        for &kind in ProblemKind::ALL {
            let (head, _) = render(kind, Some(Duration::from_millis(2500)));
            let get = |name: &str| head.headers.get(name).map(|v| v.to_str().unwrap());
            if kind.is_retryable() {
                assert_eq!((get("retry-after"), get("retry-after-ms")), (Some("3"), Some("2500")), "{kind:?}");
                assert_eq!(get("x-should-retry"), None, "{kind:?}");
            } else {
                assert_eq!((get("retry-after"), get("retry-after-ms")), (None, None), "{kind:?}");
                assert_eq!(get("x-should-retry"), Some("false"), "{kind:?}");
            }
        }
        let retryable: Vec<_> = ProblemKind::ALL.iter().filter(|kind| kind.is_retryable()).collect();
        assert_eq!(
            retryable,
            [&ProblemKind::InFlight, &ProblemKind::StoreUnavailable, &ProblemKind::TransactionFailed]
        );
    }
}
