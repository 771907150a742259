"""Docstrings and comments spell identifiers as the code does, even at a sentence start.

A sentence may begin with a lowercase name (``d_vocab of the model``), as TransformerLens's
docstrings do; capitalising it (``D_vocab``) names something that does not exist. The rule is
read off the repository itself: a capitalised token that reads as code (``_``, a digit, a
trailing ``*``, ``[`` or ``(``, backticks, a Greek letter) is wrong when its lowercase form is a
name of the code or a symbol its file writes mid-sentence, while the capital is neither.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import re
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("rome_lens", "bench", "tests", "docs", "examples")
THIS_FILE = Path(__file__).resolve()  # its own examples of damage must not count as names

# TransformerLens names the package's prose refers to, also where its code builds them in strings.
TRANSFORMER_LENS_NAMES = frozenset(
    {
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "hook_mlp_out",
        "hook_attn_out",
        "hook_post",
        "hook_pre",
        "hook_embed",
        "hook_pos_embed",
        "hook_z",
        "hook_pattern",
        "d_model",
        "d_mlp",
        "d_vocab",
        "d_head",
        "n_layers",
        "n_heads",
        "n_ctx",
        "normalization_type",
        "W_in",
        "W_out",
        "W_gate",
        "W_U",
        "W_E",
        "b_in",
        "b_out",
        "ln_final",
    }
)

# Capital Greek letters drawn like Latin ones: as notation they are indistinguishable from
# the Latin letter, so in prose they are always a lowercase Greek symbol capitalised by mistake.
LATIN_LOOKING_GREEK = frozenset("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ")

TOKEN = re.compile(r"(?P<name>[^\W\d_]\w*)(?P<tail>\*|\[|\()?")
SENTENCE_END = re.compile(r"[.!?]\s+")
MARKUP = re.compile(r"[\s\-*•>#`(\"']*")  # bullets, quotes and literal markup before a word
ARGUMENT = re.compile(r"\s*\*{0,2}\w+(?: \([^)]*\))?:\s+")  # a Google-style ``name (type): ``


@dataclass(frozen=True)
class Prose:
    """One docstring or comment, with where it is."""

    text: str
    """The docstring or comment as written."""
    path: str
    """The file, relative to the repository (a notebook's cell noted after it)."""
    line: int
    """Its first line in the file."""


@dataclass(frozen=True)
class Start:
    """The word that begins a sentence of prose."""

    token: str
    """The word, with a trailing ``*``, ``[`` or ``(`` when one follows it directly."""
    quoted: bool
    """Whether literal markup (a backtick) comes right before it."""


@dataclass(frozen=True)
class Vocabulary:
    """What the repository spells, and how."""

    names: frozenset[str]
    """Identifiers of the code (and strings it builds names from), as spelled there."""
    inline: dict[str, frozenset[str]]
    """Per file, the tokens its prose uses away from sentence starts, where nothing
    capitalised them (per file, since a symbol's meaning is local: Λ of EK-FAC, λ of MEMIT)."""


def source_files() -> list[Path]:
    """Every Python file and notebook of the repository, except this test."""
    found = []
    for folder in SOURCE_FOLDERS:
        for suffix in ("*.py", "*.ipynb"):
            found += sorted((ROOT / folder).rglob(suffix))
    return [
        path for path in found if path.resolve() != THIS_FILE and "checkpoints" not in str(path)
    ]


def python_sources(path: Path) -> Iterator[tuple[str, str]]:
    """``(where, source)`` of a Python file, or of each code cell of a notebook."""
    relative = path.relative_to(ROOT).as_posix()
    if path.suffix == ".py":
        yield relative, path.read_text(encoding="utf-8")
        return
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            lines = "".join(cell["source"]).splitlines()
            code = "\n".join("" if line.lstrip()[:1] in "%!" else line for line in lines)
            yield f"{relative}[cell {index}]", code


def docstring_nodes(tree: ast.AST) -> set[int]:
    """Ids of the string constants that stand alone as statements: docstrings of modules,
    classes and functions, and the attribute docstrings under fields and constants."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def defined_names(tree: ast.AST) -> Iterator[str]:
    """Every identifier the code spells: definitions, parameters, attributes, imports, keywords,
    and the identifier-like pieces of its non-docstring strings (hook names, config fields)."""
    docstrings = docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.arg):
            yield node.arg
        elif isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.arg
        elif isinstance(node, ast.alias):
            yield from (node.asname or node.name).split(".")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            yield from re.findall(r"[^\W\d]\w*_\w*", node.value)


def docstrings(tree: ast.AST, where: str) -> Iterator[Prose]:
    """Every docstring of a parsed file, attribute docstrings included."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            yield Prose(node.value.value, where, node.lineno)


def comments(source: str, where: str) -> Iterator[Prose]:
    """Every ``#`` comment of a file, without its ``#``."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield Prose(token.string.lstrip("#"), where, token.start[0])


def read_repository() -> tuple[list[Prose], set[str]]:
    """All docstrings and comments of the repository, and every name its code spells."""
    prose: list[Prose] = []
    names = set(TRANSFORMER_LENS_NAMES) | set(keyword.kwlist)  # True, None: constants, not Names
    for path in source_files():
        for where, source in python_sources(path):
            tree = ast.parse(source)
            names.update(defined_names(tree))
            prose += docstrings(tree, where)
            prose += comments(source, where)
    return prose, names


def sentence_starts(line: str) -> Iterator[int]:
    """Offsets in ``line`` where a sentence (or a Google-style argument's description) begins."""
    yield 0
    argument = ARGUMENT.match(line)
    if argument:
        yield argument.end()
    for end in SENTENCE_END.finditer(line):
        if not re.search(r"\b(?:e\.g|i\.e|etc|vs|cf)\.\s+$", line[: end.end()]):
            yield end.end()


def openings(line: str) -> Iterator[tuple[str, int]]:
    """``(markup, offset)`` of each sentence of ``line``: the bullets, quotes and backticks
    before its first word, and where that word begins."""
    for offset in sentence_starts(line):
        markup = MARKUP.match(line, offset)
        assert markup is not None  # the pattern matches the empty string
        yield markup.group(0), markup.end()


def starts(text: str) -> Iterator[Start]:
    """The first word of every sentence of ``text``, with its markup noted."""
    for line in text.splitlines():
        for markup, offset in openings(line):
            token = TOKEN.match(line, offset)
            if token:
                emphasis = markup.endswith("*")  # **Clean**: the star closes the markup
                word = token.group("name") if emphasis else token.group(0)
                yield Start(word, "`" in markup)


def inline_tokens(text: str) -> Iterator[str]:
    """The tokens of ``text`` that do not begin a sentence (with a trailing ``*``, ``[`` or
    ``(``, and without)."""
    for line in text.splitlines():
        opening = {offset for _, offset in openings(line)}
        for token in TOKEN.finditer(line):
            if token.start() not in opening:
                yield token.group(0)
                yield token.group("name")


def vocabulary(prose: Iterable[Prose], names: Iterable[str]) -> Vocabulary:
    """The names of the code and the tokens the prose of each file writes mid-sentence."""
    inline: dict[str, set[str]] = {}
    for piece in prose:
        inline.setdefault(piece.path, set()).update(inline_tokens(piece.text))
    return Vocabulary(frozenset(names), {path: frozenset(found) for path, found in inline.items()})


def identifier_like(start: Start) -> bool:
    """Whether a word reads as code rather than English: it holds ``_`` or a digit, is
    followed by ``*``, ``[`` or ``(``, is quoted as a literal, or opens with a Greek letter."""
    name = start.token.rstrip("*[(")
    return (
        "_" in name
        or any(character.isdigit() for character in name)
        or name != start.token
        or start.quoted
        or "\u0370" <= name[0] <= "\u03ff"
    )


def miscapitalised(start: Start, words: Vocabulary, path: str) -> bool:
    """Whether ``start``, in a docstring or comment of ``path``, is a lowercase name or symbol
    with its first letter capitalised."""
    token, inline = start.token, words.inline.get(path, frozenset())
    if not token[0].isupper() or not identifier_like(start):
        return False
    if token[0] in LATIN_LOOKING_GREEK:
        return True
    name, lowered = token.rstrip("*[("), token[0].lower() + token[1:]
    if name in words.names or token in inline:
        return False  # the capital is the real spelling: W_out, ΔW, E[x]
    lowered_name = lowered.rstrip("*[(")
    return lowered in inline or len(lowered_name) > 1 and lowered_name in words.names


def damage(prose: Iterable[Prose], words: Vocabulary) -> list[str]:
    """``path:line: token`` for every capitalised copy of a name in ``prose``."""
    return [
        f"{piece.path}:{piece.line}: {start.token}"
        for piece in prose
        for start in starts(piece.text)
        if miscapitalised(start, words, piece.path)
    ]


@pytest.fixture(scope="module")
def repository() -> tuple[list[Prose], Vocabulary]:
    prose, names = read_repository()
    return prose, vocabulary(prose, names)


def check(text: str, names: Iterable[str] = (), context: str = "") -> list[str]:
    """The damage the rule finds in ``text``, with ``names`` defined and ``context`` as other
    prose of the same file."""
    prose = [Prose(text, "here", 1), Prose(context, "here", 2)]
    return damage(prose[:1], vocabulary(prose, names))


class TestTheRule:
    def test_a_capitalised_name_is_caught(self):
        """A defined lowercase name capitalised at a line or sentence start is reported."""
        assert check("Model_fingerprint(model) of it.", ["model_fingerprint"]) == [
            "here:1: Model_fingerprint("
        ]
        assert check("The worst rank. D_vocab of the model.", ["d_vocab"]) == ["here:1: D_vocab"]
        assert check("Layers[0]; set later.", ["layers"]) == ["here:1: Layers["]
        assert check("Args:\n    tokens: Top_ids as strings.", ["top_ids"]) == ["here:1: Top_ids"]

    def test_a_capitalised_symbol_is_caught(self):
        """A symbol written lowercase elsewhere (k*, z_i, ε) is reported when capitalised."""
        assert check("K*, averaged.", context="maps k* to v*") == ["here:1: K*"]
        assert check("Z_i at the last layer.", context="the targets z_i") == ["here:1: Z_i"]
        assert check("Ε: every entry stays in [-ε, ε].") == ["here:1: Ε"]
        assert check("Λ the edit was solved with.", context="ΔW = (λ C + KᵀK)") == ["here:1: Λ"]

    def test_english_and_real_capitals_pass(self):
        """English words, capitalised names and capital notation used mid-sentence pass."""
        assert check("Layers of the model. The keys.", ["layers", "the"]) == []
        assert check("W_out of the block.", ["W_out"]) == []
        assert check("ΔW for the block.", context="held as ΔW; δ is the value") == []
        assert check("Λ = E[(Qᵀ G Q)²].", context="damping λ; eigenvalues Λ of A") == []
        assert check("E[x] of the rows.", ["e"], context="E[x] E[x]ᵀ") == []
        assert check("d_vocab of the model: the worst rank.", ["d_vocab"]) == []


class TestTheRepository:
    def test_no_docstring_or_comment_capitalises_a_name(self, repository):
        """No docstring or comment begins a sentence with a capitalised copy of a name."""
        prose, words = repository
        assert damage(prose, words) == []

    def test_the_names_include_transformer_lens_hooks(self, repository):
        """The names read off the code (definitions, fields, strings) are there beside the
        TransformerLens names the rule knows of itself."""
        _, words = repository
        read = words.names - TRANSFORMER_LENS_NAMES
        assert {"model_fingerprint", "mom2_n_tokens", "memit_1000"} <= read
