"""Prints each Secret's type, labels and keys from the cluster in KUBECONFIG, values redacted.

Uses the kubeconfig's current context when it authenticates with a bearer token over the
cluster's own CA (the demo's emulator); otherwise it asks kubectl, which supports every method.
Exits 1 when a Secret is missing, cannot be read, or has no `s3.conf`, so `make demo` fails
instead of reporting a Secret that is not there.
"""
import base64
import json
import os
import shutil
import subprocess
import sys

import requests
import yaml


def cluster():
    with open(os.environ["KUBECONFIG"]) as f:
        cfg = yaml.safe_load(f)
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == cfg["current-context"])
    server = next(c["cluster"]["server"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
    return server, {"Authorization": f"Bearer {user['token']}"} if user.get("token") else {}


def redact(text):
    lines = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        lines.append(f"{key}=<redacted, {len(value)} chars>" if sep else line)
    return lines


def fetch(server, headers, ns, name):
    """The Secret as JSON, or (MISSING | UNREADABLE, why)."""
    if headers and server.startswith("http://"):
        r = requests.get(f"{server}/api/v1/namespaces/{ns}/secrets/{name}", headers=headers, timeout=10)
        if r.status_code == 200:
            return r.json()
        return ("MISSING" if r.status_code == 404 else "UNREADABLE", f"{r.status_code} {r.json().get('message')}")
    if not shutil.which("kubectl"):
        return ("UNREADABLE", "kubectl is needed to read Secrets from this cluster")
    out = subprocess.run(["kubectl", "-n", ns, "get", "secret", name, "-o", "json"], capture_output=True, text=True)
    if out.returncode == 0:
        return json.loads(out.stdout)
    return ("MISSING" if "NotFound" in out.stderr else "UNREADABLE", out.stderr.strip())


def main(refs):
    server, headers = cluster()
    failed = 0
    for ref in refs:
        ns, name = ref.split("/")
        s = fetch(server, headers, ns, name)
        if isinstance(s, tuple):
            print(f"{ref}: {s[0]} ({s[1]})")
            failed = 1
            continue
        print(f"{ref}: type={s.get('type')} labels={s['metadata'].get('labels')}")
        data = s.get("data") or {}
        if "s3.conf" not in data:
            print(f"  NO s3.conf (keys: {sorted(data)})")
            failed = 1
        for key, value in data.items():
            print(f"  data key {key!r}:")
            for line in redact(base64.b64decode(value).decode()):
                print(f"    {line}")
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
