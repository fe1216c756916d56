// The demo page: WebSocket /v1/stream in, AudioWorklet out, and a live timeline.
// window.miottsDemo.stats holds the counters (browser tests read them).
"use strict";

const $ = (id) => document.getElementById(id);
const stats = {
  state: "idle",
  textMessagesSent: 0,
  framesReceived: 0,
  bytesReceived: 0,
  samplesReceived: 0,
  samplesScheduled: 0,
  samplesPlayed: 0,
  underruns: 0,
  ttfaMs: null,
  textSentAtFirstAudio: null, // text messages sent when the first audio arrived
  flushAcks: 0,
  summary: null,
  error: null,
};
window.miottsDemo = { stats };

let server = { sample_rate_hz: 24000, random_weights: false };
let run = null; // the current stream: socket, audio graph, timeline marks

function log(line) {
  const el = $("log");
  el.textContent += line + "\n";
  el.scrollTop = el.scrollHeight;
}

function setState(state) {
  stats.state = state;
  $("state").textContent = state;
}

async function loadServer() {
  const headers = {};
  const key = $("apiKey").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch("/v1/voices", { headers });
  const body = await response.json();
  const banner = $("banner");
  if (!response.ok) {
    banner.className = "banner random";
    banner.textContent = "Server: " + body.error.message;
    return;
  }
  server = body;
  const select = $("voice");
  select.innerHTML = "";
  for (const voice of body.voices) {
    const option = document.createElement("option");
    option.value = voice.name;
    option.textContent = voice.name + (voice.kind === "VOICE_KIND_STORED" ? " (stored)" : "");
    select.appendChild(option);
  }
  if (body.random_weights) {
    banner.className = "banner random";
    banner.textContent =
      "This server runs RANDOM WEIGHTS (built-in demo models): the audio streams with the " +
      "right timing but is noise, not speech. Start it with --model and --codec for real voices.";
  } else {
    banner.className = "banner real";
    banner.textContent = "Model: " + body.model + " · codec: " + body.codec;
  }
  banner.dataset.randomWeights = String(body.random_weights);
}

// ---- audio out -----------------------------------------------------------------------------
function decodeMulaw(bytes) {
  const out = new Float32Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) {
    const u = ~bytes[i] & 0xff;
    let t = ((u & 0x0f) << 3) + 0x84;
    t <<= (u & 0x70) >> 4;
    out[i] = ((u & 0x80) ? 0x84 - t : t - 0x84) / 32768;
  }
  return out;
}

function toFloat(format, buffer) {
  if (format === "PCM_F32LE") return new Float32Array(buffer);
  if (format === "MULAW") return decodeMulaw(new Uint8Array(buffer));
  const pcm = new Int16Array(buffer);
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}

// ---- the stream ----------------------------------------------------------------------------
function resetStats() {
  Object.assign(stats, {
    textMessagesSent: 0, framesReceived: 0, bytesReceived: 0, samplesReceived: 0,
    samplesScheduled: 0, samplesPlayed: 0, underruns: 0, ttfaMs: null, flushAcks: 0,
    textSentAtFirstAudio: null,
    summary: null, error: null,
  });
}

async function speak() {
  if (run) stop();
  resetStats();
  const format = $("format").value;
  const rate = format === "MULAW" ? 8000 : server.sample_rate_hz;
  // Created in the click (a user gesture), at the stream's rate: no resampling in the page.
  const context = new AudioContext({ sampleRate: rate });
  await context.audioWorklet.addModule("/static/player-worklet.js");
  const player = new AudioWorkletNode(context, "stream-player", { outputChannelCount: [1] });
  player.connect(context.destination);
  player.port.onmessage = (event) => {
    stats.samplesPlayed = event.data.played;
    stats.underruns = event.data.underruns;
  };
  const key = $("apiKey").value.trim();
  const protocols = ["miotts.v1"].concat(key ? ["bearer." + key] : []);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/v1/stream`, protocols);
  socket.binaryType = "arraybuffer";
  run = {
    socket, context, player, format, rate, t0: performance.now(), textMarks: [], chunks: [],
    acks: [], firstAudioAt: null, playStartAt: null, pendingHeader: null, timers: [],
    lastTextAt: null,
  };
  const current = run;
  setState("connecting");
  $("speak").disabled = true;
  $("stop").disabled = false;

  socket.onopen = () => {
    setState("streaming");
    socket.send(JSON.stringify({
      type: "config",
      voice: { preset: $("voice").value },
      audio: { encoding: format, sample_rate_hz: rate },
    }));
    sendText(current);
  };
  socket.onmessage = (event) => onMessage(current, event);
  socket.onclose = (event) => {
    if (run !== current) return;
    current.player.port.postMessage({ type: "end" });
    setState(stats.error ? "error" : `closed (${event.code}${event.reason ? " " + event.reason : ""})`);
    $("speak").disabled = false;
    $("stop").disabled = true;
    current.timers.forEach(clearTimeout);
  };
  requestAnimationFrame(() => draw(current));
}

function sendText(current) {
  const text = $("text").value;
  const send = (message) => {
    if (current.socket.readyState !== WebSocket.OPEN) return;
    current.socket.send(JSON.stringify(message));
    if (message.type === "text") {
      stats.textMessagesSent += 1;
      current.lastTextAt = now(current);
      current.textMarks.push({ t: current.lastTextAt, text: message.text.trim() });
    }
  };
  if (!$("wordByWord").checked) {
    send({ type: "text", text });
    send({ type: "end" });
    return;
  }
  // As an LLM would stream it: a word at a time; a flush (with an id) after each sentence.
  const words = text.split(/(?<=\s)/);
  const interval = Math.max(0, Number($("wordMs").value) || 0);
  let sentence = 0;
  words.forEach((word, i) => {
    current.timers.push(setTimeout(() => {
      send({ type: "text", text: word });
      if (/[.!?]\s*$/.test(word)) send({ type: "flush", id: `sentence-${++sentence}` });
      if (i === words.length - 1) send({ type: "end" });
    }, i * interval));
  });
}

function now(current) {
  return (performance.now() - current.t0) / 1000;
}

function onMessage(current, event) {
  if (typeof event.data !== "string") {
    const header = current.pendingHeader;
    current.pendingHeader = null;
    const samples = toFloat(current.format, event.data);
    const t = now(current);
    if (current.firstAudioAt === null) {
      current.firstAudioAt = t;
      stats.textSentAtFirstAudio = stats.textMessagesSent;
      // From the first text sent, as a user waits (the summary's figure counts from the text
      // that completed the first segment, as the server sees it).
      stats.ttfaMs = Math.round((t - (current.textMarks[0]?.t ?? 0)) * 1000);
      $("stat-ttfa").textContent = stats.ttfaMs + " ms";
      current.playStartAt = current.context.currentTime;
    }
    stats.framesReceived += 1;
    stats.bytesReceived += event.data.byteLength;
    stats.samplesReceived += samples.length;
    current.chunks.push({ t, seconds: samples.length / current.rate, segment: header?.segment_index ?? 0 });
    current.player.port.postMessage({ type: "audio", samples }, [samples.buffer]);
    stats.samplesScheduled += header ? header.num_samples : samples.length;
    return;
  }
  const message = JSON.parse(event.data);
  if (message.type === "audio") {
    current.pendingHeader = message;
  } else if (message.type === "segment") {
    log(`${now(current).toFixed(2)} s  segment ${message.segment_index} ${message.kind}: ${message.text}`);
  } else if (message.type === "flushed") {
    stats.flushAcks += 1;
    current.acks.push({ t: now(current), id: message.id });
  } else if (message.type === "summary") {
    stats.summary = message;
    log(`summary: ${message.audio_seconds.toFixed(2)} s of audio, server-side first audio ` +
        `${message.time_to_first_audio_ms.toFixed(0)} ms, real-time factor ` +
        `${message.real_time_factor.toFixed(2)}${message.random_weights ? " (random weights)" : ""}`);
  } else if (message.type === "error") {
    stats.error = message;
    log(`error ${message.code}: ${message.message}`);
  } else if (message.type === "ready") {
    log(`ready: ${message.encoding} at ${message.sample_rate_hz} Hz`);
  }
}

function stop() {
  if (!run) return;
  const current = run;
  current.timers.forEach(clearTimeout);
  if (current.socket.readyState === WebSocket.OPEN) {
    current.socket.send(JSON.stringify({ type: "cancel" }));
  }
  current.player.port.postMessage({ type: "reset" });
}

// ---- the timeline --------------------------------------------------------------------------
function draw(current) {
  const canvas = $("timeline");
  const g = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  const left = 170, right = W - 20;
  const heard = current.firstAudioAt === null ? 0 : current.firstAudioAt + stats.samplesReceived / current.rate;
  const end = Math.max(5, now(current) + 0.5, heard, ...current.chunks.map((c) => c.t + c.seconds));
  const x = (t) => left + (t / end) * (right - left);
  const lanes = { text: 60, audio: 160, play: 290 };
  g.clearRect(0, 0, W, H);
  g.font = "22px system-ui";
  g.fillStyle = "#333";
  g.fillText("text sent", 10, lanes.text + 8);
  g.fillText("audio received", 10, lanes.audio + 8);
  g.fillText("playback", 10, lanes.play + 8);
  // seconds axis
  g.strokeStyle = "#ddd";
  g.fillStyle = "#888";
  for (let s = 0; s <= end; s += end > 20 ? 5 : 1) {
    g.beginPath(); g.moveTo(x(s), 20); g.lineTo(x(s), H - 50); g.stroke();
    g.fillText(`${s} s`, x(s) - 12, H - 20);
  }
  // text ticks
  g.fillStyle = "#2458c6";
  for (const mark of current.textMarks) {
    g.fillRect(x(mark.t) - 1, lanes.text - 18, 3, 36);
  }
  // flush acks
  g.fillStyle = "#8a3fc2";
  for (const ack of current.acks) {
    g.beginPath(); g.arc(x(ack.t), lanes.text + 30, 6, 0, 2 * Math.PI); g.fill();
  }
  // audio chunks: a bar at each arrival, as tall as the audio it carries (1 s = full height)
  for (const chunk of current.chunks) {
    const h = Math.max(4, Math.min(1, chunk.seconds) * 80);
    g.fillStyle = chunk.segment % 2 ? "#d9801a" : "#f0a830";
    g.fillRect(x(chunk.t) - 3, lanes.audio + 40 - h, 6, h);
  }
  // playback: played (dark) and received but not yet played (light)
  if (current.firstAudioAt !== null) {
    const start = current.firstAudioAt;
    const played = stats.samplesPlayed / current.rate;
    const received = stats.samplesReceived / current.rate;
    g.fillStyle = "#bfe3c6";
    g.fillRect(x(start + played), lanes.play - 22, x(start + received) - x(start + played), 44);
    g.fillStyle = "#2e8b44";
    g.fillRect(x(start), lanes.play - 22, x(start + played) - x(start), 44);
    g.strokeStyle = "#c0392b";
    g.lineWidth = 3;
    g.beginPath(); g.moveTo(x(start), 25); g.lineTo(x(start), H - 50); g.stroke();
    g.lineWidth = 1;
    g.fillStyle = "#c0392b";
    g.fillText(`first audio ${stats.ttfaMs} ms`, x(start) + 8, 30);
  }
  $("stat-frames").textContent = stats.framesReceived;
  $("stat-received").textContent = (stats.samplesReceived / current.rate).toFixed(2) + " s";
  $("stat-scheduled").textContent = (stats.samplesScheduled / current.rate).toFixed(2) + " s";
  $("stat-played").textContent = (stats.samplesPlayed / current.rate).toFixed(2) + " s";
  $("stat-underruns").textContent = stats.underruns;
  const playing = stats.samplesPlayed < stats.samplesReceived;
  if (run === current && (current.socket.readyState <= WebSocket.OPEN || playing)) {
    requestAnimationFrame(() => draw(current));
  }
}

$("speak").addEventListener("click", () => speak().catch((err) => {
  stats.error = { code: "CLIENT", message: String(err) };
  log("error: " + err);
  setState("error");
  $("speak").disabled = false;
}));
$("stop").addEventListener("click", stop);
$("apiKey").addEventListener("change", () => loadServer().catch((err) => log("error: " + err)));
loadServer().catch((err) => log("error: " + err));
