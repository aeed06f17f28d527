#!/usr/bin/env bash
# Start a local 3-node Mesh on loopback (each node its own process and data
# directory, embedded defaults, no config file), run a demo workload, kill the
# leader halfway, and show the work finishing under the new leader.
#
#   deploy/local-mesh.sh              # build, start, demo, stop
#   KEEP=1 deploy/local-mesh.sh       # leave the mesh running afterwards
#   NODES=5 deploy/local-mesh.sh      # five nodes (five voters)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers libvulkan1)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
perl -MJSON::PP -e1 2>/dev/null || need+=(perl)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing ${need[*]}: sudo apt-get install ${need[*]}" >&2; exit 1
  fi
fi
[ -n "${XDG_RUNTIME_DIR:-}" ] || { XDG_RUNTIME_DIR=$(mktemp -d); export XDG_RUNTIME_DIR; }

NODES=${NODES:-3}
VOTERS=3; [ "$NODES" -ge 5 ] && VOTERS=5
BASE=${MESH_DEMO_PORT_BASE:-17700}
echo "== building mesh-node and mesh-cli"
cargo build --quiet --bins -p mesh-node -p mesh-cli
BIN=target/debug
DEMO=target/demo
rm -rf "$DEMO"; mkdir -p "$DEMO"
ssh-keygen -q -t ed25519 -N '' -C demo-admin -f "$DEMO/admin"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
[ -n "${KEEP:-}" ] || trap cleanup EXIT

ssh_addr() { echo "127.0.0.1:$((BASE + 10 * $1 + 2))"; }
cli() { local i=$1; shift; "$BIN/mesh-cli" --node "$(ssh_addr "$i")" --identity "$DEMO/admin" --known-hosts "$DEMO/known_hosts" "$@"; }
json() { perl -MJSON::PP -0e '$_ = decode_json(<STDIN>); '"$1"; }

start_node() {
  local i=$1; shift
  "$BIN/mesh-node" run --data-dir "$DEMO/node$i" --admin-key "$DEMO/admin.pub" --voters "$VOTERS" \
    --listen "127.0.0.1:$((BASE + 10 * i))" --ssh-listen "$(ssh_addr "$i")" \
    --http-listen "127.0.0.1:$((BASE + 10 * i + 1))" "$@" >"$DEMO/node$i.out" 2>"$DEMO/node$i.log" &
  PIDS[$i]=$!
  for _ in $(seq 1 600); do
    grep -q ' ready: ' "$DEMO/node$i.out" 2>/dev/null && break
    kill -0 "${PIDS[$i]}" 2>/dev/null || { echo "node $i exited:"; tail -5 "$DEMO/node$i.log"; exit 1; }
    sleep 0.1
  done
  cat "$DEMO/node$i.out"
  cli "$i" pin "$(ssh_addr "$i")" "$("$BIN/mesh-node" fingerprint --data-dir "$DEMO/node$i")" >/dev/null
}

echo "== starting node 1 (bootstraps a new mesh)"
start_node 1
TOKEN=$(cli 1 token create --uses $((NODES - 1)) --ttl 10m)
echo "== join token: $TOKEN"
for i in $(seq 2 "$NODES"); do
  echo "== starting node $i with --join"
  start_node "$i" --join "$TOKEN"
done
for _ in $(seq 1 100); do
  [ "$(cli 1 --json status | json 'print scalar @{$_->{voters}}')" = "$VOTERS" ] && break
  sleep 0.2
done
cli 1 nodes

echo "== saxpy: out = 2.5 * x + y over 1,048,576 elements, checked against the CPU"
perl -e 'my $s=7; sub r { $s=($s*1103515245+12345)%2147483648; return $s/2147483648*2-1 }
  open(X,">","'"$DEMO"'/x.bin"); open(Y,">","'"$DEMO"'/y.bin"); binmode X; binmode Y;
  for (1..1048576) { print X pack("f<", r()); print Y pack("f<", r()); }'
ID=$(cli 2 --json submit --kernel saxpy --param a=2.5 --input "x=@$DEMO/x.bin" --input "y=@$DEMO/y.bin" \
  --idempotency-key demo-saxpy --wait | json 'print $_->{id}')
cli 2 result "$ID" --output "$DEMO/out.bin"
perl -e 'open(X,"<","'"$DEMO"'/x.bin"); open(Y,"<","'"$DEMO"'/y.bin"); open(O,"<","'"$DEMO"'/out.bin");
  binmode X; binmode Y; binmode O; my $bad=0; my $n=0;
  while (read(X,my $x,4)) { read(Y,my $y,4); read(O,my $o,4); $n++;
    my $want = unpack("f<", pack("f<", unpack("f<", pack("f<", 2.5*unpack("f<",$x))) + unpack("f<",$y)));
    $bad++ if $want != unpack("f<",$o); }
  printf("checked %d elements against the CPU: %s\n", $n, $bad ? "$bad MISMATCHES" : "all equal"); exit($bad ? 1 : 0);'

TASKS=${TASKS:-24}
echo "== submitting $TASKS Mandelbrot tasks (1024x768, 3000 iterations) through node 2"
for t in $(seq 1 "$TASKS"); do
  cli 2 submit --kernel mandelbrot --param width=1024 --param height=768 --param max_iter=3000 \
    --idempotency-key "demo-mandel-$t" >/dev/null
done
while :; do
  DONE=$(cli 2 --json tasks --state succeeded | json 'print scalar @$_')
  [ "$DONE" -ge $((TASKS / 2)) ] && break
  sleep 0.2
done
LEADER=$(cli 2 --json status | json 'print $_->{leader}')
echo "== $DONE tasks done; killing the leader, node $LEADER, with SIGKILL"
kill -9 "${PIDS[$LEADER]}"; wait "${PIDS[$LEADER]}" 2>/dev/null || true
SURVIVOR=1; [ "$LEADER" = 1 ] && SURVIVOR=2
now() { perl -MTime::HiRes=time -e 'printf "%.3f", time'; }
START=$(now)
while :; do
  NEW=$(cli "$SURVIVOR" --json status 2>/dev/null | json 'print $_->{leader} // 0' || echo 0)
  [ -n "$NEW" ] && [ "$NEW" != 0 ] && [ "$NEW" != "$LEADER" ] && break
  sleep 0.05
done
printf "== node %s leads now (a leader was known %.2fs after the kill)\n" "$NEW" "$(perl -e "print $(now) - $START")"
while :; do
  LEFT=$(cli "$SURVIVOR" --json tasks | json 'print scalar grep { $_->{state} ne "succeeded" } @$_')
  [ "$LEFT" = 0 ] && break
  sleep 0.3
done
echo "== every task succeeded; tasks that were on the killed node ran again elsewhere:"
cli "$SURVIVOR" tasks
cli "$SURVIVOR" nodes
MID=$(cli "$SURVIVOR" --json tasks | json 'print((grep { $_->{kernel} eq "mandelbrot" } @$_)[0]->{id})')
cli "$SURVIVOR" result "$MID" --png "$DEMO/mandelbrot.png"
echo "== done: $DEMO/mandelbrot.png; logs in $DEMO/node*.log"
