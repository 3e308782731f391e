// The dashboard's live part: poll /status, update state and progress in place, and reload the
// page's content (server-rendered, escaped) when a job finished, the queue changed or a project
// appeared. Only textContent and attributes are set from JSON; HTML comes from the server.
"use strict";

const POLL_MS = 2000;
const STAGES = {
  fetching: "reading tasks and images from Label Studio",
  pretraining: "learning from the project's unlabeled images (self-supervised)",
  training: "training",
  predicting: "predicting every task",
  pushing: "pushing predictions to Label Studio",
};
const FINE_TUNING = "fine-tuning the whole network (the head version is live meanwhile)";

function signature(p) {
  const last = (p.history && p.history.length) ? p.history[0].job_id : "";
  const top = (p.queue_top || []).map((t) => t.task_id).join(",");
  const pre = p.pretraining || {};
  const epoch = (pre.progress || {}).epoch || "";
  return [p.state, p.model_version || "", last || "", top, `${pre.state || ""}${epoch}`].join("|");
}

function progressWords(p) {
  const g = p.progress || {};
  if (p.state !== "running") return ["", null];
  let words = STAGES[g.stage] || g.stage || "starting";
  if (g.stage === "training" && g.fine_tune) words = FINE_TUNING;
  let fraction = null;
  if (g.stage === "training" && g.epochs) {
    words += `: epoch ${g.epoch || 0} of ${g.epochs}`;
    if (g.loss != null) words += `, loss ${g.loss.toFixed(3)}`;
    if (g.val_accuracy != null) words += `, validation accuracy ${Math.round(g.val_accuracy * 100)}%`;
    fraction = (g.epoch || 0) / g.epochs;
  } else if (g.stage === "pretraining" && g.epoch) {
    words += `: epoch ${g.epoch}, ${Math.round(g.seconds_left || 0)} s left`;
    if (g.budget_s) fraction = Math.max(0, 1 - (g.seconds_left || 0) / g.budget_s);
  } else if (g.stage === "predicting" && g.total) {
    words += `: ${g.done || 0} of ${g.total} tasks`;
    fraction = (g.done || 0) / g.total;
  } else if (g.stage === "pushing" && g.total) {
    words += `: ${g.total} predictions`;
  }
  return [words, fraction];
}

function updateProject(section, p) {
  const field = (name) => section.querySelector(`[data-field="${name}"]`);
  const state = field("state");
  state.textContent = p.state;
  state.className = `state state-${p.state}`;
  field("model_version").textContent = p.model_version || "none yet";
  const [words, fraction] = progressWords(p);
  field("live").hidden = p.state !== "running";
  field("progress").textContent = words;
  const bar = field("fraction");
  if (fraction == null) bar.removeAttribute("value");
  else bar.value = Math.max(0, Math.min(1, fraction));
}

function updateConnection(c) {
  if (!c) return;
  const el = document.getElementById("connection");
  el.dataset.state = c.state;
  el.className = `connection state-${c.state.replace(" ", "-")}`;
  el.querySelector(".connection-state").textContent = c.state;
  el.querySelector(".connection-message").textContent =
    c.state !== "ok" ? c.message : (c.user ? `as ${c.user}` : "");
}

async function reloadContent() {
  const reply = await fetch(window.location.pathname, { credentials: "same-origin" });
  if (!reply.ok) return;
  const doc = new DOMParser().parseFromString(await reply.text(), "text/html");
  const fresh = doc.getElementById("projects");
  if (fresh) document.getElementById("projects").replaceWith(fresh);
}

async function poll() {
  try {
    const reply = await fetch("/status?history=1", { credentials: "same-origin" });
    if (reply.ok) {
      const body = await reply.json();
      updateConnection(body.label_studio);
      const main = document.getElementById("projects");
      const ids = Object.keys(body.projects).sort((a, b) => a - b).join(",");
      let stale = ids !== main.dataset.ids;
      for (const [id, p] of Object.entries(body.projects)) {
        const section = document.getElementById(`project-${id}`);
        if (!section) continue;
        updateProject(section, p);
        if (section.dataset.signature !== signature(p)) stale = true;
      }
      if (stale) await reloadContent();
      document.getElementById("updated").textContent = new Date().toLocaleString();
    }
  } catch (err) {
    // Network hiccup or a restart: try again at the next tick.
  }
  window.setTimeout(poll, POLL_MS);
}

window.setTimeout(poll, POLL_MS);
