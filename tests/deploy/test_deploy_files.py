"""deploy/ agrees with itself and with the project: one Ray version (the
constraints.txt pin), one image per cluster, the gRPC port, the coordinator
joining the head, keys from a Secret, the registry on a volume, gRPC health
probes. Parses files only; nothing is built or started."""

import math
import os
import pathlib
import re
import shlex
import tomllib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GRPC_PORT = 50051
IMAGE_REPOSITORY = "registry.example.com/gemma-serve"


# ---- reading the files ------------------------------------------------------------------


def ray_pin() -> str:
    pins = re.findall(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert len(pins) == 1, "constraints.txt must pin ray exactly once"
    return pins[0]


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def load_all(relative: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / relative).read_text()) if doc]


def kind(relative: str, wanted: str) -> list[dict]:
    return [doc for doc in load_all(relative) if doc.get("kind") == wanted]


def one(relative: str, wanted: str) -> dict:
    docs = kind(relative, wanted)
    assert len(docs) == 1, f"{relative}: expected one {wanted}, found {len(docs)}"
    return docs[0]


def dockerfile_instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
        current = ""
    return instructions


def arg_value(args: list[str], flag: str) -> str | None:
    """The value after `flag` (or of `flag=value`) in an argument list; the
    last one wins, as with argparse."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def coordinator_container() -> dict:
    deployment = one("kuberay/coordinator.yaml", "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def pod_volumes(pod_spec: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec.get("volumes", [])}


def compose(name="compose/compose.yaml") -> dict:
    return load_all(name)[0]


def compose_default(text: str) -> str:
    """`${VAR:-default}` -> default, as compose resolves an unset variable."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def launcher() -> dict:
    return load_all("launcher/cluster.yaml")[0]


def launcher_coordinator_args() -> list[str]:
    commands = " ".join(launcher()["head_start_ray_commands"])
    match = re.search(r"(gemma-serve --ray-address[^;']*)", commands)
    assert match, "the launcher's head commands must start gemma-serve --ray-address ..."
    return shlex.split(match.group(1))[1:]


def all_images() -> dict[str, str]:
    """Where each container image is named -> the image."""
    images = {}
    cluster = one("kuberay/raycluster.yaml", "RayCluster")["spec"]
    for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]:
        images[f"raycluster head {c['name']}"] = c["image"]
    for group in cluster["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            images[f"raycluster {group['groupName']} {c['name']}"] = c["image"]
    images["coordinator deployment"] = coordinator_container()["image"]
    for name in ("compose/compose.yaml", "compose/compose.gpu.yaml"):
        for service, spec in compose(name)["services"].items():
            if "image" in spec:
                images[f"{name} {service}"] = spec["image"]
    images["launcher"] = launcher()["docker"]["image"]
    return images


# ---- every file parses ------------------------------------------------------------------


def test_every_yaml_file_parses_and_is_not_empty():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 6
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_kubernetes_documents_have_api_version_kind_and_name():
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        for doc in load_all(path.relative_to(DEPLOY).as_posix()):
            assert doc.get("apiVersion") and doc.get("kind"), path
            assert doc.get("metadata", {}).get("name"), path


def test_dockerfile_parses_into_known_instructions():
    known = {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "EXPOSE", "USER", "LABEL",
             "ENTRYPOINT", "CMD"}
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    assert instructions and {word for word, _ in instructions} <= known


# ---- one Ray version --------------------------------------------------------------------


def test_dockerfile_builds_on_the_pinned_ray_for_both_flavors():
    pin = ray_pin()
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    args = dict(rest.split("=", 1) for word, rest in instructions
                if word == "ARG" and "=" in rest)
    assert args["RAY_VERSION"] == pin
    bases = {rest.split()[2]: rest.split()[0] for word, rest in instructions
             if word == "FROM" and " AS " in rest}
    assert bases["base-cpu"] == "rayproject/ray:${RAY_VERSION}-py311"
    assert bases["base-gpu"] == "rayproject/ray:${RAY_VERSION}-py311-gpu"
    # The final stage is whichever flavor is asked for, CPU by default.
    final = [rest for word, rest in instructions if word == "FROM"][-1]
    assert final == "base-${FLAVOR}" and args["FLAVOR"] == "cpu"
    # py311 satisfies the project's Python floor.
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert floor == ">=3.11"


def test_dockerfile_installs_with_the_constraints_and_checks_ray():
    text = " ".join(rest for word, rest in dockerfile_instructions(DEPLOY / "Dockerfile")
                    if word == "RUN")
    assert text.count("-c constraints.txt") >= 2
    assert "ray.__version__ == '${RAY_VERSION}'" in text
    env = " ".join(rest for word, rest in dockerfile_instructions(DEPLOY / "Dockerfile")
                   if word == "ENV")
    assert 'GEMMA_SERVE_EXTRAS="cuda"' in env  # the GPU flavor gets jax[cuda12]


def test_the_cuda_extra_the_image_installs_exists():
    import importlib.util
    spec = importlib.util.spec_from_file_location("reqs", DEPLOY / "pyproject_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cuda = module.requirements(ROOT / "pyproject.toml", ["cuda"])
    assert any(r.startswith("jax[cuda12]") for r in cuda)
    assert any(r.startswith("ray") for r in module.requirements(ROOT / "pyproject.toml", []))


def test_raycluster_ray_version_is_the_pin():
    cluster = one("kuberay/raycluster.yaml", "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray_pin()


# ---- one image --------------------------------------------------------------------------


def test_every_container_runs_the_project_image_of_this_version():
    images = all_images()
    version = project_version()
    for where, image in images.items():
        image = compose_default(image)
        repository, _, tag = image.rpartition(":")
        assert repository == IMAGE_REPOSITORY, where
        assert tag in (f"{version}-cpu", f"{version}-gpu"), (where, image)


def test_gpu_targets_share_one_gpu_image():
    images = all_images()
    gpu = {where: image for where, image in images.items()
           if where.startswith(("raycluster", "coordinator", "launcher",
                                "compose/compose.gpu.yaml"))}
    assert len(set(gpu.values())) == 1, gpu
    assert next(iter(gpu.values())).endswith("-gpu")


def test_compose_runs_one_image_in_all_three_containers():
    base = compose()
    services = base["services"]
    assert {"ray-head", "ray-worker", "coordinator"} <= set(services)
    assert len({services[s]["image"] for s in services}) == 1
    assert services["coordinator"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert services["coordinator"]["build"]["args"]["FLAVOR"] == "cpu"
    override = compose("compose/compose.gpu.yaml")["services"]
    assert set(override) == set(services)  # no service keeps the CPU image
    assert all(s["build"]["args"]["FLAVOR"] == "gpu" for s in override.values())


# ---- the gRPC port ------------------------------------------------------------------------


def test_service_exposes_the_grpc_port_of_the_container():
    service = one("kuberay/coordinator.yaml", "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in coordinator_container()["ports"]}
    assert ports["grpc"]["port"] == GRPC_PORT
    assert container_ports[ports["grpc"]["targetPort"]] == GRPC_PORT
    deployment = one("kuberay/coordinator.yaml", "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_coordinators_listen_on_all_interfaces_at_the_grpc_port():
    everywhere = {
        "kuberay": coordinator_container()["args"],
        "compose": compose()["services"]["coordinator"]["command"],
        "compose gpu": compose("compose/compose.gpu.yaml")["services"]["coordinator"]["command"],
        "launcher": launcher_coordinator_args(),
    }
    for where, args in everywhere.items():
        assert arg_value(args, "--host") == "0.0.0.0", where
        assert arg_value(args, "--port") == str(GRPC_PORT), where


def test_compose_cpu_workers_split_the_worker_nodes_cpus():
    """Several CPU workers on one node each get their own cores: what they
    reserve fits the node, and their XLA threads (one per reserved core) do
    not outnumber its cores."""
    from coordinator.serve_cli import parse_args
    services = compose()["services"]
    config = parse_args(services["coordinator"]["command"][1:])
    node_cpus = int(arg_value(services["ray-worker"]["command"], "--num-cpus"))
    assert config.num_workers > 1 and config.worker.cpus is not None
    assert config.num_workers * config.worker.cpus <= node_cpus
    # XLA runs at least a thread per device of the mesh, whatever cpus says.
    assert config.worker.cpus >= config.worker.num_devices


def test_compose_publishes_the_grpc_port():
    ports = compose()["services"]["coordinator"]["ports"]
    assert f"{GRPC_PORT}:{GRPC_PORT}" in ports


# ---- probes on gRPC health ---------------------------------------------------------------


def test_probes_use_grpc_health_on_the_grpc_port():
    container = coordinator_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, probe
        assert set(container[probe]) & {"httpGet", "tcpSocket", "exec"} == set(), probe
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe


def test_compose_healthcheck_asks_grpc_health():
    test = " ".join(compose()["services"]["coordinator"]["healthcheck"]["test"])
    assert "grpc_health" in test and f"127.0.0.1:{GRPC_PORT}" in test and "SERVING" in test


# ---- joining the Ray head ----------------------------------------------------------------


def test_kuberay_coordinator_joins_the_head_service():
    cluster = one("kuberay/raycluster.yaml", "RayCluster")
    head_ports = {p["name"]: p["containerPort"] for p in
                  cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    container = coordinator_container()
    # KubeRay names the head's Service <cluster>-head-svc.
    expected = f"{cluster['metadata']['name']}-head-svc:{head_ports['gcs']}"
    assert arg_value(container["args"], "--ray-address") == expected
    # A driver needs a raylet on its own machine: the join script gives it one.
    assert container["command"] == ["gemma-serve-join"]


def test_compose_coordinator_joins_the_head_container():
    services = compose()["services"]
    head = services["ray-head"]["command"]
    assert "--head" in head
    port = arg_value(head, "--port")
    for name in ("compose/compose.yaml", "compose/compose.gpu.yaml"):
        command = compose(name)["services"]["coordinator"]["command"]
        assert command[0] == "gemma-serve-join", name
        assert arg_value(command, "--ray-address") == f"ray-head:{port}", name
    assert arg_value(services["ray-worker"]["command"], "--address") == f"ray-head:{port}"


def test_launcher_coordinator_runs_on_the_head_node():
    config = launcher()
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head --port=6379" in head
    assert arg_value(launcher_coordinator_args(), "--ray-address") == "auto"
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_join_script_joins_without_resources_then_becomes_gemma_serve():
    script = DEPLOY / "join-and-serve.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert re.search(r"ray start --address=\"\$address\" --num-cpus=0 --num-gpus=0", text)
    assert text.rstrip().endswith('exec gemma-serve "$@"')
    copy = [rest for word, rest in dockerfile_instructions(DEPLOY / "Dockerfile")
            if word == "COPY" and "join-and-serve.sh" in rest]
    assert copy and copy[0].endswith("/usr/local/bin/gemma-serve-join")


# ---- API keys from a Secret, data on a claim ---------------------------------------------


def test_api_keys_come_from_a_secret():
    env = {e["name"]: e for e in coordinator_container()["env"]}
    keys = env["GEMMA_SERVE_API_KEYS"]
    assert "value" not in keys
    assert keys["valueFrom"]["secretKeyRef"]["name"] == "gemma-serve-api-keys"
    assert "--api-keys-file" not in coordinator_container()["args"]
    # compose: a compose secret, read with --api-keys-file.
    base = compose()
    coordinator = base["services"]["coordinator"]
    assert coordinator["secrets"] == ["api-keys"] and "api-keys" in base["secrets"]
    assert arg_value(coordinator["command"], "--api-keys-file") == "/run/secrets/api-keys"
    assert "GEMMA_SERVE_API_KEYS" not in coordinator.get("environment", {})


def test_every_ray_process_and_the_coordinator_use_ray_token_auth_from_a_secret():
    """RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from one Secret on the head, every
    worker group and the coordinator (Ray 2.60 reads both from the
    environment); never a token written into a file of the repository."""
    cluster = one("kuberay/raycluster.yaml", "RayCluster")["spec"]
    containers = {f"head {c['name']}": c
                  for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in cluster["workerGroupSpecs"]:
        containers.update({f"{group['groupName']} {c['name']}": c
                           for c in group["template"]["spec"]["containers"]})
    containers["coordinator"] = coordinator_container()
    secrets = set()
    for where, container in containers.items():
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{where}: the token must come from a Secret"
        reference = token["valueFrom"]["secretKeyRef"]
        secrets.add((reference["name"], reference["key"]))
        assert not reference.get("optional"), where  # no token must mean no start
        assert "RAY_AUTH_TOKEN_PATH" not in env, where  # one source, not two to disagree
    assert secrets == {("gemma-serve-ray-token", "auth_token")}  # one token everywhere
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl create secret generic gemma-serve-ray-token" in readme
    assert "--from-literal=auth_token=" in readme


def test_the_data_dir_is_on_a_persistent_volume_claim():
    deployment = one("kuberay/coordinator.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = coordinator_container()
    data_dir = arg_value(container["args"], "--data-dir")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == data_dir)
    claim = pod_volumes(pod)[mount["name"]]["persistentVolumeClaim"]["claimName"]
    claims = {c["metadata"]["name"]: c for c in kind("kuberay/storage.yaml",
                                                     "PersistentVolumeClaim")}
    assert claim in claims
    assert not mount.get("readOnly", False)
    # One writer at a time: never two coordinator pods on the registry.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    # compose: a named volume.
    base = compose()
    command = base["services"]["coordinator"]["command"]
    volumes = dict(v.split(":", 1) for v in base["services"]["coordinator"]["volumes"])
    data_volume = next(name for name, path in volumes.items()
                       if path == arg_value(command, "--data-dir"))
    assert data_volume in base["volumes"]


def test_every_claim_mounted_exists():
    claims = {c["metadata"]["name"] for c in kind("kuberay/storage.yaml",
                                                  "PersistentVolumeClaim")}
    pods = [one("kuberay/coordinator.yaml", "Deployment")["spec"]["template"]["spec"]]
    cluster = one("kuberay/raycluster.yaml", "RayCluster")["spec"]
    pods += [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = pod_volumes(pod)
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, mount
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


# ---- GPUs: the coordinator's workers fit the worker group --------------------------------


def test_gpu_workers_fit_the_worker_group():
    args = coordinator_container()["args"]
    assert "--gpus" in args
    mesh = tuple(int(n) for n in arg_value(args, "--mesh").split("x"))
    workers = int(arg_value(args, "--workers"))
    cluster = one("kuberay/raycluster.yaml", "RayCluster")["spec"]
    capacity = 0
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus % math.prod(mesh) == 0, "a pod's GPUs must be a multiple of the mesh"
        capacity += group["replicas"] * (gpus // math.prod(mesh))
    assert workers <= capacity
    # The head runs no worker actors.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("where", ["kuberay", "launcher"])
def test_the_deployed_plans_fit(where, capsys):
    """The sizes written into the manifests pass `gemma-serve plan` (80 GiB GPUs)."""
    from coordinator import plan_cli
    if where == "kuberay":
        args = coordinator_container()["args"]
        (group,) = one("kuberay/raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]
        (container,) = group["template"]["spec"]["containers"]
        gpus, nodes = container["resources"]["limits"]["nvidia.com/gpu"], group["replicas"]
    else:
        args = launcher_coordinator_args()
        gpus, nodes = "8", len(launcher()["provider"]["worker_ips"])  # 8-GPU VMs, as it says
    argv = ["--preset", arg_value(args, "--preset"), "--dtype", arg_value(args, "--dtype"),
            "--mesh", arg_value(args, "--mesh"), "--workers", arg_value(args, "--workers"),
            "--devices-per-node", str(gpus), "--nodes", str(nodes)]
    assert plan_cli.main(argv) == 0, capsys.readouterr().out


# ---- network policy: Ray's ports closed to all but the cluster's own pods ----------------


def deployment_pod_labels() -> dict[str, dict]:
    """Each pod template of the deployment -> its labels."""
    cluster = one("kuberay/raycluster.yaml", "RayCluster")["spec"]
    pods = {"ray head": cluster["headGroupSpec"]["template"]["metadata"]["labels"]}
    for group in cluster["workerGroupSpecs"]:
        pods[f"ray {group['groupName']}"] = group["template"]["metadata"]["labels"]
    pods["coordinator"] = one("kuberay/coordinator.yaml",
                              "Deployment")["spec"]["template"]["metadata"]["labels"]
    return pods


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_network_policy_opens_ray_only_to_the_clusters_own_pods():
    policies = kind("kuberay/networkpolicy.yaml", "NetworkPolicy")
    pods = deployment_pod_labels()
    own = {"app.kubernetes.io/name": "gemma-serve"}
    assert all(own.items() <= labels.items() for labels in pods.values())
    for pod, labels in pods.items():
        mine = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], labels)]
        # Selected by an ingress policy: nothing reaches the pod that no rule allows.
        assert any("Ingress" in p["policyTypes"] for p in mine), pod
        for rule in (rule for p in mine for rule in p.get("ingress", [])):
            peers = rule.get("from")
            if peers and all(set(peer) == {"podSelector"} for peer in peers):
                # Pods of this namespace: only the deployment's own.
                assert all(own.items() <= peer["podSelector"]["matchLabels"].items()
                           for peer in peers), (pod, rule)
                continue
            # Anyone else (no `from`, other namespaces, addresses): the
            # coordinator's gRPC and metrics ports, nothing of Ray's.
            assert pod == "coordinator", (pod, rule)
            ports = {port["port"] for port in rule.get("ports", [])}
            assert ports and ports <= {GRPC_PORT, 9090}, (pod, rule)
            if 9090 in ports:
                assert peers, "metrics must not be open to everyone"
