// Client side of the user study: consent, per-comparison answers, navigation.
// The server validates everything again; this file only keeps raters from sending incomplete pages.
(function () {
  "use strict";

  var RATER_KEY = "userstudy.rater_id";
  var ANSWERS_PREFIX = "userstudy.answers.";

  function showError(el, message) {
    el.textContent = message;
    el.hidden = false;
  }

  function postJSON(url, body) {
    return fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      credentials: "same-origin",
      body: JSON.stringify(body),
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        if (!response.ok) {
          throw new Error(data.error || ("server answered " + response.status));
        }
        return data;
      });
    });
  }

  function initConsent(form) {
    var error = document.getElementById("consent-error");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      error.hidden = true;
      if (!document.getElementById("consent").checked) {
        showError(error, "Please tick the consent box to take part.");
        return;
      }
      var code = document.getElementById("participant-code").value.trim();
      var body = code ? { rater_id: code } : {};
      postJSON("api/session", body).then(function (data) {
        sessionStorage.setItem(RATER_KEY, data.rater_id);
        window.location.href = form.dataset.firstPage;
      }).catch(function (err) { showError(error, err.message); });
    });
  }

  function initComparison(form) {
    var error = document.getElementById("form-error");
    var cid = form.dataset.comparisonId;
    var rater = sessionStorage.getItem(RATER_KEY);
    if (!rater) {
      showError(error, "Please start at the first page and accept the consent form.");
      document.getElementById("submit").disabled = true;
      return;
    }
    // Restore this page's earlier answers when the rater comes back with "Previous".
    var saved = JSON.parse(sessionStorage.getItem(ANSWERS_PREFIX + cid) || "{}");
    Object.keys(saved).forEach(function (criterion) {
      var input = form.querySelector('input[name="' + criterion + '"][value="' + saved[criterion] + '"]');
      if (input) { input.checked = true; }
    });
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      error.hidden = true;
      var answers = {};
      var missing = [];
      form.querySelectorAll("fieldset.question").forEach(function (fieldset) {
        var criterion = fieldset.dataset.criterion;
        var checked = fieldset.querySelector("input:checked");
        if (checked) { answers[criterion] = checked.value; } else { missing.push(fieldset.querySelector("legend").textContent); }
      });
      if (missing.length) {
        showError(error, "Please answer: " + missing.join(", ") + ".");
        return;
      }
      var button = document.getElementById("submit");
      button.disabled = true;
      postJSON("api/answers", { rater_id: rater, comparison_id: cid, answers: answers }).then(function () {
        sessionStorage.setItem(ANSWERS_PREFIX + cid, JSON.stringify(answers));
        window.location.href = form.dataset.nextPage;
      }).catch(function (err) {
        button.disabled = false;
        showError(error, "Your answers were not saved: " + err.message);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var consent = document.getElementById("consent-form");
    if (consent) { initConsent(consent); }
    var comparison = document.getElementById("comparison-form");
    if (comparison) { initComparison(comparison); }
    var code = document.getElementById("rater-code");
    if (code) { code.textContent = sessionStorage.getItem(RATER_KEY) || "(none)"; }
  });
})();
