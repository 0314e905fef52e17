//! Deploy-time checks and compilation of uploaded components.
//!
//! Everything a user can get wrong is caught here, once, with a message that
//! says what to do, so that nothing invalid is ever stored or served.

use wasmtime::Engine;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::state::InvocationState;

/// The interface a WASI 0.2 function exports: the `wasi:http/proxy` world's handler.
const HANDLER_INTERFACE: &str = "wasi:http/incoming-handler";

/// The interface a WASI 0.3 function exports: the `wasi:http/service` world's handler.
const P3_HANDLER_INTERFACE: &str = "wasi:http/handler";

/// The one WASI 0.3 version the host implements (wasmtime 48's).
pub const P3_VERSION: &str = "0.3.0";

/// What to build for, in every refusal of a handler the host cannot serve.
const BUILD_FOR: &str = "build for wasi:http/proxy 0.2 (`cargo build --target wasm32-wasip2` \
     with the wasip2 crate) or for wasi:http/service 0.3.0 (wasi:http/handler@0.3.0, e.g. the \
     wasip3 crate 0.9.0+wasi-0.3.0 on wasm32-wasip2)";

/// The WASI 0.2 interfaces the host links for every function (without their
/// `@version`). Any 0.2.x version of each is accepted. Linking an interface
/// grants nothing by itself: each function's context decides what it may
/// reach (no files, no sockets and no outbound HTTP unless granted).
pub const HOST_INTERFACES: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/ip-name-lookup",
    "wasi:http/types",
    "wasi:http/outgoing-handler",
];

/// The WASI 0.3 interfaces the host links (without their `@version`), for
/// `wasi:http/handler` functions; any 0.3.x version of each is accepted by
/// name, and the linker then checks every function the component uses.
/// As with [`HOST_INTERFACES`], linking grants nothing: outbound requests
/// through `wasi:http/client` pass the same policy as 0.2's.
pub const P3_HOST_INTERFACES: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/types",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/types",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/system-clock",
    "wasi:clocks/timezone",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:sockets/types",
    "wasi:sockets/ip-name-lookup",
    "wasi:http/types",
    "wasi:http/client",
];

/// Which `wasi:http` handler a component exports, and so how it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerKind {
    /// `wasi:http/incoming-handler@0.2.x` (WASI 0.2, the `wasi:http/proxy` world).
    P2,
    /// `wasi:http/handler@0.3.x` (WASI 0.3, the `wasi:http/service` world).
    P3,
}

impl HandlerKind {
    /// Which handler the component's export names hold, if any the host serves.
    pub(crate) fn of_exports<'a>(
        exports: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, Vec<String>> {
        let mut unsupported = Vec::new();
        for name in exports {
            if is_wasi_02(name, HANDLER_INTERFACE) {
                return Ok(HandlerKind::P2);
            }
            if is_wasi_03(name, P3_HANDLER_INTERFACE) {
                return Ok(HandlerKind::P3);
            }
            if name.starts_with(HANDLER_INTERFACE) || name.starts_with(P3_HANDLER_INTERFACE) {
                unsupported.push(name.to_string());
            }
        }
        Err(unsupported)
    }
}

/// The capability interfaces the host links, by exact name: WASI drafts
/// whose versions are not semver-compatible with one another, so only these
/// versions are accepted: the drafts' own, and those other hosts ship
/// (wasi:config 0.2.0-rc.1 in wasmtime-wasi-config; 0.2.0-draft-2024-09-27
/// and wasi:keyvalue 0.2.0-draft2 in Spin 3). Every version reaches the same
/// grants and stores. As with [`HOST_INTERFACES`], linking grants nothing:
/// each function reaches only the buckets and values granted to it.
pub const CAPABILITY_INTERFACES: &[&str] = &[
    "wasi:keyvalue/store@0.2.0-draft",
    "wasi:keyvalue/atomics@0.2.0-draft",
    "wasi:keyvalue/batch@0.2.0-draft",
    "wasi:config/store@0.2.0-draft",
    "wasi:keyvalue/store@0.2.0-draft2",
    "wasi:keyvalue/atomics@0.2.0-draft2",
    "wasi:keyvalue/batch@0.2.0-draft2",
    "wasi:config/store@0.2.0-rc.1",
    "wasi:config/store@0.2.0-draft-2024-09-27",
    "wasi:nn/tensor@0.2.0-rc-2024-10-28",
    "wasi:nn/graph@0.2.0-rc-2024-10-28",
    "wasi:nn/inference@0.2.0-rc-2024-10-28",
    "wasi:nn/errors@0.2.0-rc-2024-10-28",
];

/// Why an upload cannot be deployed. Every variant but [`DeployError::Internal`]
/// is the uploader's to fix, and its message says how.
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum DeployError {
    /// The bytes are not WebAssembly at all.
    #[error(
        "the upload is not a WebAssembly binary (it does not start with the \\0asm magic bytes): \
         upload the .wasm file your build produced"
    )]
    NotWasm,
    /// A core module was uploaded where a component is required.
    #[error(
        "this is a core WebAssembly module, not a component: build with \
         `cargo build --target wasm32-wasip2` (or wrap the module with `wasm-tools component new`)"
    )]
    CoreModule,
    /// WebAssembly of a layer or version this host does not know.
    #[error(
        "this WebAssembly binary is neither a core module nor a component this host supports: \
         build a WASI 0.2 component (e.g. `cargo build --target wasm32-wasip2`)"
    )]
    UnknownEncoding,
    /// The component is malformed or fails to compile.
    #[error("the component is not valid: {0}")]
    Invalid(String),
    /// The component does not export the HTTP handler.
    #[error(
        "the component does not export {HANDLER_INTERFACE}@0.2 or {P3_HANDLER_INTERFACE}@0.3: a \
         function must target the wasi:http/proxy (WASI 0.2) or wasi:http/service (WASI 0.3) \
         world (it exports: {}); {BUILD_FOR}",
        display_list(.exports)
    )]
    MissingHandler {
        /// What the component exports instead.
        exports: Vec<String>,
    },
    /// The component exports a wasi:http handler of a version this host
    /// does not serve (a WASI 0.3 release candidate, or a later major).
    #[error(
        "the component exports {}, a wasi:http version this host does not serve (it serves \
         {HANDLER_INTERFACE}@0.2.x and {P3_HANDLER_INTERFACE}@{P3_VERSION}): {BUILD_FOR}",
        .0.join(", ")
    )]
    UnsupportedHandlerVersion(Vec<String>),
    /// The component imports interfaces the host does not provide.
    #[error(
        "the component imports interfaces this host does not provide: {}; a function may \
         import only WASI 0.2 interfaces of the wasi:http/proxy world and wasi:cli, \
         wasi:clocks, wasi:filesystem, wasi:io, wasi:random and wasi:sockets, their WASI \
         {P3_VERSION} versions (a wasi:http/handler@0.3 function; not a 0.3 release \
         candidate), plus {}",
        .0.join(", "),
        CAPABILITY_INTERFACES.join(", ")
    )]
    UnsupportedImports(Vec<String>),
    /// The imports are known by name but their types do not match the host's.
    #[error("the component's imports do not match the host's interfaces: {0}")]
    Link(String),
    /// Compiling took longer than the node allows.
    #[error(
        "compiling took more than {}s, this node's limit; the component is too large or \
         pathological: make it smaller (fewer or smaller functions)",
        .limit_secs
    )]
    TooSlow {
        /// The node's compile time limit, in seconds.
        limit_secs: u64,
    },
    /// Compiling needed more memory than the node allows.
    #[error(
        "compiling needed more than {} MiB, this node's limit; the component is too large or \
         pathological: make it smaller (fewer or smaller functions)",
        .limit_mib
    )]
    TooMuchMemory {
        /// The node's compile memory limit, in MiB.
        limit_mib: u64,
    },
    /// Every compile slot stayed busy for as long as a deploy may wait.
    #[error(
        "{running} compilations are running (this node's limit) and none finished within \
         {waited_secs}s: try the deploy again later"
    )]
    Busy {
        /// Compilations the node runs at once.
        running: usize,
        /// How long this deploy waited, in seconds.
        waited_secs: u64,
    },
    /// A fault of the node, not of the upload.
    #[error("internal error while compiling: {0}")]
    Internal(String),
}

fn display_list(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".to_string()
    } else {
        items.join(", ")
    }
}

/// A validated component and its compiled, serialized form.
#[derive(Debug, Clone)]
pub struct CompiledComponent {
    /// Native code and metadata for this engine, to be stored as the
    /// function's artifact and loaded with [`crate::Runtime::load_artifact`].
    pub artifact: Vec<u8>,
    /// The names of the component's imports, for display and auditing.
    pub imports: Vec<String>,
}

/// An engine and the linker of the host interfaces for it.
pub(crate) type EngineLinker<'a> = (&'a Engine, &'a Linker<InvocationState>);

/// Validates and compiles `wasm`, checking it against the host interfaces:
/// with `p2` (no async support) when it can, else with `p3` (built only
/// then), so that WASI 0.2 components keep running on the engine without
/// async support.
pub(crate) fn compile<'a>(
    p2: EngineLinker<'a>,
    p3: impl Fn() -> Result<EngineLinker<'a>, DeployError>,
    wasm: &[u8],
) -> Result<CompiledComponent, DeployError> {
    if !wasm.starts_with(b"\0asm") {
        return Err(DeployError::NotWasm);
    }
    if wasmtime::wasmparser::Parser::is_core_wasm(wasm) {
        return Err(DeployError::CoreModule);
    }
    if !wasmtime::wasmparser::Parser::is_component(wasm) {
        return Err(DeployError::UnknownEncoding);
    }
    let (component, (engine, linker)) = match Component::new(p2.0, wasm) {
        Ok(component) => (component, p2),
        // The p3 engine accepts everything p2's does and more, so its
        // error is the one that says what is wrong.
        Err(_) => {
            let p3 = p3()?;
            Component::new(p3.0, wasm)
                .map(|component| (component, p3))
                .map_err(|e| DeployError::Invalid(format!("{e:#}")))?
        }
    };
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let handler = match HandlerKind::of_exports(exports.iter().map(String::as_str)) {
        Ok(handler) => handler,
        Err(unsupported) if !unsupported.is_empty() => {
            return Err(DeployError::UnsupportedHandlerVersion(unsupported));
        }
        Err(_) => return Err(DeployError::MissingHandler { exports }),
    };
    // A 0.3 handler needs the async support even if nothing else does.
    let (component, engine, linker) = if handler == HandlerKind::P3 && std::ptr::eq(engine, p2.0) {
        let p3 = p3()?;
        let component =
            Component::new(p3.0, wasm).map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        (component, p3.0, p3.1)
    } else {
        (component, engine, linker)
    };
    let ty = component.component_type();

    let imports: Vec<String> = ty
        .imports(engine)
        .map(|(name, item)| match item.ty {
            ComponentItem::ComponentInstance(_) => name.to_string(),
            _ => format!("{name} (not an interface)"),
        })
        .collect();
    let unsupported: Vec<String> = imports
        .iter()
        .filter(|name| !is_host_interface(name))
        .cloned()
        .collect();
    if !unsupported.is_empty() {
        return Err(DeployError::UnsupportedImports(unsupported));
    }

    // Names match; the linker now checks every function signature too.
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| DeployError::Link(format!("{e:#}")))?;
    match handler {
        HandlerKind::P2 => {
            drop(ProxyPre::new(pre).map_err(|e| DeployError::Link(format!("{e:#}")))?)
        }
        HandlerKind::P3 => {
            drop(ServicePre::new(pre).map_err(|e| DeployError::Link(format!("{e:#}")))?)
        }
    }

    let artifact = component
        .serialize()
        .map_err(|e| DeployError::Internal(format!("{e:#}")))?;
    Ok(CompiledComponent { artifact, imports })
}

/// Whether the host links the interface `name` (with its version).
fn is_host_interface(name: &str) -> bool {
    HOST_INTERFACES.iter().any(|host| is_wasi_02(name, host))
        || P3_HOST_INTERFACES.iter().any(|host| is_wasi_03(name, host))
        || CAPABILITY_INTERFACES.contains(&name)
}

/// Whether `name` is `interface` at some WASI 0.3.x release (no release
/// candidate: wasmtime 48 implements 0.3.0 and none of the earlier drafts).
fn is_wasi_03(name: &str, interface: &str) -> bool {
    name.strip_prefix(interface)
        .and_then(|rest| rest.strip_prefix("@0.3."))
        .is_some_and(|patch| !patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `name` is `interface` at some WASI 0.2.x version.
fn is_wasi_02(name: &str, interface: &str) -> bool {
    name.strip_prefix(interface)
        .and_then(|rest| rest.strip_prefix("@0.2."))
        .is_some_and(|patch| !patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::{HandlerKind, is_host_interface, is_wasi_02, is_wasi_03};

    #[test]
    fn handler_kind_from_exports() {
        assert_eq!(
            HandlerKind::of_exports(["wasi:http/incoming-handler@0.2.6"]),
            Ok(HandlerKind::P2)
        );
        assert_eq!(
            HandlerKind::of_exports(["wasi:http/handler@0.3.0"]),
            Ok(HandlerKind::P3)
        );
        // A release candidate wasmtime 48 does not have is named as such.
        assert_eq!(
            HandlerKind::of_exports(["wasi:http/handler@0.3.0-rc-2025-09-16"]),
            Err(vec!["wasi:http/handler@0.3.0-rc-2025-09-16".to_string()])
        );
        assert_eq!(
            HandlerKind::of_exports(["wasi:cli/run@0.2.0"]),
            Err(Vec::new())
        );
    }

    #[test]
    fn p3_interface_versions() {
        assert!(is_wasi_03("wasi:http/handler@0.3.0", "wasi:http/handler"));
        assert!(!is_wasi_03(
            "wasi:http/handler@0.3.0-rc-2025-09-16",
            "wasi:http/handler"
        ));
        assert!(!is_wasi_03("wasi:http/handler@0.2.0", "wasi:http/handler"));
        assert!(is_host_interface("wasi:cli/stdout@0.3.0"));
        assert!(is_host_interface("wasi:http/client@0.3.0"));
        assert!(!is_host_interface("wasi:http/client@0.2.0"));
        assert!(!is_host_interface("wasi:cli/stdout@0.3.0-rc-2025-09-16"));
    }

    #[test]
    fn interface_versions() {
        assert!(is_wasi_02("wasi:http/types@0.2.0", "wasi:http/types"));
        assert!(is_wasi_02("wasi:http/types@0.2.12", "wasi:http/types"));
        assert!(!is_wasi_02("wasi:http/types@0.3.0", "wasi:http/types"));
        assert!(!is_wasi_02("wasi:http/types", "wasi:http/types"));
        assert!(!is_wasi_02(
            "wasi:http/types-extra@0.2.0",
            "wasi:http/types"
        ));
        assert!(!is_wasi_02("wasi:http/types@0.2.0-rc", "wasi:http/types"));
    }

    #[test]
    fn capability_interfaces_match_their_exact_draft() {
        assert!(is_host_interface("wasi:http/outgoing-handler@0.2.6"));
        assert!(is_host_interface("wasi:keyvalue/store@0.2.0-draft"));
        assert!(is_host_interface("wasi:keyvalue/atomics@0.2.0-draft"));
        assert!(is_host_interface("wasi:keyvalue/batch@0.2.0-draft"));
        assert!(is_host_interface("wasi:config/store@0.2.0-draft"));
        assert!(!is_host_interface("wasi:keyvalue/watcher@0.2.0-draft"));
        assert!(!is_host_interface("wasi:keyvalue/store@0.2.1"));
        assert!(!is_host_interface("wasi:keyvalue/store@0.2.0-draft3"));
        assert!(!is_host_interface("wasi:config/store@0.2.0-rc.2"));
        assert!(!is_host_interface("wasi:config/store@0.2.0"));
    }

    #[test]
    fn other_hosts_draft_versions_are_accepted() {
        // Spin 3's wasi:keyvalue and wasi:config, wasmtime-wasi-config's.
        assert!(is_host_interface("wasi:keyvalue/store@0.2.0-draft2"));
        assert!(is_host_interface("wasi:keyvalue/atomics@0.2.0-draft2"));
        assert!(is_host_interface("wasi:keyvalue/batch@0.2.0-draft2"));
        assert!(is_host_interface(
            "wasi:config/store@0.2.0-draft-2024-09-27"
        ));
        assert!(is_host_interface("wasi:config/store@0.2.0-rc.1"));
        // Only what the host implements: draft2's watcher is an export.
        assert!(!is_host_interface("wasi:keyvalue/watcher@0.2.0-draft2"));
    }
}
