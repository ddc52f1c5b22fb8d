//! Bindings generated from `wit/` (the one `bindgen!` of the host).

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "event-handler",
    imports: {
        "resolvespec:eventbroker/host.publish": async | trappable,
        default: trappable,
    },
    exports: { default: async },
});

pub use exports::resolvespec::eventbroker::handler::GuestIndices as HandlerIndices;
pub use exports::resolvespec::eventbroker::subscriptions::GuestIndices as SubscriptionIndices;
pub use resolvespec::eventbroker::types;
