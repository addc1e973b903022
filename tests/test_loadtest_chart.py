"""The distributed Locust chart, rendered by the real Helm SDK (no cluster) and validated against Kubernetes' schemas."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chart_helpers import rendered_docs

helm = pytest.importorskip("helm_python", reason="the [deploy] extra (helm-python-sdk) is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the [deploy] extra is not installed")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "tritonvision-loadtest"
KUBERNETES = "1.30"


def render(values: dict | None = None, name: str = "tv") -> dict[str, dict]:
    """Rendered manifests by "Kind/role" (master, worker, or the Service)."""
    out = {}
    for doc in rendered_docs(CHART, values, name):
        key = f"{doc['kind']}/{doc['metadata']['labels']['app.kubernetes.io/component']}"
        assert key not in out, f"two {key} manifests"
        out[key] = doc
    return out


def container(m: dict, role: str) -> dict:
    (c,) = m[f"Deployment/{role}"]["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c["env"]}


VALUES = [
    None,
    {"master": {"autostart": {"enabled": True, "users": 200, "spawnRate": 20, "runTime": "15m"}}, "workers": {"replicas": 8}},
    {"imagesConfigMap": "tv-images", "locustfile": {"configMap": "tv-locustfile"}, "userClasses": ["UnaryUser", "StreamUser"],
     "options": {"BAD_IMAGE_EVERY": "50", "ARRIVAL_RATE": "400"}},
]


def test_chart_lints_clean_in_strict_mode():
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBERNETES}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", VALUES)
def test_every_manifest_is_valid_kubernetes_and_pods_run_unprivileged(values):
    m = render(values)
    assert set(m) == {"Deployment/master", "Deployment/worker", "Service/master"}
    for doc in m.values():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    for role in ("master", "worker"):
        spec = m[f"Deployment/{role}"]["spec"]["template"]["spec"]
        sc = container(m, role)["securityContext"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert {"name": "tmp", "mountPath": "/tmp"} in container(m, role)["volumeMounts"]


@pytest.mark.parametrize("values", VALUES)
def test_workers_reach_the_master_through_its_service_and_the_master_loads_the_target(values):
    m = render(values)
    service = m["Service/master"]
    master, worker = container(m, "master"), container(m, "worker")
    replicas = m["Deployment/worker"]["spec"]["replicas"]
    assert f"--master-host={service['metadata']['name']}" in worker["args"] and "--worker" in worker["args"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"web": 8089, "master": 5557}
    assert service["spec"]["selector"].items() <= m["Deployment/master"]["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "master"
    assert "--master-port=5557" in worker["args"]
    assert "--master" in master["args"] and "--host=tritonvision:8001" in master["args"]
    assert f"--expect-workers={replicas}" in master["args"]
    # User classes are the positional arguments at the end.
    classes = (values or {}).get("userClasses", ["UnaryUser"])
    assert master["args"][-len(classes):] == classes
    # Both roles read the same locustfile and the same options (workers run the users).
    assert master["args"][0] == worker["args"][0] and env(master) == env(worker)


def test_options_images_and_locustfile_come_from_values_and_config_maps():
    m = render(VALUES[2])
    for role in ("master", "worker"):
        c = container(m, role)
        e = env(c)
        assert e["TRITONVISION_BAD_IMAGE_EVERY"] == "50" and e["TRITONVISION_ARRIVAL_RATE"] == "400"
        assert e["TRITONVISION_IMAGES"] == "/images"
        assert c["args"][0] == "--locustfile=/locustfile/locustfile.py"
        volumes = {v["name"]: v for v in m[f"Deployment/{role}"]["spec"]["template"]["spec"]["volumes"]}
        assert volumes["images"]["configMap"]["name"] == "tv-images"
        assert volumes["locustfile"]["configMap"]["name"] == "tv-locustfile"
    assert "--autostart" not in container(m, "master")["args"]
    auto = container(render(VALUES[1]), "master")["args"]
    assert {"--autostart", "--users=200", "--spawn-rate=20", "--run-time=15m"} <= set(auto)


def test_the_default_locustfile_path_is_where_the_load_test_image_puts_it():
    dockerfile = (ROOT / "deploy" / "loadtest.Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert re.search(r"^COPY \. \.", dockerfile, re.M), "the image copies the project into its WORKDIR"
    path = yaml.safe_load((CHART / "values.yaml").read_text())["locustfile"]["path"]
    assert (ROOT / Path(path).relative_to(workdir)).is_file()
    assert "'.[loadtest]'" in dockerfile


def test_load_generators_are_not_throttled():
    # A CPU limit throttles a worker in 100 ms periods whenever its gevent loop and gRPC's threads together
    # pass it: the pauses land in the latencies it reports as the server's. Each worker asks for its core.
    m = render()
    for role in ("master", "worker"):
        assert "cpu" not in container(m, role)["resources"].get("limits", {})
    assert container(m, "worker")["resources"]["requests"]["cpu"] == "1"


def test_both_roles_run_the_image_pinned_by_digest():
    digest = "sha256:" + "cd" * 32
    m = render({"image": {"digest": digest}})
    for role in ("master", "worker"):
        assert container(m, role)["image"] == f"ghcr.io/example/tritonvision-loadtest@{digest}"
    assert container(render(), "worker")["image"] == "ghcr.io/example/tritonvision-loadtest:0.1.0"
    with pytest.raises(helm.HelmValuesError):
        render({"image": {"digest": "latest"}})


def test_names_fit_dns_labels_for_long_release_names():
    m = render(name="a-release-name-long-enough-to-push-every-generated-name-past-sixty-three")
    names = [doc["metadata"]["name"] for doc in m.values()]
    assert all(len(n) <= 63 and not n.endswith("-") for n in names), names
    assert len(set(names)) == 3


@pytest.mark.parametrize("values", [
    {"target": "http://tritonvision:8001"},  # a URL: the gRPC users need host:port
    {"target": "tritonvision"},
    {"userClasses": ["ShmUser"]},  # shared memory needs the server on the same host
    {"workers": {"replicas": 0}},
    {"master": {"autostart": {"runTime": "ten minutes"}}},
    {"options": {"bad_image_every": "3"}},
])
def test_schema_refuses_bad_values(values):
    with pytest.raises(helm.HelmValuesError):
        helm.Chart.load(CHART).render(values, name="tv")
