#!/usr/bin/env python3
"""Import cycles between the modules of one Rust crate, from its sources.

    python3 scripts/check-cycles.py usermm-cli/src

Every .rs file under the directory is a module: `lib.rs`/`main.rs` are the crate
root `crate`, `a/b.rs` and `a/b/mod.rs` are `crate::a::b` (files under `bin/` are
other crates and are skipped). Module A has an edge to module B for every path in A
that starts with `crate::`, `super::` or `self::` — in `use` statements (brace
groups expanded) and inline in code — resolved to the deepest module that exists
(`crate::cli::util::fmt_bytes` is an edge to `crate::cli::util`). `mod child;` lines
are not references and give no edge; comments, string literals and visibility
restrictions (`pub(crate)`, `pub(super)`, `pub(in …)`) are ignored. Bare relative
paths (`util::x` from the parent of `util`) are not followed.

Prints each cycle found (one per strongly connected component, as a chain of module
paths, with the file and line of each reference) and exits 1; otherwise prints
"no import cycles among N modules" and exits 0. No dependencies beyond python3.
"""

import os
import re
import sys


def module_of(rel):
    """Module path of a file, relative to the source directory."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]):
        parts = []
    return "::".join(["crate"] + parts)


def strip(text):
    """Source text with comments and string/char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    blank = lambda s: re.sub(r"[^\n]", " ", s)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif re.match(r'b?r#*"', text[i:i + 20]) and (i == 0 or not re.match(r"\w", text[i - 1])):
            m = re.match(r'b?r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(blank(text[i:j]))
            i = j
        elif c == '"' or (c == "b" and text.startswith('b"', i) and (i == 0 or not re.match(r"\w", text[i - 1]))):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i:j + 1]))
            i = j + 1
        elif c == "'":
            # A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:])
            if m:
                out.append(" " * m.end())
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_use(tree):
    """`a::{b, c::{d, self}}` -> ["a::b", "a::c::d", "a::c"] (whitespace removed)."""
    tree = re.sub(r"\s+", "", tree)
    tree = re.sub(r"\bas\w+", "", tree)  # `x as y` became `xasy`: cut the alias
    i = tree.find("{")
    if i < 0:
        return [tree]
    # the group that closes last
    depth, j = 0, i
    for j in range(i, len(tree)):
        depth += {"{": 1, "}": -1}.get(tree[j], 0)
        if depth == 0:
            break
    prefix, inner = tree[:i], tree[i + 1:j]
    items, depth, start = [], 0, 0
    for k, ch in enumerate(inner):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(inner[start:k])
            start = k + 1
    items.append(inner[start:])
    out = []
    for it in items:
        if it:
            out.extend(expand_use(prefix + it))
    return out


PATH = re.compile(r"(?<![\w$])((?:crate|super|self)(?:::(?:\w+|\*))*)")


def resolve(path, here, modules):
    """The deepest existing module a path from module `here` reaches (or None)."""
    segs = [s for s in path.split("::") if s]
    if not segs:
        return None
    if segs[0] == "crate":
        base, rest = ["crate"], segs[1:]
    else:
        base = here.split("::")
        rest = segs
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                if len(base) == 1:
                    return None
                base = base[:-1]
            rest = rest[1:]
    best = "::".join(base)
    cur = list(base)
    for s in rest:
        if s in ("self", "*"):
            break
        cur.append(s)
        name = "::".join(cur)
        if name in modules:
            best = name
        else:
            break
    return best


def references(text, here, modules):
    """(target module, line) for every path reference in a module's text."""
    text = strip(text)
    text = re.sub(r"\bpub\s*\(\s*(crate|super|self|in\s+[^)]*)\s*\)", lambda m: " " * len(m.group(0)), text)
    # `mod x;` declares a child: not a reference.
    text = re.sub(r"\bmod\s+\w+\s*;", lambda m: " " * len(m.group(0)), text)
    refs = []
    line_of = lambda pos: text.count("\n", 0, pos) + 1

    def use_repl(m):
        for p in expand_use(m.group(1)):
            first = p.split("::")[0]
            if first in ("crate", "super", "self"):
                refs.append((p, line_of(m.start())))
        return re.sub(r"[^\n]", " ", m.group(0))

    text = re.sub(r"\buse\s+([^;]+);", use_repl, text)
    for m in PATH.finditer(text):
        refs.append((m.group(1), line_of(m.start())))
    out = []
    for p, line in refs:
        t = resolve(p, here, modules)
        if t and t != here:
            out.append((t, line))
    return out


def sccs(nodes, edges):
    """Tarjan's strongly connected components."""
    index, low, on, stack, comps = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, {})):
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
            comps.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return comps


def a_cycle(comp, edges):
    """One cycle through the first module of a strongly connected component."""
    inside = set(comp)
    start = comp[0]
    # BFS from start back to start within the component.
    prev, frontier, seen = {}, [start], {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, {})):
                if w not in inside:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def main():
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        print("usage: check-cycles.py CRATE_SRC_DIR", file=sys.stderr)
        return 2
    root = sys.argv[1]
    files = {}
    for d, dirs, names in os.walk(root):
        rel_d = os.path.relpath(d, root)
        if rel_d == "bin" or rel_d.startswith("bin" + os.sep):
            dirs[:] = []
            continue
        for f in names:
            if f.endswith(".rs"):
                rel = os.path.normpath(os.path.join(rel_d, f))
                files.setdefault(module_of(rel), []).append(os.path.join(root, rel))
    modules = set(files)
    edges = {}  # module -> {target: [(file, line)]}
    for mod, paths in files.items():
        for path in paths:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            for target, line in references(text, mod, modules):
                edges.setdefault(mod, {}).setdefault(target, []).append((path, line))
    cycles = [c for c in sccs(modules, edges) if len(c) > 1]
    if not cycles:
        print(f"no import cycles among {len(modules)} modules")
        return 0
    for comp in cycles:
        chain = a_cycle(comp, edges)
        print("cycle: " + " -> ".join(chain))
        for a, b in zip(chain, chain[1:]):
            f, line = edges[a][b][0]
            more = len(edges[a][b]) - 1
            print(f"    {a} -> {b}: {f}:{line}" + (f" (and {more} more)" if more else ""))
        if len(comp) > len(set(chain)):
            print("    (component: " + ", ".join(comp) + ")")
    print(f"{len(cycles)} import cycle(s) among {len(modules)} modules")
    return 1


if __name__ == "__main__":
    sys.exit(main())
