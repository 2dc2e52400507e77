"""The web app's HTML templates, style sheet and script, kept in Python so the package
ships them without package-data rules and the app needs no front-end build step.

Templates are rendered by Jinja2 with autoescaping on: every model text, prompt, name
and guideline goes through it. The script reads only data attributes the server wrote
and never builds HTML from text (it uses ``textContent``), so model output stays text.
"""

from __future__ import annotations

from functools import cache

DEFAULT_GUIDELINES = """\
Read the prompt, then the responses.
Pairwise: pick the better response (A or B), or Tie when they are equally good, or
Can't tell when you cannot judge. Set the strength (1 slightly better ... 4 much better).
Ranking: order the responses from best (top) to worst.
Prefer responses that are correct, helpful and harmless, in that order.
Flag harmful or unhelpful content, and mark "unsure" when you are guessing.
"""

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}fastrlhf feedback{% endblock %}</title>
<link rel="stylesheet" href="/static/app.css"></head>
<body>{% block body %}{% endblock %}<script src="/static/app.js"></script></body></html>
"""

_LOGIN = """{% extends "base.html" %}{% block title %}Sign in{% endblock %}{% block body %}
<main class="narrow"><h1>Sign in to label</h1>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<form method="post" action="/login">
<label>Name <input name="name" id="name" value="{{ name or '' }}" autofocus required></label>
<label>Token <input name="token" id="token" type="password" required></label>
<button type="submit" id="signin">Sign in</button>
</form>
<p class="hint">Your token comes from <code>fastrlhf feedback annotator add</code>.</p>
</main>{% endblock %}
"""

_HEADER = """<header>
<span>Signed in as <b id="who">{{ name }}</b></span>
<progress id="progress" value="{{ progress.done }}"
  max="{{ [progress.done + progress.remaining, 1] | max }}"></progress>
<span id="progress-text">{{ progress.done }} done, {{ progress.remaining }} left</span>
<button id="undo" type="button" title="Undo your last vote">Undo (U)</button>
<a href="/guidelines" target="_blank" rel="noopener">Guidelines</a>
<form method="post" action="/logout" class="inline"><button type="submit">Sign out</button></form>
</header>"""

_LABEL = (
    """{% extends "base.html" %}{% block title %}Label {{ item.id }}{% endblock %}
{% block body %}"""
    + _HEADER
    + """
<main id="task" data-item="{{ item.id }}" data-kind="{{ kind }}" data-vote-id="{{ vote_id }}">
<details id="guidelines"><summary>Guidelines (G)</summary>
<pre class="text">{{ guidelines }}</pre></details>
<section class="prompt"><h2>Prompt</h2><pre class="text" id="prompt">{{ item.prompt }}</pre>
</section>
{% if kind == "pair" %}
<section class="pair">
{% for letter, text in shown %}<article class="response" id="response-{{ letter }}">
<h3>{{ letter }}</h3><pre class="text">{{ text }}</pre></article>
{% endfor %}</section>
<div class="choices">
<button type="button" data-choice="A" id="choose-A">A is better (A / &larr;)</button>
<button type="button" data-choice="B" id="choose-B">B is better (B / &rarr;)</button>
<button type="button" data-choice="tie" id="choose-tie">Tie (T)</button>
<button type="button" data-choice="cant_tell" id="choose-cant">Can't tell (C)</button>
</div>
{% else %}
<p class="hint">Order the responses from best (top) to worst: drag a row by its handle,
use its &#9650;&#9660; buttons, or select it with &uarr;/&darr; and move it with
Shift+&uarr;/&darr;. Enter submits.</p>
<ol id="ranking">
{% for letter, text in shown %}<li class="rank-row" tabindex="0" data-pos="{{ loop.index0 }}"
 id="row-{{ letter }}"><span class="handle" title="drag to move">&#10303; {{ letter }}</span>
<pre class="text">{{ text }}</pre><span class="moves">
<button type="button" class="up" aria-label="move {{ letter }} up">&#9650;</button>
<button type="button" class="down" aria-label="move {{ letter }} down">&#9660;</button></span>
</li>
{% endfor %}</ol>
<div class="choices">
<button type="button" id="submit-ranking">Submit ranking (Enter)</button>
<button type="button" data-choice="cant_tell" id="choose-cant">Can't tell (C)</button>
</div>
{% endif %}
<fieldset class="strength"><legend>Strength of preference (keys 1-{{ max_strength }})</legend>
{% for s in range(1, max_strength + 1) %}<label><input type="radio" name="strength"
 value="{{ s }}" id="strength-{{ s }}"> {{ s }}</label>
{% endfor %}</fieldset>
<fieldset class="flags"><legend>Flags (H harmful, N unhelpful, I incorrect, S unsure,
O other)</legend>
{% for f in flags %}<label><input type="checkbox" name="flag" value="{{ f }}"
 id="flag-{{ f }}"> {{ f }}</label>
{% endfor %}</fieldset>
<label class="note">Note <textarea id="note" rows="2"></textarea></label>
<p id="status" role="status"></p>
</main>{% endblock %}
"""
)

_DONE = (
    """{% extends "base.html" %}{% block title %}All done{% endblock %}{% block body %}"""
    + _HEADER
    + """
<main class="narrow" id="done"><h1>All done</h1>
<p>Nothing is left in your queue. Thank you! Press U to undo your last vote.</p>
<p id="status" role="status"></p></main>{% endblock %}
"""
)

_GUIDELINES = """{% extends "base.html" %}{% block title %}Guidelines{% endblock %}
{% block body %}<main class="narrow"><h1>Labeling guidelines</h1>
<pre class="text">{{ guidelines }}</pre><p><a href="/label">Back to labeling</a></p></main>
{% endblock %}
"""

TEMPLATES = {
    "base.html": _BASE,
    "login.html": _LOGIN,
    "label.html": _LABEL,
    "done.html": _DONE,
    "guidelines.html": _GUIDELINES,
}

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
header { display: flex; gap: 1em; align-items: center; padding: .5em 1em; background: #fff;
  border-bottom: 1px solid #ddd; flex-wrap: wrap; }
header progress { width: 12em; }
form.inline { display: inline; }
main { padding: 1em; max-width: 1200px; margin: auto; }
main.narrow { max-width: 40em; }
.text { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace;
  background: #fff; border: 1px solid #ddd; padding: .6em; margin: 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.response h3 { margin: .3em 0; }
.choices { margin: 1em 0; display: flex; gap: .5em; flex-wrap: wrap; }
.choices button { font-size: 1.05em; padding: .5em 1em; }
#ranking { padding-left: 1.5em; }
.rank-row { display: flex; gap: .6em; align-items: flex-start; margin: .3em 0; padding: .3em;
  background: #fff; border: 2px solid #ddd; }
.rank-row:focus { border-color: #36c; outline: none; }
.rank-row.dragging { opacity: .6; border-style: dashed; }
.rank-row .text { flex: 1; border: 0; }
.handle { cursor: grab; user-select: none; font-weight: bold; padding: .2em; touch-action: none; }
fieldset { display: inline-block; margin: .3em 1em .3em 0; }
.note textarea { width: 100%; }
.error { color: #b00; font-weight: bold; }
.hint { color: #555; }
label { margin-right: .6em; }
form label { display: block; margin: .6em 0; }
"""

JS = r"""
"use strict";
(function () {
  const task = document.getElementById("task");
  const status = document.getElementById("status");
  const started = Date.now();
  let busy = false;

  function say(msg, isError) {
    if (status) { status.textContent = msg; status.className = isError ? "error" : ""; }
  }

  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
    return data;
  }

  async function undo() {
    if (busy) return;
    busy = true;
    try {
      const d = await post("/api/undo");
      if (!d.undone) { say("nothing to undo"); busy = false; return; }
      location.reload();
    } catch (e) { say(e.message, true); busy = false; }
  }
  const undoButton = document.getElementById("undo");
  if (undoButton) undoButton.addEventListener("click", undo);

  function typing(e) {
    const t = e.target;
    return t && t.closest && t.closest("textarea, input[type=text], input[type=password]");
  }
  if (!task) {  // the "all done" page: only undo
    document.addEventListener("keydown", function (e) {
      if (!typing(e) && (e.key === "u" || e.key === "U")) undo();
    });
    return;
  }

  function extras() {
    const s = document.querySelector('input[name="strength"]:checked');
    const flags = Array.from(document.querySelectorAll('input[name="flag"]:checked'))
      .map(function (x) { return x.value; });
    const note = document.getElementById("note").value;
    const out = {flags: flags, time_ms: Date.now() - started};
    if (s) out.strength = parseInt(s.value, 10);
    if (note.trim()) out.note = note;
    return out;
  }

  async function submit(fields) {
    if (busy) return;
    busy = true;
    say("saving...");
    const body = Object.assign(
      {vote_id: task.dataset.voteId, item_id: task.dataset.item}, fields, extras());
    try { await post("/api/votes", body); location.reload(); }
    catch (e) { say(e.message, true); busy = false; }
  }
  document.querySelectorAll("[data-choice]").forEach(function (b) {
    b.addEventListener("click", function () { submit({choice: b.dataset.choice}); });
  });

  const list = document.getElementById("ranking");
  function rows() { return Array.from(list.querySelectorAll(".rank-row")); }
  function move(row, delta) {
    if (delta < 0 && row.previousElementSibling) list.insertBefore(row, row.previousElementSibling);
    else if (delta > 0 && row.nextElementSibling) list.insertBefore(row.nextElementSibling, row);
    row.focus();
  }
  function submitRanking() {
    submit({ranking: rows().map(function (r) { return parseInt(r.dataset.pos, 10); })});
  }
  if (list) {
    list.addEventListener("click", function (e) {
      const b = e.target.closest("button");
      if (b) move(b.closest(".rank-row"), b.classList.contains("up") ? -1 : 1);
    });
    // drag a row by its handle (pointer events: mouse, pen and touch alike)
    let dragging = null;
    list.addEventListener("pointerdown", function (e) {
      const h = e.target.closest(".handle");
      if (!h) return;
      dragging = h.closest(".rank-row");
      dragging.classList.add("dragging");
      e.preventDefault();
    });
    document.addEventListener("pointermove", function (e) {
      if (!dragging) return;
      const over = document.elementFromPoint(e.clientX, e.clientY);
      const row = over && over.closest(".rank-row");
      if (!row || row === dragging || row.parentNode !== list) return;
      const box = row.getBoundingClientRect();
      const above = e.clientY < box.top + box.height / 2;
      list.insertBefore(dragging, above ? row : row.nextElementSibling);
    });
    document.addEventListener("pointerup", function () {
      if (!dragging) return;
      dragging.classList.remove("dragging");
      dragging.focus();
      dragging = null;
    });
    document.getElementById("submit-ranking").addEventListener("click", submitRanking);
    rows()[0].focus();
  }

  const flagKeys = {h: "harmful", n: "unhelpful", i: "incorrect", s: "unsure", o: "other"};
  document.addEventListener("keydown", function (e) {
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key;
    const lower = k.length === 1 ? k.toLowerCase() : k;
    if (task.dataset.kind === "pair") {
      const choice = {a: "A", ArrowLeft: "A", b: "B", ArrowRight: "B", t: "tie"}[lower];
      if (choice) { e.preventDefault(); submit({choice: choice}); return; }
    } else {
      const active = document.activeElement;
      const row = active && active.closest ? active.closest(".rank-row") : null;
      if (k === "ArrowUp" || k === "ArrowDown") {
        e.preventDefault();
        const r = row || rows()[0];
        if (e.shiftKey) move(r, k === "ArrowUp" ? -1 : 1);
        else (k === "ArrowUp" ? r.previousElementSibling || r : r.nextElementSibling || r).focus();
        return;
      }
      if (k === "Enter") { e.preventDefault(); submitRanking(); return; }
    }
    if (lower === "c") { submit({choice: "cant_tell"}); return; }
    if (lower === "u") { undo(); return; }
    if (lower === "g") {
      const d = document.getElementById("guidelines");
      d.open = !d.open;
      return;
    }
    if (k >= "1" && k <= "4" && k.length === 1) {
      const r = document.getElementById("strength-" + k);
      if (r) r.checked = true;
      return;
    }
    const box = flagKeys[lower] && document.getElementById("flag-" + flagKeys[lower]);
    if (box) box.checked = !box.checked;
  });
})();
"""

STATIC = {
    "app.css": (CSS, "text/css"),
    "app.js": (JS, "text/javascript"),
}


@cache
def _env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.DictLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )


def render(template: str, **context) -> str:
    return _env().get_template(template).render(**context)
