"""Strip reStructuredText (as written in the CPython docs) down to readable plain text.

Used by ``tools/build_corpus.py``. ``Renderer(ctx).render(lines)`` returns blocks
``(kind, text)`` with kind "title", "prose" (one paragraph on one line, inline markup removed) or
"code" (literal/code blocks, kept line by line, dropped when longer than ``max_code_lines``).
Rules, in the order a reader meets them: roles become the text Sphinx shows (:func:`len` ->
``len()``, ``~`` keeps the last name, ``:ref:`` resolves to the section title when known);
literals, links, emphasis and substitutions lose their markup; comments, targets and
bookkeeping directives (index, toctree, module, ...) disappear with their option lines; object
descriptions keep their signature line; admonitions and version notes keep their text with a
label ("Note:", "Changed in version 3.8:"); grid and simple tables become " | "-joined rows.
"""
import re
import textwrap

SUBSTITUTIONS = {"version": "3.11", "release": "3.11.2"}

ADORNMENT_RE = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")
DIRECTIVE_RE = re.compile(r"^\.\.\s+([A-Za-z][\w:-]*)::(?:\s+(.*))?$")
OPTION_RE = re.compile(r"^\s*:[\w-]+:")
BULLET_RE = re.compile(r"^([-*+\u2022]|#\.|\d+\.|[a-zA-Z]\.|\(\d+\)|\d+\))\s+")
FIELD_RE = re.compile(r"^:([^:`]+):(?:\s+(.*)|$)")
GRID_BORDER_RE = re.compile(r"^\+[-=+]+\+\s*$")
SIMPLE_BORDER_RE = re.compile(r"^=+( +=+)+\s*$")

DROP_DIRECTIVES = {
    "index", "module", "currentmodule", "moduleauthor", "sectionauthor", "highlight", "toctree",
    "testsetup", "testcleanup", "include", "literalinclude", "raw", "tabularcolumns", "image",
    "figure", "audit-event", "contents", "miscnews", "limited-api-list", "program", "default-role",
    "role", "c:namespace", "py:currentmodule", "py:module", "sectnum", "csv-table", "impl-detail-ref",
}
CODE_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "productionlist",
    "parsed-literal",
}
SIGNATURE_PREFIX = {
    "class": "class ", "exception": "exception ", "decorator": "@", "decoratormethod": "@",
    "coroutinefunction": "coroutine ", "coroutinemethod": "coroutine ", "classmethod": "classmethod ",
    "staticmethod": "staticmethod ", "abstractmethod": "abstractmethod ",
    "awaitablefunction": "awaitable ", "awaitablemethod": "awaitable ",
}
SIGNATURE_DIRECTIVES = set(SIGNATURE_PREFIX) | {
    "function", "method", "data", "attribute", "property", "cmdoption", "option", "envvar",
    "describe", "object", "opcode", "pdbcommand", "2to3fixer", "monitoring-event",
}
ADMONITION_LABELS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
    "caution": "Caution:", "tip": "Tip:", "hint": "Hint:", "attention": "Attention:",
    "danger": "Danger:", "error": "Error:", "impl-detail": "CPython implementation detail:",
    "availability": "Availability:",
}
TITLED_DIRECTIVES = {"rubric", "topic", "admonition", "sidebar"}


class Context:
    """Cross-page knowledge for inline markup: reference labels, page titles, substitutions."""

    def __init__(self, label_titles=None, doc_titles=None):
        self.label_titles = label_titles or {}
        self.doc_titles = doc_titles or {}
        self.substitutions = dict(SUBSTITUTIONS)


# ---- inline markup ------------------------------------------------------------------------------

ROLE_RE = re.compile(r":((?:[\w-]+:)?[\w-]+):`((?:[^`\\]|\\.)+)`")
LITERAL_RE = re.compile(r"``(.+?)``")
LINK_RE = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
REF_RE = re.compile(r"`([^`]+)`(?:__?)?")
STRONG_RE = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
EMPH_RE = re.compile(r"(?<![\w*\\])\*(?=[^\s*])([^*]*?[^\s*\\])\*(?![\w*])")
FOOTNOTE_REF_RE = re.compile(r"\s?\[(?:#[\w-]*|\d+|\*)\]_")
SUBST_REF_RE = re.compile(r"\|([\w][\w .-]*?)\|_?")
ESCAPE_RE = re.compile(r"\\(.)")


def render_role(role: str, content: str, ctx: Context) -> str:
    """The text Sphinx would show for ``:role:`content```."""
    content = content.replace("\\", "")
    titled = re.match(r"^(.*?)\s*<([^<>]+)>$", content, re.S)
    if titled and titled.group(1):
        return titled.group(1)
    target = titled.group(2) if titled else content
    target = target.lstrip("!")
    if role == "ref":
        return ctx.label_titles.get(target.lower(), target)
    if role == "doc":
        return ctx.doc_titles.get(target.lstrip("/"), target)
    if role in ("pep", "rfc"):
        return f"{role.upper()} {target.split('#')[0]}"
    if role == "samp":
        return target.replace("{", "").replace("}", "")
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    if role in ("func", "meth", "c:func", "py:func", "py:meth") and not target.endswith(")"):
        target += "()"
    return target


def render_inline(text: str, ctx: Context) -> str:
    """Strip inline reST markup from one paragraph of prose."""
    literals = []

    def protect(value: str) -> str:
        literals.append(value)
        return f"\x00{len(literals) - 1}\x00"

    text = LITERAL_RE.sub(lambda m: protect(m.group(1)), text)
    text = ROLE_RE.sub(lambda m: protect(render_role(m.group(1), m.group(2), ctx)), text)
    text = FOOTNOTE_REF_RE.sub("", text)
    text = SUBST_REF_RE.sub(lambda m: ctx.substitutions.get(m.group(1), m.group(1)), text)
    text = LITERAL_RE.sub(lambda m: protect(m.group(1)), text)  # literals inside substitutions
    text = LINK_RE.sub(lambda m: m.group(1), text)
    text = REF_RE.sub(lambda m: m.group(1), text)
    text = STRONG_RE.sub(lambda m: m.group(1), text)
    text = EMPH_RE.sub(lambda m: m.group(1), text)
    text = text.replace("\\ ", "")
    text = ESCAPE_RE.sub(lambda m: m.group(1), text)
    text = re.sub(r"\x00(\d+)\x00", lambda m: literals[int(m.group(1))], text)
    return re.sub(r"\s+", " ", text).strip()


# ---- block structure ----------------------------------------------------------------------------

def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def block_end(lines, start: int) -> int:
    """Index of the first non-blank line at indentation 0 from ``start`` (end of an indented block)."""
    k = start
    while k < len(lines) and (not lines[k].strip() or indent_of(lines[k]) > 0):
        k += 1
    return k


def dedent(lines):
    return textwrap.dedent("\n".join(lines)).split("\n")


def heading_at(lines, i: int):
    """``(span, title, style)`` if a section title starts at line i, else None."""
    n = len(lines)
    line = lines[i]
    if ADORNMENT_RE.match(line) and i + 2 < n and lines[i + 1].strip() and ADORNMENT_RE.match(lines[i + 2]):
        if lines[i + 2].strip()[0] == line.strip()[0]:
            return 3, lines[i + 1].strip(), "over" + line.strip()[0]
    if (line.strip() and not line[0].isspace() and i + 1 < n and not ADORNMENT_RE.match(line)
            and ADORNMENT_RE.match(lines[i + 1]) and (i == 0 or not lines[i - 1].strip())
            and len(lines[i + 1].rstrip()) >= len(line.rstrip()) - 1 and not line.startswith("..")):
        return 2, line.strip(), "under" + lines[i + 1].strip()[0]
    return None


class Renderer:
    """Turns reST lines into blocks ``(kind, text)``, kind in {"title", "prose", "code"}."""

    def __init__(self, ctx: Context, max_code_lines: int):
        self.ctx = ctx
        self.max_code_lines = max_code_lines

    def prose(self, out, text: str) -> None:
        text = render_inline(text, self.ctx)
        if text:
            out.append(("prose", text))

    def code(self, out, lines) -> None:
        lines = [line.rstrip() for line in dedent(lines)]
        while lines and not lines[-1]:
            lines.pop()
        while lines and not lines[0]:
            lines.pop(0)
        if lines and len(lines) <= self.max_code_lines:
            out.append(("code", "\n".join(lines)))

    def render(self, lines):
        out = []
        self.render_into(out, [line.expandtabs(8).rstrip() for line in lines])
        return out

    def render_into(self, out, lines) -> None:
        i = 0
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                i += 1
            elif indent_of(line) > 0:  # block quote
                end = block_end(lines, i)
                self.render_into(out, dedent(lines[i:end]))
                i = end
            elif line.startswith("..") and (line == ".." or line.startswith(".. ")):
                end = block_end(lines, i + 1)
                self.explicit_markup(out, line, lines[i + 1:end])
                i = end
            else:
                i = self.render_body_element(out, lines, i)

    def render_body_element(self, out, lines, i: int) -> int:
        """Render the element at line i (title, table, list, field, doctest or paragraph)."""
        line = lines[i]
        heading = heading_at(lines, i)
        if heading:
            out.append(("title", render_inline(heading[1], self.ctx)))
            return i + heading[0]
        if ADORNMENT_RE.match(line) and not SIMPLE_BORDER_RE.match(line) and not line.startswith("="):
            return i + 1  # transition
        if GRID_BORDER_RE.match(line):
            return self.grid_table(out, lines, i)
        if SIMPLE_BORDER_RE.match(line) or re.match(r"^=+\s*$", line):
            return self.simple_table(out, lines, i)
        if line.startswith(">>>"):
            end = i
            while end < len(lines) and lines[end].strip():
                end += 1
            self.code(out, lines[i:end])
            return end
        bullet = BULLET_RE.match(line)
        field = FIELD_RE.match(line)
        if bullet or field:
            return self.list_item(out, lines, i, bullet)
        return self.paragraph(out, lines, i)

    def list_item(self, out, lines, i: int, bullet) -> int:
        end = block_end(lines, i + 1)
        if bullet:
            marker = bullet.group(1)
            label = "-" if marker in "-*+\u2022" else ("1." if marker == "#." else marker)
            first = lines[i][bullet.end():]
        else:
            field = FIELD_RE.match(lines[i])
            label = field.group(1).strip() + ":"
            first = field.group(2) or ""
        sub = []
        self.render_into(sub, [first] + dedent(lines[i + 1:end]))
        if sub and sub[0][0] == "prose":
            sub[0] = ("prose", f"{label} {sub[0][1]}")
        elif label != "-":
            sub.insert(0, ("prose", label))
        out.extend(sub)
        return end

    def paragraph(self, out, lines, i: int) -> int:
        end = i
        while end < len(lines) and lines[end].strip() and indent_of(lines[end]) == 0:
            end += 1
        text = " ".join(line.strip() for line in lines[i:end])
        if end < len(lines) and lines[end].strip():  # definition list: term + indented definition
            self.prose(out, text)
            body_end = block_end(lines, end)
            self.render_into(out, dedent(lines[end:body_end]))
            return body_end
        literal = text.endswith("::")
        if literal:
            text = text[:-2].rstrip() if text[:-2].endswith(" ") or text == "::" else text[:-1]
        self.prose(out, text)
        if not literal:
            return end
        start = end
        while start < len(lines) and not lines[start].strip():
            start += 1
        if start < len(lines) and indent_of(lines[start]) > 0:
            body_end = block_end(lines, start)
            self.code(out, lines[start:body_end])
            return body_end
        return end

    def grid_table(self, out, lines, i: int) -> int:
        end = i
        while end < len(lines) and lines[end].strip():
            end += 1
        cuts = [k for k, ch in enumerate(lines[i]) if ch == "+"]
        rows, current = [], None
        for line in lines[i + 1:end]:
            if GRID_BORDER_RE.match(line):
                rows.append(current)
                current = None
                continue
            current = current or [[] for _ in cuts[1:]]
            for c, (a, b) in enumerate(zip(cuts, cuts[1:])):
                current[c].append(line[a + 1:b].strip(" |"))
        for row in filter(None, rows):
            cells = [render_inline(" ".join(cell), self.ctx) for cell in row]
            if any(cells):
                out.append(("prose", " | ".join(cells)))
        return end

    def simple_table(self, out, lines, i: int) -> int:
        end, borders = i + 1, 1
        while end < len(lines):
            if SIMPLE_BORDER_RE.match(lines[end]) or re.match(r"^=+\s*$", lines[end]):
                borders += 1
                if end + 1 >= len(lines) or not lines[end + 1].strip():
                    end += 1
                    break
            elif lines[end].strip():
                cells = re.split(r"\s{2,}", lines[end].strip())
                out.append(("prose", " | ".join(render_inline(c, self.ctx) for c in cells)))
            end += 1
        return end

    def explicit_markup(self, out, first: str, block) -> None:
        """Directives, comments, targets, footnotes and substitution definitions."""
        directive = DIRECTIVE_RE.match(first)
        if not directive:
            return  # comment, hyperlink target, footnote, substitution definition
        name, args = directive.group(1), (directive.group(2) or "").strip()
        name = name[3:] if name.startswith("py:") else name
        if name in DROP_DIRECTIVES:
            return
        header_end = 0
        while header_end < len(block) and block[header_end].strip():
            header_end += 1
        header = [line for line in block[:header_end] if not OPTION_RE.match(line)]
        body = dedent(block[header_end:]) if header_end < len(block) else []
        if name in SIGNATURE_DIRECTIVES or name.startswith("c:"):
            prefix = SIGNATURE_PREFIX.get(name, "")
            for signature in [args] + [line.strip() for line in header]:
                if signature:
                    out.append(("prose", prefix + render_inline(signature, self.ctx)))
            self.render_into(out, body)
        elif name in CODE_DIRECTIVES:
            self.code(out, header + [""] + block[header_end:])
        else:
            self.content_directive(out, name, args, dedent(header) + [""] + body)

    def content_directive(self, out, name: str, args: str, content) -> None:
        """Admonitions, version notes, titled containers and unknown directives: keep the text."""
        label = ADMONITION_LABELS.get(name)
        if name in ("versionadded", "versionchanged", "deprecated", "deprecated-removed"):
            version, _, rest = args.partition(" ")
            label = {
                "versionadded": f"New in version {version}.",
                "versionchanged": f"Changed in version {version}:",
                "deprecated": f"Deprecated since version {version}:",
                "deprecated-removed": f"Deprecated since version {version}, removed in version {rest}.",
            }[name]
            if name != "deprecated-removed" and rest:
                content = [rest] + content
        elif label and args:
            content = [args] + content
        elif name in TITLED_DIRECTIVES and args:
            out.append(("prose", render_inline(args, self.ctx)))
        sub = []
        self.render_into(sub, content)
        if label and sub and sub[0][0] == "prose":
            sub[0] = ("prose", f"{label} {sub[0][1]}")
        elif label:
            sub.insert(0, ("prose", label if label.endswith(".") else label.rstrip(":") + "."))
        out.extend(sub)

