"""POD and AsciiDoc sources -> items ``(kind, text, level)`` for tools/build_large_corpus.py.

POD (Perl's documentation format) goes through Perl's own Pod::Text via a small script (``perl`` is
on every Debian system); AsciiDoc (git's manual pages) through a small documented stripper: titles
become headings, attributes are substituted, macros such as ``linkgit:git-log[1]`` become their
text, comments and attribute lines go, and listing blocks stay as plain text unless longer than
``max_code_lines`` (the same rule as the reST path).
"""
import os
import re
import subprocess
import tempfile
import textwrap


# ---- POD and AsciiDoc -> items (kind, text, level) ----------------------------------------------

POD_SCRIPT = r"""
package ProseText; use strict; use warnings; use parent 'Pod::Text';
sub heading { my ($self, $text, $indent, $marker) = @_; $self->item("\n\n") if defined $$self{ITEM};
  $text =~ s/\s+/ /g; $text =~ s/^ | $//g;
  my $level = {'====' => 1, '==  ' => 2, '=   ' => 3}->{$marker} // 4;
  $self->output("\x01$level $text\n\n"); return ''; }
sub cmd_verbatim { my ($self, $attrs, $text) = @_; $self->item if defined $$self{ITEM};
  return '' if $text =~ /^\s*$/; $text =~ s/\s*$//; $self->output("\x02\n$text\n\x03\n\n"); return ''; }
sub cmd_i { return $_[2] }
package main; binmode STDOUT;
for my $file (@ARGV) { print "\x04$file\n";
  my $p = ProseText->new(width => 1000000, indent => 4, margin => 0, errors => 'none', utf8 => 1);
  $p->output_fh(*STDOUT); $p->parse_file($file); }
"""


def pod_items(texts: dict, max_code_lines: int) -> dict:
    """``{path: items}`` for POD files, rendered by one perl process running Pod::Text (subclassed
    to mark headings \\x01LEVEL, verbatim blocks \\x02..\\x03, files \\x04; one paragraph a line)."""
    with tempfile.TemporaryDirectory() as tmp:
        names = {os.path.join(tmp, f"{k}.pod"): path for k, path in enumerate(sorted(texts))}
        for name, path in names.items():
            with open(name, "w", encoding="utf-8") as f:
                f.write(texts[path])
        out = subprocess.run(["perl", "-e", POD_SCRIPT, *names], capture_output=True, check=True).stdout
    result, items, code = {}, None, None
    for line in out.decode("utf-8", errors="replace").split("\n"):
        if line.startswith("\x04"):
            items = result.setdefault(names[line[1:]], [])
        elif code is not None and line == "\x03":
            add_code(items, code, max_code_lines)
            code = None
        elif code is not None:
            code.append(line)
        elif line == "\x02":
            code = []
        elif line.startswith("\x01"):
            items.append(("title", line[3:].strip(), int(line[1])))
        elif line.strip():
            items.append(("prose", re.sub(r"\s+", " ", line).strip(), 0))
    return result


def add_code(items, lines, max_code_lines: int) -> None:
    """Append a code block, dedented and trimmed, unless longer than ``max_code_lines``."""
    text = textwrap.dedent("\n".join(line.rstrip() for line in lines)).strip("\n")
    if text and text.count("\n") < max_code_lines:
        items.append(("code", text, 0))


ADOC_ATTRS = {"litdd": "--", "caret": "^", "tilde": "~", "empty": "", "nbsp": " ", "sp": " ",
              "startsb": "[", "endsb": "]", "plus": "+", "asterisk": "*", "apostrophe": "'",
              "vbar": "|", "amp": "&", "lt": "<", "gt": ">", "two-colons": "::", "cpp": "C++"}
ADOC_DELIM = re.compile(r"^(-{4,}|\.{4,}|/{4,}|\+{4,}|_{4,}|={4,}|\*{4,}|--|\|===)$")
ADOC_TITLE = re.compile(r"^(={1,5})\s+(\S.*?)(?:\s+=+)?$")
ADOC_TERM = re.compile(r"^\s*(\S.*?)(?::{2,4}|;;)(?:\s+(.*))?$")
ADOC_ITEM = re.compile(r"^\s*(?:\*+|-|\.+|\d+\.)\s+(\S.*)$")
ADOC_SKIP = re.compile(r"^(//(?!//).*|:!?[\w-]+!?:.*|[a-z]+::\S*\[.*\]|\[\[[^\]]*\]\])$")  # comments, attrs, macros
ADOC_INLINE = [  # applied in order, after `literals` are protected
    (re.compile(r"linkgit:([\w.-]+)\[(\w+)\]"), r"\1(\2)"),
    (re.compile(r"(?:footnote|footnoteref):\[([^\]]*)\]"), r" (\1)"),
    (re.compile(r"(?:image|indexterm|anchor):\S*\[[^\]]*\]|\[\[\[?[^\]]*\]\]\]?|\(\(\([^)]*\)\)\)"), ""),
    (re.compile(r"(?:link|xref|mailto|kbd|btn|menu|pass):([^\s\[]*)\[\]"), r"\1"),
    (re.compile(r"(?:link|xref|mailto|kbd|btn|menu|pass):[^\s\[]*\[([^\]]+)\]"), r"\1"),
    (re.compile(r"((?:https?|ftp|file)://[^\s\[]+)\[\]"), r"\1"),
    (re.compile(r"(?:https?|ftp|file)://[^\s\[]+\[([^\]]+)\]"), r"\1"),
    (re.compile(r"<<[^,>]+,\s*([^>]+)>>|<<([^>]+)>>"), lambda m: m.group(1) or m.group(2)),
    (re.compile(r"\(\(([^)]+)\)\)"), r"\1"),
    (re.compile(r"(\*\*|__|\+\+|##)(.+?)\1"), r"\2"),
    (re.compile(r"(?<![\w*_'+#\\])([*_'+#])([^\s*_'+#](?:[^\n]*?[^\s\\])?)\1(?![\w*_'+#])"), r"\2"),
    (re.compile(r"\\([\\`*_'+#{}\[\]<>~^-])"), r"\1"),
]


def adoc_attributes(text: str, attrs: dict) -> str:
    """Replace the {name} references to known attributes (git's {litdd}, {caret}, ...)."""
    return re.sub(r"\{([\w-]+)\}", lambda m: attrs.get(m.group(1), m.group(0)), text)


def adoc_inline(text: str, attrs: dict) -> str:
    """Strip inline AsciiDoc: {attributes}, ``quotes'', `literals`, linkgit:/link:/url[text]
    macros, xrefs, anchors, index terms, footnotes, emphasis and escapes."""
    text = re.sub(r"``(.+?)''", r'"\1"', adoc_attributes(text, attrs))
    literals = []

    def protect(match) -> str:
        literals.append(next(g for g in match.groups() if g is not None))
        return f"\x00{len(literals) - 1}\x00"

    text = re.sub(r"\+\+\+(.+?)\+\+\+|\$\$(.+?)\$\$|`([^`]+)`", protect, text)
    for pattern, replacement in ADOC_INLINE:
        text = pattern.sub(replacement, text)
    text = re.sub(r"\x00(\d+)\x00", lambda m: literals[int(m.group(1))], text)
    return re.sub(r"\s+", " ", text).strip()


def adoc_title(lines, i: int):
    """``(lines used, level, title)`` for a one- or two-line AsciiDoc section title at line i."""
    match = ADOC_TITLE.match(lines[i])
    if match:
        return 1, len(match.group(1)) - 1, match.group(2)
    under = lines[i + 1] if i + 1 < len(lines) else ""
    if (lines[i][:1].strip() and not ADOC_DELIM.match(lines[i]) and re.match(r"^([=~^+-])\1+$", under)
            and abs(len(under) - len(lines[i])) <= 2):
        return 2, "=-~^+".index(under[0]), lines[i].strip()
    return None


def asciidoc_items(lines, attrs: dict, max_code_lines: int, items=None):
    """Items for AsciiDoc lines: titles (level 0 document, 1 top-level section), prose (one
    paragraph each; list terms "term:", items "- text", "Note: ..." admonitions, table rows
    " | "-joined), code (listing/literal blocks, [verse] and indented literal paragraphs). Comment
    and passthrough blocks, attribute entries, block attributes, include::/ifdef:: lines go (the
    text of both ifdef branches stays)."""
    items = [] if items is None else items
    i, style, after_term = 0, "", False
    while i < len(lines):
        line = lines[i]
        title = adoc_title(lines, i) if line.strip() else None
        if not line.strip() or line.strip() == "+" or ADOC_SKIP.match(line):
            i += 1
        elif title:
            items.append(("title", adoc_inline(title[2], attrs), title[1]))
            i, style, after_term = i + title[0], "", False
        elif ADOC_DELIM.match(line):
            end = next((k for k in range(i + 1, len(lines)) if lines[k] == line), len(lines))
            adoc_block(lines[i + 1:end], line, style, attrs, max_code_lines, items)
            i, style, after_term = end + 1, "", False
        elif re.match(r"^\[[^\[\]]*\]$", line):
            i, style = i + 1, line[1:-1].split(",")[0].strip().lower()
        elif re.match(r"^\.[^\s.]", line):  # block title
            items.append(("prose", adoc_inline(line[1:], attrs), 0))
            i += 1
        else:
            i, after_term = adoc_paragraph(lines, i, style, after_term, attrs, max_code_lines, items)
            style = ""
    return items


def adoc_block(inner, delimiter: str, style: str, attrs: dict, max_code_lines: int, items) -> None:
    """A delimited block: listing/literal -> code; comment/passthrough -> nothing; a table -> rows;
    example, quote, sidebar and open blocks -> their content (an admonition style labels it)."""
    if delimiter[0] in "-." and delimiter != "--":
        add_code(items, inner, max_code_lines)
    elif delimiter == "|===":
        for row in inner:
            cells = [adoc_inline(c, attrs) for c in row.split("|")[1:]]
            if any(cells):
                items.append(("prose", " | ".join(cells), 0))
    elif delimiter[0] not in "/+":
        start = len(items)
        asciidoc_items(inner, attrs, max_code_lines, items)
        if style.upper() in ("NOTE", "TIP", "IMPORTANT", "WARNING", "CAUTION") and len(items) > start:
            items[start] = (items[start][0], f"{style.capitalize()}: {items[start][1]}", items[start][2])


def adoc_paragraph(lines, i: int, style: str, after_term: bool, attrs, max_code_lines: int, items):
    """One paragraph, list item or run of list terms from line i; returns (next line, after_term).
    An indented paragraph is a literal block (code) unless it describes a list term."""
    if ADOC_TERM.match(lines[i]) and not ADOC_ITEM.match(lines[i]):
        terms, rest = [], None
        while i < len(lines) and ADOC_TERM.match(lines[i]) and rest is None:
            term = ADOC_TERM.match(lines[i])
            terms.append(adoc_inline(term.group(1), attrs))
            rest, i = term.group(2), i + 1
        items.append(("prose", ", ".join(terms) + ":" + (" " + adoc_inline(rest, attrs) if rest else ""), 0))
        return i, True
    end = i + 1
    while (end < len(lines) and lines[end].strip() and lines[end].strip() != "+"
           and not ADOC_DELIM.match(lines[end]) and not ADOC_ITEM.match(lines[end])
           and not ADOC_TERM.match(lines[end])):
        end += 1
    para = [line for line in lines[i:end] if not ADOC_SKIP.match(line)]  # e.g. ifdef::x[] inside
    if para and (style in ("verse", "literal", "listing", "source") or (
            para[0][:1].isspace() and not after_term and not ADOC_ITEM.match(para[0]))):
        add_code(items, [adoc_attributes(x, attrs) if style == "verse" else x for x in para], max_code_lines)
    elif para:
        item = ADOC_ITEM.match(para[0])
        para = [re.sub(r"\s\+$", "", x.strip()) for x in [item.group(1) if item else para[0]] + para[1:]]
        text = ("- " if item else "") + adoc_inline(" ".join(para), attrs)  # " +" ends a hard line break
        items.append(("prose", re.sub(r"^(NOTE|TIP|IMPORTANT|WARNING|CAUTION): ",
                                      lambda m: m.group(1).capitalize() + ": ", text), 0))
    return end, after_term
