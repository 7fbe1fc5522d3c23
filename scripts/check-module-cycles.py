#!/usr/bin/env python3
"""Fail if the engine's top-level subsystems depend on each other in a cycle.

A subsystem is the first path component under engine/src/: the folder engine/src/gc/ (all its
files) is node `gc`, the file engine/src/api.rs is node `api`; lib.rs is the crate root, not a
node. An edge a -> b is a `crate::b` path in a's code (`use crate::b::..`, `use crate::{b, ..}`,
`crate::b::f()`), a `super::` path that climbs out of a into b, or a name that lib.rs re-exports
from b (`crate::Pool` -> pool). Comments, strings and `#[cfg(test)]` modules are skipped: tests
may build a whole pool to test one layer, and doc links are not dependencies.

    scripts/check-module-cycles.py                 exit 1 and print the cycles, if any
    scripts/check-module-cycles.py --report-only   print the cycles, exit 0
    scripts/check-module-cycles.py --graph         also print every edge, with where it comes from
    scripts/check-module-cycles.py --include-tests count #[cfg(test)] modules too
    scripts/check-module-cycles.py --src DIR       another src folder (for its tests)

Python 3 standard library only.
"""
import argparse
import os
import re
import sys
from collections import defaultdict, deque

# Edges allowed to close a cycle, as (from, to), each with a comment saying why it is acceptable
# and when it goes away. Keep this short: every entry is a layering debt.
ALLOWED_EDGES = frozenset(
    [
        # ("shard", "pool"),  # example: shards call back into the pool until X moves to Y
    ]
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "engine", "src")

TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<line_comment>//[^\n]*)
    | (?P<block_comment>/\*)
    | (?P<raw_str>b?r(?P<hashes>\#*)")
    | (?P<str>b?"(?:\\.|[^"\\])*")
    | (?P<char>b?'(?:\\u\{[0-9a-fA-F]+\}|\\.|[^'\\])')
    | (?P<ident>\$?[A-Za-z_][A-Za-z0-9_]*|r\#[A-Za-z_][A-Za-z0-9_]*)
    | (?P<path_sep>::)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def tokens(text):
    """(kind, value, line) of the code in `text`, without comments and literals."""
    pos, line = 0, 1
    while pos < len(text):
        m = TOKEN.match(text, pos)
        kind = m.lastgroup if m.lastgroup != "hashes" else "raw_str"
        for k in ("block_comment", "raw_str"):
            if m.group(k):
                kind = k
        end = m.end()
        if kind == "block_comment":  # nested, as in Rust
            depth, end = 1, m.end()
            while depth and end < len(text):
                if text.startswith("/*", end):
                    depth, end = depth + 1, end + 2
                elif text.startswith("*/", end):
                    depth, end = depth - 1, end + 2
                else:
                    end += 1
        elif kind == "raw_str":
            close = '"' + m.group("hashes")
            end = text.find(close, m.end())
            end = len(text) if end < 0 else end + len(close)
        elif kind in ("ident", "path_sep", "punct"):
            yield kind, m.group(0), line
        line += text.count("\n", pos, end)
        pos = end


def module_path(rel):
    """engine/src-relative file path -> module path, e.g. gc/mod.rs -> [gc], gc/a.rs -> [gc, a]."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return parts


def lib_reexports():
    """Names lib.rs re-exports, mapped to the subsystem they come from (`Pool` -> `pool`)."""
    out = {}
    toks = [t for t in tokens(open(os.path.join(SRC, "lib.rs")).read())]
    i = 0
    while i < len(toks):
        if toks[i][1] == "use" and i + 2 < len(toks) and toks[i + 2][0] == "path_sep":
            sub = toks[i + 1][1]
            depth, j = 0, i + 1
            while j < len(toks) and not (toks[j][1] == ";" and depth == 0):
                depth += {"{": 1, "}": -1}.get(toks[j][1], 0)
                # The last segment of each leaf path is the name it exports.
                if toks[j][0] == "ident" and (j + 1 >= len(toks) or toks[j + 1][0] != "path_sep"):
                    if toks[j][1] not in ("self", "as"):
                        out[toks[j][1]] = sub
                j += 1
            i = j
        i += 1
    return out


def first_segments(toks, i):
    """The first path segment(s) after the `::` at toks[i]: one name, or each name at the top
    level of a `{..}` group (`crate::{a, b::c}` -> a, b)."""
    if i + 1 >= len(toks):
        return []
    kind, val, _ = toks[i + 1]
    if kind == "ident":
        return [val]
    if val != "{":
        return []
    names, depth, expect = [], 0, True
    for kind, val, _ in toks[i + 1 :]:
        if val == "{":
            depth += 1
            expect = depth == 1
            continue
        if val == "}":
            depth -= 1
            if depth == 0:
                break
            continue
        if depth == 1:
            if kind == "ident" and expect:
                names.append(val)
            expect = val == ","
    return names


def references(path, rel, include_tests, skipped_files):
    """(first path segment, line) for every crate:: path, and every super:: path that leaves the
    subsystem, in one file. Adds the files of `#[cfg(test)] mod x;` to `skipped_files`."""
    toks = list(tokens(open(path).read()))
    base = module_path(rel)
    inline = []  # stack of (brace depth at opening, is_test) for inline `mod x { .. }`
    depth, pending_test, skip_until = 0, False, None
    out = []
    for i, (kind, val, line) in enumerate(toks):
        if val == "{":
            depth += 1
        elif val == "}":
            depth -= 1
            while inline and inline[-1][0] > depth:
                inline.pop()
            if skip_until is not None and depth < skip_until:
                skip_until = None
            continue
        if skip_until is not None:
            continue
        # `#[cfg(test)]`: remember it for the item that follows.
        if val == "#" and [t[1] for t in toks[i + 1 : i + 6]] == ["[", "cfg", "(", "test", ")"]:
            pending_test = True
            continue
        if kind == "ident" and val == "mod" and i + 2 < len(toks) and toks[i + 2][1] == "{":
            inline.append((depth + 1, pending_test))
            if pending_test and not include_tests:
                skip_until = depth + 1
            pending_test = False
            continue
        if kind == "ident" and val == "mod" and pending_test and i + 2 < len(toks):
            if toks[i + 2][1] == ";" and not include_tests:  # `#[cfg(test)] mod x;`: its file
                skipped_files.add(os.path.join(*(base + [toks[i + 1][1]])))
        if val in (";", "{"):
            pending_test = False  # the attribute's item ended
        if kind != "path_sep" or i == 0:
            continue
        prev = toks[i - 1]
        if prev[1] == "crate":  # `$crate` is one token, so macros' paths do not count
            for name in first_segments(toks, i):
                out.append((name, line))
        elif prev[1] == "super" and (i < 2 or toks[i - 2][0] != "path_sep"):
            # Count the chain super::super::..; each climbs one module from where we are.
            here = base + ["<inline>"] * len(inline)
            j, ups = i, 1
            while j + 2 < len(toks) and toks[j + 1][1] == "super" and toks[j + 2][0] == "path_sep":
                j, ups = j + 2, ups + 1
            target = here[: max(len(here) - ups, 0)]
            if len(target) >= 1:
                continue  # still inside this subsystem (or an inline module of it)
            for name in first_segments(toks, j):
                out.append((name, line))
    return out


def build_graph(include_tests):
    nodes = set()
    for entry in os.listdir(SRC):
        full = os.path.join(SRC, entry)
        if os.path.isdir(full):
            nodes.add(entry)
        elif entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            nodes.add(entry[:-3])
    reexports = lib_reexports()
    refs, skipped_files = {}, set()
    for dirpath, _, files in os.walk(SRC):
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(dirpath, f), SRC)
            if f.endswith(".rs") and rel not in ("lib.rs", "main.rs"):
                refs[rel] = references(os.path.join(SRC, rel), rel, include_tests, skipped_files)
    edges = defaultdict(list)  # (a, b) -> ["engine/src/file:line", ..]
    for rel in sorted(refs):
        mod = module_path(rel)
        if any(os.path.join(*mod[:n]) in skipped_files for n in range(1, len(mod) + 1)):
            continue
        for name, line in refs[rel]:
            dst = name if name in nodes else reexports.get(name)
            if dst and dst != mod[0]:
                where = os.path.relpath(os.path.join(SRC, rel), ROOT)
                edges[(mod[0], dst)].append("%s:%d" % (where, line))
    return nodes, edges


def strongly_connected(nodes, adj):
    """Tarjan's algorithm; components of more than one node (no self-edges are recorded)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return sorted(comps)


def shortest_cycle(start, adj, within):
    """Shortest path start -> .. -> start inside one component (BFS)."""
    prev, queue = {}, deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        for w in sorted(adj[v]):
            if w not in within:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w not in seen:
                seen.add(w)
                prev[w] = v
                queue.append(w)
    return None


def main():
    global SRC
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graph", action="store_true", help="print every edge and where it comes from")
    ap.add_argument("--report-only", action="store_true", help="print cycles but exit 0")
    ap.add_argument("--include-tests", action="store_true", help="count #[cfg(test)] modules")
    ap.add_argument("--src", default=SRC, help="crate source folder (default engine/src)")
    args = ap.parse_args()
    SRC = os.path.abspath(args.src)

    nodes, edges = build_graph(args.include_tests)
    adj = defaultdict(set)
    for a, b in edges:
        if (a, b) not in ALLOWED_EDGES:
            adj[a].add(b)

    if args.graph:
        print("edges (%d subsystems, %d edges):" % (len(nodes), len(edges)))
        for (a, b), where in sorted(edges.items()):
            note = "  [allowed]" if (a, b) in ALLOWED_EDGES else ""
            more = " (+%d more)" % (len(where) - 1) if len(where) > 1 else ""
            print("  %-10s -> %-10s %s%s%s" % (a, b, where[0], more, note))
        print()
    for a, b in sorted(ALLOWED_EDGES - set(edges)):
        print("note: allowed edge %s -> %s no longer exists; remove it" % (a, b))

    comps = strongly_connected(nodes, adj)
    if not comps:
        print("no module cycles between engine subsystems (%d subsystems)" % len(nodes))
        return 0
    print("module cycles between engine subsystems:")
    for comp in comps:
        print("  cycle among {%s}:" % ", ".join(comp))
        seen = set()
        for v in comp:
            cyc = shortest_cycle(v, adj, set(comp))
            key = frozenset(zip(cyc, cyc[1:]))
            if key in seen:
                continue
            seen.add(key)
            print("    " + " -> ".join(cyc))
            for a, b in zip(cyc, cyc[1:]):
                print("        %s -> %s: %s" % (a, b, edges[(a, b)][0]))
    if args.report_only:
        print("(--report-only: not failing)")
        return 0
    print(
        "break each cycle, or allow an edge (with a reason) in ALLOWED_EDGES at the top of %s"
        % os.path.relpath(__file__, ROOT),
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
