#!/usr/bin/env bash
# The S3 endpoint with the real AWS CLI and boto3: upload and download
# MB/s of one large object (the AWS CLI's multipart upload, 8 MiB parts)
# against writing and reading the same file on the same disk (the
# ceiling), small-object PUT/s (boto3, one client, 1 KiB objects), and the
# node's peak RSS.
#
#   bench/s3.sh            full run: release build, a 200 MiB object, 1,000 small PUTs
#   bench/s3.sh --smoke    a 20 MiB object and 50 PUTs on the debug build (CI)
#
# Set MAYFLY_BIN to use another binary; the clients come from
# `cargo xtask s3-clients` (pinned boto3 and awscli, from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
mib=200
puts=1000
$smoke && mib=20 && puts=50

. bench/build.sh
bench_build
clients=${MAYFLY_S3_CLIENTS:-$(cargo xtask s3-clients 2>/dev/null | tail -1)}

serve_flags=(--s3-listen 127.0.0.1:0)
. bench/node.sh
for _ in $(seq 1 100); do
  grep -q '^S3 endpoint listening on ' "$work/out" && break
  sleep 0.1
done
s3=$(sed -n 's/^S3 endpoint listening on //p' "$work/out")
[ -n "$s3" ] || { echo "the S3 endpoint did not start" >&2; exit 1; }
keys=$(MAYFLY_ADMIN_URL=$admin "$MAYFLY_BIN" token create --s3 --name bench --bucket bench 2>/dev/null)
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
AWS_ACCESS_KEY_ID=$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' <<<"$keys")
AWS_SECRET_ACCESS_KEY=$(sed -n 's/^AWS_SECRET_ACCESS_KEY=//p' <<<"$keys")
export AWS_ENDPOINT_URL=$s3 AWS_DEFAULT_REGION=us-east-1 HOME=$work
aws=$clients/aws
"$aws" s3 mb s3://bench >/dev/null

head -c $((mib << 20)) /dev/urandom >"$work/source.bin"
sync
now() { date +%s.%N; }
rate() { awk -v mib="$1" -v t0="$2" -v t1="$3" 'BEGIN { printf "%.1f MB/s (%.2f s)", mib * 1.048576 / (t1 - t0), t1 - t0 }'; }

# The ceiling: the same bytes written (and synced) and read back through
# the page cache on the same disk, as the node's object files are.
t0=$(now); dd if="$work/source.bin" of="$work/disk.bin" bs=1M conv=fsync status=none; t1=$(now)
disk_write=$(rate "$mib" "$t0" "$t1")
t0=$(now); cat "$work/disk.bin" >/dev/null; t1=$(now)
disk_read=$(rate "$mib" "$t0" "$t1")

t0=$(now); "$aws" s3 cp --only-show-errors "$work/source.bin" s3://bench/big.bin; t1=$(now)
upload=$(rate "$mib" "$t0" "$t1")
t0=$(now); "$aws" s3 cp --only-show-errors s3://bench/big.bin "$work/back.bin"; t1=$(now)
download=$(rate "$mib" "$t0" "$t1")
[ "$(sha256sum <"$work/source.bin")" = "$(sha256sum <"$work/back.bin")" ] ||
  { echo "the downloaded object differs from the upload" >&2; exit 1; }

small=$("$clients/python" - "$puts" <<'PY'
import os, sys, time, boto3
from botocore.config import Config
s3 = boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'],
                  config=Config(s3={'addressing_style': 'path'}))
n, body = int(sys.argv[1]), b'x' * 1024
start = time.perf_counter()
for i in range(n):
    s3.put_object(Bucket='bench', Key=f'small/{i:06d}', Body=body)
print(f"{n / (time.perf_counter() - start):.0f} PUT/s ({n} x 1 KiB, one client)")
PY
)

echo "mayfly $("$MAYFLY_BIN" --version | awk '{print $2}') S3 endpoint, ${mib} MiB object, $(nproc) cores"
echo "upload   (aws s3 cp, multipart): $upload   disk write+fsync: $disk_write"
echo "download (aws s3 cp):            $download   disk read: $disk_read"
echo "small PUTs (boto3):              $small"
echo "node peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/$pid/status")"
