// orderflow dashboard: draws the state diagram (mermaid) and the funnel chart (Chart.js),
// and refreshes the overview's live part every few seconds without reloading the page.
(function () {
  "use strict";
  var script = document.currentScript;
  var refreshMs = 1000 * Number((script && script.dataset.refreshS) || 5);
  var chart = null;

  function drawDiagram() {
    if (!window.mermaid) return Promise.resolve();  // no vendored assets: the source stays as text
    var node = document.getElementById("state-diagram");
    if (!node) return Promise.resolve();
    return window.mermaid.run({ nodes: [node] }).catch(function (err) {
      console.error("diagram:", err);
    });
  }

  function drawFunnel() {
    var data = document.getElementById("funnel-data");
    var canvas = document.getElementById("funnel-chart");
    if (!window.Chart || !data || !canvas) return;
    var rows = JSON.parse(data.textContent);
    var series = [["placed", "#6c7a89"], ["paid", "#0d6efd"], ["shipped", "#6f42c1"],
                  ["confirmed", "#198754"], ["cancelled", "#b02a37"]];
    if (chart) chart.destroy();
    chart = new window.Chart(canvas, {
      type: "bar",
      data: {
        labels: rows.map(function (r) { return r.day; }),
        datasets: series.map(function (s) {
          return { label: s[0], backgroundColor: s[1], data: rows.map(function (r) { return r[s[0]]; }) };
        })
      },
      options: { animation: false, responsive: true, scales: { y: { beginAtZero: true } } }
    });
    var table = document.getElementById("funnel-table");
    if (table) table.hidden = true;  // the chart shows it; the table is the no-script fallback
  }

  function draw() {
    drawFunnel();
    return drawDiagram();
  }

  var lastGood = new Date();

  // One refresh at a time: the next is scheduled only when this one has finished
  // (an overlapping, slower answer must never overwrite a newer one).
  function refresh() {
    if (document.hidden) { schedule(); return; }
    var stamp = document.getElementById("updated");
    fetch("/overview/live", { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); throw new Error("logged out"); }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        document.getElementById("live").innerHTML = html;
        return draw();
      })
      .then(function () {
        lastGood = new Date();
        stamp.textContent = "as of " + lastGood.toLocaleTimeString();
        stamp.dataset.ok = "1";
        document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
      })
      .catch(function (err) {
        stamp.textContent = "not updated since " + lastGood.toLocaleTimeString() + " (" + err.message + ")";
        stamp.dataset.ok = "0";
      })
      .then(schedule);
  }

  function schedule() { window.setTimeout(refresh, refreshMs); }

  if (window.mermaid) window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict" });
  draw().then(function () { document.body.dataset.drawn = "1"; });
  if (document.getElementById("live")) schedule();
})();
