//! The lease table's side of a hitless upgrade (issue 20, [`crate::upgrade`]): the old
//! process lists its live leases, the new one reserves their names and ports to their agents
//! before it serves. Public connections waiting for them are the ingress's side
//! ([`crate::ingress::Ingress::expect_leases`]).

use std::time::Instant;

use super::{QuicServer, RelayHandle};
use crate::lease::{Inherited, InheritedLease};

impl QuicServer {
    /// Every live lease, for the hand-over (sent to the new process as JSON).
    pub async fn inherited_leases(&self) -> Vec<InheritedLease> {
        self.handle().inherited_leases().await
    }

    /// Reserves the names and ports of the old process's `leases` to their agents
    /// ([`crate::lease::LeaseTable::inherit`]), under the lease lock. Call before serving.
    pub async fn inherit_leases(&self, leases: &[InheritedLease]) -> Inherited {
        self.handle().inherit_leases(leases).await
    }
}

impl RelayHandle {
    /// Every live lease, for the hand-over (the old process, while [`QuicServer::run`] runs).
    pub async fn inherited_leases(&self) -> Vec<InheritedLease> {
        self.ctx.control.lock().await.table.inherited_leases()
    }

    /// [`QuicServer::inherit_leases`] through a handle.
    pub async fn inherit_leases(&self, leases: &[InheritedLease]) -> Inherited {
        let done = self
            .ctx
            .control
            .lock()
            .await
            .table
            .inherit(leases, Instant::now());
        tracing::info!(
            names = done.names,
            ports = done.ports,
            skipped = done.skipped,
            "inherited leases reserved to their agents"
        );
        done
    }
}
