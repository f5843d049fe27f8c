"""The one exception type for user-facing errors, and the one rule for text ens prints."""


class EnsError(Exception):
    """A problem with the user's input (a file, an id, an option), not a bug in ens.

    The message is one line that names the file, id or key at fault. The command line prints
    it and exits with status 2; ``--debug`` shows the traceback instead.
    """


def _escape(code: int) -> str:
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a non-UTF-8 file name, as os.fsdecode keeps it
        return f"\\x{code - 0xDC00:02x}"
    return {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(code) or (
        f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


#: Characters :func:`printable` escapes: C0 controls (tab and newline too), DEL, C1 controls
#: (NEL and CSI among them), the Unicode line and paragraph separators, the bidirectional
#: marks, embeddings, overrides and isolates (they reorder what a terminal shows), and lone
#: surrogates (no terminal encoding takes them).
_ESCAPES = {code: _escape(code) for code in (
    *range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029,
    0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), *range(0xD800, 0xE000))}


def printable(text: str) -> str:
    """``text`` safe to print on one terminal line: each control character shown as its escape
    (``\\x1b``, ``\\r``, ``\\n``, ``\\u202e``), so that text from a file (a file name, a metadata
    field, a class name) can neither move the cursor, recolour or hide what is printed, nor
    start a line that reads like ens's own output. Everything else, backslashes and non-ASCII
    letters included, is kept as it is. The command line applies it to every line it prints."""
    return text.translate(_ESCAPES)
