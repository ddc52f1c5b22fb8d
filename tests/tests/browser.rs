//! The page at `/` in a real browser: headless Chromium (Debian's `chromium`) opens it, the
//! page publishes over the WebSocket (on load via `?demo=`, then through its publish form),
//! and the event processed by a WebAssembly handler appears on the page.
//!
//! The browser is driven through the DevTools protocol over a WebSocket (tokio-tungstenite),
//! no browser-automation crate needed. Without Chromium the test skips loudly; with
//! `EVENTBROKER_REQUIRE_SERVICES=1` it fails.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use eventbroker_tests::guests;
use eventbroker_tests::host::{TestHost, install};
use eventbroker_tests::{PATIENCE, wait_for};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The Chromium binary, if installed.
fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists());
    if found.is_none() {
        eventbroker_tests::services::skip(
            "Chromium is not installed (apt-get install -y chromium)",
        );
    }
    found
}

/// A headless Chromium showing `url`, killed on drop.
struct Browser {
    child: Child,
    devtools: String,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn open(binary: &PathBuf, url: &str) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let browser_ws = rx
            .recv_timeout(PATIENCE)
            .expect("chromium prints its DevTools address");
        // ws://127.0.0.1:PORT/devtools/browser/ID → http://127.0.0.1:PORT
        let devtools = browser_ws
            .replacen("ws://", "http://", 1)
            .split("/devtools/")
            .next()
            .unwrap_or_default()
            .to_owned();
        Browser {
            child,
            devtools,
            _profile: profile,
        }
    }

    /// The DevTools WebSocket of the page showing `host_url`.
    async fn page(&self, host_url: &str) -> Page {
        let list_url = format!("{}/json/list", self.devtools);
        let target = wait_for("the page target", || {
            let list_url = list_url.clone();
            async move {
                let targets: Value = reqwest::get(&list_url).await.ok()?.json().await.ok()?;
                targets.as_array()?.iter().find_map(|t| {
                    (t["type"] == "page" && t["url"].as_str()?.starts_with(host_url))
                        .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))?
                })
            }
        })
        .await;
        let (socket, _) = tokio_tungstenite::connect_async(target)
            .await
            .expect("DevTools connects");
        Page { socket, next_id: 1 }
    }
}

/// A DevTools session on one page.
struct Page {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    /// Evaluates `expression` in the page and returns its (JSON) value.
    async fn eval(&mut self, expression: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let command = json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true},
        });
        self.socket
            .send(Message::Text(command.to_string().into()))
            .await
            .expect("send to DevTools");
        loop {
            let message = tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("DevTools answers")
                .expect("DevTools open")
                .expect("DevTools message");
            let Message::Text(text) = message else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if reply["id"] == id {
                if let Some(exception) = reply["result"].get("exceptionDetails") {
                    panic!("{expression} threw: {exception}");
                }
                return reply["result"]["result"]["value"].clone();
            }
        }
    }

    /// Polls `expression` until it returns a string for which `done` holds.
    async fn until(&mut self, what: &str, expression: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let value = self.eval(expression).await;
            let text = value.as_str().unwrap_or_default().to_owned();
            if done(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last value {value}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_publishes_and_shows_events_handled_by_wasm() {
    let Some(binary) = chromium() else {
        return;
    };
    let built = guests::build();
    let host = TestHost::start(|_, dir| {
        let manifest =
            std::fs::read_to_string(built.guest_dir("rust-audit-logger").join("manifest.toml"))
                .expect("manifest");
        install(
            dir,
            "audit-logger",
            &built.guest("rust_audit_logger"),
            Some(&manifest),
        );
    })
    .await;
    let browser = Browser::open(&binary, &format!("{}/?demo=page.demo.loaded", host.url));
    let mut page = browser.page(&host.url).await;

    // On load the page subscribed, published the demo event over the WebSocket, and shows
    // it once the WebAssembly handler processed it. DevTools may attach before the document
    // has a body, so the poll tolerates its absence.
    let demo = page
        .until(
            "the demo event to be processed",
            "(document.body && document.body.dataset.demo) || ''",
            |v| v == "completed" || v.starts_with("error") || v == "failed",
        )
        .await;
    assert_eq!(demo, "completed");
    let handlers = page.eval("document.body.dataset.demoHandlers").await;
    assert_eq!(handlers, "audit-logger:succeeded");
    let session = page.eval("document.body.dataset.session").await;

    // The host agrees: a websocket event from the page's session, handled by the guest.
    let (status, list) = host.get("/v1/events?type=page.demo.loaded").await;
    assert_eq!(status, 200, "{list}");
    let event = &list["events"][0];
    assert_eq!(event["source"], "websocket", "{list}");
    assert_eq!(event["session_id"], session, "{list}");
    assert_eq!(event["handlers"][0]["handler"], "audit-logger");

    // The handlers panel lists the deployed handler.
    page.until(
        "the handlers panel",
        "document.getElementById('handlers').textContent",
        |v| v.contains("audit-logger"),
    )
    .await;

    // The publish form: fill it in and submit; the processed event appears in the table.
    page.eval(
        "document.getElementById('type').value = 'page.form.submitted';\
         document.getElementById('payload').value = '{\"from\": \"form\"}';\
         document.querySelector('#publish button').click(); 'ok'",
    )
    .await;
    let row = page
        .until(
            "the form's event to be processed",
            "Array.from(document.querySelectorAll('#events tr'))\
               .filter(r => r.textContent.includes('page.form.submitted'))\
               .map(r => r.dataset.status + ' ' + r.textContent).join('|')",
            |v| v.starts_with("completed") || v.starts_with("failed"),
        )
        .await;
    assert!(row.starts_with("completed"), "{row}");
    assert!(row.contains("audit-logger:succeeded"), "{row}");
    assert!(row.contains("websocket"), "{row}");
    drop(page);
    drop(browser);
    host.stop().await;
}
