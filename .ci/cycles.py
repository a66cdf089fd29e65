#!/usr/bin/env python3
"""Fails when source files import each other in a loop.

An arrow from file A to file B is drawn when A names something of B through a
`crate::…`, `super::…` or `self::…` path (in a `use` or inline), or when A
writes an inherent `impl T` for a type T that B defines (the methods then live
in A while B's code calls them). Test modules (`#[cfg(test)]` to the end of a
file) do not count. Each strongly connected group of more than one file is a
circle; they are printed with the arrows that tie them, and the exit status is
1 if there is any.

    .ci/cycles.py [CRATE_SRC_DIR ...]     (default: crates/*/src)
"""

import glob
import os
import re
import sys


def modules(src):
    """Module path (tuple) -> file, for one crate's src directory."""
    out = {}
    for path in glob.glob(os.path.join(src, "**", "*.rs"), recursive=True):
        rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
        if rel in (["lib"], ["main"]):
            key = ()
        elif rel[-1] == "mod":
            key = tuple(rel[:-1])
        else:
            key = tuple(rel)
        # main.rs is its own crate root: keep lib.rs as the root.
        if key == () and key in out and rel == ["main"]:
            continue
        out[key] = path
    return out


def module_of(path, src):
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel in (["lib"], ["main"]):
        return ()
    if rel[-1] == "mod":
        return tuple(rel[:-1])
    return tuple(rel)


def strip(text):
    """The code without comments, strings and character literals."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + len(hashes) + 2)
            i = n if end < 0 else end + 1 + len(hashes)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(?:[^'\\\n]|\\[^']+)'", text[i:]):
            i += len(re.match(r"'(?:[^'\\\n]|\\[^']+)'", text[i:]).group(0))
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def code(path):
    text = open(path, encoding="utf-8").read()
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n\s*mod \w+", text, re.M)
    if cut:
        text = text[: cut.start()]
    return strip(text)


def resolve(mods, start, segments):
    """The deepest module file reached from `start` by `segments`."""
    here = start
    for seg in segments:
        if seg == "super":
            here = here[:-1]
        elif seg == "self":
            continue
        elif here + (seg,) in mods:
            here = here + (seg,)
        else:
            break
    return here


def split_top(group):
    items, depth, cur = [], 0, ""
    for ch in group:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    return items


def use_paths(prefix, tree):
    """Flattens a use tree `a::{b, c::{d}}` into segment lists."""
    tree = tree.strip()
    m = re.match(r"^([\w:]*?)(?:::)?\{(.*)\}$", tree, re.S)
    if m:
        head = [s for s in m.group(1).split("::") if s]
        out = []
        for item in split_top(m.group(2)):
            out += use_paths(prefix + head, item)
        return out
    tree = re.sub(r"\s+as\s+\w+$", "", tree)
    return [prefix + [s for s in tree.split("::") if s]]


def arrows(src):
    mods = modules(src)
    defined = {}
    texts = {}
    for key, path in mods.items():
        texts[key] = code(path)
        for name in re.findall(r"\b(?:struct|enum|trait|type)\s+(\w+)", texts[key]):
            defined.setdefault(name, set()).add(key)
    edges = {}

    def add(a, b, why):
        if a != b:
            edges.setdefault((a, b), set()).add(why)

    for key, text in texts.items():
        # A mod.rs's `super` is its directory's parent; a file's is its dir.
        base = key
        for m in re.finditer(r"\buse\s+((?:crate|super|self)\b[^;]*);", text):
            for segs in use_paths([], m.group(1)):
                start = () if segs[0] == "crate" else base
                segs = segs[1:] if segs[0] == "crate" else segs
                target = resolve(mods, start, segs)
                add(key, target, "::".join(segs[-2:]))
        # Paths that start with a child module's name (`policy::Action`).
        children = {k[-1] for k in mods if len(k) == len(key) + 1 and k[: len(key)] == key}
        for m in re.finditer(r"(?<![\w:])(\w+)((?:::\w+)+)", text):
            if m.group(1) in children:
                segs = [m.group(1)] + m.group(2).split("::")[1:]
                add(key, resolve(mods, key, segs), segs[-1])
        for m in re.finditer(r"\buse\s+(\w+)(\s*::[^;]*);", text):
            if m.group(1) in children:
                for segs in use_paths([], m.group(1) + m.group(2).replace(" ", "")):
                    add(key, resolve(mods, key, segs), "::".join(segs[-2:]))
        for m in re.finditer(r"\b(crate|super)((?:::\w+)+)", text):
            segs = m.group(2).split("::")[1:]
            start = () if m.group(1) == "crate" else base
            if m.group(1) == "super":
                segs = ["super"] + segs
            target = resolve(mods, start, segs)
            add(key, target, segs[-1])
        for m in re.finditer(r"^impl(?:<[^>]*>)?\s+([\w:]+)(?:<[^>]*>)?\s*\{", text, re.M):
            name = m.group(1).split("::")[-1]
            owners = defined.get(name, set())
            if key not in owners and len(owners) == 1:
                (owner,) = owners
                add(owner, key, f"impl {name}")
    return mods, edges


def circles(nodes, edges):
    graph = {n: [] for n in nodes}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(group)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    srcs = sys.argv[1:] or sorted(glob.glob("crates/*/src"))
    found = 0
    for src in srcs:
        mods, edges = arrows(src)
        for group in circles(mods.keys(), edges):
            names = sorted(os.path.relpath(mods[k]) for k in group)
            found += 1
            print(f"circle: {len(group)} files: {', '.join(names)}")
            members = set(group)
            for (a, b), why in sorted(edges.items()):
                if a in members and b in members:
                    print(f"  {os.path.relpath(mods[a])} -> {os.path.relpath(mods[b])}: {', '.join(sorted(why))}")
    if found:
        print(f"{found} import circle(s): files that import each other in a loop")
        return 1
    print(f"no import circles in {', '.join(srcs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
