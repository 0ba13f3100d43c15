"""Daily use (issue 19, items 1-3): command-line commands that have taken effect in the
mount when they return, the commands people reached for (set, refresh --wait/--force,
revalidate, newest), and monitoring per source."""

from __future__ import annotations

import json
import os

from tests.conftest import wait_for
from tests.test_cli import one_error_line
from tests.test_gc import make_versions
from tests.test_mount import read, status


def test_cli_commands_take_effect_in_the_mount_when_they_return(origin, mnt, cli):
    old, new = make_versions(origin, mnt, "csv", [b"one", b"two"])
    assert read(mnt / "csv/latest") == b"two"  # the kernel now holds the entry for a while
    cli("tag", "csv", "latest", "failed", check=True)
    assert read(mnt / "csv/latest") == b"one"  # at once, not a poll later
    cli("untag", "csv", new, "failed", check=True)
    assert read(mnt / "csv/latest") == b"two"
    cli("pin", "csv", old, check=True)
    assert read(mnt / "csv/latest") == b"one"
    cli("unpin", "csv", check=True)
    assert read(mnt / "csv/latest") == b"two"
    # add and remove, too
    origin.set("/y", b"why")
    cli("add", "y", origin.url("/y"), check=True)
    assert read(mnt / "y/latest") == b"why"
    cli("remove", "y", check=True)
    assert not os.path.exists(mnt / "y")


def test_cli_errors_through_the_mount_keep_their_exit_codes(origin, mnt, cli):
    make_versions(origin, mnt, "csv", [b"one"])
    done = cli("tag", "nosuch", "latest", "keep")
    assert done.returncode == 1 and "no source named 'nosuch'" in one_error_line(done)
    done = cli("tag", "csv", "20200101T000000Z-00000000", "keep")
    assert done.returncode == 1 and "has no version" in one_error_line(done)
    done = cli("tag", "csv", "latest", "newest")  # a version word is no tag name
    assert done.returncode == 2 and "newest" in one_error_line(done).split("not one of")[1]
    done = cli("add", "csv", origin.url("/csv"))
    assert done.returncode == 2 and "exists already" in one_error_line(done)
    done = cli("pin", "csv", "oops")
    assert done.returncode == 2 and "invalid version" in one_error_line(done)
    # nothing of that reached the mount as a change; the refusals were its own errors
    assert status(mnt / "csv/@status")["versions"][0]["tags"] == []


def test_set_changes_options_and_url_through_the_mount(origin, mnt, cli):
    make_versions(origin, mnt, "s", [b"one"])
    origin.set("/other", b"other")
    done = cli("set", "s", "refresh=6h", f"url={origin.url('/other')}",
               "headers.Authorization=Bearer sekrit", check=True)
    assert done.stdout == "s: set refresh, url, headers.Authorization\n"  # no value shown
    st = status(mnt / "s/@status")
    assert st["refresh"] == "6h" and st["url"] == origin.url("/other")
    assert st["options"]["headers"] == {"Authorization": "<hidden>"}
    cli("refresh", "s", check=True)
    wait_for(lambda: read(mnt / "s/latest") == b"other", 10, what="the new URL's version")
    assert origin.seen("/other")[-1].headers["Authorization"] == "Bearer sekrit"
    for bad, code in ((["refresh=soon"], 2), (["nokey"], 2), (["url=ftp://x/"], 2),
                      (["color=red"], 2)):
        done = cli("set", "s", *bad)
        assert done.returncode == code, bad
        assert "sekrit" not in one_error_line(done)
    done = cli("set", "nosuch", "refresh=1h")
    assert done.returncode == 1 and "no source named" in one_error_line(done)
    assert status(mnt / "s/@status")["refresh"] == "6h"


def test_newest_names_the_newest_version_even_when_every_one_failed(origin, mnt, cli):
    a, b = make_versions(origin, mnt, "n", [b"one", b"two"])
    assert read(mnt / "n/newest") == b"two" and "newest" in os.listdir(mnt / "n")
    cli("tag", "n", "latest", "failed", check=True)
    cli("tag", "n", "latest", "failed", check=True)  # now every version is failed
    assert status(mnt / "n/@status")["latest"] is None
    assert read(mnt / "n/newest") == b"two"  # latest gives EIO, newest still reads
    assert os.stat(mnt / "n/newest").st_ino == os.stat(mnt / f"n/@versions/{b}").st_ino
    # and wherever a VERSION is taken
    assert cli("untag", "n", "newest", "failed", check=True).stdout == f"n: {b} tags: -\n"
    assert read(mnt / "n/latest") == b"two"
    assert cli("hold", "n", "newest", "1h", check=True).stdout == f"{b}\n"


def test_gc_dry_run_names_each_version_it_would_collect(origin, cli):
    origin.set("/g", b"A")
    cli("add", "g", origin.url("/g"), "--keep-versions", "0", check=True)
    ids = []
    for body in (b"A", b"B", b"C"):  # no mount runs: nothing is collected meanwhile
        origin.set("/g", body)
        ids.append(cli("fetch", "g", check=True).stdout.split()[3])
    a, b, c = ids
    out = cli("gc", "--dry-run", check=True).stdout
    assert f"g: would collect {a} (retention)" in out
    assert f"g: would collect {b} (retention)" in out
    assert f"g: keeps {c} (latest)" in out
    out = cli("gc", check=True).stdout
    assert f"g: collected {a} (retention)" in out and f"g: collected {b}" in out


def test_refresh_wait_prints_the_outcome_and_force_gets_past_lying_validators(origin, mnt,
                                                                              cli):
    origin.set("/v", b"one", etag=True)
    cli("add", "v", origin.url("/v"), check=True)
    assert read(mnt / "v/latest") == b"one"
    first = status(mnt / "v/@status")["latest"]
    assert cli("refresh", "v", "--wait", check=True).stdout == "v: not modified\n"
    res = origin.set("/v", b"two", etag=True)
    res.lying_304 = True  # changed, but its validators say it did not
    assert cli("refresh", "v", "--wait", check=True).stdout == "v: not modified\n"
    assert read(mnt / "v/latest") == b"one"
    done = cli("refresh", "v", "--wait", "--force", check=True)
    new = status(mnt / "v/@status")["latest"]
    assert new != first and done.stdout == f"v: new version {new}\n"
    assert read(mnt / "v/latest") == b"two"  # the check had taken effect when it returned
    assert "If-None-Match" not in origin.seen("/v")[-1].headers
    assert cli("refresh", "v", "--wait", "--force", check=True).stdout == "v: unchanged\n"
    origin.fail("/v", 404)
    done = cli("refresh", "v", "--wait")
    assert done.returncode == 1 and "404" in one_error_line(done)
    # without --wait: asked, not waited for
    assert cli("refresh", "v", check=True).stdout == \
        "v: refresh requested from the running mount\n"


def test_refresh_without_a_mount_prints_the_same_outcomes(origin, cli):
    origin.set("/w", b"one", etag=True)
    cli("add", "w", origin.url("/w"), check=True)
    assert cli("refresh", "w", check=True).stdout.startswith("w: new version ")
    assert cli("refresh", "w", "--wait", check=True).stdout == "w: not modified\n"
    origin.set("/w", b"one", etag=True).lying_304 = True
    assert cli("refresh", "w", "--force", check=True).stdout == "w: unchanged\n"
    assert "If-None-Match" not in origin.seen("/w")[-1].headers


def test_revalidate_runs_the_current_checks_and_retags(origin, mnt, cli):
    [a] = make_versions(origin, mnt, "r", [b"x" * 100], "validate.min_size=50")
    origin.set("/r", b"y" * 10)
    b = cli("refresh", "r", "--wait", check=True).stdout.split()[-1]
    st = status(mnt / "r/@status")
    assert [v["tags"] for v in st["versions"]] == [["failed"], ["valid"]]
    assert read(mnt / "r/latest") == b"x" * 100
    cli("set", "r", "validate.min_size=5", check=True)  # the rule was too strict
    done = cli("revalidate", "r", b, check=True)
    assert done.stdout == f"r: {b} valid\n"
    assert status(mnt / "r/@status")["versions"][0]["tags"] == ["valid"]
    assert "validation" not in status(mnt / "r/@status")["versions"][0]
    assert read(mnt / "r/latest") == b"y" * 10  # at once
    cli("set", "r", "validate.min_size=1000", check=True)
    done = cli("revalidate", "r", "latest")
    assert done.returncode == 1 and done.stdout.startswith(f"r: {b} failed: size 10 B")
    assert read(mnt / "r/latest") == b"x" * 100  # latest fell back at once
    cli("revalidate", "r", a)
    assert status(mnt / "r/@status")["latest"] is None  # every version failed:
    assert read(mnt / "r/newest") == b"y" * 10  # newest still names b
    # on the control file, with a command check
    cli("set", "r", "validate.min_size=", "validate.cmd=true", check=True)
    with open(mnt / "r/@control", "w") as f:
        f.write("revalidate newest\n")
    assert status(mnt / "r/@status")["versions"][0]["tags"] == ["valid"]
    assert read(mnt / "r/latest") == b"y" * 10
    done = cli("revalidate", "r", "20200101T000000Z-00000000")
    assert done.returncode == 1 and "has no version" in one_error_line(done)


def test_revalidate_without_a_mount(origin, cli):
    origin.set("/q", b"q" * 10)
    cli("add", "q", origin.url("/q"), "--validate", "min_size=50", check=True)
    cli("fetch", "q", check=True)
    cli("set", "q", "validate.min_size=1", check=True)
    out = cli("revalidate", "q", "newest", check=True).stdout
    assert out.endswith(" valid\n")
    st = json.loads(cli("status", "q", "--json", check=True).stdout)
    assert st["versions"][0]["tags"] == ["valid"] and st["latest"] == st["versions"][0]["id"]


def metric_samples(mnt) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = (mnt / "@metrics").read_text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_per_source_with_only_a_source_label(origin, mnt, cli):
    make_versions(origin, mnt, "ok", [b"12345"])
    make_versions(origin, mnt, "bad", [b"1234567890"])
    origin.fail("/bad", 404)
    assert cli("refresh", "bad", "--wait").returncode == 1
    samples = metric_samples(mnt)
    per_source = {k: v for k, v in samples.items() if k[0].startswith("buffyfs_source_")}
    assert {labels for _, labels in per_source} == {(("source", "ok"),), (("source", "bad"),)}

    def value(name, source):
        return samples[(f"buffyfs_source_{name}", (("source", source),))]

    assert value("stale", "bad") == 1 and value("stale", "ok") == 0
    assert value("consecutive_failures", "bad") == 1 and value("consecutive_failures", "ok") == 0
    assert value("latest_size_bytes", "ok") == 5 and value("latest_size_bytes", "bad") == 10
    assert 0 <= value("latest_age_seconds", "ok") < 60
    assert value("last_check_timestamp_seconds", "bad") >= \
        value("last_success_timestamp_seconds", "bad") > 0
    cli("remove", "bad", check=True)
    assert not any(labels == (("source", "bad"),) for _, labels in metric_samples(mnt))


def test_status_shows_stale_age_and_progress(origin, mnt, cli):
    make_versions(origin, mnt, "ok", [b"12345"])
    origin.fail("/ok", 404)
    assert cli("refresh", "ok", "--wait").returncode == 1
    # 8 s for the whole body; progress is counted a MiB at a time
    origin.set("/slow", b"s" * (3 << 20)).chunk_delay = 0.4
    cli("add", "slow", origin.url("/slow"), check=True)
    wait_for(lambda: (status(mnt / "slow/@status")["progress"] or {}).get("bytes"), 10,
             what="progress recorded")
    out = cli("status", check=True).stdout
    header, *rows = out.splitlines()[1:]
    assert header.split() == ["source", "url", "latest", "age", "state", "stale", "failures"]
    ok = next(r.split() for r in rows if r.split()[0] == "ok")
    assert ok[3].endswith("s") and ok[4:] == ["idle", "yes", "1"]  # age in seconds, stale
    slow = next(r for r in rows if r.split()[0] == "slow")
    assert "fetching " in slow and "MiB/3.0 MiB (" in slow
    assert "fetching " in cli("status", "slow", check=True).stdout
    root = json.loads(cli("status", "--json", check=True).stdout)
    entry = next(s for s in root["sources"] if s["name"] == "ok")
    assert entry["stale"] is True and entry["latest_fetched_at"]


def test_debug_log_has_each_request_and_response_without_secrets(origin, mnt):
    origin.set("/api", b"answer")
    url = origin.url("/api").replace("http://", "http://user:pa55word@")
    with open(mnt / "@control", "w") as f:
        f.write(f"add api {url} method=POST body='{{\"key\": \"b0dysecret\"}}' "
                "headers.X-Token=h3adersecret\n")
    assert read(mnt / "api/latest") == b"answer"
    text = mnt.log_text()
    plain = origin.url("/api")
    assert f"> POST {plain}" in text and f"< POST {plain}: 200 OK, 6 bytes" in text
    for secret in ("pa55word", "b0dysecret", "h3adersecret"):
        assert secret not in text


def test_a_refused_reload_shows_in_status_until_a_good_one(origin, mount_factory, tmp_path):
    import signal

    config = tmp_path / "buffy.toml"
    origin.set("/c", b"c")
    config.write_text(f'[sources.c]\nurl = "{origin.url("/c")}"\n')
    mnt = mount_factory("--config", str(config))
    assert status(mnt / "@status")["last_reload_error"] is None
    config.write_text('[sources.c]\nurl = "ftp://nope/"\n')
    mnt.proc.send_signal(signal.SIGHUP)
    error = wait_for(lambda: status(mnt / "@status")["last_reload_error"], 10,
                     what="the refused reload in @status")
    assert "URL" in error["message"] and error["at"]
    assert "config not reloaded" in mnt.log_text()
    config.write_text(f'[sources.c]\nurl = "{origin.url("/c")}"\nrefresh = "6h"\n')
    mnt.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: status(mnt / "c/@status")["refresh"] == "6h", 10, what="the reload")
    assert status(mnt / "@status")["last_reload_error"] is None


def test_cli_add_with_a_multi_line_body_while_mounted(origin, mnt, cli):
    """A body with a line break cannot be one control line: it goes to the index, and
    the mount shows it within 2 seconds (SPEC), the body as given."""
    origin.set("/ml", b"ok")
    cli("add", "ml", origin.url("/ml"), "--method", "POST", "--body", "a\nremove other",
        check=True)
    assert read(mnt / "ml/latest") == b"ok"
    assert origin.seen("/ml")[-1].body == b"a\nremove other"
