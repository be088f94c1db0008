"""requirements.lock: the locked, hashed dependency set that CI installs and audits."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"

PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def lock_entries() -> list[str]:
    """The lock's requirement lines as pip reads them: continuations joined, comments dropped."""
    text = LOCK.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def pins() -> dict[str, Version]:
    """Each locked package's canonical name and its pinned version."""
    found: dict[str, Version] = {}
    for entry in lock_entries():
        match = PIN.match(entry.split()[0])
        if match:
            found[canonicalize_name(match["name"])] = Version(match["version"])
    return found


def declared() -> list[Requirement]:
    """pyproject.toml's runtime dependencies and its ``test`` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return [Requirement(line) for line in lines]


class TestLock:
    def test_every_declared_dependency_is_pinned_within_its_pyproject_range(self) -> None:
        """Every runtime and test requirement in pyproject.toml is pinned in requirements.lock at a version its specifier allows."""
        locked = pins()
        wrong = []
        for requirement in declared():
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            version = locked.get(canonicalize_name(requirement.name))
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                wrong.append(f"{requirement} (locked: {version})")
        assert wrong == []

    def test_every_entry_is_one_exact_pin_with_a_sha256_hash(self) -> None:
        """Each lock entry is `name==version` followed by at least one sha256 hash, so pip --require-hashes accepts it."""
        entries = lock_entries()
        assert entries, "requirements.lock holds no requirement"
        bad = [
            entry
            for entry in entries
            if not PIN.fullmatch(entry.split()[0])
            or not HASH.search(entry)
            or any(not HASH.fullmatch(word) for word in entry.split()[1:])
        ]
        assert bad == []

    def test_no_package_is_pinned_twice(self) -> None:
        """No package appears in the lock more than once, under any spelling of its name."""
        names = [canonicalize_name(entry.split("==", 1)[0]) for entry in lock_entries()]
        assert sorted(names) == sorted(set(names))

    def test_the_header_says_how_to_regenerate_the_lock(self) -> None:
        """The lock opens with a comment giving the pip-compile command that regenerates it from pyproject.toml."""
        header = []
        for line in LOCK.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        text = "\n".join(header)
        assert "pip-compile" in text
        assert "--generate-hashes" in text
        assert "--extra=test" in text
        assert "pyproject.toml" in text
