"""docs/ARCHITECTURE.md, checked: the layers' import order and "no module outside `adapters/`
tests a method's name", read from the source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The layers of docs/ARCHITECTURE.md: module (or package) → layer.
LAYER_OF = {
    **dict.fromkeys(
        ["config", "activations", "adapters", "fused", "inject", "checkpoint", "analysis"], "core"
    ),
    "modelcard": "core",
    "quantize": "core",
    **dict.fromkeys(
        ["train", "evaluate", "data", "models", "prefix_cache", "tracking", "peft", "export"]
        + ["lmeval", "distill"],
        "training",
    ),
    "study": "study",
    **dict.fromkeys(["serving", "vllm", "kernels"], "serving"),
    "cli": "cli",
}
# What each layer may import: the layers above it (serving and study are siblings).
MAY_IMPORT = {
    "core": {"core"},
    "training": {"core", "training"},
    "study": {"core", "training", "study"},
    "serving": {"core", "training", "serving"},
    "cli": {"core", "training", "study", "serving", "cli"},
}
# Inside serving, one job per module (vLLM's and SGLang's layout), in tiers: a module imports
# only modules of its own tier or the tiers before it (docs/ARCHITECTURE.md, "serving").
SERVING_TIERS = [
    ("model", ["plan", "backend", "layers", "multi", "store"]),
    (
        "engine parts",
        ["sampling", "detokenize", "kv_rows", "sequence", "scheduler", "output"]
        + ["config", "tenants", "metrics"],
    ),  # fmt: skip
    ("engine", ["engine"]),
    ("http", ["openai"]),
    ("process", ["launch", ""]),  # "": the package's __init__ (its public names)
]
TIER_OF = {m: i for i, (_, mods) in enumerate(SERVING_TIERS) for m in mods}
# The experiment's design names its variants (NoRA vs LoRA); the library code does not.
NAMES_METHODS_FREELY = {"adapters", "study"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every `nora.*` module the source imports (relative imports resolved)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nora.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "nora":  # from nora import train  → nora.train
                out |= {f"nora.{a.name}" for a in node.names}
            elif name.startswith("nora."):
                out.add(name)
    return out


def layer(module: str) -> str | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else "core"  # `nora` itself: core API


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer(module)
    bad = []
    for m in sorted(imported_modules(ast.parse(source), module, is_package)):
        theirs = layer(m)
        if theirs is not None and theirs not in MAY_IMPORT[own]:
            bad.append(f"{module} ({own}) imports {m} ({theirs})")
    return bad


def method_name_tests(source: str, names: set[str]) -> list[int]:
    """Lines where a comparison (==, !=, in) involves a built-in method's name as a string."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(e, ast.Constant) and e.value in names for e in elts):
                    lines.append(node.lineno)
    return lines


def _sources():
    for path in sorted((SRC / "nora").rglob("*.py")):
        yield path, _module_name(path)


def test_every_module_has_a_layer():
    missing = [m for _, m in _sources() if layer(m) is None]
    assert not missing, f"add these to docs/ARCHITECTURE.md and LAYER_OF: {missing}"


def test_no_upward_imports():
    bad = []
    for path, module in _sources():
        bad += upward_imports(path.read_text(), module, path.name == "__init__.py")
    assert not bad, "\n".join(bad)


def test_no_method_name_tests_outside_adapters():
    from nora.adapters import METHODS

    names = set(METHODS)
    bad = []
    for path, module in _sources():
        if module.split(".")[1:2] and module.split(".")[1] in NAMES_METHODS_FREELY:
            continue
        bad += [f"{path.relative_to(SRC)}:{n}" for n in method_name_tests(path.read_text(), names)]
    assert not bad, "test a capability (Adapter.linear, .mergeable, .shrinks…), not a name:\n" + (
        "\n".join(bad)
    )


@pytest.mark.parametrize(
    "source, module, expected",
    [
        (
            "from nora.study import plots",
            "nora.analysis",
            ["nora.analysis (core) imports nora.study"],
        ),
        ("from nora import train", "nora.inject", ["nora.inject (core) imports nora.train"]),
        ("from ..study.plots import x", "nora.serving.launch", ["nora.serving.launch (serving)"]),
        ("from nora.inject import plan", "nora.serving.multi", []),
        ("from .layers import x", "nora.serving.multi", []),
        ("import nora.cli", "nora.study.runner", ["nora.study.runner (study) imports nora.cli"]),
    ],
)
def test_the_import_checker_catches_what_it_should(source, module, expected):
    got = upward_imports(source, module)
    assert len(got) == len(expected) and all(
        g.startswith(e) for g, e in zip(got, expected, strict=True)
    )


@pytest.mark.parametrize(
    "source, hits",
    [
        ('if cfg.method == "lora": pass', 1),
        ('ok = m in ("nora", "loran")', 1),
        ('x = "lora"', 0),  # naming a default or a preset is not a test
        ("if cls.linear: pass", 0),
    ],
)
def test_the_name_checker_catches_what_it_should(source, hits):
    assert len(method_name_tests(source, {"lora", "nora", "loran"})) == hits


def serving_tier(module: str) -> int | None:
    """The tier of a `nora.serving.*` module (its first component below serving)."""
    parts = module.split(".")
    return TIER_OF.get(parts[2] if len(parts) > 2 else "")


def backward_serving_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    own = serving_tier(module)
    bad = []
    for m in sorted(imported_modules(ast.parse(source), module, is_package)):
        if (
            m.startswith("nora.serving")
            and (theirs := serving_tier(m)) is not None
            and theirs > own
        ):
            bad.append(
                f"{module} ({SERVING_TIERS[own][0]}) imports {m} ({SERVING_TIERS[theirs][0]})"
            )
    return bad


def test_serving_modules_import_only_earlier_tiers():
    bad, missing = [], []
    for path, module in _sources():
        if not (module == "nora.serving" or module.startswith("nora.serving.")):
            continue
        if serving_tier(module) is None:
            missing.append(module)
            continue
        bad += backward_serving_imports(path.read_text(), module, path.name == "__init__.py")
    assert not missing, f"add these to SERVING_TIERS and docs/ARCHITECTURE.md: {missing}"
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source, module, bad",
    [
        ("from nora.serving.openai.app import create_app", "nora.serving.engine", 1),
        ("from nora.serving.engine import Engine", "nora.serving.sampling", 1),
        ("from .sampling import SamplingParams", "nora.serving.engine", 0),
        ("from ..engine import Engine", "nora.serving.openai.app", 0),
    ],
)
def test_the_serving_tier_checker_catches_what_it_should(source, module, bad):
    assert len(backward_serving_imports(source, module)) == bad
