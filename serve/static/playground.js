// The GMM-CIL playground: draw or drop an image, see the served model's answer, follow new versions.
// Talks only to this app's own API (relative URLs, so it works under any route prefix); no external assets.
"use strict";

(() => {
  const POLL_MS = 2000;  // how often /v1/model is asked which version is served
  const TOKEN_KEY = "gmm-cil-token";
  const INK = 14;  // stroke width on the 280 px pad: about QuickDraw's strokes once scaled to 28 px
  const $ = (id) => document.getElementById(id);
  const state = {token: sessionStorage.getItem(TOKEN_KEY) || "", version: null, drawing: false, pending: null,
                 inFlight: 0};

  // ---- talking to the API ------------------------------------------------------------------------------
  function headers(extra) {
    return Object.assign(state.token ? {Authorization: `Bearer ${state.token}`} : {}, extra || {});
  }

  async function api(path, options) {
    const response = await fetch(path, Object.assign({}, options, {headers: headers(options && options.headers)}));
    const body = await response.json().catch(() => ({detail: response.statusText}));
    if (response.status === 401) {
      askForToken(state.token ? "that token was refused" : "");
    }
    return {status: response.status, body};
  }

  // ---- the token ---------------------------------------------------------------------------------------
  function askForToken(message) {
    $("auth").hidden = false;
    $("auth-error").textContent = message;
    $("serving").textContent = "a token is needed";
    $("token").focus();
  }

  async function useToken(event) {
    event.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    state.version = null;
    if (await refreshModel()) {
      $("auth").hidden = true;
      $("auth-error").textContent = "";
    }
  }

  // ---- which version is served -------------------------------------------------------------------------
  async function refreshModel() {
    let reply;
    try {
      reply = await api("v1/model");
    } catch (error) {
      $("serving").textContent = `the service is unreachable (${error.message})`;
      return false;
    }
    if (reply.status === 503) {
      $("serving").textContent = "no model version published yet";
      return true;
    }
    if (reply.status !== 200) {
      return false;
    }
    $("auth").hidden = true;
    showModel(reply.body);
    return true;
  }

  function showModel(info) {
    $("serving").textContent = `now serving version ${info.version}, ${info.num_classes} classes`;
    $("serving").title = `task ${info.task}, rule ${info.rule}, stack ${info.stack_fingerprint}`;
    if (info.version === state.version) {
      return;
    }
    state.version = info.version;
    $("class-count").textContent = `(${info.num_classes}, version ${info.version})`;
    $("classes").replaceChildren(...info.seen_classes.map((name) => {
      const item = document.createElement("li");
      item.textContent = name;
      return item;
    }));
  }

  // ---- classifying -------------------------------------------------------------------------------------
  function classifyUrl() {
    const topK = Math.max(1, Math.min(50, parseInt($("topk").value, 10) || 5));
    return `v1/classify?top_k=${topK}&describe=${$("describe").checked}`;
  }

  async function classify(body, contentType) {
    state.inFlight += 1;
    $("status").textContent = $("describe").checked ? "thinking (and describing)…" : "thinking…";
    $("error").textContent = "";
    try {
      const options = {method: "POST", body};
      if (contentType) {
        options.headers = {"Content-Type": contentType};
      }
      const reply = await api(classifyUrl(), options);
      if (reply.status === 200) {
        showAnswer(reply.body);
      } else {
        $("error").textContent = `${reply.status}: ${reply.body.detail}`;
      }
    } catch (error) {
      $("error").textContent = `request failed: ${error.message}`;
    } finally {
      state.inFlight -= 1;
      if (state.inFlight === 0) {
        $("status").textContent = "";
      }
    }
  }

  function showAnswer(answer) {
    $("result").hidden = false;
    $("label").textContent = answer.label;
    $("score").textContent = `score ${answer.score.toFixed(3)}`;
    $("text").textContent = answer.text;
    $("topk-list").replaceChildren(...answer.top_k.map(topKItem));
    const described = typeof answer.description === "string";
    $("description-line").hidden = !described;
    $("description").textContent = described ? answer.description : "";
    $("description-end").textContent = described && !answer.description_complete ? "(cut at the length bound)" : "";
    $("answered-by").textContent = `answered by version ${answer.version} (task ${answer.task}), rule ${answer.rule}`;
    for (const item of $("classes").children) {
      item.classList.toggle("hit", item.textContent === answer.label);
    }
  }

  function topKItem(entry) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = entry.score.toFixed(3);
    item.append(name, score);
    return item;
  }

  function classifyPad() {
    $("pad").toBlob((blob) => classify(blob, "image/png"), "image/png");
  }

  function classifyFile(file) {
    if (!file) {
      return;
    }
    if (!file.type.startsWith("image/")) {
      $("error").textContent = `${file.name} is not an image`;
      return;
    }
    showOnPad(file);
    const form = new FormData();
    form.append("file", file, file.name);
    classify(form, null);  // the browser sets the multipart content type with its boundary
  }

  // ---- the drawing pad ---------------------------------------------------------------------------------
  function clearPad() {
    const pad = $("pad").getContext("2d");
    pad.fillStyle = "#fff";
    pad.fillRect(0, 0, $("pad").width, $("pad").height);
  }

  function showOnPad(file) {
    const image = new Image();
    image.onload = () => {
      clearPad();
      const canvas = $("pad");
      const scale = Math.min(canvas.width / image.width, canvas.height / image.height);
      const width = image.width * scale, height = image.height * scale;
      canvas.getContext("2d").drawImage(image, (canvas.width - width) / 2, (canvas.height - height) / 2, width, height);
      URL.revokeObjectURL(image.src);
    };
    image.src = URL.createObjectURL(file);
  }

  function padPoint(event) {
    const canvas = $("pad");
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  }

  function strokeStart(event) {
    event.preventDefault();
    $("pad").setPointerCapture(event.pointerId);
    state.drawing = true;
    clearTimeout(state.pending);
    const pad = $("pad").getContext("2d");
    const [x, y] = padPoint(event);
    pad.beginPath();
    pad.moveTo(x, y);
    pad.lineTo(x, y);
    pad.stroke();
  }

  function strokeMove(event) {
    if (!state.drawing) {
      return;
    }
    const pad = $("pad").getContext("2d");
    const [x, y] = padPoint(event);
    pad.lineTo(x, y);
    pad.stroke();
  }

  function strokeEnd() {
    if (!state.drawing) {
      return;
    }
    state.drawing = false;
    state.pending = setTimeout(classifyPad, 400);  // classify once the hand rests
  }

  function setUpPad() {
    const canvas = $("pad");
    const pad = canvas.getContext("2d");
    clearPad();
    pad.strokeStyle = "#000";
    pad.lineWidth = INK;
    pad.lineCap = "round";
    pad.lineJoin = "round";
    canvas.addEventListener("pointerdown", strokeStart);
    canvas.addEventListener("pointermove", strokeMove);
    canvas.addEventListener("pointerup", strokeEnd);
    canvas.addEventListener("pointercancel", strokeEnd);
  }

  function setUpDrop() {
    const zone = $("drop");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      classifyFile(event.dataTransfer.files[0]);
    });
  }

  function start() {
    setUpPad();
    setUpDrop();
    $("classify").addEventListener("click", classifyPad);
    $("clear").addEventListener("click", () => {
      clearPad();
      $("result").hidden = true;
    });
    $("file").addEventListener("change", (event) => classifyFile(event.target.files[0]));
    $("auth-form").addEventListener("submit", useToken);
    $("token").value = state.token;
    refreshModel();
    setInterval(() => {
      if ($("auth").hidden) {
        refreshModel();
      }
    }, POLL_MS);
  }

  start();
})();
