// Recording the converted voice: what the page plays (outputBus, after the jitter buffer, whichever transport) as
// 48 kHz mono PCM, kept in memory and written out as a 16-bit WAV file when the recording stops. WAV rather than
// MediaRecorder's WebM/Opus: every audio tool opens it, and it holds exactly what was played (no second encoding).

import { SAMPLE_RATE, startCapture } from "./audio.js";

export class Recorder {
  constructor() {
    this.chunks = [];
    this.samples = 0;
    this.stopTap = null;
  }

  /** Starts taking what the call's output plays. */
  async start(engine) {
    this.stopTap = await startCapture(engine, ({ samples }) => {
      this.chunks.push(samples);
      this.samples += samples.length;
    }, engine.outputBus);
  }

  get seconds() {
    return this.samples / SAMPLE_RATE;
  }

  /** Stops taking audio; returns the recording as a WAV Blob. */
  stop() {
    if (this.stopTap) this.stopTap();
    this.stopTap = null;
    return wavBlob(this.chunks, this.samples);
  }
}

/** 16-bit PCM mono WAV of Float32Array chunks holding `samples` samples in all (RIFF header, then the data). */
export function wavBlob(chunks, samples) {
  const header = new DataView(new ArrayBuffer(44));
  const ascii = (offset, text) => [...text].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  const dataBytes = samples * 2;
  ascii(0, "RIFF");
  header.setUint32(4, 36 + dataBytes, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  header.setUint32(16, 16, true); // fmt chunk size
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, SAMPLE_RATE, true);
  header.setUint32(28, SAMPLE_RATE * 2, true); // bytes per second
  header.setUint16(32, 2, true); // bytes per frame
  header.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  header.setUint32(40, dataBytes, true);
  const pcm = new Int16Array(samples);
  let at = 0;
  for (const chunk of chunks) {
    for (let i = 0; i < chunk.length; i++) {
      const sample = Math.max(-1, Math.min(1, chunk[i]));
      pcm[at++] = sample < 0 ? sample * 0x8000 : sample * 0x7fff;
    }
  }
  return new Blob([header, pcm], { type: "audio/wav" });
}
