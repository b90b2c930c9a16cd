"""The benchmark tables of README.md and docs/*.md are those of their committed result files:
each table between ``<!-- generated-table NAME ... -->`` markers equals what
``benchmarks/doc_tables.py`` builds from the files (regenerate with
``python benchmarks/doc_tables.py``)."""
import json
import os
import shutil
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import doc_tables  # noqa: E402

# where each table must be (a table dropped from the docs, or its markers, fails the test)
EXPECTED = {
    "README.md": ["layer_h200", "peers_h200_s49", "peers_h200_s43", "peers_h200", "layer_speed",
                  "e2e_readme"],
    "docs/moe_layer.md": ["recompute", "recompute_run3"],
    "docs/expert_parallelism.md": ["expert_parallel"],
    "docs/grad_sync.md": ["grad_sync"],
    "docs/megatron.md": ["e2e_h200", "e2e_cross_entropy"],
    "docs/quantization.md": ["fp8_training", "quant_infer"],
}


def _read(rel, root=ROOT):
    with open(os.path.join(root, rel)) as fh:
        return fh.read()


def test_every_table_is_placed_once():
    assert sorted(EXPECTED) == sorted(doc_tables.DOCS)
    placed = [n for rel in EXPECTED for n in EXPECTED[rel]]
    assert sorted(placed) == sorted(doc_tables.TABLES)
    for rel, names in EXPECTED.items():
        assert [n for n, _, _ in doc_tables.find_tables(_read(rel), rel)] == names, rel


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_tables_match_their_result_files(rel):
    text = _read(rel)
    lines = text.split("\n")
    for name, start, end in doc_tables.find_tables(text, rel):
        assert lines[start] == doc_tables.opening_marker(name), f"{rel}: {name}'s marker"
        want = doc_tables.generate(name)
        assert lines[start + 1:end] == want, (
            f"{rel}: table {name} differs from {doc_tables.TABLES[name].sources}; run "
            f"python benchmarks/doc_tables.py")
        assert len(want) >= 3, name  # a header, its rule and at least one row


def test_recompute_figures():
    """The recompute table's figures, read from the JSON by hand (issue 22: the docs had
    another run's numbers)."""
    with open(os.path.join(ROOT, "benchmarks/results/h100_bench_layer.json")) as fh:
        rows = json.load(fh)["rows"]
    pick = {(r["config"], r["impl"]): r for r in rows if not r["skew"]}
    off, on = pick[("qwen3_30b_a3b", "moe_plugin")], pick[("qwen3_30b_a3b",
                                                          "moe_plugin_recompute")]
    row = (f"| qwen3_30b_a3b | {off['fwd_bwd_ms']:.2f} → {on['fwd_bwd_ms']:.2f} | "
           f"+{(on['fwd_bwd_ms'] / off['fwd_bwd_ms'] - 1) * 100:.0f}% | "
           f"{off['peak_extra_gib']:.2f} → {on['peak_extra_gib']:.2f} | 0.75 GiB |")
    assert row == "| qwen3_30b_a3b | 17.58 → 21.83 | +24% | 3.25 → 2.50 | 0.75 GiB |"
    assert row in _read("docs/moe_layer.md").split("\n")
    # the README's sentence on the same figures
    assert (f"drops to {on['peak_extra_gib']:.2f} GiB (qwen3)" in
            " ".join(_read("README.md").split()))


def test_check_detects_a_changed_result_file(tmp_path):
    """``--check`` passes on this checkout and fails once a cited figure changes."""
    for rel in doc_tables.DOCS:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / rel)
    shutil.copytree(os.path.join(ROOT, doc_tables.RESULTS), tmp_path / doc_tables.RESULTS)
    assert doc_tables.main(["--check", "--root", str(tmp_path)]) == 0
    path = tmp_path / doc_tables.RESULTS / "h100_bench_layer.json"
    data = json.loads(path.read_text())
    row = next(r for r in data["rows"] if r["config"] == "qwen3_30b_a3b"
               and r["impl"] == "moe_plugin_recompute" and not r["skew"])
    row["peak_extra_gib"] = 2.38
    path.write_text(json.dumps(data))
    assert doc_tables.main(["--check", "--root", str(tmp_path)]) == 1
    # regenerating writes the new figure; then the check passes again
    assert doc_tables.main(["--root", str(tmp_path)]) == 0
    assert "| 3.25 → 2.38 |" in (tmp_path / "docs/moe_layer.md").read_text()
    assert doc_tables.main(["--check", "--root", str(tmp_path)]) == 0


def test_markers_are_checked():
    with pytest.raises(ValueError, match="unknown generated table"):
        doc_tables.find_tables("<!-- generated-table nosuch -->\n<!-- /generated-table -->")
    with pytest.raises(ValueError, match="has no"):
        doc_tables.find_tables("<!-- generated-table recompute -->\n| a |")
    with pytest.raises(ValueError, match="without an opening marker"):
        doc_tables.find_tables("| a |\n<!-- /generated-table -->")
