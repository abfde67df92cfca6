"""Definitions and references of one file, from tree-sitter and the tag queries in agent/queries/.

Query convention (agent/queries/<language>-tags.scm): each pattern captures a definition's whole node
as `@definition.<kind>` and its name as `@name`. Kinds: function, method, class, interface, struct,
enum, trait, type, constant, module, macro. A function whose nearest enclosing definition is a class,
interface, struct, trait or enum is reported as a method. References are every identifier-like leaf
that is not a definition's name (no query needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tree_sitter import Node, Query, QueryCursor
from tree_sitter_language_pack import get_language, get_parser

QUERIES = Path(__file__).resolve().parent.parent / "queries"
KINDS = (
    "function",
    "method",
    "class",
    "interface",
    "struct",
    "enum",
    "trait",
    "type",
    "constant",
    "module",
    "macro",
)
CLASS_LIKE = {"class", "interface", "struct", "trait", "enum"}
REFERENCE_TYPES = ("identifier", "constant", "name")  # leaf node types ending so count as references
COMMENT_PREFIXES = ("///", "//!", "//", "/**", "/*", "*/", "*", "---", "--", ";;", "%")
HASH_COMMENTS = {"python", "ruby", "bash", "perl", "r", "elixir", "julia", "nim", "toml", "yaml", "make"}
ATTRIBUTE_PREFIXES = ("@", "#[", "#![")  # decorators, annotations, Rust attributes: skipped to reach the doc


@dataclass
class Definition:
    name: str
    kind: str
    line: int  # 1-based, the line of the name (= the definition's keyword line in ordinary code)
    end_line: int
    signature: str  # that line, stripped
    doc: str  # first line of the docstring or of the comment just above
    parent: int | None = None  # index of the enclosing definition in the file's list
    start_byte: int = 0
    end_byte: int = 0


@dataclass
class Reference:
    name: str
    line: int


def has_tags(language: str) -> bool:
    return (QUERIES / f"{language}-tags.scm").is_file()


@cache
def _query(language: str) -> Query:
    return Query(get_language(language), (QUERIES / f"{language}-tags.scm").read_text())


@cache
def _reference_query(language: str) -> Query | None:
    """Every named leaf kind of the grammar that names something (identifier, constant, name...)."""
    lang = get_language(language)
    kinds = sorted(
        {
            lang.node_kind_for_id(i)
            for i in range(lang.node_kind_count)
            if lang.node_kind_is_named(i)
            and lang.node_kind_is_visible(i)
            and lang.node_kind_for_id(i).endswith(REFERENCE_TYPES)
        }
    )
    return Query(lang, "[" + " ".join(f"({k})" for k in kinds) + "] @ref") if kinds else None


@cache
def _parser(language: str):
    return get_parser(language)


def parse(language: str, source: bytes):
    return _parser(language).parse(source)


def extract(language: str, source: bytes) -> tuple[list[Definition], list[Reference], bool]:
    """Definitions (ordered by position), references, and whether the tree has syntax errors."""
    tree = parse(language, source)
    lines = source.split(b"\n")
    definitions, name_nodes = [], set()
    if has_tags(language):
        seen = set()
        for _, captures in QueryCursor(_query(language)).matches(tree.root_node):
            kind_capture = next((c for c in captures if c.startswith("definition.")), None)
            if kind_capture is None or "name" not in captures:
                continue
            node, name = captures[kind_capture][0], captures["name"][0]
            key = (node.start_byte, node.end_byte, name.start_byte)
            if key in seen:
                continue
            seen.add(key)
            name_nodes.add((name.start_byte, name.end_byte))
            line = name.start_point[0]
            definitions.append(
                Definition(
                    name=name.text.decode("utf-8", "replace"),
                    kind=kind_capture.removeprefix("definition."),
                    line=line + 1,
                    end_line=max(line + 1, node.end_point[0] + (1 if node.end_point[1] else 0)),
                    signature=lines[line].decode("utf-8", "replace").strip()[:300],
                    doc=_doc_head(node, lines, language),
                    start_byte=node.start_byte,
                    end_byte=node.end_byte,
                )
            )
    definitions.sort(key=lambda d: (d.start_byte, -d.end_byte))
    _link_parents(definitions)
    return definitions, _references(language, tree, source, name_nodes), tree.root_node.has_error


def _references(language: str, tree, source: bytes, name_nodes: set) -> list[Reference]:
    query = _reference_query(language)
    if query is None:
        return []
    nodes = QueryCursor(query).captures(tree.root_node).get("ref", [])
    return [
        Reference(source[n.start_byte : n.end_byte].decode("utf-8", "replace"), n.start_point[0] + 1)
        for n in nodes
        if n.child_count == 0 and (n.start_byte, n.end_byte) not in name_nodes
    ]


def _link_parents(definitions: list[Definition]) -> None:
    stack: list[int] = []
    for i, d in enumerate(definitions):
        while stack and definitions[stack[-1]].end_byte < d.end_byte:
            stack.pop()
        while stack and definitions[stack[-1]].end_byte <= d.start_byte:
            stack.pop()
        d.parent = stack[-1] if stack else None
        if d.kind == "function" and d.parent is not None and definitions[d.parent].kind in CLASS_LIKE:
            d.kind = "method"
        stack.append(i)


def _doc_head(node: Node, lines: list[bytes], language: str) -> str:
    """The first line of a Python-style docstring, or of the comments right above the definition."""
    body = node.child_by_field_name("body")
    if body is not None and body.named_child_count:
        first = body.named_children[0]
        if first.type == "expression_statement" and first.named_child_count:
            first = first.named_children[0]
        if first.type == "string":
            text = first.text.decode("utf-8", "replace").strip("\"' \n\r\tbrfuBRFU").strip()
            return text.splitlines()[0][:200] if text else ""
    prefixes = COMMENT_PREFIXES + (("#",) if language in HASH_COMMENTS else ())
    row, comment = node.start_point[0] - 1, []
    while row >= 0:
        text = lines[row].decode("utf-8", "replace").strip()
        if text.startswith(ATTRIBUTE_PREFIXES) and not comment:
            row -= 1
            continue
        if not text.startswith(prefixes):
            break
        comment.insert(0, text)
        row -= 1
    for text in comment:
        for prefix in prefixes:
            text = text.removeprefix(prefix)
        text = text.removesuffix("*/").strip()
        if text:
            return text[:200]
    return ""
