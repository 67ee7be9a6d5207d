// The dashboard of `strata serve`: polls GET /admin/status, draws the nodes and the
// layer map, drains and undrains nodes, and streams a chat from the OpenAI API.
// Everything a worker or the model sends is put into the page as text, never as
// HTML: a node's name is chosen by whoever runs the worker.
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "strata-key";
const PALETTE = ["#4f6bed", "#2e9d8f", "#d2543a", "#8a55c9", "#c9941c", "#3d8fd6", "#b8457f", "#5c8a2e"];

const $ = (id) => document.getElementById(id);
let key = localStorage.getItem(KEY_STORE) || "";
let modelId = null;
let colours = new Map();
const chatHistory = [];

// Builds an element: el("div", {class: "x"}, child, "text", ...).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "style") Object.assign(node.style, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}

const fixed = (n, digits) => (n === null || n === undefined ? "–" : Number(n).toFixed(digits));

// A node keeps its colour while the page is open, in the order nodes first appear.
function colour(name) {
  if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
  return colours.get(name);
}

function say(text, isError) {
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = !text;
}

// Asks for the key (admin key for status and drains; it is accepted by the API too).
function askForKey(why) {
  $("key-why").textContent = why;
  $("key-form").hidden = false;
  document.body.dataset.needsKey = "yes";
}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options) {
  const headers = Object.assign({}, (options && options.headers) || {});
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON */ }
    if (response.status === 401) askForKey(message);
    throw new HttpError(response.status, message);
  }
  return response;
}

const post = (path, body) =>
  api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

// ---- the cluster ----

function drawFigures(s) {
  $("model").textContent = s.model;
  $("tokens-per-second").textContent = fixed(s.measured_tokens_per_second, 1);
  $("predicted").textContent = fixed(s.predicted_tokens_per_second, 1);
  $("in-flight").textContent = s.in_flight;
  const queued = s.admission ? s.admission.queue.length : 0;
  $("waiting").textContent = s.waiting + queued;
  const why = s.waiting_reason || (queued ? s.admission.reason : null);
  const reason = $("waiting-reason");
  reason.textContent = why || "";
  reason.hidden = !why;
}

// The layer map: a bar from layer 0 to N, a segment per node of the pipeline, and
// the layers nobody holds (while there is no pipeline) left grey.
function drawLayerMap(s) {
  const held = s.nodes
    .filter((n) => n.layers && n.state !== "gone")
    .sort((a, b) => a.layers[0] - b.layers[0]);
  const segments = [];
  let next = 0;
  const unheld = (from, to) =>
    el("div", { class: "segment unheld", style: { flexGrow: to - from }, title: `layers ${from}–${to - 1}: held by nobody` }, "none");
  for (const n of held) {
    const [start, end] = n.layers;
    if (start > next) segments.push(unheld(next, start));
    segments.push(
      el("div", {
        class: "segment",
        "data-node": n.name,
        "data-start": start,
        "data-end": end,
        title: `${n.name}: layers ${start}–${end - 1}`,
        style: { flexGrow: end - start, background: colour(n.name) },
      }, `${n.name} ${start}–${end - 1}`),
    );
    next = Math.max(next, end);
  }
  if (next < s.layers) segments.push(unheld(next, s.layers));
  $("layer-map").replaceChildren(...segments);
  $("layer-count").textContent = `${s.layers} in all`;
  $("layer-end").textContent = String(s.layers);
}

function memoryBar(n) {
  const total = Math.max(n.memory_offered_bytes, n.memory_used_bytes, 1);
  const kv = Math.min(n.kv_cache_bytes || 0, n.memory_used_bytes);
  const weights = n.memory_used_bytes - kv;
  const share = (x) => `${((100 * x) / total).toFixed(2)}%`;
  return [
    el("div", { class: "memory", title: `${bytes(n.memory_used_bytes)} of ${bytes(n.memory_offered_bytes)}` },
      el("div", { class: "weights", style: { width: share(weights) } }),
      el("div", { class: "kv", style: { width: share(kv) } })),
    el("div", { class: "legend" },
      el("i", { class: "weights" }), `weights ${bytes(weights)}`,
      el("i", { class: "kv" }), `KV ${bytes(kv)}`,
      el("i", { class: "free" }), `free ${bytes(Math.max(0, n.memory_offered_bytes - n.memory_used_bytes))}`),
  ];
}

function nodeCard(n) {
  const rows = [
    ["address", n.address],
    ["devices", n.devices.join(", ") || "–"],
    ["layers", n.layers ? `${n.layers[0]}–${n.layers[1] - 1} (stage ${n.stage})` : "none"],
    ["sequences", n.sequences],
    ["step", `${fixed(n.measured_step_ms, 1)} ms measured, ${fixed(n.predicted_step_ms, 1)} ms planned`],
    ["tokens/s", fixed(n.measured_tokens_per_second, 1)],
  ];
  for (const p of n.pulls || []) {
    rows.push(["pulling", `layers ${p.layers[0]}–${p.layers[1] - 1}: ${bytes(p.bytes_done)} of ${bytes(p.bytes_total)}`]);
  }
  for (const l of n.links || []) {
    const rtt = l.rtt_ms === null || l.rtt_ms === undefined ? "round trip –" : `${l.rtt_ms.toFixed(2)} ms round trip`;
    const lane = l.local_lane ? ", over a local lane" : "";
    rows.push([`link → ${l.to}`, `${rtt}, ${bytes(l.bytes_sent)} sent${lane}`]);
  }
  if (n.events_local_lane) rows.push(["events → coordinator", "over a local lane"]);
  if (n.reason) rows.push(["why", n.reason]);
  let action = null;
  if (n.state === "ready") {
    action = el("button", { class: "drain", type: "button", "data-node": n.name }, "Drain");
    action.addEventListener("click", () => drain(n.name, action));
  } else if (n.state === "draining") {
    action = el("button", { class: "undrain", type: "button", "data-node": n.name }, "Undrain");
    action.addEventListener("click", () => undrain(n.name, action));
  }
  return el("div", { class: "node", "data-node": n.name, "data-state": n.state, style: { borderLeftColor: colour(n.name) } },
    el("div", { class: "node-head" },
      el("span", { class: "node-name" }, n.name),
      el("span", { class: `state ${n.state}` }, n.state),
      action),
    el("dl", {}, rows.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    memoryBar(n));
}

function drawNodes(s) {
  $("nodes").replaceChildren(...s.nodes.map(nodeCard));
}

async function drain(name, button) {
  button.disabled = true;
  try {
    const report = await (await post("/admin/drain", { node: name, wait: false })).json();
    say(`${name} drains: its requests move to the other nodes`);
  } catch (e) {
    say(`drain ${name}: ${e.message}`, true);
  }
  poll();
}

async function undrain(name, button) {
  button.disabled = true;
  try {
    const reply = await (await post("/admin/undrain", { node: name })).json();
    say(reply.message || `${name} is back`);
  } catch (e) {
    say(`undrain ${name}: ${e.message}`, true);
  }
  poll();
}

let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  try {
    const s = await (await api("/admin/status")).json();
    drawFigures(s);
    drawLayerMap(s);
    drawNodes(s);
    $("connection").textContent = `${s.transport || ""} · updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.nodes = String(s.nodes.length);
  } catch (e) {
    if (e.status === 404) {
      // `strata serve-local`: one process, no cluster to show.
      $("connection").textContent = "one process: no cluster";
      $("layers").hidden = true;
      $("node-section").hidden = true;
    } else {
      $("connection").textContent = `cannot read the status: ${e.message}`;
    }
  } finally {
    polling = false;
  }
}

// ---- chat ----

async function model() {
  if (!modelId) {
    const list = await (await api("/v1/models")).json();
    modelId = list.data[0].id;
  }
  return modelId;
}

// Reads an OpenAI server-sent event stream, calling `onDelta` with each piece of text.
async function readEvents(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) onDelta(delta.content);
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  const log = $("chat-log");
  log.append(el("div", { class: "bubble user" }, text));
  const answer = el("div", { class: "bubble assistant" });
  log.append(answer);
  chatHistory.push({ role: "user", content: text });
  $("chat-send").disabled = true;
  document.body.dataset.chat = "streaming";
  let chunks = 0;
  try {
    const response = await post("/v1/chat/completions", {
      model: await model(),
      messages: chatHistory,
      // No max_tokens: the answer may run to the end of the context.
      stream: true,
    });
    await readEvents(response, (piece) => {
      chunks += 1;
      answer.textContent += piece;
      answer.dataset.chunks = String(chunks);
      log.scrollTop = log.scrollHeight;
    });
    chatHistory.push({ role: "assistant", content: answer.textContent });
    document.body.dataset.chat = "done";
  } catch (e) {
    answer.classList.add("error");
    answer.textContent += `\n${e.message}`;
    chatHistory.pop();
    document.body.dataset.chat = "failed";
  } finally {
    $("chat-send").disabled = false;
  }
}

// ---- start ----

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  localStorage.setItem(KEY_STORE, key);
  $("key-form").hidden = true;
  document.body.dataset.needsKey = "no";
  say("");
  poll();
});
$("chat-form").addEventListener("submit", sendChat);
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) sendChat(event);
});
poll();
setInterval(poll, POLL_MS);
