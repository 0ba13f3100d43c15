#!/usr/bin/env bash
# Install buffyfs, serve a small demo origin on 127.0.0.1 (no internet needed),
# register it as a source and mount the cache; then read it like any file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

demo=${BUFFYFS_DEMO_DIR:-/tmp/buffyfs-demo}
port=${BUFFYFS_DEMO_PORT:-8765}
mkdir -p "$demo/www" "$demo/mnt"
export BUFFYFS_CACHE="$demo/cache"
date -u +"hello from the buffyfs demo origin, written %FT%TZ" > "$demo/www/hello.txt"

if [ -f "$demo/origin.pid" ] && kill -0 "$(cat "$demo/origin.pid")" 2>/dev/null; then
    :  # our demo origin from an earlier run still serves
elif (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
    echo "port $port is taken by another program: set BUFFYFS_DEMO_PORT to a free port" >&2
    exit 1
else
    nohup .venv/bin/python -m http.server "$port" --bind 127.0.0.1 --directory "$demo/www" \
        >"$demo/origin.log" 2>&1 &
    echo $! > "$demo/origin.pid"
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
fi

B=.venv/bin/buffyfs
$B list 2>/dev/null | grep -q '^hello' || $B add hello "http://127.0.0.1:$port/hello.txt" --refresh 1m
mountpoint -q "$demo/mnt" || $B mount "$demo/mnt"

echo "\$ ls $demo/mnt $demo/mnt/hello"
ls "$demo/mnt" "$demo/mnt/hello"
echo "\$ cat $demo/mnt/hello/latest"
cat "$demo/mnt/hello/latest"
echo "\$ buffyfs status"
$B status
cat <<MSG

buffyfs is mounted on $demo/mnt (cache $BUFFYFS_CACHE). To use the command line on it:
  export PATH="$PWD/.venv/bin:\$PATH" BUFFYFS_CACHE="$BUFFYFS_CACHE"
Try:
  echo 'add other http://127.0.0.1:$port/hello.txt' > $demo/mnt/@control
  cat $demo/mnt/hello/@status
  buffyfs versions hello
Stop it with: $PWD/$B umount $demo/mnt; kill \$(cat $demo/origin.pid)
MSG
