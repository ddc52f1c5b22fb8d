//! A host started in-process through the library (`eventbroker::service`), on a free port,
//! with its own handlers directory and compiled-component cache.

use std::path::{Path, PathBuf};
use std::time::Duration;

use eventbroker_server::Config;
use eventbroker_server::Service;
use serde_json::Value;

/// A running host and what it needs on disk.
pub struct TestHost {
    /// The service.
    pub service: Service,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// Its handlers directory.
    pub handlers_dir: PathBuf,
    /// HTTP client.
    pub http: reqwest::Client,
    /// `server.token` of the host, if the test set one: the helpers below send it.
    pub token: Option<String>,
    _dir: tempfile::TempDir,
}

/// A config for tests: port 0, a temp handlers dir, fast retries, a shared compile cache.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.handlers.dir = dir.join("handlers");
    config.handlers.cache_dir =
        Some(crate::guests::repo_root().join("target/test-component-cache"));
    config.handlers.pool.instances = 64;
    config.event_broker.instance_id = "test-host".into();
    config.event_broker.worker_count = 4;
    config.event_broker.retry_policy.initial_delay = Duration::from_millis(10);
    config.event_broker.retry_policy.max_delay = Duration::from_millis(50);
    config
}

impl TestHost {
    /// Starts a host; `prepare` may change the config and put files in the handlers dir
    /// (created beforehand) before the host starts.
    pub async fn start(prepare: impl FnOnce(&mut Config, &Path)) -> TestHost {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        std::fs::create_dir_all(&config.handlers.dir).expect("handlers dir");
        let handlers_dir = config.handlers.dir.clone();
        prepare(&mut config, &handlers_dir);
        let token = config.server.token.clone();
        let service = Service::start(config).await.expect("host starts");
        let url = format!("http://{}", service.local_addr());
        TestHost {
            service,
            url,
            handlers_dir,
            http: reqwest::Client::new(),
            token,
            _dir: dir,
        }
    }

    /// `request` with the host's `server.token`, if it has one.
    pub fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// POSTs an event; returns the status code and JSON body.
    pub async fn publish(&self, body: Value, query: &str) -> (u16, Value) {
        let response = self
            .authed(self.http.post(format!("{}/v1/events{query}", self.url)))
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// GETs a path; returns status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .authed(self.http.get(format!("{}{path}", self.url)))
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The host's `/metrics` text (Prometheus exposition), fetched with the host's token.
    pub async fn metrics(&self) -> String {
        self.authed(self.http.get(format!("{}/metrics", self.url)))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Deploys a component (and manifest) over `PUT /v1/handlers/{name}` as multipart, with
    /// `token` (default: the host's `server.token`).
    pub async fn deploy(
        &self,
        name: &str,
        component: Vec<u8>,
        manifest: Option<&str>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut form = reqwest::multipart::Form::new().part(
            "component",
            reqwest::multipart::Part::bytes(component).file_name(format!("{name}.wasm")),
        );
        if let Some(manifest) = manifest {
            form = form.text("manifest", manifest.to_owned());
        }
        let mut request = self
            .http
            .put(format!("{}/v1/handlers/{name}", self.url))
            .multipart(form);
        if let Some(token) = token.or(self.token.as_deref()) {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until event `id` is `completed` or `failed` and returns it.
    pub async fn finished(&self, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + crate::PATIENCE;
        loop {
            let (status, event) = self.get(&format!("/v1/events/{id}")).await;
            if status == 200 && matches!(event["status"].as_str(), Some("completed" | "failed")) {
                return event;
            }
            if tokio::time::Instant::now() > deadline {
                let (_, stats) = self.get("/v1/stats").await;
                panic!(
                    "event {id} did not finish within {:?}; last seen: {event:#}\nbroker stats: {stats:#}",
                    crate::PATIENCE
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Stops the host gracefully.
    pub async fn stop(self) {
        self.service.stop().await.expect("host stops");
    }
}

/// Copies a component (and optionally a manifest text) into a handlers dir as `name`.
pub fn install(handlers_dir: &Path, name: &str, wasm: &Path, manifest: Option<&str>) {
    std::fs::copy(wasm, handlers_dir.join(format!("{name}.wasm"))).expect("copy component");
    if let Some(text) = manifest {
        std::fs::write(handlers_dir.join(format!("{name}.toml")), text).expect("write manifest");
    }
}
