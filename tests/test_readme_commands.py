"""Every README command runs as written in a fresh clone (issue 25): scripts/check_readme.py extracts
them, and these tests make sure none slips by unchecked and that the cheap sections really run."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("check_readme", REPO / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(spec)
sys.modules["check_readme"] = check_readme  # dataclasses look their module up there
spec.loader.exec_module(check_readme)

# The cheap sections the slow test runs for real (the batch job and `cellseg evaluate` examples).
CHEAP_SECTIONS = ["Batch jobs", "Annotations a lab already has"]


def test_every_readme_command_is_run_or_explicitly_allow_listed():
    """A new README command runs unless it is added to ALLOW_LIST with a reason, and an entry whose
    command left the README is reported: the allow-list cannot hide anything."""
    commands = check_readme.extract((REPO / "README.md").read_text(), reuse_venv=True)
    assert len(commands) > 40
    for cmd in commands:
        assert cmd.treatment in ("run", "server", "skip", "reuse"), cmd
        if cmd.treatment == "skip":
            assert check_readme.ALLOW_LIST[cmd.key] == cmd.reason and cmd.reason
        if cmd.treatment == "reuse":
            assert cmd.key in check_readme.VENV_SETUP
    assert check_readme.stale_allow_list(commands) == []
    assert {c.key for c in commands if c.treatment == "server"} == {"bentoml serve service:CellSegmentation --port 3000"}
    listed = subprocess.run([sys.executable, str(REPO / "scripts" / "check_readme.py"), "--list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert listed.stdout.count("\n[") + 1 == len(commands)  # one entry per command, each with its treatment
    for cmd in check_readme.extract((REPO / "README.md").read_text(), reuse_venv=False):  # as --list without it
        assert f"] {cmd.section}: {cmd.treatment}" in listed.stdout


def test_a_stale_allow_list_entry_is_reported(monkeypatch):
    monkeypatch.setitem(check_readme.ALLOW_LIST, "some command the README dropped", "why")
    commands = check_readme.extract((REPO / "README.md").read_text(), reuse_venv=False)
    assert check_readme.stale_allow_list(commands) == ["some command the README dropped"]


README = """\
# x
## First
```bash
python3 -m venv .venv && . .venv/bin/activate   # set up
# a comment line
cellseg segment a \\
    --out outputs/a      # continued
bentoml serve service:CellSegmentation --port 3001
```
### Second
```console
$ echo "a # not a comment" && cd sub
output line
```
1. A step:
   ```sh
   python - <<'EOF'
   print("# kept")
   EOF
   ```
```python
if True:
    print(1)
```
```json
{"not": "a command"}
```
"""


def test_extraction_rules():
    """Comments dropped, continuations joined, `&&` steps, `$ ` prompts (console output skipped), heredocs
    whole, indented fences, python blocks as `python -`, other blocks ignored; servers found with their port."""
    commands = check_readme.extract(README, reuse_venv=True)
    assert [(c.section, c.key, c.treatment) for c in commands] == [
        ("First", "python3 -m venv .venv", "reuse"),
        ("First", ". .venv/bin/activate", "run"),
        ("First", "cellseg segment a --out outputs/a", "run"),
        ("First", "bentoml serve service:CellSegmentation --port 3001", "server"),
        ("Second", 'echo "a # not a comment"', "run"),
        ("Second", "cd sub", "run"),
        ("Second", "python - <<'EOF' print(\"# kept\")", "run"),
        ("Second", "python - <<'EOF' if True:", "run"),
    ]
    assert commands[3].port == 3001
    assert commands[0].chain == commands[1].chain != commands[2].chain
    assert commands[6].text == "python - <<'EOF'\nprint(\"# kept\")\nEOF"
    assert commands[7].text == "python - <<'EOF'\nif True:\n    print(1)\nEOF"  # indentation kept


def test_a_section_session_keeps_folder_variables_and_exports(tmp_path):
    """`cd`, `X=...` and `export` carry from one command to the next, as in a reader's shell; a command
    past its timeout is killed without ending the session."""
    (tmp_path / "sub").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    session = check_readme.Session(work, tmp_path, {"PATH": "/usr/bin:/bin"})
    for text in ("cd sub", "IMG=a.tif", "export FOO=bar"):
        assert session.run(text, 30, work / "log") == (0, False)
    started = time.monotonic()
    assert session.run("sleep 30", 1, work / "log") == (None, True)
    # killed at its timeout: the shell that ran it is reaped, not waited on as a zombie through the
    # 20 s grace and the SIGKILL's 5 s (which had every timed-out README command cost 25 s more)
    assert time.monotonic() - started < 10
    assert session.run('[ "$PWD" = "$(realpath .)" ] && echo "$IMG $FOO" > out.txt', 30, work / "log") == (0, False)
    assert (tmp_path / "sub" / "out.txt").read_text() == "a.tif bar\n"


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.data
@pytest.mark.slow
def test_the_cheap_sections_run_as_written_in_a_fresh_clone(tmp_path, data_root):
    """The batch-job and `cellseg evaluate` examples, with the server they use, in a clone of HEAD with
    this virtualenv linked as its .venv (~1 min on 2 cores)."""
    if not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("the README's commands read ../shared/data, which this checkout has not")
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtualenv, so there is none to lend the clone")
    if port_busy(check_readme.DEFAULT_PORT):
        pytest.skip(f"port {check_readme.DEFAULT_PORT}, which the README's server uses, is taken by another process")
    report = tmp_path / "readme_check.json"
    sections = [arg for name in CHEAP_SECTIONS for arg in ("--section", name)]
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "check_readme.py"), "--reuse-venv", sys.prefix,
                          *sections, "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads(report.read_text())
    assert report["changed_in_clone"] == []  # everything written is git-ignored
    results = report["commands"]
    ran = {check_readme.normalise(c["text"]): c["status"] for c in results}
    assert ran["cellseg segment ../shared/data/demo --out outputs/demo"] == "ok"
    assert ran["cellseg segment ../shared/data/demo --out outputs/demo2 --server http://localhost:3000 --concurrency 4"] == "ok"
    assert ran["cellseg evaluate --data my_lab/"] == "ok"
    assert {c["section"] for c in results} >= set(CHEAP_SECTIONS)
    assert all(c["status"] in ("ok", "reused") for c in results), results
    clone = Path(re.search(r"commands in (\S+)", run.stdout).group(1))
    assert clone.parent.parent == REPO.parent and not clone.exists()  # beside the checkout; removed (no --keep)
