//! Starts the component with 3 MiB of linear memory, what classifying a
//! page of the benchmark's size takes (its stack, the decoded image and the
//! 600 KB input tensor), instead of Rust's default 1.1 MiB.
//!
//! A fresh instance per request starts from the initial size, so a guest
//! that grows its memory every request pays an `mprotect` per growth, and
//! the node pays one more to shrink the slot back for the next instance
//! (which makes every other core flush its TLB). Growing four times a
//! request, this guest's classifications took ~70 µs longer (two nodes
//! served alternately, 800 requests each). Pages it never touches cost
//! nothing.
fn main() {
    // Only for WebAssembly: the same crate's tests build for the host too.
    if std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|arch| arch == "wasm32") {
        println!("cargo:rustc-link-arg=--initial-memory=3145728");
    }
}
