//! Who a key belongs to.
//!
//! The store key is the pair (scope, key), so a key sent by one tenant can never replay
//! another tenant's response. The default scope is a keyed digest (HMAC-SHA-256 under the
//! layer's [`Secret`](crate::Secret)) of the `Authorization` header: neither the credential
//! nor anything a guess of it could be tested against is stored. Every scope, a custom one
//! included, is keyed so before it reaches the store. Requests without that header share one
//! unscoped namespace: put an authentication layer in front and scope by the identity it
//! establishes ([`Scope::from_fn`]) when anonymous callers must be kept apart too.

use std::{fmt, sync::Arc};

use hmac::{Hmac, Mac};
use http::{HeaderName, header::AUTHORIZATION, request::Parts};
use sha2::{Digest, Sha256};

/// A scope: a 32-byte digest of whatever identifies the caller.
///
/// The layer keys it with its [`Secret`](crate::Secret) before it reaches the store, so the
/// store never sees the value a scope function returns.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeId([u8; 32]);

impl ScopeId {
    /// The scope of `identity` (a tenant id, an API key, a user id...): its SHA-256 digest,
    /// which the layer keys with its secret before the store sees it.
    pub fn digest(identity: impl AsRef<[u8]>) -> Self {
        Self(Sha256::digest(identity.as_ref()).into())
    }

    /// A scope from a digest computed elsewhere (for example read back from a store).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ScopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScopeId(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

/// Computes the scope of a request from its head. Implemented for closures
/// `Fn(&http::request::Parts) -> Option<ScopeId>`.
///
/// `None` puts the request in the unscoped namespace shared by every request without a scope.
pub trait MakeScope: Send + Sync + 'static {
    /// The scope of the request whose head is `head`.
    fn make_scope(&self, head: &Parts) -> Option<ScopeId>;
}

impl<F> MakeScope for F
where
    F: Fn(&Parts) -> Option<ScopeId> + Send + Sync + 'static,
{
    fn make_scope(&self, head: &Parts) -> Option<ScopeId> {
        self(head)
    }
}

/// How the layer scopes keys. Default: [`Scope::authorization`].
#[derive(Clone)]
pub struct Scope(Kind);

#[derive(Clone)]
enum Kind {
    None,
    Header(HeaderName),
    Custom(Arc<dyn MakeScope>),
}

impl Scope {
    /// The default: a keyed digest (HMAC-SHA-256 under the layer's
    /// [`Secret`](crate::Secret)) of the `Authorization` header, when present.
    pub fn authorization() -> Self {
        Self::header(AUTHORIZATION)
    }

    /// A keyed digest (HMAC-SHA-256 under the layer's [`Secret`](crate::Secret)) of the named
    /// header's value(s), when present.
    pub fn header(name: HeaderName) -> Self {
        Self(Kind::Header(name))
    }

    /// No scope: every caller shares one namespace of keys. Only for services with a single
    /// trusted caller; otherwise one caller can replay another's response.
    pub fn none() -> Self {
        Self(Kind::None)
    }

    /// A scope computed by `f` from the request head: a header, or an extension set by an
    /// authentication layer that runs before this one.
    ///
    /// ```
    /// use tower_idempotency::{Scope, ScopeId};
    ///
    /// #[derive(Clone)]
    /// struct TenantId(u64);
    ///
    /// let scope = Scope::from_fn(|head: &http::request::Parts| {
    ///     head.extensions.get::<TenantId>().map(|t| ScopeId::digest(t.0.to_be_bytes()))
    /// });
    /// # let _ = scope;
    /// ```
    pub fn from_fn(f: impl MakeScope) -> Self {
        Self(Kind::Custom(Arc::new(f)))
    }

    /// The scope the store sees for the request whose head is `head`: keyed with `key`, the
    /// layer's scope HMAC (keyed once, cloned here).
    pub(crate) fn resolve(&self, head: &Parts, key: &Hmac<Sha256>) -> Option<ScopeId> {
        match &self.0 {
            Kind::None => None,
            Kind::Header(name) => {
                let mut values = head.headers.get_all(name).iter();
                let first = values.next()?;
                let mut mac = key.clone();
                // A first byte of its own (a custom scope's is `i`) keeps the two kinds apart.
                mac.update(b"h");
                mac.update(first.as_bytes());
                for more in values {
                    // A separator no header value can contain keeps the encoding unambiguous.
                    mac.update(b"\n");
                    mac.update(more.as_bytes());
                }
                Some(finish(mac))
            }
            // Keyed too, so that even a scope computed without a secret (an unkeyed
            // `ScopeId::digest` of a tenant id) reaches the store keyed; a first byte of its
            // own (a header scope's is `h`) keeps the two kinds apart.
            Kind::Custom(f) => f.make_scope(head).map(|scope| {
                let mut mac = key.clone();
                mac.update(b"i");
                mac.update(scope.as_bytes());
                finish(mac)
            }),
        }
    }
}

/// The scope id a finished scope HMAC makes.
fn finish(mac: Hmac<Sha256>) -> ScopeId {
    ScopeId::from_bytes(mac.finalize().into_bytes().into())
}

impl Default for Scope {
    fn default() -> Self {
        Self::authorization()
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::None => f.write_str("Scope::none()"),
            Kind::Header(name) => write!(f, "Scope::header({name})"),
            Kind::Custom(_) => f.write_str("Scope::from_fn(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(auth: Option<&str>) -> Parts {
        let mut builder = http::Request::builder();
        if let Some(a) = auth {
            builder = builder.header(AUTHORIZATION, a);
        }
        builder.body(()).unwrap().into_parts().0
    }

    /// A scope key made of 32 `byte`s (the layer derives its own from its secret).
    fn keyed(byte: u8) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&[byte; 32]).unwrap()
    }

    #[test]
    fn default_scope_is_a_keyed_digest_of_authorization() {
        let (k1, k2) = (keyed(1), keyed(2));
        let scope = Scope::default();
        assert_eq!(scope.resolve(&head(None), &k1), None);
        let a = scope.resolve(&head(Some("Bearer a")), &k1).unwrap();
        assert_eq!(Some(a), scope.resolve(&head(Some("Bearer a")), &k1));
        // Not the plain digest, and another secret gives another scope.
        assert_ne!(a, ScopeId::digest("Bearer a"));
        assert_ne!(Some(a), scope.resolve(&head(Some("Bearer a")), &k2));
        assert_ne!(Some(a), scope.resolve(&head(Some("Bearer b")), &k1));
        assert_eq!(Scope::none().resolve(&head(Some("Bearer a")), &k1), None);
    }

    #[test]
    fn custom_scopes_are_keyed_too() {
        let k1 = keyed(1);
        let custom = Scope::from_fn(|_: &Parts| Some(ScopeId::digest("tenant-7")));
        let scoped = custom.resolve(&head(None), &k1).unwrap();
        assert_ne!(scoped, ScopeId::digest("tenant-7"));
        assert_ne!(Some(scoped), custom.resolve(&head(None), &keyed(2)));
    }
}
