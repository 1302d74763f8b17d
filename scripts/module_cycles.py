#!/usr/bin/env python3
"""Checks that no two files under src/ depend on each other, directly or through others.

A file depends on another when it names an item of that file's module: `use crate::a::b`,
`crate::a::b::item` in code, `super::x` from a child, or `self::child::x` / a child's items
from a `mod.rs`. `mod x;` declarations do not count (a parent lists its children; that is not
a use). Prints each cycle found and exits 1, or prints the edge count and exits 0.

Usage: python3 scripts/module_cycles.py [src-dir]
"""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "src"


def module_of(path):
    rel = os.path.relpath(path, root)[:-3]  # drop .rs
    parts = rel.split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


files = {}
for d, _, names in os.walk(root):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.join(d, n)
            files[module_of(p)] = p


def resolve(path_parts):
    """The longest known module that prefixes `path_parts`."""
    for k in range(len(path_parts), 0, -1):
        if tuple(path_parts[:k]) in files:
            return tuple(path_parts[:k])
    return None


def strip(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # Leave out unit tests and their helpers (inline `#[cfg(test)]` modules, kept at the end
    # of a file): a test module may use anything of its parent.
    m = re.search(r"#\[cfg\(test\)\]\s*(?:pub(?:\(crate\))?\s+)?mod \w+\s*\{", text)
    return text[: m.start()] if m else text


def expand_use(body):
    """Paths of a `use` tree body: a::{b, c::d} -> [a::b, a::c::d]."""
    body = re.sub(r"\s+", "", body)
    out = []

    def walk(prefix, s):
        i = s.find("{")
        if i < 0:
            for part in split_top(s):
                out.append(prefix + part)
            return
        head, rest = s[:i], s[i + 1 : s.rfind("}")]
        for part in split_top(rest):
            walk(prefix + head, part)

    def split_top(s):
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        return parts

    walk("", body)
    return out


edges = {m: set() for m in files}
for mod, path in files.items():
    text = strip(open(path, encoding="utf-8").read())
    is_dir_mod = os.path.basename(path) in ("mod.rs", "lib.rs")
    here = mod if is_dir_mod else mod  # `self::` is this module
    parent = mod[:-1]
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        paths.extend(expand_use(m.group(1)))
    for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", text):
        paths.append(m.group(1))
    # A child module named bare (`proc::Reading`) from the file that declares it.
    for child in re.findall(r"\bmod\s+(\w+)\s*;", text):
        target = mod + (child,)
        if target in files and re.search(r"(?<!::)\b" + child + r"::", text):
            edges[mod].add(target)
    for p in paths:
        p = re.sub(r"\bas\b.*$", "", p).strip(":")
        segs = [s for s in p.split("::") if s]
        if not segs:
            continue
        if segs[0] == "crate":
            target = resolve(segs[1:])
        elif segs[0] == "super":
            base = list(parent)
            segs = segs[1:]
            while segs and segs[0] == "super":
                base = base[:-1]
                segs = segs[1:]
            target = resolve(base + segs) or (tuple(base) if tuple(base) in files else None)
        elif segs[0] == "self":
            target = resolve(list(here) + segs[1:])
        else:
            continue
        if target is not None and target != mod:
            edges[mod].add(target)

# Cycles: strongly connected components of more than one file (Tarjan).
index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]


def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w)
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
            sccs.append(comp)


sys.setrecursionlimit(10000)
for v in sorted(files):
    if v not in index:
        strong(v)

name = lambda m: files[m]
if sccs:
    for comp in sccs:
        members = sorted(comp)
        print("cycle among:", ", ".join(name(m) for m in members))
        for a in members:
            for b in sorted(edges[a]):
                if b in comp:
                    print(f"  {name(a)} -> {name(b)}")
    sys.exit(1)
print(f"no module cycle: {sum(len(e) for e in edges.values())} dependencies among {len(files)} files")
