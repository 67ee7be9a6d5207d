"""Strata processes on this machine for the scripts that measure them
(scripts/bench-prefix-cache, scripts/bench-serve-vs-llama-server): a process started
up to its readiness line, and a coordinator with three workers on loopback.
Run from the repository root, after `cargo build --release`."""
import os
import subprocess
import threading

ENV = dict(os.environ, STRATA_LOG="warn")


def start(args, ready):
    """A child process and the value of its readiness line's `ready=` field."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    key = ready + "="
    for line in p.stdout:
        for word in line.split():
            if word.startswith(key):
                # Keep reading its output, so that a full pipe never blocks it.
                threading.Thread(target=p.stdout.read, daemon=True).start()
                return p, word[len(key):]
    raise SystemExit(f"{args[0]} stopped before it was ready")


def cluster(model, threads, worker_flags=(), serve_flags=()):
    """Three workers of `threads` compute threads each, and `strata serve --placement
    spread` over them with the model id `bench`: the processes, workers first, and
    the coordinator's HTTP address."""
    children, workers = [], []
    for i in range(3):
        w, addr = start(["target/release/strata-worker", "--device", "cpu", "--listen", "127.0.0.1:0", "--model", model,
                         "--threads", threads, "--name", f"worker-{i}", "--no-mdns", "--insecure", *worker_flags], "grpc")
        children.append(w)
        workers += ["--worker", addr]
    c, http = start(["target/release/strata", "serve", "--model", model, "--model-id", "bench", "--insecure", "--no-mdns",
                     "--placement", "spread", "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                     *workers, *serve_flags], "http")
    children.append(c)
    return children, http
