//! Event sources fed by databases.
//!
//! - [`HookRegistry`] and [`register_crud_hooks`]: applications that embed the library call the
//!   registry after each CRUD operation; the broker hooks publish `schema.entity.operation`
//!   events (source `database`) without ever blocking or failing the operation.
//! - [`capture`]: PostgreSQL change capture for `eventbroker serve` — triggers write every
//!   committed change of the watched tables into an outbox table, which a capture task drains
//!   into the broker.

pub mod capture;
mod crud;
mod registry;

pub use crud::{
    CrudHookOptions, CrudHooks, DEFAULT_QUEUE_CAPACITY, OperationSwitches, REFUSAL_LOG_PERIOD,
    crud_event, register_crud_hooks,
};
pub use registry::{CrudOperation, Hook, HookContext, HookRegistry, UserContext};
