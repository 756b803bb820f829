//! [`PgTransaction`]: the layer's transaction, handed to the handler in the request's
//! extensions.

use std::{
    fmt,
    ops::{Deref, DerefMut},
    sync::Arc,
};

use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::{Mutex, MutexGuard};

/// The transaction of a request in [transactional mode](crate::transactional), in the
/// request's extensions: everything the handler writes through it commits together with the
/// key's record, or not at all.
///
/// Take it from the extensions (with axum, the `Extension<PgTransaction>` extractor) and
/// [`lock`](Self::lock) it to run statements; the guard derefs to a
/// [`PgConnection`](https://docs.rs/sqlx/0.9/sqlx/postgres/struct.PgConnection.html), so `sqlx::query(..).execute(&mut *tx)` works. The layer commits (or rolls
/// back) after the handler answered: the handler never commits itself. A handler that ends
/// the transaction anyway (its own `COMMIT` or `ROLLBACK` on this connection) is caught before
/// the response is recorded: the client gets `500` `transaction-ended` and the key is free,
/// but what that `COMMIT` committed stays. (Savepoints are fine: `sqlx`'s nested `begin` on
/// the guard makes one.) Every request through the layer has one, a request without a key
/// too. A clone that outlives the request finds the transaction [closed](TransactionClosed).
///
/// ```no_run
/// use axum::{Extension, http::StatusCode};
/// use tower_idempotency::{store::sqlx, transactional::PgTransaction};
///
/// async fn charge(Extension(tx): Extension<PgTransaction>) -> Result<StatusCode, StatusCode> {
///     let mut tx = tx.lock().await.map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     sqlx::query("INSERT INTO charges (amount) VALUES (100)")
///         .execute(&mut *tx)
///         .await
///         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     Ok(StatusCode::CREATED)
/// }
/// ```
#[derive(Clone)]
pub struct PgTransaction {
    inner: Arc<Mutex<Option<Transaction<'static, Postgres>>>>,
}

/// The locked transaction: derefs to its [`PgConnection`](https://docs.rs/sqlx/0.9/sqlx/postgres/struct.PgConnection.html). Hold it only while running
/// statements; the layer waits for it before it commits.
pub struct PgTransactionGuard<'a> {
    guard: MutexGuard<'a, Option<Transaction<'static, Postgres>>>,
}

/// The transaction is closed: the layer committed or rolled it back (the request is over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionClosed;

impl PgTransaction {
    pub(super) fn new(transaction: Transaction<'static, Postgres>) -> Self {
        Self { inner: Arc::new(Mutex::new(Some(transaction))) }
    }

    /// Locks the transaction to run statements on it. Fails once the request is over.
    pub async fn lock(&self) -> Result<PgTransactionGuard<'_>, TransactionClosed> {
        let guard = self.inner.lock().await;
        if guard.is_none() {
            return Err(TransactionClosed);
        }
        Ok(PgTransactionGuard { guard })
    }

    /// Drops the transaction (sqlx rolls it back) from every clone, without waiting: at once
    /// when no guard is held, else once the holder lets go. Every later `lock` fails.
    pub(super) fn abandon(&self) {
        match self.inner.clone().try_lock_owned() {
            Ok(mut guard) => drop(guard.take()),
            Err(_) => {
                let inner = self.inner.clone();
                if let Ok(detaching) = crate::rt::reserve(None, None) {
                    detaching.spawn(async move { drop(inner.lock().await.take()) });
                }
            }
        }
    }

    /// Takes the transaction back for the commit; every later `lock` fails.
    pub(super) async fn close(&self) -> Option<Transaction<'static, Postgres>> {
        self.inner.lock().await.take()
    }
}

impl Deref for PgTransactionGuard<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // `lock` hands out a guard only over an open transaction, and only `close` (which
        // needs the lock) empties it.
        self.guard.as_deref().expect("a guard holds an open transaction")
    }
}

impl DerefMut for PgTransactionGuard<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.guard.as_deref_mut().expect("a guard holds an open transaction")
    }
}

impl fmt::Debug for PgTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransaction").finish_non_exhaustive()
    }
}

impl fmt::Debug for PgTransactionGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransactionGuard").finish_non_exhaustive()
    }
}

impl fmt::Display for TransactionClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request's transaction is closed: the layer committed or rolled it back")
    }
}

impl std::error::Error for TransactionClosed {}
