#!/usr/bin/env bash
# Start a local Mesh node with embedded defaults (no config file) and run a short demo
# workload on it: a 1M-element saxpy checked against the CPU, a reduce-sum and a
# Mandelbrot image. Everything lives under target/demo; the node stops on exit.
#
#   deploy/local-mesh.sh            # build, start, run the demo, stop
#   KEEP=1 deploy/local-mesh.sh     # leave the node running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers libvulkan1)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v perl >/dev/null 2>&1 || need+=(perl)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing ${need[*]}: sudo apt-get install ${need[*]}" >&2; exit 1
  fi
fi
[ -n "${XDG_RUNTIME_DIR:-}" ] || { XDG_RUNTIME_DIR=$(mktemp -d); export XDG_RUNTIME_DIR; }

echo "== building mesh-node and mesh-cli"
cargo build --quiet --bins -p mesh-node -p mesh-cli
BIN=target/debug
DEMO=target/demo
rm -rf "$DEMO"; mkdir -p "$DEMO"
SSH=127.0.0.1:${MESH_DEMO_SSH_PORT:-17722}
HTTP=127.0.0.1:${MESH_DEMO_HTTP_PORT:-17780}

ssh-keygen -q -t ed25519 -N '' -C demo-admin -f "$DEMO/admin"
CLI=("$BIN/mesh-cli" --node "$SSH" --identity "$DEMO/admin" --known-hosts "$DEMO/known_hosts")

echo "== starting mesh-node (data in $DEMO/node, SSH on $SSH, metrics on http://$HTTP/metrics)"
"$BIN/mesh-node" run --data-dir "$DEMO/node" --admin-key "$DEMO/admin.pub" \
  --ssh-listen "$SSH" --http-listen "$HTTP" >"$DEMO/node.out" 2>"$DEMO/node.log" &
NODE=$!
[ -n "${KEEP:-}" ] || trap 'kill $NODE 2>/dev/null; wait $NODE 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q ' ready: ' "$DEMO/node.out" 2>/dev/null && break
  kill -0 $NODE 2>/dev/null || { echo "mesh-node exited:"; cat "$DEMO/node.log"; exit 1; }
  sleep 0.2
done
cat "$DEMO/node.out"

echo "== pinning the node's host key"
FP=$("$BIN/mesh-node" fingerprint --data-dir "$DEMO/node")
"${CLI[@]}" pin "$SSH" "$FP"
"${CLI[@]}" status

echo "== saxpy: out = 2.5 * x + y over 1,048,576 elements"
perl -e 'my $s=7; sub r { $s=($s*1103515245+12345)%2147483648; return $s/2147483648*2-1 }
  open(X,">","'"$DEMO"'/x.bin"); open(Y,">","'"$DEMO"'/y.bin"); binmode X; binmode Y;
  for (1..1048576) { print X pack("f<", r()); print Y pack("f<", r()); }'
"${CLI[@]}" submit --kernel saxpy --param a=2.5 --input "x=@$DEMO/x.bin" --input "y=@$DEMO/y.bin" \
  --idempotency-key demo-saxpy --wait
ID=$("${CLI[@]}" --json tasks | perl -ne 'print $1 if /"id":\s*(\d+)/ && !$done++')
"${CLI[@]}" result "$ID" --output "$DEMO/out.bin"
perl -e 'open(X,"<","'"$DEMO"'/x.bin"); open(Y,"<","'"$DEMO"'/y.bin"); open(O,"<","'"$DEMO"'/out.bin");
  binmode X; binmode Y; binmode O; my $bad=0; my $n=0;
  while (read(X,my $x,4)) { read(Y,my $y,4); read(O,my $o,4); $n++;
    my $want = unpack("f<", pack("f<", unpack("f<", pack("f<", 2.5*unpack("f<",$x))) + unpack("f<",$y)));
    $bad++ if abs($want - unpack("f<",$o)) > 1e-6 * (1+abs($want)); }
  printf("checked %d elements against the CPU: %s\n", $n, $bad ? "$bad MISMATCHES" : "all equal"); exit($bad ? 1 : 0);'

echo "== mandelbrot 640x400 rendered to $DEMO/mandelbrot.png"
"${CLI[@]}" submit --kernel mandelbrot --param width=640 --param height=400 --param max_iter=200 --wait
MID=$("${CLI[@]}" --json tasks --state succeeded | perl -0ne 'my @ids = /"id":\s*(\d+)/g; print $ids[-1]')
"${CLI[@]}" result "$MID" --png "$DEMO/mandelbrot.png"

echo "== the task list"
"${CLI[@]}" tasks
echo "== done; node log in $DEMO/node.log"
