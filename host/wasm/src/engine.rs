//! The one wasmtime engine of a host: pooling allocator and its slots, fuel, epoch
//! interruption, the linker with the host imports, and the on-disk cache of compiled
//! components (see [`super::cache`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::WasmError;
use super::bindings::EventHandler as HandlerWorld;
use super::cache;
use super::slots::InstanceSlots;
use super::state::HostState;
use crate::config::PoolConfig;
use crate::keyvalue::KeyValueBinding;

/// How often the epoch advances: the granularity of deadlines and of yielding to other tasks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The engine and everything shared by all handlers.
#[derive(Clone)]
pub struct WasmEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    slots: InstanceSlots,
    ticker_stop: Arc<AtomicBool>,
    keyvalue: std::sync::OnceLock<KeyValueBinding>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Release);
    }
}

/// Where a compiled component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    /// Compiled now (and written to the cache, if there is one).
    Compiled,
    /// Read from the on-disk cache.
    Cache,
}

impl WasmEngine {
    /// A new engine. `cache_dir` holds compiled components (`None` disables the cache); it is
    /// created readable and writable by this user only, and a directory that others can write
    /// is not used (with a warning), since its entries are loaded as native code.
    ///
    /// # Errors
    /// [`WasmError::Engine`] if wasmtime rejects the configuration (e.g. the machine cannot
    /// reserve the pool's virtual memory).
    pub fn new(pool: &PoolConfig, cache_dir: Option<PathBuf>) -> Result<Self, WasmError> {
        let engine =
            Engine::new(&engine_config(pool)).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| WasmError::Engine(format!("linking WASI: {e:#}")))?;
        // Linked for every component; a request is refused unless the handler's manifest
        // grants it, and a component importing it without a grant is refused at load.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| WasmError::Engine(format!("linking wasi:http: {e:#}")))?;
        // Linked for every component, like wasi:http: a bucket opens only when the handler's
        // manifest grants it.
        crate::keyvalue::add_to_linker(&mut linker)
            .map_err(|e| WasmError::Engine(format!("linking wasi:keyvalue: {e:#}")))?;
        HandlerWorld::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(|e| WasmError::Engine(format!("linking host imports: {e:#}")))?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.weak(), ticker_stop.clone());
        let cache_dir = cache_dir.and_then(|dir| match cache::prepare_dir(&dir) {
            Ok(()) => Some(dir),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "not using the compiled-component cache; components are compiled at every load");
                None
            }
        });
        Ok(WasmEngine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                cache_dir,
                slots: InstanceSlots::new(pool.instances as usize),
                ticker_stop,
                keyvalue: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Gives handlers granted `[keyvalue]` their state in `binding` (normally the provider's
    /// store, scoped by the consumer group). Set once, before handlers load: a handler loaded
    /// without a store that imports `wasi:keyvalue` is refused.
    ///
    /// # Errors
    /// [`WasmError::Engine`] when the engine already has a store.
    pub fn set_keyvalue(&self, binding: KeyValueBinding) -> Result<(), WasmError> {
        self.inner
            .keyvalue
            .set(binding)
            .map_err(|_| WasmError::Engine("the engine's key-value store is already set".into()))
    }

    /// The key-value store handlers keep their state in, when the host has one.
    pub fn keyvalue(&self) -> Option<&KeyValueBinding> {
        self.inner.keyvalue.get()
    }

    /// The slots of the instance pool, shared by every handler.
    pub fn slots(&self) -> &InstanceSlots {
        &self.inner.slots
    }

    /// The compiled-component cache directory in use, if any.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.cache_dir.as_deref()
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub(crate) fn linker(&self) -> &Linker<HostState> {
        &self.inner.linker
    }

    /// Compiles a component, or loads it from the cache when these exact bytes were compiled
    /// before with these engine settings.
    ///
    /// # Errors
    /// [`WasmError::NotWasm`], [`WasmError::NotComponent`] or [`WasmError::Compile`].
    pub fn compile(&self, bytes: &[u8]) -> Result<(Component, CompileSource), WasmError> {
        let compiled = self.compile_checked(&ComponentBytes::new(bytes.to_vec())?)?;
        Ok((compiled.component, compiled.source))
    }

    /// [`WasmEngine::compile`] on a blocking thread (compiling is CPU-heavy: it must not
    /// occupy the async workers that run events).
    ///
    /// # Errors
    /// As [`WasmEngine::compile`].
    pub async fn compile_off_thread(&self, bytes: ComponentBytes) -> Result<Compiled, WasmError> {
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.compile_checked(&bytes))
            .await
            .map_err(|e| WasmError::Engine(format!("compiler task failed: {e}")))?
    }

    /// Compiles checked bytes (or reads them from the cache), writing the cache entry for the
    /// next start. The bytes' hash is the one computed when they were checked.
    ///
    /// # Errors
    /// [`WasmError::Compile`].
    pub fn compile_checked(&self, bytes: &ComponentBytes) -> Result<Compiled, WasmError> {
        let started = std::time::Instant::now();
        let (component, source) = self.compile_with_cache(bytes)?;
        Ok(Compiled {
            component,
            version: bytes.version(),
            source,
            time: started.elapsed(),
            size: bytes.len(),
        })
    }

    fn compile_with_cache(
        &self,
        checked: &ComponentBytes,
    ) -> Result<(Component, CompileSource), WasmError> {
        let bytes = checked.bytes();
        let cached = self.cache_path(checked);
        if let Some(path) = &cached {
            match cache::trusted_entry(path) {
                Ok(true) => {
                    // SAFETY: the entry is a regular file in a directory only this user can
                    // write, and only this user can write the file itself (checked just
                    // above): a serialized artifact of this host's own compilation, written
                    // atomically and keyed by content hash and engine compatibility hash.
                    match unsafe { Component::deserialize_file(&self.inner.engine, path) } {
                        Ok(component) => return Ok((component, CompileSource::Cache)),
                        Err(error) => {
                            tracing::warn!(path = %path.display(), error = %format!("{error:#}"), "ignoring unusable cache entry");
                        }
                    }
                }
                Ok(false) => {}
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "ignoring a compiled-component cache entry that others could have written; compiling instead");
                }
            }
        }
        let version = checked.version();
        tracing::info!(%version, size = bytes.len(), "compiling component (not in the cache; large components take a minute)");
        let started = std::time::Instant::now();
        let component = Component::new(&self.inner.engine, bytes)
            .map_err(|e| WasmError::Compile(format!("{e:#}")))?;
        tracing::info!(%version, size = bytes.len(), duration = %humantime::format_duration(std::time::Duration::from_millis(started.elapsed().as_millis() as u64)), "component compiled");
        if let Some(path) = cached
            && let Err(error) = cache::write_entry(&component, &path)
        {
            tracing::warn!(path = %path.display(), %error, "could not write the compiled-component cache");
        }
        Ok((component, CompileSource::Compiled))
    }

    fn cache_path(&self, bytes: &ComponentBytes) -> Option<PathBuf> {
        let dir = self.inner.cache_dir.as_ref()?;
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(
            &self.inner.engine.precompile_compatibility_hash(),
            &mut engine_hash,
        );
        let engine_hash = std::hash::Hasher::finish(&engine_hash);
        Some(dir.join(format!(
            "{}-{engine_hash:016x}.cwasm",
            hex::encode(bytes.digest)
        )))
    }
}

/// Component bytes that passed [`check_component_bytes`], with their SHA-256: checked and
/// hashed once, then versioned, compiled and cached from this value.
#[derive(Clone)]
pub struct ComponentBytes {
    bytes: Arc<[u8]>,
    digest: [u8; 32],
}

impl ComponentBytes {
    /// Checks `bytes` and hashes them.
    ///
    /// # Errors
    /// As [`check_component_bytes`].
    pub fn new(bytes: Vec<u8>) -> Result<Self, WasmError> {
        check_component_bytes(&bytes)?;
        let digest = Sha256::digest(&bytes).into();
        Ok(ComponentBytes {
            bytes: bytes.into(),
            digest,
        })
    }

    /// The version id of these bytes ([`version_id`]).
    pub fn version(&self) -> String {
        hex::encode(&self.digest[..8])
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Their length.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether there are none (never, for checked bytes).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A compiled component and what it was compiled from: handed from the compiler to the
/// handler registry in memory (the on-disk cache is for the next start, not a hand-off).
#[derive(Clone)]
pub struct Compiled {
    pub(crate) component: Component,
    pub(crate) version: String,
    pub(crate) source: CompileSource,
    pub(crate) time: Duration,
    pub(crate) size: usize,
}

impl Compiled {
    /// The version id of the bytes it was compiled from.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether it was compiled now or read from the cache.
    pub fn source(&self) -> CompileSource {
        self.source
    }
}

/// The content hash used as a handler's version id.
pub fn version_id(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..8])
}

/// Rejects bytes that are not a WebAssembly component, saying what they are instead.
///
/// # Errors
/// [`WasmError::NotWasm`], [`WasmError::NotComponent`] or [`WasmError::UnknownWasm`].
pub fn check_component_bytes(bytes: &[u8]) -> Result<(), WasmError> {
    if !bytes.starts_with(b"\0asm") {
        return Err(WasmError::NotWasm);
    }
    if wasmparser::Parser::is_core_wasm(bytes) {
        return Err(WasmError::NotComponent);
    }
    if !wasmparser::Parser::is_component(bytes) {
        let header = bytes.get(4..8).map(hex::encode);
        return Err(WasmError::UnknownWasm(header.unwrap_or_else(|| {
            "missing (the file ends after the magic)".into()
        })));
    }
    Ok(())
}

fn engine_config(pool: &PoolConfig) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.consume_fuel(true);
    config.epoch_interruption(true);
    config.parallel_compilation(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    config.max_wasm_stack(1 << 20);
    config.async_stack_size(2 << 20);
    // Handlers are called one invocation per store, never concurrently inside one: the
    // component-model concurrency runtime would only cost set-up work in every new store.
    config.concurrency_support(false);
    let mut pooling = PoolingAllocationConfig::default();
    let instances = pool.instances.max(1);
    pooling
        .total_component_instances(instances)
        // Toolchains such as componentize-py and componentize-js produce components with
        // many core instances, memories and tables.
        .total_core_instances(instances * 4)
        .total_memories(instances * 2)
        .total_tables(instances * 4)
        .total_stacks(instances)
        .max_core_instances_per_component(64)
        .max_memories_per_component(4)
        .max_tables_per_component(16)
        .max_component_instance_size(4 << 20)
        .max_core_instance_size(4 << 20)
        .table_elements(pool.table_elements)
        .max_memory_size(pool.max_memory.as_u64() as usize)
        // Pages kept mapped (and zeroed with memset instead of madvise) when a slot is reused:
        // a guest's stack and data live in its first pages, so a fresh instance of a small
        // guest (64 KiB stack) reuses them warm; more than this costs zeroing time per
        // instance for guests that never touch it.
        .linear_memory_keep_resident(256 << 10)
        .table_keep_resident(256 << 10);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    config
}

fn spawn_epoch_ticker(engine: wasmtime::EngineWeak, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("eventbroker-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(EPOCH_TICK);
                match engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the epoch ticker; handler deadlines are not enforced inside guests");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_told_apart_by_what_they_are() {
        assert!(matches!(
            check_component_bytes(b"hello"),
            Err(WasmError::NotWasm)
        ));
        assert!(matches!(
            check_component_bytes(b"\0asm\x01\0\0\0"),
            Err(WasmError::NotComponent)
        ));
        for strange in [&b"\0asm\x02\0\0\0"[..], b"\0asm\x0d\0\x07\0", b"\0asm"] {
            let error = check_component_bytes(strange).unwrap_err();
            assert!(matches!(error, WasmError::UnknownWasm(_)), "{error}");
            let text = error.to_string();
            assert!(
                text.contains("neither a core WebAssembly module nor a component"),
                "{text}"
            );
            assert!(!text.contains("does not start with"), "{text}");
        }
        check_component_bytes(b"\0asm\x0d\0\x01\0").expect("a component header");
    }
}
