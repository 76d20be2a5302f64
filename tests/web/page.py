#!/usr/bin/env python3
"""Load the snapsync daemon's status page in headless Chromium and report what it shows.

Used by tests/cli_web.rs: `page.py URL SCREENSHOT [--measure N]` prints one JSON object
on stdout with what the page drew (table rows, chart points, chains), read from the
DOM as a user's browser laid it out; saves a screenshot of the whole page; with
--measure N, also times drawing a status document of N jobs (the real document's first
job, copied) in the same browser.

Needs Debian's chromium and chromium-driver and Python's selenium (scripts/test.sh
installs them).
"""

import json
import os
import shutil
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def browser():
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              "--disable-gpu", "--window-size=1400,1000", "--hide-scrollbars"):
        opts.add_argument(a)
    for b in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(b):
            opts.binary_location = b
            break
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(driver), options=opts)


def wait(d, script, what, secs=30):
    end = time.time() + secs
    while time.time() < end:
        if d.execute_script(script):
            return
        time.sleep(0.1)
    raise SystemExit(f"page: timed out waiting for {what}; problem banner: "
                     + d.execute_script("return document.getElementById('problem').textContent"))


READ = r"""
const rows = [...document.querySelectorAll('#jobs tbody tr.dest')].map((tr) => {
  const lag = tr.querySelector('td.lag');
  return {
    job: tr.dataset.job, url: tr.dataset.url,
    result: tr.querySelector('td.result').dataset.result,
    lag: lag.dataset.lag === '' ? null : Number(lag.dataset.lag),
    lag_text: lag.textContent, late: lag.classList.contains('late'),
    result_text: tr.querySelector('td.result').textContent,
    result_class: (tr.querySelector('td.result span') || {}).className || '',
  };
});
const runs = {};
for (const svg of document.querySelectorAll('svg.runs')) {
  runs[svg.dataset.job] = {
    changed: svg.querySelectorAll('circle.changed').length,
    sent: svg.querySelectorAll('circle.sent').length,
  };
}
const repositories = {};
for (const svg of document.querySelectorAll('svg.repo')) {
  repositories[svg.dataset.url] = {
    stored: svg.querySelectorAll('circle.stored').length,
    logical: svg.querySelectorAll('circle.logical').length,
    ratio: (svg.parentElement.querySelector('.ratio') || {}).textContent || null,
  };
}
const dests = [...document.querySelectorAll('.chain-dest')].map((h) => ({
  url: h.dataset.url, read: h.dataset.read || null, problem: h.dataset.problem || null,
  text: h.textContent,
}));
const chains = [...document.querySelectorAll('.chain')].map((c) => ({
  url: c.dataset.url, volume: c.dataset.volume,
  origin: c.dataset.origin || null,
  origin_text: (c.querySelector('.origin') || {}).textContent || null,
  arcs: c.querySelectorAll('path.arc').length,
  snapshots: [...c.querySelectorAll('g.snap')].map((g) => ({
    name: g.dataset.name, full: g.dataset.full === 'true', base: g.dataset.base,
    protected: g.dataset.protected === 'true',
  })),
}));
return {rows, runs, repositories, dests, chains,
        problem: document.getElementById('problem').hidden ? null : document.getElementById('problem').textContent};
"""

# Draw a status document of N jobs (the first job copied, with three destinations and
# a full run history each) with the page's own functions; milliseconds taken, from
# the start of drawing to the layout done.
MEASURE = r"""
const n = arguments[0], done = arguments[arguments.length - 1];
api('/api/status').then((status) => {
  const j0 = status.jobs[0];
  const dests = [0, 1, 2].map((k) => Object.assign({}, j0.destinations[0], {url: j0.destinations[0].url + '-' + k}));
  const run = j0.recent_runs[0];
  const runs = Array.from({length: 20}, (_, i) => Object.assign({}, run, {id: i + 1}));
  status.jobs = Array.from({length: n}, (_, i) => Object.assign({}, j0, {name: 'job-' + i, destinations: dests, recent_runs: runs}));
  const t0 = performance.now();
  jobsTable(status); runCharts(status); repositoryCharts(status);
  document.body.offsetHeight;  // force layout
  const ms = performance.now() - t0;
  done({ms, bytes: JSON.stringify(status).length, rows: document.querySelectorAll('#jobs tbody tr.dest').length,
        charts: document.querySelectorAll('svg.runs').length});
});
"""


def main():
    url, shot = sys.argv[1], sys.argv[2]
    measure = int(sys.argv[sys.argv.index("--measure") + 1]) if "--measure" in sys.argv else 0
    d = browser()
    try:
        d.get(url)
        wait(d, "return Number(document.body.dataset.refreshed || 0) >= 1", "the first refresh")
        # A second refresh: the page keeps itself current without a reload.
        wait(d, "return Number(document.body.dataset.refreshed || 0) >= 2", "a refresh", secs=20)
        out = d.execute_script(READ)
        # The whole page in one picture: a viewport as tall as the page.
        height = d.execute_script("return document.documentElement.scrollHeight")
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1400, "height": min(max(height, 600), 6000),
            "deviceScaleFactor": 1, "mobile": False})
        time.sleep(0.3)
        d.save_screenshot(shot)
        if measure:
            d.set_script_timeout(60)
            out["measure"] = d.execute_async_script(MEASURE, measure)
        print(json.dumps(out))
    finally:
        d.quit()


if __name__ == "__main__":
    main()
