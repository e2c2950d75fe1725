"""``OUT/report.html``: one self-contained page, rendered in headless Chromium.

The folder holds every file kind, written by hand from known values (``report_fixtures``),
with hostile run and checkpoint names. Chromium loads the page with a checking script
injected: every image must decode (``naturalWidth > 0``), no resource may be fetched, the
hostile names must be text (no markup or script from them), and the tables it renders must
show the CSVs' numbers. Without Chromium that test skips (``.ci/run`` installs it and sets
``EQUIAUDIT_REQUIRE_CHROMIUM=1``, which turns the skip into a failure); the static checks
below run everywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest

import report_fixtures as fx
from equiaudit.io.layout import OutputFolder
from equiaudit.report.html import printable, render_report, write_report
from equiaudit.report.table import format_interval, format_number, format_percent

SECTIONS = ("summary", "trajectory", "breakdown", "per-t", "dynamics", "landscape", "twirl", "compare")
N_IMAGES = 7  # trajectory, per t, dynamics, 2 landscapes, twirling, compare


class Tables(HTMLParser):
    """Tables by id → rows → cell text; also every ``<img src>`` and every tag seen."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.tags: list[str] = []
        self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> Tables:
    parser = Tables()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = fx.make_out(tmp_path_factory.mktemp("report"))
    path = write_report(out)
    assert path == out / OutputFolder.REPORT
    return path


def column(table: list[list[str]], name: str) -> list[str]:
    index = table[0].index(name)
    return [row[index] for row in table[1:]]


def expected_ree_cells(run: str) -> list[str]:
    """REE as the terminal table writes it, `` *`` on the row at its float floor."""
    return [format_percent(ree) + (" *" if (run, c, h) == (fx.AT_FLOOR_ROW[0], fx.ckpt(fx.AT_FLOOR_ROW[1]), fx.AT_FLOOR_ROW[2]) else "")
            for c, h, ree, _ in fx.expected_summary(run)]


def check_tables(tables: dict[str, list[list[str]]]) -> None:
    """The numbers shown are the CSVs' (formatted as the terminal table formats them)."""
    for i, run in enumerate(fx.REE):
        table = tables[f"summary-{i}"]
        expected = fx.expected_summary(run)
        assert column(table, "head") == [head for _, head, _, _ in expected]
        assert column(table, "REE") == expected_ree_cells(run)  # the stale 88.8 % row is not shown
        assert column(table, "95 % CI (%)") == [format_interval(0.9 * r, 1.1 * r) if r is not None else "" for _, _, r, _ in expected]
        checkpoints = [c for c in column(table, "checkpoint") if c]
        assert checkpoints == list(dict.fromkeys(c for c, _, _, _ in expected))
        assert [s for s in column(table, "status") if s] == [s for _, head, _, s in expected if head == "total"]
    failed = tables["summary-1"][-1]
    assert failed[tables["summary-1"][0].index("message")] == fx.FAILED_MESSAGE
    assert "message" not in tables["summary-0"][0]  # only a run with a failure gets the column
    assert "float floor" in tables["summary-0"][0] and column(tables["summary-0"], "float floor")[0] == format_percent(1e-9)
    # breakdown of RUN's latest checkpoint (step 1000), split by t then element
    by_t = tables["breakdown-1"]
    assert column(by_t, "t") == list(fx.T_BINS)
    assert column(by_t, "REE") == [format_percent(fx.REE[fx.RUN][1000] * (1 + i)) for i in range(len(fx.T_BINS))]
    assert column(by_t, "share of EE") == [format_percent((1 + i) / 10) for i in range(len(fx.T_BINS))]
    # dynamics: RUN_B's REE comes from summary.csv
    assert column(tables["dynamics-1"], "REE") == [format_percent(fx.REE[fx.RUN_B][s]) for s in (10, 100, 1000)]
    ratios = [format_number(0.5 * (fx.REE[fx.RUN][s]) ** 0.5) for s in fx.STEPS]
    assert column(tables["dynamics-0"], "ratio") == ratios
    assert column(tables["correlations"], "Pearson r") == [f"{r['pearson']:.3f}" for r in fx.CORRELATIONS]
    assert column(tables["landscapes"], "R² EE") == [format_number(v[3]) for v in fx.LANDSCAPES.values()]
    twirl = tables["twirl-0"]
    assert column(twirl, "smallest k removing 90 %") == ["16"] * 8
    assert column(twirl, "EE") == [format_number(fx.LOSS_AUG[s] * fx.REE[fx.RUN][s] * f) for s in fx.STEPS for f in (1.0, 0.9)]
    compare = tables["compare"]
    assert column(compare, "final REE") == ["1.2 %", "1.9 %"]
    assert column(compare, "stays ≤ from step") == ["1000", "never"]


def test_page_is_self_contained_and_escaped(report):
    page = report.read_text(encoding="utf-8")
    parsed = parse(page)
    # no network: no URL, no external stylesheet/script/font, every image inline
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", page)
    assert not re.search(r"https?:|//[a-z]|url\(|@import|src=\"(?!data:)", text, re.IGNORECASE)
    assert {"script", "link", "iframe", "object", "embed"}.isdisjoint(parsed.tags)
    assert len(parsed.images) == N_IMAGES
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")  # decodes all of it (a truncated PNG raises)
        assert pixels.shape[0] > 150 and pixels.shape[1] > 300 and pixels[..., :3].std() > 0.05
    # hostile names are text: never markup
    for raw in (fx.RUN, fx.ckpt(1000), fx.FAILED_MESSAGE, fx.RUN_JSON["config_path"]):
        assert raw not in page
        assert html.escape(raw, quote=True) in page
    assert "<b>" not in page and "onerror=" not in page.replace("onerror=alert(1)&gt;", "")
    # every section there, in order, none empty; no empty table
    ids = re.findall(r'<section id="([^"]+)">', page)
    assert tuple(ids) == SECTIONS
    assert all(len(rows) > 1 for rows in parsed.tables.values())
    check_tables(parsed.tables)
    # header: version, settings, generation time
    assert page.count("* within 10× of the float floor") == 1  # the caption of RUN's table only
    assert "equiaudit 0.2.0" in page and "generated 20" in page
    for value in ("force_field", "SO(3) &lt;Haar&gt;", ">16<", ">64<", ">7<", "cpu (x86_64)", "2.13.0+cpu", "abc123def456"):
        assert value in page, value


def test_sections_follow_the_files(tmp_path):
    """Only the sections whose files exist; a missing trajectory.png is drawn from summary.csv."""
    out = tmp_path / "out"
    out.mkdir()
    fx.write_csv(out / "summary.csv", fx.summary_rows())
    page = render_report(out)
    assert re.findall(r'<section id="([^"]+)">', page) == ["summary", "trajectory"]
    assert len(parse(page).images) == 1
    (out / "breakdown.csv").write_text("run,checkpoint,step,head,by,bin,rel_equiv_error\nr,c,1,total,angle\n")  # torn row
    page = render_report(out)
    assert "breakdown.csv could not be read" in page and 'id="breakdown"' not in page

    empty = tmp_path / "empty"
    empty.mkdir()
    page = render_report(empty)
    assert "Nothing to report yet" in page and "<table" not in page and "<img" not in page

    compare = tmp_path / "cmp"  # a compare output folder
    fx.write_csv(compare / "compare.csv", fx.COMPARE)
    (compare / "compare.png").write_bytes(b"not a png")  # torn: not embedded, no broken image
    page = render_report(compare)
    assert re.findall(r'<section id="([^"]+)">', page) == ["compare"]
    assert "<title>equiaudit compare · 2 run(s)</title>" in page and "<img" not in page
    check = parse(page).tables["compare"]
    assert column(check, "final REE") == ["1.2 %", "1.9 %"]


def test_undecodable_names_become_visible_escapes(tmp_path):
    assert printable("ck\udcff.pt") == "ck\\xff.pt"  # a byte a file name could not decode
    assert printable("ü & <x>") == "ü & <x>"
    assert printable("\ud800") == "\\ud800"
    out = tmp_path / "out"
    rows, meta = fx.landscape_rows(100), {**fx.landscape_meta(100), "checkpoint": "ck\udcff<i>.pt"}
    fx.write_csv(out / "landscape" / "a.csv", rows)
    (out / "landscape" / "a.json").write_text(json.dumps(meta), encoding="utf-8")  # "\udcff" as JSON escape
    (out / "run.json").write_text(json.dumps({"task": "t\udcff"}), encoding="utf-8")
    page = write_report(out, title="mine <&>").read_text(encoding="utf-8")
    assert "ck\\xff&lt;i&gt;.pt" in page and "<title>mine &lt;&amp;&gt;</title>" in page and "t\\xff" in page
    assert not list(out.glob(".report.html.*"))  # written atomically: no temporary file left


# ----------------------------------------------------------------------------- headless Chromium

CHECK_SCRIPT = """<script>
function painted(img) {
  // Draw the decoded image: a browser shows a truncated PNG as far as it goes (naturalWidth is
  // the header's), so count opaque and non-white pixels too: matplotlib's PNGs are opaque.
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let opaque = 0, ink = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] === 255) opaque++;
    if (data[i] < 200 || data[i + 1] < 200 || data[i + 2] < 200) ink++;
  }
  const n = data.length / 4;
  return {opaque: n ? opaque / n : 0, ink: n ? ink / n : 0};
}
// Synchronous, inside the load event (by then every image has loaded; drawImage decodes it):
// --dump-dom prints the DOM once the page has loaded and virtual time ran out, which does not
// wait for asynchronous work such as img.decode() on a busy machine.
window.addEventListener("load", () => {
  const tables = {};
  document.querySelectorAll("table[id]").forEach(t => {
    tables[t.id] = [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()));
  });
  const result = {
    images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
                                            src: i.src.slice(0, 22), ...painted(i)})),
    resources: performance.getEntriesByType("resource").map(e => e.name),
    scripts: document.scripts.length,
    markup: document.querySelectorAll("main b, main i, main img:not([src^='data:'])").length,
    text: document.body.innerText,
    title: document.title,
    tables: tables,
  };
  const pre = document.createElement("pre");
  pre.id = "equiaudit-check";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    for name in (os.environ.get("EQUIAUDIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_chromium_renders_the_page(report, tmp_path):
    binary = chromium()
    if binary is None:
        if os.environ.get("EQUIAUDIT_REQUIRE_CHROMIUM"):
            pytest.fail("EQUIAUDIT_REQUIRE_CHROMIUM is set but no chromium is installed")
        pytest.skip("no chromium: apt-get install -y --no-install-recommends chromium")
    page = report.read_text(encoding="utf-8")
    assert page.count("</body>") == 1
    harness = tmp_path / "check.html"
    harness.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    command = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-extensions", "--disable-default-apps", "--mute-audio",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # were anything fetched, it could not reach the network
        f"--user-data-dir={tmp_path / 'profile'}", "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
        "--dump-dom", harness.as_uri(),
    ]
    started = time.monotonic()
    for _ in range(2):  # a second try only if chromium itself failed (a crash under load), never for a wrong page
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
        found = re.search(r'<pre id="equiaudit-check">(.*?)</pre>', done.stdout, re.DOTALL)
        if found:
            break
    seconds = time.monotonic() - started
    assert found, f"chromium printed no result (rc {done.returncode}): {done.stdout[-500:]} {done.stderr[-1500:]}"
    result = json.loads(html.unescape(found.group(1)))
    assert len(result["images"]) == N_IMAGES
    for image in result["images"]:  # every embedded PNG decoded, at its real size
        assert image["complete"] and image["width"] > 300 and image["height"] > 150, image
        assert image["opaque"] == 1 and image["ink"] > 0.005, image  # all of it drawn, and not blank
        assert image["src"].startswith("data:image/png;base64")
    assert result["resources"] == []  # nothing requested: no URL, font, stylesheet or script
    assert result["scripts"] == 1 and result["markup"] == 0  # only the checker runs; names made no markup
    text = result["text"]
    for raw in (fx.RUN, fx.RUN_B, fx.ckpt(1000), fx.FAILED_MESSAGE, "SO(3) <Haar>"):
        assert raw in text, raw  # shown as the text it is
    assert result["title"] == "equiaudit report · force_field · SO(3) <Haar>"
    check_tables(result["tables"])
    print(f"chromium: {seconds:.1f} s")
