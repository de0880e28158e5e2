"""tasks.py's namespaces: every `inv <task>` the README, CI, the Dockerfile and the tests name still resolves."""

from __future__ import annotations

import re
from pathlib import Path

import tasks

REPO = Path(__file__).resolve().parent.parent
# `inv build`, `.venv/bin/inv test`, "inv", "seed" (the tests' argv form), `inv bench.boot`
INV = re.compile(r"""\binv(?:\s+|["'],\s*["'])([a-z][a-z0-9.-]*)""")


def named_tasks() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in [REPO / "README.md", REPO / ".ci/run", REPO / "Dockerfile", *sorted((REPO / "tests").glob("*.py"))]:
        for name in INV.findall(path.read_text()):
            found.setdefault(name, set()).add(path.relative_to(REPO).as_posix())
    return found


def resolves(name: str) -> bool:
    try:
        tasks.ns[name]
    except (KeyError, ValueError):
        return False
    return True


def test_every_inv_command_named_in_the_docs_resolves() -> None:
    names = named_tasks()
    assert {"build", "test", "publish", "bench", "bench-replication", "seed"} <= names.keys()
    missing = {n: sorted(w) for n, w in names.items() if n not in ("inv", "invoke") and not resolves(n)}
    assert not missing, f"`inv <task>` named but not a task: {missing}"


def test_namespaces_and_their_aliases() -> None:
    assert tasks.ns["bench"] is tasks.ns["bench.boot"]
    assert tasks.ns["publish"] is tasks.ns["publish.run"]
    assert tasks.ns["bench-replication"] is tasks.ns["bench.replication"]
    assert tasks.ns["bench-publish"] is tasks.ns["bench.publish"]
    assert tasks.ns[""] is tasks.ns["build"]  # the default task
    assert not resolves("bench.nothing")  # the check can fail


def test_publish_task_passes_every_option_of_publish_command_with_its_default() -> None:
    """invoke reads a task's options from its signature, so `inv publish` must spell publish_command's
    parameters again; this keeps the two in step (a new option, a changed default)."""
    import inspect

    from image.release.publish.cli import publish_command

    task_params = dict(inspect.signature(tasks.publish.body).parameters)
    task_params.pop("c")
    internal = {"release_dir", "out"}  # set by the tests and the e2e, not by a release engineer
    command_params = {n: p for n, p in inspect.signature(publish_command).parameters.items() if n not in internal}
    assert list(task_params) == list(command_params)
    differing = {
        n: (p.default, command_params[n].default)
        for n, p in task_params.items()
        if p.default != command_params[n].default
    }
    assert not differing, f"inv publish defaults differ from publish_command's (task, command): {differing}"
    # The task hands every one of them on (a parameter the body forgot would silently use the default).
    source = inspect.getsource(tasks.publish.body)
    forgotten = [n for n in command_params if f"{n}={n}" not in source and n not in ("regions", "version")]
    assert not forgotten, f"inv publish does not pass {forgotten} to publish_command"
