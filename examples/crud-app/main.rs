//! An application wiring its CRUD layer to the broker through CRUD hooks.
//!
//! The "application" is an in-memory user store. After each operation it runs the hook
//! registry; `register_crud_hooks` turns that into `public.users.create|update|delete|read`
//! events (source `database`) carrying the acting user. A native handler prints each event.
//!
//! Run: `cargo run -p crud-app`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use eventbroker::hooks::{
    CrudHookOptions, HookContext, HookRegistry, UserContext, register_crud_hooks,
};
use eventbroker::{Broker, BrokerConfig, Event, MemoryProvider, handler_fn};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The application's CRUD layer: a user table in memory, with hooks after each operation.
struct UserStore {
    rows: Mutex<BTreeMap<i64, Value>>,
    next_id: Mutex<i64>,
    hooks: HookRegistry,
}

impl UserStore {
    fn new(hooks: HookRegistry) -> Self {
        UserStore {
            rows: Mutex::new(BTreeMap::new()),
            next_id: Mutex::new(1),
            hooks,
        }
    }

    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn create(&self, user: &UserContext, mut record: Value) -> Value {
        let id = {
            let mut next = Self::lock(&self.next_id);
            let id = *next;
            *next += 1;
            id
        };
        record["id"] = json!(id);
        Self::lock(&self.rows).insert(id, record.clone());
        self.hooks.run(&HookContext::created(
            "public",
            "users",
            record.clone(),
            user.clone(),
        ));
        record
    }

    fn update(&self, user: &UserContext, id: i64, data: Value) -> Option<Value> {
        let updated = {
            let mut rows = Self::lock(&self.rows);
            let row = rows.get_mut(&id)?;
            if let (Some(row), Some(data)) = (row.as_object_mut(), data.as_object()) {
                for (key, value) in data {
                    row.insert(key.clone(), value.clone());
                }
            }
            row.clone()
        };
        self.hooks.run(&HookContext::updated(
            "public",
            "users",
            json!(id),
            data,
            user.clone(),
        ));
        Some(updated)
    }

    fn delete(&self, user: &UserContext, id: i64) -> bool {
        let existed = Self::lock(&self.rows).remove(&id).is_some();
        if existed {
            self.hooks.run(&HookContext::deleted(
                "public",
                "users",
                json!(id),
                user.clone(),
            ));
        }
        existed
    }

    fn list(&self, user: &UserContext) -> Value {
        let result = json!(Self::lock(&self.rows).values().cloned().collect::<Vec<_>>());
        self.hooks.run(&HookContext::read(
            "public",
            "users",
            result.clone(),
            user.clone(),
        ));
        result
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::new(BrokerConfig::default(), Arc::new(MemoryProvider::default()));
    let (handled_tx, mut handled) = mpsc::unbounded_channel::<Event>();
    broker.subscribe(
        "public.users.*",
        handler_fn(move |_ctx, event| {
            let handled_tx = handled_tx.clone();
            async move {
                println!(
                    "handled {} (source {}, user {:?}, by {:?}): {}",
                    event.event_type,
                    event.source,
                    event.user_id,
                    event.metadata.get("user_name"),
                    event.payload
                );
                let _ = handled_tx.send(event);
                Ok(())
            }
        }),
    )?;
    broker.start().await?;

    let registry = HookRegistry::new();
    // Reads are off by default; this application wants them too.
    let hooks = register_crud_hooks(
        &broker,
        &registry,
        CrudHookOptions::default().with_reads(true),
    );
    let store = UserStore::new(registry);

    let ada = UserContext {
        user_id: Some(1),
        session_id: "session-42".into(),
        name: "Ada".into(),
        email: "ada@example.com".into(),
        roles: vec!["admin".into()],
    };
    let created = store.create(&ada, json!({"name": "Grace", "email": "grace@example.com"}));
    let id = created["id"].as_i64().unwrap_or_default();
    store.update(&ada, id, json!({"email": "grace@navy.mil"}));
    store.list(&ada);
    store.delete(&ada, id);

    // The hooks never block the store; wait for their publishes, then for the handler.
    hooks.flush().await;
    println!(
        "published {} events, {} failed",
        hooks.published(),
        hooks.failed()
    );
    for _ in 0..hooks.published() {
        if handled.recv().await.is_none() {
            break;
        }
    }
    broker.stop().await?;
    Ok(())
}
