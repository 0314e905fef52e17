//! wasi:nn benchmark driver: the same model on the same image, run by tract
//! natively in this process and through a Mayfly function (the `classify`
//! guest) over HTTP, at concurrency 1, 2 and 4; inferences/s and p50/p99.
//!
//!   cargo run --release -p mayfly --example nn_bench -- <model.onnx> <url> [seconds]
//!       [burst clients] [neighbour url]
//!
//! With a burst size and a neighbour's URL (another function on the same
//! node), it then sends that many classifications at once while one client
//! keeps calling the neighbour, and reports the burst's errors and the
//! neighbour's p50/p99 before and during it.
//!
//! Both sides do the same work per inference: decode the PNG and preprocess
//! it with the classify guest's own code (compiled natively here, to
//! WebAssembly in the guest), build the input tensor and run the model on
//! a plan for the image's shape (the node plans per input shape too).
//! The Mayfly side also pays for HTTP, the sandbox, and the copy of the
//! tensor into the host: the overhead the ratio measures. Its requests go
//! out on one keep-alive connection per load thread (hyper's), the leanest
//! client at hand, since the client's CPU comes out of the same two cores.
//! The two sides take turns in short windows, so that the machine's drift
//! during a run (2 shared cores swing 10 % within minutes) falls on both;
//! the range of the windows' ratios is printed beside the ratio. Model load
//! is timed cold (parse + optimise) natively; through Mayfly the first
//! request after a deploy pays it and is reported apart. `bench/nn.sh` runs
//! it.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use tract_onnx::prelude::*;

/// The node's allocator: tract allocates per run, and on glibc's malloc the
/// native side ran ~20 % slower than the same tract inside the node, which
/// made Mayfly look faster than native at concurrency 1.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PAGE: usize = 256;

/// The classify guest's decoding and preprocessing, the very source file.
#[path = "../../../guests/classify/src/preprocess.rs"]
mod preprocess;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: nn_bench <model.onnx> <url> [seconds per run]";
    let model = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let url = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let seconds: f64 = args.next().map_or(Ok(5.0), |s| s.parse())?;
    let run_for = Duration::from_secs_f64(seconds);
    let burst: usize = args.next().map_or(Ok(0), |n| n.parse())?;
    let neighbour = args.next();

    let page = page();
    let png = Arc::new(png(&page)?);

    let started = Instant::now();
    // Planned for the image's shape, as a native program that knows its
    // input does (and as the node plans per input shape).
    let typed = tract_onnx::onnx().model_for_path(&model)?.into_typed()?;
    let side = preprocess::SIDE as i64;
    let bound: std::collections::HashMap<_, _> = (typed.input_fact(0)?.shape.iter())
        .zip([1, 3, side, side])
        .filter_map(|(dim, size)| match dim {
            TDim::Sym(symbol) => Some((symbol.clone(), TDim::Val(size))),
            _ => None,
        })
        .collect();
    let plan = typed
        .set_symbols(&bound)?
        .into_optimized()?
        .into_runnable()?;
    println!(
        "native model load (parse + optimise): {:.1} ms",
        support::ms(started.elapsed())
    );
    let agent = support::agent(Duration::from_secs(60));
    let started = Instant::now();
    let first = post(&agent, &url, &png)?;
    println!(
        "mayfly first request (cold model load included): {:.1} ms",
        support::ms(started.elapsed())
    );
    let started = Instant::now();
    post(&agent, &url, &png)?;
    println!(
        "mayfly second request (cached graph): {:.1} ms",
        support::ms(started.elapsed())
    );
    anyhow::ensure!(first.contains("\"top\""), "unexpected answer: {first}");

    println!(
        "concurrency  native inf/s  p50 ms  p99 ms   mayfly inf/s  p50 ms  p99 ms  ratio  \
         (rounds)"
    );
    for concurrency in [1, 2, 4] {
        let (plan, image) = (plan.clone(), png.clone());
        let native: Work = Arc::new(move || {
            let (plan, image) = (plan.clone(), image.clone());
            Ok(Box::new(move || {
                let input = preprocess::preprocess(&image).map_err(anyhow::Error::msg)?;
                let side = preprocess::SIDE as usize;
                // As the node's wasi:nn host makes it from the guest's bytes.
                let mut t = Tensor::zero::<f32>(&[1, 3, side, side])?;
                t.as_bytes_mut().copy_from_slice(&input);
                plan.run(tvec!(t.into_tvalue()))?;
                Ok(())
            }))
        });
        let (url, body) = (url.clone(), bytes::Bytes::from(png.to_vec()));
        let mayfly: Work = Arc::new(move || {
            let mut connection = Connection::open(&url)?;
            let body = body.clone();
            Ok(Box::new(move || connection.post(body.clone())))
        });
        let (native, mayfly, rounds) = compare(concurrency, run_for, &native, &mayfly)?;
        let (low, high) = rounds
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
        println!(
            "{concurrency:>11}  {:>12.1}  {:>6.1}  {:>6.1}   {:>12.1}  {:>6.1}  {:>6.1}  {:.2}   \
             ({low:.2}-{high:.2})",
            native.rate,
            native.p50,
            native.p99,
            mayfly.rate,
            mayfly.p50,
            mayfly.p99,
            mayfly.rate / native.rate
        );
        anyhow::ensure!(
            mayfly.errors == 0,
            "{} Mayfly requests failed",
            mayfly.errors
        );
    }
    if let (true, Some(neighbour)) = (burst > 0, neighbour) {
        run_burst(&url, &png, burst, &neighbour)?;
    }
    Ok(())
}

/// `clients` classifications released at once, with the neighbour's
/// latency measured before and while they run.
fn run_burst(url: &str, png: &Arc<Vec<u8>>, clients: usize, neighbour: &str) -> anyhow::Result<()> {
    let quiet = neighbour_latencies(neighbour, &|| false, Duration::from_secs(2))?;
    let barrier = Arc::new(std::sync::Barrier::new(clients + 1));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (url, png, barrier, done) =
                (url.to_string(), png.clone(), barrier.clone(), done.clone());
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    let agent = support::agent(Duration::from_secs(60));
                    barrier.wait();
                    let at = Instant::now();
                    let ok = post(&agent, &url, &png).is_ok();
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (ok, support::ms(at.elapsed()))
                })
        })
        .collect::<Result<_, _>>()?;
    barrier.wait();
    let started = Instant::now();
    let finished = || done.load(std::sync::atomic::Ordering::Relaxed) >= clients;
    let during = neighbour_latencies(neighbour, &finished, Duration::from_secs(600))?;
    let mut errors = 0;
    let mut latencies = Vec::new();
    for thread in threads {
        let (ok, latency) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a burst thread panicked"))?;
        if ok {
            latencies.push(latency);
        } else {
            errors += 1;
        }
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "burst of {clients} classifications: {errors} errors, all done in {:.1} s, p50 {:.0} ms, \
         max {:.0} ms",
        started.elapsed().as_secs_f64(),
        percentile(&latencies, 0.5),
        latencies.last().copied().unwrap_or(0.0)
    );
    println!(
        "neighbour {neighbour}: p50 {:.2} ms p99 {:.2} ms before; p50 {:.2} ms p99 {:.2} ms \
         during the burst ({} requests)",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len()
    );
    anyhow::ensure!(errors == 0, "{errors} classifications of the burst failed");
    Ok(())
}

/// Latencies of sequential GETs of `url` until `stop` (or `at_most`).
fn neighbour_latencies(
    url: &str,
    stop: &dyn Fn() -> bool,
    at_most: Duration,
) -> anyhow::Result<Vec<f64>> {
    let agent = support::agent(Duration::from_secs(60));
    let started = Instant::now();
    let mut latencies = Vec::new();
    while !stop() && started.elapsed() < at_most {
        let at = Instant::now();
        let mut response = agent.get(url).call()?;
        response.body_mut().read_to_vec()?;
        anyhow::ensure!(
            response.status() == 200,
            "the neighbour answered {}",
            response.status()
        );
        latencies.push(support::ms(at.elapsed()));
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

/// One side's inferences over all its windows.
struct Run {
    rate: f64,
    p50: f64,
    p99: f64,
    errors: usize,
}

/// One window of load: each inference's latency, the failures, how long.
struct Window {
    latencies: Vec<f64>,
    errors: usize,
    seconds: f64,
}

/// One side's work: called once per load thread, it returns that thread's
/// inference (native: a run of the plan; Mayfly: a request on the thread's
/// own connection).
type Work = Arc<dyn Fn() -> anyhow::Result<Inference> + Send + Sync>;
/// One inference, native or through Mayfly.
type Inference = Box<dyn FnMut() -> anyhow::Result<()>>;

/// Windows of each side in the same run.
const ROUNDS: u32 = 5;

/// Native and Mayfly in alternating windows, [`ROUNDS`] of each and
/// `run_for` per side in all, the side that goes first alternating too: a
/// change in the machine's speed during the run (a noisy neighbour, the
/// clock) then falls on both sides alike instead of on whichever ran
/// then. Returns both sides and the ratio of each pair of windows.
fn compare(
    concurrency: usize,
    run_for: Duration,
    native: &Work,
    mayfly: &Work,
) -> anyhow::Result<(Run, Run, Vec<f64>)> {
    let window_for = run_for / ROUNDS;
    let (mut natives, mut mayflies, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (n, m) = if round % 2 == 0 {
            let n = load(concurrency, window_for, native)?;
            (n, load(concurrency, window_for, mayfly)?)
        } else {
            let m = load(concurrency, window_for, mayfly)?;
            (load(concurrency, window_for, native)?, m)
        };
        ratios.push(rate([&m]) / rate([&n]));
        natives.push(n);
        mayflies.push(m);
    }
    Ok((summary(&natives), summary(&mayflies), ratios))
}

/// Inferences per second over `windows` together.
fn rate<'a>(windows: impl IntoIterator<Item = &'a Window>) -> f64 {
    let (inferences, seconds) = windows
        .into_iter()
        .fold((0, 0.0), |(n, s), w| (n + w.latencies.len(), s + w.seconds));
    inferences as f64 / seconds
}

fn summary(windows: &[Window]) -> Run {
    let mut all: Vec<f64> = windows
        .iter()
        .flat_map(|w| w.latencies.iter().copied())
        .collect();
    all.sort_by(f64::total_cmp);
    Run {
        rate: rate(windows),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        errors: windows.iter().map(|w| w.errors).sum(),
    }
}

/// Runs `work` from `concurrency` threads for `run_for`.
fn load(concurrency: usize, run_for: Duration, work: &Work) -> anyhow::Result<Window> {
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let work = work.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut errors = 0;
                let mut inference = match work() {
                    Ok(inference) => inference,
                    Err(_) => return (latencies, 1),
                };
                while started.elapsed() < run_for {
                    let at = Instant::now();
                    match inference() {
                        Ok(()) => latencies.push(support::ms(at.elapsed())),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for thread in threads {
        let (measured, failed) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        latencies.extend(measured);
        errors += failed;
    }
    Ok(Window {
        latencies,
        errors,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One load thread's keep-alive HTTP/1.1 connection to the node, driven by
/// a runtime of its own on that thread: hyper's client connection, about a
/// third of ureq's CPU per request (0.07 against 0.18-0.25 ms, measured at
/// concurrency 2 on the classify guest). The client shares the node's two
/// cores, so its cost was counted against Mayfly; a load generator on
/// another machine would cost the node nothing.
struct Connection {
    runtime: tokio::runtime::Runtime,
    authority: String,
    path: String,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>>,
}

impl Connection {
    fn open(url: &str) -> anyhow::Result<Self> {
        let uri: hyper::Uri = url.parse()?;
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow::anyhow!("{url} names no host"))?
            .to_string();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            runtime,
            authority,
            path: uri.path().to_string(),
            sender: None,
        })
    }

    /// POSTs `body`; after a failure the next call connects again.
    fn post(&mut self, body: bytes::Bytes) -> anyhow::Result<()> {
        let request = hyper::Request::post(&self.path)
            .header(hyper::header::HOST, &self.authority)
            .body(Full::new(body))?;
        let Self {
            runtime,
            authority,
            sender,
            ..
        } = self;
        let outcome = runtime.block_on(async {
            let send = match sender {
                Some(send) => send,
                None => {
                    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
                    stream.set_nodelay(true)?;
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let (send, connection) = hyper::client::conn::http1::handshake(io).await?;
                    tokio::spawn(connection);
                    sender.insert(send)
                }
            };
            let response = send.send_request(request).await?;
            let status = response.status();
            let text = response.into_body().collect().await?.to_bytes();
            anyhow::ensure!(
                status == 200,
                "{status}: {}",
                String::from_utf8_lossy(&text)
            );
            Ok(())
        });
        if outcome.is_err() {
            *sender = None;
        }
        outcome
    }
}

fn post(agent: &ureq::Agent, url: &str, png: &[u8]) -> anyhow::Result<String> {
    let mut response = agent.post(url).send(png)?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    anyhow::ensure!(status == 200, "{status}: {text}");
    Ok(text)
}

/// A grey page of dark bars on white: what the benchmark classifies.
fn page() -> Vec<u8> {
    let mut page = vec![255u8; PAGE * PAGE];
    for line in 0..9 {
        let y0 = 16 + line * 24;
        let end = 200 + (line * 37) % 40;
        for y in y0..y0 + 12 {
            for x in 16..end {
                if (x / 9) % 5 != 4 {
                    page[y * PAGE + x] = 30;
                }
            }
        }
    }
    page
}

/// A grey page as an RGB PNG.
fn png(page: &[u8]) -> anyhow::Result<Vec<u8>> {
    let rgb: Vec<u8> = page.iter().flat_map(|v| [*v, *v, *v]).collect();
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &rgb,
        PAGE as u32,
        PAGE as u32,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}
