#!/usr/bin/env bash
# Start PostgreSQL, Redis and an S3 server (moto) when they are not already answering (idempotent).
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  echo "starting PostgreSQL"
  for v in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
  done
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
pg_up || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }

if ! redis_up; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 30); do redis_up && break; sleep 1; done
fi
redis_up || { echo "Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }

# An S3 server for the scaled-out tests (moto's standalone server, from the test extra), on loopback.
S3_PORT=${KDQ_TEST_S3_PORT:-9310}
s3_up() { python - "$S3_PORT" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2)
PY
}
if ! s3_up; then
  echo "starting the S3 test server (moto) on 127.0.0.1:$S3_PORT"
  setsid nohup python -m moto.server -H 127.0.0.1 -p "$S3_PORT" > /tmp/kdq-moto-ci.log 2>&1 < /dev/null &
  for _ in $(seq 1 30); do s3_up && break; sleep 1; done
fi
s3_up || { echo "the S3 test server is not reachable on 127.0.0.1:$S3_PORT" >&2; exit 1; }
echo "PostgreSQL, Redis and S3 (moto) are up"
