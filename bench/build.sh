# Sourced by the bench scripts once $smoke is set: `bench_build [EXAMPLE...]`
# builds the node binary (unless MAYFLY_BIN names one) and the named driver
# examples, then sets MAYFLY_BIN and $examples (the folder holding them).
#
# A smoke run (CI, debug) builds exactly what `cargo test --workspace
# --all-targets` builds: the same package selection resolves the same
# features, so right after the test suite nothing is compiled again. A
# `-p mayfly` build resolves dev-dependency features differently and
# recompiled wasmtime-wasi-http and the whole platform stack, minutes of a
# 2-core CI run. A full run builds only what it needs, in release.
bench_build() {
  local out=${CARGO_TARGET_DIR:-target}
  if $smoke; then
    cargo build -q --workspace --all-targets
    out=$out/debug
  else
    local args=()
    [ -n "${MAYFLY_BIN:-}" ] || args+=(--bins)
    for example in "$@"; do args+=(--example "$example"); done
    [ ${#args[@]} -eq 0 ] || cargo build -q --release -p mayfly "${args[@]}"
    out=$out/release
  fi
  MAYFLY_BIN=${MAYFLY_BIN:-$out/mayfly}
  examples=$out/examples
}
