// Live countdowns: every <time class="countdown" datetime="...Z"> shows the
// time left until its instant, by this browser's clock, once a second. The
// server's figure stays in place when JavaScript is off.
(function () {
  "use strict";
  function pad(n) { return n < 10 ? "0" + n : String(n); }
  function left(ms) {
    if (ms <= 0) { return "due now"; }
    var s = Math.floor(ms / 1000);
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60), sec = s % 60;
    return (d ? d + "d " : "") + pad(h) + ":" + pad(m) + ":" + pad(sec);
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("time.countdown").forEach(function (el) {
      el.textContent = left(Date.parse(el.getAttribute("datetime")) - now);
    });
  }
  // The new-release form: show the instant both ways as the user types.
  function watchInstant() {
    var out = document.getElementById("instant");
    var day = document.getElementById("publish_on");
    if (!out || !day) { return; }
    var at = document.getElementById("at"), zone = document.getElementById("zone");
    function update() {
      if (!day.value) { return; }
      var q = new URLSearchParams({publish_on: day.value, at: at.value, zone: zone.value});
      fetch("/instant?" + q.toString(), {credentials: "same-origin"})
        .then(function (r) { return r.json(); })
        .then(function (data) {
          out.textContent = data.text ? "Publishes " + data.text : data.error;
          out.className = data.text ? "instant" : "instant check-error";
        })
        .catch(function () {});
    }
    [day, at, zone].forEach(function (el) { el.addEventListener("input", update); });
    update();
  }
  // A release page that is about to change (queued, publishing, notices
  // pending) reloads itself just after the instant, then every 5 seconds.
  function watchRelease() {
    var el = document.getElementById("watch");
    if (!el) { return; }
    var due = Date.parse(el.getAttribute("data-instant")) + 1000 - Date.now();
    setTimeout(function () { location.reload(); }, Math.min(Math.max(due, 5000), 60000));
  }
  document.addEventListener("DOMContentLoaded", function () {
    tick();
    setInterval(tick, 1000);
    watchInstant();
    watchRelease();
  });
})();
