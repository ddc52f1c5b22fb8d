//! Host bindings of the standard `wasi:keyvalue@0.2.0-draft` interfaces (`wit/deps/keyvalue`).

wasmtime::component::bindgen!({
    path: "../../wit/deps/keyvalue",
    world: "imports",
    imports: { default: async | trappable },
    with: {
        "wasi:keyvalue/store.bucket": super::guest::OpenBucket,
    },
});

pub(crate) use wasi::keyvalue::{atomics, batch, store};

use wasmtime::component::{HasSelf, Linker};

use crate::state::HostState;

/// Links `store`, `atomics` and `batch` for every component; an operation only succeeds on a
/// bucket the handler's manifest grants.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    Imports::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}
