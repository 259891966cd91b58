"""docker/*.Dockerfile: hadolint, plus the rules that matter checked directly."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "core": REPO / "docker" / "core.Dockerfile",
    "core-vllm": REPO / "docker" / "core-vllm.Dockerfile",
    "edge": REPO / "docker" / "edge.Dockerfile",
}
CORE_IMAGES = ("core", "core-vllm")
SECRETISH = re.compile(r"(PASSWORD|PASSPHRASE|SECRET|TOKEN|API_KEY|PRIVATE_KEY|ACCESS_KEY)", re.I)
WEIGHTS = re.compile(r"\.(safetensors|gguf|bin|pt|pth|ckpt|onnx)\b|bundles?/|\.key\b|\.pem\b", re.I)


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: run scripts/install_helm_tools.sh"
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buffer = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        buffer += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            word, _, rest = buffer.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buffer = ""
    return out


@pytest.fixture(params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return DOCKERFILES[request.param]


def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bases_are_pinned_by_tag_and_digest(dockerfile: Path) -> None:
    stages: set[str] = set()
    for word, args in instructions(dockerfile):
        if word != "FROM":
            continue
        parts = [p for p in args.split() if not p.startswith("--platform")]
        image = parts[0]
        # FROM base-${VARIANT}: a stage above, itself built from a pinned base.
        as_stage = re.escape(image).replace(re.escape("${VARIANT}"), "[a-z]+")
        if not any(re.fullmatch(as_stage, stage) for stage in stages):
            assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), f"unpinned base {image}"
            assert ":latest@" not in image
        if len(parts) >= 3 and parts[1].upper() == "AS":
            stages.add(parts[2])


def test_runs_as_a_non_root_user_with_a_healthcheck(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    last_from = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
    final = steps[last_from:]
    users = [a for w, a in final if w == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    healthchecks = [a for w, a in final if w == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "CMD" in healthchecks[0]
    assert "veil-healthcheck" in healthchecks[0]
    entrypoint = [a for w, a in final if w == "ENTRYPOINT"]
    expected = '["veil-core"]' if dockerfile.name.startswith("core") else '["veil", "edge"]'
    assert entrypoint == [expected]


def test_no_secrets_or_weights_baked_in(dockerfile: Path) -> None:
    for word, args in instructions(dockerfile):
        if word in {"ENV", "ARG", "LABEL"}:
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_.]*)=", args) or [args.split()[0]]
            assert not any(SECRETISH.search(n) for n in names), f"{word} {args}"
        if word in {"COPY", "ADD"}:
            assert not WEIGHTS.search(args), f"{word} {args}"
            assert word != "ADD" or not re.search(r"https?://", args), "no remote ADD"
        if word == "RUN":
            assert not re.search(r"(curl|wget)\b.*(huggingface|hf\.co)", args), "no weights download"


def core_image_packages(image: str = "core") -> set[str]:
    """The top-level Python packages a core image's COPY lines bring from the repository."""
    packages = set()
    for word, args in instructions(DOCKERFILES[image]):
        if word != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        assert "." not in sources, "the core image copies named paths, never the whole context"
        packages |= {src.rstrip("/") for src in sources if (REPO / src / "__init__.py").is_file()}
    return packages


# what only the edge's trust domain may hold: tokenizer, checkpoint loading, templates, policy
EDGE_ONLY_IMPORTS = {"transformers", "tokenizers", "gguf", "accelerate", "jinja2", "jwt", "presidio_analyzer",
                     "cloaking", "edge_proxy", "admin", "privacy_audit", "veil_cli"}


def _imports(path: Path) -> set[str]:
    import ast

    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("image", CORE_IMAGES)
def test_core_image_ships_only_the_ground_floor_and_the_core(image: str) -> None:
    packages = core_image_packages(image)
    assert packages == {"veil", "core_server"}
    for package in packages:
        for module in (REPO / package).rglob("*.py"):
            leaked = _imports(module) & EDGE_ONLY_IMPORTS
            assert not leaked, f"{module.relative_to(REPO)} is in the core image but imports {sorted(leaked)}"


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_vllm_core_image_keeps_vllms_torch_and_adds_the_cores_other_dependencies() -> None:
    import tomllib

    steps = instructions(DOCKERFILES["core-vllm"])
    env = " ".join(a for w, a in steps if w == "ENV")
    assert "VEIL_CORE_ENGINE=vllm" in env
    assert "VLLM_NO_USAGE_STATS=1" in env and "HF_HUB_OFFLINE=1" in env  # nothing leaves the core
    (base,) = [a.split()[0] for w, a in steps if w == "FROM" and a.split()[0].startswith("vllm/vllm-openai:")]
    assert base.startswith("vllm/vllm-openai:v0.32.0@sha256:")  # the vLLM the engine is tested with (Makefile)
    installs = [a for w, a in steps if w == "RUN" and "pip install" in a]
    assert len(installs) == 1
    commands = installs[0].split("&&")
    veil = [c for c in commands if "/wheels/" in c]
    assert len(veil) == 1 and "--no-deps" in veil[0], "vLLM's torch must stay: veil goes in without dependencies"
    (deps,) = [c for c in commands if "pip install" in c and "/wheels/" not in c]
    listed = re.findall(r'"([^"]+)"', deps)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(listed) == sorted(d for d in project if _requirement_name(d) != "torch")
    assert "--upgrade" not in deps and " -U " not in deps


def test_dockerignore_keeps_weights_keys_and_state_out_of_the_context() -> None:
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in [
        ".git",
        ".venv",
        "**/*.safetensors",
        "**/*.gguf",
        "**/*.key",
        "**/*.pem",
        "**/.env",
        ".veil",
    ]:
        assert needed in patterns, needed
    for kept in ["README.md", "pyproject.toml", "docker", "veil", "core_server"]:
        assert kept not in patterns, kept


def test_healthcheck_script_reports_ready_and_not_ready(tmp_path: Path) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response({"/readyz": 200, "/healthz": 200, "/loading": 503}.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        script = REPO / "docker" / "healthcheck.py"
        env = {"VEIL_CORE_PORT": str(server.server_address[1]), "PATH": "/usr/bin:/bin"}

        def run(*args: str) -> int:
            return subprocess.run(
                [sys.executable, str(script), *args], env=env, capture_output=True
            ).returncode

        assert run("/readyz") == 0
        assert run("/loading") == 1
        assert run("/missing") == 1
        assert run("--any-response", "/missing") == 0
        assert run("--port-env", "NOPE", "--port", "1", "/readyz") == 1  # nothing listens
    finally:
        server.shutdown()
        server.server_close()
