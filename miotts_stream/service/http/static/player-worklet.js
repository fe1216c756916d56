// AudioWorklet: plays the float32 chunks the page posts, in order, and reports progress.
// Messages in: {type: "audio", samples: Float32Array} | {type: "end"} | {type: "reset"}.
// Messages out (about every 50 ms): {played, underruns, queued}.
class StreamPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0; // read position in queue[0]
    this.played = 0; // samples sent to the output so far
    this.queued = 0; // samples waiting
    this.underruns = 0; // times the queue ran dry before the stream ended
    this.started = false;
    this.ended = false;
    this.dry = false;
    this.sinceReport = 0;
    this.port.onmessage = (event) => {
      const message = event.data;
      if (message.type === "audio") {
        this.queue.push(message.samples);
        this.queued += message.samples.length;
        this.started = true;
      } else if (message.type === "end") {
        this.ended = true;
      } else if (message.type === "reset") {
        this.queue = [];
        this.offset = 0;
        this.queued = 0;
        this.played = 0;
        this.underruns = 0;
        this.started = this.ended = this.dry = false;
      }
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let written = 0;
    while (written < out.length && this.queue.length) {
      const chunk = this.queue[0];
      const n = Math.min(out.length - written, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      if (this.offset === chunk.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    out.fill(0, written);
    this.played += written;
    this.queued -= written;
    const dryNow = this.started && !this.ended && written < out.length;
    if (dryNow && !this.dry) this.underruns += 1;
    this.dry = dryNow;
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 20) {
      this.sinceReport = 0;
      this.port.postMessage({ played: this.played, underruns: this.underruns, queued: this.queued });
    }
    return true;
  }
}

registerProcessor("stream-player", StreamPlayer);
