//! CRUD hooks: an application that embeds the library calls the [`HookRegistry`] after each
//! CRUD operation; the hooks installed by [`register_crud_hooks`] publish
//! `schema.entity.operation` events (source `database`) without ever blocking or failing the
//! operation. (PostgreSQL change capture, the other database-fed source, is part of the
//! service: `eventbroker-server`.)

mod crud;
mod registry;

pub use crud::{
    CrudHookOptions, CrudHooks, DEFAULT_QUEUE_CAPACITY, OperationSwitches, REFUSAL_LOG_PERIOD,
    crud_event, register_crud_hooks,
};
pub use registry::{CrudOperation, Hook, HookContext, HookRegistry, UserContext};
