//! Which outcomes are worth another attempt, in one place; and reading the server's wait
//! (`retry-after-ms`, `Retry-After`).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header::RETRY_AFTER};

use crate::headers::{RETRY_AFTER_MS, STRIPE_SHOULD_RETRY, X_SHOULD_RETRY};

/// What one attempt produced, as a [`Classify`] sees it: a response head, or the inner
/// service's error.
///
/// Only the status and headers are shown, never the body, so a classifier works with every
/// body type and never needs to read (and so consume) a response.
#[derive(Debug)]
pub enum Attempt<'a, E> {
    /// The server answered.
    Response {
        /// The response's status.
        status: StatusCode,
        /// The response's headers.
        headers: &'a HeaderMap,
    },
    /// No response: the client failed to send the request or to read the response head
    /// (connection refused or reset, a timeout layer fired, ...).
    Error(&'a E),
}

// Manual impls: `derive` would require `E: Clone`, but only a reference to `E` is held.
impl<E> Clone for Attempt<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for Attempt<'_, E> {}

impl<'a, E> Attempt<'a, E> {
    /// The attempt that produced `result`.
    pub fn of<B>(result: &'a Result<http::Response<B>, E>) -> Self {
        match result {
            Ok(response) => Self::Response { status: response.status(), headers: response.headers() },
            Err(error) => Self::Error(error),
        }
    }
}

/// Whether an attempt's result should be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classification {
    /// A transient failure: another attempt, with the same key, may succeed.
    Retry,
    /// Hand this result to the caller: a success, or a failure that repeating cannot fix.
    Done,
}

/// Classifies an [`Attempt`] as worth retrying or not.
///
/// Implemented by [`DefaultClassifier`] and by every closure
/// `Fn(Attempt<'_, E>) -> Classification`. A closure can add cases and fall back on the
/// default for the rest:
///
/// ```
/// use http::StatusCode;
/// use tower_idempotency::client::{Classification, Classify, DefaultClassifier, Attempt, RetryPolicy};
///
/// // Also retry this API's "402 wallet busy", whatever the default thinks.
/// let classify = |attempt: Attempt<'_, std::io::Error>| match attempt {
///     Attempt::Response { status: StatusCode::PAYMENT_REQUIRED, .. } => Classification::Retry,
///     other => DefaultClassifier.classify(other),
/// };
/// let policy = RetryPolicy::new().with_classifier(classify);
/// # let _ = policy;
/// ```
///
/// A classifier is a pure function of the attempt: the policy, not the classifier, applies
/// the attempt and time bounds, the backoff and `Retry-After`.
pub trait Classify<E> {
    /// Retry, or hand the result to the caller.
    fn classify(&self, attempt: Attempt<'_, E>) -> Classification;
}

impl<E, F> Classify<E> for F
where
    F: Fn(Attempt<'_, E>) -> Classification,
{
    fn classify(&self, attempt: Attempt<'_, E>) -> Classification {
        self(attempt)
    }
}

/// The default classification: retry what a server running this crate's layer (or any server
/// following the IETF `Idempotency-Key` draft) says is transient.
///
/// | outcome | retried | why |
/// | --- | --- | --- |
/// | an error (no response) | yes | the request may or may not have run; the key makes a retry safe either way |
/// | a response with `x-should-retry: false` or `Stripe-Should-Retry: false` | no | the server says a retry cannot help (this crate's layer says so on its final answers) |
/// | `408 Request Timeout` | yes | the server gave up waiting for the request |
/// | `409 Conflict` with `Retry-After` or `retry-after-ms` | yes | a request with this key is still in flight; its result will be replayed |
/// | `409 Conflict` without either | no | the first response was not retained (too large): repeating gets the same `409` |
/// | `425 Too Early` | yes | the server asks to repeat the request after the TLS handshake |
/// | `429 Too Many Requests` | yes | rate limited; `Retry-After` says when to come back |
/// | `5xx` | yes | a server-side failure, which the server layer never records, so a retry runs again |
/// | any other status | no | a success, a redirect, or a client error (`400` invalid key, `422` key reused with another request, ...) that repeating cannot fix |
///
/// `x-should-retry: true` (or Stripe's) does not make a final status transient: the rows above
/// decide. A classifier of your own can trust it (see [`Classify`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultClassifier;

impl<E> Classify<E> for DefaultClassifier {
    fn classify(&self, attempt: Attempt<'_, E>) -> Classification {
        let (status, headers) = match attempt {
            Attempt::Error(_) => return Classification::Retry,
            Attempt::Response { status, headers } => (status, headers),
        };
        if should_not_retry(headers) {
            return Classification::Done;
        }
        let transient = match status {
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS => true,
            StatusCode::CONFLICT => headers.contains_key(RETRY_AFTER) || headers.contains_key(RETRY_AFTER_MS),
            status => status.is_server_error(),
        };
        if transient { Classification::Retry } else { Classification::Done }
    }
}

/// Whether the server said a retry cannot help: `x-should-retry: false` (the
/// Stainless-generated SDKs' header) or `Stripe-Should-Retry: false`.
fn should_not_retry(headers: &HeaderMap) -> bool {
    [X_SHOULD_RETRY, STRIPE_SHOULD_RETRY]
        .iter()
        .any(|name| headers.get_all(name).iter().any(|value| value.as_bytes().eq_ignore_ascii_case(b"false")))
}

/// How long a response asks the client to wait, measured from `now`: its `retry-after-ms`,
/// else its `Retry-After`.
///
/// `retry-after-ms` (sent by this crate's layer, read by the Stainless-generated SDKs) is a
/// non-negative number of milliseconds, possibly with a fraction (`1500`, `250.5`); it is
/// read first, for its precision. Both forms of `Retry-After` (RFC 9110 section 10.2.3) are
/// read: delta-seconds (`Retry-After: 120`) and an HTTP-date
/// (`Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`). A date is compared with `now`, which the
/// policy takes from the system clock ([`SystemTime::now`]), since that is the clock the
/// server's date refers to; a date in the past means "now" (zero).
///
/// A header that is repeated with different values, or unreadable, is ignored. `None` when
/// neither says anything readable.
#[must_use]
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = single(headers, &RETRY_AFTER_MS).and_then(parse_retry_after_ms) {
        return Some(ms);
    }
    parse_retry_after(single(headers, &RETRY_AFTER)?, now)
}

/// The value of `name`, when it is sent once (or repeated with one value).
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.any(|other| other != first) {
        return None;
    }
    Some(first)
}

/// `retry-after-ms`: digits, optionally a `.` and more digits. A value too large for a
/// `Duration` is still "a very long time".
fn parse_retry_after_ms(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) {
        return None;
    }
    let ms: f64 = text.parse().ok()?;
    Some(Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX))
}

fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Delta-seconds too large for a u64 is still "a very long time".
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Error = &'static str;

    fn classify_status(status: u16, retry_after: Option<&str>) -> Classification {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        }
        let status = StatusCode::from_u16(status).unwrap();
        Classify::<Error>::classify(&DefaultClassifier, Attempt::Response { status, headers: &headers })
    }

    #[test]
    fn errors_are_retried() {
        assert_eq!(DefaultClassifier.classify(Attempt::Error(&"connection reset")), Classification::Retry);
    }

    #[test]
    fn transient_statuses_are_retried() {
        for status in [408, 425, 429, 500, 501, 502, 503, 504, 599] {
            assert_eq!(classify_status(status, None), Classification::Retry, "{status}");
            assert_eq!(classify_status(status, Some("1")), Classification::Retry, "{status}");
        }
    }

    #[test]
    fn conflict_is_retried_only_with_retry_after() {
        assert_eq!(classify_status(409, Some("1")), Classification::Retry);
        assert_eq!(classify_status(409, Some("Wed, 21 Oct 2015 07:28:00 GMT")), Classification::Retry);
        // "response not retained": repeating would get the same 409.
        assert_eq!(classify_status(409, None), Classification::Done);
    }

    fn classify_headers(status: u16, headers: &[(&str, &str)]) -> Classification {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        let status = StatusCode::from_u16(status).unwrap();
        Classify::<Error>::classify(&DefaultClassifier, Attempt::Response { status, headers: &map })
    }

    #[test]
    fn should_retry_false_is_final_whatever_the_status() {
        for status in [408, 409, 425, 429, 500, 503] {
            for name in ["x-should-retry", "stripe-should-retry", "X-Should-Retry"] {
                let headers = [(name, "false"), ("retry-after", "1")];
                assert_eq!(classify_headers(status, &headers), Classification::Done, "{status} {name}");
            }
            // Any other value leaves the status to decide.
            assert_eq!(
                classify_headers(status, &[("x-should-retry", "true"), ("retry-after", "1")]),
                Classification::Retry
            );
            assert_eq!(
                classify_headers(status, &[("x-should-retry", "no"), ("retry-after", "1")]),
                Classification::Retry
            );
        }
        // `true` does not make a final status transient.
        assert_eq!(classify_headers(422, &[("x-should-retry", "true")]), Classification::Done);
        assert_eq!(classify_headers(400, &[("stripe-should-retry", "true")]), Classification::Done);
    }

    #[test]
    fn conflict_with_retry_after_ms_is_in_flight() {
        assert_eq!(classify_headers(409, &[("retry-after-ms", "1000")]), Classification::Retry);
        assert_eq!(
            classify_headers(409, &[("retry-after-ms", "1000"), ("x-should-retry", "false")]),
            Classification::Done
        );
    }

    #[test]
    fn retry_after_ms_comes_first() {
        let now = SystemTime::now();
        let read = |values: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in values {
                map.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            retry_after(&map, now)
        };
        let ms = Duration::from_millis;
        assert_eq!(read(&[("retry-after-ms", "1500"), ("retry-after", "9")]), Some(ms(1500)));
        assert_eq!(read(&[("retry-after-ms", "0")]), Some(Duration::ZERO));
        assert_eq!(read(&[("retry-after-ms", " 20 ")]), Some(ms(20)));
        assert_eq!(read(&[("retry-after-ms", "1.5")]), Some(Duration::from_micros(1500)));
        assert_eq!(read(&[("retry-after-ms", "250.")]), Some(ms(250)));
        assert_eq!(read(&[("retry-after-ms", "7"), ("retry-after-ms", "7")]), Some(ms(7)));
        assert_eq!(read(&[("retry-after-ms", "99999999999999999999999999")]), Some(Duration::MAX));
        // Unreadable, or ambiguous: `Retry-After` decides.
        for bad in ["", "-1", "soon", "1e3", "inf", "NaN", ".5", "1.2.3", "0x10", "+5"] {
            assert_eq!(read(&[("retry-after-ms", bad), ("retry-after", "9")]), Some(Duration::from_secs(9)), "{bad:?}");
            assert_eq!(read(&[("retry-after-ms", bad)]), None, "{bad:?}");
        }
        assert_eq!(
            read(&[("retry-after-ms", "1"), ("retry-after-ms", "2"), ("retry-after", "9")]),
            Some(Duration::from_secs(9))
        );
    }

    #[test]
    fn successes_redirects_and_other_client_errors_are_not_retried() {
        for status in [200, 201, 202, 204, 301, 304, 400, 401, 403, 404, 405, 410, 413, 415, 422, 428, 451] {
            assert_eq!(classify_status(status, None), Classification::Done, "{status}");
            // A Retry-After does not make a permanent failure transient.
            assert_eq!(classify_status(status, Some("1")), Classification::Done, "{status}");
        }
    }

    #[test]
    fn closures_are_classifiers() {
        let only_errors = |attempt: Attempt<'_, Error>| match attempt {
            Attempt::Error(_) => Classification::Retry,
            Attempt::Response { .. } => Classification::Done,
        };
        let headers = HeaderMap::new();
        let unavailable = Attempt::Response { status: StatusCode::SERVICE_UNAVAILABLE, headers: &headers };
        assert_eq!(only_errors.classify(unavailable), Classification::Done);
        assert_eq!(only_errors.classify(Attempt::Error(&"reset")), Classification::Retry);
    }

    #[test]
    fn attempt_of_a_result() {
        let ok: Result<http::Response<()>, Error> =
            Ok(http::Response::builder().status(503).header(RETRY_AFTER, "2").body(()).unwrap());
        match Attempt::of(&ok) {
            Attempt::Response { status, headers } => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(headers[RETRY_AFTER], "2");
            }
            Attempt::Error(_) => panic!("a response"),
        }
        let err: Result<http::Response<()>, Error> = Err("reset");
        assert!(matches!(Attempt::of(&err), Attempt::Error(&"reset")));
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn retry_after_delta_seconds() {
        let now = SystemTime::now();
        assert_eq!(retry_after(&headers(&["0"]), now), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers(&["7"]), now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(&headers(&[" 7 "]), now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(&headers(&["99999999999999999999999"]), now), Some(Duration::from_secs(u64::MAX)));
        assert_eq!(retry_after(&headers(&["7", "7"]), now), Some(Duration::from_secs(7)));
    }

    #[test]
    fn retry_after_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(retry_after(&headers(&["Wed, 21 Oct 2015 07:28:30 GMT"]), now), Some(Duration::from_secs(30)));
        // The obsolete forms RFC 9110 still asks recipients to accept.
        assert_eq!(retry_after(&headers(&["Wednesday, 21-Oct-15 07:29:00 GMT"]), now), Some(Duration::from_secs(60)));
        assert_eq!(retry_after(&headers(&["Wed Oct 21 07:28:05 2015"]), now), Some(Duration::from_secs(5)));
        // A date in the past means now.
        assert_eq!(retry_after(&headers(&["Wed, 21 Oct 2015 07:00:00 GMT"]), now), Some(Duration::ZERO));
    }

    #[test]
    fn unreadable_retry_after_is_ignored() {
        let now = SystemTime::now();
        for bad in ["", "-1", "1.5", "soon", "0x10", "Wed, 32 Oct 2015 07:28:00 GMT"] {
            assert_eq!(retry_after(&headers(&[bad]), now), None, "{bad:?}");
        }
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
        assert_eq!(retry_after(&headers(&["1", "2"]), now), None);
    }
}
