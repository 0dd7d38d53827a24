#!/usr/bin/python3
"""CNI plugin `hoard-isolated` for the test node of hack/kube (up.sh --with-node).

A pod that is not hostNetwork gets its own network namespace with an address on `eth0`, as
containerd requires, but nothing connects that namespace to anything: `eth0` is one end of a
veth pair whose other end (`peer0`) stays in the same namespace. No interface, route or rule
is added to the host, so no pod traffic leaves its namespace. Pods that must be reached (the
hoard agent, the controller) run with hostNetwork on 127.0.0.1.

The address comes from the `ipam` plugin named in the configuration (Debian's host-local),
called the standard way. This kernel has no `dummy` link type, hence the veth pair.
"""

import json
import os
import subprocess
import sys

SUPPORTED = ["0.4.0", "1.0.0", "1.1.0"]


def fail(code, msg):
    print(json.dumps({"cniVersion": "1.0.0", "code": code, "msg": msg}))
    sys.exit(1)


def run(*args):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def ipam(conf, raw):
    """Runs the IPAM plugin with this plugin's environment and configuration."""
    name = conf["ipam"]["type"]
    path = None
    for d in os.environ.get("CNI_PATH", "").split(":"):
        if d and os.path.isfile(os.path.join(d, name)):
            path = os.path.join(d, name)
            break
    if path is None:
        fail(7, f"ipam plugin {name} not found in CNI_PATH")
    r = subprocess.run([path], input=raw, capture_output=True, text=True, timeout=30, env=os.environ)
    if r.returncode != 0:
        fail(11, f"ipam {name}: {r.stdout.strip() or r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else {}


def in_netns(netns, *args):
    return run("nsenter", f"--net={netns}", *args)


def main():
    cmd = os.environ.get("CNI_COMMAND", "")
    if cmd == "VERSION":
        print(json.dumps({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}))
        return
    raw = sys.stdin.read()
    conf = json.loads(raw)
    version = conf.get("cniVersion", "1.0.0")
    netns = os.environ.get("CNI_NETNS", "")
    ifname = os.environ.get("CNI_IFNAME", "eth0")
    if cmd == "ADD":
        result = ipam(conf, raw)
        try:
            in_netns(netns, "ip", "link", "add", ifname, "type", "veth", "peer", "name", "peer0")
            for ip in result.get("ips", []):
                in_netns(netns, "ip", "addr", "add", ip["address"], "dev", ifname)
            in_netns(netns, "ip", "link", "set", "peer0", "up")
            in_netns(netns, "ip", "link", "set", ifname, "up")
            mac = in_netns(netns, "cat", f"/sys/class/net/{ifname}/address").strip()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            os.environ["CNI_COMMAND"] = "DEL"
            ipam(conf, raw)
            fail(11, str(e))
        for ip in result.get("ips", []):
            ip["interface"] = 0
            ip.pop("gateway", None)
        out = {
            "cniVersion": version,
            "interfaces": [{"name": ifname, "mac": mac, "sandbox": netns}],
            "ips": result.get("ips", []),
            "routes": [],
            "dns": {},
        }
        print(json.dumps(out))
    elif cmd == "DEL":
        ipam(conf, raw)
        if netns and os.path.exists(netns):
            try:
                in_netns(netns, "ip", "link", "del", ifname)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # already gone: DEL must be idempotent
    elif cmd in ("CHECK", "GC", "STATUS"):
        return
    else:
        fail(4, f"unknown CNI_COMMAND {cmd!r}")


if __name__ == "__main__":
    main()
