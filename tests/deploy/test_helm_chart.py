"""helm/ssd: lint, render several value sets, validate them against the Kubernetes 1.35 schemas,
and check the objects that matter (autoscaling, co-location, probes, GPUs, RBAC, security,
drain, NetworkPolicy, the helm test hook)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from deploy_support import CHART, K8S_VERSION, ROOT, by_kind, labels_match, one, pod_specs

FN = "ssd"  # fullname of release "ssd"
ROLES = ("gateway", "target", "draft")
HEALTH = {"gateway": "ssd.v1.Gateway", "target": "ssd.v1.Target", "draft": "ssd.v1.Draft"}

# name -> --set values; every set is rendered and schema-validated
VALUE_SETS = {
    "cpu-default": (),
    "gpu": ("gpu.enabled=true",),
    "hpa": ("autoscaling.draft.mode=hpa", "autoscaling.target.mode=hpa", "autoscaling.target.cpuUtilization=70",
            "autoscaling.adapterRulesConfigMap=true"),
    "keda": ("autoscaling.draft.mode=keda", "autoscaling.prometheusAddress=http://prometheus.monitoring:9090",
             "autoscaling.extraMatchers=service=~\"ssd-.*\""),
    "external-redis": ("redis.externalUrl=redis://cache.example:6379/0",),
    "redis-secret": ("redis.existingSecret.name=ssd-redis-url", "redis.existingSecret.key=url"),
    "no-redis": ("redis.enabled=false",),
    "jaeger-off-external-otlp": ("jaeger.enabled=false", "telemetry.tracing.otlpEndpoint=http://otel-collector.observability:4317"),
    "tracing-off": ("jaeger.enabled=false", "telemetry.tracing.enabled=false"),
    "servicemonitor": ("telemetry.metrics.serviceMonitor.enabled=true", "telemetry.metrics.serviceMonitor.labels.release=prom"),
    "static-preferred-pvc": ("gateway.discovery=static", "draft.colocation.mode=preferred", "cache.type=pvc",
                             "cache.existingClaim=ssd-cache", "cache.seed=copy", "gateway.pdb.maxUnavailable=50%",
                             "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
                             "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.name=clients"),
    "bf16-plain-kernels": ("engine.dtype=bfloat16", "engine.batchInvariant=false", "engine.adaptive=true",
                           "engine.pMin=0.4"),
    "gateway-auth-tls-cors": ("gateway.auth.apiKeysSecret=ssd-api-keys", "gateway.tls.secretName=ssd-gateway-tls",
                              "gateway.corsOrigins[0]=https://app.example", "gateway.corsOrigins[1]=https://b.example",
                              "gateway.maxHttpConnections=256"),
    "minimal": ("draft.enabled=false", "redis.enabled=false", "jaeger.enabled=false", "networkPolicy.enabled=false",
                "serviceAccount.createRBAC=false", "gateway.discovery=static", "telemetry.metrics.podAnnotations=false"),
}


@pytest.fixture(scope="module")
def sets(render):
    return {name: render(*s) for name, s in VALUE_SETS.items()}


def containers(spec: dict) -> dict[str, dict]:
    return {c["name"]: c for c in spec["containers"]}


def ssd_container(docs, role) -> dict:
    return containers(one(docs, "Deployment", f"{FN}-{role}")["spec"]["template"]["spec"])[role]


def arg(c: dict, flag: str) -> str | None:
    a = c["args"]
    return a[a.index(flag) + 1] if flag in a else None


# ---- lint, render, validate ---------------------------------------------------------------------
def test_helm_lint_strict(helm):
    for extra in ([], ["--set", "gpu.enabled=true,autoscaling.draft.mode=hpa"]):
        r = subprocess.run([helm, "lint", "--strict", str(CHART), "--kube-version", K8S_VERSION, *extra],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "[WARNING]" not in r.stdout and "[ERROR]" not in r.stdout, r.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_value_set_validates_against_k8s_schemas(sets, validate, name):
    docs = sets[name]
    skipped = validate(docs)
    expect = {"keda": ["ScaledObject"], "servicemonitor": ["ServiceMonitor"]}.get(name, [])
    assert sorted(skipped) == expect, f"CRD kinds skipped from schema validation: {skipped}"
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"
    for d in docs:
        assert len(d["metadata"]["name"]) <= 63


def test_validator_is_strict(kv):
    """The schema check is real: an unknown field and a wrong type are both rejected."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 1}], "selecter": {"a": "b"}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "one"}]}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_kubernetes_validate_cli_on_default_render(helm, kv, tmp_path):
    """The same check as CI runs it by hand: kubernetes-validate -k 1.35.0 --strict."""
    out = subprocess.run([helm, "template", "ssd", str(CHART), "--namespace", "ssd"], capture_output=True, text=True,
                         check=True).stdout
    f = tmp_path / "ssd.yaml"
    f.write_text(out)
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "-k", K8S_VERSION, "--strict", "--quiet", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_default_objects(sets):
    docs = sets["cpu-default"]
    kinds = sorted({(d["kind"], d["metadata"]["name"]) for d in docs})
    for role in ROLES:
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"):
            assert (kind, f"{FN}-{role}") in kinds
    for extra in ("redis", "jaeger"):
        assert ("Deployment", f"{FN}-{extra}") in kinds and ("Service", f"{FN}-{extra}") in kinds
    assert not by_kind(docs, "HorizontalPodAutoscaler") and not by_kind(docs, "ScaledObject")


# ---- values and schema --------------------------------------------------------------------------
def test_every_value_key_is_documented():
    """Each key in values.yaml has a `# --` comment block right above it (helm-docs style),
    except the fields of plain Kubernetes data (resources, seccompProfile, capabilities, list items)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("-") or ":" not in s:
            continue
        if lines[i - 1].strip().startswith("#"):
            j = i - 1
            while lines[j - 1].strip().startswith("#"):
                j -= 1
            if not lines[j].strip().startswith("# --"):
                undocumented.append(f"{i + 1}: {s} (comment does not start with '# --')")
            continue
        indent = len(line) - len(line.lstrip())
        j = i - 1
        while j >= 0 and (not lines[j].strip() or lines[j].strip().startswith("#")
                          or len(lines[j]) - len(lines[j].lstrip()) >= indent):
            j -= 1
        parent = lines[j].strip() if j >= 0 else ""
        if parent.startswith("- ") or parent.rstrip(":") in ("resources", "seccompProfile", "capabilities"):
            continue
        undocumented.append(f"{i + 1}: {s}")
    assert not undocumented, "values.yaml keys without a comment:\n" + "\n".join(undocumented)


def test_schema_is_strict_at_component_level():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for comp in ("image", "engine", "gateway", "target", "draft", "gpu", "cache", "redis", "jaeger", "telemetry",
                 "autoscaling", "serviceAccount", "networkPolicy", "tests"):
        assert schema["properties"][comp]["additionalProperties"] is False, comp
    # every top-level key of values.yaml is in the schema and vice versa
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])


@pytest.mark.parametrize("bad, message", [
    ("gateway.replica=2", "replica"),                      # typo
    ("autoscaling.draft.mode=kedaa", "mode"),              # enum
    ("draft.colocation.mode=sometimes", "mode"),
    ("gateway.discovery=dns", "discovery"),
    ("telemetry.metrics.port=0", "port"),
    ("redis.externalUrl=http://x", "externalUrl"),
    ("engine.dtype=float16", "dtype"),
    ("engine.weights=int4", "weights"),
    ("target.maxQueue=-1", "maxQueue"),
    ("engine.pMin=1.5", "pMin"),
    ("engine.pMin=high", "pMin"),
])
def test_schema_rejects_bad_values(render_error, bad, message):
    assert message in render_error(bad)


@pytest.mark.parametrize("role, grace", [("gateway", 30), ("target", 60), ("draft", 30)])
def test_termination_grace_must_cover_the_drain(render_error, role, grace):
    err = render_error(f"{role}.terminationGracePeriodSeconds={grace + 4}")
    assert f"{role}.terminationGracePeriodSeconds" in err and "graceSeconds + 5" in err


def test_keda_needs_a_prometheus_address(render_error):
    assert "prometheusAddress" in render_error("autoscaling.draft.mode=keda")


# ---- services' command lines and drain -----------------------------------------------------------
@pytest.mark.parametrize("name", ["cpu-default", "gpu", "static-preferred-pvc", "redis-secret"])
def test_termination_grace_exceeds_service_grace(sets, name):
    for role in ROLES:
        d = one(sets[name], "Deployment", f"{FN}-{role}")
        spec = d["spec"]["template"]["spec"]
        grace = float(arg(containers(spec)[role], "--grace-s"))
        assert spec["terminationGracePeriodSeconds"] >= grace + 5, role


def test_args_match_ports_and_wiring(sets):
    docs = sets["cpu-default"]
    for role in ROLES:
        c = ssd_container(docs, role)
        assert c["args"][:2] == ["service", role]
        assert "command" not in c, "the image's ENTRYPOINT (ssd) runs the role"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert int(arg(c, "--port")) == ports["grpc"]
        assert int(arg(c, "--metrics-port")) == ports["metrics"] == 9464
        assert arg(c, "--host") == "0.0.0.0"
        env = {e["name"]: e for e in c["env"]}
        assert env["OTEL_SERVICE_NAME"]["value"] == f"ssd-{role}"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == f"http://{FN}-jaeger:4317"
        assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
        for downward in ("NODE_NAME", "POD_NAME", "POD_NAMESPACE"):
            assert "fieldRef" in env[downward]["valueFrom"]
    gw = ssd_container(docs, "gateway")
    assert int(arg(gw, "--http-port")) == 8000
    assert arg(gw, "--discovery") == "kubernetes"
    assert arg(gw, "--k8s-namespace") == "$(POD_NAMESPACE)"
    assert arg(gw, "--target-service") == f"{FN}-target" and arg(gw, "--draft-service") == f"{FN}-draft"
    tgt, drf = ssd_container(docs, "target"), ssd_container(docs, "draft")
    assert arg(tgt, "--draft-address") == f"{FN}-draft:50053"
    for c in (tgt, drf):
        assert arg(c, "--redis-url") == "$(SSD_REDIS_URL)"
        env = {e["name"]: e for e in c["env"]}
        assert env["SSD_REDIS_URL"]["value"] == f"redis://{FN}-redis:6379/0"
    static = ssd_container(sets["static-preferred-pvc"], "gateway")
    assert arg(static, "--targets") == f"{FN}-target:50052" and "--discovery" not in static["args"]
    ext = {e["name"]: e for e in ssd_container(sets["external-redis"], "draft")["env"]}
    assert ext["SSD_REDIS_URL"]["value"] == "redis://cache.example:6379/0"
    assert "Deployment" not in {d["kind"] for d in sets["external-redis"] if d["metadata"]["name"] == f"{FN}-redis"}
    sec = {e["name"]: e for e in ssd_container(sets["redis-secret"], "target")["env"]}
    assert sec["SSD_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "ssd-redis-url", "key": "url"}
    for role in ("target", "draft"):
        assert "--redis-url" not in ssd_container(sets["no-redis"], role)["args"]
    off = {e["name"]: e for e in ssd_container(sets["tracing-off"], "target")["env"]}
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in off and off["OTEL_TRACES_EXPORTER"]["value"] == "none"
    ext = {e["name"]: e for e in ssd_container(sets["jaeger-off-external-otlp"], "target")["env"]}
    assert ext["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4317"
    assert "--draft-address" not in ssd_container(sets["minimal"], "target")["args"]


def _substitute(args: list[str]) -> list[str]:
    """Kubernetes expands $(VAR) from the container env; stand-ins for the parse."""
    stand_in = {"POD_NAMESPACE": "ssd", "SSD_REDIS_URL": "redis://r:6379/0", "POD_NAME": "p", "NODE_NAME": "n"}
    return [re.sub(r"\$\((\w+)\)", lambda m: stand_in[m.group(1)], a) for a in args]


@pytest.mark.parametrize("name", ["cpu-default", "gpu", "static-preferred-pvc", "minimal", "redis-secret", "bf16-plain-kernels"])
def test_container_args_parse_with_the_real_cli(sets, monkeypatch, name):
    """Every role's args go through ssd's own argparse and config validation (the service itself
    is replaced by a recorder)."""
    import ssd.cli
    import ssd.services.run as run

    seen = []
    monkeypatch.setattr(run, "run_role", lambda ns, cfg: seen.append((ns, cfg)) or 0)
    for d in by_kind(sets[name], "Deployment").values():
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["name"] not in ROLES:
                continue
            args = _substitute(c["args"])
            try:
                rc = ssd.cli.main(args)
            except SystemExit as e:  # argparse: unknown flag or bad value
                pytest.fail(f"{c['name']}: `ssd {' '.join(args)}` does not parse (exit {e.code})")
            assert rc == 0
            ns, cfg = seen[-1]
            assert ns.role == c["name"]
            assert ns.grace_s == float(arg(c, "--grace-s"))
            # numerics reach every role as the values say
            assert cfg.dtype == ("bfloat16" if name == "bf16-plain-kernels" else "auto") == arg(c, "--dtype")
            assert cfg.batch_invariant is (name != "bf16-plain-kernels")
            # adaptive speculation reaches every role (the target sizes rounds, the draft stops on p_min)
            assert cfg.speculation.adaptive is True  # the default, and the bf16 set's own value
            assert cfg.speculation.p_min == (0.4 if name == "bf16-plain-kernels" else 0.0) == float(arg(c, "--p-min"))
            if c["name"] == "target":  # admission control: the chart's queue bound reaches the engine
                assert cfg.max_queue == int(arg(c, "--max-queue")) == 256


# ---- autoscaling ----------------------------------------------------------------------------------
def test_draft_hpa_targets_only_the_draft_deployment(sets):
    docs = sets["hpa"]
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {f"{FN}-draft", f"{FN}-target"}
    draft = hpas[f"{FN}-draft"]["spec"]
    assert draft["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FN}-draft"}
    assert hpas[f"{FN}-target"]["spec"]["scaleTargetRef"]["name"] == f"{FN}-target"
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()]
    assert targets.count(f"{FN}-draft") == 1 and f"{FN}-gateway" not in targets
    metrics = {(m["type"], m[m["type"][0].lower() + m["type"][1:]]["metric"]["name"]) for m in draft["metrics"]}
    assert metrics == {("External", "ssd_speculation_late_miss_ratio"), ("Pods", "ssd_draft_queue_depth")}
    down = draft["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] <= 1 and p["periodSeconds"] >= 60 for p in down["policies"])
    # the HPA owns the replica count
    assert "replicas" not in one(docs, "Deployment", f"{FN}-draft")["spec"]
    assert "replicas" not in one(docs, "Deployment", f"{FN}-target")["spec"]
    assert one(docs, "Deployment", f"{FN}-gateway")["spec"]["replicas"] == 1
    tm = {m["type"] for m in hpas[f"{FN}-target"]["spec"]["metrics"]}
    assert tm == {"Pods", "Resource"}


def test_hpa_metrics_are_served_by_the_shipped_adapter_rules(sets):
    """Every custom/external metric the HPAs name is produced by files/prometheus-adapter-rules.yaml,
    from a series the services export, and the ConfigMap carries the same rules."""
    rules = yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())
    custom = {r["name"]["as"]: r for r in rules["rules"]}
    external = {r["name"]["as"]: r for r in rules["externalRules"]}
    for h in by_kind(sets["hpa"], "HorizontalPodAutoscaler").values():
        for m in h["spec"]["metrics"]:
            if m["type"] == "Pods":
                assert m["pods"]["metric"]["name"] in custom
            elif m["type"] == "External":
                assert m["external"]["metric"]["name"] in external
    ratio = external["ssd_speculation_late_miss_ratio"]["metricsQuery"]
    assert 'result=~"late|miss"' in ratio and "ssd_speculation_cache_total" in ratio and "[2m]" in ratio
    cm = one(sets["hpa"], "ConfigMap", f"{FN}-prometheus-adapter-rules")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == rules


def test_keda_scaled_object(sets):
    docs = sets["keda"]
    so = one(docs, "ScaledObject", f"{FN}-draft")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FN}-draft"}
    assert not by_kind(docs, "HorizontalPodAutoscaler"), "KEDA makes the HPA itself"
    assert "replicas" not in one(docs, "Deployment", f"{FN}-draft")["spec"]
    trig = {t["name"]: t for t in spec["triggers"]}
    assert {t["type"] for t in trig.values()} == {"prometheus"}
    q = trig["late-miss-ratio"]["metadata"]["query"]
    assert 'ssd_speculation_cache_total{result=~"late|miss",namespace="ssd",service=~"ssd-.*"}' in q
    assert "ssd_draft_queue_depth" in trig["draft-queue-depth"]["metadata"]["query"]
    for t in trig.values():
        assert t["metadata"]["serverAddress"] == "http://prometheus.monitoring:9090"
        float(t["metadata"]["threshold"])
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_metric_names_are_exported_by_the_services():
    """The names the chart and the adapter rules scale on appear in the services' code."""
    src = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    for name in ("ssd_speculation_cache_total", "ssd_draft_queue_depth", "ssd_num_requests_waiting",
                 "ssd_num_requests_running"):
        base = name.removesuffix("_total")
        assert base in src, f"{name} is not exported by services/"


def test_scrape_annotations_and_service_monitor(sets):
    for role in ROLES:
        ann = one(sets["cpu-default"], "Deployment", f"{FN}-{role}")["spec"]["template"]["metadata"]["annotations"]
        assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "9464", "prometheus.io/path": "/metrics"}
        svc = one(sets["cpu-default"], "Service", f"{FN}-{role}")
        assert {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP",
                "appProtocol": "http"} in svc["spec"]["ports"]
    sm = one(sets["servicemonitor"], "ServiceMonitor", FN)
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert not by_kind(sets["cpu-default"], "ServiceMonitor")


# ---- placement, probes, resources -------------------------------------------------------------------
def test_draft_pods_are_colocated_with_target_pods(sets):
    target_labels = one(sets["cpu-default"], "Deployment", f"{FN}-target")["spec"]["template"]["metadata"]["labels"]
    spec = one(sets["cpu-default"], "Deployment", f"{FN}-draft")["spec"]["template"]["spec"]
    terms = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert len(terms) == 1 and terms[0]["topologyKey"] == "kubernetes.io/hostname"
    assert labels_match(terms[0]["labelSelector"]["matchLabels"], target_labels)
    assert terms[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "target"
    pref = one(sets["static-preferred-pvc"], "Deployment", f"{FN}-draft")["spec"]["template"]["spec"]["affinity"]
    pterm = pref["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert pterm["weight"] == 100 and pterm["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pref["podAffinity"]


@pytest.mark.parametrize("name", ["cpu-default", "gpu"])
def test_grpc_probes(sets, name):
    for role in ROLES:
        c = ssd_container(sets[name], role)
        port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": HEALTH[role]}
        assert c["livenessProbe"]["grpc"]["port"] == port and c["livenessProbe"]["grpc"].get("service", "") == ""
        assert c["startupProbe"]["grpc"]["port"] == port
        if role in ("target", "draft"):
            p = c["startupProbe"]
            assert p["periodSeconds"] * p["failureThreshold"] >= 300, "room to load/convert the model"


def test_gpu_resources(sets):
    for role in ("target", "draft"):
        res = ssd_container(sets["gpu"], role)["resources"]
        assert res["requests"]["nvidia.com/gpu"] == 1 and res["limits"]["nvidia.com/gpu"] == 1
        spec = one(sets["gpu"], "Deployment", f"{FN}-{role}")["spec"]["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert ssd_container(sets["gpu"], role)["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in json.dumps(ssd_container(sets["gpu"], "gateway")["resources"])
    assert "nvidia.com/gpu" not in json.dumps(sets["cpu-default"])


def test_pod_disruption_budgets(sets):
    for role in ROLES:
        pdb = one(sets["cpu-default"], "PodDisruptionBudget", f"{FN}-{role}")
        pod_labels = one(sets["cpu-default"], "Deployment", f"{FN}-{role}")["spec"]["template"]["metadata"]["labels"]
        assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
        assert pdb["spec"]["maxUnavailable"] == 1
    assert one(sets["static-preferred-pvc"], "PodDisruptionBudget", f"{FN}-gateway")["spec"]["maxUnavailable"] == "50%"


def test_services_select_their_pods(sets):
    docs = sets["cpu-default"]
    deps = by_kind(docs, "Deployment")
    for name, svc in by_kind(docs, "Service").items():
        pod = deps[name]["spec"]["template"]
        assert labels_match(svc["spec"]["selector"], pod["metadata"]["labels"])
        names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, (name, p)


# ---- RBAC and security ---------------------------------------------------------------------------------
def test_rbac_is_minimal_and_gateway_only(sets):
    docs = sets["cpu-default"]
    roles = by_kind(docs, "Role")
    assert list(roles) == [f"{FN}-gateway-discovery"]
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r["verbs"] for r in roles[f"{FN}-gateway-discovery"]["rules"]}
    assert rules == {(("discovery.k8s.io",), ("endpointslices",)): ["get", "list", "watch"],
                     (("",), ("pods",)): ["get", "list", "watch"]}
    rb = one(docs, "RoleBinding", f"{FN}-gateway-discovery")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{FN}-gateway-discovery"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": f"{FN}-gateway", "namespace": "ssd"}]
    specs = pod_specs(docs)
    gw = specs[f"Deployment/{FN}-gateway"]
    assert gw["serviceAccountName"] == f"{FN}-gateway" and gw["automountServiceAccountToken"] is True
    for key, spec in specs.items():
        if key != f"Deployment/{FN}-gateway":
            assert spec.get("automountServiceAccountToken") is False, key
            assert spec.get("serviceAccountName", "") != f"{FN}-gateway", key
    # static addresses need no API access
    assert not by_kind(sets["static-preferred-pvc"], "Role")
    assert pod_specs(sets["static-preferred-pvc"])[f"Deployment/{FN}-gateway"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_security_context_everywhere(sets, name):
    for key, spec in pod_specs(sets[name]).items():
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["fsGroup"] == 10001, key
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, key
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (key, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (key, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (key, c["name"])
            assert not sc.get("privileged"), (key, c["name"])


def test_writable_tmp_and_cache_volumes(sets):
    for name in ("cpu-default", "static-preferred-pvc"):
        for role in ROLES:
            spec = one(sets[name], "Deployment", f"{FN}-{role}")["spec"]["template"]["spec"]
            c = containers(spec)[role]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert mounts["/tmp"] == "tmp" and mounts[env["SSD_CACHE_DIR"]] == "cache"
            vols = {v["name"]: v for v in spec["volumes"]}
            if name == "static-preferred-pvc":
                assert vols["cache"]["persistentVolumeClaim"]["claimName"] == "ssd-cache"
                assert "cp -R" in spec["initContainers"][0]["args"][0]
            else:
                assert "emptyDir" in vols["cache"] and "ln -s" in spec["initContainers"][0]["args"][0]
            init = spec["initContainers"][0]
            assert init["image"] == c["image"] and {m["mountPath"] for m in init["volumeMounts"]} >= {env["SSD_CACHE_DIR"]}


# ---- NetworkPolicy ----------------------------------------------------------------------------------------
def _peers(np: dict) -> list[tuple[set, list | None]]:
    # a rule without ports admits every port ("*")
    return [({p["port"] for p in r["ports"]} if "ports" in r else {"*"}, r.get("from")) for r in np["spec"]["ingress"]]


def _component(peer: dict) -> str:
    return peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]


def test_network_policies(sets):
    docs = sets["cpu-default"]
    nps = by_kind(docs, "NetworkPolicy")
    assert set(nps) == {f"{FN}-{c}" for c in (*ROLES, "redis", "jaeger")}
    deps = by_kind(docs, "Deployment")
    for name, np in nps.items():
        assert np["spec"]["policyTypes"] == ["Ingress"]
        assert labels_match(np["spec"]["podSelector"]["matchLabels"], deps[name]["spec"]["template"]["metadata"]["labels"])
    gw = _peers(nps[f"{FN}-gateway"])
    assert ({"grpc", "http"}, None) in gw and ({"metrics"}, None) in gw  # anyone
    tgt = _peers(nps[f"{FN}-target"])
    assert [(p, [_component(x) for x in f]) for p, f in tgt if f] == [({"grpc"}, ["gateway"])]
    drf = _peers(nps[f"{FN}-draft"])
    # target pods on any port: gRPC plus the tensor channel's rendezvous and gloo/NCCL sockets
    assert [(p, [_component(x) for x in f]) for p, f in drf if f] == [({"*"}, ["target"])]
    for name in (f"{FN}-target", f"{FN}-draft"):
        assert [p for p, f in _peers(nps[name]) if f is None] == [{"metrics"}]
    (ports, peers), = _peers(nps[f"{FN}-redis"])
    assert ports == {"redis"} and sorted(_component(p) for p in peers) == ["draft", "target"]
    # restricted metrics scrapers and gateway clients; the helm test pod stays allowed
    r = by_kind(sets["static-preferred-pvc"], "NetworkPolicy")
    ns_sel = {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    for name in (f"{FN}-gateway", f"{FN}-target", f"{FN}-draft"):
        assert ({"metrics"}, [ns_sel]) in _peers(r[name])
    gw_from = [f for p, f in _peers(r[f"{FN}-gateway"]) if p == {"grpc", "http"}][0]
    assert {"namespaceSelector": {"matchLabels": {"name": "clients"}}} in gw_from
    test_pod = one(sets["static-preferred-pvc"], "Pod", f"{FN}-test-generate")
    assert any("podSelector" in p and labels_match(p["podSelector"]["matchLabels"], test_pod["metadata"]["labels"])
               for p in gw_from)
    assert not by_kind(sets["minimal"], "NetworkPolicy")


# ---- helm test ----------------------------------------------------------------------------------------------
def test_helm_test_hook_sends_a_real_generation(sets):
    docs = sets["cpu-default"]
    pods = by_kind(docs, "Pod")
    assert list(pods) == [f"{FN}-test-generate"]
    pod = pods[f"{FN}-test-generate"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    script = pod["spec"]["containers"][0]["args"][0]
    svc = one(docs, "Service", f"{FN}-gateway")
    http = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
    assert f"http://{FN}-gateway:{http}/v1/completions" in script
    body = json.loads(re.search(r"body='([^']*)'", script).group(1))
    assert body["prompt"] and body["max_tokens"] >= 1 and body["temperature"] == 0
    assert body["model"] == arg(ssd_container(docs, "gateway"), "--model-name")
    assert '"choices"' in script and "exit 1" in script


def test_notes_say_how_to_call_it(helm):
    r = subprocess.run([helm, "install", "ssd", str(CHART), "--dry-run=client", "--namespace", "ssd"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("NOTES:", 1)[1]
    for needle in ("port-forward svc/ssd-gateway 50051:50051 8000:8000", "/v1/chat/completions", "ssd.v1.Gateway/Generate",
                   "grpcurl", "helm test ssd", "port-forward svc/ssd-jaeger 16686:16686"):
        assert needle in notes, needle


def test_per_component_image_and_probe_overrides(render):
    docs = render("target.image.tag=custom", "draft.probes.startupFailureThreshold=120", "gpu.enabled=true")
    assert ssd_container(docs, "target")["image"] == "ssd-serve:custom"
    init = one(docs, "Deployment", f"{FN}-target")["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"] == "ssd-serve:custom", "the cache seed comes from the same image"
    assert ssd_container(docs, "draft")["image"] == ssd_container(docs, "gateway")["image"] == "ssd-serve:0.1.0-cuda"
    assert ssd_container(docs, "draft")["startupProbe"]["failureThreshold"] == 120


def test_gateway_auth_tls_and_cors_values(sets):
    c = ssd_container(sets["gateway-auth-tls-cors"], "gateway")
    assert arg(c, "--api-key-file") == "/etc/ssd/api-keys/api-keys"
    assert (arg(c, "--tls-cert"), arg(c, "--tls-key")) == ("/etc/ssd/tls/tls.crt", "/etc/ssd/tls/tls.key")
    assert arg(c, "--cors-origins") == "https://app.example,https://b.example"
    assert arg(c, "--max-http-connections") == "256"
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/etc/ssd/api-keys", "/etc/ssd/tls"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000, "scheme": "HTTPS"}
    spec = one(sets["gateway-auth-tls-cors"], "Deployment", f"{FN}-gateway")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"api-keys": "ssd-api-keys", "tls": "ssd-gateway-tls"}
    plain = ssd_container(sets["cpu-default"], "gateway")
    assert arg(plain, "--api-key-file") is None and "grpc" in plain["readinessProbe"]


# ---- one set of defaults --------------------------------------------------------------------------
def _differences(got, want, prefix="") -> dict:
    """{field: (got, want)} over an EngineConfig and its SpeculationConfig."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(want):
        g, w = getattr(got, f.name), getattr(want, f.name)
        if dataclasses.is_dataclass(w):
            out.update(_differences(g, w, f"{f.name}."))
        elif g != w:
            out[prefix + f.name] = (g, w)
    return out


def test_config_cli_services_and_chart_share_one_set_of_defaults(render, monkeypatch):
    """ssd/config.py is the one place a default is set: `ssd generate`, `ssd bench`, `ssd serve`
    (and the `ssd service` children it starts with config_args) and every role of the chart's
    default render all run EngineConfig() exactly."""
    import ssd.cli
    import ssd.services.run as run
    from ssd.config import EngineConfig, config_args

    want = EngineConfig()
    seen = {}
    record = lambda name: (lambda ns, *rest: seen.__setitem__(name, ssd.cli._configs(ns)[0]) or 0)  # noqa: E731
    for name in ("cmd_generate", "cmd_bench", "cmd_serve"):
        monkeypatch.setattr(ssd.cli, name, record(name))
    monkeypatch.setattr(run, "run_role", lambda ns, cfg: seen.__setitem__(f"service {ns.role}", cfg) or 0)
    assert ssd.cli.main(["generate", "--prompt", "hi"]) == 0
    assert ssd.cli.main(["bench"]) == 0
    assert ssd.cli.main(["serve"]) == 0
    assert ssd.cli.main(["service", "target", *config_args(seen["cmd_serve"])]) == 0  # what serve starts
    seen["serve's target"] = seen.pop("service target")
    docs = render()
    for role in ROLES:
        assert ssd.cli.main(_substitute(ssd_container(docs, role)["args"])) == 0
    assert {f"service {r}" for r in ROLES} <= set(seen)
    # threads are the one deliberate difference: a pod's match its CPU request (values
    # target.threads / draft.threads), where the CLI's share one machine between two processes
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    per_pod = {"target_threads": values["target"]["threads"], "draft_threads": values["draft"]["threads"]}
    for who, cfg in seen.items():
        diff = _differences(cfg, want)
        if who.startswith("service "):
            diff = {k: v for k, v in diff.items() if not (k in per_pod and v[0] == per_pod[k])}
        assert diff == {}, who
