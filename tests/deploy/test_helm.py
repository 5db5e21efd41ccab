"""The Helm chart, rendered by the real helm binary: lint --strict, schema
validation of every manifest (kubernetes-validate --strict), and the content
that must agree with the server: flags, probe routes, port, drain timeout,
secrets by reference."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.deploy.conftest import (CHART, CI_VALUES, DOCKERFILES, KUBE_VERSION, NAMESPACE, RELEASE, helm_template,
                                   parse_serve_args, serve_flags)

VALUES = [None, *CI_VALUES]
IDS = ["default", *(p.stem for p in CI_VALUES)]
FULLNAME = RELEASE  # the release name contains the chart name
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}  # no schema in kubernetes-validate; checked below
PORT = 8000


def values_file(name: str) -> Path:
    return next(p for p in CI_VALUES if p.stem == name)


def test_ci_values_cover_every_model_source_and_feature():
    docs = [yaml.safe_load(p.read_text()) for p in CI_VALUES]
    assert {d.get("model", {}).get("source", "bundled") for d in docs} == {"bundled", "hub", "pvc"}
    for feature in ("autoscaling", "keda", "apiKey", "ingress", "serviceMonitor"):
        assert any(feature in d for d in docs), feature


# -- the real tools --------------------------------------------------------------------------------

@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_helm_lint_strict(helm, values):
    out = subprocess.run([helm, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else [])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_manifests_validate_strictly(render, values):
    import kubernetes_validate

    rendered = render(values)
    for doc in rendered.docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)  # raises ValidationError
    assert {"Deployment", "Service", "ServiceAccount"} <= {d["kind"] for d in rendered.docs}


# -- agreement with the server ---------------------------------------------------------------------

@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_every_rendered_flag_exists_in_serve_help(render, values):
    rendered = render(values)
    unknown = set(rendered.flags) - serve_flags()
    assert not unknown, f"flags the server does not have: {sorted(unknown)}"
    for env in rendered.container.get("env", []):
        if env["name"].startswith("LLADA_SERVE_"):
            flag = "--" + env["name"].removeprefix("LLADA_SERVE_").lower().replace("_", "-")
            assert flag in serve_flags(), env["name"]


def engine_values(values: Path | None) -> dict:
    """engine.* after the values file is laid over values.yaml."""
    engine = yaml.safe_load((CHART / "values.yaml").read_text())["engine"]
    if values is not None:
        engine.update(yaml.safe_load(values.read_text()).get("engine", {}))
    return engine


def snake(key: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in key)


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_server_parses_the_rendered_args_into_the_values(render, values):
    """Types too: whole numbers render as 4194304, not 4.194304e+06."""
    args = parse_serve_args(render(values).container["args"])
    assert args.host == "0.0.0.0" and args.port == PORT
    for key, value in engine_values(values).items():
        if value is not None:
            assert getattr(args, snake(key)) == value, key


def test_engine_values_cover_every_server_flag():
    """A new server flag needs a chart value (engine.* in values.yaml and values.schema.json)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    by_chart = {"--host", "--port", "--model", "--served-model-name", "--api-key"}
    engine = {"--" + snake(key).replace("_", "-") for key in values["engine"]}
    # A switch on by default (--enforce-eager) is covered by the value giving its --no- form.
    negated = {"--" + flag.removeprefix("--no-") for flag in engine if flag.startswith("--no-")}
    missing = serve_flags() - by_chart - engine - negated
    assert not missing, f"server flags with no chart value: {sorted(missing)}"
    assert engine <= serve_flags()


def test_probes_match_the_server_routes_and_port(render):
    from fastapi.testclient import TestClient

    from server.api.app import ServerState, build_app
    from server.config import ServerConfig
    from server.metrics import Metrics

    rendered = render(None)
    c = rendered.container
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http", PORT)]
    assert parse_serve_args(c["args"]).port == PORT
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {k: (p["path"], p["port"]) for k, p in probes.items()} == {
        "startupProbe": ("/health", "http"), "readinessProbe": ("/health", "http"), "livenessProbe": ("/live", "http")}

    # the real app: /health is 503 while loading and draining, /live is 200 throughout
    engine = SimpleNamespace(is_ready=False, is_dead=False)
    state = ServerState(engine, ServerConfig(), "m")
    client = TestClient(build_app(state, Metrics("m")))
    assert client.get("/health").status_code == 503 and client.get("/live").status_code == 200
    engine.is_ready = True
    assert client.get("/health").status_code == 200
    state.draining = True
    assert client.get("/health").status_code == 503 and client.get("/live").status_code == 200
    assert "llada_num_requests_waiting{" in client.get("/metrics").text

    service = rendered.one("Service")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service] == [(PORT, "http")]


def test_startup_probe_allows_loading_16_gb_of_weights(render):
    p = render(values_file("gpu-hub")).container["startupProbe"]
    assert p["periodSeconds"] * p["failureThreshold"] >= 15 * 60


@pytest.mark.parametrize("values,args", [
    *[(v, ()) for v in VALUES],
    (None, ("--set", "engine.drainTimeout=600")),
    (None, ("--set-json", "engine.drainTimeout=0.5", "--set", "preStopSleepSeconds=0")),
], ids=[*IDS, "drain-600", "drain-0.5-no-prestop"])
def test_grace_period_outlasts_prestop_and_drain(render, values, args):
    rendered = render(values, *args)
    drain = float(rendered.flags["--drain-timeout"])
    pre_stop = rendered.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert rendered.pod["terminationGracePeriodSeconds"] >= pre_stop + math.ceil(drain) + 10


# -- resources, secrets, security ------------------------------------------------------------------

def test_gpu_resources_appear_only_when_asked(render):
    assert "nvidia.com/gpu" not in str(render(None).container["resources"])
    gpu = render(values_file("gpu-hub"))
    assert gpu.container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu.container["resources"]["limits"]["memory"] == "48Gi"  # merged, not replaced
    assert gpu.pod["runtimeClassName"] == "nvidia"
    assert gpu.pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    two = render(None, "--set", "gpu.count=2", "--set", "gpu.resourceName=amd.com/gpu")
    assert two.container["resources"]["limits"]["amd.com/gpu"] == 2


def test_api_key_is_a_secret_reference_never_inlined(render, helm):
    rendered = render(values_file("api-key-ingress"))
    assert rendered.env("LLADA_SERVE_API_KEY") == {
        "name": "LLADA_SERVE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llada-api-key", "key": "api-key"}}}
    assert not any(a.startswith("--api-key") for a in rendered.container["args"])
    assert not rendered.all("Secret")
    assert render(None).env("LLADA_SERVE_API_KEY") is None
    # there is no value that would put a key into the manifests
    out = helm_template(helm, "--set", "apiKey.value=sk-secret")
    assert out.returncode != 0 and "sk-secret" not in out.stdout


def test_hub_model_token_and_cache(render):
    rendered = render(values_file("gpu-hub"))
    assert rendered.flags["--model"] == "GSAI-ML/LLaDA-8B-Instruct"
    assert rendered.flags["--served-model-name"] == "llada-8b-instruct"
    assert rendered.env("HF_TOKEN")["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    hf_home = rendered.env("HF_HOME")["value"]
    mounts = {m["mountPath"]: m["name"] for m in rendered.container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert "emptyDir" in volumes[mounts[hf_home]]
    shared = render(values_file("autoscaling-hpa"))
    assert {v["name"]: v for v in shared.pod["volumes"]}["hf-cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache"}


def test_pvc_model_is_mounted_read_only(render):
    rendered = render(values_file("pvc-model"))
    model = rendered.flags["--model"]
    mount = next(m for m in rendered.container["volumeMounts"] if model.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in rendered.pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "llada-checkpoints", "readOnly": True}
    assert model == mount["mountPath"] + "/LLaDA-8B-Instruct"


def test_bundled_model_passes_no_model_flag(render):
    assert "--model" not in render(None).flags


def test_pod_runs_locked_down_with_writable_scratch(render):
    rendered = render(values_file("gpu-hub"))
    pod, c = rendered.pod, rendered.container
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # Service links would inject LLADA_SERVE_PORT=tcp://... (read as the --port default)
    assert pod["enableServiceLinks"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", rendered.env("HOME")["value"], rendered.env("HF_HOME")["value"]):
        assert path in mounts, f"{path} is not writable under a read-only root"
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_image_user_and_home_match_the_dockerfiles(render):
    rendered = render(None)
    uid = rendered.pod["securityContext"]["runAsUser"]
    home = rendered.env("HOME")["value"]
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert f"USER {uid}:" in text and f"HOME={home}" in text, dockerfile.name


# -- scaling and metrics ---------------------------------------------------------------------------

def test_hpa_scales_on_waiting_requests(render):
    rendered = render(values_file("autoscaling-hpa"))
    hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    pods = next(m["pods"] for m in hpa["metrics"] if m["type"] == "Pods")
    assert pods["metric"]["name"] == "llada_num_requests_waiting"
    assert pods["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert "replicas" not in rendered.one("Deployment")["spec"]  # the HPA owns it
    assert "replicas" in render(None).one("Deployment")["spec"]


def test_keda_scaledobject_and_servicemonitor(render):
    rendered = render(values_file("keda"))
    so = rendered.one("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"name": FULLNAME}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 6)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values())  # KEDA's metadata is map[string]string
    assert meta["query"] == f'sum(llada_num_requests_waiting{{namespace="{NAMESPACE}",service="{FULLNAME}"}})'
    assert meta["threshold"] == "8"
    assert not rendered.all("HorizontalPodAutoscaler") and "replicas" not in rendered.one("Deployment")["spec"]

    sm = rendered.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert sm["spec"]["selector"]["matchLabels"] == rendered.one("Service")["spec"]["selector"]


def test_pod_annotations_point_prometheus_at_metrics(render):
    ann = render(None).one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics", "prometheus.io/port": str(PORT)}


def test_ingress_routes_to_the_service(render):
    rendered = render(values_file("api-key-ingress"))
    rule = rendered.one("Ingress")["spec"]["rules"][0]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": rendered.one("Service")["metadata"]["name"], "port": {"name": "http"}}


def test_pdb_selects_the_pods(render):
    rendered = render(None)
    assert rendered.one("PodDisruptionBudget")["spec"]["selector"] == rendered.one("Deployment")["spec"]["selector"]


# -- bad values are refused with a clear message ---------------------------------------------------

SCHEMA_ERRORS = {
    "string-for-int": ("engine:\n  maxNumSeqs: sixteen\n", "at '/engine/maxNumSeqs': got string, want null or integer"),
    "quoted-gpu-count": ("gpu:\n  count: '1'\n", "at '/gpu/count': got string, want integer"),
    "bad-dtype": ("engine:\n  dtype: bf16\n", "at '/engine/dtype'"),
    "gpu-utilization-over-1": ("engine:\n  gpuMemoryUtilization: 1.5\n", "at '/engine/gpuMemoryUtilization'"),
    "typo": ("engine:\n  maxNumSeq: 4\n", "additional properties 'maxNumSeq' not allowed"),
    "hub-without-id": ("model:\n  source: hub\n", "at '/model/hub/id': minLength"),
    "bad-source": ("model:\n  source: s3\n", "at '/model/source'"),
    "pvc-without-claim": ("model:\n  source: pvc\n", "at '/model/pvc/claimName': minLength"),
    "hpa-and-keda": ("autoscaling:\n  enabled: true\nkeda:\n  enabled: true\n", "at '/keda/enabled': value must be false"),
}


@pytest.mark.parametrize("bad,message", SCHEMA_ERRORS.values(), ids=SCHEMA_ERRORS.keys())
def test_schema_refuses_bad_values_with_a_clear_message(helm, tmp_path, bad, message):
    values = tmp_path / "bad.yaml"
    values.write_text(bad)
    out = helm_template(helm, "-f", str(values))
    assert out.returncode != 0 and message in out.stderr, out.stderr
    lint = subprocess.run([helm, "lint", "--strict", str(CHART), "-f", str(values)],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode != 0 and message in lint.stdout + lint.stderr


def test_hpa_without_a_target_is_refused(helm):
    out = helm_template(helm, "--set", "autoscaling.enabled=true", "--set", "autoscaling.targetRequestsWaiting=null")
    assert out.returncode != 0
    assert "autoscaling.enabled needs autoscaling.targetCPUUtilizationPercentage or" in out.stderr, out.stderr


def test_tensor_parallel_gets_its_gpus_and_shared_memory(render, helm):
    flash = render(values_file("llada2-flash-8gpu"))
    assert flash.flags["--tensor-parallel-size"] == "8"
    assert flash.container["resources"]["limits"]["nvidia.com/gpu"] == 8
    (shm,) = [v for v in flash.pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in flash.container["volumeMounts"]
    # A GPU count below the ranks is raised to them.
    raised = render(values_file("gpu-hub"), "--set", "engine.tensorParallelSize=2")
    assert raised.container["resources"]["limits"]["nvidia.com/gpu"] == 2
    out = subprocess.run([helm, "template", "x", str(CHART), "-f", str(values_file("llada2-flash-8gpu")),
                          "--set", "shm.enabled=false"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "needs shm.enabled" in out.stderr
