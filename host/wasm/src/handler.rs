//! A handler version as a broker subscription.

use std::sync::Arc;

use async_trait::async_trait;

use super::component::CompiledHandler;
use super::state::Publisher;
use eventbroker::broker::{EventHandler, HandlerContext, HandlerResult};
use eventbroker::event::Event;

/// Runs one [`CompiledHandler`] version for the broker. Each deployed version is its own
/// `WasmHandler`; replacing a handler swaps the subscription, and invocations already running
/// keep their version alive until they finish.
pub struct WasmHandler {
    version: Arc<CompiledHandler>,
}

impl WasmHandler {
    /// A broker handler for this version.
    pub fn new(version: Arc<CompiledHandler>) -> Self {
        WasmHandler { version }
    }
}

/// Runs `version` on `event` for the broker: records the version on the event's outcome and
/// warns when the invocation dropped log lines.
pub(crate) async fn run_version(
    version: &CompiledHandler,
    ctx: &HandlerContext,
    event: &Event,
) -> HandlerResult {
    ctx.record_version(version.version());
    let invocation = version
        .invoke(event, ctx.attempt(), Publisher::Broker(ctx.clone()))
        .await;
    if invocation.logs_dropped > 0 {
        tracing::warn!(
            handler = %version.spec().name,
            event_id = %event.id,
            dropped = invocation.logs_dropped,
            "handler exceeded its log budget; lines were dropped"
        );
    }
    invocation.result
}

#[async_trait]
impl EventHandler for WasmHandler {
    async fn handle(&self, ctx: &HandlerContext, event: &Event) -> HandlerResult {
        run_version(&self.version, ctx, event).await
    }
}
