"""Our own policy over the rendered K3s manifests (kubectl kustomize k8s/overlays/X): what
kubernetes-validate and checkov cannot know about this design.

  k8s_policy.py RENDERED.yaml OVERLAY          check; print each problem, exit 1 if any
  k8s_policy.py --self-test RENDERED.yaml      break the manifests in each way the checks
                                               exist for; exit 1 unless every break is caught

Checked:
- every workload: liveness, readiness and startup probes on a port the container declares;
  requests and limits for CPU and memory (init containers too); non-root, seccomp
  RuntimeDefault, no privilege escalation, read-only root filesystem, all capabilities dropped;
  no host network/PID/paths except node-exporter; its own ServiceAccount, no token mounted
  unless it needs the API (prometheus-adapter); Deployments roll with maxUnavailable 0 and
  have a PodDisruptionBudget;
- the design's resource table (gpu and hybrid overlays; the cpu overlay must give more);
- NetworkPolicies: every namespace denies by default, and the paths the policies open are
  exactly those in k8s/policy/paths.yaml (nothing missing, nothing more);
- ports: what each binary is told to listen on = its containerPort = its probes' port = the
  Services' targetPorts = the Prometheus scrape config's ports; LiveKit's config = its Service;
- the custom resources (K3s HelmChart, Traefik IngressRoute and Middleware), which have no
  schema in kubernetes-validate: apiVersion, kind and the fields their controllers need.
"""
import copy
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
# Workloads that may read the host (namespace node-exporter is privileged for it).
HOST_ACCESS = {"node-exporter"}
# Workloads that need the Kubernetes API and so a token.
API_CLIENTS = {"prometheus-adapter"}
# requests cpu, limits cpu, requests memory, limits memory: the design's table.
TABLE = {
    "agent": ("2", "4", "8Gi", "12Gi"),
    "livekit": ("1", "2", "1Gi", "2Gi"),
    "whisper": ("2", "4", "4Gi", "8Gi"),
    "kokoro": ("2", "4", "4Gi", "8Gi"),
    "ollama": ("4", "8", "16Gi", "24Gi"),
}


def quantity(q):
    """CPU cores or bytes of a Kubernetes quantity."""
    q = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for u, f in units.items():
        if q.endswith(u):
            return float(q[: -len(u)]) * f
    return float(q)


def name_of(doc):
    return doc["metadata"]["name"]


def ns_of(doc):
    return doc["metadata"].get("namespace", "")


def app_label(labels):
    labels = labels or {}
    return labels.get("app.kubernetes.io/name") or labels.get("app") or labels.get("k8s-app")


def check_workloads(docs, overlay):
    problems = []
    sas = {(ns_of(d), name_of(d)): d for d in docs if d["kind"] == "ServiceAccount"}
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    used_sas = {}
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        wn, ns = name_of(w), ns_of(w)
        where = f"{w['kind']} {ns}/{wn}"
        pod = w["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        if psc.get("runAsUser") == 0:
            problems.append(f"{where}: runs as root (runAsUser 0)")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
        if wn not in HOST_ACCESS:
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                if pod.get(key):
                    problems.append(f"{where}: {key} is set")
            for v in pod.get("volumes", []):
                if "hostPath" in v:
                    problems.append(f"{where}: hostPath volume {v['name']}")
        sa = pod.get("serviceAccountName")
        if sa != wn:
            problems.append(f"{where}: ServiceAccount is {sa!r}, not its own ({wn!r})")
        elif (ns, sa) not in sas:
            problems.append(f"{where}: ServiceAccount {sa} is not defined")
        used_sas.setdefault((ns, sa), []).append(wn)
        token = pod.get("automountServiceAccountToken")
        if wn in API_CLIENTS:
            if token is False:
                problems.append(f"{where}: needs the API but mounts no token")
        elif token is not False:
            problems.append(f"{where}: mounts a ServiceAccount token it does not need")
        if w["kind"] == "Deployment":
            strategy = w["spec"].get("strategy", {})
            if strategy.get("type") != "RollingUpdate" or strategy.get("rollingUpdate", {}).get(
                "maxUnavailable"
            ) != 0:
                problems.append(f"{where}: updates are not rolling with maxUnavailable 0")
            labels = w["spec"]["template"]["metadata"]["labels"]
            if not any(
                ns_of(p) == ns
                and all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())
                for p in pdbs
            ):
                problems.append(f"{where}: no PodDisruptionBudget")
        for kind, containers in (("container", pod["containers"]), ("init container", pod.get("initContainers", []))):
            for c in containers:
                cw = f"{where} {kind} {c['name']}"
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    for r in ("cpu", "memory"):
                        if r not in res.get(part, {}):
                            problems.append(f"{cw}: no {part}.{r}")
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{cw}: allowPrivilegeEscalation is not false")
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{cw}: root filesystem is not read-only")
                if sc.get("privileged"):
                    problems.append(f"{cw}: privileged")
                if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
                    problems.append(f"{cw}: runs as root")
                caps = sc.get("capabilities", {})
                if caps.get("drop") != ["ALL"] or caps.get("add"):
                    problems.append(f"{cw}: capabilities are not all dropped")
                if kind == "container":
                    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                        p = c.get(probe)
                        if not p:
                            problems.append(f"{cw}: no {probe}")
                            continue
                        port = (p.get("httpGet") or p.get("tcpSocket") or {}).get("port")
                        if port not in ports and port not in ports.values():
                            problems.append(f"{cw}: {probe} port {port!r} is not a declared port")
                    problems += check_listen(cw, c, ports)
        if overlay in ("gpu", "hybrid") and wn in TABLE:
            res = pod["containers"][0]["resources"]
            got = tuple(
                str(res.get(part, {}).get(r))
                for part, r in (("requests", "cpu"), ("limits", "cpu"), ("requests", "memory"), ("limits", "memory"))
            )
            if got != TABLE[wn]:
                problems.append(f"{where}: resources {got} are not the design's {TABLE[wn]}")
        if overlay == "cpu" and wn in ("agent", "ollama", "whisper", "kokoro"):
            res = pod["containers"][0]["resources"]
            want = TABLE[wn]
            if quantity(res.get("requests", {}).get("cpu", 0)) <= quantity(want[0]) or quantity(
                res.get("limits", {}).get("memory", 0)
            ) <= quantity(want[3]):
                problems.append(f"{where}: the cpu overlay gives it no more CPU and memory")
        if overlay == "cpu" and (pod.get("runtimeClassName") or "nvidia.com/gpu" in str(pod)):
            problems.append(f"{where}: asks for the GPU in the cpu overlay")
    for (ns, sa), users in used_sas.items():
        if len(users) > 1:
            problems.append(f"ServiceAccount {ns}/{sa} is shared by {users}")
    return problems


LISTEN = [
    re.compile(r"^--(?:listen|http|web\.listen-address)=(?:[\d.]*|\[::\]):(\d+)$"),
    re.compile(r"^--secure-port=(\d+)$"),
]


def check_listen(where, c, ports):
    """The port the program is told to listen on is the port the container declares."""
    told = []
    for a in c.get("args", []):
        for r in LISTEN:
            m = r.match(a)
            if m:
                told.append(int(m.group(1)))
    for e in c.get("env", []):
        if e["name"] == "OLLAMA_HOST" and "value" in e:
            told.append(int(e["value"].rsplit(":", 1)[1]))
        if e["name"] == "GF_SERVER_HTTP_PORT":
            told.append(int(e["value"]))
    if "--config" in c.get("args", []):  # LiveKit: checked against its config file
        return []
    if not told:
        return [f"{where}: no listen address in its arguments, so its port is unchecked"]
    return [
        f"{where}: listens on {p}, but declares ports {sorted(ports.values())}"
        for p in told
        if p not in ports.values()
    ]


def pods_of(docs, ns, selector):
    for w in docs:
        if w["kind"] in WORKLOADS and ns_of(w) == ns:
            labels = w["spec"]["template"]["metadata"]["labels"]
            if all(labels.get(k) == v for k, v in selector.items()):
                yield w


def check_services(docs):
    problems = []
    for s in (d for d in docs if d["kind"] == "Service"):
        where = f"Service {ns_of(s)}/{name_of(s)}"
        sel = s["spec"].get("selector")
        if not sel:
            continue
        pods = list(pods_of(docs, ns_of(s), sel))
        if not pods:
            problems.append(f"{where}: selects no workload")
            continue
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            for w in pods:
                declared = {
                    (cp.get("name"), cp["containerPort"])
                    for c in w["spec"]["template"]["spec"]["containers"]
                    for cp in c.get("ports", [])
                }
                ok = any(target in (n, num) for n, num in declared)
                is_livekit_udp = p["protocol"] == "UDP" and name_of(w) == "livekit"
                if not ok and not is_livekit_udp:
                    problems.append(f"{where}: targetPort {target} is no port of {name_of(w)}")
    return problems


def configmap_file(docs, name, key):
    for d in docs:
        # configMapGenerator appends a content hash to the name.
        generated = name_of(d) == name or name_of(d).startswith(name + "-")
        if d["kind"] == "ConfigMap" and generated and key in d.get("data", {}):
            return yaml.safe_load(d["data"][key])
    raise KeyError(f"ConfigMap {name} with {key}")


def check_scrape_and_livekit(docs):
    problems = []
    prom = configmap_file(docs, "prometheus-config", "prometheus.yml")
    services = {
        (name_of(s), ns_of(s)): s for s in docs if s["kind"] == "Service"
    }
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                svc, ns = host.split(".")[:2]
                s = services.get((svc, ns))
                if s is None:
                    if ns == "gpu-operator":
                        continue  # made by the GPU operator's chart, not by us
                    problems.append(f"scrape job {job['job_name']}: no Service {ns}/{svc}")
                    continue
                if s["spec"].get("clusterIP") != "None":
                    problems.append(f"scrape job {job['job_name']}: {ns}/{svc} is not headless")
                if sd["port"] not in [p["port"] for p in s["spec"]["ports"]]:
                    problems.append(
                        f"scrape job {job['job_name']}: port {sd['port']} is not a port of {ns}/{svc}"
                    )
    lk = configmap_file(docs, "livekit-config", "livekit.yaml")
    svc = services[("livekit", "voice-ai")]
    ports = {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]}
    want = {(lk["port"], "TCP"), (lk["rtc"]["tcp_port"], "TCP")} | {
        (p, "UDP") for p in range(lk["rtc"]["port_range_start"], lk["rtc"]["port_range_end"] + 1)
    }
    if ports != want:
        problems.append(
            f"LiveKit's Service ports differ from its config: missing {sorted(want - ports)}, extra {sorted(ports - want)}"
        )
    metrics = services[("livekit-metrics", "voice-ai")]
    if lk["prometheus_port"] not in [p["port"] for p in metrics["spec"]["ports"]]:
        problems.append("LiveKit's prometheus_port is not the livekit-metrics Service's port")
    return problems


def peer_name(peer, own_ns):
    if "ipBlock" in peer:
        return "internet" if peer["ipBlock"].get("except") else "anywhere"
    ns = own_ns
    if "namespaceSelector" in peer:
        ns = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name", "*")
    pods = peer.get("podSelector")
    app = app_label(pods.get("matchLabels")) if pods and pods.get("matchLabels") else "*"
    return f"{ns}/{app}"


def port_names(ports):
    if not ports:
        return ["any"]
    out = []
    for p in ports:
        proto = p.get("protocol", "TCP")
        if "port" not in p:
            out.append(proto)
        elif "endPort" in p:
            out.append(f"{p['port']}-{p['endPort']}/{proto}")
        else:
            out.append(f"{p['port']}/{proto}")
    return out


def opened_paths(docs):
    """(from, to, port) -> the sides whose policies open it: {"ingress", "egress"}."""
    paths = {}
    for p in (d for d in docs if d["kind"] == "NetworkPolicy"):
        ns = ns_of(p)
        sel = p["spec"]["podSelector"].get("matchLabels")
        me = f"{ns}/{app_label(sel) if sel else '*'}"
        for rule in p["spec"].get("ingress", []):
            for peer in rule.get("from", [{}]):
                for port in port_names(rule.get("ports")):
                    paths.setdefault((peer_name(peer, ns), me, port), set()).add("ingress")
        for rule in p["spec"].get("egress", []):
            for peer in rule.get("to", [{}]):
                for port in port_names(rule.get("ports")):
                    paths.setdefault((me, peer_name(peer, ns), port), set()).add("egress")
    return paths


def check_network(docs):
    problems = []
    namespaces = {name_of(d) for d in docs if d["kind"] == "Namespace"}
    for ns in sorted(namespaces):
        if not any(
            d["kind"] == "NetworkPolicy"
            and ns_of(d) == ns
            and d["spec"]["podSelector"] == {}
            and set(d["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not d["spec"].get("ingress")
            and not d["spec"].get("egress")
            for d in docs
        ):
            problems.append(f"namespace {ns}: no default-deny NetworkPolicy")
    design = yaml.safe_load((ROOT / "k8s/policy/paths.yaml").read_text())["paths"]

    def ours(end):
        return end.split("/")[0] in namespaces

    want = {}
    for p in design:
        if not (ours(p["from"]) or ours(p["to"])):
            continue  # e.g. the GPU operator's paths where there is no operator
        # A path between two of our namespaces needs both sides; one with an outside end
        # (anywhere, the internet, kube-system) only ours.
        if "sides" in p:
            sides = {p["sides"]}
        else:
            sides = {s for s, end in (("egress", p["from"]), ("ingress", p["to"])) if ours(end)}
        for port in p["ports"]:
            want[(p["from"], p["to"], port)] = sides
    got = opened_paths(docs)
    for path in sorted(set(got) - set(want)):
        problems.append(f"NetworkPolicies open a path the design does not list: {path[0]} -> {path[1]} {path[2]}")
    for path, sides in sorted(want.items()):
        if path not in got:
            problems.append(f"the design's path is not opened: {path[0]} -> {path[1]} {path[2]}")
        elif not sides <= got[path]:
            problems.append(
                f"the design's path {path[0]} -> {path[1]} {path[2]} is opened only by the {'/'.join(sorted(got[path]))} side"
            )
    return problems


# The custom resources kubernetes-validate has no schema for: apiVersion, kind, and the fields
# their controllers (K3s's Helm controller, Traefik) need.
CUSTOM = {
    ("helm.cattle.io/v1", "HelmChart"),
    ("traefik.io/v1alpha1", "IngressRoute"),
    ("traefik.io/v1alpha1", "Middleware"),
}
MIDDLEWARES = {"headers", "redirectScheme", "rateLimit", "ipAllowList", "basicAuth", "compress"}


def check_custom(docs):
    problems = []
    namespaces = {name_of(d) for d in docs if d["kind"] == "Namespace"}
    services = {(ns_of(d), name_of(d)): d for d in docs if d["kind"] == "Service"}
    middlewares = {(ns_of(d), name_of(d)) for d in docs if d["kind"] == "Middleware"}
    for d in docs:
        if "/" not in d["apiVersion"] or d["apiVersion"].split("/")[0].endswith(".k8s.io") or (
            d["apiVersion"].split("/")[0] in ("apps", "policy", "autoscaling", "batch")
        ):
            continue
        where = f"{d['kind']} {ns_of(d)}/{name_of(d)}"
        if (d["apiVersion"], d["kind"]) not in CUSTOM:
            problems.append(f"{where}: {d['apiVersion']} {d['kind']} is not a custom resource we check")
            continue
        spec = d.get("spec") or {}
        if d["kind"] == "HelmChart":
            if ns_of(d) not in namespaces | {"kube-system"}:
                problems.append(f"{where}: its namespace is not created")
            for key in ("chart", "repo", "version", "targetNamespace"):
                if not isinstance(spec.get(key), str) or not spec[key]:
                    problems.append(f"{where}: spec.{key} is missing")
            if not str(spec.get("repo", "")).startswith("https://"):
                problems.append(f"{where}: spec.repo is not an https URL")
            if spec.get("targetNamespace") not in namespaces:
                problems.append(f"{where}: targetNamespace {spec.get('targetNamespace')} is not created")
            try:
                if not isinstance(yaml.safe_load(spec.get("valuesContent", "{}")), dict):
                    problems.append(f"{where}: valuesContent is not a mapping")
            except yaml.YAMLError as e:
                problems.append(f"{where}: valuesContent is not YAML: {e}")
        elif d["kind"] == "IngressRoute":
            if not spec.get("entryPoints"):
                problems.append(f"{where}: no entryPoints")
            if not spec.get("tls", {}).get("secretName"):
                problems.append(f"{where}: no TLS secret")
            for r in spec.get("routes") or [None]:
                if not r or r.get("kind") != "Rule" or not r.get("match"):
                    problems.append(f"{where}: a route without kind Rule and a match")
                    continue
                for m in r.get("middlewares", []):
                    if (m.get("namespace", ns_of(d)), m["name"]) not in middlewares:
                        problems.append(f"{where}: middleware {m['name']} does not exist")
                for sv in r.get("services") or [None]:
                    s = sv and services.get((ns_of(d), sv.get("name")))
                    if not s or sv.get("port") not in [p["port"] for p in s["spec"]["ports"]]:
                        problems.append(f"{where}: route to {sv} is no Service port")
        elif d["kind"] == "Middleware":
            kinds = set(spec) & MIDDLEWARES
            if len(kinds) != 1 or set(spec) - MIDDLEWARES:
                problems.append(f"{where}: spec must hold exactly one middleware, has {sorted(spec)}")
    return problems


def check(docs, overlay):
    return (
        check_workloads(docs, overlay)
        + check_services(docs)
        + check_scrape_and_livekit(docs)
        + check_network(docs)
        + check_custom(docs)
    )


def load(path):
    return [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and name_of(d) == name)


def self_test(path):
    """Each break must be caught: a check that cannot fail proves nothing."""
    base = load(path)
    assert not check(base, "gpu"), "the manifests must pass before they are broken"

    def agent(docs):
        return find(docs, "Deployment", "agent")["spec"]["template"]["spec"]

    breaks = {
        "root container": lambda d: agent(d)["containers"][0]["securityContext"].update(runAsUser=0),
        "no readiness probe": lambda d: agent(d)["containers"][0].pop("readinessProbe"),
        "no memory limit": lambda d: agent(d)["containers"][0]["resources"]["limits"].pop("memory"),
        "writable root": lambda d: agent(d)["initContainers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
        "capability added": lambda d: agent(d)["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        "token mounted": lambda d: agent(d).update(automountServiceAccountToken=True),
        "host network": lambda d: agent(d).update(hostNetwork=True),
        "shared ServiceAccount": lambda d: find(d, "Deployment", "kokoro")["spec"]["template"]["spec"].update(serviceAccountName="whisper"),
        "surge-less update": lambda d: find(d, "Deployment", "whisper")["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1),
        "listen port moved": lambda d: agent(d)["containers"][0]["args"].__setitem__(
            agent(d)["containers"][0]["args"].index("--http=0.0.0.0:9090"), "--http=0.0.0.0:9091"
        ),
        "scrape port wrong": lambda d: find(d, "Service", "whisper-metrics")["spec"]["ports"][0].update(port=11436),
        "extra path": lambda d: find(d, "NetworkPolicy", "ollama")["spec"]["ingress"][0]["from"].append(
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kokoro"}}}
        ),
        "missing path": lambda d: find(d, "NetworkPolicy", "whisper")["spec"]["ingress"].pop(0),
        "no default deny": lambda d: d.remove(find(d, "NetworkPolicy", "default-deny")),
        "resources off the table": lambda d: agent(d)["containers"][0]["resources"]["requests"].update(cpu="1"),
        "route to no port": lambda d: find(d, "IngressRoute", "livekit")["spec"]["routes"][0]["services"][0].update(port=7881 + 1),
        "chart without version": lambda d: find(d, "HelmChart", "gpu-operator")["spec"].pop("version"),
        "chart in a namespace nobody makes": lambda d: find(d, "HelmChart", "gpu-operator")["metadata"].update(namespace="gpu"),
        "unknown custom resource": lambda d: d.append(
            {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x", "namespace": "monitoring"}, "spec": {}}
        ),
    }
    missed = []
    for what, brk in breaks.items():
        docs = copy.deepcopy(base)
        brk(docs)
        found = check(docs, "gpu")
        print(f"{what}: {found[0] if found else 'NOT CAUGHT'}")
        if not found:
            missed.append(what)
    if missed:
        print(f"not caught: {missed}")
        sys.exit(1)


def main():
    if sys.argv[1] == "--self-test":
        self_test(sys.argv[2])
        return
    docs = load(sys.argv[1])
    problems = check(docs, sys.argv[2])
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"{sys.argv[2]}: {len(docs)} objects, no problems")


if __name__ == "__main__":
    main()
