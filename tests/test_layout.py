"""The package's layout is its pipeline: a module imports only from its own layer or an earlier one
(docs/architecture.md draws the same table), and the on-disk contracts import no stage."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mmdistill"

# In pipeline order; a module belongs to the first layer with a prefix of its dotted name.
LAYERS = [
    ("shared", ["errors", "io", "utils", "distributed", "tracking"]),
    ("config", ["config"]),
    ("data", ["data"]),
    ("encoders", ["encoders"]),
    ("prepare", ["features", "prepare"]),
    ("model", ["model", "losses", "similarity", "metrics", "coresets"]),
    ("experts", ["experts"]),
    ("synthetic", ["synthetic"]),
    ("distill", ["distill"]),
    ("evaluation", ["evaluation"]),
    ("report", ["report"]),
    ("pipeline", ["pipeline"]),
    ("bench", ["bench"]),
    ("cli", ["cli", "__main__", ""]),
]
CONTRACTS = ("experts.store", "synthetic")
STAGES = ("experts", "distill", "evaluation", "report", "pipeline", "bench", "cli")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix("__init__").rstrip(".")


def _layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p):
            return index
    assert module == "", f"module {module!r} has no layer: add it to LAYERS and docs/architecture.md"
    return len(LAYERS) - 1


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mmdistill":
            assert node.level == 0, f"{path}: relative import"
            if node.module == "mmdistill":
                found |= {a.name for a in node.names if a.name != "__version__"}
            else:
                found.add(node.module.removeprefix("mmdistill").lstrip("."))
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("mmdistill").lstrip(".") for a in node.names if a.name.split(".")[0] == "mmdistill"
            }
    return found


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_later_stage(module):
    later = {imported for imported in _imports(MODULES[module]) if _layer(imported) > _layer(module)}
    assert not later, f"{module} ({LAYERS[_layer(module)][0]}) imports later layers: {sorted(later)}"


@pytest.mark.parametrize("contract", CONTRACTS)
def test_contracts_import_no_stage(contract):
    stages = {m for m in _imports(MODULES[contract]) if m.split(".")[0] in STAGES and m != contract}
    assert not stages, f"the {contract} contract imports stages {sorted(stages)}"


def test_the_architecture_page_lists_every_module():
    page = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    missing = [
        m
        for m, path in MODULES.items()
        if m
        and not m.endswith("__init__")
        and path.name != "__init__.py"
        and f"{path.relative_to(PACKAGE)}" not in page
        and f"`{path.name}`" not in page
        and f"`{m.split('.')[-1]}`" not in page
    ]
    assert not missing, f"docs/architecture.md does not mention {missing}"
