//! The wasi:nn glue: runs the model the node serves under a name. Bindings
//! come from `wit/wasi-nn.wit`, the interface version Mayfly's node speaks.

wit_bindgen::generate!({
    path: "wit",
    world: "wasi:nn/ml",
    generate_all,
});

use wasi::nn::{graph, tensor};

/// Runs the granted model `model` on one f32 tensor `input` of shape `dims`
/// named `name`; the first output as f32 scores.
pub fn infer(model: &str, name: &str, dims: &[u32], input: &[f32]) -> Result<Vec<f32>, String> {
    let failed = |what: &str, e: wasi::nn::errors::Error| {
        format!("wasi:nn {what} failed ({:?}): {}", e.code(), e.data())
    };
    // The node caches the loaded model: this is a lookup, not a parse.
    let graph = graph::load_by_name(model).map_err(|e| failed("load-by-name", e))?;
    let context = graph
        .init_execution_context()
        .map_err(|e| failed("init-execution-context", e))?;
    // Into a buffer of its final size: a collected flat_map starts small
    // and regrows, copying the tensor (600 KB for 224x224) along the way.
    let mut bytes = vec![0u8; input.len() * 4];
    for (out, value) in bytes.chunks_exact_mut(4).zip(input) {
        out.copy_from_slice(&value.to_le_bytes());
    }
    let tensor = tensor::Tensor::new(dims, tensor::TensorType::Fp32, &bytes);
    let outputs = context
        .compute(vec![(name.to_string(), tensor)])
        .map_err(|e| failed("compute", e))?;
    let (_, output) = outputs
        .into_iter()
        .next()
        .ok_or("the model returned no output")?;
    Ok(output
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
