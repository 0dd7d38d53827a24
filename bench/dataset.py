#!/usr/bin/env python3
"""Reproducible PVC-shaped dataset for the backup benchmark.

Subcommands:
  gen DIR --size BYTES [--seed N]      build the base dataset (deterministic for size+seed)
  mutate DIR UNDO [--seed N]           change ~1 % of it in place; save what is needed to undo
  undo DIR UNDO                        put the base dataset back, byte for byte
  manifest DIR OUT                     hash manifest (type, mode, size, sha256 / link target)
  verify MANIFEST ROOT                 compare a restored tree with a manifest; exit 1 on mismatch
  find-root DIR                        print the directory below DIR holding the dataset marker
  logfile FILE --size MIB [--seed N]   one log-like text file (for bench/stream.sh)

Shape (fractions of --size, which counts stored data bytes, not holes):
  * small text-like files: ~15,000 per GiB (tens of thousands at the 2 GiB default), median 3 KiB,
    in a namespace/app/dir hierarchy, each with a unique header (no cross-file dedup), ~10 %;
  * medium files 1-16 MiB, alternately log-like text (compressible) and random, ~35 %;
  * three database-like files made of 8 KiB pages: row pages, random (index/blob) pages,
    zero (free) pages, and runs copied from earlier in the file (repeated pages), ~55 %;
  * one sparse file: apparent size size/8, 4 MiB of data in four islands; a few symlinks.

mutate: 64 KiB overwrites at 64 KiB-aligned slots of the database files (0.8 % of size), two log
files grow by 0.05 % of size each, 1 % of small files edited, 0.5 % added, 0.5 % removed.
It writes mutate.json beside UNDO with the byte counts.
"""

import hashlib
import json
import os
import random
import shutil
import stat
import sys

MiB = 1 << 20
KiB = 1 << 10
PAGE = 8 * KiB
MARKER = ".bench-root"

WORDS = (
    "the of and to in is for on that with as by this be are from at or an it not which have "
    "config server client request response error warning info debug value key table index row "
    "column user account order payment status active pending failed timeout retry connection "
    "volume claim storage class node pod container namespace deployment service ingress secret "
    "backup restore snapshot repository pack blob chunk tree lock prune check size time date"
).split()
LEVELS = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
COMPONENTS = ["api", "db", "cache", "worker", "scheduler", "auth", "billing", "search"]


def text_block(rng, n):
    """~n bytes of prose-like text (config files, docs, source)."""
    out = []
    size = 0
    while size < n:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        if rng.random() < 0.3:
            line = f"{rng.choice(WORDS)}_{rng.randint(0, 999)} = {rng.randint(0, 1 << 20)}  # {line}"
        out.append(line)
        size += len(line) + 1
    return ("\n".join(out) + "\n").encode()[:n]


def log_block(rng, n, t0=1_700_000_000):
    """~n bytes of log lines with timestamps, ids and hex fields."""
    out = []
    size = 0
    t = t0 + rng.randint(0, 10_000_000)
    while size < n:
        t += rng.randint(0, 3)
        line = (
            f"2024-{(t // 2_592_000) % 12 + 1:02d}-{(t // 86400) % 28 + 1:02d}T{(t // 3600) % 24:02d}:"
            f"{(t // 60) % 60:02d}:{t % 60:02d}.{rng.randint(0, 999):03d}Z {rng.choice(LEVELS)} "
            f"[{rng.choice(COMPONENTS)}] req={rng.getrandbits(64):016x} user={rng.randint(1, 50000)} "
            f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(WORDS)} took={rng.randint(0, 5000)}ms"
        )
        out.append(line)
        size += len(line) + 1
    return ("\n".join(out) + "\n").encode()[:n]


def row_pool(rng, count):
    """Row-data page bodies (fixed-width records), reused by database pages."""
    pool = []
    rid = 0
    for _ in range(count):
        rows = []
        size = 0
        body = PAGE - 64
        while size < body - 200:
            rid += 1
            r = (
                f"{rid:010d}|{rng.choice(WORDS):<12}|{rng.choice(WORDS):<12}|{rng.randint(0, 10**9):>10}|"
                f"{rng.choice(['active', 'pending', 'failed', 'closed']):<8}|{rng.getrandbits(64):016x}|"
            ).encode()
            rows.append(r)
            size += len(r)
        b = b"".join(rows)
        pool.append(b + bytes(body - len(b)))  # free space at the page end is zero
    return pool


def db_page(rng, pool, pageno, lsn):
    kind = rng.random()
    header = pageno.to_bytes(8, "little") + lsn.to_bytes(8, "little") + rng.randbytes(16) + bytes(32)
    if kind < 0.70:
        return header + rng.choice(pool)
    return header + rng.randbytes(PAGE - 64)  # index / compressed blob pages


def write_db(path, rng, pool, size):
    pages = size // PAGE
    with open(path, "wb") as f:
        n = 0
        lsn = 1
        while n < pages:
            r = rng.random()
            if r < 0.08 and n > 0:  # a run of free pages
                k = min(pages - n, rng.randint(16, 512))
                f.write(bytes(k * PAGE))
            elif r < 0.20 and n > 1024:  # a run copied from earlier in the file (repeated pages)
                k = min(pages - n, rng.randint(32, 512))
                src = rng.randint(0, n - k) if n > k else 0
                f.flush()
                with open(path, "rb") as g:
                    g.seek(src * PAGE)
                    f.write(g.read(k * PAGE))
            else:
                k = min(pages - n, rng.randint(64, 1024))
                f.write(b"".join(db_page(rng, pool, n + i, lsn + i) for i in range(k)))
            n += k
            lsn += k


def gen(root, size, seed):
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, MARKER), "w") as f:
        f.write(f"size={size} seed={seed}\n")
    # small files
    n_small = max(500, round(15000 * size / (1 << 30)))
    total_small = 0
    for i in range(n_small):
        ns = f"ns{i % 7}"
        app = f"app{(i // 7) % 13}"
        d = os.path.join(root, "small", ns, app, f"d{(i // 91) % 40:02d}")
        os.makedirs(d, exist_ok=True)
        n = int(min(256 * KiB, max(100, rng.lognormvariate(8.0, 1.2))))  # median ~3 KiB
        head = f"# file {i} {rng.getrandbits(64):016x}\n".encode()
        body = text_block(rng, n) if rng.random() < 0.8 else log_block(rng, n)
        ext = rng.choice([".conf", ".yaml", ".txt", ".json", ".log", ".py"])
        with open(os.path.join(d, f"f{i:06d}{ext}"), "wb") as f:
            f.write(head + body)
        total_small += len(head) + len(body)
    # medium files
    med_budget = int(size * 0.35)
    md = os.path.join(root, "medium")
    os.makedirs(md, exist_ok=True)
    i = 0
    while med_budget > 0:
        n = min(med_budget, rng.randint(1, 16) * MiB + rng.randint(0, MiB))
        with open(os.path.join(md, f"m{i:04d}.{'log' if i % 2 == 0 else 'bin'}"), "wb") as f:
            left = n
            while left > 0:
                k = min(left, 4 * MiB)
                f.write(log_block(rng, k) if i % 2 == 0 else rng.randbytes(k))
                left -= k
        med_budget -= n
        i += 1
    # database-like files
    db_budget = max(3 * MiB, size - total_small - int(size * 0.35) - 4 * MiB)
    pool = row_pool(rng, 2048)
    dd = os.path.join(root, "db")
    os.makedirs(dd, exist_ok=True)
    for name, frac in (("main.db", 0.5), ("events.db", 0.3), ("cache.db", 0.2)):
        write_db(os.path.join(dd, name), rng, pool, int(db_budget * frac) // PAGE * PAGE)
    # sparse file: apparent size/8, four 1 MiB islands of data
    sp = os.path.join(root, "sparse.img")
    apparent = max(16 * MiB, size // 8)
    with open(sp, "wb") as f:
        f.truncate(apparent)
        for k in range(4):
            f.seek(k * (apparent // 4) + 64 * KiB)
            f.write(rng.randbytes(MiB // 2) + text_block(rng, MiB // 2))
    # symlinks
    os.symlink("db/main.db", os.path.join(root, "current.db"))
    os.symlink("../medium", os.path.join(root, "small", "medium-link"))


def walk_files(root):
    for dp, dns, fns in os.walk(root):
        dns.sort()
        for fn in sorted(fns):
            yield os.path.join(dp, fn)


def mutate(root, undo, seed):
    rng = random.Random(seed)
    with open(os.path.join(root, MARKER)) as f:
        size = int(f.read().split()[0].split("=")[1])
    if os.path.exists(undo):
        shutil.rmtree(undo)
    os.makedirs(undo)
    log = {"db_writes": [], "edited": [], "added": [], "removed": [], "appended": []}
    changed = {"overwritten": 0, "appended": 0, "edited_files_bytes": 0, "added_bytes": 0, "removed_bytes": 0}
    pool = row_pool(random.Random(seed + 1), 256)
    # database overwrites: 64 KiB at distinct 64 KiB-aligned slots
    dbs = [os.path.join(root, "db", n) for n in ("main.db", "events.db", "cache.db")]
    sizes = [os.path.getsize(p) for p in dbs]
    n_writes = max(4, round(0.008 * size / (64 * KiB)))
    slots = sorted(rng.sample(range(sum(s // (64 * KiB) for s in sizes)), n_writes))
    for s in slots:
        fi = 0
        while s >= sizes[fi] // (64 * KiB):
            s -= sizes[fi] // (64 * KiB)
            fi += 1
        off = s * 64 * KiB
        with open(dbs[fi], "r+b") as f:
            f.seek(off)
            old = f.read(64 * KiB)
            ui = len(log["db_writes"])
            with open(os.path.join(undo, f"db{ui}"), "wb") as u:
                u.write(old)
            new = b"".join(db_page(rng, pool, off // PAGE + k, 10**9 + k) for k in range(8))
            f.seek(off)
            f.write(new)
        log["db_writes"].append([os.path.relpath(dbs[fi], root), off])
        changed["overwritten"] += 64 * KiB
    # log files grow
    logs = sorted(p for p in walk_files(os.path.join(root, "medium")) if p.endswith(".log"))
    for p in logs[:2]:
        n = max(4 * KiB, int(size * 0.0005))
        log["appended"].append([os.path.relpath(p, root), os.path.getsize(p)])
        with open(p, "ab") as f:
            f.write(log_block(rng, n, t0=1_800_000_000))
        changed["appended"] += n
    # small files: edit 1 %, add 0.5 %, remove 0.5 %
    small = sorted(walk_files(os.path.join(root, "small")))
    small = [p for p in small if not os.path.islink(p)]
    picks = rng.sample(small, max(3, len(small) // 50))
    n_edit = len(picks) // 2
    n_rm = len(picks) // 4
    for k, p in enumerate(picks):
        rel = os.path.relpath(p, root)
        if k < n_edit:
            shutil.copy2(p, os.path.join(undo, f"e{k}"))
            with open(p, "r+b") as f:
                data = f.read()
                pos = rng.randint(0, len(data))
                new = data[:pos] + text_block(rng, rng.randint(10, 400)) + data[pos + rng.randint(0, 200):]
                f.seek(0)
                f.write(new)
                f.truncate()
            log["edited"].append([rel, k])
            changed["edited_files_bytes"] += len(new)
        elif k < n_edit + n_rm:
            shutil.copy2(p, os.path.join(undo, f"r{k}"))
            changed["removed_bytes"] += os.path.getsize(p)
            os.unlink(p)
            log["removed"].append([rel, k])
        else:
            q = p + ".new"
            body = f"# new {k}\n".encode() + text_block(rng, int(min(64 * KiB, max(100, rng.lognormvariate(8.0, 1.0)))))
            with open(q, "wb") as f:
                f.write(body)
            log["added"].append(os.path.relpath(q, root))
            changed["added_bytes"] += len(body)
    changed["total_changed"] = (
        changed["overwritten"] + changed["appended"] + changed["edited_files_bytes"] + changed["added_bytes"]
    )
    log["changed"] = changed
    with open(os.path.join(undo, "log.json"), "w") as f:
        json.dump(log, f)
    print(json.dumps(changed))


def undo_mutation(root, undo):
    with open(os.path.join(undo, "log.json")) as f:
        log = json.load(f)
    for i, (rel, off) in enumerate(log["db_writes"]):
        with open(os.path.join(undo, f"db{i}"), "rb") as u, open(os.path.join(root, rel), "r+b") as f:
            f.seek(off)
            f.write(u.read())
    for rel, n in log["appended"]:
        os.truncate(os.path.join(root, rel), n)
    for rel, k in log["edited"]:
        shutil.copy2(os.path.join(undo, f"e{k}"), os.path.join(root, rel))
    for rel, k in log["removed"]:
        shutil.copy2(os.path.join(undo, f"r{k}"), os.path.join(root, rel))
    for rel in log["added"]:
        os.unlink(os.path.join(root, rel))


def sha256_file(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def manifest(root):
    out = {}
    for dp, dns, fns in os.walk(root):
        for name in dns + fns:
            p = os.path.join(dp, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ["l", os.readlink(p)]
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ["d", oct(st.st_mode & 0o7777)]
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ["f", oct(st.st_mode & 0o7777), st.st_size, sha256_file(p)]
    return out


def verify(man_path, root):
    with open(man_path) as f:
        want = json.load(f)
    got = manifest(root)
    bad = []
    for k in sorted(set(want) | set(got)):
        if want.get(k) != got.get(k):
            bad.append(f"{k}: want {want.get(k)} got {got.get(k)}")
    sp = os.path.join(root, "sparse.img")
    alloc = os.stat(sp).st_blocks * 512 if os.path.exists(sp) else -1
    if bad:
        print(f"MISMATCH {len(bad)} entries; first: " + " | ".join(bad[:5]))
        print(f"sparse_alloc={alloc}")
        return 1
    print(f"OK {len(got)} entries identical")
    print(f"sparse_alloc={alloc}")
    return 0


def find_root(d):
    for dp, dns, fns in os.walk(d):
        if MARKER in fns:
            print(dp)
            return 0
    return 1


def main(argv):
    cmd = argv[1]
    if cmd == "gen":
        root = argv[2]
        size = int(argv[argv.index("--size") + 1])
        seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 1
        gen(root, size, seed)
    elif cmd == "mutate":
        seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 2
        mutate(argv[2], argv[3], seed)
    elif cmd == "undo":
        undo_mutation(argv[2], argv[3])
    elif cmd == "manifest":
        with open(argv[3], "w") as f:
            json.dump(manifest(argv[2]), f, sort_keys=True)
    elif cmd == "verify":
        return verify(argv[2], argv[3])
    elif cmd == "logfile":
        # One log-like text file of --size MiB, for bench/stream.sh.
        mib = int(argv[argv.index("--size") + 1])
        seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 7
        rng = random.Random(seed)
        with open(argv[2], "wb") as f:
            for i in range(mib):
                f.write(log_block(rng, 1 << 20, 1_700_000_000 + i * 1000))
    elif cmd == "find-root":
        return find_root(argv[2])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
