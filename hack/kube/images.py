#!/usr/bin/env python3
"""Build a one-layer container image as a docker-archive tarball, without a container engine.

The test node (hack/kube/up.sh --with-node) has no registry and no image builder: its images
are made here from files already on the machine and imported with `ctr -n k8s.io images
import`. images/*.Dockerfile stay the production recipe; a test image carries the same
binaries, plus the shared libraries `ldd` lists for them (hoard's binaries are dynamically
linked against glibc).

  images.py --out F --tag REF [--file SRC[:DEST]]... [--busybox] [--ldd]
            [--entrypoint JSON] [--cmd JSON] [--user U] [--env K=V]...

--file puts SRC at DEST (default: the same path); --busybox adds /bin/busybox from Debian's
busybox-static with a symlink per applet; --ldd adds every library the ELF files need, at the
path the loader finds it on this machine. The layer is reproducible: fixed mtimes, uid 0,
sorted entries.
"""

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

MTIME = 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tag", required=True, action="append", help="image reference (repeatable)")
    p.add_argument("--file", action="append", default=[], help="SRC[:DEST]")
    p.add_argument("--busybox", action="store_true")
    p.add_argument("--ldd", action="store_true")
    p.add_argument("--entrypoint", default=None, help="JSON list")
    p.add_argument("--cmd", default=None, help="JSON list")
    p.add_argument("--user", default="")
    p.add_argument("--env", action="append", default=[])
    return p.parse_args()


def ldd_libs(path):
    """Absolute paths of the shared libraries (and the loader) an ELF file needs."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0:  # a static binary: "not a dynamic executable"
        return []
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" ")[0]
            if target.startswith("/"):
                libs.append(target)
            elif "not found" in line:
                sys.exit(f"images.py: {path}: {line}")
        elif line.startswith("/"):
            libs.append(line.split(" ")[0])
    return libs


def is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def main():
    a = parse_args()
    files = {}  # dest -> src
    links = {}  # dest -> link target
    for spec in a.file:
        src, _, dest = spec.partition(":")
        files[dest or src] = src
    if a.busybox:
        bb = "/bin/busybox"
        if not os.path.exists(bb):
            sys.exit("images.py: /bin/busybox missing (Debian package busybox-static)")
        files["/bin/busybox"] = bb
        for lib in ldd_libs(bb):  # Debian's busybox-static has none; a dynamic busybox does
            files.setdefault(lib, os.path.realpath(lib))
        applets = subprocess.run([bb, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                links[f"/bin/{applet}"] = "busybox"
    if a.ldd:
        for dest, src in list(files.items()):
            if is_elf(src):
                for lib in ldd_libs(src):
                    # The loader follows symlinks; store the resolved file at the listed path.
                    files.setdefault(lib, os.path.realpath(lib))
    for dest, src in files.items():
        if not os.path.isfile(src):
            sys.exit(f"images.py: {src} is not a file")

    # The layer: parent directories, files, links; sorted, fixed metadata.
    dirs = {"/tmp"}
    for dest in list(files) + list(links):
        d = os.path.dirname(dest)
        while d not in ("/", ""):
            dirs.add(d)
            d = os.path.dirname(d)
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            ti = tarfile.TarInfo(d.lstrip("/"))
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o1777 if d == "/tmp" else 0o755, MTIME
            tar.addfile(ti)
        for dest in sorted(files):
            src = files[dest]
            ti = tarfile.TarInfo(dest.lstrip("/"))
            ti.size = os.path.getsize(src)
            ti.mode, ti.mtime = 0o755, MTIME
            with open(src, "rb") as f:
                tar.addfile(ti, f)
        for dest in sorted(links):
            ti = tarfile.TarInfo(dest.lstrip("/"))
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, links[dest], 0o777, MTIME
            tar.addfile(ti)
    layer = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"] + a.env,
            "User": a.user,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "hack/kube/images.py"}],
    }
    if a.entrypoint:
        config["config"]["Entrypoint"] = json.loads(a.entrypoint)
    if a.cmd:
        config["config"]["Cmd"] = json.loads(a.cmd)
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id[len("sha256:"):] + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": a.tag, "Layers": [layer_name]}]

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, mode="w") as out:
        for name, data in (
            (config_name, config_bytes),
            (layer_name, layer),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            out.addfile(ti, io.BytesIO(data))
    os.replace(tmp, a.out)
    print(f"{a.out}: {', '.join(a.tag)} ({len(files)} files, {len(layer) // 1024} KiB layer)")


if __name__ == "__main__":
    main()
