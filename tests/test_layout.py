"""The layout rule: helpers/ is the library a student imports (no command lines, no process tricks), the
commands live beside it, every function fits on a screen, and the plain epoch a student copies stays short."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "helpers").glob("*.py"))
PROJECT = [*LIBRARY, ROOT / "train.py", *sorted((ROOT / "tools").glob("*.py"))]


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]


def test_the_library_holds_the_modules_a_student_imports_and_no_command():
    modules = "__init__ recipe device checkpoint measure dataset model inference backprop lr_finder results utils"
    assert {p.stem for p in LIBRARY} == set(modules.split())
    for path in LIBRARY:
        source = path.read_text()
        assert "argparse" not in source and "sys.argv" not in source, f"{path.name} parses a command line"
        assert "__main__" not in source, f"{path.name} is a command"
    assert (ROOT / "train.py").exists()
    assert {p.stem for p in (ROOT / "tools").glob("*.py")} >= {"bench", "evidence", "ablation"}


def test_no_os_kill_anywhere():
    # on Windows os.kill(pid, 0) terminates the process it probes
    assert not [p.name for p in PROJECT if "os.kill" in p.read_text()]


def test_every_function_fits_on_a_screen():
    lines = {f"{p.name}:{f.name}": f.end_lineno - f.lineno + 1 for p in PROJECT for f in _functions(p)}
    assert {name: count for name, count in lines.items() if count > 70} == {}


def test_the_plain_training_epoch_a_student_copies_is_at_most_40_lines():
    (train,) = [f for f in _functions(ROOT / "helpers" / "backprop.py") if f.name == "train"]
    assert train.end_lineno - train.lineno + 1 <= 40
    body = ast.unparse(train)
    assert "x.to(device" in body and "isfinite" in body  # torchvision's batches, moved; one finiteness check
