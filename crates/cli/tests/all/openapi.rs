//! The admin API's OpenAPI description: served, OpenAPI 3.1, well formed,
//! and in step with the routes the node serves, both ways.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::{Node, agent, files_under};

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// `{name}` parameters of a path template.
fn template_params(path: &str) -> BTreeSet<String> {
    path.split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_string()))
        .collect()
}

#[test]
fn the_description_is_openapi_3_1_and_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let doc = node.admin_json("/v1/openapi.json");

    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.1."), "openapi is {version:?}");
    assert_eq!(doc["info"]["title"], "Mayfly admin API");
    assert!(doc["info"]["version"].is_string());
    assert_eq!(
        doc["components"]["securitySchemes"]["token"]["scheme"], "bearer",
        "the bearer token scheme is described"
    );
    let tags: BTreeSet<&str> = doc["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();

    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 30, "only {} paths described", paths.len());
    let mut operation_ids = BTreeSet::new();
    for (path, item) in paths {
        assert!(path.starts_with('/'), "{path}");
        assert!(
            !path.contains('*'),
            "{path}: catch-alls are plain parameters"
        );
        let wanted = template_params(path);
        for method in METHODS {
            let Some(operation) = item.get(method) else {
                continue;
            };
            let at = format!("{} {path}", method.to_uppercase());
            let id = operation["operationId"].as_str().unwrap_or_default();
            assert!(!id.is_empty(), "{at} has no operationId");
            assert!(
                operation_ids.insert(id.to_string()),
                "{at}: operationId {id} twice"
            );
            assert!(operation["summary"].is_string(), "{at} has no summary");
            for tag in operation["tags"].as_array().expect("tags") {
                let tag = tag.as_str().unwrap_or_default();
                assert!(tags.contains(tag), "{at}: tag {tag} is not declared");
            }
            let responses = operation["responses"].as_object().expect("responses");
            // The health checks (no token, `security: [{}]`) have no error
            // envelope; everything behind the gate does.
            let public = operation["security"].as_array().is_some_and(|all| {
                all.iter()
                    .any(|r| r.as_object().is_some_and(|r| r.is_empty()))
            });
            assert!(
                public || responses.contains_key("default"),
                "{at} does not describe its error answer"
            );
            let given: BTreeSet<String> = operation["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .inspect(|p| assert_eq!(p["required"], true, "{at}: {p}"))
                        .filter_map(|p| p["name"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(given, wanted, "{at}: path parameters");
        }
    }

    // And an independent validator (openapi-spec-validator, pinned in the
    // Python tools venv) agrees that it is a valid OpenAPI 3.1 document:
    // checks of our own could share the generator's blind spots.
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let checked = std::process::Command::new(crate::s3::clients().join("openapi-spec-validator"))
        .arg(&file)
        .output()
        .expect("openapi-spec-validator runs");
    assert!(
        checked.status.success(),
        "openapi-spec-validator refuses /v1/openapi.json:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[test]
fn every_route_the_node_serves_is_described() {
    // Routes are registered only through `utoipa_axum::routes!`, which
    // takes the path from the handler's description, so a route cannot be
    // served undescribed unless someone adds a plain `.route(`: refuse that
    // in the admin API's sources. Allowed: the description's own route, the
    // dashboard's HTML pages and assets (not the JSON API), and /metrics
    // served again on the token-free metrics listener.
    const ALLOWED: [&str; 3] = ["openapi::PATH", "\"/dashboard", "\"/metrics\""];
    let admin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../platform/src");
    let mut sources: Vec<_> = files_under(&admin.join("admin"))
        .iter()
        .map(|file| admin.join("admin").join(file))
        .collect();
    sources.push(admin.join("admin.rs"));
    for file in sources {
        let text = std::fs::read_to_string(&file).unwrap();
        let file = file.display();
        for (number, line) in text.lines().enumerate() {
            let plain = [".route(", ".route_service(", ".nest("]
                .iter()
                .any(|call| line.contains(call));
            assert!(
                !plain || ALLOWED.iter().any(|allowed| line.contains(allowed)),
                "{file}:{}: a route added without `routes!` is missing from the OpenAPI \
                 description: give its handler a #[utoipa::path] and register it with routes!",
                number + 1
            );
        }
    }

    // And every described operation is served: the node answers it with
    // something other than the router's own 404 or 405.
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let doc = node.admin_json("/v1/openapi.json");
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete: String = path
            .split('/')
            .map(|part| match part {
                "{version}" => "1",
                p if p.starts_with('{') => "openapi-probe",
                p => p,
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in METHODS.iter().filter(|m| item.get(**m).is_some()) {
            let request = ureq::http::Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(format!("{}{concrete}", node.admin))
                .header("authorization", node.bearer())
                .body(Vec::new())
                .unwrap();
            let mut response = agent().run(request).expect("admin API answers");
            let status = response.status().as_u16();
            let body = response.body_mut().read_to_string().unwrap_or_default();
            // The router's own 405 (a handler may answer 405 itself: a
            // secret's value is never returned).
            assert!(
                !(status == 405 && body.contains("is not allowed on")),
                "{method} {concrete}: {body}"
            );
            assert!(
                !body.contains("no admin endpoint"),
                "{method} {path} is described but not served: {body}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 45, "only {checked} operations checked");
}
