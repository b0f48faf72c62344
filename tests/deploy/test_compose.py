"""docker/compose.yaml, docker/.env.example and docker/ray-cluster.yaml, checked without a Docker engine.

compose.yaml is validated against the Compose Specification's JSON schema as shipped by check-jsonschema on PyPI
(``check_jsonschema/builtin_schemas/vendor/compose-spec.json``, from github.com/compose-spec/compose-spec,
Apache-2.0), both as written and after interpolating the variables the way `docker compose` does.
ray-cluster.yaml is validated against the schema Ray's cluster launcher uses (``ray/autoscaler/ray-schema.json``).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
BIND = "${DETTUNE_BIND_ADDRESS:-127.0.0.1}"
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET")
RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-cpu")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ is a literal $.
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation over a loaded document (strings only, as compose does)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        missing = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in ("?", ":?") and missing:
            raise KeyError(f"required variable {name} is missing: {arg}")
        if op in ("-", ":-") and missing:
            return str(arg)
        return current or ""

    return _VARIABLE.sub(substitute, value)


def variables(text: str) -> dict[str, list[str]]:
    """Every variable a compose file reads, with the operators it is read with ('' for plain ${NAME})."""
    found: dict[str, list[str]] = {}
    for match in _VARIABLE.finditer(text):
        if match.group("name"):
            found.setdefault(match.group("name"), []).append(match.group("op") or "")
    return found


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"not NAME=value: {line!r}"
            env[name] = value
    return env


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (DOCKER / "compose.yaml").read_text()


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    return dict(yaml.safe_load(compose_text))


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(DOCKER / ".env.example")


@pytest.fixture(scope="module")
def filled_env(env_example: dict[str, str]) -> dict[str, str]:
    """.env.example with its placeholders replaced, as a user's docker/.env would be."""
    return {name: ("s3cret-" + name.lower() + "-0123456789abcdef" if value.startswith("change-me") else value)
            for name, value in env_example.items()}


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    try:
        schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    except ModuleNotFoundError:
        pytest.skip("check-jsonschema (the PyPI package that ships compose-spec.json) is not installed")
    return dict(json.loads(schema_file.read_text()))


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


# --- the Compose Specification ------------------------------------------------------------------------------------

def test_compose_file_matches_the_compose_specification(compose: dict[str, Any], filled_env: dict[str, str],
                                                        compose_schema: dict[str, Any]) -> None:
    validator = _validator(compose_schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    resolved = interpolate(compose, filled_env)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resolved)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("break_it", [
    lambda doc: doc["services"]["mlflow"].update(port=["5000:5000"]),  # misspelt key
    lambda doc: doc["services"]["ray-head"]["healthcheck"].update(intervall="15s"),
    lambda doc: doc["services"]["postgres"].update(restart=["always"]),
    lambda doc: doc["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0].pop(
        "capabilities"),
    lambda doc: doc.update(volumes=["runs"]),
])
def test_the_schema_check_catches_mistakes(break_it: Any, compose: dict[str, Any],
                                           compose_schema: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert list(_validator(compose_schema).iter_errors(broken)), "the validator let a broken file through"


def test_interpolation_helper() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $${LITERAL}", env) == "v d d  ${LITERAL}"
    with pytest.raises(KeyError, match="UNSET"):
        interpolate("${UNSET:?set it}", env)
    with pytest.raises(KeyError, match="EMPTY"):
        interpolate("${EMPTY:?set it}", env)


# --- exposure -----------------------------------------------------------------------------------------------------

def test_published_ports_bind_to_loopback_unless_opted_in(compose: dict[str, Any], env_example: dict[str, str],
                                                          filled_env: dict[str, str]) -> None:
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert {name for name, ports in published.items() if ports} == {"ray-head", "mlflow"}
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str) and port.startswith(BIND + ":"), f"{name}: {port} must bind to {BIND}"
    assert env_example["DETTUNE_BIND_ADDRESS"] == "127.0.0.1"
    resolved = interpolate(compose, {k: v for k, v in filled_env.items() if k != "DETTUNE_BIND_ADDRESS"})
    assert resolved["services"]["ray-head"]["ports"] == ["127.0.0.1:8265:8265"]
    assert resolved["services"]["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    opted_in = interpolate(compose, {**filled_env, "DETTUNE_BIND_ADDRESS": "0.0.0.0"})
    assert opted_in["services"]["mlflow"]["ports"] == ["0.0.0.0:5000:5000"]


def test_databases_stay_on_the_internal_network(compose: dict[str, Any]) -> None:
    assert compose["networks"]["store"] == {"internal": True}
    services = compose["services"]
    for name in ("postgres", "minio", "minio-init"):
        assert services[name]["networks"] == ["store"], f"{name} must be reachable on the store network only"
    assert set(services["mlflow"]["networks"]) == {"cluster", "store"}
    for name in RAY_SERVICES:
        assert services[name]["networks"] == ["cluster"], "training code has no route to the databases"


def test_containers_are_hardened(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("privileged"), name
    for name in ("mlflow", *RAY_SERVICES):
        assert compose["services"][name]["cap_drop"] == ["ALL"], name


# --- settings and secrets -----------------------------------------------------------------------------------------

def test_env_example_holds_no_real_secrets(env_example: dict[str, str]) -> None:
    secrets = {name: value for name, value in env_example.items()
               if any(word in name for word in SECRET_WORDS) and not name.endswith("_USERNAME")}
    assert {"RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD"} <= set(secrets)
    assert all(value == "change-me" for value in secrets.values()), secrets


def test_secrets_have_no_defaults_in_compose(compose_text: str, env_example: dict[str, str],
                                             filled_env: dict[str, str], compose: dict[str, Any]) -> None:
    """A secret missing from .env stops `docker compose` with a message instead of starting with a default."""
    used = variables(compose_text)
    for name, value in env_example.items():
        if value == "change-me":
            assert name in used, f"{name} is in .env.example but compose.yaml never reads it"
            assert set(used[name]) == {":?"}, f"{name} must be read as ${{{name}:?...}}, not {used[name]}"
    without_token = {k: v for k, v in filled_env.items() if k != "RAY_AUTH_TOKEN"}
    with pytest.raises(KeyError, match="RAY_AUTH_TOKEN"):
        interpolate(compose, without_token)


def test_env_example_documents_every_variable(compose_text: str, env_example: dict[str, str]) -> None:
    used = set(variables(compose_text))
    assert used - set(env_example) <= {"POSTGRES_IMAGE", "MINIO_IMAGE", "MINIO_MC_IMAGE"}, \
        f"undocumented in .env.example: {sorted(used - set(env_example))}"
    unused = set(env_example) - used - {"COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES"}
    assert not unused, f".env.example sets variables compose.yaml never reads: {sorted(unused)}"
    assert env_example["COMPOSE_PROFILES"] == "gpu" and env_example["DETTUNE_FLAVOR"] == "gpu"


def test_real_env_file_is_ignored_by_git() -> None:
    done = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert done.returncode == 0, "docker/.env must be git-ignored"
    done = subprocess.run(["git", "check-ignore", "-q", "docker/.env.example"], cwd=REPO)
    assert done.returncode == 1, "docker/.env.example must be committed"


def test_services_get_the_secrets_their_entrypoints_require(compose: dict[str, Any],
                                                            filled_env: dict[str, str]) -> None:
    resolved = interpolate(compose, filled_env)
    for name, service in resolved["services"].items():
        command = service.get("command", [])
        if not (command and command[0].startswith("/opt/dettune/entrypoints/")):
            continue
        script = DOCKER / "entrypoints" / Path(command[0]).name
        assert script.is_file(), f"{name} runs {command[0]}, which docker/entrypoints lacks"
        required = re.findall(r"^require_secret (\w+)", script.read_text(), flags=re.MULTILINE)
        environment = service["environment"]
        for variable in required:
            assert environment.get(variable), f"{name}: {script.name} requires {variable}"
    ray_env = resolved["services"]["ray-head"]["environment"]
    for name in RAY_SERVICES:
        assert resolved["services"][name]["environment"]["RAY_AUTH_MODE"] == "token", name
    assert ray_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert ray_env["MLFLOW_TRACKING_PASSWORD"] == filled_env["MLFLOW_TRACKING_PASSWORD"]
    mlflow_env = resolved["services"]["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/artifacts"
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


# --- services -----------------------------------------------------------------------------------------------------

def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("restart") == "no":  # one-shot (minio-init)
            continue
        assert "healthcheck" in service, name
        assert service["restart"] == "unless-stopped", name
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name


def test_start_order_waits_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "minio-init": {"condition": "service_completed_successfully"}}
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["ray-head"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    for worker in ("ray-worker", "ray-worker-cpu"):
        assert services[worker]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    assert set(compose["volumes"]) == {"postgres-data", "minio-data", "runs"}
    services = compose["services"]
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "./postgres/initdb.d:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    assert (DOCKER / "postgres" / "initdb.d").is_dir()
    assert "minio-data:/data" in services["minio"]["volumes"]
    for name in RAY_SERVICES:
        assert "runs:/data/runs" in services[name]["volumes"], name
        assert "${DETTUNE_DATA:-../data}:/data/datasets:ro" in services[name]["volumes"], name


def test_workers(compose: dict[str, Any], filled_env: dict[str, str]) -> None:
    services = interpolate(compose, filled_env)["services"]
    gpu, cpu = services["ray-worker"], services["ray-worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in cpu and cpu["environment"]["RAY_WORKER_NUM_GPUS"] == "0"
    for worker in (gpu, cpu):
        assert worker["environment"]["RAY_HEAD_ADDRESS"] == "ray-head:6379"
        assert worker["image"] == services["ray-head"]["image"] == "dettune:0.1.0-gpu"
        assert "container_name" not in worker, "a fixed name would stop `--scale`"
        assert worker["stop_grace_period"] == "45s", "time for Ray to drain the node on SIGTERM"
    assert services["ray-head"]["environment"]["RAY_HEAD_NUM_GPUS"] == "0"


def test_images(compose: dict[str, Any], filled_env: dict[str, str]) -> None:
    version = _pyproject_version()
    assert filled_env["DETTUNE_VERSION"] == version
    services = interpolate(compose, filled_env)["services"]
    assert services["mlflow"]["image"] == f"dettune:{version}-mlflow"
    assert services["mlflow"]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile", "target": "mlflow"}
    assert services["ray-head"]["build"]["target"] == "gpu"
    cpu = interpolate(compose, {**filled_env, "DETTUNE_FLAVOR": "cpu"})["services"]["ray-head"]
    assert cpu["build"]["target"] == "cpu" and cpu["image"] == f"dettune:{version}-cpu"
    for name in ("postgres", "minio", "minio-init"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image})"


# --- ray up -------------------------------------------------------------------------------------------------------

def test_ray_cluster_yaml_for_ray_up() -> None:
    import ray.autoscaler

    config = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["image"].endswith(f"/dettune:{_pyproject_version()}-gpu")
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard is reached through `ray dashboard`'s tunnel"
    assert "RAY_AUTH_TOKEN" not in json.dumps(config), "the token must not be written into the file"


def test_local_cluster_yaml_starts_ray_as_the_aws_example_does() -> None:
    """ray-cluster.local.yaml: machines by address over SSH, the same start commands; run for real in
    test_ray_up.py."""
    import ray.autoscaler

    local = yaml.safe_load((DOCKER / "ray-cluster.local.yaml").read_text())
    aws = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(local, schema)
    assert local["provider"]["type"] == "local"
    assert {"head_ip", "worker_ips"} <= set(local["provider"])
    assert {"ssh_user", "ssh_private_key"} <= set(local["auth"])
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert local[commands] == aws[commands]
    assert local["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token", "~/dettune-spaces": "spaces"}
    assert (REPO / "spaces" / "demo.yaml").is_file()


def _pyproject_version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


# --- the README's "Run on a cluster" ------------------------------------------------------------------------------

def test_readme_cluster_section_matches_the_files(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    """The commands the README gives name services, settings and search flags that exist."""
    from search.cli import build_parser
    from search.submit import PASSED_VARIABLES

    readme = (REPO / "README.md").read_text()
    assert "\n## Run on a cluster\n" in readme
    section = readme.split("\n## Run on a cluster\n", 1)[1].split("\n## ", 1)[0]
    known = set(compose["services"]) | set(compose["volumes"])
    for name in re.findall(r"`((?:ray|mlflow|minio|postgres)[a-z-]*)`", section):
        assert name in known or name in ("ray", "mlflow"), f"README names {name}, which compose.yaml lacks"
    build_args = set(re.findall(r"^ARG ([A-Z][A-Z0-9_]+)", (REPO / "docker" / "Dockerfile").read_text(), re.MULTILINE))
    # Or a variable dettune's commands read on the user's machine: the tracking URI, what submit passes to a job.
    settings = set(env_example) | build_args | {"RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"} | set(PASSED_VARIABLES)
    for setting in re.findall(r"`([A-Z][A-Z0-9_]{3,})(?:=[^`]*)?`", section):
        assert setting in settings, (f"README names setting {setting}, which .env.example, the ARGs and the "
                                     f"variables dettune reads lack")
    commands = re.findall(r"python -m search (search .+?)(?:\n\S|\n\n|```)", section.replace("\\\n", " "),
                          flags=re.DOTALL)
    assert commands, "the README shows how to submit a search"
    for command in commands:
        args = build_parser().parse_args(shlex.split(command))  # exits (fails the test) on an unknown flag
        assert args.storage == "/data/runs" and args.tracking_uri == "http://mlflow:5000"
