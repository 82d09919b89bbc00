#!/usr/bin/env python3
"""Import cycles between the top-level modules of src/ (a folder or a file), outside tests.

Reads `crate::NAME` paths in each file up to its `mod tests` block; prints every edge that sits
on a cycle and exits 1 if there is one. Standard library only.

  python3 scripts/module_cycles.py src
"""
import os
import re
import sys


def top(root, path):
    rel = os.path.relpath(path, root).split(os.sep)
    return rel[0][:-3] if len(rel) == 1 else rel[0]


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "src"
    edges = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs") or name in ("main.rs", "lib.rs"):
                continue
            path = os.path.join(folder, name)
            text = open(path, encoding="utf-8").read()
            text = re.split(r"\n\s*(#\[cfg\(test\)\]\s*)?mod tests\b", text)[0]
            text = "\n".join(l for l in text.splitlines() if not l.strip().startswith("//"))
            source = top(root, path)
            for target in set(re.findall(r"\bcrate::(\w+)", text)):
                if target != source:
                    edges.setdefault(source, set()).add(target)

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in edges.get(a, ()))

    cyclic = sorted((a, b) for a in edges for b in edges[a] if reaches(b, a))
    for a, b in cyclic:
        print(f"{a} -> {b}")
    print(f"{len(cyclic)} edges on cycles among {len(edges)} modules")
    sys.exit(1 if cyclic else 0)


if __name__ == "__main__":
    main()
