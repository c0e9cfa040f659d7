"""The layer order of docs/architecture.md: every import inside lmjax/ points down (or sideways
within a layer), read from the source with `ast`, imports inside functions included."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "lmjax"

# lowest first; a module may import its own layer and the ones below
LAYERS = [
    ["config", "paths"],
    ["chips", "positions", "sharding", "attention", "loss", "optim", "mup", "rope_scaling",
     "backends", "data", "faults", "lease"],
    ["model", "moe"],
    ["flops", "checkpoint", "metrics", "profiler", "validate", "resume"],
    ["train", "evaluate", "sample", "inference", "interop", "plan", "sizing", "bench",
     "coord_check", "distributed", "corpora"],
    ["scaling"],
    ["cli", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def room(module: str) -> str:
    """The layer entry a module belongs to: its top-level name below lmjax."""
    return module.split(".")[1] if module.startswith("lmjax.") else module


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) for every `lmjax.x` the file imports, wherever in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmjax"):
            if node.module == "lmjax":
                found += [(node.lineno, f"lmjax.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lmjax.")]
    return found


def modules() -> dict[str, pathlib.Path]:
    return {".".join(("lmjax", *p.relative_to(ROOT).with_suffix("").parts)): p
            for p in ROOT.rglob("*.py")}


def test_every_module_has_a_layer():
    rooms = {room(m) for m in modules() if m != "lmjax.__init__"}
    assert rooms <= set(LAYER), f"modules with no layer: {sorted(rooms - set(LAYER))}"


def test_no_import_points_up():
    upward = []
    for module, path in modules().items():
        if module == "lmjax.__init__":
            continue
        for line, target in imports(path):
            if target != "lmjax" and LAYER[room(target)] > LAYER[room(module)]:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} {module} -> {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_config_imports_nothing_of_lmjax():
    assert imports(ROOT / "config.py") == []


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "model.py"
    bad.write_text("def f():\n    from lmjax import train\n")
    assert imports(bad) == [(2, "lmjax.train")]
    assert LAYER[room("lmjax.train")] > LAYER[room("lmjax.model")]
