#!/usr/bin/env python3
"""Turn bench/run.sh measurements into one markdown table.

usage: report.py META MEASUREMENTS NOTES RESULTS_FILE RESULTS_MD
Writes RESULTS_FILE (the run's report) and appends a dated entry to RESULTS_MD.
"""

import json
import statistics
import sys

MiB = 1 << 20
PHASES = [
    ("a_initial", "(a) initial backup"),
    ("b_nochange", "(b) re-backup, no change"),
    ("c_mutated", "(c) backup after mutate"),
    ("d_restore", "(d) full restore"),
]


def med(xs):
    return statistics.median(xs) if xs else None


def fmt(v, nd=1):
    if v is None:
        return "—"
    return f"{v:,.{nd}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}"


def main(meta_p, meas_p, notes_p, out_p, results_md):
    meta = {}
    for line in open(meta_p):
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            meta[k] = v
    size_kv = dict(kv.split("=") for kv in ("size=" + meta["size"]).split())
    apparent = int(size_kv["apparent"])
    mutate = json.loads(meta.get("mutate", "{}") or "{}")
    changed = mutate.get("total_changed")

    rows = {}
    verify = {}
    loads = []
    for line in open(meas_p):
        f = line.rstrip("\n").split("\t")
        rep, tool, phase = f[0], f[1], f[2]
        if phase == "verify":
            verify.setdefault(tool, []).append((f[3], f[4] if len(f) > 4 else ""))
            continue
        wall, user, sys_, rss_kb, size, rc, load = f[3:10]
        loads.append(float(load))
        if rc != "0":
            rows.setdefault((tool, phase), {"fail": True})
            continue
        r = rows.setdefault((tool, phase), {"wall": [], "cpu": [], "rss": [], "size": []})
        if "wall" not in r:
            continue
        r["wall"].append(float(wall))
        r["cpu"].append(float(user) + float(sys_))
        r["rss"].append(int(rss_kb) / 1024)
        r["size"].append(int(size))
    # statwalk (bench/statwalk.c) is not a backup tool: its row is the floor under phase (b).
    floor = rows.pop(("statwalk", "b_floor"), None)
    tools = []
    for (t, _) in rows:
        if t not in tools:
            tools.append(t)
    order = {"hoard": 0, "restic": 1, "borg": 2, "rustic": 3}
    tools.sort(key=lambda t: order.get(t, 9))

    def stats(tool, phase):
        r = rows.get((tool, phase))
        if not r or r.get("fail"):
            return None
        w = med(r["wall"])
        return {
            "wall": w,
            "range": f"{min(r['wall']):.2f}–{max(r['wall']):.2f}" if len(r["wall"]) > 1 else "",
            "mibs": apparent / MiB / w if w else None,
            "cpu": med(r["cpu"]),
            "rss": med(r["rss"]),
            "repo": med(r["size"]) / MiB if phase != "d_restore" else None,
        }

    cols = ["wall", "mibs", "cpu", "rss", "repo"]
    out = []
    out.append(
        "| phase | tool | wall s | wall min–max | MiB/s | CPU s | peak RSS MiB | repo MiB "
        "| ÷ restic (wall / MiB/s / CPU / RSS / repo) | hoard ÷ tool (wall / MiB/s / CPU / RSS / repo) |"
    )
    out.append("|---|---|---:|---|---:|---:|---:|---:|---|---|")
    for phase, label in PHASES:
        base = stats("restic", phase)
        h = stats("hoard", phase)
        for t in tools:
            s = stats(t, phase)
            if s is None:
                out.append(f"| {label} | {t} | failed | | | | | | | |")
                continue
            vs_restic = " / ".join(ratio(s[c], base[c]) if base else "—" for c in cols)
            vs_hoard = " / ".join(ratio(h[c], s[c]) if h else "—" for c in cols) if t != "hoard" else "1"
            out.append(
                f"| {label} | {t} | {fmt(s['wall'], 2)} | {s['range']} | {fmt(s['mibs'])} | {fmt(s['cpu'], 2)} | {fmt(s['rss'])} | "
                f"{fmt(s['repo'])} | {vs_restic} | {vs_hoard} |"
            )
    table = "\n".join(out)

    inc = []
    for t in tools:
        b, c, a = stats(t, "b_nochange"), stats(t, "c_mutated"), stats(t, "a_initial")
        if not (b and c and a and changed):
            inc.append(f"- {t}: n/a")
            continue
        growth = (c["repo"] - b["repo"]) * MiB
        nochange = (b["repo"] - a["repo"]) * MiB
        inc.append(
            f"- **{t}**: repository grew {growth / MiB:,.2f} MiB after mutate for {changed / MiB:,.2f} MiB changed "
            f"→ {growth / changed:.2f}× (no-change re-backup added {nochange / 1024:,.0f} KiB)"
        )
    floor_lines = []
    if floor is not None:
        if floor.get("fail"):
            floor_lines.append("- statwalk failed: no floor for this run.")
        else:
            w = med(floor["wall"])
            rng = f" ({min(floor['wall']):.2f}–{max(floor['wall']):.2f})" if len(floor["wall"]) > 1 else ""
            floor_lines.append(
                f"- `bench/statwalk.c`, 16 threads that list and lstat every entry of the dataset and do "
                f"nothing else, page cache dropped: {w:.2f} s{rng}, CPU {med(floor['cpu']):.2f} s. "
                f"A no-change backup must do at least this."
            )
            b_restic, b_hoard = stats("restic", "b_nochange"), stats("hoard", "b_nochange")
            if b_restic:
                floor_lines.append(
                    f"- 0.1× restic's (b) = {b_restic['wall'] / 10:.2f} s = {b_restic['wall'] / 10 / w:.2f}× the floor."
                )
            if b_hoard:
                floor_lines.append(f"- hoard's (b) = {b_hoard['wall']:.2f} s = {b_hoard['wall'] / w:.2f}× the floor.")
    ver = []
    for t in tools:
        v = verify.get(t, [])
        okc = sum(1 for s, _ in v if s == "OK")
        sparse = [x for s, x in v if s == "OK"]
        sp = f"; sparse file allocated after restore: {int(sparse[0]) / MiB:,.1f} MiB" if sparse and sparse[0] else ""
        fails = [x for s, x in v if s != "OK"]
        ver.append(f"- {t}: {okc}/{len(v)} restores byte-identical{sp}" + (f"; FAILED: {fails[0]}" if fails else ""))
    notes = [n.strip() for n in open(notes_p) if n.strip()]
    versions = [f"{k[8:]}: {v}" for k, v in meta.items() if k.startswith("version_")]
    load_s = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "?"
    header = (
        f"### {meta['date']} — {size_kv['size'] and int(size_kv['size']) / MiB:,.0f} MiB dataset, "
        f"{size_kv['reps']} repetition(s), medians\n\n"
        f"- machine: nproc={meta['nproc']}, CPU: {meta['cpu']}\n"
        f"- hoard built from: {meta['commit']}\n"
        f"- load average (1 min) at start {meta.get('load_start')}, at end {meta.get('load_end')}, "
        f"before each measured phase {load_s}\n"
        f"- page cache dropped before each phase: {'yes' if meta.get('drop_caches_ok') == '1' else 'NO (warm cache)'}\n"
        f"- dataset: {size_kv['files']} files, {apparent / MiB:,.0f} MiB apparent, "
        f"{int(size_kv['alloc']) / MiB:,.0f} MiB allocated; mutate changed {changed and changed / MiB:,.2f} MiB "
        f"({json.dumps(mutate)})\n"
        f"- versions: {'; '.join(versions)}\n"
        f"- MiB/s = dataset apparent size / wall time (for (b)/(c) an effective scan rate). Ratios: "
        f"`÷ restic` = this tool's figure divided by restic's from the same run; `hoard ÷ tool` = hoard's "
        f"figure divided by this tool's (below 1 is better for hoard in wall, CPU, RSS, repo; above 1 for MiB/s).\n"
    )
    body = (
        header
        + "\n"
        + table
        + "\n\nIncremental efficiency (repository growth after mutate vs bytes changed):\n\n"
        + "\n".join(inc)
        + ("\n\nCold metadata floor under (b):\n\n" + "\n".join(floor_lines) if floor_lines else "")
        + "\n\nRestore verification:\n\n"
        + "\n".join(ver)
        + ("\n\nNotes:\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
        + "\n"
    )
    with open(out_p, "w") as f:
        f.write(body)
    with open(results_md, "a") as f:
        f.write("\n" + body)
    print(body)


if __name__ == "__main__":
    main(*sys.argv[1:6])
