//! Connection hygiene (issue 15, finding 2): slowloris clients are closed by
//! the header timeout, idle floods over the connection cap push out the
//! oldest idle connections instead of taking the listener down, and the
//! admin API answers while the gateway is flooded.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::{Node, agent, eventually};

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .parse()
        .expect("a socket address")
}

/// A raw client connection whose closing by the node we watch.
struct Client {
    stream: TcpStream,
    closed: Option<Duration>,
}

impl Client {
    fn connect(to: SocketAddr, first: &[u8]) -> std::io::Result<Client> {
        let mut stream = TcpStream::connect(to)?;
        if !first.is_empty() {
            stream.write_all(first)?;
        }
        stream.set_nonblocking(true)?;
        Ok(Client {
            stream,
            closed: None,
        })
    }

    /// Whether the node has closed this connection (EOF or reset); any
    /// bytes it sent first (a refusal) are read and dropped.
    fn poll_closed(&mut self, since: Instant) -> bool {
        if self.closed.is_some() {
            return true;
        }
        let mut buffer = [0u8; 512];
        let closed = loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(error) if error.kind() == ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        if closed {
            self.closed = Some(since.elapsed());
        }
        closed
    }
}

fn closed_count(clients: &mut [Client], since: Instant) -> usize {
    clients
        .iter_mut()
        .filter_map(|client| client.poll_closed(since).then_some(()))
        .count()
}

/// Polls `hello` until it answers 200; returns how long that took.
fn hello_answers(node: &Node, what: &str) -> Duration {
    let started = Instant::now();
    eventually(Duration::from_secs(60), what, || {
        let answer = agent()
            .get(format!("{}/hello", node.gateway))
            .config()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .call();
        matches!(answer, Ok(response) if response.status() == 200).then_some(())
    });
    started.elapsed()
}

/// Polls the admin API until `/v1/status` answers 200; returns how long
/// that took.
fn admin_answers(node: &Node, what: &str) -> Duration {
    let started = Instant::now();
    eventually(Duration::from_secs(60), what, || {
        let answer = agent()
            .get(format!("{}/v1/status", node.admin))
            .header("authorization", node.bearer())
            .config()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .call();
        matches!(answer, Ok(response) if response.status() == 200).then_some(())
    });
    started.elapsed()
}

#[test]
fn slowloris_connections_are_closed_by_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--header-timeout", "2s"]);
    node.deploy("hello", "hello", &["/hello"]);
    let gateway = addr(&node.gateway);

    let started = Instant::now();
    let mut clients: Vec<Client> = (0..200)
        .map(|_| {
            Client::connect(gateway, b"GET /hello HTTP/1.1\r\nhost: slow\r\nx-slow: ").unwrap()
        })
        .collect();
    let mut hellos = 0;
    let deadline = started + Duration::from_secs(60);
    // A byte a second on every connection still open, and `hello` answered
    // in between, until the node has closed them all.
    while closed_count(&mut clients, started) < clients.len() {
        assert!(
            Instant::now() < deadline,
            "{} of 200 slowloris connections still open after 60 s",
            clients.len() - closed_count(&mut clients, started)
        );
        for client in clients.iter_mut().filter(|c| c.closed.is_none()) {
            let _ = client.stream.write(b"a");
        }
        let (status, body) = node.get("/hello");
        assert_eq!(status, 200, "hello during the slowloris: {body}");
        hellos += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    let last = clients.iter().filter_map(|c| c.closed).max().unwrap();
    println!(
        "slowloris: 200 connections closed by the node, the last {last:?} after opening \
         (--header-timeout 2s); hello answered {hellos} times meanwhile"
    );
    // The gateway serves new connections as before.
    assert_eq!(node.get("/hello").0, 200);
}

/// Opens `count` idle gateway connections (nothing sent) as fast as it can;
/// stops early if the client side runs out of descriptors or ports.
fn flood(to: SocketAddr, count: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        match Client::connect(to, b"") {
            Ok(client) => clients.push(client),
            Err(error) => {
                println!("flood: stopped at {} connections: {error}", clients.len());
                break;
            }
        }
    }
    clients
}

#[test]
fn idle_connections_over_the_cap_push_out_idle_ones_and_the_admin_api_answers() {
    const CAP: usize = 500;
    const ADMIN_CAP: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        dir.path(),
        &[
            "--max-connections",
            &CAP.to_string(),
            "--admin-max-connections",
            &ADMIN_CAP.to_string(),
        ],
    );
    node.deploy("hello", "hello", &["/hello"]);
    let gateway = addr(&node.gateway);

    let started = Instant::now();
    let mut clients = flood(gateway, CAP + 500);
    assert_eq!(
        clients.len(),
        CAP + 500,
        "the test could not open its flood"
    );
    let opened = started.elapsed();
    // The node keeps at most CAP of them: the oldest idle ones are closed
    // as new ones arrive (the idle timeout, 60 s, has not passed).
    let evicted = eventually(
        Duration::from_secs(30),
        "the node to close idle connections over its cap",
        || {
            let closed = closed_count(&mut clients, started);
            (closed >= 500).then_some(closed)
        },
    );
    assert!(
        clients[CAP + 400..]
            .iter_mut()
            .all(|c| !c.poll_closed(started)),
        "the newest connections were closed instead of the oldest"
    );
    let hello = hello_answers(&node, "hello through a gateway flooded past its cap");
    // (c) The admin API has its own cap: the gateway's flood leaves it be.
    let admin = admin_answers(&node, "the admin API while the gateway is flooded");

    // The admin API flooded past its own cap still answers too.
    let admin_addr = addr(&node.admin);
    let mut admin_flood = flood(admin_addr, ADMIN_CAP + 50);
    let admin_flooded = admin_answers(&node, "the admin API flooded past its cap");
    eventually(
        Duration::from_secs(30),
        "the admin API to close idle connections",
        || (closed_count(&mut admin_flood, started) >= 50).then_some(()),
    );
    println!(
        "idle flood: {} gateway connections opened in {opened:?} (cap {CAP}), {evicted} closed by \
         the node; hello answered {hello:?} and the admin API {admin:?} after the flood; admin API \
         flooded with {} (cap {ADMIN_CAP}) answered after {admin_flooded:?}",
        CAP + 500,
        ADMIN_CAP + 50
    );

    // Both listeners recover once the floods end.
    drop(clients);
    drop(admin_flood);
    hello_answers(&node, "hello after the flood");
    admin_answers(&node, "the admin API after the flood");
    let again = flood(gateway, 10);
    assert_eq!(node.get("/hello").0, 200);
    drop(again);
}

/// 20,000 idle connections (as many as the file-descriptor hard limit
/// lets this process open) against a node with its default caps. Measures
/// only; run with `cargo test -p mayfly --test all connections::big -- --ignored --nocapture`.
#[test]
#[ignore = "opens ~20,000 connections: run by hand and read its figures"]
fn big_idle_flood_measured() {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    let gateway = addr(&node.gateway);
    let wanted = usize::try_from(limit)
        .unwrap()
        .saturating_sub(200)
        .min(20_000);

    let started = Instant::now();
    let mut clients = flood(gateway, wanted);
    let opened = started.elapsed();
    let hello = hello_answers(&node, "hello through a 20,000-connection flood");
    let admin = admin_answers(&node, "the admin API through the flood");
    let closed = closed_count(&mut clients, started);
    println!(
        "big flood: {} of {wanted} connections opened in {opened:?} (fd limit {limit}); then hello \
         answered after {hello:?}, the admin API after {admin:?}; {closed} closed by the node so \
         far (gateway cap {})",
        clients.len(),
        mayfly_platform::connections::DEFAULT_GATEWAY_MAX_CONNECTIONS
    );
    drop(clients);
    let recovered = hello_answers(&node, "hello after the flood");
    admin_answers(&node, "the admin API after the flood");
    println!("big flood: hello answered {recovered:?} after the flood closed");
}

/// Sends `head` and `partial` body bytes, then stalls; returns what the
/// node sent until it closed the connection, and how long that took.
fn stalled_body(to: SocketAddr, head: &str, partial: &[u8]) -> (String, Duration) {
    let mut stream = TcpStream::connect(to).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(90)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(partial).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == ErrorKind::ConnectionReset => break,
            Err(error) => panic!(
                "the node kept a stalled body open for {:?}: {error}; got {:?}",
                started.elapsed(),
                String::from_utf8_lossy(&answer)
            ),
        }
    }
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_stalled_request_body_ends_at_the_body_timeout_not_the_function_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--body-timeout", "2s"]);
    // The function may run for 10 minutes; the body timeout is the node's.
    node.deploy_with("echo", "echo", &["/echo"], &["--timeout", "10m"]);
    let gateway = addr(&node.gateway);

    // A body larger than what the node reads before admission streams its
    // rest to the guest, which answers at once and then waits for the
    // rest: the read fails, the response is cut short and the connection
    // closed.
    let partial = vec![b'x'; 80 * 1024];
    let (answer, took) = stalled_body(
        gateway,
        "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 200000\r\n\r\n",
        &partial,
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    println!("stalled body (streamed to the guest): connection closed after {took:?}");

    // A small body is read by the node before the guest runs, chunked or
    // not: the client gets a 408 with the reason.
    for head in [
        "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
        "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n",
    ] {
        let partial: &[u8] = if head.contains("chunked") {
            b"a\r\n0123456789\r\n"
        } else {
            b"0123456789"
        };
        let (answer, took) = stalled_body(gateway, head, partial);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("body timeout"), "{answer}");
        println!("stalled small body: 408 and closed after {took:?}");
    }
    assert_eq!(node.get("/echo").0, 200);
}

#[test]
fn a_full_gateway_of_busy_connections_refuses_with_a_503_and_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--max-connections", "3"]);
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy("sleepy", "hostile", &["/sleep"]);
    let gateway = addr(&node.gateway);

    // Three connections with a request in flight each fill the gateway.
    let busy: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut stream = TcpStream::connect(gateway).unwrap();
            stream
                .write_all(b"GET /sleep?ms=20000 HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            stream
        })
        .collect();
    // Until their requests are running, a new connection would push them
    // out as idle ones.
    eventually(Duration::from_secs(30), "three sleeping requests", || {
        (node.scaling_status("sleepy")["running"] == 3).then_some(())
    });
    let refusal = eventually(Duration::from_secs(30), "a refusal at the cap", || {
        let mut stream = TcpStream::connect(gateway).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let _ = stream.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer).into_owned();
        answer.starts_with("HTTP/1.1 503").then_some(answer)
    });
    assert!(
        refusal.contains("limit of 3 connections") && refusal.contains("retry later"),
        "{refusal}"
    );
    // Once the busy connections end, the gateway serves again.
    drop(busy);
    hello_answers(&node, "hello after the busy connections closed");
}

#[test]
fn idle_and_kept_alive_connections_close_at_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        dir.path(),
        &["--idle-timeout", "2s", "--header-timeout", "1s"],
    );
    node.deploy("hello", "hello", &["/hello"]);
    let started = Instant::now();
    let mut silent = Client::connect(addr(&node.gateway), b"").unwrap();
    let mut silent_admin = Client::connect(addr(&node.admin), b"").unwrap();
    // An HTTP/2 client that sends its preface and no request: the header
    // timeout applies as to a slow HTTP/1 head.
    let mut h2 = Client::connect(
        addr(&node.gateway),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    )
    .unwrap();
    eventually(Duration::from_secs(30), "idle connections closed", || {
        // Each polled every time, so each close is timed.
        let closed = [
            silent.poll_closed(started),
            silent_admin.poll_closed(started),
            h2.poll_closed(started),
        ];
        closed.iter().all(|closed| *closed).then_some(())
    });
    // A kept-alive connection after one answered request.
    let mut kept = TcpStream::connect(addr(&node.gateway)).unwrap();
    kept.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let n = kept.read(&mut buffer).unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buffer[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    let kept_since = Instant::now();
    // Read to the end: the rest of the body, then the close.
    while kept.read(&mut buffer).unwrap() > 0 {}
    let kept_closed = kept_since.elapsed();

    println!(
        "idle timeout 2s: silent gateway connection closed after {:?}, admin {:?}, HTTP/2 preface \
         only (header timeout 1s) {:?}, kept-alive after its answer {kept_closed:?}",
        silent.closed.unwrap(),
        silent_admin.closed.unwrap(),
        h2.closed.unwrap()
    );
}
