//! [`DynamoDbStore::create_table`]: the table and its TTL, made if missing.

use std::time::Duration;

use aws_sdk_dynamodb::{
    error::SdkError,
    operation::create_table::CreateTableError,
    types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
        TimeToLiveSpecification, TimeToLiveStatus,
    },
};

use super::{DynamoDbStore, item, sdk_error};
use crate::store::StoreError;

/// How long `create_table` waits for a new table to become active.
const ACTIVE_WITHIN: Duration = Duration::from_secs(120);

impl DynamoDbStore {
    /// Creates the table if it does not exist (partition key `pk`, a string; on-demand
    /// capacity), waits until it is active, and turns on TTL on its `ttl` attribute if it is
    /// not on. Safe to run from many processes at once, and on every start.
    ///
    /// Each request is bounded by the operation timeout; waiting for a new table to become
    /// active, by two minutes.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let (client, table) = (&self.inner.client, &self.inner.table);
        let create = client
            .create_table()
            .table_name(table)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(item::PK)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(StoreError::unavailable)?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(item::PK)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(StoreError::unavailable)?,
            )
            .billing_mode(BillingMode::PayPerRequest);
        self.run(async {
            match create.send().await {
                Ok(_) => Ok(()),
                // Made by someone else, or still being made: both wait for it below.
                Err(SdkError::ServiceError(failed))
                    if matches!(failed.err(), CreateTableError::ResourceInUseException(_)) =>
                {
                    Ok(())
                }
                Err(error) => Err(sdk_error(error)),
            }
        })
        .await?;

        let deadline = tokio::time::Instant::now() + ACTIVE_WITHIN;
        loop {
            let described =
                self.run(async { client.describe_table().table_name(table).send().await.map_err(sdk_error) }).await?;
            let status = described.table().and_then(|table| table.table_status());
            if status == Some(&TableStatus::Active) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::timeout());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let ttl = self
            .run(async { client.describe_time_to_live().table_name(table).send().await.map_err(sdk_error) })
            .await?;
        let on = ttl.time_to_live_description().and_then(|ttl| ttl.time_to_live_status());
        if !matches!(on, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)) {
            let specification = TimeToLiveSpecification::builder()
                .attribute_name(item::TTL)
                .enabled(true)
                .build()
                .map_err(StoreError::unavailable)?;
            self.run(async {
                client
                    .update_time_to_live()
                    .table_name(table)
                    .time_to_live_specification(specification)
                    .send()
                    .await
                    .map_err(sdk_error)
            })
            .await?;
        }
        Ok(())
    }
}
