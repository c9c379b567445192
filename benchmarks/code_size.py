"""The longest functions and the largest classes of a package, read from its source (``ast``).

A function's or class's length is its lines from the ``def``/``class`` line to its last line
(docstring, comments and blank lines inside included; decorators not); nested functions and
methods count on their own too. docs/ARCHITECTURE.md quotes the result for ``granq_ao/``.

    python benchmarks/code_size.py [--package granq_ao] [--top 10] [--check]

``--check``: exit 1 if a function is longer than ``--max-function`` (60) lines or a class longer
than ``--max-class`` (250) lines.
"""
from __future__ import annotations

import argparse
import ast
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def measure(package: Path) -> Dict[str, List[Dict[str, object]]]:
    """``{"functions": [...], "classes": [...]}``, each entry ``{"name", "path", "line", "lines"}``
    (``name`` qualified: ``Class.method``, ``outer.<locals>.inner``), longest first."""
    found: Dict[str, List[Dict[str, object]]] = {"functions": [], "classes": []}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "classes" if isinstance(child, ast.ClassDef) else "functions"
                name = prefix + child.name
                found[kind].append({"name": name, "path": path, "line": child.lineno,
                                    "lines": child.end_lineno - child.lineno + 1})
                visit(child, path, name + ("." if kind == "classes" else ".<locals>."))
            else:
                visit(child, path, prefix)

    for file in sorted(package.rglob("*.py")):
        visit(ast.parse(file.read_text()), str(file.relative_to(package.parent)), "")
    for entries in found.values():
        entries.sort(key=lambda entry: (-entry["lines"], entry["path"], entry["line"]))
    return found


def format_report(found: Dict[str, List[Dict[str, object]]], top: int, max_function: int, max_class: int) -> str:
    lines = []
    for kind, limit in (("functions", max_function), ("classes", max_class)):
        entries = found[kind]
        over = [entry for entry in entries if entry["lines"] > limit]
        median = statistics.median(entry["lines"] for entry in entries) if entries else 0
        lines.append(f"{kind}: {len(entries)}, median {median:g} lines, {len(over)} over {limit} lines")
        for entry in entries[:top]:
            lines.append(f"  {entry['lines']:4d}  {entry['path']}:{entry['line']}  {entry['name']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Dict[str, object]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=str(REPO / "granq_ao"))
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--max-function", type=int, default=60)
    parser.add_argument("--max-class", type=int, default=250)
    parser.add_argument("--check", action="store_true", help="exit 1 if a function or class is over its limit")
    args = parser.parse_args(argv)
    found = measure(Path(args.package))
    print(format_report(found, args.top, args.max_function, args.max_class))
    if args.check and (any(entry["lines"] > args.max_function for entry in found["functions"])
                       or any(entry["lines"] > args.max_class for entry in found["classes"])):
        raise SystemExit(1)
    return found


if __name__ == "__main__":
    main()
