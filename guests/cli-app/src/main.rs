//! A command-line program compiled to a component of the `wasi:cli/command`
//! world. It is valid WebAssembly but the wrong world for a function, so the
//! tests use it to check that such uploads are refused with a clear message.

fn main() {
    println!("I am a command, not an HTTP handler");
}
