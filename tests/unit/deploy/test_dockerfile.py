"""The Dockerfile, checked without a Docker engine: a small parser of its instructions asserts the image's
properties (multi-stage on a pinned slim base, non-root, no build tools or pip at run time, entrypoint and
ports, runtime dependencies only) and that every file it copies is in the build context."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from authz.cli import _parser
from authz.config import DEFAULT_ANALYTICS_SECRET_DIR, DEFAULT_POLICY_SECRET_DIR, DEFAULT_TEMP_DIR

ROOT = Path(__file__).resolve().parents[3]
PINNED_SLIM = re.compile(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?")
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "python3-dev", "libffi-dev", "libssl-dev", "cargo")
TEMPLATES = "/usr/share/apigee-authz/envoy"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]

    def env(self) -> dict[str, str]:
        result = {}
        for rest in self.args("ENV"):
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                result[key] = value
        return result


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comment lines dropped (also inside a continuation, as Docker
    does), backslash continuations joined."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return result


def stages(text: str) -> list[Stage]:
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for keyword, rest in instructions(text):
        if keyword == "ARG" and not result:
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            result.append(Stage(base, name))
        else:
            assert result, f"{keyword} before the first FROM"
            result[-1].instructions.append((keyword, rest))
    return result


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"not the exec (JSON) form: {rest}"
    return value


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return stages((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final(dockerfile: list[Stage]) -> Stage:
    return dockerfile[-1]


def test_instruction_parser_joins_continuations_and_drops_comments() -> None:
    text = 'ARG B=x:1\nFROM ${B} AS one\nRUN a \\\n  # note\n  && b\n# c\nCMD ["x"]\n'
    [stage] = stages(text)
    assert (stage.base, stage.name) == ("x:1", "one")
    assert stage.instructions == [("RUN", "a && b"), ("CMD", '["x"]')]


def test_multi_stage_on_a_pinned_slim_python(dockerfile: list[Stage]) -> None:
    assert len(dockerfile) == 2
    builder, final = dockerfile
    assert builder.name == "builder"
    for stage in dockerfile:
        assert PINNED_SLIM.fullmatch(stage.base), f"{stage.base} is not a pinned python:3.11.N-slim-bookworm"
    # One base for both: the venv's interpreter symlink (/usr/local/bin/python3.11) must exist at run time.
    assert final.base == builder.base


def test_the_final_stage_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    [user] = final.args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) == 65532 and (not gid or int(gid) == 65532)
    # USER comes after every RUN (those run as root to create the user and directories).
    words = [word for word, _ in final.instructions]
    assert words.index("USER") > max(i for i, word in enumerate(words) if word == "RUN")


def test_no_build_tools_or_pip_installs_in_the_final_stage(final: Stage) -> None:
    for rest in final.args("RUN"):
        assert not re.search(r"\b(apt-get|apt|apk)\s+(-\S+\s+)*install\b", rest), rest
        assert not re.search(r"\bpip3?\b(\s+\S+)*\s+install\b", rest), rest
        for tool in BUILD_TOOLS:
            assert not re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", rest), f"{tool} in {rest}"
    # ... and pip itself is removed: nothing can install into the running image.
    assert any(re.search(r"pip uninstall .*\bpip\b", rest) for rest in final.args("RUN"))


def test_only_runtime_dependencies_are_installed(dockerfile: list[Stage]) -> None:
    builder = dockerfile[0]
    installs = [rest for rest in builder.args("RUN") if re.search(r"\bpip\b.*\binstall\b", rest)]
    assert installs, "the builder installs the project with pip"
    for rest in installs:
        assert "[test]" not in rest and "-e " not in rest and "--editable" not in rest
        assert "--no-cache-dir" in rest
        assert re.search(r"install [^&]*\s\.(\s|$)", rest), f"installs the project itself: {rest}"


def test_the_venv_comes_from_the_builder(final: Stage) -> None:
    copies = [shlex.split(rest) for rest in final.args("COPY")]
    assert ["--from=builder", "/opt/venv", "/opt/venv"] in copies
    assert final.env()["PATH"].startswith("/opt/venv/bin:")


def test_entrypoint_cmd_and_ports(final: Stage) -> None:
    [entrypoint] = final.args("ENTRYPOINT")
    [cmd] = final.args("CMD")
    assert exec_form(entrypoint) == ["authz"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["authz"] == "authz.cli:main"
    assert exec_form(cmd) == ["serve", "--config", "/config/config.yaml"]
    args = _parser().parse_args(exec_form(cmd))  # the CLI accepts the default command
    assert (args.policy_secret, args.analytics_secret) == (
        DEFAULT_POLICY_SECRET_DIR,
        DEFAULT_ANALYTICS_SECRET_DIR,
    )
    [expose] = final.args("EXPOSE")
    assert set(expose.split()) == {"5000", "5001"}


def test_environment_and_paths(final: Stage) -> None:
    env = final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["AUTHZ_ENVOY_TEMPLATES"] == TEMPLATES
    copies = [shlex.split(rest) for rest in final.args("COPY")]
    assert ["envoy/", TEMPLATES + "/"] in copies
    run = " ".join(final.args("RUN"))
    for path in (
        "/config",
        DEFAULT_POLICY_SECRET_DIR,
        DEFAULT_ANALYTICS_SECRET_DIR,
        "/catalog",
        DEFAULT_TEMP_DIR,
    ):
        assert path in run.split(), f"{path} is not created"
    assert f"chown 65532:65532 {DEFAULT_TEMP_DIR}" in run  # writable without a volume too (docker run)
    assert exec_form(final.args("VOLUME")[0]) == [DEFAULT_TEMP_DIR]


# --- the build context ---------------------------------------------------------------------------------


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exclude?, regex) in file order; the last matching rule wins, as in Docker."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exclude, re.compile(regex + "(/.*)?")))  # a directory's rule covers its contents
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    result = False
    for exclude, regex in rules:
        if regex.fullmatch(path):
            result = exclude
    return result


def test_dockerignore_matcher() -> None:
    rules = [(True, re.compile(r"(.*/)?__pycache__(/.*)?")), (True, re.compile(r"tests(/.*)?"))]
    assert excluded("authz/__pycache__/x.pyc", rules) and excluded("tests/unit/a.py", rules)
    assert not excluded("authz/cli.py", rules)


def test_dockerignore_keeps_the_venv_git_tests_and_caches_out() -> None:
    rules = ignore_rules()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/unit/test_cli.py",
        "authz/__pycache__/cli.cpython-311.pyc",
    ):
        assert excluded(path, rules), path
    for path in (".mypy_cache/x", ".pytest_cache/x", ".ruff_cache/x", "apigee_authz.egg-info/PKG-INFO"):
        assert excluded(path, rules), path


def test_every_copied_source_exists_and_is_in_the_build_context(dockerfile: list[Stage]) -> None:
    rules = ignore_rules()
    for stage in dockerfile:
        for rest in stage.args("COPY"):
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            if any(w.startswith("--from") for w in shlex.split(rest)):
                continue
            for source in words[:-1]:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: not in the repository"
                relative = source.strip("/")
                assert not excluded(relative, rules), f"COPY {source}: excluded by .dockerignore"
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                kept = [f for f in files if not excluded(str(f.relative_to(ROOT)), rules)]
                assert kept, f"COPY {source}: every file is excluded by .dockerignore"
                if path.is_dir() and source.rstrip("/") == "authz":
                    assert not excluded("authz/cli.py", rules) and not excluded("authz/__init__.py", rules)
    # The wheel build reads README.md (pyproject's readme) and pyproject.toml.
    assert not excluded("README.md", rules) and not excluded("pyproject.toml", rules)
