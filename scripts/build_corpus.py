"""Build the embedded corpus: docstrings of the Python standard library, as gzipped JSONL.

The result ships inside the package (`saelab/data/stdlib_docs.jsonl.gz`) so that every machine reads
the same bytes with no download. Rerun only to regenerate it:

    python scripts/build_corpus.py saelab/data/stdlib_docs.jsonl.gz
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import sys
import sysconfig
from pathlib import Path

MIN_WORDS = 12
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo"}


def docstrings(path: Path, module: str):
    """Yield (qualified name, docstring) for the module, its classes and functions."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return
    stack: list[tuple[ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef, str]] = [(tree, module)]
    while stack:
        node, name = stack.pop(0)
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield name, doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((child, f"{name}.{child.name}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    n_docs = n_words = 0
    with gzip.GzipFile(args.out, "wb", mtime=0) as raw:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if SKIP_DIRS & set(rel.parts):
                continue
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            for name, doc in docstrings(path, module):
                words = len(doc.split())
                if words < MIN_WORDS or doc in seen:
                    continue
                seen.add(doc)
                raw.write((json.dumps({"text": doc, "source": name}) + "\n").encode())
                n_docs += 1
                n_words += words
    print(f"{n_docs} documents, {n_words} words from Python {sys.version.split()[0]} -> {args.out}")


if __name__ == "__main__":
    main()
