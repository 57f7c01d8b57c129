"""The private local Ray that `ray-lips run`, `compare` and `sweep` start without an address."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Started in its own process (the suite's shared Ray must not be joined): lists every TCP port
# that process tree listens on and asks each for Prometheus data over plain HTTP.
PROBE = r'''
import json, os, sys, urllib.request
from pathlib import Path
from ray_lips.cluster.connect import connect
import ray
connect(None, num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())

def descendants(pid):
    kids = {}
    for e in Path("/proc").iterdir():
        if e.name.isdigit():
            try:
                ppid = int((e / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(e.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c); todo.append(c)
    return out

inodes = set()
for pid in [os.getpid(), *descendants(os.getpid())]:
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
listeners = []
for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
    for line in Path(table).read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:
            addr, port = f[1].split(":")
            ip = ("::" if v6 and set(addr) == {"0"} else "0.0.0.0" if set(addr) == {"0"} else addr)
            listeners.append((ip, int(port, 16)))
answers = {}
for ip, port in listeners:
    host = "127.0.0.1" if ip in ("0.0.0.0", "::") else ray.util.get_node_ip_address()
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=3) as r:
            answers[f"{ip}:{port}"] = [r.status, r.read(200).decode(errors="replace")[:80]]
    except Exception as err:
        answers[f"{ip}:{port}"] = [None, type(err).__name__]
print(json.dumps({"answers": answers, "auth_mode": os.environ.get("RAY_AUTH_MODE")}))
ray.shutdown()
'''


def test_a_private_local_ray_serves_no_unauthenticated_http(tmp_path):
    """...and keeps Ray's token authentication on without telling the user how to opt out."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY_ADDRESS="", HOME=str(tmp_path))  # Ray writes its token to $HOME/.ray
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    answers = probe["answers"]
    assert answers, "the probe found no listening port at all"
    served = {port: body for port, (status, body) in answers.items() if status == 200}
    assert not served, served
    assert probe["auth_mode"] == "token"
    assert (tmp_path / ".ray" / "auth_token").is_file()
    assert "RAY_AUTH_MODE=disabled" not in done.stdout + done.stderr  # Ray's "to opt out" line
