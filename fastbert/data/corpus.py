"""Corpora: documents made of sentences. Readers for WikiText, plain text (one sentence per line,
blank line between documents, as google-research/bert), directories, and an embedded default
corpus built from text that ships with Python itself (no download, no data file)."""
import ast
import hashlib
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets), followed by space and
# something that starts a sentence. Deliberately simple: a wrong split only moves a segment boundary.
_SENTENCE_END = re.compile(r"""(?<=[.!?])(?<!\b[A-Z]\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\betc\.)["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")
_WIKI_TITLE = re.compile(r"^ ?= (?!=)(.*?) = ?$")
_WIKI_HEADING = re.compile(r"^ ?(= ){2,}.*?( =){2,} ?$")
_WIKI_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "[UNK]")]


@dataclass
class Corpus:
    """`documents[d][s]` is sentence `s` of document `d`. `fingerprint` hashes the content."""
    documents: list
    name: str = "corpus"
    fingerprint: str = field(default="")

    def __post_init__(self):
        if not self.fingerprint:
            h = hashlib.sha256()
            for doc in self.documents:
                for sentence in doc:
                    h.update(sentence.encode("utf-8"))
                    h.update(b"\n")
                h.update(b"\x00")
            self.fingerprint = h.hexdigest()

    @property
    def num_sentences(self):
        return sum(len(d) for d in self.documents)

    def __len__(self):
        return len(self.documents)

    def __repr__(self):
        return f"Corpus({self.name!r}, {len(self.documents)} documents, {self.num_sentences} sentences)"


def split_sentences(text):
    """Split a paragraph into sentences (whitespace collapsed, empty pieces dropped)."""
    text = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()] if text else []


def _read_text(path):
    """UTF-8 text of `path`, with clear errors for missing, unreadable and binary files."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"corpus path {str(path)!r} is a directory, expected a file") from None
    except PermissionError:
        raise PermissionError(f"corpus path {str(path)!r} is not readable (permission denied)") from None
    except OSError as e:
        raise OSError(f"cannot read corpus path {str(path)!r}: {e.strerror or e}") from None
    nul = data.find(b"\x00", 0, 1 << 20)
    if nul >= 0:
        raise ValueError(f"corpus file {str(path)!r} is binary (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text (invalid byte at offset {e.start}); "
                         f"expected UTF-8 text") from None


def _looks_like_wikitext(path, text):
    name = Path(path).name
    if re.fullmatch(r"wiki\..*\.(tokens|raw)", name):
        return True
    for line in text.splitlines()[:50]:
        if line.strip():
            return bool(_WIKI_TITLE.match(line)) and not _WIKI_HEADING.match(line)
    return False


def parse_wikitext(text):
    """WikiText: an article starts at ` = Title = `; ` = = Section = = ` headings are dropped; each
    other non-empty line is a paragraph, split into sentences. `@-@`, `@,@`, `@.@` are undone and
    WikiText's `<unk>` (a rare word it replaced) becomes `[UNK]`, which the tokenizer maps to its
    [UNK] special token."""
    documents, current = [], None
    for line in text.splitlines():
        if not line.strip():
            continue
        if _WIKI_HEADING.match(line):
            continue
        if _WIKI_TITLE.match(line):
            if current:
                documents.append(current)
            current = []
            continue
        if current is None:
            current = []
        for a, b in _WIKI_DETOK:
            line = line.replace(a, b)
        current.extend(split_sentences(line))
    if current:
        documents.append(current)
    return documents


def parse_plain(text):
    """google-research/bert format: one sentence per line, a blank line between documents."""
    documents, current = [], []
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            current.append(line)
        elif current:
            documents.append(current)
            current = []
    if current:
        documents.append(current)
    return documents


def _check_nonempty(documents, name):
    if not documents or not any(documents):
        raise ValueError(f"corpus {name!r} is empty: no sentences found; expected text with at least "
                         f"two documents")
    return documents


def _read_file(path):
    text = _read_text(path)
    docs = parse_wikitext(text) if _looks_like_wikitext(path, text) else parse_plain(text)
    return docs


_DIR_PATTERNS = ("*.txt", "wiki.*.tokens", "wiki.*.raw")


def read_corpus(path):
    """Read a WikiText file (`wiki.*.tokens`/`.raw`, or any file starting with ` = Title = `), a plain
    text file, or a directory of such files (`*.txt`, `wiki.*.tokens`, recursively, sorted)."""
    if isinstance(path, Corpus):
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"corpus path must be a str or Path, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist")
    if p.is_dir():
        files = sorted({f for pat in _DIR_PATTERNS for f in p.rglob(pat) if f.is_file()})
        if not files:
            raise ValueError(f"corpus directory {str(path)!r} holds no .txt or wiki.*.tokens files")
        documents = []
        for f in files:
            documents.extend(_read_file(f))
    else:
        documents = _read_file(p)
    return Corpus(_check_nonempty(documents, str(path)), name=p.name or str(p))


def read_corpora(paths):
    """Read several corpora and concatenate their documents (in the order given)."""
    if isinstance(paths, (str, os.PathLike, Corpus)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("no corpus paths given; expected at least one")
    corpora = [read_corpus(p) for p in paths]
    if len(corpora) == 1:
        return corpora[0]
    documents = [d for c in corpora for d in c.documents]
    return Corpus(documents, name="+".join(c.name for c in corpora))


# -- the embedded corpus ---------------------------------------------------------------------------
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[-=*~^]{3,}$)")


def _prose_sentences(text):
    """Sentences from reST/docstring prose: paragraphs split at blank lines; code, tables, headings
    and indented blocks dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(_CODE_LINE.match(l) for l in lines) or lines[0].startswith((" ", "\t")):
            continue
        joined = " ".join(l.strip() for l in lines)
        letters = sum(c.isalpha() for c in joined)
        if len(joined) < 20 or letters < 0.6 * len(joined) or "::=" in joined:
            continue
        for s in split_sentences(joined):
            if len(s.split()) >= 3:
                out.append(s)
    return out


def _module_documents():
    """One document per standard-library module: its docstring plus its classes' and functions'."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/__init__.py"))
    documents = []
    for f in files:
        if f.parent.name in ("test", "idlelib", "site-packages") or f.name.startswith("_"):
            if f.name != "__init__.py":
                continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(tree) or ""]
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) \
                    and not node.name.startswith("_"):
                docs.append(ast.get_docstring(node) or "")
                if isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                                and not sub.name.startswith("_"):
                            docs.append(ast.get_docstring(sub) or "")
        sentences = [s for d in docs if d for s in _prose_sentences(d)]
        if len(sentences) >= 2:
            documents.append(sentences)
    return documents


def _topic_documents():
    """One document per topic of the Python Language Reference that ships as pydoc_data.topics."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return []
    documents = []
    for key in sorted(topics):
        sentences = _prose_sentences(topics[key])
        if len(sentences) >= 2:
            documents.append(sentences)
    return documents


_EMBEDDED = None


def embedded_corpus():
    """The default corpus, needing no download and no data file: the Python Language Reference
    (`pydoc_data.topics`) and the docstrings of the standard-library modules of the running Python,
    one document per topic / module. Deterministic for a given Python installation."""
    global _EMBEDDED
    if _EMBEDDED is None:
        documents = _topic_documents() + _module_documents()
        v = sys.version_info
        _EMBEDDED = Corpus(_check_nonempty(documents, "embedded"),
                           name=f"embedded (Python {v.major}.{v.minor} docs)")
    return Corpus(list(_EMBEDDED.documents), name=_EMBEDDED.name, fingerprint=_EMBEDDED.fingerprint)
