"""The Helm chart, rendered by the real Helm SDK (no cluster) and validated against Kubernetes' schemas."""

from __future__ import annotations

from pathlib import Path

import pytest

from chart_helpers import rendered_docs

helm = pytest.importorskip("helm_python", reason="the [deploy] extra (helm-python-sdk) is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the [deploy] extra is not installed")
yaml = pytest.importorskip("yaml")

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "tritonvision"
KUBERNETES = "1.30"


def render(values: dict | None = None, name: str = "tv") -> dict[str, dict]:
    """Rendered manifests by kind; a second manifest of a kind (the headless Service) is keyed "Kind/name"."""
    docs = rendered_docs(CHART, values, name)
    out = {}
    # The shortest name of a kind (the release's own Service) takes the plain key.
    for doc in sorted(docs, key=lambda d: (d["kind"], len(d["metadata"]["name"]))):
        key = doc["kind"] if doc["kind"] not in out else f"{doc['kind']}/{doc['metadata']['name']}"
        assert key not in out, f"two {key} manifests"
        out[key] = doc
    return out


def pod(manifests: dict) -> dict:
    return manifests["Deployment"]["spec"]["template"]["spec"]


def server(manifests: dict) -> dict:
    (container,) = pod(manifests)["containers"]
    return container


def test_chart_lints_clean_in_strict_mode():
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBERNETES}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_manifests_are_valid_from_the_oldest_kubernetes_the_chart_allows_to_the_newest_schemas():
    import re

    from kubernetes_validate.utils import latest_version

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    oldest = re.fullmatch(r">=(\d+\.\d+)\.0-0", chart["kubeVersion"]).group(1)
    newest = latest_version().rsplit(".", 1)[0]
    for version in (oldest, newest):
        for doc in render({"ingress": {"enabled": True}, "podDisruptionBudget": {"minAvailable": 1},
                           "autoscaling": {"minReplicas": 2}}).values():
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("values", [
    None,
    {"autoscaling": {"enabled": False}, "engineBuild": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
    {"engineBuild": {"cacheClaim": "engines-h100"}, "service": {"type": "LoadBalancer"}, "podAnnotations": {"a": "b"}},
])
def test_every_manifest_is_valid_kubernetes(values):
    manifests = render(values)
    assert {"Deployment", "Service", "ServiceAccount", "Pod"} <= set(manifests)
    for doc in manifests.values():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_server_pod_serves_on_named_ports_with_health_probes():
    m = render()
    c = server(m)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # Liveness runs a real inference: /v2/health/live stays true while a dead stub fails every request.
    command = c["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["tritonvision", "probe"] and "--url=127.0.0.1:8001" in command
    assert "--image=/models/preprocess/warmup/photo.jpg" in command
    assert c["livenessProbe"]["timeoutSeconds"] > 10
    plain = server(render({"probes": {"liveness": {"inference": False}}}))
    assert plain["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading with warm-up takes minutes"
    assert "--model-repository=/models" in c["args"] and "--strict-readiness=true" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    service_ports = {p["name"]: p["targetPort"] for p in m["Service"]["spec"]["ports"]}
    assert service_ports == {"http": "http", "grpc": "grpc", "metrics": "metrics"}


# Where each kind of workload keeps its pod spec.
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def pod_specs(manifests: dict) -> dict[str, dict]:
    """Every rendered pod spec by kind: the server's Deployment, helm test pods, jobs, ..."""
    out = {}
    for kind, doc in manifests.items():
        spec = doc.get("spec") or {}
        assert kind in POD_SPEC_PATHS or not {"template", "jobTemplate", "containers"} & set(spec), \
            f"{kind} holds a pod spec that POD_SPEC_PATHS does not know"
        if kind in POD_SPEC_PATHS:
            spec = doc
            for key in POD_SPEC_PATHS[kind]:
                spec = spec[key]
            out[kind] = spec
    return out


SECURITY_VALUES = [
    None,
    {"engineBuild": {"enabled": False}},
    {"engineBuild": {"precision": "int8", "cacheClaim": "engines-h100"}, "autoscaling": {"enabled": False}},
]


@pytest.mark.parametrize("values", SECURITY_VALUES)
def test_every_pod_runs_unprivileged_on_a_read_only_root(values):
    specs = pod_specs(render(values))
    # The server's Deployment and the helm test pod at least; a new workload kind is checked the same way.
    assert {"Deployment", "Pod"} <= set(specs)
    for kind, spec in specs.items():
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, f"{kind}: mounts a service-account token"
        containers = spec.get("initContainers", []) + spec["containers"] + spec.get("ephemeralContainers", [])
        for c in containers:
            where = f"{kind} container {c['name']!r}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: may run as root"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allows privilege escalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: does not drop all capabilities"
            assert not sc.get("privileged", False), f"{where}: privileged"


def test_the_server_keeps_writable_tmp_and_a_memory_backed_dev_shm():
    m = render()
    spec = pod(m)
    # What a read-only root still needs writable: /tmp, and a large /dev/shm for the python backend and DALI.
    mounts = {v["mountPath"]: v["name"] for v in server(m)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_a_restarted_server_container_does_not_inherit_the_shared_memory_its_crashed_run_left(tmp_path):
    """The pod's /dev/shm outlives a container that crashed, and Triton's python backend leaves its regions there
    when the server dies (measured with the bundled 2.51: SIGSEGV of tritonserver left its 48 MiB). Each
    restart would inherit them until /dev/shm is full and the validate step cannot load: a crash loop that
    never heals. The container's command removes the regions of the server's own prefix, then becomes
    tritonserver with its arguments untouched."""
    import os
    import subprocess

    c = server(render({"accessKey": {"enabled": True}}))
    prefixes = [a.rsplit("=", 1)[1] for a in c["args"] if a.startswith("--backend-config=python,shm-region-prefix-name=")]
    assert len(prefixes) == 1 and prefixes[0]
    (prefix,) = prefixes
    # Run the container's command as the kubelet would, with /dev/shm and tritonserver stood in for.
    shm, bin_dir = tmp_path / "shm", tmp_path / "bin"
    shm.mkdir(), bin_dir.mkdir()
    for name in (f"{prefix}1b2c-region", f"{prefix}9f00-region"):
        (shm / name).write_bytes(b"\0" * 4096)
    (shm / "tritonvision_client_42_0a1b_0").write_bytes(b"a co-located client's region: not the server's")
    (bin_dir / "tritonserver").write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path}/args\n')
    (bin_dir / "tritonserver").chmod(0o755)
    command = [part.replace("/dev/shm/", f"{shm}/") for part in c["command"]]
    assert command != c["command"], "the command removes files under /dev/shm/"
    subprocess.run([*command, *c["args"]], check=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert [p.name for p in shm.iterdir()] == ["tritonvision_client_42_0a1b_0"]
    assert (tmp_path / "args").read_text().splitlines() == c["args"], "tritonserver gets the arguments unchanged"


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_shared_memory_fits_full_batches_of_phone_photos_within_the_memory_limit():
    from tritonvision import spec as tv_spec
    from tritonvision_server.configs import shm_bytes

    m = render()
    volumes = {v["name"]: v for v in pod(m)["volumes"]}
    mounts = {v["mountPath"]: v["name"] for v in server(m)["volumeMounts"]}
    size = _bytes(volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"])
    assert size >= shm_bytes(tv_spec.GPU, 4 << 20), "a full batch of 4 MiB uploads on every validate instance must fit"
    # A memory-backed volume counts against the container's memory: the server keeps 8 GiB besides.
    assert _bytes(server(m)["resources"]["limits"]["memory"]) >= size + (8 << 30)


def test_server_runs_with_the_generated_configs_as_written():
    args = server(render())["args"]
    assert "--disable-auto-complete-config" in args
    assert not any(a.startswith("--strict-model-config") for a in args), "deprecated in favour of the flag above"


def test_each_pod_builds_the_engine_for_its_gpu_before_serving():
    m = render({"engineBuild": {"precision": "int8", "cacheClaim": "engines-h100",
                                "extraArgs": ["--workspace-mib", "8192"]}})
    (init,) = pod(m)["initContainers"]
    script = init["args"][0]
    assert ("build_engines.py engine --precision int8 --engine-dir /engine-cache --output /models "
            '"--workspace-mib" "8192" &&') in script
    assert "check --profile gpu --require-artifacts /models" in script
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 1, "building an engine needs the GPU it is for"
    volumes = {v["name"]: v for v in pod(m)["volumes"]}
    assert volumes["engine-cache"]["persistentVolumeClaim"]["claimName"] == "engines-h100"
    (copy_only,) = pod(render({"engineBuild": {"enabled": False}}))["initContainers"]
    assert "build_engines.py" not in " ".join(copy_only["command"] + copy_only.get("args", []))


def test_autoscaling_on_queue_time_owns_the_replica_count():
    m = render({"autoscaling": {"maxReplicas": 12, "targetQueueTimeMicroseconds": 1500}})
    hpa = m["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["maxReplicas"] == 12
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "tritonvision_queue_time_us"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1500"}
    assert "replicas" not in m["Deployment"]["spec"]
    fixed = render({"autoscaling": {"enabled": False}, "replicaCount": 3})
    assert "HorizontalPodAutoscaler" not in fixed and fixed["Deployment"]["spec"]["replicas"] == 3


def test_extra_server_arguments_and_the_drain_time_reach_the_server():
    m = render({"server": {"args": ["--log-verbose=1"], "extraArgs": ["--allow-client-shm=true"], "exitTimeoutSeconds": 60}})
    args = server(m)["args"]
    assert args[-2:] == ["--log-verbose=1", "--allow-client-shm=true"]
    assert "--exit-timeout-secs=60" in args
    assert pod(m)["terminationGracePeriodSeconds"] > 60


def test_a_stopping_pod_keeps_serving_until_it_has_left_the_endpoints_then_drains():
    # From SIGTERM on, Triton 2.51 refuses every new inference (UNAVAILABLE "Server is stopping", core r24.10
    # DynamicBatchScheduler::Enqueue) and closes its HTTP port, while kube-proxy, ingress controllers and
    # clients resolving the headless Service still send it requests for a few seconds: the preStop hook
    # holds SIGTERM back until they have let the pod go.
    m = render({"server": {"exitTimeoutSeconds": 60, "preStopSeconds": 12}})
    assert server(m)["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "12"]}}
    # The grace period covers the wait, then the drain, then unloading the models.
    assert pod(m)["terminationGracePeriodSeconds"] >= 12 + 60 + 10
    default = render()
    assert int(server(default)["lifecycle"]["preStop"]["exec"]["command"][1]) >= 5
    assert "lifecycle" not in server(render({"server": {"preStopSeconds": 0}}))


def test_names_fit_dns_labels_for_long_release_names():
    m = render(name="a-release-name-long-enough-to-push-every-generated-name-past-sixty-three")
    for doc in m.values():
        assert len(doc["metadata"]["name"]) <= 63 and not doc["metadata"]["name"].endswith("-")
    assert m["Pod"]["metadata"]["annotations"]["helm.sh/hook"] == "test"


@pytest.mark.parametrize("values", [
    {"ports": {"grpc": "8001"}},
    {"engineBuild": {"precision": "fp32"}},  # would not match the committed configs' FP16 pixels
    {"autoscaling": {"minReplicas": 0}},
    {"server": {"extraArgs": ["allow-client-shm=true"]}},
    {"replicas": 2},
    # Kubernetes takes only strings in these maps; YAML's true and 1 are not.
    {"nodeSelector": {"nvidia.com/gpu.present": True}},
    {"podAnnotations": {"prometheus.io/scrape": True}},
    {"podLabels": {"tier": 1}},
    {"service": {"annotations": {"service.beta.kubernetes.io/aws-load-balancer-internal": True}}},
    {"podDisruptionBudget": {"maxUnavailable": "one"}},
    {"podDisruptionBudget": {"minAvailable": "150%"}},
    # Client certificates asked for without TLS: the server would serve plaintext to anyone.
    {"tls": {"mutual": True, "secretName": "tv-tls"}},
])
def test_schema_refuses_bad_values(values):
    with pytest.raises(helm.HelmValuesError):
        helm.Chart.load(CHART).render(values, name="tv")


def test_autoscaling_refuses_a_floor_above_its_ceiling():
    # The API server would refuse the HPA at install time, after the rest of the release was applied.
    with pytest.raises(helm.HelmRenderError, match="minReplicas"):
        render({"autoscaling": {"minReplicas": 4, "maxReplicas": 2}})
    assert render({"autoscaling": {"minReplicas": 2, "maxReplicas": 2}})["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 2


@pytest.mark.parametrize("values", [
    {"sharedMemorySizeLimit": "2.5Gi"},
    {"sharedMemorySizeLimit": "3G"},
    {"podDisruptionBudget": {"maxUnavailable": "25%"}},
    {"podDisruptionBudget": {"minAvailable": "50%"}},
    {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "podAnnotations": {"prometheus.io/scrape": "true"}},
])
def test_schema_accepts_what_kubernetes_accepts(values):
    for doc in render(values).values():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_metrics_adapter_rule_serves_the_metric_the_hpa_scales_on():
    rules = yaml.safe_load((CHART.parent / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    (rule,) = rules
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert rule["name"]["as"] == values["autoscaling"]["metricName"]
    # Queue time of every step the ensemble runs, per classifier request.
    from tritonvision import spec

    for step in (spec.VALIDATE, spec.PREPROCESS, spec.RESNET50):
        assert step in rule["metricsQuery"]
    assert f'model="{spec.ENSEMBLE}"' in rule["metricsQuery"]


def test_administrative_protocols_need_the_access_key_from_a_secret_by_default():
    m = render()
    c = server(m)
    restricted = [a for a in c["args"] if a.startswith(("--grpc-restricted-protocol=", "--http-restricted-api="))]
    assert len(restricted) == 2
    for arg in restricted:
        protocols, key = arg.split("=", 1)[1].split(":", 1)
        assert set(protocols.split(",")) == {"shared-memory", "model-repository", "statistics", "trace", "logging"}
        assert key == "tritonvision-admin=$(TRITONVISION_ACCESS_KEY_VALUE)"
    env = {e["name"]: e for e in c["env"]}
    secret = m["Secret"]
    key_ref = env["TRITONVISION_ACCESS_KEY_VALUE"]["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": secret["metadata"]["name"], "key": "accessKey"}
    # NAME=VALUE for the CLI (the liveness probe), declared after the variable it refers to.
    assert env["TRITONVISION_ACCESS_KEY"]["value"] == "tritonvision-admin=$(TRITONVISION_ACCESS_KEY_VALUE)"
    names = [e["name"] for e in c["env"]]
    assert names.index("TRITONVISION_ACCESS_KEY_VALUE") < names.index("TRITONVISION_ACCESS_KEY")
    assert len(secret["data"]["accessKey"]) >= 32
    own = render({"accessKey": {"existingSecret": "mine"}})
    assert "Secret" not in own
    assert server(own)["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    off = server(render({"accessKey": {"enabled": False}}))
    assert not any("restricted" in a for a in off["args"]) and "env" not in off


def test_the_generated_access_key_survives_upgrades(tmp_path):
    """An upgrade that drew a new key would leave running pods on the old one (a Secret read into the
    environment is not re-read) while new pods and clients take the new one. The chart reads the Secret it
    made back from the cluster (`lookup`, empty when rendering offline, as here): its helper is rendered
    below with the Secret a cluster would return."""
    import shutil

    template = (CHART / "templates" / "secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in template
    assert 'include "tritonvision.accessKeyData" (dict "existing" $existing)' in template
    chart = tmp_path / "keycheck"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: keycheck\nversion: 0.1.0\n")
    shutil.copy(CHART / "templates" / "_helpers.tpl", chart / "templates" / "_helpers.tpl")
    (chart / "templates" / "keys.yaml").write_text(
        'kept: {{ include "tritonvision.accessKeyData" (dict "existing" (dict "data" (dict "accessKey" "czNjcmV0"))) }}\n'
        'new: {{ include "tritonvision.accessKeyData" (dict "existing" (dict)) }}\n'
        'other: {{ include "tritonvision.accessKeyData" (dict "existing" (dict)) }}\n')
    keys = yaml.safe_load(helm.Chart.load(chart).render(None, name="tv")["keycheck/templates/keys.yaml"])
    assert keys["kept"] == "czNjcmV0"
    import base64

    assert len(base64.b64decode(keys["new"])) == 32 and keys["new"] != keys["other"]


def _probe_args(container: dict, monkeypatch, env: dict[str, str]):
    """The liveness probe's command as the tritonvision CLI parses it, with the container's environment
    (the kubelet's $(VAR) expansion of env values done here)."""
    from tritonvision._cli import parser

    command = container["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["tritonvision", "probe"]
    monkeypatch.delenv("TRITONVISION_ACCESS_KEY", raising=False)
    for e in container.get("env", []):
        if "value" in e:
            value = e["value"]
            for name, secret_value in env.items():
                value = value.replace(f"$({name})", secret_value)
            monkeypatch.setenv(e["name"], value)
    return parser().parse_args(command[1:])


def test_liveness_probe_speaks_tls_and_carries_the_access_key(monkeypatch):
    from tritonvision._cli import _key

    plain = _probe_args(server(render({"accessKey": {"enabled": False}})), monkeypatch, {})
    assert not plain.tls and plain.root_certificates is None and plain.client_cert is None and _key(plain) is None

    c = server(render({"tls": {"enabled": True, "secretName": "tv-tls"}}))
    args = _probe_args(c, monkeypatch, {"TRITONVISION_ACCESS_KEY_VALUE": "s3cret"})
    assert args.root_certificates == "/etc/tritonvision/tls/ca.crt"
    assert args.tls_server_name == "tv-tritonvision.ml.svc"  # the Service's name
    assert args.client_cert is None and args.client_key is None
    assert _key(args) == ("tritonvision-admin", "s3cret")

    m = render({"tls": {"enabled": True, "secretName": "tv-tls", "mutual": True, "serverName": "tv.example.com"}})
    c = server(m)
    args = _probe_args(c, monkeypatch, {"TRITONVISION_ACCESS_KEY_VALUE": "s3cret"})
    assert args.tls_server_name == "tv.example.com"
    # Under mutual TLS the probe presents the server's own certificate, from the mounted Secret.
    assert (args.client_cert, args.client_key) == ("/etc/tritonvision/tls/tls.crt", "/etc/tritonvision/tls/tls.key")
    mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
    assert mounts["tls"] == "/etc/tritonvision/tls"
    assert {v["name"]: v for v in pod(m)["volumes"]}["tls"]["secret"]["secretName"] == "tv-tls"
    for doc in m.values():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def _docker_ignores(patterns: list[str], path: str) -> bool:
    """Whether a .dockerignore leaves `path` out of the build context (Docker's rules: Go filepath.Match on
    the path relative to the context, `**` for any number of folders, a folder taking its contents with it,
    later `!` patterns re-including)."""
    import re

    def regex(pattern: str) -> re.Pattern:
        out = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
            out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        exclude = not pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).match(p) for p in prefixes):
            ignored = exclude
    return ignored


def test_the_image_build_context_leaves_out_what_git_leaves_out_at_the_root():
    root = CHART.parents[2]
    patterns = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    # Local virtual environments (`make test` puts two DALI versions in .venv-dali/, 1.6 GB), wheels, build
    # outputs and results: COPY . . would put them into the image.
    local = [line.strip().strip("/").replace("*", "dali") for line in (root / ".gitignore").read_text().splitlines()
             if line.startswith("/")]
    assert ".venv-dali" in local and ".venv" in local
    # Tools' caches ignore themselves with a .gitignore of their own (ruff's, mypy's).
    for entry in local + [".git", ".pytest_cache", ".ruff_cache", ".mypy_cache", "client/tritonvision/__pycache__"]:
        assert _docker_ignores(patterns, f"{entry}/x"), f"{entry}/ is sent to the image build"
    # What the image needs stays in.
    for path in ("build_engines.py", "constraints.txt", "pyproject.toml", "model_repository/preprocess/1/dali.py",
                 "model_repository/preprocess/warmup/photo.jpg", "client/tritonvision/samples/chelsea.jpg",
                 "server/tritonvision_server/configs.py", "loadtest/locustfile.py"):
        assert not _docker_ignores(patterns, path), path


def test_server_image_targets_the_charts_release_and_refuses_random_weights():
    import re

    import yaml

    dockerfile = (CHART.parents[2] / "deploy" / "Dockerfile").read_text()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (tag,) = re.findall(r"^ARG TRITON_TAG=(\S+)$", dockerfile, flags=re.M)
    assert tag == f"{chart['appVersion']}-py3", "the image and the chart must name the same NGC release"
    export = next(line for line in dockerfile.splitlines() if "build_engines.py onnx" in line)
    assert "--weights imagenet" in export and "--require-weights" in export
    # No DALI serialisation at build time: the committed dali.py is built by the image's own DALI, and the
    # build checks that it can be.
    assert "build_engines.py dali --output model_repository" in dockerfile and "model.dali" not in dockerfile


def test_tracing_exports_opentelemetry_spans_named_after_the_pod_when_enabled():
    from tritonvision_server.launcher import RESTRICTED

    # The chart restricts what the launcher restricts.
    (grpc_arg,) = [a for a in server(render())["args"] if a.startswith("--grpc-restricted-protocol=")]
    assert set(grpc_arg.split("=", 1)[1].split(":", 1)[0].split(",")) == set(RESTRICTED)
    assert not any(a.startswith("--trace-config") for a in server(render())["args"])
    url = "http://otel-collector.observability:4318/v1/traces"
    m = render({"tracing": {"enabled": True, "url": url, "rate": 50,
                            "resourceAttributes": {"deployment.environment": "prod"}}})
    c = server(m)
    trace = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--trace-config=")]
    assert trace[:4] == ["mode=opentelemetry", "level=TIMESTAMPS", "rate=50", f"opentelemetry,url={url}"]
    resources = dict(a.split("resource=", 1)[1].split("=", 1) for a in trace if ",resource=" in a)
    assert resources == {"service.name": "tv-tritonvision", "k8s.namespace.name": "ml",
                         "k8s.pod.name": "$(TRITONVISION_POD_NAME)", "deployment.environment": "prod"}
    # $(TRITONVISION_POD_NAME) is expanded by the kubelet from the container's own environment.
    env = {e["name"]: e for e in c["env"]}
    assert env["TRITONVISION_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for doc in m.values():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    # Without a collector, or with a value Triton would misread, the chart refuses to render.
    for bad in ({"enabled": True}, {"enabled": True, "url": "otel:4318"}, {"enabled": True, "url": url, "rate": 0},
                {"enabled": True, "url": url, "resourceAttributes": {"a": "b,c=d"}}):
        with pytest.raises(Exception, match="tracing"):
            render({"tracing": bad})
