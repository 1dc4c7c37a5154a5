"""The lock file is what is installed: a fresh clone gets the versions the tests passed with."""
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = "requirements-bench.txt"  # llama.cpp for bench.py: in the lock, not installed by `make test`


def read_lock() -> dict[str, tuple[str, set[str]]]:
    """package -> (version, what it is there for: requirement files and parent packages, as pip-compile says)."""
    lock, current = {}, None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line):
            current = m.group(1).lower()
            lock[current] = (m.group(2), set())
        elif current and (m := re.match(r"^\s+#\s+(?:via\s+)?(-r \S+|[A-Za-z0-9_.\-]+)\s*$", line)):
            lock[current][1].add(m.group(1).lower().removeprefix("-r "))
    return lock


def test_installed_versions_are_the_locked_ones():
    lock = read_lock()
    assert lock["torch"][0] == "2.13.0" and len(lock) > 50

    def needed(name: str, seen=()) -> bool:  # wanted by a requirement set other than the optional one
        return any(via.endswith(".txt") and via != OPTIONAL.lower() or
                   via in lock and via not in seen and needed(via, (*seen, name)) for via in lock[name][1])
    wrong = {}
    for name, (want, _) in lock.items():
        try:
            got = version(name)
        except PackageNotFoundError:
            got = None
        if (got is None and needed(name)) or (got is not None and got.split("+")[0] != want):  # +cpu: the wheel
            wrong[name] = (want, got)
    assert not wrong, f"installed differs from requirements.lock (want, got): {wrong}"
    assert not needed("llama-cpp-python") and needed("fastapi") and needed("ninja")
