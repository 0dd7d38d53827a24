#!/usr/bin/env python3
"""Lint, render and check the hoard chart with the Helm Go SDK (helm-python-sdk), offline.

Used by hack/chart-check.sh; run it with the venv's python. Subcommands:

  lint CHART                      helm lint (fails on errors and warnings)
  render CHART OUT.yaml [VALUES [NAMESPACE]]  helm template equivalent: schema-validate VALUES (JSON or a
                                  values file path), render, write all manifests to OUT.yaml
  refuse CHART VALUES             the values must be rejected (schema or template failure)
  rbac OUT.yaml ALLOWLIST         the controller's ClusterRole+Role rules == the allow-list
  secrets OUT.yaml DIR            write the rendered TLS Secrets' files to DIR/<controller|agent-ca>/
  doc-commands DOC                the shell commands of DOC's ```sh blocks, one a line
  helm-cmd CMD REPO OUT.yaml      render one documented helm command as written (flags parsed)
  doc-values DOC CHART OUTDIR     render every ```yaml values snippet of DOC
  assert OUT.yaml VALUES          properties the chart promises hold in a render with VALUES
  args-check OUT.yaml BINDIR REPO the rendered containers' command/args/env are accepted by the
                                  real binaries in BINDIR (see args_check)
  args-probe OUT.yaml BINDIR REPO the same check notices an unknown flag and every bad value
  plugin-manifest REPO [MANIFEST] plugins/hoard.yaml: every file it ships exists, version = workspace
  notes CHART OUT.yaml [VALUES]   NOTES.txt's kubectl commands to run (rollout targets checked in OUT)
  dockerfiles REPO BINDIR         images/*.Dockerfile: multi-stage, distroless runtime, users, links
"""
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys

import yaml
import helm_python as helm

RELEASE, NAMESPACE = "hoard", "hoard"


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def load_values(arg):
    if not arg:
        return {}
    if os.path.exists(arg):
        with open(arg) as f:
            return yaml.safe_load(f) or {}
    return json.loads(arg)


def lint(chart, values=None):
    res = helm.lint(chart, values or {}, strict=True, namespace=NAMESPACE, kube_version="v1.36.0")
    for m in res.get("messages", []):
        print(f"  lint [{m.get('severity')}] {m.get('path')}: {m.get('error')}")
    bad = [m for m in res.get("messages", []) if m.get("severity", 0) >= 2]
    if res.get("errors") or bad:
        fail(f"helm lint: {res.get('errors')} {bad}")
    print(f"  lint ok ({res.get('total_charts_linted')} chart, {len(res.get('messages', []))} messages)")


def render(chart, out, values, release=RELEASE, namespace=NAMESPACE):
    with helm.Chart.load(chart) as c:
        c.validate_schema(values)
        docs = c.render(values, name=release, namespace=namespace, is_install=True)
    parts = []
    for path, text in sorted(docs.items()):
        if path.endswith("NOTES.txt"):
            if not text.strip():
                fail("NOTES.txt rendered empty")
            continue
        if not path.endswith((".yaml", ".yml")) or not text.strip():
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                parts.append(doc)
    with open(out, "w") as f:
        yaml.safe_dump_all(parts, f, sort_keys=False)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in parts)
    print(f"  rendered {len(parts)} objects: {', '.join(kinds)}")
    return parts


def refuse(chart, values):
    try:
        with helm.Chart.load(chart) as c:
            c.validate_schema(values)
            c.render(values, name=RELEASE, namespace=NAMESPACE)
    except helm.HelmError as e:
        print(f"  refused as expected: {str(e).splitlines()[0][:160]}")
        return
    fail(f"values were accepted but must be refused: {values}")


def triples_from_rules(rules):
    out = set()
    for r in rules:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    out.add((g, res, v))
    return out


def rbac(rendered, allowlist):
    """ClusterRole rules == clusterRules and Role rules == namespaceRules of the allow-list,
    as sets of (group, resource, verb): nothing missing, nothing extra, no wildcard."""
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    with open(allowlist) as f:
        allow = yaml.safe_load(f)
    ok = True
    for kind, key in (("ClusterRole", "clusterRules"), ("Role", "namespaceRules")):
        allowed = triples_from_rules(allow.get(key) or [])
        roles = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith("-controller")]
        if len(roles) != 1:
            fail(f"expected one controller {kind}, found {len(roles)}")
        granted = triples_from_rules(roles[0].get("rules") or [])
        wild = sorted(t for t in granted if "*" in t)
        missing, extra = sorted(allowed - granted), sorted(granted - allowed)
        for t in wild:
            print(f"  {kind}: wildcard {t}", file=sys.stderr)
        for t in missing:
            print(f"  {kind}: missing from the chart: {t}", file=sys.stderr)
        for t in extra:
            print(f"  {kind}: granted beyond the allow-list ({key}): {t}", file=sys.stderr)
        if wild or missing or extra:
            ok = False
        else:
            print(f"  {kind}: {len(granted)} (group, resource, verb) grants == {key}")
    if not ok:
        fail("controller RBAC differs from chart/hoard/rbac-allowlist.yaml")
    # The agent gets no RBAC at all.
    for b in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        for s in b.get("subjects", []):
            if s["name"].endswith("-agent"):
                fail(f"{b['kind']} {b['metadata']['name']} binds the agent's ServiceAccount")


def secrets(rendered, outdir):
    import base64

    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    n = 0
    for d in docs:
        if d["kind"] != "Secret":
            continue
        name = d["metadata"]["name"]
        sub = "controller" if name.endswith("-controller-tls") else "agent-ca" if name.endswith("-agent-ca") else None
        if not sub:
            continue
        os.makedirs(os.path.join(outdir, sub), exist_ok=True)
        for k, v in d["data"].items():
            with open(os.path.join(outdir, sub, k), "wb") as f:
                f.write(base64.b64decode(v))
        n += 1
    if n != 2:
        fail(f"expected 2 TLS Secrets, found {n}")
    print(f"  wrote the rendered TLS Secrets to {outdir}")


def doc_blocks(doc):
    """(language, text) of every fenced block in DOC, dedented to its fence."""
    out, lang, indent, buf = [], None, 0, []
    with open(doc) as f:
        for line in f:
            s = line.rstrip("\n")
            t = s.strip()
            if t.startswith("```"):
                if lang is None:
                    lang, indent, buf = t[3:].strip() or "text", len(s) - len(s.lstrip()), []
                else:
                    out.append((lang, "\n".join(buf) + "\n"))
                    lang = None
                continue
            if lang is not None:
                buf.append(s[indent:] if s[:indent].strip() == "" else s)
    return out


def doc_commands(doc):
    """Shell commands of the ```sh blocks of DOC, continuation lines joined, comments dropped."""
    cmds = []
    for lang, text in doc_blocks(doc):
        if lang not in ("sh", "bash"):
            continue
        cur = ""
        for t in (x.strip() for x in text.splitlines()):
            if not t or t.startswith("#"):
                continue
            cur += t[:-1] + " " if t.endswith("\\") else t
            if not t.endswith("\\"):
                cmds.append(cur.strip())
                cur = ""
    return cmds


def merge(a, b):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge(a[k], v)
        else:
            a[k] = v
    return a


def helm_cmd(cmd, repo, out):
    """Render one documented `helm install|upgrade|template|lint` command with its flags."""
    argv = shlex.split(cmd)
    verb, rest = argv[1], argv[2:]
    pos, values, ns = [], {}, None
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in ("-n", "--namespace"):
            ns = rest[i + 1]
            i += 2
        elif a == "--set":
            merge(values, helm.parse_set_string(rest[i + 1]))
            i += 2
        elif a in ("-f", "--values"):
            merge(values, load_values(os.path.join(repo, rest[i + 1])))
            i += 2
        elif a in ("--create-namespace", "--wait", "--atomic", "--reuse-values"):
            i += 1
        elif a.startswith("-"):
            fail(f"unsupported helm flag {a!r} in: {cmd}")
        else:
            pos.append(a)
            i += 1
    if verb == "lint":
        lint(os.path.join(repo, pos[0]), values)
        return
    if verb not in ("install", "upgrade", "template"):
        fail(f"helm {verb} is not checked: {cmd}")
    release, chart_path = pos[0], os.path.join(repo, pos[1])
    render(chart_path, out, values, release=release, namespace=ns or "default")
    assert_render(out, values)
    print(f"NAMESPACE={ns or 'default'}")


def doc_values(doc, chart, outdir):
    """Every ```yaml block of DOC is a values snippet: schema-checked, rendered, asserted."""
    n = 0
    for lang, text in doc_blocks(doc):
        if lang != "yaml":
            continue
        n += 1
        values = yaml.safe_load(text)
        out = os.path.join(outdir, f"doc-values-{n}.yaml")
        print(f"  values snippet {n}: {json.dumps(values)[:120]}")
        render(chart, out, values)
        assert_render(out, values)
    print(f"  {n} documented values snippets rendered")


def find(docs, kind, suffix=""):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"].endswith(suffix):
            return d
    fail(f"no {kind} *{suffix} rendered")


def check(cond, msg):
    if not cond:
        fail(msg)


def assert_render(rendered, values):
    """What the chart promises, checked on a render (values as given to `render`)."""
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    a = values.get("agent", {})
    kubelet_root = a.get("kubeletRoot", "/var/lib/kubelet/pods")
    restore = a.get("restore", {}).get("enabled", False)
    privileged = a.get("privileged", False)
    ds = find(docs, "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    check(labels.get("app.kubernetes.io/name") == "hoard-agent", "agent pods carry app.kubernetes.io/name=hoard-agent")
    host_network = a.get("hostNetwork", False)
    check(pod.get("hostNetwork") is host_network, f"agent hostNetwork is {host_network}")
    dns = "ClusterFirstWithHostNet" if host_network else "ClusterFirst"
    check(pod.get("dnsPolicy") == dns, f"agent dnsPolicy {dns}")
    check(pod.get("automountServiceAccountToken") is False, "agent has no API token")
    if "tolerations" not in a:
        check({"operator": "Exists"} in pod.get("tolerations", []), "agent tolerates every taint by default")
    (agent,) = [c for c in pod["containers"] if c["name"] == "agent"]
    (init,) = pod["initContainers"]
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    check(ports == {"grpc": a.get("grpcPort", 7443), "metrics": a.get("metricsPort", 9464)}, f"agent ports {ports}")
    args = agent["args"]
    check(f"--kubelet-root={kubelet_root}" in args, "agent --kubelet-root")
    check(f"--metrics-listen=0.0.0.0:{a.get('metricsPort', 9464)}" in args, "agent metrics on 0.0.0.0")
    for c in (agent, init):
        env = {e["name"]: e for e in c.get("env", [])}
        check(env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", "NODE_NAME from the downward API")
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    km = mounts["kubelet-pods"]
    check(km["mountPath"] == kubelet_root and km["mountPropagation"] == "HostToContainer", "kubelet dir mount")
    check(km["readOnly"] is (not restore), f"kubelet dir readOnly={not restore}")
    check(("--backup-only" in args) is (not restore), f"agent --backup-only is {not restore}")
    vols = {v["name"]: v for v in pod["volumes"]}
    check(vols["kubelet-pods"]["hostPath"]["path"] == kubelet_root, "hostPath is agent.kubeletRoot")
    check("agent-ca" not in mounts, "the agent container never mounts the agent CA key")
    check(any(m["name"] == "agent-ca" for m in init["volumeMounts"]), "the init container mounts the agent CA")
    check(vols["tls"]["emptyDir"].get("medium") == "Memory", "node certificate lives in memory")
    check(init["command"] == ["hoard-agent-cert"], "init container runs hoard-agent-cert")
    sc = agent["securityContext"]
    check(sc["readOnlyRootFilesystem"] is True, "agent read-only root filesystem")
    if privileged:
        check(sc.get("privileged") is True and "capabilities" not in sc, "privileged agent")
    else:
        caps = sc["capabilities"]
        check(caps["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False, "agent drops all")
        want = {"DAC_READ_SEARCH"} | ({"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "MKNOD", "SETFCAP"} if restore else set())
        check(set(caps["add"]) == want, f"agent capabilities {caps['add']} != {sorted(want)}")
        check("privileged" not in sc, "not privileged")
    if a.get("extraVolumes"):
        for v in a["extraVolumes"]:
            check(v["name"] in vols, f"extra volume {v['name']}")
        for m in a.get("extraVolumeMounts", []):
            check(m["name"] in mounts, f"extra mount {m['name']}")
    dep = find(docs, "Deployment", "-controller")
    cpod = dep["spec"]["template"]["spec"]
    (ctl,) = cpod["containers"]
    csc = ctl["securityContext"]
    check(cpod["securityContext"]["runAsNonRoot"] is True and csc["readOnlyRootFilesystem"] is True, "controller non-root, read-only root")
    c = values.get("controller", {})
    check(cpod.get("hostNetwork", False) is c.get("hostNetwork", False), "controller hostNetwork as set")
    metrics = c.get("metricsPort", 8080)
    check({p["name"]: p["containerPort"] for p in ctl["ports"]} == {"metrics": metrics}, "controller metrics port")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        check(ctl[probe]["httpGet"]["path"] == path and ctl[probe]["httpGet"]["port"] == "metrics", f"controller {probe}")
    check("--leader-elect=true" in ctl["args"], "leader election on")
    admin = [x.split("=", 1)[1] for x in ctl["args"] if x.startswith("--admin-namespace=")]
    check(admin == c.get("adminNamespaces", []), f"controller --admin-namespace {admin}")
    sel = [x for x in ctl["args"] if x.startswith("--agent-selector=")]
    check(sel and "app.kubernetes.io/name=hoard-agent" in sel[0], "controller finds agents by label")
    agent_secret = [v for v in pod["volumes"] if v["name"] == "agent-ca"][0]["secret"]["secretName"]
    ctl_secret = [v for v in cpod["volumes"] if v["name"] == "tls"][0]["secret"]["secretName"]
    check(agent_secret != ctl_secret, "two TLS Secrets")
    if values.get("networkPolicy", {}).get("enabled", True):
        np = find(docs, "NetworkPolicy", "-agent")
        grpc_rules = [r for r in np["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"])]
        check(len(grpc_rules) == 1, "one rule for the gRPC port")
        peers = grpc_rules[0]["from"]
        check(len(peers) == 1 and peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "hoard-controller"
              and "namespaceSelector" not in peers[0], "only the controller reaches gRPC")
    else:
        check(not [d for d in docs if d.get("kind") == "NetworkPolicy"], "no NetworkPolicy when disabled")
    print(f"  assertions ok ({rendered})")


# Which Dockerfile builds the image of each workload's containers (docs/install.md).
IMAGE_DOCKERFILES = {("Deployment", "-controller"): "images/hoard-controller.Dockerfile",
                     ("DaemonSet", "-agent"): "images/hoard-agent.Dockerfile"}
# What the downward API would put into the env vars the chart takes from fieldRefs.
FIELD_PLACEHOLDERS = {"spec.nodeName": "node-a", "metadata.name": "pod-0"}


def dockerfile_runtime(path):
    """(ENTRYPOINT list, {binary name: installed path}) of the last stage of a Dockerfile."""
    with open(path) as f:
        text = f.read()
    last = text[text.rindex("\nFROM "):]
    entry = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", last, re.M)
    if len(entry) != 1:
        fail(f"{path}: the runtime stage needs exactly one exec-form ENTRYPOINT")
    installed = {os.path.basename(dst): dst for dst in re.findall(r"^COPY\s+--from=\S+\s+\S+\s+(\S+)\s*$", last, re.M)}
    return json.loads(entry[0]), installed


def expand(arg, env):
    """Kubernetes' $(VAR) expansion of command/args ($$ escapes); an undefined VAR is an error
    here (Kubernetes would pass it on literally, which is never what the chart means)."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        if m.group(1) not in env:
            fail(f"{arg!r} refers to $({m.group(1)}), which the container does not define")
        return env[m.group(1)] or "unknown"
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def container_env(c, namespace):
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = namespace if path == "metadata.namespace" else FIELD_PLACEHOLDERS.get(path, "field")
        else:
            # From a Secret or ConfigMap (user's extraEnv): the value is not known here.
            env[e["name"]] = None
    return env


def rendered_invocations(rendered, repo):
    """Every container of the controller Deployment and the agent DaemonSet as
    (label, binary, argv after the binary, env), the binary resolved as the runtime would:
    `command` if set (a bare name must be installed by the image), else the image's ENTRYPOINT."""
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    out = []
    for (kind, suffix), dockerfile in IMAGE_DOCKERFILES.items():
        wl = find(docs, kind, suffix)
        entry, installed = dockerfile_runtime(os.path.join(repo, dockerfile))
        pod = wl["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            env = container_env(c, wl["metadata"]["namespace"])
            argv = c.get("command") or entry
            prog = os.path.basename(argv[0])
            if installed.get(prog) not in (argv[0], f"/usr/local/bin/{prog}"):
                fail(f"{kind} {wl['metadata']['name']} container {c['name']} runs {argv[0]!r}, "
                     f"which {dockerfile} does not install (it installs {sorted(installed.values())})")
            args = argv[1:] + [expand(a, env) for a in c.get("args", [])]
            out.append((f"{kind}/{wl['metadata']['name']} {c['name']}", prog, args, env))
    return out


def help_of(binary):
    """(flags that take values: {flag: env var or None}, required flags) from `BINARY --help`."""
    r = subprocess.run([binary, "--help"], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        fail(f"{binary} --help exited {r.returncode}: {r.stderr}")
    flags, current = {}, None
    for line in r.stdout.splitlines():
        m = re.match(r"^\s+(?:-\w, )?--([a-z0-9-]+)", line)
        if m:
            current = m.group(1)
            flags[current] = None
        e = re.search(r"\[env: ([A-Z0-9_]+)=", line)
        if e and current:
            flags[current] = e.group(1)
    usage = r.stdout.split("Usage:", 1)[1].split("\n\n", 1)[0]
    required = set(re.findall(r"(?<![\[\w])--([a-z0-9-]+) <", usage))
    return flags, required


def help_default(binary, flag):
    """The `[default: ...]` of --FLAG in `BINARY --help`."""
    r = subprocess.run([binary, "--help"], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    text = r.stdout.split(f"--{flag} ", 1)[1].split("\n  -", 1)[0]
    m = re.search(r"\[default: ([^\]]*)\]", text)
    if not m:
        fail(f"{binary} --help shows no default for --{flag}")
    return m.group(1)


def run_parse(binary, args):
    """Exit code of BINARY ARGS --help in an empty environment: clap parses (and validates)
    every argument before it acts on --help, so a flag the binary does not know or a value it
    cannot parse exits 64 (the binaries' code for bad usage), and 0 means all were accepted."""
    r = subprocess.run([binary, *args, "--help"], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    return r.returncode, r.stderr.strip()


def checked_args(label, binary, args, env):
    """The argv to parse for one container: its args, plus each env var the binary reads
    through clap turned into its flag (so the chart's env values are parsed too). Fails on a
    required flag given neither way, and on a chart-set variable the binary never reads."""
    flags, required = help_of(binary)
    by_env = {v: k for k, v in flags.items() if v}
    given = {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}
    extra = []
    with open(binary, "rb") as f:
        image = f.read()
    for name, value in env.items():
        if name in by_env:
            if by_env[name] not in given and value is not None:
                extra.append(f"--{by_env[name]}={value}")
        elif f"$({name})" in " ".join(args):
            pass
        elif name.encode() not in image:
            fail(f"{label}: sets env {name}, which {os.path.basename(binary)} never reads")
    missing = sorted(required - given - {by_env[n] for n in env if n in by_env})
    if missing:
        fail(f"{label}: required flags not given (nor by env): {missing}")
    return args + extra


def args_check(rendered, bindir, repo):
    for label, prog, args, env in rendered_invocations(rendered, repo):
        binary = os.path.join(bindir, prog)
        argv = checked_args(label, binary, args, env)
        rc, err = run_parse(binary, argv)
        if rc != 0:
            fail(f"{label}: {prog} refuses the chart's arguments (exit {rc}): {err}\n  argv: {argv}")
        print(f"  {label}: {prog} accepts {len(argv)} arguments")
        if prog == "hoard-controller":
            # The restore helper pod runs this image (--helper-image) with --helper-args.
            given = [a.split("=", 1)[1] for a in argv if a.startswith("--helper-args=")]
            helper = given[-1] if given else help_default(binary, "helper-args")
            rc, err = run_parse(binary, shlex.split(helper))
            if rc != 0:
                fail(f"{label}: the helper pod's arguments {helper!r} are refused (exit {rc}): {err}")
            print(f"  {label}: the restore helper pod's arguments {helper!r} parse too")


TYPED_VALUE = re.compile(r"^(\d+|true|false|text|json|[0-9.]+:\d+)$")


def args_probe(rendered, bindir, repo):
    """The --help trick must catch what it is relied on for: per binary, an unknown flag, and
    each rendered typed value (numbers, booleans, addresses, enums) replaced by garbage."""
    for label, prog, args, env in rendered_invocations(rendered, repo):
        binary = os.path.join(bindir, prog)
        argv = checked_args(label, binary, args, env)
        rc, err = run_parse(binary, argv + ["--hoard-no-such-flag"])
        if rc != 64 or "--hoard-no-such-flag" not in err:
            fail(f"{label}: an unknown flag was not refused (exit {rc}): {err}")
        typed = [i for i, a in enumerate(argv) if a.startswith("--") and "=" in a and TYPED_VALUE.match(a.split("=", 1)[1])]
        if not typed:
            fail(f"{label}: no typed value to probe")
        for i in typed:
            bad = argv[:i] + [argv[i].split("=", 1)[0] + "=not-a-value"] + argv[i + 1:]
            rc, err = run_parse(binary, bad)
            if rc != 64:
                fail(f"{label}: {bad[i]} was not refused (exit {rc})")
        print(f"  {label}: an unknown flag and {len(typed)} bad values are refused (exit 64)")


# What gcr.io/distroless/cc-debian12 provides to dynamically linked binaries.
DISTROLESS_CC_LIBS = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1",
                      "libstdc++.so.6", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
# The UID each image runs as must be the one the chart runs its pods as (0: the agent).
IMAGE_USERS = {"hoard-controller": "65532:65532", "hoard-agent": "0:0", "hoard": "65532:65532"}


def needed_libs(binary):
    r = subprocess.run(["readelf", "-d", binary], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        fail(f"readelf -d {binary}: {r.stderr}")
    return set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout))


def dockerfiles(repo, bindir):
    """images/*.Dockerfile: multi-stage; the runtime stage is distroless (nothing but COPY,
    LABEL, USER, ENTRYPOINT: it has no shell to RUN anything), runs as the user the chart
    expects, installs every binary it builds, and each of those (as built here) links only
    libraries the distroless cc image has."""
    for name, user in IMAGE_USERS.items():
        path = os.path.join(repo, "images", f"{name}.Dockerfile")
        with open(path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        # Continuation lines belong to their instruction.
        instrs, cur = [], ""
        for ln in lines:
            cur += ln.rstrip("\\") + " "
            if not ln.rstrip().endswith("\\"):
                instrs.append(cur.strip())
                cur = ""
        froms = [i for i, x in enumerate(instrs) if x.split()[0].upper() == "FROM"]
        check(len(froms) >= 2, f"{path}: not multi-stage")
        runtime = instrs[froms[-1]:]
        base = runtime[0].split()[1]
        want_base = "gcr.io/distroless/cc-debian12" + (":nonroot" if user != "0:0" else "")
        check(base == want_base, f"{path}: runtime base {base} != {want_base}")
        kinds = {x.split()[0].upper() for x in runtime[1:]}
        check(kinds <= {"COPY", "LABEL", "USER", "ENTRYPOINT", "ENV"}, f"{path}: runtime stage runs {sorted(kinds)}")
        check(f"USER {user}" in runtime, f"{path}: runtime user is not {user}")
        build = " ".join(instrs[:froms[-1]])
        bins = re.findall(r"--bin ([a-z-]+)", build)
        check(bins, f"{path}: builds no binary")
        entry, installed = dockerfile_runtime(path)
        linked = set()
        for b in bins:
            check(installed.get(b) == f"/usr/local/bin/{b}", f"{path}: {b} is built but not installed in /usr/local/bin")
            libs = needed_libs(os.path.join(bindir, b))
            linked |= libs
            extra = sorted(libs - DISTROLESS_CC_LIBS)
            check(not extra, f"{b} links {extra}, which {base} does not have")
        check(entry == [f"/usr/local/bin/{bins[0]}"], f"{path}: ENTRYPOINT {entry}")
        print(f"  {path}: {base}, user {user}, {', '.join(bins)} (they link {', '.join(sorted(linked))})")


APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def plugin_manifest(repo, manifest=None):
    """plugins/hoard.yaml (krew): its version is the workspace's, every platform's uri names
    that version, `bin` is a file the archive ships, and every shipped file exists here:
    LICENSE at the repository root, kubectl-hoard as a binary target of the cli package."""
    import tomllib

    with open(os.path.join(repo, "Cargo.toml"), "rb") as f:
        version = tomllib.load(f)["workspace"]["package"]["version"]
    with open(os.path.join(repo, "cli", "Cargo.toml"), "rb") as f:
        cli_bins = {b["name"] for b in tomllib.load(f).get("bin", [])}
    with open(manifest or os.path.join(repo, "plugins", "hoard.yaml")) as f:
        m = yaml.safe_load(f)
    check(m["kind"] == "Plugin" and m["metadata"]["name"] == "hoard", "plugins/hoard.yaml is the krew Plugin hoard")
    check(m["spec"]["version"] == f"v{version}", f"plugin version {m['spec']['version']} != v{version} (Cargo.toml)")
    platforms = m["spec"]["platforms"]
    check(platforms, "no platforms")
    for p in platforms:
        sel = p["selector"]["matchLabels"]
        check(f"/v{version}/" in p["uri"] and f"_v{version}_{sel['os']}_{sel['arch']}." in p["uri"],
              f"uri {p['uri']} does not name v{version} and {sel}")
        check(re.fullmatch(r"[0-9a-f]{64}", p["sha256"]) is not None, f"sha256 {p['sha256']!r}")
        shipped = {f["from"] for f in p["files"]}
        check(p["bin"] in shipped, f"bin {p['bin']} is not among the shipped files {sorted(shipped)}")
        for name in shipped:
            if name in cli_bins:
                continue
            check(os.path.isfile(os.path.join(repo, name)), f"plugins/hoard.yaml ships {name}, which does not exist")
    # The exact text of apache.org/licenses/LICENSE-2.0.txt (Debian ships the same file as
    # /usr/share/common-licenses/Apache-2.0): an edited licence is not Apache-2.0.
    with open(os.path.join(repo, "LICENSE"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    check(digest == APACHE_2_0_SHA256, f"LICENSE is not the exact Apache License 2.0 text (sha256 {digest})")
    print(f"  plugins/hoard.yaml: v{version}, {len(platforms)} platforms, every shipped file exists")


def notes(chart, rendered, values, release=RELEASE, namespace=NAMESPACE):
    """NOTES.txt as `helm install` prints it: every indented `kubectl ...` line is a command.
    `rollout status KIND/NAME` cannot finish without nodes, so its object must be in the
    render instead; the other commands are printed, one a line, for the caller to run."""
    with helm.Chart.load(chart) as c:
        docs = c.render(values, name=release, namespace=namespace, is_install=True)
    text = next(t for p, t in docs.items() if p.endswith("NOTES.txt"))
    with open(rendered) as f:
        objs = {f"{d['kind'].lower()}/{d['metadata']['name']}" for d in yaml.safe_load_all(f) if d}
    cmds = [ln.strip() for ln in text.splitlines() if ln.startswith("     kubectl ")]
    check(cmds, "NOTES.txt shows no kubectl command")
    for cmd in cmds:
        argv = shlex.split(cmd)
        if argv[1:3] == ["-n", namespace] and argv[3:5] == ["rollout", "status"]:
            check(argv[5] in objs, f"NOTES.txt: {cmd}: {argv[5]} is not rendered")
            print(f"  NOTES: {argv[5]} exists in the render", file=sys.stderr)
        else:
            print(cmd)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "lint":
        lint(args[0])
    elif cmd == "render":
        ns = args[3] if len(args) > 3 else NAMESPACE
        render(args[0], args[1], load_values(args[2] if len(args) > 2 else None), namespace=ns)
    elif cmd == "refuse":
        refuse(args[0], load_values(args[1]))
    elif cmd == "rbac":
        rbac(args[0], args[1])
    elif cmd == "secrets":
        secrets(args[0], args[1])
    elif cmd == "helm-cmd":
        helm_cmd(args[0], args[1], args[2])
    elif cmd == "doc-values":
        doc_values(args[0], args[1], args[2])
    elif cmd == "assert":
        assert_render(args[0], load_values(args[1] if len(args) > 1 else None))
    elif cmd == "args-check":
        args_check(args[0], args[1], args[2])
    elif cmd == "args-probe":
        args_probe(args[0], args[1], args[2])
    elif cmd == "dockerfiles":
        dockerfiles(args[0], args[1])
    elif cmd == "plugin-manifest":
        plugin_manifest(args[0], args[1] if len(args) > 1 else None)
    elif cmd == "notes":
        notes(args[0], args[1], load_values(args[2] if len(args) > 2 else None))
    elif cmd == "doc-commands":
        for c in doc_commands(args[0]):
            print(c)
    else:
        fail(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main()
