# Sourced by the bench scripts: starts `$MAYFLY_BIN serve` on ephemeral
# ports with a throw-away data directory (extra serve flags in the array
# `serve_flags`; not "$@", which a sourced file shares with its caller),
# sets $pid, $gateway and $admin, exports MAYFLY_TOKEN (the node's admin
# token, which the CLI and drivers present), and stops the node on exit.
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
RUST_LOG=warn "$MAYFLY_BIN" serve --data-dir "$work/data" ${serve_flags[@]+"${serve_flags[@]}"} \
  --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 1 300); do
  [ "$(wc -l <"$work/out")" -ge 2 ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/err" >&2; exit 1; }
  sleep 0.1
done
gateway=$(sed -n 's/^gateway listening on //p' "$work/out")
admin=$(sed -n 's/^admin API listening on //p' "$work/out")
[ -n "$gateway" ] && [ -n "$admin" ] || { echo "mayfly serve did not start" >&2; cat "$work/err" >&2; exit 1; }
export MAYFLY_TOKEN
MAYFLY_TOKEN=$(cat "$work/data/admin.token" 2>/dev/null || true)
