#!/usr/bin/env bash
# Make sure a Redis answers at 127.0.0.1:6379 (tests talk to a real one and fail loudly without it).
# Starts Debian's redis-server when none answers, installing it first if needed and allowed.
set -euo pipefail

ping() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }

ping && exit 0
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "No Redis at 127.0.0.1:6379 and redis-server is not installed (apt-get install redis-server)." >&2
    exit 1
  fi
fi
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "redis-server did not come up on 127.0.0.1:6379" >&2
exit 1
