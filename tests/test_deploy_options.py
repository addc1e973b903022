"""The chart's options for platform teams: model repository sources, gRPC balancing and ingress, TLS,
escape hatches, a drainable budget and monitoring. Each is rendered by the real Helm SDK, linted strictly
and validated against Kubernetes' schemas (custom resources: their shape is checked here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_deploy import CHART, KUBERNETES, helm, kubernetes_validate, pod, render, server

# Custom resources that Kubernetes' own schemas do not describe.
CRD_GROUPS = ("monitoring.coreos.com/", "gateway.networking.k8s.io/")


def validate_all(manifests: dict) -> None:
    for doc in manifests.values():
        if not doc["apiVersion"].startswith(CRD_GROUPS):
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def lint(values: dict) -> None:
    report = helm.lint(CHART, values=values, strict=True, kube_version=f"v{KUBERNETES}.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


def volumes(m: dict) -> dict:
    return {v["name"]: v for v in pod(m)["volumes"]}


S3 = {"modelRepository": {"url": "s3://models-bucket/tritonvision", "credentialsSecret": "s3-creds"},
      "engineBuild": {"enabled": False}}
GCS = {"modelRepository": {"url": "gs://models/tv", "credentialsSecret": "gcs-sa", "gcsCredentialsKey": "key.json"},
       "engineBuild": {"enabled": False}}
PVC = {"modelRepository": {"persistentVolumeClaim": {"claimName": "models", "subPath": "tritonvision/v3"}}}
NFS = {"modelRepository": {"nfs": {"server": "nfs.internal", "path": "/exports/models"}}}
EVERYTHING = {
    "image": {"digest": "sha256:" + "ab" * 32},
    "ingress": {"enabled": True, "className": "nginx", "tlsSecret": "tv-public-tls"},
    "gateway": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateways"}], "hostnames": ["tv.example.com"]},
    "tls": {"enabled": True, "secretName": "tv-tls", "mutual": True},
    "runtimeClassName": "nvidia", "priorityClassName": "inference-critical",
    "podAnnotations": {"a": "b"}, "podLabels": {"team": "vision"},
    "extraVolumes": [{"name": "certs", "configMap": {"name": "corp-ca"}}],
    "extraVolumeMounts": [{"name": "certs", "mountPath": "/etc/corp-ca", "readOnly": True}],
    "server": {"envFrom": [{"configMapRef": {"name": "triton-env"}}], "env": [{"name": "X", "value": "1"}],
               "args": ["--log-verbose=0"]},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "tritonvision"}}}],
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                "grafanaDashboard": {"enabled": True}},
}


@pytest.mark.parametrize("values", [S3, GCS, PVC, NFS, EVERYTHING], ids=["s3", "gcs", "pvc", "nfs", "everything"])
def test_each_option_renders_valid_manifests_and_lints_strictly(values):
    validate_all(render(values))
    lint(values)


def test_an_object_store_repository_is_read_by_triton_with_credentials_from_a_secret():
    c = server(m := render(S3))
    assert "--model-repository=s3://models-bucket/tritonvision" in c["args"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert "initContainers" not in pod(m), "nothing to copy: Triton downloads the repository itself"
    g = server(mg := render(GCS))
    env = {e["name"]: e.get("value") for e in g["env"]}
    mounts = {v["name"]: v["mountPath"] for v in g["volumeMounts"]}
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == mounts["cloud-credentials"] + "/key.json"
    assert volumes(mg)["cloud-credentials"]["secret"] == {"secretName": "gcs-sa", "items": [{"key": "key.json", "path": "key.json"}]}


def test_an_object_store_repository_cannot_be_combined_with_the_pod_local_engine_build():
    with pytest.raises(helm.HelmValuesError):
        render({"modelRepository": {"url": "s3://b/p"}})  # engineBuild.enabled defaults to true
    with pytest.raises(helm.HelmValuesError):
        render({"modelRepository": {"url": "http://b/p"}, "engineBuild": {"enabled": False}})


def test_the_liveness_probe_sends_a_photo_the_container_has_when_triton_downloads_the_repository():
    import re

    c = server(m := render(S3))
    (image,) = [a.split("=", 1)[1] for a in c["livenessProbe"]["exec"]["command"] if a.startswith("--image=")]
    # Nothing is copied to the repository's mount for a downloaded repository (no init container): the photo
    # comes from the image, where deploy/Dockerfile copies the project into its WORKDIR.
    assert "initContainers" not in pod(m) and not image.startswith("/models/")
    dockerfile = (CHART.parents[2] / "deploy" / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", final_stage, flags=re.MULTILINE)
    assert re.search(r"^COPY \. \.$", final_stage, flags=re.MULTILINE)
    assert (CHART.parents[2] / Path(image).relative_to(workdir)).is_file()
    # A copied repository (the image's, a volume's) has it at the mount.
    assert "--image=/models/preprocess/warmup/photo.jpg" in server(render(PVC))["livenessProbe"]["exec"]["command"]


def test_a_mig_slice_is_the_gpu_the_engine_is_built_on():
    # MIG nodes (mixed strategy) offer slices as their own resources and no nvidia.com/gpu.
    mig = {"resources": {"limits": {"nvidia.com/gpu": None, "nvidia.com/mig-3g.40gb": 1, "memory": "24Gi"}},
           "engineBuild": {"resources": {"limits": {"memory": "8Gi"}}}}
    m = render(mig)
    (init,) = pod(m)["initContainers"]
    assert init["resources"]["limits"] == {"nvidia.com/mig-3g.40gb": 1, "memory": "8Gi"}
    assert server(m)["resources"]["limits"] == {"nvidia.com/mig-3g.40gb": 1, "memory": "24Gi"}
    validate_all(m)
    lint(mig)


@pytest.mark.parametrize("values, volume", [(PVC, {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}),
                                            (NFS, {"nfs": {"server": "nfs.internal", "path": "/exports/models", "readOnly": True}})])
def test_a_volume_repository_is_copied_and_gets_its_engine_built(values, volume):
    m = render(values)
    assert {k: v for k, v in volumes(m)["model-source"].items() if k != "name"} == volume
    (init,) = pod(m)["initContainers"]
    mount = next(v for v in init["volumeMounts"] if v["name"] == "model-source")
    assert mount["readOnly"] is True and mount["mountPath"] == "/model-source"
    assert mount.get("subPath") == values["modelRepository"].get("persistentVolumeClaim", {}).get("subPath")
    assert init["args"][0].startswith("cp -r /model-source/. /models/ &&") and "build_engines.py engine" in init["args"][0]
    assert "--model-repository=/models" in server(m)["args"]


def test_two_repository_sources_at_once_are_refused():
    with pytest.raises(Exception, match="at most one"):
        render({"modelRepository": {"persistentVolumeClaim": {"claimName": "a"}, "nfs": {"server": "n", "path": "/x"}}})
    with pytest.raises(Exception, match="needs modelRepository.nfs.server"):
        render({"modelRepository": {"nfs": {"path": "/exports/models"}}})
    with pytest.raises(helm.HelmValuesError):
        render({"modelRepository": {"nfs": {"server": "nfs.internal"}}})


def test_a_headless_service_resolves_to_every_pod_for_client_side_balancing():
    m = render()
    headless = m["Service/tv-tritonvision-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == m["Service"]["spec"]["selector"]
    assert [(p["name"], p["appProtocol"]) for p in headless["spec"]["ports"]] == [("grpc", "grpc")]
    assert "Service/tv-tritonvision-headless" not in render({"service": {"headless": False}})
    # Connections that age out make balancing clients resolve the name again and find new pods.
    args = server(render({"server": {"grpcMaxConnectionAgeSeconds": 300, "grpcMaxConnectionAgeGraceSeconds": 60}}))["args"]
    assert "--grpc-max-connection-age=300000" in args and "--grpc-max-connection-age-grace=60000" in args
    assert not any("max-connection-age" in a for a in server(m)["args"])


def test_ingress_and_grpcroute_send_grpc_to_the_service_with_tls():
    m = render(EVERYTHING)
    ing = m["Ingress"]
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"  # server TLS on
    assert ing["spec"]["tls"] == [{"hosts": ["tritonvision.example.com"], "secretName": "tv-public-tls"}]
    (path,) = ing["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"] == {"name": "tv-tritonvision", "port": {"name": "grpc"}}
    route = m["GRPCRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateways"}]
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "tv-tritonvision", "port": 8001}]
    plain = render({"ingress": {"enabled": True}})["Ingress"]
    assert plain["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    with pytest.raises(helm.HelmValuesError):
        render({"gateway": {"enabled": True}})  # a route attached to nothing


@pytest.mark.parametrize("exposed", [{"ingress": {"enabled": True}},
                                     {"gateway": {"enabled": True, "parentRefs": [{"name": "public"}]}},
                                     {"service": {"type": "LoadBalancer"}}, {"service": {"type": "NodePort"}}])
def test_administrative_rpcs_are_not_published_outside_the_cluster_without_the_access_key(exposed):
    # The proxies route every RPC of the service: without the key anyone outside could unload the models
    # (model-repository), read statistics, or register /dev/shm keys of the pod (Triton before 2.68).
    with pytest.raises(helm.HelmValuesError):
        render({**exposed, "accessKey": {"enabled": False, "name": "tritonvision-admin", "existingSecret": ""}})
    validate_all(render(exposed))
    validate_all(render({"accessKey": {"enabled": False, "name": "tritonvision-admin", "existingSecret": ""}}))


def test_the_ingress_presents_a_client_certificate_to_a_server_that_requires_one():
    # Under tls.mutual Triton refuses a TLS handshake without a client certificate: ingress-nginx then
    # presents the server's own (the Secret the liveness probe presents too; it carries ca.crt as well).
    def annotations(values):
        return render(values)["Ingress"]["metadata"]["annotations"]

    assert annotations(EVERYTHING)["nginx.ingress.kubernetes.io/proxy-ssl-secret"] == "ml/tv-tls"
    one_way = {"ingress": {"enabled": True}, "tls": {"enabled": True, "secretName": "tv-tls"}}
    assert "nginx.ingress.kubernetes.io/proxy-ssl-secret" not in annotations(one_way)
    own = {"nginx.ingress.kubernetes.io/proxy-ssl-secret": "ingress/edge-client"}
    mine = annotations({**EVERYTHING, "ingress": {**EVERYTHING["ingress"], "annotations": own}})
    assert mine["nginx.ingress.kubernetes.io/proxy-ssl-secret"] == "ingress/edge-client"  # the user's wins, once


def test_the_ingress_refuses_requests_larger_than_the_largest_accepted_image():
    from tritonvision import spec

    def body_limit(values):
        return render(values)["Ingress"]["metadata"]["annotations"].get("nginx.ingress.kubernetes.io/proxy-body-size")

    size = body_limit({"ingress": {"enabled": True}})
    assert size.endswith("m")
    # nginx's "m" is MiB: room for the largest image the header check accepts and its framing, little more.
    assert spec.IMAGE_LIMITS.max_bytes < int(size[:-1]) * 2**20 <= spec.IMAGE_LIMITS.max_bytes + 2 * 2**20
    own = {"nginx.ingress.kubernetes.io/proxy-body-size": "8m"}
    assert body_limit({"ingress": {"enabled": True, "annotations": own}}) == "8m"  # the user's wins, once
    assert body_limit({"ingress": {"enabled": True, "maxRequestSize": ""}}) is None


def test_the_server_keeps_no_grpc_request_objects_for_reuse_unless_asked():
    def pool_args(values):
        return [a for a in server(render(values))["args"] if "allocation-pool" in a]

    assert pool_args({}) == ["--grpc-infer-allocation-pool-size=0"]
    assert pool_args({"server": {"grpcRequestPool": 8}}) == ["--grpc-infer-allocation-pool-size=8"]
    assert pool_args({"server": {"grpcRequestPool": None}}) == []


def test_only_the_kubelet_and_the_helm_test_reach_the_plain_http_port():
    # Triton's HTTP port serves inference without TLS: open to the cluster, it would let any pod around gRPC's
    # TLS, client certificates included. Probes come from the node, which a NetworkPolicy always lets through.
    m = render(EVERYTHING)
    policy = m["NetworkPolicy"]
    assert policy["spec"]["podSelector"] == m["Deployment"]["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert set(rules) == {"http", "grpc", "metrics"} and all(len(r["ports"]) == 1 for r in rules.values())
    assert "from" not in rules["grpc"] and "from" not in rules["metrics"]  # anyone, by default
    (peer,) = rules["http"]["from"]
    selected = peer["podSelector"]["matchLabels"].items()
    assert selected <= m["Pod"]["metadata"]["labels"].items(), "the helm test pod must reach the http port"
    assert not selected <= m["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert set(peer) == {"podSelector"}, "only pods of the release's namespace"
    validate_all(m)

    team = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vision-clients"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    debug = {"podSelector": {"matchLabels": {"role": "debug"}}}
    own = render({"networkPolicy": {"grpcFrom": [team], "metricsFrom": [monitoring], "httpFrom": [debug]}})
    rules = {r["ports"][0]["port"]: r for r in own["NetworkPolicy"]["spec"]["ingress"]}
    assert rules["grpc"]["from"] == [team] and rules["metrics"]["from"] == [monitoring]
    assert rules["http"]["from"][1:] == [debug]
    validate_all(own)
    assert "NetworkPolicy" not in render({"networkPolicy": {"enabled": False}})
    with pytest.raises(helm.HelmValuesError):
        render({"networkPolicy": {"grpcFrom": [{"cidr": "10.0.0.0/8"}]}})  # not a NetworkPolicyPeer


def test_server_tls_comes_from_a_secret():
    m = render(EVERYTHING)
    args = server(m)["args"]
    assert {"--grpc-use-ssl=true", "--grpc-server-cert=/etc/tritonvision/tls/tls.crt",
            "--grpc-server-key=/etc/tritonvision/tls/tls.key", "--grpc-use-ssl-mutual=true",
            "--grpc-root-cert=/etc/tritonvision/tls/ca.crt"} <= set(args)
    assert volumes(m)["tls"]["secret"]["secretName"] == "tv-tls"
    assert {"name": "tls", "mountPath": "/etc/tritonvision/tls", "readOnly": True} in server(m)["volumeMounts"]
    assert not any("ssl" in a for a in server(render())["args"])
    with pytest.raises(helm.HelmValuesError):
        render({"tls": {"enabled": True}})


def test_escape_hatches_reach_the_pod():
    m = render(EVERYTHING)
    spec, c = pod(m), server(m)
    assert spec["runtimeClassName"] == "nvidia" and spec["priorityClassName"] == "inference-critical"
    assert m["Deployment"]["spec"]["template"]["metadata"]["labels"]["team"] == "vision"
    assert volumes(m)["certs"]["configMap"] == {"name": "corp-ca"}
    assert {"name": "certs", "mountPath": "/etc/corp-ca", "readOnly": True} in c["volumeMounts"]
    assert c["envFrom"] == [{"configMapRef": {"name": "triton-env"}}]
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    digest = "ghcr.io/example/tritonvision-server@sha256:" + "ab" * 32
    assert c["image"] == digest and all(i["image"] == digest for i in spec["initContainers"])
    for bad in ({"image": {"digest": "latest"}}, {"extraVolumes": [{"emptyDir": {}}]}, {"runtimeClassName": 1}):
        with pytest.raises(helm.HelmValuesError):
            render(bad)


def test_every_pod_pulls_with_the_registry_secrets():
    # A cluster that pulls through a private mirror needs them for the helm test's image as well.
    m = render({"imagePullSecrets": [{"name": "mirror"}], "tests": {"image": "mirror.example.com/curlimages/curl:8.10.1"}})
    assert pod(m)["imagePullSecrets"] == [{"name": "mirror"}]
    assert m["Pod"]["spec"]["imagePullSecrets"] == [{"name": "mirror"}]
    assert "imagePullSecrets" not in render()["Pod"]["spec"]


def test_the_disruption_budget_lets_a_one_pod_install_drain():
    pdb = render({"autoscaling": {"enabled": False}, "replicaCount": 1})["PodDisruptionBudget"]["spec"]
    # kubectl drain evicts through the budget: with one pod, minAvailable 1 would block it for ever.
    assert pdb == {"maxUnavailable": 1, "selector": pdb["selector"]}
    floor = render({"podDisruptionBudget": {"minAvailable": 2}, "autoscaling": {"minReplicas": 3}})["PodDisruptionBudget"]["spec"]
    assert floor["minAvailable"] == 2 and "maxUnavailable" not in floor


@pytest.mark.parametrize("values", [
    {"autoscaling": {"enabled": False}, "replicaCount": 1, "podDisruptionBudget": {"minAvailable": 1}},
    {"autoscaling": {"enabled": False}, "replicaCount": 3, "podDisruptionBudget": {"minAvailable": 3}},
    # The autoscaler's floor is where the pods sit when the load is low, when nodes are drained.
    {"autoscaling": {"minReplicas": 2}, "podDisruptionBudget": {"minAvailable": 2}},
    {"podDisruptionBudget": {"minAvailable": "100%"}},
])
def test_a_floor_that_would_block_every_drain_is_refused(values):
    # A budget that allows no eviction at the usual replica count makes `kubectl drain` (node upgrades,
    # autoscaler scale-down) wait for ever.
    with pytest.raises(helm.HelmRenderError, match="minAvailable"):
        render(values)


def test_summary_latencies_alerts_and_dashboard():
    m = render(EVERYTHING)
    assert "--metrics-config=summary_latencies=true" in server(m)["args"]
    assert not any(a.startswith("--metrics-config") for a in server(render({"metrics": {"summaryLatencies": False}}))["args"])
    (group,) = m["PrometheusRule"]["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == {"TritonvisionQueueTimeOverBudget", "TritonvisionFailureRatio", "TritonvisionPodRestarts"}
    assert "> 20000" in alerts["TritonvisionQueueTimeOverBudget"]["expr"]
    failure_ratio = alerts["TritonvisionFailureRatio"]["expr"]
    assert 'namespace="ml",pod=~"tv-tritonvision-.*"' in failure_ratio
    # Server failures only: refused images (clients' errors) are subtracted, also before the first one, from
    # the ensemble's failures counted once per request.
    assert 'sum(rate(tritonvision_refused_images_total{namespace="ml",pod=~"tv-tritonvision-.*"}[10m])) or vector(0)' in failure_ratio
    assert 'model="classifier"}[10m])) / 2\n' in failure_ratio
    once = render({**EVERYTHING, "metrics": {**EVERYTHING["metrics"], "prometheusRule": {"enabled": True, "ensembleFailuresPerRequest": 1}}})
    (group,) = once["PrometheusRule"]["spec"]["groups"]
    assert 'model="classifier"}[10m])) / 1\n' in next(r["expr"] for r in group["rules"] if r["alert"] == "TritonvisionFailureRatio")
    dashboard = json.loads(m["ConfigMap"]["data"]["tritonvision.json"])
    assert m["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us", "nv_inference_exec_count",
                   "nv_inference_request_failure", "DCGM_FI_DEV_GPU_UTIL", 'quantile="0.99"'):
        assert metric in exprs
