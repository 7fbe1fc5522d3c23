#!/usr/bin/env python3
"""Regenerate the structure and constant sections of docs/format.md from the doc comments in
engine/src/format.rs (the source of truth). The hand-written introduction (up to the first
structure) and the closing Compatibility section are kept. Run from the repository root."""
import re

src = open("engine/src/format.rs").read().splitlines()
doc = open("docs/format.md").read()
head = doc[: doc.index("## Put\n")]
tail = doc[doc.index("## Compatibility"):]

sections, consts, buf = [], [], []
for line in src:
    s = line.strip()
    if line.startswith("///"):
        buf.append(line[4:] if line.startswith("/// ") else line[3:])
        continue
    m = re.match(r"pub (?:struct|enum) (\w+)", s)
    if m and buf:
        sections.append("## %s\n\n%s\n" % (m.group(1), "\n".join(buf).strip()))
    m = re.match(r"pub const (\w+): [^=]+= (.+);", s)
    if m and not line.startswith(" "):
        consts.append("| `%s` | `%s` | %s |" % (m.group(1), m.group(2), " ".join(buf).strip()))
    if not s.startswith("#["):
        buf = []

out = head + "\n".join(sections) + "\n## Constants\n\n| name | value | meaning |\n|---|---|---|\n"
out += "\n".join(consts) + "\n\n" + tail
open("docs/format.md", "w").write(out)
