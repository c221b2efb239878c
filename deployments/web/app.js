// The search page: one upload in, a grid of results out. Plain DOM and fetch, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const cfg = document.body.dataset;
const TOKEN_KEY = "imsearch-read-token"; // sessionStorage: kept for this tab only
const MORE_LIKE_THIS_SIZE = 512;        // thumbnail size a result is searched with (the model sees 224 px)
let queryBlob = null;
const objectUrls = [];

$("query-image").addEventListener("error", (e) => { e.target.hidden = true; }); // not an image the browser shows
const kInput = $("k"), nprobeInput = $("nprobe"), tokenInput = $("token");
kInput.value = cfg.defaultK;
kInput.max = cfg.maxK;
nprobeInput.max = cfg.maxNprobe;
tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
if (cfg.needsToken === "true" || tokenInput.value) $("token-field").hidden = false;
tokenInput.addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim()));

function authHeaders() {
  const token = tokenInput.value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

// Ids are 63-bit integers: JSON.parse would round them to the nearest double, so they are read as strings.
function parseAnswer(text) {
  try { return JSON.parse(text.replace(/"id":(\d+)/g, '"id":"$1"')); } catch { return null; }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function setStatus(parts) {
  $("status").replaceChildren(...parts);
}

function releaseUrls() {
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
}

async function search(blob) {
  queryBlob = blob;
  $("again").disabled = false;
  $("error").hidden = true;
  const preview = $("query-image");
  releaseUrls();
  preview.src = URL.createObjectURL(blob);
  objectUrls.push(preview.src);
  preview.alt = "the query image";
  preview.hidden = false;
  setStatus(["Searching…"]);
  const params = new URLSearchParams({ k: kInput.value || cfg.defaultK });
  if (nprobeInput.value) params.set("nprobe", nprobeInput.value);
  const form = new FormData();
  form.append("image", blob, blob.name || "query");
  let response;
  try {
    response = await fetch("/search?" + params, { method: "POST", headers: authHeaders(), body: form });
  } catch (e) {
    setStatus([]);
    showError("The service did not answer: " + e.message);
    return;
  }
  const answer = parseAnswer(await response.text());
  if (!response.ok) {
    setStatus([]);
    if (response.status === 401 || response.status === 403) {
      $("token-field").hidden = false;
      tokenInput.focus();
    }
    const why = answer && answer.error ? `${answer.error.message} (${answer.error.code})` : `HTTP ${response.status}`;
    showError("The service refused this search: " + why);
    $("results").replaceChildren();
    return;
  }
  render(answer);
}

function render(answer) {
  const n = answer.results.length;
  const parts = [`${n} result${n === 1 ? "" : "s"} in ${answer.took_ms.toFixed(1)} ms`];
  if (answer.collapsed) parts.push(` · ${answer.collapsed} cop${answer.collapsed === 1 ? "y" : "ies"} folded in`);
  if (answer.partial) {
    const note = document.createElement("span");
    note.className = "partial";
    note.textContent = " · Partial answer: some shards did not answer in time, so some matches may be missing.";
    parts.push(note);
  }
  setStatus(parts);
  $("results").replaceChildren(...answer.results.map(resultItem));
}

function resultItem(hit) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.id = hit.id;
  const name = hit.uri ? hit.uri.split("/").pop() : `image ${hit.id}`;
  button.title = `${hit.uri || hit.id}: search with this image`;
  button.setAttribute("aria-label", `${name}, score ${hit.score.toFixed(3)}: search with this image`);
  const img = document.createElement("img");
  img.alt = name;
  img.loading = "lazy";
  img.addEventListener("error", () => img.replaceWith(missing(name)), { once: true });
  loadThumbnail(img, hit.id);
  const meta = document.createElement("span");
  meta.className = "meta";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const file = document.createElement("span");
  file.className = "file";
  file.textContent = name;
  meta.append(score, file);
  if (hit.same_photo) {
    // Why a lower score sits above higher ones: local features matched, this is the same photo.
    const mark = document.createElement("span");
    mark.className = "verified";
    mark.textContent = "same photo, verified";
    mark.title = (hit.inliers === undefined ? "the very file searched with"
      : `${hit.inliers} matching keypoints cover ${Math.round(100 * hit.coverage)}% of the pictures`) +
      ": verified copies come first, whatever their score";
    meta.append(mark);
  }
  button.append(img, meta);
  button.addEventListener("click", () => moreLikeThis(hit.id));
  const full = document.createElement("a");
  full.className = "full";
  full.href = thumbnailUrl(hit.id, 1024);
  full.target = "_blank";
  full.rel = "noopener";
  full.textContent = "full image";
  li.append(button, full);
  return li;
}

function missing(name) {
  const div = document.createElement("span");
  div.className = "missing";
  div.textContent = name;
  return div;
}

function thumbnailUrl(id, size) {
  return `/images/${id}/thumbnail?size=${size}`;
}

async function loadThumbnail(img, id) {
  if (!tokenInput.value.trim()) {
    img.src = thumbnailUrl(id, 256); // the browser caches it (Cache-Control + ETag)
    return;
  }
  // An <img> cannot send an Authorization header: fetch it, then show the bytes.
  try {
    const response = await fetch(thumbnailUrl(id, 256), { headers: authHeaders() });
    if (!response.ok) throw new Error(response.status);
    img.src = URL.createObjectURL(await response.blob());
    objectUrls.push(img.src);
  } catch {
    img.dispatchEvent(new Event("error"));
  }
}

async function moreLikeThis(id) {
  $("error").hidden = true;
  setStatus(["Fetching that image…"]);
  const response = await fetch(thumbnailUrl(id, MORE_LIKE_THIS_SIZE), { headers: authHeaders() }).catch(() => null);
  if (!response || !response.ok) {
    setStatus([]);
    const answer = response ? parseAnswer(await response.text()) : null;
    showError(answer && answer.error ? answer.error.message : "That image cannot be fetched to search with.");
    return;
  }
  const blob = await response.blob();
  await search(new File([blob], `image-${id}.jpg`, { type: "image/jpeg" }));
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function firstImage(items) {
  for (const item of items || []) {
    if (item.kind === "file") return item.getAsFile();
  }
  return null;
}

$("file").addEventListener("change", (e) => {
  if (e.target.files.length) search(e.target.files[0]);
  e.target.value = ""; // picking the same file again searches again
});
$("query").addEventListener("submit", (e) => {
  e.preventDefault();
  if (queryBlob) search(queryBlob);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (file) search(file);
});
document.addEventListener("paste", (e) => {
  const file = firstImage(e.clipboardData && e.clipboardData.items);
  if (file) search(file);
});
