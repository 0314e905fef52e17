//! Health checks, the token-free metrics listener and the web dashboard,
//! with the real binary (the dashboard through a real Chromium).

use crate::common::{Node, agent};

fn get(url: &str) -> (u16, String, Option<String>) {
    let mut response = agent().get(url).call().expect("answers");
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let body = response.body_mut().read_to_string().unwrap_or_default();
    (response.status().as_u16(), body, content_type)
}

#[test]
fn health_checks_and_metrics_answer_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--metrics-addr", "127.0.0.1:0"]);
    // A catch-all route: the node's two paths still win on the gateway.
    node.deploy("hello", "hello", &["/"]);
    let (status, body) = (node.request("GET", "/anything", b"").0, ());
    assert_eq!(status, 200, "{body:?}");

    for base in [&node.gateway, &node.admin] {
        let (status, body, content_type) = get(&format!("{base}/healthz"));
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"status":"ok"}"#),
            "{base}"
        );
        assert_eq!(content_type.as_deref(), Some("application/json"));
        let (status, body, _) = get(&format!("{base}/readyz"));
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"status":"ready"}"#),
            "{base}"
        );
    }
    // Anything below them is the function's.
    let (status, _, _) = node.request("GET", "/healthz/deeper", b"");
    assert_eq!(status, 200);

    // A route over a health path is refused, saying why.
    let (ok, _, stderr) = node.cli(&[
        "deploy",
        "shadow",
        crate::common::guest("hello").to_str().unwrap(),
        "--route",
        "/readyz",
    ]);
    assert!(!ok && stderr.contains("health checks"), "{stderr}");

    // The metrics listener: no token, metrics and health only.
    let metrics_url = node.metrics_url.clone().expect("--metrics-addr printed");
    let (status, text, content_type) = get(&metrics_url);
    assert_eq!(status, 200, "{text}");
    assert!(
        content_type.is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{text}"
    );
    for needle in [
        "# TYPE mayfly_function_tier stateset",
        "mayfly_function_tier{function=\"hello\",mayfly_function_tier=\"hot\"} 0",
        "# TYPE mayfly_log_lines_dropped counter",
        "mayfly_log_lines_dropped_total 0",
        "mayfly_invocations_total{function=\"hello\",outcome=\"ok\"} 2",
        "mayfly_node_invocation_duration_seconds_count 2",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    // Exactly one tier state is set.
    let states: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("mayfly_function_tier{function=\"hello\"") && l.ends_with(" 1"))
        .collect();
    assert_eq!(states.len(), 1, "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    // Per-function histograms are opt-in.
    assert!(
        !text.contains("mayfly_invocation_duration_seconds_count{function=\"hello\"}"),
        "{text}"
    );
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("function=\"hello\""))
        .count();
    assert_eq!(series, 14, "series of one function:\n{text}");

    let root = metrics_url.trim_end_matches("/metrics");
    assert_eq!(get(&format!("{root}/readyz")).0, 200);
    assert_eq!(get(&format!("{root}/v1/status")).0, 404);
    // The admin API's /metrics still needs a token.
    assert_eq!(get(&format!("{}/metrics", node.admin)).0, 401);
}

/// Where Chromium is: `MAYFLY_CHROMIUM`, else `chromium`,
/// `chromium-browser` or `google-chrome` on the `PATH`.
fn chromium() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("MAYFLY_CHROMIUM") {
        return Some(path.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| {
            ["chromium", "chromium-browser", "google-chrome"].map(|name| dir.join(name))
        })
        .find(|candidate| candidate.is_file())
}

/// The browser test's session: a Chromium page and the runtime it runs on.
struct Browser {
    runtime: tokio::runtime::Runtime,
    browser: chromiumoxide::Browser,
    page: chromiumoxide::Page,
    handler: tokio::task::JoinHandle<()>,
    shots: std::path::PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch(executable: &std::path::Path, url: &str) -> Browser {
        use futures::StreamExt as _;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let config = chromiumoxide::BrowserConfig::builder()
            .chrome_executable(executable)
            .no_sandbox()
            .user_data_dir(profile.path())
            .window_size(1400, 1000)
            .launch_timeout(std::time::Duration::from_secs(60))
            .request_timeout(std::time::Duration::from_secs(60))
            .args([
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .build()
            .expect("browser config");
        let (browser, page, handler) = runtime.block_on(async {
            let (browser, mut handler) = chromiumoxide::Browser::launch(config)
                .await
                .expect("Chromium starts");
            let handler = tokio::spawn(async move {
                while let Some(event) = handler.next().await {
                    if event.is_err() {
                        break;
                    }
                }
            });
            let page = browser.new_page(url).await.expect("a page opens");
            (browser, page, handler)
        });
        let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            runtime,
            browser,
            page,
            handler,
            shots,
            _profile: profile,
        }
    }

    fn eval(&self, expression: &str) -> serde_json::Value {
        self.try_eval(expression)
            .unwrap_or_else(|e| panic!("evaluating {expression}: {e}"))
    }

    /// Evaluates `expression`; an error while a page loads (its context
    /// gone) is the caller's to retry.
    fn try_eval(&self, expression: &str) -> Result<serde_json::Value, String> {
        self.runtime.block_on(async {
            let result = self
                .page
                .evaluate(expression)
                .await
                .map_err(|e| e.to_string())?;
            Ok(result
                .into_value::<serde_json::Value>()
                .unwrap_or(serde_json::Value::Null))
        })
    }

    /// Polls `expression` until it is truthy (60 s at most).
    fn wait_for(&self, expression: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let value = self
                .try_eval(&format!(
                    "(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()"
                ))
                .unwrap_or(serde_json::Value::Null);
            let truthy = match &value {
                serde_json::Value::Null => false,
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {expression}; page: {}",
                self.eval("document.body ? document.body.innerText.slice(0, 2000) : ''")
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Shows one of the app's pages (a same-document navigation, which
    /// fires no load event to wait for).
    fn show(&self, hash: &str) {
        self.eval(&format!("location.hash = '{hash}'"));
    }

    fn goto(&self, url: &str) {
        self.runtime.block_on(async {
            self.page.goto(url).await.expect("navigates");
        });
    }

    /// Clicks the element and waits for a page load when `navigates`.
    fn click(&self, selector: &str, navigates: bool) {
        self.runtime.block_on(async {
            let element = self
                .page
                .find_element(selector)
                .await
                .unwrap_or_else(|e| panic!("no {selector}: {e}"));
            element.click().await.expect("click");
            if navigates {
                self.page.wait_for_navigation().await.expect("navigation");
            }
        });
    }

    fn type_into(&self, selector: &str, text: &str) {
        self.runtime.block_on(async {
            let element = self.page.find_element(selector).await.expect(selector);
            element.click().await.expect("focus");
            element.type_str(text).await.expect("typing");
        });
    }

    fn screenshot(&self, name: &str) {
        let path = self.shots.join(format!("{name}.png"));
        self.runtime.block_on(async {
            self.page
                .save_screenshot(
                    chromiumoxide::page::ScreenshotParams::builder()
                        .full_page(true)
                        .build(),
                    &path,
                )
                .await
                .expect("screenshot");
        });
        eprintln!("dashboard screenshot: {}", path.display());
    }

    fn cookies(&self) -> Vec<chromiumoxide::cdp::browser_protocol::network::Cookie> {
        self.runtime
            .block_on(async { self.page.get_cookies().await.expect("cookies") })
    }

    fn close(mut self) {
        self.runtime.block_on(async {
            let _ = self.browser.close().await;
            let _ = self.browser.wait().await;
        });
        self.handler.abort();
    }

    /// Logs in on the login page with `token`; waits for the overview.
    fn log_in(&self, admin: &str, token: &str) {
        self.goto(&format!("{admin}/dashboard/"));
        self.wait_for("document.getElementById('login') !== null");
        self.type_into("#token", token);
        self.click("#login-submit", true);
        self.wait_for("document.getElementById('page').dataset.loaded === 'overview'");
    }
}

/// POSTs a JSON body to the admin API with the node's admin token.
fn admin_post(node: &Node, path: &str, body: &str) -> (u16, String) {
    let mut response = agent()
        .post(format!("{}{path}", node.admin))
        .header("authorization", node.bearer())
        .header("content-type", "application/json")
        .send(body)
        .expect("admin API answers");
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (response.status().as_u16(), text)
}

fn number(value: &serde_json::Value) -> f64 {
    match value {
        serde_json::Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        serde_json::Value::String(s) => s.parse().unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

fn close_to(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + 1e-9 * a.abs().max(b.abs())
}

#[test]
fn the_dashboard_shows_the_apis_figures_and_acts_with_the_right_token() {
    let Some(executable) = chromium() else {
        assert!(
            std::env::var_os("MAYFLY_REQUIRE_CHROMIUM").is_none(),
            "MAYFLY_REQUIRE_CHROMIUM is set but no Chromium was found: install it \
             (`apt-get install chromium`) or point MAYFLY_CHROMIUM at it"
        );
        eprintln!(
            "\n*** SKIPPED the dashboard's browser test: no Chromium found (install `chromium` \
             or set MAYFLY_CHROMIUM; CI sets MAYFLY_REQUIRE_CHROMIUM=1 so it never skips) ***\n"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy("hello", "echo", &["/hello"]);
    node.deploy("trap", "trap", &["/trap"]);
    node.deploy("talker", "logs", &["/talk"]);
    assert_eq!(node.request("GET", "/talk/before", b"").0, 200);
    for _ in 0..20 {
        assert_eq!(node.request("GET", "/hello", b"").0, 200);
    }
    for _ in 0..5 {
        assert_eq!(node.request("GET", "/trap", b"").0, 500);
    }
    node.await_usage_records("hello", 20);
    node.await_usage_records("trap", 5);
    node.await_usage_records("talker", 1);
    let (status, body) = admin_post(&node, "/v1/queues/orders/messages", r#"{"order": 1}"#);
    assert!(status < 300, "queue send: {status} {body}");
    let (status, body) = admin_post(
        &node,
        "/v1/tokens",
        r#"{"name": "viewer", "scopes": ["read"]}"#,
    );
    assert_eq!(status, 201, "{body}");
    let viewer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let viewer = viewer["token"].as_str().unwrap().to_string();

    let browser = Browser::launch(&executable, &format!("{}/dashboard/", node.admin));
    // No token: the login page.
    browser.wait_for("document.getElementById('login') !== null");
    browser.screenshot("login");
    browser.log_in(&node.admin, &node.token);

    // The cookie: HttpOnly, SameSite=Strict (not Secure: plain HTTP here).
    let cookies = browser.cookies();
    let session = cookies
        .iter()
        .find(|c| c.name == "mayfly_session")
        .expect("the session cookie");
    assert!(session.http_only, "{session:?}");
    assert_eq!(
        session.same_site,
        Some(chromiumoxide::cdp::browser_protocol::network::CookieSameSite::Strict),
        "{session:?}"
    );
    assert!(
        browser
            .eval("document.cookie")
            .as_str()
            .is_some_and(|c| !c.contains("mayfly_session")),
        "the page's script must not see the cookie"
    );

    // Overview: the figures are the API's.
    let summary = node.admin_json("/v1/dashboard/summary");
    let ledger = node.admin_json("/v1/usage?from=1h&group_by=function");
    for function in ["hello", "trap"] {
        let row = |class: &str| {
            number(&browser.wait_for(&format!(
                "document.querySelector('#functions tr[data-function=\"{function}\"] td.{class}').dataset.value"
            )))
        };
        let api = summary["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["function"] == function)
            .unwrap_or_else(|| panic!("{function} in {summary}"));
        let ledger_row = ledger["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["function"] == function)
            .unwrap_or_else(|| panic!("{function} in {ledger}"));
        let (requests, errors, cost) = (row("requests"), row("errors"), row("cost"));
        assert_eq!(requests, number(&api["requests"]), "{function}");
        assert_eq!(errors, number(&api["errors"]), "{function}");
        assert!(
            close_to(cost, number(&api["cost"])),
            "{function}: {cost} vs {api}"
        );
        // And the in-process series agree with the ledger.
        assert_eq!(requests, number(&ledger_row["invocations"]), "{function}");
        assert_eq!(errors, number(&ledger_row["errors"]), "{function}");
        assert!(
            close_to(cost, number(&ledger_row["cost"]["total"])),
            "{function}: {cost} vs {ledger_row}"
        );
    }
    assert_eq!(
        browser.eval("document.querySelector('#functions tr[data-function=\"hello\"] td.requests').textContent"),
        "20"
    );
    browser.screenshot("overview");

    // The function page: charts, versions, the live version, a rollback.
    browser.show("#/function/hello");
    browser.wait_for("document.getElementById('page').dataset.loaded === 'function:hello'");
    assert_eq!(
        number(&browser.wait_for("document.getElementById('fn-requests').dataset.value")),
        20.0
    );
    assert_eq!(
        browser.wait_for("document.getElementById('fn-live').textContent"),
        "2"
    );
    assert_eq!(
        browser.eval("document.querySelectorAll('#charts .uplot').length"),
        4
    );
    browser.screenshot("function");
    browser.click("#rollback", false);
    browser.click("#confirm-ok", false);
    browser.wait_for(
        "document.getElementById('notice').textContent.includes('live now serves version 1')",
    );
    let function = node.admin_json("/v1/functions/hello");
    assert_eq!(function["live"]["version"], 1, "{function}");
    browser.wait_for("document.getElementById('fn-live').textContent === '1'");
    browser.screenshot("function-rolled-back");

    // Usage: the ledger's totals, a table and the CSV.
    browser.show("#/usage");
    browser.wait_for("document.getElementById('page').dataset.loaded === 'usage'");
    let usage = node.admin_json("/v1/usage?from=168h&group_by=function");
    let total =
        |id: &str| number(&browser.eval(&format!("document.getElementById('{id}').dataset.value")));
    assert_eq!(
        total("usage-total-requests"),
        number(&usage["total"]["invocations"])
    );
    assert_eq!(total("usage-total-requests"), 26.0);
    assert_eq!(
        total("usage-total-errors"),
        number(&usage["total"]["errors"])
    );
    assert!(close_to(
        total("usage-total-cost"),
        number(&usage["total"]["cost"]["total"])
    ));
    assert!(
        browser
            .eval("document.getElementById('csv').href")
            .as_str()
            .is_some_and(|href| href.starts_with("blob:"))
    );
    browser.screenshot("usage");

    // Events: the queue and its depth.
    browser.show("#/events");
    browser.wait_for("document.getElementById('page').dataset.loaded === 'events'");
    assert!(
        browser
            .eval("document.getElementById('queues').textContent")
            .as_str()
            .is_some_and(|text| text.contains("orders")),
        "the queue is listed"
    );
    browser.screenshot("events");

    // A dead letter, shown and redriven from the page.
    let (status, body) = admin_post(
        &node,
        "/v1/functions/trap/triggers",
        r#"{"source": {"kind": "queue", "queue": "jobs"}, "retry": {"max_attempts": 1, "backoff_ms": 100}}"#,
    );
    assert!(status < 300, "trigger: {status} {body}");
    let (status, body) = admin_post(&node, "/v1/queues/jobs/messages", r#"{"job": 1}"#);
    assert!(status < 300, "queue send: {status} {body}");
    crate::common::eventually(std::time::Duration::from_secs(30), "a dead letter", || {
        (node.admin_json("/v1/functions/trap/dlq").as_array()?.len() == 1).then_some(())
    });
    browser.show("#/usage");
    browser.wait_for("document.getElementById('page').dataset.loaded === 'usage'");
    browser.show("#/events");
    browser.wait_for("document.querySelector('button.redrive[data-function=\"trap\"]') !== null");
    browser.screenshot("events-dead-letter");
    browser.click("button.redrive[data-function=\"trap\"]", false);
    browser.click("#confirm-ok", false);
    browser.wait_for("document.getElementById('notice').textContent.includes('\"redriven\":1')");

    // Logs: the tail, then a new line as it is written.
    browser.show("#/function/talker");
    browser.wait_for("document.getElementById('page').dataset.loaded === 'function:talker'");
    browser.wait_for(
        "document.getElementById('logs').textContent.includes('stdout line one for /talk/before')",
    );
    assert_eq!(node.request("GET", "/talk/live", b"").0, 200);
    browser.wait_for(
        "document.getElementById('logs').textContent.includes('stdout line one for /talk/live')",
    );
    browser.screenshot("function-logs");

    // A read-only token looks but cannot act: the 403 is shown.
    browser.click("#logout", true);
    browser.wait_for("document.getElementById('login') !== null");
    browser.log_in(&node.admin, &viewer);
    browser.show("#/function/hello");
    browser.wait_for("document.getElementById('page').dataset.loaded === 'function:hello'");
    browser.click("#rollback", false);
    browser.click("#confirm-ok", false);
    let refused = browser.wait_for(
        "document.getElementById('notice').className === 'error' && document.getElementById('notice').textContent",
    );
    assert!(
        refused.as_str().is_some_and(|t| t.contains("403")),
        "{refused}"
    );
    browser.screenshot("read-only-refused");
    assert_eq!(node.admin_json("/v1/functions/hello")["live"]["version"], 1);
    browser.close();

    // Without the dashboard's header, the cookie alone cannot act.
    let response = agent()
        .post(format!("{}/v1/functions/hello/rollback", node.admin))
        .header("cookie", format!("mayfly_session={}", node.token))
        .send_empty()
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
}
