"""Build and run the service's container image with Docker or, where no Docker engine runs, buildah.

    python -m container.image build [--bento inception_v3:latest] [--tag inception_v3:latest ...]
                                    [--allow-random-weights]
    python -m container.image run [--tag inception_v3:latest] [--config FILE] [--model-store DIR]
    python -m container.image reload
    python -m container.image stop
    python -m container.image remove [--tag inception_v3:latest ...]

``build`` runs ``bentoml containerize`` from the project folder (it prints the
command); with buildah it first builds a Debian base offline
(container/build-base.sh) and passes it as the BASE_IMAGE build argument.
An image is meant to ship, so it refuses a Bento whose model has random weights
unless ``--allow-random-weights`` says so (``make build_all WEIGHTS=random``).
``run`` starts the image's default command (HTTP and gRPC, one launcher) in the
background and records the container in a state file for ``stop``. The ports are
those of the image's configuration file, or of ``--config``, mounted over it.
``--model-store`` mounts a model store folder: the runner serves its versions and
picks up new ones (``reload``: at once) instead of the model the Bento carries.

The backend is $CONTAINER_BACKEND, else docker when its engine answers, else
buildah. buildah runs with $BUILDAH_ISOLATION (default chroot) and
$STORAGE_DRIVER (default vfs), which work without cgroup delegation or overlay
mounts. Chroot isolation shares the host's network, so the ports are the host's;
and ``buildah run`` ignores the image's entrypoint and command: ``run`` reads
them from the image and passes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from container import bentoml_patch
from inception_v3.weights import WEIGHTS_FILE_NAME
from inception_v3.weights import warning as weights_warning

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/inception-v3-base:bookworm"
DEFAULT_TAG = "inception_v3:latest"
DEFAULT_STATE_FILE = ROOT / ".run" / "container.json"
CONTAINER_CONFIG = "/home/bentoml/run-configuration.yaml"
CONTAINER_MODEL_STORE = "/home/bentoml/model-store"
STOP_TIMEOUT_S = 90


@dataclass(frozen=True)
class Container:
    backend: str
    name: str
    image: str
    pid: int  # buildah: the `buildah run` process on this host; docker: 0
    log: str  # buildah: its output; docker: `docker logs NAME`
    options: list[str]  # buildah: the mounts and environment every `buildah run` repeats


def backend_env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    if backend == "buildah":
        env.setdefault("BUILDAH_ISOLATION", "chroot")
        env.setdefault("STORAGE_DRIVER", "vfs")
        # BentoML asks buildah for the OCI format, which has no HEALTHCHECK.
        env.setdefault("BUILDAH_FORMAT", "docker")
    return env


def detect_backend() -> str:
    if chosen := os.environ.get("CONTAINER_BACKEND"):
        return chosen
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    if shutil.which("buildah"):
        return "buildah"
    raise SystemExit("error: no container engine: start Docker, or install buildah and debootstrap")


def engine(backend: str, *args: str, capture: bool = False) -> str:
    completed = subprocess.run(
        [backend, *args], env=backend_env(backend), check=True, text=True, capture_output=capture
    )
    return completed.stdout.strip() if capture else ""


def refuse_random_weights(bento: str) -> None:
    import bentoml

    for model in bentoml.get(bento).info.all_models:
        if weights_warning(bentoml.models.get(model.tag).info.metadata):
            raise SystemExit(
                f"error: {bento} holds {model.tag}, a model with random weights (meaningless labels), and an image is "
                f"meant to ship: build with real ones (make build_all WEIGHTS=/path/to/{WEIGHTS_FILE_NAME}), "
                "or ship random ones on purpose with make build_all WEIGHTS=random (--allow-random-weights)"
            )


def build_base(backend: str) -> None:
    """buildah only: the local Debian base (container/build-base.sh; once, then cached)."""
    subprocess.run(
        [ROOT / "container" / "build-base.sh", BASE_IMAGE],
        env={**backend_env(backend), "PYTHON": sys.executable},
        check=True,
    )


def containerize_options(backend: str) -> list[str]:
    """What `bentoml containerize` needs beyond the Bento's tag: the backend, and buildah's local base."""
    options = ["--backend", backend]
    if backend == "buildah":
        options += ["--opt", f"build-arg=BASE_IMAGE={BASE_IMAGE}"]
    return options


def build(bento: str, tags: list[str], backend: str, no_cache: bool = False) -> None:
    if bentoml_patch.fix_missing():
        raise SystemExit(bentoml_patch.UNPATCHED_ERROR)
    arguments = ["containerize", bento, *containerize_options(backend)]
    for tag in tags:
        arguments += ["--image-tag", tag]
    if no_cache:
        arguments += ["--opt", "no-cache"]
    if backend == "buildah":
        build_base(backend)
    print("running: bentoml", shlex.join(arguments))
    subprocess.run(
        [Path(sys.executable).with_name("bentoml"), *arguments], env=backend_env(backend), check=True, cwd=ROOT
    )
    print(f"built {', '.join(tags)} with {backend}: start it with `make run` or `python -m container.image run`")


def configured_ports(config: Path) -> list[int]:
    api_server = yaml.safe_load(config.read_text())["api_server"]
    return [api_server["http"]["port"], api_server["grpc"]["port"], api_server["grpc"]["metrics"]["port"]]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def image_config(tag: str, backend: str) -> dict[str, Any]:
    """The image's Docker configuration: User, Entrypoint, Cmd, Healthcheck, ExposedPorts..."""
    if backend == "docker":
        return json.loads(engine("docker", "image", "inspect", tag, capture=True))[0]["Config"]
    return json.loads(engine("buildah", "inspect", "--type", "image", tag, capture=True))["Docker"]["config"]


def image_size(tag: str, backend: str) -> str:
    if backend == "docker":
        return f"{int(engine('docker', 'image', 'inspect', '--format', '{{.Size}}', tag, capture=True)) / 1e9:.2f} GB"
    return engine("buildah", "images", "--format", "{{.Size}}", tag, capture=True)


def check_image(tag: str) -> None:
    """What ``make run`` asks before it stops a running server: an engine answers and holds ``tag``."""
    backend = detect_backend()
    try:
        image_config(tag, backend)
    except subprocess.CalledProcessError:
        raise SystemExit(f"error: {backend} has no image {tag}: build it with make build_all") from None


def run(tag: str, name: str, config: Path | None, state_file: Path, model_store: Path | None = None) -> Container:
    """``model_store``: a BentoML model store folder (``$BENTOML_HOME/models``) the runner serves
    versions from, and watches for new ones, instead of the model inside the Bento."""
    if state_file.exists():
        raise SystemExit(f"error: a container is already recorded in {state_file}: stop it first")
    backend = detect_backend()
    ports = configured_ports(config or ROOT / "configuration.yaml")
    if busy := [port for port in ports if port_in_use(port)]:
        raise SystemExit(f"error: ports {busy} are in use (a `make serve` or another container?)")
    options = (
        []
        if config is None
        else ["-v", f"{config.resolve()}:{CONTAINER_CONFIG}:ro", "-e", f"BENTOML_CONFIG={CONTAINER_CONFIG}"]
    )
    if model_store is not None:
        if hidden := not_world_readable(model_store):
            raise SystemExit(
                f"error: the image's user (uid 1034) cannot read {len(hidden)} entries of {model_store}, e.g. "
                f"{hidden[0]} (models saved before save_model.py made them readable); "
                f"fix with: chmod -R a+rX {model_store}"
            )
        options += ["-v", f"{model_store.resolve()}:{CONTAINER_MODEL_STORE}:ro"]
        options += ["-e", f"INCEPTION_V3_MODEL_STORE={CONTAINER_MODEL_STORE}"]
    state_file.parent.mkdir(parents=True, exist_ok=True)
    if backend == "docker":
        published = [arg for port in ports for arg in ("-p", f"{port}:{port}")]
        engine("docker", "run", "--detach", "--rm", "--name", name, *published, *options, tag)
        container = Container(backend, name, tag, pid=0, log=f"docker logs {name}", options=[])
    else:
        engine("buildah", "from", "--name", name, tag, capture=True)
        config_of_image = image_config(tag, backend)
        log = state_file.with_suffix(".log")
        with log.open("wb") as output:
            process = subprocess.Popen(
                ["buildah", "run", *options, name, "--", *config_of_image["Entrypoint"], *config_of_image["Cmd"]],
                env=backend_env(backend),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        container = Container(backend, name, tag, pid=process.pid, log=str(log), options=options)
    state_file.write_text(json.dumps(asdict(container)))
    return container


def not_world_readable(folder: Path) -> list[Path]:
    """What under ``folder`` a user other than its owner cannot read (folders: also enter)."""
    needed = {True: stat.S_IROTH | stat.S_IXOTH, False: stat.S_IROTH}
    entries = [folder, *folder.rglob("*")]
    return [path for path in entries if path.lstat().st_mode & needed[path.is_dir()] != needed[path.is_dir()]]


def execute(container: Container, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command in the running container, as `docker exec` does."""
    if container.backend == "docker":
        prefix = ["docker", "exec", container.name]
    else:
        prefix = ["buildah", "run", *container.options, container.name, "--"]
    return subprocess.run([*prefix, *command], env=backend_env(container.backend), capture_output=True, text=True)


def load(state_file: Path) -> Container | None:
    return Container(**json.loads(state_file.read_text())) if state_file.exists() else None


def main_process(container: Container) -> psutil.Process | None:
    """The container's first process (the launcher), as seen from this host."""
    if container.backend == "docker":
        pid = int(engine("docker", "inspect", "--format", "{{.State.Pid}}", container.name, capture=True))
        return psutil.Process(pid) if pid else None
    try:
        children = psutil.Process(container.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    # Chroot isolation runs the command under buildah-chroot-runtime and buildah-chroot-exec.
    return next((p for p in children if not p.cmdline()[0].startswith("buildah")), None)


def stop(state_file: Path) -> None:
    container = load(state_file)
    if container is None:
        return
    print(f"stopping container {container.name} ({container.backend})")
    if container.backend == "docker":
        subprocess.run(["docker", "stop", "--time", str(STOP_TIMEOUT_S), container.name], check=False)
    else:
        # SIGTERM to `buildah run` does not reach the command: signal the launcher,
        # which stops its servers and their workers.
        launcher = main_process(container)
        if launcher is not None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(STOP_TIMEOUT_S)
            except psutil.TimeoutExpired:
                launcher.kill()
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
            psutil.Process(container.pid).wait(30)
        subprocess.run(["buildah", "rm", container.name], env=backend_env("buildah"), check=False)
    state_file.unlink()


def reload(state_file: Path) -> None:
    """SIGHUP to the container's launcher: its runner looks at the model store now."""
    container = load(state_file)
    launcher = main_process(container) if container else None
    if launcher is None:
        raise SystemExit(f"error: no running container is recorded in {state_file}")
    launcher.send_signal(signal.SIGHUP)
    print(f"asked container {container.name}'s runner to look for new versions")


def remove(tags: list[str], backend: str) -> None:
    command = ["rmi"] if backend == "docker" else ["rmi", "--force"]
    subprocess.run([backend, *command, *tags], env=backend_env(backend), check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-file", type=Path, default=DEFAULT_STATE_FILE, help="where run records the container")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="bentoml containerize, with a local base for buildah")
    build_parser.add_argument("--bento", default="inception_v3:latest")
    build_parser.add_argument("--tag", action="append", help=f"image tag, repeatable (default {DEFAULT_TAG})")
    build_parser.add_argument("--no-cache", action="store_true", help="rebuild every step (the base stays cached)")
    build_parser.add_argument(
        "--allow-random-weights", action="store_true", help="build even if the model has random weights"
    )
    run_parser = commands.add_parser("run", help="start the image's default command in the background")
    run_parser.add_argument("--tag", default=DEFAULT_TAG)
    run_parser.add_argument("--name", default="inception-v3")
    run_parser.add_argument("--config", type=Path, help="a configuration file to serve with instead of the image's")
    run_parser.add_argument(
        "--model-store", type=Path, help="serve the model versions of this model store folder (mounted read-only)"
    )
    check_parser = commands.add_parser("check", help="exit with an error unless a container engine holds the image")
    check_parser.add_argument("--tag", default=DEFAULT_TAG)
    commands.add_parser("stop", help="stop the container that run started")
    commands.add_parser("reload", help="its runner looks at the model store for new versions now")
    remove_parser = commands.add_parser("remove", help="remove images")
    remove_parser.add_argument("--tag", action="append")
    args = parser.parse_args(argv)

    if args.command == "build":
        if not args.allow_random_weights:
            refuse_random_weights(args.bento)
        build(args.bento, args.tag or [DEFAULT_TAG], detect_backend(), no_cache=args.no_cache)
    elif args.command == "run":
        container = run(args.tag, args.name, args.config, args.state_file, args.model_store)
        print(f"started {container.name} ({container.backend}); log: {container.log}")
    elif args.command == "check":
        check_image(args.tag)
    elif args.command == "reload":
        reload(args.state_file)
    elif args.command == "stop":
        stop(args.state_file)
    else:
        remove(args.tag or [DEFAULT_TAG], detect_backend())
    return 0


if __name__ == "__main__":
    sys.exit(main())
