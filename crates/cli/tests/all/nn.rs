//! wasi:nn: models as objects (`mayfly model put|list|delete`), the model
//! grant, and the `classify` example guest run on the PP-LCNet orientation
//! classifier (`cargo xtask nn-model` fetches it; its path comes in
//! `MAYFLY_NN_MODEL`). The test images are made here: lines of text in a
//! small bitmap font, rotated by 0, 90, 180 and 270 degrees.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tract_onnx::prelude::*;

use crate::common::{Node, eventually};
use crate::events::admin;

/// The model file, or a panic that says how to get it.
pub(crate) fn model_path() -> PathBuf {
    let path = std::env::var_os("MAYFLY_NN_MODEL")
        .map(PathBuf::from)
        .expect(
            "MAYFLY_NN_MODEL must name the orientation model: run `cargo xtask nn-model` and \
         export its output (cargo xtask test does both)",
        );
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// Side of the test pages; the guest centre-crops 224 out of them without
/// resizing (their shorter side is already 256).
const PAGE: usize = 256;
const CROP: usize = 224;

/// Glyphs of a 5x9 bitmap font (ascenders in rows 0-1, x-height rows 2-6,
/// descenders rows 7-8): enough letters to set lines that read as text.
const GLYPHS: &[(char, [&str; 9])] = &[
    (
        'a',
        [
            ".....", ".....", ".###.", "....#", ".####", "#...#", ".####", ".....", ".....",
        ],
    ),
    (
        'e',
        [
            ".....", ".....", ".###.", "#...#", "#####", "#....", ".###.", ".....", ".....",
        ],
    ),
    (
        'o',
        [
            ".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###.", ".....", ".....",
        ],
    ),
    (
        'n',
        [
            ".....", ".....", "####.", "#...#", "#...#", "#...#", "#...#", ".....", ".....",
        ],
    ),
    (
        's',
        [
            ".....", ".....", ".####", "#....", ".###.", "....#", "####.", ".....", ".....",
        ],
    ),
    (
        'r',
        [
            ".....", ".....", "#.##.", "##..#", "#....", "#....", "#....", ".....", ".....",
        ],
    ),
    (
        't',
        [
            ".#...", ".#...", "####.", ".#...", ".#...", ".#..#", "..##.", ".....", ".....",
        ],
    ),
    (
        'h',
        [
            "#....", "#....", "####.", "#...#", "#...#", "#...#", "#...#", ".....", ".....",
        ],
    ),
    (
        'l',
        [
            ".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.", ".....", ".....",
        ],
    ),
    (
        'd',
        [
            "....#", "....#", ".####", "#...#", "#...#", "#...#", ".####", ".....", ".....",
        ],
    ),
    (
        'p',
        [
            ".....", ".....", "####.", "#...#", "#...#", "####.", "#....", "#....", "#....",
        ],
    ),
    (
        'y',
        [
            ".....", ".....", "#...#", "#...#", "#...#", ".####", "....#", "....#", ".###.",
        ],
    ),
    (
        'T',
        [
            "#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#..", ".....", ".....",
        ],
    ),
];

/// A grey page (one byte a pixel, row-major) of left-aligned text lines.
pub(crate) fn text_page() -> Vec<u8> {
    let scale = 2;
    let (advance, line_height, margin) = (6 * scale, 12 * scale, 10);
    let mut page = vec![255u8; PAGE * PAGE];
    let letters: Vec<char> = GLYPHS
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| *c != 'T')
        .collect();
    // A fixed generator: the same page every run.
    let mut seed = 0x2545_f491_u32;
    let mut next = |n: u32| {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        (seed >> 16) % n
    };
    let mut y = margin;
    while y + line_height <= PAGE - margin {
        let mut x = margin;
        // Ragged right: each line ends somewhere in the last third.
        let end = PAGE - margin - next(70) as usize;
        let mut first = true;
        while x + 4 * advance < end {
            let length = 2 + next(6) as usize;
            for i in 0..length {
                let c = if first && i == 0 {
                    'T'
                } else {
                    letters[next(letters.len() as u32) as usize]
                };
                let rows = &GLYPHS.iter().find(|(g, _)| *g == c).expect("a glyph").1;
                for (gy, row) in rows.iter().enumerate() {
                    for (gx, bit) in row.bytes().enumerate() {
                        if bit != b'#' {
                            continue;
                        }
                        for dy in 0..scale {
                            for dx in 0..scale {
                                let (px, py) = (x + gx * scale + dx, y + gy * scale + dy);
                                if px < PAGE - margin {
                                    page[py * PAGE + px] = 20;
                                }
                            }
                        }
                    }
                }
                x += advance;
            }
            first = false;
            x += advance;
        }
        y += line_height;
    }
    page
}

/// `page` turned clockwise by `quarters` quarter turns.
pub(crate) fn rotate(page: &[u8], quarters: usize) -> Vec<u8> {
    let mut out = page.to_vec();
    for _ in 0..quarters % 4 {
        let mut turned = vec![0u8; PAGE * PAGE];
        for y in 0..PAGE {
            for x in 0..PAGE {
                // Clockwise: (x, y) goes to (PAGE-1-y, x).
                turned[x * PAGE + (PAGE - 1 - y)] = out[y * PAGE + x];
            }
        }
        out = turned;
    }
    out
}

/// A grey page as an RGB PNG.
pub(crate) fn png(page: &[u8]) -> Vec<u8> {
    let rgb: Vec<u8> = page.iter().flat_map(|v| [*v, *v, *v]).collect();
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &rgb,
        PAGE as u32,
        PAGE as u32,
        image::ExtendedColorType::Rgb8,
    )
    .expect("a PNG of the page");
    out
}

/// The model's scores for `page`, run natively with tract: the same
/// preprocessing as the guest (centre crop, BGR, ImageNet normalisation).
fn native_scores(plan: &std::sync::Arc<TypedSimplePlan>, page: &[u8]) -> Vec<f32> {
    let mean = [0.485f32, 0.456, 0.406];
    let std = [0.229f32, 0.224, 0.225];
    let offset = (PAGE - CROP) / 2;
    let mut input = vec![0f32; 3 * CROP * CROP];
    for c in 0..3 {
        for y in 0..CROP {
            for x in 0..CROP {
                let v = page[(y + offset) * PAGE + x + offset];
                input[c * CROP * CROP + y * CROP + x] = (f32::from(v) / 255.0 - mean[c]) / std[c];
            }
        }
    }
    let tensor = Tensor::from_shape(&[1, 3, CROP, CROP], &input).unwrap();
    let outputs = plan.run(tvec!(tensor.into_tvalue())).unwrap();
    outputs[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn native_plan(path: &Path) -> std::sync::Arc<TypedSimplePlan> {
    tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

fn scores_of(answer: &Value) -> Vec<f32> {
    answer["scores"]
        .as_array()
        .unwrap_or_else(|| panic!("no scores in {answer}"))
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-4, "{what}: {got:?} vs native {want:?}");
    }
}

/// The label the model gives a page turned clockwise by `quarters`.
pub(crate) fn expected_label(quarters: usize) -> &'static str {
    // The classes name the clockwise turn the page went through.
    ["0", "90", "180", "270"][quarters % 4]
}

fn classify(node: &Node, png: &[u8]) -> (u16, Value) {
    let (status, body, _) = node.request("POST", "/classify", png);
    let text = String::from_utf8_lossy(&body).into_owned();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

fn put_model(node: &Node, name: &str, path: &Path) {
    let (ok, stdout, stderr) = node.cli(&["model", "put", name, path.to_str().unwrap()]);
    assert!(ok, "model put failed: {stdout}{stderr}");
}

#[test]
fn classifier_answers_over_http_and_object_trigger_like_native_tract() {
    let model = model_path();
    let plan = native_plan(&model);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    put_model(&node, "orientation", &model);
    let (ok, listed, _) = node.cli(&["model", "list"]);
    assert!(ok && listed.contains("orientation"), "{listed}");
    let outbound = node.admin.clone();
    node.deploy_with(
        "classify",
        "classify",
        &["/classify"],
        &[
            "--model",
            "orientation",
            "--object-bucket",
            "scans",
            "--outbound",
            &outbound,
            "--timeout",
            "60s",
        ],
    );

    let page = text_page();
    for quarters in 0..4 {
        let turned = rotate(&page, quarters);
        let (status, answer) = classify(&node, &png(&turned));
        assert_eq!(status, 200, "turned {quarters}: {answer}");
        let native = native_scores(&plan, &turned);
        assert_close(&scores_of(&answer), &native, &format!("turned {quarters}"));
        assert_eq!(
            answer["top"][0]["label"],
            expected_label(quarters),
            "turned {quarters} quarter(s): {answer}"
        );
    }

    // The ledger counts the inference's time in the invocation's CPU time.
    let records = node.await_usage_records("classify", 4);
    assert!(
        records
            .iter()
            .all(|r| r["cpu_us"].as_u64().unwrap_or(0) >= 1000),
        "{records:?}"
    );

    // An object trigger classifies every upload under in/.
    let (status, trigger) = admin(
        &node,
        "POST",
        "/v1/functions/classify/triggers",
        &[("content-type", "application/json")],
        serde_json::json!({"source": {"kind": "object", "bucket": "scans", "prefix": "in/"}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(status, 201, "{trigger}");
    let turned = rotate(&page, 2);
    let (status, put) = admin(
        &node,
        "PUT",
        "/v1/buckets/scans/objects/in/page.png",
        &[("content-type", "image/png")],
        &png(&turned),
    );
    assert_eq!(status, 200, "{put}");
    let result = eventually(Duration::from_secs(60), "the trigger's result", || {
        let (status, body, _) = get_object(&node, "scans", "results/in/page.png.json");
        (status == 200).then(|| serde_json::from_slice::<Value>(&body).unwrap())
    });
    assert_eq!(result["top"][0]["label"], "180", "{result}");
    assert_close(
        &scores_of(&result),
        &native_scores(&plan, &turned),
        "object trigger",
    );
}

fn get_object(node: &Node, bucket: &str, key: &str) -> (u16, Vec<u8>, ()) {
    let mut response = crate::common::agent()
        .get(format!("{}/v1/buckets/{bucket}/objects/{key}", node.admin))
        .header("authorization", node.bearer())
        .call()
        .unwrap();
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_vec().unwrap_or_default();
    (status, body, ())
}

#[test]
fn models_are_checked_granted_and_refused_with_reasons() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());

    // Not ONNX: refused at upload, with what to do.
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let (ok, _, stderr) = node.cli(&["model", "put", "junk", junk.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("refused") && stderr.contains("ONNX"),
        "{stderr}"
    );

    // A grant of a model that does not exist: refused at deploy.
    let wasm = crate::common::guest("classify");
    let (ok, _, stderr) = node.cli(&[
        "deploy",
        "c",
        wasm.to_str().unwrap(),
        "--model",
        "orientation",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("model `orientation`") && stderr.contains("mayfly model put"),
        "{stderr}"
    );

    put_model(&node, "orientation", &model);
    // Corrupt its blob before any load: the load fails, naming the model.
    let digest = node.admin_json("/v1/models")[0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let blob = dir.path().join("blobs/models").join(&digest);
    let good = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, b"corrupted").unwrap();
    node.deploy_with(
        "granted",
        "classify",
        &["/classify"],
        &["--model", "orientation"],
    );
    let page = png(&text_page());
    let (status, answer) = classify(&node, &page);
    assert_eq!(status, 500, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("model `orientation`") && error.contains("cannot be loaded"),
        "{answer}"
    );
    // Repaired: the failed load was not cached.
    std::fs::write(&blob, &good).unwrap();
    let (status, answer) = classify(&node, &page);
    assert_eq!(status, 200, "{answer}");

    // A new version of the model is what the next request loads, not the
    // digest the node looked up before. The same model with an unknown
    // protobuf field appended (field 100, varint 1) has another digest;
    // its blob, corrupted before any load, shows which one is read.
    let mut next = good.clone();
    next.extend_from_slice(&[0xA0, 0x06, 0x01]);
    let next_path = dir.path().join("next.onnx");
    std::fs::write(&next_path, &next).unwrap();
    put_model(&node, "orientation", &next_path);
    let next_digest = node.admin_json("/v1/models")[0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    assert_ne!(next_digest, digest);
    let next_blob = dir.path().join("blobs/models").join(&next_digest);
    std::fs::write(&next_blob, b"corrupted").unwrap();
    let (status, answer) = classify(&node, &page);
    assert_eq!(status, 500, "{answer}");
    std::fs::write(&next_blob, &next).unwrap();
    let (status, answer) = classify(&node, &page);
    assert_eq!(status, 200, "{answer}");

    // Without the grant: a wasi:nn error naming the grant.
    node.deploy("ungranted", "classify", &["/ungranted"]);
    let (status, body, _) = node.request("POST", "/ungranted", &page);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 500, "{text}");
    assert!(
        text.contains("not granted") && text.contains("--model orientation"),
        "{text}"
    );

    // In use: not deleted; once unused, deleted.
    let (ok, _, stderr) = node.cli(&["model", "delete", "orientation"]);
    assert!(!ok && stderr.contains("granted"), "{stderr}");
    let (ok, _, stderr) = node.cli(&["delete", "granted"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = node.cli(&["model", "delete", "orientation"]);
    assert!(ok, "{stderr}");
    let (ok, listed, _) = node.cli(&["model", "list"]);
    assert!(ok && !listed.contains("orientation"), "{listed}");
}

/// The value of an unlabelled metric in the node's `/metrics`.
fn metric(node: &Node, name: &str) -> Option<f64> {
    node.metrics()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn an_idle_parsed_model_is_evicted_under_memory_pressure_and_parsed_again_when_needed() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    // A keep-alive far longer than the test: only memory pressure can take
    // the parsed model back.
    let node = Node::start_with(
        dir.path(),
        &["--memory-budget", "200", "--keep-alive", "1h"],
    );
    put_model(&node, "orientation", &model);
    node.deploy_with(
        "classify",
        "classify",
        &["/classify"],
        &[
            "--model",
            "orientation",
            "--memory",
            "64",
            "--timeout",
            "60s",
        ],
    );
    node.deploy_with("big", "hostile", &["/sleep"], &["--memory", "195"]);
    let upright = png(&text_page());
    let (status, answer) = classify(&node, &upright);
    assert_eq!(status, 200, "{answer}");
    // Counted as the size of the ONNX file twice: the parsed graph and the
    // plan for the image's shape.
    let size = std::fs::metadata(&model).unwrap().len() as f64;
    eventually(Duration::from_secs(10), "the parsed model counted", || {
        (metric(&node, "mayfly_models_resident_bytes") == Some(2.0 * size)).then_some(())
    });

    // A 195 MB invocation leaves no room for the idle model (nor the idle
    // classifier): both go, the model's memory is given back.
    let sleeper = {
        let url = format!("{}/sleep?ms=4000", node.gateway);
        std::thread::spawn(move || ureq::get(&url).call().map(|r| r.status().as_u16()))
    };
    eventually(Duration::from_secs(30), "the model evicted", || {
        (metric(&node, "mayfly_models_resident_bytes") == Some(0.0)).then_some(())
    });
    assert_eq!(sleeper.join().unwrap().unwrap(), 200);

    // The next classification parses it again and answers as before.
    let (status, again) = classify(&node, &upright);
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["top"][0]["label"], answer["top"][0]["label"],
        "{again}"
    );
    eventually(Duration::from_secs(10), "the model counted again", || {
        (metric(&node, "mayfly_models_resident_bytes") == Some(2.0 * size)).then_some(())
    });
}
