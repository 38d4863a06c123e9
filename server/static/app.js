// TZD playground: POST /generate with stream=true, read the step events from the response body, and draw
// the canvas. Plain JS, no dependencies; every URL is relative to the page, so it works behind a path prefix.
//
// The page keeps its own canvas, one cell per generated position: a position is masked until a `step`
// event lists it in `committed` (the event's `text` alone cannot tell a placeholder from real text).
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form"), promptBox = $("prompt"), genBtn = $("generate"), stopBtn = $("stop");
const message = $("message"), canvas = $("canvas"), textBox = $("text"), copyBtn = $("copy");
const keyField = $("key-field"), keyInput = $("api_key");
const stat = {step: $("stat-step"), masked: $("stat-masked"), elapsed: $("stat-elapsed"), tps: $("stat-tps"),
              nfe: $("stat-nfe"), seed: $("stat-seed")};
const NUMBER_FIELDS = ["max_tokens", "steps", "block_length", "temperature", "threshold", "seed"];
const STATUS_WORDS = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
                      413: "Request too large", 422: "Bad request", 429: "Too many requests",
                      500: "Server error", 503: "Server unavailable"};

let run = null;  // the generation in flight: {controller, cells, started, committed, newCells, ...}
let finalText = "";

// ---- small helpers ---------------------------------------------------------------------------------

function setState(state) {
  document.body.dataset.state = state;
  const busy = state === "running";
  genBtn.disabled = busy;
  stopBtn.disabled = !busy;
  form.setAttribute("aria-busy", String(busy));
}

function say(text, kind = "info") {
  message.textContent = text;
  message.dataset.kind = kind;
  message.setAttribute("role", kind === "error" ? "alert" : "status");
}

function visible(token) {
  // a token's text as one cell shows it: whitespace made visible, nothing empty
  if (token === "") return "∅";
  return token.replace(/\r?\n/g, "↵").replace(/\t/g, "→").replace(/ /g, "·");
}

function fmtSeconds(s) { return s < 10 ? s.toFixed(2) + " s" : s.toFixed(1) + " s"; }

function clearInvalid() {
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

// ---- the request -----------------------------------------------------------------------------------

// chat mode (models with a chat template): the turns so far, sent as `messages` with the new one
const chatBox = $("chat"), historyList = $("history");
let history = [];

function chatting() { return !$("chat-field").hidden && chatBox.checked; }

function drawHistory() {
  historyList.replaceChildren(...history.map(({role, content}) => {
    const li = document.createElement("li");
    li.className = "turn " + role;
    li.textContent = content;
    return li;
  }));
  historyList.hidden = !chatting() || history.length === 0;
}

// infill mode (bidirectional models): the canvas is a gap between the prompt and a suffix
const infillBox = $("infill"), suffixBox = $("suffix");

let infillOffered = false;  // as the status last said (the field changes only when that does)

function infilling() { return !$("infill-field").hidden && infillBox.checked; }

function drawInfill() {
  const on = infilling();
  $("suffix-field").hidden = !on;
  $("max_tokens-label").textContent = on ? "Gap (tokens)" : "Max tokens";
  if (on && chatBox.checked) { chatBox.checked = false; drawHistory(); }  // one mode at a time
}

function showText(text, body) {
  // the result box: the generated text, and in infill mode the prompt and suffix around it (greyed)
  if (body.suffix === undefined) { textBox.textContent = text; return; }
  const part = (t, cls) => { const s = document.createElement("span"); s.textContent = t; s.className = cls; return s; };
  textBox.replaceChildren(part(body.prompt, "fixed"), part(text, "gap"), part(body.suffix, "fixed"));
}

function readBody() {
  // -> [body, JSON text]; the seed goes as its digits (seeds reach 2^63, past a JS number's exact integers)
  const body = chatting()
    ? {messages: [...history, {role: "user", content: promptBox.value}], stream: true, cache: $("cache").value}
    : {prompt: promptBox.value, stream: true, cache: $("cache").value};
  if (!chatting() && infilling()) body.suffix = suffixBox.value;
  for (const name of NUMBER_FIELDS) {
    const raw = $(name).value.trim();
    if (raw !== "" && name !== "seed") body[name] = Number(raw);
  }
  let json = JSON.stringify(body);
  const seed = $("seed").value.trim();
  if (/^\d+$/.test(seed)) json = json.slice(0, -1) + `,"seed":${seed}}`;
  else if (seed !== "") json = json.slice(0, -1) + `,"seed":${JSON.stringify(Number(seed))}}`;
  return [body, json];
}

function headers() {
  const h = {"Content-Type": "application/json", "Accept": "text/event-stream"};
  const key = keyInput.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  // the server's error body is {"error": {"message", "type", "param", "code"}}; say it in words
  const words = STATUS_WORDS[resp.status] || resp.statusText || "Error";
  let detail = "", param = null;
  const raw = await resp.text().catch(() => "");
  try {
    const err = JSON.parse(raw).error;
    detail = err.message;
    param = err.param;
  } catch {
    detail = raw.slice(0, 300);
  }
  let hint = "";
  if (resp.status === 401) {
    hint = keyInput.value.trim() ? " Check the API key." : " This server needs an API key: enter it above.";
    keyField.hidden = false;
  } else if (resp.status === 429 || resp.status === 503) {
    const after = resp.headers.get("Retry-After");
    if (after) hint = ` Try again in ${after} s.`;
  }
  return {text: `${resp.status} ${words}: ${detail || "(no details)"}${hint}`, param};
}

async function* sseEvents(body) {
  // text/event-stream blocks: "event: NAME\ndata: JSON\n\n"
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield {event, data: data.join("\n")};
    }
  }
}

// ---- drawing ---------------------------------------------------------------------------------------

function buildCanvas(n) {
  // every cell exists from the start (masked), so the canvas never changes size while tokens arrive
  const frag = document.createDocumentFragment();
  const cells = [];
  for (let i = 0; i < n; i++) {
    const c = document.createElement("span");
    c.className = "cell mask";
    frag.appendChild(c);
    cells.push(c);
  }
  canvas.replaceChildren(frag);
  return cells;
}

function onStep(ev) {
  for (const c of run.newCells) c.className = "cell tok";
  run.newCells = [];
  for (const t of ev.committed) {
    const c = run.cells[t.position];
    if (!c || !c.classList.contains("mask")) continue;  // never re-mask or overwrite a committed cell
    c.textContent = visible(t.text);
    const p = t.logprob == null ? "" : `, p ${Math.exp(t.logprob).toFixed(3)}`;  // its confidence when committed
    c.title = `#${t.position}: ${JSON.stringify(t.text)} (id ${t.id}${p})`;
    c.className = "cell new";
    run.newCells.push(c);
    run.committed++;
  }
  run.step = ev.step + 1;
  run.steps = ev.steps;
  run.masked = run.cells.length - run.committed;
  stat.step.textContent = `${run.step} / ${ev.steps}`;
  stat.masked.textContent = String(run.masked);
  stat.nfe.textContent = String(run.step);  // one forward pass per step (the page sends no guidance)
  showText(ev.text, run.body);
}

function onDone(res, seed, body) {
  if (body.messages) {  // the turn is kept: the next message continues the conversation
    history = [...body.messages, {role: "assistant", content: res.text}];
    promptBox.value = "";
    drawHistory();
  }
  finalText = body.suffix == null ? res.text : body.prompt + res.text + body.suffix;  // infill: the whole text
  showText(res.text, body);
  textBox.classList.add("final");
  copyBtn.disabled = false;
  for (const c of run.cells) if (c.classList.contains("mask")) c.className = "cell cut";  // cut by a stop string
  stat.step.textContent = `${res.steps} / ${run.steps ?? res.steps}`;
  stat.nfe.textContent = String(res.nfe);
  stat.seed.textContent = seed;  // the exact digits: resend them to reproduce
  stat.seed.title = seed;
  const secs = (performance.now() - run.started) / 1000;
  say(`Done: ${res.usage.completion_tokens} tokens in ${fmtSeconds(secs)}, finish: ${res.finish_reason}.`, "ok");
}

function tick() {
  if (!run) return;
  const secs = (performance.now() - run.started) / 1000;
  stat.elapsed.textContent = fmtSeconds(secs);
  stat.tps.textContent = secs > 0 && run.committed ? (run.committed / secs).toFixed(1) : "–";
  if (run.live) requestAnimationFrame(tick);
}

// ---- one generation --------------------------------------------------------------------------------

async function generate() {
  if (run && run.live) return;
  if (!form.reportValidity()) return;
  clearInvalid();
  const [body, json] = readBody();
  const n = Math.max(0, Math.floor(body.max_tokens || 0));
  run = {controller: new AbortController(), cells: buildCanvas(n), newCells: [], committed: 0, masked: n,
         step: 0, steps: null, started: performance.now(), live: true, body};
  finalText = "";
  textBox.textContent = "";
  textBox.classList.remove("final");
  copyBtn.disabled = true;
  for (const k of Object.keys(stat)) stat[k].textContent = "–";
  stat.masked.textContent = String(n);
  stat.step.textContent = "0";
  setState("running");
  say("Generating…");
  requestAnimationFrame(tick);
  pollSoon(150);
  const thisRun = run;
  let outcome = "error";
  try {
    const resp = await fetch("generate", {method: "POST", headers: headers(), body: json,
                                          signal: thisRun.controller.signal, cache: "no-store"});
    if (!resp.ok) {
      const err = await errorText(resp);
      say(err.text, "error");
      if (err.param && $(err.param)) {
        $(err.param).setAttribute("aria-invalid", "true");
        $(err.param).focus();
      }
      canvas.replaceChildren();
      return;
    }
    for await (const {event, data} of sseEvents(resp.body)) {
      const payload = JSON.parse(data);
      if (event === "step") onStep(payload);
      else if (event === "done") {
        onDone(payload, /"seed":\s*(\d+)/.exec(data)?.[1] ?? String(payload.seed), body);
        outcome = "done";
      }
      else if (event === "error") {
        say(`Generation failed: ${payload.error?.message || data}`, "error");
        outcome = "error";
      }
    }
    if (outcome !== "done" && message.dataset.kind !== "error") {
      say("The stream ended before the generation finished.", "error");
    }
  } catch (e) {
    if (e.name === "AbortError") {
      outcome = "stopped";
      say(`Stopped after ${thisRun.step} step${thisRun.step === 1 ? "" : "s"}, ${thisRun.masked} positions ` +
          "still masked.", "info");
    } else {
      say(`Network error: ${e.message}. Is the server running?`, "error");
    }
  } finally {
    thisRun.live = false;
    tick();
    if (run === thisRun) setState(outcome);
    pollSoon(300);
  }
}

function stop() {
  if (run && run.live) run.controller.abort();  // closes the connection: the server frees the slot
}

// ---- copy ------------------------------------------------------------------------------------------

async function copy() {
  try {
    await navigator.clipboard.writeText(finalText);
  } catch {
    // no clipboard API (a page served over plain http to another host): copy a selection
    const area = document.createElement("textarea");
    area.value = finalText;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  copyBtn.textContent = "Copied";
  setTimeout(() => { copyBtn.textContent = "Copy"; }, 1500);
}

// ---- the metrics strip (GET playground/status) -----------------------------------------------------

let pollTimer = null;

function pollSoon(ms) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(poll, ms);
}

async function poll() {
  if (document.hidden) return pollSoon(3000);
  try {
    const resp = await fetch("playground/status", {cache: "no-store"});
    if (!resp.ok) throw new Error(String(resp.status));
    const s = await resp.json();
    $("m-status").dataset.status = s.status;
    $("m-status").textContent = "server " + s.status;
    $("m-model").textContent = s.model;
    $("m-running").textContent = `${s.running} / ${s.max_batch_size}`;
    $("m-waiting").textContent = String(s.waiting);
    $("m-batch").textContent = s.mean_batch_size == null ? "–" : s.mean_batch_size.toFixed(2);
    $("m-steps").textContent = String(s.steps);
    if (s.auth) keyField.hidden = false;
    if (s.chat && $("chat-field").hidden) {  // first sight of a chat model: start in chat mode
      $("chat-field").hidden = false;
      chatBox.checked = true;
    }
    if (s.infill !== infillOffered) {  // a block-causal model cannot see a suffix: no infill mode
      infillOffered = s.infill;
      $("infill-field").hidden = !s.infill;
      drawInfill();
    }
    const max = s.context == null ? s.max_tokens_limit : Math.min(s.max_tokens_limit, s.context - 1);
    for (const name of ["max_tokens", "steps", "block_length"]) $(name).max = String(max);
  } catch {
    $("m-status").dataset.status = "unreachable";
    $("m-status").textContent = "server unreachable";
  }
  pollSoon(run && run.live ? 400 : 2000);
}

// ---- wiring ----------------------------------------------------------------------------------------

form.addEventListener("submit", (e) => { e.preventDefault(); generate(); });
stopBtn.addEventListener("click", stop);
copyBtn.addEventListener("click", copy);
promptBox.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    form.requestSubmit();
  }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
document.addEventListener("visibilitychange", () => { if (!document.hidden) pollSoon(0); });
form.addEventListener("input", (e) => e.target.removeAttribute?.("aria-invalid"));
chatBox.addEventListener("change", () => {
  if (chatBox.checked && infillBox.checked) { infillBox.checked = false; drawInfill(); }
  drawHistory();
});
infillBox.addEventListener("change", drawInfill);
$("chat-clear").addEventListener("click", () => { history = []; drawHistory(); promptBox.focus(); });
poll();
