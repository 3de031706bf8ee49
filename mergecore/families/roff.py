"""Man pages (roff source) as plain text, for the `docs` text domain (`text_domains`).

Not a roff implementation: enough of the man / mdoc conventions for readable prose (headings,
filled paragraphs, preformatted blocks, tagged paragraphs), with macro definitions, tables and
comments dropped. Pure Python, so no groff is needed.
"""

from __future__ import annotations

import re
import textwrap
from typing import Optional


_NAMED = {
    "aq": "'", "dq": '"', "em": "--", "en": "-", "hy": "-", "mi": "-", "bu": "*", "co": "(C)", "rg": "(R)",
    "lq": '"', "rq": '"', "oq": "'", "cq": "'", "Fo": "<<", "Fc": ">>", "mu": "x", "<=": "<=", ">=": ">=",
    "!=": "!=", "->": "->", "<-": "<-", "rs": "\\", "ti": "~", "ha": "^", "ga": "`", "at": "@", "sh": "#",
    "Do": "$", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "ba": "|", "sl": "/", "pl": "+", "eq": "=", "dg": "+",
    "de": "deg", "tm": "(TM)", "ua": "^", "da": "v", "sc": "S", "ps": "P", "fm": "'", "sd": '"', "ru": "_",
    "ul": "_", "bv": "|", "or": "|", "pc": ".", "md": ".", "u2014": "--", "u2013": "-", "u2019": "'", "u201C": '"',
    "u201D": '"', "u2018": "'", "u2022": "*", "u00A0": " ",
}
_STRINGS = {"Aq": "'", 'L"': '"', 'R"': '"', "C'": "'", "C`": "'", "lq": '"', "rq": '"', "R": "(R)", "Tm": "(TM)",
            "dq": '"', "PI": "pi", "-": "--", "C+": "C++"}
_ESCAPE = re.compile(
    r"""\\(?:
        \((?P<n2>..)                     # \(xx named character
      | \[(?P<nl>[^\]]*)\]               # \[name] named character
      | \*(?:\((?P<s2>..)|\[(?P<sl>[^\]]*)\]|(?P<s1>.))   # strings
      | f(?:\(..|\[[^\]]*\]|.)           # fonts
      | s(?:[+-]?\d+|\(\d\d|\[[^\]]*\]|'[^']*')      # sizes
      | [nmgF](?:\(..|\[[^\]]*\]|.)      # registers, colours, font families
      | [hvwlLoxbDNZRSXYCkAB]'[^']*'     # positioning, drawing and similar
      | (?P<one>.)                       # anything else: one character
    )""", re.VERBOSE)
_ONE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", ".": ".", "'": "'", "`": "`", "t": "\t"}
_FONT_MACROS = {"B", "I", "SM", "SB"}
_ALT_MACROS = {"BR", "BI", "IB", "IR", "RB", "RI"}
_BREAKS = {"PP", "LP", "P", "sp", "br", "TP", "TQ", "HP", "IP", "RS", "RE", "in", "ti", "PD", "SY", "YS", "OP", "bp",
           "ne", "UE", "ME", "Ee"}


def _unescape(s: str) -> str:
    def sub(m: re.Match) -> str:
        g = m.groupdict()
        if g["n2"] is not None:
            return _NAMED.get(g["n2"], "")
        if g["nl"] is not None:
            name = g["nl"]
            if name.startswith("u") and len(name) == 5 and name not in _NAMED:
                try:
                    ch = chr(int(name[1:], 16))
                    return ch if ch.isprintable() else ""
                except ValueError:
                    return ""
            return _NAMED.get(name, "")
        for key in ("s2", "sl", "s1"):
            if g[key] is not None:
                return _STRINGS.get(g[key], "")
        if g["one"] is not None:
            return _ONE.get(g["one"], "")
        return ""

    s = re.sub(r'\\".*$', "", s)  # comment to end of line
    return _ESCAPE.sub(sub, s)


def _args(rest: str) -> list[str]:
    out, cur, quoted, i = [], "", False, 0
    while i < len(rest):
        c = rest[i]
        if c == '"':
            if quoted and i + 1 < len(rest) and rest[i + 1] == '"':
                cur += '"'
                i += 2
                continue
            quoted = not quoted
        elif c in " \t" and not quoted:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    if cur:
        out.append(cur)
    return out


def roff_to_text(src: str, width: int = 78) -> str:
    """A man page's roff source as plain text: headings, filled paragraphs wrapped at `width`,
    preformatted blocks kept line by line; macro definitions, tables and comments dropped.

    Not a roff implementation: enough of the man / mdoc conventions for readable prose.
    """
    lines = src.replace("\r", "").split("\n")
    if any(ln.startswith(".so ") for ln in lines[:3]) and sum(1 for ln in lines if ln.strip()) <= 3:
        return ""  # a redirect to another page
    blocks: list[str] = []
    para: list[str] = []
    pre = False
    skip_until: Optional[str] = None
    tag_next = False

    def flush(tag: bool = False) -> None:
        if para:
            text = " ".join(" ".join(para).split())
            if text:
                blocks.append(textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False))
                if not tag:  # a .TP tag stays on the line above its description
                    blocks.append("")
            para.clear()

    i = 0
    while i < len(lines):
        raw = lines[i]
        i += 1
        while raw.endswith("\\") and not raw.endswith("\\\\") and i < len(lines):  # continuation lines
            raw = raw[:-1] + lines[i]
            i += 1
        if skip_until is not None:
            if raw.strip().startswith(skip_until):
                skip_until = None
            continue
        if raw.startswith((".", "'")):
            body = raw[1:].lstrip()
            if body.startswith(('\\"', "\\}")) or not body:
                continue
            name, _, rest = body.partition(" ")
            name = name.strip()
            rest = rest.strip()
            if name in ("de", "de1", "am", "ig"):
                skip_until = ".."
                continue
            if name == "TS":
                flush()
                skip_until = ".TE"
                continue
            if name in ("if", "ie", "el", "nr", "ds", "so", "TH", "Dd", "Dt", "Os", "ft", "ad", "na", "hy", "nh", "ll",
                        "ps", "vs", "fam", "cs", "ss", "tr", "mso", "do", "ec", "eo", "cc", "c2", "pl", "wh", "ch",
                        "ev", "rm", "rn", "als", "char", "lf", "hw", "ta", "fp", "bd", "uf", "cp", "IX", "nrPD",
                        "PD", "UN", "Sh\\}"):
                continue
            if name in ("SH", "SS", "Sh", "Ss"):
                flush()
                title = " ".join(_args(_unescape(rest)))
                if not title and i < len(lines):  # heading text on the next line
                    title = _unescape(lines[i]).strip()
                    i += 1
                if title:
                    blocks += ["", title.upper() if name in ("SH", "Sh") else title]
                continue
            if name in ("nf", "EX", "Bd"):
                flush()
                pre = True
                continue
            if name in ("fi", "EE", "Ed"):
                pre = False
                continue
            if name in _FONT_MACROS:
                text = " ".join(_args(_unescape(rest)))
            elif name in _ALT_MACROS:
                text = "".join(_args(_unescape(rest)))
            elif name in ("UR", "MT"):
                text = " ".join(_args(_unescape(rest)))
            elif name in _BREAKS:
                flush()
                if name == "IP":
                    a = _args(_unescape(rest))
                    if a and a[0].strip() not in ("", "*", "-", "o", "\\(bu", "\\[bu]"):
                        blocks.append(a[0])
                tag_next = name in ("TP", "TQ")
                continue
            elif name in ("Nm", "Fl", "Ar", "Op", "Pa", "Xr", "Nd", "Cm", "Ic", "Em", "Dq", "Sq", "Ql", "It", "Li",
                          "Va", "Ev", "Dv", "Er", "Fn", "Ft", "Fa", "Cd", "Sy", "Ad", "An", "Lk", "Mt"):
                text = " ".join(_args(_unescape(rest)))  # mdoc: keep the words
                if name == "It":
                    flush()
            else:
                continue  # any other request
        else:
            text = _unescape(raw)
        if pre:
            blocks.append(text.rstrip())
            continue
        if not text.strip():
            flush()
            continue
        para.append(text)
        if tag_next:
            flush(tag=True)
            tag_next = False
    flush()
    out: list[str] = []
    for b in blocks:  # collapse blank runs
        if not b.strip():
            if out and out[-1] != "":
                out.append("")
            continue
        out.append(b)
    text = "\n".join(out).strip("\n")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text + "\n" if text else ""
