"""The alert rules and the Grafana dashboard in contrib/, checked with the
tools' own checkers where there is one and against the metrics the ingester
really serves (rpofs.ingest.metrics): promtool parses and lints the rules and
runs their unit tests (each alert shown not firing, then firing, on
synthetic series); those series are named and labelled as `render` makes
them; every expression of the rules and the dashboard names only metrics
that exist, the dashboard's too parsed by promtool; the dashboard's
structure (ids and uids unique, panels on the grid without overlapping,
every metric shown). Pure: no repository, promtool as a child process
(tools/setup installs Debian's prometheus package for it)."""

import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from rpofs.ingest import metrics
from rpofs.ingest.daemon import AppStatus, VmStatus

pytestmark = pytest.mark.pure

CONTRIB = pathlib.Path(__file__).resolve().parent.parent / "contrib"
RULES = CONTRIB / "prometheus" / "rpofs-alerts.yml"
RULE_TESTS = CONTRIB / "prometheus" / "rpofs-alerts.test.yml"
DASHBOARD = CONTRIB / "grafana" / "rpofs-dashboard.json"

# PromQL's functions and aggregations the files may call, and its keywords
FUNCTIONS = {"absent", "changes", "count", "increase", "max", "max_over_time", "min", "rate", "sum", "time",
             "vector", "avg", "topk", "clamp_min", "label_values"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right"}


def promtool(*args, cwd=None) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: tools/setup installs it (Debian package prometheus)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana's label_values())
    reads: identifiers left once strings, label matchers, ranges and the
    label lists of by/on/... are taken out, that are not calls or keywords.
    An unknown function fails here, so the list above stays honest."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", text)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        word, after = m.group(), text[m.end():].lstrip()
        if word in KEYWORDS:
            continue
        if after.startswith("("):
            assert word in FUNCTIONS, f"{expr}: calls {word}(), not a PromQL function this test knows"
        else:
            names.add(word)
    return names


def test_metric_names_finds_what_an_expression_reads():
    assert metric_names('(rpofs_protected{vm=~"$vm"} == 0) and on (vm, uuid) '
                        '(max_over_time(rpofs_protected[1h]) == 1)') == {"rpofs_protected"}
    assert metric_names("time() - rpofs_last_success_timestamp_seconds > 3600") == \
        {"rpofs_last_success_timestamp_seconds"}
    assert metric_names('label_values(rpofs_points_total{instance=~"$instance"}, vm)') == {"rpofs_points_total"}
    assert metric_names('sum by (vm) (rate(up_and_away{a="b"}[5m])) / 1e3') == {"up_and_away"}


def served_labels() -> dict[str, set[str]]:
    """Each metric the ingester serves -> its label names, from `render` over
    VMs that make it emit every one."""
    vm = VmStatus("u-db1", "db1")
    vm.newest_point_us, vm.last_success_us, vm.last_job_s, vm.points = 4 * 10**6, 5 * 10**6, 0.25, 3
    vm.state, vm.job_bytes_done, vm.job_bytes_total = "backing up", 10, 40
    vm.protection, vm.journal_folded_us, vm.journal_bytes = "protected", 5 * 10**6, 100
    vm.apps = {"orders": AppStatus("orders", "sqlite", interval_s=1.0, last_ship_us=5 * 10**6,
                                   readable_us=5 * 10**6)}
    verified = {"vms": {"u-db1": {"time_us": 3 * 10**6, "points_damaged": 0}}, "repository": {"garbage_bytes": 0}}
    labels: dict[str, set[str]] = {}
    published = {"pending": 2, "oldest_pending_us": 5 * 10**6, "error": ""}
    for line in metrics.render([vm], 12345, 6 * 10**6, verified, published).splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})? \S+$", line)
        labels[m.group(1)] = set(re.findall(r'(\w+)="', m.group(2) or ""))
    assert set(labels) == set(metrics.METRICS), "the fixture no longer makes render emit every metric"
    return labels


def test_promtool_checks_and_unit_tests_the_rules():
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    # promtool resolves the rule file named in the tests from their directory
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_promtool_fails_a_rule_whose_alert_does_not_fire_as_the_tests_say(tmp_path):
    """The unit tests have teeth: with the RPO threshold raised, the test that
    expects RpofsRpoOverTarget at 5m fails."""
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("rpofs_rpo_age_seconds > 60 ",
                                                                 "rpofs_rpo_age_seconds > 6000 "))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert tested.returncode != 0 and "alertname: RpofsRpoOverTarget, time: 5m" in tested.stderr, tested.stderr


def test_rules_read_only_metrics_the_ingester_serves():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) == 13
    for rule in rules:
        assert metric_names(rule["expr"]) <= set(metrics.METRICS), rule["alert"]
        assert metric_names(rule["expr"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    # what the brief of these rules asked for, each by the metric that tells it
    reads = {r["alert"]: metric_names(r["expr"]) for r in rules}
    for metric in ("rpofs_rpo_age_seconds", "rpofs_protected", "rpofs_journal_unfolded_seconds",
                   "rpofs_verify_damaged_points", "rpofs_last_success_timestamp_seconds", "rpofs_failures_total",
                   "rpofs_app_stale", "rpofs_publication_lag_seconds"):
        assert any(metric in r for r in reads.values()), metric


def test_rule_tests_cover_every_alert_over_series_shaped_as_served():
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    served = served_labels()
    fires, quiet = set(), set()
    for group in tests:
        for s in group["input_series"]:
            m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?$", s["series"])
            assert m.group(1) in served, s["series"]
            assert set(re.findall(r'(\w+)="', m.group(2) or "")) == served[m.group(1)], s["series"]
        for check in group["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
            for alert in check["exp_alerts"]:
                shown = set(alert["exp_labels"]) - {"severity"}
                assert shown <= {"vm", "uuid", "app"}, check
    assert fires == rules, f"alerts never shown firing: {sorted(rules - fires)}"
    assert quiet == rules, f"alerts never shown quiet: {sorted(rules - quiet)}"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])  # a collapsed row keeps its panels inside it
    return out


def expressions(board: dict) -> list[tuple[str, str]]:
    """(where, expr) of every query: panels' targets and template variables."""
    found = [(f"panel {p['id']} {p['title']!r}", t["expr"]) for p in all_panels(board) for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"variable {var['name']}", var["query"]["query"]))
    return found


def test_dashboard_structure():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = [v["name"] for v in board["templating"]["list"]]
    assert len(variables) == len(set(variables))
    datasources = {v["name"] for v in board["templating"]["list"] if v["type"] == "datasource"}
    known = {"row", "stat", "timeseries", "bargauge", "state-timeline", "table"}
    taken = []
    for p in panels:
        assert p["type"] in known, p
        g = p["gridPos"]
        assert 0 <= g["x"] and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0 and g["y"] >= 0, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not any(cells & other for other in taken), f"panel {p['title']!r} overlaps another"
        taken.append(cells)
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description"), p["id"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for ds in [p["datasource"]] + [t["datasource"] for t in p["targets"]]:
            assert ds["type"] == "prometheus" and ds["uid"].removeprefix("${").removesuffix("}") in datasources
        for word in re.findall(r"\$(\w+)", json.dumps(p["targets"])):
            assert word in variables or word.startswith("__"), f"{p['title']}: ${word} is no variable"


def test_dashboard_reads_only_metrics_the_ingester_serves_and_shows_them_all():
    board = dashboard()
    shown = set()
    for where, expr in expressions(board):
        names = metric_names(expr)
        assert names and names <= set(metrics.METRICS), f"{where}: {expr} reads {sorted(names - set(metrics.METRICS))}"
        shown |= names
    assert shown == set(metrics.METRICS), f"metrics the dashboard does not show: {sorted(set(metrics.METRICS) - shown)}"


def test_dashboard_expressions_parse_with_promtool(tmp_path):
    """Each panel's query, its Grafana variables given values, as a
    recording rule: promtool parses it with Prometheus's own parser."""
    values = {"$__rate_interval": "5m", "$instance": ".*", "$vm": ".*"}
    rules = []
    for i, (where, expr) in enumerate(e for e in expressions(dashboard()) if not e[0].startswith("variable")):
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: {expr}"
        rules.append({"record": f"rpofs_dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = promtool("check", "rules", str(path))
    assert check.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in check.stdout, check.stdout + check.stderr
