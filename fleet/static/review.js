// yugami review page: polls /api/state every 2 s and draws boxes and anomaly cards.
// Plain DOM, no framework, no build step. Text from the boxes goes in with textContent only.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const LABEL_TEXT = { good: "false alarm", defect: "real defect" };
const cards = new Map(); // "device/frame_id" -> card element

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function fmt(x) {
  // three significant digits: scores and thresholds range from 1e-6 (patch distances) to about 2 (cosine)
  return typeof x === "number" ? String(Number(x.toPrecision(3))) : "–";
}

function localTime(iso) {
  const t = new Date(iso);
  return isNaN(t) ? String(iso || "") : t.toLocaleString();
}

// --- boxes and their anomaly-rate charts ---

function rateChart(rate) {
  const w = 240, h = 40, bins = rate.bins, bw = w / Math.max(bins.length, 1);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "rate");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `anomaly rate per ${rate.bin_s} s`);
  const base = document.createElementNS(SVG, "line");
  base.setAttribute("x1", 0); base.setAttribute("x2", w);
  base.setAttribute("y1", h - 0.5); base.setAttribute("y2", h - 0.5);
  base.setAttribute("class", "axis");
  svg.appendChild(base);
  bins.forEach((b, i) => {
    if (!b.frames) return;
    const bh = Math.max(1, b.rate * (h - 2));
    const r = document.createElementNS(SVG, "rect");
    r.setAttribute("x", (i * bw + 0.5).toFixed(1));
    r.setAttribute("width", Math.max(1, bw - 1).toFixed(1));
    r.setAttribute("y", (h - 1 - bh).toFixed(1));
    r.setAttribute("height", bh.toFixed(1));
    r.setAttribute("class", b.anomalies ? "bin hot" : "bin");
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${localTime(b.t)}: ${b.anomalies} of ${b.frames} frames anomalous`;
    r.appendChild(title);
    svg.appendChild(r);
  });
  return svg;
}

function drawBoxes(boxes) {
  const list = document.getElementById("boxes");
  list.replaceChildren();
  for (const b of boxes) {
    const li = el("li", "box");
    li.dataset.device = b.device;
    const state = b.online === true ? "online" : b.online === false ? "offline" : "unknown";
    const head = el("div", "box-head");
    head.append(el("span", `dot ${state}`, ""), el("b", null, b.device), el("span", `state ${state}`, state));
    const model = b.model && b.model.name ? `${b.model.name}${b.model.version ? " v" + b.model.version : ""}` : "";
    const facts = el("div", "facts",
      [model, b.threshold !== null ? `threshold ${fmt(b.threshold)}` : "", b.fps !== null ? `${b.fps} fps` : "",
       b.frames !== undefined && b.frames !== null ? `${b.anomalies}/${b.frames} anomalous` : ""]
        .filter(Boolean).join(" · "));
    const span = el("div", "span");
    const minutes = Math.round((b.rate.bins.length * b.rate.bin_s) / 60);
    span.append(el("span", null, `${minutes} min ago`), el("span", null, "now"));
    li.append(head, facts, rateChart(b.rate), span);
    list.appendChild(li);
  }
}

// --- anomaly cards ---

function scoreBar(score, threshold) {
  // The threshold sits in the middle; the bar is full at twice the threshold.
  const bar = el("div", "bar");
  const fill = el("span", "fill");
  const mark = el("span", "thr");
  if (typeof score === "number" && typeof threshold === "number" && threshold > 0) {
    fill.style.width = `${Math.min(100, (50 * score) / threshold).toFixed(1)}%`;
  }
  bar.append(fill, mark);
  return bar;
}

function newCard(a) {
  const card = el("article", "card");
  card.dataset.device = a.device;
  card.dataset.frame = a.frame_id;
  const meta = el("div", "meta");
  meta.append(el("b", "device", a.device), el("time", null, localTime(a.ts)), el("code", "frame", a.frame_id));
  const picture = el("div", "picture");
  const score = el("div", "score");
  score.append(scoreBar(a.score, a.threshold),
               el("span", "numbers", `score ${fmt(a.score)} / threshold ${fmt(a.threshold)}`));
  const model = el("div", "model",
    a.model && a.model.name ? `model ${a.model.name}${a.model.version ? " v" + a.model.version : ""}` : "");
  const actions = el("div", "actions");
  for (const label of ["good", "defect"]) {
    const button = el("button", `send ${label}`, LABEL_TEXT[label]);
    button.type = "button";
    button.dataset.label = label;
    button.addEventListener("click", () => sendFeedback(card, label));
    actions.appendChild(button);
  }
  const notes = el("ul", "notes");
  card.append(meta, picture, score, model, actions, notes);
  return card;
}

function drawPicture(card, a) {
  const picture = card.querySelector(".picture");
  const img = picture.querySelector("img");
  if (a.heatmap) {
    if (!img || img.getAttribute("src") !== a.heatmap) {
      const image = el("img", "heatmap");
      image.alt = `heat map of frame ${a.frame_id}`;
      image.src = a.heatmap;
      picture.replaceChildren(image);
    }
  } else {
    const text = a.heatmap_status === "requested" ? "heat map requested…"
      : a.heatmap_status === "waiting" ? "waiting for the heat map…" : `no heat map (${a.heatmap_status})`;
    const current = picture.querySelector(".noheat");
    if (!current || current.textContent !== text) picture.replaceChildren(el("div", "noheat", text));
  }
}

function drawNotes(card, a) {
  const notes = card.querySelector(".notes");
  const items = [];
  for (const f of a.feedback) {
    const li = el("li", `answer ${f.state}`);
    li.dataset.request = f.request_id;
    li.dataset.state = f.state;
    let text = `${LABEL_TEXT[f.label] || f.label}: `;
    if (f.state === "sent") text += "sent, waiting for the box…";
    else if (f.state === "ok") text += "the box took it";
    else text += `refused: ${(f.answer && f.answer.error) || "no reason given"}`;
    li.textContent = text;
    items.push(li);
  }
  for (const e of a.events) {
    const li = el("li", "event");
    li.dataset.event = e.event;
    // the scalar details only (the model's sha256 and nested objects stay in the JSON endpoint)
    const detail = Object.entries(e)
      .filter(([k, v]) => !["event", "ts", "frame_id"].includes(k) && v !== "" && v !== null && typeof v !== "object")
      .map(([k, v]) => `${k} ${typeof v === "number" ? fmt(v) : v}`).join(", ");
    li.textContent = `event ${e.event}${detail ? ": " + detail : ""}`;
    items.push(li);
  }
  notes.replaceChildren(...items);
  const last = a.feedback.filter((f) => f.state === "ok").pop();
  card.classList.toggle("labelled-good", !!last && last.label === "good");
  card.classList.toggle("labelled-defect", !!last && last.label === "defect");
}

function drawCards(anomalies) {
  const holder = document.getElementById("cards");
  document.getElementById("empty").hidden = anomalies.length > 0;
  const keep = new Set();
  let previous = null;
  for (const a of anomalies) {
    const key = `${a.device}/${a.frame_id}`;
    keep.add(key);
    let card = cards.get(key);
    if (!card) {
      card = newCard(a);
      cards.set(key, card);
    }
    drawPicture(card, a);
    drawNotes(card, a);
    // newest first, in the server's order; move a card only if it is out of place
    const want = previous ? previous.nextSibling : holder.firstChild;
    if (want !== card) holder.insertBefore(card, want);
    previous = card;
  }
  for (const [key, card] of cards) {
    if (!keep.has(key)) {
      card.remove();
      cards.delete(key);
    }
  }
}

// --- talking to the server ---

async function sendFeedback(card, label) {
  const buttons = card.querySelectorAll("button.send");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const response = await fetch("/api/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ device: card.dataset.device, frame_id: card.dataset.frame, label }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      card.querySelector(".notes").appendChild(el("li", "answer error", `not sent: ${body.error || response.status}`));
    }
    await poll();
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

let polling = false;

async function poll() {
  if (polling) return;
  polling = true;
  const link = document.getElementById("link");
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    const state = await response.json();
    link.textContent = state.connected ? `broker connected · ${localTime(state.now)}` : "broker lost, reconnecting…";
    link.className = state.connected ? "link up" : "link down";
    drawBoxes(state.boxes);
    drawCards(state.anomalies);
  } catch (err) {
    link.textContent = `page server unreachable (${err.message})`;
    link.className = "link down";
  } finally {
    polling = false;
  }
}

poll();
setInterval(poll, POLL_MS);
