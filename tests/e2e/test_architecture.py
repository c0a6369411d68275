"""The library's modules depend on each other one way, as docs/architecture.md draws them:
flight -> query -> catalog -> {io, wire} -> {metrics, audit} -> error. Read from the
source (every `crate::` path outside test modules), so a new upward reference fails here."""

import re

from conftest import REPO

SRC = REPO / "crates" / "quiver" / "src"
# Lower layers have higher ranks; a module may only name modules of a higher rank.
RANK = {"flight": 0, "cluster": 0, "demo": 0, "query": 1, "catalog": 2, "io": 3, "wire": 3, "metrics": 4, "audit": 4, "error": 5}
# `crate::Error` and `crate::Result` are lib.rs's re-exports of `error`'s.
REEXPORTS = {"Error": "error", "Result": "error"}


def module_of(path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")


def non_test_code(text: str) -> str:
    """The file up to its test module (by convention the last item of a file)."""
    return text.split("#[cfg(test)]", 1)[0]


def references():
    for path in sorted(SRC.rglob("*.rs")):
        if path.name == "tests.rs" or path.name == "lib.rs" or "tests" in path.relative_to(SRC).parts[:-1]:
            continue
        source = module_of(path)
        code = "\n".join(line for line in non_test_code(path.read_text()).splitlines() if not line.lstrip().startswith("//"))
        for target in set(re.findall(r"\bcrate::(\w+)", code)):
            yield path.relative_to(SRC), source, REEXPORTS.get(target, target)


def test_every_module_has_a_layer():
    modules = {module_of(p) for p in SRC.rglob("*.rs") if p.name != "lib.rs"}
    assert modules == set(RANK), modules ^ set(RANK)


def test_dependencies_point_one_way():
    found = list(references())
    assert len(found) > 20, "the scan found the crate:: paths"
    upward = [(str(f), s, t) for f, s, t in found if t != s and RANK[t] <= RANK[s]]
    assert not upward, upward
