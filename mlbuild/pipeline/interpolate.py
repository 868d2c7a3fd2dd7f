"""Command templates: the placeholders of a `cmd`, checked at load and filled when the step starts.

A `cmd` names paths and values with `{inputs}`, `{inputs.NAME}`, `{inputs.0}`,
`{outputs...}` and `{params.NAME}`, and `{python}` names the interpreter mlbuild
runs in (the one Python steps get, also first on the step's PATH: exec.base).
mlbuild fills each with shell-quoted words itself, so that:

- a step receives exactly the paths mlbuild hashed: glob inputs are expanded
  by `fingerprint.expand_port` when the step starts (after its producers ran;
  `exec.base.render_command`),
  never by /bin/sh, which knows no `**` and splits a directory name at spaces;
- a value or a path never becomes shell syntax (quotes, `$(...)`, `;`, `*`);
- a path starting with `-` is passed as `./-x`, so that it is not an option.

Quoting is only sound if the user's own quotes do not surround the
placeholder: in `'{params.y}'` mlbuild's quotes would close the user's and
let the value run as a command; a here-document keeps no quote at all. So a
placeholder inside '...', "..." or a here-document is an error at load, as
are near-misses (`{inputs.}`, `{input.x}`, `{ inputs }`), which would
otherwise reach the shell as text. Any other brace is left to the shell
(`${HOME}`, `{a,b}`, awk's `{print $1}`).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    # Type names only: load imports this module to check templates.
    from mlbuild.pipeline.schema import Port

KINDS = ("inputs", "outputs", "params")
PYTHON = "python"  # `{python}`: mlbuild's interpreter; it takes no name
# `{kind}` or `{kind.item}`; the item may be empty so that `{inputs.}` can be reported.
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_]\w*)(?:\.([\w.-]*))?\}")
# What a user may have meant as a placeholder but the strict form does not match:
# `{ inputs }`, `{inputs[0]}`, `{Params . lr}` (not `{inputs: .x}`, a jq object).
_NEAR = (r"\{\s*(inputs?|outputs?|params?)\b\s*(?:[.\[]([^{}:]*))?\}", re.I)
_SINGULAR = {"input": "inputs", "output": "outputs", "param": "params"}
# A here-document operator and its delimiter word: <<EOF, <<-EOF, <<'EOF', <<"EOF", <<\EOF.
_HEREDOC = (r"<<(-?)[ \t]*(?:'([^'\n]*)'|\"([^\"\n]*)\"|\\?([^\s;&|()<>'\"]+))", 0)
# A word starts after these (so `#` begins a comment and `-x` would be an option there).
_WORD_BREAKS = frozenset(" \t\n;&|()<>`")
# Characters after which the quoting context can change; templates without any skip the scan.
_CONTEXT_RE = re.compile(r"['\"`\\<#$(]")
# Templates whose quoting one regex can follow: no substitution, comment, here-document
# or $'...'. Its tokens: a quoted span (an unclosed one runs to the end), an escape, `{`.
_NEEDS_WALK = re.compile(r"\$[('\"]|`|<<|#")
_PLAIN_TOKENS = (r"'[^']*'?|\"(?:[^\"\\]|\\.)*\"?|\\.|\{", re.S)
# Per quoting context, the characters the scan must look at (see _Scanner._walk).
_CODE_NEXT = (r"[\\{`$\"'()#<\n]", 0)
_NEXT = {
    "'": (r"['{]", 0),
    "$'": (r"['{\\]", 0),
    '"': (r"[\\{`$\"]", 0),
    "top": _CODE_NEXT,
    "$(": _CODE_NEXT,
    "`": _CODE_NEXT,
}
# The patterns above are compiled on first use (re's own cache keeps them): most
# templates never need them, and compiling all at import cost every no-op ~0.5 ms.


class TemplateError(ValueError):
    """A placeholder that cannot be filled safely; the message names it (config adds where)."""


class Ref(NamedTuple):
    """One placeholder of a template."""

    kind: str  # "inputs", "outputs", "params" or "python"
    item: str | None  # a name or a position; None: every path of the kind
    text: str  # as written, for messages
    word_start: bool  # it begins a shell word (a path there could read as an option)


Piece = str | Ref


def render_value(value: Any) -> str:
    """A parameter as a step sees it in its command line and environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, sort_keys=True, default=str)


def quote_path(path: str, word_start: bool = True) -> str:
    """A project path as one shell word; `./-x` where `-x` would begin a word (an option)."""
    if word_start and path.startswith("-"):
        path = "./" + path
    return shlex.quote(path)


_parsed: dict[str, tuple[Piece, ...]] = {}


def parse_template(template: str) -> tuple[Piece, ...]:
    """Literal text and placeholders, in order; TemplateError for unsafe or near-miss ones.

    Cached by text: generated pipelines repeat one template across thousands of
    targets, and a step's command is parsed again when it starts.
    """
    pieces = _parsed.get(template)
    if pieces is None:
        pieces = _parsed[template] = tuple(_Scanner(template).scan())
    return pieces


def fill(
    pieces: Sequence[Piece],
    inputs: Sequence[Port],
    outputs: Sequence[Port],
    params: Mapping[str, Any],
    expand: Callable[[Port], list[str]] | None = None,
) -> str:
    """The command with every placeholder replaced by quoted words.

    `expand` gives a glob input's paths (when the step starts); without it a
    glob is shown as its pattern, for display before the step runs.
    """
    out: list[str] = []
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
            continue
        if piece.kind == "params":
            out.append(shlex.quote(render_value(params[_param_name(piece, params)])))
            continue
        if piece.kind == PYTHON:
            out.append(shlex.quote(sys.executable))
            continue
        ports = inputs if piece.kind == "inputs" else outputs
        if piece.item is not None:
            ports = _ports(piece, ports)
        if len(ports) == 1 and not ports[0].is_glob:  # the usual case: one plain path
            out.append(quote_path(ports[0].path, piece.word_start))
            continue
        words: list[str] = []
        for port in ports:
            if not port.is_glob:
                words.append(quote_path(port.path, piece.word_start or bool(words)))
            elif expand is None:
                words.append(("./" if port.path.startswith("-") else "") + port.path)
            else:
                words.extend(quote_path(p, piece.word_start or bool(words)) for p in expand(port))
        out.append(" ".join(words))
    return "".join(out)


def _ports(ref: Ref, ports: Sequence[Port]) -> Sequence[Port]:
    """The one port `{kind.item}` names, by position or name."""
    assert ref.item is not None
    if ref.item.isdigit() and int(ref.item) < len(ports):
        return [ports[int(ref.item)]]
    for port in ports:
        if port.name == ref.item:
            return [port]
    names = [p.name for p in ports if p.name]
    what = ref.kind[:-1]
    if ref.item.isdigit():
        count = f"{len(ports)} {ref.kind}" if len(ports) != 1 else f"1 {what}"
        raise TemplateError(f"{ref.text}: no such {what}: the target has {count}")
    raise TemplateError(f"{ref.text}: no such {what}" + _did_you_mean(ref.item, names))


def _param_name(ref: Ref, params: Mapping[str, Any]) -> str:
    assert ref.item is not None  # `{params}` is refused by parse_template
    if ref.item not in params:
        raise TemplateError(
            f"{ref.text}: the target does not read parameter '{ref.item}'"
            + _did_you_mean(ref.item, list(params))
        )
    return ref.item


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    import difflib  # only when something is misspelt: off the no-op path

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Frame(NamedTuple):
    """One quoting context of the scan: what opened it and how to find its end."""

    kind: str  # "top", "$(", "`", "'", "$'", '"'
    depth: int = 0  # open parentheses inside a "top" or "$(" frame


class _Scanner:
    """Splits a template into text and placeholders, tracking the shell's quoting contexts.

    It follows enough of the POSIX shell grammar to know whether a placeholder
    stands in a word of its own, inside quotes or in a here-document: quotes
    (and bash's $'...'), backslashes, `$(...)` and backticks (which start a
    fresh context, even inside double quotes), comments and here-documents.
    An unclosed quote runs to the end, so what follows counts as quoted.
    Three paths, cheapest first: no quoting character at all; plain quotes
    only (one regular expression); everything else (a walk over the
    characters that matter).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pieces: list[Piece] = []
        self.last = 0  # end of the text already moved into pieces
        self.heredocs: list[tuple[str, bool, str]] = []  # (delimiter, strip tabs, operator)

    def scan(self) -> list[Piece]:
        text = self.text
        if "{" not in text:
            return [text] if text else []
        if _CONTEXT_RE.search(text) is None:
            # No quote, escape, substitution, comment or here-document: every
            # placeholder stands unquoted (most commands take this path).
            if not self._only_placeholders():
                i = text.find("{")
                while i >= 0:
                    i = self._brace(i, "top")
                    i = text.find("{", i)
        elif _NEEDS_WALK.search(text) is None:
            self._plain_quotes()
        else:
            self._walk()
        if self.last < len(text):
            self.pieces.append(text[self.last :])
        return self.pieces

    def _only_placeholders(self) -> bool:
        """The common case in one pass: every brace opens a well-formed placeholder."""
        text = self.text
        found = list(_PLACEHOLDER_RE.finditer(text))
        if len(found) != text.count("{") or not all(
            (m.group(1) in KINDS and m.group(2) != "" and (m.group(2) or m.group(1) != "params"))
            or (m.group(1) == PYTHON and m.group(2) is None)
            for m in found
        ):
            return False  # something to report or to leave alone: go brace by brace
        pieces = self.pieces
        last = 0
        for match in found:
            i = match.start()
            pieces.append(text[last:i])
            start = i == 0 or text[i - 1] in _WORD_BREAKS
            pieces.append(Ref(match.group(1), match.group(2), match.group(0), start))
            last = match.end()
        self.last = last
        return True

    def _plain_quotes(self) -> None:
        """Quotes and backslashes only: quoted spans and braces come from one regex."""
        text = self.text
        for token in re.compile(*_PLAIN_TOKENS).finditer(text):
            first = text[token.start()]
            if first == "{":
                self._brace(token.start(), "top")
            elif first in "'\"":
                i = text.find("{", token.start(), token.end())
                while i >= 0:
                    i = text.find("{", self._brace(i, first), token.end())

    def _walk(self) -> None:
        text = self.text
        n = len(text)
        stack = [_Frame("top")]
        i = 0
        while i < n:
            frame = stack[-1]
            # Jump to the next character that matters in this context.
            found = re.compile(*_NEXT[frame.kind]).search(text, i)
            if found is None:
                break
            i = found.start()
            ch = text[i]
            if frame.kind in ("'", "$'"):
                if ch == "'":
                    stack.pop()
                elif ch == "{":
                    i = self._brace(i, "'")
                    continue
                elif ch == "\\":  # only in $'...'
                    i += 1
                i += 1
                continue
            if ch == "\\":
                i += 2
                continue
            if ch == "{":
                i = self._brace(i, frame.kind)
                continue
            if ch == "`":
                if frame.kind == "`":
                    stack.pop()
                else:
                    stack.append(_Frame("`"))
                i += 1
                continue
            if text.startswith("$(", i):
                stack.append(_Frame("$("))
                i += 2
                continue
            if frame.kind == '"':
                if ch == '"':
                    stack.pop()
                i += 1
                continue
            # Code: the top level, a command substitution or backticks.
            if ch == "'":
                stack.append(_Frame("'"))
            elif ch == "$" and text.startswith("$'", i):
                stack.append(_Frame("$'"))
                i += 1
            elif ch == '"':
                stack.append(_Frame('"'))
            elif ch == "(":
                stack[-1] = frame._replace(depth=frame.depth + 1)
            elif ch == ")":
                if frame.depth:
                    stack[-1] = frame._replace(depth=frame.depth - 1)
                elif frame.kind == "$(":
                    stack.pop()
            elif ch == "#" and (i == 0 or text[i - 1] in _WORD_BREAKS):
                end = text.find("\n", i)
                i = n if end < 0 else end
                continue
            elif ch == "<" and not frame.depth and text.startswith("<<", i):
                match = re.compile(*_HEREDOC).match(text, i)
                if match and not text.startswith("<<<", i):
                    delimiter = next(g for g in match.group(2, 3, 4) if g is not None)
                    self.heredocs.append((delimiter, match.group(1) == "-", match.group(0)))
                    i = match.end()
                    continue
            elif ch == "\n" and self.heredocs:
                i = self._heredoc_bodies(i + 1)
                continue
            i += 1

    def _heredoc_bodies(self, start: int) -> int:
        """Skip the bodies of the pending here-documents; a placeholder there is an error."""
        text = self.text
        i = start
        for delimiter, strip_tabs, operator in self.heredocs:
            while i < len(text):
                end = text.find("\n", i)
                end = len(text) if end < 0 else end
                line = text[i:end]
                if (line.lstrip("\t") if strip_tabs else line) == delimiter:
                    i = end + 1
                    break
                for match in _PLACEHOLDER_RE.finditer(line):
                    if match.group(1).lower() in (*KINDS, *_SINGULAR, PYTHON):
                        raise TemplateError(
                            f"{match.group(0)} is inside the here-document {operator}, where"
                            " quotes do not protect a value; pass it as an argument instead"
                        )
                i = end + 1
        self.heredocs.clear()
        return i

    def _brace(self, i: int, context: str) -> int:
        """Handle a `{` at `i` in quoting context `context`; returns where to go on."""
        text = self.text
        match = _PLACEHOLDER_RE.match(text, i)
        if match is None:
            near = re.compile(*_NEAR).match(text, i)
            if near is not None:
                raise TemplateError(_near_miss(near.group(0), near.group(1), near.group(2)))
            return i + 1
        kind, item = match.group(1), match.group(2)
        ref = match.group(0)
        if kind == PYTHON and item is not None:
            raise TemplateError(f"{ref}: {{python}} takes no name; it is mlbuild's interpreter")
        if kind not in KINDS and kind != PYTHON:
            lowered = kind.lower()
            hint = _did_you_mean(kind, KINDS)
            if lowered in KINDS or lowered in _SINGULAR:
                canonical = _SINGULAR.get(lowered, lowered)
                fixed = "{" + canonical + ("." + item if item is not None else "") + "}"
                raise TemplateError(
                    f"{ref}: unknown placeholder (did you mean '{canonical}'? as in {fixed})"
                )
            if item is not None and hint:
                raise TemplateError(f"{ref}: unknown placeholder" + hint)
            return i + 1  # someone else's braces: `{a,b}`, `{print}`
        if kind == "params" and item is None:
            raise TemplateError(f"{ref}: name the parameter, as in {{params.NAME}}")
        if item == "":
            raise TemplateError(
                f"{ref}: a name or position must follow '{kind}.'"
                + (f" (or write {{{kind}}} for every {kind[:-1]})" if kind != "params" else "")
            )
        if i > 0 and text[i - 1] == "$":
            raise TemplateError(
                f"${ref} mixes shell and mlbuild syntax: write {ref} for mlbuild to fill"
            )
        if context in ("'", '"'):
            quote = "single" if context == "'" else "double"
            raise TemplateError(
                f"{ref} is inside {quote} quotes: mlbuild quotes every value itself;"
                f" remove the quotes around {ref}"
            )
        start = i == 0 or text[i - 1] in _WORD_BREAKS
        self.pieces.append(text[self.last : i])
        self.pieces.append(Ref(kind, item, ref, start))
        self.last = match.end()
        return match.end()


def _near_miss(written: str, kind: str, item: str | None) -> str:
    canonical = _SINGULAR.get(kind.lower(), kind.lower())
    name = re.sub(r"[\s\[\]'\"]", "", item or "")
    fixed = "{" + canonical + (f".{name}" if name else "") + "}"
    return f"{written}: not a placeholder (did you mean '{fixed}'?)"
