#!/usr/bin/env python3
"""Regenerate the structure and constant sections of docs/format.md from the doc comments in
engine/src/format/ (the source of truth). The hand-written introduction (up to the first
structure) and the closing Compatibility section are kept.

    python3 docs/gen-format.py           rewrite docs/format.md
    python3 docs/gen-format.py --check   exit 1 and print a diff if docs/format.md is stale
"""
import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC_DIR = os.path.join(ROOT, "engine", "src", "format")
DOC = os.path.join(ROOT, "docs", "format.md")

# Read in on-disk order (constants first, then superblock, segment, record, checkpoint), which is
# the order of the page's sections; rustfmt sorts `mod` lines, so mod.rs cannot give it.
FILES = [
    "mod.rs", "codec.rs", "key.rs", "superblock.rs", "segment.rs", "record.rs", "checkpoint.rs",
    "page.rs", "root.rs", "replica.rs",
]


def source_lines():
    present = sorted(f for f in os.listdir(SRC_DIR) if f.endswith(".rs"))
    unlisted = sorted(set(present) - set(FILES))
    if unlisted:
        # A new file's structures would silently miss the page.
        sys.exit("gen-format.py: add %s to FILES (in on-disk order)" % ", ".join(unlisted))
    lines = []
    for f in FILES:
        with open(os.path.join(SRC_DIR, f)) as fh:
            lines += fh.read().splitlines()
    return lines


def generate(doc):
    head = doc[: doc.index("## Put\n")]
    tail = doc[doc.index("## Compatibility"):]
    sections, consts, buf = [], [], []
    for line in source_lines():
        s = line.strip()
        if line.startswith("///"):
            buf.append(line[4:] if line.startswith("/// ") else line[3:])
            continue
        m = re.match(r"pub (?:struct|enum) (\w+)", s)
        if m and buf:
            sections.append("## %s\n\n%s\n" % (m.group(1), "\n".join(buf).strip()))
        m = re.match(r"pub const (\w+): [^=]+= (.+);", s)
        if m and not line.startswith(" "):
            meaning = " ".join(buf).strip()
            consts.append("| `%s` | `%s` | %s |" % (m.group(1), m.group(2), meaning))
        if not s.startswith("#["):
            buf = []
    out = head + "\n".join(sections)
    out += "\n## Constants\n\n| name | value | meaning |\n|---|---|---|\n"
    return out + "\n".join(consts) + "\n\n" + tail


def main():
    check = sys.argv[1:] == ["--check"]
    if sys.argv[1:] and not check:
        sys.exit("usage: gen-format.py [--check]")
    with open(DOC) as fh:
        doc = fh.read()
    out = generate(doc)
    if not check:
        with open(DOC, "w") as fh:
            fh.write(out)
        return 0
    if out == doc:
        print("docs/format.md is up to date")
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(
            doc.splitlines(True), out.splitlines(True), "docs/format.md", "generated"
        )
    )
    print("docs/format.md is stale: run python3 docs/gen-format.py and commit it", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
