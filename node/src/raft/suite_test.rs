//! openraft's own storage test suite against [`MemLogStore`] + [`PartitionStateMachine`].

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

use super::{MemLogStore, PartitionStateMachine, TypeConfig};
use crate::storage::PartitionId;

struct Builder;

impl StoreBuilder<TypeConfig, MemLogStore, PartitionStateMachine> for Builder {
    async fn build(
        &self,
    ) -> Result<((), MemLogStore, PartitionStateMachine), StorageError<TypeConfig>> {
        Ok((
            (),
            MemLogStore::new(),
            PartitionStateMachine::new(PartitionId(7)),
        ))
    }
}

#[tokio::test]
async fn openraft_storage_suite_passes() {
    Suite::<TypeConfig, MemLogStore, PartitionStateMachine, Builder, ()>::test_all(Builder)
        .await
        .unwrap();
}
