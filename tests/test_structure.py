"""The layering: imports only go down the floors below, no script imports another, and bench imports no script."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each module may import only from floors below its own (ARCHITECTURE.md, as the code has it).
FLOORS = [
    {"config", "machine", "distributed"},      # ground: model config + CLI helper; per-machine choices; torchrun
    {"tokenizer", "layers", "grammar"},        # BPE; the linear paths and the kernels.cpp loader; JSON grammars
    {"model", "data", "scheduler", "prefix_cache"},  # the model; corpora; which request runs where; KV blocks kept
    {"quantize", "optim", "evaluate"},         # model surgery; optimizers and schedules; bits per byte
    {"checkpoint", "runner", "gguf_file"},     # the one checkpoint format and load_model; the model runner; GGUF
    {"engine", "training"},                    # the generation loop; a training run's parts
    {"metrics"},                               # a server's metrics and access log
    {"train", "convert", "inference", "serve", "app"},  # the scripts
]
SCRIPTS = FLOORS[-1]


def ours_imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & ({m for floor in FLOORS for m in floor} | {"bench"})


def test_every_module_has_a_floor_and_imports_only_below_it():
    floor_of = {m: i for i, floor in enumerate(FLOORS) for m in floor}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == set(floor_of), modules ^ set(floor_of)
    for name in modules:
        for imported in ours_imported(ROOT / f"{name}.py"):
            assert floor_of[imported] < floor_of[name], f"{name} imports {imported}, which is not below it"


def test_bench_imports_no_script():
    for path in (ROOT / "bench").glob("*.py"):
        assert not ours_imported(path) & SCRIPTS, path.name


def test_every_file_opens_with_a_docstring_saying_its_job():
    for path in [*ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 5, path.name
