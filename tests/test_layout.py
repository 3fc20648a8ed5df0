"""The code's shape, held as the project's rules state it: short functions, short modules, imports that
flow one way, and the engine used through its package's names only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flatstack"
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_no_function_over_60_lines():
    long = [f"{p.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1})"
            for p in MODULES for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long


def test_no_module_over_400_lines_but_the_model():
    long = [f"{p.relative_to(PACKAGE)} ({n})" for p in MODULES
            if (n := len(p.read_text().splitlines())) > 400 and p.name != "model.py"]
    assert not long, long


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def test_nothing_outside_the_engine_imports_its_insides():
    """Outside flatstack/engine/, the engine is `flatstack.engine`'s names (and its light config module,
    which the CLI reads to build its options without loading torch)."""
    bad = [f"{p.relative_to(PACKAGE)}: {m}" for p in MODULES if "engine" not in p.relative_to(PACKAGE).parts
           for m in imports(p) if m.startswith("flatstack.engine.") and m != "flatstack.engine.config"]
    assert not bad, bad


# a module may import from its own tier and those before it
TIERS = [("kernels", "atomic", "allocator", "ceilings"), ("model",), ("checkpoint", "tokenizer", "data"), ("engine",),
         ("generate", "train", "train_config", "train_step", "optim", "losses", "plot", "parallel"),
         ("server", "bench", "bench_llama_cpp", "bench_serve", "bench_kernels", "bench_train"),
         ("cli", "commands")]


def layer(module: str) -> int | None:
    name = module.removeprefix("flatstack.").split(".")[0]
    return next((i for i, tier in enumerate(TIERS) if name in tier), None)


def test_imports_flow_one_way():
    bad = []
    for p in MODULES:
        rel = p.relative_to(PACKAGE)
        own = layer(".".join(rel.with_suffix("").parts))
        for m in imports(p):
            theirs = layer(m) if m.startswith("flatstack.") else None
            if own is not None and theirs is not None and theirs > own:
                bad.append(f"{rel}: {m}")
    assert not bad, bad
