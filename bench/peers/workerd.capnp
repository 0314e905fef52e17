# workerd config for the hello peer of `cargo xtask bench`. The socket's
# address is a placeholder: the harness passes a free loopback port with
# `--socket-addr http=127.0.0.1:<port>`.
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [(name = "main", worker = .helloWorker)],
  sockets = [(name = "http", address = "127.0.0.1:8080", http = (), service = "main")],
);

const helloWorker :Workerd.Worker = (
  modules = [(name = "worker", esModule = embed "hello-worker.js")],
  compatibilityDate = "2025-01-01",
);
