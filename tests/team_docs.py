"""docs/team.md as a script: its fenced blocks, read in order, filled and run as written.

Two kinds of blocks: ```bash blocks, whose first line (a comment) says where they run ("# the
database host, as its postgres user"), and ```ini blocks holding a file, whose first line names
it ("# /etc/mlflow/server.env"). `<PLACEHOLDERS>` are what a reader fills in; `fill` puts the
test's values there, and also moves what the test's machine cannot share with a real one: the
fixed paths (/etc/mlflow, ...) and ports (5000, 5432) become temporary folders and free ports.

`run` runs a bash block as written, with bash, from a script file (so that nothing of it is on
a command line), the answers to its prompts on its standard input. The few lines no test can run
(`useradd`, `systemctl`, `pip install`, ...) are listed in NOT_RUN with the reason, and replaced
by a no-op; a line listed there that the page no longer has fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO

DOCS = REPO / "docs" / "team.md"
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")

# Lines of the page that no test runs, and why: they change the machine itself, or install.
NOT_RUN = {
    "useradd --system --no-create-home --shell /usr/sbin/nologin mlflow": (
        "no system user is made by a test: the server runs as the test's user"
    ),
    "python3 -m venv /opt/mlflow-server": "the test's environment is the server's",
    '/opt/mlflow-server/bin/pip install "mlflow[auth]>=3.16.1,<4" "psycopg[binary]>=3.1" boto3': (
        "checked against what is installed (test_the_documented_packages_are_installed)"
    ),
    "chown mlflow:mlflow /etc/mlflow/server.key /etc/mlflow/server.pem "
    "/etc/mlflow/basic_auth.ini": "no `mlflow` user here: the server runs as the test's user",
    "systemctl daemon-reload && systemctl enable --now mlflow": (
        "the test starts the unit's command with its environment file (team_servers.mlflow_server)"
    ),
    "make setup && . .venv/bin/activate": "the hosts run in the project's environment already",
}


@dataclass(frozen=True)
class Block:
    language: str  # bash or ini
    text: str  # without the fences

    @property
    def title(self) -> str:
        """The first line's comment: where a bash block runs, or the file an ini block holds."""
        first = self.text.splitlines()[0]
        assert first.startswith("# "), f"docs/team.md: a block starts without a comment: {first}"
        return first[2:]


def blocks(language: str) -> list[Block]:
    """The page's ```<language> blocks, in order."""
    found = re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), flags=re.S)
    return [Block(language, text) for text in found]


def bash_block(title: str) -> Block:
    """The one bash block whose title starts with `title`."""
    found = [b for b in blocks("bash") if b.title.startswith(title)]
    assert len(found) == 1, f"docs/team.md: {len(found)} bash blocks titled {title!r}"
    return found[0]


def file_block(path: str) -> Block:
    """The one ini block holding the file `path`."""
    found = [b for b in blocks("ini") if b.title == path]
    assert len(found) == 1, f"docs/team.md: {len(found)} blocks of the file {path}"
    return found[0]


@dataclass(frozen=True)
class Values:
    """What the test puts where the page has a placeholder, and where it moves the page's fixed
    paths and ports."""

    placeholders: dict[str, str]  # "<NAME>" -> value
    paths: dict[str, str] = field(default_factory=dict)  # "/etc/mlflow" -> a temporary folder
    ports: dict[str, str] = field(default_factory=dict)  # "5000" -> a free port

    def __or__(self, placeholders: dict[str, str]) -> Values:
        return Values(self.placeholders | placeholders, self.paths, self.ports)


def fill(text: str, values: Values) -> str:
    """`text` with every placeholder filled; fails on one the test has no value for."""
    for name, value in values.placeholders.items():
        text = text.replace(name, value)
    for path, moved in values.paths.items():
        text = text.replace(path, moved)
    for port, moved in values.ports.items():
        text = re.sub(rf"\b{port}\b", moved, text)
    left = sorted(set(PLACEHOLDER.findall(text)))
    assert not left, f"docs/team.md: no value for {left}"
    return text


def file_text(path: str, values: Values) -> str:
    return fill(file_block(path).text, values)


def write_file(path: str, values: Values, dest: Path | None = None) -> Path:
    """The page's file `path`, filled, written (mode 600) where the test keeps it."""
    dest = dest or Path(fill(path, values))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(file_text(path, values))
    dest.chmod(0o600)
    return dest


def env_file(text: str) -> dict[str, str]:
    """NAME=VALUE lines, as systemd's EnvironmentFile= reads them."""
    env = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def unit_settings(text: str) -> dict[str, str]:
    """A systemd unit's settings (continuation lines joined), e.g. ExecStart, EnvironmentFile."""
    settings = {}
    for line in text.replace("\\\n", " ").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


def exports(block: Block, values: Values) -> dict[str, str]:
    """NAME=VALUE of a block of `export` lines (comments dropped), `$HOME` left to the shell."""
    env = {}
    for line in fill(block.text, values).splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            for assignment in words[1:]:
                name, _, value = assignment.partition("=")
                env[name] = value
    return env


@dataclass(frozen=True)
class Shell:
    """Where a block runs: a working directory, an environment, and (as root) another user."""

    cwd: Path
    env: dict[str, str]
    user: dict = field(default_factory=dict)  # subprocess's user/group/extra_groups
    profile: str = ""  # lines every block of this shell starts with (a host's settings)


def run(
    block: Block, shell: Shell, values: Values, *, stdin: str = "", timeout: float = 600
) -> str:
    """Run a bash block as written (filled), in a session of its own (no terminal: a prompt
    reads its answer from `stdin`); its output, or the test fails with it. The script and its
    output go through files: a pipe would keep the caller waiting for any process the block
    leaves running (DVC's queue workers)."""
    lines = []
    for line in block.text.splitlines():
        if line in NOT_RUN:
            lines.append(f": not run here, {NOT_RUN[line]!r}")
        else:
            lines.append(line)
    script = fill("\n".join(lines), values)
    with tempfile.TemporaryDirectory(prefix="team-doc-") as folder:
        os.chmod(folder, 0o755)  # readable by the block's user
        path = Path(folder) / "block.sh"
        path.write_text(f"set -euo pipefail\n{shell.profile}\n{script}\n")
        path.chmod(0o644)
        log = Path(folder) / "output"
        with log.open("w") as out:
            done = subprocess.run(
                ["bash", str(path)],
                cwd=shell.cwd,
                env=shell.env,
                input=stdin.encode(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                timeout=timeout,
                **shell.user,
            )
        output = log.read_text()
    assert done.returncode == 0, f"docs/team.md, block {block.title!r}:\n{script}\n---\n{output}"
    return output
