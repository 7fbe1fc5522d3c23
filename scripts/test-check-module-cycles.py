#!/usr/bin/env python3
"""Tests of check-module-cycles.py on a made-up crate: which paths make edges, which do not."""
import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "check-module-cycles.py")

CRATE = {
    "lib.rs": "mod gc; mod api; mod a; mod b; mod c;\npub use b::{Thing, other::Other as O};\n",
    "gc/mod.rs": "mod inner;\nuse super::api::X; // gc -> api\n#[cfg(test)]\nmod tests;\n",
    # super::super from gc::inner reaches the root; super:: alone stays in gc.
    "gc/inner/mod.rs": (
        "use super::super::c::Y;\nuse super::foo;\n"
        "fn f() { let s = \"crate::a::x\"; let c = '\"'; let r = r#\"crate::a\"#; }\n"
        "/* crate::a /* nested */ crate::a */ // crate::a\n"
    ),
    "gc/tests.rs": "use crate::a::Z;\n",
    "api.rs": (
        "use crate::{b::x, c, Thing};\n"
        "#[cfg(test)]\n#[allow(dead_code)]\nmod tests { use super::*; use crate::a::Q; }\n"
        "mod inl { use super::super::gc::K; }\n"
    ),
    "a/mod.rs": "fn g<'a>(x: &'a str) -> &'a str { crate::api::h(); x }\n",
    "b.rs": "pub(crate) fn x() { macro_rules! m { () => { $crate::gc::x() } } }\n",
    "c.rs": "pub fn y() { crate::O::new(); }\n",
}


def run(src, *args):
    p = subprocess.run(
        [sys.executable, SCRIPT, "--src", src, "--graph", *args], capture_output=True, text=True
    )
    edges = set()
    for line in p.stdout.split("\n\n")[0].splitlines()[1:]:
        a, _, b = line.split()[:3]
        edges.add((a, b))
    return p.returncode, edges, p.stdout


class Test(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        for rel, text in CRATE.items():
            path = os.path.join(cls.tmp.name, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)

    def test_edges(self):
        rc, edges, out = run(self.tmp.name)
        self.assertEqual(
            edges,
            {
                ("a", "api"),  # crate::api::h() in an expression
                ("api", "b"),  # crate::{b::x, Thing}: a group, and a lib.rs re-export
                ("api", "c"),
                ("api", "gc"),  # super::super out of an inline module
                ("c", "b"),  # crate::O, re-exported `as O`
                ("gc", "api"),  # super:: out of gc/mod.rs
                ("gc", "c"),  # super::super:: out of gc/inner
            },
        )
        self.assertEqual(rc, 1)
        self.assertIn("api -> gc -> api", out)

    def test_report_only_and_tests(self):
        rc, edges, out = run(self.tmp.name, "--report-only", "--include-tests")
        self.assertEqual(rc, 0)
        self.assertIn(("api", "a"), edges)  # the #[cfg(test)] inline module
        self.assertIn(("gc", "a"), edges)  # the #[cfg(test)] mod tests; file


if __name__ == "__main__":
    unittest.main()
