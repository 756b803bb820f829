//! The capacity units the store's requests consume, as DynamoDB reports them
//! (`ReturnConsumedCapacity`, set on every request by an interceptor of the client), against
//! the figures the store's docs state.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::store::{
    Begin, IdempotencyStore, LiveLog, Record, StoredResponse,
    aws_sdk_dynamodb::{
        self,
        config::{
            ConfigBag, Intercept, RuntimeComponents,
            interceptors::{AfterDeserializationInterceptorContextRef, BeforeSerializationInterceptorContextMut},
        },
        error::BoxError,
        operation::{get_item::*, put_item::*, update_item::*},
        types::ReturnConsumedCapacity,
    },
    conformance::{self, fp},
};

use crate::{builder, dynamodb};

/// Asks for the consumed capacity of every request, and notes it.
#[derive(Debug, Clone, Default)]
struct Units(Arc<Mutex<Vec<f64>>>);

impl Units {
    /// The units noted since the last call.
    fn take(&self) -> Vec<f64> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

impl Intercept for Units {
    fn name(&self) -> &'static str {
        "Units"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let input = context.input_mut();
        let total = Some(ReturnConsumedCapacity::Total);
        if let Some(input) = input.downcast_mut::<PutItemInput>() {
            input.return_consumed_capacity = total;
        } else if let Some(input) = input.downcast_mut::<UpdateItemInput>() {
            input.return_consumed_capacity = total;
        } else if let Some(input) = input.downcast_mut::<GetItemInput>() {
            input.return_consumed_capacity = total;
        }
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Ok(output) = context.output_or_error() else { return Ok(()) };
        let consumed = if let Some(output) = output.downcast_ref::<PutItemOutput>() {
            output.consumed_capacity()
        } else if let Some(output) = output.downcast_ref::<UpdateItemOutput>() {
            output.consumed_capacity()
        } else if let Some(output) = output.downcast_ref::<GetItemOutput>() {
            output.consumed_capacity()
        } else {
            None
        };
        if let Some(units) = consumed.and_then(|consumed| consumed.capacity_units()) {
            self.0.lock().unwrap().push(units);
        }
        Ok(())
    }
}

/// A first request (`begin`, `complete`), a renewal and a waiting duplicate's poll cost what
/// the docs say: 1 write unit for the lock, one per KB of the record, 1 per renewal, 1 read
/// unit per poll of a lock's item under 4 KB.
#[tokio::test]
async fn units_per_request_are_as_documented() {
    let units = Units::default();
    let config = crate::client(dynamodb().await).config().to_builder().interceptor(units.clone()).build();
    let store = builder().build(aws_sdk_dynamodb::Client::from_conf(config));
    store.create_table().await.unwrap();
    units.take();

    let key = conformance::fresh_key(None);
    let Begin::Execute(token) = store.begin(&key, &fp(1), conformance::LEASE * 10).await.unwrap() else {
        panic!("the key is free");
    };
    assert_eq!(units.take(), [1.0], "begin: one write unit for the lock");
    assert!(store.renew(&key, &token, conformance::LEASE * 10).await.unwrap());
    assert_eq!(units.take(), [1.0], "renew: one write unit");
    assert!(matches!(
        conformance::follow(&store, &key, fp(1), None, std::time::Duration::ZERO).await,
        tower_idempotency::store::Followed::Live { .. }
    ));
    assert_eq!(units.take(), [1.0], "one poll: one read unit (strongly consistent, under 4 KB)");
    store.publish(&key, &token, 0, vec![conformance::live_head()]).await.unwrap();
    assert_eq!(units.take(), [1.0], "a publish of a small head: one write unit");

    // A 10 000-byte body: the record's item is 10 KB and a bit.
    let body = Bytes::from(vec![b'x'; 10_000]);
    let record = Record::Response(Arc::new(StoredResponse::new(StatusCode::CREATED, HeaderMap::new(), body)));
    assert!(store.complete(&key, &token, record, conformance::TTL).await.unwrap());
    assert_eq!(units.take(), [10.0], "complete: one write unit per KB of the record, rounded up");
}
