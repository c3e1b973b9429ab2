"use strict";
// InstantID page. Posts a job (POST v1/jobs), follows its Server-Sent Events with fetch() (EventSource cannot
// send an Authorization header) and shows the stage, the step progress, the live preview and the results.
// Only the public API; every path is relative to the page, so the app also works under a route prefix.
(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("form");
  const generateButton = $("generate");
  const cancelButton = $("cancel");
  const apiKey = $("api_key");
  const rememberKey = $("remember_key");
  const statusBox = $("status");
  const stageText = $("stage");
  const progress = $("progress");
  const preview = $("preview");
  const results = $("results");
  const warnings = $("warnings");
  const errorBox = $("error");

  const KEY_STORAGE = "instantid.api_key";
  const STAGES = {
    face: "Finding the face",
    prompt: "Reading the prompt",
    prepare: "Preparing",
    denoise: "Painting",
    hires: "Refining at the larger size",
    detail: "Repainting the small faces",
    store: "Saving",
  };
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const STALL_MS = 45000; // the server comments every 15 s: three missed means the stream is dead
  const MAX_RETRIES = 8; // consecutive reconnections without a single event

  let job = null; // {id, statusUrl, eventsUrl, lastEventId, done, abort}
  let objectUrls = []; // blob: URLs of the current job, revoked when the next one starts

  // ------------------------------------------------------------------------------------ small helpers
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const element = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  // Seeds go up to 2^63-1, past what a JS number holds exactly: read them as strings.
  const parseJson = (text) => JSON.parse(text.replace(/("seed"\s*:\s*)(\d{16,})/g, '$1"$2"'));

  function authHeaders(extra = {}) {
    const key = apiKey.value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  class ApiError extends Error {
    constructor(message, requestId, fatal = false) {
      super(message);
      this.requestId = requestId;
      this.fatal = fatal;
    }
  }

  // The API's {"error": {"code", "message", "request_id"}} as an ApiError (or words for any other answer).
  async function apiError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON (a proxy's error page): the status says enough
    }
    const requestId = body?.error?.request_id || response.headers.get("X-Request-ID");
    const fatal = response.status < 500 && ![408, 429].includes(response.status);
    const message =
      body?.error?.message || `The server answered ${response.status} ${response.statusText}`.trim() + ".";
    return new ApiError(message, requestId, fatal);
  }

  function showError(error, detail) {
    const message =
      error instanceof TypeError // what fetch throws when the network fails
        ? "Could not reach the server. Check the connection and try again."
        : error.message || String(error);
    errorBox.replaceChildren(element("span", "", message));
    const small = detail || (error.requestId ? `request id ${error.requestId}` : "");
    if (small) errorBox.append(element("small", "", small));
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.replaceChildren();
    errorBox.hidden = true;
  }

  async function blobUrl(path) {
    const response = await fetch(path, { headers: authHeaders() });
    if (!response.ok) throw await apiError(response);
    const url = URL.createObjectURL(await response.blob());
    objectUrls.push(url);
    return url;
  }

  // ------------------------------------------------------------------------------------ form
  const showSlider = (slider) => (form.querySelector(`output[for="${slider.id}"]`).value = slider.value);
  for (const slider of form.querySelectorAll('input[type="range"]')) {
    slider.addEventListener("input", () => showSlider(slider));
  }

  // Every range, default and choice comes from the service's own request model (its OpenAPI document), so
  // the page never restates one. A field the user already changed keeps its value.
  const touched = new Set();
  form.addEventListener("input", (event) => touched.add(event.target.name));
  const niceStep = (span) => {
    const raw = span / 40;
    const power = 10 ** Math.floor(Math.log10(raw));
    return [1, 2, 5, 10].map((m) => m * power).find((step) => step >= raw);
  };
  const label = (value) => value.charAt(0).toUpperCase() + value.slice(1).replaceAll("_", " ");
  function applySchema(field, schema) {
    const bounds = schema.anyOf ? schema.anyOf.find((s) => s.type && s.type !== "null") : schema;
    if (field.tagName === "SELECT" && bounds.enum) {
      field.replaceChildren(...bounds.enum.map((value) => new Option(label(value), value)));
    }
    if (field.tagName === "SELECT" && !bounds.enum) return; // its choices come from the service (models, people)
    if (bounds.maxLength !== undefined) field.maxLength = bounds.maxLength;
    if (field.type === "range" || field.type === "number") {
      field.min = bounds.minimum;
      field.max = bounds.maximum;
      field.step = bounds.type === "integer" ? 1 : niceStep(bounds.maximum - bounds.minimum);
    }
    if (field.name === "seed") field.pattern = `[0-9]{1,${String(BigInt(bounds.maximum)).length}}`;
    if (schema.default !== undefined && schema.default !== null && !touched.has(field.name)) {
      field.value = schema.default;
    }
    if (field.type === "range") showSlider(field);
  }
  let choiceSchemas = {}; // LoraChoice, ControlNetChoice: the ranges of the rows made from /v1/models
  const schemaReady = (async () => {
    const response = await fetch("openapi.json");
    if (!response.ok) throw await apiError(response);
    const spec = await response.json();
    const schema = spec.paths["/v1/generate"].post.requestBody.content["application/json"].schema;
    const fields = schema.properties;
    choiceSchemas = { ...(spec.components?.schemas || {}), ...(schema.$defs || {}) };
    for (const field of form.elements) {
      if (field.name && fields[field.name]) applySchema(field, fields[field.name]);
    }
  })();
  schemaReady.catch((error) => showError(error, "the form's settings could not be read from the service"));

  // What this service can load (GET v1/models): the fast modes, bases, LoRAs and extra ControlNets to choose from.
  async function loadModels() {
    await schemaReady.catch(() => {});
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (!response.ok) throw await apiError(response);
    const models = await response.json();
    $("mode").replaceChildren(new Option("None", ""), ...Object.keys(models.modes).map((name) => new Option(label(name), name)));
    $("base_model").replaceChildren(
      ...Object.entries(models.base_models).map(([name, base]) => {
        const option = new Option(base.inpainting ? `${name} (edits only)` : name, name);
        option.title = base.description || "";
        return option;
      }),
    );
    $("base_model").value = models.default_base;
    choiceRows($("loras"), "lora", Object.entries(models.loras), "scale", (spec) => spec.scale);
    choiceRows($("controlnets"), "controlnet", models.controlnets.map((name) => [name, {}]), "strength");
  }

  // One row per choice: a checkbox with its name and a slider for its scale or strength (no form names: the rows
  // are sent as one JSON field, see chosenRows).
  function choiceRows(box, kind, entries, amount, initial = () => undefined) {
    const schemaName = kind === "lora" ? "LoraChoice" : "ControlNetChoice";
    const bounds = choiceSchemas[schemaName]?.properties?.[amount] || {};
    const range = bounds.anyOf ? bounds.anyOf.find((s) => s.type && s.type !== "null") : bounds;
    box.querySelectorAll(".choice").forEach((row) => row.remove());
    $(`${box.id}_none`).hidden = entries.length > 0;
    for (const [name, spec] of entries) {
      const row = element("div", "choice");
      row.dataset.name = name;
      const check = Object.assign(element("input"), { type: "checkbox", id: `${kind}_${name}` });
      const checkLabel = Object.assign(element("label", "check", label(name)), { htmlFor: check.id });
      checkLabel.prepend(check);
      const slider = Object.assign(element("input"), {
        type: "range",
        id: `${kind}_${name}_${amount}`,
        min: range.minimum ?? 0,
        max: range.maximum ?? 2,
        step: 0.05,
      });
      slider.value = initial(spec) ?? (kind === "lora" ? 1 : 0.5);
      slider.setAttribute("aria-label", `${label(name)} ${amount}`);
      const shown = element("output", "", slider.value);
      slider.addEventListener("input", () => (shown.value = slider.value));
      row.append(checkLabel, shown, slider);
      box.append(row);
    }
  }

  const chosenRows = (box, amount) =>
    [...box.querySelectorAll(".choice")]
      .filter((row) => row.querySelector('input[type="checkbox"]').checked)
      .map((row) => ({ name: row.dataset.name, [amount]: Number(row.querySelector('input[type="range"]').value) }));

  // Saved people (GET v1/identities): choosing one replaces the face photos.
  async function loadIdentities() {
    const response = await fetch("v1/identities?limit=100", { headers: authHeaders() });
    if (!response.ok) return; // e.g. a key is needed first: the list stays empty
    const page = await response.json();
    const chosen = $("identity_id").value;
    $("identity_id").replaceChildren(
      new Option("None: use photos", ""),
      ...page.identities.map((person) => new Option(person.name || person.id, person.id)),
    );
    $("identity_id").value = [...$("identity_id").options].some((o) => o.value === chosen) ? chosen : "";
  }
  $("identity_id").addEventListener("change", () => {
    $("face_image").required = !$("identity_id").value;
  });
  loadIdentities();

  // The mask brush: the photo to edit on a canvas, painted strokes kept in a second canvas of the photo's own size
  // (white repaints), sent as mask_image when anything was painted.
  const brushCanvas = $("brush_canvas");
  const maskCanvas = document.createElement("canvas");
  let brushPhoto = null;
  let painted = false;
  $("brush_size").addEventListener("input", (event) => showSlider(event.target));
  $("target_image").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    painted = false;
    $("brush").hidden = !file;
    if (!file) return;
    brushPhoto = await createImageBitmap(file);
    [maskCanvas.width, maskCanvas.height] = [brushPhoto.width, brushPhoto.height];
    [brushCanvas.width, brushCanvas.height] = [brushPhoto.width, brushPhoto.height];
    drawBrush();
  });
  function drawBrush() {
    const context = brushCanvas.getContext("2d");
    context.drawImage(brushPhoto, 0, 0);
    context.globalAlpha = 0.5;
    context.drawImage(maskCanvas, 0, 0);
    context.globalAlpha = 1;
  }
  function paint(event) {
    if (!(event.buttons & 1) || !brushPhoto) return;
    const box = brushCanvas.getBoundingClientRect();
    const scale = brushCanvas.width / box.width;
    const context = maskCanvas.getContext("2d");
    context.fillStyle = "#fff";
    context.beginPath();
    const radius = (Number($("brush_size").value) * scale) / 2;
    context.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale, radius, 0, 2 * Math.PI);
    context.fill();
    painted = true;
    drawBrush();
  }
  brushCanvas.addEventListener("pointerdown", paint);
  brushCanvas.addEventListener("pointermove", paint);
  $("brush_clear").addEventListener("click", () => {
    maskCanvas.getContext("2d").clearRect(0, 0, maskCanvas.width, maskCanvas.height);
    painted = false;
    drawBrush();
  });
  // The painted mask as a PNG of the photo's size: white where painted, black elsewhere.
  async function paintedMask() {
    const out = document.createElement("canvas");
    [out.width, out.height] = [maskCanvas.width, maskCanvas.height];
    const context = out.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, out.width, out.height);
    context.drawImage(maskCanvas, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }

  const modelsReady = loadModels();
  modelsReady.catch((error) => showError(error, "the models could not be read from the service"));

  const thumbs = $("face_thumbs");
  let thumbUrls = [];
  $("face_image").addEventListener("change", (event) => {
    thumbUrls.forEach(URL.revokeObjectURL);
    thumbUrls = [...event.target.files].map((file) => URL.createObjectURL(file));
    thumbs.replaceChildren(
      ...thumbUrls.map((url, n) => Object.assign(element("img"), { src: url, alt: `Face photo ${n + 1}` })),
    );
  });

  try {
    const stored = localStorage.getItem(KEY_STORAGE);
    if (stored) [apiKey.value, rememberKey.checked] = [stored, true];
  } catch {
    // storage disabled: the key is simply not remembered
  }
  function saveKey() {
    try {
      if (rememberKey.checked && apiKey.value.trim()) localStorage.setItem(KEY_STORAGE, apiKey.value.trim());
      else localStorage.removeItem(KEY_STORAGE);
    } catch {
      // storage disabled
    }
  }
  rememberKey.addEventListener("change", saveKey);
  apiKey.addEventListener("change", saveKey);

  function setBusy(busy) {
    generateButton.disabled = busy;
    cancelButton.hidden = !busy;
    cancelButton.disabled = false;
  }

  function setStage(text) {
    stageText.textContent = text;
  }

  function setProgress(step, total) {
    if (!total) return;
    progress.max = total;
    progress.value = Math.min(step || 0, total);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await schemaReady; // the ranges and defaults are on the form before it is checked and sent
    } catch {
      return; // the page said why
    }
    const invalid = form.querySelector("input:invalid, textarea:invalid, select:invalid");
    if (invalid) {
      const details = invalid.closest("details");
      if (details) details.open = true;
      invalid.reportValidity();
      return;
    }
    saveKey();
    stop();
    clearError();
    objectUrls.forEach(URL.revokeObjectURL);
    objectUrls = [];
    results.replaceChildren();
    warnings.replaceChildren();
    warnings.hidden = true;
    preview.hidden = true;
    preview.removeAttribute("src");
    progress.removeAttribute("value"); // indeterminate until the first step
    $("placeholder").hidden = true;
    statusBox.hidden = false;
    setStage("Uploading…");
    setBusy(true);
    // With the advanced settings open the status is far below the button: bring it (and the results) into view.
    $("output").scrollIntoView({ behavior: "smooth", block: "start" });

    const body = requestBody();
    if (painted && $("target_image").files.length) body.set("mask_image", await paintedMask(), "mask.png");
    try {
      const response = await fetch("v1/jobs", {
        method: "POST",
        body,
        headers: authHeaders({ Accept: "application/json" }),
      });
      if (!response.ok) throw await apiError(response);
      const created = parseJson(await response.text());
      job = {
        id: created.id,
        statusUrl: created.status_url,
        eventsUrl: created.events_url,
        lastEventId: null,
        done: false,
        abort: null,
      };
      setStage("Queued");
      await follow(job);
    } catch (error) {
      showError(error);
      statusBox.hidden = true;
      setBusy(false);
    }
  });

  // The form as the API's multipart body: empty fields left out (the service's default), each picture only when
  // chosen, the fields of a picture only with it, the choice rows and passes as their JSON fields.
  function requestBody() {
    const body = new FormData(form);
    for (const [name, value] of [...body.entries()]) {
      if (typeof value === "string" && !value.trim()) body.delete(name);
    }
    for (const box of form.querySelectorAll("input[type=checkbox][data-boolean]")) {
      body.set(box.name, box.checked ? "true" : "false");
    }
    const given = (id) => $(id).files.length > 0;
    for (const id of ["pose_image", "init_image", "target_image", "mask_image"]) {
      if (!given(id)) body.delete(id); // an empty file part would be a bad picture
    }
    if (body.get("identity_id")) body.delete("face_image"); // the saved person instead of photos
    if (!given("init_image")) body.delete("strength");
    if (!given("target_image")) body.delete("edit_strength");
    if (body.get("mode")) {
      for (const name of ["num_inference_steps", "guidance_scale", "scheduler"]) {
        if (!touched.has(name)) body.delete(name); // the mode's own unless the user chose otherwise
      }
    }
    const loras = chosenRows($("loras"), "scale");
    if (loras.length) body.set("loras", JSON.stringify(loras));
    const controlnets = chosenRows($("controlnets"), "strength");
    if (controlnets.length) body.set("controlnets", JSON.stringify(controlnets));
    if ($("face_detail").checked) body.set("face_detail", "{}");
    if ($("hires_scale").value) body.set("hires", JSON.stringify({ scale: Number($("hires_scale").value) }));
    return body;
  }

  cancelButton.addEventListener("click", async () => {
    const current = job;
    if (!current || current.done) return;
    cancelButton.disabled = true;
    setStage("Cancelling…");
    try {
      const response = await fetch(current.statusUrl, { method: "DELETE", headers: authHeaders() });
      if (!response.ok && !current.done) throw await apiError(response);
      // the stream reports "cancelled"
    } catch (error) {
      if (current.done) return;
      showError(error);
      cancelButton.disabled = false;
    }
  });

  function stop() {
    if (!job) return;
    job.done = true;
    job.abort?.abort();
  }

  // ------------------------------------------------------------------------------------ the event stream
  // A Server-Sent Events parser fed with text chunks: events and lines may be split anywhere.
  function sseParser(onEvent) {
    let buffer = "";
    let data = [];
    let type = "";
    let id = null;
    const line = (text) => {
      if (text === "") {
        if (data.length) onEvent({ type: type || "message", data: data.join("\n"), id });
        [data, type] = [[], ""];
      } else if (!text.startsWith(":")) {
        // ":" starts a comment (the keep-alives)
        const colon = text.indexOf(":");
        const field = colon < 0 ? text : text.slice(0, colon);
        let value = colon < 0 ? "" : text.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "event") type = value;
        else if (field === "id" && !value.includes("\0")) id = value;
      }
    };
    return (chunk) => {
      buffer += chunk;
      const eol = /\r\n|\r|\n/g;
      let start = 0;
      let match;
      while ((match = eol.exec(buffer))) {
        if (match[0] === "\r" && eol.lastIndex === buffer.length) break; // perhaps half of a \r\n
        line(buffer.slice(start, match.index));
        start = eol.lastIndex;
      }
      buffer = buffer.slice(start);
    };
  }

  // Reads the job's events until a terminal one; reconnects with Last-Event-ID when the stream drops.
  async function follow(current) {
    let failures = 0;
    while (!current.done) {
      const controller = new AbortController();
      current.abort = controller;
      let stalled;
      const watch = () => {
        clearTimeout(stalled);
        stalled = setTimeout(() => controller.abort(), STALL_MS);
      };
      try {
        const url = new URL(current.eventsUrl, document.baseURI);
        url.searchParams.set("previews", "1");
        const headers = authHeaders({ Accept: "text/event-stream" });
        if (current.lastEventId !== null) headers["Last-Event-ID"] = current.lastEventId;
        watch();
        const response = await fetch(url, { headers, signal: controller.signal, cache: "no-store" });
        if (!response.ok) throw await apiError(response);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        const parse = sseParser((event) => {
          failures = 0;
          if (event.id !== null) current.lastEventId = event.id;
          if (!current.done) onEvent(current, event);
        });
        while (!current.done) {
          const { value, done } = await reader.read();
          if (done) break;
          watch();
          parse(decoder.decode(value, { stream: true }));
        }
        controller.abort(); // after a terminal event: close the connection
      } catch (error) {
        if (current.done) return; // stopped here (terminal event, cancel, a new job)
        if (error.fatal) return finish(current, "failed", { error });
      } finally {
        clearTimeout(stalled);
      }
      if (current.done) return;
      failures += 1;
      if (failures > MAX_RETRIES) {
        const error = { message: "Lost the connection to the server. The job may still finish: try again later." };
        return finish(current, "failed", { error });
      }
      setStage("Connection lost, reconnecting…");
      await sleep(Math.min(500 * 2 ** failures, 15000));
    }
  }

  function onEvent(current, event) {
    let body;
    try {
      body = parseJson(event.data);
    } catch {
      return; // not ours
    }
    switch (event.type) {
      case "state": // the job as GET v1/jobs/{id} gives it: where a (re)connection starts
        if (TERMINAL.has(body.status)) return finish(current, body.status, body);
        if (body.status === "queued") setStage("Queued");
        else if (body.stage) setStage(STAGES[body.stage] || body.stage);
        setProgress(body.step, body.total_steps);
        return;
      case "queued": // position: how many jobs wait before this one (null: unknown, e.g. after a retry)
        if (body.position == null) return setStage("Queued");
        return setStage(body.position === 0 ? "Queued: next in line" : `Queued: ${body.position} ahead`);
      case "stage":
        if (body.phase === "start") setStage(STAGES[body.stage] || body.stage);
        return;
      case "step":
        setStage(`${STAGES.denoise}: step ${body.step} of ${body.total}`);
        setProgress(body.step, body.total);
        if (body.preview) [preview.src, preview.hidden] = [body.preview, false];
        return;
      default:
        if (TERMINAL.has(event.type)) finish(current, event.type, body);
    }
  }

  function finish(current, status, body) {
    current.done = true;
    current.abort?.abort();
    if (job !== current) return;
    setBusy(false);
    if (status === "succeeded") {
      if (!progress.hasAttribute("value")) progress.max = 1;
      progress.value = progress.max;
      setStage("Done");
      preview.hidden = true;
      showResult(body.result || {});
      loadHistory();
    } else if (status === "cancelled") {
      setStage("Cancelled");
    } else {
      statusBox.hidden = true;
      const error = body.error || {};
      const requestId = error.requestId || error.request_id;
      const detail = requestId ? `request id ${requestId}` : current.id ? `job ${current.id}` : "";
      showError({ message: error.message || "The job failed." }, detail);
    }
  }

  // ------------------------------------------------------------------------------------ results
  function showResult(result) {
    const notes = result.warnings || [];
    warnings.replaceChildren(...notes.map((note) => element("li", "", note)));
    warnings.hidden = notes.length === 0;
    const images = result.images || [];
    results.replaceChildren(...images.map((image, n) => card(result, image, n, images.length)));
  }

  function card(result, image, n, count) {
    const box = element("article", "card");
    const img = element("img", "result-image");
    img.alt = `Generated image ${n + 1} of ${count}`;
    if (image.width && image.height) [img.width, img.height] = [image.width, image.height];
    const route = `v1/generations/${encodeURIComponent(result.id)}/images/${n}`;
    const extension = (image.content_type || "image/webp").split("/").pop().replace("jpeg", "jpg");

    const meta = element("div", "meta");
    meta.append(element("span", "seed", `Seed ${result.seed}`));
    const similarity = image.identity_similarity;
    meta.append(
      element(
        "span",
        "identity",
        similarity == null ? "No face found" : `Identity ${Math.round(similarity * 100)}%`,
      ),
    );
    const download = element("a", "download", "Download");
    download.href = route;
    download.download = `instantid-${result.id}-${n + 1}.${extension}`;
    // The presigned URL is on another origin (the download attribute would be ignored): save through the API.
    download.addEventListener("click", async (event) => {
      if (download.href.startsWith("blob:")) return;
      event.preventDefault();
      try {
        download.href = await blobUrl(route);
        download.click();
      } catch (error) {
        showError(error);
      }
    });
    meta.append(download);
    box.append(img, meta);
    showImage(img, image.url, route);
    return box;
  }

  // ------------------------------------------------------------------------------------ history
  // GET v1/generations: the caller's pictures, newest first, a page at a time. Each shows its thumbnail, the
  // settings it was made with, "Use these settings" (they fill the form) and Delete.
  const historyList = $("history_list");
  const historyMore = $("history_more");
  const SHOWN_SETTINGS = ["prompt", "style", "negative_prompt", "num_inference_steps", "guidance_scale", "seed"];
  let historyCursor = null;

  async function loadHistory(more = false) {
    const query = new URLSearchParams({ limit: "12" });
    if (more && historyCursor) query.set("cursor", historyCursor);
    try {
      const response = await fetch(`v1/generations?${query}`, { headers: authHeaders() });
      if (!response.ok) throw await apiError(response);
      const page = parseJson(await response.text());
      const entries = page.generations.map(historyEntry);
      if (more) historyList.append(...entries);
      else historyList.replaceChildren(...entries);
      historyCursor = page.next_cursor;
      historyMore.hidden = !historyCursor;
      $("history_empty").hidden = historyList.children.length > 0;
    } catch (error) {
      if (error.fatal) $("history_empty").hidden = false; // e.g. a key is needed: nothing to show yet
    }
  }

  function historyEntry(entry) {
    const item = element("li", "entry");
    item.dataset.id = entry.id;
    const parameters = entry.parameters || {};
    const image = (entry.images || [])[0];
    if (image) {
      const img = element("img", "thumb");
      img.alt = `Picture: ${parameters.prompt || entry.id}`;
      showImage(img, image.thumbnail_url, `v1/generations/${encodeURIComponent(entry.id)}/images/0`);
      item.append(img);
    }
    const settings = element("details", "settings");
    settings.append(element("summary", "", parameters.prompt ? `“${parameters.prompt}”` : "Settings"));
    const list = element("dl");
    for (const name of SHOWN_SETTINGS) {
      if (parameters[name] === undefined || parameters[name] === null || parameters[name] === "") continue;
      list.append(element("dt", "", label(name)), element("dd", "", String(parameters[name])));
    }
    settings.append(list);
    const reuse = element("button", "secondary", "Use these settings");
    reuse.type = "button";
    reuse.setAttribute("aria-label", `Use the settings of ${parameters.prompt || entry.id}`);
    reuse.addEventListener("click", () => useSettings(parameters));
    const remove = element("button", "secondary danger", "Delete");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete ${parameters.prompt || entry.id}`);
    remove.addEventListener("click", () => deleteEntry(entry.id, item));
    const actions = element("div", "actions");
    actions.append(reuse, remove);
    item.append(settings, actions);
    return item;
  }

  // Every form field the stored parameters name (the photos are not stored: they are chosen again).
  function useSettings(parameters) {
    const rows = (box, chosen, amount) => {
      for (const row of box.querySelectorAll(".choice")) {
        const match = (chosen || []).find((item) => item.name === row.dataset.name);
        row.querySelector('input[type="checkbox"]').checked = Boolean(match);
        if (match && match[amount] != null) row.querySelector('input[type="range"]').value = match[amount];
      }
    };
    rows($("loras"), parameters.loras, "scale");
    rows($("controlnets"), parameters.controlnets, "strength");
    $("face_detail").checked = Boolean(parameters.face_detail);
    $("hires_scale").value = parameters.hires ? parameters.hires.scale : "";
    if (typeof parameters.enhance_face_region === "boolean") {
      $("enhance_face_region").checked = parameters.enhance_face_region;
    }
    for (const field of form.elements) {
      if (field.type === "checkbox") continue;
      if (!field.name || field.type === "file" || !(field.name in parameters)) continue;
      const value = parameters[field.name];
      if (value === null && field.tagName === "SELECT" && [...field.options].some((o) => o.value === "")) {
        field.value = ""; // e.g. no fast mode
        continue;
      }
      if (value === null || value === undefined || typeof value === "object") continue;
      field.value = String(value);
      touched.add(field.name);
      if (field.type === "range") showSlider(field);
    }
    $("advanced").open = true;
    form.scrollIntoView({ behavior: "smooth", block: "start" });
    $("prompt").focus({ preventScroll: true });
  }

  async function deleteEntry(id, item) {
    try {
      const response = await fetch(`v1/generations/${encodeURIComponent(id)}`, {
        method: "DELETE",
        headers: authHeaders(),
      });
      if (!response.ok && response.status !== 404) throw await apiError(response);
      item.remove();
      $("history_empty").hidden = historyList.children.length > 0;
    } catch (error) {
      showError(error);
    }
  }

  historyMore.addEventListener("click", () => loadHistory(true));
  apiKey.addEventListener("change", () => {
    loadHistory();
    loadIdentities();
    loadModels().catch((error) => showError(error, "the models could not be read from the service"));
  });
  loadHistory();

  // The presigned URL first; when it is missing or does not load, the image through the API (with the key).
  async function showImage(img, url, route) {
    const load = (src) =>
      new Promise((resolve, reject) => {
        img.onload = resolve;
        img.onerror = () => reject(new Error("The image could not be loaded."));
        img.src = src;
      });
    if (url) {
      try {
        return await load(url);
      } catch {
        // expired, or S3 not reachable from this browser: fall back to the API
      }
    }
    try {
      await load(await blobUrl(route));
    } catch (error) {
      img.replaceWith(element("p", "failed", error.message || "The image could not be loaded."));
    }
  }
})();
