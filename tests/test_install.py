"""The lock file is what is installed: a fresh clone gets the versions the tests passed with."""
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_installed_versions_are_the_locked_ones():
    lock = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M))
    assert lock["torch"] == "2.13.0" and len(lock) > 50
    wrong = {}
    for name, want in lock.items():
        try:
            got = version(name).split("+")[0]  # +cpu: the wheel's local label
        except PackageNotFoundError:
            got = None
        if got != want:
            wrong[name] = (want, got)
    assert not wrong, f"installed differs from requirements.lock (want, got): {wrong}"
