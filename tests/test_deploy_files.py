"""The deployment files hold what a cluster needs, checked without a container engine.

There is no Docker engine on the test machines, so each part is checked directly: the compose file
as data, the HAProxy config with the real ``haproxy -c``, the Dockerfile instruction by instruction,
and the Kubernetes manifests against the Kubernetes JSON schemas that kubernetes-validate ships
(offline: no cluster, no network).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broadcast.gateway.command import build_parser
from broadcast.gateway.server import DRAIN_TIMEOUT_SECONDS
from broadcast.protocol.limits import DEFAULT_PORT

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
K8S = ROOT / "deploy" / "k8s"

# The oldest Kubernetes minor still commonly run, and the newest the installed schemas know.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def _seconds(duration: str | int | float) -> float:
    """A compose duration (``30s``, ``1m30s``, ``1500ms``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -- docker-compose.yml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_compose_has_the_three_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {"redis", "gateway", "lb"}


def test_compose_redis_is_official_redis_7_with_a_ping_healthcheck(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7" or redis["image"].startswith("redis:7.")
    test = redis["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli" in command and "ping" in command


def test_compose_gateway_is_built_from_the_dockerfile(compose: dict[str, Any]) -> None:
    build = compose["services"]["gateway"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_gateway_can_scale(compose: dict[str, Any]) -> None:
    """A fixed host port or container name breaks ``--scale gateway=N``."""
    gateway = compose["services"]["gateway"]
    assert "ports" not in gateway, "only the load balancer may publish a host port"
    assert "container_name" not in gateway
    assert "BROADCAST_NODE_ID" not in _env(gateway), "replicas would share one node id"


def test_compose_gateway_reaches_redis_and_listens_on_all_interfaces(
    compose: dict[str, Any],
) -> None:
    gateway = compose["services"]["gateway"]
    env = _env(gateway)
    assert env["BROADCAST_REDIS_URL"] == "redis://redis:6379/0"
    assert env["BROADCAST_HOST"] == "0.0.0.0"
    assert int(env.get("BROADCAST_PORT", DEFAULT_PORT)) == DEFAULT_PORT
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_gateway_has_a_healthcheck(compose: dict[str, Any]) -> None:
    # Podman builds OCI images, which drop the Dockerfile's HEALTHCHECK: compose repeats it.
    test = compose["services"]["gateway"]["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert f"http://127.0.0.1:{DEFAULT_PORT}/healthz" in command
    assert "curl" not in command and "wget" not in command, "python:3.11-slim has neither"


def test_compose_gateway_gets_time_to_drain(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert gateway.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert _seconds(gateway["stop_grace_period"]) > DRAIN_TIMEOUT_SECONDS + 5


def test_compose_lb_publishes_the_one_port_and_mounts_the_haproxy_config(
    compose: dict[str, Any],
) -> None:
    lb = compose["services"]["lb"]
    assert lb["image"].split(":")[0] == "haproxy"
    assert f"127.0.0.1:{DEFAULT_PORT}:{DEFAULT_PORT}" in [str(p) for p in lb["ports"]]
    mounts = [v.split(":") for v in lb["volumes"]]
    cfg = [m for m in mounts if m[1] == "/usr/local/etc/haproxy/haproxy.cfg"]
    assert len(cfg) == 1, mounts
    source, _, mode = cfg[0]
    assert (COMPOSE.parent / source).resolve() == HAPROXY_CFG
    assert HAPROXY_CFG.is_file()
    assert mode == "ro"
    depends = lb["depends_on"]
    assert "gateway" in depends


# -- deploy/compose/{sentinel,cluster}.yml: files added to docker-compose.yml with -f ----------

COMPOSE_OVERRIDES = {
    "sentinel.yml": "redis+sentinel",
    "cluster.yml": "redis+cluster",
}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def _merged(override: str) -> dict[str, dict[str, Any]]:
    """The services of ``docker compose -f docker-compose.yml -f deploy/compose/<override>``:
    a service in both has its mappings merged key by key, the override's scalars and lists
    winning (as compose merges command, entrypoint and depends_on lists)."""

    def merge(base: Any, extra: Any) -> Any:
        if isinstance(base, dict) and isinstance(extra, dict):
            return {k: merge(base[k], extra[k]) if k in base and k in extra else
                    extra.get(k, base.get(k)) for k in {**base, **extra}}  # fmt: skip
        return extra

    base = yaml.safe_load(COMPOSE.read_text())["services"]
    extra = yaml.safe_load((ROOT / "deploy" / "compose" / override).read_text())
    assert set(extra) <= {"services"} | {key for key in extra if key.startswith("x-")}
    return merge(base, extra["services"])


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [text for value in node.values() for text in _strings(value)]
    if isinstance(node, list):
        return [text for value in node for text in _strings(value)]
    return [node] if isinstance(node, str) else []


def _depends(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on", {})
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


@pytest.mark.parametrize("override", sorted(COMPOSE_OVERRIDES))
def test_compose_override_merges_into_a_runnable_project(override: str) -> None:
    services = _merged(override)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for needed, condition in _depends(service).items():
            assert needed in services, f"{name} depends on unknown service {needed}"
            assert condition in DEPENDS_CONDITIONS, condition
            if condition == "service_healthy":
                assert "healthcheck" in services[needed], f"{needed} has no healthcheck"
        # Compose interpolates $VAR and ${VAR} in every string: the shell's need $$.
        for text in _strings(service):
            assert not re.search(r"\$[{A-Za-z_]", text.replace("$$", "")), text
    assert services["gateway"]["build"]  # still the gateways of docker-compose.yml


@pytest.mark.parametrize("override", sorted(COMPOSE_OVERRIDES))
def test_compose_override_points_the_gateways_at_its_redis(override: str) -> None:
    from broadcast.redis.cluster import parse_cluster_url
    from broadcast.redis.sentinel import parse_sentinel_url

    services = _merged(override)
    url = _env(services["gateway"])["BROADCAST_REDIS_URL"]
    assert url.startswith(COMPOSE_OVERRIDES[override] + "://")
    build_parser()[0].parse_args(["start", "--redis-url", url])  # the gateway takes it
    if override == "sentinel.yml":
        config = parse_sentinel_url(url)
        hosts = config.sentinels
        sentinels = [name for name in services if name.startswith("sentinel-")]
        assert len(sentinels) == 3 and {h for h, _ in hosts} == set(sentinels)
        for name in sentinels:
            script = "\n".join(services[name]["command"])
            assert f"sentinel monitor {config.master_name} redis 6379 2" in script
            assert "port 26379" in script and "--sentinel" in script
        replica = services["redis-replica"]["command"]
        assert replica[replica.index("--replicaof") + 1 :] == ["redis", "6379"]
    else:
        hosts = parse_cluster_url(url).seeds
        nodes = [name for name in services if name == "redis" or name.startswith("redis-")]
        assert len(nodes) == 3 and {h for h, _ in hosts} == set(nodes)
        for name in nodes:
            node = services[name]
            assert node["image"] == "redis:7"  # sharded pub/sub needs Redis 7
            command = node["command"]
            assert command[command.index("--cluster-enabled") + 1] == "yes"
        init = "\n".join(services["cluster-init"]["command"])
        assert "redis-cli --cluster create" in init and "--cluster-replicas 0" in init
        assert _depends(services["gateway"])["cluster-init"] == "service_completed_successfully"
    assert all(port in (6379, 26379) for _, port in hosts)


@pytest.mark.parametrize("override", sorted(COMPOSE_OVERRIDES))
def test_readme_starts_each_redis_compose_file_with_one_command(override: str) -> None:
    command = (
        f"docker compose -f docker-compose.yml -f deploy/compose/{override} up --build"
        " --scale gateway=3"
    )
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert command in readme
    assert command in (ROOT / "deploy" / "compose" / override).read_text()


# -- deploy/haproxy/haproxy.cfg ------------------------------------------------------------------


def _haproxy_sections(text: str) -> dict[str, list[str]]:
    """``{"frontend broadcast": [directive lines], ...}``, comments and blank lines dropped."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            current.append(" ".join(line.split()))
    return sections


def test_haproxy_config_passes_haproxy_check() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed: run scripts/install-system-deps")
    # `gateway` does not resolve here: `init-addr none` must let the config load anyway.
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Configuration file is valid" in output
    assert "[ALERT]" not in output


def test_haproxy_config_balances_raw_tcp_over_ready_gateways() -> None:
    sections = _haproxy_sections(HAPROXY_CFG.read_text())
    resolvers = sections["resolvers docker"]
    assert "parse-resolv-conf" in resolvers, "a hard-coded 127.0.0.11 works only under Docker"
    assert not any(line.startswith("nameserver") for line in resolvers)
    hold_valid = next(line for line in resolvers if line.startswith("hold valid"))
    assert _seconds(hold_valid.split()[-1]) <= 10

    frontend = sections["frontend broadcast"]
    assert f"bind :{DEFAULT_PORT}" in frontend
    assert "default_backend gateways" in frontend

    defaults = sections["defaults"]
    backend = sections["backend gateways"]
    assert "mode tcp" in defaults and "mode tcp" in backend and "mode http" not in frontend
    for timeout in ("client", "server", "tunnel"):
        line = next(line for line in defaults if line.startswith(f"timeout {timeout} "))
        assert _seconds(line.split()[-1]) >= 3600, line

    assert "balance leastconn" in backend
    assert "option httpchk GET /readyz" in backend
    assert "http-check expect status 200" in backend
    template = [line for line in backend if line.startswith("server-template ")]
    assert len(template) == 1
    words = template[0].split()
    assert words[3] == f"gateway:{DEFAULT_PORT}"
    assert int(words[2]) >= 3
    for option in ("check", "resolvers docker", "init-addr none", "resolve-prefer ipv4"):
        assert f" {option}" in template[0], option


# -- deploy/Dockerfile and .dockerignore ---------------------------------------------------------


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Each build stage as a list of (INSTRUCTION, arguments), ARG defaults substituted."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "a continuation line at the end of the Dockerfile"
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip()
        for name, value in args.items():
            rest = rest.replace("${" + name + "}", value).replace("$" + name, value)
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, rest.strip()))
    return stages


def _instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for instruction, rest in stage if instruction == name]


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    builder_from, final_from = stages[0][0][1].split(), stages[-1][0][1].split()
    assert builder_from[-2].upper() == "AS"
    assert final_from[0] == "python:3.11-slim"
    builder = builder_from[-1]
    final = stages[-1]
    assert any(f"--from={builder}" in rest for rest in _instructions(final, "COPY"))


def test_dockerfile_builder_installs_the_repo_with_pip() -> None:
    builder = _dockerfile_stages()[0]
    runs = " && ".join(_instructions(builder, "RUN"))
    assert re.search(r"\bpip install (\S+ )*\.(\s|$)", runs), runs
    assert "-e ." not in runs and "--editable" not in runs
    for copy in _instructions(builder, "COPY"):
        for source in copy.split()[:-1]:
            if not source.startswith("--"):
                assert (ROOT / source).exists(), f"COPY of a missing {source}"


def test_dockerfile_final_stage_has_no_build_tools_and_runs_as_non_root() -> None:
    final = _dockerfile_stages()[-1]
    runs = " ".join(_instructions(final, "RUN"))
    for tool in ("gcc", "g++", "clang", "build-essential", "make ", "pip install", "apt-get"):
        assert tool not in runs, f"{tool!r} in the final stage"
    users = _instructions(final, "USER")
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # A numeric uid lets Kubernetes' runAsNonRoot verify it; deploy/k8s uses the same one.
    assert user.isdigit()


def test_dockerfile_final_stage_serves_the_gateway_with_a_healthcheck() -> None:
    final = _dockerfile_stages()[-1]
    assert str(DEFAULT_PORT) in " ".join(_instructions(final, "EXPOSE")).split()
    env = " ".join(_instructions(final, "ENV"))
    assert "BROADCAST_HOST=0.0.0.0" in env
    (healthcheck,) = _instructions(final, "HEALTHCHECK")
    assert "CMD" in healthcheck and "python" in healthcheck
    assert "http://127.0.0.1:" in healthcheck and "/healthz" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck
    (cmd,) = _instructions(final, "CMD")
    assert json.loads(cmd) == ["broadcast-server", "start"], "exec form: the gateway gets SIGTERM"


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/"))
            for p in patterns
        )

    for path in (".venv", ".git", ".pytest_cache", ".ruff_cache", "artifacts", "__pycache__"):
        assert ignored(path), f"{path} is sent to the build"
    for path in ("pyproject.toml", "README.md", "services", "cli", "deploy/Dockerfile"):
        assert not ignored(path), f"{path} is needed by the build"


# -- deploy/k8s ----------------------------------------------------------------------------------
#
# Three kustomizations: base/ (the gateways), the directory itself (base/ and a disposable Redis,
# for trying) and production/ (base/ with TLS, Secrets and an Ingress). They are rendered here by a
# small kustomize of our own (resources and JSON 6902 patches are all they use), so no binary is
# needed; where kubectl is installed its rendering must agree.

TRIAL, PRODUCTION = K8S, K8S / "production"
# What the Ingress may route from outside: the web page, its files and the WebSocket endpoint.
PUBLIC_PATHS = {"/", "/index.html", "/app.js", "/style.css"}

Manifests = dict[tuple[str, str], dict[str, Any]]


def _render(directory: Path) -> Manifests:
    """Every resource of the kustomization in ``directory``, by (kind, name), patches applied."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    found: Manifests = {}
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        if path.is_dir():
            found.update(_render(path))
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    for patch in kustomization.get("patches", []):
        target = found[(patch["target"]["kind"], patch["target"]["name"])]
        for operation in yaml.safe_load((directory / patch["path"]).read_text()):
            _apply(target, operation)
    return found


def _apply(doc: dict[str, Any], operation: dict[str, Any]) -> None:
    """One JSON 6902 operation (add, replace, test: all the patches here use)."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in
                      operation["path"].lstrip("/").split("/")]  # fmt: skip
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op, value = operation["op"], operation.get("value")
    if op == "test":
        current = node[int(last)] if isinstance(node, list) else node[last]
        assert current == value, f"patch test failed at {operation['path']}: {current!r}"
    elif op == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), value)
    elif op in ("add", "replace"):
        key = int(last) if isinstance(node, list) else last
        if op == "replace":
            node[key]  # replace needs the member to exist: KeyError or IndexError if not
        node[key] = value
    else:
        raise AssertionError(f"unsupported patch operation {op!r}")


def _manifests(directory: Path = TRIAL) -> Manifests:
    return _render(directory)


@pytest.mark.parametrize("directory", [K8S / "base", TRIAL, PRODUCTION], ids=lambda p: p.name)
def test_kustomization_uses_every_file_of_its_directory(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    used = {str(r) for r in kustomization["resources"]}
    used |= {p["path"] for p in kustomization.get("patches", [])}
    files = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert files <= used, f"not in {directory.name}/kustomization.yaml: {files - used}"
    assert (K8S / "README.md").is_file()


def test_the_trial_kustomization_is_the_base_plus_a_redis() -> None:
    trial, base = _render(TRIAL), _render(K8S / "base")
    assert set(trial) - set(base) == {("Deployment", "redis"), ("Service", "redis")}
    assert ("Deployment", "redis") not in _render(PRODUCTION)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", [TRIAL, PRODUCTION], ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_the_schemas(directory: Path, version: str) -> None:
    manifests = _render(directory)
    assert manifests
    for (kind, name), doc in manifests.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{kind}/{name} against Kubernetes {version}: {path}: {exc.message}")


@pytest.mark.parametrize("directory", [TRIAL, PRODUCTION], ids=lambda p: p.name)
def test_our_rendering_agrees_with_kubectl_kustomize(directory: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs: Manifests = {}
    for doc in yaml.safe_load_all(result.stdout):
        # kustomize adds the `labels:` of the kustomization; our rendering leaves them out.
        doc["metadata"].get("labels", {}).pop("app.kubernetes.io/part-of", None)
        theirs[(doc["kind"], doc["metadata"]["name"])] = doc
    assert theirs == _render(directory)


def test_the_readme_redis_patch_reads_the_url_from_a_secret_for_each_kind_of_redis() -> None:
    readme = (K8S / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "redis-patch" in b]
    deployment = _render(K8S / "base")[("Deployment", "broadcast-gateway")]
    for operation in yaml.safe_load(block):
        _apply(deployment, operation)
    kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"]["key"] == "url" and "value" not in env[0]
    for scheme in ("rediss://", "redis+sentinel://", "redis+cluster://"):
        assert f"--from-literal=url='{scheme}" in readme, scheme


def _gateway(directory: Path = TRIAL) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = _render(directory)[("Deployment", "broadcast-gateway")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_kubernetes_gateway_deployment_is_probed_and_bounded() -> None:
    deployment, container = _gateway()
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    (port,) = container["ports"]
    assert port["containerPort"] == DEFAULT_PORT
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path
        assert http["port"] in (port["name"], DEFAULT_PORT)
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
    assert container["resources"]["limits"].keys() >= {"memory"}

    env = {e["name"]: e.get("value") for e in container["env"]}
    redis_service = _manifests()[("Service", "redis")]
    assert env["BROADCAST_REDIS_URL"] == (
        f"redis://{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}/0"
    )
    assert env["BROADCAST_HOST"] == "0.0.0.0"

    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pause = float(pre_stop[-1]) if pre_stop and pre_stop[0] == "sleep" else 0.0
    assert pod["terminationGracePeriodSeconds"] > pause + DRAIN_TIMEOUT_SECONDS + 5


def test_kubernetes_gateway_runs_as_the_image_user_on_a_read_only_root() -> None:
    deployment, container = _gateway()
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    security = container["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    final = _dockerfile_stages()[-1]
    image_uid = _instructions(final, "USER")[-1].split(":")[0]
    assert str(pod_security["runAsUser"]) == image_uid
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_kubernetes_service_and_pdb_select_the_gateway_pods() -> None:
    manifests = _manifests()
    deployment, container = _gateway()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = manifests[("Service", "broadcast-gateway")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == DEFAULT_PORT
    assert port.get("protocol", "TCP") == "TCP"
    assert port["targetPort"] in (container["ports"][0]["name"], DEFAULT_PORT)

    pdbs = [doc for (kind, _), doc in manifests.items() if kind == "PodDisruptionBudget"]
    (pdb,) = pdbs
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    spec = pdb["spec"]
    assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == 2


@pytest.mark.parametrize("directory", [TRIAL, PRODUCTION], ids=lambda p: p.name)
def test_kubernetes_services_stay_inside_the_cluster(directory: Path) -> None:
    """The gateway's port also answers /metrics: no Service may put it on the internet."""
    services = [doc for (kind, _), doc in _render(directory).items() if kind == "Service"]
    assert services
    for service in services:
        spec = service["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert not spec.get("externalIPs"), service["metadata"]["name"]


def _container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("directory", [TRIAL, PRODUCTION], ids=lambda p: p.name)
def test_kubernetes_gateway_requires_tokens_signed_with_a_secret(directory: Path) -> None:
    _, container = _gateway(directory)
    auth = _container_env(container)["BROADCAST_AUTH_SECRET"]
    assert "value" not in auth, "a secret written into the manifest"
    reference = auth["valueFrom"]["secretKeyRef"]
    assert reference["name"] == "broadcast-auth" and reference["key"] == "secret"
    assert reference.get("optional", False) is False, "without the Secret the gateway is open"


@pytest.mark.parametrize("directory", [TRIAL, PRODUCTION], ids=lambda p: p.name)
def test_kubernetes_variables_are_ones_the_gateway_reads(directory: Path) -> None:
    _, container = _gateway(directory)
    variables = {setting.variable for setting in build_parser()[1]}
    assert set(_container_env(container)) <= variables


def test_kubernetes_production_serves_tls_from_a_secret() -> None:
    deployment, container = _gateway(PRODUCTION)
    pod = deployment["spec"]["template"]["spec"]
    env = _container_env(container)
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "broadcast-tls"
    # Readable by the gateway's group, through fsGroup, and by no one else.
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    directory = mount["mountPath"]
    assert env["BROADCAST_TLS_CERT"]["value"] == f"{directory}/tls.crt"
    assert env["BROADCAST_TLS_KEY"]["value"] == f"{directory}/tls.key"
    # The Redis URL carries the password: from a Secret as well.
    redis = env["BROADCAST_REDIS_URL"]
    assert "value" not in redis
    assert redis["valueFrom"]["secretKeyRef"]["name"] == "broadcast-redis"
    # The probes stay plain HTTP: the gateway answers health checks without TLS.
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"].get("scheme", "HTTP") == "HTTP"


def test_kubernetes_production_ingress_routes_the_page_and_websocket_only() -> None:
    manifests = _render(PRODUCTION)
    (ingress,) = [doc for (kind, _), doc in manifests.items() if kind == "Ingress"]
    service = manifests[("Service", "broadcast-gateway")]
    paths = [path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert {path["path"] for path in paths} == PUBLIC_PATHS
    for path in paths:
        # Prefix "/" would carry /metrics, /readyz and /api/... as well.
        assert path["pathType"] == "Exact", path
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] == service["spec"]["ports"][0]["name"]
    assert "defaultBackend" not in ingress["spec"]
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"] == "broadcast-tls"
    # The page served under these names may open its WebSocket only if the gateway trusts them.
    _, container = _gateway(PRODUCTION)
    public = _container_env(container)["BROADCAST_PUBLIC_HOST"]["value"].split(",")
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert hosts == set(tls["hosts"]) and hosts <= set(public)


@pytest.mark.parametrize("directory", [TRIAL, PRODUCTION], ids=lambda p: p.name)
def test_kubernetes_network_policy_admits_named_sources_only(directory: Path) -> None:
    manifests = _render(directory)
    deployment, container = _gateway(directory)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (policy,) = [doc for (kind, _), doc in manifests.items() if kind == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits everyone"
        assert all("ipBlock" not in source for source in rule["from"])
        assert [p["port"] for p in rule["ports"]] == [container["ports"][0]["name"]]
    sources = [source for rule in spec["ingress"] for source in rule["from"]]
    namespaces = {
        s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for s in sources
        if "namespaceSelector" in s
    }
    assert "monitoring" in namespaces
    assert ("ingress-nginx" in namespaces) == (directory == PRODUCTION)


# -- pyproject.toml and Makefile -----------------------------------------------------------------


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """setuptools ships only the packages listed (and warns about the others)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {name: ROOT / path for name, path in config["package-dir"].items()}
    found = set()
    for name, root in roots.items():
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            if folder.name == "__pycache__" or not any(
                f.is_file() and f.suffix in (".py", ".html", ".js", ".css")
                for f in folder.iterdir()
            ):
                continue
            found.add(".".join([name, *folder.relative_to(root).parts]))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed <= found, f"listed but missing: {sorted(listed - found)}"


def _make_dry_run(target: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        [make, "-n", "-B", target, "VENV=/nonexistent-venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_run_installs_only_what_running_needs() -> None:
    commands = _make_dry_run("run")
    installs = [line for line in commands.splitlines() if " install " in line and "-e" in line]
    assert installs, commands
    assert all("[test]" not in line for line in installs), installs
    assert "broadcast-server start" in commands


def test_make_test_installs_the_test_extra() -> None:
    commands = _make_dry_run("test")
    assert "-e '.[test]'" in commands
    assert "install-system-deps" in commands
