"""The Python snippets of the docs: extraction, and a runner (``python doc_snippets.py PAGE...``)
used by tests/test_doc_snippets.py. Rules, as the test applies them to a Markdown page:

* Every fenced block whose info string is ``python`` is a snippet; other blocks (shell
  commands, text) are not run.
* The snippets of one page run in order in one namespace: a page's later snippets may use
  what its earlier ones defined, as a reader who pastes them in turn would.
* A snippet whose first line starts with ``>>>`` is a doctest session: it runs through
  ``doctest`` (in a copy of the page's namespace), and every printed output or exception
  shown must match.
* A marker comment on the line before the opening fence changes how one snippet runs:
  - ``<!-- snippet: torchrun N -->``: the snippet is a complete script for
    ``torchrun --nproc_per_node=N``; it runs on its own that way (not in the page's namespace).
  - ``<!-- snippet: cuda -->``: the snippet needs a CUDA GPU; it runs (in the page's namespace)
    only where one is available, and is reported as skipped elsewhere.
"""
from __future__ import annotations

import doctest
import json
import re
import sys
import traceback
from dataclasses import dataclass

FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^<!-- snippet: (torchrun [1-9][0-9]*|cuda) -->$")


@dataclass
class Snippet:
    path: str          # the page, as given
    line: int          # 1-based line of the first code line
    code: str
    marker: str = ""   # "", "cuda" or "torchrun N"

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def is_doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")

    @property
    def nproc(self) -> int:
        return int(self.marker.split()[1]) if self.marker.startswith("torchrun") else 0


def extract(path: str) -> list:
    """The ``python`` blocks of a Markdown page, in order. Raises ``ValueError`` for an
    unclosed fence or a snippet marker that is not followed by a ``python`` block."""
    with open(path) as fh:
        lines = fh.read().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if lines[i].startswith("<!-- snippet:"):
            nxt = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if not MARKER.match(lines[i]) or not nxt or nxt.group(2) != "python":
                raise ValueError(f"{path}:{i + 1}: a snippet marker must be "
                                 f"'<!-- snippet: cuda -->' or '<!-- snippet: torchrun N -->' "
                                 f"right before a ```python block: {lines[i]!r}")
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        try:
            end = next(j for j in range(i + 1, len(lines))
                       if lines[j].strip() == "```" and lines[j].startswith(indent))
        except StopIteration:
            raise ValueError(f"{path}:{i + 1}: unclosed ``` block") from None
        if lang == "python":
            marker = MARKER.match(lines[i - 1]) if i > 0 else None
            body = [ln[len(indent):] if ln.startswith(indent) else ln
                    for ln in lines[i + 1:end]]
            out.append(Snippet(path, i + 2, "\n".join(body) + "\n",
                               marker.group(1) if marker else ""))
        i = end + 1
    return out


def _run_doctest(snip: Snippet, namespace: dict) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(snip.code, dict(namespace), snip.where, snip.path, snip.line - 1)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test)
    if result.failed or not result.attempted:
        raise AssertionError(f"{snip.where}: doctest: {result.failed} of {result.attempted} "
                             f"examples failed (output above)")


def _have_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def run_page(path: str, report: dict) -> bool:
    """Runs a page's snippets in one namespace (torchrun ones are left to the caller)."""
    namespace = {"__name__": "__main__"}
    for snip in extract(path):
        if snip.nproc:
            continue
        if snip.marker == "cuda" and not _have_cuda():
            report["skipped"].append(snip.where)
            continue
        print(f"--- {snip.where}", flush=True)
        try:
            if snip.is_doctest:
                _run_doctest(snip, namespace)
            else:
                # padded so that tracebacks give the Markdown file's line numbers
                code = compile("\n" * (snip.line - 1) + snip.code, snip.path, "exec")
                exec(code, namespace)
        except BaseException:  # noqa: BLE001 - reported, and the page stops here
            traceback.print_exc()
            report["failed"].append(snip.where)
            return False
        report["ran"].append(snip.where)
    return True


def main(argv) -> int:
    """``doc_snippets.py [--report FILE] PAGE...``: runs each page's snippets (a fresh namespace
    per page, pages in turn, one process); exit status 1 if any failed."""
    report_path = None
    if argv[:1] == ["--report"]:
        report_path, argv = argv[1], argv[2:]
    report = {"ran": [], "skipped": [], "failed": []}
    for path in argv:
        run_page(path, report)
    if report_path:
        with open(report_path, "w") as fh:
            json.dump(report, fh)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
