"""The docs' generated blocks hold exactly what their sources render.

- docs/config-reference.md: the config reference, from the dataclasses;
- docs/models.md: the supported families, from the family modules;
- README.md ("What the demo shows") and docs/merging.md (the demo's merge sweep): from the demo's
  results JSON, benchmarks/results/demo.json, which `jaxcpt demo --json` writes.
"""

import json
import re
import sys
from pathlib import Path

import pytest

from jaxcpt.cli import main
from jaxcpt.config_reference import BEGIN, END, FAMILIES_BEGIN, FAMILIES_END, families_markdown, markdown
from jaxcpt.demo_record import BLOCKS, merge_block, readme_block, readme_table, wall_time
from jaxcpt.hf.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
DEMO_JSON = ROOT / "benchmarks" / "results" / "demo.json"
REGENERATE_DEMO = ("regenerate with: jaxcpt demo --render-only --json benchmarks/results/demo.json "
                   "--update README.md --update docs/merging.md")


def _between(text: str, begin: str, end: str) -> str:
    assert begin in text and end in text, f"markers {begin} ... {end} missing"
    return text.split(begin)[1].split(end)[0].strip()


@pytest.fixture(scope="module")
def demo_record() -> dict:
    return json.loads(DEMO_JSON.read_text())


def test_config_reference_page_is_generated_from_the_dataclasses():
    current = _between((ROOT / "docs" / "config-reference.md").read_text(), BEGIN, END)
    assert current == markdown().strip(), "regenerate with: jaxcpt config-reference --update docs/config-reference.md"


def test_models_page_families_table_is_generated_from_the_family_modules():
    current = _between((ROOT / "docs" / "models.md").read_text(), FAMILIES_BEGIN, FAMILIES_END)
    assert current == families_markdown().strip(), "regenerate with: jaxcpt config-reference --update docs/models.md"
    for family in FAMILIES:
        assert f"| {family} |" in current


def test_config_reference_update_fills_each_file_it_is_given(tmp_path, capsys):
    reference, families, neither = tmp_path / "reference.md", tmp_path / "models.md", tmp_path / "other.md"
    reference.write_text(f"# Config\n{BEGIN}\nstale\n{END}\nafter\n")
    families.write_text(f"# Models\n{FAMILIES_BEGIN}\nstale\n{FAMILIES_END}\n")
    neither.write_text("# nothing generated here\n")
    assert main(["config-reference", "--update", str(reference), "--update", str(families)]) == 0
    assert reference.read_text() == f"# Config\n{BEGIN}\n{markdown()}\n{END}\nafter\n"
    assert families.read_text() == f"# Models\n{FAMILIES_BEGIN}\n{families_markdown()}\n{FAMILIES_END}\n"
    assert main(["config-reference", "--update", str(neither)]) == 2
    assert "docs/config-reference.md and docs/models.md" in capsys.readouterr().err


def test_readme_demo_block_is_rendered_from_the_demo_results_json(demo_record):
    begin, end = BLOCKS["demo"]
    current = _between((ROOT / "README.md").read_text(), begin, end)
    assert current == readme_block(demo_record).strip(), REGENERATE_DEMO
    assert wall_time(demo_record) in current  # the demo's time is the measured one


def test_merging_page_demo_sweep_is_rendered_from_the_demo_results_json(demo_record):
    begin, end = BLOCKS["demo-merge"]
    current = _between((ROOT / "docs" / "merging.md").read_text(), begin, end)
    assert current == merge_block(demo_record).strip(), REGENERATE_DEMO
    assert "SLERP" in current  # the JSON carries the SLERP sweep the page compares


def test_readme_quotes_the_demo_time_only_from_the_json():
    """The demo time once disagreed with the README's own table ("about 3 minutes" vs 6 min 40 s)."""
    readme = (ROOT / "README.md").read_text()
    begin, end = BLOCKS["demo"]
    outside = readme.split(begin)[0] + readme.split(end)[-1] if begin in readme else readme
    durations = re.findall(r"\b\d+(?:\.\d+)? ?(?:min(?:utes?)?|s|seconds?|hours?)\b", outside)
    assert not durations, f"README quotes times outside the block generated from demo.json: {durations}"


def test_demo_json_records_commit_machine_and_time_and_its_table_matches_its_numbers(demo_record):
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", demo_record["git_commit"])
    assert demo_record["machine"]["cpu"] and demo_record["machine"]["cores"] >= 1
    timings = demo_record["timings_s"]
    phases = ("data", "pretrain", "cpt_no_replay", "cpt_replay", "merge_sweep", "report", "transformers")
    assert timings["total"] == pytest.approx(sum(timings[p] for p in phases), abs=0.2)
    assert not demo_record["scale"]["fast"]  # the docs describe the full demo
    # The printed table (what the README shows) against the numbers recorded beside it.
    rows = {}  # the first 'domain' / 'general' rows: losses (the bits-per-byte rows follow)
    for line in readme_table(demo_record).splitlines():
        if line.split() and line.split()[0] in ("domain", "general"):
            rows.setdefault(line.split()[0], line.split())
    a, b = demo_record["runs"]["no_replay"]["loss"], demo_record["runs"]["replay"]["loss"]
    for source in ("domain", "general"):
        assert float(rows[source][2]) == pytest.approx(a[source]["last"], abs=1e-4)
        assert float(rows[source][5]) == pytest.approx(b[source]["last"], abs=1e-4)
    sweep = demo_record["merge_sweep"]
    recommended = sweep["recommended"]["coefficient"]
    shown = [line for line in readme_table(demo_record).splitlines() if line.endswith("<- recommended")]
    assert len(shown) == 1 and float(shown[0].split()[0]) == recommended
    assert demo_record["merge_sweep_slerp"]["method"] == "slerp"


def test_demo_render_only_refreshes_the_blocks_from_the_json(tmp_path, demo_record):
    json_path = tmp_path / "demo.json"
    json_path.write_text(json.dumps(demo_record))
    page = tmp_path / "page.md"
    begin, end = BLOCKS["demo"]
    page.write_text(f"intro\n{begin}\nstale figures\n{end}\noutro\n")
    assert main(["demo", "--render-only", "--json", str(json_path), "--update", str(page)]) == 0
    assert page.read_text() == f"intro\n{begin}\n{readme_block(demo_record)}\n{end}\noutro\n"
    assert main(["demo", "--render-only", "--update", str(page)]) == 2  # no --json: nothing to render from


def test_demo_stops_when_a_run_was_stopped_by_a_signal(monkeypatch, tmp_path):
    """A SIGTERM'd run returns (after saving); the demo must not go on to its next phase."""
    import jaxcpt.demo as demo
    import jaxcpt.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda cfg: {"run_dir": "runs/demo/base", "step": 120, "exports": [],
                                                    "stopped_by_signal": True})
    with pytest.raises(demo.UserError, match="stopped by a signal at step 120"):
        demo._train([f"run_dir={tmp_path / 'r'}", demo._sources(tmp_path, general_weight=1.0, domain_weight=0.0)])


# ----------------------------------------------------------------------------- hand-written tables
# A table's figures are the values of the results JSON its section names: by path
# (`benchmarks/results/X.json`, globs allowed), by file name (`X.json`, `..._suffix.json`) or by the
# script that writes it (`python benchmarks/X.py` -> benchmarks/results/X*.json). Each decimal
# figure of a data cell must be one of that JSON's numbers at the precision shown, in the unit
# shown (GiB, MiB, M, k, %, s), or in the unit its column's header names ("peak RSS GiB", "seconds")
# when the figure carries none: results JSONs record bytes and seconds, pages show GiB and MiB.
# Signed figures (+0.229: differences) and the first column (labels, versions) are not checked, nor a
# section that says `<!-- not measurements: WHY -->` (specifications, version tables).
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = re.compile(r"(?<![\w.+-])(\d[\d,]*\.\d+) ?(M|k|%|GiB|MiB|s)?(?![\w.])")
UNIT_SCALES = {"": (1.0,), "s": (1.0,), "M": (1e-6,), "k": (1e-3,), "%": (100.0, 1.0), "GiB": (2.0**-30, 1.0),
               "MiB": (2.0**-20, 1.0)}
HEADER_UNIT = re.compile(r"(?<![\w/])(GiB|MiB|seconds|s)(?![\w])")
NOT_MEASURED_SECTION = "<!-- not measurements:"
GENERATED = ("docs/config-reference.md", "docs/models.md",  # tables generated from code, checked above
             "docs/accelerators.md")  # generated from the compile JSONs (tests/test_aot.py checks it)
# Pages whose tables state behaviour, defaults and limits (fault tables, topology specs), not measurements.
NOT_MEASUREMENTS = ("docs/faults.md", "docs/faults-rundir.md", "docs/faults-data.md", "docs/faults-hosts.md",
)


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield float(value)


def results_named_in(section: str) -> list[Path]:
    files = set()
    for path in re.findall(r"benchmarks/results/[\w.*-]+\.json", section):
        files.update(ROOT.glob(path))
    for name in re.findall(r"`(?:\.\.\.)?([\w.-]+\.json)`", section):
        files.update(RESULTS.glob(("*" if name.startswith("_") else "") + name))
    for script in re.findall(r"python benchmarks/(\w+)\.py", section):
        files.update(RESULTS.glob(f"{script}*.json"))
    return sorted(files)


def unbacked_figures(text: str) -> list[str]:
    """'heading: figure' for each table figure that no results JSON named in its section holds."""
    problems = []
    for section in re.split(r"\n(?=#{1,6} )", text):
        if NOT_MEASURED_SECTION in section:
            continue
        figures = []
        for table in re.split(r"\n(?!\|)", section):  # a table: consecutive lines that start with '|'
            rows = [line for line in table.splitlines() if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line)]
            if not rows:
                continue
            units = [(HEADER_UNIT.search(cell) or [None, ""])[1].replace("seconds", "s") for cell in rows[0].split("|")[2:-1]]
            figures += [(m.group(1), m.group(2) or (units[i] if i < len(units) else "")) for row in rows[1:]
                        for i, cell in enumerate(row.split("|")[2:-1]) for m in FIGURE.finditer(cell)]
        if not figures:
            continue
        heading = section.splitlines()[0].lstrip("# ")[:60]
        files = results_named_in(section)
        if not files:
            problems.append(f"{heading}: a table of figures whose section names no results JSON")
            continue
        values = [v for f in files for v in _numbers(json.loads(f.read_text()))]
        for shown, unit in figures:
            number, decimals = float(shown.replace(",", "")), len(shown.split(".")[1])
            if not any(abs(v * scale - number) <= 0.50001 * 10**-decimals for v in values for scale in UNIT_SCALES[unit]):
                problems.append(f"{heading}: {shown}{' ' + unit if unit else ''} is in none of "
                                f"{', '.join(f.name for f in files)}")
    return problems


def test_every_table_figure_on_a_page_is_a_value_of_the_results_json_it_names():
    pages = [p for p in sorted((ROOT / "docs").glob("*.md")) if str(p.relative_to(ROOT)) not in GENERATED + NOT_MEASUREMENTS]
    assert {"adaptation.md", "planning.md", "performance.md"} <= {p.name for p in pages}
    problems = [f"{p.relative_to(ROOT)}: {problem}" for p in [ROOT / "README.md", *pages]
                for problem in unbacked_figures(p.read_text())]
    assert not problems, "figures that no results JSON backs:\n" + "\n".join(problems)


def test_the_figure_checker_names_a_figure_its_json_lacks():
    page = ("## Speed\n\n`python benchmarks/train_throughput.py --vs-torch`:\n\n| | step | tokens/s |\n| --- | --- | --- |\n"
            "| jaxcpt | 4.64 s | 441.7 |\n| torch | 2.54 s | 999.9 |\n\n## Other\n\n| a | b |\n| --- | --- |\n| x | 1.5 GiB |\n")
    speed, other = unbacked_figures(page)
    recorded = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("train_throughput_*.json"))
    assert speed == f"Speed: 999.9 is in none of {', '.join(recorded)}"
    assert other == "Other: a table of figures whose section names no results JSON"


def test_the_figure_checker_reads_units_from_column_headers_and_skips_sections_marked_not_measured():
    """Results JSONs record bytes and seconds; docs/gpu.md and docs/real-size.md show GiB in a column
    headed 'GiB' (once skipped whole, as the checker read such a figure as a bare number)."""
    reports = json.loads((ROOT / "benchmarks/results/compile_qwen2.5-7b-8xh100_h200-8_b200-8.json").read_text())["reports"]
    seconds = [f"{r['compile_s']:.2f}" for r in reports]  # as recorded: the checker must find them
    page = ("## Fit\n\n`compile_qwen2.5-7b-8xh100_h200-8_b200-8.json`:\n\n| topology | memory GiB | compile seconds |\n"
            f"| --- | ---: | ---: |\n| h200-8 | 141.00 | {seconds[0]} |\n| b200-8 | 178.36 | {seconds[1]} |\n"
            "| x | 150.25 | 9.99 |\n\n"
            "## Versions\n\n<!-- not measurements: versions -->\n\n| jax | CUDA |\n| --- | --- |\n| 0.10.2 | 13.0 |\n")
    assert unbacked_figures(page) == [f"Fit: {n} is in none of compile_qwen2.5-7b-8xh100_h200-8_b200-8.json"
                                      for n in ("150.25 GiB", "9.99 s")]


def test_the_provenance_page_lists_every_results_json_with_the_commit_it_records():
    """docs/results-provenance.md is what benchmarks/results_provenance.py makes of today's JSONs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import results_provenance

    page = (ROOT / "docs" / "results-provenance.md").read_text()
    block = page.split(results_provenance.BEGIN, 1)[1].split(results_provenance.END, 1)[0].strip()
    listed = [tuple(cell.strip(" `") for cell in line.strip("|").split("|")[:2]) for line in block.splitlines()[2:]]
    # name and commit only: whether a commit is on main's line needs the history, which a shallow clone lacks
    expected = [(name, commit) for name, commit, _ in results_provenance.rows()]
    assert listed == expected, "run: python benchmarks/results_provenance.py --update docs/results-provenance.md"
    assert len(expected) == len(list((ROOT / "benchmarks" / "results").glob("*.json")))
