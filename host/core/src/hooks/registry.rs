//! The CRUD hook registry: functions run after each create, update, delete or read of an
//! application's CRUD layer.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A CRUD operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrudOperation {
    /// A record was created.
    Create,
    /// A record was updated.
    Update,
    /// A record was deleted.
    Delete,
    /// Records were read.
    Read,
}

impl CrudOperation {
    /// Every operation, in declaration order.
    pub const ALL: [CrudOperation; 4] = [
        CrudOperation::Create,
        CrudOperation::Update,
        CrudOperation::Delete,
        CrudOperation::Read,
    ];

    /// The lowercase name, used as the last segment of the event type.
    pub fn as_str(self) -> &'static str {
        match self {
            CrudOperation::Create => "create",
            CrudOperation::Update => "update",
            CrudOperation::Delete => "delete",
            CrudOperation::Read => "read",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for CrudOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CrudOperation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CrudOperation::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| {
                format!("unknown operation {s:?}; expected create, update, delete or read")
            })
    }
}

/// The user on whose behalf an operation ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserContext {
    /// The user's id, if known.
    pub user_id: Option<i64>,
    /// The session the request came from.
    pub session_id: String,
    /// The user's display name.
    pub name: String,
    /// The user's e-mail address.
    pub email: String,
    /// The user's roles.
    pub roles: Vec<String>,
}

/// What a hook is told about one finished operation.
#[derive(Debug, Clone, PartialEq)]
pub struct HookContext {
    /// The operation.
    pub operation: CrudOperation,
    /// Database schema, e.g. `public`.
    pub schema: String,
    /// Entity (table or model), e.g. `users`.
    pub entity: String,
    /// The table the entity lives in, when it differs from `schema.entity`.
    pub table_name: Option<String>,
    /// The record's id (update, delete; create when known).
    pub id: Option<Value>,
    /// The created record (create), the changed data (update) or the result (read).
    pub record: Option<Value>,
    /// Who did it.
    pub user: UserContext,
}

impl HookContext {
    fn new(operation: CrudOperation, schema: &str, entity: &str, user: UserContext) -> Self {
        HookContext {
            operation,
            schema: schema.to_owned(),
            entity: entity.to_owned(),
            table_name: None,
            id: None,
            record: None,
            user,
        }
    }

    /// After a create: `record` is the created record.
    pub fn created(schema: &str, entity: &str, record: Value, user: UserContext) -> Self {
        HookContext {
            record: Some(record),
            ..Self::new(CrudOperation::Create, schema, entity, user)
        }
    }

    /// After an update of record `id` with `data`.
    pub fn updated(schema: &str, entity: &str, id: Value, data: Value, user: UserContext) -> Self {
        HookContext {
            id: Some(id),
            record: Some(data),
            ..Self::new(CrudOperation::Update, schema, entity, user)
        }
    }

    /// After a delete of record `id`.
    pub fn deleted(schema: &str, entity: &str, id: Value, user: UserContext) -> Self {
        HookContext {
            id: Some(id),
            ..Self::new(CrudOperation::Delete, schema, entity, user)
        }
    }

    /// After a read that returned `result`.
    pub fn read(schema: &str, entity: &str, result: Value, user: UserContext) -> Self {
        HookContext {
            record: Some(result),
            ..Self::new(CrudOperation::Read, schema, entity, user)
        }
    }

    /// Sets the table name (builder style).
    pub fn with_table_name(mut self, table_name: impl Into<String>) -> Self {
        self.table_name = Some(table_name.into());
        self
    }

    /// The table name: the explicit one, or `schema.entity`.
    pub fn table(&self) -> String {
        self.table_name
            .clone()
            .unwrap_or_else(|| format!("{}.{}", self.schema, self.entity))
    }
}

/// A hook: runs synchronously in the caller's thread after the operation; it cannot fail the
/// operation, so it must not block (spawn anything slow).
pub type Hook = Arc<dyn Fn(&HookContext) + Send + Sync>;

/// Hooks by operation. Cheap to clone; clones share the hooks.
///
/// The application's CRUD layer calls [`HookRegistry::run`] after each successful operation.
///
/// # Examples
/// ```
/// use eventbroker::hooks::{HookContext, HookRegistry, UserContext};
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
///
/// let registry = HookRegistry::new();
/// let seen = Arc::new(AtomicUsize::new(0));
/// let counter = seen.clone();
/// registry.after_create(move |ctx| {
///     assert_eq!(ctx.entity, "users");
///     counter.fetch_add(1, Ordering::Relaxed);
/// });
/// registry.run(&HookContext::created("public", "users", serde_json::json!({"id": 1}), UserContext::default()));
/// assert_eq!(seen.load(Ordering::Relaxed), 1);
/// ```
#[derive(Clone, Default)]
pub struct HookRegistry {
    hooks: Arc<RwLock<[Vec<Hook>; 4]>>,
}

impl fmt::Debug for HookRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hooks = self.hooks.read().unwrap_or_else(|p| p.into_inner());
        let mut debug = f.debug_struct("HookRegistry");
        for op in CrudOperation::ALL {
            debug.field(op.as_str(), &hooks[op.index()].len());
        }
        debug.finish()
    }
}

impl HookRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `hook` to the hooks run after `operation`; hooks run in the order they were added.
    pub fn register(
        &self,
        operation: CrudOperation,
        hook: impl Fn(&HookContext) + Send + Sync + 'static,
    ) {
        self.hooks.write().unwrap_or_else(|p| p.into_inner())[operation.index()]
            .push(Arc::new(hook));
    }

    /// Adds a hook run after each create.
    pub fn after_create(&self, hook: impl Fn(&HookContext) + Send + Sync + 'static) {
        self.register(CrudOperation::Create, hook);
    }

    /// Adds a hook run after each update.
    pub fn after_update(&self, hook: impl Fn(&HookContext) + Send + Sync + 'static) {
        self.register(CrudOperation::Update, hook);
    }

    /// Adds a hook run after each delete.
    pub fn after_delete(&self, hook: impl Fn(&HookContext) + Send + Sync + 'static) {
        self.register(CrudOperation::Delete, hook);
    }

    /// Adds a hook run after each read.
    pub fn after_read(&self, hook: impl Fn(&HookContext) + Send + Sync + 'static) {
        self.register(CrudOperation::Read, hook);
    }

    /// How many hooks run after `operation`.
    pub fn len(&self, operation: CrudOperation) -> usize {
        self.hooks.read().unwrap_or_else(|p| p.into_inner())[operation.index()].len()
    }

    /// Whether no hook is registered at all.
    pub fn is_empty(&self) -> bool {
        CrudOperation::ALL.into_iter().all(|op| self.len(op) == 0)
    }

    /// Runs the hooks of `context.operation`, in order. A panicking hook is logged and the
    /// remaining hooks still run: hooks never fail the operation.
    pub fn run(&self, context: &HookContext) {
        let hooks =
            self.hooks.read().unwrap_or_else(|p| p.into_inner())[context.operation.index()].clone();
        for hook in hooks {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(context)));
            if outcome.is_err() {
                tracing::error!(
                    operation = %context.operation,
                    schema = %context.schema,
                    entity = %context.entity,
                    "a CRUD hook panicked; the operation is unaffected"
                );
            }
        }
    }
}
