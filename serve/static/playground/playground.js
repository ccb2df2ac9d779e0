// The Osprey playground: an image, its regions (boxes, SAM clicks, SAM everything, SAM 3 concepts, uploaded masks)
// drawn as outlined numbered overlays, each region's answer, a streamed chat about regions, and downloads.
// Plain JavaScript talking only to this server (same origin): no build step, nothing fetched from elsewhere.
"use strict";

const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]];
const DESCRIBE_BATCH = 16; // regions per describe request (the server's default limit is 64)
const MIN_BOX = 3; // a drag shorter than this (pixels) is a click

const state = {
  image: null, dataUrl: "", fileName: "", width: 0, height: 0,
  regions: [], // {mask: Uint8Array (H*W, row-major), payload: region for the API, bbox, area, source, score, answer, scores}
  pending: null, // SAM points in progress: {points: [[x, y]], labels: [1|0], segment}
  drag: null, // a box being drawn: {x0, y0, x1, y1}
  caps: {points: false, everything: false, text: false, hint: null},
  classifyMissing: false,
  chat: [], // OpenAI messages sent so far (the first carries the image)
  busy: 0,
};

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const colour = (k) => PALETTE[k % PALETTE.length];
const css = (rgb, a = 1) => `rgba(${rgb[0]}, ${rgb[1]}, ${rgb[2]}, ${a})`;

// ---------------------------------------------------------------------------------------------- server calls

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {headers: headers()}
    : {method: "POST", headers: headers(), body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, (data.error && data.error.message) || response.statusText);
  return data;
}

function setStatus(text) { $("status").textContent = text; }

async function withBusy(label, work) {
  state.busy += 1;
  setStatus(label + "...");
  try {
    await work();
    setStatus("");
  } catch (error) {
    setStatus(`${label} failed: ${error.message}`);
  } finally {
    state.busy -= 1;
  }
}

async function probe() {
  try {
    const models = await api("/v1/models");
    $("model-name").textContent = `model: ${models.data[0].id}`;
    state.caps = await api("/v1/segment");
  } catch (error) {
    state.caps = {points: false, everything: false, text: false,
      hint: error.status === 401 ? "enter the server's API key above, then reload" : error.message};
  }
  applyCaps();
  document.body.dataset.ready = "true"; // the model and the SAM capabilities are known: the tools are set
}

function applyCaps() {
  const caps = state.caps;
  for (const input of document.querySelectorAll('input[name="tool"]')) {
    const needsSam = input.value !== "box-mask";
    input.disabled = needsSam && !caps.points;
    input.parentElement.classList.toggle("disabled", input.disabled);
  }
  $("everything").disabled = !caps.everything;
  $("find-concept").disabled = !caps.text;
  $("concept").disabled = !caps.text;
  const off = [];
  if (!caps.points) off.push("SAM clicks, SAM boxes and segment everything are off");
  if (!caps.text) off.push("text concepts are off");
  $("sam-status").textContent = off.length ? `${off.join("; ")}: ${caps.hint || ""}. Boxes as masks and uploaded masks work.` : "";
}

// ---------------------------------------------------------------------------------------------- masks

function rleCountsFromString(s) { // pycocotools' rleFrString
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p += 1; k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function rleDecode(rle) { // COCO RLE (column-major runs, zeros first) -> row-major Uint8Array
  const [h, w] = rle.size;
  const counts = typeof rle.counts === "string" ? rleCountsFromString(rle.counts) : rle.counts;
  const mask = new Uint8Array(h * w);
  let index = 0;
  counts.forEach((run, i) => {
    if (i % 2 === 1) {
      for (let j = index; j < index + run; j++) mask[(j % h) * w + Math.floor(j / h)] = 1;
    }
    index += run;
  });
  return mask;
}

function rleEncode(mask, h, w) { // row-major mask -> uncompressed COCO RLE
  const counts = [];
  let current = 0, run = 0;
  for (let x = 0; x < w; x++) {
    for (let y = 0; y < h; y++) {
      const v = mask[y * w + x];
      if (v !== current) { counts.push(run); run = 0; current = v; }
      run += 1;
    }
  }
  counts.push(run);
  return {size: [h, w], counts};
}

function maskStats(mask, w, h) { // COCO bbox [x, y, w, h] and area
  let x0 = w, y0 = h, x1 = -1, y1 = -1, area = 0;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (!mask[y * w + x]) continue;
      area += 1;
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
  }
  return {area, bbox: area ? [x0, y0, x1 - x0 + 1, y1 - y0 + 1] : [0, 0, 0, 0]};
}

function boxMask(box) {
  const [x, y, bw, bh] = box.map(Math.round);
  const mask = new Uint8Array(state.width * state.height);
  for (let r = Math.max(0, y); r < Math.min(state.height, y + bh); r++) {
    mask.fill(1, r * state.width + Math.max(0, x), r * state.width + Math.min(state.width, x + bw));
  }
  return mask;
}

function paintedMask(paint) { // a mask drawn on an offscreen canvas (polygons), for display
  const off = document.createElement("canvas");
  off.width = state.width; off.height = state.height;
  const c = off.getContext("2d");
  c.fillStyle = "#fff";
  paint(c);
  const pixels = c.getImageData(0, 0, state.width, state.height).data;
  const mask = new Uint8Array(state.width * state.height);
  for (let i = 0; i < mask.length; i++) mask[i] = pixels[4 * i + 3] > 127 ? 1 : 0;
  return mask;
}

function polygonMask(polygons) {
  const list = typeof polygons[0] === "number" ? [polygons] : polygons;
  return paintedMask((c) => {
    c.beginPath();
    for (const poly of list) {
      c.moveTo(poly[0], poly[1]);
      for (let i = 2; i < poly.length; i += 2) c.lineTo(poly[i], poly[i + 1]);
      c.closePath();
    }
    c.fill();
  });
}

function imageMask(img) { // the server's rule: alpha > 0 where the image has transparency, else any channel nonzero
  const off = document.createElement("canvas");
  off.width = img.naturalWidth; off.height = img.naturalHeight;
  const c = off.getContext("2d");
  c.drawImage(img, 0, 0);
  const pixels = c.getImageData(0, 0, off.width, off.height).data;
  let hasAlpha = false;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] < 255) { hasAlpha = true; break; }
  const mask = new Uint8Array(off.width * off.height);
  for (let i = 0; i < mask.length; i++) {
    const p = 4 * i;
    mask[i] = (hasAlpha ? pixels[p + 3] > 0 : (pixels[p] || pixels[p + 1] || pixels[p + 2])) ? 1 : 0;
  }
  return mask;
}

// ---------------------------------------------------------------------------------------------- drawing

function edgePixels(mask, w, h) { // inside pixels with an outside 4-neighbour (or on the border)
  const edge = [];
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!mask[i]) continue;
      if (x === 0 || y === 0 || x === w - 1 || y === h - 1 || !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w]) {
        edge.push(i);
      }
    }
  }
  return edge;
}

const edges = new WeakMap(); // mask -> its edge pixels (a mask never changes once made)

function paintMask(pixels, mask, rgb, alpha, outline) {
  const w = state.width, h = state.height;
  if (!edges.has(mask)) edges.set(mask, edgePixels(mask, w, h));
  for (let i = 0; i < mask.length; i++) {
    if (!mask[i]) continue;
    const p = 4 * i;
    for (let c = 0; c < 3; c++) pixels[p + c] = (1 - alpha) * pixels[p + c] + alpha * rgb[c];
  }
  const half = Math.floor(outline / 2);
  for (const i of edges.get(mask)) {
    const x = i % w, y = Math.floor(i / w);
    for (let dy = -half; dy <= half; dy++) {
      for (let dx = -half; dx <= half; dx++) {
        const xx = x + dx, yy = y + dy;
        if (xx < 0 || yy < 0 || xx >= w || yy >= h) continue;
        const p = 4 * (yy * w + xx);
        pixels[p] = rgb[0]; pixels[p + 1] = rgb[1]; pixels[p + 2] = rgb[2];
      }
    }
  }
}

function placeBadges(fontPx) { // as osprey.overlay: at the mask's top-left if free, else the nearest free spot
  const placed = [];
  const bh = Math.min(fontPx + 6, state.height);
  ctx.font = `bold ${fontPx}px sans-serif`;
  state.regions.forEach((region, k) => {
    const bw = Math.min(Math.ceil(ctx.measureText(String(k + 1)).width) + 8, state.width);
    const sx = Math.min(Math.max(region.bbox[0], 0), state.width - bw);
    const sy = Math.min(Math.max(region.bbox[1], 0), state.height - bh);
    const candidates = [[sx, sy]];
    const stepX = Math.max(1, Math.floor(bw / 2)), stepY = Math.max(1, Math.floor(bh / 2));
    for (let y = 0; y <= state.height - bh; y += stepY) for (let x = 0; x <= state.width - bw; x += stepX) candidates.push([x, y]);
    const rest = candidates.slice(1).sort((a, b) => ((a[0] - sx) ** 2 + (a[1] - sy) ** 2) - ((b[0] - sx) ** 2 + (b[1] - sy) ** 2));
    let box = null;
    for (const [x, y] of [candidates[0], ...rest]) {
      box = {x0: x, y0: y, x1: x + bw, y1: y + bh};
      if (!placed.some((o) => box.x0 < o.x1 && o.x0 < box.x1 && box.y0 < o.y1 && o.y0 < box.y1)) break;
    }
    placed.push(box);
  });
  return placed;
}

function redraw() {
  if (!state.image) return;
  ctx.drawImage(state.image, 0, 0);
  const frame = ctx.getImageData(0, 0, state.width, state.height);
  const outline = Math.max(2, Math.round(Math.min(state.width, state.height) / 200));
  state.regions.forEach((region, k) => paintMask(frame.data, region.mask, colour(k), region.selected ? 0.5 : 0.3, outline));
  if (state.pending && state.pending.segment) paintMask(frame.data, state.pending.segment.mask, [255, 255, 255], 0.45, outline);
  ctx.putImageData(frame, 0, 0);
  const fontPx = Math.max(12, Math.round(Math.min(state.width, state.height) / 32));
  const badges = placeBadges(fontPx);
  state.badges = badges;
  badges.forEach((b, k) => {
    ctx.fillStyle = css(colour(k));
    ctx.fillRect(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
    ctx.strokeStyle = "#000"; ctx.lineWidth = 1;
    ctx.strokeRect(b.x0 + 0.5, b.y0 + 0.5, b.x1 - b.x0 - 1, b.y1 - b.y0 - 1);
    const [r, g, bl] = colour(k);
    ctx.fillStyle = 0.299 * r + 0.587 * g + 0.114 * bl > 140 ? "#000" : "#fff";
    ctx.textAlign = "center"; ctx.textBaseline = "middle";
    ctx.fillText(String(k + 1), (b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2 + 1);
  });
  if (state.pending) {
    state.pending.points.forEach(([x, y], i) => {
      ctx.beginPath(); ctx.arc(x, y, Math.max(4, fontPx / 3), 0, 2 * Math.PI);
      ctx.fillStyle = state.pending.labels[i] ? "#2a2" : "#d22"; ctx.fill();
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 2; ctx.stroke();
    });
  }
  if (state.drag) {
    const {x0, y0, x1, y1} = state.drag;
    ctx.setLineDash([6, 4]); ctx.strokeStyle = "#fff"; ctx.lineWidth = outline;
    ctx.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
    ctx.setLineDash([]);
  }
}

function fitCanvas() { // the image as large as the stage allows (small images are enlarged)
  if (!state.image) return;
  const scale = Math.min(($("stage").clientWidth - 8) / state.width, 0.75 * window.innerHeight / state.height);
  canvas.style.width = `${Math.floor(state.width * scale)}px`;
  canvas.style.height = `${Math.floor(state.height * scale)}px`;
}

window.addEventListener("resize", fitCanvas);

// ---------------------------------------------------------------------------------------------- regions list

function renderRegions() {
  const list = $("regions");
  list.replaceChildren();
  state.regions.forEach((region, k) => {
    const item = document.createElement("li");
    item.className = region.selected ? "selected" : "";
    item.dataset.region = String(k + 1);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = String(k + 1);
    badge.style.background = css(colour(k));
    badge.title = `insert <region${k + 1}> into the chat`;
    badge.addEventListener("click", () => mention(k));
    const text = document.createElement("div");
    text.className = "region-text";
    const answer = document.createElement("div");
    answer.className = "answer";
    answer.textContent = region.answer === undefined ? "..." : region.answer;
    text.append(answer);
    if (region.scores) {
      const scores = document.createElement("div");
      scores.className = "scores";
      scores.textContent = region.scores.map((s) => `${s.label} ${(100 * s.score).toFixed(0)}%`).join(", ");
      text.append(scores);
    }
    const meta = document.createElement("div");
    meta.className = "region-meta";
    meta.textContent = `${region.source}, ${region.area} px` + (region.score !== undefined ? `, SAM score ${region.score.toFixed(2)}` : "");
    text.append(meta);
    const remove = document.createElement("button");
    remove.textContent = "\u00d7";
    remove.title = "remove this region (the later ones are renumbered)";
    remove.addEventListener("click", () => removeRegion(k));
    item.append(badge, text, remove);
    list.append(item);
  });
}

function mention(k) {
  state.regions[k].selected = !state.regions[k].selected;
  const input = $("chat-input");
  const tag = `<region${k + 1}>`;
  if (state.regions[k].selected && !input.value.includes(tag)) {
    input.value = (input.value && !input.value.endsWith(" ") ? input.value + " " : input.value) + tag;
  }
  input.focus();
  renderRegions();
  redraw();
}

function removeRegion(k) {
  state.regions.splice(k, 1);
  if (state.chat.length) {
    state.chat = [];
    chatLine("system", "Chat restarted: the regions were renumbered.");
  }
  renderRegions();
  redraw();
}

function addRegions(made) { // made: [{mask, payload, source, score?}] -> regions, then their answers
  const fresh = made.map((m) => ({...m, ...maskStats(m.mask, state.width, state.height)})).filter((r) => r.area > 0);
  state.regions.push(...fresh);
  renderRegions();
  redraw();
  return answerRegions(fresh);
}

// ---------------------------------------------------------------------------------------------- answers

function parseLabels() { return $("labels").value.split(",").map((s) => s.trim()).filter(Boolean); }

async function answerRegions(regions) {
  if (!regions.length) return;
  const task = $("task").value;
  if (task === "labels" && parseLabels().length && !state.classifyMissing) {
    try {
      await classify(regions);
      return;
    } catch (error) {
      if (error.status !== 404) throw error;
      state.classifyMissing = true;
      const note = $("classify-status");
      note.hidden = false;
      note.textContent = "This server has no label classification (POST /v1/regions/classify answered 404): " +
        "the model names each region's category instead, without scores.";
    }
  }
  for (let i = 0; i < regions.length; i += DESCRIBE_BATCH) {
    const batch = regions.slice(i, i + DESCRIBE_BATCH);
    const out = await api("/v1/regions/describe", {image: state.dataUrl, regions: batch.map((r) => r.payload),
      task: task === "labels" ? "category" : task, max_tokens: task === "detailed" ? 256 : 64});
    out.results.forEach((result) => { batch[result.index].answer = result.text; });
    renderRegions();
  }
}

async function classify(regions) {
  const labels = parseLabels();
  const out = await api("/v1/regions/classify", {image: state.dataUrl, regions: regions.map((r) => r.payload),
    labels, top_k: Math.min(3, labels.length)});
  out.results.forEach((result, i) => {
    const region = regions[result.index === undefined ? i : result.index];
    // each label's probability over the list (its `score` is the mean log-probability behind it)
    const ranked = result.labels.map((e) => ({label: e.label, score: e.probability}));
    region.scores = ranked;
    region.answer = ranked.length ? ranked[0].label : "(no label)";
  });
  renderRegions();
}

// ---------------------------------------------------------------------------------------------- SAM

function segmentsToRegions(segments, source) {
  return segments.map((s) => ({mask: rleDecode(s.segmentation), payload: {rle: s.segmentation}, source,
    score: s.predicted_iou}));
}

async function samBox(box) {
  const out = await api("/v1/segment", {image: state.dataUrl, boxes: [box]});
  await addRegions(segmentsToRegions(out.segments, "SAM box"));
}

async function samPoints() {
  const pending = state.pending;
  const out = await api("/v1/segment", {image: state.dataUrl, points: pending.points, labels: pending.labels});
  if (state.pending !== pending) return;
  pending.segment = out.segments.length ? segmentsToRegions(out.segments, "SAM points")[0] : null;
  redraw();
}

// ---------------------------------------------------------------------------------------------- uploads

function readAs(file, how) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    if (how === "text") reader.readAsText(file); else reader.readAsDataURL(file);
  });
}

function loadImg(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("not an image the browser can read"));
    img.src = url;
  });
}

async function openImage(file) {
  const dataUrl = await readAs(file, "dataurl");
  const img = await loadImg(dataUrl);
  Object.assign(state, {image: img, dataUrl, fileName: file.name, width: img.naturalWidth, height: img.naturalHeight,
    regions: [], pending: null, chat: []});
  canvas.width = state.width; canvas.height = state.height;
  canvas.hidden = false;
  $("drop-hint").hidden = true;
  fitCanvas();
  $("chat-log").replaceChildren();
  renderRegions();
  redraw();
  setStatus(`${file.name}: ${state.width} x ${state.height}`);
}

function regionFromObject(obj) { // one JSON region (SAM entry, COCO annotation, bare RLE, or a request form)
  const seg = obj.segmentation !== undefined ? obj.segmentation : obj;
  const size = (rle) => rle.size[0] === state.height && rle.size[1] === state.width;
  if (seg.counts !== undefined) {
    if (!size(seg)) throw new Error(`mask size ${seg.size[1]}x${seg.size[0]} differs from the image`);
    return {mask: rleDecode(seg), payload: {rle: seg}};
  }
  if (seg.rle) return regionFromObject(seg.rle);
  if (seg.box) return {mask: boxMask(seg.box), payload: {box: seg.box}};
  const polygon = seg.polygon || (Array.isArray(seg) && !Array.isArray(seg[0]?.[0]) ? seg : null);
  if (polygon && !(Array.isArray(seg) && seg.length === state.height && seg[0].length === state.width)) {
    return {mask: polygonMask(polygon), payload: {polygon}};
  }
  const bitmap = seg.bitmap || seg;
  if (Array.isArray(bitmap) && bitmap.length === state.height) {
    return {mask: Uint8Array.from(bitmap.flat().map((v) => (v ? 1 : 0))), payload: {bitmap}};
  }
  throw new Error("not a region: expected a SAM entry, a COCO RLE or annotation, or {rle|box|polygon|bitmap}");
}

async function uploadMasks(files) {
  if (!state.image) throw new Error("open an image first");
  const made = [];
  for (const file of files) {
    if (file.type === "image/png" || file.name.toLowerCase().endsWith(".png")) {
      const url = await readAs(file, "dataurl");
      const img = await loadImg(url);
      if (img.naturalWidth !== state.width || img.naturalHeight !== state.height) {
        throw new Error(`${file.name} is ${img.naturalWidth}x${img.naturalHeight}, the image ${state.width}x${state.height}`);
      }
      made.push({mask: imageMask(img), payload: {png: url}, source: file.name});
      continue;
    }
    let data = JSON.parse(await readAs(file, "text"));
    if (data.annotations) data = data.annotations; // a COCO file: its annotations
    for (const obj of Array.isArray(data) ? data : [data]) {
      try {
        made.push({...regionFromObject(obj), source: file.name});
      } catch (error) {
        throw new Error(`${file.name}: ${error.message}`);
      }
    }
  }
  await addRegions(made);
}

// ---------------------------------------------------------------------------------------------- chat

function chatLine(role, text) {
  const line = document.createElement("div");
  line.className = `msg ${role}`;
  line.textContent = text;
  $("chat-log").append(line);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return line;
}

async function sendChat(text) {
  if (!state.image) throw new Error("open an image first");
  for (const match of text.matchAll(/<region(\d+)>/g)) {
    if (Number(match[1]) < 1 || Number(match[1]) > state.regions.length) throw new Error(`there is no region ${match[1]}`);
  }
  const message = state.chat.length ? {role: "user", content: text} : {role: "user", content: [
    {type: "image_url", image_url: {url: state.dataUrl}}, {type: "text", text}]};
  chatLine("user", text);
  const line = chatLine("assistant", "");
  const body = {messages: [...state.chat, message], stream: true, max_tokens: 256};
  if (state.regions.length) body.regions = state.regions.map((r) => r.payload);
  const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    line.remove();
    throw new ApiError(response.status, (data.error && data.error.message) || response.statusText);
  }
  const answer = await readStream(response, line);
  state.chat.push(message, {role: "assistant", content: answer});
}

async function readStream(response, line) { // OpenAI server-sent events -> the text, shown as it arrives
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) text += choice.delta.content || "";
      line.textContent = text;
    }
  }
  line.classList.add("done");
  return text.trim();
}

// ---------------------------------------------------------------------------------------------- downloads

function segmentationOf(region) {
  return region.payload.rle || rleEncode(region.mask, state.height, state.width);
}

function download(name, text, type) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type}));
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function cocoDocument() {
  return {
    info: {description: "regions and answers from the Osprey playground", task: $("task").value},
    images: [{id: 1, file_name: state.fileName, width: state.width, height: state.height}],
    categories: [{id: 1, name: "region"}],
    annotations: state.regions.map((r, k) => ({id: k + 1, image_id: 1, category_id: 1, iscrowd: 0,
      segmentation: segmentationOf(r), area: r.area, bbox: r.bbox,
      osprey: {answer: r.answer ?? null, scores: r.scores ?? null, source: r.source}})),
    chat: state.chat.map((m) => ({role: m.role, content: typeof m.content === "string" ? m.content
      : m.content.filter((p) => p.type === "text").map((p) => p.text).join("")})),
  };
}

function jsonLines() {
  const doc = cocoDocument();
  const regions = doc.annotations.map((a) => JSON.stringify({image: state.fileName, region: a.id,
    segmentation: a.segmentation, bbox: a.bbox, area: a.area, answer: a.osprey.answer, scores: a.osprey.scores}));
  return [...regions, ...doc.chat.map((m) => JSON.stringify({image: state.fileName, chat: m}))].join("\n") + "\n";
}

// ---------------------------------------------------------------------------------------------- events

function imagePoint(event) {
  const rect = canvas.getBoundingClientRect();
  return [Math.min(state.width - 1, Math.max(0, (event.clientX - rect.left) * state.width / rect.width)),
    Math.min(state.height - 1, Math.max(0, (event.clientY - rect.top) * state.height / rect.height))];
}

const tool = () => document.querySelector('input[name="tool"]:checked').value;

function regionAt([x, y]) {
  const i = Math.floor(y) * state.width + Math.floor(x);
  for (let k = state.regions.length - 1; k >= 0; k--) if (state.regions[k].mask[i]) return k;
  return -1;
}

canvas.addEventListener("contextmenu", (event) => event.preventDefault());
canvas.addEventListener("mousedown", (event) => {
  if (!state.image) return;
  const [x, y] = imagePoint(event);
  if (tool() === "points") {
    if (!state.pending) state.pending = {points: [], labels: []};
    state.pending.points.push([Math.round(x), Math.round(y)]);
    state.pending.labels.push(event.button === 2 || event.shiftKey ? 0 : 1);
    $("pending-bar").hidden = false;
    redraw();
    withBusy("SAM", samPoints);
    return;
  }
  state.drag = {x0: x, y0: y, x1: x, y1: y};
});
canvas.addEventListener("mousemove", (event) => {
  if (!state.drag) return;
  [state.drag.x1, state.drag.y1] = imagePoint(event);
  redraw();
});
window.addEventListener("mouseup", () => {
  if (!state.drag) return;
  const {x0, y0, x1, y1} = state.drag;
  state.drag = null;
  if (Math.abs(x1 - x0) < MIN_BOX || Math.abs(y1 - y0) < MIN_BOX) { // a click: pick the region under it
    const k = regionAt([x0, y0]);
    if (k >= 0) mention(k); else redraw();
    return;
  }
  const box = [Math.round(Math.min(x0, x1)), Math.round(Math.min(y0, y1)), Math.round(Math.abs(x1 - x0)),
    Math.round(Math.abs(y1 - y0))];
  redraw();
  if (tool() === "box-sam") withBusy("SAM", () => samBox(box));
  else withBusy("Describing", () => addRegions([{mask: boxMask(box), payload: {box}, source: "box"}]));
});

$("accept-pending").addEventListener("click", () => {
  const segment = state.pending && state.pending.segment;
  state.pending = null;
  $("pending-bar").hidden = true;
  if (segment) withBusy("Describing", () => addRegions([segment]));
  else redraw();
});
$("clear-pending").addEventListener("click", () => { state.pending = null; $("pending-bar").hidden = true; redraw(); });
$("everything").addEventListener("click", () => withBusy("Segment everything", async () => {
  if (!state.image) throw new Error("open an image first");
  const out = await api("/v1/segment/everything", {image: state.dataUrl});
  await addRegions(segmentsToRegions(out.segments, "SAM everything"));
}));
$("find-concept").addEventListener("click", () => withBusy("SAM 3", async () => {
  if (!state.image) throw new Error("open an image first");
  const out = await api("/v1/segment", {image: state.dataUrl, text: $("concept").value});
  if (!out.segments.length) throw new Error(`no ${$("concept").value} found`);
  await addRegions(segmentsToRegions(out.segments, `SAM 3: ${$("concept").value}`));
}));
$("image-file").addEventListener("change", (event) => {
  if (event.target.files.length) withBusy("Opening", () => openImage(event.target.files[0]));
});
$("mask-files").addEventListener("change", (event) => {
  const files = [...event.target.files];
  event.target.value = "";
  withBusy("Reading masks", () => uploadMasks(files));
});
$("task").addEventListener("change", () => { $("labels").hidden = $("task").value !== "labels"; });
$("redo").addEventListener("click", () => withBusy("Answering", () => {
  state.regions.forEach((r) => { r.answer = undefined; r.scores = undefined; });
  renderRegions();
  return answerRegions(state.regions);
}));
$("clear-regions").addEventListener("click", () => {
  state.regions = []; state.chat = [];
  $("chat-log").replaceChildren();
  renderRegions(); redraw();
});
$("download-coco").addEventListener("click", () =>
  download("osprey-regions.json", JSON.stringify(cocoDocument(), null, 1), "application/json"));
$("download-jsonl").addEventListener("click", () => download("osprey-regions.jsonl", jsonLines(), "application/x-ndjson"));
$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  withBusy("Chat", () => sendChat(text).catch((error) => { chatLine("error", error.message); throw error; }));
});
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
});
const stage = $("stage");
stage.addEventListener("dragover", (event) => { event.preventDefault(); stage.classList.add("dragging"); });
stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
stage.addEventListener("drop", (event) => {
  event.preventDefault();
  stage.classList.remove("dragging");
  const file = event.dataTransfer.files[0];
  if (file) withBusy("Opening", () => openImage(file));
});
$("api-key").value = localStorage.getItem("osprey-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("osprey-api-key", $("api-key").value); probe(); });
probe();
