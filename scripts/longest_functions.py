#!/usr/bin/env python3
"""The longest functions under a source tree, by lines from `fn` to its closing brace.

Standard library only; counts every line (doc comments above a function are not counted, its
body's comments are). Tests (`mod tests` blocks and `tests/`) are included unless --no-tests.

  python3 scripts/longest_functions.py src --top 15
"""
import argparse
import os
import re

FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?((const|async|unsafe|extern \"C\")\s+)*fn\s+(\w+)")


def functions(path):
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    in_tests = None
    for i, line in enumerate(lines):
        if re.match(r"^\s*mod tests\b", line):
            in_tests = i
        m = FN.match(line)
        if not m:
            continue
        depth, opened = 0, False
        for j in range(i, len(lines)):
            code = re.sub(r'"(\\.|[^"\\])*"|//.*', "", lines[j])
            if not opened and ";" in code and "{" not in code:
                break  # a declaration without a body (a trait item)
            depth += code.count("{") - code.count("}")
            opened = opened or "{" in code
            if opened and depth <= 0:
                yield m.group(5), i + 1, j - i + 1, in_tests is not None
                break


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--no-tests", action="store_true")
    args = parser.parse_args()
    found = []
    for folder, _, files in os.walk(args.root):
        for name in sorted(files):
            if name.endswith(".rs"):
                path = os.path.join(folder, name)
                for fn, line, length, test in functions(path):
                    if not (args.no_tests and test):
                        found.append((length, f"{path}:{line}", fn))
    found.sort(key=lambda f: (-f[0], f[1]))
    for length, where, fn in found[: args.top]:
        print(f"{length:5d}  {fn}  {where}")
    lengths = sorted(f[0] for f in found)
    if lengths:
        print(f"{len(lengths)} functions; median {lengths[len(lengths) // 2]} lines; "
              f"over 60 lines: {sum(n > 60 for n in lengths)}")


if __name__ == "__main__":
    main()
