#!/usr/bin/env bash
# hoard's main job on the embedded default: build hoard, back up a generated sample tree into a
# local filesystem repository, back it up again (incremental), restore it, verify, and summarise.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/env.sh
cargo build --release --locked -p hoard >&2
hoard="$CARGO_TARGET_DIR/release/hoard"
work="${1:-$(mktemp -d -t hoard-demo.XXXXXX)}"
mkdir -p "$work"
export HOARD_REPOSITORY="$work/repo" HOARD_PASSWORD="${HOARD_PASSWORD:-demo-password}"

echo "== generating a sample tree in $work/sample"
python3 - "$work/sample" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(42)
words = "alpha beta gamma delta volume backup restore pod node cluster".split()
for d in range(20):
    p = os.path.join(root, f"dir{d:02}")
    os.makedirs(p, exist_ok=True)
    for f in range(50):
        with open(os.path.join(p, f"file{f:03}.txt"), "w") as fh:
            fh.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(10, 2000))))
with open(os.path.join(root, "database.img"), "wb") as fh:
    page = os.urandom(8192)
    for i in range(4096):
        fh.write(page if i % 3 else os.urandom(8192))
with open(os.path.join(root, "sparse.img"), "wb") as fh:
    fh.seek(256 << 20); fh.write(b"end")
os.symlink("database.img", os.path.join(root, "current"))
PY

[ -f "$work/repo/config" ] || "$hoard" init
echo "== first backup"
"$hoard" backup "$work/sample" --tag demo
echo "== second backup (nothing changed: nothing is read)"
"$hoard" backup "$work/sample" --tag demo
"$hoard" snapshots
echo "== restore"
rm -rf "$work/restore"
"$hoard" restore latest --target "$work/restore"
diff -r "$work/sample" "$work/restore/sample" && echo "restore is byte-identical to the source"
"$hoard" stats latest
echo "repository: $work/repo (password: $HOARD_PASSWORD)"
