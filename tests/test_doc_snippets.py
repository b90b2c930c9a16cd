"""Every Python snippet of README.md, docs/*.md and moe_plugin/patches/README.md runs, so the
docs cannot rot. The rules (one namespace per page, doctest sessions, the ``cuda`` and
``torchrun N`` markers) are in tests/doc_snippets.py's docstring.

The pages run in fresh processes in a temporary directory (snippets may write files), with
the environment of the test suite: without a GPU, TRITON_INTERPRET=1, so the snippets run
moe_plugin's Triton kernels in the interpreter (the snippets keep their sizes small for it).
Pages that use Megatron-Core run in a process of their own (``patches.apply()`` changes that
process) and only where megatron-core is installed. A ``torchrun N`` snippet runs on N GPUs
where there are that many, otherwise on the CPU (CUDA hidden: gloo and the interpreter).
"""
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import HAS_CUDA, free_port, worker_env
from doc_snippets import extract

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNNER = os.path.join(HERE, "doc_snippets.py")
HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None and \
    importlib.util.find_spec("megatron.core") is not None

PAGES = sorted(["README.md", "moe_plugin/patches/README.md",
                *(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs/*.md")))])
SNIPPETS = {page: extract(os.path.join(ROOT, page)) for page in PAGES}
# the snippets that need a GPU (each marked <!-- snippet: cuda --> in its page)
CUDA_ONLY = {"docs/moe_layer.md": 1}


MEGATRON_CODE = re.compile(r"^\s*(from|import) megatron\b|\bpatches\.apply\(", re.M)


def _uses_megatron(page: str) -> bool:
    return any(MEGATRON_CODE.search(s.code) for s in SNIPPETS[page] if not s.nproc)


def _pages(megatron: bool) -> list:
    return [p for p in PAGES if any(not s.nproc for s in SNIPPETS[p])
            and _uses_megatron(p) == megatron]


def _env() -> dict:
    env = worker_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_pages(pages, tmp_path, timeout):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, RUNNER, "--report", str(report),
                           *(os.path.join(ROOT, p) for p in pages)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    rep = json.loads(report.read_text())
    assert proc.returncode == 0 and not rep["failed"], (
        f"failed: {rep['failed']}\n" + proc.stdout[-4000:] + proc.stderr[-8000:])
    return rep


def _count(rep, key, page):
    return sum(w.startswith(os.path.join(ROOT, page) + ":") for w in rep[key])


def test_every_page_with_snippets_is_covered():
    """The docs have snippets, every page's are run by one of the tests below, and only the
    expected ones are GPU-only."""
    assert "README.md" in PAGES and "docs/megatron.md" in PAGES
    assert all(SNIPPETS[p] for p in ("README.md", "docs/moe_layer.md", "docs/megatron.md",
                                     "docs/quantization.md", "docs/expert_parallelism.md",
                                     "docs/grad_sync.md"))
    covered = set(_pages(False)) | set(_pages(True)) | \
        {p for p in PAGES if any(s.nproc for s in SNIPPETS[p])}
    assert covered == {p for p in PAGES if SNIPPETS[p]}
    assert {p: sum(s.marker == "cuda" for s in SNIPPETS[p]) for p in PAGES
            if any(s.marker == "cuda" for s in SNIPPETS[p])} == CUDA_ONLY


def test_snippets_run(tmp_path):
    pages = _pages(megatron=False)
    assert "README.md" in pages and "docs/moe_layer.md" in pages
    rep = _run_pages(pages, tmp_path, timeout=900)
    for page in pages:
        expect = [s for s in SNIPPETS[page] if not s.nproc]
        skipped = 0 if HAS_CUDA else CUDA_ONLY.get(page, 0)
        assert _count(rep, "ran", page) == len(expect) - skipped, page
        assert _count(rep, "skipped", page) == skipped, page


@pytest.mark.skipif(not HAVE_MEGATRON, reason="needs megatron-core")
def test_megatron_snippets_run(tmp_path):
    pages = _pages(megatron=True)
    assert "docs/megatron.md" in pages
    rep = _run_pages(pages, tmp_path, timeout=900)
    for page in pages:
        assert _count(rep, "ran", page) == len([s for s in SNIPPETS[page] if not s.nproc])
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()


TORCHRUN = [(page, s) for page in PAGES for s in SNIPPETS[page] if s.nproc]


@pytest.mark.parametrize("page, snip", TORCHRUN, ids=[s.where for _, s in TORCHRUN])
def test_torchrun_snippet_runs(tmp_path, page, snip):
    import torch
    script = tmp_path / "snippet.py"
    script.write_text(snip.code)
    env = _env()
    if torch.cuda.device_count() < snip.nproc:  # one process per GPU, else all on the CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={snip.nproc}",
         "--master_addr=127.0.0.1", f"--master_port={env['MASTER_PORT']}", str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{snip.where}\n" + proc.stdout[-4000:] + proc.stderr[-8000:]


def test_torchrun_snippets_exist():
    assert {p for p, _ in TORCHRUN} == {"docs/expert_parallelism.md", "docs/grad_sync.md"}


# ----------------------------------------------------------------------------------------------
# the runner itself: a failing snippet, a wrong doctest output and a bad marker are caught

def _fake_page(tmp_path, text):
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


@pytest.mark.parametrize("text, ok", [
    ("```python\nx = 2\n```\n\ntext\n\n```python\nassert x == 2\n```\n", True),
    ("```python\nx = 2\n```\n\n```python\nassert x == 3\n```\n", False),
    ("```python\nimport os\n```\n\n```python\n>>> 1 + 1\n2\n>>> int('a')\n"
     "Traceback (most recent call last):\n...\nValueError: invalid literal for int() with "
     "base 10: 'a'\n```\n", True),
    ("```python\n>>> 1 + 1\n3\n```\n", False),
    ("```sh\nexit 1\n```\n\n```python\npass\n```\n", True),
    ("<!-- snippet: cuda -->\n```python\nimport torch\nassert torch.cuda.is_available()\n```\n",
     True),
])
def test_runner_reports_failures(tmp_path, text, ok):
    page = _fake_page(tmp_path, text)
    report = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, RUNNER, "--report", str(report), str(page)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    rep = json.loads(report.read_text())
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    assert (rep["failed"] == []) is ok


def test_runner_line_numbers_and_markers(tmp_path):
    page = _fake_page(tmp_path, "# t\n\n```python\na = 1\nraise KeyError('here')\n```\n")
    proc = subprocess.run([sys.executable, RUNNER, str(page)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f'File "{page}", line 5' in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match="snippet marker"):
        extract(str(_fake_page(tmp_path, "<!-- snippet: gpu -->\n```python\npass\n```\n")))
    snips = extract(str(_fake_page(
        tmp_path, "<!-- snippet: torchrun 2 -->\n```python\npass\n```\n")))
    assert [(s.marker, s.nproc, s.line) for s in snips] == [("torchrun 2", 2, 3)]
