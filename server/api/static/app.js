// llada-serve playground: chats through /v1/chat/completions with
// stream_options.include_denoising and draws every denoising step on a canvas
// of boxes (masked positions grey, committed tokens coloured by confidence).
// Plain browser JavaScript: no build step, nothing loaded from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    log: $("log"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    clear: $("clear"), error: $("error"), model: $("model"), stats: $("stats"), canvas: $("canvas"),
    replay: $("replay"), replayOut: $("replay-out"), answer: $("answer"), apiKey: $("api-key"),
    remasking: $("remasking"), examples: $("examples"), demoNote: $("demo-note"),
  };
  const KNOBS = [  // [element id, request field, kind]
    ["max-tokens", "max_tokens", "int"], ["steps", "steps", "int"], ["block-length", "block_length", "int"],
    ["temperature", "temperature", "float"], ["seed", "seed", "int"], ["threshold", "threshold", "float"],
    ["factor", "factor", "float"], ["remasking", "remasking", "str"], ["decoding", "decoding", "str"],
  ];
  const PREBUILD_MAX = 4096;  // largest canvas drawn before the server's first step confirms it
  const history = [];  // the conversation sent with every request: [{role, content}]
  let shown = null;  // the trace on the canvas
  let controller = null;  // aborts the running request

  // -- requests -------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function requestFields() {
    const body = {};
    for (const [id, field, kind] of KNOBS) {
      const el = $(id);
      if (!el || el.closest("[hidden]")) continue;
      const raw = el.value.trim();
      if (raw === "") continue;
      if (kind === "str") { body[field] = raw; continue; }
      const value = Number(raw);
      if (!Number.isFinite(value) || (kind === "int" && !Number.isInteger(value))) {
        throw new Error(`${field}: expected ${kind === "int" ? "a whole number" : "a number"}, got "${raw}"`);
      }
      body[field] = value;
    }
    return body;
  }

  async function errorMessage(resp) {
    let msg = `HTTP ${resp.status}`;
    try { msg = (await resp.json()).error.message || msg; } catch (_) { /* not our error body */ }
    if (resp.status === 401) msg += ". Enter the server's API key under Diffusion settings.";
    return msg;
  }

  async function readEvents(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data) continue;
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        onData(obj);
      }
    }
  }

  // -- the canvas -----------------------------------------------------------------
  function newTrace(genLength, blockLength) {
    return { genLength, blockLength, events: [], text: "", usage: null, finish: null,
             started: performance.now(), seconds: 0, live: true, boxes: [], blocks: [] };
  }

  function display(text) {
    if (text == null) return { label: "?", special: false };
    const special = /^<\|.+\|>$/.test(text);
    if (special) return { label: text.slice(2, -2), special };
    if (text === "") return { label: "\u2205", special };
    // Whitespace and control characters get visible stand-ins (a lone space: the open box).
    let label = text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5")
      .replace(/[\u0000-\u001f\u007f]/g, (ch) => String.fromCharCode(0x2400 + Math.min(ch.charCodeAt(0), 0x21)));
    label = label.trim() === "" ? label.replace(/ /g, "\u2423") : label.replace(/ /g, "\u00a0");
    return { label, special };
  }

  function confClass(c) {
    if (c == null) return "conf-unknown";
    return c >= 0.9 ? "conf-high" : c >= 0.5 ? "conf-mid" : "conf-low";
  }

  function buildCanvas(trace) {
    els.canvas.replaceChildren();
    trace.boxes = [];
    trace.blocks = [];
    const size = Math.max(1, trace.blockLength || trace.genLength);
    for (let start = 0; start < trace.genLength; start += size) {
      const group = document.createElement("div");
      group.className = "block";
      for (let p = start; p < Math.min(start + size, trace.genLength); p++) {
        const box = document.createElement("span");
        group.append(box);
        trace.boxes.push(box);
      }
      trace.blocks.push(group);
      els.canvas.append(group);
    }
    paint(trace, 0);
  }

  function setBox(box, pos, c, step, newest) {
    if (!c) {
      box.className = "tok masked";
      box.textContent = "";
      box.title = `position ${pos}: masked`;
      return;
    }
    const { label, special } = display(c.text);
    box.className = `tok committed ${confClass(c.confidence)}${special ? " special" : ""}${newest ? " newest" : ""}`;
    box.textContent = label;
    const conf = c.confidence == null ? "unknown" : c.confidence.toFixed(2);
    box.title = `position ${pos}: ${JSON.stringify(c.text)}, confidence ${conf}, step ${step}`;
  }

  // The canvas after the first k steps of the trace.
  function paint(trace, k) {
    const state = new Array(trace.genLength).fill(null);
    const stepOf = new Array(trace.genLength).fill(0);
    for (let i = 0; i < k; i++) {
      for (const c of trace.events[i].committed) { state[c.position] = c; stepOf[c.position] = i + 1; }
    }
    trace.boxes.forEach((box, p) => setBox(box, p, state[p], stepOf[p], k > 0 && stepOf[p] === k));
    const ev = k > 0 ? trace.events[k - 1] : null;
    const current = ev ? ev.block : (trace.live ? 0 : -1);
    trace.blocks.forEach((g, b) => g.classList.toggle("current", b === current));
    const committed = state.filter(Boolean).length;
    els.canvas.setAttribute("aria-label", `The canvas: ${trace.genLength} positions, ${committed} committed, `
      + `${trace.genLength - committed} masked, after step ${k} of ${trace.events.length}`);
  }

  function applyEvent(trace, ev) {  // live: one more step on top of what is drawn
    if (trace.events.length === 1) {  // the first step tells the real geometry (defaults may apply)
      const blockLength = ev.block_range[1] - ev.block_range[0];
      if (ev.gen_length !== trace.genLength || blockLength !== trace.blockLength) {
        trace.genLength = ev.gen_length;
        trace.blockLength = blockLength;
        buildCanvas(trace);
      }
    }
    for (const box of els.canvas.querySelectorAll(".newest")) box.classList.remove("newest");
    for (const c of ev.committed) setBox(trace.boxes[c.position], c.position, c, ev.step, true);
    trace.blocks.forEach((g, b) => g.classList.toggle("current", b === ev.block));
  }

  function describe(trace, k) {
    const ev = k > 0 ? trace.events[k - 1] : null;
    const n = trace.events.length;
    const parts = [];
    if (trace.live) {
      const committed = trace.boxes.filter((b) => b.classList.contains("committed")).length;
      parts.push(`step ${n}`, ev ? `block ${ev.block + 1} of ${ev.num_blocks}` : "waiting for the first step",
                 `${committed} of ${trace.genLength} committed`);
    } else {
      const tokens = trace.usage ? trace.usage.completion_tokens : null;
      parts.push(k === n ? `${n} steps` : `step ${k} of ${n}`);
      if (ev) parts.push(`block ${ev.block + 1} of ${ev.num_blocks}`);
      if (tokens != null) {
        parts.push(`${tokens} tokens`, `${(tokens / Math.max(trace.seconds, 1e-3)).toFixed(1)} tokens/s`);
      }
      parts.push(`${trace.seconds.toFixed(2)} s`);
      if (trace.finish) parts.push(`finish: ${trace.finish}`);
    }
    els.stats.textContent = parts.join(" \u00b7 ");
  }

  function show(trace, k = trace.events.length) {
    if (shown !== trace) buildCanvas(trace);
    shown = trace;
    paint(trace, k);
    describe(trace, k);
    els.answer.textContent = trace.text;
    els.replay.max = String(trace.events.length);
    els.replay.value = String(k);
    els.replay.disabled = trace.live || trace.events.length === 0;
    els.replayOut.textContent = trace.live ? "once the answer is done" : `step ${k} of ${trace.events.length}`;
  }

  // -- the conversation -----------------------------------------------------------
  function addMessage(role, text) {
    const li = document.createElement("li");
    li.className = `msg ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Model";
    const body = document.createElement("p");
    body.className = "text";
    body.textContent = text;
    li.append(who, body);
    els.log.append(li);
    els.log.scrollTop = els.log.scrollHeight;
    return li;
  }

  function setBusy(busy) {
    if (busy) document.body.dataset.state = "running";
    els.send.disabled = busy;
    els.stop.disabled = !busy;
    els.prompt.setAttribute("aria-busy", String(busy));
  }

  function showError(msg) {
    els.error.textContent = msg;
    els.error.hidden = !msg;
  }

  async function send(text) {
    let fields;
    try { fields = requestFields(); } catch (e) { showError(e.message); return; }
    showError("");
    history.push({ role: "user", content: text });
    addMessage("user", text);
    const item = addMessage("assistant", "");
    item.classList.add("pending");
    // Masked boxes from the knobs at once (up to a sane size: the server has not checked them yet).
    const trace = newTrace(fields.max_tokens <= PREBUILD_MAX ? fields.max_tokens : 0, fields.block_length || 0);
    show(trace, 0);
    controller = new AbortController();
    setBusy(true);
    const body = { ...fields, messages: history.slice(), stream: true,
                   stream_options: { include_usage: true, include_denoising: true } };
    try {
      const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                         body: JSON.stringify(body), signal: controller.signal });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      await readEvents(resp, (obj) => {
        if (obj.object === "denoising.step") {
          trace.events.push(obj);
          if (shown === trace) { applyEvent(trace, obj); describe(trace, trace.events.length); }
          return;
        }
        for (const ch of obj.choices || []) {
          if (ch.delta && ch.delta.content) trace.text += ch.delta.content;
          if (ch.finish_reason) trace.finish = ch.finish_reason;
        }
        if (obj.usage) trace.usage = obj.usage;
        item.querySelector(".text").textContent = trace.text;
        if (shown === trace) els.answer.textContent = trace.text;
      });
      trace.live = false;
      trace.seconds = (performance.now() - trace.started) / 1000;
      history.push({ role: "assistant", content: trace.text });
      item.classList.remove("pending");
      const again = document.createElement("button");
      again.type = "button";
      again.className = "link";
      again.textContent = "Show its denoising";
      again.addEventListener("click", () => show(trace));
      item.append(again);
      if (shown === trace) show(trace);
      document.body.dataset.state = "done";
    } catch (e) {
      history.pop();  // the unanswered turn is not part of the conversation
      trace.live = false;
      trace.seconds = (performance.now() - trace.started) / 1000;
      item.classList.replace("pending", "failed");
      const stopped = e.name === "AbortError";
      item.querySelector(".text").textContent = stopped ? "(stopped)" : "(failed)";
      if (!stopped) showError(e.message);
      if (shown === trace) show(trace);
      document.body.dataset.state = "error";
    } finally {
      controller = null;
      setBusy(false);
    }
  }

  // -- wiring ---------------------------------------------------------------------
  els.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = els.prompt.value.trim();
    if (!text || controller) { if (!text) showError("Type a message first."); return; }
    els.prompt.value = "";
    send(text);
  });
  els.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); els.form.requestSubmit(); }
    if (e.key === "Escape" && controller) controller.abort();
  });
  els.stop.addEventListener("click", () => controller && controller.abort());
  els.clear.addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    els.log.replaceChildren();
    els.canvas.replaceChildren();
    els.canvas.setAttribute("aria-label", "The canvas: empty");
    els.answer.textContent = "";
    els.stats.textContent = "Send a message to see its canvas.";
    els.replay.disabled = true;
    shown = null;
    showError("");
    els.prompt.focus();
  });
  els.replay.addEventListener("input", () => { if (shown && !shown.live) show(shown, Number(els.replay.value)); });

  // Knobs the server does not have stay hidden, and so do a rule's knobs while another rule is chosen.
  let serverFields = null;
  function showKnobs() {
    for (const el of document.querySelectorAll("[data-field]")) {
      const rule = el.dataset.remasking;
      el.hidden = !(serverFields && el.dataset.field in serverFields) || (rule && rule !== els.remasking.value);
    }
  }
  els.remasking.addEventListener("change", showKnobs);

  async function discover() {
    try {
      const spec = await (await fetch("/openapi.json")).json();
      const props = spec.components.schemas.ChatCompletionRequest.properties;
      serverFields = props;
      showKnobs();
      const names = ((props.remasking && props.remasking.description) || "").split("|")
        .map((s) => s.trim()).filter((s) => /^[a-z_]+$/.test(s));
      const have = new Set([...els.remasking.options].map((o) => o.value));
      for (const name of names) if (!have.has(name)) els.remasking.append(new Option(name, name));
    } catch (_) { /* no schema: the basic knobs only */ }
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (resp.ok) {
        const card = (await resp.json()).data[0];
        if (card.decoding) useModelDefaults(card.decoding);
        els.model.textContent = describeModel(card);
        showExamples(card.examples || []);
        if (card.bundled_demo) {
          const size = card.num_parameters ? `a ${(card.num_parameters / 1e6).toFixed(1)}M-parameter demo` : "a tiny demo";
          els.demoNote.textContent = `This is ${card.id}, the bundled model: ${size} that reverses short word lists `
            + "and writes Bible-style words. Serve a real checkpoint with --model.";
          els.demoNote.hidden = false;
        }
      }
    } catch (_) { /* the model name is a nicety */ }
  }

  // The model card's example prompts: one click sends one.
  function showExamples(examples) {
    els.examples.replaceChildren();
    for (const ex of examples) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "example";
      b.title = ex.prompt;
      const title = document.createElement("span");
      title.className = "example-title";
      title.textContent = ex.title;
      const prompt = document.createElement("code");
      prompt.textContent = ex.prompt;
      b.append(title, prompt);
      b.addEventListener("click", () => {
        if (controller) return;
        els.prompt.value = ex.prompt;
        els.form.requestSubmit();
      });
      els.examples.append(b);
    }
    els.examples.hidden = examples.length === 0;
  }

  // The served model's own decoding becomes the knobs' starting values.
  function useModelDefaults(d) {
    const have = new Set([...els.remasking.options].map((o) => o.value));
    if (d.remasking && !have.has(d.remasking)) els.remasking.append(new Option(d.remasking, d.remasking));
    if (d.remasking) els.remasking.value = d.remasking;
    if (d.block_length) $("block-length").value = d.block_length;
    if (d.max_tokens) $("max-tokens").value = d.max_tokens;
    if (d.threshold) $("threshold").placeholder = d.threshold;
    // LLaDA's steps span the answer (the knob's one per token); other schedules keep their own.
    if (d.schedule && d.schedule !== "llada") $("steps").value = "";
    else if (d.steps) $("steps").value = d.steps;
    showKnobs();
  }

  function describeModel(card) {
    const parts = ["Model: " + card.id];
    if (card.architecture) parts.push(card.architecture + (card.model_type ? ` (${card.model_type})` : ""));
    const d = card.decoding;
    if (d) {
      const knobs = [`steps ${d.steps}`, `block ${d.block_length}`, `remasking ${d.remasking}`];
      if (/threshold/.test(d.remasking)) knobs.push(`threshold ${d.threshold}`);
      if (d.editing_threshold != null) knobs.push(`editing ${d.editing_threshold}`);
      if (d.schedule === "dream") knobs.push(`eps ${d.eps}`);
      parts.push(`${d.schedule} decoding: ${knobs.join(", ")}`);
    }
    if (card.max_model_len) parts.push(`max length ${card.max_model_len}`);
    if (card.mask_token_id != null) parts.push(`mask id ${card.mask_token_id}`);
    return parts.join(" · ");
  }

  // On a phone the settings start folded, so the canvas is near the chat.
  if (window.matchMedia("(max-width: 899px)").matches) $("settings").open = false;
  document.body.dataset.state = "idle";
  discover();
})();
